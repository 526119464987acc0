#include "bench_report.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cli_util.h"

namespace scales::tools {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kTick = std::chrono::milliseconds(100);
constexpr int kTicksPerSecond = 10;

// The time for a call's latency, read where calls start and complete: scales' steady clock,
// which shares one reading per event while the library runs a batch of completions on its loop
// (ClockTurn), as the library's own sinks do; the driver then adds no clock reads of its own.
Clock::time_point CallClockNow() {
  static const SteadyClock clock;
  return clock.Now();
}

// Shared with the in-flight calls' callbacks, so the last one may still be returning from its
// completion after the report is built. Owns the workers for the same reason.
struct Run : std::enable_shared_from_this<Run> {
  std::shared_ptr<const BenchStart> start;
  std::vector<std::unique_ptr<BenchWorker>> workers;
  Clock::time_point begin;
  stats::Histogram latency_us;
  std::atomic<int64_t> failed{0};
  std::atomic<int64_t> tick_max_us{0};  // the largest latency since the last 100 ms tick
  std::promise<void> done;
  std::atomic<bool> finished{false};  // `done` was set
  const std::atomic<bool>* stop = nullptr;

  // Closed loop.
  std::optional<int64_t> max_requests;
  Clock::time_point end;
  std::atomic<int64_t> issued{0};
  std::atomic<int64_t> active{0};

  // Open loop: call i is due at begin + i / rate; `total` calls in all (fewer once stopped).
  double rate = 0;
  std::atomic<int64_t> total{0};
  std::atomic<int64_t> completed{0};
  std::mutex mu;  // guards the fields below
  std::vector<BenchWorker*> free;
  int64_t due = 0;   // calls 0..due-1 are due
  int64_t sent = 0;  // calls 0..sent-1 were sent
  int64_t queued = 0;
  int64_t max_backlog = 0;

  Clock::time_point Intended(int64_t i) const {
    return begin + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(static_cast<double>(i) / rate));
  }

  // Starts `w`'s call, whose latency clock started at `started`.
  void Send(BenchWorker* w, Clock::time_point started) {
    w->started = started;
    // Two pointers: std::function keeps them without allocating. The Run outlives the call:
    // whoever ends the run (Issue, Freed) holds a reference until its callback returns.
    (*start)(*w, [this, w](error_code ec) {
      auto us = std::chrono::duration_cast<std::chrono::microseconds>(CallClockNow() - w->started).count();
      latency_us.Record(us);
      int64_t seen = tick_max_us.load(std::memory_order_relaxed);
      while (us > seen && !tick_max_us.compare_exchange_weak(seen, us, std::memory_order_relaxed)) {
      }
      if (ec) {
        ++w->failed;
        ++w->errors[ErrorName(ec)];
        w->last_error = w->info.detail;
        failed.fetch_add(1, std::memory_order_relaxed);
      } else {
        ++w->succeeded;
      }
      const std::string_view endpoint = w->info.endpoint.empty() ? std::string_view("(none)") : w->info.endpoint;
      if (w->last_endpoint_count == nullptr || endpoint != w->last_endpoint) {
        w->last_endpoint.assign(endpoint);
        w->last_endpoint_count = &w->endpoints[w->last_endpoint];
      }
      ++*w->last_endpoint_count;
      if (ec) ++w->endpoint_errors[w->last_endpoint];
      if (rate > 0) {
        Freed(w);
      } else {
        Issue(w);
      }
    });
  }

  bool Stopped() const { return stop != nullptr && stop->load(std::memory_order_relaxed); }

  // Ends the run, once (after a stop, both the driver and the last completion may see the end).
  void Finish() {
    if (finished.exchange(true)) return;
    auto keep = shared_from_this();  // the waiter may release the run once `done` is set
    done.set_value();
  }

