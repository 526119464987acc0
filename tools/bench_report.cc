#include "bench_report.h"

#include <sys/resource.h>

#include <atomic>
#include <cstdio>
#include <future>
#include <memory>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cli_util.h"
#include "scales/stats/stats.h"

namespace scales::tools {
namespace {

// Shared with the in-flight calls' callbacks, so the last one may still be returning from
// Issue() after the report is printed.
struct Loop : std::enable_shared_from_this<Loop> {
  std::shared_ptr<const BenchStart> start;
  std::optional<int64_t> max_requests;
  std::chrono::steady_clock::time_point end;
  std::atomic<int64_t> issued{0};
  std::atomic<int> active{0};
  stats::Histogram latency_us;
  std::promise<void> done;

  void Issue(BenchWorker* w) {
    bool more = max_requests ? issued.fetch_add(1) < *max_requests : std::chrono::steady_clock::now() < end;
    if (!more) {
      if (active.fetch_sub(1) == 1) done.set_value();
      return;
    }
    w->started = std::chrono::steady_clock::now();
    (*start)(*w, [this, self = shared_from_this(), w](error_code ec) {
      auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - w->started);
      latency_us.Record(us.count());
      if (ec) {
        ++w->failed;
        ++w->errors[ErrorName(ec)];
        w->last_error = w->info.detail;
      } else {
        ++w->succeeded;
      }
      ++w->endpoints[w->info.endpoint.empty() ? std::string("(none)") : w->info.endpoint];
      Issue(w);
    });
  }
};

// User and system CPU seconds of the whole process (every thread) so far.
std::pair<double, double> ProcessCpuSeconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return {seconds(ru.ru_utime), seconds(ru.ru_stime)};
}

}  // namespace

int64_t RunClosedLoopAndReport(const BenchLimits& limits, const BenchStart& start, bool json) {
  auto loop = std::make_shared<Loop>();
  loop->start = std::make_shared<const BenchStart>(start);
  loop->max_requests = limits.requests;
  loop->active = static_cast<int>(limits.concurrency);
  std::vector<std::unique_ptr<BenchWorker>> workers;
  for (int64_t i = 0; i < limits.concurrency; ++i) workers.push_back(std::make_unique<BenchWorker>());
  auto done = loop->done.get_future();
  const auto cpu_begin = ProcessCpuSeconds();
  const auto begin = std::chrono::steady_clock::now();
  if (limits.duration) loop->end = begin + *limits.duration;
  for (auto& w : workers) loop->Issue(w.get());
  done.wait();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  const auto cpu_end = ProcessCpuSeconds();
  // Client CPU per call (the process's user + system time over the run / calls): steadier than
  // throughput on a shared machine, and what bench/run compares against the peers.
  const double cpu_user = cpu_end.first - cpu_begin.first, cpu_sys = cpu_end.second - cpu_begin.second;
  // Workers are quiescent now (each ended by not issuing); merge their counts.
  int64_t succeeded = 0, failed = 0;
  std::map<std::string, int64_t> errors, endpoints;
  std::string last_error;
  for (auto& w : workers) {
    succeeded += w->succeeded;
    failed += w->failed;
    for (auto& [k, v] : w->errors) errors[k] += v;
    for (auto& [k, v] : w->endpoints) endpoints[k] += v;
    if (!w->last_error.empty()) last_error = w->last_error;
  }
  const int64_t total = succeeded + failed;
  auto snap = loop->latency_us.Snapshot();
  const double rps = elapsed > 0 ? static_cast<double>(total) / elapsed : 0;
  const double cpu_us_per_call = total > 0 ? (cpu_user + cpu_sys) * 1e6 / static_cast<double>(total) : 0;
  if (json) {
    std::string out = fmt::format(
        "{{\"requests\":{},\"succeeded\":{},\"failed\":{},\"errors\":{{", total, succeeded, failed);
    bool first = true;
    for (auto& [k, v] : errors) {
      out += fmt::format("{}\"{}\":{}", first ? "" : ",", JsonEscape(k), v);
      first = false;
    }
    out += fmt::format("}},\"throughput_rps\":{:.1f},\"elapsed_s\":{:.3f},\"latency_us\":{{\"p50\":{},\"p90\":{},"
                       "\"p99\":{},\"p999\":{},\"max\":{}}},\"cpu_user_s\":{:.3f},\"cpu_sys_s\":{:.3f},"
                       "\"cpu_us_per_call\":{:.3f},\"endpoints\":{{",
                       rps, elapsed, snap.Percentile(0.5), snap.Percentile(0.9), snap.Percentile(0.99),
                       snap.Percentile(0.999), snap.max, cpu_user, cpu_sys, cpu_us_per_call);
    first = true;
    for (auto& [k, v] : endpoints) {
      out += fmt::format("{}\"{}\":{}", first ? "" : ",", JsonEscape(k), v);
      first = false;
    }
    out += "}}\n";
    std::fputs(out.c_str(), stdout);
  } else {
    std::printf("requests      %lld\n", static_cast<long long>(total));
    std::printf("succeeded     %lld\n", static_cast<long long>(succeeded));
    std::printf("failed        %lld\n", static_cast<long long>(failed));
    for (auto& [k, v] : errors) std::printf("  %-24s %lld\n", k.c_str(), static_cast<long long>(v));
    if (!last_error.empty()) std::printf("  last error: %s\n", last_error.c_str());
    std::printf("elapsed       %.3f s\n", elapsed);
    std::printf("throughput    %.1f req/s\n", rps);
    std::printf("latency (us)  p50 %lld  p90 %lld  p99 %lld  p99.9 %lld  max %lld\n",
                static_cast<long long>(snap.Percentile(0.5)), static_cast<long long>(snap.Percentile(0.9)),
                static_cast<long long>(snap.Percentile(0.99)), static_cast<long long>(snap.Percentile(0.999)),
                static_cast<long long>(snap.max));
    std::printf("client cpu    user %.3f s  sys %.3f s  %.2f us/call\n", cpu_user, cpu_sys, cpu_us_per_call);
    std::printf("endpoints\n");
    for (auto& [k, v] : endpoints) std::printf("  %-24s %lld\n", k.c_str(), static_cast<long long>(v));
  }
  std::fflush(stdout);
  return failed;
}

}  // namespace scales::tools
