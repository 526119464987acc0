// Every balancer honours CallProperties::avoid_endpoints (set by the retry and backup-request
// sinks): a request that asks to avoid endpoints goes elsewhere while another node exists,
// even when the avoided node is the one the policy prefers, and still goes to the avoided node
// when it is the only one; and in panic mode every balancer prefers a Busy node over a Closed
// one. Fake endpoint sinks, manual clock, seeded randomness.

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/balancer_fixture.h"
#include "support/fake_sinks.h"
#include "scales/core/forwarding_sink.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/resilience/backup_request.h"
#include "scales/resilience/retry.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;

Endpoint Ep(int i) { return Endpoint{"10.0.1." + std::to_string(i + 1), 9090}; }

// Stands for the retry sink: asks every request to avoid the endpoints in `avoid`.
class AvoidingSink final : public ForwardingSink {
 public:
  explicit AvoidingSink(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    msg.properties.avoid_endpoints = avoid;
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  std::string_view name() const override { return "avoiding"; }
  std::vector<std::string> avoid;
};

class AvoidEndpointTest : public test::BalancerFixture<::testing::TestWithParam<BalancerKind>> {
 protected:
  void Build(int nodes) {
    ServerSet::Members members;
    for (int i = 0; i < nodes; ++i) members.push_back(Ep(i));
    BalancerOptions o;
    o.kind = GetParam();
    // Aperture: start with every node in the aperture so the test sees each of them.
    o.aperture.min_size = static_cast<size_t>(nodes);
    SinkPtr balancer = BalancerProvider(o).create(MakeBalancerContext(std::move(members)), factory_.AsFactory());
    auto avoiding = std::make_shared<AvoidingSink>(balancer);
    avoiding_ = avoiding.get();
    WireAndOpen(balancer, avoiding);
  }

  FakeTransport* Node(int i) { return factory_.LatestFor(Ep(i)); }

  // Sends `count` requests one after another, each answered at once (every node stays idle, so
  // least-loaded policies would tie-break onto an avoided node often without the avoidance);
  // returns the requests each node received.
  std::vector<int> SendAnswered(int nodes, int count) {
    std::vector<int> hits(static_cast<size_t>(nodes), 0);
    for (int k = 0; k < count; ++k) {
      int n = StartOne();
      EXPECT_GE(n, 0);
      if (n < 0) break;
      ++hits[static_cast<size_t>(n)];
      EXPECT_TRUE(Node(n)->Reply(0, n));
      env_.Run();
    }
    return hits;
  }

  AvoidingSink* avoiding_ = nullptr;  // owned by the fixture (top_)
};

TEST_P(AvoidEndpointTest, AvoidedNodeGetsNothingWhileOthersExist) {
  constexpr int kNodes = 3;
  Build(kNodes);
  avoiding_->avoid = {Ep(1).ToString()};
  const std::vector<int> hits = SendAnswered(kNodes, 60);
  EXPECT_EQ(hits[1], 0) << BalancerKindName(GetParam());
  EXPECT_GT(hits[0] + hits[2], 0);
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided") > 0, true)
      << "the policy never preferred the avoided node in 60 picks: the test proves nothing";
}

// A request avoiding two of three nodes (a retry after a failed hedge, a retry's backup) goes
// to the third, whichever of the two the policy prefers.
TEST_P(AvoidEndpointTest, EveryAvoidedNodeGetsNothingWhileAnotherExists) {
  constexpr int kNodes = 3;
  Build(kNodes);
  avoiding_->avoid = {Ep(0).ToString(), Ep(2).ToString()};
  const std::vector<int> hits = SendAnswered(kNodes, 60);
  EXPECT_EQ(hits[1], 60) << BalancerKindName(GetParam());
  EXPECT_GT(env_.CounterValue("scales_lb_avoided"), 0)
      << "the policy never preferred an avoided node in 60 picks: the test proves nothing";
  // The node left is loaded: the requests still go there, not to an avoided idle node.
  ASSERT_EQ(StartOne(), 1);
  for (int k = 0; k < 5; ++k) EXPECT_EQ(StartOne(), 1) << BalancerKindName(GetParam());
}

// Every node avoided: the request stays on the policy's pick (as when the only node is avoided).
TEST_P(AvoidEndpointTest, RequestAvoidingEveryNodeStaysOnThePick) {
  constexpr int kNodes = 3;
  Build(kNodes);
  avoiding_->avoid = {Ep(0).ToString(), Ep(1).ToString(), Ep(2).ToString()};
  SendAnswered(kNodes, 30);
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0) << BalancerKindName(GetParam());
}

