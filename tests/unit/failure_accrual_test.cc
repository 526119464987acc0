// FailureAccrualSink over a fake endpoint: the consecutive-failures and success-rate policies,
// the equal-jittered mark-dead backoff, the probe, status in every state, metrics.

#include "scales/resilience/failure_accrual.h"

#include <chrono>
#include <memory>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/timeout_sink.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using State = FailureAccrualSink::State;

const Endpoint kEndpoint{"10.4.4.4", 9000};

class FailureAccrualTest : public ::testing::Test {
 protected:
  FailureAccrualTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  // dispatcher -> timeout -> failure accrual -> fake
  void Build(FailureAccrualOptions options = {}) {
    auto ctx = test::MakeContext(env_.loop(), env_.scope, nullptr, kEndpoint);
    transport_ = factory_.Create(ctx);
    accrual_ = std::make_shared<FailureAccrualSink>(ctx, transport_, options);
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), accrual_, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, seconds(1000), env_.scope);
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    accrual_.reset();
    transport_.reset();
    env_.Run();
    factory_.Clear();
  }

  size_t Start() {
    size_t i = calls_.Start(*dispatcher_);
    env_.Run();
    return i;
  }
  // One call answered with `e` (kOk: success).
  void Call(Errc e) {
    Start();
    ASSERT_EQ(transport_->in_flight(), 1u);
    if (e == Errc::kOk) {
      transport_->Reply(0, 1);
    } else {
      transport_->Fail(0, make_error_code(e));
    }
    env_.Run();
  }
  void Calls(int n, Errc e) {
    for (int i = 0; i < n; ++i) Call(e);
  }
  int64_t Removals() const { return env_.CounterValue("scales_failure_accrual_removals"); }
  int64_t Revivals() const { return env_.CounterValue("scales_failure_accrual_revivals"); }
  int64_t DeadGauge() const { return env_.GaugeValue("scales_failure_accrual_dead"); }

  // Lets the current Dead period end (exactly at its end).
  void WaitOutBackoff() {
    ASSERT_EQ(accrual_->state(), State::kDead);
    const Duration left = accrual_->dead_until() - env_.Now();
    env_.Advance(left - nanoseconds(1));
    ASSERT_EQ(accrual_->state(), State::kDead);
    env_.Advance(nanoseconds(1));
    ASSERT_EQ(accrual_->state(), State::kProbeOpen);
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<FakeTransport> transport_;
  std::shared_ptr<FailureAccrualSink> accrual_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(FailureAccrualTest, Classification) {
  for (Errc e : {Errc::kConnectFailed, Errc::kConnectTimeout, Errc::kConnectionClosed, Errc::kNotSent,
                 Errc::kServerError, Errc::kProtocolError, Errc::kRequestTimeout}) {
    EXPECT_EQ(ClassifyForAccrual(make_error_code(e)), AccrualOutcome::kFailure) << static_cast<int>(e);
  }
  // kFailedFast: the resurrector turning requests away from an endpoint already marked down.
  for (Errc e : {Errc::kFailedFast, Errc::kCancelled, Errc::kClientClosed, Errc::kNoMembers,
                 Errc::kPoolQueueFull, Errc::kHttpError, Errc::kInvalidArgument}) {
    EXPECT_EQ(ClassifyForAccrual(make_error_code(e)), AccrualOutcome::kIgnored) << static_cast<int>(e);
  }
  for (Errc e : {Errc::kNack, Errc::kNonRetryableNack}) {
    EXPECT_EQ(ClassifyForAccrual(make_error_code(e)), AccrualOutcome::kRefused) << static_cast<int>(e);
  }
  EXPECT_EQ(ClassifyForAccrual(error_code{}), AccrualOutcome::kSuccess);
}

TEST_F(FailureAccrualTest, ConsecutiveFailuresTrip) {
  Build();
  Calls(40, Errc::kOk);  // keeps the success rate at or above 0.8 throughout (41 / 50 at the end)
  Calls(4, Errc::kConnectionClosed);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  EXPECT_EQ(accrual_->consecutive_failures(), 4);
  Call(Errc::kOk);  // a success resets the run
  EXPECT_EQ(accrual_->consecutive_failures(), 0);
  Calls(4, Errc::kServerError);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kServerError);  // the fifth in a row
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(Removals(), 1);
  EXPECT_EQ(DeadGauge(), 1);
  EXPECT_EQ(accrual_->current_backoff(), seconds(5));
}

