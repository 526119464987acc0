#include "scales/mux/session.h"

#include <algorithm>
#include <utility>

#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include "core/duration_text.h"
#include "scales/core/log.h"
#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales::mux {

namespace asio = boost::asio;

namespace {

void* TagContext(uint32_t tag) { return reinterpret_cast<void*>(static_cast<uintptr_t>(tag)); }
uint32_t ContextTag(void* ctx) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ctx)); }

// A read/write error: OpenSSL's reason for TLS errors, the system message otherwise.
std::string Describe(const boost::system::error_code& ec) {
  return IsTlsError(ec) ? DescribeTlsError(ec) : ec.message();
}

std::string Printable(std::string_view s, size_t max = 200) {
  std::string out(s.substr(0, max));
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  if (s.size() > max) out += "...";
  return out;
}

// The Tdiscarded `why`: why the client gave up on the request, for the server's operators.
// The backup-request sink stops the attempt that lost the race with kCancelled, and a backup
// when the call ends (its deadline, the caller's cancellation) with kCancelled too: the
// attempt's kind and the call's deadline tell the cases apart as far as they can be.
std::string DiscardReason(const error_code& reason, const CallProperties& props, TimePoint now) {
  if (reason == Errc::kRequestTimeout) return "request timed out: the client's deadline for it passed";
  if (reason != Errc::kCancelled) return reason.message();
  if (!props.backup) {
    return "cancelled by the client: a backup request answered first, or the caller gave up on the call";
  }
  if (props.deadline && now >= *props.deadline) return "backup request cut off: the call's deadline passed";
  return "backup request lost the race: another attempt answered first, or the caller cancelled the call";
}

// MuxFailure flags for a detail: "retryable, rejected"; empty without flags. (Unknown bits are
// left out.)
std::string FlagsInWords(uint64_t flags) {
  std::string names;
  for (auto [bit, name] : {std::pair{mux_failure::kRetryable, "retryable"}, std::pair{mux_failure::kRejected, "rejected"},
                           std::pair{mux_failure::kNonRetryable, "non-retryable"}}) {
    if ((flags & bit) == 0) continue;
    if (!names.empty()) names += ", ";
    names += name;
  }
  return names;
}

}  // namespace

const char* ToString(OpportunisticTls level) noexcept {
  switch (level) {
    case OpportunisticTls::kOff: return "off";
    case OpportunisticTls::kDesired: return "desired";
    case OpportunisticTls::kRequired: return "required";
  }
  return "off";
}

std::optional<OpportunisticTls> ParseOpportunisticTls(std::string_view s) noexcept {
  if (s == "off") return OpportunisticTls::kOff;
  if (s == "desired") return OpportunisticTls::kDesired;
  if (s == "required") return OpportunisticTls::kRequired;
  return std::nullopt;
}

uint32_t AdvertisedFragmentSize(const SessionOptions& o) noexcept {
  // mux-framer bounds a fragment's body; its frame's size field counts type and tag as well.
  const uint32_t largest_body = std::max<uint32_t>(o.max_frame_size, 5) - 4;
  return std::min(o.max_fragment_size, largest_body);
}

void Validate(const SessionOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.connect_timeout <= Duration::zero()) fail("session.connect_timeout must be > 0");
  // A frame's size field is a signed 32-bit integer.
  if (o.max_frame_size < kMinMaxFrameSize || o.max_frame_size > kMaxWireFrameSize) {
    fail(fmt::format("session.max_frame_size must be in {}..{}", kMinMaxFrameSize, kMaxWireFrameSize));
  }
  if (o.max_message_size == 0) fail("session.max_message_size must be > 0");
  if (o.max_reassembly_bytes == 0) fail("session.max_reassembly_bytes must be > 0");
  if (o.max_fragment_size == 0 || o.max_fragment_size > kUnlimitedFragmentSize) {
    fail("session.max_fragment_size must be in 1..2147483647");
  }
  if (o.ping_interval < Duration::zero()) fail("session.ping_interval must be >= 0 (0 = no pings)");
  if (o.ping_interval > Duration::zero() && o.ping_timeout <= Duration::zero()) {
    fail("session.ping_timeout must be > 0 when pings are on");
  }
  // With pings off it still bounds a drained session's wait for its Rdrain (MaybeFinishDrain).
  if (o.ping_timeout < Duration::zero()) {
    fail("session.ping_timeout must be >= 0 (0 with pings off: a drained session closes at once)");
  }
  if (o.max_discarded_tags == 0) fail("session.max_discarded_tags must be >= 1");
  if (o.max_queued_control_replies == 0) fail("session.max_queued_control_replies must be >= 1");
  if (o.write_splits == 0) fail("session.write_splits must be >= 1 (1 = one write per read)");
  Validate(o.tls);
  if (o.opportunistic_tls != OpportunisticTls::kOff) {
    if (!o.handshake) {
      fail(fmt::format("session.opportunistic_tls={} needs session.handshake (TLS is negotiated in Tinit)",
                       ToString(o.opportunistic_tls)));
    }
    if (o.tls.enabled) {
      fail(fmt::format("session.opportunistic_tls={} and session.tls.enabled (TLS from the first byte) "
                       "exclude each other: choose one",
                       ToString(o.opportunistic_tls)));
    }
  }
}

MuxSessionSink::MuxSessionSink(const SinkContext& ctx, SessionOptions options)
    : loop_(*ctx.loop),
      options_(options),
      conn_(*ctx.loop, ctx.endpoint.value_or(Endpoint{}), options.connect_timeout, ctx.stats,
            options.tls, options.opportunistic_tls != OpportunisticTls::kOff),
      address_(ctx.endpoint ? ctx.endpoint->ToString() : std::string("?")),
      decoder_(options.handshake ? std::min(options.max_frame_size, kMaxHandshakeFrameSize)
                                 : options.max_frame_size,
               options.handshake && options.max_frame_size > kMaxHandshakeFrameSize
                   ? "mux::kMaxHandshakeFrameSize"
                   : "session.max_frame_size"),
      reassembler_(options.max_message_size, "session.max_message_size",
                   options.max_reassembly_bytes, "session.max_reassembly_bytes"),
      read_buffer_(kMinReadBuffer),
      tag_bits_(1, 0b11),  // tags 0 (markers) and 1 (control) are never allocated
      tags_gauge_(ctx.stats.GetGauge("scales_mux_tags_in_use")),
      pings_sent_(ctx.stats.GetCounter("scales_mux_pings")),
      ping_timeouts_(ctx.stats.GetCounter("scales_mux_ping_timeouts")),
      discards_sent_(ctx.stats.GetCounter("scales_mux_discards")),
      drains_(ctx.stats.GetCounter("scales_mux_drains")),
      nacks_(ctx.stats.GetCounter("scales_mux_nacks")),
      protocol_errors_(ctx.stats.GetCounter("scales_mux_protocol_errors")),
      tls_upgrades_(ctx.stats.GetCounter("scales_mux_tls_upgrades")) {}

MuxSessionSink::~MuxSessionSink() { tags_gauge_.Add(-static_cast<int64_t>(tags_in_use_)); }

// --- open and handshake ----------------------------------------------------------------------

