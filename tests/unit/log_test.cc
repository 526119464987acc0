// The logger: quiet by default, levels, the user's sink, and rate limiting per call site on
// a manual clock.

#include "scales/core/log.h"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scales/core/clock.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Installs a capturing sink and a manual clock; restores the previous logger state after.
class LogTest : public ::testing::Test {
 protected:
  LogTest() {
    previous_sink_ = SetLogSink([this](const LogRecord& r) {
      messages_.push_back(std::string(ToString(r.level)) + " " + std::string(r.message));
      files_.push_back(r.file);
    });
    previous_clock_ = SetLogClock(clock_);
    // Each call site's limiter is a static that outlives the test: start every test an hour
    // later than the previous one, so that --gtest_repeat starts in fresh windows.
    static int tests_run = 0;
    clock_->Advance(std::chrono::hours(++tests_run));
  }
  ~LogTest() override {
    SetLogLevel(previous_level_);
    SetLogSink(previous_sink_);
    SetLogClock(previous_clock_);
  }

  // Logs `n` records from one call site.
  void LogFromOneSite(int n) {
    for (int i = 0; i < n; ++i) SCALES_LOG_RATE_LIMITED(kWarning, 3, "failure {}", i);
  }

  LogLevel previous_level_ = GetLogLevel();
  LogSink previous_sink_;
  std::shared_ptr<ManualClock> clock_ = std::make_shared<ManualClock>();
  std::shared_ptr<const Clock> previous_clock_;
  std::vector<std::string> messages_;
  std::vector<std::string> files_;
};

TEST_F(LogTest, QuietByDefault) {
  // The library starts at kOff; this test binary never changes the level outside LogTest.
  EXPECT_EQ(previous_level_, LogLevel::kOff);
  EXPECT_FALSE(LogEnabled(LogLevel::kError));
  SCALES_LOG(kError, "not written {}", 1);
  EXPECT_TRUE(messages_.empty());
}

TEST_F(LogTest, LevelFiltersAndArgumentsAreNotFormattedWhenOff) {
  EXPECT_EQ(SetLogLevel(LogLevel::kWarning), LogLevel::kOff);
  int formatted = 0;
  auto counted = [&] {
    ++formatted;
    return 7;
  };
  SCALES_LOG(kDebug, "debug {}", counted());
  SCALES_LOG(kInfo, "info {}", counted());
  SCALES_LOG(kWarning, "warning {}", counted());
  SCALES_LOG(kError, "error {}", counted());
  EXPECT_EQ(formatted, 2);  // the disabled lines did not even evaluate their arguments
  EXPECT_THAT(messages_, ElementsAre("warning warning 7", "error error 7"));
  EXPECT_THAT(files_[0], HasSubstr("log_test.cc"));
  SetLogLevel(LogLevel::kOff);
  SCALES_LOG(kError, "off");
  EXPECT_EQ(messages_.size(), 2u);
}

TEST_F(LogTest, RateLimitedPerCallSiteWithSuppressedCount) {
  SetLogLevel(LogLevel::kDebug);
  LogFromOneSite(10);  // 3 pass in the first second
  EXPECT_THAT(messages_,
              ElementsAre("warning failure 0", "warning failure 1", "warning failure 2"));
  clock_->Advance(milliseconds(999));
  LogFromOneSite(2);  // same window: suppressed
  EXPECT_EQ(messages_.size(), 3u);
  clock_->Advance(milliseconds(1));
  LogFromOneSite(1);  // a new window; the 9 refused records are counted
  ASSERT_EQ(messages_.size(), 4u);
  EXPECT_EQ(messages_[3], "warning failure 0 (9 similar messages suppressed)");
  LogFromOneSite(1);
  EXPECT_EQ(messages_[4], "warning failure 0");
  // Another call site has its own budget.
  SCALES_LOG_RATE_LIMITED(kWarning, 1, "other site");
  EXPECT_EQ(messages_.back(), "warning other site");
}

TEST(LogRateLimiterTest, WindowStartsAtTheFirstRecordAfterTheLastWindow) {
  LogRateLimiter limiter(2);
  TimePoint t0(std::chrono::seconds(100));
  uint64_t suppressed = 99;
  EXPECT_TRUE(limiter.Allow(t0, &suppressed));
  EXPECT_EQ(suppressed, 0u);
  EXPECT_TRUE(limiter.Allow(t0 + milliseconds(10), &suppressed));
  EXPECT_FALSE(limiter.Allow(t0 + milliseconds(20), &suppressed));
  EXPECT_FALSE(limiter.Allow(t0 + milliseconds(999), &suppressed));
  EXPECT_TRUE(limiter.Allow(t0 + milliseconds(1500), &suppressed));
  EXPECT_EQ(suppressed, 2u);
  EXPECT_TRUE(limiter.Allow(t0 + milliseconds(2000), &suppressed));
  EXPECT_EQ(suppressed, 0u);
  EXPECT_FALSE(limiter.Allow(t0 + milliseconds(2499), &suppressed));  // window began at 1500
  EXPECT_TRUE(limiter.Allow(t0 + milliseconds(2500), &suppressed));
  EXPECT_EQ(suppressed, 1u);
}

TEST(LogLevelTest, Names) {
  EXPECT_STREQ(ToString(LogLevel::kDebug), "debug");
  EXPECT_STREQ(ToString(LogLevel::kWarning), "warning");
  EXPECT_STREQ(ToString(LogLevel::kOff), "off");
}

}  // namespace
}  // namespace scales
