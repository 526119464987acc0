#include "scales/core/log.h"
#include "scales/loadbalancer/resurrector.h"

#include <algorithm>

#include <fmt/format.h>

#include <boost/asio/post.hpp>

#include "core/duration_text.h"
#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales {

void Validate(const ResurrectorOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.initial_backoff <= Duration::zero()) fail("resurrector.initial_backoff must be > 0");
  if (o.max_backoff < o.initial_backoff) fail("resurrector.max_backoff must be >= initial_backoff");
  if (!(o.multiplier >= 1.0)) fail(fmt::format("resurrector.multiplier must be >= 1 (got {})", o.multiplier));
  if (!(o.jitter >= 0.0 && o.jitter <= 1.0)) fail(fmt::format("resurrector.jitter must be in [0, 1] (got {})", o.jitter));
}

namespace {
ResurrectorOptions Validated(ResurrectorOptions o) {
  Validate(o);
  return o;
}
}  // namespace

ResurrectorSink::ResurrectorSink(const SinkContext& ctx, SinkFactory next, ResurrectorOptions options)
    : loop_(*ctx.loop),
      ctx_(ctx),
      next_factory_(std::move(next)),
      options_(Validated(options)),
      address_(ctx.endpoint ? ctx.endpoint->ToString() : std::string("?")),
      backoff_(options.initial_backoff),
      marked_down_(ctx.stats.GetCounter("scales_endpoint_marked_down")),
      reconnects_(ctx.stats.GetCounter("scales_endpoint_reconnect_attempts")),
      failed_fast_(ctx.stats.GetCounter("scales_endpoint_failed_fast")) {}

ResurrectorSink::~ResurrectorSink() {
  if (child_) child_->sink->on_faulted().Unsubscribe(fault_subscription_);
}

void ResurrectorSink::EnsureChild() {
  if (!child_) Adopt(next_factory_(ctx_));
}

void ResurrectorSink::Adopt(SinkPtr sink) {
  child_ = std::make_unique<Child>();
  child_->sink = std::move(sink);
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  Child* c = child_.get();
  fault_subscription_ = c->sink->on_faulted().Subscribe([weak, this, c](const Fault& f) {
    // Faults are raised inside the child's own code: handle them on a later turn.
    boost::asio::post(loop_.executor(), [weak, this, c, f] {
      auto self = weak.lock();
      if (self && child_.get() == c) OnFault(f);
    });
  });
}

void ResurrectorSink::DoOpen(OpenHandler handler) {
  if (closed_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kClientClosed));
    return;
  }
  if (down_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), last_error_.error);
    return;
  }
  EnsureChild();
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  // The resurrector may be gone when the child's open completes (its node left, the client
  // closed): touch `this` only through `self`, and complete the caller on a captured executor.
  child_->sink->AsyncOpen([weak, this, c = child_.get(), ex = loop_.executor(),
                           h = std::move(handler)](error_code ec) mutable {
    if (auto self = weak.lock(); self && ec && child_.get() == c && !down_) {
      // Pools raise a fault with the details too; this covers children that do not.
      OnFault({ec, fmt::format("opening endpoint {} failed: {}", address_, ec.message())});
    }
    PostOpenCompletion(std::move(h), ex, ec);
  });
}

void ResurrectorSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  if (closed_) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kClientClosed),
                                          fmt::format("endpoint {} closed", address_));
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  if (down_) {
    failed_fast_.Increment();
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kFailedFast),
        fmt::format("endpoint {} is marked down ({} ago, after: {}); reconnecting with backoff, "
                    "next attempt within {}",
                    address_, ApproxDurationText(loop_.Now() - down_since_), last_error_.detail,
                    ApproxDurationText(backoff_)));
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  EnsureChild();
  Child* c = child_.get();
  ++c->inflight;
  stack.Push(this, c);
  c->sink->AsyncProcessRequest(stack, msg, stream);
}

void ResurrectorSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                           MethodReturnMessage& msg) {
  auto* c = static_cast<Child*>(context);
  --c->inflight;
  const bool drained = c->retired && c->inflight == 0;
  stack.AsyncProcessResponse(stream, msg);
  if (drained) Destroy(c);
}

