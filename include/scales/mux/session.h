#pragma once
// MuxSessionSink: one multiplexed Mux session (a TCP connection) to one endpoint, as the
// transport sink of ThriftMux (pooled by a SingletonPool: one session per endpoint per loop).
//
// Open: TCP connect (with `tls.enabled`, the TLS handshake follows at once: TLS from the first
// byte), then (unless disabled) the handshake of ../shared/mux-protocol.md §1.7: the "tinit
// check" probe; a server that echoes it gets Tinit (version 1, our mux-framer and our
// opportunistic `tls` level) and must answer Rinit, whose mux-framer bounds the fragments we
// send; a server that answers anything else (an old Finagle server) gets an un-negotiated
// session.
//
// Opportunistic TLS (the Rinit's `tls` header against ours, §1.7's outcome table): off/desired
// either way -> plaintext; both desired or required -> the TLS handshake starts right after
// Rinit, once a plaintext write in flight (Rpings answering Tpings sent before Rinit) ended
// (CA, verification, server name and client certificate from `tls`) and the session
// opens once it succeeded; off against required (either side), or required against a server
// that does not negotiate, fails the open with kTlsFailed naming the endpoint and both levels.
//
// Requests: each gets the lowest free tag from 2 (never past 0x7FFFFF) and goes out as a
// Tdispatch carrying the call's payload (a scales::Stream) and contexts: Deadline
// (nanoseconds, on by default), ClientId, Retries, TraceContext, BackupRequest (on a backup
// attempt) and request headers. Writes of
// many requests are batched into few socket writes (SessionOptions::write_splits). Replies are
// matched by tag: Rdispatch Ok gives the body (in the call's reply Stream), Error →
// kServerError, or kNack (retryable, as Finagle's requeue filter treats it) when its MuxFailure
// context has the Retryable or Rejected flag and not NonRetryable; Nack → kNack (retryable;
// kNonRetryableNack when its MuxFailure context has the NonRetryable flag), Rerr →
// kServerError. A request cancelled (timeout)
// before it was written is dropped and its tag freed; after it was written, Tdiscarded is sent
// and the tag stays reserved until the server answers that tag. Asio's `total` (no side
// effects: RequestUnsent) cancels only the former.
//
// Session messages: Tping answered with Rping (at most max_queued_control_replies Rping/Rdrain
// wait for the socket: a server that floods Tping without reading closes the session);
// Tdrain answered with Rdrain (each one; a repeated Tdrain is not another drain: counted and
// reported once), after which the session takes no new request (they fail with a retryable
// kNack), reports Busy, raises on_faulted (kNack: the SingletonPool gives new requests a new
// session), and closes once its requests finish. Both may come before Rinit too: a Tping is
// answered and the handshake goes on; a Tdrain (also one before the probe's answer) is answered
// and fails the open with kNack (retryable: no request was sent) once the Rdrain is written,
// whatever follows it; if that write does not finish by the handshake's deadline
// (connect_timeout), the open fails with kConnectTimeout saying the Rdrain was still unwritten. Tlease sets a lease, and an
// expired lease reports Busy. The client pings on tag 1 every ping_interval; no Rping within
// ping_timeout closes the session. An
// undecodable frame, an unknown message type or a server-initiated dispatch closes the
// session and fails its requests with kProtocolError. Whatever closes the session, a request
// that never left the process (still queued behind an unfinished write, or beyond the piece of
// it in flight) fails with kNotSent instead, which the retry sink may repeat.
//
// Thread safety: used on one event loop.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/core/timer_queue.h"
#include "scales/mux/codec.h"
#include "scales/transport/tcp.h"
#include "scales/transport/tls.h"