void MuxSessionSink::DoOpen(OpenHandler handler) {
  switch (state_) {
    case State::kOpen:
      PostOpenCompletion(std::move(handler), loop_.executor(), {});
      return;
    case State::kClosed:
      PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kConnectionClosed));
      return;
    case State::kConnecting:
    case State::kHandshaking:
      open_waiters_.Add(std::move(handler));
      return;
    case State::kIdle:
      open_waiters_.Add(std::move(handler));
      state_ = State::kConnecting;
      loop_.timers().Schedule(handshake_timer_, DeadlineAfter(loop_.Now(), options_.connect_timeout), &OnHandshakeTimeout, this);
      conn_.AsyncConnect([self = self()](error_code ec) { self->OnConnected(ec); });
      return;
  }
}

void MuxSessionSink::OnConnected(error_code ec) {
  if (state_ != State::kConnecting) return;  // closed meanwhile
  if (ec) {
    FailOpen(ec, conn_.failure_detail().empty() ? fmt::format("connect to {} failed: {}", address_, ec.message())
                                                : conn_.failure_detail());
    return;
  }
  if (!handshake_timer_.scheduled()) {
    // The open's deadline passed while connecting (the connection's own timer, set a moment
    // later, had not fired yet): nothing else would bound the handshake now.
    FailOpen(make_error_code(Errc::kConnectTimeout),
             fmt::format("connect to {}{} did not finish within {} (limit session.connect_timeout)", address_,
                         options_.handshake ? " and the Mux handshake" : "", DurationText(options_.connect_timeout)));
    return;
  }
  if (conn_.tls_active()) SCALES_LOG(kDebug, "Mux session to {}: TLS from the first byte established", address_);
  StartRead();
  if (options_.handshake) {
    StartHandshake();
  } else {
    FinishOpen();
  }
}

void MuxSessionSink::StartHandshake() {
  state_ = State::kHandshaking;
  handshake_phase_ = 1;
  Enqueue(ProbeMessage());
  Flush();
}

void MuxSessionSink::OnHandshakeTimeout(void* p) {
  auto* s = static_cast<MuxSessionSink*>(p);
  if (s->state_ != State::kConnecting && s->state_ != State::kHandshaking) return;
  if (s->state_ == State::kConnecting) return;  // the connect's own timeout answers
  if (s->draining_) {
    // The server sent Tdrain, and the open waits for the write holding our Rdrain
    // (MaybeFinishDrain): a server that stopped reading never takes it. Say so; "did not
    // finish" alone would blame a slow handshake.
    s->FailOpen(make_error_code(Errc::kConnectTimeout),
                fmt::format("Mux handshake with {} did not finish within {} (limit session.connect_timeout): "
                            "it sent Tdrain before answering {}, and the Rdrain answering it was still unwritten "
                            "(the server does not read)",
                            s->address_, DurationText(s->options_.connect_timeout), s->HandshakeStep()));
    return;
  }
  // Say which step was still waiting, and the setting that bounds them all.
  const std::string step =
      s->handshake_phase_ != 3 ? fmt::format("{} was still unanswered", s->HandshakeStep())
      : s->writing_ ? std::string("the plaintext write that must end before the TLS upgrade negotiated in Rinit "
                                  "was still unfinished (the server does not read)")
                    : std::string("the TLS handshake negotiated in Rinit was still running");
  s->FailOpen(make_error_code(Errc::kConnectTimeout),
              fmt::format("Mux handshake with {} did not finish within {} (limit session.connect_timeout): {}",
                          s->address_, DurationText(s->options_.connect_timeout), step));
}

void MuxSessionSink::HandshakeFrame(const FrameView& frame) {
  // After a Tdrain the open fails once the Rdrain is written (MaybeFinishDrain); nothing behind
  // it opens anything, nor changes how the open fails: neither the probe's echo (no Tinit is
  // sent) nor an Rinit, nor a frame that does not decode (it failed the open with kProtocolError
  // instead of kNack: a Tdrain's non-final fragment). Another Tdrain is answered too.
  if (draining_) {
    if (frame.type != wire::kTdrain) return;
    auto decoded = DecodeMessage(frame);
    if (decoded && std::holds_alternative<Tdrain>(*decoded)) HandleMessage(std::move(*decoded));
    return;
  }
  if (handshake_phase_ == 1) {
    // The probe's answer: an echo means the server negotiates; anything else (an old server's
    // "Unexpected mux message type 127") means an un-negotiated session.
    bool echoed = frame.tag == kControlTag && !frame.fragment &&
                  (frame.type == wire::kRerr || frame.type == wire::kRerrLegacy) && frame.body == kProbeText;
    if (echoed) {
      Tinit init;
      init.headers.emplace_back(std::string(kMuxFramerHeader),
                                EncodeMuxFramer(static_cast<int32_t>(AdvertisedFragmentSize(options_))));
      init.headers.emplace_back(std::string(kTlsHeader), ToString(options_.opportunistic_tls));
      handshake_phase_ = 2;
      Enqueue(init);
      Flush();
      return;
    }
    // A Tdrain before the probe's answer (a server shutting down as we connect) goes on below,
    // as one before Rinit: answered, and the open fails. Taken for the answer, it opened an
    // un-negotiated session that was draining from the start: the open succeeded, the request
    // waiting for it failed with kNack and the session closed.
    if (frame.type != wire::kTdrain) {
      if (options_.opportunistic_tls == OpportunisticTls::kRequired) {
        FailOpen(make_error_code(Errc::kTlsFailed),
                 fmt::format("{} does not negotiate Mux sessions (it did not echo the handshake probe), so it "
                             "cannot start TLS; this client requires it (opportunistic_tls=required)",
                             address_));
        return;
      }
      FinishOpen();
      // Only an Rerr on the probe's tag answers the probe (an old server's "Unexpected mux
      // message type 127"); any other frame, a Tping on tag 1 included, is a real message:
      // handle it as one.
      const bool probe_answer =
          frame.tag == kControlTag && (frame.type == wire::kRerr || frame.type == wire::kRerrLegacy);
      if (!probe_answer) HandleFrame(frame);
      return;
    }
  }
  auto decoded = DecodeMessage(frame);
  if (!decoded) {
    FailOpen(make_error_code(Errc::kProtocolError),
             fmt::format("bad handshake reply from {}: {}", address_, decoded.error().detail));
    return;
  }
  if (std::holds_alternative<Tping>(*decoded) || std::holds_alternative<Tdrain>(*decoded)) {
    // A server may ping, or start draining, at any time (§1.9), also before it answers Tinit
    // (or, for a Tdrain, the probe): answered as on an open session (Rping; Rdrain, and the
    // session drains: the open fails).
    HandleMessage(std::move(*decoded));
    return;
  }
  if (auto* rinit = std::get_if<Rinit>(&*decoded)) {
    if (rinit->version != kMuxVersion) {
      FailOpen(make_error_code(Errc::kProtocolError),
               fmt::format("{} answered Tinit with Mux version {} (we speak {})", address_, rinit->version, kMuxVersion));
      return;
    }
    if (const std::string* framer = FindInitHeader(rinit->headers, kMuxFramerHeader)) {
      auto v = DecodeMuxFramer(*framer);
      if (!v) {
        FailOpen(make_error_code(Errc::kProtocolError),
                 fmt::format("bad handshake reply from {}: Rinit's {}", address_, v.error().detail));
        return;
      }
      peer_max_fragment_ = static_cast<uint32_t>(*v);
    }
    negotiated_ = true;
    writer_.set_max_fragment_body(peer_max_fragment_);
    if (!NegotiateTls(*rinit)) return;  // failed, or the TLS upgrade finishes the open
    FinishOpen();
    return;
  }
  if (auto* rerr = std::get_if<Rerr>(&*decoded)) {
    FailOpen(make_error_code(Errc::kProtocolError),
             fmt::format("{} rejected Tinit: {}", address_, Printable(rerr->why)));
    return;
  }
  FailOpen(make_error_code(Errc::kProtocolError),
           fmt::format("{} answered Tinit with {} instead of Rinit", address_, Describe(*decoded)));
}

