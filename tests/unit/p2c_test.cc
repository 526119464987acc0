// P2CBalancerSink and PeakEwmaBalancerSink over fake endpoint sinks and a StaticServerSet, on
// a manual clock with the loop's seeded Random: spread over idle nodes, avoidance of a loaded
// node, latency awareness of peak EWMA, panic mode, and exactly-once completion throughout.
// Also BalancerKind parsing, BalancerOptions validation and the providers per kind.

#include "scales/loadbalancer/p2c.h"

#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scales/core/error.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"
#include "scales/http/client.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/balancer_fixture.h"
#include "support/fake_sinks.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;

Endpoint Ep(int i) { return Endpoint{"10.0.1." + std::to_string(i + 1), 9090}; }

ServerSet::Members Eps(int n) {
  ServerSet::Members m;
  for (int i = 0; i < n; ++i) m.push_back(Ep(i));
  return m;
}

class P2CTest : public test::BalancerFixture<> {
 protected:
  template <class Balancer, class... Args>
  std::shared_ptr<Balancer> Build(int nodes, Args... args) {
    auto balancer = std::make_shared<Balancer>(MakeBalancerContext(Eps(nodes)), factory_.AsFactory(), args...);
    WireAndOpen(balancer);
    EXPECT_EQ(factory_.count(), static_cast<size_t>(nodes));
    return balancer;
  }

  FakeTransport& Node(int i) { return *factory_.LatestFor(Ep(i)); }

  // Answers the newest request held by node i.
  void ReplyNewest(int i) {
    ASSERT_GT(Node(i).in_flight(), 0u);
    ASSERT_TRUE(Node(i).Reply(Node(i).in_flight() - 1, i));
    env_.Run();
  }
};

TEST_F(P2CTest, SequentialRequestsSpreadEvenlyOverIdleNodes) {
  Build<P2CBalancerSink>(3);
  std::vector<int> count(3, 0);
  for (int k = 0; k < 3000; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    ++count[static_cast<size_t>(n)];
    ReplyNewest(n);
  }
  for (int c : count) {
    EXPECT_GT(c, 850);
    EXPECT_LT(c, 1150);
  }
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 0);
  EXPECT_EQ(calls_.completed(), 3000u);
}

TEST_F(P2CTest, PicksTwoDistinctNodes) {
  // With two nodes the pair is always both of them: the less loaded one always wins.
  Build<P2CBalancerSink>(2);
  for (int k = 0; k < 200; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    if (k % 2 == 1) {
      EXPECT_EQ(Node(0).in_flight(), 1u);
      EXPECT_EQ(Node(1).in_flight(), 1u);
      ReplyNewest(0);
      ReplyNewest(1);
    }
  }
}

TEST_F(P2CTest, LoadedNodeReceivesFewNewRequests) {
  auto lb = Build<P2CBalancerSink>(3);
  // Park five requests on node 0, then answer the ones that landed elsewhere.
  while (Node(0).in_flight() < 5) ASSERT_GE(StartOne(), 0);
  for (int i = 1; i < 3; ++i) {
    while (Node(i).in_flight() > 0) ReplyNewest(i);
  }
  const size_t before = Node(0).total_requests();
  std::vector<int> count(3, 0);
  for (int k = 0; k < 300; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    ++count[static_cast<size_t>(n)];
    if (n != 0) ReplyNewest(n);
  }
  // Node 0 can only win a pair against a node with at least as much load: never here.
  EXPECT_EQ(Node(0).total_requests(), before);
  EXPECT_LT(count[0], 15);
  EXPECT_GT(count[1], 100);
  EXPECT_GT(count[2], 100);
  EXPECT_EQ(lb->nodes()[0]->load, 5);
}

TEST_F(P2CTest, UnhealthyNodeLosesToAHealthyOne) {
  Build<P2CBalancerSink>(3);
  Node(1).set_status(SinkStatus::kClosed);
  for (int k = 0; k < 300; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    ASSERT_NE(n, 1);
    ReplyNewest(n);
  }
  // Every pair holds a healthy node: no panic.
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 0);
}

