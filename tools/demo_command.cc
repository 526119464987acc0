// scales demo: the whole story in a few minutes on one machine.
//  1. A local ZooKeeper (static tcp:// lists instead when Java is missing) and three test
//     servers for each protocol (HTTP, framed Thrift, ThriftMux: this same binary's
//     `scales testserver`), registered in ZooKeeper as server-set members.
//  2. One client per protocol, on zk:// URIs, called in every completion style.
//  3. A load run per protocol (the bench driver, bench_report.h, open loop): the second server
//     is killed (SIGKILL) a third of the way in and restarted at two thirds; a line per second
//     shows the failures and retries and the traffic coming back.
//  4. A summary table per protocol and an HTML report with the charts (bench_html.h).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>

#include "bench_html.h"
#include "bench_report.h"
#include "cli_util.h"
#include "commands.h"
#include "demo.h"
#include "scales/http/client.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/stats/stats.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales::tools {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr const char* kNames[] = {"alpha", "beta", "gamma"};
constexpr size_t kVictim = 1;  // beta is killed and restarted in every load run

// A `scales testserver <kind>` child process that can be killed and restarted on its port.
class Server {
 public:
  Server(std::string kind, std::string name) : kind_(std::move(kind)), name_(std::move(name)) {}

  // Starts (or restarts) the server; when it does not start, `why` says why.
  bool Start(std::string& why) {
    std::vector<std::string> extra;
    if (kind_ == "http") extra = {"--name", name_};
    // A restart reuses the port, which the kernel may hold for a moment.
    for (auto until = Clock::now() + 5s;;) {
      std::string ep = StartTestServer(child_, kind_, port_, extra, why);
      if (!ep.empty()) {
        port_ = std::stoi(ep.substr(ep.rfind(':') + 1));
        return true;
      }
      if (port_ == 0 || Clock::now() > until) return false;
      std::this_thread::sleep_for(100ms);
    }
  }
  void Kill() { child_.Kill(); }
  std::string endpoint() const { return fmt::format("127.0.0.1:{}", port_); }
  const std::string& name() const { return name_; }

 private:
  std::string kind_;
  std::string name_;
  int port_ = 0;
  ChildProcess child_;
};

struct Service {
  std::string label;  // "HTTP"
  std::string kind;   // "http": the testserver kind and the server-set path
  std::vector<std::unique_ptr<Server>> servers;
  std::string uri;
  std::string client_name;
};

// One protocol's load run: its report and what the demo adds to it.
struct Outcome {
  std::string label;
  BenchResult result;
  int64_t retried = 0;
  std::vector<std::pair<double, std::string>> events;
};

