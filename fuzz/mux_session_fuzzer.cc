// Fuzz target: a MuxSessionSink (include/scales/mux/session.h) on a real loopback connection,
// driven by a script of client and server events, its behaviour checked against a model.
//
// Input: byte 0 = flags, byte 1 = L, then L script bytes, then the server's byte stream.
// Flags: bit 0 = the session opens with the handshake (the stream answers the probe and
// Tinit); bit 1 = pings every 1 s (timeout 450 ms); bit 2 = tiny limits (max_discarded_tags
// and max_queued_control_replies 2); bit 3 = every completion starts a new request from the
// completion handler, as a client's callback does (at most 6); bit 4 = a completion handler
// that started a request cancels it at once (twice at most): a request cancelled before it was
// written is dropped from the queue and its tag freed.
// Script bytes (op = byte >> 5, n = byte & 31):
//   0, 6, 7  send the stream's next n+1 frames (by their size fields) in one write
//   1        send the stream's next n+1 bytes in one write
//   2        start (n & 7) + 1 requests, each with its own payload
//   3        cancel the (n mod live)-th request not yet answered (it was written, so the
//            session sends Tdiscarded and the tag stays reserved until the server answers it)
//   4        advance the clock by (n+1) x 100 ms (pings, ping timeout, handshake timeout)
//   5        end of stream now
// When the script ends, the rest of the stream is sent, then end of stream. Writes are at most
// 4096 bytes (the session's first read buffer), and after each the loop runs until the session
// has read everything sent, so that one write is one read.
//
// Limits are tiny (frames of 512 bytes, 64 reassembled bytes per tag) so that short inputs and
// the seeds (make_corpus.py) reach them.
//
// The model (class Model) decodes the same bytes with FrameDecoder, Reassembler and
// DecodeMessage and applies what the session documents: replies matched to requests by tag,
// only for tags whose request was written (a fragment for another tag is dropped unbuffered; a
// request started from a completion is written when the read's frames are handled), discarded
// tags freed by the server's answer, Rerr/Rdiscarded/Error/Nack codes (a Nack flagged
// non-retryable in its MuxFailure context: kNonRetryableNack; an Error flagged retryable or
// rejected and not non-retryable: kNack), a protocol error (undecodable
// frame, bad fragment, unexpected message) closing the session and failing its requests in tag
// order, the handshake's outcome (a Tdrain before the probe's answer or the Rinit: the open
// fails with kNack once the Rdrain is written, what follows it in the read ignored), the
// lowest free tag for each request, pings and their
// timeout, the handshake timeout, max_discarded_tags. After each step it checks that exactly
// the calls the model answered have completed, each once, with the model's outcome (a
// success's reply is the body of the Rdispatch that answered its tag, its response headers
// those of that Rdispatch; a message put together from fragments is within max_message_size),
// that pending() and tags_in_use() are the model's counts, that the open completed as the
// model says, that every Tdispatch the session wrote has the model's tag, and that the session
// sent the model's pings and answered each Tping. What the model does not follow (Tdrain on an
// open session and the drain that ends it; 4 or more requests started from completions in one read,
// which write_splits may write in the middle of the read) switches it off for the rest of the
// input; the model-free checks remain: each call completes at most once (exactly once by the
// end), pending() is the number of calls not answered, the tags held beyond them are no more
// than the cancels and max_discarded_tags allow, and a closed session holds no tags.
// FUZZ_DEBUG=1 prints each call's outcome and why the model was switched off.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "loopback.h"
#include "scales/mux/codec.h"
#include "scales/mux/session.h"

