// ApertureBalancerSink over fake endpoint sinks and a StaticServerSet, on the manual clock:
// initial aperture, growth and shrinkage with the load band over simulated time, idle
// contraction, the smoothing window, jittered rotation (and its end on Close), replacement of
// a member that leaves, expansion when a member goes down, option validation, and
// exactly-once completion throughout.

#include "scales/loadbalancer/aperture.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/error.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"
#include "scales/loadbalancer/balancers.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using ::testing::HasSubstr;
using ::testing::Not;

Endpoint Ep(int i) { return Endpoint{"10.0.1." + std::to_string(i + 1), 9090}; }

ServerSet::Members Range(int n) {
  ServerSet::Members m;
  for (int i = 0; i < n; ++i) m.push_back(Ep(i));
  return m;
}

ApertureOptions NoRotation(size_t min_size = 1) {
  ApertureOptions o;
  o.min_size = min_size;
  o.rotate = false;
  return o;
}

// One balancer with its dispatcher over fakes: used by the fixture and, twice, by the
// repeatability test.
struct Harness {
  Harness() : factory(env.loop()), calls(*env.clock) {}

  void Build(ServerSet::Members members, ApertureOptions options) {
    set = std::make_shared<StaticServerSet>(std::move(members));
    balancer = std::make_shared<ApertureBalancerSink>(test::MakeContext(env.loop(), env.scope, set),
                                                      factory.AsFactory(), options);
    timeout = std::make_shared<TimeoutSink>(env.loop(), balancer, env.scope);
    dispatcher = std::make_shared<MessageDispatcher>(env.loop(), "test", timeout, seconds(3600), env.scope);
  }

  void Open() {
    int done = 0;
    error_code result = make_error_code(Errc::kProtocolError);
    balancer->AsyncOpen([&](error_code ec) {
      ++done;
      result = ec;
    });
    env.Run();
    ASSERT_EQ(done, 1);
    EXPECT_FALSE(result) << result.message();
  }

  void Finish() {
    if (dispatcher) dispatcher->Close();
    env.Run();
    EXPECT_TRUE(calls.AllCompletedOnce());
    EXPECT_EQ(factory.TotalInFlight(), 0u);
    dispatcher.reset();
    timeout.reset();
    balancer.reset();
    env.Run();
    factory.Clear();
  }

  size_t Start() { return calls.Start(*dispatcher); }

  std::set<Endpoint> Members() const {
    std::set<Endpoint> m;
    for (const BalancerNode* n : balancer->aperture()) m.insert(n->endpoint);
    return m;
  }
  // Endpoints whose (latest) chain was opened.
  std::set<Endpoint> Opened() const {
    std::set<Endpoint> m;
    for (const auto& f : factory.created()) {
      if (f->open_calls() > 0 && !f->closed()) m.insert(*f->endpoint());
    }
    return m;
  }
  FakeTransport& Node(const Endpoint& ep) {
    FakeTransport* f = factory.LatestFor(ep);
    EXPECT_NE(f, nullptr) << "no fake for " << ep.ToString();
    return *f;
  }
  void ReplyAll() {
    // By index: answering may reset a chain, which creates a fake.
    for (size_t i = 0; i < factory.count(); ++i) {
      while (factory.at(i).in_flight() > 0) factory.at(i).Reply(0, 1);
    }
    env.Run();
  }
  // Advances the clock in steps of `step` until `pred` holds (at most `limit`); returns the
  // time it took, or limit + step if it never held.
  template <typename Pred>
  Duration AdvanceUntil(Pred pred, Duration step, Duration limit) {
    Duration t{0};
    while (t <= limit) {
      if (pred()) return t;
      env.Advance(step);
      t += step;
    }
    return t;
  }

  test::ManualEnv env;
  FakeTransportFactory factory;
  CallTracker calls;
  std::shared_ptr<StaticServerSet> set;
  std::shared_ptr<ApertureBalancerSink> balancer;
  std::shared_ptr<TimeoutSink> timeout;
  std::shared_ptr<MessageDispatcher> dispatcher;
};

class ApertureTest : public ::testing::Test {
 protected:
  void TearDown() override { h_.Finish(); }

