// BackupRequestSink between the timeout sink and a fake endpoint, on the manual clock: the delay
// comes from the percentile of recorded latencies; the backup goes out after it, avoiding the
// first attempt's endpoint; the first successful answer wins, the loser is cancelled exactly
// once and the caller completed exactly once; no backup for non-idempotent calls, after the
// deadline or over either budget (its own, then the client's retry budget, shared with the retry
// sink); Close() with both attempts out answers the call once; an attempt this sink cancels
// (lost, or cut off with the call) is no failure for its endpoint's failure accrual.

#include "scales/resilience/backup_request.h"

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scales/core/timeout_sink.h"
#include "scales/resilience/failure_accrual.h"
#include "scales/resilience/retry.h"
#include "support/fake_sinks.h"

namespace scales {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using ::testing::HasSubstr;

// Stands in for the balancer: gives attempt n the endpoint "node<n>:80" and records the last
// endpoint each attempt asked to avoid. While `hold` is set it keeps the requests, without an
// endpoint (a balancer waiting for the server set's first members), until Release().
class EndpointStamp final : public ForwardingSink {
 public:
  using ForwardingSink::ForwardingSink;
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    if (hold) {
      held.push_back({&stack, &msg, stream});
      return;
    }
    avoided.push_back(msg.properties.avoid_endpoints.empty() ? "" : msg.properties.avoid_endpoints.back());
    msg.properties.endpoint = fmt::format("node{}:80", avoided.size());
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  // Routes the held requests, in the order they came (as the balancer does).
  void Release() {
    hold = false;
    auto now = std::move(held);
    held.clear();
    for (const Held& r : now) AsyncProcessRequest(*r.stack, *r.msg, r.stream);
  }
  std::string_view name() const override { return "endpoint-stamp"; }
  struct Held {
    SinkStack* stack;
    MethodCallMessage* msg;
    Stream* stream;
  };
  std::vector<std::string> avoided;  // the endpoint each attempt avoided last ("" for none)
  bool hold = false;
  std::vector<Held> held;
};

// Between the stamp and the fake, where an endpoint's failure accrual would be: records how each
// attempt was answered.
class AnswerLog final : public ForwardingSink {
 public:
  struct Answer {
    bool backup;
    error_code error;
  };
  using ForwardingSink::ForwardingSink;
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    stack.Push(this, nullptr);
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  void AsyncProcessResponse(SinkStack& stack, void*, Stream* stream, MethodReturnMessage& msg) override {
    answers.push_back({stack.message().properties.backup, msg.error});
    stack.AsyncProcessResponse(stream, msg);
  }
  std::string_view name() const override { return "answer-log"; }
  // The last answer to a first attempt (or to a backup); fails the test if there is none.
  error_code Of(bool backup) const {
    for (auto it = answers.rbegin(); it != answers.rend(); ++it) {
      if (it->backup == backup) return it->error;
    }
    ADD_FAILURE() << "no answer to a " << (backup ? "backup" : "first attempt");
    return {};
  }
  std::vector<Answer> answers;
};

BackupRequestOptions Options() {
  BackupRequestOptions o;
  o.percentile = 0.5;
  o.max_extra_load = 0.5;
  o.budget_min_per_sec = 10;  // a reserve of 100 backups: the budget never limits these tests
  o.refresh_interval = seconds(1);
  return o;
}

class BackupRequestTest : public ::testing::Test {
 protected:
  BackupRequestTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  // dispatcher -> timeout -> backup -> stamp -> [failure accrual] -> log -> fake. `retry_budget`:
  // the client's retry budget the backup sink shares (none by default).
  // `ops`: the reply type the sink hedges (the fake's int replies by default).
  void Build(BackupRequestOptions options = Options(), Duration timeout = seconds(5),
             std::shared_ptr<RetryBudget> retry_budget = nullptr,
             std::optional<FailureAccrualOptions> accrual = std::nullopt,
             const BackupReplyOps& ops = BackupReplyOpsFor<int>()) {
    transport_ = factory_.Create(test::MakeContext(env_.loop(), env_.scope));
    log_ = std::make_shared<AnswerLog>(transport_);
    SinkPtr below = log_;
    if (accrual) {
      accrual_ = std::make_shared<FailureAccrualSink>(test::MakeContext(env_.loop(), env_.scope), log_, *accrual);
      below = accrual_;
    }
    stamp_ = std::make_shared<EndpointStamp>(below);
    backup_ = std::make_shared<BackupRequestSink>(env_.loop(), stamp_, options, ops, env_.scope, std::move(retry_budget));
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), backup_, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, timeout, env_.scope);
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    if (backup_) {
      EXPECT_EQ(backup_->outstanding(), 0u);
    }
    dispatcher_.reset();
    timeout_.reset();
    retry_.reset();
    backup_.reset();
    stamp_.reset();
    accrual_.reset();
    log_.reset();
    transport_.reset();
    env_.Run();
    factory_.Clear();
  }

  size_t Start(bool idempotent = true, std::optional<Duration> timeout = std::nullopt, int retries = 0) {
    size_t i = calls_.StartWith(
        [&](CallBase* call) {
          call->message.properties.idempotent = idempotent;
          call->message.properties.retries = retries;
          dispatcher_->Dispatch(call, true);
        },
        timeout);
    env_.Run();
    return i;
  }

  // `n` calls, each answered after `latency`; then (if `refresh`) the delay is refreshed.
  void Warm(int n, Duration latency, bool refresh = true) {
    for (int i = 0; i < n; ++i) {
      Start();
      env_.Advance(latency);
      ASSERT_TRUE(transport_->Reply(0, 1));
      env_.Run();
    }
    if (refresh) env_.Advance(Options().refresh_interval);
  }

  // Builds the stack, warms it up with 20 ms calls (the delay becomes 20 ms) and starts a call
  // whose backup is then sent (30 ms later): both attempts are held by the fake.
  size_t StartHedged(std::optional<Duration> timeout = std::nullopt) {
    Build();
    Warm(4, milliseconds(20));
    size_t c = Start(true, timeout);
    env_.Advance(milliseconds(30));
    EXPECT_EQ(transport_->in_flight(), 2u);
    return c;
  }

  // Index of the held request carrying the backup (it asks to avoid an endpoint), or -1.
  int BackupIndex() const {
    for (size_t i = 0; i < transport_->in_flight(); ++i) {
      if (!transport_->request(i).message->properties.avoid_endpoints.empty()) return static_cast<int>(i);
    }
    return -1;
  }

  test::ManualEnv env_;
  test::FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<FakeTransport> transport_;
  std::shared_ptr<AnswerLog> log_;
  std::shared_ptr<FailureAccrualSink> accrual_;
  std::shared_ptr<EndpointStamp> stamp_;
  std::shared_ptr<RetrySink> retry_;
  std::shared_ptr<BackupRequestSink> backup_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST(LatencyWindowTest, PercentileOfTheLiveSamples) {
  test::ManualEnv env;
  LatencyWindow w(*env.clock, seconds(30), 3);
  EXPECT_FALSE(w.Percentile(0.99).has_value());
  for (int ms = 1; ms <= 100; ++ms) w.Record(milliseconds(ms));
  EXPECT_EQ(w.count(), 100);
  // Buckets are about 6 % wide and report their upper bound.
  auto p99 = *w.Percentile(0.99);
  EXPECT_GE(p99, milliseconds(99));
  EXPECT_LE(p99, microseconds(99'000 * 107 / 100));
  auto p50 = *w.Percentile(0.5);
  EXPECT_GE(p50, milliseconds(50));
  EXPECT_LE(p50, microseconds(50'000 * 107 / 100));
  // Small values are exact (1 µs buckets below 16 µs).
  LatencyWindow exact(*env.clock, seconds(30), 3);
  for (int us : {3, 5, 7, 9}) exact.Record(microseconds(us));
  EXPECT_EQ(*exact.Percentile(0.5), microseconds(5));
  EXPECT_EQ(*exact.Percentile(1.0), microseconds(9));
  // Samples expire with their slice: after 20 s two of three slices are new; after 30 s, all.
  env.clock->Advance(seconds(20));
  w.Record(milliseconds(500));
  EXPECT_EQ(w.count(), 101);
  env.clock->Advance(seconds(10));
  EXPECT_EQ(w.count(), 1);
  EXPECT_GE(*w.Percentile(0.5), milliseconds(500));
}

// A latency in the histogram's last bucket (2^41 µs and above, about 25 days: a call without a
// deadline that hung) reports that bucket's bound, INT64_MAX µs, which as a Duration in ns wrapped
// to -1 µs: the delay then fell to min_send_backup_after and every call was hedged after 1 ms.
TEST(LatencyWindowTest, AHugeLatencyIsNoNegativeDelay) {
  test::ManualEnv env;
  LatencyWindow w(*env.clock, seconds(30), 3);
  w.Record(std::chrono::hours(24 * 30));
  auto p = w.Percentile(0.5);
  ASSERT_TRUE(p.has_value());
  EXPECT_GE(*p, std::chrono::hours(24 * 30));
}

TEST(BackupReplyOpsTest, StreamRepliesComeFromTheResponseStreamOrTheOwnSlot) {
  const BackupReplyOps& ops = BackupReplyOpsFor<Stream>();
  Stream caller_reply{"stale"};
  MethodCallMessage caller;
  caller.SetReplySlot(&caller_reply);
  EXPECT_TRUE(ops.matches(caller));
  EXPECT_FALSE(BackupReplyOpsFor<int>().matches(caller));

  auto own = ops.create();
  MethodCallMessage attempt = caller;
  ops.attach(own.get(), attempt);
  ASSERT_NE(attempt.reply_slot<Stream>(), &caller_reply);
  attempt.reply_slot<Stream>()->data = "from the slot";
  ops.adopt(own.get(), nullptr, caller);  // a Mux session writes the slot and passes no stream
  EXPECT_EQ(caller_reply.data, "from the slot");

  Stream passed{"from the response"};
  ops.attach(own.get(), attempt);  // reset for reuse
  EXPECT_EQ(attempt.reply_slot<Stream>()->data, "");
  ops.adopt(own.get(), &passed, caller);  // a transport passing the reply as the stream
  EXPECT_EQ(caller_reply.data, "from the response");
}

TEST(BackupRequestOptionsTest, ValidationNamesTheField) {
  auto message = [](BackupRequestOptions o) {
    try {
      Validate(o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(message(BackupRequestOptions{}), "");
  BackupRequestOptions o;
  o.max_extra_load = 0;
  EXPECT_THAT(message(o), HasSubstr("backup.max_extra_load"));
  o = {};
  o.percentile = 1.0;
  EXPECT_THAT(message(o), HasSubstr("backup.percentile"));
  o = {};
  o.window_slices = 0;
  EXPECT_THAT(message(o), HasSubstr("backup.window_slices"));
  o = {};
  o.budget_ttl = milliseconds(10);
  EXPECT_THAT(message(o), HasSubstr("backup.budget_ttl"));
  EXPECT_THROW(BackupRequestProvider(o), Error);
  // A sink built directly names its own field too (not the retry budget's it is built from).
  test::ManualEnv env;
  try {
    BackupRequestSink sink(env.loop(), nullptr, o, BackupReplyOpsFor<int>(), env.scope);
    ADD_FAILURE() << "built";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("backup.budget_ttl")) << e.what();
  }
}

TEST_F(BackupRequestTest, NoBackupBeforeTheFirstRefreshFindsLatencies) {
  Build();
  EXPECT_FALSE(backup_->SendBackupAfter().has_value());
  auto c = Start();
  env_.Advance(seconds(2));  // past a refresh, but the only attempt is still out: no sample
  EXPECT_EQ(transport_->in_flight(), 1u);
  ASSERT_TRUE(transport_->Reply(0, 3));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 3);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
}

TEST_F(BackupRequestTest, DelayIsThePercentileOfRecordedLatencies) {
  Build();
  // 10 calls of 10 ms and 11 of 40 ms: the median is 40 ms (its bucket's upper bound).
  Warm(10, milliseconds(10), false);
  Warm(11, milliseconds(40));
  auto after = backup_->SendBackupAfter();
  ASSERT_TRUE(after.has_value());
  EXPECT_GE(*after, milliseconds(40));
  EXPECT_LT(*after, microseconds(40'000 * 107 / 100));
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);

  // Fast failures are not latencies: they leave the delay as it was.
  for (int i = 0; i < 30; ++i) {
    Start();
    ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kServerError)));
    env_.Run();
  }
  env_.Advance(seconds(1));
  EXPECT_EQ(backup_->SendBackupAfter(), after);
}

TEST_F(BackupRequestTest, TimeoutsAndLosersCountAsLatencies) {
  BackupRequestOptions o = Options();
  o.percentile = 0.8;
  Build(o);
  // Attempts that timed out count with the time they took.
  for (int i = 0; i < 3; ++i) {
    auto c = Start(true, milliseconds(30));
    env_.Advance(milliseconds(30));
    ASSERT_EQ(calls_[c].error, Errc::kRequestTimeout);
  }
  env_.Advance(seconds(1));
  auto after = backup_->SendBackupAfter();
  ASSERT_TRUE(after.has_value());
  EXPECT_GE(*after, milliseconds(30));
  EXPECT_LT(*after, microseconds(30'000 * 107 / 100));

  // A first attempt that lost to its backup counts too: the samples are then 30 ms (x3), the
  // loser's 100 ms and the backup's 60 ms, so the 80th percentile is the backup's 60 ms (it would
  // be 30 ms without the loser).
  auto c = Start();
  env_.Advance(milliseconds(40));  // the backup goes out (the clock jumps: at 40 ms)
  env_.Advance(milliseconds(60));
  ASSERT_EQ(BackupIndex(), 1);
  ASSERT_TRUE(transport_->Reply(1, 1));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
  env_.Advance(seconds(1));
  after = backup_->SendBackupAfter();
  EXPECT_GE(*after, milliseconds(60));
  EXPECT_LT(*after, microseconds(60'000 * 107 / 100));
}

TEST_F(BackupRequestTest, DelayIsAtLeastMinSendBackupAfter) {
  auto o = Options();
  o.min_send_backup_after = milliseconds(25);
  Build(o);
  Warm(4, milliseconds(2));
  EXPECT_EQ(backup_->SendBackupAfter(), milliseconds(25));
}

TEST_F(BackupRequestTest, CallsThatHungForWeeksDoNotMakeEveryCallHedged) {
  Build(Options(), Duration::zero());  // no timeout: a call may hang as long as the server does
  Warm(2, std::chrono::hours(24 * 30));
  ASSERT_TRUE(backup_->SendBackupAfter().has_value());
  EXPECT_GE(*backup_->SendBackupAfter(), std::chrono::hours(24 * 30));
  auto c = Start();
  env_.Advance(seconds(1));
  EXPECT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
  ASSERT_TRUE(transport_->Reply(0, 7));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 7);
}

TEST_F(BackupRequestTest, BackupGoesToAnotherEndpointAfterTheDelayAndWins) {
  Build();
  Warm(4, milliseconds(20));
  const Duration after = *backup_->SendBackupAfter();
  auto c = Start();
  ASSERT_EQ(transport_->in_flight(), 1u);
  env_.Advance(after - microseconds(1));
  EXPECT_EQ(transport_->in_flight(), 1u) << "no backup before the delay";
  env_.Advance(microseconds(1));
  ASSERT_EQ(transport_->in_flight(), 2u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 1);
  // The backup asked the balancer to avoid the first attempt's endpoint, and got another.
  ASSERT_EQ(BackupIndex(), 1);
  EXPECT_EQ(stamp_->avoided.back(), "node5:80");
  EXPECT_EQ(transport_->request(1).message->properties.endpoint, "node6:80");
  EXPECT_NE(transport_->request(1).stack, transport_->request(0).stack);

  // The backup answers first: it wins; the first attempt is cancelled once.
  ASSERT_TRUE(transport_->Reply(1, 42));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 42);
  EXPECT_EQ(calls_[c].info.endpoint, "node6:80");
  EXPECT_EQ(transport_->cancels(), 1u);
  EXPECT_EQ(transport_->in_flight(), 0u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_won"), 1);
}

// A backup is sent only once the first attempt has an endpoint (Finagle hedges only dispatched
// requests): a first attempt still waiting in the balancer (for the server set's first members)
// has no endpoint to avoid, and a backup sent then (with no endpoint to avoid) was routed
// right after it, free to go to the same node.
TEST_F(BackupRequestTest, NoBackupWhileTheFirstAttemptWaitsForAnEndpoint) {
  Build();
  Warm(4, milliseconds(20));
  const int64_t balance = backup_->budget().Balance();
  stamp_->hold = true;
  auto c = Start();
  env_.Advance(milliseconds(30));
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
  EXPECT_EQ(stamp_->held.size(), 1u) << "only the first attempt waits";
  EXPECT_EQ(backup_->budget().Balance(), balance) << "no budget spent on a backup not sent";
  stamp_->Release();
  env_.Run();
  for (size_t i = 0; i < transport_->in_flight(); ++i) {
    const CallProperties& p = transport_->request(i).message->properties;
    if (p.backup) {
      EXPECT_EQ(p.avoid_endpoints, std::vector<std::string>{"node5:80"}) << "the backup avoids the first attempt's node";
    }
  }
  ASSERT_EQ(transport_->in_flight(), 1u);
  env_.Advance(milliseconds(30));
  EXPECT_EQ(transport_->in_flight(), 1u) << "the delay has passed: still no backup";
  ASSERT_TRUE(transport_->Reply(0, 7));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].value, 7);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
}

// The backup is a span of its own in the call's trace, under the same parent (as a retry is);
// when it wins, CallInfo reports its span.
TEST_F(BackupRequestTest, TheBackupIsANewSpanOfTheCallsTrace) {
  Build();
  Warm(4, milliseconds(20));
  const TraceContext traced{0xabc, 0xdef, 0x123, 6};
  auto c = calls_.StartWith([&](CallBase* call) {
    call->message.properties.idempotent = true;
    call->message.properties.trace = traced;
    dispatcher_->Dispatch(call, true);
  });
  env_.Run();
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  ASSERT_EQ(BackupIndex(), 1);
  const TraceContext first = transport_->request(0).message->properties.trace;
  const TraceContext backup = transport_->request(1).message->properties.trace;
  EXPECT_EQ(first.span_id, 0xdefu);
  EXPECT_EQ(backup.trace_id, 0xabcu);
  EXPECT_EQ(backup.parent_id, 0x123u);
  EXPECT_EQ(backup.flags, 6u);
  EXPECT_NE(backup.span_id, 0u);
  EXPECT_NE(backup.span_id, first.span_id);
  ASSERT_TRUE(transport_->Reply(1, 42));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].value, 42);
  EXPECT_EQ(calls_[c].info.trace.span_id, backup.span_id);
}

TEST_F(BackupRequestTest, FirstAttemptWinsAndTheBackupIsCancelledOnce) {
  auto c = StartHedged();
  ASSERT_TRUE(transport_->Reply(0, 7));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].value, 7);
  EXPECT_EQ(calls_[c].info.endpoint, "node5:80");
  EXPECT_EQ(transport_->cancels(), 1u);
  EXPECT_EQ(transport_->in_flight(), 0u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_won"), 0);
  // The lost backup was cancelled with a code failure accrual ignores.
  EXPECT_EQ(ClassifyForAccrual(log_->Of(true)), AccrualOutcome::kIgnored);
  // The backup's late reply slot never reaches the caller.
  env_.Advance(seconds(1));
  EXPECT_EQ(calls_[c].completions, 1);
}

// A reply type that owns memory, as http::Response owns its body.
struct BodyReply {
  std::shared_ptr<std::string> body;
};

// The losing backup's reply is dropped with the call: what its transport had already read into
// the backup's own reply (an HTTP body, up to max_response_body_bytes) is freed when the call is
// answered, not kept in the sink's pooled hedge until that hedge sends its next backup.
TEST_F(BackupRequestTest, ALosingBackupsReplyIsFreedWithTheCall) {
  Build(Options(), seconds(5), nullptr, std::nullopt, BackupReplyOpsFor<BodyReply>());
  int completions = 0;
  auto start = [&] {
    auto* call = new TypedCall<BodyReply>([&completions](error_code ec, BodyReply) {
      EXPECT_FALSE(ec) << ec.message();
      ++completions;
    });
    call->message.properties.idempotent = true;
    dispatcher_->Dispatch(call, true);
    env_.Run();
  };
  for (int i = 0; i < 4; ++i) {  // 20 ms calls: the delay becomes 20 ms
    start();
    env_.Advance(milliseconds(20));
    ASSERT_TRUE(transport_->Reply(0));
    env_.Run();
  }
  env_.Advance(Options().refresh_interval);
  start();
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  ASSERT_EQ(BackupIndex(), 1);
  auto* backup_reply = transport_->request(1).message->reply_slot<BodyReply>();
  ASSERT_NE(backup_reply, nullptr);
  backup_reply->body = std::make_shared<std::string>(1 << 20, 'x');  // what the backup's transport had read
  std::weak_ptr<std::string> body = backup_reply->body;
  ASSERT_TRUE(transport_->Reply(0));  // the first attempt wins; the backup is cancelled
  env_.Run();
  EXPECT_EQ(completions, 5);
  EXPECT_EQ(transport_->in_flight(), 0u);
  EXPECT_EQ(backup_->outstanding(), 0u);
  EXPECT_TRUE(body.expired()) << "the lost backup's reply outlived its call";
}

TEST_F(BackupRequestTest, AFailureWaitsForTheOtherAttempt) {
  auto c = StartHedged();
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kServerError), "node5 broke"));
  env_.Run();
  EXPECT_FALSE(calls_.done(c));
  ASSERT_TRUE(transport_->Reply(0, 9));
  env_.Run();
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 9);
  EXPECT_EQ(transport_->cancels(), 0u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_won"), 1);

  // Both fail: the later failure, with the earlier one's detail.
  auto d = Start();
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  ASSERT_TRUE(transport_->Fail(1, make_error_code(Errc::kServerError), "backup broke"));
  env_.Run();
  EXPECT_FALSE(calls_.done(d));
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kConnectionClosed), "first broke"));
  env_.Run();
  EXPECT_EQ(calls_[d].error, Errc::kConnectionClosed);
  EXPECT_THAT(calls_[d].info.detail, HasSubstr("first broke"));
  EXPECT_THAT(calls_[d].info.detail, HasSubstr("the backup request to node8:80 failed first: backup broke"));
}

