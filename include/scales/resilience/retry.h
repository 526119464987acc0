#pragma once
// RetrySink (role "retry", between the timeout sink and the formatter): sends a failed request
// down again when that is known to be safe, under a retry budget, within the call's deadline.
//
// A failure is retried when all of these hold:
//   - the error is retryable: Condition::kRetryable (connect failed / timed out, failed fast,
//     pool queue full, Nack, not sent), or kConnectionClosed when the caller marked the call idempotent
//     (CallOptions::idempotent);
//   - the request was not cancelled (timeout, caller) and the sink is not closed;
//   - fewer than max_retries retries have run;
//   - the deadline leaves time: now + backoff is before it;
//   - the budget allows it (RetryBudget::TryWithdraw).
// A retry adds the failed endpoint to msg.properties.avoid_endpoints (so the balancer avoids
// every endpoint an earlier attempt of the call went to), clears
// msg.properties.endpoint, waits a backoff drawn uniformly from [backoff_min, backoff_max] (0 by
// default: the next loop turn; never inside the failed attempt's response path), then increments
// msg.properties.retries and scales_retries, gives a traced call a new span id (each attempt a
// span of its own, under the same parent, as Finagle's requeues) and sends the same message and
// stream down again.
// While it waits the sink holds the request: a cancellation (the timeout) or Close() answers it
// at once, and the retry that never ran is neither counted nor named as an attempt.
//
// Every call deposits once into the budget, when it first passes this sink. The backup-request
// sink below (backup_request.h) withdraws a backup from the same budget (Finagle's
// BackupRequestFilter draws on Retries.Budget), so retries and backups share it. The final error's
// detail gains " (attempt k of n)" when the error was retryable or a retry ran, and
// "; not retried: <why>" when a retryable error was not retried (budget exhausted, deadline,
// attempts used up). The error code is always the failed attempt's own (as Finagle keeps the
// original error; kRetryBudgetExhausted stays reserved).
//
// Metrics (client labels): counter scales_retries (retries sent), counter
// scales_retry_budget_exhausted (retries the budget refused), gauge scales_retry_budget_balance
// (the budgets' balances summed over the client's event loops, refreshed on each call and
// retry; expiry and backups' withdrawals show at the next refresh).

#include <memory>
#include <string>
#include <vector>

#include "scales/core/forwarding_sink.h"
#include "scales/core/provider.h"
#include "scales/core/timer_queue.h"
#include "scales/resilience/retry_budget.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

struct RetryOptions {
  // Retries after the first attempt; so at most max_retries + 1 attempts. Default 2; >= 0.
  int max_retries = 2;
  // Wait before a retry, drawn uniformly from [backoff_min, backoff_max]. Default 0 (the next
  // loop turn). 0 <= backoff_min <= backoff_max.
  Duration backoff_min = Duration::zero();
  Duration backoff_max = Duration::zero();
  // The budget each RetrySink creates (one per client per event loop).
  RetryBudgetOptions budget;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable.
void Validate(const RetryOptions& o);

// Whether `ec` may be retried: Condition::kRetryable, or kConnectionClosed when `idempotent`.
bool IsRetryable(const error_code& ec, bool idempotent) noexcept;

// Thread safety: one per client per event loop; used on that loop.
class RetrySink final : public ForwardingSink {
 public:
  RetrySink(EventLoop& loop, SinkPtr next, RetryOptions options, std::shared_ptr<RetryBudget> budget,
            const stats::StatsScope& stats);
  ~RetrySink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  void Close() override;
  std::string_view name() const override { return "retry"; }

  RetryBudget& budget() noexcept { return *budget_; }
  const RetryOptions& options() const noexcept { return options_; }
  // Requests waiting for their backoff to end.
  size_t waiting() const noexcept { return waiting_; }

 private:
  // A request between a failed attempt and its retry. Pooled: reused across calls.
  struct Pending {
    RetrySink* sink = nullptr;
    SinkStack* stack = nullptr;
    // The call's request stream, which the retry is sent with. A request answered while it
    // waits (a cancellation, the deadline, Close()) goes up with no stream, as every failure:
    // the failed attempt's response stream may belong to a connection gone meanwhile.
    Stream* request = nullptr;
    TimerEntry timer;
    std::string last_detail;  // why the previous attempt failed
    bool waiting = false;
    // Answered by this sink while it waited (the deadline, a cancellation, Close()): its detail
    // already names the attempt, from last_detail.
    bool answered = false;
  };

  Pending* Acquire();
  void Release(Pending* p);
  static void OnBackoffTimer(void* arg);
  void Resend(Pending* p);
  void UpdateBalanceGauge();

  EventLoop& loop_;
  RetryOptions options_;
  std::shared_ptr<RetryBudget> budget_;
  std::vector<std::unique_ptr<Pending>> all_;
  std::vector<Pending*> free_;
  size_t waiting_ = 0;
  bool closed_ = false;
  int64_t reported_balance_ = 0;
  stats::Counter& retries_;
  stats::Counter& budget_exhausted_;
  stats::Gauge& balance_gauge_;
};

// Provider of the RetrySink (role "retry"). Each instantiation (one per client per event loop)
// creates its own RetryBudget from options.budget on the loop's clock and passes it to the
// providers below in SinkContext::retry_budget: the backup-request sink withdraws from it too,
// so retries and backups together stay within it. Validates `options`.
SinkProvider RetryProvider(RetryOptions options = {});

}  // namespace scales
