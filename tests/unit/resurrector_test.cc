// ResurrectorSink over fake children (and over a WatermarkPool of fakes): marking down on a
// fault, failing fast, reconnecting on the jittered exponential backoff, marking up again.

#include "scales/loadbalancer/resurrector.h"

#include <chrono>
#include <memory>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/log.h"
#include "scales/core/timeout_sink.h"
#include "scales/pool/watermark_pool.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using ::testing::HasSubstr;

const Endpoint kEndpoint{"10.3.3.3", 7000};

ResurrectorOptions Backoff(Duration initial, Duration max, double multiplier, double jitter) {
  ResurrectorOptions o;
  o.initial_backoff = initial;
  o.max_backoff = max;
  o.multiplier = multiplier;
  o.jitter = jitter;
  return o;
}

class ResurrectorTest : public ::testing::Test {
 protected:
  // The child opened, then faulted; one backoff (1 s) later the reconnect candidate
  // (factory_.at(1)) is still connecting (OpenMode::kHang).
  void StartHangingReconnect() {
    Build(Backoff(seconds(1), seconds(30), 2.0, 0.0));
    ASSERT_FALSE(Open());
    factory_.open_mode = FakeTransport::OpenMode::kHang;
    factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
    env_.Run();
    env_.Advance(seconds(1));
    ASSERT_EQ(factory_.count(), 2u);
  }

  ResurrectorTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  // dispatcher -> timeout -> resurrector -> (fake | `child_factory`)
  void Build(ResurrectorOptions options, SinkFactory child_factory = nullptr) {
    if (!child_factory) child_factory = factory_.AsFactory();
    resurrector_ = std::make_shared<ResurrectorSink>(
        test::MakeContext(env_.loop(), env_.scope, nullptr, kEndpoint), std::move(child_factory), options);
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), resurrector_, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, seconds(100), env_.scope);
  }

  error_code Open() {
    error_code result = make_error_code(Errc::kProtocolError);
    int done = 0;
    resurrector_->AsyncOpen([&](error_code ec) {
      result = ec;
      ++done;
    });
    env_.Run();
    EXPECT_EQ(done, 1);
    return result;
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    resurrector_.reset();
    env_.Run();
    factory_.Clear();
  }

  size_t Start() { return calls_.Start(*dispatcher_); }

  // Advances in `step`s until a new child has been created (a reconnect attempt), at most
  // `limit`; returns the time of the attempt, or nullopt.
  std::optional<TimePoint> AdvanceUntilAttempt(Duration limit, Duration step = milliseconds(1)) {
    const size_t before = factory_.count();
    const TimePoint end = env_.Now() + limit;
    while (env_.Now() < end) {
      env_.Advance(std::min(step, end - env_.Now()));
      if (factory_.count() > before) return env_.Now();
    }
    return std::nullopt;
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<ResurrectorSink> resurrector_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(ResurrectorTest, PassesRequestsAndStatusThrough) {
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.5));
  EXPECT_EQ(resurrector_->status(), SinkStatus::kIdle);
  EXPECT_FALSE(Open());
  EXPECT_EQ(resurrector_->status(), SinkStatus::kOpen);
  auto a = Start();
  env_.Run();
  ASSERT_EQ(factory_.count(), 1u);
  factory_.at(0).Reply(0, 12);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 12);
  factory_.at(0).set_status(SinkStatus::kBusy);
  EXPECT_EQ(resurrector_->status(), SinkStatus::kBusy);
}

TEST_F(ResurrectorTest, FaultMarksDownAndRequestsFailFast) {
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.5));
  ASSERT_FALSE(Open());
  auto in_flight = Start();
  env_.Run();
  FakeTransport& child = factory_.at(0);
  ASSERT_EQ(child.in_flight(), 1u);

  child.RaiseFault(make_error_code(Errc::kConnectionClosed), "connection to 10.3.3.3:7000 reset");
  EXPECT_FALSE(resurrector_->down());  // handled on a later turn, not inside the child
  env_.Run();
  EXPECT_TRUE(resurrector_->down());
  EXPECT_EQ(resurrector_->status(), SinkStatus::kClosed);
  EXPECT_EQ(env_.CounterValue("scales_endpoint_marked_down"), 1);

  auto b = Start();
  env_.Run();
  EXPECT_EQ(calls_[b].error, Errc::kFailedFast);
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("10.3.3.3:7000"));
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("marked down"));
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("reset"));
  EXPECT_EQ(env_.CounterValue("scales_endpoint_failed_fast"), 1);
  EXPECT_EQ(child.total_requests(), 1u);  // the fast failure never reached it

  // The request already on the faulted child finishes there; then the child is closed.
  EXPECT_EQ(child.close_calls(), 0u);
  child.Reply(0, 5);
  env_.Run();
  EXPECT_EQ(calls_[in_flight].value, 5);
  EXPECT_EQ(child.close_calls(), 1u);

  // More faults while down change nothing.
  child.RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  EXPECT_EQ(env_.CounterValue("scales_endpoint_marked_down"), 1);
}