  // Six nodes, a one-member aperture grown to two by 3 outstanding requests (inside the load
  // band), rotating every 20 s; at t = 20 s the rotation adds node `r`, whose open (as every
  // outside node's) hangs. `before`: the members before it.
  void StartRotation(std::set<Endpoint>& before, Endpoint& r) {
    ApertureOptions o;
    o.min_size = 1;
    o.rotate = true;
    o.rotate_min = seconds(20);
    o.rotate_max = seconds(20);
    h_.Build(Range(6), o);
    h_.Open();
    for (int i = 0; i < 3; ++i) h_.Start();
    h_.env.Run();
    for (int s = 1; s <= 6; ++s) h_.env.Advance(seconds(1));
    ASSERT_EQ(h_.balancer->aperture_size(), 2u);  // 3 outstanding over 2: inside the band
    before = h_.Members();
    for (int i = 0; i < 6; ++i) {
      if (before.count(Ep(i)) == 0) h_.Node(Ep(i)).set_open_mode(FakeTransport::OpenMode::kHang);
    }
    h_.env.Advance(seconds(14));  // t = 20 s: the rotation adds a node, its open pending
    ASSERT_EQ(h_.balancer->aperture_size(), 3u);
    for (const Endpoint& ep : h_.Members()) {
      if (before.count(ep) == 0) r = ep;
    }
  }

  // Grows a one-member aperture over 4 nodes to two with 3 outstanding requests: the EMA
  // (window 5 s, tick 1 s) reaches 2 at t = 6 s (3 * (1 - e^-1.2) = 2.096; at 5 s 1.896).
  void GrowToTwo() {
    for (int i = 0; i < 3; ++i) h_.Start();
    h_.env.Run();
    ASSERT_EQ(h_.balancer->aperture_size(), 1u);
    for (int s = 1; s <= 5; ++s) {
      h_.env.Advance(seconds(1));
      ASSERT_EQ(h_.balancer->aperture_size(), 1u) << "grew at t=" << s << "s";
    }
    h_.env.Advance(seconds(1));
    ASSERT_EQ(h_.balancer->aperture_size(), 2u);
    EXPECT_NEAR(h_.balancer->ema(), 3 * (1 - std::exp(-1.2)), 1e-9);
  }

  Harness h_;
};

TEST_F(ApertureTest, InitialApertureIsMinSizeAndOnlyItIsOpened) {
  h_.Build(Range(5), NoRotation(2));
  EXPECT_EQ(h_.balancer->status(), SinkStatus::kIdle);
  h_.Open();
  EXPECT_EQ(h_.balancer->size(), 5u);
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  EXPECT_EQ(h_.Opened(), h_.Members());
  size_t opened = 0;
  for (const auto& f : h_.factory.created()) opened += f->open_calls();
  EXPECT_EQ(opened, 2u);
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 2);
  EXPECT_EQ(h_.balancer->status(), SinkStatus::kOpen);
  // Idle at min_size: no tick; no rotation configured.
  EXPECT_FALSE(h_.balancer->tick_armed());
  EXPECT_FALSE(h_.balancer->rotation_armed());
  // Traffic only reaches the members, least loaded first.
  for (int i = 0; i < 6; ++i) h_.Start();
  h_.env.Run();
  for (const auto& f : h_.factory.created()) {
    if (h_.Members().count(*f->endpoint()) != 0) {
      EXPECT_EQ(f->in_flight(), 3u);
    } else {
      EXPECT_EQ(f->total_requests(), 0u);
    }
  }
  h_.ReplyAll();
}

TEST_F(ApertureTest, FewerServersThanMinSizeUsesAll) {
  h_.Build(Range(2), NoRotation(3));
  h_.Open();
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  h_.set->Update(Range(4));  // joiners fill the aperture up to min_size
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 3u);
  EXPECT_EQ(h_.Opened(), h_.Members());
}

TEST_F(ApertureTest, GrowsWhenLoadAverageReachesHighMark) {
  h_.Build(Range(4), NoRotation());
  h_.Open();
  std::set<Endpoint> first = h_.Members();
  GrowToTwo();
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 1);
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 2);
  EXPECT_EQ(h_.Opened(), h_.Members());
  // 3 outstanding over 2 members is inside the band: no further growth.
  h_.env.Advance(seconds(60));
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  // The new member is the least loaded: the next request goes there.
  std::set<Endpoint> members = h_.Members();
  Endpoint added;
  for (const Endpoint& ep : members) {
    if (first.count(ep) == 0) added = ep;
  }
  h_.Start();
  h_.env.Run();
  EXPECT_EQ(h_.Node(added).in_flight(), 1u);
  // Load 4 keeps growing to 3 once avg = ema / 2 reaches 2 (ema -> 4).
  for (int i = 0; i < 4; ++i) h_.Start();
  h_.env.Run();
  Duration t = h_.AdvanceUntil([&] { return h_.balancer->aperture_size() == 3; }, seconds(1), seconds(120));
  EXPECT_LE(t, seconds(120));
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 2);
  h_.ReplyAll();
}

