// A caller's Asio per-operation cancellation (a handler bound to a cancellation slot, as the
// loser of an awaitable `||` is) through MessageDispatcher + TimeoutSink over a fake transport
// or a pool: the call completes exactly once with kCancelled when the signal wins, and not at
// all a second time when it loses to the reply, the deadline or Close(); the signal may be
// emitted before dispatch, from another thread, twice, and after the runtime is gone; `total`
// alone (no side effects) cancels only a call that has not reached its loop, or whose request
// a pool or the balancer still holds unsent.

#include <chrono>
#include <memory>
#include <optional>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/dispatcher.h"
#include "scales/core/error.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/pool/singleton_pool.h"
#include "scales/pool/watermark_pool.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using test::FakeTransport;
using test::FakeTransportFactory;
namespace asio = boost::asio;

constexpr Duration kTimeout = milliseconds(100);

// How one call completed.
struct Outcome {
  int completions = 0;
  error_code error;
  int value = 0;
};

class CancellationTest : public ::testing::Test {
 protected:
  CancellationTest() : env_(std::make_unique<test::ManualEnv>()), factory_(env_->loop()) {}

  // dispatcher -> timeout -> `below` (default: one fake transport).
  void Build(SinkPtr below = nullptr) {
    if (!below) {
      transport_ = factory_.Create(test::MakeContext(env_->loop(), env_->scope));
      below = transport_;
    }
    timeout_ = std::make_shared<TimeoutSink>(env_->loop(), below, env_->scope);
    dispatcher_ =
        std::make_shared<MessageDispatcher>(env_->loop(), "test", timeout_, kTimeout, env_->scope);
  }

  // Starts a TypedCall<int> whose handler is bound to `signal`'s slot; its outcome goes to the
  // returned record (shared, so that it outlives the fixture's runtime). With `emit_first`, the
  // signal is emitted with that type before the call is dispatched.
  // `info` (optional) receives the call's CallInfo; `retries` marks the call as a retry's
  // attempt that many times over.
  std::shared_ptr<Outcome> Start(asio::cancellation_signal& signal,
                                 std::optional<asio::cancellation_type> emit_first = std::nullopt,
                                 CallInfo* info = nullptr, int retries = 0) {
    auto out = std::make_shared<Outcome>();
    auto* call = new TypedCall<int>(asio::bind_cancellation_slot(signal.slot(), [out](error_code ec, int v) {
      ++out->completions;
      out->error = ec;
      out->value = v;
    }));
    call->info = info;
    call->message.properties.retries = retries;
    if (emit_first) signal.emit(*emit_first);
    dispatcher_->Dispatch(call, /*initiating=*/true);
    return out;
  }

  // Build() over a WatermarkPool of one connection (high_watermark 1) made by factory_.
  std::shared_ptr<WatermarkPool> BuildOverPool(size_t low_watermark) {
    WatermarkPoolOptions opts;
    opts.low_watermark = low_watermark;
    opts.high_watermark = 1;
    opts.max_waiters = 10;
    auto pool = std::make_shared<WatermarkPool>(
        test::MakeContext(env_->loop(), env_->scope, nullptr, Endpoint{"10.0.0.1", 80}), factory_.AsFactory(), opts);
    Build(pool);
    return pool;
  }

  std::shared_ptr<SingletonPool> BuildOverSingletonPool() {
    auto pool = std::make_shared<SingletonPool>(
        test::MakeContext(env_->loop(), env_->scope, nullptr, Endpoint{"10.0.0.2", 81}), factory_.AsFactory());
    Build(pool);
    return pool;
  }

  // Build() over a HeapBalancerSink whose one member (10.0.0.3:82) gets a fake from factory_.
  std::shared_ptr<HeapBalancerSink> BuildOverBalancer() {
    auto set = std::make_shared<StaticServerSet>(ServerSet::Members{Endpoint{"10.0.0.3", 82}});
    auto balancer = std::make_shared<HeapBalancerSink>(test::MakeContext(env_->loop(), env_->scope, set),
                                                       factory_.AsFactory());
    Build(balancer);
    return balancer;
  }

