#pragma once
// The seedable random generator. Every random choice in scales (balancer tie breaks, P2C
// picks, jitter) goes through one, so tests with a fixed seed get exact results. Results are
// identical on every platform for the same seed (mt19937_64 plus our own range reduction).
// Thread safety: one generator per event loop; not thread safe.

#include <cstdint>
#include <random>

#include "scales/core/clock.h"

namespace scales {

class Random {
 public:
  explicit Random(uint64_t seed = 0x5ca1e5) : engine_(seed) {}
  uint64_t Next() { return engine_(); }
  // Uniform in [0, n); 0 when n == 0.
  uint64_t Uniform(uint64_t n);
  // Uniform in [0, 1).
  double UniformDouble() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  // Uniform duration in [lo, hi].
  Duration UniformDuration(Duration lo, Duration hi);

 private:
  std::mt19937_64 engine_;
};

// A new trace or span id, never 0: a draw of `random` (the loop's) mixed with a value drawn once
// per thread from the OS, so that processes whose loops are seeded alike do not repeat ids. The
// dispatcher draws root trace ids and new spans with it, the retry and backup-request sinks the
// span of each further attempt.
uint64_t NewTraceId(Random& random) noexcept;

}  // namespace scales