TEST_F(ApertureTest, ShrinksAtLowMarkRemovingTheLeastLoadedMember) {
  ApertureOptions o = NoRotation();
  o.low_load = 0.6;  // with 1 outstanding over 2 members the EMA tends to 1: avg 0.5 < 0.6
  h_.Build(Range(4), o);
  h_.Open();
  GrowToTwo();
  // Keep one request, on the original member (it holds all three).
  const BalancerNode* loaded = nullptr;
  for (const BalancerNode* n : h_.balancer->aperture()) {
    if (n->load == 3) loaded = n;
  }
  ASSERT_NE(loaded, nullptr);
  Endpoint keep = loaded->endpoint;
  FakeTransport& k = h_.Node(keep);
  k.Reply(0, 1);
  k.Reply(0, 1);
  h_.env.Run();
  ASSERT_EQ(h_.balancer->total_load(), 1);
  Duration t = h_.AdvanceUntil([&] { return h_.balancer->aperture_size() == 1; }, seconds(1), seconds(60));
  EXPECT_LE(t, seconds(60));
  EXPECT_EQ(h_.Members(), std::set<Endpoint>{keep});
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_contractions"), 1);
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 1);
  // The removed member's chain was closed (it had no load) and replaced by an unopened one.
  EXPECT_EQ(h_.Opened(), std::set<Endpoint>{keep});
  // Never below min_size.
  h_.ReplyAll();
  h_.env.Advance(seconds(60));
  EXPECT_EQ(h_.balancer->aperture_size(), 1u);
}

TEST_F(ApertureTest, IdleClientContracts) {
  h_.Build(Range(4), NoRotation());
  h_.Open();
  GrowToTwo();
  h_.ReplyAll();  // traffic stops; only the tick samples the EMA now
  ASSERT_TRUE(h_.balancer->tick_armed());
  double ema = h_.balancer->ema();
  // avg = ema / 2 <= 0.5 once ema * e^(-t/5) <= 1: t = 5 ln(ema), rounded up to a tick.
  auto expected = seconds(static_cast<int64_t>(std::ceil(5 * std::log(ema))));
  Duration t = h_.AdvanceUntil([&] { return h_.balancer->aperture_size() == 1; }, seconds(1), seconds(60));
  EXPECT_EQ(t, expected);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_contractions"), 1);
  // Idle at min_size: the tick stops; nothing changes any more.
  EXPECT_FALSE(h_.balancer->tick_armed());
  EXPECT_EQ(h_.env.loop().timers().size(), 0u);
  h_.env.Advance(seconds(600));
  EXPECT_EQ(h_.balancer->aperture_size(), 1u);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_contractions"), 1);
  // The next request still works (on the remaining member).
  h_.Start();
  h_.env.Run();
  h_.ReplyAll();
  EXPECT_EQ(h_.calls.completed(), 4u);
}

TEST_F(ApertureTest, RemovedMemberDrainsBeforeItsChainIsReset) {
  h_.Build(Range(2), ApertureOptions{});  // min_size 1, rotation every 120..240 s
  h_.Open();
  Endpoint first = *h_.Members().begin();
  FakeTransport& chain = h_.Node(first);
  size_t c = h_.Start();  // stays outstanding across the rotation
  h_.env.Run();
  h_.AdvanceUntil([&] { return h_.env.CounterValue("scales_lb_aperture_rotations") == 1; }, seconds(1),
                  seconds(240));
  ASSERT_EQ(h_.env.CounterValue("scales_lb_aperture_rotations"), 1);
  ASSERT_EQ(h_.balancer->aperture_size(), 1u);
  EXPECT_EQ(h_.Members().count(first), 0u);
  // The former member keeps its open chain while its request is outstanding.
  EXPECT_FALSE(chain.closed());
  EXPECT_EQ(h_.factory.ForEndpoint(first).size(), 1u);
  chain.Reply(0, 7);
  h_.env.Run();
  EXPECT_EQ(h_.calls[c].value, 7);
  // Drained: closed, and a fresh unopened chain waits for the node's next turn.
  EXPECT_TRUE(chain.closed());
  ASSERT_EQ(h_.factory.ForEndpoint(first).size(), 2u);
  EXPECT_EQ(h_.Node(first).open_calls(), 0u);
  EXPECT_EQ(h_.balancer->total_load(), 0);
}

TEST_F(ApertureTest, LongSmoothingWindowIgnoresShortBurst) {
  ApertureOptions o = NoRotation();
  o.smoothing_window = seconds(60);
  h_.Build(Range(4), o);
  h_.Open();
  for (int i = 0; i < 3; ++i) h_.Start();
  h_.env.Run();
  h_.env.Advance(seconds(2));
  h_.ReplyAll();
  // 3 * (1 - e^(-2/60)) = 0.098: far from 2.
  EXPECT_NEAR(h_.balancer->ema(), 3 * (1 - std::exp(-2.0 / 60)), 1e-9);
  h_.env.Advance(seconds(60));
  EXPECT_EQ(h_.balancer->aperture_size(), 1u);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 0);
}

