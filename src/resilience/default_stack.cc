#include "scales/resilience/default_stack.h"

#include "scales/core/timeout_sink.h"

namespace scales {

void Validate(const ResilienceOptions& o) {
  Validate(o.balancer);
  Validate(o.resurrector);
  if (o.retry) Validate(*o.retry);
  if (o.failure_accrual) Validate(*o.failure_accrual);
  if (o.backup) Validate(*o.backup);
}

SinkStackSpec ResilientStack(const ResilienceOptions& o, std::optional<SinkProvider> formatter,
                             std::optional<SinkProvider> backup) {
  SinkStackSpec spec;
  spec.WithSink(TimeoutSinkProvider());
  if (o.retry) spec.WithSink(RetryProvider(*o.retry));
  if (formatter) spec.WithSink(std::move(*formatter));
  if (backup) spec.WithSink(std::move(*backup));
  spec.WithSink(BalancerProvider(o.balancer));
  if (o.failure_accrual) spec.WithSink(FailureAccrualProvider(*o.failure_accrual));
  spec.WithSink(ResurrectorProvider(o.resurrector));
  return spec;
}

}  // namespace scales