TEST_F(FailureAccrualTest, ConsecutiveFailuresAloneTrip) {
  FailureAccrualOptions o;
  o.required_success_rate = 0.0;  // success-rate policy off
  Build(o);
  Calls(4, Errc::kRequestTimeout);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kRequestTimeout);
  EXPECT_EQ(accrual_->state(), State::kDead);
}

TEST_F(FailureAccrualTest, IgnoredErrorsNeitherCountNorReset) {
  Build();
  Calls(20, Errc::kOk);
  Calls(3, Errc::kConnectFailed);
  Calls(10, Errc::kCancelled);
  Calls(10, Errc::kPoolQueueFull);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  EXPECT_EQ(accrual_->consecutive_failures(), 3);
}

// A server that refuses every call (Nacks) is ejected by the run of refusals; refusals between
// successes do not eject it through the success rate (a server shedding some load).
TEST_F(FailureAccrualTest, RefusalsCountTowardsTheConsecutiveFailuresOnly) {
  Build();
  Calls(2, Errc::kConnectionClosed);
  Calls(2, Errc::kNack);  // the run goes on across both kinds
  EXPECT_EQ(accrual_->consecutive_failures(), 4);
  Call(Errc::kOk);
  EXPECT_EQ(accrual_->consecutive_failures(), 0);
  // Half the calls refused, 60 in the window: a success rate of 0.5 if refusals counted.
  for (int i = 0; i < 30; ++i) {
    Call(Errc::kNack);
    Call(Errc::kOk);
  }
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Calls(4, Errc::kNack);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kNonRetryableNack);  // the fifth in a row
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(Removals(), 1);
  // A refused probe: dead again, with the next backoff.
  WaitOutBackoff();
  Call(Errc::kNack);
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(Removals(), 2);
  WaitOutBackoff();
  Call(Errc::kOk);
  EXPECT_EQ(accrual_->state(), State::kAlive);
}

TEST_F(FailureAccrualTest, SuccessRateTripsOnlyWithEnoughRequestsInTheWindow) {
  FailureAccrualOptions o;
  o.consecutive_failures = 0;  // consecutive policy off
  Build(o);
  Calls(3, Errc::kServerError);  // rate 0, but only 3 requests
  Call(Errc::kOk);               // 4 requests
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kServerError);  // 5 requests, 1 / 5 = 0.2 < 0.8
  EXPECT_EQ(accrual_->state(), State::kDead);
}

TEST_F(FailureAccrualTest, SuccessRateWindowForgetsOldRequests) {
  FailureAccrualOptions o;
  o.consecutive_failures = 0;
  Build(o);
  Calls(4, Errc::kServerError);
  env_.Advance(seconds(31));  // the window (30 s, 5 slices) no longer holds them
  Call(Errc::kServerError);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Calls(3, Errc::kServerError);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kServerError);
  EXPECT_EQ(accrual_->state(), State::kDead);
}

TEST_F(FailureAccrualTest, SuccessRateAtTheThresholdDoesNotTrip) {
  FailureAccrualOptions o;
  o.consecutive_failures = 0;
  Build(o);
  Calls(4, Errc::kOk);
  Call(Errc::kServerError);  // 4 / 5 = 0.8: not below
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kServerError);  // 4 / 6
  EXPECT_EQ(accrual_->state(), State::kDead);
}

TEST_F(FailureAccrualTest, StatusInEachState) {
  Build();
  EXPECT_EQ(accrual_->status(), SinkStatus::kIdle);  // follows the child
  transport_->set_status(SinkStatus::kOpen);
  EXPECT_EQ(accrual_->status(), SinkStatus::kOpen);
  Calls(5, Errc::kConnectFailed);
  ASSERT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(accrual_->status(), SinkStatus::kBusy);
  transport_->set_status(SinkStatus::kClosed);
  EXPECT_EQ(accrual_->status(), SinkStatus::kClosed);
  transport_->set_status(SinkStatus::kOpen);
  WaitOutBackoff();
  EXPECT_EQ(accrual_->status(), SinkStatus::kOpen);  // ProbeOpen follows the child
  transport_->set_status(SinkStatus::kIdle);
  EXPECT_EQ(accrual_->status(), SinkStatus::kIdle);
  Start();  // the probe
  EXPECT_EQ(accrual_->state(), State::kProbeClosed);
  EXPECT_EQ(accrual_->status(), SinkStatus::kBusy);
  transport_->Reply(0, 1);
  env_.Run();
  EXPECT_EQ(accrual_->state(), State::kAlive);
  EXPECT_EQ(accrual_->status(), SinkStatus::kIdle);
}

