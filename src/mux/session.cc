#include "scales/mux/session.h"

#include <algorithm>

#include <boost/asio/error.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales::mux {

namespace asio = boost::asio;

namespace {

long long Millis(Duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); }

void* TagContext(uint32_t tag) { return reinterpret_cast<void*>(static_cast<uintptr_t>(tag)); }
uint32_t ContextTag(void* ctx) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ctx)); }

std::string Printable(std::string_view s, size_t max = 200) {
  std::string out(s.substr(0, max));
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  if (s.size() > max) out += "...";
  return out;
}

}  // namespace

void Validate(const SessionOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.connect_timeout <= Duration::zero()) fail("session.connect_timeout must be > 0");
  if (o.max_frame_size < 4) fail("session.max_frame_size must be >= 4");
  if (o.max_message_size == 0) fail("session.max_message_size must be > 0");
  if (o.max_fragment_size == 0 || o.max_fragment_size > kUnlimitedFragmentSize) {
    fail("session.max_fragment_size must be in 1..2147483647");
  }
  if (o.ping_interval < Duration::zero()) fail("session.ping_interval must be >= 0 (0 = no pings)");
  if (o.ping_interval > Duration::zero() && o.ping_timeout <= Duration::zero()) {
    fail("session.ping_timeout must be > 0 when pings are on");
  }
  if (o.max_discarded_tags == 0) fail("session.max_discarded_tags must be >= 1");
}

MuxSessionSink::MuxSessionSink(const SinkContext& ctx, SessionOptions options)
    : loop_(*ctx.loop),
      options_(options),
      conn_(*ctx.loop, ctx.endpoint.value_or(Endpoint{}), options.connect_timeout, ctx.stats),
      address_(ctx.endpoint ? ctx.endpoint->ToString() : std::string("?")),
      decoder_(options.max_frame_size),
      reassembler_(options.max_message_size),
      read_buffer_(kMinReadBuffer),
      tag_bits_(1, 0b11),  // tags 0 (markers) and 1 (control) are never allocated
      tags_gauge_(ctx.stats.GetGauge("scales_mux_tags_in_use")),
      pings_sent_(ctx.stats.GetCounter("scales_mux_pings")),
      ping_timeouts_(ctx.stats.GetCounter("scales_mux_ping_timeouts")),
      discards_sent_(ctx.stats.GetCounter("scales_mux_discards")),
      drains_(ctx.stats.GetCounter("scales_mux_drains")),
      nacks_(ctx.stats.GetCounter("scales_mux_nacks")),
      protocol_errors_(ctx.stats.GetCounter("scales_mux_protocol_errors")) {}

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
      loop_.timers().Schedule(handshake_timer_, loop_.Now() + options_.connect_timeout, &OnHandshakeTimeout, this);
      conn_.AsyncConnect([self = self()](error_code ec) { self->OnConnected(ec); });
      return;
  }
}

void MuxSessionSink::OnConnected(error_code ec) {
  if (state_ != State::kConnecting) return;  // closed meanwhile
  if (ec) {
    handshake_timer_.Cancel();
    state_ = State::kClosed;
    conn_.Close();
    open_waiters_.CompleteAll(loop_.executor(), ec);
    return;
  }
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
  s->FailOpen(make_error_code(Errc::kConnectTimeout),
              fmt::format("Mux handshake with {} did not finish within {} ms", s->address_,
                          Millis(s->options_.connect_timeout)));
}