TEST_F(P2CTest, PanicsWhenMostNodesAreDown) {
  Build<P2CBalancerSink>(3, 4);
  Node(0).set_status(SinkStatus::kClosed);
  Node(2).set_status(SinkStatus::kBusy);
  std::vector<int> count(3, 0);
  const int kRequests = 1620;
  for (int k = 0; k < kRequests; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0) << "every request is dispatched";
    ++count[static_cast<size_t>(n)];
    ReplyNewest(n);
  }
  // A pick misses node 1 with probability 1/3; four misses in a row: 1/81 (about 20 here).
  const int64_t panics = env_.CounterValue("scales_lb_panic");
  EXPECT_GT(panics, 5);
  EXPECT_LT(panics, 50);
  EXPECT_EQ(count[0] + count[2], panics);
  EXPECT_EQ(count[1], kRequests - panics);
}

TEST_F(P2CTest, PanicsWhenAllNodesAreDownAndStillDispatches) {
  Build<P2CBalancerSink>(3, 2);
  for (int i = 0; i < 3; ++i) Node(i).set_status(SinkStatus::kClosed);
  for (int k = 0; k < 30; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    ReplyNewest(n);
  }
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 30);
  EXPECT_EQ(calls_.completed(), 30u);
  for (size_t c = 0; c < calls_.size(); ++c) EXPECT_FALSE(calls_[c].error) << calls_[c].error.message();
}

TEST_F(P2CTest, SingleNodeIsAlwaysUsed) {
  Build<P2CBalancerSink>(1);
  for (int k = 0; k < 3; ++k) ASSERT_EQ(StartOne(), 0);
  EXPECT_EQ(Node(0).in_flight(), 3u);
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 0);
  Node(0).set_status(SinkStatus::kClosed);
  ASSERT_EQ(StartOne(), 0);
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 1);
}

TEST_F(P2CTest, FailuresAndTimeoutsReleaseTheLoad) {
  auto lb = Build<P2CBalancerSink>(2);
  for (int k = 0; k < 6; ++k) calls_.Start(*dispatcher_, milliseconds(100));
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 3u);
  EXPECT_EQ(Node(1).in_flight(), 3u);
  ASSERT_TRUE(Node(0).Fail(0, make_error_code(Errc::kServerError)));
  env_.Run();
  EXPECT_EQ(lb->nodes()[0]->load, 2);
  env_.Advance(milliseconds(100));
  for (auto& n : lb->nodes()) EXPECT_EQ(n->load, 0);
  EXPECT_EQ(calls_.completed(), 6u);
}

// --- Peak EWMA ------------------------------------------------------------------------------

TEST_F(P2CTest, EwmaSlowNodeReceivesASmallShare) {
  auto lb = Build<PeakEwmaBalancerSink>(3, 4, seconds(10));
  std::vector<int> count(3, 0);
  for (int k = 0; k < 600; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    ++count[static_cast<size_t>(n)];
    env_.Advance(n == 2 ? milliseconds(500) : milliseconds(2));
    ReplyNewest(n);
  }
  EXPECT_LT(count[2], 30) << count[0] << " " << count[1] << " " << count[2];
  EXPECT_GT(count[0], 200);
  EXPECT_GT(count[1], 200);
  EXPECT_GT(lb->Cost(*lb->nodes()[2]), lb->Cost(*lb->nodes()[0]) * 10);
}

