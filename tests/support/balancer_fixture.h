#pragma once
// BalancerFixture: the set-up shared by the load-balancer unit tests. A balancer under test
// sits over fake endpoint sinks (FakeTransportFactory) and a StaticServerSet, below a
// TimeoutSink and a MessageDispatcher, on a manual clock with the loop's seeded Random.
// TearDown answers whatever is still in flight, closes, and checks that every call completed
// exactly once and that no request is left on a fake.
//
//   class RoundRobinTest : public test::BalancerFixture<> { ... };
//   class AvoidEndpointTest : public test::BalancerFixture<::testing::TestWithParam<BalancerKind>> { ... };

#include <chrono>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "scales/core/dispatcher.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"
#include "support/fake_sinks.h"

namespace scales::test {

template <class Base = ::testing::Test>
class BalancerFixture : public Base {
 protected:
  BalancerFixture() : factory_(env_.loop()), calls_(*env_.clock) {}

  // The context a balancer under test is built with (server set `members`, kept in set_).
  SinkContext MakeBalancerContext(ServerSet::Members members) {
    members_ = members;
    set_ = std::make_shared<StaticServerSet>(std::move(members));
    return MakeContext(env_.loop(), env_.scope, set_);
  }

  // Puts a timeout sink and a dispatcher above `top` (the balancer itself when null; else a
  // sink above it) and opens `balancer`, expecting it to open successfully.
  void WireAndOpen(SinkPtr balancer, SinkPtr top = nullptr) {
    balancer_ = std::move(balancer);
    top_ = top ? std::move(top) : balancer_;
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), top_, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, std::chrono::hours(1),
                                                      env_.scope);
    int done = 0;
    balancer_->AsyncOpen([&](error_code ec) {
      ++done;
      EXPECT_FALSE(ec) << ec.message();
    });
    env_.Run();
    EXPECT_EQ(done, 1);
  }

  // The newest fake sink made for member i of the server set, or null.
  FakeTransport* Member(int i) { return factory_.LatestFor(members_.at(static_cast<size_t>(i))); }

  // Starts one call and runs the loop; returns the index (in the server set given to
  // MakeBalancerContext) of the member that received it, or -1.
  int StartOne() {
    const int n = static_cast<int>(members_.size());
    std::vector<size_t> before;
    for (int i = 0; i < n; ++i) before.push_back(Member(i) ? Member(i)->total_requests() : 0);
    calls_.Start(*dispatcher_);
    env_.Run();
    for (int i = 0; i < n; ++i) {
      if (Member(i) && Member(i)->total_requests() > before[static_cast<size_t>(i)]) return i;
    }
    return -1;
  }

  void TearDown() override {
    for (auto& f : factory_.created()) {
      while (f->in_flight() > 0) f->Reply(0, 0);
    }
    env_.Run();
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    top_.reset();
    balancer_.reset();
    env_.Run();
    factory_.Clear();
  }

  ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  ServerSet::Members members_;
  std::shared_ptr<StaticServerSet> set_;
  SinkPtr balancer_;
  SinkPtr top_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

}  // namespace scales::test
