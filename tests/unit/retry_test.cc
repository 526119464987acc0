// RetrySink between the timeout sink and a fake endpoint: which failures are retried, the
// budget, the deadline, backoff on the manual clock and its cancellation, one deposit per call,
// exactly-once completion.

#include "scales/resilience/retry.h"

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>
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
using ::testing::Not;

// Stands in for the balancer: records the endpoint of each attempt ("10.0.0.<n>:80", n from
// 1), optionally marks the call idempotent, and remembers the last request's stack.
class StampSink final : public ForwardingSink {
 public:
  explicit StampSink(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    ++attempts;
    msg.properties.endpoint = endpoints.empty() ? fmt::format("10.0.0.{}:80", attempts)
                                                : endpoints[static_cast<size_t>(attempts - 1) % endpoints.size()];
    if (idempotent) msg.properties.idempotent = true;
    last_stack = &stack;
    request_streams.push_back(stream);
    if (failure_stream != nullptr) stack.Push(this, nullptr);
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  // Only when failure_stream is set: a failure comes up with that stream instead.
  void AsyncProcessResponse(SinkStack& stack, void*, Stream* stream, MethodReturnMessage& msg) override {
    stack.AsyncProcessResponse(msg.ok() ? stream : failure_stream, msg);
  }
  std::string_view name() const override { return "stamp"; }

  int attempts = 0;
  // When set: the endpoints the attempts go to, in turn (as a balancer out of others to pick).
  std::vector<std::string> endpoints;
  bool idempotent = false;
  SinkStack* last_stack = nullptr;
  std::vector<Stream*> request_streams;  // of each attempt
  Stream* failure_stream = nullptr;
};

RetryOptions Options(int max_retries = 2, Duration backoff_min = Duration::zero(),
                     Duration backoff_max = Duration::zero()) {
  RetryOptions o;
  o.max_retries = max_retries;
  o.backoff_min = backoff_min;
  o.backoff_max = backoff_max;
  return o;
}

class RetryTest : public ::testing::Test {
 protected:
  RetryTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  // dispatcher -> timeout -> [above_retry] -> retry -> stamp -> fake
  void Build(RetryOptions options = Options(), Duration timeout = seconds(1),
             std::function<SinkPtr(SinkPtr)> above_retry = {}) {
    transport_ = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
    stamp_ = std::make_shared<StampSink>(transport_);
    auto budget = std::make_shared<RetryBudget>(env_.loop().clock(), options.budget);
    retry_ = std::make_shared<RetrySink>(env_.loop(), stamp_, options, budget, env_.scope);
    SinkPtr below_timeout = above_retry ? above_retry(retry_) : SinkPtr(retry_);
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), below_timeout, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, timeout, env_.scope);
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    if (retry_) {
      EXPECT_EQ(retry_->waiting(), 0u);
    }
    dispatcher_.reset();
    timeout_.reset();
    retry_.reset();
    stamp_.reset();
    transport_.reset();
    env_.Run();
    factory_.Clear();
  }

  size_t Start() {
    size_t i = calls_.Start(*dispatcher_);
    env_.Run();
    return i;
  }
  void Fail(Errc e, std::string detail = "fake failure") {
    ASSERT_TRUE(transport_->Fail(0, make_error_code(e), std::move(detail)));
    env_.Run();
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<FakeTransport> transport_;
  std::shared_ptr<StampSink> stamp_;
  std::shared_ptr<RetrySink> retry_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(RetryTest, ClassifiesRetryableErrors) {
  for (Errc e : {Errc::kConnectFailed, Errc::kConnectTimeout, Errc::kFailedFast, Errc::kPoolQueueFull, Errc::kNack,
                 Errc::kNotSent}) {
    EXPECT_TRUE(IsRetryable(make_error_code(e), false)) << static_cast<int>(e);
  }
  for (Errc e : {Errc::kRequestTimeout, Errc::kServerError, Errc::kProtocolError, Errc::kCancelled,
                 Errc::kClientClosed, Errc::kNoMembers, Errc::kHttpError}) {
    EXPECT_FALSE(IsRetryable(make_error_code(e), true)) << static_cast<int>(e);
  }
  EXPECT_FALSE(IsRetryable(make_error_code(Errc::kConnectionClosed), false));
  EXPECT_TRUE(IsRetryable(make_error_code(Errc::kConnectionClosed), true));
  EXPECT_FALSE(IsRetryable(error_code{}, true));
}

TEST_F(RetryTest, ConnectFailureIsRetriedAsAnotherAttempt) {
  Build();
  auto c = Start();
  ASSERT_EQ(transport_->in_flight(), 1u);
  Fail(Errc::kConnectFailed, "connect to 10.0.0.1:80 failed: Connection refused");
  ASSERT_EQ(transport_->total_requests(), 2u);
  ASSERT_EQ(transport_->in_flight(), 1u);
  const CallProperties& p = transport_->request(0).message->properties;
  EXPECT_EQ(p.retries, 1);
  EXPECT_EQ(p.avoid_endpoints, std::vector<std::string>{"10.0.0.1:80"});
  EXPECT_EQ(p.endpoint, "10.0.0.2:80");
  EXPECT_FALSE(calls_.done(c));
  ASSERT_TRUE(transport_->Reply(0, 7));
  env_.Run();
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 7);
  EXPECT_EQ(env_.CounterValue("scales_retries"), 1);
}