namespace {

using namespace scales;
using namespace scales::mux;
using fuzz::Check;

constexpr uint32_t kMaxFrame = 512;
constexpr size_t kMaxMessage = 64;
constexpr auto kPingInterval = std::chrono::milliseconds(1000);
constexpr auto kPingTimeout = std::chrono::milliseconds(450);
constexpr auto kConnectTimeout = std::chrono::milliseconds(1050);
constexpr int kMaxFollowups = 6;
constexpr int kMaxFollowupCancels = 2;
constexpr size_t kMaxCalls = 64;
constexpr size_t kMaxWrite = 4096;  // the session's first read buffer: one write, one read

// What a call's completion must be.
struct Outcome {
  error_code ec;
  std::string body;  // success: the reply
  Headers headers;   // success: the response headers
};

bool operator==(const Outcome& a, const Outcome& b) {
  return a.ec == b.ec && (a.ec || (a.body == b.body && a.headers == b.headers));
}

std::string Payload(size_t id) { return "req" + std::to_string(id); }

bool Debug() {
  static const bool debug = std::getenv("FUZZ_DEBUG") != nullptr;
  return debug;
}

// The session's documented behaviour, on the same bytes.
class Model {
 public:
  struct CallState {
    enum Kind { kQueued, kLive, kDone } kind = kQueued;
    uint32_t tag = 0;
    std::optional<Outcome> outcome;
  };

  Model(bool handshake, bool pings, size_t max_discarded, bool followups, bool cancel_followups, TimePoint now)
      : phase_(handshake ? kProbe : kOpen),
        pings_(pings),
        max_discarded_(max_discarded),
        followups_left_(followups ? kMaxFollowups : 0),
        followup_cancels_left_(cancel_followups ? kMaxFollowupCancels : 0),
        decoder_(kMaxFrame),
        reassembler_(kMaxMessage) {
    handshake_deadline_ = now + kConnectTimeout;
    if (!handshake) OpenNow(now);
  }

  bool tainted() const { return tainted_; }
  void Taint(const char* why) {
    if (!tainted_ && Debug()) std::fprintf(stderr, "model off: %s\n", why);
    tainted_ = true;
  }
  bool open() const { return phase_ == kOpen; }
  bool closed() const { return phase_ == kClosed; }
  bool open_done() const { return phase_ == kOpen || phase_ == kClosed; }
  error_code open_error() const { return open_error_; }
  const std::vector<CallState>& calls() const { return calls_; }
  size_t live() const {
    size_t n = 0;
    for (const auto& c : calls_) n += c.kind != CallState::kDone;
    return n;
  }
  size_t tags_in_use() const { return closed() ? 0 : slots_.size(); }
  uint64_t pings_sent() const { return pings_sent_; }
  uint64_t rpings_owed() const { return rpings_owed_; }

  // A request started by the script (at a quiet moment).
  void Start() {
    StartCall();
    EndStep();
  }

  // The script cancels call `id` (live and written).
  void Cancel(size_t id, error_code reason) {
    CallState& c = calls_[id];
    // The tag stays reserved (discarded) until the server answers it.
    slots_[c.tag].call = -1;
    ++discarded_;
    Complete(id, Outcome{reason, {}, {}});
    if (discarded_ > max_discarded_) Close(make_error_code(Errc::kConnectionClosed));
    EndStep();
  }

  // The server's bytes `chunk` were read (in one read).
  void Read(std::string_view chunk) {
    if (closed() || tainted_) return;
    reading_ = true;
    queued_in_read_ = 0;
    decoder_.Feed(chunk);
    while (!closed() && !tainted_) {
      auto next = decoder_.NextView();
      if (!next) {
        Close(make_error_code(Errc::kProtocolError));
        break;
      }
      if (!next->has_value()) break;
      const FrameView frame = **next;
      if (phase_ == kHandshakeDrain) {
        continue;  // ignored: the open fails once the Rdrain is written
      } else if (phase_ == kProbe || phase_ == kInit) {
        HandshakeFrame(frame);
      } else {
        HandleFrame(frame);
      }
    }
    reading_ = false;
    EndStep();
  }

  void EndOfStream() {
    if (!closed()) Close(make_error_code(Errc::kConnectionClosed));
    EndStep();
  }

