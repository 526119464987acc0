// WatermarkPool over fake connections, behind a dispatcher and a TimeoutSink: reuse,
// watermarks, the FIFO queue and its limit, deadlines while queued or connecting, dead
// connections, connect failures, idle expiry and Close.

#include "scales/pool/watermark_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include <boost/system/errc.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/random.h"
#include "scales/core/timeout_sink.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using ::testing::HasSubstr;

const Endpoint kEndpoint{"10.1.1.1", 8080};

WatermarkPoolOptions Options(size_t low, size_t high, size_t max_waiters = 100,
                             Duration idle_timeout = seconds(60)) {
  WatermarkPoolOptions o;
  o.low_watermark = low;
  o.high_watermark = high;
  o.max_waiters = max_waiters;
  o.idle_timeout = idle_timeout;
  return o;
}

class WatermarkPoolTest : public ::testing::Test {
 protected:
  WatermarkPoolTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  void Build(WatermarkPoolOptions options, Duration timeout = seconds(10)) {
    pool_ = std::make_shared<WatermarkPool>(test::MakeContext(env_.loop(), env_.scope, nullptr, kEndpoint),
                                            factory_.AsFactory(), options);
    fault_sub_ = pool_->on_faulted().Subscribe([this](const Fault& f) { faults_.push_back(f); });
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), pool_, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, timeout, env_.scope);
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    pool_.reset();
    env_.Run();
    // The pool's gauges return to zero once it is gone.
    EXPECT_EQ(env_.GaugeValue("scales_pool_size"), 0);
    EXPECT_EQ(env_.GaugeValue("scales_pool_idle"), 0);
    EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 0);
    factory_.Clear();
  }

  size_t Start(std::optional<Duration> timeout = std::nullopt) { return calls_.Start(*dispatcher_, timeout); }
  // Answers every request the fakes hold with `value`.
  void ReplyAll(int value = 0) {
    for (size_t i = 0; i < factory_.count(); ++i) {
      while (factory_.at(i).in_flight() > 0) factory_.at(i).Reply(0, value);
    }
    env_.Run();
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<WatermarkPool> pool_;
  uint64_t fault_sub_ = 0;
  std::vector<Fault> faults_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(WatermarkPoolTest, ReusesAnIdleConnection) {
  Build(Options(1, 4));
  EXPECT_EQ(pool_->status(), SinkStatus::kIdle);
  auto a = Start();
  env_.Run();
  ASSERT_EQ(factory_.count(), 1u);
  EXPECT_EQ(factory_.at(0).open_calls(), 1u);
  EXPECT_EQ(factory_.at(0).endpoint(), kEndpoint);
  factory_.at(0).Reply(0, 1);
  env_.Run();
  EXPECT_EQ(pool_->size(), 1u);
  EXPECT_EQ(pool_->idle(), 1u);
  EXPECT_EQ(env_.GaugeValue("scales_pool_idle"), 1);
  auto b = Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 1u);  // no new connection
  EXPECT_EQ(factory_.at(0).total_requests(), 2u);
  EXPECT_EQ(pool_->idle(), 0u);
  factory_.at(0).Reply(0, 2);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 1);
  EXPECT_EQ(calls_[b].value, 2);
  EXPECT_EQ(pool_->status(), SinkStatus::kOpen);
}

TEST_F(WatermarkPoolTest, OpenPreparesOneIdleConnection) {
  Build(Options(1, 4));
  int opened = 0;
  error_code result = make_error_code(Errc::kProtocolError);
  pool_->AsyncOpen([&](error_code ec) {
    ++opened;
    result = ec;
  });
  pool_->AsyncOpen([&](error_code ec) { ++opened; EXPECT_FALSE(ec); });  // concurrent open
  EXPECT_EQ(opened, 0);
  env_.Run();
  EXPECT_EQ(opened, 2);
  EXPECT_FALSE(result);
  EXPECT_EQ(factory_.count(), 1u);
  EXPECT_EQ(pool_->idle(), 1u);
  Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 1u);
  ReplyAll();
}

TEST_F(WatermarkPoolTest, RequestQueuedBehindAnOpenAtTheHighWatermark) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Options(1, 1));
  error_code open_result = make_error_code(Errc::kProtocolError);
  pool_->AsyncOpen([&](error_code ec) { open_result = ec; });
  env_.Run();
  ASSERT_EQ(factory_.count(), 1u);
  auto a = Start();  // the only connection is still opening: wait for it
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 1u);
  factory_.at(0).CompleteOpen();
  env_.Run();
  EXPECT_FALSE(open_result);
  EXPECT_EQ(pool_->waiters(), 0u);
  ASSERT_EQ(factory_.at(0).in_flight(), 1u);
  factory_.at(0).Reply(0, 3);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 3);
}

