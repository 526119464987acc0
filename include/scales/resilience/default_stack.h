#pragma once
// The upper part every protocol's default stack shares, top to bottom:
//
//   timeout -> retry -> [formatter] -> [backup requests] -> load balancer -> failure accrual
//   -> resurrector
//
// The protocol appends its pool and transport below. Retry and failure accrual are left out
// when their options are std::nullopt; backup requests are off unless `backup` is set.

#include <optional>

#include "scales/core/provider.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/resilience/backup_request.h"
#include "scales/resilience/failure_accrual.h"
#include "scales/resilience/retry.h"

namespace scales {

// What every protocol's options hold for the shared part of the stack.
struct ResilienceOptions {
  // Which load balancer and its settings. Default: aperture (as scales).
  BalancerOptions balancer;
  // Marking endpoints down and reconnecting with jittered exponential backoff.
  ResurrectorOptions resurrector;
  // Retrying failures known to be safe, under a retry budget. std::nullopt: no retries.
  std::optional<RetryOptions> retry = RetryOptions{};
  // Ejecting endpoints whose requests keep failing. std::nullopt: no failure accrual.
  std::optional<FailureAccrualOptions> failure_accrual = FailureAccrualOptions{};
  // Backup requests (hedging) for idempotent calls. std::nullopt (default): none.
  std::optional<BackupRequestOptions> backup;
};

// Throws scales::Error(kInvalidArgument) naming the first unusable field.
void Validate(const ResilienceOptions& o);

// The stack with the backup sink given (or none).
SinkStackSpec ResilientStack(const ResilienceOptions& o, std::optional<SinkProvider> formatter,
                             std::optional<SinkProvider> backup);

// timeout -> retry -> `formatter` (if any) -> backup -> balancer -> failure accrual ->
// resurrector. `Reply` is the reply type the backup sink copies (Stream below a formatter,
// http::Response for HTTP).
template <class Reply>
SinkStackSpec ResilientStack(const ResilienceOptions& o, std::optional<SinkProvider> formatter) {
  std::optional<SinkProvider> backup;
  if (o.backup) backup = BackupRequestProvider<Reply>(*o.backup);
  return ResilientStack(o, std::move(formatter), std::move(backup));
}

}  // namespace scales