  // The clock moved to `now`: the timers due fire in deadline order.
  void Advance(TimePoint now) {
    for (;;) {
      std::optional<TimePoint> earliest;
      int which = -1;
      auto consider = [&](const std::optional<TimePoint>& t, int w) {
        if (t && *t <= now && (!earliest || *t < *earliest)) {
          earliest = t;
          which = w;
        }
      };
      consider(handshake_timer_ ? std::optional<TimePoint>(handshake_deadline_) : std::nullopt, 0);
      consider(ping_timer_, 1);
      consider(ping_timeout_, 2);
      if (which < 0) break;
      // Timers scheduled while the pass runs fire on a later pass: their deadlines are later.
      if (which == 0) {
        handshake_timer_ = false;
        if (phase_ == kProbe || phase_ == kInit) FailOpen(make_error_code(Errc::kConnectTimeout));
      } else if (which == 1) {
        ping_timer_ = now + kPingInterval;
        if (open() && !ping_outstanding_) {
          ping_outstanding_ = true;
          ++pings_sent_;
          ping_timeout_ = now + kPingTimeout;
        }
      } else {
        ping_timeout_.reset();
        if (ping_outstanding_ && open()) Close(make_error_code(Errc::kConnectionClosed));
      }
    }
    EndStep();
  }

  // The tag the session must give the next request: the lowest free one from 2.
  uint32_t LowestFreeTag() const {
    uint32_t t = kMinDispatchTag;
    while (slots_.count(t) != 0) ++t;
    return t;
  }

  // Called by Start, and for a follow-up from a completion; returns the call's id.
  size_t StartCall() {
    const size_t id = calls_.size();
    calls_.emplace_back();
    if (phase_ != kOpen) {
      // Not open yet, or closed: refused at once. A TLS refusal keeps its code.
      Complete(id, Outcome{closed_code_ == Errc::kTlsFailed ? closed_code_ : make_error_code(Errc::kNotSent), {}, {}});
      return id;
    }
    CallState& c = calls_[id];
    c.kind = CallState::kQueued;
    c.tag = LowestFreeTag();
    slots_[c.tag] = Slot{static_cast<int>(id), false};
    // Requests started while a read's frames are handled go out when the read ends, or
    // earlier once 4 wait (SessionOptions::write_splits): then the rest of the read could
    // answer them, and a Tping could queue behind that write.
    if (reading_ && ++queued_in_read_ >= 4) Taint("requests written in the middle of a read");
    return id;
  }

 private:
  // kHandshakeDrain: a Tdrain came during the handshake; the open fails when the read ends.
  enum Phase { kProbe, kInit, kHandshakeDrain, kOpen, kClosed };
  struct Slot {
    int call = -1;  // -1: discarded
    bool written = false;
  };

  void OpenNow(TimePoint now) {
    phase_ = kOpen;
    handshake_timer_ = false;
    if (pings_) ping_timer_ = now + kPingInterval;
  }

  void FailOpen(error_code ec) { Close(ec); }

  // Every queued request goes out when the step ends (the loop runs until idle).
  void EndStep() {
    // The Rdrain answering a Tdrain during the handshake is written: the open fails,
    // retryably (no request was sent).
    if (phase_ == kHandshakeDrain) Close(make_error_code(Errc::kNack));
    if (closed()) return;
    for (auto& [tag, slot] : slots_) slot.written = true;
    for (auto& c : calls_) {
      if (c.kind == CallState::kQueued) c.kind = CallState::kLive;
    }
  }

  void Complete(size_t id, Outcome o) {
    CallState& c = calls_[id];
    c.kind = CallState::kDone;
    c.outcome = std::move(o);
    if (followups_left_ > 0) {
      --followups_left_;
      const size_t f = StartCall();
      if (followup_cancels_left_ > 0 && calls_[f].kind != CallState::kDone) {
        --followup_cancels_left_;
        // Started from a completion handler, so not written yet (a read batch, or a write in
        // flight, holds it back): dropped from the queue, its tag freed, no Tdiscarded.
        slots_.erase(calls_[f].tag);
        Complete(f, Outcome{make_error_code(Errc::kRequestTimeout), {}, {}});
      }
    }
  }

  void Close(error_code ec) {
    if (closed()) return;
    if (phase_ != kOpen) open_error_ = ec;  // the open fails with the session's code
    phase_ = kClosed;
    closed_code_ = ec;
    ping_timer_.reset();
    ping_timeout_.reset();
    handshake_timer_ = false;
    // The session answers its live requests in tag order; one never written is kNotSent
    // (unless the code is kept: a TLS refusal).
    std::vector<std::pair<size_t, bool>> live;
    for (auto& [tag, slot] : slots_) {
      if (slot.call >= 0) live.emplace_back(static_cast<size_t>(slot.call), slot.written);
    }
    slots_.clear();
    discarded_ = 0;
    for (auto [id, written] : live) {
      const bool keep = ec == Errc::kTlsFailed;
      Complete(id, Outcome{written || keep ? ec : make_error_code(Errc::kNotSent), {}, {}});
    }
  }

