#pragma once
// The load driver and the reports shared by `scales bench http|thrift|thriftmux` and the demo.
//
// Two modes:
//  - closed loop (default): N callers, each with one call outstanding, issue the next call when
//    the previous completes (each its first call even past a --duration that ended before it
//    started). Latency is measured from the actual send.
//  - open loop (`rate` set): calls are due at a fixed schedule, call i at start + i / rate,
//    whatever the replies do. At most `concurrency` calls are outstanding: a call that is due
//    while every slot is busy waits in FIFO order and is sent when a slot frees, and its latency
//    is still measured from its INTENDED send time, so a server that falls behind shows up in
//    the percentiles instead of silently slowing the load down (no coordinated omission, as in
//    wrk2). Such calls are counted as `queued`; every due call is sent, so the run may last past
//    its duration while the backlog drains.
// Every call started is counted exactly once, as succeeded or failed (by error code).

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "scales/core/dispatcher.h"
#include "scales/core/error.h"
#include "scales/stats/stats.h"

namespace scales::tools {

// One slot's state. `info` is the CallInfo the protocol passes in its CallOptions.
struct BenchWorker {
  CallInfo info;
  // When the latency clock of the current call started: the actual send (closed loop) or the
  // intended send (open loop).
  std::chrono::steady_clock::time_point started;
  int64_t succeeded = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors;
  std::map<std::string, int64_t> endpoints;        // every completed call
  std::map<std::string, int64_t> endpoint_errors;  // the failed ones
  std::string last_error;
  // The protocol's own per-worker state, kept across calls (e.g. a client handle carrying this
  // worker's CallOptions, so that a call does not build one).
  std::shared_ptr<void> protocol_state;
  // The `endpoints` entry of the last completed call (calls mostly go where the last one did).
  std::string last_endpoint;
  int64_t* last_endpoint_count = nullptr;
};

// Starts one call for `worker`; the protocol must call `done(ec)` exactly once when it ends
// (from any thread), after `worker.info` was filled.
using BenchStart = std::function<void(BenchWorker& worker, std::function<void(error_code)> done)>;

// The outcome of a Thrift call as an error code: scales errors keep theirs; anything else the
// server answered (a declared exception, TApplicationException) counts as a server error.
error_code ThriftErrorCode(std::exception_ptr e);

struct BenchLimits {
  // Closed loop: the number of callers. Open loop: the cap on outstanding calls.
  int64_t concurrency = 1;
  std::optional<int64_t> requests;  // exactly one of requests and duration
  std::optional<Duration> duration;
  std::optional<double> rate;  // requests/s offered: open loop
};

// The calls that completed in the interval (t_s - interval_s, t_s] of the run.
struct BenchSample {
  double t_s = 0;
  double interval_s = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  int64_t p50_us = 0, p99_us = 0, max_us = 0;
  int64_t failed_total = 0;  // failures since the start, at t_s
  int64_t backlog = 0;       // open loop: calls due but waiting for a free slot, at t_s
};

struct BenchResult {
  BenchLimits limits;
  double elapsed_s = 0;
  int64_t succeeded = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors;
  std::map<std::string, int64_t> endpoints;
  std::map<std::string, int64_t> endpoint_errors;
  std::string last_error;
  stats::HistogramSnapshot latency_us;
  double cpu_user_s = 0, cpu_sys_s = 0;
  int64_t queued = 0;       // open loop: calls that waited for a free slot
  int64_t max_backlog = 0;  // open loop: the most calls waiting at once
  std::vector<BenchSample> seconds;  // one sample per second
  std::vector<BenchSample> tenths;   // one sample per 100 ms (the report's charts of short runs)

  bool open_loop() const { return limits.rate.has_value(); }
  int64_t total() const { return succeeded + failed; }
  double achieved_rps() const { return elapsed_s > 0 ? static_cast<double>(total()) / elapsed_s : 0; }
  double cpu_us_per_call() const;
  // The series the charts use: per second, or per 100 ms for runs shorter than 10 s.
  const std::vector<BenchSample>& chart_series() const;
};

// Runs the load until the limit is reached (and, open loop, every due call completed).
// `on_second`, if set, is called on the calling thread once per second of the run with the
// last second's sample (the live progress line, the demo's timeline). `stop`, if set, ends the
// run early once it is true (a signal handler may set it): no call is sent after that (an open
// loop's calls due but not yet sent never are) and the run ends when the calls outstanding have
// completed; the result covers the calls sent.
BenchResult RunLoad(const BenchLimits& limits, const BenchStart& start,
                    const std::function<void(const BenchSample&)>& on_second = {},
                    const std::atomic<bool>* stop = nullptr);

// The report as text (`scales bench`) and as one line of JSON (`--json`, bench/run).
void PrintTextReport(const BenchResult& result, std::FILE* out);
std::string JsonReport(const BenchResult& result);

// The live progress line for `sample`, without "\r" or newline:
// "  12s   4512 req/s   p50 420us   p99 1.30ms   errors 0".
std::string ProgressLine(const BenchSample& sample, const BenchLimits& limits);

// "420us", "1.30ms", "2.10s".
std::string FormatMicros(int64_t us);

}  // namespace scales::tools