  // Closed loop: the worker's next call, or its end. Its `first` call goes even past the end of
  // a --duration shorter than starting the callers (as an open loop sends at least one call).
  void Issue(BenchWorker* w, bool first = false) {
    const Clock::time_point now = CallClockNow();
    bool more = !Stopped() && (max_requests ? issued.fetch_add(1) < *max_requests : first || now < end);
    if (!more) {
      if (active.fetch_sub(1) == 1) Finish();
      return;
    }
    Send(w, now);
  }

  // Open loop, stopped: the calls not sent yet never are; the run ends with the last one sent.
  void StopSending() {
    {
      std::lock_guard lock(mu);
      due = sent;
      total = sent;
    }
    if (completed.load() == total.load()) Finish();
  }

  // Open loop: a slot is free again; it takes the oldest waiting call, if any.
  void Freed(BenchWorker* w) {
    int64_t next = -1;
    {
      std::lock_guard lock(mu);
      if (sent < due) {
        next = sent++;
        ++queued;
      } else {
        free.push_back(w);
      }
    }
    // Counted after the slot went back, so that the driver sees every slot free at the end.
    const bool last = completed.fetch_add(1) + 1 == total.load();
    if (next >= 0) Send(w, Intended(next));
    if (last) Finish();
  }

  // Open loop: calls up to `now_due` are due; send them while slots are free. Returns the
  // backlog (due calls still waiting).
  int64_t Release(int64_t now_due) {
    std::vector<std::pair<BenchWorker*, int64_t>> to_send;
    int64_t backlog;
    {
      std::lock_guard lock(mu);
      const int64_t was_due = due;
      due = std::max(due, now_due);
      while (sent < due && !free.empty()) {
        if (sent < was_due) ++queued;  // due earlier, but no slot was free then
        to_send.emplace_back(free.back(), sent++);
        free.pop_back();
      }
      backlog = due - sent;
      max_backlog = std::max(max_backlog, backlog);
    }
    for (auto& [w, i] : to_send) Send(w, Intended(i));
    return backlog;
  }

  int64_t Backlog() {
    std::lock_guard lock(mu);
    return due - sent;
  }
};

// User and system CPU seconds of the whole process (every thread) so far.
std::pair<double, double> ProcessCpuSeconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return {seconds(ru.ru_utime), seconds(ru.ru_stime)};
}

// The samples recorded between two snapshots of one histogram (buckets sorted by bound).
stats::HistogramSnapshot Delta(const stats::HistogramSnapshot& now, const stats::HistogramSnapshot& before,
                               int64_t max) {
  stats::HistogramSnapshot d;
  size_t j = 0;
  for (const auto& [bound, n] : now.buckets) {
    while (j < before.buckets.size() && before.buckets[j].first < bound) ++j;
    int64_t prev = j < before.buckets.size() && before.buckets[j].first == bound ? before.buckets[j].second : 0;
    if (n > prev) {
      d.buckets.emplace_back(bound, n - prev);
      d.count += n - prev;
    }
  }
  // `max` is exact, unless the interval's largest call landed in the next interval's maximum.
  d.max = max > 0 || d.buckets.empty() ? max : d.buckets.back().first;
  return d;
}

// Builds the time series: a sample per 100 ms and per second, from histogram snapshots.
class Sampler {
 public:
  Sampler(Run& run) : run_(run) {}

  // Takes the sample ending at `t_s`; returns true when a second ended with it.
  bool Tick(double t_s, bool final) {
    auto snap = run_.latency_us.Snapshot();
    const int64_t failed = run_.failed.load(std::memory_order_relaxed);
    const int64_t max = run_.tick_max_us.exchange(0, std::memory_order_relaxed);
    const int64_t backlog = run_.rate > 0 ? run_.Backlog() : 0;
    const auto tenth = Make(snap, last_tenth_, failed, failed_tenth_, max, t_s, t_s - t_tenth_, backlog);
    tenths_.push_back(tenth);
    second_max_ = std::max(second_max_, max);
    last_tenth_ = std::move(snap);
    failed_tenth_ = failed;
    t_tenth_ = t_s;
    ++ticks_;
    const bool second_ended = ticks_ % kTicksPerSecond == 0;
    if (!second_ended && !(final && t_s > t_second_)) return false;
    seconds_.push_back(
        Make(last_tenth_, last_second_, failed, failed_second_, second_max_, t_s, t_s - t_second_, backlog));
    last_second_ = last_tenth_;
    failed_second_ = failed;
    t_second_ = t_s;
    second_max_ = 0;
    return second_ended;
  }

