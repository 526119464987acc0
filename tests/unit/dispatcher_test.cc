// MessageDispatcher + TimeoutSink over a fake transport: exactly-once completion for values,
// errors, timeouts and their races; deadlines; closing.

#include "scales/core/dispatcher.h"

#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <boost/asio/post.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/timeout_sink.h"
#include "scales/pool/watermark_pool.h"

namespace scales {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using ::testing::HasSubstr;

constexpr Duration kTimeout = milliseconds(100);

class DispatcherTest : public ::testing::Test {
 protected:
  DispatcherTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  // dispatcher -> timeout -> `below` (default: one fake transport).
  void Build(SinkPtr below = nullptr, Duration default_timeout = kTimeout) {
    if (!below) {
      transport_ = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
      below = transport_;
    }
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), below, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, default_timeout,
                                                      env_.scope);
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    if (dispatcher_) {
      EXPECT_EQ(dispatcher_->pending(), 0u);
    }
    // Every way a call ends (value, error, timeout, cancellation, closing, refusal) gives its
    // count back to the loop.
    EXPECT_EQ(env_.loop().calls_in_flight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    transport_.reset();
    env_.Run();
    factory_.Clear();
  }

  // dispatcher_ (over transport_) and a second dispatcher, as on another loop, sharing `limit`.
  struct Shard {
    std::shared_ptr<FakeTransport> transport;
    std::shared_ptr<TimeoutSink> timeout;
    std::shared_ptr<MessageDispatcher> dispatcher;
  };
  Shard BuildSharing(const std::shared_ptr<MessageDispatcher::PendingLimit>& limit) {
    auto shard = [&] {
      Shard s;
      s.transport = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
      s.timeout = std::make_shared<TimeoutSink>(env_.loop(), s.transport, env_.scope);
      s.dispatcher =
          std::make_shared<MessageDispatcher>(env_.loop(), "test", s.timeout, kTimeout, env_.scope, limit);
      return s;
    };
    Shard mine = shard();
    transport_ = mine.transport;
    timeout_ = mine.timeout;
    dispatcher_ = mine.dispatcher;
    return shard();
  }

  size_t Start(std::optional<Duration> timeout = std::nullopt, bool initiating = true) {
    return calls_.Start(*dispatcher_, timeout, initiating);
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<FakeTransport> transport_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(DispatcherTest, ValueCompletesOnce) {
  Build();
  auto c = Start();
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(dispatcher_->pending(), 1u);
  EXPECT_EQ(env_.loop().calls_in_flight(), 1u);  // what busy polling looks at
  EXPECT_EQ(transport_->request(0).message->service, "test");
  EXPECT_EQ(transport_->request(0).message->method, "Get");
  ASSERT_TRUE(transport_->Reply(0, 42));
  env_.Run();
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 42);
  EXPECT_EQ(dispatcher_->pending(), 0u);
  EXPECT_EQ(env_.loop().calls_in_flight(), 0u);
  EXPECT_EQ(env_.CounterValue("scales_requests"), 1);
  EXPECT_EQ(env_.CounterValue("scales_successes"), 1);
  EXPECT_EQ(env_.CounterValue("scales_failures"), 0);
  EXPECT_EQ(env_.GaugeValue("scales_pending"), 0);
  // The deadline timer was cancelled by the response.
  EXPECT_EQ(env_.loop().timers().size(), 0u);
}

TEST_F(DispatcherTest, ErrorCompletesOnceWithDetailAndInfo) {
  Build();
  auto c = Start();
  env_.Run();
  env_.Advance(milliseconds(7));
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kServerError), "boom from fake"));
  env_.Run();
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_EQ(calls_[c].error, Errc::kServerError);
  EXPECT_EQ(calls_[c].value, 0);  // a failed call gets a default reply
  EXPECT_EQ(calls_[c].info.error, Errc::kServerError);
  EXPECT_EQ(calls_[c].info.detail, "client test: boom from fake");  // the dispatcher names the client
  EXPECT_EQ(calls_[c].info.elapsed, milliseconds(7));
  EXPECT_EQ(env_.CounterValue("scales_failures"), 1);
  EXPECT_EQ(env_.CounterValue("scales_failures_by_error", {{"error", "server_error"}}), 1);
  // Further replies to an answered request are impossible (the fake forgot it).
  EXPECT_FALSE(transport_->Reply(0, 1));
}