bool MuxSessionSink::NegotiateTls(const Rinit& rinit) {
  const OpportunisticTls ours = options_.opportunistic_tls;
  const std::string* header = FindInitHeader(rinit.headers, kTlsHeader);
  // Absent or unknown = off (§1.7).
  const OpportunisticTls theirs =
      header != nullptr ? ParseOpportunisticTls(*header).value_or(OpportunisticTls::kOff) : OpportunisticTls::kOff;
  peer_tls_ = header != nullptr ? Printable(*header, 40) : std::string("off (no tls header)");
  const bool off = ours == OpportunisticTls::kOff || theirs == OpportunisticTls::kOff;
  const bool required = ours == OpportunisticTls::kRequired || theirs == OpportunisticTls::kRequired;
  if (off && !required) return true;  // plaintext
  if (off) {
    // TLS from the first byte already encrypts: a server that requires TLS has it.
    if (conn_.tls_active()) return true;
    FailOpen(make_error_code(Errc::kTlsFailed),
             fmt::format("opportunistic TLS with {} is impossible: this client has opportunistic_tls={}, the "
                         "server tls={} (off against required)",
                         address_, ToString(ours), peer_tls_));
    return false;
  }
  if (decoder_.buffered() != 0) {
    // Plaintext where the server's TLS handshake should begin: a server not speaking the TLS it
    // negotiated, kTlsFailed as when those bytes come in a later read (the handshake then fails
    // on them), whichever way the reads split.
    FailOpen(make_error_code(Errc::kTlsFailed),
             fmt::format("{} sent {} byte(s) after Rinit, before the TLS handshake it negotiated", address_,
                         decoder_.buffered()));
    return false;
  }
  // Both ends start the handshake right after Rinit; reading stops until it is done. A plaintext
  // write still in flight (Rpings answering Tpings sent before Rinit) ends first: the rest of it
  // would follow the ClientHello, in plaintext. OnWritten starts the upgrade then.
  handshake_phase_ = 3;
  if (!writing_) conn_.AsyncStartTls(options_.tls, [self = self()](error_code ec) { self->OnTlsUpgraded(ec); });
  return false;
}

void MuxSessionSink::OnTlsUpgraded(error_code ec) {
  if (state_ != State::kHandshaking || handshake_phase_ != 3) return;  // closed meanwhile
  const std::string levels =
      fmt::format("opportunistic TLS: this client {}, the server {}", ToString(options_.opportunistic_tls), peer_tls_);
  if (ec) {
    FailOpen(ec, fmt::format("{} ({})",
                             conn_.failure_detail().empty()
                                 ? fmt::format("TLS handshake with {} failed: {}", address_, ec.message())
                                 : conn_.failure_detail(),
                             levels));
    return;
  }
  tls_upgrades_.Increment();
  SCALES_LOG(kInfo, "Mux session to {}: TLS negotiated ({})", address_, levels);
  StartRead();
  FinishOpen();
  Flush();
}

void MuxSessionSink::FinishOpen() {
  handshake_timer_.Cancel();
  decoder_.set_max_frame_size(options_.max_frame_size, "session.max_frame_size");
  state_ = State::kOpen;
  SchedulePing();
  open_waiters_.CompleteAll(loop_.executor(), {});
}

void MuxSessionSink::FailOpen(error_code ec, std::string detail) {
  Fail(ec, detail, /*fault=*/false);
}

// --- reading -------------------------------------------------------------------------------

void MuxSessionSink::StartRead() {
  conn_.WithStream([this](auto& stream) {
    stream.async_read_some(asio::buffer(read_buffer_),
                           [self = self()](const boost::system::error_code& ec, size_t n) { self->OnRead(ec, n); });
  });
}

void MuxSessionSink::OnRead(const boost::system::error_code& ec, size_t n) {
  if (state_ == State::kClosed) return;
  if (ec) {
    // An OpenSSL error (an alert) is a TLS failure. With TLS 1.3 the server checks the client
    // certificate after the client's handshake finished, so its refusal (an alert, or a TLS
    // stream cut short before it sent anything) arrives as the first read. A TLS stream that
    // merely ended (a FIN or a reset, no alert) is a closed connection, as without TLS (the
    // network may have cut it; retried as such), unless the server asked for a certificate we
    // do not have; before the server sent anything over TLS the detail asks whether it refused
    // ours.
    const bool no_client_cert = tls_quiet_ && conn_.tls_client_certificate_missing();
    const bool ended = IsTlsConnectionEnd(ec);
    // After the TLS handshake a record OpenSSL rejected (bytes altered on the way) broke this
    // connection, not the endpoint's TLS: a closed connection, in the Mux handshake as once open.
    const bool record_failure = conn_.tls_active() && IsTlsRecordFailure(ec);
    const bool tls_refused = no_client_cert || (IsTlsError(ec) && !ended && !record_failure &&
                                                (state_ != State::kOpen || tls_quiet_ ||
                                                 ec.category() == asio::error::get_ssl_category()));
    std::string why;
    if (no_client_cert) {
      why = "; the server asked for a client certificate and none is configured (tls.cert_file, tls.key_file)";
    } else if ((tls_refused || ended) && tls_quiet_ && conn_.tls_active()) {
      why = " before it sent anything over TLS (did it refuse our certificate?)";
    } else if (!tls_refused && record_failure) {
      why = " (were bytes altered on the way?)";
    }
    // During the handshake no request is in flight: say which step the server left unanswered
    // (a server of another protocol, e.g. plain Thrift, closes the connection on the probe).
    std::string when;
    if (state_ == State::kHandshaking) {
      when = draining_ ? std::string(" during the Mux handshake, after its Tdrain")
                       : fmt::format(" during the Mux handshake: {} was still unanswered{}", HandshakeStep(),
                                     handshake_phase_ == 1 && !tls_refused ? " (is it a Mux server?)" : "");
    } else {
      when = fmt::format(" ({} request(s) in flight)", pending_count_);
    }
    Fail(make_error_code(tls_refused ? Errc::kTlsFailed : Errc::kConnectionClosed),
         fmt::format("connection to {} {}{}{}", address_,
                     ec == asio::error::eof ? std::string("closed by the server") : "failed: " + Describe(ec), why,
                     when),
         /*fault=*/true);
    return;
  }
  conn_.bytes_received().Increment(static_cast<int64_t>(n));
  if (conn_.tls_active()) tls_quiet_ = false;
  decoder_.Feed(read_buffer_.data(), n);
  // A read that filled the buffer suggests more was waiting: read more at a time from now on.
  // Starting small keeps an idle session's footprint small.
  if (n == read_buffer_.size() && read_buffer_.size() < kMaxReadBuffer) {
    read_buffer_.resize(read_buffer_.size() * 2);
  }
  auto keep = self();  // answering requests may drop the last outside reference
  // One read answers many requests, and their handlers usually start the next ones: the sinks
  // of each reply and of the requests its handler starts share one clock reading, and the
  // requests go out together: in one write once every frame of the read is handled, or in a
  // few when many are waiting (Flush, SessionOptions::write_splits).
  ClockTurn turn;
  struct Batch {
    MuxSessionSink& s;
    explicit Batch(MuxSessionSink& session) : s(session) {
      s.reading_batch_ = true;
      s.write_predates_batch_ = s.writing_;
    }
    ~Batch() {
      s.reading_batch_ = false;
      s.Flush();
    }
  } batch(*this);
  while (state_ != State::kClosed) {
    ClockTurn::Refresh();
    // A view into the decoder's buffer: a reply is decoded from it without copying the frame.
    auto next = decoder_.NextView();
    if (!next) {
      ProtocolError(fmt::format(
          "undecodable frame from {}: {}{}", address_, next.error().detail,
          state_ == State::kHandshaking
              ? fmt::format(" during the Mux handshake: {} was still unanswered", HandshakeStep())
              : std::string()));
      return;
    }
    if (!next->has_value()) break;
    if (state_ == State::kHandshaking) {
      HandshakeFrame(**next);
      if (handshake_phase_ == 3) return;  // the TLS upgrade reads next (OnTlsUpgraded)
    } else {
      HandleFrame(**next);
    }
  }
  if (state_ != State::kClosed) StartRead();
}