TEST_F(WatermarkPoolTest, OpenWaitsForAConnectStartedByARequest) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Options(1, 2));
  auto a = Start();
  env_.Run();
  int opened = 0;
  pool_->AsyncOpen([&](error_code ec) { opened += !ec; });
  env_.Run();
  EXPECT_EQ(opened, 0);
  EXPECT_EQ(factory_.count(), 1u);  // no second connect for the open
  factory_.at(0).CompleteOpen();
  env_.Run();
  EXPECT_EQ(opened, 1);
  factory_.at(0).Reply(0, 1);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 1);
}

TEST_F(WatermarkPoolTest, OpensNewConnectionsUpToTheHighWatermarkThenQueues) {
  Build(Options(1, 3));
  for (int i = 0; i < 5; ++i) Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 3u);
  EXPECT_EQ(pool_->size(), 3u);
  EXPECT_EQ(pool_->waiters(), 2u);
  EXPECT_EQ(env_.GaugeValue("scales_pool_size"), 3);
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 2);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(factory_.at(i).in_flight(), 1u);
  // A released connection serves the queue instead of going idle.
  factory_.at(1).Reply(0, 0);
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 1u);
  EXPECT_EQ(factory_.at(1).in_flight(), 1u);
  EXPECT_EQ(pool_->idle(), 0u);
  EXPECT_EQ(factory_.count(), 3u);
  ReplyAll();
  ReplyAll();
  EXPECT_EQ(pool_->idle(), 3u);
}

TEST_F(WatermarkPoolTest, QueueIsFifo) {
  Build(Options(1, 1));
  std::vector<size_t> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(Start());
  env_.Run();
  ASSERT_EQ(factory_.count(), 1u);
  EXPECT_EQ(pool_->waiters(), 4u);
  for (int k = 0; k < 5; ++k) {
    ASSERT_EQ(factory_.at(0).in_flight(), 1u);
    factory_.at(0).Reply(0, 100 + k);
    env_.Run();
  }
  for (int k = 0; k < 5; ++k) EXPECT_EQ(calls_[ids[k]].value, 100 + k) << k;
}

// A connection that frees while many requests are queued serves them one after the other. One
// that answers them at once, inside AsyncProcessRequest (a oneway Thrift request written in one
// send, a request the HTTP transport refuses to send), must not take the next waiter from inside
// that answer: the stack grew by a request's whole path per queued request (about 270 bytes each
// in a release build), and a long queue (max_waiters) overflowed it.
TEST_F(WatermarkPoolTest, QueuedRequestsAnsweredAtOnceDoNotNestOnTheStack) {
  constexpr int kQueued = 2000;
  Build(Options(1, 1, /*max_waiters=*/kQueued));
  Start();
  std::vector<uintptr_t> frames;
  for (int i = 0; i < kQueued; ++i) {
    auto* call = new TypedCall<int>([&frames](error_code, int) {
      frames.push_back(reinterpret_cast<uintptr_t>(__builtin_frame_address(0)));
    });
    dispatcher_->Dispatch(call, /*initiating=*/true);
  }
  env_.Run();
  ASSERT_EQ(pool_->waiters(), static_cast<size_t>(kQueued));
  factory_.at(0).set_auto_reply(7);  // answers each next request inside AsyncProcessRequest
  factory_.at(0).Reply(0, 1);
  env_.Run();
  ASSERT_EQ(frames.size(), static_cast<size_t>(kQueued));
  EXPECT_EQ(pool_->waiters(), 0u);
  const auto [low, high] = std::minmax_element(frames.begin(), frames.end());
  EXPECT_LT(*high - *low, 64u * 1024) << "the answers nest: " << (*high - *low) << " bytes of stack for "
                                      << kQueued << " queued requests";
}

