#pragma once
// Power of two choices (Finagle's P2C): pick two distinct nodes uniformly at random with the
// loop's seeded Random; if exactly one is healthy it wins, else the lower load wins (a tie
// goes to the first pick). P2CBalancerSink's load is the node's outstanding requests;
// PeakEwmaBalancerSink's is cost x (pending + 1) with cost a peak-sensitive EWMA of the
// round-trip latency.
//
// Panic mode: up to max_effort picks are tried to find a healthy node; if none is, the last
// pick is used anyway and scales_lb_panic is incremented. A single node is always used (a
// panic when it is unhealthy).
//
// Thread safety: one balancer per event loop; all calls on that loop.

#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "scales/core/clock.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/heap_balancer.h"

namespace scales {

class P2CBalancerSink : public LoadBalancerSink {
 public:
  P2CBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory, int max_effort = 4);
  std::string_view name() const override { return "p2c-balancer"; }

  // The load a pick compares (outstanding requests here).
  virtual double Load(const BalancerNode& n) { return static_cast<double>(n.load); }

 protected:
  void OnNodeAdded(BalancerNode&) override {}
  void OnNodeRemoved(BalancerNode&) override {}
  BalancerNode& PickNode() override;
  void OnLoadChanged(BalancerNode&, bool) override {}

 private:
  // Two distinct nodes at random; the better one.
  BalancerNode& PickTwo();

  int max_effort_;
};

// P2C over Finagle's Peak EWMA load: a round trip (from the request reaching the balancer to
// its response, on the loop's clock) larger than the current cost resets the cost to it;
// otherwise cost = cost * w + rtt * (1 - w) with w = exp(-dt / decay) and dt the time since
// the last update. Every read decays the cost (as a sample of 0). A node with no history
// (cost 0) and pending requests has load kPenalty + pending.
class PeakEwmaBalancerSink final : public P2CBalancerSink {
 public:
  // Finagle's Long.MaxValue >> 16, in nanoseconds.
  static constexpr double kPenalty = static_cast<double>(INT64_MAX >> 16);

  PeakEwmaBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory, int max_effort = 4,
                       Duration decay = std::chrono::seconds(10));
  std::string_view name() const override { return "p2c-ewma-balancer"; }

  double Load(const BalancerNode& n) override;
  // For tests: the decayed cost of `n` in nanoseconds (0 when it has no history).
  double Cost(const BalancerNode& n);

 protected:
  void OnNodeRemoved(BalancerNode& n) override;
  void OnRequestRouted(BalancerNode& n, SinkStack& stack) override;
  void OnResponse(BalancerNode& n, SinkStack& stack) override;

 private:
  struct Metric {
    double cost = 0;  // nanoseconds
    TimePoint stamp{};
    std::vector<std::pair<const SinkStack*, TimePoint>> started;  // outstanding requests
  };
  void Observe(Metric& m, double rtt_ns);

  double decay_ns_;
  std::unordered_map<const BalancerNode*, Metric> metrics_;
};

// Providers (role "loadbalancer"). Throw scales::Error(kInvalidArgument) naming the setting
// when max_effort < 1 or decay <= 0 (as Validate(BalancerOptions) does).
SinkProvider P2CBalancerProvider(int max_effort = 4);
SinkProvider PeakEwmaBalancerProvider(int max_effort = 4, Duration decay = std::chrono::seconds(10));

}  // namespace scales