std::string OneLine(const std::string& s) {
  std::string out = s;
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

int64_t CounterSum(const stats::StatsRegistry& registry, const std::string& name, const std::string& client) {
  int64_t n = 0;
  for (const auto& m : registry.Snapshot()) {
    if (m.name != name) continue;
    for (auto& [k, v] : m.labels) {
      if (k == "client" && v == client) n += m.value;
    }
  }
  return n;
}

template <class Options>
void DemoOptions(Options& o, const std::string& name, stats::StatsRegistry& registry,
                 const std::shared_ptr<Runtime>& runtime) {
  o.client.name = name;
  o.client.timeout = 2s;
  o.client.stats = &registry;
  o.client.runtime = runtime;
  // Every server gets a share of the load (the default aperture balancer would keep this light
  // load on two of the three), so the restarted one visibly gets its share back.
  o.balancer.kind = BalancerKind::kP2C;
  // A restarted server is tried again within a second.
  o.resurrector.initial_backoff = 250ms;
  o.resurrector.max_backoff = 1s;
}

// Runs `start` open loop at `rate` for `seconds`, killing the victim at 1/3 and restarting it
// at 2/3, with a line per second.
Outcome LoadRun(Service& service, const BenchStart& start, double seconds, double rate,
                const stats::StatsRegistry& registry) {
  Outcome out;
  out.label = service.label;
  std::printf("%s", fmt::format("\n   {}: {:g} req/s for {:g} s through {}\n", service.label, rate, seconds, service.uri).c_str());
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < service.servers.size(); ++i) index[service.servers[i]->endpoint()] = i;
  std::vector<std::atomic<int64_t>> ok_by_server(service.servers.size());
  BenchStart counted = [&](BenchWorker& w, std::function<void(error_code)> done) {
    start(w, [&, &w = w, done = std::move(done)](error_code ec) {
      auto it = index.find(w.info.endpoint);
      if (!ec && it != index.end()) ok_by_server[it->second].fetch_add(1, std::memory_order_relaxed);
      done(ec);
    });
  };

  std::mutex mu;
  std::vector<std::pair<double, std::string>> events;
  size_t shown_events = 0;
  const auto begin = Clock::now();
  auto event = [&](const std::string& what) {
    std::lock_guard lock(mu);
    events.emplace_back(std::chrono::duration<double>(Clock::now() - begin).count(), what);
  };
  Server& victim = *service.servers[kVictim];
  std::promise<void> stop;
  std::thread chaos([&, stopped = stop.get_future()] {
    if (stopped.wait_until(begin + std::chrono::duration<double>(seconds / 3)) == std::future_status::ready) return;
    victim.Kill();
    event(victim.name() + " killed");
    if (stopped.wait_until(begin + std::chrono::duration<double>(2 * seconds / 3)) == std::future_status::ready) return;
    std::string why;
    event(victim.Start(why) ? victim.name() + " restarted" : victim.name() + " did not restart: " + why);
  });
  // The chaos thread is stopped and joined however the load ends (a throw from RunLoad would
  // otherwise destroy a joinable thread: std::terminate, the servers left running).
  struct StopChaos {
    std::promise<void>& stop;
    std::thread& chaos;
    void operator()() {
      if (!chaos.joinable()) return;
      stop.set_value();
      chaos.join();
    }
    ~StopChaos() { (*this)(); }
  } stop_chaos{stop, chaos};
  const int64_t retried_before = CounterSum(registry, "scales_retries", service.client_name);
  int64_t retried_shown = retried_before;
  BenchLimits limits;
  limits.rate = rate;
  limits.duration = std::chrono::duration_cast<Duration>(std::chrono::duration<double>(seconds));
  limits.concurrency = 64;
  out.result = RunLoad(limits, counted, [&](const BenchSample& s) {
    // Retries in this second, as ok and failed are.
    const int64_t retried = CounterSum(registry, "scales_retries", service.client_name);
    std::string line = fmt::format("   t={:3.0f}s  ok {:5d}  failed {:3d}  retried {:3d}  p50 {:>8}  p99 {:>8}  ",
                                   s.t_s, s.completed - s.failed, s.failed, retried - retried_shown,
                                   FormatMicros(s.p50_us), FormatMicros(s.p99_us));
    retried_shown = retried;
    for (size_t i = 0; i < service.servers.size(); ++i) {
      line += fmt::format(" {} {:4d}", service.servers[i]->name(), ok_by_server[i].exchange(0));
    }
    std::lock_guard lock(mu);
    for (; shown_events < events.size(); ++shown_events) line += "  <- " + events[shown_events].second;
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  });
  stop_chaos();
  out.retried = CounterSum(registry, "scales_retries", service.client_name) - retried_before;
  out.events = std::move(events);
  return out;
}