TEST_F(BackupRequestTest, FailureBeforeTheDelayIsDeliveredWithoutBackup) {
  Build();
  Warm(4, milliseconds(20));
  auto c = Start();
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kServerError)));
  env_.Run();
  EXPECT_EQ(calls_[c].error, Errc::kServerError);
  env_.Advance(seconds(1));
  EXPECT_EQ(transport_->total_requests(), 5u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
}

TEST_F(BackupRequestTest, NoBackupForNonIdempotentCalls) {
  Build();
  Warm(4, milliseconds(20));
  auto c = Start(/*idempotent=*/false);
  env_.Advance(seconds(1));
  EXPECT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(backup_->outstanding(), 0u);
  ASSERT_TRUE(transport_->Reply(0, 5));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 5);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
}

TEST_F(BackupRequestTest, NoBackupAfterTheDeadline) {
  Build();
  Warm(4, milliseconds(20));
  // The deadline comes before the delay ends: no backup, the call times out alone.
  auto c = Start(true, milliseconds(15));
  env_.Advance(milliseconds(15));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(transport_->total_requests(), 5u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
}

// A loop that wakes late runs the backup's timer and the deadline's in one turn, the backup's
// first (it was due first): the backup is not sent then, as the deadline has passed (it would
// only spend both budgets and, on HTTP, a connection, to be cancelled at once).
TEST_F(BackupRequestTest, ALateBackupTimerSendsNoBackupPastTheDeadline) {
  Build();
  Warm(4, milliseconds(20));
  const int64_t balance = backup_->budget().Balance();
  auto c = Start(true, milliseconds(25));  // the 20 ms delay ends before the deadline
  env_.Advance(milliseconds(30));          // both timers are due when the loop wakes
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(transport_->total_requests(), 5u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
  EXPECT_EQ(backup_->budget().Balance(), balance);  // the call's deposit is worth less than one backup
}

// The caller gets kRequestTimeout and both attempts count as latencies, but only the first
// attempt, which had the whole deadline, is a timeout for its endpoint's failure accrual: the
// backup, which had only its tail, was cancelled with a code failure accrual ignores.
TEST_F(BackupRequestTest, DeadlineCancelsBothAttempts) {
  auto c = StartHedged(milliseconds(50));
  const int64_t samples = backup_->latencies().count();
  env_.Advance(milliseconds(20));
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(transport_->cancels(), 2u);
  EXPECT_EQ(transport_->in_flight(), 0u);
  EXPECT_EQ(log_->Of(false), Errc::kRequestTimeout);
  EXPECT_EQ(ClassifyForAccrual(log_->Of(false)), AccrualOutcome::kFailure);
  EXPECT_EQ(ClassifyForAccrual(log_->Of(true)), AccrualOutcome::kIgnored);
  EXPECT_EQ(backup_->latencies().count(), samples + 2);
}

TEST_F(BackupRequestTest, DeadlineWhileOnlyTheBackupIsOut) {
  auto c = StartHedged(milliseconds(50));
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kServerError)));
  env_.Run();
  ASSERT_EQ(transport_->in_flight(), 1u);
  EXPECT_FALSE(calls_.done(c));
  const int64_t samples = backup_->latencies().count();
  env_.Advance(milliseconds(20));
  ASSERT_TRUE(calls_.done(c));
  // The backup's answer is delivered, with the call's reason (and counted as a timeout latency);
  // its endpoint is not blamed.
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("(backup request)"));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("the first attempt to node5:80 failed first"));
  EXPECT_EQ(env_.CounterValue("scales_timeouts"), 1);
  EXPECT_EQ(transport_->cancels(), 1u);
  EXPECT_EQ(ClassifyForAccrual(log_->Of(true)), AccrualOutcome::kIgnored);
  EXPECT_EQ(backup_->latencies().count(), samples + 1);
}

