#pragma once
// FailureAccrualSink (role "failureaccrual", one per endpoint, between the balancer and the
// resurrector): Finagle's request-driven circuit breaker. It watches the outcomes of the
// requests to its endpoint and marks the endpoint dead when either policy trips:
//   - success rate: fewer than `required_success_rate` of the requests in the last `window`
//     succeeded, counting only when at least `min_requests` requests are in the window
//     (windowed counters of 5 slices; Finagle uses an EWMA, here a plain ratio);
//   - consecutive failures: `consecutive_failures` failures in a row.
//
// Classification. Failures: the endpoint-level errors kConnectFailed, kConnectTimeout,
// kConnectionClosed, kNotSent, kServerError, kProtocolError and kRequestTimeout. Successes: no error.
// Refusals (kNack, kNonRetryableNack: the server refused the call, overloaded or shutting down)
// count towards the consecutive failures only, so that a server that refuses every call is
// ejected (as Finagle's failure accrual counts Nacks; without it the aperture balancer kept its
// only member and every retry went back to it) while one refusing some calls under load is not
// ejected by the success rate; a refused probe marks the endpoint dead again.
// Everything else (kFailedFast, kCancelled, kClientClosed, kNoMembers, kPoolQueueFull,
// kHttpError, ...) is ignored: it neither counts nor resets. kFailedFast is the resurrector
// answering for an endpoint it already marked down: the connect failure that marked it down
// was counted, and counting every request it turns away would keep the endpoint dead long
// after it came back. kCancelled includes the attempts the backup-request sink stops (the loser,
// or the backup of a call that timed out): they say nothing about their endpoints (Finagle's
// superseded backup is an ignorable failure).
//
// States (Finagle's):
//   Alive       status follows the child; outcomes feed the policies.
//   Dead        for an equal-jittered backoff: min_backoff, then [min, 2 min], [2 min, 4 min],
//               ... until the doubled value reaches max_backoff, then max_backoff constant.
//               Status Busy (balancers avoid it; Closed if the child is Closed). It fails open:
//               requests that still arrive are passed on, their outcomes ignored.
//   ProbeOpen   when the backoff ends. Status follows the child; the next request is the probe.
//   ProbeClosed while the probe is in flight: Busy. Probe success: Alive, policies and backoff
//               reset (revival). Probe failure: Dead with the next backoff. Probe ignored
//               outcome: back to ProbeOpen.
// Only outcomes of requests sent in the current Alive period feed the policies: a request sent
// before the endpoint was marked dead (or while it was) and answered after the revival is
// ignored, so a burst of timeouts from before does not mark the revived endpoint dead again.
//
// Metrics (client and endpoint labels): counters scales_failure_accrual_removals (each time the
// endpoint is marked dead, including after a failed probe) and scales_failure_accrual_revivals;
// gauge scales_failure_accrual_dead (1 while not Alive, 0 once closed; summed over loops in the
// client-level view).

#include <cstdint>
#include <memory>
#include <string>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/core/timer_queue.h"
#include "scales/resilience/retry_budget.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

struct FailureAccrualOptions {
  // Consecutive failures that mark the endpoint dead. Default 5; >= 1, or 0 to disable.
  int consecutive_failures = 5;
  // Success rate below which the endpoint is marked dead. Default 0.8; in [0, 1] (0 disables).
  double required_success_rate = 0.8;
  // Window of the success rate. Default 30 s; > 0.
  Duration window = std::chrono::seconds(30);
  // Requests the window must hold before the success rate counts. Default 5; >= 1.
  int min_requests = 5;
  // First mark-dead duration. Default 5 s; > 0.
  Duration min_backoff = std::chrono::seconds(5);
  // Cap of the mark-dead duration. Default 300 s; >= min_backoff.
  Duration max_backoff = std::chrono::seconds(300);
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable.
void Validate(const FailureAccrualOptions& o);

// Whether an outcome counts as a failure, a success, or neither (see the header comment).
// kRefused: the server refused the request (a Mux Nack): it counts towards the consecutive
// failures only.
enum class AccrualOutcome { kSuccess, kFailure, kRefused, kIgnored };
AccrualOutcome ClassifyForAccrual(const error_code& ec) noexcept;

// Thread safety: one per endpoint per event loop; used on that loop.
class FailureAccrualSink final : public ClientMessageSink {
 public:
  enum class State { kAlive, kDead, kProbeOpen, kProbeClosed };

  FailureAccrualSink(const SinkContext& ctx, SinkPtr next, FailureAccrualOptions options);
  ~FailureAccrualSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "failure-accrual"; }

  State state() const noexcept { return state_; }
  // The duration of the current (or last) mark-dead period.
  Duration current_backoff() const noexcept { return current_backoff_; }
  // When the current Dead period ends.
  TimePoint dead_until() const noexcept { return dead_until_; }
  int consecutive_failures() const noexcept { return consecutive_; }
  const SinkPtr& next() const noexcept { return next_; }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  void Record(AccrualOutcome outcome);
  void MarkDead();
  void ResetPolicy();
  Duration NextBackoff();
  static void OnTimer(void* self);

  EventLoop& loop_;
  SinkPtr next_;
  FailureAccrualOptions options_;
  std::string client_name_;
  std::string address_;
  State state_ = State::kAlive;
  bool closed_ = false;
  int consecutive_ = 0;
  int marks_ = 0;  // mark-dead periods since the last revival
  uint64_t alive_period_ = 0;  // revivals so far: tags the requests sent while alive
  Duration current_backoff_{};
  TimePoint dead_until_{};
  // The success-rate window: requests (successes and failures) and failures. Failures rather
  // than successes, so that a success, the common outcome, touches one adder.
  WindowedAdder requests_;
  WindowedAdder failures_;
  TimerEntry timer_;
  uint64_t fault_subscription_ = 0;
  stats::Counter& removals_;
  stats::Counter& revivals_;
  stats::Gauge& dead_;
};

// Provider of the FailureAccrualSink (role "failureaccrual"; place it below the balancer,
// above the resurrector). Validates `options`.
SinkProvider FailureAccrualProvider(FailureAccrualOptions options = {});

}  // namespace scales