TEST_F(ApertureTest, ShortSmoothingWindowGrowsOnTheSameBurst) {
  ApertureOptions o = NoRotation();
  o.smoothing_window = seconds(1);  // tick every 200 ms
  h_.Build(Range(4), o);
  h_.Open();
  for (int i = 0; i < 3; ++i) h_.Start();
  h_.env.Run();
  // 3 * (1 - e^-t) >= 2 from t = ln 3 = 1.0986 s: the tick at 1.2 s.
  Duration t = h_.AdvanceUntil([&] { return h_.balancer->aperture_size() == 2; }, milliseconds(100), seconds(2));
  EXPECT_EQ(t, milliseconds(1200));
  h_.ReplyAll();
}

TEST_F(ApertureTest, RotationReplacesOneMemberAfterJitteredPeriodAndStopsOnClose) {
  ApertureOptions o;  // rotate every 120..240 s
  o.min_size = 2;
  h_.Build(Range(5), o);
  h_.Open();
  EXPECT_TRUE(h_.balancer->rotation_armed());
  std::set<Endpoint> before = h_.Members();
  h_.env.Advance(seconds(119));
  EXPECT_EQ(h_.Members(), before);
  Duration t = h_.AdvanceUntil([&] { return h_.env.CounterValue("scales_lb_aperture_rotations") == 1; },
                               seconds(1), seconds(121));
  EXPECT_LE(t, seconds(121)) << "no rotation by 240 s";
  std::set<Endpoint> after = h_.Members();
  ASSERT_EQ(after.size(), 2u);
  std::vector<Endpoint> kept;
  for (const Endpoint& ep : after) {
    if (before.count(ep) != 0) kept.push_back(ep);
  }
  EXPECT_EQ(kept.size(), 1u) << "exactly one member changes";
  EXPECT_EQ(h_.Opened(), after);
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 2);
  EXPECT_TRUE(h_.balancer->rotation_armed());  // the next one
  // Traffic still flows.
  h_.Start();
  h_.env.Run();
  h_.ReplyAll();

  h_.balancer->Close();
  EXPECT_FALSE(h_.balancer->rotation_armed());
  EXPECT_FALSE(h_.balancer->tick_armed());
  EXPECT_EQ(h_.env.loop().timers().size(), 0u);
  h_.env.Advance(seconds(1000));
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_rotations"), 1);
}

// A closed balancer serves no endpoint: its aperture leaves the gauge at Close (as
// scales_lb_size and the pools' gauges drop to 0), not only when the balancer is destroyed; a
// closed client still held by its owner reported its last aperture for good.
TEST_F(ApertureTest, ClosedBalancerReportsNoAperture) {
  h_.Build(Range(5), NoRotation(2));
  h_.Open();
  h_.Start();
  h_.env.Run();
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 2);
  h_.dispatcher->Close();
  h_.env.Run();
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_size"), 0);
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 0);
  // Nor does its destruction count the members out again.
  h_.Finish();
  EXPECT_EQ(h_.env.GaugeValue("scales_lb_aperture"), 0);
}

TEST_F(ApertureTest, MemberThatLeavesIsReplacedByAnOutsideNode) {
  h_.Build(Range(3), NoRotation());
  h_.Open();
  ASSERT_EQ(h_.balancer->aperture_size(), 1u);
  Endpoint gone = *h_.Members().begin();
  size_t c = h_.Start();  // outstanding on the leaving member
  h_.env.Run();
  FakeTransport& old_chain = h_.Node(gone);
  ASSERT_EQ(old_chain.in_flight(), 1u);
  ServerSet::Members rest;
  for (int i = 0; i < 3; ++i) {
    if (Ep(i) != gone) rest.push_back(Ep(i));
  }
  h_.set->Update(rest);
  h_.env.Run();
  ASSERT_EQ(h_.balancer->aperture_size(), 1u);
  Endpoint replacement = *h_.Members().begin();
  EXPECT_NE(replacement, gone);
  EXPECT_TRUE(h_.Node(replacement).opened());
  EXPECT_EQ(h_.balancer->draining(), 1u);
  // The old member drains: its request completes; then its chain is closed.
  old_chain.Reply(0, 5);
  h_.env.Run();
  EXPECT_EQ(h_.calls[c].value, 5);
  EXPECT_TRUE(old_chain.closed());
  EXPECT_EQ(h_.balancer->total_load(), 0);
  // A non-member that leaves changes nothing.
  ServerSet::Members only{replacement};
  h_.set->Update(only);
  h_.env.Run();
  EXPECT_EQ(h_.Members(), std::set<Endpoint>{replacement});
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 0);
}