// Each retry avoids every endpoint an earlier attempt of the call went to, not only the last
// one's: at most CallProperties::kMaxAvoidEndpoints of them, the oldest dropped.
TEST_F(RetryTest, EachRetryAvoidsEveryEarlierAttemptsEndpoint) {
  Build(Options(10));
  auto c = Start();
  Fail(Errc::kConnectFailed);
  Fail(Errc::kNotSent);
  ASSERT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(transport_->request(0).message->properties.avoid_endpoints,
            (std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"}));
  for (int k = 0; k < 7; ++k) Fail(Errc::kConnectFailed);
  ASSERT_EQ(transport_->in_flight(), 1u);
  const CallProperties& p = transport_->request(0).message->properties;
  EXPECT_EQ(p.retries, 9);
  ASSERT_EQ(p.avoid_endpoints.size(), CallProperties::kMaxAvoidEndpoints);
  EXPECT_EQ(p.avoid_endpoints.front(), "10.0.0.2:80");
  EXPECT_EQ(p.avoid_endpoints.back(), "10.0.0.9:80");
  ASSERT_TRUE(transport_->Reply(0, 3));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 3);
}

TEST(CallPropertiesTest, AvoidEndpointsAreUniqueAndNeverEmpty) {
  CallProperties p;
  EXPECT_FALSE(p.Avoids("10.0.0.1:80"));
  p.AddAvoidEndpoint("");
  p.AddAvoidEndpoint("10.0.0.1:80");
  p.AddAvoidEndpoint("10.0.0.2:80");
  p.AddAvoidEndpoint("10.0.0.1:80");
  EXPECT_EQ(p.avoid_endpoints, (std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"}));
  EXPECT_TRUE(p.Avoids("10.0.0.2:80"));
  EXPECT_FALSE(p.Avoids("10.0.0.3:80"));
}

// A retry is sent with the call's request stream, not with the stream its failure came up with
// (a sink below may answer with a buffer of its own, which is no request).
TEST_F(RetryTest, ARetryIsSentWithTheRequestStreamNotTheFailuresStream) {
  Build();
  Stream reply_buffer;
  stamp_->failure_stream = &reply_buffer;
  auto c = Start();
  Fail(Errc::kConnectFailed);
  Fail(Errc::kConnectFailed);
  ASSERT_TRUE(transport_->Reply(0, 42));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 42);
  ASSERT_EQ(stamp_->request_streams.size(), 3u);
  EXPECT_EQ(stamp_->request_streams[1], stamp_->request_streams[0]);
  EXPECT_EQ(stamp_->request_streams[2], stamp_->request_streams[0]);
}

// Records the stream each response came up with.
class ResponseStreamRecorder final : public ForwardingSink {
 public:
  explicit ResponseStreamRecorder(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    stack.Push(this, nullptr);
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  void AsyncProcessResponse(SinkStack& stack, void*, Stream* stream, MethodReturnMessage& msg) override {
    streams.push_back(stream);
    stack.AsyncProcessResponse(stream, msg);
  }
  std::string_view name() const override { return "stream-recorder"; }
  std::vector<Stream*> streams;
};

// A request answered while it waits to retry goes up with no stream, as every failure: it went
// up with the failed attempt's response stream, which a sink below owns (a connection's reply
// buffer) and which may be gone by then.
TEST_F(RetryTest, ARequestAnsweredDuringItsBackoffCarriesNoStream) {
  std::shared_ptr<ResponseStreamRecorder> recorder;
  Build(Options(2, milliseconds(50), milliseconds(50)), seconds(1), [&](SinkPtr retry) {
    recorder = std::make_shared<ResponseStreamRecorder>(std::move(retry));
    return recorder;
  });
  Stream reply_buffer;
  stamp_->failure_stream = &reply_buffer;
  auto c = Start();
  Fail(Errc::kConnectFailed);
  ASSERT_EQ(retry_->waiting(), 1u);
  retry_->Close();
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kClientClosed);
  ASSERT_EQ(recorder->streams.size(), 1u);
  EXPECT_EQ(recorder->streams[0], nullptr);
}

TEST_F(RetryTest, RetriesAreNotSentInsideTheFailedAttemptsResponsePath) {
  Build();
  Start();
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kConnectFailed)));
  EXPECT_EQ(transport_->total_requests(), 1u);
  EXPECT_EQ(retry_->waiting(), 1u);
  env_.Run();
  EXPECT_EQ(transport_->total_requests(), 2u);
  EXPECT_EQ(retry_->waiting(), 0u);
  transport_->Reply(0, 1);
}