  void HandshakeFrame(const FrameView& frame) {
    if (phase_ == kProbe) {
      const bool echoed = frame.tag == kControlTag && !frame.fragment &&
                          (frame.type == wire::kRerr || frame.type == wire::kRerrLegacy) && frame.body == kProbeText;
      // A Tdrain is handled as one before Rinit (below).
      if (!echoed && frame.type != wire::kTdrain) {
        OpenNow(Harness().clock().Now());
        // Only an Rerr on tag 1 answers the probe; anything else (a Tping on tag 1 included) is
        // a message of the open session.
        const bool probe_answer = frame.tag == kControlTag && (frame.type == wire::kRerr || frame.type == wire::kRerrLegacy);
        if (!probe_answer) HandleFrame(frame);
        return;
      }
      if (echoed) {
        phase_ = kInit;
        return;
      }
    }
    auto decoded = DecodeMessage(frame);
    if (!decoded) return FailOpen(make_error_code(Errc::kProtocolError));
    // A Tping before Rinit is answered and the handshake goes on; a Tdrain is answered and
    // fails the open once its Rdrain is written (EndStep).
    if (std::holds_alternative<Tping>(*decoded)) return HandleMessage(*decoded);
    if (std::holds_alternative<Tdrain>(*decoded)) {
      phase_ = kHandshakeDrain;
      return;
    }
    const auto* rinit = std::get_if<Rinit>(&*decoded);
    if (rinit == nullptr || rinit->version != kMuxVersion) return FailOpen(make_error_code(Errc::kProtocolError));
    if (const std::string* framer = FindInitHeader(rinit->headers, kMuxFramerHeader)) {
      auto v = DecodeMuxFramer(*framer);
      if (!v || *v <= 0) return FailOpen(make_error_code(Errc::kProtocolError));
    }
    // Our opportunistic TLS is off: a server that requires it cannot be served.
    const std::string* tls = FindInitHeader(rinit->headers, kTlsHeader);
    if (tls != nullptr && *tls == "required") return FailOpen(make_error_code(Errc::kTlsFailed));
    OpenNow(Harness().clock().Now());
  }

  static fuzz::Harness& Harness() { return fuzz::Harness::Get(); }

  // A tag whose request was written (live or discarded): what a reply may answer.
  Slot* Sent(uint32_t tag) {
    auto it = slots_.find(tag);
    return it != slots_.end() && it->second.written ? &it->second : nullptr;
  }

  void Free(uint32_t tag, bool discarded) {
    slots_.erase(tag);
    if (discarded) --discarded_;
  }

  void Answer(uint32_t tag, Outcome o) {
    const auto id = static_cast<size_t>(slots_[tag].call);
    Free(tag, false);
    Complete(id, std::move(o));
  }

  void HandleFrame(const FrameView& frame) {
    // Rdispatch pieces for tags with no written request are dropped unbuffered.
    if (frame.type == wire::kRdispatch && Sent(frame.tag) == nullptr) return;
    if (frame.type == wire::kTdispatch) return Close(make_error_code(Errc::kProtocolError));
    const size_t partials = reassembler_.pending_tags();
    auto whole = reassembler_.Add(frame);
    if (!whole) return Close(make_error_code(Errc::kProtocolError));
    if (!whole->has_value()) return;
    // A message that completed a partial one was put together from fragments: within
    // max_message_size (the session's Reassembler is the same code, so this is checked here).
    if (IsFragmentable(frame.type) && reassembler_.pending_tags() + 1 == partials) {
      Check((**whole).body.size() <= kMaxMessage, "a message reassembled over max_message_size");
    }
    auto msg = DecodeMessage(**whole);
    if (!msg) return Close(make_error_code(Errc::kProtocolError));
    HandleMessage(*msg);
  }