void MuxSessionSink::HandleFrame(const FrameView& frame) {
  // Only our own requests' tags may buffer fragments, so reassembly holds at most tags in use x
  // max_message_size, and max_reassembly_bytes in all, however many tags a hostile server
  // fragments on: Rdispatch pieces for other tags are dropped unbuffered (the reply would be
  // ignored anyway), and a Tdispatch (never accepted from a server) is refused at its first
  // piece.
  if (frame.type == wire::kRdispatch) {
    if (FindSent(frame.tag) == nullptr) return;
    // The common reply: whole, with no fragments of any tag waiting (nothing to reassemble).
    if (!frame.fragment && reassembler_.pending_tags() == 0 && AnswerOk(frame)) return;
  }
  if (frame.type == wire::kTdispatch) {
    ProtocolError(fmt::format("unexpected Tdispatch tag={} from {}", frame.tag, address_));
    return;
  }
  auto whole = reassembler_.Add(frame);
  if (!whole) {
    ProtocolError(fmt::format("bad fragment from {}: {}", address_, whole.error().detail));
    return;
  }
  if (!whole->has_value()) return;  // a non-final fragment
  if ((*whole)->type == wire::kRdispatch && AnswerOk(**whole)) return;
  auto msg = DecodeMessage(**whole);
  if (!msg) {
    ProtocolError(fmt::format("undecodable message from {}: {}", address_, msg.error().detail));
    return;
  }
  HandleMessage(std::move(*msg));
}

bool MuxSessionSink::AnswerOk(const FrameView& frame) {
  // The common reply, read in place: status Ok, a few contexts, the body. Anything else (an
  // error or Nack, a discarded tag, a malformed body) goes the general way, which reports it.
  const std::string_view b = frame.body;
  auto u16 = [&b](size_t at) {
    return static_cast<size_t>(static_cast<uint8_t>(b[at])) << 8 | static_cast<uint8_t>(b[at + 1]);
  };
  if (b.size() < 3 || static_cast<uint8_t>(b[0]) != static_cast<uint8_t>(ReplyStatus::kOk)) return false;
  Pending* p = FindSent(frame.tag);
  if (p == nullptr || p->stack == nullptr) return false;
  const size_t contexts = u16(1);
  size_t at = 3;
  std::string_view headers;
  bool have_headers = false;
  for (size_t i = 0; i < contexts; ++i) {
    std::string_view kv[2];
    for (auto& part : kv) {
      if (b.size() - at < 2) return false;
      const size_t len = u16(at);
      at += 2;
      if (b.size() - at < len) return false;
      part = b.substr(at, len);
      at += len;
    }
    if (!have_headers && kv[0] == kResponseHeadersKey) {  // the first, as FindContext
      headers = kv[1];
      have_headers = true;
    }
  }
  const uint32_t tag = frame.tag;
  Pending answered = *p;
  ErasePending(tag);
  --pending_count_;
  FreeTag(tag);
  if (answered.reply != nullptr) answered.reply->data.assign(b.substr(at));
  MethodReturnMessage m{{}, {}, {}};
  if (have_headers) {
    if (auto decoded = DecodeHeaders(headers)) m.headers = std::move(*decoded);
  }
  answered.stack->AsyncProcessResponse(answered.reply, m);
  MaybeFinishDrain();
  return true;
}