TEST_F(DispatcherTest, TimeoutFiresExactlyAtTheDeadline) {
  Build();
  const TimePoint start = env_.Now();
  auto c = Start();
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 1u);
  ASSERT_TRUE(transport_->request(0).message->properties.deadline.has_value());
  EXPECT_EQ(*transport_->request(0).message->properties.deadline, start + kTimeout);

  env_.Advance(kTimeout - nanoseconds(1));
  EXPECT_EQ(calls_[c].completions, 0);
  EXPECT_EQ(transport_->cancels(), 0u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(calls_[c].completed_at, start + kTimeout);
  EXPECT_EQ(transport_->cancels(), 1u);
  EXPECT_EQ(transport_->in_flight(), 0u);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("timed out after 100 ms"));
  EXPECT_EQ(env_.CounterValue("scales_timeouts"), 1);
  EXPECT_EQ(env_.CounterValue("scales_failures_by_error", {{"error", "request_timeout"}}), 1);
  // Nothing else happens later.
  env_.Advance(seconds(10));
  EXPECT_EQ(calls_[c].completions, 1);
}

// A timeout finer than a millisecond is named in its own unit: a 500 us timeout read "timed
// out after 0 ms".
TEST_F(DispatcherTest, SubMillisecondTimeoutIsNamedInItsOwnUnit) {
  Build();
  auto a = Start(microseconds(500));
  auto b = Start(microseconds(1500));
  env_.Run();
  env_.Advance(microseconds(1500));
  EXPECT_THAT(calls_[a].info.detail, HasSubstr("timed out after 500 us (deadline)"));
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("timed out after 1.5 ms (deadline)"));
}

TEST_F(DispatcherTest, ReplyPostedBeforeTheTimerInTheSameTurnWins) {
  Build();
  auto c = Start();
  env_.Run();
  // The reply is queued first, then the clock reaches the deadline (the alarm is queued
  // behind it): both run in the same RunUntilIdle.
  boost::asio::post(env_.loop().executor(), [this] { EXPECT_TRUE(transport_->Reply(0, 5)); });
  env_.clock->Advance(kTimeout);
  env_.Run();
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 5);
  EXPECT_EQ(transport_->cancels(), 0u);
  EXPECT_EQ(env_.CounterValue("scales_timeouts"), 0);
}

TEST_F(DispatcherTest, TimerBeforeTheReplyInTheSameTurnWins) {
  Build();
  auto c = Start();
  env_.Run();
  env_.clock->Advance(kTimeout);  // queues the alarm first
  bool replied = true;
  boost::asio::post(env_.loop().executor(), [this, &replied] { replied = transport_->Reply(0, 5); });
  env_.Run();
  EXPECT_FALSE(replied);  // the request was already answered by the cancellation
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(transport_->cancels(), 1u);
}

TEST_F(DispatcherTest, ReplyInsideTheTimerTurnFromAnotherTimer) {
  // A second timer due at the same instant answers the request: whichever runs first, the
  // call completes once.
  Build();
  auto c = Start();
  env_.Run();
  struct Replier {
    FakeTransport* t;
    bool ok = false;
    static void Fire(void* arg) {
      auto* r = static_cast<Replier*>(arg);
      r->ok = r->t->Reply(0, 9);
    }
  } replier{transport_.get()};
  TimerEntry entry;
  env_.loop().timers().Schedule(entry, env_.Now() + kTimeout, &Replier::Fire, &replier);
  env_.Advance(kTimeout);
  EXPECT_EQ(calls_[c].completions, 1);
  // The deadline timer was scheduled first, so it fires first.
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_FALSE(replier.ok);
}