TEST_F(WatermarkPoolTest, FullQueueFailsWithPoolQueueFull) {
  Build(Options(1, 1, /*max_waiters=*/1));
  auto a = Start();
  auto b = Start();
  auto c = Start();
  env_.Run();
  EXPECT_FALSE(calls_.done(a));
  EXPECT_FALSE(calls_.done(b));
  EXPECT_EQ(calls_[c].error, Errc::kPoolQueueFull);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("max_waiters 1"));
  EXPECT_EQ(env_.CounterValue("scales_pool_queue_full"), 1);
  factory_.at(0).Reply(0, 1);
  env_.Run();
  factory_.at(0).Reply(0, 2);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 1);
  EXPECT_EQ(calls_[b].value, 2);
}

TEST_F(WatermarkPoolTest, ZeroMaxWaitersFailsAtOnceWhenBusy) {
  Build(Options(1, 1, /*max_waiters=*/0));
  Start();
  auto b = Start();
  env_.Run();
  EXPECT_EQ(calls_[b].error, Errc::kPoolQueueFull);
  ReplyAll();
}

TEST_F(WatermarkPoolTest, QueuedRequestTimesOutAndLeavesTheQueue) {
  Build(Options(1, 1), milliseconds(100));
  auto a = Start(seconds(10));
  auto b = Start();  // 100 ms
  auto c = Start(seconds(10));
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 2u);
  env_.Advance(milliseconds(100) - nanoseconds(1));
  EXPECT_FALSE(calls_.done(b));
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(calls_[b].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("queued"));
  EXPECT_EQ(pool_->waiters(), 1u);
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 1);
  // The connection goes to the next waiter, not to the timed-out one.
  factory_.at(0).Reply(0, 1);
  env_.Run();
  ASSERT_EQ(factory_.at(0).in_flight(), 1u);
  factory_.at(0).Reply(0, 3);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 1);
  EXPECT_EQ(calls_[c].value, 3);
  EXPECT_EQ(factory_.at(0).total_requests(), 2u);
}

TEST_F(WatermarkPoolTest, RequestWaitingForConnectTimesOutAndTheConnectionIsKept) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Options(1, 2), milliseconds(100));
  auto a = Start();
  env_.Run();
  ASSERT_EQ(factory_.count(), 1u);
  env_.Advance(milliseconds(100));
  EXPECT_EQ(calls_[a].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[a].info.detail, HasSubstr("connecting"));
  // The connect finishes later: the connection becomes idle and serves the next request.
  factory_.at(0).CompleteOpen();
  env_.Run();
  EXPECT_EQ(factory_.at(0).total_requests(), 0u);
  EXPECT_EQ(pool_->idle(), 1u);
  factory_.open_mode = FakeTransport::OpenMode::kSucceed;
  auto b = Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 1u);
  ReplyAll(5);
  EXPECT_EQ(calls_[b].value, 5);
}

TEST_F(WatermarkPoolTest, TimeoutOnTheWireDropsAConnectionThatCloses) {
  factory_.on_create = [](FakeTransport& f) { f.set_close_on_cancel(true); };
  Build(Options(1, 1), milliseconds(100));
  auto a = Start();
  auto b = Start(seconds(10));
  env_.Run();
  env_.Advance(milliseconds(100));
  EXPECT_EQ(calls_[a].error, Errc::kRequestTimeout);
  EXPECT_EQ(factory_.at(0).cancels(), 1u);
  // The dead connection was dropped and the waiter got a new one.
  ASSERT_EQ(factory_.count(), 2u);
  EXPECT_EQ(pool_->size(), 1u);
  ReplyAll(2);
  EXPECT_EQ(calls_[b].value, 2);
}

TEST_F(WatermarkPoolTest, DeadConnectionOnReleaseIsDroppedNotThePool) {
  Build(Options(1, 2));
  auto a = Start();
  env_.Run();
  factory_.at(0).set_status(SinkStatus::kClosed);  // the server closed it
  factory_.at(0).Reply(0, 1);
  env_.Run();
  EXPECT_EQ(calls_[a].value, 1);
  EXPECT_EQ(pool_->size(), 0u);
  EXPECT_EQ(pool_->idle(), 0u);
  EXPECT_NE(pool_->status(), SinkStatus::kClosed);
  EXPECT_TRUE(faults_.empty());
  auto b = Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 2u);
  ReplyAll(2);
  EXPECT_EQ(calls_[b].value, 2);
}