void PrintSummary(const std::vector<Outcome>& outcomes) {
  std::printf("\n4. Summary (every call counted exactly once; latency from its intended send time)\n\n");
  std::printf("   %-10s %9s %9s %7s %8s %9s %9s %10s %10s\n", "protocol", "requests", "ok", "failed", "retried",
              "p50", "p99", "offered/s", "achieved/s");
  for (const auto& o : outcomes) {
    const auto& r = o.result;
    std::printf("   %-10s %9lld %9lld %7lld %8lld %9s %9s %10.0f %10.0f\n", o.label.c_str(),
                static_cast<long long>(r.total()), static_cast<long long>(r.succeeded),
                static_cast<long long>(r.failed), static_cast<long long>(o.retried),
                FormatMicros(r.latency_us.Percentile(0.5)).c_str(), FormatMicros(r.latency_us.Percentile(0.99)).c_str(),
                r.limits.rate.value_or(0), r.achieved_rps());
  }
}

// The usage, after `problem`: on stderr, exit status 2; on stdout (--help), 0.
int Usage(const std::string& problem, std::FILE* out = stderr) {
  if (!problem.empty()) std::fprintf(stderr, "scales demo: %s\n", problem.c_str());
  std::fputs("usage: scales demo [--seconds S] [--rate R] [--report FILE.html]\n", out);
  return out == stdout ? 0 : 2;
}

}  // namespace

