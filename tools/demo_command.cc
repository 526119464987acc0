// scales demo: the whole story in a minute or two. Starts three local HTTP test servers (this
// same binary, `scales testserver http`), calls them through one client in every completion
// style, shows how requests spread, stops one server in the middle of a load run and restarts
// it, prints the client's stats; then the Thrift and ThriftMux rounds (demo_thrift.cc) and
// ZooKeeper discovery (demo_zookeeper.cc).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>

#include "child_process.h"
#include "commands.h"
#include "scales/http/client.h"

namespace scales::tools {
namespace {

using namespace std::chrono_literals;

// A `scales testserver http` child process.
class Server {
 public:
  Server(std::string name, int port) : name_(std::move(name)), port_(port) {}

  bool Start() {
    std::string ep = StartTestServer(child_, "http", port_, {"--name", name_});
    if (ep.empty()) return false;
    port_ = std::stoi(ep.substr(ep.rfind(':') + 1));
    return true;
  }
  void Stop() { child_.Stop(); }
  std::string endpoint() const { return fmt::format("127.0.0.1:{}", port_); }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  int port_;
  ChildProcess child_;
};

std::string OneLine(const std::string& s) {
  std::string out = s;
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

}  // namespace

int RunDemoCommand(int argc, char** argv) {
  double seconds = 6;
  if (argc >= 3 && std::string_view(argv[1]) == "--seconds") seconds = std::max(3.0, std::atof(argv[2]));
  std::printf("== scales demo ==\n\n");
  std::vector<std::unique_ptr<Server>> servers;
  for (const char* name : {"alpha", "beta", "gamma"}) {
    auto s = std::make_unique<Server>(name, 0);
    if (!s->Start()) {
      std::fprintf(stderr, "demo: could not start test server %s\n", name);
      return 2;
    }
    std::printf("started HTTP test server %-6s on %s\n", name, s->endpoint().c_str());
    servers.push_back(std::move(s));
  }
  std::string uri = "tcp://" + servers[0]->endpoint() + "," + servers[1]->endpoint() + "," + servers[2]->endpoint();
  std::map<std::string, std::string> name_of;
  for (auto& s : servers) name_of[s->endpoint()] = s->name();

  stats::StatsRegistry registry;
  RuntimeOptions ro;
  ro.threads = 2;
  http::HttpOptions options;
  options.client.name = "demo";
  options.client.timeout = 2s;
  options.client.stats = &registry;
  options.client.runtime = std::make_shared<Runtime>(ro);
  options.resurrector.initial_backoff = 250ms;
  options.resurrector.max_backoff = 1s;

  try {
    http::HttpClient client = Http::NewClient(uri, options);
    std::printf("\nclient = scales::Http::NewClient(\"%s\")\n%s\n\n", uri.c_str(), client.core()->Describe().c_str());

    // 1. The four completion styles.
    http::Response r = client.Get("/");
    std::printf("1. blocking   client.Get(\"/\")                         -> %d %s\n", r.status, OneLine(r.body).c_str());
    std::promise<std::string> cb;
    client.AsyncGet("/", [&](error_code ec, http::Response resp) {
      cb.set_value(ec ? ec.message() : fmt::format("{} {}", resp.status, OneLine(resp.body)));
    });
    std::printf("2. callback   client.AsyncGet(\"/\", callback)           -> %s\n", cb.get_future().get().c_str());
    auto fut = client.AsyncPost("/echo", "posted through a future", boost::asio::use_future);
    r = fut.get();
    std::printf("3. future     client.AsyncPost(\"/echo\", .., use_future) -> %d %s\n", r.status, r.body.c_str());
    boost::asio::io_context ioc;
    std::string coro;
    boost::asio::co_spawn(
        ioc,
        [&]() -> boost::asio::awaitable<void> {
          http::Response resp = co_await client.AsyncGet("/", boost::asio::use_awaitable);
          coro = fmt::format("{} {}", resp.status, OneLine(resp.body));
        },
        boost::asio::detached);
    ioc.run();
    std::printf("4. coroutine  co_await client.AsyncGet(\"/\", use_awaitable) -> %s\n", coro.c_str());
    try {
      CallOptions quick;
      quick.timeout = 100ms;
      client.Send({"GET", "/delay/1000", {}, {}}, quick);
    } catch (const Error& e) {
      std::printf("5. timeout    GET /delay/1000 with a 100 ms timeout    -> %s\n   %s\n", ErrorName(e.scales_code()).c_str(), e.what());
    }

    // 2. Spread.
    std::map<std::string, int> spread;
    for (int i = 0; i < 300; ++i) ++spread[std::string(client.Get("/").Header("X-Server"))];
    std::printf("\n6. 300 blocking GETs, one at a time (the aperture balancer keeps a light load on a few"
                "\n   servers; the load run below widens it):");
    for (auto& [n, c] : spread) std::printf("  %s %d", n.c_str(), c);
    std::printf("\n");

    // 3. Load run with a server stopped and restarted.
    std::printf("\n7. load run: 16 concurrent callers for %.0f s; beta is stopped at 1/3 and restarted at 2/3\n", seconds);
    struct Stats {
      std::mutex mu;
      std::map<std::string, int64_t> ok_by_server;
      int64_t failed = 0;
      std::map<std::string, int64_t> errors;
    } tick, total;
    std::atomic<bool> stop{false};
    std::atomic<int64_t> started{0}, completed{0};
    std::atomic<int> active{16};
    std::promise<void> drained;
    struct Caller {
      CallInfo info;
    };
    std::vector<std::unique_ptr<Caller>> callers;
    for (int i = 0; i < 16; ++i) callers.push_back(std::make_unique<Caller>());
    std::function<void(Caller*)> next = [&](Caller* c) {
      if (stop) {
        if (--active == 0) drained.set_value();
        return;
      }
      ++started;
      CallOptions o;
      o.info = &c->info;
      o.idempotent = true;  // a GET: safe to send again if its connection dies under it
      client.AsyncSend({"GET", "/", {}, {}}, o, [&, c](error_code ec, http::Response) {
        {
          std::lock_guard lock(tick.mu);
          if (ec) {
            ++tick.failed;
            ++tick.errors[ErrorName(ec)];
          } else {
            ++tick.ok_by_server[name_of[c->info.endpoint]];
          }
        }
        ++completed;
        next(c);
      });
    };
    for (auto& c : callers) next(c.get());
    const auto start = std::chrono::steady_clock::now();
    const int ticks = static_cast<int>(seconds * 2);
    for (int t = 1; t <= ticks; ++t) {
      std::this_thread::sleep_until(start + t * 500ms);
      std::string event;
      if (t == ticks / 3) {
        servers[1]->Stop();
        event = "  <- beta stopped";
      }
      if (t == 2 * ticks / 3) {
        servers[1]->Start();
        event = "  <- beta restarted";
      }
      std::lock_guard lock(tick.mu);
      std::string line = fmt::format("   t={:4.1f}s ", t * 0.5);
      int64_t ok = 0;
      for (auto& s : {"alpha", "beta", "gamma"}) {
        int64_t n = tick.ok_by_server[s];
        ok += n;
        line += fmt::format(" {} {:5d}", s, n);
        total.ok_by_server[s] += n;
      }
      line += fmt::format("   ok {:5d} failed {:3d}", ok, tick.failed);
      total.failed += tick.failed;
      for (auto& [k, v] : tick.errors) total.errors[k] += v;
      std::printf("%s%s\n", line.c_str(), event.c_str());
      std::fflush(stdout);
      tick.ok_by_server.clear();
      tick.errors.clear();
      tick.failed = 0;
    }
    stop = true;
    drained.get_future().wait();
    {
      std::lock_guard lock(tick.mu);
      for (auto& [k, v] : tick.ok_by_server) total.ok_by_server[k] += v;
      total.failed += tick.failed;
      for (auto& [k, v] : tick.errors) total.errors[k] += v;
    }
    int64_t ok = 0;
    for (auto& [k, v] : total.ok_by_server) ok += v;
    std::printf("   started %lld, completed %lld (each exactly once): %lld ok, %lld failed",
                static_cast<long long>(started.load()), static_cast<long long>(completed.load()),
                static_cast<long long>(ok), static_cast<long long>(total.failed));
    for (auto& [k, v] : total.errors) std::printf("  [%s %lld]", k.c_str(), static_cast<long long>(v));
    std::printf("\n   requests cut off on beta's connections were retried on another server (idempotent GETs;"
                "\n   scales_retries below), so failures are rare; beta is marked down, reconnected and used again.\n");
    client.Close();
  } catch (const Error& e) {
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 2;
  }
  std::printf("\n8. client stats (scales_* metrics, labels client/endpoint):\n");
  for (const auto& m : registry.Snapshot()) {
    std::string labels;
    for (auto& [k, v] : m.labels) {
      if (k == "client") continue;
      labels += fmt::format("{}={} ", k, name_of.count(v) ? name_of[v] : v);
    }
    if (m.type == stats::MetricType::kHistogram) {
      if (m.histogram.count == 0) continue;
      std::printf("   %-40s %-16s count %lld p50 %lld us p99 %lld us max %lld us\n", m.name.c_str(), labels.c_str(),
                  static_cast<long long>(m.histogram.count), static_cast<long long>(m.histogram.Percentile(0.5)),
                  static_cast<long long>(m.histogram.Percentile(0.99)), static_cast<long long>(m.histogram.max));
    } else if (m.value != 0) {
      std::printf("   %-40s %-16s %lld\n", m.name.c_str(), labels.c_str(), static_cast<long long>(m.value));
    }
  }
  if (int rc = RunThriftDemo(seconds); rc != 0) return rc;
  if (int rc = RunZooKeeperDemo(seconds); rc != 0) return rc;
  std::printf("\ndemo finished.\n");
  return 0;
}

}  // namespace scales::tools
