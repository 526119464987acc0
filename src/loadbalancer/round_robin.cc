#include "scales/loadbalancer/round_robin.h"

#include <memory>
#include <string>

namespace scales {

RoundRobinBalancerSink::RoundRobinBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory)
    : LoadBalancerSink(ctx, std::move(endpoint_factory)) {}

BalancerNode& RoundRobinBalancerSink::PickNode() {
  const auto& all = nodes();
  const size_t size = all.size();
  const size_t start = next_ % size;
  for (size_t k = 0; k < size; ++k) {
    const size_t i = (start + k) % size;
    if (Healthy(*all[i])) {
      next_ = i + 1;
      return *all[i];
    }
  }
  // No node is healthy (panic): the next Busy one in the cycle (it may still answer), else
  // the next one.
  for (size_t k = 0; k < size; ++k) {
    const size_t i = (start + k) % size;
    if (PanicRank(*all[i]) > 0) {
      next_ = i + 1;
      return *all[i];
    }
  }
  next_ = start + 1;
  return *all[start];
}

SinkProvider RoundRobinBalancerProvider() {
  return SinkProvider{std::string(roles::kLoadBalancer), "round-robin-balancer",
                      [](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                        return std::make_shared<RoundRobinBalancerSink>(ctx, std::move(next));
                      }};
}

}  // namespace scales
