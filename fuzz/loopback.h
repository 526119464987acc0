#pragma once
// Harness for the fuzz targets that drive a real transport sink (MuxSessionSink,
// HttpTransportSink) or a formatter sink with bytes chosen by the fuzzer: a manual-mode runtime
// (one loop, no threads, ManualClock: no timer ever fires on its own), a listening socket on
// 127.0.0.1 that plays the server, and a call whose completions are counted. A target that
// fuzzes a server-side session instead (the admin server's) plays the client: Connect() gives
// it both ends of a connection, the fuzzer's end in a Peer.
//
// Everything runs on the fuzzer's thread: the harness polls the loop (RunUntil) while the
// "server" side uses plain non-blocking socket calls, so an iteration has no threads. The
// server's writes go out at once (TCP_NODELAY), and after each the harness runs the loop until
// the client has read every byte sent (the client's socket is in this process: TCP_INFO and
// FIONREAD tell): the client has read one write before the next is sent, whatever the kernel's
// timing, so that an input replays the same way every time. Invariants the targets check (each call completes exactly once, the loop settles)
// abort through Check(), which libFuzzer reports as a crash with its input saved.

#include <chrono>
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

// The sizes of the writes (Peer::SendChunks) that bits 4-7 of a target's flags byte select: 0 is
// one write. make_corpus.py's chunk() gives the bits for a size.
inline constexpr size_t kWriteSizes[16] = {0, 1, 2, 3, 5, 7, 8, 13, 16, 21, 32, 34, 55, 64, 89, 100};
inline size_t WriteSize(uint8_t flags) { return kWriteSizes[flags >> 4]; }

// The process-wide manual runtime and a listening socket, created on first use.
class Harness {
 public:
  static Harness& Get();

  EventLoop& loop() { return runtime_.loop(0); }
  ManualClock& clock() { return *clock_; }
  // A SinkContext for a sink that talks to the listening socket.
  SinkContext Context();
  // Polls the loop until `done()` holds; false if it still does not after many rounds and then
  // `patience` of real time waiting for the loop's events (the loop went quiet without reaching
  // the state: a hang).
  bool RunUntil(const std::function<bool()>& done,
                std::chrono::milliseconds patience = std::chrono::milliseconds(5000));
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

  struct Connection {
    int client = -1;  // connected to the listening socket; non-blocking, TCP_NODELAY
    int server = -1;  // its accepted end, as Accept() returns it
  };
  // A connection made by this process to its listening socket, for a target whose code under
  // test is the server: the fuzzer sends from `client` (wrap it in a Peer).
  Connection Connect();

 private:
  Harness();
  std::shared_ptr<ManualClock> clock_;
  Runtime runtime_;
  stats::StatsRegistry registry_;
  stats::StatsScope scope_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
};

// The fuzzer's end of a connection whose other end is a socket of this process: the server
// side of a connection a sink opened, or the client side of one to a server-side session.
class Peer {
 public:
  explicit Peer(int fd);
  ~Peer();
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  // Writes what fits without blocking; returns the bytes written (errors count as written:
  // the client may have closed the connection, which is its right).
  size_t Send(std::string_view bytes);
  // Sends `bytes` completely, polling the loop while the socket buffer is full.
  void SendAll(std::string_view bytes);
  // SendAll in writes of at most `chunk` bytes (0: one write), after each running the loop
  // until the client has read everything sent (WaitDelivered), so that the client reads the
  // bytes in pieces of that size (or smaller: its reads may be smaller).
  void SendChunks(std::string_view bytes, size_t chunk);
  // Whether the client socket has received and read every byte sent so far (or is closed).
  bool Delivered() const;
  // Runs the loop until Delivered() (bounded: a client that does not read is left alone).
  void WaitDelivered();
  // Appends whatever the client has sent so far to received().
  void Drain();
  const std::string& received() const { return received_; }
  // Whether Drain() saw the other end close the connection (end of stream, or a reset).
  bool closed() const { return closed_; }
  // No more bytes from the server (the client sees end of stream).
  void ShutdownWrite();

 private:
  int fd_;
  int client_fd_ = -1;  // the client's socket (in this process), -1 if not found
  uint16_t client_port_ = 0;
  uint64_t sent_ = 0;  // bytes sent to the client
  std::string received_;
  bool closed_ = false;
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
  // The reply Stream's bytes when the call completed (copied then: a sink may reuse the slot).
  const std::string& reply_at_completion() const;
  // Runs after each completion, from the completing sink's stack (a handler starting the next
  // request from there, as a client's callback does).
  void OnComplete(std::function<void()> f);

 private:
  class Catcher;
  MethodCallMessage message_;
  SinkStack stack_;
  Stream request_;
  Stream reply_;
  std::shared_ptr<Catcher> catcher_;
};

}  // namespace scales::fuzz