TEST_F(P2CTest, EwmaCostIsPeakSensitiveAndDecays) {
  auto lb = Build<PeakEwmaBalancerSink>(1, 4, seconds(10));
  const BalancerNode& node = *lb->nodes()[0];
  EXPECT_EQ(lb->Cost(node), 0);
  EXPECT_EQ(lb->Load(node), 0);
  ASSERT_EQ(StartOne(), 0);
  // No history and a pending request: the penalty.
  EXPECT_GE(lb->Load(node), PeakEwmaBalancerSink::kPenalty);
  env_.Advance(milliseconds(100));
  ReplyNewest(0);
  EXPECT_NEAR(lb->Cost(node), 100e6, 1);
  // Reads decay it: after tau, by e.
  env_.Advance(seconds(10));
  EXPECT_NEAR(lb->Cost(node), 100e6 / std::exp(1.0), 1e3);
  // A faster sample is averaged in.
  const double before = lb->Cost(node);
  ASSERT_EQ(StartOne(), 0);
  env_.Advance(milliseconds(10));
  ReplyNewest(0);
  const double after = lb->Cost(node);
  EXPECT_LT(after, before);
  EXPECT_GT(after, 10e6);
  // A slower sample resets the cost to it at once.
  ASSERT_EQ(StartOne(), 0);
  env_.Advance(milliseconds(300));
  ReplyNewest(0);
  EXPECT_NEAR(lb->Cost(node), 300e6, 1);
  // Load = cost x (pending + 1).
  ASSERT_EQ(StartOne(), 0);
  ASSERT_EQ(StartOne(), 0);
  EXPECT_NEAR(lb->Load(node), 3 * 300e6, 1e3);
}

TEST_F(P2CTest, EwmaAvoidsANodeWithPendingRequestsAndNoHistory) {
  auto lb = Build<PeakEwmaBalancerSink>(2);
  int first = StartOne();
  ASSERT_GE(first, 0);
  // The other node (no history, nothing pending: load 0) takes the next one; a node with a
  // history is preferred to one without that has pending requests.
  EXPECT_EQ(StartOne(), 1 - first);
  env_.Advance(milliseconds(50));
  ReplyNewest(1 - first);
  EXPECT_GE(lb->Load(*lb->nodes()[static_cast<size_t>(first)]), PeakEwmaBalancerSink::kPenalty);
  for (int k = 0; k < 3; ++k) EXPECT_EQ(StartOne(), 1 - first);
}

TEST_F(P2CTest, EwmaPanicsWhenAllNodesAreDown) {
  Build<PeakEwmaBalancerSink>(2, 3, seconds(1));
  Node(0).set_status(SinkStatus::kClosed);
  Node(1).set_status(SinkStatus::kClosed);
  for (int k = 0; k < 4; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    env_.Advance(milliseconds(5));
    ReplyNewest(n);
  }
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 4);
}

// --- Names, options, providers --------------------------------------------------------------

TEST(BalancerOptionsTest, ParsesNames) {
  EXPECT_EQ(ParseBalancerKind("heap"), BalancerKind::kHeap);
  EXPECT_EQ(ParseBalancerKind("p2c"), BalancerKind::kP2C);
  EXPECT_EQ(ParseBalancerKind("p2c-ewma"), BalancerKind::kP2CPeakEwma);
  EXPECT_EQ(ParseBalancerKind("p2cPeakEwma"), BalancerKind::kP2CPeakEwma);
  EXPECT_EQ(ParseBalancerKind("round-robin"), BalancerKind::kRoundRobin);
  EXPECT_EQ(ParseBalancerKind("roundRobin"), BalancerKind::kRoundRobin);
  EXPECT_EQ(ParseBalancerKind("aperture"), BalancerKind::kAperture);
  EXPECT_EQ(ParseBalancerKind(""), std::nullopt);
  EXPECT_EQ(ParseBalancerKind("P2C"), std::nullopt);
  EXPECT_EQ(ParseBalancerKind("least-loaded"), std::nullopt);
  for (auto kind : {BalancerKind::kHeap, BalancerKind::kP2C, BalancerKind::kP2CPeakEwma,
                    BalancerKind::kRoundRobin, BalancerKind::kAperture}) {
    EXPECT_EQ(ParseBalancerKind(BalancerKindName(kind)), kind);
  }
}

TEST(BalancerOptionsTest, Validates) {
  BalancerOptions o;
  EXPECT_EQ(o.kind, BalancerKind::kAperture);
  EXPECT_EQ(o.max_effort, 4);
  EXPECT_EQ(o.ewma_decay, seconds(10));
  EXPECT_NO_THROW(Validate(o));
  auto expect_invalid = [](const BalancerOptions& bad) {
    try {
      Validate(bad);
      ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), make_error_code(Errc::kInvalidArgument));
    }
  };
  BalancerOptions bad = o;
  bad.max_effort = 0;
  expect_invalid(bad);
  bad = o;
  bad.ewma_decay = Duration::zero();
  expect_invalid(bad);
  bad.ewma_decay = -seconds(1);
  expect_invalid(bad);
}

