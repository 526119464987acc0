#pragma once
// RetryBudget: Finagle's retry budget (com.twitter.finagle.service.RetryBudget), a leaky token
// bucket on the injected clock. Every call deposits once; every retry withdraws. Retries are
// thereby limited to `percent_can_retry` of the calls of the last `ttl`, plus a reserve of
// `min_retries_per_sec` per second of `ttl` for low traffic.
//
// Arithmetic (Finagle's scale factor 1000): a deposit adds 1000 tokens; a withdrawal costs
// 1000 / percent_can_retry tokens (5000 by default; 1000 when percent_can_retry is 0, which
// then also makes deposits worth nothing); the reserve is
// min_retries_per_sec x ttl_seconds x withdrawal cost (100 retries' worth by default). Deposits
// and withdrawals both go into a WindowedAdder over `ttl` and expire with it; the reserve does
// not expire. Balance() = (reserve + window sum) / withdrawal cost, in retries.

#include <cstdint>
#include <string_view>
#include <vector>

#include "scales/core/clock.h"

namespace scales {

// A sum over a sliding time window: `slices` slices of window/slices each, on `clock`. A value
// added at time t counts until the slice holding t is `slices` slices old, i.e. it expires
// between window - window/slices and window after t. Add() and Sum() cost one clock reading
// and a comparison while the current slice lasts (the running sum is kept; slices are zeroed,
// with a division, only when time has moved past the current slice). Thread safety: none (one
// event loop).
class WindowedAdder {
 public:
  WindowedAdder(const Clock& clock, Duration window, int slices);
  void Add(int64_t n) {
    Roll();
    slices_[static_cast<size_t>(slot_)] += n;
    sum_ += n;
  }
  // The sum of the live slices.
  int64_t Sum() {
    Roll();
    return sum_;
  }
  void Reset();

 private:
  void Roll() {
    if (clock_.Now() >= next_) Advance();
  }
  // Moves to the slice holding the current time, expiring the slices in between.
  void Advance();

  const Clock& clock_;
  Duration slice_;
  TimePoint epoch_;
  TimePoint next_;  // where the slice after the current one starts
  std::vector<int64_t> slices_;
  int64_t current_ = 0;  // absolute index of the current slice since epoch_
  int64_t slot_ = 0;     // current_ % slices
  int64_t sum_ = 0;      // of every slice
};

struct RetryBudgetOptions {
  // Lifetime of a deposit. Default 10 s; 1 s .. 60 s.
  Duration ttl = std::chrono::seconds(10);
  // Retries per second of `ttl` always allowed (the reserve). Default 10; 0 .. 1,000,000.
  int min_retries_per_sec = 10;
  // Retries allowed per deposited call. Default 0.2; 0, or 1e-6 .. 1000.
  double percent_can_retry = 0.2;

  // Bounds Validate enforces (they keep the budget's token arithmetic in 64 bits).
  static constexpr int kMaxMinRetriesPerSec = 1'000'000;
  static constexpr double kMinPercentCanRetry = 1e-6;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable.
// `field` names the options in messages: "retry_budget" for a budget of its own, "retry.budget"
// for RetryOptions::budget.
void Validate(const RetryBudgetOptions& o, std::string_view field = "retry_budget");

// Thread safety: one budget per client per event loop, used on that loop only.
class RetryBudget {
 public:
  static constexpr int64_t kScaleFactor = 1000;
  static constexpr int kSlices = 10;

  // Validates `options`.
  explicit RetryBudget(const Clock& clock, RetryBudgetOptions options = {});

  // One call was made (once per call, never per attempt).
  void Deposit();
  // Takes one retry's worth of tokens if there is one; false (and nothing taken) otherwise.
  bool TryWithdraw();
  // Retries currently allowed: (reserve + live deposits - live withdrawals) / withdrawal cost,
  // at least 0. Called per call (the retry sink's gauge); the window keeps its sum running, so
  // this is one addition and one division.
  int64_t Balance();

  const RetryBudgetOptions& options() const noexcept { return options_; }
  int64_t deposit_amount() const noexcept { return deposit_amount_; }
  int64_t withdrawal_amount() const noexcept { return withdrawal_amount_; }
  int64_t reserve() const noexcept { return reserve_; }

 private:
  RetryBudgetOptions options_;
  int64_t deposit_amount_;
  int64_t withdrawal_amount_;
  int64_t reserve_;
  WindowedAdder window_;
};

}  // namespace scales
