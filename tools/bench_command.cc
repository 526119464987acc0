// scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--json]
//                  [--admin-port P]
// scales bench thrift|thriftmux URI --method echo|ping [--payload-size N] --concurrency N
//                     (--requests N | --duration 10s) [--json]
//
// A closed-loop load generator through the full scales stack (bench_report.h): N callers, each
// with one call outstanding, issue the next call when the previous completes. Every call
// started is counted exactly once, as succeeded or failed (by error code). HTTP and Thrift
// print the same report.
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "Echo.h"
#include "bench_report.h"
#include "cli_util.h"
#include "commands.h"
#include "scales/http/client.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/admin/admin_server.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales::tools {
namespace {

int Usage(const std::string& problem) {
  if (!problem.empty()) std::fprintf(stderr, "scales bench: %s\n", problem.c_str());
  std::fputs(
      "usage: scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s)\n"
      "                         [--method GET] [--data TEXT] [--timeout 5s] [--threads T]\n"
      "                         [--balancer NAME] [--json] [--stats] [--admin-port P]\n"
      "       scales bench thrift|thriftmux URI --method echo|ping [--payload-size N] --concurrency N\n"
      "                         (--requests N | --duration 10s) [--timeout 5s] [--threads T]\n"
      "                         [--protocol binary|compact] [--transport framed|buffered]\n"
      "                         [--balancer NAME] [--json] [--stats] [--admin-port P]\n"
      "       --balancer: heap (default), p2c, p2c-ewma, round-robin or aperture\n"
      "       --admin-port: serve /metrics, /admin/metrics.json and /admin/clients on\n"
      "                     127.0.0.1:P while the run lasts (0 = any free port)\n",
      stderr);
  return 2;
}

}  // namespace