TEST_F(RetryTest, NonRetryableErrorIsNotRetried) {
  Build();
  auto c = Start();
  Fail(Errc::kServerError, "server said no");
  EXPECT_EQ(transport_->total_requests(), 1u);
  EXPECT_EQ(calls_[c].error, Errc::kServerError);
  EXPECT_EQ(calls_[c].info.detail, "client test: server said no");
  EXPECT_EQ(env_.CounterValue("scales_retries"), 0);
}

TEST_F(RetryTest, ConnectionClosedIsRetriedOnlyForIdempotentCalls) {
  Build();
  auto a = Start();
  Fail(Errc::kConnectionClosed);
  EXPECT_EQ(transport_->total_requests(), 1u);
  EXPECT_EQ(calls_[a].error, Errc::kConnectionClosed);

  stamp_->idempotent = true;
  auto b = Start();
  Fail(Errc::kConnectionClosed);
  EXPECT_EQ(transport_->total_requests(), 3u);
  transport_->Reply(0, 3);
  env_.Run();
  EXPECT_EQ(calls_[b].value, 3);
}

TEST_F(RetryTest, FinalFailureSaysWhichAttempt) {
  Build(Options(2));
  auto c = Start();
  Fail(Errc::kConnectFailed, "refused 1");
  Fail(Errc::kConnectFailed, "refused 2");
  Fail(Errc::kFailedFast, "refused 3");
  EXPECT_EQ(transport_->total_requests(), 3u);
  EXPECT_EQ(calls_[c].error, Errc::kFailedFast);
  EXPECT_EQ(calls_[c].info.detail, "client test: refused 3 (attempt 3 of 3); not retried: all 3 attempts used");
  EXPECT_EQ(env_.CounterValue("scales_retries"), 2);
}

TEST_F(RetryTest, NonRetryableErrorAfterARetryNamesTheAttempt) {
  Build(Options(2));
  auto c = Start();
  Fail(Errc::kConnectFailed);
  Fail(Errc::kServerError, "boom");
  EXPECT_EQ(calls_[c].error, Errc::kServerError);
  EXPECT_EQ(calls_[c].info.detail, "client test: boom (attempt 2 of 3)");
}