TEST_F(DispatcherTest, PerCallTimeoutOverridesTheDefault) {
  Build(nullptr, seconds(1));
  auto shorter = Start(milliseconds(50));
  auto longer = Start(seconds(5));
  auto deflt = Start();
  env_.Run();
  env_.Advance(milliseconds(50) - nanoseconds(1));
  EXPECT_EQ(calls_.completed(), 0u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(calls_[shorter].error, Errc::kRequestTimeout);
  EXPECT_EQ(calls_.completed(), 1u);
  env_.Advance(milliseconds(950));
  EXPECT_EQ(calls_[deflt].error, Errc::kRequestTimeout);
  EXPECT_FALSE(calls_.done(longer));
  env_.Advance(seconds(4));
  EXPECT_EQ(calls_[longer].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[longer].info.detail, HasSubstr("after 5000 ms"));
}

TEST_F(DispatcherTest, ZeroTimeoutMeansNoDeadline) {
  Build(nullptr, seconds(1));
  auto c = Start(Duration::zero());
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 1u);
  EXPECT_FALSE(transport_->request(0).message->properties.deadline.has_value());
  EXPECT_EQ(env_.loop().timers().size(), 0u);
  env_.Advance(std::chrono::hours(24));
  EXPECT_FALSE(calls_.done(c));
  transport_->Reply(0, 1);
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
}

TEST_F(DispatcherTest, ZeroDefaultTimeoutMeansNoDeadline) {
  Build(nullptr, Duration::zero());
  auto c = Start();
  auto with = Start(milliseconds(10));
  env_.Run();
  EXPECT_FALSE(transport_->request(0).message->properties.deadline.has_value());
  env_.Advance(milliseconds(10));
  EXPECT_EQ(calls_[with].error, Errc::kRequestTimeout);
  env_.Advance(std::chrono::hours(1));
  EXPECT_FALSE(calls_.done(c));
  transport_->Reply(0, 3);
  env_.Run();
  EXPECT_EQ(calls_[c].value, 3);
}

TEST_F(DispatcherTest, HugeTimeoutMeansNoDeadline) {
  Build(nullptr, Duration::max());
  auto c = Start();
  env_.Run();
  EXPECT_FALSE(transport_->request(0).message->properties.deadline.has_value());
  transport_->Reply(0, 1);
  env_.Run();
  EXPECT_TRUE(calls_.done(c));
}

TEST_F(DispatcherTest, NeverCompletesInsideInitiatingDispatch) {
  Build();
  transport_->set_auto_reply(11);  // answers synchronously inside AsyncProcessRequest
  auto c = Start(std::nullopt, /*initiating=*/true);
  EXPECT_EQ(calls_[c].completions, 0);  // not inline
  env_.Run();
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_FALSE(calls_[c].completed_inside_dispatch);
  EXPECT_EQ(calls_[c].value, 11);
}

TEST_F(DispatcherTest, SynchronousErrorAlsoDeferredWhenInitiating) {
  Build();
  transport_->Close();  // requests now fail synchronously
  auto c = Start(std::nullopt, true);
  EXPECT_EQ(calls_[c].completions, 0);
  env_.Run();
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_EQ(calls_[c].error, Errc::kConnectionClosed);
  EXPECT_FALSE(calls_[c].completed_inside_dispatch);
}

TEST_F(DispatcherTest, NonInitiatingDispatchOnTheLoopMayCompleteInline) {
  // Dispatch(..., initiating=false) is used for calls already posted to the loop (from a
  // foreign thread): there the handler may run at once, from inside Dispatch.
  Build();
  transport_->set_auto_reply(4);
  size_t c = 0;
  int completions_after_dispatch = -1;
  boost::asio::post(env_.loop().executor(), [&] {
    c = Start(std::nullopt, /*initiating=*/false);
    completions_after_dispatch = calls_[c].completions;
  });
  env_.Run();
  EXPECT_EQ(completions_after_dispatch, 1);
  EXPECT_EQ(calls_[c].value, 4);
  EXPECT_TRUE(calls_[c].completed_inside_dispatch);
}

