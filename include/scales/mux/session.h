#pragma once
// MuxSessionSink: one multiplexed Mux session (a TCP connection) to one endpoint, as the
// transport sink of ThriftMux (pooled by a SingletonPool: one session per endpoint per loop).
//
// Open: TCP connect, then (unless disabled) the handshake of ../shared/mux-protocol.md §1.7:
// the "tinit check" probe; a server that echoes it gets Tinit (version 1, our mux-framer and
// tls=off) and must answer Rinit, whose mux-framer bounds the fragments we send; a server
// that answers anything else (an old Finagle server) gets an un-negotiated session.
//
// Requests: each gets the lowest free tag from 2 (never past 0x7FFFFF) and goes out as a
// Tdispatch carrying the call's payload (a scales::Stream) and contexts: Deadline
// (nanoseconds, on by default), ClientId, Retries, TraceContext and request headers. Writes of
// many requests are batched into one socket write. Replies are matched by tag: Rdispatch Ok
// gives the body (in the call's reply Stream), Error → kServerError, Nack → kNack (retryable),
// Rerr → kServerError. A request cancelled (timeout) before it was written is dropped and its
// tag freed; after it was written, Tdiscarded is sent and the tag stays reserved until the
// server answers that tag.
//
// Session messages: Tping answered with Rping; Tdrain answered with Rdrain, after which the
// session takes no new request (they fail with a retryable kNack), reports Busy, and closes
// once its requests finish; Tlease sets a lease, and an expired lease reports Busy. The client
// pings on tag 1 every ping_interval; no Rping within ping_timeout closes the session. An
// undecodable frame, an unknown message type or a server-initiated dispatch closes the
// session and fails its requests with kProtocolError.
//
// Thread safety: used on one event loop.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/core/timer_queue.h"
#include "scales/mux/codec.h"
#include "scales/transport/tcp.h"

namespace scales::mux {

struct SessionOptions {
  // TCP connect timeout; the handshake must also finish within it. Default 5 s; > 0.
  Duration connect_timeout = std::chrono::seconds(5);
  // Send the probe and Tinit when opening. Default true. When false the session starts
  // un-negotiated (as scales' Python client did).
  bool handshake = true;
  // Largest frame accepted from the server (size field). Default 32 MiB.
  uint32_t max_frame_size = 32u << 20;
  // Largest reassembled message per tag (sum of fragment bodies). Default 32 MiB.
  size_t max_message_size = 32u << 20;
  // The mux-framer we advertise: the largest fragment body we accept. Default unlimited.
  uint32_t max_fragment_size = kUnlimitedFragmentSize;
  // Liveness: a Tping on tag 1 every ping_interval (zero = no pings); no Rping within
  // ping_timeout closes the session. Defaults 5 s / 4 s (Finagle's failure detector).
  Duration ping_interval = std::chrono::seconds(5);
  Duration ping_timeout = std::chrono::seconds(4);
  // Send the call's deadline in the Deadline context. Default true.
  bool propagate_deadline = true;
  // Most tags reserved by discarded requests the server has not answered; beyond it the
  // session is considered broken and closed. Default 10000.
  size_t max_discarded_tags = 10000;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable.
void Validate(const SessionOptions& o);

class MuxSessionSink final : public ClientMessageSink {
 public:
  MuxSessionSink(const SinkContext& ctx, SessionOptions options);
  ~MuxSessionSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "mux-session"; }

  // For tests and metrics.
  size_t tags_in_use() const noexcept { return tags_in_use_; }
  size_t pending() const noexcept { return pending_count_; }
  bool negotiated() const noexcept { return negotiated_; }
  bool draining() const noexcept { return draining_; }
  uint32_t peer_max_fragment_size() const noexcept { return peer_max_fragment_; }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  enum class State { kIdle, kConnecting, kHandshaking, kOpen, kClosed };
  // One tag in use: a live request, or a discarded one waiting for the server's answer.
  struct Pending {
    SinkStack* stack = nullptr;  // null once discarded
    Stream* reply = nullptr;
    bool written = false;
  };

  std::shared_ptr<MuxSessionSink> self() {
    return std::static_pointer_cast<MuxSessionSink>(shared_from_this());
  }
  void OnConnected(error_code ec);
  void StartHandshake();
  void HandshakeFrame(const Frame& frame);
  void FinishOpen();
  void FailOpen(error_code ec, std::string detail);

  void StartRead();
  void OnRead(const boost::system::error_code& ec, size_t n);
  void HandleFrame(Frame frame);
  void HandleMessage(Message m);
  void Answer(uint32_t tag, error_code ec, std::string detail, std::string* body = nullptr,
              const Contexts* contexts = nullptr);

  using PendingMap = std::unordered_map<uint32_t, Pending>;
  void AddPending(uint32_t tag, Pending p);
  void ErasePending(PendingMap::iterator it);

  void Enqueue(const Message& m);
  void Flush();
  void OnWritten(const boost::system::error_code& ec, size_t n);

  uint32_t AllocateTag();
  void FreeTag(uint32_t tag);

  static void OnPingTimer(void* self);
  static void OnPingTimeout(void* self);
  static void OnHandshakeTimeout(void* self);
  void SchedulePing();

  // Closes the socket and answers every pending request with `ec` (once).
  void Fail(error_code ec, const std::string& detail, bool fault);
  void MaybeFinishDrain();

  EventLoop& loop_;
  SessionOptions options_;
  TcpConnection conn_;
  std::string address_;
  State state_ = State::kIdle;
  OpenWaiters open_waiters_;
  int handshake_phase_ = 0;  // 1: probe sent; 2: Tinit sent
  bool negotiated_ = false;
  bool draining_ = false;
  std::optional<TimePoint> lease_end_;
  uint32_t peer_max_fragment_ = kUnlimitedFragmentSize;

  FrameDecoder decoder_;
  Reassembler reassembler_;
  // Grows from kMinReadBuffer (doubling after a read that filled it) up to kMaxReadBuffer.
  static constexpr size_t kMinReadBuffer = 4 * 1024;
  static constexpr size_t kMaxReadBuffer = 64 * 1024;
  std::vector<char> read_buffer_;

  FragmentWriter writer_;
  // The Tdispatch every request is built in: its contexts, keys and payload keep their
  // capacity from one request to the next, so building one allocates little.
  Message dispatch_scratch_{Tdispatch{}};
  std::string write_buffer_;  // the bytes of the write in flight
  std::vector<uint32_t> queued_tags_;  // dispatches in writer_ not yet handed to a write
  bool writing_ = false;

  std::vector<uint64_t> tag_bits_;  // bit t set = tag t in use
  size_t tags_in_use_ = 0;
  PendingMap pending_;
  // Nodes of answered requests, reused by the next ones so a request costs pending_ no
  // allocation in steady state (at most the peak of outstanding requests are kept).
  std::vector<PendingMap::node_type> spare_nodes_;
  size_t pending_count_ = 0;    // live requests (not discarded)
  size_t discarded_count_ = 0;  // reserved tags of discarded requests

  TimerEntry ping_timer_;
  TimerEntry ping_timeout_;
  TimerEntry handshake_timer_;
  bool ping_outstanding_ = false;

  stats::Gauge& tags_gauge_;
  stats::Counter& pings_sent_;
  stats::Counter& ping_timeouts_;
  stats::Counter& discards_sent_;
  stats::Counter& drains_;
  stats::Counter& nacks_;
  stats::Counter& protocol_errors_;
};

SinkProvider MuxSessionProvider(SessionOptions options = {});

}  // namespace scales::mux