TEST_F(ApertureTest, MemberGoingDownTriggersExpansionAndStaysUntilItRecovers) {
  h_.Build(Range(3), NoRotation());
  h_.Open();
  Endpoint down = *h_.Members().begin();
  h_.Node(down).set_status(SinkStatus::kClosed);
  size_t c = h_.Start();
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 1);
  EXPECT_EQ(h_.Members().count(down), 1u) << "the down member stays";
  EXPECT_EQ(h_.Node(down).total_requests(), 0u);
  h_.ReplyAll();
  EXPECT_FALSE(h_.calls[c].error) << h_.calls[c].error.message();
  // While it is down, the aperture keeps a healthy member (no contraction below it).
  h_.env.Advance(seconds(120));
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 1);
  // Recovered: the idle aperture contracts to one again.
  h_.Node(down).set_status(std::nullopt);
  h_.env.Advance(seconds(2));
  EXPECT_EQ(h_.balancer->aperture_size(), 1u);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_contractions"), 1);
}

// A member that goes down widens the aperture by one; when it recovers, that slot is given
// back (while the load allows). A member that keeps going down and up (failure accrual's probe
// cycle, the resurrector's reconnects) used to widen the aperture by one each time, and under a
// load inside the band nothing shrank it again: it grew to the whole server set.
TEST_F(ApertureTest, AFlappingMemberDoesNotWidenTheApertureForGood) {
  h_.Build(Range(6), NoRotation());
  h_.Open();
  GrowToTwo();  // 3 outstanding over 2 members: inside the band
  for (int k = 0; k < 4; ++k) {
    const Endpoint flapping = *h_.Members().begin();
    h_.Node(flapping).set_status(SinkStatus::kClosed);
    h_.env.Advance(seconds(1));
    EXPECT_EQ(h_.balancer->aperture_size(), 3u) << "down, round " << k;
    h_.Node(flapping).set_status(std::nullopt);
    h_.env.Advance(seconds(1));
    EXPECT_EQ(h_.balancer->aperture_size(), 2u) << "recovered, round " << k;
  }
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 1 + 4);
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_contractions"), 4);
  h_.env.Advance(seconds(60));
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  h_.ReplyAll();
}

// The usual order when a server dies: its endpoint goes down (the aperture widens by one to
// replace it), then it leaves the server set (ZooKeeper's ephemeral node expires). The widening
// was its replacement: no second one is added, and the aperture is back to what the load needs.
TEST_F(ApertureTest, ADownMemberLeavingTheSetIsNotReplacedTwice) {
  h_.Build(Range(6), NoRotation());
  h_.Open();
  GrowToTwo();  // 3 outstanding over 2 members: inside the band
  const Endpoint dead = *h_.Members().begin();
  h_.Node(dead).set_status(SinkStatus::kClosed);
  h_.env.Advance(seconds(1));
  EXPECT_EQ(h_.balancer->aperture_size(), 3u);
  ServerSet::Members rest;
  for (const Endpoint& ep : Range(6)) {
    if (!(ep == dead)) rest.push_back(ep);
  }
  h_.set->Update(rest);
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  EXPECT_EQ(h_.Members().count(dead), 0u);
  // The dead member's requests left with it: the load band may contract further, never widen.
  h_.env.Advance(seconds(60));
  EXPECT_LE(h_.balancer->aperture_size(), 2u);
  h_.ReplyAll();
}

// The only member goes down with no node outside to widen the aperture with; a healthy node
// then joins. It must become a member at once: it used to wait outside while every request
// went to the down member (failing fast) until a rotation, or for good without one.
TEST_F(ApertureTest, ANodeJoiningWhileTheOnlyMemberIsDownJoinsTheAperture) {
  h_.Build(Range(1), NoRotation());
  h_.Open();
  const Endpoint dead = Ep(0);
  h_.Node(dead).set_status(SinkStatus::kClosed);
  size_t first = h_.Start();
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 1u);  // nothing to widen with
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 0);
  h_.set->Update(Range(2));  // a replacement joins; the dead one is still listed
  h_.env.Run();
  EXPECT_EQ(h_.Members(), (std::set<Endpoint>{dead, Ep(1)}));
  EXPECT_TRUE(h_.Node(Ep(1)).opened());
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 1);
  std::vector<size_t> later;
  for (int i = 0; i < 5; ++i) later.push_back(h_.Start());
  h_.env.Run();
  EXPECT_EQ(h_.Node(Ep(1)).in_flight(), 5u) << "the healthy member takes the requests";
  h_.ReplyAll();
  for (size_t c : later) EXPECT_FALSE(h_.calls[c].error) << h_.calls[c].error.message();
  (void)first;
  // The dead member recovers: the slot its going down added is given back when idle.
  h_.Node(dead).set_status(std::nullopt);
  h_.env.Advance(seconds(2));
  EXPECT_EQ(h_.balancer->aperture_size(), 1u);
}