TEST_F(DispatcherTest, InitiatingDispatchOnTheLoopIsStillDeferred) {
  Build();
  transport_->set_auto_reply(4);
  size_t c = 0;
  int completions_after_dispatch = -1;
  boost::asio::post(env_.loop().executor(), [&] {
    c = Start(std::nullopt, /*initiating=*/true);
    completions_after_dispatch = calls_[c].completions;
  });
  env_.Run();
  EXPECT_EQ(completions_after_dispatch, 0);
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_FALSE(calls_[c].completed_inside_dispatch);
}

TEST_F(DispatcherTest, ClosedDispatcherAnswersClientClosed) {
  Build();
  dispatcher_->Close();
  EXPECT_EQ(dispatcher_->status(), SinkStatus::kClosed);
  EXPECT_EQ(transport_->close_calls(), 1u);  // Close propagates down the stack
  auto c = Start();
  EXPECT_EQ(calls_[c].completions, 0);
  env_.Run();
  EXPECT_EQ(calls_[c].error, Errc::kClientClosed);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("client test: the client is closed"));
  EXPECT_EQ(transport_->total_requests(), 0u);
  EXPECT_FALSE(calls_[c].completed_inside_dispatch);
  dispatcher_->Close();  // idempotent
  EXPECT_EQ(transport_->close_calls(), 1u);
}

TEST_F(DispatcherTest, CloseAnswersPendingCallsAndReleasesTheStackLater) {
  Build();
  auto a = Start();
  auto b = Start();
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 2u);
  std::weak_ptr<MessageDispatcher> weak = dispatcher_;
  dispatcher_->Close();
  // The fake answered both synchronously.
  EXPECT_EQ(dispatcher_->pending(), 0u);
  dispatcher_.reset();  // the dispatcher keeps itself alive until the drain has finished
  env_.Run();
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(calls_[a].error, Errc::kConnectionClosed);
  EXPECT_EQ(calls_[b].error, Errc::kConnectionClosed);
  EXPECT_EQ(calls_.total_completions(), 2);
}

TEST_F(DispatcherTest, OpenIsForwardedAndClosedOpenFails) {
  Build();
  int opened = 0;
  error_code result = make_error_code(Errc::kProtocolError);
  dispatcher_->AsyncOpen([&](error_code ec) {
    ++opened;
    result = ec;
  });
  EXPECT_EQ(opened, 0);
  env_.Run();
  EXPECT_EQ(opened, 1);
  EXPECT_FALSE(result);
  EXPECT_EQ(dispatcher_->status(), SinkStatus::kOpen);
  dispatcher_->Close();
  dispatcher_->AsyncOpen([&](error_code ec) {
    ++opened;
    result = ec;
  });
  env_.Run();
  EXPECT_EQ(opened, 2);
  EXPECT_EQ(result, Errc::kClientClosed);
}

TEST_F(DispatcherTest, RequestsThroughAsyncProcessRequestAreRejected) {
  Build();
  auto* call = new TypedCall<int>([](error_code, int) {});
  // A stack whose top is a sink that ends the call, to see the dispatcher's answer.
  struct Top final : ClientMessageSink {
    error_code seen;
    CallBase* call = nullptr;
    void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
    void AsyncProcessResponse(SinkStack&, void*, Stream*, MethodReturnMessage& m) override {
      seen = m.error;
      delete call;
    }
    void Close() override {}
    SinkStatus status() const override { return SinkStatus::kOpen; }
    std::string_view name() const override { return "top"; }
    void DoOpen(OpenHandler) override {}
  } top;
  top.call = call;
  call->stack.Push(&top);
  dispatcher_->AsyncProcessRequest(call->stack, call->message, nullptr);
  EXPECT_EQ(top.seen, Errc::kInvalidArgument);
}

TEST_F(DispatcherTest, ManyCallsMixedOutcomesEachCompleteOnce) {
  Build();
  for (int i = 0; i < 30; ++i) Start(milliseconds(10 + i));
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 30u);
  // Answer a third with values, a third with errors; leave the rest to time out.
  for (int i = 0; i < 10; ++i) transport_->Reply(0, i);
  for (int i = 0; i < 10; ++i) transport_->Fail(0, make_error_code(Errc::kNack));
  env_.Advance(seconds(1));
  EXPECT_TRUE(calls_.AllCompletedOnce());
  int ok = 0, nack = 0, timeout = 0;
  for (size_t i = 0; i < calls_.size(); ++i) {
    if (!calls_[i].error) ++ok;
    if (calls_[i].error == Errc::kNack) ++nack;
    if (calls_[i].error == Errc::kRequestTimeout) ++timeout;
  }
  EXPECT_EQ(ok, 10);
  EXPECT_EQ(nack, 10);
  EXPECT_EQ(timeout, 10);
  EXPECT_EQ(transport_->cancels(), 10u);
}