  // Build() and a call the transport holds, bound to signal_.
  std::shared_ptr<Outcome> StartHeld() {
    Build();
    auto out = Start(signal_);
    env_->Run();
    EXPECT_EQ(transport_->in_flight(), 1u);
    return out;
  }

  void ExpectSettled() {
    EXPECT_EQ(dispatcher_->pending(), 0u);
    EXPECT_EQ(env_->loop().calls_in_flight(), 0u);
    EXPECT_EQ(env_->GaugeValue("scales_pending"), 0);
    EXPECT_EQ(env_->loop().timers().size(), 0u);  // no deadline timer left behind
  }

  void TearDown() override {
    if (!env_) return;
    if (dispatcher_) dispatcher_->Close();
    env_->Run();
    dispatcher_.reset();
    timeout_.reset();
    transport_.reset();
    env_->Run();
    factory_.Clear();
  }

  std::unique_ptr<test::ManualEnv> env_;
  FakeTransportFactory factory_;
  std::shared_ptr<FakeTransport> transport_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
  asio::cancellation_signal signal_;
};

TEST_F(CancellationTest, ASignalCancelsARequestTheTransportHolds) {
  auto out = StartHeld();

  signal_.emit(asio::cancellation_type::terminal);
  EXPECT_EQ(out->completions, 0);  // the cancellation runs on the call's loop, not in emit()
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  EXPECT_EQ(transport_->cancels(), 1u);
  EXPECT_EQ(transport_->in_flight(), 0u);
  ExpectSettled();
  EXPECT_EQ(env_->CounterValue("scales_failures"), 1);

  // A reply the transport would still give for it finds nothing (the request is gone), and the
  // deadline that would have passed completes nothing either.
  EXPECT_FALSE(transport_->Reply(0, 7));
  env_->Advance(kTimeout * 2);
  EXPECT_EQ(out->completions, 1);
}

TEST_F(CancellationTest, TerminalAndPartialCancelARequestAlreadySent) {
  Build();
  for (auto type : {asio::cancellation_type::terminal, asio::cancellation_type::partial,
                    asio::cancellation_type::all,
                    asio::cancellation_type::partial | asio::cancellation_type::total}) {
    asio::cancellation_signal signal;
    auto out = Start(signal);
    env_->Run();
    signal.emit(type);
    env_->Run();
    EXPECT_EQ(out->completions, 1) << static_cast<int>(type);
    EXPECT_EQ(out->error, Errc::kCancelled) << static_cast<int>(type);
  }
  ExpectSettled();
}

// `total` promises no side effects: a request on the wire may have reached the server, so the
// call goes on and gets its reply.
TEST_F(CancellationTest, TotalAloneIsIgnoredOnceTheCallReachedItsLoop) {
  Build();
  for (auto type : {asio::cancellation_type::total, asio::cancellation_type::none}) {
    asio::cancellation_signal signal;
    auto out = Start(signal);
    env_->Run();
    signal.emit(type);
    env_->Run();
    EXPECT_EQ(out->completions, 0) << static_cast<int>(type);
    EXPECT_EQ(transport_->cancels(), 0u);
    ASSERT_TRUE(transport_->Reply(0, 5));
    env_->Run();
    EXPECT_EQ(out->completions, 1);
    EXPECT_FALSE(out->error);
    EXPECT_EQ(out->value, 5);
  }
  ExpectSettled();
}

// Emitted before the call reached its loop, any type cancels it, `total` too: nothing was sent.
TEST_F(CancellationTest, ASignalBeforeDispatchCancelsBeforeTheRequestIsHeld) {
  Build();
  for (auto type : {asio::cancellation_type::terminal, asio::cancellation_type::total}) {
    asio::cancellation_signal signal;
    auto out = Start(signal, type);
    EXPECT_EQ(out->completions, 0);  // never inside the initiating function
    env_->Run();
    EXPECT_EQ(out->completions, 1) << static_cast<int>(type);
    EXPECT_EQ(out->error, Errc::kCancelled) << static_cast<int>(type);
    EXPECT_EQ(transport_->in_flight(), 0u);  // answered "cancelled before it was sent"
  }
  EXPECT_EQ(transport_->cancels(), 0u);
  ExpectSettled();
}

