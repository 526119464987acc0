// RetryBudget and WindowedAdder on a manual clock: Finagle's arithmetic (deposit 1000,
// withdrawal 1000 / percent, reserve min_retries_per_sec x ttl x withdrawal), expiry after ttl.

#include "scales/resilience/retry_budget.h"

#include <algorithm>
#include <chrono>
#include <random>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "scales/core/error.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;

RetryBudgetOptions Opts(Duration ttl, int min_per_sec, double percent) {
  RetryBudgetOptions o;
  o.ttl = ttl;
  o.min_retries_per_sec = min_per_sec;
  o.percent_can_retry = percent;
  return o;
}

TEST(RetryBudgetTest, DefaultsMatchFinagle) {
  ManualClock clock;
  RetryBudget budget(clock);
  EXPECT_EQ(budget.deposit_amount(), 1000);
  EXPECT_EQ(budget.withdrawal_amount(), 5000);
  EXPECT_EQ(budget.reserve(), 10 * 10 * 5000);
  EXPECT_EQ(budget.Balance(), 100);
}

TEST(RetryBudgetTest, ReserveAllowsAHundredRetriesWithDefaults) {
  ManualClock clock;
  RetryBudget budget(clock);
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(budget.TryWithdraw()) << i;
  EXPECT_FALSE(budget.TryWithdraw());
  EXPECT_EQ(budget.Balance(), 0);
  // Five deposits buy one more retry (20 %).
  for (int i = 0; i < 4; ++i) budget.Deposit();
  EXPECT_FALSE(budget.TryWithdraw());
  budget.Deposit();
  EXPECT_TRUE(budget.TryWithdraw());
  EXPECT_FALSE(budget.TryWithdraw());
}

TEST(RetryBudgetTest, TwentyPercentOfRequestsPlusReserve) {
  ManualClock clock;
  RetryBudget budget(clock);
  for (int i = 0; i < 1000; ++i) budget.Deposit();
  EXPECT_EQ(budget.Balance(), 100 + 200);
  int allowed = 0;
  while (budget.TryWithdraw()) ++allowed;
  EXPECT_EQ(allowed, 300);
}

TEST(RetryBudgetTest, WithoutReserveOnlyThePercentage) {
  ManualClock clock;
  RetryBudget budget(clock, Opts(seconds(10), 0, 0.2));
  EXPECT_EQ(budget.Balance(), 0);
  EXPECT_FALSE(budget.TryWithdraw());
  for (int i = 0; i < 100; ++i) budget.Deposit();
  EXPECT_EQ(budget.Balance(), 20);
  int allowed = 0;
  while (budget.TryWithdraw()) ++allowed;
  EXPECT_EQ(allowed, 20);
}

TEST(RetryBudgetTest, DepositsExpireAfterTtl) {
  ManualClock clock;
  RetryBudget budget(clock, Opts(seconds(10), 0, 0.5));
  for (int i = 0; i < 10; ++i) budget.Deposit();  // slice 0
  EXPECT_EQ(budget.Balance(), 5);
  clock.Advance(seconds(5));
  for (int i = 0; i < 4; ++i) budget.Deposit();  // slice 5
  EXPECT_EQ(budget.Balance(), 7);
  clock.Advance(seconds(5) - nanoseconds(1));  // still in slice 9
  EXPECT_EQ(budget.Balance(), 7);
  clock.Advance(nanoseconds(1));  // slice 10: slice 0 expired
  EXPECT_EQ(budget.Balance(), 2);
  clock.Advance(seconds(5));  // slice 15: slice 5 expired
  EXPECT_EQ(budget.Balance(), 0);
  // A long idle period clears everything.
  for (int i = 0; i < 10; ++i) budget.Deposit();
  clock.Advance(seconds(3600));
  EXPECT_EQ(budget.Balance(), 0);
}

TEST(RetryBudgetTest, WithdrawalsExpireToo) {
  ManualClock clock;
  RetryBudget budget(clock);
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(budget.TryWithdraw());
  EXPECT_FALSE(budget.TryWithdraw());
  clock.Advance(seconds(10));
  EXPECT_EQ(budget.Balance(), 100);
  EXPECT_TRUE(budget.TryWithdraw());
}

TEST(RetryBudgetTest, ReserveScalesWithTtl) {
  ManualClock clock;
  RetryBudget budget(clock, Opts(seconds(1), 10, 0.2));
  EXPECT_EQ(budget.Balance(), 10);
  RetryBudget longer(clock, Opts(seconds(60), 1, 0.1));
  EXPECT_EQ(longer.withdrawal_amount(), 10000);
  EXPECT_EQ(longer.Balance(), 60);
}

TEST(RetryBudgetTest, ZeroPercentLeavesOnlyTheReserve) {
  ManualClock clock;
  RetryBudget budget(clock, Opts(seconds(10), 1, 0.0));
  EXPECT_EQ(budget.deposit_amount(), 0);
  for (int i = 0; i < 100; ++i) budget.Deposit();
  EXPECT_EQ(budget.Balance(), 10);
}

