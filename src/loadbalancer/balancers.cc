#include "scales/loadbalancer/balancers.h"

#include <string>

#include <fmt/format.h>

#include "scales/core/error.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/loadbalancer/p2c.h"
#include "scales/loadbalancer/round_robin.h"

namespace scales {

std::optional<BalancerKind> ParseBalancerKind(std::string_view name) {
  if (name == "heap") return BalancerKind::kHeap;
  if (name == "p2c") return BalancerKind::kP2C;
  if (name == "p2c-ewma" || name == "p2cPeakEwma") return BalancerKind::kP2CPeakEwma;
  if (name == "round-robin" || name == "roundRobin") return BalancerKind::kRoundRobin;
  if (name == "aperture") return BalancerKind::kAperture;
  return std::nullopt;
}

std::string_view BalancerKindName(BalancerKind kind) {
  switch (kind) {
    case BalancerKind::kHeap:
      return "heap";
    case BalancerKind::kP2C:
      return "p2c";
    case BalancerKind::kP2CPeakEwma:
      return "p2c-ewma";
    case BalancerKind::kRoundRobin:
      return "round-robin";
    case BalancerKind::kAperture:
      return "aperture";
  }
  return "unknown";
}

void Validate(const BalancerOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.max_effort < 1) fail(fmt::format("balancer.max_effort must be >= 1 (got {})", o.max_effort));
  if (o.ewma_decay <= Duration::zero()) fail("balancer.ewma_decay must be > 0");
  Validate(o.aperture);
}

SinkProvider BalancerProvider(const BalancerOptions& o) {
  switch (o.kind) {
    case BalancerKind::kHeap:
      return HeapBalancerProvider();
    case BalancerKind::kP2C:
      return P2CBalancerProvider(o.max_effort);
    case BalancerKind::kP2CPeakEwma:
      return PeakEwmaBalancerProvider(o.max_effort, o.ewma_decay);
    case BalancerKind::kRoundRobin:
      return RoundRobinBalancerProvider();
    case BalancerKind::kAperture:
      return ApertureProvider(o);
  }
  throw Error(make_error_code(Errc::kInvalidArgument), "unknown balancer kind");
}

}  // namespace scales
