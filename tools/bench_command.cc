// scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--rate R]
//                  [--json] [--report FILE.html] [--progress] [--admin-port P]
// scales bench thrift|thriftmux URI --method echo|ping [--payload-size N] --concurrency N
//                     (--requests N | --duration 10s) [--rate R] [--json] [--report FILE.html]
//
// A load generator through the full scales stack (bench_report.h): closed loop by default
// (N callers, each with one call outstanding), open loop at a fixed offered rate with --rate
// (latency from each call's intended send time; --concurrency caps the calls outstanding).
// Every call started is counted exactly once, as succeeded or failed (by error code). HTTP
// and Thrift print the same report; --report also writes it as an HTML page with charts
// (bench_html.h). On a terminal, a progress line is rewritten once per second on stderr.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "Echo.h"
#include "bench_html.h"
#include "bench_report.h"
#include "cli_util.h"
#include "commands.h"
#include "scales/http/client.h"
#include "scales/http/transport.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/admin/admin_server.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales::tools {
namespace {

// Set by the first SIGINT or SIGTERM: the run stops sending and reports (a second one ends the
// process, as the signal would have: SA_RESETHAND).
std::atomic<bool> interrupted{false};
volatile sig_atomic_t interrupt_signal = 0;
static_assert(std::atomic<bool>::is_always_lock_free);

void OnInterrupt(int signal) {
  interrupt_signal = signal;
  interrupted.store(true);
}

void InstallInterruptHandlers() {
  for (int signal : {SIGINT, SIGTERM}) {
    struct sigaction old {};
    sigaction(signal, nullptr, &old);
    if (old.sa_handler == SIG_IGN) continue;  // e.g. SIGINT of a background job: left ignored
    struct sigaction act {};
    act.sa_handler = &OnInterrupt;
    act.sa_flags = SA_RESETHAND;
    sigemptyset(&act.sa_mask);
    sigaction(signal, &act, nullptr);
  }
}

// The most event loops --threads may ask for.
constexpr long long kMaxThreads = 1024;
// The longest schedule an open loop may have (N calls at R/s span (N - 1) / R), as --duration.
constexpr double kMaxScheduleSeconds = kMaxDurationNs / 1e9;

// The usage, after `problem`: on stderr, exit status 2; on stdout (--help), 0.
int Usage(const std::string& problem, std::FILE* out = stderr) {
  if (!problem.empty()) std::fprintf(stderr, "scales bench: %s\n", problem.c_str());
  std::fputs(
      "usage: scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s)\n"
      "                         [--rate R] [--method GET] [--data TEXT] [--timeout 5s] [--threads T]\n"
      "                         [--busy-poll 50us] [--balancer NAME] [--json] [--report FILE.html]\n"
      "                         [--progress|--no-progress] [--stats] [--admin-port P]\n"
      "       scales bench thrift|thriftmux URI --method echo|ping [--payload-size N] --concurrency N\n"
      "                         (--requests N | --duration 10s) [--rate R] [--timeout 5s] [--threads T]\n"
      "                         [--busy-poll 50us] [--protocol binary|compact] [--transport framed|buffered]\n"
      "                         [--balancer NAME] [--json] [--report FILE.html] [--progress|--no-progress]\n"
      "                         [--stats] [--admin-port P]\n"
      "       --rate R: open loop, R requests/s whatever the replies; latency is measured from each\n"
      "                 call's intended send time; --concurrency caps the calls outstanding (default\n"
      "                 1000): calls due while every slot is busy wait for one, still timed from their\n"
      "                 intended time, and the run lasts until every due call completed\n"
      "       SIGINT/SIGTERM (Ctrl-C): stop sending, wait for the calls outstanding, report them and\n"
      "                 exit with 128 + the signal; a second one ends the process at once\n"
      "       --report: write a self-contained HTML page with the report and its charts\n"
      "       --progress: the live progress line on stderr even when it is not a terminal\n"
      "       --balancer: aperture (default), heap, p2c, p2c-ewma or round-robin\n"
      "       --busy-poll: each event loop spins this long for more work before it sleeps\n"
      "                 (RuntimeOptions::busy_poll; default 0, off)\n"
      "       --admin-port: serve /metrics, /admin/metrics.json and /admin/clients on\n"
      "                     127.0.0.1:P while the run lasts (0 = any free port)\n",
      out);
  return out == stdout ? 0 : 2;
}

// Whether `s` is an HTTP token (RFC 9110 5.6.2), which a method must be.
bool IsHttpToken(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && std::string_view("!#$%&'*+-.^_`|~").find(c) == std::string_view::npos) {
      return false;
    }
  }
  return true;
}

}  // namespace