TEST_F(WatermarkPoolTest, DeadConnectionOnReleaseIsReplacedForAWaiter) {
  Build(Options(1, 1));
  Start();
  auto b = Start();
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 1u);
  factory_.at(0).set_status(SinkStatus::kClosed);
  factory_.at(0).Reply(0, 1);
  env_.Run();
  ASSERT_EQ(factory_.count(), 2u);
  EXPECT_EQ(pool_->waiters(), 0u);
  EXPECT_EQ(factory_.at(1).in_flight(), 1u);
  ReplyAll(2);
  EXPECT_EQ(calls_[b].value, 2);
}

TEST_F(WatermarkPoolTest, ConnectionThatDiedWhileIdleIsSkipped) {
  Build(Options(2, 4));
  Start();
  Start();
  env_.Run();
  ReplyAll();
  ASSERT_EQ(pool_->idle(), 2u);
  factory_.at(1).set_status(SinkStatus::kClosed);  // the most recently released one
  auto c = Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 2u);
  EXPECT_EQ(factory_.at(0).in_flight(), 1u);
  EXPECT_EQ(pool_->size(), 1u);
  ReplyAll(4);
  EXPECT_EQ(calls_[c].value, 4);
}

TEST_F(WatermarkPoolTest, ConnectFailureFailsTheRequestAndRaisesAFault) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = boost::system::errc::make_error_code(boost::system::errc::connection_refused);
  Build(Options(1, 4));
  auto a = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectFailed);
  EXPECT_THAT(calls_[a].info.detail, HasSubstr("10.1.1.1:8080"));
  ASSERT_EQ(faults_.size(), 1u);
  EXPECT_EQ(faults_[0].error, Errc::kConnectFailed);
  EXPECT_THAT(faults_[0].detail, HasSubstr("10.1.1.1:8080"));
  EXPECT_EQ(env_.CounterValue("scales_pool_connect_failures"), 1);
  EXPECT_EQ(pool_->size(), 0u);
  EXPECT_NE(pool_->status(), SinkStatus::kClosed);
  // The next request tries again.
  factory_.open_mode = FakeTransport::OpenMode::kSucceed;
  auto b = Start();
  env_.Run();
  ReplyAll(9);
  EXPECT_EQ(calls_[b].value, 9);
}

TEST_F(WatermarkPoolTest, ConnectTimeoutKeepsItsCode) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectTimeout);
  Build(Options(1, 4));
  auto a = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectTimeout);
  EXPECT_THAT(calls_[a].info.detail, HasSubstr("timed out"));
  ASSERT_EQ(faults_.size(), 1u);
  EXPECT_EQ(faults_[0].error, Errc::kConnectTimeout);
}

TEST_F(WatermarkPoolTest, ConnectFailureFailsOpenToo) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  Build(Options(1, 4));
  error_code result;
  pool_->AsyncOpen([&](error_code ec) { result = ec; });
  env_.Run();
  EXPECT_EQ(result, Errc::kConnectFailed);
  EXPECT_EQ(faults_.size(), 1u);
}

TEST_F(WatermarkPoolTest, ConnectFailureRetriesForQueuedRequests) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Options(1, 1));
  auto a = Start();
  auto b = Start();
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 1u);
  factory_.at(0).CompleteOpen(make_error_code(Errc::kConnectFailed));
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectFailed);
  // The waiter gets its own connection attempt.
  ASSERT_EQ(factory_.count(), 2u);
  EXPECT_FALSE(calls_.done(b));
  factory_.at(1).CompleteOpen();
  env_.Run();
  ReplyAll(6);
  EXPECT_EQ(calls_[b].value, 6);
}

