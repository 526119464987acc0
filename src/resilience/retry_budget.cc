#include "scales/resilience/retry_budget.h"

#include <algorithm>
#include <chrono>
#include <string>

#include <fmt/format.h>

#include "scales/core/error.h"

namespace scales {

WindowedAdder::WindowedAdder(const Clock& clock, Duration window, int slices)
    : clock_(clock),
      slice_(std::max<Duration>(window / std::max(slices, 1), Duration(1))),
      epoch_(clock.Now()),
      next_(epoch_ + slice_),
      slices_(static_cast<size_t>(std::max(slices, 1)), 0) {}

void WindowedAdder::Advance() {
  const int64_t now_index = (clock_.Now() - epoch_) / slice_;
  if (now_index <= current_) return;
  const int64_t n = static_cast<int64_t>(slices_.size());
  const int64_t steps = std::min(now_index - current_, n);
  for (int64_t i = 1; i <= steps; ++i) {
    int64_t& expired = slices_[static_cast<size_t>((current_ + i) % n)];
    sum_ -= expired;
    expired = 0;
  }
  current_ = now_index;
  slot_ = current_ % n;
  next_ = epoch_ + slice_ * (current_ + 1);
}

void WindowedAdder::Reset() {
  std::fill(slices_.begin(), slices_.end(), 0);
  epoch_ = clock_.Now();
  next_ = epoch_ + slice_;
  current_ = 0;
  slot_ = 0;
  sum_ = 0;
}

void Validate(const RetryBudgetOptions& o, std::string_view field) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.ttl < std::chrono::seconds(1) || o.ttl > std::chrono::seconds(60)) {
    fail(fmt::format("{}.ttl must be in [1 s, 60 s] (got {} ms)", field,
                     std::chrono::duration_cast<std::chrono::milliseconds>(o.ttl).count()));
  }
  // The bounds keep the token arithmetic in 64 bits: a withdrawal costs 1000 / percent_can_retry
  // tokens (at most 1e9) and the reserve min_retries_per_sec x ttl x that (at most 6e16).
  if (o.min_retries_per_sec < 0 || o.min_retries_per_sec > RetryBudgetOptions::kMaxMinRetriesPerSec) {
    fail(fmt::format("{}.min_retries_per_sec must be in [0, {}] (got {})", field, RetryBudgetOptions::kMaxMinRetriesPerSec,
                     o.min_retries_per_sec));
  }
  if (!(o.percent_can_retry == 0.0 ||
        (o.percent_can_retry >= RetryBudgetOptions::kMinPercentCanRetry && o.percent_can_retry <= 1000.0))) {
    fail(fmt::format("{}.percent_can_retry must be 0 or in [{}, 1000] (got {})", field, RetryBudgetOptions::kMinPercentCanRetry,
                     o.percent_can_retry));
  }
}

namespace {
RetryBudgetOptions Validated(RetryBudgetOptions o) {
  Validate(o);
  return o;
}
}  // namespace

RetryBudget::RetryBudget(const Clock& clock, RetryBudgetOptions options)
    : options_(Validated(options)),
      deposit_amount_(options_.percent_can_retry == 0.0 ? 0 : kScaleFactor),
      withdrawal_amount_(options_.percent_can_retry == 0.0
                             ? kScaleFactor
                             : static_cast<int64_t>(static_cast<double>(kScaleFactor) / options_.percent_can_retry)),
      reserve_(int64_t{options_.min_retries_per_sec} *
               std::chrono::duration_cast<std::chrono::seconds>(options_.ttl).count() * withdrawal_amount_),
      window_(clock, options_.ttl, kSlices) {
  if (withdrawal_amount_ < 1) withdrawal_amount_ = 1;  // percent_can_retry > 1000 is rejected
}

void RetryBudget::Deposit() { window_.Add(deposit_amount_); }

bool RetryBudget::TryWithdraw() {
  if (reserve_ + window_.Sum() < withdrawal_amount_) return false;
  window_.Add(-withdrawal_amount_);
  return true;
}

int64_t RetryBudget::Balance() { return std::max<int64_t>(0, reserve_ + window_.Sum()) / withdrawal_amount_; }

}  // namespace scales