TEST_F(FailureAccrualTest, DeadEndpointFailsOpen) {
  Build();
  Calls(5, Errc::kConnectFailed);
  ASSERT_EQ(accrual_->state(), State::kDead);
  const size_t before = transport_->total_requests();
  Call(Errc::kOk);  // still passed on; its outcome is ignored
  EXPECT_EQ(transport_->total_requests(), before + 1);
  EXPECT_EQ(accrual_->state(), State::kDead);
  Call(Errc::kConnectFailed);
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(Removals(), 1);
}

TEST_F(FailureAccrualTest, ProbeSuccessRevivesAndResets) {
  Build();
  Calls(5, Errc::kConnectFailed);
  WaitOutBackoff();
  auto probe = Start();
  ASSERT_EQ(accrual_->state(), State::kProbeClosed);
  // Another request while the probe is out passes through but decides nothing.
  Start();
  ASSERT_EQ(transport_->in_flight(), 2u);
  transport_->Fail(1, make_error_code(Errc::kConnectFailed));
  env_.Run();
  EXPECT_EQ(accrual_->state(), State::kProbeClosed);
  transport_->Reply(0, 5);
  env_.Run();
  EXPECT_EQ(calls_[probe].value, 5);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  EXPECT_EQ(Revivals(), 1);
  EXPECT_EQ(DeadGauge(), 0);
  // Policies reset: the earlier failures no longer count, 4 new ones do not trip.
  Calls(4, Errc::kConnectFailed);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kConnectFailed);
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(accrual_->current_backoff(), seconds(5));  // the backoff restarted
  EXPECT_EQ(Removals(), 2);
}

// Requests sent before the endpoint was marked dead, answered (failed) after its revival, say
// nothing about it since: they do not count. (Four such failures plus one new one marked the
// revived endpoint dead again.)
TEST_F(FailureAccrualTest, AnswersToRequestsFromBeforeARevivalDoNotCount) {
  Build();
  for (int i = 0; i < 4; ++i) Start();  // sent while alive, answered much later
  ASSERT_EQ(transport_->in_flight(), 4u);
  for (int i = 0; i < 5; ++i) {
    Start();
    transport_->Fail(transport_->in_flight() - 1, make_error_code(Errc::kConnectFailed));
    env_.Run();
  }
  ASSERT_EQ(accrual_->state(), State::kDead);
  Start();  // sent while dead (fails open)
  WaitOutBackoff();
  Start();  // the probe
  transport_->Reply(transport_->in_flight() - 1, 1);
  env_.Run();
  ASSERT_EQ(accrual_->state(), State::kAlive);
  // The five old requests fail now, after the revival.
  while (transport_->in_flight() > 0) {
    transport_->Fail(0, make_error_code(Errc::kRequestTimeout));
    env_.Run();
  }
  EXPECT_EQ(accrual_->state(), State::kAlive);
  EXPECT_EQ(accrual_->consecutive_failures(), 0);
  // New requests count as before.
  Calls(4, Errc::kConnectFailed);
  EXPECT_EQ(accrual_->state(), State::kAlive);
  Call(Errc::kConnectFailed);
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(Removals(), 2);
}

TEST_F(FailureAccrualTest, ProbeFailureMarksDeadWithTheNextBackoff) {
  Build();
  Calls(5, Errc::kConnectFailed);
  EXPECT_EQ(accrual_->current_backoff(), seconds(5));
  WaitOutBackoff();
  Call(Errc::kConnectionClosed);  // the probe fails
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_GE(accrual_->current_backoff(), seconds(5));
  EXPECT_LE(accrual_->current_backoff(), seconds(10));
  EXPECT_EQ(Removals(), 2);
  EXPECT_EQ(DeadGauge(), 1);
  EXPECT_EQ(Revivals(), 0);
}

