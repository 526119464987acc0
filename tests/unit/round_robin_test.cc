// RoundRobinBalancerSink over fake endpoint sinks and a StaticServerSet: cycling in
// server-set order, skipping unhealthy nodes, panic mode when none is healthy, joins and
// leaves, and exactly-once completion throughout.

#include "scales/loadbalancer/round_robin.h"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"
#include "support/balancer_fixture.h"
#include "support/fake_sinks.h"

namespace scales {
namespace {

using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;

Endpoint Ep(int i) { return Endpoint{"10.0.2." + std::to_string(i + 1), 9090}; }

ServerSet::Members Eps(std::initializer_list<int> ids) {
  ServerSet::Members m;
  for (int i : ids) m.push_back(Ep(i));
  return m;
}

class RoundRobinTest : public test::BalancerFixture<> {
 protected:
  void Build(ServerSet::Members members) {
    const size_t n = members.size();
    WireAndOpen(std::make_shared<RoundRobinBalancerSink>(MakeBalancerContext(std::move(members)),
                                                         factory_.AsFactory()));
    EXPECT_EQ(factory_.count(), n);
  }

  FakeTransport* Node(int i) { return factory_.LatestFor(Ep(i)); }

  // Starts `count` calls (answered at once when `reply`) and returns the endpoint index each
  // went to (-1: none).
  std::vector<int> Run(int count, int nodes, bool reply = true) {
    std::vector<int> order;
    for (int k = 0; k < count; ++k) {
      std::vector<size_t> before;
      for (int i = 0; i < nodes; ++i) before.push_back(Node(i) ? Node(i)->total_requests() : 0);
      calls_.Start(*dispatcher_);
      env_.Run();
      int chosen = -1;
      for (int i = 0; i < nodes; ++i) {
        if (Node(i) && Node(i)->total_requests() > before[static_cast<size_t>(i)]) chosen = i;
      }
      order.push_back(chosen);
      if (reply && chosen >= 0) {
        Node(chosen)->Reply(Node(chosen)->in_flight() - 1, chosen);
        env_.Run();
      }
    }
    return order;
  }
};

TEST_F(RoundRobinTest, CyclesInServerSetOrder) {
  Build(Eps({0, 1, 2}));
  EXPECT_EQ(Run(7, 3), (std::vector<int>{0, 1, 2, 0, 1, 2, 0}));
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 0);
}

TEST_F(RoundRobinTest, IgnoresLoad) {
  Build(Eps({0, 1, 2}));
  // Outstanding requests do not change the order.
  EXPECT_EQ(Run(6, 3, /*reply=*/false), (std::vector<int>{0, 1, 2, 0, 1, 2}));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Node(i)->in_flight(), 2u);
}

TEST_F(RoundRobinTest, SkipsUnhealthyNodes) {
  Build(Eps({0, 1, 2}));
  Node(1)->set_status(SinkStatus::kClosed);
  EXPECT_EQ(Run(5, 3), (std::vector<int>{0, 2, 0, 2, 0}));
  Node(1)->set_status(SinkStatus::kBusy);
  Node(2)->set_status(SinkStatus::kClosed);
  EXPECT_EQ(Run(3, 3), (std::vector<int>{0, 0, 0}));
  // Recovered nodes rejoin the cycle.
  Node(1)->set_status(std::nullopt);
  Node(2)->set_status(std::nullopt);
  EXPECT_EQ(Run(4, 3), (std::vector<int>{1, 2, 0, 1}));
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 0);
}

TEST_F(RoundRobinTest, PanicsWhenNoNodeIsHealthyAndStillDispatches) {
  Build(Eps({0, 1, 2}));
  for (int i = 0; i < 3; ++i) Node(i)->set_status(SinkStatus::kClosed);
  EXPECT_EQ(Run(4, 3), (std::vector<int>{0, 1, 2, 0}));
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 4);
  for (size_t c = 0; c < calls_.size(); ++c) {
    EXPECT_EQ(calls_[c].completions, 1);
    EXPECT_FALSE(calls_[c].error) << calls_[c].error.message();
  }
}

TEST_F(RoundRobinTest, FollowsJoinsAndLeaves) {
  Build(Eps({0, 1}));
  EXPECT_EQ(Run(3, 3), (std::vector<int>{0, 1, 0}));
  set_->Update(Eps({0, 1, 2}));
  env_.Run();
  ASSERT_NE(Node(2), nullptr);
  EXPECT_EQ(Run(4, 3), (std::vector<int>{1, 2, 0, 1}));
  set_->Update(Eps({0, 2}));
  env_.Run();
  std::vector<int> order = Run(4, 3);
  for (int n : order) EXPECT_NE(n, 1);
  EXPECT_NE(order[0], order[1]);
  EXPECT_EQ(order[0], order[2]);
  EXPECT_EQ(order[1], order[3]);
}

}  // namespace
}  // namespace scales
