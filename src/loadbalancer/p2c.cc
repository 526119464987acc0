#include "scales/loadbalancer/p2c.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "scales/core/runtime.h"

namespace scales {

P2CBalancerSink::P2CBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory, int max_effort)
    : LoadBalancerSink(ctx, std::move(endpoint_factory)),
      max_effort_(std::max(max_effort, 1)) {}

BalancerNode& P2CBalancerSink::PickTwo() {
  const auto& all = nodes();
  const uint64_t size = all.size();
  if (size == 1) return *all[0];
  Random& random = loop_.random();
  const uint64_t a = random.Uniform(size);
  uint64_t b = random.Uniform(size - 1);
  if (b >= a) ++b;  // distinct from a, uniform over the others
  BalancerNode& first = *all[a];
  BalancerNode& second = *all[b];
  const bool first_healthy = Healthy(first);
  if (first_healthy != Healthy(second)) return first_healthy ? first : second;
  if (!first_healthy) {
    const int first_rank = PanicRank(first);
    const int second_rank = PanicRank(second);
    if (first_rank != second_rank) return first_rank > second_rank ? first : second;
  }
  return Load(second) < Load(first) ? second : first;
}

BalancerNode& P2CBalancerSink::PickNode() {
  BalancerNode* n = &PickTwo();
  if (Healthy(*n)) return *n;
  // Too many nodes down: after max_effort picks, panic and use the best pick seen, a Busy
  // node (it may still answer) before a Closed one.
  BalancerNode* best = n;
  for (int effort = 1; effort < max_effort_; ++effort) {
    n = &PickTwo();
    if (Healthy(*n)) return *n;
    if (PanicRank(*n) > PanicRank(*best)) best = n;
  }
  return *best;
}

// --- PeakEwmaBalancerSink -------------------------------------------------------------------

PeakEwmaBalancerSink::PeakEwmaBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory,
                                           int max_effort, Duration decay)
    : P2CBalancerSink(ctx, std::move(endpoint_factory), max_effort),
      decay_ns_(static_cast<double>(std::max(std::chrono::duration_cast<std::chrono::nanoseconds>(decay).count(),
                                             int64_t{1}))) {}

void PeakEwmaBalancerSink::Observe(Metric& m, double rtt_ns) {
  const TimePoint now = loop_.Now();
  const double dt = static_cast<double>(
      std::max<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now - m.stamp).count(), 0));
  m.stamp = now;
  if (rtt_ns > m.cost) {
    m.cost = rtt_ns;  // peak sensitive: a slower round trip counts in full at once
  } else {
    const double w = std::exp(-dt / decay_ns_);
    m.cost = m.cost * w + rtt_ns * (1.0 - w);
  }
}

double PeakEwmaBalancerSink::Cost(const BalancerNode& n) {
  auto it = metrics_.find(&n);
  if (it == metrics_.end()) return 0;
  Observe(it->second, 0);
  return it->second.cost;
}

double PeakEwmaBalancerSink::Load(const BalancerNode& n) {
  const double cost = Cost(n);
  const double pending = static_cast<double>(n.load);
  if (cost == 0 && n.load != 0) return kPenalty + pending;
  return cost * (pending + 1);
}

void PeakEwmaBalancerSink::OnNodeRemoved(BalancerNode& n) { metrics_.erase(&n); }

void PeakEwmaBalancerSink::OnRequestRouted(BalancerNode& n, SinkStack& stack) {
  metrics_[&n].started.emplace_back(&stack, loop_.Now());
}

void PeakEwmaBalancerSink::OnResponse(BalancerNode& n, SinkStack& stack) {
  auto it = metrics_.find(&n);
  if (it == metrics_.end()) return;  // the node left the server set
  Metric& m = it->second;
  auto s = std::find_if(m.started.begin(), m.started.end(), [&](const auto& p) { return p.first == &stack; });
  if (s == m.started.end()) return;
  const double rtt = static_cast<double>(
      std::max<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(loop_.Now() - s->second).count(), 0));
  *s = m.started.back();
  m.started.pop_back();
  Observe(m, rtt);
}

namespace {
// The providers reject what Validate(BalancerOptions) rejects (the sinks would clamp it).
void ValidateP2C(int max_effort, Duration decay) {
  BalancerOptions o;
  o.max_effort = max_effort;
  o.ewma_decay = decay;
  Validate(o);
}
}  // namespace

SinkProvider P2CBalancerProvider(int max_effort) {
  ValidateP2C(max_effort, BalancerOptions{}.ewma_decay);
  return SinkProvider{std::string(roles::kLoadBalancer), "p2c-balancer",
                      [max_effort](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                        return std::make_shared<P2CBalancerSink>(ctx, std::move(next), max_effort);
                      },
                      {{"max_effort", SettingText(max_effort)}}};
}

SinkProvider PeakEwmaBalancerProvider(int max_effort, Duration decay) {
  ValidateP2C(max_effort, decay);
  SinkProvider p{std::string(roles::kLoadBalancer), "p2c-ewma-balancer",
                 [max_effort, decay](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<PeakEwmaBalancerSink>(ctx, std::move(next), max_effort, decay);
                 }};
  p.settings = {{"max_effort", SettingText(max_effort)}, {"decay", SettingText(decay)}};
  return p;
}

}  // namespace scales