void MuxSessionSink::HandleMessage(Message m) {
  if (auto* r = std::get_if<Rdispatch>(&m)) {
    Pending* p = FindSent(r->tag);
    if (p == nullptr) return;  // unknown tag, or its request is not sent yet: ignore
    if (p->stack == nullptr) {
      // The answer to a discarded request frees its tag.
      ErasePending(r->tag);
      --discarded_count_;
      FreeTag(r->tag);
      MaybeFinishDrain();
      return;
    }
    uint64_t flags = 0;
    if (const std::string* f = FindContext(r->contexts, kMuxFailureKey)) {
      if (auto v = DecodeMuxFailure(*f)) flags = *v;
    }
    switch (r->status) {
      case ReplyStatus::kOk:
        Answer(r->tag, {}, {}, &r->body, &r->contexts);
        break;
      case ReplyStatus::kError: {
        // Flagged Retryable (Finagle: safe to re-issue the work) or Rejected (not attempted),
        // and not NonRetryable: Finagle's requeue filter sends it again, so it is a retryable
        // kNack, which the retry sink repeats. Otherwise the server may have acted on it.
        const bool retryable = (flags & (mux_failure::kRetryable | mux_failure::kRejected)) != 0 &&
                               (flags & mux_failure::kNonRetryable) == 0;
        Answer(r->tag, make_error_code(retryable ? Errc::kNack : Errc::kServerError),
               fmt::format("server error from {}{}: {}", address_,
                           flags ? " (flagged " + FlagsInWords(flags) + ")" : std::string(), Printable(r->body)),
               nullptr, &r->contexts);
        break;
      }
      case ReplyStatus::kNack: {
        nacks_.Increment();
        // Finagle's NonRetryableNackFailure: not processed, and the server asks that it not be
        // sent again (no retry, no requeue).
        const bool final = (flags & mux_failure::kNonRetryable) != 0;
        Answer(r->tag, make_error_code(final ? Errc::kNonRetryableNack : Errc::kNack),
               fmt::format("{} refused the request (Nack{}); it was not processed{}", address_,
                           flags ? ", flagged " + FlagsInWords(flags) : std::string(),
                           final ? " and must not be retried" : ""));
        break;
      }
    }
    MaybeFinishDrain();
    return;
  }
  if (auto* e = std::get_if<Rerr>(&m)) {
    Pending* p = FindSent(e->tag);
    if (p == nullptr) return;
    if (p->stack == nullptr) {
      ErasePending(e->tag);
      --discarded_count_;
      FreeTag(e->tag);
    } else {
      Answer(e->tag, make_error_code(Errc::kServerError),
             fmt::format("{} answered with Rerr: {}", address_, Printable(e->why)));
    }
    MaybeFinishDrain();
    return;
  }
  if (auto* d = std::get_if<Rdiscarded>(&m)) {
    Pending* p = FindSent(d->tag);
    if (p == nullptr) return;
    if (p->stack == nullptr) {
      ErasePending(d->tag);
      --discarded_count_;
      FreeTag(d->tag);
    } else {
      Answer(d->tag, make_error_code(Errc::kServerError), fmt::format("{} discarded the request", address_));
    }
    MaybeFinishDrain();
    return;
  }
  if (auto* p = std::get_if<Rping>(&m)) {
    if (p->tag == kControlTag && ping_outstanding_) {
      ping_outstanding_ = false;
      ping_timeout_.Cancel();
    }
    return;
  }
  if (auto* t = std::get_if<Tping>(&m)) {
    if (EnqueueControlReply(Rping{t->tag})) Flush();
    return;
  }
  if (auto* t = std::get_if<Tdrain>(&m)) {
    if (draining_) {
      // Another Tdrain: answered as the first (§1.9), but the drain is one: counted, logged and
      // reported to the pool once. The session closes as the first one arranged.
      if (EnqueueControlReply(Rdrain{t->tag})) Flush(/*now=*/true);
      return;
    }
    drains_.Increment();
    SCALES_LOG_RATE_LIMITED(kInfo, 10,
                            "Mux session to {}: Tdrain received; no new requests, closing after {} in flight",
                            address_, pending_count_);
    if (!EnqueueControlReply(Rdrain{t->tag})) return;
    Flush(/*now=*/true);  // the session may close right below, before the read batch ends
    draining_ = true;
    // Unusable for new requests from now on, though it finishes those it has: whoever pools it
    // (the SingletonPool) gives new requests a new session instead of failing them here.
    if (state_ == State::kOpen) {
      on_faulted_.Set({make_error_code(Errc::kNack),
                       fmt::format("Mux session to {} is draining (the server sent Tdrain)", address_)});
    }
    MaybeFinishDrain();
    return;
  }
  if (auto* l = std::get_if<Tlease>(&m)) {
    if (draining_) return;  // leases are ignored while draining
    if (l->unit == static_cast<uint8_t>(LeaseUnit::kDurationMillis)) {
      uint64_t ms = std::min<uint64_t>(l->amount, 0xFFFFFFFFull);
      lease_end_ = loop_.Now() + std::chrono::milliseconds(ms);
    }
    return;  // other units: ignored (Finagle's client would close; we prefer to keep serving)
  }
  if (std::holds_alternative<Tdiscarded>(m) || std::holds_alternative<Rdrain>(m)) return;
  // Tdispatch/Treq from the server, a late Tinit/Rinit, Rreq: not something a client accepts.
  ProtocolError(fmt::format("unexpected {} from {}", Describe(m), address_));
}

void MuxSessionSink::Answer(uint32_t tag, error_code ec, std::string detail, std::string* body,
                            const Contexts* contexts) {
  Pending* found = FindSent(tag);
  if (found == nullptr || found->stack == nullptr) return;
  Pending p = *found;
  ErasePending(tag);
  --pending_count_;
  FreeTag(tag);
  if (!ec && body != nullptr && p.reply != nullptr) p.reply->data = std::move(*body);
  MethodReturnMessage m{ec, std::move(detail), {}};
  if (contexts != nullptr) {
    if (const std::string* h = FindContext(*contexts, kResponseHeadersKey)) {
      if (auto headers = DecodeHeaders(*h)) m.headers = std::move(*headers);
    }
  }
  p.stack->AsyncProcessResponse(ec ? nullptr : p.reply, m);
}

// --- writing -------------------------------------------------------------------------------

void MuxSessionSink::AddPending(uint32_t tag, Pending p) {
  if (tag >= pending_.size()) pending_.resize(std::max<size_t>(tag + 1, 2 * pending_.size()));
  p.used = true;
  pending_[tag] = p;
}

void MuxSessionSink::Enqueue(const Message& m) {
  auto r = writer_.Enqueue(m);
  (void)r;  // our own messages are always representable (tags and sizes are checked)
}

bool MuxSessionSink::EnqueueControlReply(const Message& m) {
  // Only replies queued behind a write that was in progress before this read count against the
  // bound: those a read batch holds back (it writes them when it ends; a read is bounded), or
  // queues behind a write it started itself (Rdrain's, at once), are not stuck.
  if (writing_ && write_predates_batch_ && queued_control_replies_ >= options_.max_queued_control_replies) {
    Fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("{} Rping/Rdrain replies to {} are queued behind a socket write that does not finish "
                     "(limit session.max_queued_control_replies = {}): the server sends Tping but does not read; "
                     "session closed with {} request(s) in flight",
                     queued_control_replies_, address_, options_.max_queued_control_replies, pending_count_),
         true);
    return false;
  }
  ++queued_control_replies_;
  Enqueue(m);
  return true;
}

void MuxSessionSink::Flush(bool now) {
  if (reading_batch_ && !now) {
    // Handling a read's replies: wait for more requests, unless enough are waiting already:
    // at least kMinWriteSplit and pending / write_splits (as (queued + 1) * splits > pending,
    // which is the same without a division per request).
    const size_t queued = queued_tags_.size();
    if (queued < kMinWriteSplit || (queued + 1) * options_.write_splits <= pending_count_) return;
  }
  if (writing_ || writer_.empty() || state_ == State::kClosed) return;
  // During the TLS upgrade the handshake owns the socket; OnTlsUpgraded flushes.
  if (state_ == State::kHandshaking && handshake_phase_ == 3) return;
  write_buffer_.clear();
  writer_.WriteAll(&write_buffer_);
  queued_control_replies_ = 0;
  for (uint32_t tag : queued_tags_) {
    if (Pending* p = FindPending(tag)) p->written = true;
  }
  queued_tags_.clear();
  stale_queued_tags_ = 0;
  write_offset_ = 0;
  WriteMore();
}

void MuxSessionSink::DropStaleQueuedTags() {
  // Keeps, once, each tag whose request is still queued (a cancelled request's tag may have
  // been reused by a newer request, queued as well); `listed` marks the tags kept meanwhile.
  size_t kept = 0;
  for (uint32_t tag : queued_tags_) {
    Pending* p = FindPending(tag);
    if (p == nullptr || p->written || p->listed) continue;
    p->listed = true;
    queued_tags_[kept++] = tag;
  }
  queued_tags_.resize(kept);
  for (uint32_t tag : queued_tags_) pending_[tag].listed = false;
  stale_queued_tags_ = 0;
}