int RunDemoCommand(int argc, char** argv) {
  double seconds = 9;
  double rate = 300;
  std::string report_path = (std::filesystem::temp_directory_path() / "scales-demo-report.html").string();
  std::set<std::string_view> given;  // each option once: a second value would silently win
  if (HelpAnywhere(argc, argv)) return Usage("", stdout);
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg.starts_with("--") && !given.insert(arg).second) return Usage(fmt::format("{} given twice", arg));
    if (arg == "--seconds" && v) {
      seconds = ParseNumber(v).value_or(-1);
      if (!(seconds >= 3 && seconds <= 600)) return Usage("--seconds is 3 to 600 (each load run's length)");
    } else if (arg == "--rate" && v) {
      rate = ParseNumber(v).value_or(-1);
      if (!(rate >= 10 && rate <= 100000)) return Usage("--rate is 10 to 100000 requests/s");
    } else if (arg == "--report" && !MissingValue(v)) {
      report_path = v;
    } else if (!arg.starts_with("-")) {
      return Usage(fmt::format("unexpected argument '{}' (the demo takes options only)", arg));
    } else {
      return Usage(fmt::format("unknown option or missing value: '{}'", arg));
    }
    ++i;
  }
  std::string error;
  if (!CheckWritable(report_path, error)) return Usage("--report: " + error);
  std::printf("== scales demo ==\n\n");

  // The registry outlives the clients' runtime: closing clients still report into it.
  stats::StatsRegistry registry;
  LocalZooKeeper zk;
  std::vector<Service> services(3);
  std::vector<Outcome> outcomes;
  // Every failure below is a message and exit status 2: nothing escapes (std::terminate would
  // leave the servers and ZooKeeper running, with no word of what failed).
  try {
    // 1. ZooKeeper and the servers.
    std::string why;
    const bool with_zk = zk.Start(why);
    if (with_zk) {
      std::printf("1. ZooKeeper on %s (Debian's zookeeper package, a private data directory); three test\n"
                  "   servers per protocol, each registered in it as a server-set member:\n",
                  zk.address().c_str());
    } else {
      std::printf("1. No ZooKeeper: %s; the clients use static tcp:// lists\n"
                  "   instead. Three test servers per protocol:\n",
                  why.c_str());
    }
    for (auto [s, label, kind] : {std::tuple{&services[0], "HTTP", "http"}, std::tuple{&services[1], "Thrift", "thrift"},
                                  std::tuple{&services[2], "ThriftMux", "thriftmux"}}) {
      s->label = label;
      s->kind = kind;
      s->client_name = std::string("demo-") + kind;
    }
    for (auto& s : services) {
      std::string line, list;
      for (const char* name : kNames) {
        auto server = std::make_unique<Server>(s.kind, name);
        if (!server->Start(why)) {
          std::fprintf(stderr, "demo: could not start the %s test server %s: %s\n", s.label.c_str(), name, why.c_str());
          return 2;
        }
        line += fmt::format(" {} {}", name, server->endpoint());
        list += (list.empty() ? "" : ",") + server->endpoint();
        s.servers.push_back(std::move(server));
      }
      if (with_zk) {
        s.uri = fmt::format("zk://{}/scales/demo/{}", zk.address(), s.kind);
        for (auto& server : s.servers) {
          if (!zk.Announce(s.uri, server->endpoint(), why)) {
            std::fprintf(stderr, "demo: could not register %s in %s: %s\n", server->endpoint().c_str(), s.uri.c_str(),
                         why.c_str());
            return 2;
          }
        }
      } else {
        s.uri = "tcp://" + list;
      }
      std::printf("   %-10s%s\n   %-10s-> %s\n", s.label.c_str(), line.c_str(), "", s.uri.c_str());
    }
    Service& web = services[0];
    Service& thrift_service = services[1];
    Service& mux_service = services[2];

    RuntimeOptions ro;
    ro.threads = 2;
    std::shared_ptr<Runtime> runtime;
    try {
      runtime = std::make_shared<Runtime>(ro);
    } catch (const std::system_error& e) {
      std::fprintf(stderr, "demo: cannot start the clients' %zu event loops: %s\n", ro.threads, e.what());
      return 2;
    }
    http::HttpOptions hopts;
    DemoOptions(hopts, web.client_name, registry, runtime);
    http::HttpClient http_client = Http::NewClient(web.uri, hopts);
    thrift::ThriftOptions topts;
    DemoOptions(topts, thrift_service.client_name, registry, runtime);
    auto thrift_client = Thrift::NewClient<echo::EchoClient>(thrift_service.uri, topts);
    thriftmux::ThriftMuxOptions mopts;
    DemoOptions(mopts, mux_service.client_name, registry, runtime);
    mopts.client_id = "scales-demo";
    auto mux_client = ThriftMux::NewClient<echo::EchoClient>(mux_service.uri, mopts);

    // 2. Every completion style.
    std::printf("\n2. One client per protocol, on those URIs, in every completion style\n");
    std::printf("\n   http = scales::Http::NewClient(\"%s\")\n", web.uri.c_str());
    http::Response r = http_client.Get("/");
    std::printf("   blocking   http.Get(\"/\")                               -> %d %s\n", r.status, OneLine(r.body).c_str());
    std::promise<std::string> cb;
    http_client.AsyncGet("/", [&](error_code ec, http::Response resp) {
      cb.set_value(ec ? ec.message() : fmt::format("{} {}", resp.status, OneLine(resp.body)));
    });
    std::printf("   callback   http.AsyncGet(\"/\", callback)                -> %s\n", cb.get_future().get().c_str());
    r = http_client.AsyncPost("/echo", "posted through a future", boost::asio::use_future).get();
    std::printf("   future     http.AsyncPost(\"/echo\", .., use_future)      -> %d %s\n", r.status, r.body.c_str());
    boost::asio::io_context ioc;
    std::string coro;
    boost::asio::co_spawn(
        ioc,
        [&]() -> boost::asio::awaitable<void> {
          http::Response resp = co_await http_client.AsyncGet("/", boost::asio::use_awaitable);
          coro = fmt::format("{} {}", resp.status, OneLine(resp.body));
        },
        boost::asio::detached);
    ioc.run();
    std::printf("   coroutine  co_await http.AsyncGet(\"/\", use_awaitable)  -> %s\n", coro.c_str());
    try {
      CallOptions quick;
      quick.timeout = 100ms;
      http_client.Send({"GET", "/delay/1000", {}, {}}, quick);
    } catch (const Error& e) {
      std::printf("   timeout    GET /delay/1000 with a 100 ms timeout      -> %s\n              %s\n",
                  ErrorName(e.scales_code()).c_str(), e.what());
    }
    std::printf("\n   thrift = scales::Thrift::NewClient<EchoClient>(\"%s\")  (framed, binary; Apache Thrift's\n"
                "   generated EchoClient for tools/echo.thrift)\n",
                thrift_service.uri.c_str());
    ShowThriftCalls(thrift_client);
    std::printf("\n   mux = scales::ThriftMux::NewClient<EchoClient>(\"%s\")  (the same generated\n"
                "   client over Finagle's Mux: one multiplexed session per server and event loop)\n",
                mux_service.uri.c_str());
    ShowThriftCalls(mux_client);

    // 3. Load, with a server killed and restarted.
    std::printf("\n3. Load: each client at %.0f req/s, open loop (latency from each call's intended send\n"
                "   time), for %.0f s, over the three servers (p2c balancer); beta is killed (SIGKILL) at\n"
                "   %.0f s and restarted at %.0f s. The calls cut off on its connections are retried on the\n"
                "   other servers (the calls are idempotent), new calls avoid it while it is down, and it\n"
                "   gets its share again once it is back.%s\n",
                rate, seconds, seconds / 3, 2 * seconds / 3,
                with_zk ? " A crashed server stays in ZooKeeper until its session\n"
                          "   expires: the clients cope with a member that refuses connections."
                        : "");
    CallOptions idempotent;
    idempotent.idempotent = true;
    outcomes.push_back(LoadRun(
        web,
        [&](BenchWorker& w, std::function<void(error_code)> done) {
          CallOptions o = idempotent;
          o.info = &w.info;
          http_client.AsyncSend({"GET", "/", {}, {}}, o, [done = std::move(done)](error_code ec, http::Response) { done(ec); });
        },
        seconds, rate, registry));
    auto thrift_start = [&](const thrift::ThriftClient<echo::EchoClient>& client) {
      return [&](BenchWorker& w, std::function<void(error_code)> done) {
        CallOptions o = idempotent;
        o.info = &w.info;
        SCALES_THRIFT_CALL(client.WithOptions(o), echo, std::string("load"),
                           [done = std::move(done)](std::exception_ptr e, std::string) { done(ThriftErrorCode(e)); });
      };
    };
    outcomes.push_back(LoadRun(thrift_service, thrift_start(thrift_client), seconds, rate, registry));
    outcomes.push_back(LoadRun(mux_service, thrift_start(mux_client), seconds, rate, registry));
    http_client.Close();
    thrift_client.Close();
    mux_client.Close();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 2;
  }

  // 4. Summary and report.
  PrintSummary(outcomes);
  std::vector<ReportSection> sections;
  for (size_t i = 0; i < outcomes.size(); ++i) {
    const Service& s = services[i];
    std::vector<std::pair<std::string, std::string>> settings = {
        {"protocol", s.label},
        {"uri", s.uri},
        {"call", s.kind == "http" ? "GET / (idempotent)" : "Echo.echo(\"load\") (idempotent)"},
        {"mode", fmt::format("open loop at {:g} req/s, at most 64 outstanding", rate)},
        {"balancer", "p2c"},
        {"duration", fmt::format("{:g} s", seconds)},
        {"servers", fmt::format("alpha {}, beta {}, gamma {}", s.servers[0]->endpoint(), s.servers[1]->endpoint(),
                                s.servers[2]->endpoint())},
        {"retried", std::to_string(outcomes[i].retried)}};
    sections.push_back({s.label + ": beta killed and restarted under load", std::move(settings), outcomes[i].result,
                        outcomes[i].events});
  }
  if (!WriteTextFile(report_path, RenderHtmlReport("scales demo", sections), error)) {
    std::fprintf(stderr, "demo: %s\n", error.c_str());
    return 2;
  }
  std::printf("\n   report: %s\n   (latency and throughput over time with the kill and restart marked, the latency\n"
              "   distribution and the spread over servers, per protocol; `scales bench --report` writes the same)\n",
              std::filesystem::absolute(report_path).string().c_str());
  std::printf("\ndemo finished.\n");
  return 0;
}

}  // namespace scales::tools