TEST_F(CancellationTest, TheReplyWinsOverASignalPostedAfterIt) {
  auto out = StartHeld();
  // The reply and the cancellation land in the same loop turn, the reply first.
  asio::post(env_->loop().executor(), [&] { ASSERT_TRUE(transport_->Reply(0, 42)); });
  signal_.emit(asio::cancellation_type::terminal);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_FALSE(out->error);
  EXPECT_EQ(out->value, 42);
  EXPECT_EQ(transport_->cancels(), 0u);
  ExpectSettled();
}

TEST_F(CancellationTest, ASignalPostedBeforeTheReplyWins) {
  auto out = StartHeld();
  signal_.emit(asio::cancellation_type::terminal);
  // The transport answers in the same turn, after the cancellation: the request is gone.
  bool replied = true;
  asio::post(env_->loop().executor(), [&] { replied = transport_->Reply(0, 42); });
  env_->Run();
  EXPECT_FALSE(replied);
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  ExpectSettled();
}

TEST_F(CancellationTest, ASignalAfterTheTimeoutChangesNothing) {
  Build();
  asio::cancellation_signal signal;
  auto out = Start(signal);
  env_->Advance(kTimeout);
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kRequestTimeout);
  signal.emit(asio::cancellation_type::terminal);
  signal.emit(asio::cancellation_type::terminal);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kRequestTimeout);
  EXPECT_EQ(transport_->cancels(), 1u);  // the timeout's, not the signal's
  ExpectSettled();
}

TEST_F(CancellationTest, ASignalInTheDeadlinesTurnCompletesTheCallOnce) {
  auto out = StartHeld();
  // Emitted (and so posted) before the clock moves: the posted cancellation and the deadline
  // are both ready in the next run; whichever runs first, the other finds nothing.
  signal_.emit(asio::cancellation_type::terminal);
  env_->Advance(kTimeout);
  EXPECT_EQ(out->completions, 1);
  EXPECT_TRUE(out->error == Errc::kCancelled || out->error == Errc::kRequestTimeout) << out->error.message();
  EXPECT_EQ(transport_->cancels(), 1u);
  ExpectSettled();
}

TEST_F(CancellationTest, ASignalAfterCloseChangesNothing) {
  auto out = StartHeld();
  dispatcher_->Close();
  env_->Run();
  ASSERT_EQ(out->completions, 1);
  const error_code closed = out->error;
  EXPECT_TRUE(closed);
  signal_.emit(asio::cancellation_type::terminal);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, closed);
  ExpectSettled();
}

TEST_F(CancellationTest, ASignalFromAnotherThreadCancelsOnTheLoop) {
  auto out = StartHeld();
  std::thread([&] { signal_.emit(asio::cancellation_type::terminal); }).join();
  EXPECT_EQ(out->completions, 0);
  EXPECT_EQ(transport_->in_flight(), 1u);  // nothing touched off the loop
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  ExpectSettled();
}

TEST_F(CancellationTest, ASignalCancelsARequestWaitingInThePoolQueue) {
  auto pool = BuildOverPool(/*low_watermark=*/1);
  asio::cancellation_signal first_signal, second_signal, third_signal;
  auto first = Start(first_signal);
  auto second = Start(second_signal);  // queued behind the first: one connection only
  auto third = Start(third_signal);
  env_->Run();
  ASSERT_EQ(factory_.count(), 1u);
  FakeTransport& conn = factory_.at(0);
  ASSERT_EQ(conn.in_flight(), 1u);
  ASSERT_EQ(pool->waiters(), 2u);

  second_signal.emit(asio::cancellation_type::terminal);
  env_->Run();
  EXPECT_EQ(second->completions, 1);
  EXPECT_EQ(second->error, Errc::kCancelled);
  EXPECT_EQ(pool->waiters(), 1u);
  EXPECT_EQ(conn.cancels(), 0u);  // it never reached the connection

  // The connection, once free, goes to the third call, not to the cancelled second.
  ASSERT_TRUE(conn.Reply(0, 1));
  env_->Run();
  EXPECT_EQ(first->value, 1);
  ASSERT_EQ(conn.in_flight(), 1u);
  ASSERT_TRUE(conn.Reply(0, 3));
  env_->Run();
  EXPECT_EQ(third->completions, 1);
  EXPECT_EQ(third->value, 3);
  EXPECT_EQ(second->completions, 1);
  ExpectSettled();
  pool->Close();
}