// Every member down, none outside; fresh nodes join (servers restarted under new addresses
// while the old ones are still listed): one joins per down member, and the requests go to them.
// The down members that leave afterwards take their (made) expansions with them.
TEST_F(ApertureTest, NodesJoiningWhileEveryMemberIsDownReplaceTheDownOnes) {
  h_.Build(Range(2), NoRotation(/*min_size=*/2));
  h_.Open();
  ASSERT_EQ(h_.balancer->aperture_size(), 2u);
  for (int i = 0; i < 2; ++i) h_.Node(Ep(i)).set_status(SinkStatus::kClosed);
  h_.Start();
  h_.env.Run();
  h_.set->Update(Range(5));  // three new nodes
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 4u) << "the two down members and one joiner for each";
  const size_t before = h_.Node(Ep(0)).total_requests() + h_.Node(Ep(1)).total_requests();
  for (int i = 0; i < 6; ++i) h_.Start();
  h_.env.Run();
  EXPECT_EQ(h_.Node(Ep(0)).total_requests() + h_.Node(Ep(1)).total_requests(), before)
      << "no request to a down member while healthy ones are there";
  // The down members leave the set: the healthy joiners stay, and min_size is kept.
  ServerSet::Members fresh{Ep(2), Ep(3), Ep(4)};
  h_.set->Update(fresh);
  h_.env.Run();
  EXPECT_GE(h_.balancer->aperture_size(), 2u);
  for (const Endpoint& ep : h_.Members()) EXPECT_NE(ep, Ep(0));
  h_.ReplyAll();
}

// The only member goes down with nothing outside (its expansion is owed), then leaves in the
// update that brings its replacement: the replacement takes its place, and the owed expansion
// goes with it (a later join does not widen the aperture).
TEST_F(ApertureTest, ADownMemberLeavingWithItsExpansionOwedIsReplacedOnce) {
  h_.Build(Range(1), NoRotation());
  h_.Open();
  h_.Node(Ep(0)).set_status(SinkStatus::kClosed);
  h_.Start();
  h_.env.Run();
  h_.set->Update(ServerSet::Members{Ep(1)});
  h_.env.Run();
  EXPECT_EQ(h_.Members(), std::set<Endpoint>{Ep(1)});
  h_.set->Update(ServerSet::Members{Ep(1), Ep(2)});
  h_.env.Run();
  EXPECT_EQ(h_.Members(), std::set<Endpoint>{Ep(1)}) << "no expansion is owed any more";
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_expansions"), 0);
  h_.ReplyAll();
}

TEST_F(ApertureTest, EveryNodeDownUsesAMemberAnyway) {
  h_.Build(Range(2), NoRotation());
  h_.Open();
  for (const auto& f : h_.factory.created()) f->set_status(SinkStatus::kClosed);
  for (int i = 0; i < 3; ++i) h_.Start();
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
  EXPECT_EQ(h_.factory.TotalInFlight(), 3u);
  h_.ReplyAll();
}

TEST_F(ApertureTest, InitialMemberDownAtOpenStillOpens) {
  h_.factory.open_mode = FakeTransport::OpenMode::kFail;
  h_.factory.open_error = make_error_code(Errc::kConnectFailed);
  h_.Build(Range(3), NoRotation());
  h_.Open();  // completes: a failed node is down, not fatal
  h_.factory.open_mode = FakeTransport::OpenMode::kSucceed;
  h_.factory.open_error = {};
  // The failed member is found down at the first pick; the aperture grows by a node that works.
  size_t c = h_.Start();
  h_.env.Run();
  h_.ReplyAll();
  EXPECT_FALSE(h_.calls[c].error) << h_.calls[c].error.message();
  EXPECT_EQ(h_.balancer->aperture_size(), 2u);
}

