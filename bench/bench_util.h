#pragma once
// Small helpers shared by the peer programs of bench/run (thrift_peer, raw_floor, alloc_count):
// `--name value` flags, process CPU time, latency percentiles, and the one JSON line each prints
// (the same field names as `scales bench --json`, so bench/run reads every program alike).
//
// Header-only and free of scales: thrift_peer and raw_floor must not link the library they
// are compared against.

#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace scales::bench {

// `--name value` pairs; a flag without a value is an error. Unknown names are the caller's to
// reject (Get marks the names it was asked for; Unused lists the others). GetInt and GetDouble
// reject an empty value and a number out of range (exit 2), never take it as 0 or cap it.
class Flags {
 public:
  Flags(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      if (std::strncmp(argv[i], "--", 2) != 0 || i + 1 >= argc)
        Die("expected --name value, got '%s'", argv[i]);
      values_[argv[i] + 2] = argv[i + 1];
      ++i;
    }
  }
  std::string Get(const std::string& name, const std::string& fallback) {
    asked_.push_back(name);
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
  }
  // An integer in 0..max (max: what the caller stores it in, e.g. 65535 for a port).
  long GetInt(const std::string& name, long fallback, long max = LONG_MAX) {
    std::string v = Get(name, std::to_string(fallback));
    char* end = nullptr;
    errno = 0;
    long n = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || n < 0 || n > max || errno == ERANGE)
      Die("--%s needs an integer in 0..%ld, got '%s'", name.c_str(), max, v.c_str());
    return n;
  }
  double GetDouble(const std::string& name, double fallback) {
    std::string v = Get(name, std::to_string(fallback));
    char* end = nullptr;
    double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !std::isfinite(d) || d < 0)
      Die("--%s needs a number in 0..%g, got '%s'", name.c_str(), DBL_MAX, v.c_str());
    return d;
  }
  // Exits with an error if a flag was given that no Get asked for.
  void RejectUnknown() const {
    for (auto& [k, v] : values_) {
      if (std::find(asked_.begin(), asked_.end(), k) == asked_.end())
        Die("unknown flag --%s", k.c_str());
    }
  }

  template <class... A>
  [[noreturn]] static void Die(const char* fmt, A... args) {
    std::fprintf(stderr, fmt, args...);
    std::fputc('\n', stderr);
    std::exit(2);
  }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> asked_;
};

// User + system CPU seconds of this process (all threads) so far.
inline double ProcessCpuSeconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto s = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return s(ru.ru_utime) + s(ru.ru_stime);
}

// The q-quantile (0..1) of `us` (sorted in place); 0 when empty.
inline int64_t Percentile(std::vector<int64_t>& us, double q) {
  if (us.empty()) return 0;
  std::sort(us.begin(), us.end());
  size_t i = static_cast<size_t>(q * static_cast<double>(us.size() - 1) + 0.5);
  return us[std::min(i, us.size() - 1)];
}

// Prints the result as one JSON line with the fields of `scales bench --json` that bench/run
// reads: requests, failed, throughput_rps, elapsed_s, latency_us.{p50,p99}, cpu_us_per_call.
inline void PrintJson(int64_t requests, int64_t failed, double elapsed_s,
                      std::vector<int64_t>& latency_us, double cpu_s) {
  const double rps = elapsed_s > 0 ? static_cast<double>(requests) / elapsed_s : 0;
  const double cpu_per_call = requests > 0 ? cpu_s * 1e6 / static_cast<double>(requests) : 0;
  const int64_t p50 = Percentile(latency_us, 0.5), p99 = Percentile(latency_us, 0.99);
  std::printf(
      "{\"requests\":%lld,\"failed\":%lld,\"throughput_rps\":%.1f,\"elapsed_s\":%.3f,"
      "\"latency_us\":{\"p50\":%lld,\"p99\":%lld},\"cpu_s\":%.3f,\"cpu_us_per_call\":%.3f}\n",
      static_cast<long long>(requests), static_cast<long long>(failed), rps, elapsed_s,
      static_cast<long long>(p50), static_cast<long long>(p99), cpu_s, cpu_per_call);
  std::fflush(stdout);
}

}  // namespace scales::bench