void MuxSessionSink::WriteMore() {
  // In pieces of at most kMaxWriteChunk: when the session fails with a large write unfinished
  // (a peer that stopped reading, then reset), a request whose first byte lies beyond the piece
  // in flight certainly never left this process (MarkUnsentInWriteBuffer).
  write_in_flight_ = std::min(write_buffer_.size() - write_offset_, kMaxWriteChunk);
  writing_ = true;
  conn_.WithStream([this](auto& stream) {
    stream.async_write_some(asio::buffer(write_buffer_.data() + write_offset_, write_in_flight_),
                            [self = self()](const boost::system::error_code& ec, size_t n) { self->OnWritten(ec, n); });
  });
}

void MuxSessionSink::OnWritten(const boost::system::error_code& ec, size_t n) {
  writing_ = false;
  write_in_flight_ = 0;
  if (state_ == State::kClosed) return;
  conn_.bytes_sent().Increment(static_cast<int64_t>(n));
  write_offset_ += n;
  if (ec) {
    Fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("writing to {} failed: {} ({} request(s) in flight)", address_, Describe(ec), pending_count_),
         true);
    return;
  }
  if (write_offset_ < write_buffer_.size()) {
    WriteMore();
    return;
  }
  if (state_ == State::kHandshaking && handshake_phase_ == 3) {
    // The plaintext write NegotiateTls waited for is done: the TLS upgrade starts now (what
    // queued meanwhile goes out over TLS once it is done, OnTlsUpgraded).
    conn_.AsyncStartTls(options_.tls, [self = self()](error_code ec) { self->OnTlsUpgraded(ec); });
    return;
  }
  Flush();  // whatever queued up meanwhile goes out in one write
  if (draining_) MaybeFinishDrain();
}

void MuxSessionSink::MarkUnsentInWriteBuffer() {
  const size_t sent_bound = write_offset_ + (writing_ ? write_in_flight_ : 0);
  if (sent_bound >= write_buffer_.size()) return;
  // The buffer holds whole frames as FragmentWriter wrote them: every fragment of a request, the
  // first one first. A server handles a request once its last fragment has come, so one with a
  // frame the socket did not take in whole was not received: not written. Whether any of its
  // bytes left (its first frame began before the bound) only changes the message.
  //
  // The request now holding a frame's tag may be another one: the server answered the write's
  // request from the bytes it took, and a request queued since (not marked written) took the
  // freed tag. That one's frames are all queued behind this write: it is left as it is.
  enum : uint8_t { kUnseen, kInThisWrite, kQueuedSince };
  std::vector<uint8_t> seen(pending_.size(), kUnseen);
  const std::string_view buffer(write_buffer_);
  for (size_t pos = 0; pos < buffer.size();) {
    auto h = DecodeFrameHeader(buffer.substr(pos));
    if (!h) return;  // not reached: our own frames
    const size_t end = pos + 4 + size_t{h->size};
    if (h->type == wire::kTdispatch && h->tag < seen.size() && pending_[h->tag].used) {
      Pending& p = pending_[h->tag];
      if (seen[h->tag] == kUnseen) {
        seen[h->tag] = p.written ? kInThisWrite : kQueuedSince;
        if (p.written) p.cut = pos < sent_bound;
      }
      if (seen[h->tag] == kInThisWrite && end > sent_bound) p.written = false;
    }
    pos = end;
  }
}

// --- requests ------------------------------------------------------------------------------

uint32_t MuxSessionSink::AllocateTag() {
  for (size_t w = 0; w < tag_bits_.size(); ++w) {
    if (~tag_bits_[w] == 0) continue;
    uint32_t tag = static_cast<uint32_t>(w * 64 + __builtin_ctzll(~tag_bits_[w]));
    if (tag > kMaxTag) return 0;
    tag_bits_[w] |= uint64_t{1} << (tag % 64);
    ++tags_in_use_;
    tags_gauge_.Add(1);
    return tag;
  }
  uint32_t tag = static_cast<uint32_t>(tag_bits_.size() * 64);
  if (tag > kMaxTag) return 0;
  tag_bits_.push_back(1);
  ++tags_in_use_;
  tags_gauge_.Add(1);
  return tag;
}

void MuxSessionSink::FreeTag(uint32_t tag) {
  tag_bits_[tag / 64] &= ~(uint64_t{1} << (tag % 64));
  --tags_in_use_;
  tags_gauge_.Add(-1);
}

void MuxSessionSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  Stream* request = stream != nullptr ? stream : msg.payload<Stream>();
  Stream* reply = msg.reply_slot<Stream>();
  auto fail = [&](error_code ec, std::string detail) {
    MethodReturnMessage m{ec, std::move(detail), {}};
    stack.AsyncProcessResponse(nullptr, m);
  };
  if (request == nullptr || reply == nullptr) {
    fail(make_error_code(Errc::kInvalidArgument), "the Mux session needs Stream payload and reply slots");
    return;
  }
  if (state_ != State::kOpen) {
    // A session that failed between its open and this request (the pool hands requests parked
    // for the open to a session that may have closed meanwhile): say why. A TLS refusal and the
    // client's own close keep their codes (another session would be refused too, or there is
    // no client left); otherwise the request was not sent, which a retry may repeat elsewhere.
    if (state_ == State::kClosed && close_reason_.error) {
      const bool keep = close_reason_.error == Errc::kTlsFailed || close_reason_.error == Errc::kClientClosed;
      fail(keep ? close_reason_.error : make_error_code(Errc::kNotSent),
           fmt::format("Mux session to {} is closed: {}; the request was not sent", address_, close_reason_.detail));
      return;
    }
    fail(make_error_code(Errc::kNotSent), fmt::format("Mux session to {} is not open; the request was not sent", address_));
    return;
  }
  if (draining_) {
    fail(make_error_code(Errc::kNack),
         fmt::format("Mux session to {} is draining (the server sent Tdrain); the request was not sent", address_));
    return;
  }
  if (stack.cancelled()) {
    fail(stack.cancel_reason(), fmt::format("cancelled before the request was sent to {}", address_));
    return;
  }
  uint32_t tag = AllocateTag();
  if (tag == 0) {
    fail(make_error_code(Errc::kNack),
         fmt::format("no free Mux tag on the session to {} ({} in use; limit: the protocol's {} tags)",
                     address_, tags_in_use_, kMaxTag - 1));  // 0 and 1 are never a request's
    return;
  }
  // The contexts as views: the values that need encoding go into strings kept from one request
  // to the next (no allocation once they have their capacity), the rest are views of the call.
  ContextView contexts[6];
  size_t n = 0;
  const auto& props = msg.properties;
  if (options_.propagate_deadline && props.deadline) {
    auto now_wall = std::chrono::duration_cast<std::chrono::nanoseconds>(loop_.clock().WallNow().time_since_epoch());
    auto remaining = std::chrono::duration_cast<std::chrono::nanoseconds>(*props.deadline - loop_.Now());
    // A deadline past what the wall clock's nanoseconds hold (TimePoint::max() for "never") is
    // sent as none: the sum would overflow into the past.
    const int64_t deadline_ns = remaining.count() > Deadline::kNone - now_wall.count()
                                    ? Deadline::kNone
                                    : (now_wall + remaining).count();
    deadline_value_.clear();
    AppendDeadline({now_wall.count(), deadline_ns}, &deadline_value_);
    contexts[n++] = {kDeadlineKey, deadline_value_};
  }
  if (retries_value_.empty() || props.retries != encoded_retries_) {  // almost always 0: encoded once
    retries_value_.clear();
    AppendRetries(props.retries, &retries_value_);
    encoded_retries_ = props.retries;
  }
  contexts[n++] = {kRetriesKey, retries_value_};
  if (!props.client_id.empty()) contexts[n++] = {kClientIdKey, props.client_id};
  if (props.trace.valid()) {
    TraceContext t;
    t.trace_id = props.trace.trace_id;
    t.span_id = props.trace.span_id;
    // No parent (0) is a root span, which Finagle writes as parent = span: a 0 would read as a
    // real parent span 0.
    t.parent_id = props.trace.parent_id != 0 ? props.trace.parent_id : props.trace.span_id;
    t.flags = props.trace.flags;
    if (props.trace.trace_id_high != 0) t.trace_id_high = props.trace.trace_id_high;  // 40 bytes
    trace_value_.clear();
    AppendTraceContext(t, &trace_value_);
    contexts[n++] = {kTraceContextKey, trace_value_};
  }
  if (props.backup) contexts[n++] = {kBackupRequestKey, {}};
  std::string headers;
  if (!props.headers.empty()) {
    size_t dropped = 0;
    headers = EncodeHeaders(props.headers, &dropped);
    if (dropped != 0) {
      // The protocol's limit, and what Finagle does at it: the call goes on without them. Not
      // silently: the caller's headers did not all reach the server.
      SCALES_LOG_RATE_LIMITED(kWarning, 10,
                              "client {}: Mux request {} to {}: {} of its {} header(s) not sent (the "
                              "Request.headers context holds at most {} bytes, a key or value at most 65535)",
                              msg.service, msg.method, address_, dropped, props.headers.size(), kMaxHeadersBytes);
    }
    contexts[n++] = {kRequestHeadersKey, headers};
  }
  AddPending(tag, Pending{&stack, reply, false});
  ++pending_count_;
  stack.SetCancelHandler(this, TagContext(tag));
  auto r = writer_.EnqueueTdispatch(tag, std::span<const ContextView>(contexts, n), request->data);
  if (!r) {
    ErasePending(tag);
    --pending_count_;
    FreeTag(tag);
    stack.ClearCancelHandler();
    fail(r.error().code, fmt::format("cannot encode the request to {}: {}", address_, r.error().detail));
    return;
  }
  queued_tags_.push_back(tag);
  Flush();
}