TEST_P(AvoidEndpointTest, AvoidedNodeIsPreferredWhenItIsTheLeastLoaded) {
  constexpr int kNodes = 2;
  Build(kNodes);
  // Load node 0 with outstanding requests so every policy prefers node 1...
  for (int k = 0; k < 4; ++k) {
    avoiding_->avoid = {Ep(1).ToString()};
    ASSERT_EQ(StartOne(), 0);
  }
  // ... and a request that must avoid node 1 still goes to node 0.
  EXPECT_EQ(Node(0)->in_flight(), 4u);
  EXPECT_EQ(Node(1)->in_flight(), 0u);
  // Without the avoidance the next request goes to idle node 1 (the policy is least loaded
  // or cycling; round robin alternates).
  avoiding_->avoid.clear();
  int n = StartOne();
  if (GetParam() != BalancerKind::kRoundRobin) {
    EXPECT_EQ(n, 1);
  }
}

TEST_P(AvoidEndpointTest, OnlyNodeIsUsedEvenWhenAvoided) {
  Build(1);
  avoiding_->avoid = {Ep(0).ToString()};
  EXPECT_EQ(StartOne(), 0);
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0);
}

TEST_P(AvoidEndpointTest, UnknownEndpointChangesNothing) {
  Build(2);
  avoiding_->avoid = {"10.9.9.9:1"};
  for (int k = 0; k < 4; ++k) ASSERT_GE(StartOne(), 0);
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0);
}

// The avoided node is the only healthy one: the request stays on it rather than going to a
// node known down (it would fail fast, wasting the retry and its budget token). P2C samples
// max_effort (4) random pairs and falls back to a down node when every pair was down: about
// (4/9)^4 = 4 % of pairs here, 1.5 % of its picks (Finagle's bound), with or without
// avoidance. Its retries used to take what the repeated picks gave too: 4.7 % to a down node.
TEST_P(AvoidEndpointTest, HealthyAvoidedNodeBeatsDownOthers) {
  constexpr int kNodes = 3;
  constexpr int kRequests = 1000;
  Build(kNodes);
  Node(1)->set_status(SinkStatus::kClosed);
  Node(2)->set_status(SinkStatus::kClosed);
  avoiding_->avoid = {Ep(0).ToString()};
  const std::vector<int> hits = SendAnswered(kNodes, kRequests);
  const int to_down = hits[1] + hits[2];
  const bool sampled = GetParam() == BalancerKind::kP2C || GetParam() == BalancerKind::kP2CPeakEwma;
  EXPECT_LE(to_down, sampled ? kRequests * 3 / 100 : 0) << BalancerKindName(GetParam());
  // No request was moved off the avoided node: the down ones are P2C's own panic picks, and
  // only they count as panics (not the repeated picks that looked for another node first).
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0) << BalancerKindName(GetParam());
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), to_down) << BalancerKindName(GetParam());
  for (int i = 0; i < kNodes; ++i) Node(i)->set_status(std::nullopt);
}