TEST_F(RetryTest, ZeroMaxRetriesDisablesRetries) {
  Build(Options(0));
  auto c = Start();
  Fail(Errc::kConnectFailed, "refused");
  EXPECT_EQ(transport_->total_requests(), 1u);
  EXPECT_EQ(calls_[c].info.detail, "client test: refused (attempt 1 of 1); not retried: retries are disabled");
}

// INT_MAX retries (let the budget decide) counts its attempts without overflowing.
TEST_F(RetryTest, AnUnboundedMaxRetriesCountsItsAttempts) {
  RetryOptions o = Options(std::numeric_limits<int>::max());
  o.budget.min_retries_per_sec = 0;
  Build(o);
  auto c = Start();
  Fail(Errc::kConnectFailed, "refused");
  EXPECT_EQ(calls_[c].info.detail,
            "client test: refused (attempt 1 of 2147483648); not retried: retry budget exhausted (balance 0)");
}

TEST_F(RetryTest, ExhaustedBudgetPassesTheOriginalErrorWithANote) {
  RetryOptions o = Options(2);
  o.budget.min_retries_per_sec = 0;  // no reserve: 1 retry per 5 calls
  Build(o);
  EXPECT_EQ(env_.GaugeValue("scales_retry_budget_balance"), 0);
  auto c = Start();
  Fail(Errc::kConnectFailed, "refused");
  EXPECT_EQ(transport_->total_requests(), 1u);
  EXPECT_EQ(calls_[c].error, Errc::kConnectFailed);
  EXPECT_EQ(calls_[c].info.detail,
            "client test: refused (attempt 1 of 3); not retried: retry budget exhausted (balance 0)");
  EXPECT_EQ(env_.CounterValue("scales_retry_budget_exhausted"), 1);
  EXPECT_EQ(env_.CounterValue("scales_retries"), 0);

  // Four more calls (five deposits) buy one retry.
  for (int i = 0; i < 4; ++i) {
    Start();
    transport_->Reply(0, 0);
    env_.Run();
  }
  EXPECT_EQ(env_.GaugeValue("scales_retry_budget_balance"), 1);
  auto d = Start();
  Fail(Errc::kConnectFailed, "refused");
  EXPECT_EQ(transport_->in_flight(), 1u);  // retried
  Fail(Errc::kConnectFailed, "refused again");
  EXPECT_EQ(calls_[d].error, Errc::kConnectFailed);
  EXPECT_THAT(calls_[d].info.detail, HasSubstr("refused again (attempt 2 of 3); not retried: retry budget exhausted"));
  EXPECT_EQ(env_.CounterValue("scales_retry_budget_exhausted"), 2);
}

TEST_F(RetryTest, ExactlyOneDepositPerCall) {
  RetryOptions o = Options(3);
  o.budget.min_retries_per_sec = 0;
  o.budget.percent_can_retry = 0.5;  // a retry costs two deposits
  Build(o);
  for (int i = 0; i < 4; ++i) {
    Start();
    transport_->Reply(0, 0);
    env_.Run();
  }
  EXPECT_EQ(retry_->budget().Balance(), 2);  // 4 deposits
  auto c = Start();                          // deposit 5
  Fail(Errc::kConnectFailed);                // withdraw 1 (2 deposits' worth)
  Fail(Errc::kConnectFailed);                // withdraw 2
  transport_->Reply(0, 9);
  env_.Run();
  EXPECT_EQ(calls_[c].value, 9);
  // 5 deposits (5000) - 2 withdrawals (4000) = 1000: half a retry. One deposit per attempt
  // would have left 7000 - 4000 = 3000, one retry.
  EXPECT_EQ(retry_->budget().Balance(), 0);
  EXPECT_EQ(env_.CounterValue("scales_retries"), 2);
}

TEST_F(RetryTest, BackoffWaitsOnTheManualClock) {
  Build(Options(2, milliseconds(20), milliseconds(20)));
  auto c = Start();
  Fail(Errc::kConnectFailed);
  EXPECT_EQ(retry_->waiting(), 1u);
  env_.Advance(milliseconds(20) - nanoseconds(1));
  EXPECT_EQ(transport_->total_requests(), 1u);
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(transport_->total_requests(), 2u);
  EXPECT_EQ(retry_->waiting(), 0u);
  transport_->Reply(0, 4);
  env_.Run();
  EXPECT_EQ(calls_[c].value, 4);
}