TEST_F(CancellationTest, ASignalCancelsARequestWaitingForAConnectionToOpen) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  auto pool = BuildOverPool(/*low_watermark=*/0);
  asio::cancellation_signal signal;
  auto out = Start(signal);
  env_->Run();
  ASSERT_EQ(factory_.count(), 1u);
  EXPECT_EQ(factory_.at(0).pending_opens(), 1u);

  signal.emit(asio::cancellation_type::terminal);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  ExpectSettled();

  // The open completing later has no request to send.
  factory_.at(0).CompleteOpen();
  env_->Run();
  EXPECT_EQ(factory_.at(0).total_requests(), 0u);
  EXPECT_EQ(out->completions, 1);
  pool->Close();
}

// `total` (no side effects) after dispatch: a request the pool still holds, queued for a
// connection or waiting for one to open, was sent nowhere, so the pool honours it; the request
// on the connection is not cancelled, nor a retry's attempt (an earlier one may have reached
// the server).
TEST_F(CancellationTest, TotalCancelsARequestThePoolHasNotSentYet) {
  auto pool = BuildOverPool(/*low_watermark=*/1);
  asio::cancellation_signal first_signal, second_signal, retry_signal, third_signal;
  auto first = Start(first_signal);
  auto second = Start(second_signal);  // queued behind the first: one connection only
  auto retry = Start(retry_signal, std::nullopt, nullptr, /*retries=*/1);
  auto third = Start(third_signal);
  env_->Run();
  FakeTransport& conn = factory_.at(0);
  ASSERT_EQ(conn.in_flight(), 1u);
  ASSERT_EQ(pool->waiters(), 3u);

  first_signal.emit(asio::cancellation_type::total);  // on the wire: ignored
  second_signal.emit(asio::cancellation_type::total);
  retry_signal.emit(asio::cancellation_type::total);
  env_->Run();
  EXPECT_EQ(first->completions, 0);
  EXPECT_EQ(conn.cancels(), 0u);
  EXPECT_EQ(second->completions, 1);
  EXPECT_EQ(second->error, Errc::kCancelled);
  EXPECT_EQ(retry->completions, 0);
  EXPECT_EQ(pool->waiters(), 2u);

  ASSERT_TRUE(conn.Reply(0, 1));
  env_->Run();
  EXPECT_EQ(first->value, 1);
  ASSERT_TRUE(conn.Reply(0, 2));
  env_->Run();
  EXPECT_EQ(retry->value, 2);
  ASSERT_TRUE(conn.Reply(0, 3));
  env_->Run();
  EXPECT_EQ(third->value, 3);
  EXPECT_EQ(second->completions, 1);
  ExpectSettled();
  pool->Close();
}

TEST_F(CancellationTest, TotalCancelsARequestWaitingForAConnectionToOpen) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  auto pool = BuildOverPool(/*low_watermark=*/0);
  asio::cancellation_signal signal;
  CallInfo info;
  auto out = Start(signal, std::nullopt, &info);
  env_->Run();
  ASSERT_EQ(factory_.at(0).pending_opens(), 1u);

  signal.emit(asio::cancellation_type::total);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  EXPECT_THAT(info.detail, ::testing::HasSubstr("while connecting to 10.0.0.1:80"));
  ExpectSettled();

  factory_.at(0).CompleteOpen();  // the connection opens for nobody
  env_->Run();
  EXPECT_EQ(factory_.at(0).total_requests(), 0u);
  EXPECT_EQ(out->completions, 1);
  pool->Close();
}