void MuxSessionSink::CancelRequest(SinkStack& stack, void* context, const error_code& reason) {
  uint32_t tag = ContextTag(context);
  Pending* p = FindPending(tag);
  if (p == nullptr || p->stack != &stack) return;
  std::string detail;
  bool written = p->written;
  if (!written) {
    std::optional<bool> partial = writer_.Remove(wire::kTdispatch, tag);
    written = !partial.has_value() || *partial;
    // The tag stays in queued_tags_ (erasing it would cost as much as everything queued behind
    // it): Flush finds no request for it, or a newer request that reused it, queued as well.
    // Once such stale entries outnumber the others they are dropped (below: a write that never
    // finishes would otherwise keep one per request ever cancelled).
  }
  if (written) {
    // The server has (part of) it: tell it, and keep the tag until it answers that tag.
    p->stack = nullptr;
    Tdiscarded td;
    td.which = tag;
    td.why = DiscardReason(reason, stack.message().properties, loop_.Now());
    Enqueue(td);
    discards_sent_.Increment();
    --pending_count_;
    ++discarded_count_;
    detail = fmt::format("while waiting for the reply from {} (tag {}; Tdiscarded sent)", address_, tag);
    Flush();
  } else {
    ErasePending(tag);
    --pending_count_;
    FreeTag(tag);
    if (2 * ++stale_queued_tags_ > queued_tags_.size()) DropStaleQueuedTags();
    detail = fmt::format("before it was written to {}", address_);
  }
  MethodReturnMessage m{reason, std::move(detail), {}};
  stack.AsyncProcessResponse(nullptr, m);
  if (discarded_count_ > options_.max_discarded_tags) {
    Fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("{} discarded requests to {} were never answered (limit session.max_discarded_tags = {}); "
                     "session closed",
                     discarded_count_, address_, options_.max_discarded_tags),
         true);
    return;
  }
  MaybeFinishDrain();
}

bool MuxSessionSink::RequestUnsent(const SinkStack& stack, void* context) const {
  // Still queued (behind a write in flight, a read's batch or the TLS upgrade): no byte of it
  // left, as a write takes every queued frame whole (Flush). Once handed to a write it may be
  // (partly) on the wire: cancelling it sends Tdiscarded.
  const uint32_t tag = ContextTag(context);
  if (tag >= pending_.size() || !pending_[tag].used) return false;
  const Pending& p = pending_[tag];
  return p.stack == &stack && !p.written;
}

// --- liveness ------------------------------------------------------------------------------

void MuxSessionSink::SchedulePing() {
  if (options_.ping_interval <= Duration::zero()) return;
  loop_.timers().Schedule(ping_timer_, DeadlineAfter(loop_.Now(), options_.ping_interval), &OnPingTimer, this);
}

void MuxSessionSink::OnPingTimer(void* p) {
  auto* s = static_cast<MuxSessionSink*>(p);
  if (s->state_ != State::kOpen) return;
  if (!s->ping_outstanding_) {
    s->ping_outstanding_ = true;
    s->pings_sent_.Increment();
    s->Enqueue(Tping{kControlTag});
    s->Flush();
    s->loop_.timers().Schedule(s->ping_timeout_, DeadlineAfter(s->loop_.Now(), s->options_.ping_timeout), &OnPingTimeout, s);
  }
  s->SchedulePing();
}

void MuxSessionSink::OnPingTimeout(void* p) {
  auto* s = static_cast<MuxSessionSink*>(p);
  if (!s->ping_outstanding_ || s->state_ != State::kOpen) return;
  s->ping_timeouts_.Increment();
  s->Fail(make_error_code(Errc::kConnectionClosed),
          fmt::format("no Rping from {} within the ping timeout (limit session.ping_timeout = {}); session closed",
                      s->address_, DurationText(s->options_.ping_timeout)),
          true);
}

// --- closing -------------------------------------------------------------------------------

void MuxSessionSink::MaybeFinishDrain() {
  const bool handshaking = state_ == State::kHandshaking;
  if (!draining_ || pending_count_ != 0 || (state_ != State::kOpen && !handshaking)) return;
  // Rdrain, and any Tdiscarded, must reach the server before the socket closes: finish the
  // write in flight and whatever is queued behind it first (OnWritten comes back here), for up
  // to ping_timeout (a server that does not read cannot be told anything), or during the
  // handshake until its deadline (connect_timeout). Meanwhile the session is Busy and refuses
  // new requests (kNack), as during any drain.
  Flush(/*now=*/true);
  if (writing_ && (handshaking || options_.ping_timeout > Duration::zero())) {
    if (!handshaking && !drain_timer_.scheduled()) {
      loop_.timers().Schedule(drain_timer_, DeadlineAfter(loop_.Now(), options_.ping_timeout), &OnDrainTimeout, this);
    }
    return;
  }
  if (handshaking) {
    // Retryable: nothing was sent on this session, and another endpoint may take the request.
    FailOpen(make_error_code(Errc::kNack),
             fmt::format("{} sent Tdrain before answering {} (it is shutting down): answered Rdrain; the "
                         "session was not opened and no request was sent on it",
                         address_, HandshakeStep()));
    return;
  }
  // Drained: the session is finished; the pool replaces it on the next request.
  Fail(make_error_code(Errc::kConnectionClosed), "drained (the server sent Tdrain and every request finished)", false);
}

