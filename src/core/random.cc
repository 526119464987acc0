#include "scales/core/random.h"

namespace scales {

uint64_t Random::Uniform(uint64_t n) {
  if (n == 0) return 0;
  // Rejection sampling: unbiased and platform independent (std distributions are not).
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t v;
  do {
    v = engine_();
  } while (v >= limit);
  return v % n;
}

Duration Random::UniformDuration(Duration lo, Duration hi) {
  if (hi <= lo) return lo;
  auto span = static_cast<uint64_t>((hi - lo).count());
  return lo + Duration(static_cast<Duration::rep>(Uniform(span + 1)));
}

}  // namespace scales