TEST_F(ResurrectorTest, IdleChildIsClosedAtOnceOnFault) {
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.5));
  ASSERT_FALSE(Open());
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  EXPECT_TRUE(resurrector_->down());
  EXPECT_EQ(factory_.at(0).close_calls(), 1u);
}

TEST_F(ResurrectorTest, FailedOpenMarksDown) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.5));
  EXPECT_EQ(Open(), Errc::kConnectFailed);
  EXPECT_TRUE(resurrector_->down());
  EXPECT_EQ(resurrector_->status(), SinkStatus::kClosed);
  // While down, open reports the last error at once.
  EXPECT_EQ(Open(), Errc::kConnectFailed);
  auto a = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kFailedFast);
}

// With a log level set, marking down and coming back up are logged (client, endpoint, why);
// with the default level (off) nothing is.
TEST_F(ResurrectorTest, MarkDownAndUpAreLogged) {
  std::vector<std::pair<LogLevel, std::string>> records;
  const LogLevel old_level = SetLogLevel(LogLevel::kInfo);
  LogSink old_sink = SetLogSink([&](const LogRecord& r) { records.emplace_back(r.level, std::string(r.message)); });
  Build(Backoff(seconds(1), seconds(4), 2.0, 0.0));
  ASSERT_FALSE(Open());
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  ASSERT_TRUE(resurrector_->down());
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].first, LogLevel::kWarning);
  EXPECT_THAT(records[0].second, ::testing::HasSubstr("endpoint " + kEndpoint.ToString() + " marked down"));
  env_.clock->Advance(seconds(1));
  env_.Run();
  ASSERT_FALSE(resurrector_->down());
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].first, LogLevel::kInfo);
  EXPECT_THAT(records[1].second, ::testing::HasSubstr("is up again"));
  SetLogLevel(LogLevel::kOff);
  factory_.at(factory_.count() - 1).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  EXPECT_TRUE(resurrector_->down());
  EXPECT_EQ(records.size(), 2u) << "logged while the level was off";
  SetLogSink(std::move(old_sink));
  SetLogLevel(old_level);
}

TEST_F(ResurrectorTest, ExponentialBackoffWithoutJitterIsExact) {
  Build(Backoff(seconds(1), seconds(4), 2.0, 0.0));
  ASSERT_FALSE(Open());
  factory_.open_mode = FakeTransport::OpenMode::kFail;  // every reconnect fails
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  ASSERT_TRUE(resurrector_->down());
  EXPECT_EQ(resurrector_->current_backoff(), seconds(1));

  // Delays 1 s, 2 s, 4 s, then capped at 4 s.
  const std::vector<Duration> expected = {seconds(1), seconds(2), seconds(4), seconds(4), seconds(4)};
  size_t attempts = 1;  // the original child
  for (Duration d : expected) {
    env_.Advance(d - nanoseconds(1));
    EXPECT_EQ(factory_.count(), attempts) << "attempt before its delay " << d.count();
    env_.Advance(nanoseconds(1));
    ++attempts;
    EXPECT_EQ(factory_.count(), attempts) << "no attempt after delay " << d.count();
    EXPECT_EQ(factory_.last().open_calls(), 1u);
    EXPECT_EQ(factory_.last().close_calls(), 1u);  // the failed candidate is closed
  }
  EXPECT_EQ(resurrector_->current_backoff(), seconds(4));
  EXPECT_EQ(env_.CounterValue("scales_endpoint_reconnect_attempts"), 5);
  EXPECT_TRUE(resurrector_->down());
}

TEST_F(ResurrectorTest, JitteredBackoffStaysWithinItsBounds) {
  const double kJitter = 0.5;
  Build(Backoff(seconds(1), seconds(8), 2.0, kJitter));
  ASSERT_FALSE(Open());
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  TimePoint last = env_.Now();

  const std::vector<Duration> nominal = {seconds(1), seconds(2), seconds(4), seconds(8), seconds(8), seconds(8)};
  std::vector<Duration> measured;
  for (Duration d : nominal) {
    const auto lo = std::chrono::duration_cast<Duration>(d * (1.0 - kJitter));
    // No attempt before d * (1 - jitter)...
    const size_t before = factory_.count();
    env_.Advance(lo - nanoseconds(1));
    ASSERT_EQ(factory_.count(), before) << "attempt earlier than " << lo.count() << " ns";
    // ... and one by d (found within the 1 ms stepping).
    auto at = AdvanceUntilAttempt(d - lo + milliseconds(1));
    ASSERT_TRUE(at.has_value()) << "no attempt within " << d.count() << " ns";
    measured.push_back(*at - last);
    last = *at;
  }
  // The draws are spread over the window, not always at its end.
  size_t below_nominal = 0;
  for (size_t i = 0; i < measured.size(); ++i) {
    if (measured[i] + milliseconds(1) < nominal[i]) ++below_nominal;
  }
  EXPECT_GE(below_nominal, 3u);
}