// A request whose deadline has already passed when it reaches the TimeoutSink (a retry late
// in its budget) is answered at once, without reaching the sinks below.
TEST_F(DispatcherTest, TimeoutSinkAnswersARequestWhoseDeadlineHasPassed) {
  Build();
  struct Top final : ClientMessageSink {
    int responses = 0;
    error_code seen;
    std::string detail;
    void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
    void AsyncProcessResponse(SinkStack&, void*, Stream*, MethodReturnMessage& m) override {
      ++responses;
      seen = m.error;
      detail = m.detail;
    }
    void Close() override {}
    SinkStatus status() const override { return SinkStatus::kOpen; }
    std::string_view name() const override { return "top"; }
    void DoOpen(OpenHandler) override {}
  } top;
  MethodCallMessage msg;
  msg.service = "test";
  msg.properties.start = env_.Now() - seconds(2);
  msg.properties.deadline = env_.Now() - seconds(1);
  SinkStack stack(msg);
  stack.Push(&top);
  timeout_->AsyncProcessRequest(stack, msg, nullptr);
  EXPECT_EQ(top.responses, 1);
  EXPECT_EQ(top.seen, Errc::kRequestTimeout);
  EXPECT_THAT(top.detail, HasSubstr("timed out after 1000 ms"));
  EXPECT_EQ(transport_->total_requests(), 0u);
  EXPECT_FALSE(stack.deadline_timer().scheduled());
  // Exactly at the deadline counts as passed.
  MethodCallMessage msg2;
  msg2.properties.start = env_.Now() - seconds(1);
  msg2.properties.deadline = env_.Now();
  SinkStack stack2(msg2);
  stack2.Push(&top);
  timeout_->AsyncProcessRequest(stack2, msg2, nullptr);
  EXPECT_EQ(top.responses, 2);
  EXPECT_EQ(transport_->total_requests(), 0u);
}

// --- Deadline counts from the call's start (time queued in a pool counts) -------------------