TEST_F(WatermarkPoolTest, IdleConnectionsAboveTheLowWatermarkExpire) {
  Build(Options(1, 3, 100, seconds(60)));
  for (int i = 0; i < 3; ++i) Start();
  env_.Run();
  ASSERT_EQ(factory_.count(), 3u);
  ReplyAll();
  EXPECT_EQ(pool_->idle(), 3u);
  env_.Advance(seconds(60) - nanoseconds(1));
  EXPECT_EQ(pool_->size(), 3u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(pool_->size(), 1u);
  EXPECT_EQ(pool_->idle(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_pool_idle_expired"), 2);
  // The longest idle ones went; the most recently used one stays, for good.
  EXPECT_EQ(factory_.at(0).close_calls(), 1u);
  EXPECT_EQ(factory_.at(1).close_calls(), 1u);
  EXPECT_EQ(factory_.at(2).close_calls(), 0u);
  env_.Advance(std::chrono::hours(10));
  EXPECT_EQ(pool_->size(), 1u);
  EXPECT_EQ(factory_.at(2).close_calls(), 0u);
  Start();
  env_.Run();
  EXPECT_EQ(factory_.at(2).in_flight(), 1u);
  ReplyAll();
}

TEST_F(WatermarkPoolTest, IdleExpiryFollowsEachConnectionsOwnIdleTime) {
  Build(Options(1, 3, 100, seconds(60)));
  for (int i = 0; i < 3; ++i) Start();
  env_.Run();
  factory_.at(0).Reply(0, 0);
  env_.Advance(seconds(10));
  factory_.at(1).Reply(0, 0);
  env_.Advance(seconds(10));
  factory_.at(2).Reply(0, 0);
  env_.Run();
  // conn0 idle since t, conn1 since t+10, conn2 since t+20; now t+20.
  env_.Advance(seconds(40) - nanoseconds(1));
  EXPECT_EQ(pool_->size(), 3u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(pool_->size(), 2u);
  EXPECT_EQ(factory_.at(0).close_calls(), 1u);
  env_.Advance(seconds(10) - nanoseconds(1));
  EXPECT_EQ(pool_->size(), 2u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(pool_->size(), 1u);
  EXPECT_EQ(factory_.at(1).close_calls(), 1u);
  env_.Advance(seconds(100));
  EXPECT_EQ(pool_->size(), 1u);
}

TEST_F(WatermarkPoolTest, ReuseRestartsTheIdleClock) {
  Build(Options(0, 2, 100, seconds(60)));
  Start();
  env_.Run();
  ReplyAll();  // idle since t
  env_.Advance(seconds(30));
  Start();
  env_.Run();
  EXPECT_EQ(factory_.count(), 1u);
  env_.Advance(seconds(10));
  ReplyAll();  // idle since t+40
  env_.Advance(seconds(20));  // t+60: the first idle period would have ended here
  EXPECT_EQ(pool_->size(), 1u);
  env_.Advance(seconds(40) - nanoseconds(1));
  EXPECT_EQ(pool_->size(), 1u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(pool_->size(), 0u);  // low watermark 0: even the last one goes
  EXPECT_EQ(factory_.at(0).close_calls(), 1u);
}

TEST_F(WatermarkPoolTest, BusyConnectionsDoNotExpire) {
  Build(Options(0, 2, 100, seconds(60)), /*timeout=*/Duration::zero());
  Start();
  Start();
  env_.Run();
  factory_.at(0).Reply(0, 0);
  env_.Run();
  env_.Advance(seconds(120));
  // conn0 expired; conn1 still has its request.
  EXPECT_EQ(pool_->size(), 1u);
  EXPECT_EQ(factory_.at(1).close_calls(), 0u);
  EXPECT_EQ(factory_.at(1).in_flight(), 1u);
  ReplyAll();
}

TEST_F(WatermarkPoolTest, CloseFailsQueuedRequestsAndAnswersInFlight) {
  Build(Options(1, 1));
  auto a = Start();
  auto b = Start();
  auto c = Start();
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 2u);
  dispatcher_->Close();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectionClosed);  // answered by the closing connection
  EXPECT_EQ(calls_[b].error, Errc::kClientClosed);
  EXPECT_EQ(calls_[c].error, Errc::kClientClosed);
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("queued"));
  EXPECT_EQ(pool_->status(), SinkStatus::kClosed);
  EXPECT_EQ(pool_->waiters(), 0u);
  EXPECT_EQ(pool_->size(), 0u);
  EXPECT_GE(factory_.at(0).close_calls(), 1u);
}

TEST_F(WatermarkPoolTest, CloseWhileConnecting) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Options(1, 2));
  auto a = Start();
  env_.Run();
  error_code open_result;
  pool_->AsyncOpen([&](error_code ec) { open_result = ec; });
  pool_->Close();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kClientClosed);
  EXPECT_EQ(open_result, Errc::kClientClosed);
  EXPECT_GE(factory_.at(0).close_calls(), 1u);
  EXPECT_EQ(pool_->size(), 0u);
  auto b = Start();
  env_.Run();
  EXPECT_EQ(calls_[b].error, Errc::kClientClosed);
}