TEST_F(ResurrectorTest, SuccessfulReconnectMarksUpAndRequestsFlow) {
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.0));
  ASSERT_FALSE(Open());
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  env_.Advance(seconds(1));  // attempt 1 fails
  ASSERT_EQ(factory_.count(), 2u);
  EXPECT_EQ(resurrector_->current_backoff(), seconds(2));

  factory_.open_mode = FakeTransport::OpenMode::kSucceed;
  env_.Advance(seconds(2));  // attempt 2 succeeds
  ASSERT_EQ(factory_.count(), 3u);
  EXPECT_FALSE(resurrector_->down());
  EXPECT_EQ(resurrector_->status(), SinkStatus::kOpen);  // the new child's status
  EXPECT_EQ(resurrector_->current_backoff(), seconds(1));  // reset
  auto a = Start();
  env_.Run();
  FakeTransport& fresh = factory_.at(2);
  ASSERT_EQ(fresh.in_flight(), 1u);
  fresh.Reply(0, 8);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 8);
  // No more attempts are scheduled.
  env_.Advance(seconds(100));
  EXPECT_EQ(factory_.count(), 3u);

  // The new child is watched: a fault marks the endpoint down again, with a fresh backoff.
  fresh.RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  EXPECT_TRUE(resurrector_->down());
  EXPECT_EQ(env_.CounterValue("scales_endpoint_marked_down"), 2);
  env_.Advance(seconds(1));
  EXPECT_EQ(factory_.count(), 4u);
  EXPECT_FALSE(resurrector_->down());
}

TEST_F(ResurrectorTest, CloseWhileDownStopsReconnecting) {
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.0));
  ASSERT_FALSE(Open());
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  resurrector_->Close();
  EXPECT_EQ(resurrector_->status(), SinkStatus::kClosed);
  env_.Advance(seconds(60));
  EXPECT_EQ(factory_.count(), 1u);
  auto a = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kClientClosed);
  EXPECT_EQ(Open(), Errc::kClientClosed);
}

TEST_F(ResurrectorTest, CloseDuringAReconnectAttemptClosesTheCandidate) {
  ASSERT_NO_FATAL_FAILURE(StartHangingReconnect());
  resurrector_->Close();
  factory_.at(1).CompleteOpen();  // the candidate opens after all
  env_.Run();
  EXPECT_GE(factory_.at(1).close_calls(), 1u);
  EXPECT_EQ(resurrector_->status(), SinkStatus::kClosed);
}

// Close() while a reconnect attempt is still connecting stops that attempt at once: the
// candidate must not go on connecting (and hold its socket) after the endpoint is closed.
TEST_F(ResurrectorTest, CloseDuringAHangingReconnectClosesTheCandidateAtOnce) {
  ASSERT_NO_FATAL_FAILURE(StartHangingReconnect());
  ASSERT_EQ(factory_.at(1).pending_opens(), 1u);
  resurrector_->Close();
  EXPECT_EQ(factory_.at(1).close_calls(), 1u);
  EXPECT_EQ(factory_.at(1).pending_opens(), 0u);
  env_.Run();
  EXPECT_EQ(resurrector_->status(), SinkStatus::kClosed);
  EXPECT_EQ(factory_.count(), 2u);  // and no further attempt
}

// A large multiplier (valid: >= 1) takes the delay straight to max_backoff; the product must
// not overflow the duration into a negative delay (a reconnect loop without backoff).
TEST_F(ResurrectorTest, HugeMultiplierCapsAtMaxBackoff) {
  Build(Backoff(seconds(10), seconds(60), 1e10, 0.0));
  ASSERT_FALSE(Open());
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  env_.Advance(seconds(10));
  ASSERT_EQ(factory_.count(), 2u);  // the first reconnect, failed
  EXPECT_EQ(resurrector_->current_backoff(), seconds(60));
  env_.Advance(seconds(60) - nanoseconds(1));
  EXPECT_EQ(factory_.count(), 2u) << "reconnected before max_backoff";
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(factory_.count(), 3u);
  EXPECT_EQ(resurrector_->current_backoff(), seconds(60));
}

