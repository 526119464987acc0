#pragma once
// Harness for the fuzz targets that drive a real transport sink (MuxSessionSink,
// HttpTransportSink) or a formatter sink with bytes chosen by the fuzzer: a manual-mode runtime
// (one loop, no threads, ManualClock: no timer ever fires on its own), a listening socket on
// 127.0.0.1 that plays the server, and a call whose completions are counted.
//
// Everything runs on the fuzzer's thread: the harness polls the loop (RunUntil) while the
// "server" side uses plain non-blocking socket calls, so an iteration has no sleeps and no
// threads. Invariants the targets check (each call completes exactly once, the loop settles)
// abort through Check(), which libFuzzer reports as a crash with its input saved.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "scales/core/clock.h"
#include "scales/core/message.h"
#include "scales/core/provider.h"
#include "scales/core/runtime.h"
#include "scales/core/sink.h"
#include "scales/core/sink_stack.h"
#include "scales/stats/stats.h"

namespace scales::fuzz {

class Peer;

// Aborts with `what` when `ok` is false (a broken invariant is a finding).
void Check(bool ok, const char* what);

// The process-wide manual runtime and a listening socket, created on first use.
class Harness {
 public:
  static Harness& Get();

  EventLoop& loop() { return runtime_.loop(0); }
  ManualClock& clock() { return *clock_; }
  // A SinkContext for a sink that talks to the listening socket.
  SinkContext Context();
  // Polls the loop until `done()` holds; false if it still does not after many rounds (the
  // loop went quiet without reaching the state: a hang).
  bool RunUntil(const std::function<bool()>& done);
  // Runs whatever is ready.
  void Settle() { runtime_.RunUntilIdle(); }

  // Accepts the connection a sink opened (blocking: the connect to 127.0.0.1 has completed in
  // the kernel by the time the sink's connect was issued). Returns a non-blocking socket.
  int Accept();

  struct OpenResult {
    bool done = false;
    error_code error;
  };
  // Starts `sink`'s open and accepts its connection; `result` is filled when the open
  // completes (it must outlive the open).
  std::unique_ptr<Peer> Open(ClientMessageSink& sink, OpenResult& result);

 private:
  Harness();
  std::shared_ptr<ManualClock> clock_;
  Runtime runtime_;
  stats::StatsRegistry registry_;
  stats::StatsScope scope_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
};

// The server side of one accepted connection.
class Peer {
 public:
  explicit Peer(int fd) : fd_(fd) {}
  ~Peer();
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  // Writes what fits without blocking; returns the bytes written (errors count as written:
  // the client may have closed the connection, which is its right).
  size_t Send(std::string_view bytes);
  // Sends `bytes` completely, polling the loop while the socket buffer is full.
  void SendAll(std::string_view bytes);
  // SendAll, in two writes with the loop run between them when `split`; then end of stream.
  void SendAndClose(std::string_view bytes, bool split);
  // Appends whatever the client has sent so far to received().
  void Drain();
  const std::string& received() const { return received_; }
  // No more bytes from the server (the client sees end of stream).
  void ShutdownWrite();

 private:
  int fd_;
  std::string received_;
};

// One call through a sink: the message, its sink stack, request and reply Streams, and a sink
// at the bottom of the stack that counts the completions.
class Call {
 public:
  Call();
  ~Call();
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  MethodCallMessage& message() { return message_; }
  SinkStack& stack() { return stack_; }
  Stream& request() { return request_; }
  Stream& reply() { return reply_; }
  int completions() const;
  const MethodReturnMessage& result() const;

 private:
  class Catcher;
  MethodCallMessage message_;
  SinkStack stack_;
  Stream request_;
  Stream reply_;
  std::shared_ptr<Catcher> catcher_;
};

}  // namespace scales::fuzz