// With a real failure accrual sink that marks an endpoint dead at its first failure: a backup
// cut off by the call's deadline leaves its endpoint alive (the first attempt failed with a
// full pool queue, which failure accrual ignores too).
TEST_F(BackupRequestTest, ABackupCutOffByTheDeadlineIsNoFailureOfItsEndpoint) {
  FailureAccrualOptions fa;
  fa.consecutive_failures = 1;
  fa.required_success_rate = 0;
  Build(Options(), seconds(5), nullptr, fa);
  Warm(4, milliseconds(20));
  auto c = Start(true, milliseconds(50));
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kPoolQueueFull)));
  env_.Run();
  env_.Advance(milliseconds(20));
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(accrual_->state(), FailureAccrualSink::State::kAlive);
  EXPECT_EQ(accrual_->consecutive_failures(), 0);
  EXPECT_EQ(env_.CounterValue("scales_failure_accrual_removals"), 0);
}

TEST_F(BackupRequestTest, BudgetLimitsBackupsToMaxExtraLoad) {
  auto o = Options();
  o.max_extra_load = 0.1;  // one backup per 10 hedged calls
  o.budget_min_per_sec = 0;
  Build(o);
  Warm(9, milliseconds(20));  // 9 deposits: not yet a backup's worth
  auto c = Start();           // the 10th deposit
  env_.Advance(milliseconds(30));
  EXPECT_EQ(transport_->in_flight(), 2u);
  ASSERT_TRUE(transport_->Reply(0, 1));
  env_.Run();
  auto d = Start();
  env_.Advance(milliseconds(30));
  EXPECT_EQ(transport_->in_flight(), 1u) << "the budget is spent";
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_budget_exhausted"), 1);
  ASSERT_TRUE(transport_->Reply(0, 2));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
  EXPECT_EQ(calls_[d].value, 2);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 1);
}

