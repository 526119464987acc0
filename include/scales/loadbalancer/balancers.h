#pragma once
// Choosing a load balancer by name or by options: BalancerKind, BalancerOptions and the
// provider for each kind (heap, P2C least loaded, P2C peak EWMA, round robin, aperture).

#include <chrono>
#include <optional>
#include <string_view>

#include "scales/core/clock.h"
#include "scales/core/provider.h"
#include "scales/loadbalancer/aperture.h"

namespace scales {

enum class BalancerKind {
  kHeap,         // "heap": least loaded from a min-heap (HeapBalancerSink)
  kP2C,          // "p2c": power of two choices, least outstanding requests
  kP2CPeakEwma,  // "p2c-ewma" / "p2cPeakEwma": power of two choices, peak EWMA of latency
  kRoundRobin,   // "round-robin" / "roundRobin"
  kAperture,     // "aperture"
};

struct BalancerOptions {
  BalancerKind kind = BalancerKind::kAperture;
  // P2C (plain and peak EWMA): picks tried to find a healthy node before panicking (using
  // any node and counting scales_lb_panic); round robin tries a whole cycle instead. >= 1.
  int max_effort = 4;
  // P2C peak EWMA: decay time (tau) of the latency average. > 0.
  Duration ewma_decay = std::chrono::seconds(10);
  ApertureOptions aperture;  // kAperture (scales/loadbalancer/aperture.h)
};

// "heap", "p2c", "p2c-ewma" (or "p2cPeakEwma"), "round-robin" (or "roundRobin"), "aperture";
// nullopt for anything else.
std::optional<BalancerKind> ParseBalancerKind(std::string_view name);
// The canonical name of `kind` ("heap", "p2c", "p2c-ewma", "round-robin", "aperture").
std::string_view BalancerKindName(BalancerKind kind);

// Throws scales::Error(kInvalidArgument) when max_effort < 1 or ewma_decay <= 0.
void Validate(const BalancerOptions& o);

// The provider (role "loadbalancer") of the balancer `o` selects.
SinkProvider BalancerProvider(const BalancerOptions& o);

// The aperture balancer's provider (src/loadbalancer/aperture.cc).
SinkProvider ApertureProvider(const BalancerOptions& o);

}  // namespace scales