namespace scales::mux {

// The opportunistic TLS level sent as the Tinit `tls` header (§1.7).
enum class OpportunisticTls { kOff, kDesired, kRequired };
// "off", "desired", "required".
const char* ToString(OpportunisticTls level) noexcept;
// Parses "off" / "desired" / "required"; nullopt for anything else.
std::optional<OpportunisticTls> ParseOpportunisticTls(std::string_view s) noexcept;

// The smallest SessionOptions::max_frame_size. Only Rdispatch is fragmented, so the other
// messages a server sends come whole: Rinit with its headers (about 50 bytes for mux-framer and
// tls, more with compression), the probe's echo, Tlease, an Rerr's reason, a Nack's MuxFailure
// context. 512 bytes holds them with room for a reason of a few hundred characters; below that
// ordinary handshakes and errors would close the session as protocol errors, and the advertised
// mux-framer (max_frame_size - 4) would cut replies into absurdly small fragments.
inline constexpr uint32_t kMinMaxFrameSize = 512;

// The largest frame accepted from the server until the session opens (the probe's answer, Rinit,
// a Tping or Tdrain before it; SessionOptions::max_frame_size if that is lower). Handshake frames
// are small; a size field over this one (a server of another protocol, a length altered on the
// way) fails the open at once as a protocol error, where waiting for the bytes it announces would
// hold the open until connect_timeout.
inline constexpr uint32_t kMaxHandshakeFrameSize = 64u << 10;

struct SessionOptions {
  // TCP connect timeout; the handshake must also finish within it. Default 5 s; > 0.
  Duration connect_timeout = std::chrono::seconds(5);
  // Send the probe and Tinit when opening. Default true. When false the session starts
  // un-negotiated (as scales' Python client did).
  bool handshake = true;
  // Largest frame accepted from the server (size field). Default 32 MiB; >= kMinMaxFrameSize.
  uint32_t max_frame_size = 32u << 20;
  // Largest reassembled message per tag (sum of fragment bodies). Default 32 MiB.
  size_t max_message_size = 32u << 20;
  // Most fragment bytes buffered for all tags together (replies arriving in fragments on many
  // tags at once); one more closes the session. Default 64 MiB; > 0.
  size_t max_reassembly_bytes = 64u << 20;
  // The largest fragment body we accept. Tinit advertises it as our mux-framer, lowered to
  // max_frame_size - 4 (the body max_frame_size leaves after type and tag; see
  // AdvertisedFragmentSize), so that a server honouring it never sends a frame over
  // max_frame_size: a larger reply comes in fragments, bounded by max_message_size. Default
  // unlimited.
  uint32_t max_fragment_size = kUnlimitedFragmentSize;
  // Liveness: a Tping on tag 1 every ping_interval (zero = no pings); no Rping within
  // ping_timeout closes the session. Defaults 5 s / 4 s (Finagle's failure detector).
  // ping_timeout also bounds how long a drained session waits for its last write (its Rdrain),
  // pings on or off (0 with pings off: it closes at once). ping_interval >= 0; ping_timeout
  // > 0 with pings on, >= 0 without.
  Duration ping_interval = std::chrono::seconds(5);
  Duration ping_timeout = std::chrono::seconds(4);
  // Send the call's deadline in the Deadline context. Default true.
  bool propagate_deadline = true;
  // Most tags reserved by discarded requests the server has not answered; beyond it the
  // session is considered broken and closed. Default 10000.
  size_t max_discarded_tags = 10000;
  // TLS from the first byte when `tls.enabled` (the handshake comes before the probe). Its CA
  // file, verification, server name and client certificate also serve opportunistic TLS.
  // Default off.
  TlsOptions tls;
  // Opportunistic TLS negotiated in Tinit (needs `handshake`; not with tls.enabled). Default
  // off.
  OpportunisticTls opportunistic_tls = OpportunisticTls::kOff;
  // Most control replies (Rping answering the server's Tping, Rdrain) queued behind a socket
  // write that has not finished; one more closes the session (a server that floods Tping
  // without reading would otherwise grow the queue without limit). Default 10000 (80 KB of
  // frames); >= 1.
  size_t max_queued_control_replies = 10000;
  // Requests that the callers' handlers start while the session handles the replies of one
  // read go out together, so that one write carries many (one read brings many replies when
  // many calls are outstanding). Writing them all only after the last reply would leave the
  // server idle meanwhile: once the requests waiting reach 1/write_splits of the calls in
  // flight (and at least 4) they are written at once, so a read's batch leaves in up to about
  // write_splits writes and the server works on the first while the client handles the rest.
  // 1 = one write per read, at its end. Default 4 (at 64 calls in flight on one session,
  // 1.7x the throughput of 1 at less CPU per call; docs/PERFORMANCE.md); >= 1.
  uint32_t write_splits = 4;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable.
void Validate(const SessionOptions& o);

// The mux-framer value Tinit advertises: min(max_fragment_size, max_frame_size - 4).
uint32_t AdvertisedFragmentSize(const SessionOptions& o) noexcept;

class MuxSessionSink final : public ClientMessageSink {
 public:
  MuxSessionSink(const SinkContext& ctx, SessionOptions options);
  ~MuxSessionSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  bool RequestUnsent(const SinkStack& stack, void* context) const override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "mux-session"; }