// The same in the Mux session pool: a request waiting for the session to connect was sent
// nowhere (a retry's attempt is left alone); once the session is open, `total` is ignored.
TEST_F(CancellationTest, TotalCancelsARequestWaitingForTheSingletonPoolsConnect) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  auto pool = BuildOverSingletonPool();
  asio::cancellation_signal signal, retry_signal, later_signal;
  CallInfo info;
  auto out = Start(signal, std::nullopt, &info);
  auto retry = Start(retry_signal, std::nullopt, nullptr, /*retries=*/1);
  env_->Run();
  ASSERT_EQ(pool->waiting(), 2u);
  signal.emit(asio::cancellation_type::total);
  retry_signal.emit(asio::cancellation_type::total);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  EXPECT_THAT(info.detail, ::testing::HasSubstr("while connecting to 10.0.0.2:81"));
  EXPECT_EQ(retry->completions, 0);
  EXPECT_EQ(pool->waiting(), 1u);

  factory_.at(0).CompleteOpen();
  env_->Run();
  auto later = Start(later_signal);
  env_->Run();
  ASSERT_EQ(factory_.at(0).in_flight(), 2u);
  later_signal.emit(asio::cancellation_type::total);  // on the session: ignored
  env_->Run();
  EXPECT_EQ(later->completions, 0);
  ASSERT_TRUE(factory_.at(0).Reply(0, 5));
  ASSERT_TRUE(factory_.at(0).Reply(0, 6));
  env_->Run();
  EXPECT_EQ(retry->value, 5);
  EXPECT_EQ(later->value, 6);
  ExpectSettled();
  pool->Close();
}

// The same in the balancer: a request parked until the first endpoint opens was sent nowhere
// (a retry's attempt is left alone), and never reaches the endpoint once it opens.
TEST_F(CancellationTest, TotalCancelsARequestTheBalancerParked) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  auto balancer = BuildOverBalancer();
  asio::cancellation_signal signal, retry_signal;
  CallInfo info;
  auto out = Start(signal, std::nullopt, &info);
  auto retry = Start(retry_signal, std::nullopt, nullptr, /*retries=*/1);
  env_->Run();
  ASSERT_EQ(factory_.count(), 1u);
  ASSERT_EQ(factory_.at(0).pending_opens(), 1u);
  signal.emit(asio::cancellation_type::total);
  retry_signal.emit(asio::cancellation_type::total);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  EXPECT_THAT(info.detail, ::testing::HasSubstr("while waiting for the first of the server set's endpoints to "
                                                "open (10.0.0.3:82)"));
  EXPECT_EQ(retry->completions, 0);

  factory_.at(0).CompleteOpen();
  env_->Run();
  EXPECT_EQ(factory_.at(0).total_requests(), 1u);  // the retry's attempt alone
  ASSERT_TRUE(factory_.at(0).Reply(0, 4));
  env_->Run();
  EXPECT_EQ(retry->value, 4);
  EXPECT_EQ(out->completions, 1);
  ExpectSettled();
  balancer->Close();
}

// Cancelled before dispatch, the request is answered by the pool, whose error names the
// endpoint as its other errors do.
TEST_F(CancellationTest, ACancellationBeforeDispatchNamesThePoolsEndpoint) {
  auto pool = BuildOverPool(/*low_watermark=*/0);
  asio::cancellation_signal signal;
  CallInfo info;
  auto out = Start(signal, asio::cancellation_type::terminal, &info);
  env_->Run();
  EXPECT_EQ(out->completions, 1);
  EXPECT_EQ(out->error, Errc::kCancelled);
  EXPECT_THAT(info.detail, ::testing::HasSubstr("client test: "));
  EXPECT_THAT(info.detail, ::testing::HasSubstr("10.0.0.1:80"));
  EXPECT_EQ(factory_.count(), 0u);  // no connection opened for it
  ExpectSettled();
  pool->Close();
}

TEST_F(CancellationTest, ASignalAfterTheRuntimeIsGoneIsHarmless) {
  auto out = StartHeld();
  dispatcher_->Close();
  env_->Run();
  ASSERT_EQ(out->completions, 1);
  dispatcher_.reset();
  timeout_.reset();
  transport_.reset();
  factory_.Clear();
  env_.reset();  // the loop the slot's handler refers to is destroyed
  signal_.emit(asio::cancellation_type::terminal);
  EXPECT_EQ(out->completions, 1);
}

}  // namespace
}  // namespace scales
