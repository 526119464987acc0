// SingletonPool over fake children: one shared child, replacement of a dead child, requests
// waiting for the connect, connect failures, cancellation and Close.

#include "scales/pool/singleton_pool.h"

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include <boost/system/errc.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/forwarding_sink.h"
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

const Endpoint kEndpoint{"10.2.2.2", 4000};

// Between the timeout sink and the pool: numbers the requests it passes down (in order), notes
// which were answered, and runs `on_response` inside each response path, before passing it up
// (where a sink such as the backup sink cancels another attempt, or a handler starts a call).
class ResponseHook final : public ForwardingSink {
 public:
  using ForwardingSink::ForwardingSink;
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    const size_t i = stacks.size();
    stacks.push_back(&stack);
    answered.push_back(false);
    stack.Push(this, reinterpret_cast<void*>(i));
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream, MethodReturnMessage& msg) override {
    const auto i = reinterpret_cast<size_t>(context);
    answered[i] = true;
    if (on_response) on_response(i);
    stack.AsyncProcessResponse(stream, msg);
  }
  std::string_view name() const override { return "response-hook"; }

  std::vector<SinkStack*> stacks;
  std::vector<bool> answered;
  std::function<void(size_t)> on_response;
};

class SingletonPoolTest : public ::testing::Test {
 protected:
  SingletonPoolTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  void Build(Duration timeout = seconds(10), SingletonPoolOptions options = {}) {
    pool_ = std::make_shared<SingletonPool>(test::MakeContext(env_.loop(), env_.scope, nullptr, kEndpoint),
                                            factory_.AsFactory(), options);
    pool_->on_faulted().Subscribe([this](const Fault& f) { faults_.push_back(f); });
    hook_ = std::make_shared<ResponseHook>(pool_);
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), hook_, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, timeout, env_.scope);
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 0);
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    hook_.reset();
    pool_.reset();
    env_.Run();
    factory_.Clear();
  }

  size_t Start(std::optional<Duration> timeout = std::nullopt) { return calls_.Start(*dispatcher_, timeout); }
  void ReplyAll(FakeTransport& f, int value) {
    while (f.in_flight() > 0) f.Reply(0, value);
    env_.Run();
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<SingletonPool> pool_;
  std::shared_ptr<ResponseHook> hook_;
  std::vector<Fault> faults_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(SingletonPoolTest, OneChildSharedByConcurrentRequests) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build();
  EXPECT_EQ(pool_->status(), SinkStatus::kIdle);
  for (int i = 0; i < 3; ++i) Start();
  env_.Run();
  EXPECT_EQ(pool_->created(), 1u);
  EXPECT_EQ(factory_.count(), 1u);
  EXPECT_EQ(pool_->waiting(), 3u);
  EXPECT_EQ(factory_.at(0).open_calls(), 1u);
  EXPECT_EQ(pool_->status(), SinkStatus::kIdle);  // opening
  factory_.at(0).CompleteOpen();
  env_.Run();
  EXPECT_EQ(pool_->waiting(), 0u);
  EXPECT_EQ(factory_.at(0).in_flight(), 3u);  // unlimited concurrency on the one child
  EXPECT_EQ(pool_->status(), SinkStatus::kOpen);
  for (int i = 0; i < 5; ++i) Start();
  env_.Run();
  EXPECT_EQ(factory_.at(0).in_flight(), 8u);
  EXPECT_EQ(pool_->created(), 1u);
  ReplyAll(factory_.at(0), 7);
  for (size_t c = 0; c < calls_.size(); ++c) EXPECT_EQ(calls_[c].value, 7);
}

TEST_F(SingletonPoolTest, OpenConnectsOnceForConcurrentOpens) {
  Build();
  int done = 0;
  pool_->AsyncOpen([&](error_code ec) { done += !ec; });
  pool_->AsyncOpen([&](error_code ec) { done += !ec; });
  EXPECT_EQ(done, 0);
  env_.Run();
  EXPECT_EQ(done, 2);
  EXPECT_EQ(pool_->created(), 1u);
  pool_->AsyncOpen([&](error_code ec) { done += !ec; });  // already open
  env_.Run();
  EXPECT_EQ(done, 3);
  EXPECT_EQ(pool_->created(), 1u);
}