TEST_F(RetryTest, JitteredBackoffStaysWithinItsBounds) {
  Build(Options(1, milliseconds(10), milliseconds(50)), seconds(10));
  for (int i = 0; i < 20; ++i) {
    auto c = Start();
    Fail(Errc::kConnectFailed);
    const TimePoint failed_at = env_.Now();
    while (transport_->in_flight() == 0) env_.Advance(milliseconds(1));
    const Duration waited = env_.Now() - failed_at;
    EXPECT_GE(waited, milliseconds(10));
    EXPECT_LE(waited, milliseconds(50));
    transport_->Reply(0, i);
    env_.Run();
    EXPECT_EQ(calls_[c].value, i);
  }
}

TEST_F(RetryTest, CancellationDuringBackoffAnswersAtOnce) {
  Build(Options(2, milliseconds(50), milliseconds(50)), milliseconds(100));
  auto c = Start();
  SinkStack* stack = stamp_->last_stack;
  Fail(Errc::kConnectFailed, "refused");
  ASSERT_EQ(retry_->waiting(), 1u);
  env_.Advance(milliseconds(10));
  // What the timeout sink's timer does at the deadline.
  stack->Cancel(make_error_code(Errc::kRequestTimeout));
  EXPECT_EQ(retry_->waiting(), 0u);
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("cancelled while waiting to retry"));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("refused"));
  env_.Advance(milliseconds(100));
  EXPECT_EQ(transport_->total_requests(), 1u);  // never resent
  // The retry that never ran is not counted in scales_retries ("retries sent") nor named as an
  // attempt.
  EXPECT_EQ(env_.CounterValue("scales_retries"), 0);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("refused (attempt 1 of 3)"));
  EXPECT_THAT(calls_[c].info.detail, Not(HasSubstr("attempt 2"))) << calls_[c].info.detail;
}

// Nor is one that Close() cuts off during its backoff.
TEST_F(RetryTest, ARetryCutOffByCloseIsNotCountedAsSent) {
  Build(Options(2, milliseconds(50), milliseconds(50)), milliseconds(100));
  auto d = Start();
  Fail(Errc::kConnectFailed, "refused");
  ASSERT_EQ(retry_->waiting(), 1u);
  retry_->Close();
  env_.Run();
  ASSERT_TRUE(calls_.done(d));
  EXPECT_EQ(calls_[d].error, Errc::kClientClosed);
  EXPECT_EQ(env_.CounterValue("scales_retries"), 0);
  EXPECT_THAT(calls_[d].info.detail, Not(HasSubstr("attempt 2"))) << calls_[d].info.detail;
}

// Each retry is a new span of the call's trace, under the same parent (Finagle's requeues);
// CallInfo reports the span of the attempt that answered.
TEST_F(RetryTest, EachRetryIsANewSpanOfTheCallsTrace) {
  Build();
  dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, seconds(1), env_.scope, nullptr,
                                                    /*trace_ids=*/true);
  auto c = Start();
  const TraceContext first = transport_->request(0).message->properties.trace;
  ASSERT_TRUE(first.valid());
  Fail(Errc::kConnectFailed);
  ASSERT_EQ(transport_->in_flight(), 1u);
  const TraceContext second = transport_->request(0).message->properties.trace;
  EXPECT_EQ(second.trace_id, first.trace_id);
  EXPECT_NE(second.span_id, 0u);
  EXPECT_NE(second.span_id, first.span_id);
  EXPECT_EQ(second.parent_id, first.parent_id);
  EXPECT_EQ(second.flags, first.flags);
  ASSERT_TRUE(transport_->Reply(0, 7));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].info.trace.span_id, second.span_id);
}