// The retry sink sends a call's retries through the backup sink again: only the first attempt
// deposits, so failing calls that are retried do not buy extra backups.
TEST_F(BackupRequestTest, ARetryDoesNotDepositAgain) {
  auto o = Options();
  o.max_extra_load = 0.1;  // one backup per 10 hedged calls
  o.budget_min_per_sec = 0;
  Build(o);
  Warm(9, milliseconds(20));                           // 9 deposits
  auto c = Start(true, std::nullopt, /*retries=*/1);  // a retry: no 10th deposit
  env_.Advance(milliseconds(30));
  EXPECT_EQ(transport_->in_flight(), 1u) << "a backup was paid for by a retry";
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_budget_exhausted"), 1);
  ASSERT_TRUE(transport_->Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
}

RetryBudgetOptions EmptyRetryBudget() {
  RetryBudgetOptions o;
  o.min_retries_per_sec = 0;  // no reserve: only deposits allow withdrawals
  o.percent_can_retry = 0.5;  // two deposits per withdrawal
  return o;
}

// Finagle's BackupRequestFilter: backupBudget.tryWithdraw() && clientRetryBudget.tryWithdraw().
// A backup withdraws from the client's retry budget too; when that refuses, the backup is not
// sent, both refusal counters count it, and the backup budget's withdrawal is not returned.
TEST_F(BackupRequestTest, BackupsAlsoWithdrawFromTheClientsRetryBudget) {
  auto retry_budget = std::make_shared<RetryBudget>(env_.loop().clock(), EmptyRetryBudget());
  Build(Options(), seconds(5), retry_budget);
  EXPECT_EQ(backup_->retry_budget(), retry_budget.get());
  retry_budget->Deposit();
  retry_budget->Deposit();  // the retry sink's deposits: one backup's (or retry's) worth
  Warm(4, milliseconds(20));
  auto c = Start();
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  EXPECT_EQ(retry_budget->Balance(), 0);
  ASSERT_TRUE(transport_->Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);

  const int64_t backup_balance = backup_->budget().Balance();
  auto d = Start();
  env_.Advance(milliseconds(30));
  EXPECT_EQ(transport_->in_flight(), 1u) << "the retry budget is spent";
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_budget_exhausted"), 1);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_retry_budget_exhausted"), 1);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 1);
  // The call deposited half a backup's worth and the refused backup kept its withdrawal of one:
  // 101.5 backups' worth before, 101 after (102 had the withdrawal been returned).
  EXPECT_EQ(backup_balance, 101);
  EXPECT_EQ(backup_->budget().Balance(), 101);
  ASSERT_TRUE(transport_->Reply(0, 2));
  env_.Run();
  EXPECT_EQ(calls_[d].value, 2);
}