// Panic mode: with no healthy node, every balancer prefers a Busy node (failure accrual marked
// it dead, but it may still answer) over Closed ones (known down: they would fail fast).
TEST_P(AvoidEndpointTest, PanicPrefersBusyOverClosed) {
  constexpr int kNodes = 3;
  Build(kNodes);
  Node(0)->set_status(SinkStatus::kClosed);
  Node(1)->set_status(SinkStatus::kBusy);
  Node(2)->set_status(SinkStatus::kClosed);
  // P2C looks at max_effort random pairs only (Finagle's bound), so it may miss the Busy node
  // now and then; the others scan every node.
  const bool sampled = GetParam() == BalancerKind::kP2C || GetParam() == BalancerKind::kP2CPeakEwma;
  int to_busy = 0;
  for (int k = 0; k < 40; ++k) {
    int n = StartOne();
    ASSERT_GE(n, 0);
    if (n == 1) ++to_busy;
    if (!sampled) {
      EXPECT_EQ(n, 1) << BalancerKindName(GetParam()) << " pick " << k;
    }
    ASSERT_TRUE(Node(n)->Reply(0, n));
    env_.Run();
  }
  EXPECT_GE(to_busy, sampled ? 36 : 40) << BalancerKindName(GetParam());
  EXPECT_EQ(env_.CounterValue("scales_lb_panic"), 40) << BalancerKindName(GetParam());
  for (int i = 0; i < kNodes; ++i) Node(i)->set_status(std::nullopt);
}

// Panic mode with the Busy node avoided (a retry after it failed): the request stays on it
// rather than moving to a Closed node, which fails fast for sure (wasting the retry and its
// budget token). Avoidance moved it to the least loaded other node, whatever its state.
TEST_P(AvoidEndpointTest, BusyAvoidedNodeBeatsClosedOthers) {
  constexpr int kNodes = 3;
  constexpr int kRequests = 200;
  Build(kNodes);
  Node(0)->set_status(SinkStatus::kClosed);
  Node(1)->set_status(SinkStatus::kBusy);
  Node(2)->set_status(SinkStatus::kClosed);
  avoiding_->avoid = {Ep(1).ToString()};
  const std::vector<int> hits = SendAnswered(kNodes, kRequests);
  const int to_closed = hits[0] + hits[2];
  // P2C's own panic picks miss the Busy node in all max_effort pairs now and then ((1/3)^4).
  const bool sampled = GetParam() == BalancerKind::kP2C || GetParam() == BalancerKind::kP2CPeakEwma;
  EXPECT_LE(to_closed, sampled ? kRequests * 3 / 100 : 0) << BalancerKindName(GetParam());
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0) << BalancerKindName(GetParam());
  for (int i = 0; i < kNodes; ++i) Node(i)->set_status(std::nullopt);
}

// The aperture keeps avoided requests (retries, backups) inside the aperture: another member
// when there is one, else the avoided member itself. Sent to a node outside it, they opened a
// connection there that nothing closed (only members leaving the aperture are reset), so over
// time the client held connections to every endpoint a retry ever went to.
class ApertureAvoidTest : public test::BalancerFixture<::testing::Test> {
 protected:
  void Build(int nodes, size_t min_size) {
    ServerSet::Members members;
    for (int i = 0; i < nodes; ++i) members.push_back(Ep(i));
    BalancerOptions o;
    o.kind = BalancerKind::kAperture;
    o.aperture.min_size = min_size;
    SinkPtr balancer = BalancerProvider(o).create(MakeBalancerContext(std::move(members)), factory_.AsFactory());
    auto avoiding = std::make_shared<AvoidingSink>(balancer);
    avoiding_ = avoiding.get();
    WireAndOpen(balancer, avoiding);
  }
  // Sends and answers `n` requests; returns the nodes they went to.
  std::set<int> Send(int n) {
    std::set<int> to;
    for (int k = 0; k < n; ++k) {
      int i = StartOne();
      EXPECT_GE(i, 0);
      if (i < 0) break;
      to.insert(i);
      EXPECT_TRUE(factory_.LatestFor(Ep(i))->Reply(0, i));
      env_.Run();
    }
    return to;
  }
  AvoidingSink* avoiding_ = nullptr;
};