TEST_F(ApertureTest, ValidationRejectsBadOptions) {
  auto bad = [](auto edit) {
    ApertureOptions o;
    edit(o);
    EXPECT_THROW(Validate(o), Error);
    BalancerOptions b;
    b.aperture = o;
    EXPECT_THROW(Validate(b), Error);
    EXPECT_THROW(ApertureBalancerProvider(o), Error);
  };
  bad([](ApertureOptions& o) { o.min_size = 0; });
  bad([](ApertureOptions& o) { o.low_load = -0.1; });
  bad([](ApertureOptions& o) { o.low_load = 2.0; });
  bad([](ApertureOptions& o) { o.smoothing_window = Duration::zero(); });
  bad([](ApertureOptions& o) { o.rotate_min = seconds(300); });
  ApertureOptions ok;
  EXPECT_NO_THROW(Validate(ok));
  ok.rotate = false;
  ok.rotate_min = seconds(300);  // ignored without rotation
  EXPECT_NO_THROW(Validate(ok));
  BalancerOptions b;
  b.kind = BalancerKind::kAperture;
  SinkProvider p = ApertureProvider(b);
  EXPECT_EQ(p.name, "aperture-balancer");
  h_.set = std::make_shared<StaticServerSet>(Range(1));
  SinkPtr sink = p.create(test::MakeContext(h_.env.loop(), h_.env.scope, h_.set), h_.factory.AsFactory());
  EXPECT_EQ(sink->name(), "aperture-balancer");
  sink->Close();
}

// The same seed gives the same members, growth times and rotations.
std::vector<std::string> Trace() {
  Harness h;
  ApertureOptions o;
  o.min_size = 2;
  o.rotate_min = seconds(30);
  o.rotate_max = seconds(90);
  h.Build(Range(8), o);
  h.Open();
  std::vector<std::string> trace;
  auto record = [&] {
    std::string s = std::to_string(h.env.Now().time_since_epoch().count()) + ":";
    for (const Endpoint& ep : h.Members()) s += " " + ep.ToString();
    if (trace.empty() || trace.back().substr(trace.back().find(':')) != s.substr(s.find(':'))) {
      trace.push_back(s);
    }
  };
  record();
  for (int step = 0; step < 400; ++step) {
    if (step % 50 < 25) {
      h.Start();
      h.Start();
    }
    if (step % 3 == 0) h.ReplyAll();
    h.env.Advance(seconds(1));
    record();
  }
  h.ReplyAll();
  h.Finish();
  return trace;
}

TEST(ApertureSeedTest, SameSeedGivesExactlyTheSameHistory) {
  std::vector<std::string> a = Trace();
  std::vector<std::string> b = Trace();
  EXPECT_GT(a.size(), 5u);
  EXPECT_EQ(a, b);
}

// A rotation whose new node goes down (a tick or a pick sees it) before its failed open reaches
// the balancer: the expansion its going down caused must be given back when the rotation is
// abandoned, or every failed rotation inside the load band leaves the aperture one wider.
TEST_F(ApertureTest, AFailedRotationDoesNotWidenTheApertureForGood) {
  std::set<Endpoint> before;
  Endpoint r;
  ASSERT_NO_FATAL_FAILURE(StartRotation(before, r));
  FakeTransport& rot = h_.Node(r);
  // Its connect fails: the endpoint reports itself down (the resurrector marks it Closed) a turn
  // or two before the open's completion reaches the balancer; a tick meanwhile sees it.
  rot.set_status(SinkStatus::kClosed);
  h_.env.Advance(seconds(1));  // the tick marks it down and expands by one
  ASSERT_EQ(h_.balancer->aperture_size(), 4u);
  rot.set_status(std::nullopt);
  rot.CompleteOpen(make_error_code(Errc::kConnectFailed));
  h_.env.Run();  // FinishRotation: the rotation is abandoned, the node contracted
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_rotations"), 0);
  for (const Endpoint& ep : h_.Members()) {
    if (before.count(ep) == 0) h_.Node(ep).CompleteOpen();
  }
  h_.env.Run();
  h_.env.Advance(seconds(15));  // t = 36 s, before the next rotation; load still inside the band
  EXPECT_EQ(h_.balancer->aperture_size(), 2u) << "the failed rotation widened the aperture for good";
  h_.ReplyAll();
}

// The node a rotation added leaves the server set before its open completed: the rotation is
// abandoned, as when that open fails. The node was an extra member, so no replacement is owed;
// replacing it would leave the aperture one wider for good while the load stays inside the band.
TEST_F(ApertureTest, ARotatingNodeLeavingTheSetDoesNotWidenTheApertureForGood) {
  std::set<Endpoint> before;
  Endpoint r;
  ASSERT_NO_FATAL_FAILURE(StartRotation(before, r));
  ServerSet::Members without_r;
  for (const Endpoint& ep : Range(6)) {
    if (ep != r) without_r.push_back(ep);
  }
  h_.set->Update(without_r);
  h_.env.Run();
  EXPECT_EQ(h_.balancer->aperture_size(), 2u) << "the rotating node that left was replaced";
  for (const Endpoint& ep : h_.Members()) {
    if (before.count(ep) == 0) h_.Node(ep).CompleteOpen();
  }
  h_.env.Run();
  h_.env.Advance(seconds(15));  // t = 36 s, before the next rotation; load still inside the band
  EXPECT_EQ(h_.balancer->aperture_size(), 2u) << "the abandoned rotation widened the aperture for good";
  EXPECT_EQ(h_.Members(), before);
  h_.ReplyAll();
}