  static uint64_t MuxFailureFlags(const Rdispatch& r) {
    if (const std::string* f = FindContext(r.contexts, kMuxFailureKey)) {
      if (auto v = DecodeMuxFailure(*f)) return *v;
    }
    return 0;
  }

  void HandleMessage(const Message& m) {
    if (const auto* r = std::get_if<Rdispatch>(&m)) {
      Slot* s = Sent(r->tag);
      if (s == nullptr) return;
      if (s->call < 0) return Free(r->tag, true);
      switch (r->status) {
        case ReplyStatus::kOk: {
          Outcome o{{}, r->body, {}};
          if (const std::string* h = FindContext(r->contexts, kResponseHeadersKey)) {
            if (auto decoded = DecodeHeaders(*h)) o.headers = std::move(*decoded);
          }
          return Answer(r->tag, std::move(o));
        }
        case ReplyStatus::kError: {
          // An Error flagged Retryable or Rejected, and not NonRetryable, is retryable.
          const uint64_t flags = MuxFailureFlags(*r);
          const bool retryable = (flags & (mux_failure::kRetryable | mux_failure::kRejected)) != 0 &&
                                 (flags & mux_failure::kNonRetryable) == 0;
          return Answer(r->tag, Outcome{make_error_code(retryable ? Errc::kNack : Errc::kServerError), {}, {}});
        }
        case ReplyStatus::kNack: {
          // A Nack whose MuxFailure flags say non-retryable (Finagle's NonRetryableNackFailure).
          const bool final = (MuxFailureFlags(*r) & mux_failure::kNonRetryable) != 0;
          return Answer(r->tag, Outcome{make_error_code(final ? Errc::kNonRetryableNack : Errc::kNack), {}, {}});
        }
      }
      return;
    }
    uint32_t tag = 0;
    if (const auto* e = std::get_if<Rerr>(&m)) tag = e->tag;
    if (const auto* d = std::get_if<Rdiscarded>(&m)) tag = d->tag;
    if (std::holds_alternative<Rerr>(m) || std::holds_alternative<Rdiscarded>(m)) {
      Slot* s = Sent(tag);
      if (s == nullptr) return;
      if (s->call < 0) return Free(tag, true);
      return Answer(tag, Outcome{make_error_code(Errc::kServerError), {}, {}});
    }
    if (const auto* p = std::get_if<Rping>(&m)) {
      if (p->tag == kControlTag && ping_outstanding_) {
        ping_outstanding_ = false;
        ping_timeout_.reset();
      }
      return;
    }
    if (std::holds_alternative<Tping>(m)) {
      // Answered with an Rping. The queue limit (max_queued_control_replies) applies only
      // behind an unfinished write, which a read has only after writes in its middle (Taint).
      ++rpings_owed_;
      return;
    }
    if (std::holds_alternative<Tdrain>(m)) return Taint("Tdrain");
    if (std::holds_alternative<Tlease>(m) || std::holds_alternative<Tdiscarded>(m) ||
        std::holds_alternative<Rdrain>(m)) {
      return;
    }
    Close(make_error_code(Errc::kProtocolError));
  }

  Phase phase_;
  bool pings_;
  size_t max_discarded_;
  int followups_left_;
  int followup_cancels_left_;
  bool tainted_ = false;
  bool reading_ = false;
  size_t queued_in_read_ = 0;
  error_code open_error_;
  error_code closed_code_;
  FrameDecoder decoder_;
  Reassembler reassembler_;
  std::map<uint32_t, Slot> slots_;
  size_t discarded_ = 0;
  std::vector<CallState> calls_;
  TimePoint handshake_deadline_;
  bool handshake_timer_ = true;
  std::optional<TimePoint> ping_timer_;
  std::optional<TimePoint> ping_timeout_;
  bool ping_outstanding_ = false;
  uint64_t pings_sent_ = 0;
  uint64_t rpings_owed_ = 0;
};

// What the session wrote, decoded: its requests' tags (by payload), pings, Rpings.
struct ClientStream {
  FrameDecoder decoder{kMaxWireFrameSize};
  Reassembler reassembler{kMaxWireFrameSize};
  size_t fed = 0;
  std::map<std::string, uint32_t> tag_of;  // payload -> tag
  std::vector<uint32_t> discarded;         // Tdiscarded's tags
  uint64_t tpings = 0;
  uint64_t rpings = 0;