TEST_F(ApertureAvoidTest, AvoidedRequestsStayInTheAperture) {
  Build(10, 1);
  const std::set<int> member = Send(5);
  ASSERT_EQ(member.size(), 1u) << "one member";
  avoiding_->avoid = {Ep(*member.begin()).ToString()};
  EXPECT_EQ(Send(20), member) << "no request left the aperture of one";
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0);
}

TEST_F(ApertureAvoidTest, AvoidedRequestsGoToAnotherMember) {
  Build(10, 2);
  avoiding_->avoid.clear();
  std::set<int> members;
  for (int k = 0; k < 200 && members.size() < 2; ++k) {
    for (int i : Send(1)) members.insert(i);
  }
  ASSERT_EQ(members.size(), 2u);
  avoiding_->avoid = {Ep(*members.begin()).ToString()};
  EXPECT_EQ(Send(30), std::set<int>{*members.rbegin()}) << "every request went to the other member";
  EXPECT_GT(env_.CounterValue("scales_lb_avoided"), 0);
}

// The retry and backup-request sinks over a real balancer of three nodes: every later attempt
// of a call avoids every endpoint an earlier attempt of it went to, not only the last one.
// dispatcher -> timeout -> retry -> backup -> balancer -> fakes.
class HedgedRetryAvoidTest : public test::BalancerFixture<::testing::TestWithParam<BalancerKind>> {
 protected:
  void Build() {
    BalancerOptions o;
    o.kind = GetParam();
    o.aperture.min_size = 3;  // every node in the aperture
    SinkPtr balancer =
        BalancerProvider(o).create(MakeBalancerContext({Ep(0), Ep(1), Ep(2)}), factory_.AsFactory());
    BackupRequestOptions bo;
    bo.percentile = 0.5;
    bo.max_extra_load = 0.5;
    bo.budget_min_per_sec = 10;  // a reserve of 100 backups: the budget never limits these tests
    bo.refresh_interval = seconds(1);
    auto backup = std::make_shared<BackupRequestSink>(env_.loop(), balancer, bo, BackupReplyOpsFor<int>(), env_.scope);
    RetryOptions ro;
    ro.max_retries = 1;
    auto retry = std::make_shared<RetrySink>(env_.loop(), backup, ro, nullptr, env_.scope);
    WireAndOpen(balancer, retry);
    // Calls answered after 20 ms: the backup delay becomes about 20 ms.
    for (int k = 0; k < 4; ++k) {
      StartIdempotent();
      env_.Advance(milliseconds(20));
      ASSERT_EQ(Busy().size(), 1u);
      ASSERT_TRUE(Member(Busy()[0])->Reply(0, 1));
      env_.Run();
    }
    env_.Advance(bo.refresh_interval);
  }
  size_t StartIdempotent() {
    size_t c = calls_.StartWith([&](CallBase* call) {
      call->message.properties.idempotent = true;
      dispatcher_->Dispatch(call, true);
    });
    env_.Run();
    return c;
  }
  // The members holding a request (each holds at most one here).
  std::vector<int> Busy() {
    std::vector<int> busy;
    for (int i = 0; i < 3; ++i) {
      if (Member(i)->in_flight() > 0) busy.push_back(i);
    }
    return busy;
  }
};