int RunBenchCommand(int argc, char** argv) {
  // argv[0] == "bench"
  if (HelpAnywhere(argc, argv, {"--data"})) return Usage("", stdout);
  if (argc < 2 || std::string_view(argv[1]).starts_with("-")) {
    return Usage(fmt::format("missing the protocol (http, thrift or thriftmux){}",
                             argc < 2 ? "" : fmt::format(" before option '{}'", argv[1])));
  }
  const std::string protocol = argv[1];
  if (protocol != "http" && protocol != "thrift" && protocol != "thriftmux") {
    return Usage(fmt::format("unknown protocol '{}' (supported: http, thrift, thriftmux)", argv[1]));
  }
  // An option where the URI belongs ("bench http --requests 5") is not a URI.
  if (argc < 3 || std::string_view(argv[2]).starts_with("-")) {
    return Usage(argc < 3 ? "missing URI" : fmt::format("missing URI before option '{}'", argv[2]));
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
  std::chrono::microseconds busy_poll{0};
  bool json = false;
  bool print_stats = false;
  bool concurrency_given = false;
  bool payload_size_given = false;
  std::optional<bool> progress;  // default: whether stderr is a terminal
  std::string report_path;
  std::optional<uint16_t> admin_port;
  BalancerOptions balancer;
  std::set<std::string_view> given;  // each option once: a second value would silently win
  for (int i = 3; i < argc; ++i) {
    std::string_view arg = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const std::string_view name = arg == "-c"   ? "--concurrency"
                                  : arg == "-R" ? "--rate"
                                  : arg == "-n" ? "--requests"
                                  : arg == "-d" ? "--duration"
                                                : arg;
    if (name.starts_with("--") && !given.insert(name).second) return Usage(fmt::format("{} given twice", name));
    if (arg == "--path" && !is_thrift) {
      const char* v = next();
      if (MissingValue(v)) return Usage(fmt::format("--path needs a value{}", v ? fmt::format(" (got option '{}')", v) : ""));
      path = v;
    } else if (arg == "--method") {
      const char* v = next();
      if (MissingValue(v)) return Usage(fmt::format("--method needs a value{}", v ? fmt::format(" (got option '{}')", v) : ""));
      method = v;
    } else if (arg == "--data" && !is_thrift) {
      const char* v = next();
      if (!v) return Usage("--data needs a value");
      body = v;
    } else if (arg == "--payload-size" && is_thrift) {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      // A larger echo request could only fail (kRequestTooLarge), after allocating it.
      if (!n || *n > static_cast<long long>(thrift::TransportOptions{}.max_frame_bytes)) {
        return Usage(fmt::format("--payload-size needs a number of bytes from 1 to {} (the Thrift client's max_frame_bytes)",
                                 thrift::TransportOptions{}.max_frame_bytes));
      }
      payload_size = static_cast<size_t>(*n);
      payload_size_given = true;
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
      concurrency_given = true;
    } else if (arg == "--rate" || arg == "-R") {
      const char* v = next();
      const double r = v ? ParseNumber(v).value_or(0) : 0;
      if (!(r > 0) || r > 1e7) {
        return Usage("--rate needs a request rate per second, such as 500 or 0.5 (at most 1e7)");
      }
      limits.rate = r;
    } else if (arg == "--report") {
      const char* v = next();
      if (MissingValue(v) || !*v) {
        return Usage(fmt::format("--report needs a file name, such as report.html{}",
                                 v && *v ? fmt::format(" (got option '{}')", v) : ""));
      }
      report_path = v;
    } else if (arg == "--progress" || arg == "--no-progress") {
      // Each is given once; the two together would silently keep the last.
      if (progress) return Usage("give one of --progress and --no-progress");
      progress = arg == "--progress";
    } else if (arg == "--requests" || arg == "-n") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n) return Usage("--requests needs a positive integer");
      limits.requests = *n;
    } else if (arg == "--duration" || arg == "-d") {
      const char* v = next();
      std::string why;
      auto d = v ? ParseDuration(v, &why) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage(fmt::format("--duration needs a duration such as 10s{}", why));
      limits.duration = *d;
    } else if (arg == "--timeout") {
      const char* v = next();
      std::string why;
      auto d = v ? ParseDuration(v, &why) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage(fmt::format("--timeout needs a duration such as 500ms{}", why));
      timeout = *d;
    } else if (arg == "--threads") {
      const char* v = next();
      auto n = v ? ParsePositiveInt(v) : std::nullopt;
      if (!n || *n > kMaxThreads) return Usage(fmt::format("--threads needs a number of event loops from 1 to {}", kMaxThreads));
      threads = static_cast<size_t>(*n);
    } else if (arg == "--busy-poll") {
      const char* v = next();
      std::string why;
      auto d = v ? ParseDuration(v, &why) : std::nullopt;
      // RuntimeOptions::busy_poll is in microseconds: 500ns would silently be 0, off (and
      // 1500ns 1 us).
      if (!d || *d < Duration::zero() || *d > std::chrono::seconds(1) ||
          *d % std::chrono::microseconds(1) != Duration::zero()) {
        return Usage(fmt::format("--busy-poll needs a duration from 0 to 1s, such as 50us (0: off; else whole "
                                 "microseconds, at least 1us){}",
                                 why));
      }
      busy_poll = std::chrono::duration_cast<std::chrono::microseconds>(*d);
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
      // Plain decimal, leading zeros too, as every other number ("00" was refused, "0" taken).
      auto n = v ? ParseIntInRange(v, 0, 65535) : std::nullopt;
      if (!n) return Usage("--admin-port needs a port number (0 = any free port)");
      admin_port = static_cast<uint16_t>(*n);
    } else if (arg == "--path" || arg == "--data" || arg == "--payload-size" || arg == "--protocol" ||
               arg == "--transport") {
      // Known, but for the other protocols (see the usage): not "unknown".
      return Usage(fmt::format("{} does not apply to bench {}", arg, protocol));
    } else if (!arg.starts_with("-")) {
      return Usage(fmt::format("unexpected argument '{}' (after the protocol and URI, only options)", arg));
    } else {
      return Usage(fmt::format("unknown option '{}'", arg));
    }
  }
  if (limits.requests.has_value() == limits.duration.has_value()) {
    return Usage("give exactly one of --requests and --duration");
  }
  if (is_thrift && method != "echo" && method != "ping") return Usage("--method is echo or ping for thrift");
  if (!is_thrift) {
    // Methods are case-sensitive: a server answers "get" with 400 or 405, every call of the run.
    if (!IsHttpToken(method)) {
      return Usage(fmt::format("--method '{}' is not an HTTP method (a token of letters, digits and !#$%&'*+-.^_`|~)",
                               method));
    }
    std::string upper = method;
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    for (std::string_view standard : {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}) {
      if (upper == standard && method != standard) {
        return Usage(fmt::format("--method '{}': HTTP methods are case-sensitive; did you mean {}?", method, upper));
      }
    }
  }
  if (payload_size_given && method != "echo") return Usage("--payload-size applies to --method echo only");
  if (limits.rate && limits.requests && static_cast<double>(*limits.requests - 1) / *limits.rate > kMaxScheduleSeconds) {
    return Usage(fmt::format("--requests {} at --rate {:g} would last over 365 days", *limits.requests, *limits.rate));
  }
  // As the client's verbs and `scales http`: "*" and an absolute-form target go as given.
  if (path.empty() || (path.front() != '/' && path != "*" && !http::internal::IsAbsoluteFormTarget(path))) {
    path.insert(0, "/");
  }
  // Every call of the run would fail with it (kInvalidArgument), as with a bad --method.
  if (auto bad = std::find_if(path.begin(), path.end(), [](char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; });
      bad != path.end()) {
    return Usage(fmt::format("--path has a space or control character (byte {:#04x}): not a request target; "
                             "percent-encode it (%20 for a space)",
                             static_cast<int>(static_cast<unsigned char>(*bad))));
  }
  if (limits.rate && !concurrency_given) limits.concurrency = 1000;
  if (limits.concurrency > 100000) return Usage("--concurrency is at most 100000");
  if (!progress) progress = isatty(STDERR_FILENO) == 1;
  if (!report_path.empty()) {
    // Fail before the run rather than after it.
    std::string error;
    if (!CheckWritable(report_path, error)) {
      std::fprintf(stderr, "scales bench: --report: %s\n", error.c_str());
      return 2;
    }
  }

  // What the report's settings table shows, in order.
  std::vector<std::pair<std::string, std::string>> settings = {{"protocol", protocol}, {"uri", uri}};
  if (is_thrift) {
    settings.emplace_back("method", method == "echo" ? fmt::format("echo ({} bytes)", payload_size) : method);
  } else {
    settings.emplace_back("request", fmt::format("{} {}{}", method, path,
                                                 body.empty() ? "" : fmt::format(" ({} bytes)", body.size())));
  }
  settings.emplace_back("mode", limits.rate ? fmt::format("open loop at {:g} req/s", *limits.rate) : "closed loop");
  settings.emplace_back(limits.rate ? "max outstanding" : "concurrency", std::to_string(limits.concurrency));
  settings.emplace_back(limits.requests ? "requests" : "duration",
                        limits.requests ? std::to_string(*limits.requests)
                                        : fmt::format("{:g} s", std::chrono::duration<double>(*limits.duration).count()));
  settings.emplace_back("timeout", fmt::format("{:g} s", std::chrono::duration<double>(timeout).count()));
  settings.emplace_back("event loops", threads ? std::to_string(threads) : "one per core");
  if (busy_poll.count() > 0) settings.emplace_back("busy poll", fmt::format("{} us", busy_poll.count()));
  settings.emplace_back("balancer", std::string(BalancerKindName(balancer.kind)));
  std::string command_line = "scales";
  for (int i = 0; i < argc; ++i) command_line += std::string(" ") + argv[i];
  settings.emplace_back("command", command_line);

  bool report_failed = false;
  // Runs the load, prints the report (and writes the HTML page); returns the failures.
  auto run = [&](const BenchStart& start) -> int64_t {
    // Only now: a signal while the client still opens (a zk:// ensemble that does not answer,
    // for up to its open_timeout) ends the process at once, as it would any other command's.
    InstallInterruptHandlers();
    std::function<void(const BenchSample&)> on_second;
    size_t shown = 0;
    if (*progress) {
      on_second = [&](const BenchSample& sample) {
        std::string line = ProgressLine(sample, limits);
        // Pad over the previous, possibly longer, line.
        std::fprintf(stderr, "\r%-*s", static_cast<int>(std::max(shown, line.size())), line.c_str());
        std::fflush(stderr);
        shown = std::max(shown, line.size());
      };
    }
    BenchResult result = RunLoad(limits, start, on_second, &interrupted);
    if (shown) std::fprintf(stderr, "\r%*s\r", static_cast<int>(shown), "");
    if (interrupted.load()) {
      std::fprintf(stderr, "scales bench: interrupted by signal %d after %.3f s: the report covers the calls sent until then\n",
                   static_cast<int>(interrupt_signal), result.elapsed_s);
    }
    if (json) {
      std::fputs(JsonReport(result).c_str(), stdout);
    } else {
      PrintTextReport(result, stdout);
    }
    if (!report_path.empty()) {
      std::string error;
      std::string title = fmt::format("scales bench {} {}", protocol, uri);
      if (!WriteTextFile(report_path, RenderHtmlReport(title, {{title, settings, result, {}}}), error)) {
        std::fprintf(stderr, "scales bench: --report: %s\n", error.c_str());
        report_failed = true;
      }
      if (!report_failed) std::fprintf(stderr, "report: %s\n", report_path.c_str());
    }
    std::fflush(stdout);
    return result.failed;
  };

  stats::StatsRegistry registry;
  ClientOptions client_options;
  client_options.name = "bench";
  client_options.timeout = timeout;
  client_options.stats = &registry;
  RuntimeOptions runtime_options;
  runtime_options.threads = threads;
  runtime_options.busy_poll = busy_poll;

  int64_t failed = 0;
  std::optional<admin::AdminServer> admin_server;
  try {
    try {
      client_options.runtime = std::make_shared<Runtime>(runtime_options);
    } catch (const std::system_error& e) {
      std::fprintf(stderr, "scales bench: cannot start %s event loops: %s\n",
                   threads ? std::to_string(threads).c_str() : "the", e.what());
      return 2;
    }
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
      failed = run([&](BenchWorker& w, std::function<void(error_code)> done) {
        CallOptions opts;
        opts.info = &w.info;
        client.AsyncSend(prototype, std::move(opts), [done = std::move(done)](error_code ec, http::Response&&) { done(ec); });
      });
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
      using Client = std::decay_t<decltype(client)>;
      const bool ping = method == "ping";
      failed = run([&](BenchWorker& w, std::function<void(error_code)> done) {
        // A handle with this worker's CallOptions, made on its first call.
        if (!w.protocol_state) {
          CallOptions opts;
          opts.info = &w.info;
          w.protocol_state = std::make_shared<Client>(client.WithOptions(std::move(opts)));
        }
        const Client& c = *static_cast<const Client*>(w.protocol_state.get());
        if (ping) {
          SCALES_THRIFT_CALL(c, ping, [done = std::move(done)](std::exception_ptr e) { done(ThriftErrorCode(e)); });
        } else {
          SCALES_THRIFT_CALL(c, echo, payload,
                             [done = std::move(done)](std::exception_ptr e, std::string) { done(ThriftErrorCode(e)); });
        }
      });
      client.Close();
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "scales: %s [%s]\n", e.what(), ErrorName(e.scales_code()).c_str());
    return 2;
  }
  if (print_stats) {
    // With --json, on stderr: stdout holds the JSON document alone.
    std::fprintf(json ? stderr : stdout, "\nclient stats\n%s", registry.ToText().c_str());
  }
  std::fflush(stdout);
  if (report_failed) return 2;
  if (interrupted.load()) return 128 + static_cast<int>(interrupt_signal);
  return failed == 0 ? 0 : 1;
}

}  // namespace scales::tools
