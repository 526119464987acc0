#pragma once
// Round robin (Finagle's roundRobin): cycles through the nodes in server-set order, skipping
// nodes that are not healthy. When no node is healthy it panics: the next node in the cycle
// is used anyway and scales_lb_panic is incremented.
//
// Thread safety: one balancer per event loop; all calls on that loop.

#include <cstddef>
#include <string_view>

#include "scales/loadbalancer/heap_balancer.h"

namespace scales {

class RoundRobinBalancerSink final : public LoadBalancerSink {
 public:
  RoundRobinBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory);
  std::string_view name() const override { return "round-robin-balancer"; }

 protected:
  void OnNodeAdded(BalancerNode&) override {}
  void OnNodeRemoved(BalancerNode&) override {}
  BalancerNode& PickNode() override;
  void OnLoadChanged(BalancerNode&, bool) override {}

 private:
  size_t next_ = 0;  // position of the next node to try (modulo the node count)
};

// Provider (role "loadbalancer").
SinkProvider RoundRobinBalancerProvider();

}  // namespace scales