TEST_F(DispatcherTest, DeadlineCountsFromTheStartIncludingPoolQueueing) {
  WatermarkPoolOptions opts;
  opts.low_watermark = 1;
  opts.high_watermark = 1;
  opts.max_waiters = 10;
  auto pool = std::make_shared<WatermarkPool>(
      test::MakeContext(env_.loop(), env_.scope, nullptr, Endpoint{"10.0.0.1", 80}),
      factory_.AsFactory(), opts);
  Build(pool);
  const TimePoint start = env_.Now();
  auto first = Start();
  auto second = Start();  // queued behind the first: one connection only
  env_.Run();
  ASSERT_EQ(factory_.count(), 1u);
  FakeTransport& conn = factory_.at(0);
  ASSERT_EQ(conn.in_flight(), 1u);
  EXPECT_EQ(pool->waiters(), 1u);

  env_.Advance(milliseconds(60));
  ASSERT_TRUE(conn.Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[first].value, 1);
  ASSERT_EQ(conn.in_flight(), 1u);  // the second call got the connection at t+60ms
  // Its deadline is start + 100 ms, not (t + 60 ms) + 100 ms.
  env_.Advance(milliseconds(40) - nanoseconds(1));
  EXPECT_FALSE(calls_.done(second));
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(calls_[second].error, Errc::kRequestTimeout);
  EXPECT_EQ(calls_[second].completed_at, start + kTimeout);
  EXPECT_EQ(calls_[second].info.endpoint, "");  // no balancer in this stack
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// The client's pending limit is shared by its dispatchers (one per event loop): calls beyond
// it fail at once with kTooManyPending, and each completion makes room again.
TEST_F(DispatcherTest, MaxPendingIsSharedAndCountsEveryOutcome) {
  auto limit = std::make_shared<MessageDispatcher::PendingLimit>(3);
  auto [other_transport, other_timeout, other] = BuildSharing(limit);

  auto a = Start();
  auto b = calls_.Start(*other);
  auto c = Start();
  env_.Run();
  EXPECT_EQ(limit->pending.load(), 3u);
  auto rejected = calls_.Start(*other);
  env_.Run();
  ASSERT_EQ(calls_[rejected].completions, 1);
  EXPECT_EQ(calls_[rejected].error, Errc::kTooManyPending);
  EXPECT_THAT(calls_[rejected].info.detail, HasSubstr("max_pending (3)"));
  EXPECT_EQ(env_.CounterValue("scales_rejected", {{"reason", "max_pending"}}), 1);
  EXPECT_EQ(other_transport->total_requests(), 1u);  // the rejected call was not sent
  EXPECT_EQ(limit->pending.load(), 3u);

  // A reply and a timeout each make room again.
  ASSERT_TRUE(transport_->Reply(0, 7));
  env_.Run();
  EXPECT_EQ(calls_[a].completions, 1);
  auto d = calls_.Start(*other);
  env_.Run();
  EXPECT_EQ(calls_[d].completions, 0);
  env_.clock->Advance(kTimeout);
  env_.Run();
  EXPECT_EQ(calls_[b].error, Errc::kRequestTimeout);
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(calls_[d].error, Errc::kRequestTimeout);
  EXPECT_EQ(limit->pending.load(), 0u);
  auto e = Start();
  env_.Run();
  EXPECT_EQ(calls_[e].completions, 0);
  EXPECT_EQ(limit->pending.load(), 1u);
  other->Close();
  env_.Run();
}

// Call objects come from a per-thread cache of freed blocks: blocks freed on one thread and
// reused there, blocks too large to cache, and a thread that exits with cached blocks all
// behave like plain new/delete (ASan builds bypass the cache; release builds exercise it).
TEST(CallObjectTest, CachedBlocksAreReusedSafelyAcrossSizesAndThreads) {
  struct SmallCall : CallBase {
    void Complete(MethodReturnMessage&, const boost::asio::any_io_executor&) override {}
    int value = 0;
  };
  struct LargeCall : CallBase {
    void Complete(MethodReturnMessage&, const boost::asio::any_io_executor&) override {}
    char payload[4096] = {};
  };
  std::vector<CallBase*> made;
  std::thread maker([&] {
    for (int i = 0; i < 100; ++i) {
      auto* c = new SmallCall;
      c->value = i;
      made.push_back(c);
      made.push_back(new LargeCall);
    }
  });
  maker.join();
  for (CallBase* c : made) delete c;  // freed here: this thread's cache takes what fits
  std::thread exits_with_cache([] {
    for (int i = 0; i < 10; ++i) delete new SmallCall;
    std::vector<CallBase*> held;
    for (int i = 0; i < 50; ++i) held.push_back(new SmallCall);
    for (CallBase* c : held) delete c;
  });
  exits_with_cache.join();
  for (int i = 0; i < 1000; ++i) {
    auto* c = new SmallCall;
    EXPECT_EQ(c->value, 0);
    EXPECT_EQ(c->stack.depth(), 0u);
    c->value = i;
    delete c;
  }
}

// A large limit is counted against per-loop reserves taken `batch` slots at a time, so most
// calls touch no shared atomic; a loop gives back what it does not use, and however the
// reserves are spread, no more than `max` calls are ever admitted.
TEST_F(DispatcherTest, MaxPendingReservesSlotsInBatchesAndNeverExceedsTheLimit) {
  EXPECT_EQ(MessageDispatcher::PendingLimit(3, 2).batch, 1u);
  EXPECT_EQ(MessageDispatcher::PendingLimit(100000, 2).batch, 64u);
  EXPECT_EQ(MessageDispatcher::PendingLimit(640, 2).batch, 10u);
  auto limit = std::make_shared<MessageDispatcher::PendingLimit>(640, 2);
  auto [other_transport, other_timeout, other] = BuildSharing(limit);

  Start();
  env_.Run();
  EXPECT_EQ(limit->pending.load(), 10u);  // one batch reserved for the first call
  for (int i = 0; i < 9; ++i) Start();
  env_.Run();
  EXPECT_EQ(limit->pending.load(), 10u);  // the next nine used it
  Start();
  env_.Run();
  EXPECT_EQ(limit->pending.load(), 20u);

  // Fill the limit from both dispatchers, alternating: some calls are refused, never more
  // than `max` are held, and at most the other loop's unused reserve (2 x batch) is lost.
  size_t admitted = 11;
  size_t refused = 0;
  for (int i = 0; i < 700; ++i) {
    auto c = i % 2 == 0 ? Start() : calls_.Start(*other);
    env_.Run();
    if (calls_[c].completions == 0) {
      ++admitted;
    } else {
      EXPECT_EQ(calls_[c].error, Errc::kTooManyPending);
      ++refused;
    }
  }
  EXPECT_LE(admitted, 640u);
  EXPECT_GE(admitted, 640u - 2 * 10);
  EXPECT_EQ(admitted + refused, 711u);
  EXPECT_LE(limit->pending.load(), 640u);
  EXPECT_EQ(transport_->in_flight() + other_transport->in_flight(), admitted);

  // Completing every call gives the slots back, down to one batch kept per loop at most.
  env_.clock->Advance(kTimeout);
  env_.Run();
  EXPECT_EQ(dispatcher_->pending() + other->pending(), 0u);
  EXPECT_LE(limit->pending.load(), 2 * 2 * 10u);
  other->Close();
  env_.Run();
  other.reset();
  other_timeout.reset();
  env_.Run();
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// ClientOptions::trace_ids: every call without a trace of its own gets a new root trace
// (trace = span = parent, never 0), visible to the sinks below and in CallInfo; a call that
// brings its own trace keeps it; without the option no trace is invented.
TEST_F(DispatcherTest, TraceIdsAreAssignedPerCallUnlessGiven) {
  transport_ = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
  timeout_ = std::make_shared<TimeoutSink>(env_.loop(), transport_, env_.scope);
  dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, kTimeout, env_.scope, nullptr,
                                                    /*trace_ids=*/true);
  auto a = Start();
  auto b = Start();
  TraceContext given{0x1111, 0x2222, 0x3333, 6};
  auto c = calls_.StartWith([&](CallBase* call) {
    call->message.properties.trace = given;
    dispatcher_->Dispatch(call, true);
  });
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 3u);
  const TraceContext& ta = transport_->request(0).message->properties.trace;
  const TraceContext& tb = transport_->request(1).message->properties.trace;
  EXPECT_NE(ta.trace_id, 0u);
  EXPECT_EQ(ta.span_id, ta.trace_id);
  EXPECT_EQ(ta.parent_id, ta.trace_id);
  EXPECT_NE(ta.trace_id, tb.trace_id) << "two calls share a trace id";
  EXPECT_EQ(transport_->request(2).message->properties.trace.span_id, 0x2222u);
  const uint64_t id_a = ta.trace_id;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(transport_->Reply(0, i));
  env_.Run();
  EXPECT_EQ(calls_[a].info.trace.trace_id, id_a);
  EXPECT_NE(calls_[b].info.trace.trace_id, 0u);
  EXPECT_EQ(calls_[c].info.trace.trace_id, 0x1111u);
  EXPECT_EQ(calls_[c].info.trace.flags, 6u);

  // Off: no trace is invented.
  auto plain_transport = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
  auto plain = std::make_shared<MessageDispatcher>(env_.loop(), "test", plain_transport, kTimeout, env_.scope);
  auto d = calls_.Start(*plain);
  env_.Run();
  ASSERT_EQ(plain_transport->in_flight(), 1u);
  EXPECT_FALSE(plain_transport->request(0).message->properties.trace.valid());
  ASSERT_TRUE(plain_transport->Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[d].info.trace.trace_id, 0u);
  plain->Close();
  env_.Run();
}