  const BenchSample& last_second() const { return seconds_.back(); }
  std::vector<BenchSample> TakeSeconds() { return std::move(seconds_); }
  std::vector<BenchSample> TakeTenths() { return std::move(tenths_); }

 private:
  static BenchSample Make(const stats::HistogramSnapshot& now, const stats::HistogramSnapshot& before,
                          int64_t failed, int64_t failed_before, int64_t max, double t_s, double interval_s,
                          int64_t backlog) {
    auto d = Delta(now, before, max);
    BenchSample s;
    s.t_s = t_s;
    s.interval_s = interval_s;
    s.completed = d.count;
    s.failed = failed - failed_before;
    s.p50_us = d.Percentile(0.5);
    s.p99_us = d.Percentile(0.99);
    s.max_us = max;
    s.failed_total = failed;
    s.backlog = backlog;
    return s;
  }

  Run& run_;
  stats::HistogramSnapshot last_tenth_, last_second_;
  int64_t failed_tenth_ = 0, failed_second_ = 0;
  int64_t second_max_ = 0;
  double t_tenth_ = 0, t_second_ = 0;
  int64_t ticks_ = 0;
  std::vector<BenchSample> seconds_, tenths_;
};

}  // namespace

error_code ThriftErrorCode(std::exception_ptr e) {
  if (!e) return {};
  try {
    std::rethrow_exception(e);
  } catch (const Error& err) {
    return err.scales_code();
  } catch (...) {
    return make_error_code(Errc::kServerError);
  }
}

double BenchResult::cpu_us_per_call() const {
  return total() > 0 ? (cpu_user_s + cpu_sys_s) * 1e6 / static_cast<double>(total()) : 0;
}

const std::vector<BenchSample>& BenchResult::chart_series() const {
  return elapsed_s >= 10 ? seconds : tenths;
}