// The backup budget is asked first: when it refuses, the retry budget is not touched.
TEST_F(BackupRequestTest, TheBackupBudgetIsAskedFirst) {
  auto o = Options();
  o.max_extra_load = 0.1;
  o.budget_min_per_sec = 0;  // 4 warm-up deposits and the call's: half a backup
  RetryBudgetOptions ro;
  ro.min_retries_per_sec = 1;  // a reserve of 10
  auto retry_budget = std::make_shared<RetryBudget>(env_.loop().clock(), ro);
  Build(o, seconds(5), retry_budget);
  Warm(4, milliseconds(20));
  const int64_t retry_balance = retry_budget->Balance();
  auto c = Start();
  env_.Advance(milliseconds(30));
  EXPECT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_budget_exhausted"), 1);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_retry_budget_exhausted"), 0);
  EXPECT_EQ(retry_budget->Balance(), retry_balance);
  ASSERT_TRUE(transport_->Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
}

// Built from providers, the backup sink shares the retry sink's budget on its loop (the retry
// provider hands it down in SinkContext::retry_budget): a backup spends what a retry would
// have had, and the retry is then refused.
TEST_F(BackupRequestTest, RetriesAndBackupsShareTheRetryBudgetInAStack) {
  RetryOptions ro;
  ro.budget.min_retries_per_sec = 0;  // no reserve; 5 calls' deposits per retry (the default 0.2)
  SinkStackSpec spec;
  spec.WithSink(TimeoutSinkProvider());
  spec.WithSink(RetryProvider(ro));
  spec.WithSink(BackupRequestProvider<int>(Options()));
  spec.WithSink(SinkProvider{"stamp", "stamp", [this](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                               stamp_ = std::make_shared<EndpointStamp>(next(ctx));
                               return stamp_;
                             }});
  spec.WithSink(SinkProvider{std::string(roles::kTransport), "fake", [this](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                               transport_ = factory_.Create(ctx);
                               return transport_;
                             }});
  SinkPtr head = spec.Build()(test::MakeContext(env_.loop(), env_.scope));
  dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", head, seconds(5), env_.scope);
  auto* timeout = dynamic_cast<TimeoutSink*>(head.get());
  ASSERT_NE(timeout, nullptr);
  retry_ = std::dynamic_pointer_cast<RetrySink>(timeout->next());
  ASSERT_NE(retry_, nullptr);
  backup_ = std::dynamic_pointer_cast<BackupRequestSink>(retry_->next());
  ASSERT_NE(backup_, nullptr);
  ASSERT_EQ(backup_->retry_budget(), &retry_->budget());

  Warm(4, milliseconds(20));  // 4 deposits in both budgets
  auto c = Start();           // the 5th: one retry's worth
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u) << "the backup is sent";
  ASSERT_TRUE(transport_->Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
  EXPECT_EQ(retry_->budget().Balance(), 0);

  // A retryable failure of the next call: the backup took the retry's tokens.
  auto d = Start();
  ASSERT_TRUE(transport_->Fail(0, make_error_code(Errc::kNotSent)));
  env_.Run();
  ASSERT_TRUE(calls_.done(d));
  EXPECT_EQ(calls_[d].error, Errc::kNotSent);
  EXPECT_THAT(calls_[d].info.detail, HasSubstr("retry budget exhausted"));
  EXPECT_EQ(env_.CounterValue("scales_retry_budget_exhausted"), 1);
  EXPECT_EQ(env_.CounterValue("scales_retries"), 0);
}

