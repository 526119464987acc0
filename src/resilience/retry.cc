#include "scales/core/log.h"
#include "scales/resilience/retry.h"

#include <chrono>
#include <utility>

#include <fmt/format.h>

#include "core/duration_text.h"
#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales {
namespace {


}  // namespace

void Validate(const RetryOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.max_retries < 0) fail(fmt::format("retry.max_retries must be >= 0 (got {})", o.max_retries));
  if (o.backoff_min < Duration::zero()) fail(fmt::format("retry.backoff_min must be >= 0 (got {})", DurationText(o.backoff_min)));
  if (o.backoff_max < o.backoff_min) {
    fail(fmt::format("retry.backoff_max must be >= backoff_min (got {} < {})", DurationText(o.backoff_max),
                     DurationText(o.backoff_min)));
  }
  Validate(o.budget, "retry.budget");
}

bool IsRetryable(const error_code& ec, bool idempotent) noexcept {
  if (!ec) return false;
  if (ec == Condition::kRetryable) return true;
  return idempotent && ec == Errc::kConnectionClosed;
}

RetrySink::RetrySink(EventLoop& loop, SinkPtr next, RetryOptions options, std::shared_ptr<RetryBudget> budget,
                     const stats::StatsScope& stats)
    : ForwardingSink(std::move(next)),
      loop_(loop),
      options_(std::move(options)),
      budget_(std::move(budget)),
      retries_(stats.GetCounter("scales_retries")),
      budget_exhausted_(stats.GetCounter("scales_retry_budget_exhausted")),
      balance_gauge_(stats.GetGauge("scales_retry_budget_balance")) {
  Validate(options_);
  if (!budget_) budget_ = std::make_shared<RetryBudget>(loop_.clock(), options_.budget);
  UpdateBalanceGauge();
}

RetrySink::~RetrySink() { balance_gauge_.Add(-reported_balance_); }

void RetrySink::UpdateBalanceGauge() {
  const int64_t b = budget_->Balance();
  balance_gauge_.Add(b - reported_balance_);
  reported_balance_ = b;
}

RetrySink::Pending* RetrySink::Acquire() {
  if (free_.empty()) {
    all_.push_back(std::make_unique<Pending>());
    all_.back()->sink = this;
    return all_.back().get();
  }
  Pending* p = free_.back();
  free_.pop_back();
  return p;
}

void RetrySink::Release(Pending* p) {
  p->timer.Cancel();
  p->stack = nullptr;
  p->request = nullptr;
  p->last_detail.clear();
  p->waiting = false;
  p->answered = false;
  free_.push_back(p);
}

namespace {

// The first attempt's context: its request stream, tagged (bit 0; a Stream is aligned) to tell it
// from a retry's Pending.
void* FirstAttempt(Stream* request) noexcept {
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(request) | uintptr_t{1});
}
Stream* FirstAttemptRequest(void* context) noexcept {
  return reinterpret_cast<Stream*>(reinterpret_cast<uintptr_t>(context) & ~uintptr_t{1});
}
bool IsFirstAttempt(void* context) noexcept { return (reinterpret_cast<uintptr_t>(context) & uintptr_t{1}) != 0; }

}  // namespace

void RetrySink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  // Reached once per call (retries are sent from below this point): the call's one deposit.
  budget_->Deposit();
  UpdateBalanceGauge();
  static_assert(alignof(Stream) > 1);
  stack.Push(this, FirstAttempt(stream));
  next_->AsyncProcessRequest(stack, msg, stream);
}

void RetrySink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                     MethodReturnMessage& msg) {
  // The request stream each retry is sent with: the call's own, not the stream the failure came
  // up with (a sink below may answer with a reply buffer of its own).
  Stream* request;
  bool answered_here = false;
  if (IsFirstAttempt(context)) {
    request = FirstAttemptRequest(context);
  } else {
    auto* done = static_cast<Pending*>(context);
    request = done->request;
    answered_here = done->answered;
    Release(done);
  }
  if (msg.ok() || answered_here) {
    stack.AsyncProcessResponse(stream, msg);
    return;
  }
  CallProperties& props = stack.message().properties;
  const int attempt = props.retries + 1;
  const int64_t attempts = int64_t{options_.max_retries} + 1;  // max_retries may be INT_MAX
  const bool retryable = IsRetryable(msg.error, props.idempotent);
  if (retryable || props.retries > 0) msg.detail += fmt::format(" (attempt {} of {})", attempt, attempts);
  if (!retryable || stack.cancelled()) {
    stack.AsyncProcessResponse(stream, msg);
    return;
  }
  std::string refused;
  Duration delay = Duration::zero();
  if (options_.backoff_max > Duration::zero()) {
    delay = loop_.random().UniformDuration(options_.backoff_min, options_.backoff_max);
  }
  const TimePoint now = loop_.Now();
  if (closed_) {
    refused = "the client is closing";
  } else if (props.retries >= options_.max_retries) {
    refused = options_.max_retries == 0 ? std::string("retries are disabled")
                                        : fmt::format("all {} attempts used", attempts);
  } else if (props.deadline && DeadlineAfter(now, delay) >= *props.deadline) {
    refused = fmt::format("the deadline leaves no time for another attempt ({} left, backoff {})",
                          ApproxDurationText(*props.deadline - now), ApproxDurationText(delay));
  } else if (!budget_->TryWithdraw()) {
    budget_exhausted_.Increment();
    SCALES_LOG_RATE_LIMITED(kWarning, 1, "client {}: retry budget exhausted (balance {}); {} not retried",
                            stack.message().service, budget_->Balance(), stack.message().method);
    refused = fmt::format("retry budget exhausted (balance {})", budget_->Balance());
    UpdateBalanceGauge();
  }
  if (!refused.empty()) {
    msg.detail += fmt::format("; not retried: {}", refused);
    stack.AsyncProcessResponse(stream, msg);
    return;
  }

  UpdateBalanceGauge();
  // Last in avoid_endpoints (moved there if an earlier attempt went to it too): the timeout
  // sink names it as the previous attempt's endpoint.
  std::erase(props.avoid_endpoints, props.endpoint);
  props.AddAvoidEndpoint(std::move(props.endpoint));
  props.endpoint.clear();
  Pending* p = Acquire();
  p->stack = &stack;
  p->request = request;
  p->last_detail = std::move(msg.detail);
  p->waiting = true;
  ++waiting_;
  // Hold the request until the backoff ends (at the earliest the next loop turn, so the failed
  // attempt's sinks finish their response path first).
  stack.Push(this, p);
  stack.SetCancelHandler(this, p);
  loop_.timers().Schedule(p->timer, DeadlineAfter(now, delay), &OnBackoffTimer, p);
}

