// scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--json]
//
// A closed-loop load generator through the full scales stack: N callers, each with one call
// outstanding, issue the next call when the previous completes. Every call started is
// counted exactly once, as succeeded or failed (by error code).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cli_util.h"
#include "commands.h"
#include "scales/http/client.h"
#include "scales/stats/stats.h"

namespace scales::tools {
namespace {

int Usage(const std::string& problem) {
  if (!problem.empty()) std::fprintf(stderr, "scales bench: %s\n", problem.c_str());
  std::fputs(
      "usage: scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s)\n"
      "                         [--method GET] [--data TEXT] [--timeout 5s] [--threads T]\n"
      "                         [--json] [--stats]\n",
      stderr);
  return 2;
}

struct Worker {
  CallInfo info;
  std::chrono::steady_clock::time_point started;
  int64_t succeeded = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors;
  std::map<std::string, int64_t> endpoints;
  std::string last_error;
};

struct Bench {
  http::HttpClient client;
  http::Request prototype;
  std::optional<int64_t> max_requests;
  std::chrono::steady_clock::time_point end;
  std::atomic<int64_t> issued{0};
  std::atomic<int> active{0};
  stats::Histogram latency_us;
  std::promise<void> done;
  std::vector<std::unique_ptr<Worker>> workers;

  void Issue(Worker* w) {
    bool more = max_requests ? issued.fetch_add(1) < *max_requests
                             : std::chrono::steady_clock::now() < end;
    if (!more) {
      if (active.fetch_sub(1) == 1) done.set_value();
      return;
    }
    w->started = std::chrono::steady_clock::now();
    CallOptions opts;
    opts.info = &w->info;
    client.AsyncSend(prototype, std::move(opts), [this, w](error_code ec, http::Response) {
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

}  // namespace

int RunBenchCommand(int argc, char** argv) {
  // argv[0] == "bench"
  if (argc < 3) return Usage("missing arguments");
  if (std::string_view(argv[1]) != "http") return Usage(fmt::format("unknown protocol '{}' (supported: http)", argv[1]));
  std::string uri = argv[2];
  std::string path = "/";
  std::string method = "GET";
  std::string body;
  int64_t concurrency = 1;
  std::optional<int64_t> requests;
  std::optional<Duration> duration;
  Duration timeout = std::chrono::seconds(5);
  size_t threads = 0;
  bool json = false;
  bool print_stats = false;
  for (int i = 3; i < argc; ++i) {
    std::string_view arg = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (arg == "--path") {
      const char* v = next();
      if (!v) return Usage("--path needs a value");
      path = v;
    } else if (arg == "--method") {
      const char* v = next();
      if (!v) return Usage("--method needs a value");
      method = v;
    } else if (arg == "--data") {
      const char* v = next();
      if (!v) return Usage("--data needs a value");
      body = v;
    } else if (arg == "--concurrency" || arg == "-c") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--concurrency needs a positive integer");
      concurrency = *n;
    } else if (arg == "--requests" || arg == "-n") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--requests needs a positive integer");
      requests = *n;
    } else if (arg == "--duration" || arg == "-d") {
      const char* v = next();
      auto d = v ? ParseDuration(v) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage("--duration needs a duration such as 10s");
      duration = *d;
    } else if (arg == "--timeout") {
      const char* v = next();
      auto d = v ? ParseDuration(v) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage("--timeout needs a duration such as 500ms");
      timeout = *d;
    } else if (arg == "--threads") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--threads needs a positive integer");
      threads = static_cast<size_t>(*n);
    } else if (arg == "--json") {
      json = true;
    } else if (arg == "--stats") {
      print_stats = true;
    } else {
      return Usage(fmt::format("unknown option '{}'", arg));
    }
  }
  if (requests.has_value() == duration.has_value()) return Usage("give exactly one of --requests and --duration");
  if (path.empty() || path.front() != '/') path.insert(0, "/");

  stats::StatsRegistry registry;
  auto bench = std::make_unique<Bench>();
  try {
    http::HttpOptions options;
    options.client.name = "bench";
    options.client.timeout = timeout;
    options.client.stats = &registry;
    RuntimeOptions runtime_options;
    runtime_options.threads = threads;
    options.client.runtime = std::make_shared<Runtime>(runtime_options);
    bench->client = Http::NewClient(uri, options);
  } catch (const Error& e) {
    std::fprintf(stderr, "scales: %s [%s]\n", e.what(), ErrorName(e.scales_code()).c_str());
    return 2;
  }
  bench->prototype.method = method;
  bench->prototype.target = path;
  bench->prototype.body = body;
  bench->max_requests = requests;
  bench->active = static_cast<int>(concurrency);
  for (int64_t i = 0; i < concurrency; ++i) bench->workers.push_back(std::make_unique<Worker>());
  auto done = bench->done.get_future();
  const auto start = std::chrono::steady_clock::now();
  if (duration) bench->end = start + *duration;
  for (auto& w : bench->workers) bench->Issue(w.get());
  done.wait();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Workers are quiescent now (each ended by not issuing); merge their counts.
  int64_t succeeded = 0, failed = 0;
  std::map<std::string, int64_t> errors, endpoints;
  std::string last_error;
  for (auto& w : bench->workers) {
    succeeded += w->succeeded;
    failed += w->failed;
    for (auto& [k, v] : w->errors) errors[k] += v;
    for (auto& [k, v] : w->endpoints) endpoints[k] += v;
    if (!w->last_error.empty()) last_error = w->last_error;
  }
  const int64_t total = succeeded + failed;
  auto snap = bench->latency_us.Snapshot();
  const double rps = elapsed > 0 ? static_cast<double>(total) / elapsed : 0;
  if (json) {
    std::string out = fmt::format(
        "{{\"requests\":{},\"succeeded\":{},\"failed\":{},\"errors\":{{", total, succeeded, failed);
    bool first = true;
    for (auto& [k, v] : errors) {
      out += fmt::format("{}\"{}\":{}", first ? "" : ",", JsonEscape(k), v);
      first = false;
    }
    out += fmt::format("}},\"throughput_rps\":{:.1f},\"elapsed_s\":{:.3f},\"latency_us\":{{\"p50\":{},\"p90\":{},"
                       "\"p99\":{},\"p999\":{},\"max\":{}}},\"endpoints\":{{",
                       rps, elapsed, snap.Percentile(0.5), snap.Percentile(0.9), snap.Percentile(0.99),
                       snap.Percentile(0.999), snap.max);
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
    std::printf("endpoints\n");
    for (auto& [k, v] : endpoints) std::printf("  %-24s %lld\n", k.c_str(), static_cast<long long>(v));
  }
  bench->client.Close();
  bench->client = {};
  if (print_stats) {
    std::printf("\nclient stats\n%s", registry.ToText().c_str());
  }
  std::fflush(stdout);
  return failed == 0 ? 0 : 1;
}

}  // namespace scales::tools