  // For tests and metrics.
  size_t tags_in_use() const noexcept { return tags_in_use_; }
  size_t pending() const noexcept { return pending_count_; }
  bool negotiated() const noexcept { return negotiated_; }
  bool tls_active() const noexcept { return conn_.tls_active(); }
  // Why the open failed, naming the endpoint and the step (the TLS levels of both ends, OpenSSL's
  // reason, a bad Rinit); empty if it did not fail. Also the detail of on_faulted(), which is set
  // for a failed open. Pools may use it as the failed request's detail (as with
  // ConnectionSink::open_failure_detail()).
  std::string open_failure_detail() const override { return open_failure_detail_; }
  bool draining() const noexcept { return draining_; }
  // Bytes of requests and control messages queued for a write that has not started (behind the
  // write in flight), bookkeeping included. Bounded by about twice what the live ones need:
  // requests cancelled before they were written give their bytes back even while a write
  // never finishes.
  size_t queued_bytes() const noexcept { return writer_.buffered_bytes() + queued_tags_.size() * sizeof(uint32_t); }
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
    bool cut = false;     // MarkUnsentInWriteBuffer: some of its bytes left, not all
    bool used = false;    // the slot holds a tag's request
    bool listed = false;  // DropStaleQueuedTags kept its tag already
  };

  std::shared_ptr<MuxSessionSink> self() {
    return std::static_pointer_cast<MuxSessionSink>(shared_from_this());
  }
  void OnConnected(error_code ec);
  void StartHandshake();
  void HandshakeFrame(const FrameView& frame);
  // After Rinit: applies the TLS outcome table; false when the open failed.
  bool NegotiateTls(const Rinit& rinit);
  void OnTlsUpgraded(error_code ec);
  void FinishOpen();
  void FailOpen(error_code ec, std::string detail);
  // What the handshake waits for the server to answer, for messages: "the handshake probe" or
  // "Tinit".
  const char* HandshakeStep() const noexcept { return handshake_phase_ == 1 ? "the handshake probe" : "Tinit"; }

  void StartRead();
  void OnRead(const boost::system::error_code& ec, size_t n);
  void HandleFrame(const FrameView& frame);
  void HandleMessage(Message m);
  // Answers a well-formed Ok Rdispatch of a live request straight from the frame; false (and
  // nothing done) for any other reply.
  bool AnswerOk(const FrameView& frame);
  void Answer(uint32_t tag, error_code ec, std::string detail, std::string* body = nullptr,
              const Contexts* contexts = nullptr);

  // The request of `tag`, or null.
  Pending* FindPending(uint32_t tag) noexcept {
    return tag < pending_.size() && pending_[tag].used ? &pending_[tag] : nullptr;
  }
  // The request of `tag` if it was written, or null: what a reply from the server may answer.
  // A reply for a tag whose request is still queued (a duplicate of the previous request's
  // reply, the tag having been reused meanwhile, or a guess) is ignored like one for an
  // unknown tag; taken as the answer, it would be another request's reply.
  Pending* FindSent(uint32_t tag) noexcept {
    Pending* p = FindPending(tag);
    return p != nullptr && p->written ? p : nullptr;
  }
  void AddPending(uint32_t tag, Pending p);
  void ErasePending(uint32_t tag) noexcept { pending_[tag] = Pending{}; }

  void Enqueue(const Message& m);
  // Queues Rping/Rdrain; false (and the session closed) past max_queued_control_replies.
  bool EnqueueControlReply(const Message& m);
  // Starts writing what is queued, unless a write is in progress (its end flushes again) or,
  // without `now`, OnRead is still handling a read's frames (its end flushes).
  void Flush(bool now = false);
  // Writes the next piece of write_buffer_ (at most kMaxWriteChunk bytes).
  void WriteMore();
  void OnWritten(const boost::system::error_code& ec, size_t n);
  // Marks unwritten the live requests of write_buffer_ with a frame beyond the bytes the socket
  // may have taken (the session failed with the write unfinished): queued, or cut mid-write.
  void MarkUnsentInWriteBuffer();
  // Drops the entries of queued_tags_ left by requests cancelled before they were written.
  void DropStaleQueuedTags();