TEST_F(SingletonPoolTest, ClosedChildIsReplacedOnTheNextRequest) {
  Build();
  auto a = Start();
  env_.Run();
  FakeTransport& first = factory_.at(0);
  ASSERT_EQ(first.in_flight(), 1u);
  first.set_status(SinkStatus::kClosed);  // the connection died
  EXPECT_EQ(pool_->status(), SinkStatus::kIdle);  // the pool itself stays usable
  auto b = Start();
  env_.Run();
  EXPECT_EQ(pool_->created(), 2u);
  // The old child was closed, which answered what was still on it.
  EXPECT_EQ(first.close_calls(), 1u);
  EXPECT_EQ(calls_[a].error, Errc::kConnectionClosed);
  FakeTransport& second = factory_.at(1);
  ASSERT_EQ(second.in_flight(), 1u);
  ReplyAll(second, 2);
  EXPECT_EQ(calls_[b].value, 2);
}

TEST_F(SingletonPoolTest, FailedChildIsReplacedOnTheNextRequest) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = boost::system::errc::make_error_code(boost::system::errc::connection_refused);
  Build();
  auto a = Start();
  auto b = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectFailed);
  EXPECT_EQ(calls_[b].error, Errc::kConnectFailed);
  EXPECT_THAT(calls_[a].info.detail, HasSubstr("10.2.2.2:4000"));
  ASSERT_EQ(faults_.size(), 1u);  // one connect, one fault
  EXPECT_EQ(faults_[0].error, Errc::kConnectFailed);
  EXPECT_EQ(env_.CounterValue("scales_pool_connect_failures"), 1);
  EXPECT_NE(pool_->status(), SinkStatus::kClosed);
  factory_.open_mode = FakeTransport::OpenMode::kSucceed;
  auto c = Start();
  env_.Run();
  EXPECT_EQ(pool_->created(), 2u);
  ReplyAll(factory_.at(1), 3);
  EXPECT_EQ(calls_[c].value, 3);
}

TEST_F(SingletonPoolTest, ConnectTimeoutKeepsItsCode) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectTimeout);
  Build();
  auto a = Start();
  error_code open_result;
  pool_->AsyncOpen([&](error_code ec) { open_result = ec; });
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectTimeout);
  EXPECT_EQ(open_result, Errc::kConnectTimeout);
  ASSERT_EQ(faults_.size(), 1u);
  EXPECT_EQ(faults_[0].error, Errc::kConnectTimeout);
}

// A Mux session whose server closes the connection during the handshake fails its open with
// kConnectionClosed. The requests waiting for it were never sent: they get the retryable
// kConnectFailed (with the session's detail), not kConnectionClosed, which says the server may
// have processed them and is retried only for idempotent calls.
TEST_F(SingletonPoolTest, AConnectionClosedDuringTheOpenIsAConnectFailure) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectionClosed);
  Build();
  auto a = Start();
  error_code open_result;
  pool_->AsyncOpen([&](error_code ec) { open_result = ec; });
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectFailed);
  EXPECT_EQ(open_result, Errc::kConnectFailed);
  ASSERT_EQ(faults_.size(), 1u);
  EXPECT_EQ(faults_[0].error, Errc::kConnectFailed);
}