  void Update(const std::string& received) {
    decoder.Feed(std::string_view(received).substr(fed));
    fed = received.size();
    for (;;) {
      auto next = decoder.Next();
      Check(static_cast<bool>(next), "the session wrote an undecodable frame");
      if (!next->has_value()) return;
      auto whole = reassembler.Add(std::move(**next));
      Check(static_cast<bool>(whole), "the session wrote a bad fragment");
      if (!whole->has_value()) continue;
      auto m = DecodeMessage(**whole);
      Check(static_cast<bool>(m), "the session wrote an undecodable message");
      if (const auto* d = std::get_if<Tdispatch>(&*m)) {
        Check(tag_of.emplace(d->payload, d->tag).second, "a request was written twice");
      } else if (const auto* t = std::get_if<Tdiscarded>(&*m)) {
        discarded.push_back(t->which);
      } else if (std::holds_alternative<Tping>(*m)) {
        ++tpings;
      } else if (std::holds_alternative<Rping>(*m)) {
        ++rpings;
      }
    }
  }
};

class Driver {
 public:
  Driver(uint8_t flags, std::string_view script, std::string_view stream)
      : script_(script), stream_(stream), h_(fuzz::Harness::Get()) {
    options_.handshake = (flags & 1) != 0;
    options_.ping_interval = (flags & 2) != 0 ? Duration(kPingInterval) : Duration::zero();
    options_.ping_timeout = kPingTimeout;
    options_.connect_timeout = kConnectTimeout;
    options_.max_frame_size = kMaxFrame;
    options_.max_message_size = kMaxMessage;
    if ((flags & 4) != 0) {
      options_.max_discarded_tags = 2;
      options_.max_queued_control_replies = 2;
    }
    followups_ = (flags & 8) != 0;
    cancel_followups_ = (flags & 16) != 0;
  }

  void Run() {
    session_ = std::make_shared<MuxSessionSink>(h_.Context(), options_);
    model_.emplace(options_.handshake, options_.ping_interval > Duration::zero(), options_.max_discarded_tags,
                   followups_, cancel_followups_, h_.clock().Now());
    peer_ = h_.Open(*session_, open_);
    h_.Settle();
    if (!options_.handshake) {
      Check(h_.RunUntil([&] { return open_.done; }) && !open_.error, "open without handshake failed");
    } else {
      // The probe comes first.
      Check(h_.RunUntil([&] {
        peer_->Drain();
        return !peer_->received().empty();
      }),
            "the session sent no probe");
    }
    Verify();
    bool eof = false;
    for (char op_byte : script_) {
      const auto op = static_cast<uint8_t>(op_byte) >> 5;
      const unsigned n = static_cast<uint8_t>(op_byte) & 31;
      switch (op) {
        case 1:
          SendBytes(n + 1);
          break;
        case 2:
          for (unsigned i = 0; i <= (n & 7); ++i) StartRequest();
          break;
        case 3:
          CancelRequest(n);
          break;
        case 4:
          Advance(n + 1);
          break;
        case 5:
          EndOfStream();
          eof = true;
          break;
        default:
          SendFrames(n + 1);
          break;
      }
      if (eof) break;
    }
    if (!eof) {
      SendBytes(stream_.size() - sent_);
      EndOfStream();
    }
    Check(h_.RunUntil([&] { return session_->status() == SinkStatus::kClosed; }),
          "session not closed after the server's end of stream");
    Check(open_.done, "open never completed");
    for (const auto& c : calls_) Check(c->completions() == 1, "a request did not complete exactly once");
    Check(session_->tags_in_use() == 0 && session_->pending() == 0, "closed session holds tags");
    if (Debug()) {
      std::fprintf(stderr, "open: %s; model %s\n", open_.error ? open_.error.message().c_str() : "ok",
                   model_->tainted() ? "off" : "on");
      for (size_t i = 0; i < calls_.size(); ++i) {
        const auto& c = *calls_[i];
        std::fprintf(stderr, "call %zu: tag %u %s [%s]\n", i, model_->calls()[i].tag,
                     c.result().ok() ? "ok" : c.result().error.message().c_str(), c.reply_at_completion().c_str());
      }
    }
    session_->Close();
    h_.Settle();
  }