// Both attempts of a hedged call fail: its retry goes to the third node, not to either node
// the hedge used (it avoided only the endpoint of the failure delivered, which is the later
// one's).
TEST_P(HedgedRetryAvoidTest, RetryAfterAFailedHedgeAvoidsBothItsEndpoints) {
  Build();
  for (int round = 0; round < 10; ++round) {
    size_t c = StartIdempotent();
    ASSERT_EQ(Busy().size(), 1u);
    const int first = Busy()[0];
    env_.Advance(milliseconds(30));
    std::vector<int> busy = Busy();
    ASSERT_EQ(busy.size(), 2u) << "the backup was sent to another node";
    const int second = busy[0] == first ? busy[1] : busy[0];
    // Either attempt may fail first; the later failure is the one delivered.
    const int fails_first = round % 2 == 0 ? first : second;
    const int fails_last = round % 2 == 0 ? second : first;
    ASSERT_TRUE(Member(fails_first)->Fail(0, make_error_code(Errc::kNotSent)));
    env_.Run();
    ASSERT_TRUE(Member(fails_last)->Fail(0, make_error_code(Errc::kNotSent)));
    env_.Run();
    busy = Busy();
    ASSERT_EQ(busy.size(), 1u) << "the retry was sent";
    EXPECT_EQ(busy[0], 3 - first - second)
        << BalancerKindName(GetParam()) << " round " << round << ": the retry went to a node the hedge used";
    ASSERT_TRUE(Member(busy[0])->Reply(0, 5));
    env_.Run();
    ASSERT_TRUE(calls_.done(c));
    EXPECT_EQ(calls_[c].value, 5);
  }
}

// The first attempt fails before the delay and its retry goes to another node; the retry's
// backup goes to the third node, not back to the first one (the backup's avoid list replaced
// the retry's instead of extending it).
TEST_P(HedgedRetryAvoidTest, BackupOfARetryAvoidsTheRetrysEndpointsToo) {
  Build();
  for (int round = 0; round < 10; ++round) {
    size_t c = StartIdempotent();
    ASSERT_EQ(Busy().size(), 1u);
    const int first = Busy()[0];
    ASSERT_TRUE(Member(first)->Fail(0, make_error_code(Errc::kNotSent)));
    env_.Run();
    ASSERT_EQ(Busy().size(), 1u) << "the retry was sent";
    const int retried = Busy()[0];
    ASSERT_NE(retried, first);
    env_.Advance(milliseconds(30));
    std::vector<int> busy = Busy();
    ASSERT_EQ(busy.size(), 2u) << "the retry's backup was sent to another node";
    const int backup = busy[0] == retried ? busy[1] : busy[0];
    EXPECT_EQ(backup, 3 - first - retried)
        << BalancerKindName(GetParam()) << " round " << round << ": the backup went back to the failed node";
    ASSERT_TRUE(Member(retried)->Reply(0, 6));
    env_.Run();
    ASSERT_TRUE(calls_.done(c));
    EXPECT_EQ(calls_[c].value, 6);
    EXPECT_EQ(Busy().size(), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Balancers, HedgedRetryAvoidTest,
                         ::testing::Values(BalancerKind::kHeap, BalancerKind::kP2C, BalancerKind::kP2CPeakEwma,
                                           BalancerKind::kRoundRobin, BalancerKind::kAperture),
                         [](const auto& info) {
                           std::string name(BalancerKindName(info.param));
                           std::erase(name, '-');
                           return name;
                         });

// Avoiding every member, a request stays in the aperture (on the pick), though other nodes
// outside it are not avoided.
TEST_F(ApertureAvoidTest, AvoidingEveryMemberStaysInTheAperture) {
  Build(10, 2);
  std::set<int> members;
  for (int k = 0; k < 200 && members.size() < 2; ++k) {
    for (int i : Send(1)) members.insert(i);
  }
  ASSERT_EQ(members.size(), 2u);
  avoiding_->avoid = {Ep(*members.begin()).ToString(), Ep(*members.rbegin()).ToString()};
  EXPECT_EQ(Send(20), members) << "no request left the aperture";
  EXPECT_EQ(env_.CounterValue("scales_lb_avoided"), 0);
}

INSTANTIATE_TEST_SUITE_P(Balancers, AvoidEndpointTest,
                         ::testing::Values(BalancerKind::kHeap, BalancerKind::kP2C, BalancerKind::kP2CPeakEwma,
                                           BalancerKind::kRoundRobin, BalancerKind::kAperture),
                         [](const auto& info) {
                           std::string name(BalancerKindName(info.param));
                           std::erase(name, '-');
                           return name;
                         });

}  // namespace
}  // namespace scales