void MuxSessionSink::HandshakeFrame(const Frame& frame) {
  if (handshake_phase_ == 1) {
    // The probe's answer: an echo means the server negotiates; anything else (an old server's
    // "Unexpected mux message type 127") means an un-negotiated session.
    bool echoed = frame.tag == kControlTag && !frame.fragment &&
                  (frame.type == wire::kRerr || frame.type == wire::kRerrLegacy) && frame.body == kProbeText;
    if (!echoed) {
      FinishOpen();
      // A frame that is not about the probe is a real message: handle it as one.
      if (frame.tag != kControlTag) HandleFrame(frame);
      return;
    }
    Tinit init;
    init.headers.emplace_back(std::string(kMuxFramerHeader),
                              EncodeMuxFramer(static_cast<int32_t>(options_.max_fragment_size)));
    init.headers.emplace_back(std::string(kTlsHeader), "off");
    handshake_phase_ = 2;
    Enqueue(init);
    Flush();
    return;
  }
  auto decoded = DecodeMessage(frame);
  if (!decoded) {
    FailOpen(make_error_code(Errc::kProtocolError),
             fmt::format("bad handshake reply from {}: {}", address_, decoded.error().detail));
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
      if (!v || *v <= 0) {
        FailOpen(make_error_code(Errc::kProtocolError), fmt::format("{} sent a bad mux-framer header", address_));
        return;
      }
      peer_max_fragment_ = static_cast<uint32_t>(*v);
    }
    if (const std::string* tls = FindInitHeader(rinit->headers, kTlsHeader); tls && *tls == "required") {
      FailOpen(make_error_code(Errc::kProtocolError),
               fmt::format("{} requires TLS, which this client does not offer (tls=off)", address_));
      return;
    }
    negotiated_ = true;
    writer_.set_max_fragment_body(peer_max_fragment_);
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

void MuxSessionSink::FinishOpen() {
  handshake_timer_.Cancel();
  state_ = State::kOpen;
  SchedulePing();
  open_waiters_.CompleteAll(loop_.executor(), {});
}

void MuxSessionSink::FailOpen(error_code ec, std::string detail) {
  Fail(ec, detail, /*fault=*/false);
}

// --- reading -------------------------------------------------------------------------------

void MuxSessionSink::StartRead() {
  conn_.socket().async_read_some(asio::buffer(read_buffer_),
                                 [self = self()](const boost::system::error_code& ec, size_t n) { self->OnRead(ec, n); });
}

void MuxSessionSink::OnRead(const boost::system::error_code& ec, size_t n) {
  if (state_ == State::kClosed) return;
  if (ec) {
    Fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("connection to {} {} ({} request(s) in flight)", address_,
                     ec == asio::error::eof ? std::string("closed by the server") : "failed: " + ec.message(),
                     pending_count_),
         /*fault=*/true);
    return;
  }
  conn_.bytes_received().Increment(static_cast<int64_t>(n));
  decoder_.Feed(read_buffer_.data(), n);
  // A read that filled the buffer suggests more was waiting: read more at a time from now on.
  // Starting small keeps an idle session's footprint small.
  if (n == read_buffer_.size() && read_buffer_.size() < kMaxReadBuffer) {
    read_buffer_.resize(read_buffer_.size() * 2);
  }
  auto keep = self();  // answering requests may drop the last outside reference
  while (state_ != State::kClosed) {
    auto next = decoder_.Next();
    if (!next) {
      protocol_errors_.Increment();
      Fail(make_error_code(Errc::kProtocolError),
           fmt::format("undecodable frame from {}: {}", address_, next.error().detail), true);
      return;
    }
    if (!next->has_value()) break;
    if (state_ == State::kHandshaking) {
      HandshakeFrame(**next);
    } else {
      HandleFrame(std::move(**next));
    }
  }
  if (state_ != State::kClosed) StartRead();
}