// Duration::max() means never: the delay saturates instead of wrapping into the past (which sent
// a backup on the next turn of the loop for every call).
TEST_F(BackupRequestTest, AMaximalMinSendBackupAfterSendsNoBackup) {
  auto o = Options();
  o.min_send_backup_after = Duration::max();
  Build(o);
  Warm(4, milliseconds(20));
  auto c = Start();
  env_.Advance(seconds(1));
  EXPECT_EQ(transport_->in_flight(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
  ASSERT_TRUE(transport_->Reply(0, 1));
  env_.Run();
  EXPECT_EQ(calls_[c].value, 1);
}

TEST_F(BackupRequestTest, CloseWithBothAttemptsOutAnswersOnce) {
  auto c = StartHedged();
  backup_->Close();
  EXPECT_EQ(backup_->outstanding(), 0u) << "answered before Close() returned";
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_TRUE(calls_[c].error);
  // A closed sink sends no backup.
  env_.Advance(seconds(1));
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 1);
}

TEST_F(BackupRequestTest, CloseBeforeTheDelayStopsTheBackup) {
  Build();
  Warm(4, milliseconds(20));
  auto c = Start();
  backup_->Close();
  env_.Run();
  EXPECT_TRUE(calls_.done(c));
  env_.Advance(seconds(1));
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
}

// Asio's `total` (no side effects) cancels a first attempt still held unsent (in a pool's
// queue) only while no backup is out: with one out, cancelling the first attempt would cancel
// the backup, which was sent. Nothing changes then; the call goes on.
TEST_F(BackupRequestTest, TotalCancellationLeavesAHedgedCallAlone) {
  auto c = StartHedged();
  transport_->set_holds_unsent(true);
  const int backup = BackupIndex();
  ASSERT_GE(backup, 0);
  SinkStack& caller = *transport_->request(1 - backup).stack;
  caller.CancelUnsent(make_error_code(Errc::kCancelled));
  env_.Run();
  EXPECT_FALSE(calls_.done(c));
  EXPECT_FALSE(caller.cancelled());
  EXPECT_EQ(transport_->cancels(), 0u);
  ASSERT_EQ(transport_->in_flight(), 2u);
  ASSERT_TRUE(transport_->Reply(static_cast<size_t>(backup), 42));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 42);
  EXPECT_EQ(transport_->cancels(), 1u);  // the first attempt, superseded
}