TEST_F(RetryTest, NeverRetriesPastTheDeadline) {
  Build(Options(2, milliseconds(40), milliseconds(40)), milliseconds(100));
  auto c = Start();
  env_.Advance(milliseconds(30));
  Fail(Errc::kConnectFailed, "refused");  // retry at 70 ms
  env_.Advance(milliseconds(40));
  ASSERT_EQ(transport_->total_requests(), 2u);
  Fail(Errc::kConnectFailed, "refused again");  // 70 + 40 >= 100: no time left
  EXPECT_EQ(transport_->total_requests(), 2u);
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kConnectFailed);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("attempt 2 of 3"));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("not retried: the deadline leaves no time"));
}

// A loop that wakes late runs the backoff's timer and the deadline's in one turn, the backoff's
// first (it was due first): the retry is not sent past the deadline; the call times out once,
// naming the attempt that failed and its endpoint (not "before an endpoint was chosen").
TEST_F(RetryTest, ALateBackoffTimerSendsNoRetryPastTheDeadline) {
  Build(Options(2, milliseconds(40), milliseconds(40)), milliseconds(100));
  auto c = Start();
  Fail(Errc::kConnectFailed, "refused");  // retry due at 40 ms
  ASSERT_EQ(retry_->waiting(), 1u);
  env_.Advance(milliseconds(150));  // the loop wakes after the deadline
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(transport_->total_requests(), 1u) << "a retry was sent after the deadline";
  EXPECT_EQ(env_.CounterValue("scales_retries"), 0);
  EXPECT_EQ(env_.CounterValue("scales_timeouts"), 1);
  EXPECT_EQ(retry_->waiting(), 0u);
  EXPECT_EQ(calls_[c].info.detail,
            "client test: Get request after an attempt to 10.0.0.1:80 timed out after 100 ms (deadline): the deadline "
            "passed while the request waited to retry; the previous attempt failed: refused (attempt 1 of 3)");
}

// The attempts went to A, B, then A again (two endpoints, both avoided: the balancer picks
// one anyway). A timeout during the backoff after the third names A, the endpoint of the
// attempt whose failure it quotes, not B (A was already in avoid_endpoints, and the retry sink
// left B last there).
TEST_F(RetryTest, ATimeoutBetweenAttemptsNamesTheLastAttemptsEndpoint) {
  Build(Options(3, milliseconds(40), milliseconds(40)), milliseconds(130));
  stamp_->endpoints = {"10.0.0.1:80", "10.0.0.2:80"};
  auto c = Start();
  Fail(Errc::kConnectFailed, "refused by 10.0.0.1:80");  // retry at 40 ms
  env_.Advance(milliseconds(40));
  Fail(Errc::kConnectFailed, "refused by 10.0.0.2:80");  // retry at 80 ms
  env_.Advance(milliseconds(40));
  ASSERT_EQ(transport_->total_requests(), 3u);
  EXPECT_EQ(transport_->request(0).message->properties.endpoint, "10.0.0.1:80");
  Fail(Errc::kConnectFailed, "refused by 10.0.0.1:80 again");  // retry due at 120 ms
  env_.Advance(milliseconds(100));  // the loop wakes after the deadline
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("request after an attempt to 10.0.0.1:80 timed out"));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("refused by 10.0.0.1:80 again (attempt 3 of 4)"));
  // The failed attempt is numbered once (the retry sink answering its own wait added it again).
  EXPECT_THAT(calls_[c].info.detail, Not(HasSubstr("(attempt 3 of 4) (attempt 3 of 4)")));
}

TEST_F(RetryTest, TimeoutDuringARetriedAttemptIsNotRetried) {
  Build(Options(2), milliseconds(100));
  auto c = Start();
  Fail(Errc::kConnectFailed);
  ASSERT_EQ(transport_->in_flight(), 1u);
  env_.Advance(milliseconds(100));
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("attempt 2"));
  EXPECT_EQ(transport_->total_requests(), 2u);
}

TEST_F(RetryTest, CloseAnswersRequestsWaitingToRetry) {
  Build(Options(2, milliseconds(50), milliseconds(50)));
  auto c = Start();
  Fail(Errc::kConnectFailed);
  ASSERT_EQ(retry_->waiting(), 1u);
  retry_->Close();
  EXPECT_EQ(retry_->waiting(), 0u);
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kClientClosed);
  env_.Advance(milliseconds(100));
  EXPECT_EQ(transport_->total_requests(), 1u);
}