// A caller's trace with a trace id but span id 0 (an upstream trace id, forwarded) gets a new
// span in that trace, drawn as root ids are (never 0), under the given parent, whether or not
// trace_ids is on: span 0 is invalid in B3 and Finagle. The rest of the trace, including the
// high half of a 128-bit trace id, is kept.
TEST_F(DispatcherTest, ACallersTraceWithoutASpanGetsANewSpan) {
  for (const bool trace_ids : {true, false}) {
    SCOPED_TRACE(trace_ids);
    auto transport = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
    auto dispatcher = std::make_shared<MessageDispatcher>(env_.loop(), "test", transport, kTimeout, env_.scope,
                                                          nullptr, trace_ids);
    TraceContext given{0x1111, 0, 0x3333, 6};
    given.trace_id_high = 0x4444;
    const size_t first = calls_.size();
    for (int i = 0; i < 2; ++i) {
      calls_.StartWith([&](CallBase* call) {
        call->message.properties.trace = given;
        dispatcher->Dispatch(call, true);
      });
    }
    env_.Run();
    ASSERT_EQ(transport->in_flight(), 2u);
    const TraceContext& t0 = transport->request(0).message->properties.trace;
    const TraceContext& t1 = transport->request(1).message->properties.trace;
    EXPECT_NE(t0.span_id, 0u);
    EXPECT_NE(t1.span_id, 0u);
    EXPECT_NE(t0.span_id, t1.span_id) << "two calls share a span";
    EXPECT_EQ(t0.trace_id, 0x1111u);
    EXPECT_EQ(t0.trace_id_high, 0x4444u);
    EXPECT_EQ(t0.parent_id, 0x3333u);
    EXPECT_EQ(t0.flags, 6u);
    const uint64_t span0 = t0.span_id;
    for (int i = 0; i < 2; ++i) ASSERT_TRUE(transport->Reply(0, i));
    env_.Run();
    EXPECT_EQ(calls_[first].info.trace.span_id, span0);
    EXPECT_EQ(calls_[first].info.trace.trace_id_high, 0x4444u);
    dispatcher->Close();
    env_.Run();
  }
}