// Before the backup is sent (and after it came back), the first attempt alone is the call:
// `total` cancels it while it is unsent.
TEST_F(BackupRequestTest, TotalCancelsAnUnsentFirstAttemptWithNoBackupOut) {
  Build();
  Warm(4, milliseconds(20));
  auto c = Start(true);
  transport_->set_holds_unsent(true);
  transport_->request(0).stack->CancelUnsent(make_error_code(Errc::kCancelled));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kCancelled);
  env_.Advance(seconds(1));
  EXPECT_EQ(env_.CounterValue("scales_backup_requests_sent"), 0);
  EXPECT_EQ(transport_->in_flight(), 0u);

  // A backup that failed (the first attempt still out): the first attempt is the call again.
  auto d = Start(true);
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  const int backup = BackupIndex();
  ASSERT_GE(backup, 0);
  SinkStack& caller = *transport_->request(1 - backup).stack;
  ASSERT_TRUE(transport_->Fail(static_cast<size_t>(backup), make_error_code(Errc::kConnectFailed)));
  env_.Run();
  ASSERT_FALSE(calls_.done(d));
  ASSERT_EQ(transport_->in_flight(), 1u);
  caller.CancelUnsent(make_error_code(Errc::kCancelled));
  env_.Run();
  ASSERT_TRUE(calls_.done(d));
  EXPECT_EQ(calls_[d].error, Errc::kCancelled);
}

