// The scales error category: names, messages, conditions and scales::Error; durations in
// messages (DurationText).

#include "scales/core/error.h"

#include <set>
#include <string>
#include <system_error>

#include <boost/system/errc.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/duration_text.h"

namespace scales {
namespace {

using ::testing::HasSubstr;

constexpr int kFirst = static_cast<int>(Errc::kOk);
constexpr int kLast = static_cast<int>(Errc::kNonRetryableNack);

TEST(ErrorTest, NamesAreStableSnakeCase) {
  EXPECT_EQ(ErrorName(make_error_code(Errc::kOk)), "ok");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kConnectTimeout)), "connect_timeout");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kConnectFailed)), "connect_failed");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kRequestTimeout)), "request_timeout");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kNoMembers)), "no_members");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kFailedFast)), "failed_fast");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kPoolQueueFull)), "pool_queue_full");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kRetryBudgetExhausted)), "retry_budget_exhausted");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kConnectionClosed)), "connection_closed");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kProtocolError)), "protocol_error");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kServerError)), "server_error");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kNack)), "nack");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kCancelled)), "cancelled");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kDiscoveryFailed)), "discovery_failed");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kBadUri)), "bad_uri");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kClientClosed)), "client_closed");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kResponseTooLarge)), "response_too_large");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kHttpError)), "http_error");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kBlockingCallOnEventLoop)), "blocking_call_on_event_loop");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kInvalidArgument)), "invalid_argument");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kOpenTimeout)), "open_timeout");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kTooManyPending)), "too_many_pending");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kRequestTooLarge)), "request_too_large");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kTlsFailed)), "tls_failed");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kNotSent)), "not_sent");
  EXPECT_EQ(ErrorName(make_error_code(Errc::kNonRetryableNack)), "non_retryable_nack");
}

TEST(ErrorTest, EveryCodeHasADistinctNameAndMessage) {
  std::set<std::string> names, messages;
  for (int v = kFirst; v <= kLast; ++v) {
    error_code ec(v, error_category());
    std::string name = ErrorName(ec);
    EXPECT_EQ(name.find(':'), std::string::npos) << v << " has no name";
    EXPECT_TRUE(names.insert(name).second) << "duplicate name " << name;
    std::string message = ec.message();
    EXPECT_EQ(message.find("unknown"), std::string::npos) << v;
    EXPECT_TRUE(messages.insert(message).second) << "duplicate message " << message;
  }
}

TEST(ErrorTest, UnknownValuesAndOtherCategories) {
  EXPECT_EQ(ErrorName(error_code(999, error_category())), "scales:999");
  EXPECT_EQ(error_code(999, error_category()).message(), "unknown scales error 999");
  auto refused = boost::system::errc::make_error_code(boost::system::errc::connection_refused);
  EXPECT_EQ(ErrorName(refused), std::string(refused.category().name()) + ":" + std::to_string(refused.value()));
  EXPECT_EQ(ErrorName(boost::system::error_code(111, boost::system::system_category())), "system:111");
}

TEST(ErrorTest, CategoryAndMessages) {
  error_code ec = Errc::kRequestTimeout;  // implicit, through is_error_code_enum
  EXPECT_EQ(&ec.category(), &error_category());
  EXPECT_STREQ(error_category().name(), "scales");
  EXPECT_STREQ(condition_category().name(), "scales.condition");
  EXPECT_EQ(ec.message(), "request timed out (deadline exceeded)");
  EXPECT_EQ(make_error_code(Errc::kFailedFast).message(), "endpoint is down (failed fast)");
  EXPECT_EQ(make_error_code(Errc::kPoolQueueFull).message(), "pool queue full");
  EXPECT_FALSE(make_error_code(Errc::kOk));  // kOk is "no error"
  EXPECT_TRUE(make_error_code(Errc::kNack));
  EXPECT_EQ(make_error_condition(Condition::kTimeout).message(), "timeout");
  EXPECT_EQ(make_error_condition(Condition::kRetryable).message(), "retryable");
  EXPECT_EQ(make_error_condition(Condition::kUnavailable).message(), "unavailable");
}

TEST(ErrorTest, TimeoutCondition) {
  for (int v = kFirst; v <= kLast; ++v) {
    auto e = static_cast<Errc>(v);
    const bool expected = e == Errc::kConnectTimeout || e == Errc::kRequestTimeout || e == Errc::kOpenTimeout;
    EXPECT_EQ(make_error_code(e) == Condition::kTimeout, expected) << ErrorName(make_error_code(e));
  }
}

TEST(ErrorTest, RetryableCondition) {
  EXPECT_TRUE(make_error_code(Errc::kConnectTimeout) == Condition::kRetryable);
  EXPECT_TRUE(make_error_code(Errc::kConnectFailed) == Condition::kRetryable);
  EXPECT_TRUE(make_error_code(Errc::kNack) == Condition::kRetryable);
  EXPECT_TRUE(make_error_code(Errc::kFailedFast) == Condition::kRetryable);
  EXPECT_TRUE(make_error_code(Errc::kPoolQueueFull) == Condition::kRetryable);
  EXPECT_TRUE(make_error_code(Errc::kNotSent) == Condition::kRetryable);
  // Not known to be unprocessed by the server: not retryable.
  EXPECT_FALSE(make_error_code(Errc::kRequestTimeout) == Condition::kRetryable);
  EXPECT_FALSE(make_error_code(Errc::kConnectionClosed) == Condition::kRetryable);
  EXPECT_FALSE(make_error_code(Errc::kServerError) == Condition::kRetryable);
  EXPECT_FALSE(make_error_code(Errc::kProtocolError) == Condition::kRetryable);
  EXPECT_FALSE(make_error_code(Errc::kOk) == Condition::kRetryable);
}