 private:
  size_t FrameEnd(size_t from, size_t frames) const {
    size_t at = from;
    for (size_t i = 0; i < frames && at < stream_.size(); ++i) {
      if (stream_.size() - at < 4) return stream_.size();
      const auto* p = reinterpret_cast<const uint8_t*>(stream_.data() + at);
      const uint64_t size = (uint64_t{p[0]} << 24) | (uint64_t{p[1]} << 16) | (uint64_t{p[2]} << 8) | p[3];
      at = static_cast<size_t>(std::min<uint64_t>(stream_.size(), at + 4 + size));
    }
    return at;
  }

  void SendFrames(size_t frames) { SendBytes(FrameEnd(sent_, frames) - sent_); }

  void SendBytes(size_t n) {
    n = std::min(n, stream_.size() - sent_);
    // In writes the session reads whole (its first read buffer), each followed by the model.
    while (n > 0) {
      const size_t piece = std::min(n, kMaxWrite);
      const std::string_view bytes = stream_.substr(sent_, piece);
      peer_->SendChunks(bytes, 0);
      sent_ += piece;
      n -= piece;
      if (!model_->closed() && !eof_) model_->Read(bytes);
      Verify();
    }
  }

  void StartRequest() {
    if (calls_.size() >= kMaxCalls) return;
    NewCall();
    model_->Start();
    h_.Settle();
    Verify();
  }

  // A call, with the follow-up it starts from its completion when asked to.
  fuzz::Call& NewCall() {
    const size_t id = calls_.size();
    calls_.push_back(std::make_unique<fuzz::Call>());
    fuzz::Call& c = *calls_.back();
    c.request().data = Payload(id);
    if (followups_) {
      c.OnComplete([this] {
        if (followups_started_ >= kMaxFollowups) return;
        ++followups_started_;
        fuzz::Call& f = NewCall();
        if (cancel_followups_ && followup_cancels_ < kMaxFollowupCancels && f.completions() == 0) {
          ++followup_cancels_;
          ++cancels_;
          f.stack().Cancel(make_error_code(Errc::kRequestTimeout));
        }
      });
    }
    session_->AsyncProcessRequest(c.stack(), c.message(), nullptr);
    return c;
  }

  void CancelRequest(unsigned n) {
    std::vector<size_t> live;
    for (size_t i = 0; i < calls_.size(); ++i) {
      if (calls_[i]->completions() == 0) live.push_back(i);
    }
    if (live.empty()) return;
    const size_t id = live[n % live.size()];
    const bool model_live = !model_->tainted() && model_->calls()[id].kind == Model::CallState::kLive;
    ++cancels_;
    calls_[id]->stack().Cancel(make_error_code(Errc::kRequestTimeout));
    if (model_live) model_->Cancel(id, make_error_code(Errc::kRequestTimeout));
    h_.Settle();
    Verify();
  }

  void Advance(unsigned tenths) {
    h_.clock().Advance(std::chrono::milliseconds(100) * tenths);
    h_.Settle();
    model_->Advance(h_.clock().Now());
    h_.Settle();
    Verify();
  }

  void EndOfStream() {
    if (eof_) return;
    eof_ = true;
    peer_->ShutdownWrite();
    Check(h_.RunUntil([&] { return session_->status() == SinkStatus::kClosed; }),
          "session not closed after the server's end of stream");
    model_->EndOfStream();
    Verify();
  }