  uint32_t AllocateTag();
  void FreeTag(uint32_t tag);

  static void OnPingTimer(void* self);
  static void OnPingTimeout(void* self);
  static void OnDrainTimeout(void* self);
  static void OnHandshakeTimeout(void* self);
  void SchedulePing();

  // Closes the socket and answers every pending request with `ec` (once).
  void Fail(error_code ec, const std::string& detail, bool fault);
  // Counts and logs a protocol error, then fails the session with kProtocolError.
  void ProtocolError(const std::string& detail);
  void MaybeFinishDrain();

  EventLoop& loop_;
  SessionOptions options_;
  TcpConnection conn_;
  std::string address_;
  State state_ = State::kIdle;
  OpenWaiters open_waiters_;
  int handshake_phase_ = 0;  // 1: probe sent; 2: Tinit sent; 3: TLS upgrade after Rinit
  bool negotiated_ = false;
  bool draining_ = false;
  std::optional<TimePoint> lease_end_;
  uint32_t peer_max_fragment_ = kUnlimitedFragmentSize;
  std::string peer_tls_;  // the Rinit's tls header, for messages
  Fault close_reason_;    // why Fail() closed the session
  std::string open_failure_detail_;
  bool tls_quiet_ = true;  // nothing read since TLS started (a refusal shows up as the first read)

  FrameDecoder decoder_;
  Reassembler reassembler_;
  // Grows from kMinReadBuffer (doubling after a read that filled it) up to kMaxReadBuffer.
  static constexpr size_t kMinReadBuffer = 4 * 1024;
  static constexpr size_t kMaxReadBuffer = 64 * 1024;
  // The fewest requests written before a read's replies are all handled (write_splits).
  static constexpr size_t kMinWriteSplit = 4;
  // The most bytes handed to one write_some (WriteMore).
  static constexpr size_t kMaxWriteChunk = 256 * 1024;
  std::vector<char> read_buffer_;

  FragmentWriter writer_;
  // Encoded context values of the request being written (Deadline, Retries, TraceContext):
  // kept, with their capacity, from one request to the next.
  std::string deadline_value_;
  std::string retries_value_;
  int encoded_retries_ = 0;  // what retries_value_ holds (when not empty)
  std::string trace_value_;
  std::string write_buffer_;  // the bytes of the write in flight
  // Of write_buffer_: bytes the socket took, and the size of the write_some in flight (the
  // bytes it may have taken already). Requests starting beyond both were not sent.
  size_t write_offset_ = 0;
  size_t write_in_flight_ = 0;
  // Tags of the dispatches in writer_ not yet handed to a write (and of cancelled ones that
  // were, until the next write).
  std::vector<uint32_t> queued_tags_;
  size_t stale_queued_tags_ = 0;  // entries of queued_tags_ left by cancelled requests
  size_t queued_control_replies_ = 0;  // Rping/Rdrain in writer_ not yet handed to a write
  bool writing_ = false;
  // OnRead is handling a read's frames: writes wait for its end, or for enough requests
  // (options_.write_splits).
  bool reading_batch_ = false;
  bool write_predates_batch_ = false;  // a write was in progress when the read batch began

  std::vector<uint64_t> tag_bits_;  // bit t set = tag t in use
  size_t tags_in_use_ = 0;
  // Requests by tag. Tags are allocated lowest first, so the table is as long as the peak of
  // tags in use, and a lookup is an index (no hashing, no allocation per request).
  std::vector<Pending> pending_;
  size_t pending_count_ = 0;    // live requests (not discarded)
  size_t discarded_count_ = 0;  // reserved tags of discarded requests

  TimerEntry ping_timer_;
  TimerEntry ping_timeout_;
  TimerEntry drain_timer_;  // a drained session's last write (MaybeFinishDrain)
  TimerEntry handshake_timer_;
  bool ping_outstanding_ = false;

  stats::Gauge& tags_gauge_;
  stats::Counter& pings_sent_;
  stats::Counter& ping_timeouts_;
  stats::Counter& discards_sent_;
  stats::Counter& drains_;
  stats::Counter& nacks_;
  stats::Counter& protocol_errors_;
  stats::Counter& tls_upgrades_;
};

SinkProvider MuxSessionProvider(SessionOptions options = {});

}  // namespace scales::mux