void RetrySink::OnBackoffTimer(void* arg) {
  auto* p = static_cast<Pending*>(arg);
  p->sink->Resend(p);
}

void RetrySink::Resend(Pending* p) {
  p->waiting = false;
  --waiting_;
  SinkStack& stack = *p->stack;
  stack.ClearCancelHandler();
  // A backoff timer run late (a busy loop) can find the deadline passed: answer as the deadline
  // does instead of sending a retry that its timer, due after this one, would cancel at once.
  const std::optional<TimePoint>& deadline = stack.message().properties.deadline;
  if (deadline && loop_.Now() >= *deadline) {
    p->answered = true;
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kRequestTimeout),
        fmt::format("the deadline passed while the request waited to retry; the previous attempt failed: {}",
                    p->last_detail));
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  // Counted (and numbered) only now that it is sent: a retry cut off during its backoff by a
  // cancellation or Close() never ran.
  retries_.Increment();
  CallProperties& props = stack.message().properties;
  ++props.retries;
  // Each attempt is a span of its own in the call's trace, under the same parent (as Finagle's
  // requeues: mux-protocol.md, the retry budget): the server's spans of two attempts do not merge.
  if (props.trace.valid()) props.trace.span_id = NewTraceId(loop_.random());
  // `p` stays ours (it is the pushed context) until this attempt's response comes back.
  next_->AsyncProcessRequest(stack, stack.message(), p->request);
}

void RetrySink::CancelRequest(SinkStack& stack, void* context, const error_code& reason) {
  auto* p = static_cast<Pending*>(context);
  p->timer.Cancel();
  p->waiting = false;
  p->answered = true;
  --waiting_;
  auto m = MethodReturnMessage::Failure(
      reason, fmt::format("cancelled while waiting to retry; the previous attempt failed: {}", p->last_detail));
  stack.AsyncProcessResponse(nullptr, m);
}

void RetrySink::Close() {
  if (!closed_) {
    closed_ = true;
    std::vector<Pending*> waiting;
    for (auto& p : all_) {
      if (p->waiting) waiting.push_back(p.get());
    }
    for (Pending* p : waiting) {
      // Answering one may have answered another meanwhile (a sink above cancelling it there and
      // then): that one is no longer waiting, and may have gone back to the free list.
      if (!p->waiting) continue;
      p->timer.Cancel();
      p->waiting = false;
      p->answered = true;
      --waiting_;
      auto m = MethodReturnMessage::Failure(
          make_error_code(Errc::kClientClosed),
          fmt::format("client closed while the request waited to retry; the previous attempt failed: {}",
                      p->last_detail));
      p->stack->AsyncProcessResponse(nullptr, m);
    }
  }
  next_->Close();
}

SinkProvider RetryProvider(RetryOptions options) {
  Validate(options);
  SinkProvider p{std::string(roles::kRetry), "retry",
                 [options](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   auto budget = std::make_shared<RetryBudget>(ctx.loop->clock(), options.budget);
                   // The sinks below (the backup sink) share this loop's budget.
                   SinkContext below = ctx;
                   below.retry_budget = budget;
                   SinkPtr rest = next(below);
                   return std::make_shared<RetrySink>(*ctx.loop, std::move(rest), options, std::move(budget), ctx.stats);
                 }};
  p.settings = {{"max_retries", SettingText(options.max_retries)},
                {"backoff_min", SettingText(options.backoff_min)},
                {"backoff_max", SettingText(options.backoff_max)},
                {"budget.ttl", SettingText(options.budget.ttl)},
                {"budget.min_retries_per_sec", SettingText(options.budget.min_retries_per_sec)},
                {"budget.percent_can_retry", SettingText(options.budget.percent_can_retry)}};
  return p;
}

}  // namespace scales