TEST(RetryBudgetTest, ValidatesOptions) {
  EXPECT_NO_THROW(Validate(RetryBudgetOptions{}));
  EXPECT_THROW(Validate(Opts(milliseconds(999), 10, 0.2)), Error);
  EXPECT_THROW(Validate(Opts(seconds(61), 10, 0.2)), Error);
  EXPECT_THROW(Validate(Opts(seconds(10), -1, 0.2)), Error);
  EXPECT_THROW(Validate(Opts(seconds(10), 10, -0.1)), Error);
  EXPECT_THROW(Validate(Opts(seconds(10), 10, 1001)), Error);
  // Bounds that keep the token arithmetic in 64 bits: 1000 / 1e-17 tokens per withdrawal, or a
  // reserve of 2e9 x 60 x 1e9 tokens, would overflow.
  EXPECT_THROW(Validate(Opts(seconds(10), 10, 1e-17)), Error);
  EXPECT_THROW(Validate(Opts(seconds(10), 1'000'001, 0.2)), Error);
  EXPECT_NO_THROW(Validate(Opts(seconds(10), 10, 0)));  // 0: no retries beyond the reserve
  ManualClock clock;
  {
    // At the extremes the budget still counts exactly: the reserve of the largest
    // min_retries_per_sec over the longest ttl at the smallest percent_can_retry.
    RetryBudget extreme(clock, Opts(seconds(60), 1'000'000, 1e-6));
    EXPECT_EQ(extreme.Balance(), 60'000'000);
    EXPECT_TRUE(extreme.TryWithdraw());
    EXPECT_EQ(extreme.Balance(), 60'000'000 - 1);
  }
  EXPECT_THROW(RetryBudget(clock, Opts(seconds(0), 10, 0.2)), Error);
  try {
    Validate(Opts(seconds(61), 10, 0.2));
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("ttl"), std::string::npos);
  }
}

TEST(WindowedAdderTest, SlicesExpireInOrder) {
  ManualClock clock;
  WindowedAdder adder(clock, seconds(5), 5);
  adder.Add(1);
  clock.Advance(seconds(1));
  adder.Add(10);
  clock.Advance(seconds(1));
  adder.Add(100);
  EXPECT_EQ(adder.Sum(), 111);
  clock.Advance(seconds(3));  // slice 5: slice 0 gone
  EXPECT_EQ(adder.Sum(), 110);
  clock.Advance(seconds(1));
  EXPECT_EQ(adder.Sum(), 100);
  adder.Reset();
  EXPECT_EQ(adder.Sum(), 0);
}

// On a seeded mix of deposits, withdrawals and clock moves (small and past whole slices),
// Balance() (over the window's running sum) must equal the division over a replayed window.
TEST(RetryBudgetTest, BalanceStepsMatchTheDivision) {
  for (double percent : {0.2, 0.5, 1.0, 3.0, 0.0}) {
    ManualClock clock;
    RetryBudget budget(clock, Opts(seconds(2), 1, percent));
    WindowedAdder model(clock, seconds(2), RetryBudget::kSlices);  // the budget's window, replayed
    std::mt19937 rng(7);
    for (int i = 0; i < 20000; ++i) {
      const uint32_t r = rng() % 100;
      if (r < 70) {
        budget.Deposit();
        model.Add(budget.deposit_amount());
      } else if (r < 90) {
        if (budget.TryWithdraw()) model.Add(-budget.withdrawal_amount());
      } else if (r < 99) {
        clock.Advance(milliseconds(rng() % 150));
      } else {
        clock.Advance(milliseconds(rng() % 3000));  // up to more than the whole ttl
      }
      const int64_t want = std::max<int64_t>(0, budget.reserve() + model.Sum()) / budget.withdrawal_amount();
      ASSERT_EQ(budget.Balance(), want) << "percent " << percent << " step " << i;
    }
  }
}

// The running sum against a sum of the slices a value is still in, on random times.
TEST(WindowedAdderTest, RunningSumMatchesTheLiveSlices) {
  ManualClock clock;
  const TimePoint start = clock.Now();
  WindowedAdder adder(clock, seconds(1), 10);  // 100 ms slices
  std::vector<std::pair<int64_t, int64_t>> added;  // slice index, value
  std::mt19937 rng(11);
  for (int i = 0; i < 5000; ++i) {
    clock.Advance(milliseconds(rng() % (i % 50 == 0 ? 1500 : 40)));
    const int64_t slice = (clock.Now() - start) / milliseconds(100);
    const int64_t v = static_cast<int64_t>(rng() % 1000) - 300;
    adder.Add(v);
    added.emplace_back(slice, v);
    int64_t want = 0;
    for (const auto& [s, x] : added) {
      if (slice - s < 10) want += x;  // expires once its slice is 10 slices old
    }
    ASSERT_EQ(adder.Sum(), want) << "step " << i;
  }
}

}  // namespace
}  // namespace scales