TEST_F(SingletonPoolTest, WaitingRequestIsCancelledByItsTimeout) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(milliseconds(100));
  auto a = Start();
  auto b = Start(seconds(10));
  env_.Run();
  EXPECT_EQ(pool_->waiting(), 2u);
  env_.Advance(milliseconds(100) - nanoseconds(1));
  EXPECT_FALSE(calls_.done(a));
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(calls_[a].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[a].info.detail, HasSubstr("connecting"));
  EXPECT_EQ(pool_->waiting(), 1u);
  factory_.at(0).CompleteOpen();
  env_.Run();
  // Only the live request reaches the child.
  EXPECT_EQ(factory_.at(0).total_requests(), 1u);
  ReplyAll(factory_.at(0), 4);
  EXPECT_EQ(calls_[b].value, 4);
}

TEST_F(SingletonPoolTest, RequestsPastMaxWaitersFailAtOnceWithPoolQueueFull) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(seconds(10), SingletonPoolOptions{.max_waiters = 2});
  auto a = Start();
  auto b = Start();
  auto c = Start();
  env_.Run();
  EXPECT_EQ(pool_->waiting(), 2u);
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 2);
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kPoolQueueFull);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("pool for 10.2.2.2:4000 is full: 2 requests wait"));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("(max_waiters 2)"));
  EXPECT_EQ(env_.CounterValue("scales_pool_queue_full"), 1);
  EXPECT_EQ(factory_.count(), 1u);  // one connect for all of them
  factory_.at(0).CompleteOpen();
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 0);
  EXPECT_EQ(factory_.at(0).in_flight(), 2u);
  // Once the session is open the limit does not apply: requests go straight to it.
  for (int i = 0; i < 3; ++i) Start();
  env_.Run();
  EXPECT_EQ(factory_.at(0).in_flight(), 5u);
  ReplyAll(factory_.at(0), 3);
  EXPECT_EQ(calls_[a].value, 3);
  EXPECT_EQ(calls_[b].value, 3);
}

TEST_F(SingletonPoolTest, MaxWaitersZeroFailsRequestsWhileConnectingButStillConnects) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(seconds(10), SingletonPoolOptions{.max_waiters = 0});
  auto a = Start();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kPoolQueueFull);
  ASSERT_EQ(factory_.count(), 1u);  // the refused request still started the connect
  factory_.at(0).CompleteOpen();
  env_.Run();
  auto b = Start();
  env_.Run();
  ReplyAll(factory_.at(0), 9);
  EXPECT_EQ(calls_[b].value, 9);
}

TEST_F(SingletonPoolTest, WaitersGaugeFollowsCancelFailureAndClose) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(milliseconds(100));
  Start();
  Start(seconds(10));
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 2);
  env_.Advance(milliseconds(100));  // the first one's timeout cancels it
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 1);
  factory_.at(0).CompleteOpen(make_error_code(boost::system::errc::connection_refused));
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 0);
  Start(seconds(10));
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 1);
  pool_->Close();
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_pool_waiters"), 0);
}

TEST_F(SingletonPoolTest, CloseWhileConnectingAnswersWaiters) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build();
  auto a = Start();
  env_.Run();
  error_code open_result;
  pool_->AsyncOpen([&](error_code ec) { open_result = ec; });
  pool_->Close();
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kClientClosed);
  EXPECT_EQ(open_result, Errc::kClientClosed);
  EXPECT_EQ(factory_.at(0).close_calls(), 1u);
  EXPECT_EQ(pool_->status(), SinkStatus::kClosed);
  // The child's open ending now (it was closed) changes nothing.
  factory_.at(0).CompleteOpen();
  env_.Run();
  auto b = Start();
  env_.Run();
  EXPECT_EQ(calls_[b].error, Errc::kClientClosed);
  EXPECT_EQ(factory_.at(0).total_requests(), 0u);
}

TEST_F(SingletonPoolTest, CloseAnswersRequestsOnTheChild) {
  Build();
  Start();
  Start();
  env_.Run();
  ASSERT_EQ(factory_.at(0).in_flight(), 2u);
  dispatcher_->Close();
  EXPECT_EQ(factory_.at(0).in_flight(), 0u);
  env_.Run();
  EXPECT_EQ(calls_.completed(), 2u);
  EXPECT_EQ(calls_[0].error, Errc::kConnectionClosed);
}