  // The session against the model (and the model-free invariants).
  void Verify() {
    h_.Settle();
    peer_->Drain();
    client_.Update(peer_->received());
    size_t unanswered = 0;
    for (const auto& c : calls_) {
      Check(c->completions() <= 1, "a request completed more than once");
      unanswered += c->completions() == 0;
    }
    const bool closed = session_->status() == SinkStatus::kClosed;
    Check(session_->pending() == unanswered || closed, "pending() is not the number of requests not answered");
    Check(session_->tags_in_use() >= session_->pending(), "fewer tags in use than pending requests");
    Check(session_->tags_in_use() - session_->pending() <= cancels_, "a tag is held that no discard explains");
    Check(session_->tags_in_use() - session_->pending() <= options_.max_discarded_tags,
          "more discarded tags held than max_discarded_tags");
    if (closed) Check(session_->tags_in_use() == 0 && session_->pending() == 0, "closed session holds tags");
    for (const auto& c : calls_) {
      if (c->completions() == 1 && c->result().ok()) {
        Check(c->reply_at_completion().size() + 4 + 3 <= kMaxFrame, "a reply larger than a frame can carry");
      }
    }
    if (model_->tainted()) return;
    Model& m = *model_;
    Check(m.calls().size() == calls_.size(), "the model and the session started different requests");
    for (size_t i = 0; i < calls_.size(); ++i) {
      const auto& want = m.calls()[i];
      const fuzz::Call& got = *calls_[i];
      if (want.kind != Model::CallState::kDone) {
        if (got.completions() != 0) Report(i, "a request completed that the model still has in flight");
        // Written, with the model's tag.
        if (want.kind == Model::CallState::kLive) {
          auto it = client_.tag_of.find(Payload(i));
          if (it == client_.tag_of.end()) Report(i, "a request in flight was never written");
          if (it->second != want.tag) Report(i, "a request was written with another tag than the lowest free one");
        }
        continue;
      }
      if (got.completions() != 1) Report(i, "a request the model answered did not complete");
      const Outcome have{got.result().error, got.reply_at_completion(), got.result().headers};
      if (!(have == *want.outcome)) Report(i, "a request completed otherwise than the model says");
      if (!want.outcome->ec) {
        Check(want.outcome->body.size() <= kMaxFrame, "a reply over the frame limit");
      }
    }
    if (m.closed()) {
      Check(closed, "the session is open where the model closed it");
    } else {
      Check(!closed, "the session closed where the model did not");
      Check(session_->pending() == m.live(), "pending() differs from the model");
      Check(session_->tags_in_use() == m.tags_in_use(), "tags_in_use() differs from the model");
    }
    if (m.open_done()) {
      Check(open_.done, "the open did not complete where the model finished it");
      Check(open_.error == m.open_error(), "the open completed otherwise than the model says");
    } else {
      Check(!open_.done, "the open completed where the model still handshakes");
    }
    Check(client_.tpings == m.pings_sent(), "the session pinged otherwise than the model says");
    Check(client_.rpings == m.rpings_owed() || closed, "a Tping was not answered with one Rping");
  }

  [[noreturn]] void Report(size_t i, const char* what) {
    const auto& want = model_->calls()[i];
    const fuzz::Call& got = *calls_[i];
    std::fprintf(stderr, "call %zu: model kind=%d tag=%u outcome=%s body=%zu; session completions=%d %s body=%zu\n", i,
                 static_cast<int>(want.kind), want.tag,
                 want.outcome ? (want.outcome->ec ? want.outcome->ec.message().c_str() : "ok") : "-",
                 want.outcome ? want.outcome->body.size() : 0, got.completions(),
                 got.completions() ? (got.result().ok() ? "ok" : got.result().error.message().c_str()) : "-",
                 got.reply_at_completion().size());
    Check(false, what);
    std::abort();
  }

  std::string_view script_;
  std::string_view stream_;
  fuzz::Harness& h_;
  SessionOptions options_;
  bool followups_ = false;
  bool cancel_followups_ = false;
  int followups_started_ = 0;
  int followup_cancels_ = 0;
  std::shared_ptr<MuxSessionSink> session_;
  std::optional<Model> model_;
  fuzz::Harness::OpenResult open_;
  std::unique_ptr<fuzz::Peer> peer_;
  std::vector<std::unique_ptr<fuzz::Call>> calls_;
  ClientStream client_;
  size_t sent_ = 0;
  size_t cancels_ = 0;
  bool eof_ = false;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const size_t script_len = std::min<size_t>(data[1], size - 2);
  const std::string_view script(reinterpret_cast<const char*>(data + 2), script_len);
  const std::string_view stream(reinterpret_cast<const char*>(data + 2 + script_len), size - 2 - script_len);
  Driver(data[0], script, stream).Run();
  return 0;
}
