#pragma once
// Equal-jitter exponential backoff, the one sequence of failure accrual's dead periods and of
// ZooKeeper discovery's retries: wait `k` (from 0) is `first` for k == 0, then drawn uniformly
// from [d / 2, d] for d = first * 2^k until d reaches `max`, then `max`. A `max` under `first`
// counts as `first`. Doubling stops before it could overflow (a huge `max` is "no cap").

#include <algorithm>

#include "scales/core/clock.h"
#include "scales/core/random.h"

namespace scales {

inline Duration EqualJitterBackoff(Duration first, Duration max, int k, Random& random) {
  max = std::max(first, max);
  if (k <= 0) return first;
  Duration hi = first;
  for (int i = 0; i < k; ++i) {
    if (hi > max / 2) return max;  // doubling would reach max anyway
    hi *= 2;
  }
  if (hi >= max) return max;
  return random.UniformDuration(hi / 2, hi);
}

}  // namespace scales