// A backup that failed at a server (not known unprocessed) may have acted on the call: `total`
// (no side effects) no longer cancels the first attempt, which goes on to answer the call.
TEST_F(BackupRequestTest, TotalLeavesTheFirstAttemptAloneAfterTheBackupFailedAtAServer) {
  Build();
  Warm(4, milliseconds(20));
  auto c = Start(true);
  transport_->set_holds_unsent(true);
  env_.Advance(milliseconds(30));
  ASSERT_EQ(transport_->in_flight(), 2u);
  const int backup = BackupIndex();
  ASSERT_GE(backup, 0);
  SinkStack& caller = *transport_->request(1 - backup).stack;
  ASSERT_TRUE(transport_->Fail(static_cast<size_t>(backup), make_error_code(Errc::kServerError)));
  env_.Run();
  ASSERT_FALSE(calls_.done(c));
  ASSERT_EQ(transport_->in_flight(), 1u);
  caller.CancelUnsent(make_error_code(Errc::kCancelled));
  env_.Run();
  EXPECT_FALSE(calls_.done(c));
  EXPECT_FALSE(caller.cancelled());
  ASSERT_TRUE(transport_->Reply(static_cast<size_t>(1 - backup), 7));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_FALSE(calls_[c].error);
  EXPECT_EQ(calls_[c].value, 7);
}

TEST_F(BackupRequestTest, CallerCancellationCancelsBothOnce) {
  auto c = StartHedged();
  transport_->request(0).stack->Cancel(make_error_code(Errc::kCancelled));
  env_.Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kCancelled);
  EXPECT_EQ(transport_->cancels(), 2u);
}

}  // namespace
}  // namespace scales