int RunBenchCommand(int argc, char** argv) {
  // argv[0] == "bench"
  if (argc < 3) return Usage("missing arguments");
  const std::string protocol = argv[1];
  if (protocol != "http" && protocol != "thrift" && protocol != "thriftmux") {
    return Usage(fmt::format("unknown protocol '{}' (supported: http, thrift, thriftmux)", argv[1]));
  }
  const bool is_thrift = protocol == "thrift" || protocol == "thriftmux";
  std::string uri = argv[2];
  std::string path = "/";
  std::string method = is_thrift ? "echo" : "GET";
  std::string body;
  size_t payload_size = 16;
  thrift::Protocol thrift_protocol = thrift::Protocol::kBinary;
  thrift::Framing framing = thrift::Framing::kFramed;
  BenchLimits limits;
  Duration timeout = std::chrono::seconds(5);
  size_t threads = 0;
  bool json = false;
  bool print_stats = false;
  std::optional<uint16_t> admin_port;
  BalancerOptions balancer;
  for (int i = 3; i < argc; ++i) {
    std::string_view arg = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (arg == "--path" && !is_thrift) {
      const char* v = next();
      if (!v) return Usage("--path needs a value");
      path = v;
    } else if (arg == "--method") {
      const char* v = next();
      if (!v) return Usage("--method needs a value");
      method = v;
    } else if (arg == "--data" && !is_thrift) {
      const char* v = next();
      if (!v) return Usage("--data needs a value");
      body = v;
    } else if (arg == "--payload-size" && is_thrift) {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--payload-size needs a positive integer");
      payload_size = static_cast<size_t>(*n);
    } else if ((arg == "--protocol" || arg == "--transport") && protocol == "thriftmux") {
      return Usage("ThriftMux always carries binary Thrift in Mux frames: --protocol and --transport do not apply");
    } else if (arg == "--protocol" && is_thrift) {
      const char* v = next();
      if (v && std::string_view(v) == "binary") {
        thrift_protocol = thrift::Protocol::kBinary;
      } else if (v && std::string_view(v) == "compact") {
        thrift_protocol = thrift::Protocol::kCompact;
      } else {
        return Usage("--protocol is binary or compact");
      }
    } else if (arg == "--transport" && is_thrift) {
      const char* v = next();
      if (v && std::string_view(v) == "framed") {
        framing = thrift::Framing::kFramed;
      } else if (v && std::string_view(v) == "buffered") {
        framing = thrift::Framing::kBuffered;
      } else {
        return Usage("--transport is framed or buffered");
      }
    } else if (arg == "--concurrency" || arg == "-c") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--concurrency needs a positive integer");
      limits.concurrency = *n;
    } else if (arg == "--requests" || arg == "-n") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--requests needs a positive integer");
      limits.requests = *n;
    } else if (arg == "--duration" || arg == "-d") {
      const char* v = next();
      auto d = v ? ParseDuration(v) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage("--duration needs a duration such as 10s");
      limits.duration = *d;
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
    } else if (arg == "--balancer") {
      const char* v = next();
      auto kind = v ? ParseBalancerKind(v) : std::nullopt;
      if (!kind) return Usage("--balancer is heap, p2c, p2c-ewma, round-robin or aperture");
      balancer.kind = *kind;
    } else if (arg == "--json") {
      json = true;
    } else if (arg == "--stats") {
      print_stats = true;
    } else if (arg == "--admin-port") {
      const char* v = next();
      auto n = v ? (std::string_view(v) == "0" ? std::optional<long long>(0) : ParsePositiveInt(v)) : std::nullopt;
      if (!n || *n > 65535) return Usage("--admin-port needs a port number (0 = any free port)");
      admin_port = static_cast<uint16_t>(*n);
    } else {
      return Usage(fmt::format("unknown option '{}'", arg));
    }
  }
  if (limits.requests.has_value() == limits.duration.has_value()) {
    return Usage("give exactly one of --requests and --duration");
  }
  if (is_thrift && method != "echo" && method != "ping") return Usage("--method is echo or ping for thrift");
  if (path.empty() || path.front() != '/') path.insert(0, "/");

  stats::StatsRegistry registry;
  ClientOptions client_options;
  client_options.name = "bench";
  client_options.timeout = timeout;
  client_options.stats = &registry;
  RuntimeOptions runtime_options;
  runtime_options.threads = threads;
  client_options.runtime = std::make_shared<Runtime>(runtime_options);

  int64_t failed = 0;
  std::optional<admin::AdminServer> admin_server;
  try {
    if (admin_port) {
      admin::AdminServerOptions admin_options;
      admin_options.port = *admin_port;
      admin_options.stats = &registry;
      admin_server.emplace(admin_options);
      // On stderr, so that --json output stays parseable.
      std::fprintf(stderr, "admin: %s (/metrics, /admin/metrics.json, /admin/clients)\n",
                   admin_server->url().c_str());
    }
    if (!is_thrift) {
      http::HttpOptions options;
      options.client = client_options;
      options.balancer = balancer;
      http::HttpClient client = Http::NewClient(uri, options);
      http::Request prototype;
      prototype.method = method;
      prototype.target = path;
      prototype.body = body;
      failed = RunClosedLoopAndReport(
          limits,
          [&](BenchWorker& w, std::function<void(error_code)> done) {
            CallOptions opts;
            opts.info = &w.info;
            client.AsyncSend(prototype, std::move(opts),
                             [done = std::move(done)](error_code ec, http::Response) { done(ec); });
          },
          json);
      client.Close();
    } else {
      thrift::ThriftOptions options;
      options.client = client_options;
      options.balancer = balancer;
      options.protocol = thrift_protocol;
      options.transport.framing = framing;
      auto client = [&] {
        if (protocol != "thriftmux") return Thrift::NewClient<echo::EchoClient>(uri, options);
        thriftmux::ThriftMuxOptions mux_options;
        mux_options.client = client_options;
        mux_options.balancer = balancer;
        return ThriftMux::NewClient<echo::EchoClient>(uri, mux_options);
      }();
      const std::string payload(payload_size, 'x');
      // The outcome as an error code: scales errors keep theirs; anything else the server
      // answered (a declared exception, TApplicationException) counts as a server error.
      auto code = [](std::exception_ptr e) -> error_code {
        if (!e) return {};
        try {
          std::rethrow_exception(e);
        } catch (const Error& err) {
          return err.scales_code();
        } catch (...) {
          return make_error_code(Errc::kServerError);
        }
      };
      failed = RunClosedLoopAndReport(
          limits,
          [&](BenchWorker& w, std::function<void(error_code)> done) {
            CallOptions opts;
            opts.info = &w.info;
            auto c = client.WithOptions(std::move(opts));
            if (method == "ping") {
              SCALES_THRIFT_CALL(c, ping, [done = std::move(done), code](std::exception_ptr e) { done(code(e)); });
            } else {
              SCALES_THRIFT_CALL(c, echo, payload, [done = std::move(done), code](std::exception_ptr e, std::string) {
                done(code(e));
              });
            }
          },
          json);
      client.Close();
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "scales: %s [%s]\n", e.what(), ErrorName(e.scales_code()).c_str());
    return 2;
  }
  if (print_stats) {
    std::printf("\nclient stats\n%s", registry.ToText().c_str());
  }
  std::fflush(stdout);
  return failed == 0 ? 0 : 1;
}

}  // namespace scales::tools