TEST_F(WatermarkPoolTest, CloseClosesIdleConnections) {
  Build(Options(2, 4));
  Start();
  Start();
  env_.Run();
  ReplyAll();
  EXPECT_EQ(pool_->idle(), 2u);
  pool_->Close();
  EXPECT_EQ(pool_->idle(), 0u);
  EXPECT_EQ(pool_->size(), 0u);
  EXPECT_EQ(factory_.at(0).close_calls(), 1u);
  EXPECT_EQ(factory_.at(1).close_calls(), 1u);
  error_code result;
  pool_->AsyncOpen([&](error_code ec) { result = ec; });
  env_.Run();
  EXPECT_EQ(result, Errc::kClientClosed);
}

TEST_F(WatermarkPoolTest, ManyRequestsWithMixedOutcomesCompleteOnce) {
  Build(Options(2, 4, /*max_waiters=*/8), milliseconds(500));
  for (int i = 0; i < 16; ++i) Start();
  env_.Run();
  EXPECT_EQ(pool_->waiters(), 8u);  // 4 on connections, 8 queued, 4 rejected
  EXPECT_EQ(calls_.completed(), 4u);
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < factory_.count(); ++i) {
      if (factory_.at(i).in_flight() > 0) factory_.at(i).Fail(0, make_error_code(Errc::kServerError));
    }
    env_.Run();
  }
  env_.Advance(milliseconds(500));
  EXPECT_EQ(calls_.completed(), 16u);
  EXPECT_TRUE(calls_.AllCompletedOnce());
  EXPECT_EQ(pool_->waiters(), 0u);
}


// Random requests, answers, timeouts, dying connections, failing and slow connects and idle
// expiry. Invariants: a connection never carries two requests, the pool stays within its
// watermarks and queue limit, and every call completes exactly once.
TEST_F(WatermarkPoolTest, RandomOperationsKeepTheInvariants) {
  Random rng(test::TestSeed(7));
  factory_.on_create = [&rng](FakeTransport& f) {
    const uint64_t r = rng.Uniform(10);
    if (r == 0) f.set_open_mode(FakeTransport::OpenMode::kFail, make_error_code(Errc::kConnectFailed));
    if (r == 1) f.set_open_mode(FakeTransport::OpenMode::kHang);
    if (rng.Uniform(4) == 0) f.set_close_on_cancel(true);
  };
  constexpr size_t kHigh = 4, kMaxWaiters = 6;
  Build(Options(2, kHigh, kMaxWaiters, milliseconds(500)), milliseconds(300));
  for (int step = 0; step < 4000; ++step) {
    const uint64_t op = rng.Uniform(100);
    if (op < 35) {
      Start(milliseconds(20 + static_cast<int64_t>(rng.Uniform(600))));
      env_.Run();
    } else if (op < 60) {
      std::vector<FakeTransport*> busy;
      for (auto& f : factory_.created()) {
        if (f->in_flight() > 0) busy.push_back(f.get());
      }
      if (!busy.empty()) {
        FakeTransport* f = busy[rng.Uniform(busy.size())];
        if (rng.Uniform(5) == 0) f->set_status(SinkStatus::kClosed);  // dies with this answer
        if (rng.Uniform(3) == 0) {
          f->Fail(0, make_error_code(Errc::kServerError));
        } else {
          f->Reply(0, 1);
        }
        env_.Run();
      }
    } else if (op < 66) {
      // A slow connect finishes (successfully or not).
      for (auto& f : factory_.created()) {
        if (f->pending_opens() > 0) {
          f->CompleteOpen(rng.Uniform(2) == 0 ? error_code() : make_error_code(Errc::kConnectTimeout));
          break;
        }
      }
      env_.Run();
    } else {
      env_.Advance(milliseconds(static_cast<int64_t>(rng.Uniform(120))));
    }
    ASSERT_LE(pool_->size(), kHigh) << "step " << step;
    ASSERT_LE(pool_->waiters(), kMaxWaiters) << "step " << step;
    for (auto& f : factory_.created()) ASSERT_LE(f->in_flight(), 1u) << "step " << step;
    ASSERT_TRUE(calls_.NoneCompletedTwice()) << "step " << step;
  }
  for (auto& f : factory_.created()) {
    if (f->pending_opens() > 0) f->CompleteOpen();
  }
  env_.Advance(seconds(1));
  EXPECT_EQ(factory_.TotalInFlight(), 0u);
  EXPECT_EQ(pool_->waiters(), 0u);
  EXPECT_TRUE(calls_.AllCompletedOnce());
  EXPECT_GT(calls_.size(), 1000u);
}

}  // namespace
}  // namespace scales