void MuxSessionSink::HandleFrame(Frame frame) {
  // Only our own requests' tags may buffer fragments, so reassembly holds at most tags in use x
  // max_message_size however many tags a hostile server fragments on: Rdispatch pieces for
  // other tags are dropped unbuffered (the reply would be ignored anyway), and a Tdispatch
  // (never accepted from a server) is refused at its first piece.
  if (frame.type == wire::kRdispatch && pending_.find(frame.tag) == pending_.end()) return;
  if (frame.type == wire::kTdispatch) {
    protocol_errors_.Increment();
    Fail(make_error_code(Errc::kProtocolError),
         fmt::format("unexpected Tdispatch tag={} from {}", frame.tag, address_), true);
    return;
  }
  auto whole = reassembler_.Add(std::move(frame));
  if (!whole) {
    protocol_errors_.Increment();
    Fail(make_error_code(Errc::kProtocolError),
         fmt::format("bad fragment from {}: {}", address_, whole.error().detail), true);
    return;
  }
  if (!whole->has_value()) return;  // a non-final fragment
  auto msg = DecodeMessage(**whole);
  if (!msg) {
    protocol_errors_.Increment();
    Fail(make_error_code(Errc::kProtocolError),
         fmt::format("undecodable message from {}: {}", address_, msg.error().detail), true);
    return;
  }
  HandleMessage(std::move(*msg));
}