TEST_F(FailureAccrualTest, IgnoredProbeOutcomeReopensTheProbe) {
  Build();
  Calls(5, Errc::kConnectFailed);
  WaitOutBackoff();
  Call(Errc::kCancelled);
  EXPECT_EQ(accrual_->state(), State::kProbeOpen);
  Call(Errc::kOk);
  EXPECT_EQ(accrual_->state(), State::kAlive);
}

TEST_F(FailureAccrualTest, BackoffSequenceWithJitterBounds) {
  Build();
  Calls(5, Errc::kConnectFailed);
  // Equal jitter: 5 s, then [5, 10], [10, 20], [20, 40], [40, 80], [80, 160], then 300 s.
  const std::vector<std::pair<Duration, Duration>> bounds = {
      {seconds(5), seconds(5)},     {seconds(5), seconds(10)},   {seconds(10), seconds(20)},
      {seconds(20), seconds(40)},   {seconds(40), seconds(80)},  {seconds(80), seconds(160)},
      {seconds(300), seconds(300)}, {seconds(300), seconds(300)}};
  std::vector<Duration> seen;
  for (size_t i = 0; i < bounds.size(); ++i) {
    ASSERT_EQ(accrual_->state(), State::kDead);
    const Duration d = accrual_->current_backoff();
    seen.push_back(d);
    EXPECT_GE(d, bounds[i].first) << i;
    EXPECT_LE(d, bounds[i].second) << i;
    WaitOutBackoff();
    Call(Errc::kConnectFailed);  // the probe fails
  }
  EXPECT_EQ(Removals(), static_cast<int64_t>(bounds.size()) + 1);
  // The jittered ones are not all at a bound.
  int strictly_inside = 0;
  for (size_t i = 1; i < 6; ++i) strictly_inside += seen[i] > bounds[i].first && seen[i] < bounds[i].second;
  EXPECT_GE(strictly_inside, 3);
}

TEST_F(FailureAccrualTest, CloseStopsTheTimer) {
  Build();
  Calls(5, Errc::kConnectFailed);
  accrual_->Close();
  env_.Advance(seconds(10));
  EXPECT_EQ(accrual_->state(), State::kDead);
  EXPECT_EQ(accrual_->status(), SinkStatus::kClosed);
  EXPECT_EQ(transport_->close_calls(), 1u);
}

// A closed endpoint chain is no longer a dead endpoint of the client: it leaves
// scales_failure_accrual_dead at Close() (as scales_lb_size and the pools' gauges drop to 0),
// not only when it is destroyed; a closed client still held reported it dead for good.
TEST_F(FailureAccrualTest, CloseCountsADeadEndpointOutOfTheGauge) {
  Build();
  Calls(5, Errc::kConnectFailed);
  ASSERT_EQ(DeadGauge(), 1);
  accrual_->Close();
  EXPECT_EQ(DeadGauge(), 0);
  accrual_->Close();  // idempotent
  EXPECT_EQ(DeadGauge(), 0);
  // Nor does its destruction count it out again.
  dispatcher_.reset();
  timeout_.reset();
  accrual_.reset();
  env_.Run();
  EXPECT_EQ(DeadGauge(), 0);
}

TEST_F(FailureAccrualTest, OptionsAreValidated) {
  EXPECT_NO_THROW(Validate(FailureAccrualOptions{}));
  auto bad = [](auto mutate) {
    FailureAccrualOptions o;
    mutate(o);
    return o;
  };
  EXPECT_THROW(Validate(bad([](auto& o) { o.consecutive_failures = -1; })), Error);
  EXPECT_THROW(Validate(bad([](auto& o) { o.required_success_rate = 1.5; })), Error);
  EXPECT_THROW(Validate(bad([](auto& o) { o.window = Duration::zero(); })), Error);
  EXPECT_THROW(Validate(bad([](auto& o) { o.min_requests = 0; })), Error);
  EXPECT_THROW(Validate(bad([](auto& o) { o.min_backoff = Duration::zero(); })), Error);
  EXPECT_THROW(Validate(bad([](auto& o) { o.max_backoff = seconds(1); })), Error);
  EXPECT_THROW(FailureAccrualProvider(bad([](auto& o) { o.min_requests = 0; })), Error);
  SinkProvider p = FailureAccrualProvider();
  EXPECT_EQ(p.role, "failureaccrual");
}

}  // namespace
}  // namespace scales