void MuxSessionSink::OnDrainTimeout(void* p) {
  auto* s = static_cast<MuxSessionSink*>(p);
  if (!s->draining_ || s->state_ != State::kOpen) return;
  s->Fail(make_error_code(Errc::kConnectionClosed),
          fmt::format("drained, but the write to {} did not finish in time (limit session.ping_timeout = {}); "
                      "session closed",
                      s->address_, DurationText(s->options_.ping_timeout)),
          false);
}

void MuxSessionSink::ProtocolError(const std::string& detail) {
  protocol_errors_.Increment();
  Fail(make_error_code(Errc::kProtocolError), detail, true);
}

void MuxSessionSink::Fail(error_code ec, const std::string& detail, bool fault) {
  if (state_ == State::kClosed) return;
  const bool was_open = state_ == State::kOpen;
  const bool client_close = ec == Errc::kClientClosed;
  close_reason_ = {ec, detail};
  if (!was_open && !client_close) open_failure_detail_ = detail;
  // Faults, failed TLS and protocol errors are warnings; a drained session, a failed connect
  // (the resurrector logs the endpoint going down) are informational; the client's own close
  // is debug.
  if (client_close) {
    SCALES_LOG(kDebug, "{}", detail);
  } else if (fault || ec == Errc::kTlsFailed || ec == Errc::kProtocolError) {
    SCALES_LOG_RATE_LIMITED(kWarning, 10, "Mux session to {} {}: {} [{}]; {} request(s) failed", address_,
                            was_open ? "closed" : "failed to open", detail, ErrorName(ec), pending_count_);
  } else {
    SCALES_LOG_RATE_LIMITED(kInfo, 10, "Mux session to {} {}: {} [{}]", address_,
                            was_open ? "closed" : "failed to open", detail, ErrorName(ec));
  }
  state_ = State::kClosed;
  handshake_timer_.Cancel();
  ping_timer_.Cancel();
  ping_timeout_.Cancel();
  drain_timer_.Cancel();
  // The client's own close and a TLS refusal (the next session would be refused too) keep
  // their codes for every request; otherwise the requests that never left are kNotSent.
  const bool keep_code = client_close || ec == Errc::kTlsFailed;
  if (!keep_code) MarkUnsentInWriteBuffer();
  conn_.Close();
  // Nothing more is read: let go of what the server left half-sent (fragments of replies, up to
  // max_message_size per tag, and the read buffer grown for a large frame), which the closed
  // session would otherwise keep until its pool replaces it. No caller of Fail uses a frame
  // view after it.
  decoder_.Clear();
  reassembler_.Clear();
  auto keep = self();
  open_waiters_.CompleteAll(loop_.executor(), was_open ? make_error_code(Errc::kConnectionClosed) : ec);
  // Answer every live request; collect first: answering may start other work on this loop.
  std::vector<std::pair<uint32_t, Pending>> live;  // in tag order
  for (uint32_t tag = 0; tag < pending_.size(); ++tag) {
    const Pending& p = pending_[tag];
    if (!p.used) continue;
    if (p.stack != nullptr) live.emplace_back(tag, p);
    tag_bits_[tag / 64] &= ~(uint64_t{1} << (tag % 64));
  }
  tags_gauge_.Add(-static_cast<int64_t>(tags_in_use_));
  tags_in_use_ = 0;
  std::vector<Pending>().swap(pending_);
  pending_count_ = 0;
  discarded_count_ = 0;
  queued_tags_.clear();
  stale_queued_tags_ = 0;
  // A request still queued behind the write in progress (a peer that stopped reading), or in
  // the part of that write the socket never took, never left this process, and one cut by the
  // failure mid-write never reached the server whole: kNotSent, which the retry sink may send
  // to another endpoint even when the call is not idempotent.
  for (auto& [tag, p] : live) {
    MethodReturnMessage m{ec, detail, {}};
    if (!p.written && !keep_code) {
      m.error = make_error_code(Errc::kNotSent);
      m.detail = p.cut ? fmt::format("{}; the request was cut mid-write (the server cannot have received it whole), "
                                     "not sent",
                                     detail)
                       : fmt::format("{}; the request was still queued, not sent", detail);
    }
    p.stack->AsyncProcessResponse(nullptr, m);
  }
  // A failed open is a fault too: the pool reads the detail (which names the step, e.g. the
  // TLS levels) from on_faulted().value(); the open handlers carry only the code.
  if (fault || (!was_open && !client_close)) on_faulted_.Set({ec, detail});
}

void MuxSessionSink::Close() {
  Fail(make_error_code(Errc::kClientClosed), fmt::format("Mux session to {} closed by the client", address_), false);
}

SinkStatus MuxSessionSink::status() const {
  switch (state_) {
    case State::kIdle:
    case State::kConnecting:
    case State::kHandshaking:
      return SinkStatus::kIdle;
    case State::kOpen:
      if (draining_) return SinkStatus::kBusy;
      if (lease_end_ && loop_.Now() > *lease_end_) return SinkStatus::kBusy;
      return SinkStatus::kOpen;
    case State::kClosed:
      return SinkStatus::kClosed;
  }
  return SinkStatus::kClosed;
}

SinkProvider MuxSessionProvider(SessionOptions options) {
  Validate(options);
  ProviderSettings settings = {
      {"connect_timeout", SettingText(options.connect_timeout)},
      {"handshake", SettingText(options.handshake)},
      {"max_frame_size", SettingText(options.max_frame_size)},
      {"max_message_size", SettingText(options.max_message_size)},
      {"max_reassembly_bytes", SettingText(options.max_reassembly_bytes)},
      {"max_fragment_size", SettingText(options.max_fragment_size)},
      {"ping_interval", SettingText(options.ping_interval)},
      {"ping_timeout", SettingText(options.ping_timeout)},
      {"propagate_deadline", SettingText(options.propagate_deadline)},
      {"max_discarded_tags", SettingText(options.max_discarded_tags)},
      {"max_queued_control_replies", SettingText(options.max_queued_control_replies)},
      {"write_splits", SettingText(options.write_splits)},
      {"tls", SettingText(options.tls.enabled)},
      {"opportunistic_tls", ToString(options.opportunistic_tls)},
  };
  // The TLS files are loaded now, so a bad one fails the build (kInvalidArgument naming the
  // option), as for HTTP and Thrift; the provider keeps the context, so every session shares it
  // (MakeTlsContext's cache) instead of loading the files again on its event loop.
  std::shared_ptr<boost::asio::ssl::context> tls_context;
  if (options.tls.enabled || options.opportunistic_tls != OpportunisticTls::kOff) {
    tls_context = MakeTlsContext(options.tls);
    AppendTlsFileSettings(options.tls, settings);
  }
  return SinkProvider{std::string(roles::kTransport), "mux-session",
                      [options, tls_context](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<MuxSessionSink>(ctx, options);
                      },
                      std::move(settings)};
}

}  // namespace scales::mux