void MuxSessionSink::HandleMessage(Message m) {
  if (auto* r = std::get_if<Rdispatch>(&m)) {
    auto it = pending_.find(r->tag);
    if (it == pending_.end()) return;  // unknown tag: ignore
    if (it->second.stack == nullptr) {
      // The answer to a discarded request frees its tag.
      ErasePending(it);
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
      case ReplyStatus::kError:
        Answer(r->tag, make_error_code(Errc::kServerError),
               fmt::format("server error from {}{}: {}", address_,
                           (flags & mux_failure::kRetryable) ? " (flagged retryable)" : "", Printable(r->body)),
               nullptr, &r->contexts);
        break;
      case ReplyStatus::kNack:
        nacks_.Increment();
        Answer(r->tag, make_error_code(Errc::kNack),
               fmt::format("{} refused the request (Nack{}); it was not processed", address_,
                           flags ? fmt::format(", MuxFailure flags {}", flags) : std::string()));
        break;
    }
    MaybeFinishDrain();
    return;
  }
  if (auto* e = std::get_if<Rerr>(&m)) {
    auto it = pending_.find(e->tag);
    if (it == pending_.end()) return;
    if (it->second.stack == nullptr) {
      ErasePending(it);
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
    auto it = pending_.find(d->tag);
    if (it == pending_.end()) return;
    if (it->second.stack == nullptr) {
      ErasePending(it);
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
    Enqueue(Rping{t->tag});
    Flush();
    return;
  }
  if (auto* t = std::get_if<Tdrain>(&m)) {
    drains_.Increment();
    Enqueue(Rdrain{t->tag});
    Flush();
    draining_ = true;
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
  protocol_errors_.Increment();
  Fail(make_error_code(Errc::kProtocolError),
       fmt::format("unexpected {} from {}", Describe(m), address_), true);
}

void MuxSessionSink::Answer(uint32_t tag, error_code ec, std::string detail, std::string* body,
                            const Contexts* contexts) {
  auto it = pending_.find(tag);
  if (it == pending_.end() || it->second.stack == nullptr) return;
  Pending p = it->second;
  ErasePending(it);
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
  if (spare_nodes_.empty()) {
    pending_.emplace(tag, p);
    return;
  }
  PendingMap::node_type node = std::move(spare_nodes_.back());
  spare_nodes_.pop_back();
  node.key() = tag;
  node.mapped() = p;
  pending_.insert(std::move(node));
}

void MuxSessionSink::ErasePending(PendingMap::iterator it) { spare_nodes_.push_back(pending_.extract(it)); }

void MuxSessionSink::Enqueue(const Message& m) {
  auto r = writer_.Enqueue(m);
  (void)r;  // our own messages are always representable (tags and sizes are checked)
}

void MuxSessionSink::Flush() {
  if (writing_ || writer_.empty() || state_ == State::kClosed) return;
  write_buffer_.clear();
  writer_.WriteAll(&write_buffer_);
  for (uint32_t tag : queued_tags_) {
    auto it = pending_.find(tag);
    if (it != pending_.end()) it->second.written = true;
  }
  queued_tags_.clear();
  writing_ = true;
  asio::async_write(conn_.socket(), asio::buffer(write_buffer_),
                    [self = self()](const boost::system::error_code& ec, size_t n) { self->OnWritten(ec, n); });
}

void MuxSessionSink::OnWritten(const boost::system::error_code& ec, size_t n) {
  writing_ = false;
  if (state_ == State::kClosed) return;
  conn_.bytes_sent().Increment(static_cast<int64_t>(n));
  if (ec) {
    Fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("writing to {} failed: {} ({} request(s) in flight)", address_, ec.message(), pending_count_),
         true);
    return;
  }
  Flush();  // whatever queued up meanwhile goes out in one write
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
    fail(make_error_code(Errc::kConnectionClosed), fmt::format("Mux session to {} is not open", address_));
    return;
  }
  if (draining_) {
    fail(make_error_code(Errc::kNack),
         fmt::format("Mux session to {} is draining (the server sent Tdrain); the request was not sent", address_));
    return;
  }
  if (stack.cancelled()) {
    fail(stack.cancel_reason(), "cancelled before it was sent");
    return;
  }
  uint32_t tag = AllocateTag();
  if (tag == 0) {
    fail(make_error_code(Errc::kNack),
         fmt::format("no free Mux tag on the session to {} ({} in use)", address_, tags_in_use_));
    return;
  }
  Tdispatch& d = std::get<Tdispatch>(dispatch_scratch_);
  d.tag = tag;
  size_t contexts = 0;
  // Sets the next context in place (assigning keeps the strings' capacity).
  auto context = [&](std::string_view key, std::string value) {
    if (d.contexts.size() == contexts) d.contexts.emplace_back();
    Context& c = d.contexts[contexts++];
    c.key.assign(key);
    c.value.assign(value);
  };
  const auto& props = msg.properties;
  if (options_.propagate_deadline && props.deadline) {
    auto now_wall = std::chrono::duration_cast<std::chrono::nanoseconds>(loop_.clock().WallNow().time_since_epoch());
    auto remaining = std::chrono::duration_cast<std::chrono::nanoseconds>(*props.deadline - loop_.Now());
    context(kDeadlineKey, EncodeDeadline({now_wall.count(), (now_wall + remaining).count()}));
  }
  context(kRetriesKey, EncodeRetries(props.retries));
  if (!props.client_id.empty()) context(kClientIdKey, EncodeClientId(props.client_id));
  if (props.trace.valid()) {
    TraceContext t;
    t.trace_id = props.trace.trace_id;
    t.span_id = props.trace.span_id;
    t.parent_id = props.trace.parent_id;
    t.flags = props.trace.flags;
    context(kTraceContextKey, EncodeTraceContext(t));
  }
  if (!props.headers.empty()) context(kRequestHeadersKey, EncodeHeaders(props.headers));
  d.contexts.resize(contexts);
  d.payload.assign(request->data);
  AddPending(tag, Pending{&stack, reply, false});
  ++pending_count_;
  stack.SetCancelHandler(this, TagContext(tag));
  auto r = writer_.Enqueue(dispatch_scratch_);
  if (d.payload.capacity() > 64 * 1024) std::string().swap(d.payload);  // keep no large payload
  if (!r) {
    ErasePending(pending_.find(tag));
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
  auto it = pending_.find(tag);
  if (it == pending_.end() || it->second.stack != &stack) return;
  std::string detail;
  bool written = it->second.written;
  if (!written) {
    std::optional<bool> partial = writer_.Remove(wire::kTdispatch, tag);
    written = !partial.has_value() || *partial;
    std::erase(queued_tags_, tag);
  }
  if (written) {
    // The server has (part of) it: tell it, and keep the tag until it answers that tag.
    Tdiscarded td;
    td.which = tag;
    td.why = reason.message();
    Enqueue(td);
    discards_sent_.Increment();
    it->second.stack = nullptr;
    --pending_count_;
    ++discarded_count_;
    detail = fmt::format("while waiting for the reply from {} (tag {}; Tdiscarded sent)", address_, tag);
    Flush();
  } else {
    ErasePending(it);
    --pending_count_;
    FreeTag(tag);
    detail = fmt::format("before it was written to {}", address_);
  }
  MethodReturnMessage m{reason, std::move(detail), {}};
  stack.AsyncProcessResponse(nullptr, m);
  if (discarded_count_ > options_.max_discarded_tags) {
    Fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("{} discarded requests to {} were never answered; session closed", discarded_count_, address_),
         true);
    return;
  }
  MaybeFinishDrain();
}

// --- liveness ------------------------------------------------------------------------------

void MuxSessionSink::SchedulePing() {
  if (options_.ping_interval <= Duration::zero()) return;
  loop_.timers().Schedule(ping_timer_, loop_.Now() + options_.ping_interval, &OnPingTimer, this);
}

void MuxSessionSink::OnPingTimer(void* p) {
  auto* s = static_cast<MuxSessionSink*>(p);
  if (s->state_ != State::kOpen) return;
  if (!s->ping_outstanding_) {
    s->ping_outstanding_ = true;
    s->pings_sent_.Increment();
    s->Enqueue(Tping{kControlTag});
    s->Flush();
    s->loop_.timers().Schedule(s->ping_timeout_, s->loop_.Now() + s->options_.ping_timeout, &OnPingTimeout, s);
  }
  s->SchedulePing();
}

void MuxSessionSink::OnPingTimeout(void* p) {
  auto* s = static_cast<MuxSessionSink*>(p);
  if (!s->ping_outstanding_ || s->state_ != State::kOpen) return;
  s->ping_timeouts_.Increment();
  s->Fail(make_error_code(Errc::kConnectionClosed),
          fmt::format("no Rping from {} within {} ms; session closed", s->address_, Millis(s->options_.ping_timeout)),
          true);
}

// --- closing -------------------------------------------------------------------------------

void MuxSessionSink::MaybeFinishDrain() {
  if (draining_ && pending_count_ == 0 && state_ == State::kOpen) {
    // Drained: the session is finished; the pool replaces it on the next request.
    Fail(make_error_code(Errc::kConnectionClosed), fmt::format("Mux session to {} drained", address_), false);
  }
}

void MuxSessionSink::Fail(error_code ec, const std::string& detail, bool fault) {
  if (state_ == State::kClosed) return;
  const bool was_open = state_ == State::kOpen;
  state_ = State::kClosed;
  handshake_timer_.Cancel();
  ping_timer_.Cancel();
  ping_timeout_.Cancel();
  conn_.Close();
  auto keep = self();
  open_waiters_.CompleteAll(loop_.executor(), was_open ? make_error_code(Errc::kConnectionClosed) : ec);
  // Answer every live request; collect first: answering may start other work on this loop.
  std::vector<std::pair<uint32_t, Pending>> live;
  for (auto& [tag, p] : pending_) {
    if (p.stack != nullptr) live.emplace_back(tag, p);
  }
  for (auto& [tag, p] : pending_) {
    (void)p;
    tag_bits_[tag / 64] &= ~(uint64_t{1} << (tag % 64));
  }
  tags_gauge_.Add(-static_cast<int64_t>(tags_in_use_));
  tags_in_use_ = 0;
  pending_.clear();
  spare_nodes_.clear();
  pending_count_ = 0;
  discarded_count_ = 0;
  queued_tags_.clear();
  std::sort(live.begin(), live.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [tag, p] : live) {
    MethodReturnMessage m{ec, detail, {}};
    p.stack->AsyncProcessResponse(nullptr, m);
  }
  if (fault) on_faulted_.Set({ec, detail});
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
  return SinkProvider{std::string(roles::kTransport), "mux-session",
                      [options](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<MuxSessionSink>(ctx, options);
                      }};
}

}  // namespace scales::mux