// The providers reject what Validate rejects, naming the setting, as the aperture's, failure
// accrual's and resurrector's providers do: a stack built with them directly (not through the
// client's options) silently ran max_effort 0 as 1 and a zero or negative decay as 1 ns.
TEST(BalancerOptionsTest, ProvidersValidateTheirSettings) {
  auto expect_invalid = [](const std::function<void()>& make, const std::string& field) {
    try {
      make();
      ADD_FAILURE() << "no exception for " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), make_error_code(Errc::kInvalidArgument));
      EXPECT_THAT(e.what(), ::testing::HasSubstr(field));
    }
  };
  expect_invalid([] { P2CBalancerProvider(0); }, "max_effort");
  expect_invalid([] { PeakEwmaBalancerProvider(-1); }, "max_effort");
  expect_invalid([] { PeakEwmaBalancerProvider(4, Duration::zero()); }, "ewma_decay");
  BalancerOptions bad;
  bad.kind = BalancerKind::kP2C;
  bad.max_effort = 0;
  expect_invalid([&] { BalancerProvider(bad); }, "max_effort");
  EXPECT_NO_THROW(P2CBalancerProvider(1));
  EXPECT_NO_THROW(PeakEwmaBalancerProvider(1, std::chrono::nanoseconds(1)));
}

TEST(BalancerOptionsTest, ProviderPerKind) {
  BalancerOptions o;
  EXPECT_EQ(BalancerProvider(o).name, "aperture-balancer");
  o.kind = BalancerKind::kHeap;
  EXPECT_EQ(BalancerProvider(o).name, "heap-balancer");
  o.kind = BalancerKind::kP2C;
  EXPECT_EQ(BalancerProvider(o).name, "p2c-balancer");
  o.kind = BalancerKind::kP2CPeakEwma;
  EXPECT_EQ(BalancerProvider(o).name, "p2c-ewma-balancer");
  o.kind = BalancerKind::kRoundRobin;
  EXPECT_EQ(BalancerProvider(o).name, "round-robin-balancer");
  for (auto kind : {BalancerKind::kHeap, BalancerKind::kP2C, BalancerKind::kP2CPeakEwma, BalancerKind::kRoundRobin,
                    BalancerKind::kAperture}) {
    o.kind = kind;
    EXPECT_EQ(BalancerProvider(o).role, roles::kLoadBalancer);
  }
}

TEST(BalancerOptionsTest, ClientsDefaultToApertureAndFollowTheirOptions) {
  auto balancer_name = [](const SinkStackSpec& spec) {
    for (const auto& p : spec.providers()) {
      if (p.role == roles::kLoadBalancer) return p.name;
    }
    return std::string();
  };
  http::HttpOptions h;
  thrift::ThriftOptions t;
  thriftmux::ThriftMuxOptions m;
  EXPECT_EQ(balancer_name(http::HttpClientBuilder::DefaultStack(h)), "aperture-balancer");
  EXPECT_EQ(balancer_name(thrift::DefaultThriftStack(t)), "aperture-balancer");
  EXPECT_EQ(balancer_name(thriftmux::DefaultThriftMuxStack(m)), "aperture-balancer");
  h.balancer.kind = BalancerKind::kP2C;
  t.balancer.kind = BalancerKind::kP2CPeakEwma;
  m.balancer.kind = BalancerKind::kRoundRobin;
  EXPECT_EQ(balancer_name(http::HttpClientBuilder::DefaultStack(h)), "p2c-balancer");
  EXPECT_EQ(balancer_name(thrift::DefaultThriftStack(t)), "p2c-ewma-balancer");
  EXPECT_EQ(balancer_name(thriftmux::DefaultThriftMuxStack(m)), "round-robin-balancer");
  t.balancer.max_effort = 0;
  EXPECT_THROW(thrift::Validate(t), Error);
  m.balancer.ewma_decay = Duration::zero();
  EXPECT_THROW(thriftmux::Validate(m), Error);
}

}  // namespace
}  // namespace scales