// As above, with the rotating node gone down (a tick saw it and widened the aperture) before it
// leaves: that expansion is given back too.
TEST_F(ApertureTest, ADownRotatingNodeLeavingTheSetDoesNotWidenTheApertureForGood) {
  std::set<Endpoint> before;
  Endpoint r;
  ASSERT_NO_FATAL_FAILURE(StartRotation(before, r));
  h_.Node(r).set_status(SinkStatus::kClosed);
  h_.env.Advance(seconds(1));  // the tick marks it down and expands by one
  ASSERT_EQ(h_.balancer->aperture_size(), 4u);
  ServerSet::Members without_r;
  for (const Endpoint& ep : Range(6)) {
    if (ep != r) without_r.push_back(ep);
  }
  h_.set->Update(without_r);
  h_.env.Run();
  for (const Endpoint& ep : h_.Members()) {
    if (before.count(ep) == 0) h_.Node(ep).CompleteOpen();
  }
  h_.env.Run();
  h_.env.Advance(seconds(14));  // t = 35 s, before the next rotation; load still inside the band
  EXPECT_EQ(h_.balancer->aperture_size(), 2u) << "the abandoned rotation widened the aperture for good";
  h_.ReplyAll();
}

// A member goes down during a rotation (the aperture widens by one) and recovers before the
// rotation's node opened: the slot it added is owed back, but a tick's GiveBack skips while a
// rotation waits. It used to drop the owed give-back then, so once the rotation finished the
// aperture stayed one wider for good while the load stayed inside the band.
TEST_F(ApertureTest, AMemberRecoveringDuringARotationGivesItsSlotBackAfterIt) {
  std::set<Endpoint> before;
  Endpoint r;
  ASSERT_NO_FATAL_FAILURE(StartRotation(before, r));
  const Endpoint flapping = *before.begin();
  h_.Node(flapping).set_status(SinkStatus::kClosed);
  h_.env.Advance(seconds(1));  // the tick marks it down and expands by one
  ASSERT_EQ(h_.balancer->aperture_size(), 4u);
  h_.Node(flapping).set_status(std::nullopt);
  h_.env.Advance(seconds(1));  // recovered: its slot is owed back, the rotation still waits
  h_.Node(r).CompleteOpen();
  h_.env.Run();  // the rotation finishes: one old member leaves
  EXPECT_EQ(h_.env.CounterValue("scales_lb_aperture_rotations"), 1);
  for (const Endpoint& ep : h_.Members()) {
    if (before.count(ep) == 0 && ep != r) h_.Node(ep).CompleteOpen();
  }
  h_.env.Run();
  h_.env.Advance(seconds(12));  // t = 36 s, before the next rotation; load still inside the band
  EXPECT_EQ(h_.balancer->aperture_size(), 2u) << "the recovered member's slot was never given back";
  h_.ReplyAll();
}

// A request parked while the aperture's first members open names those endpoints, not the first
// members of the server set (most of which an aperture never opens).
TEST(ApertureWaitingTest, ParkedRequestNamesTheApertureMembersBeingOpened) {
  Harness h;
  h.factory.open_mode = FakeTransport::OpenMode::kHang;
  h.Build(Range(10), NoRotation(2));
  auto c = h.Start();
  h.env.Run();
  const std::set<Endpoint> opened = h.Opened();
  ASSERT_EQ(opened.size(), 2u);
  h.dispatcher->Close();
  h.env.Run();
  ASSERT_EQ(h.calls[c].error, Errc::kClientClosed);
  const std::string& detail = h.calls[c].info.detail;
  for (const Endpoint& ep : opened) EXPECT_THAT(detail, HasSubstr(ep.ToString())) << detail;
  for (int i = 0; i < 10; ++i) {
    if (!opened.contains(Ep(i))) EXPECT_THAT(detail, Not(HasSubstr(Ep(i).ToString()))) << detail;
  }
  EXPECT_THAT(detail, Not(HasSubstr("more"))) << detail;
  h.Finish();
}

}  // namespace
}  // namespace scales
