#include "scales/core/random.h"

#include <chrono>
#include <functional>
#include <thread>

namespace scales {
namespace {

// Mixed into every trace and span id: the loops' Random is seeded alike in every process (the
// default RuntimeOptions::seed), so its draws alone would repeat the same trace ids in every
// process and runtime, merging unrelated calls into one trace. Drawn once per thread (a loop
// runs on its own thread) from the OS; XOR with a constant keeps one loop's ids distinct.
uint64_t TraceIdSalt() noexcept {
  thread_local const uint64_t salt = []() noexcept {
    // Without OS entropy, the clock and the thread id still differ between runtimes.
    uint64_t s = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                 std::hash<std::thread::id>{}(std::this_thread::get_id()) * 0x9e3779b97f4a7c15ULL;
    try {
      std::random_device rd;
      s ^= (static_cast<uint64_t>(rd()) << 32) ^ rd();
    } catch (...) {
    }
    return s;
  }();
  return salt;
}

}  // namespace

uint64_t NewTraceId(Random& random) noexcept { return (random.Next() ^ TraceIdSalt()) | 1; }

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