BenchResult RunLoad(const BenchLimits& limits, const BenchStart& start,
                    const std::function<void(const BenchSample&)>& on_second, const std::atomic<bool>* stop) {
  auto run = std::make_shared<Run>();
  run->start = std::make_shared<const BenchStart>(start);
  run->stop = stop;
  run->max_requests = limits.requests;
  run->active = limits.concurrency;
  for (int64_t i = 0; i < limits.concurrency; ++i) run->workers.push_back(std::make_unique<BenchWorker>());
  if (limits.rate) {
    run->rate = *limits.rate;
    run->total = limits.requests.value_or(std::max<int64_t>(
        1, std::llround(std::chrono::duration<double>(*limits.duration).count() * *limits.rate)));
    for (auto it = run->workers.rbegin(); it != run->workers.rend(); ++it) run->free.push_back(it->get());
  }
  Sampler sampler(*run);
  auto done = run->done.get_future();
  const auto cpu_begin = ProcessCpuSeconds();
  run->begin = Clock::now();
  if (limits.duration) run->end = run->begin + *limits.duration;
  auto next_tick = run->begin + kTick;
  auto tick = [&](Clock::time_point now) {
    while (now >= next_tick) {
      if (sampler.Tick(std::chrono::duration<double>(next_tick - run->begin).count(), false) && on_second) {
        on_second(sampler.last_second());
      }
      next_tick += kTick;
    }
  };
  if (limits.rate) {
    // This thread paces the calls: it wakes when the next one is due (or a tick is), and
    // releases every call due by then. Oversleeping delays the sends but not their clocks.
    int64_t due = 0;
    while (due < run->total && !run->Stopped()) {
      std::this_thread::sleep_until(std::min(run->Intended(due), next_tick));
      const auto now = Clock::now();
      const double elapsed = std::chrono::duration<double>(now - run->begin).count();
      due = std::min<int64_t>(run->total, static_cast<int64_t>(std::floor(elapsed * run->rate)) + 1);
      run->Release(due);
      tick(now);
    }
  } else {
    for (auto& w : run->workers) run->Issue(w.get(), /*first=*/true);
  }
  bool stopping = false;
  while (done.wait_until(next_tick) != std::future_status::ready) {
    if (limits.rate && !stopping && run->Stopped()) {
      stopping = true;
      run->StopSending();
    }
    tick(Clock::now());
  }
  const auto finished = Clock::now();
  tick(finished);
  const double elapsed = std::chrono::duration<double>(finished - run->begin).count();
  // The last, partial interval.
  if (sampler.Tick(elapsed, true) && on_second) on_second(sampler.last_second());
  const auto cpu_end = ProcessCpuSeconds();

  BenchResult r;
  r.limits = limits;
  r.elapsed_s = elapsed;
  // Client CPU per call (the process's user + system time over the run / calls): steadier than
  // throughput on a shared machine, and what bench/run compares against the peers.
  r.cpu_user_s = cpu_end.first - cpu_begin.first;
  r.cpu_sys_s = cpu_end.second - cpu_begin.second;
  // Workers are quiescent now (each ended by not issuing). Release what the protocol kept per
  // worker (a client handle) here, on this thread: the last completion handler may still hold
  // `run` on an event loop, and a client handle released there would keep the client, and its
  // runtime's loops, alive past the caller's stats registry.
  for (auto& w : run->workers) w->protocol_state.reset();
  // Merge their counts.
  for (auto& w : run->workers) {
    r.succeeded += w->succeeded;
    r.failed += w->failed;
    for (auto& [k, v] : w->errors) r.errors[k] += v;
    for (auto& [k, v] : w->endpoints) r.endpoints[k] += v;
    for (auto& [k, v] : w->endpoint_errors) r.endpoint_errors[k] += v;
    if (!w->last_error.empty()) r.last_error = w->last_error;
  }
  r.latency_us = run->latency_us.Snapshot();
  {
    std::lock_guard lock(run->mu);
    r.queued = run->queued;
    r.max_backlog = run->max_backlog;
  }
  r.seconds = sampler.TakeSeconds();
  r.tenths = sampler.TakeTenths();
  return r;
}

std::string FormatMicros(int64_t us) {
  if (us < 1000) return fmt::format("{}us", us);
  if (us < 1000000) return fmt::format("{:.2f}ms", static_cast<double>(us) / 1e3);
  return fmt::format("{:.2f}s", static_cast<double>(us) / 1e6);
}

std::string ProgressLine(const BenchSample& s, const BenchLimits& limits) {
  std::string line = fmt::format("{:5.0f}s {:9.0f} req/s   p50 {:>8}   p99 {:>8}   errors {}", s.t_s,
                                 s.interval_s > 0 ? static_cast<double>(s.completed) / s.interval_s : 0.0,
                                 FormatMicros(s.p50_us), FormatMicros(s.p99_us), s.failed_total);
  if (limits.rate) line += fmt::format("   offered {}/s backlog {}", *limits.rate, s.backlog);
  return line;
}

