#include "scales/core/log.h"
#include "scales/resilience/failure_accrual.h"

#include <chrono>
#include <cstdint>
#include <utility>

#include <fmt/format.h>

#include "core/backoff.h"
#include "core/duration_text.h"
#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales {
namespace {

constexpr int kWindowSlices = 5;

// Context of the probe request on the sink stack (requests sent while the endpoint is alive
// push AliveContext, the others nullptr). Aligned to 2 so its address is even.
alignas(2) char probe_tag;

// The context of a request sent while the endpoint is alive: its Alive period, odd, so that it
// never equals &probe_tag (or nullptr).
void* AliveContext(uint64_t period) { return reinterpret_cast<void*>(static_cast<uintptr_t>(period << 1 | 1)); }

}  // namespace

void Validate(const FailureAccrualOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.consecutive_failures < 0) {
    fail(fmt::format("failure_accrual.consecutive_failures must be >= 0 (got {})", o.consecutive_failures));
  }
  if (!(o.required_success_rate >= 0.0 && o.required_success_rate <= 1.0)) {
    fail(fmt::format("failure_accrual.required_success_rate must be in [0, 1] (got {})", o.required_success_rate));
  }
  if (o.window <= Duration::zero()) fail(fmt::format("failure_accrual.window must be > 0 (got {})", DurationText(o.window)));
  if (o.min_requests < 1) fail(fmt::format("failure_accrual.min_requests must be >= 1 (got {})", o.min_requests));
  if (o.min_backoff <= Duration::zero()) {
    fail(fmt::format("failure_accrual.min_backoff must be > 0 (got {})", DurationText(o.min_backoff)));
  }
  if (o.max_backoff < o.min_backoff) {
    fail(fmt::format("failure_accrual.max_backoff must be >= min_backoff (got {} < {})", DurationText(o.max_backoff),
                     DurationText(o.min_backoff)));
  }
}

AccrualOutcome ClassifyForAccrual(const error_code& ec) noexcept {
  if (!ec) return AccrualOutcome::kSuccess;
  if (ec.category() != error_category()) return AccrualOutcome::kIgnored;
  switch (static_cast<Errc>(ec.value())) {
    case Errc::kConnectFailed:
    case Errc::kConnectTimeout:
    case Errc::kConnectionClosed:
    case Errc::kNotSent:
    case Errc::kServerError:
    case Errc::kProtocolError:
    case Errc::kRequestTimeout:
      return AccrualOutcome::kFailure;
    case Errc::kNack:
    case Errc::kNonRetryableNack:
      return AccrualOutcome::kRefused;
    default:
      return AccrualOutcome::kIgnored;
  }
}

namespace {
FailureAccrualOptions Validated(FailureAccrualOptions o) {
  Validate(o);
  return o;
}
}  // namespace

FailureAccrualSink::FailureAccrualSink(const SinkContext& ctx, SinkPtr next, FailureAccrualOptions options)
    : loop_(*ctx.loop),
      next_(std::move(next)),
      options_(Validated(options)),
      client_name_(ctx.client_name),
      address_(ctx.endpoint ? ctx.endpoint->ToString() : std::string("?")),
      requests_(loop_.clock(), options_.window, kWindowSlices),
      failures_(loop_.clock(), options_.window, kWindowSlices),
      removals_(ctx.stats.GetCounter("scales_failure_accrual_removals")),
      revivals_(ctx.stats.GetCounter("scales_failure_accrual_revivals")),
      dead_(ctx.stats.GetGauge("scales_failure_accrual_dead")) {
  // Pass the child's faults on, for whatever watches this endpoint's chain.
  fault_subscription_ = next_->on_faulted().Subscribe([this](const Fault& f) { on_faulted_.Set(f); });
}

FailureAccrualSink::~FailureAccrualSink() {
  next_->on_faulted().Unsubscribe(fault_subscription_);
  if (state_ != State::kAlive && !closed_) dead_.Add(-1);
}

void FailureAccrualSink::DoOpen(OpenHandler handler) { next_->AsyncOpen(std::move(handler)); }

void FailureAccrualSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  void* context = nullptr;
  if (state_ == State::kAlive) {
    context = AliveContext(alive_period_);
  } else if (state_ == State::kProbeOpen && !closed_) {
    state_ = State::kProbeClosed;
    context = &probe_tag;
  }
  stack.Push(this, context);
  next_->AsyncProcessRequest(stack, msg, stream);
}

void FailureAccrualSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                              MethodReturnMessage& msg) {
  const AccrualOutcome outcome = ClassifyForAccrual(msg.error);
  if (!closed_) {
    if (context == &probe_tag) {
      if (state_ == State::kProbeClosed) {
        switch (outcome) {
          case AccrualOutcome::kSuccess:
            state_ = State::kAlive;
            dead_.Add(-1);
            revivals_.Increment();
            SCALES_LOG(kInfo, "client {}: endpoint {} revived by failure accrual (probe succeeded)",
                       client_name_, address_);
            marks_ = 0;
            ++alive_period_;  // answers to requests sent before now no longer count
            ResetPolicy();
            break;
          case AccrualOutcome::kFailure:
          case AccrualOutcome::kRefused:  // still refusing
            MarkDead();
            break;
          case AccrualOutcome::kIgnored:
            state_ = State::kProbeOpen;
            break;
        }
      }
    } else if (state_ == State::kAlive && context == AliveContext(alive_period_)) {
      // Only requests sent in this Alive period: one sent before the endpoint was marked dead,
      // or while it was, and answered after its revival says nothing about it since.
      Record(outcome);
    }
  }
  stack.AsyncProcessResponse(stream, msg);
}

void FailureAccrualSink::Record(AccrualOutcome outcome) {
  if (outcome == AccrualOutcome::kIgnored) return;
  if (outcome == AccrualOutcome::kRefused) {
    // Only a run of refusals with no success between trips (a server that takes no work); a
    // server refusing some calls under load is not ejected by the success rate for it.
    ++consecutive_;
    if (options_.consecutive_failures > 0 && consecutive_ >= options_.consecutive_failures) MarkDead();
    return;
  }
  requests_.Add(1);
  if (outcome == AccrualOutcome::kSuccess) {
    consecutive_ = 0;
    return;
  }
  failures_.Add(1);
  ++consecutive_;
  bool trip = options_.consecutive_failures > 0 && consecutive_ >= options_.consecutive_failures;
  if (!trip && options_.required_success_rate > 0.0) {
    const int64_t total = requests_.Sum();
    if (total >= options_.min_requests) {
      const double rate = static_cast<double>(total - failures_.Sum()) / static_cast<double>(total);
      trip = rate < options_.required_success_rate;
    }
  }
  if (trip) MarkDead();
}

void FailureAccrualSink::ResetPolicy() {
  consecutive_ = 0;
  requests_.Reset();
  failures_.Reset();
}

Duration FailureAccrualSink::NextBackoff() {
  return EqualJitterBackoff(options_.min_backoff, options_.max_backoff, marks_++, loop_.random());
}

void FailureAccrualSink::MarkDead() {
  if (state_ == State::kAlive) dead_.Add(1);
  state_ = State::kDead;
  removals_.Increment();
  current_backoff_ = NextBackoff();
  dead_until_ = DeadlineAfter(loop_.Now(), current_backoff_);
  SCALES_LOG(kWarning, "client {}: endpoint {} marked dead by failure accrual for {}", client_name_,
             address_, ApproxDurationText(current_backoff_));
  loop_.timers().Schedule(timer_, dead_until_, &OnTimer, this);
}

void FailureAccrualSink::OnTimer(void* self) {
  auto* s = static_cast<FailureAccrualSink*>(self);
  if (s->state_ == State::kDead && !s->closed_) s->state_ = State::kProbeOpen;
}

void FailureAccrualSink::Close() {
  if (!closed_) {
    closed_ = true;
    timer_.Cancel();
    // A closed chain is no dead endpoint of the client: counted out now (its state no longer
    // changes; the destructor does not count it out again).
    if (state_ != State::kAlive) dead_.Add(-1);
  }
  next_->Close();
}

SinkStatus FailureAccrualSink::status() const {
  const SinkStatus child = next_->status();
  if (closed_ || child == SinkStatus::kClosed) return SinkStatus::kClosed;
  switch (state_) {
    case State::kAlive:
    case State::kProbeOpen:
      return child;
    case State::kDead:
    case State::kProbeClosed:
      return SinkStatus::kBusy;
  }
  return child;
}

SinkProvider FailureAccrualProvider(FailureAccrualOptions options) {
  Validate(options);
  SinkProvider p{std::string(roles::kFailureAccrual), "failure-accrual",
                 [options](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<FailureAccrualSink>(ctx, next(ctx), options);
                 }};
  p.settings = {{"consecutive_failures", SettingText(options.consecutive_failures)},
                {"required_success_rate", SettingText(options.required_success_rate)},
                {"window", SettingText(options.window)},
                {"min_requests", SettingText(options.min_requests)},
                {"min_backoff", SettingText(options.min_backoff)},
                {"max_backoff", SettingText(options.max_backoff)}};
  return p;
}

}  // namespace scales