// Replacing a dead child closes it, which answers the requests still on it; a request started
// inside one of those answers (a handler chaining a call; here on the open a balancer starts)
// waits for the one new child: no second child is made, none is left unclosed.
TEST_F(SingletonPoolTest, ARequestStartedWhileTheDeadChildIsClosedWaitsForItsReplacement) {
  Build();
  auto a = Start();
  env_.Run();
  ASSERT_EQ(factory_.at(0).in_flight(), 1u);
  factory_.at(0).set_status(SinkStatus::kClosed);  // the connection died
  size_t c = 0;
  hook_->on_response = [&](size_t i) {
    if (i == 0) c = Start();  // a's answer, while the pool replaces its child
  };
  pool_->AsyncOpen([](error_code) {});  // replaces the dead child
  env_.Run();
  EXPECT_EQ(calls_[a].error, Errc::kConnectionClosed);
  EXPECT_EQ(pool_->created(), 2u);
  ASSERT_EQ(factory_.count(), 2u);
  FakeTransport& second = factory_.at(1);
  ASSERT_EQ(second.in_flight(), 1u);
  ReplyAll(second, 5);
  EXPECT_EQ(calls_[c].value, 5);
}

// While the opened child takes the requests that waited for it, one of them still waiting its
// turn is cancelled (here by the answer of the one before it, as the backup sink cancels the
// loser): the pool, which still holds it, answers it at once; it never reaches the child.
TEST_F(SingletonPoolTest, AWaiterCancelledWhileTheWaitersAreHandedOverIsAnsweredAtOnce) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build();
  auto a = Start();
  auto b = Start();
  env_.Run();
  ASSERT_EQ(pool_->waiting(), 2u);
  factory_.at(0).set_auto_reply(1);  // the child answers a inside its AsyncProcessRequest
  bool b_answered_by_cancel = false;
  hook_->on_response = [&](size_t i) {
    if (i != 0) return;
    hook_->stacks[1]->Cancel(make_error_code(Errc::kCancelled));
    b_answered_by_cancel = hook_->answered[1];
  };
  factory_.at(0).CompleteOpen();
  env_.Run();
  EXPECT_TRUE(b_answered_by_cancel) << "the cancelled waiter was not answered by its cancellation";
  EXPECT_EQ(calls_[a].value, 1);
  EXPECT_EQ(calls_[b].error, Errc::kCancelled);
  EXPECT_EQ(factory_.at(0).total_requests(), 1u);
}

// The child dies while the waiters are handed to it and a request arriving meanwhile starts a
// new one: the waiters not yet handed over wait for the new child's open, not sent to a child
// that is still connecting.
TEST_F(SingletonPoolTest, WaitersNotYetHandedOverWaitForAReplacementChild) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build();
  auto a = Start();
  auto b = Start();
  env_.Run();
  ASSERT_EQ(pool_->waiting(), 2u);
  FakeTransport& first = factory_.at(0);
  first.set_auto_reply(1);
  size_t c = 0;
  hook_->on_response = [&](size_t i) {
    if (i != 0) return;
    first.set_status(SinkStatus::kClosed);  // dies after a's answer
    c = Start();                            // arrives now: a new child is made for it
  };
  first.CompleteOpen();
  env_.Run();
  EXPECT_EQ(calls_[a].value, 1);
  ASSERT_EQ(factory_.count(), 2u);
  FakeTransport& second = factory_.at(1);
  EXPECT_EQ(second.total_requests(), 0u) << "a request was sent to a child still connecting";
  EXPECT_EQ(pool_->waiting(), 2u);
  second.CompleteOpen();
  env_.Run();
  EXPECT_EQ(second.in_flight(), 2u);
  ReplyAll(second, 2);
  EXPECT_EQ(calls_[b].value, 2);
  EXPECT_EQ(calls_[c].value, 2);
}

}  // namespace
}  // namespace scales