void PrintTextReport(const BenchResult& r, std::FILE* out) {
  const auto& snap = r.latency_us;
  std::fprintf(out, "requests      %lld\n", static_cast<long long>(r.total()));
  std::fprintf(out, "succeeded     %lld\n", static_cast<long long>(r.succeeded));
  std::fprintf(out, "failed        %lld\n", static_cast<long long>(r.failed));
  for (auto& [k, v] : r.errors) std::fprintf(out, "  %-24s %lld\n", k.c_str(), static_cast<long long>(v));
  if (!r.last_error.empty()) std::fprintf(out, "  last error: %s\n", r.last_error.c_str());
  std::fprintf(out, "elapsed       %.3f s\n", r.elapsed_s);
  if (r.open_loop()) {
    std::fprintf(out, "mode          open loop: latency from each call's intended send time\n");
    // As given, like the JSON report's offered_rps (0.25/s read 0.2 with one decimal).
    std::fprintf(out, "offered       %s req/s\n", fmt::format("{}", *r.limits.rate).c_str());
    std::fprintf(out, "achieved      %.1f req/s\n", r.achieved_rps());
    std::fprintf(out, "queued        %lld (due while all %lld slots were busy; max backlog %lld)\n",
                 static_cast<long long>(r.queued), static_cast<long long>(r.limits.concurrency),
                 static_cast<long long>(r.max_backlog));
  } else {
    std::fprintf(out, "throughput    %.1f req/s\n", r.achieved_rps());
  }
  std::fprintf(out, "latency (us)  p50 %lld  p90 %lld  p99 %lld  p99.9 %lld  max %lld\n",
               static_cast<long long>(snap.Percentile(0.5)), static_cast<long long>(snap.Percentile(0.9)),
               static_cast<long long>(snap.Percentile(0.99)), static_cast<long long>(snap.Percentile(0.999)),
               static_cast<long long>(snap.max));
  std::fprintf(out, "client cpu    user %.3f s  sys %.3f s  %.2f us/call\n", r.cpu_user_s, r.cpu_sys_s,
               r.cpu_us_per_call());
  std::fprintf(out, "endpoints\n");
  for (auto& [k, v] : r.endpoints) {
    auto e = r.endpoint_errors.find(k);
    if (e == r.endpoint_errors.end()) {
      std::fprintf(out, "  %-24s %lld\n", k.c_str(), static_cast<long long>(v));
    } else {
      std::fprintf(out, "  %-24s %lld (%lld failed)\n", k.c_str(), static_cast<long long>(v),
                   static_cast<long long>(e->second));
    }
  }
  std::fflush(out);
}

std::string JsonReport(const BenchResult& r) {
  const auto& snap = r.latency_us;
  auto object = [](const std::map<std::string, int64_t>& m) {
    std::string out = "{";
    for (auto& [k, v] : m) out += fmt::format("{}\"{}\":{}", out.size() > 1 ? "," : "", JsonEscape(k), v);
    return out + "}";
  };
  return fmt::format(
      "{{\"requests\":{},\"succeeded\":{},\"failed\":{},\"errors\":{},\"throughput_rps\":{:.1f},\"elapsed_s\":{:.3f},"
      "\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"cpu_user_s\":{:.3f},"
      "\"cpu_sys_s\":{:.3f},\"cpu_us_per_call\":{:.3f},\"endpoints\":{},\"endpoint_errors\":{},"
      "\"mode\":\"{}\",\"latency_from\":\"{}\",\"concurrency\":{},\"offered_rps\":{},\"achieved_rps\":{:.1f},"
      "\"queued\":{},\"max_backlog\":{}}}\n",
      r.total(), r.succeeded, r.failed, object(r.errors), r.achieved_rps(), r.elapsed_s, snap.Percentile(0.5),
      snap.Percentile(0.9), snap.Percentile(0.99), snap.Percentile(0.999), snap.max, r.cpu_user_s, r.cpu_sys_s,
      r.cpu_us_per_call(), object(r.endpoints), object(r.endpoint_errors), r.open_loop() ? "open" : "closed",
      r.open_loop() ? "intended_send" : "actual_send", r.limits.concurrency,
      r.open_loop() ? fmt::format("{}", *r.limits.rate) : std::string("null"), r.achieved_rps(), r.queued,
      r.max_backlog);
}

}  // namespace scales::tools