// Built directly (not through ResurrectorProvider), the sink validates its options too, as
// the failure accrual and aperture sinks do: a zero initial_backoff used to be taken, and an
// endpoint whose connects fail was then reconnected on every loop turn (0 x multiplier = 0).
TEST_F(ResurrectorTest, ConstructorRejectsUnusableOptions) {
  auto ctx = test::MakeContext(env_.loop(), env_.scope, nullptr, kEndpoint);
  try {
    ResurrectorSink sink(ctx, factory_.AsFactory(), Backoff(Duration::zero(), seconds(30), 2.0, 0.0));
    ADD_FAILURE() << "no exception";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), make_error_code(Errc::kInvalidArgument));
    EXPECT_THAT(e.what(), HasSubstr("resurrector.initial_backoff"));
  }
  EXPECT_THROW(ResurrectorSink(ctx, factory_.AsFactory(), Backoff(seconds(1), seconds(30), 0.5, 0.0)), Error);
  EXPECT_EQ(factory_.count(), 0u);
}

TEST_F(ResurrectorTest, CloseAnswersRequestsOnARetiredChild) {
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.0));
  ASSERT_FALSE(Open());
  auto a = Start();
  env_.Run();
  factory_.at(0).RaiseFault(make_error_code(Errc::kConnectionClosed));
  env_.Run();
  ASSERT_EQ(factory_.at(0).in_flight(), 1u);  // retired but draining
  dispatcher_->Close();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectionClosed);
}

// Over a real WatermarkPool: the pool's failed connect is the fault that marks the endpoint
// down; the reconnect builds a new pool whose open makes a new connection.
TEST_F(ResurrectorTest, PoolConnectFailureMarksTheEndpointDown) {
  WatermarkPoolOptions pool_options;
  pool_options.low_watermark = 1;
  pool_options.high_watermark = 2;
  std::vector<std::shared_ptr<WatermarkPool>> pools;
  SinkFactory pool_factory = [&](const SinkContext& ctx) -> SinkPtr {
    auto p = std::make_shared<WatermarkPool>(ctx, factory_.AsFactory(), pool_options);
    pools.push_back(p);
    return p;
  };
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  Build(Backoff(seconds(1), seconds(30), 2.0, 0.0), pool_factory);
  auto a = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectFailed);  // the request that hit the failed connect
  EXPECT_TRUE(resurrector_->down());
  auto b = Start();
  env_.Run();
  EXPECT_EQ(calls_[b].error, Errc::kFailedFast);
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("connect to 10.3.3.3:7000 failed"));
  ASSERT_EQ(pools.size(), 1u);
  EXPECT_EQ(pools[0]->status(), SinkStatus::kClosed);  // the faulted pool was closed

  factory_.open_mode = FakeTransport::OpenMode::kSucceed;
  env_.Advance(seconds(1));
  ASSERT_EQ(pools.size(), 2u);
  EXPECT_FALSE(resurrector_->down());
  EXPECT_EQ(pools[1]->idle(), 1u);  // opened with one connection
  auto c = Start();
  env_.Run();
  ASSERT_EQ(factory_.last().in_flight(), 1u);
  factory_.last().Reply(0, 21);
  env_.Run();
  EXPECT_EQ(calls_[c].value, 21);
  dispatcher_->Close();
  env_.Run();
  pools.clear();
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// The resurrector's owner (a balancer node, a closing client) may drop it while its child's
// open is still pending: the open's completion must neither touch the destroyed resurrector
// nor be lost (the caller's handler still runs exactly once).
TEST(ResurrectorLifetimeTest, OpenCompletingAfterTheResurrectorIsGone) {
  test::ManualEnv env;
  FakeTransportFactory factory(env.loop());
  factory.open_mode = FakeTransport::OpenMode::kHang;
  auto resurrector = std::make_shared<ResurrectorSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, kEndpoint), factory.AsFactory(),
      Backoff(seconds(1), seconds(30), 2.0, 0.5));
  int done = 0;
  error_code result;
  resurrector->AsyncOpen([&](error_code ec) {
    result = ec;
    ++done;
  });
  env.Run();
  ASSERT_EQ(factory.count(), 1u);
  FakeTransport& child = factory.at(0);  // the factory keeps it alive, as a pending connect would
  resurrector.reset();
  env.Run();
  child.CompleteOpen(make_error_code(Errc::kConnectFailed));
  env.Run();
  EXPECT_EQ(done, 1);
  EXPECT_EQ(result, Errc::kConnectFailed);
}

}  // namespace
}  // namespace scales