// A high half without a trace id is no trace: the root the dispatcher draws is a 64-bit one,
// not half the caller's.
TEST_F(DispatcherTest, AHighHalfAloneIsReplacedByA64BitRoot) {
  auto transport = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
  auto dispatcher = std::make_shared<MessageDispatcher>(env_.loop(), "test", transport, kTimeout, env_.scope,
                                                        nullptr, /*trace_ids=*/true);
  TraceContext given;
  given.trace_id_high = 0x4444;
  calls_.StartWith([&](CallBase* call) {
    call->message.properties.trace = given;
    dispatcher->Dispatch(call, true);
  });
  env_.Run();
  ASSERT_EQ(transport->in_flight(), 1u);
  const TraceContext& t = transport->request(0).message->properties.trace;
  EXPECT_TRUE(t.valid());
  EXPECT_EQ(t.trace_id_high, 0u);
  EXPECT_EQ(t.span_id, t.trace_id);
  ASSERT_TRUE(transport->Reply(0, 0));
  dispatcher->Close();
  env_.Run();
}

}  // namespace
}  // namespace scales

// --- Time far from the clock's epoch -------------------------------------------------------------

namespace scales {
namespace {

// A long timeout on a clock far from its epoch (a manual clock moved far ahead) saturates: the
// deadline used to wrap into the past, and the call timed out at once.
TEST_F(DispatcherTest, ALongTimeoutFarFromTheClocksEpochDoesNotWrapIntoThePast) {
  Build();
  env_.clock->Advance(Duration::max() / 2);
  auto c = Start(Duration::max() / 2 - nanoseconds(1));
  env_.Run();
  EXPECT_EQ(calls_[c].completions, 0) << calls_[c].info.detail;
  ASSERT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(transport_->request(0).message->properties.deadline, TimePoint::max());
  env_.Advance(std::chrono::hours(24 * 365));
  EXPECT_EQ(calls_[c].completions, 0);
  ASSERT_TRUE(transport_->Reply(0, 8));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 8);
}

}  // namespace
}  // namespace scales