void ResurrectorSink::Destroy(Child* c) {
  auto it = std::find_if(retired_.begin(), retired_.end(), [c](const auto& p) { return p.get() == c; });
  if (it == retired_.end()) return;
  std::unique_ptr<Child> child = std::move(*it);
  retired_.erase(it);
  child->sink->Close();
  // We may be inside the child's own response path: destroy it on a later turn.
  boost::asio::post(loop_.executor(), [child = std::move(child)] {});
}

void ResurrectorSink::OnFault(const Fault& fault) {
  if (closed_ || down_) return;
  down_ = true;
  last_error_ = fault;
  down_since_ = loop_.Now();
  backoff_ = options_.initial_backoff;
  marked_down_.Increment();
  SCALES_LOG(kWarning, "client {}: endpoint {} marked down: {}; reconnecting with backoff", ctx_.client_name,
             address_, fault.detail);
  RetireChild();
  ScheduleReconnect();
}

void ResurrectorSink::RetireChild() {
  if (!child_) return;
  child_->sink->on_faulted().Unsubscribe(fault_subscription_);
  child_->retired = true;
  Child* c = child_.get();
  retired_.push_back(std::move(child_));
  // Requests already in the pool finish there; the pool closes when the last one has.
  if (c->inflight == 0) Destroy(c);
}

void ResurrectorSink::ScheduleReconnect() {
  double j = std::clamp(options_.jitter, 0.0, 1.0);
  auto lo = std::chrono::duration_cast<Duration>(backoff_ * (1.0 - j));
  Duration delay = loop_.random().UniformDuration(lo, backoff_);
  loop_.timers().Schedule(reconnect_timer_, DeadlineAfter(loop_.Now(), delay), &OnReconnectTimer, this);
}

void ResurrectorSink::OnReconnectTimer(void* self) { static_cast<ResurrectorSink*>(self)->Reconnect(); }

void ResurrectorSink::Reconnect() {
  if (closed_ || !down_ || reconnecting_) return;
  reconnecting_ = true;
  reconnects_.Increment();
  SinkPtr candidate = next_factory_(ctx_);
  candidate_ = candidate;
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  candidate->AsyncOpen([weak, this, candidate](error_code ec) {
    auto self = weak.lock();
    if (!self) {
      candidate->Close();
      return;
    }
    reconnecting_ = false;
    if (candidate_ == candidate) candidate_.reset();
    if (closed_) {
      candidate->Close();
      return;
    }
    if (ec) {
      last_error_ = {ec, fmt::format("reconnect to {} failed: {}", address_, ec.message())};
      candidate->Close();
      boost::asio::post(loop_.executor(), [candidate] {});
      // In double before converting: a large multiplier would overflow the duration.
      const double next = static_cast<double>(backoff_.count()) * std::max(1.0, options_.multiplier);
      backoff_ = next >= static_cast<double>(options_.max_backoff.count())
                     ? options_.max_backoff
                     : Duration(static_cast<Duration::rep>(next));
      ScheduleReconnect();
      return;
    }
    down_ = false;
    backoff_ = options_.initial_backoff;
    SCALES_LOG(kInfo, "client {}: endpoint {} is up again (reconnected)", ctx_.client_name, address_);
    Adopt(candidate);
  });
}

void ResurrectorSink::Close() {
  if (closed_) return;
  closed_ = true;
  reconnect_timer_.Cancel();
  // A reconnect attempt still connecting stops now, not when its connect ends.
  if (SinkPtr candidate = std::move(candidate_)) candidate->Close();
  // Closing a child answers its requests; their responses come back through us.
  if (child_) child_->sink->Close();
  std::vector<SinkPtr> retired;
  for (auto& c : retired_) retired.push_back(c->sink);
  for (auto& s : retired) s->Close();
}

SinkStatus ResurrectorSink::status() const {
  if (closed_ || down_) return SinkStatus::kClosed;
  return child_ ? child_->sink->status() : SinkStatus::kIdle;
}

SinkProvider ResurrectorProvider(ResurrectorOptions options) {
  Validate(options);
  SinkProvider p{std::string(roles::kResurrector), "resurrector",
                 [options](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<ResurrectorSink>(ctx, std::move(next), options);
                 }};
  p.settings = {{"initial_backoff", SettingText(options.initial_backoff)},
                {"max_backoff", SettingText(options.max_backoff)},
                {"multiplier", SettingText(options.multiplier)},
                {"jitter", SettingText(options.jitter)}};
  return p;
}

}  // namespace scales