TEST(ErrorTest, UnavailableCondition) {
  for (Errc e : {Errc::kNoMembers, Errc::kFailedFast, Errc::kConnectFailed, Errc::kConnectTimeout,
                 Errc::kDiscoveryFailed, Errc::kClientClosed}) {
    EXPECT_TRUE(make_error_code(e) == Condition::kUnavailable) << ErrorName(make_error_code(e));
  }
  for (Errc e : {Errc::kRequestTimeout, Errc::kServerError, Errc::kNack, Errc::kPoolQueueFull, Errc::kNotSent}) {
    EXPECT_FALSE(make_error_code(e) == Condition::kUnavailable) << ErrorName(make_error_code(e));
  }
}

TEST(ErrorTest, ConditionsDoNotMatchOtherCategories) {
  auto timed_out = boost::system::errc::make_error_code(boost::system::errc::timed_out);
  EXPECT_FALSE(timed_out == Condition::kTimeout);
  EXPECT_FALSE(timed_out == Errc::kRequestTimeout);
  // Nor is a scales timeout equal to the generic ETIMEDOUT condition.
  EXPECT_FALSE(make_error_code(Errc::kRequestTimeout) == boost::system::errc::timed_out);
}

TEST(ErrorTest, ErrorExceptionCarriesCodeAndMessage) {
  const std::string text = "request to 10.0.0.3:9090 (service users) timed out after 500 ms (deadline)";
  Error err(make_error_code(Errc::kRequestTimeout), text);
  EXPECT_EQ(err.scales_code(), Errc::kRequestTimeout);
  EXPECT_EQ(err.code(), std::error_code(make_error_code(Errc::kRequestTimeout)));
  EXPECT_EQ(err.code().value(), static_cast<int>(Errc::kRequestTimeout));
  EXPECT_STREQ(err.code().category().name(), "scales");
  EXPECT_EQ(std::string(err.what()), text);
  // Catchable as a std::system_error and as a std::exception.
  try {
    throw Error(make_error_code(Errc::kNoMembers), "no members in static []");
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), static_cast<int>(Errc::kNoMembers));
    EXPECT_THAT(e.what(), HasSubstr("no members in static []"));
  }
}

TEST(ErrorTest, DurationTextKeepsWholeMillisecondsAndNamesFinerUnits) {
  using namespace std::chrono;
  EXPECT_EQ(DurationText(Duration::zero()), "0 ms");
  EXPECT_EQ(DurationText(milliseconds(100)), "100 ms");
  EXPECT_EQ(DurationText(seconds(10)), "10000 ms");
  EXPECT_EQ(DurationText(microseconds(500)), "500 us");
  EXPECT_EQ(DurationText(nanoseconds(250)), "250 ns");
  EXPECT_EQ(DurationText(nanoseconds(1500)), "1500 ns");
  EXPECT_EQ(DurationText(microseconds(1500)), "1.5 ms");
  EXPECT_EQ(DurationText(nanoseconds(2'000'001)), "2.000001 ms");
  EXPECT_EQ(DurationText(-microseconds(500)), "-500 us");
  EXPECT_EQ(DurationText(-milliseconds(3)), "-3 ms");
  EXPECT_EQ(DurationText(Duration::max()), "9223372036854.775807 ms");
  EXPECT_EQ(DurationText(Duration::min()), "-9223372036854.775807 ms");
}

// Measured and jittered durations ("marked down 160 us ago", "next attempt within 87 ms") are
// rounded; they read "160394 ns" and "87.123456 ms" through DurationText.
TEST(ErrorTest, ApproxDurationTextRoundsToWhatAReaderNeeds) {
  using namespace std::chrono;
  EXPECT_EQ(ApproxDurationText(Duration::zero()), "0 ns");
  EXPECT_EQ(ApproxDurationText(nanoseconds(999)), "999 ns");
  EXPECT_EQ(ApproxDurationText(nanoseconds(1'000)), "1 us");
  EXPECT_EQ(ApproxDurationText(nanoseconds(160'394)), "160 us");
  EXPECT_EQ(ApproxDurationText(nanoseconds(160'500)), "161 us");
  EXPECT_EQ(ApproxDurationText(nanoseconds(999'499)), "999 us");
  EXPECT_EQ(ApproxDurationText(nanoseconds(999'500)), "1 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(7'523'456)), "7.5 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(7'960'000)), "8 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(9'949'999)), "9.9 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(9'950'000)), "10 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(87'123'456)), "87 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(9'999'499'999)), "9999 ms");
  EXPECT_EQ(ApproxDurationText(nanoseconds(9'999'500'000)), "10 s");
  EXPECT_EQ(ApproxDurationText(milliseconds(12'345)), "12.3 s");
  EXPECT_EQ(ApproxDurationText(hours(1)), "3600 s");
  EXPECT_EQ(ApproxDurationText(-microseconds(160)), "-160 us");
  EXPECT_EQ(ApproxDurationText(Duration::max()), "9223372036.9 s");
  EXPECT_EQ(ApproxDurationText(Duration::min()), "-9223372036.9 s");
}

TEST(ErrorTest, StdErrorCodeKeepsTheCategory) {
  std::error_code sec = make_error_code(Errc::kConnectFailed);
  EXPECT_EQ(sec.value(), static_cast<int>(Errc::kConnectFailed));
  EXPECT_EQ(sec.message(), "connect failed");
  EXPECT_TRUE(static_cast<bool>(sec));
}

}  // namespace
}  // namespace scales