// Passes requests on; the first response it sees cancels another request's stack, there and
// then (as a backup-request sink above the retry sink cancels the attempt that lost).
class CancelAnotherOnResponse final : public ForwardingSink {
 public:
  explicit CancelAnotherOnResponse(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    stacks.push_back(&stack);
    stack.Push(this, nullptr);
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  void AsyncProcessResponse(SinkStack& stack, void*, Stream* stream, MethodReturnMessage& msg) override {
    std::erase(stacks, &stack);
    if (!cancelled_one && !stacks.empty()) {
      cancelled_one = true;
      stacks.front()->Cancel(make_error_code(Errc::kCancelled));
    }
    stack.AsyncProcessResponse(stream, msg);
  }
  std::string_view name() const override { return "cancel-another"; }

  std::vector<SinkStack*> stacks;  // of the requests below
  bool cancelled_one = false;
};

// Close() answers each request waiting to retry; answering one may answer another meanwhile
// (here a sink above cancels it): that one completes once, and Close() leaves it alone. Close()
// went on with its list: it answered the other request a second time, through a stack it no
// longer had (a crash), and its count of waiting requests went below zero.
TEST_F(RetryTest, CloseSkipsARequestAnsweredWhileItAnsweredAnother) {
  std::shared_ptr<CancelAnotherOnResponse> cancel_another;
  Build(Options(2, milliseconds(50), milliseconds(50)), seconds(1), [&](SinkPtr retry) {
    cancel_another = std::make_shared<CancelAnotherOnResponse>(std::move(retry));
    return cancel_another;
  });
  auto a = Start();
  auto b = Start();
  Fail(Errc::kConnectFailed);
  Fail(Errc::kConnectFailed);
  ASSERT_EQ(retry_->waiting(), 2u);
  retry_->Close();
  EXPECT_TRUE(cancel_another->cancelled_one);
  EXPECT_EQ(retry_->waiting(), 0u);
  env_.Run();
  ASSERT_TRUE(calls_.done(a));
  ASSERT_TRUE(calls_.done(b));
  EXPECT_EQ(calls_[a].error, Errc::kClientClosed);
  EXPECT_EQ(calls_[b].error, Errc::kCancelled);
  EXPECT_THAT(calls_[b].info.detail, HasSubstr("cancelled while waiting to retry"));
  env_.Advance(milliseconds(100));
  EXPECT_EQ(transport_->total_requests(), 2u);
}

TEST_F(RetryTest, ManyCallsEachCompleteOnce) {
  Build(Options(2, Duration::zero(), milliseconds(5)));
  for (int i = 0; i < 50; ++i) Start();
  // Fail every attempt once, then answer.
  for (int round = 0; round < 2; ++round) {
    while (transport_->in_flight() > 0) transport_->Fail(0, make_error_code(Errc::kConnectFailed));
    env_.Advance(milliseconds(5));
  }
  while (transport_->in_flight() > 0) transport_->Reply(0, 1);
  env_.Run();
  EXPECT_EQ(calls_.completed(), 50u);
  EXPECT_TRUE(calls_.NoneCompletedTwice());
}

TEST_F(RetryTest, ProviderValidatesAndBuilds) {
  EXPECT_THROW(RetryProvider(Options(-1)), Error);
  EXPECT_THROW(RetryProvider(Options(1, milliseconds(5), milliseconds(1))), Error);
  RetryOptions bad_budget;
  bad_budget.budget.ttl = seconds(0);
  EXPECT_THROW(RetryProvider(bad_budget), Error);
  SinkProvider p = RetryProvider();
  EXPECT_EQ(p.role, "retry");
  auto ctx = test::MakeContext(env_.loop(), env_.scope);
  SinkPtr sink = p.create(ctx, factory_.AsFactory());
  EXPECT_EQ(sink->name(), "retry");
  EXPECT_EQ(env_.GaugeValue("scales_retry_budget_balance"), 100);
  sink->Close();
}

}  // namespace
}  // namespace scales
