#pragma once
// The closed-loop load driver and the report shared by `scales bench http|thrift`: N callers,
// each with one call outstanding, issue the next call when the previous completes. Every call
// started is counted exactly once, as succeeded or failed (by error code).

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "scales/core/dispatcher.h"
#include "scales/core/error.h"

namespace scales::tools {

// One caller's state. `info` is the CallInfo the protocol passes in its CallOptions.
struct BenchWorker {
  CallInfo info;
  std::chrono::steady_clock::time_point started;
  int64_t succeeded = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors;
  std::map<std::string, int64_t> endpoints;
  std::string last_error;
};

// Starts one call for `worker`; the protocol must call `done(ec)` exactly once when it ends
// (from any thread), after `worker.info` was filled.
using BenchStart = std::function<void(BenchWorker& worker, std::function<void(error_code)> done)>;

struct BenchLimits {
  int64_t concurrency = 1;
  std::optional<int64_t> requests;  // exactly one of requests and duration
  std::optional<Duration> duration;
};

// Runs the load until the limit is reached and prints the report (text, or one JSON line).
// Returns the number of failed calls.
int64_t RunClosedLoopAndReport(const BenchLimits& limits, const BenchStart& start, bool json);

}  // namespace scales::tools
