// Failure recovery against real servers with the default stacks (aperture balancer, retries
// under a budget, failure accrual, resurrector):
//   - three servers, one killed and restarted every ~1.5 s while 64 callers run: every call
//     completes exactly once and at least 99.9 % succeed (calls are idempotent, so requests
//     cut off by a dying connection are retried too); afterwards no call is pending, no Mux
//     tag is in use and the pools hold no more connections than callers;
//     for HTTP (nginx), framed Thrift (Apache Thrift's server in `scales testserver thrift`)
//     and ThriftMux (the independent Python Mux reference server);
//   - a server that answers slowly stops receiving most traffic under P2C peak EWMA;
//   - a server that fails every call is ejected by failure accrual, and revived (probe
//     succeeds) once it recovers;
//   - a Mux server that drains a session with calls in flight: new calls go to a new session;
//   - a Mux server that refuses every call (Nacks) is ejected; the calls go to a healthy one;
//   - connections cut at any byte, either way, with a FIN or a reset, or stalled there, and
//     replies delivered in pieces (FaultProxy, for HTTP and HTTPS to nginx, framed Thrift in
//     clear and over TLS, unframed Thrift, ThriftMux in clear and over TLS): every call completes
//     once, with its own payload back or a failure a broken connection explains, and every call
//     succeeds once the faults stop; the same with backup requests through stalling connections
//     (HTTP, ThriftMux), and with every connection cut in its TLS or Mux handshake (HTTPS,
//     ThriftMux over TLS);
//   - replies with a byte altered now and then (HTTP, Thrift, ThriftMux, in clear and over TLS):
//     every call completes once, with a protocol error, a timeout or its reply (over TLS a
//     closed connection, retried), and all succeed once bytes are clean.

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/use_future.hpp>
#include <gtest/gtest.h>

#include "Echo.h"
#include "scales/core/runtime.h"
#include "scales/http/client.h"
#include "scales/resilience/backup_request.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"
#include "scales/transport/tls.h"
#include "support/fault_proxy.h"
#include "support/fixtures.h"
#include "support/mux_server_fixture.h"
#include "support/test_ca.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;
using SteadyTime = std::chrono::steady_clock::time_point;

std::shared_ptr<Runtime> MakeRuntime(size_t threads) {
  RuntimeOptions o;
  o.threads = threads;
  return std::make_shared<Runtime>(o);
}

// Tallies of a load run. Thread safe.
struct Tally {
  std::atomic<int64_t> started{0};
  std::atomic<int64_t> completed{0};
  std::atomic<int64_t> ok{0};
  std::mutex mu;
  std::map<std::string, int64_t> errors;     // error name -> count
  std::map<std::string, int64_t> endpoints;  // endpoint of successful calls -> count
  std::map<std::string, std::vector<std::string>> details;  // error name -> its first 50 details
  std::string first_error;

  // Counts the call's outcome; the caller then bumps `completed`, as its last use of the run.
  void Record(const error_code& ec, const std::string& endpoint, const std::string& detail) {
    std::lock_guard<std::mutex> lock(mu);
    if (!ec) {
      ok.fetch_add(1);
      ++endpoints[endpoint];
    } else {
      ++errors[ErrorName(ec)];
      if (auto& d = details[ErrorName(ec)]; d.size() < 50) d.push_back(detail);
      if (first_error.empty()) first_error = detail;
    }
  }
  std::string Describe() {
    std::lock_guard<std::mutex> lock(mu);
    std::string s = "started " + std::to_string(started.load()) + ", completed " +
                    std::to_string(completed.load()) + ", ok " + std::to_string(ok.load()) + "; errors:";
    for (const auto& [k, v] : errors) s += " " + k + "=" + std::to_string(v);
    s += "; per endpoint:";
    for (const auto& [k, v] : endpoints) s += " " + k + "=" + std::to_string(v);
    if (!first_error.empty()) s += "; first error: " + first_error;
    return s;
  }
};

// `callers` closed loops: each starts a call with `start(done)` and, when `done` runs, starts
// the next one until `stop` is set. `start` must call `done` exactly once per call.
class LoadRun {
 public:
  using Done = std::function<void(const error_code&, const std::string& endpoint, const std::string& detail)>;
  using Start = std::function<void(Done)>;

  LoadRun(int callers, Start start) : start_(std::move(start)) {
    for (int i = 0; i < callers; ++i) Next();
  }
  void Stop() { stop_.store(true); }
  // Waits until every started call completed; false on timeout.
  bool Drain(std::chrono::milliseconds timeout) {
    auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      if (tally.completed.load() == tally.started.load() && in_start_.load() == 0) return true;
      std::this_thread::sleep_for(10ms);
    }
    return tally.completed.load() == tally.started.load();
  }
  Tally tally;

 private:
  void Next() {
    if (stop_.load()) return;
    in_start_.fetch_add(1);
    tally.started.fetch_add(1);
    auto once = std::make_shared<std::atomic<int>>(0);
    start_([this, once](const error_code& ec, const std::string& endpoint, const std::string& detail) {
      if (once->fetch_add(1) != 0) {
        ADD_FAILURE() << "a call completed twice";
        return;
      }
      tally.Record(ec, endpoint, detail);
      Next();
      // Last: once every started call is counted here, Drain() returns and the test may destroy
      // the run, so nothing of it may be touched after this.
      tally.completed.fetch_add(1);
    });
    in_start_.fetch_sub(1);
  }

  Start start_;
  std::atomic<bool> stop_{false};
  std::atomic<int> in_start_{0};
};

// Kills server (k mod n) every `period`, restarting it `down_for` later, until `total` passed.
void KillAndRestart(size_t n, std::chrono::milliseconds period, std::chrono::milliseconds down_for,
                    std::chrono::milliseconds total, const std::function<void(size_t)>& kill,
                    const std::function<void(size_t)>& restart) {
  auto end = std::chrono::steady_clock::now() + total;
  for (size_t k = 0; std::chrono::steady_clock::now() + period < end; ++k) {
    std::this_thread::sleep_for(period - down_for);
    kill(k % n);
    std::this_thread::sleep_for(down_for);
    restart(k % n);
  }
  std::this_thread::sleep_until(end);
}

int64_t SumGauge(const stats::StatsRegistry& s, std::string_view name) {
  int64_t sum = 0;
  for (const auto& m : s.Snapshot()) {
    if (m.name == name && m.type == stats::MetricType::kGauge) sum += m.value;
  }
  return sum;
}
int64_t SumCounter(const stats::StatsRegistry& s, std::string_view name, std::string_view endpoint = {}) {
  int64_t sum = 0;
  for (const auto& m : s.Snapshot()) {
    if (m.name != name || m.type != stats::MetricType::kCounter) continue;
    bool match = endpoint.empty();
    for (const auto& [k, v] : m.labels) match = match || (k == "endpoint" && v == endpoint);
    if (match) sum += m.value;
  }
  return sum;
}

constexpr int kLoops = 2;

void ExpectRecovered(LoadRun& run, const stats::StatsRegistry& stats, int callers) {
  run.Stop();
  ASSERT_TRUE(run.Drain(15s)) << "calls did not complete: " << run.tally.Describe();
  const int64_t started = run.tally.started.load();
  EXPECT_EQ(run.tally.completed.load(), started) << run.tally.Describe();
  EXPECT_GT(started, 500) << run.tally.Describe();
  EXPECT_GE(static_cast<double>(run.tally.ok.load()), 0.999 * static_cast<double>(started))
      << run.tally.Describe() << "\n" << stats.ToText();
  EXPECT_GT(SumCounter(stats, "scales_retries"), 0) << "no retry ran: the kills did not bite";
  // Connection and tag counts back to normal.
  EXPECT_EQ(SumGauge(stats, "scales_pending"), 0);
  EXPECT_EQ(SumGauge(stats, "scales_mux_tags_in_use"), 0);
  EXPECT_EQ(SumGauge(stats, "scales_pool_waiters"), 0);
  // Connections above the low watermark (1 per endpoint per event loop) close once idle.
  auto until = std::chrono::steady_clock::now() + 5s;
  while (std::chrono::steady_clock::now() < until && SumGauge(stats, "scales_pool_size") > kLoops * 3) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_LE(SumGauge(stats, "scales_pool_size"), kLoops * 3) << "connections leaked";
}

// Options every test client shares: two loops, its own registry, a quick resurrector, and
// pooled connections that close soon after the load stops (so the counts can be checked).
template <class Options>
Options TestOptions(const char* name, stats::StatsRegistry& stats) {
  Options o;
  o.client.name = name;
  o.client.runtime = MakeRuntime(kLoops);
  o.client.stats = &stats;
  o.client.timeout = 5s;
  o.resurrector.initial_backoff = 50ms;
  o.resurrector.max_backoff = 300ms;
  if constexpr (requires { o.pool.idle_timeout; }) o.pool.idle_timeout = 500ms;
  return o;
}

// Starts three servers with `make()` and returns the tcp:// URI naming them.
template <class Server, class Make>
std::string StartThree(std::vector<std::unique_ptr<Server>>& servers, Make make) {
  std::string uri = "tcp://";
  for (int i = 0; i < 3; ++i) {
    servers.push_back(make(i));
    uri += (i ? "," : "") + servers.back()->endpoint();
  }
  return uri;
}

constexpr int kCallers = 64;
constexpr auto kRunFor = 7000ms;
constexpr auto kKillEvery = 1500ms;
constexpr auto kDownFor = 600ms;

TEST(RecoveryTest, HttpThreeNginxOneKilledAtATime) {
  std::vector<std::unique_ptr<test::NginxServer>> servers;
  const std::string uri = StartThree(servers, [](int i) {
    return std::make_unique<test::NginxServer>("n" + std::to_string(i));
  });
  stats::StatsRegistry stats;
  auto o = TestOptions<http::HttpOptions>("recovery-http", stats);
  auto client = Http::NewClient(uri, o);
  {
    LoadRun run(kCallers, [&](LoadRun::Done done) {
      auto info = std::make_shared<CallInfo>();
      CallOptions opts;
      opts.idempotent = true;
      opts.info = info.get();
      http::Request req;
      req.method = "GET";
      req.target = "/";
      client.AsyncSend(std::move(req), opts, [info, done](error_code ec, http::Response r) {
        if (!ec && r.status != 200) ec = make_error_code(Errc::kHttpError);
        done(ec, info->endpoint, info->detail);
      });
    });
    KillAndRestart(servers.size(), kKillEvery, kDownFor, kRunFor, [&](size_t i) { servers[i]->Stop(); },
                   [&](size_t i) { servers[i]->Restart(); });
    ExpectRecovered(run, stats, kCallers);
  }
  client.Close();
}

// `scales testserver thrift` (Apache Thrift's threaded server) on a fixed port, restartable.
class ThriftToolServer {
 public:
  // `extra`: more arguments for `scales testserver thrift` (e.g. "--transport", "buffered").
  explicit ThriftToolServer(std::vector<std::string> extra = {})
      : port_(test::FreeTcpPort()), extra_(std::move(extra)) {
    Start();
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }
  void Kill() {
    if (process_) process_->Kill();
    process_.reset();
    hold_ = test::PortHold(port_);
  }
  void Start() {
    hold_.Release();
    auto until = std::chrono::steady_clock::now() + 5s;
    for (;;) {
      std::vector<std::string> args = {test::ToolPath(), "testserver", "thrift", "--port",
                                       std::to_string(port_)};
      args.insert(args.end(), extra_.begin(), extra_.end());
      process_ = std::make_unique<test::ChildProcess>(args);
      auto line = process_->ReadLine(5s);
      if (line && line->find("listening") != std::string::npos) return;
      process_.reset();
      if (std::chrono::steady_clock::now() > until) throw std::runtime_error("thrift test server did not start");
      std::this_thread::sleep_for(50ms);
    }
  }

 private:
  int port_;
  std::vector<std::string> extra_;
  std::unique_ptr<test::ChildProcess> process_;
  test::PortHold hold_;  // while killed
};

// Starts an echo call on a Thrift or ThriftMux client, reporting its endpoint.
template <class Client>
void StartEcho(const Client& client, LoadRun::Done done, bool idempotent = true,
               std::string message = "hello") {
  struct Call {
    CallInfo info;
  };
  auto call = std::make_shared<Call>();
  CallOptions opts;
  opts.idempotent = idempotent;
  opts.info = &call->info;
  SCALES_THRIFT_CALL(client.WithOptions(opts), echo, message,
                     [call, done, message](std::exception_ptr e, std::string reply) {
                       error_code ec;
                       std::string detail;
                       if (e) {
                         try {
                           std::rethrow_exception(e);
                         } catch (const Error& err) {
                           ec = err.scales_code();
                           detail = err.what();
                         } catch (const std::exception& err) {
                           ec = make_error_code(Errc::kServerError);
                           detail = err.what();
                         }
                       } else if (reply != message) {
                         ec = make_error_code(Errc::kProtocolError);
                         detail =
                             "wrong reply: " + reply.substr(0, 40) + " to " + message.substr(0, 40);
                       }
                       done(ec, call->info.endpoint, detail);
                     });
}

TEST(RecoveryTest, ThriftThreeServersOneKilledAtATime) {
  std::vector<std::unique_ptr<ThriftToolServer>> servers;
  const std::string uri = StartThree(servers, [](int) {
    return std::make_unique<ThriftToolServer>();
  });
  stats::StatsRegistry stats;
  auto o = TestOptions<thrift::ThriftOptions>("recovery-thrift", stats);
  auto client = Thrift::NewClient<EchoClient>(uri, o);
  {
    LoadRun run(kCallers, [&](LoadRun::Done done) { StartEcho(client, std::move(done)); });
    KillAndRestart(servers.size(), kKillEvery, kDownFor, kRunFor, [&](size_t i) { servers[i]->Kill(); },
                   [&](size_t i) { servers[i]->Start(); });
    ExpectRecovered(run, stats, kCallers);
  }
  client.Close();
}

thriftmux::ThriftMuxOptions MuxOptions(const char* name, stats::StatsRegistry& stats) {
  return TestOptions<thriftmux::ThriftMuxOptions>(name, stats);
}

TEST(RecoveryTest, ThriftMuxThreeServersOneKilledAtATime) {
  std::vector<std::unique_ptr<test::MuxReferenceServer>> servers;
  const std::string uri = StartThree(servers, [](int) {
    return std::make_unique<test::MuxReferenceServer>(std::vector<std::string>{"--mode", "finagle"});
  });
  stats::StatsRegistry stats;
  auto client = ThriftMux::NewClient<EchoClient>(uri, MuxOptions("recovery-tmux", stats));
  {
    LoadRun run(kCallers, [&](LoadRun::Done done) { StartEcho(client, std::move(done)); });
    KillAndRestart(servers.size(), kKillEvery, kDownFor, kRunFor, [&](size_t i) { servers[i]->Stop(); },
                   [&](size_t i) { servers[i]->Restart(); });
    ExpectRecovered(run, stats, kCallers);
  }
  client.Close();
}

// Faulty connections: three FaultProxy instances in front of one real server cut every
// connection at a random byte, either way (FIN or RST), and deliver chunks in pieces, while 16
// callers each send a payload of their own (up to 3 KiB). Every call completes exactly once; a
// call that succeeds has its own payload back (a reply handed to another call would show); a
// failure is one a broken connection explains, never a protocol error (the proxy alters no
// byte: a stream cut short is not a malformed one); once the faults stop, every call succeeds
// again and nothing is left pending.
constexpr int kFaultCallers = 16;
constexpr auto kFaultRunFor = 2000ms;  // at least; then until enough calls and faults

// Waits at least `min`, then until `done()` or `max` passed.
void RunUntil(std::chrono::milliseconds min, std::chrono::milliseconds max,
              const std::function<bool()>& done) {
  const auto start = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(min);
  while (!done() && std::chrono::steady_clock::now() - start < max)
    std::this_thread::sleep_for(50ms);
}

// Call `id`'s payload: its number, then a filler of its own length (under 3 KiB), fit for a URI.
std::string Payload(uint64_t id) {
  std::string s = "c" + std::to_string(id) + "-";
  const size_t filler = (id * 2654435761u) % 3000;
  for (size_t i = 0; i < filler; ++i) s += static_cast<char>('a' + (id + i) % 26);
  return s;
}

// GET /uri/<payload> from nginx, which answers with the target: the call's own payload back.
void StartUriEcho(const http::HttpClient& client, uint64_t id, LoadRun::Done done) {
  auto info = std::make_shared<CallInfo>();
  CallOptions opts;
  opts.idempotent = true;
  opts.info = info.get();
  http::Request req;
  req.method = "GET";
  req.target = "/uri/" + Payload(id);
  client.AsyncSend(req, opts, [info, done, target = req.target](error_code ec, http::Response r) {
    std::string detail = info->detail;
    if (!ec && (r.status != 200 || r.body != target)) {
      ec = make_error_code(Errc::kProtocolError);
      detail = "wrong reply: " + std::to_string(r.status) + " " + r.body.substr(0, 40) + " to " +
               target.substr(0, 40);
    }
    done(ec, info->endpoint, detail);
  });
}

// Every connection cut within 64 KiB (a few dozen calls), a third of the chunks in pieces.
test::FaultProxy::Faults Cutting() {
  test::FaultProxy::Faults faults;
  faults.cut = 1.0;
  faults.cut_within = 65536;
  faults.split = 0.3;
  faults.pause = 200us;
  return faults;
}

// Every connection cut within 64 KiB as above, or, for half of them, stalled one way there:
// open, carrying nothing, as across a network partition. (Stalling only some connections and
// leaving the rest alone, a client ends up on healthy ones only, a Mux client within seconds.)
test::FaultProxy::Faults Stalling() {
  test::FaultProxy::Faults faults = Cutting();
  faults.stall = 0.5;
  return faults;
}

// Starts of calls with payloads of their own, for RunThroughFaultyProxies: an echo through a
// Thrift or ThriftMux client, or a GET /uri/... through an HTTP client.
template <class Client>
std::function<void(uint64_t, LoadRun::Done)> PayloadEcho(const Client& client) {
  return [&client](uint64_t id, LoadRun::Done done) {
    StartEcho(client, std::move(done), true, Payload(id));
  };
}
std::function<void(uint64_t, LoadRun::Done)> UriEcho(const http::HttpClient& client) {
  return [&client](uint64_t id, LoadRun::Done done) { StartUriEcho(client, id, std::move(done)); };
}

class FaultyProxies {
 public:
  explicit FaultyProxies(int upstream_port, const test::FaultProxy::Faults& faults = Cutting()) {
    for (uint64_t i = 0; i < 3; ++i) {
      proxies_.push_back(std::make_unique<test::FaultProxy>(upstream_port, 1000 + i));
      proxies_.back()->SetFaults(faults);
    }
  }
  std::string uri() const {
    std::string uri = "tcp://";
    for (const auto& p : proxies_) uri += (uri.size() > 6 ? "," : "") + p->endpoint();
    return uri;
  }
  void Calm() {
    for (auto& p : proxies_) p->Calm();
  }
  int64_t cuts() const {
    int64_t n = 0;
    for (const auto& p : proxies_) n += p->cuts();
    return n;
  }
  int64_t stalls() const {
    int64_t n = 0;
    for (const auto& p : proxies_) n += p->stalls();
    return n;
  }
  int64_t corruptions() const {
    int64_t n = 0;
    for (const auto& p : proxies_) n += p->corruptions();
    return n;
  }
  int64_t connections() const {
    int64_t n = 0;
    for (const auto& p : proxies_) n += p->connections();
    return n;
  }

 private:
  std::vector<std::unique_ptr<test::FaultProxy>> proxies_;
};

// What a run through faulty proxies may fail with, and how many of its calls must succeed.
struct FaultExpectations {
  std::set<std::string> explained = {"connection_closed", "not_sent", "connect_failed",
                                     "failed_fast", "retry_budget_exhausted"};
  double min_ok = 0.9;
  // What the proxies do: cut every connection (Cutting()), or stall some of them (Stalling()),
  // or alter bytes of the replies (Corrupting()).
  enum class Fault { kCut, kStall, kCorrupt } fault = Fault::kCut;
  // tls_failed is explained too, from a TLS handshake only (an altered ServerHello or, in TLS
  // 1.2, certificate fails as a wrong set-up would), never for a record that failed its check (a
  // connect failure); never after it (in a Mux handshake, once open).
  bool handshake_tls_failures = false;
};

// Runs `start(id, done)` from kFaultCallers callers through faulty proxies, then calm ones, and
// checks the outcome.
void RunThroughFaultyProxies(FaultyProxies& proxies, const stats::StatsRegistry& stats,
                             const std::function<void(uint64_t, LoadRun::Done)>& start,
                             const FaultExpectations& expect = {}) {
  std::atomic<uint64_t> next_id{0};
  auto start_next = [&](LoadRun::Done done) { start(next_id.fetch_add(1), std::move(done)); };
  {
    LoadRun run(kFaultCallers, start_next);
    // Until enough calls and faults, however fast the build (sanitizers) runs them.
    using Fault = FaultExpectations::Fault;
    const auto faults = [&] {
      switch (expect.fault) {
        case Fault::kCut:
          return proxies.cuts();
        case Fault::kStall:
          return proxies.stalls();
        case Fault::kCorrupt:
          return proxies.corruptions();
      }
      return int64_t{0};
    };
    const int64_t faults_wanted = expect.fault == Fault::kStall ? 4 : 30;
    RunUntil(kFaultRunFor, 30s,
             [&] { return run.tally.started.load() >= 1000 && faults() >= faults_wanted; });
    run.Stop();
    ASSERT_TRUE(run.Drain(30s)) << "calls did not complete: " << run.tally.Describe();
    const int64_t started = run.tally.started.load();
    EXPECT_EQ(run.tally.completed.load(), started) << run.tally.Describe();
    EXPECT_GT(started, 300) << run.tally.Describe();
    EXPECT_GE(faults(), expect.fault == Fault::kStall ? 3 : 20)
        << "the faults did not bite (" << proxies.connections() << " connections)";
    if (expect.fault == Fault::kCut) {
      EXPECT_GT(SumCounter(stats, "scales_retries"), 0) << "no retry ran";
    }
    // A broken connection explains these; a protocol error or a wrong reply it does not.
    for (const auto& [name, count] : run.tally.errors) {
      if (name == "tls_failed" && expect.handshake_tls_failures) {
        for (const std::string& detail : run.tally.details[name]) {
          EXPECT_NE(detail.find("TLS handshake with"), std::string::npos)
              << "tls_failed after the TLS handshake: " << detail;
          EXPECT_EQ(detail.find("bad record mac"), std::string::npos)
              << "a record that failed its check is a broken connection: " << detail;
          EXPECT_EQ(detail.find("cipher operation failed"), std::string::npos)
              << "a record that failed its check is a broken connection: " << detail;
        }
        continue;
      }
      EXPECT_TRUE(expect.explained.count(name))
          << count << " calls failed with " << name << ": " << run.tally.Describe();
    }
    EXPECT_GE(static_cast<double>(run.tally.ok.load()),
              expect.min_ok * static_cast<double>(started))
        << run.tally.Describe();
  }
  // Calm: every call succeeds again, once the endpoints marked down meanwhile had their next
  // reconnect (after the resurrector's backoff, at most 300 ms here; until then their calls fail
  // fast, and when every endpoint was down, as when every connection is cut in its handshake,
  // every call does).
  proxies.Calm();
  std::this_thread::sleep_for(1s);
  {
    LoadRun run(kFaultCallers, start_next);
    RunUntil(500ms, 20s, [&] { return run.tally.started.load() >= 200; });
    run.Stop();
    ASSERT_TRUE(run.Drain(30s)) << "calls did not complete: " << run.tally.Describe();
    EXPECT_GT(run.tally.started.load(), 50) << run.tally.Describe();
    EXPECT_EQ(run.tally.ok.load(), run.tally.started.load()) << run.tally.Describe();
  }
  EXPECT_EQ(SumGauge(stats, "scales_pending"), 0);
  EXPECT_EQ(SumGauge(stats, "scales_pool_waiters"), 0);
  if (expect.fault != FaultExpectations::Fault::kCorrupt) {
    EXPECT_EQ(SumGauge(stats, "scales_mux_tags_in_use"), 0);
  } else {
    // A Mux reply whose tag was altered leaves its request's tag held (the request timed out,
    // its Tdiscarded reached a server that had answered it and so sends nothing back: as in
    // Finagle, the tag is kept until the session closes, at most max_discarded_tags of them).
    // One altered byte holds at most one tag.
    EXPECT_LE(SumGauge(stats, "scales_mux_tags_in_use"), proxies.corruptions());
  }
}

// One run through three faulty proxies in front of a real server of each protocol: the faults,
// what the run may fail with, whether the client speaks TLS (the test CA's certificate on the
// server); `tweak` adjusts the client's options, `after` checks the client's metrics once the
// run is over.
struct FaultRun {
  const char* name;
  test::FaultProxy::Faults faults = Cutting();
  FaultExpectations expect = {};
  bool tls = false;
};
template <class Options>
using Tweak = std::function<void(Options&)>;
using After = std::function<void(const stats::StatsRegistry&)>;

void TrustTestCa(TlsOptions& tls) {
  tls.enabled = true;
  tls.ca_file = testing::TestCa().ca_file;
}

// HTTP (GET /uri/...) to nginx.
void RunHttp(const FaultRun& r, const Tweak<http::HttpOptions>& tweak = {},
             const After& after = {}) {
  const auto& ca = testing::TestCa();
  auto nginx = r.tls ? std::make_unique<test::NginxServer>(
                           r.name, test::NginxTls{ca.server_cert, ca.server_key, {}})
                     : std::make_unique<test::NginxServer>(r.name);
  FaultyProxies proxies(nginx->port(), r.faults);
  stats::StatsRegistry stats;
  auto o = TestOptions<http::HttpOptions>(r.name, stats);
  if (r.tls) TrustTestCa(o.transport.tls);
  if (tweak) tweak(o);
  auto client = Http::NewClient(proxies.uri(), o);
  RunThroughFaultyProxies(proxies, stats, UriEcho(client), r.expect);
  if (after) after(stats);
  client.Close();
}

// Thrift echo to Apache Thrift's server (`scales testserver thrift`, more arguments in
// `server_args`; TLS: TSSLServerSocket).
void RunThrift(const FaultRun& r, std::vector<std::string> server_args = {},
               const Tweak<thrift::ThriftOptions>& tweak = {}) {
  const auto& ca = testing::TestCa();
  if (r.tls)
    server_args.insert(server_args.end(),
                       {"--tls-cert", ca.server_cert, "--tls-key", ca.server_key});
  ThriftToolServer server(server_args);
  FaultyProxies proxies(server.port(), r.faults);
  stats::StatsRegistry stats;
  auto o = TestOptions<thrift::ThriftOptions>(r.name, stats);
  if (r.tls) TrustTestCa(o.transport.tls);
  if (tweak) tweak(o);
  auto client = Thrift::NewClient<EchoClient>(proxies.uri(), o);
  RunThroughFaultyProxies(proxies, stats, PayloadEcho(client), r.expect);
  client.Close();
}

// ThriftMux echo to the Mux reference server in Finagle's mode.
void RunThriftMux(const FaultRun& r, const Tweak<thriftmux::ThriftMuxOptions>& tweak = {},
                  const After& after = {}) {
  const auto& ca = testing::TestCa();
  std::vector<std::string> args = {"--mode", "finagle"};
  if (r.tls) {
    for (auto& a : test::MuxReferenceServer::TlsArgs("first-byte", ca.server_cert, ca.server_key))
      args.push_back(a);
  }
  test::MuxReferenceServer server(args);
  FaultyProxies proxies(server.port(), r.faults);
  stats::StatsRegistry stats;
  auto o = MuxOptions(r.name, stats);
  if (r.tls) TrustTestCa(o.session.tls);
  if (tweak) tweak(o);
  auto client = ThriftMux::NewClient<EchoClient>(proxies.uri(), o);
  RunThroughFaultyProxies(proxies, stats, PayloadEcho(client), r.expect);
  if (after) after(stats);
  client.Close();
}

TEST(RecoveryTest, HttpThroughFaultyConnections) { RunHttp({.name = "faulty-http"}); }

// The same over TLS: a connection cut mid-record is a closed connection (retried), not a TLS
// failure, and a reset during a handshake is retried too.
TEST(RecoveryTest, HttpsThroughFaultyConnections) {
  RunHttp({.name = "faulty-https", .tls = true});
}

TEST(RecoveryTest, ThriftThroughFaultyConnections) { RunThrift({.name = "faulty-thrift"}); }

// Framed Thrift over TLS to Apache Thrift's TSSLServerSocket: a frame cut mid-record.
TEST(RecoveryTest, ThriftTlsThroughFaultyConnections) {
  RunThrift({.name = "faulty-thrift-tls", .tls = true});
}

// Unframed: the client finds each reply's end by parsing the compact protocol's stream, which
// the proxy cuts and splits anywhere.
TEST(RecoveryTest, BufferedCompactThriftThroughFaultyConnections) {
  RunThrift({.name = "faulty-thrift-buffered"},
            {"--transport", "buffered", "--protocol", "compact"}, [](thrift::ThriftOptions& o) {
              o.transport.framing = thrift::Framing::kBuffered;
              o.protocol = thrift::Protocol::kCompact;
            });
}

TEST(RecoveryTest, ThriftMuxThroughFaultyConnections) { RunThriftMux({.name = "faulty-tmux"}); }

TEST(RecoveryTest, ThriftMuxTlsThroughFaultyConnections) {
  RunThriftMux({.name = "faulty-tmux-tls", .tls = true});
}

// Every connection cut within its first 2 KiB either way: in the TLS handshake (the server's
// certificate alone is about 1 KiB), in the Mux handshake after it, or just after; few calls get
// through. Each attempt fails as a connection failure (a TLS handshake cut short is not a TLS
// failure), nothing waits for its timeout, and once the connections hold the client is back at
// once, however long its endpoints were failing.
test::FaultProxy::Faults CuttingHandshakes() {
  test::FaultProxy::Faults faults = Cutting();
  faults.cut_within = 2048;
  return faults;
}

FaultExpectations HandshakeCutExpectations() {
  FaultExpectations e;
  e.min_ok = 0;
  return e;
}

TEST(RecoveryTest, HttpsThroughConnectionsCutInTheirHandshakes) {
  RunHttp({"cut-handshakes-https", CuttingHandshakes(), HandshakeCutExpectations(), true});
}

TEST(RecoveryTest, ThriftMuxTlsThroughConnectionsCutInTheirHandshakes) {
  RunThriftMux({"cut-handshakes-tmux-tls", CuttingHandshakes(), HandshakeCutExpectations(), true});
}

// Stalled connections (open, carrying nothing one way, as across a network partition): the
// calls on them end at their deadline, a stalled Mux session is closed by its pings' timeout,
// and the replies that arrive once the stall ends, long after their calls, go nowhere.
FaultExpectations StallExpectations() {
  FaultExpectations e;
  e.explained.insert("request_timeout");
  e.min_ok = 0.8;
  e.fault = FaultExpectations::Fault::kStall;
  return e;
}

// Calls end at 500 ms; an endpoint failure accrual marks dead (the requests of a stalled
// session fail together) comes back within a second, to stall again.
template <class Options>
void ForStalls(Options& o) {
  o.client.timeout = 500ms;
  o.failure_accrual->min_backoff = 200ms;
  o.failure_accrual->max_backoff = 1s;
}

// ForStalls, and for ThriftMux pings that find a stalled session within 300 ms.
void ForStallsMux(thriftmux::ThriftMuxOptions& o) {
  ForStalls(o);
  o.session.ping_interval = 100ms;
  o.session.ping_timeout = 300ms;
}

TEST(RecoveryTest, HttpThroughStallingConnections) {
  RunHttp({"stalling-http", Stalling(), StallExpectations()}, ForStalls<http::HttpOptions>);
}

TEST(RecoveryTest, ThriftThroughStallingConnections) {
  RunThrift({"stalling-thrift", Stalling(), StallExpectations()}, {},
            ForStalls<thrift::ThriftOptions>);
}

TEST(RecoveryTest, ThriftMuxThroughStallingConnections) {
  RunThriftMux({"stalling-tmux", Stalling(), StallExpectations()}, ForStallsMux,
               [](const stats::StatsRegistry& stats) {
                 EXPECT_GT(SumCounter(stats, "scales_mux_ping_timeouts"), 0) << stats.ToText();
               });
}

// Backup requests through stalling connections: a call whose first attempt stalls is sent
// again after 50 ms to another endpoint (a backup avoids its first attempt's), and the attempt
// that loses is cancelled (a Tdiscarded on a Mux session, the connection closed for HTTP) while
// the proxies cut and stall what the backups and cancellations travel on too.
BackupRequestOptions Backups() {
  BackupRequestOptions b;
  b.percentile = 0.1;
  b.max_extra_load = 0.5;
  b.min_send_backup_after = 50ms;
  b.refresh_interval = 100ms;
  b.budget_min_per_sec = 100;
  return b;
}

// Backups won (and so calls a stalled first attempt would have failed).
void ExpectBackupsWon(const stats::StatsRegistry& stats) {
  EXPECT_GT(SumCounter(stats, "scales_backup_requests_sent"), 0) << stats.ToText();
  EXPECT_GT(SumCounter(stats, "scales_backup_requests_won"), 0) << stats.ToText();
}

TEST(RecoveryTest, HttpWithBackupsThroughStallingConnections) {
  RunHttp(
      {"stalling-http-backups", Stalling(), StallExpectations()},
      [](http::HttpOptions& o) {
        ForStalls(o);
        o.backup = Backups();
      },
      ExpectBackupsWon);
}

TEST(RecoveryTest, ThriftMuxWithBackupsThroughStallingConnections) {
  RunThriftMux(
      {"stalling-tmux-backups", Stalling(), StallExpectations()},
      [](thriftmux::ThriftMuxOptions& o) {
        ForStallsMux(o);
        o.backup = Backups();
      },
      ExpectBackupsWon);
}

// Replies with a byte altered now and then (one chunk from the server in 50), so that the
// parsers and sessions meet garbage anywhere: in a length, a tag, a header, a body. A garbled
// reply fails its call with a protocol error (or, altered in the payload, is a wrong reply,
// which the test counts as one too), a length made larger leaves its calls to their timeout or
// the session to its pings; every call completes once, nothing crashes (the sanitizer builds run
// this too) or hangs, and once the bytes are clean every call succeeds.
test::FaultProxy::Faults Corrupting() {
  test::FaultProxy::Faults faults;
  faults.corrupt = 0.02;
  faults.split = 0.3;
  faults.pause = 200us;
  return faults;
}

FaultExpectations CorruptionExpectations() {
  FaultExpectations e;
  // A length made over the limit is response_too_large; a Mux reply's status byte altered is a
  // server error or a Nack.
  e.explained.insert({"protocol_error", "request_timeout", "response_too_large", "server_error",
                      "nack", "non_retryable_nack"});
  e.min_ok = 0.5;
  e.fault = FaultExpectations::Fault::kCorrupt;
  return e;
}

TEST(RecoveryTest, HttpThroughCorruptingConnections) {
  RunHttp({"corrupting-http", Corrupting(), CorruptionExpectations()},
          ForStalls<http::HttpOptions>);
}

TEST(RecoveryTest, ThriftThroughCorruptingConnections) {
  RunThrift({"corrupting-thrift", Corrupting(), CorruptionExpectations()}, {},
            ForStalls<thrift::ThriftOptions>);
}

// An Rinit whose length was made larger, but not over mux::kMaxHandshakeFrameSize (an altered low
// byte), leaves its session opening until connect_timeout (5 s by default): 500 ms here, so that
// no such session is still opening when the calm run starts.
TEST(RecoveryTest, ThriftMuxThroughCorruptingConnections) {
  RunThriftMux({"corrupting-tmux", Corrupting(), CorruptionExpectations()},
               [](thriftmux::ThriftMuxOptions& o) {
                 ForStallsMux(o);
                 o.session.connect_timeout = 500ms;
               });
}

// Over TLS every altered byte fails its record's integrity check. After the TLS handshake (in a
// Mux handshake, or once open) that breaks the connection (a closed connection, retried for
// these idempotent calls, OpenSSL's reason in the detail), never a TLS failure (which says the
// endpoint's TLS set-up is wrong): it was kTlsFailed, so calls failed for good. In the TLS
// handshake too a record that fails its check is a broken connection (a connect failure); what
// else an altered handshake byte causes may be TLS's verdict (a ServerHello altered in its
// version or cipher, a certificate altered in TLS 1.2, which sends it in the clear, fail as a
// wrong set-up would). No reply is wrong.
FaultExpectations TlsCorruptionExpectations() {
  FaultExpectations e = CorruptionExpectations();
  e.handshake_tls_failures = true;
  return e;
}

TEST(RecoveryTest, HttpsThroughCorruptingConnections) {
  RunHttp({"corrupting-https", Corrupting(), TlsCorruptionExpectations(), true},
          ForStalls<http::HttpOptions>);
}

TEST(RecoveryTest, ThriftTlsThroughCorruptingConnections) {
  RunThrift({"corrupting-thrift-tls", Corrupting(), TlsCorruptionExpectations(), true}, {},
            ForStalls<thrift::ThriftOptions>);
}

TEST(RecoveryTest, ThriftMuxTlsThroughCorruptingConnections) {
  RunThriftMux({"corrupting-tmux-tls", Corrupting(), TlsCorruptionExpectations(), true},
               ForStallsMux);
}

// Requests with a byte altered now and then on the way to the server (one chunk from the client
// in 50): nginx, Apache Thrift's server and the Mux reference server meet garbage in a request
// line or header, a frame length, a method name, a tag, a message type, a payload. Each answers
// what it got (an echo of the altered payload is a wrong reply, counted as a protocol error),
// refuses it (nginx's 400 is an http_error, an unknown method a server error), closes the
// connection, or waits for bytes that never come (a length made larger: the call's timeout, or
// for a Tinit the session's connect_timeout). Every call completes once, and once the bytes are
// clean every call succeeds.
test::FaultProxy::Faults CorruptingRequests() {
  test::FaultProxy::Faults faults = Corrupting();
  std::swap(faults.corrupt, faults.corrupt_requests);
  return faults;
}

FaultExpectations RequestCorruptionExpectations() {
  FaultExpectations e = CorruptionExpectations();
  e.explained.insert("http_error");  // nginx's 400 Bad Request (raise_on_http_error)
  // A Tinit altered in its length leaves the server waiting for the rest, and the session's open
  // to connect_timeout.
  e.explained.insert("connect_timeout");
  return e;
}

TEST(RecoveryTest, HttpWithRequestsCorruptedOnTheWay) {
  RunHttp({"corrupted-requests-http", CorruptingRequests(), RequestCorruptionExpectations()},
          ForStalls<http::HttpOptions>);
}

TEST(RecoveryTest, ThriftWithRequestsCorruptedOnTheWay) {
  RunThrift({"corrupted-requests-thrift", CorruptingRequests(), RequestCorruptionExpectations()},
            {}, ForStalls<thrift::ThriftOptions>);
}

TEST(RecoveryTest, ThriftMuxWithRequestsCorruptedOnTheWay) {
  RunThriftMux({"corrupted-requests-tmux", CorruptingRequests(), RequestCorruptionExpectations()},
               [](thriftmux::ThriftMuxOptions& o) {
                 ForStallsMux(o);
                 o.session.connect_timeout = 500ms;
               });
}

TEST(RecoveryTest, SlowServerGetsLittleTrafficUnderP2CPeakEwma) {
  test::MuxReferenceServer fast_a({"--mode", "finagle"});
  test::MuxReferenceServer fast_b({"--mode", "finagle"});
  test::MuxReferenceServer slow({"--mode", "finagle", "--delay", "40"});
  stats::StatsRegistry stats;
  auto o = MuxOptions("ewma", stats);
  o.balancer.kind = BalancerKind::kP2CPeakEwma;
  o.failure_accrual.reset();  // slowness only: nothing fails
  auto client = ThriftMux::NewClient<EchoClient>(
      "tcp://" + fast_a.endpoint() + "," + fast_b.endpoint() + "," + slow.endpoint(), o);
  LoadRun run(8, [&](LoadRun::Done done) { StartEcho(client, std::move(done)); });
  std::this_thread::sleep_for(3s);
  run.Stop();
  ASSERT_TRUE(run.Drain(10s)) << run.tally.Describe();
  EXPECT_EQ(run.tally.ok.load(), run.tally.started.load()) << run.tally.Describe();
  std::lock_guard<std::mutex> lock(run.tally.mu);
  const int64_t to_slow = run.tally.endpoints[slow.endpoint()];
  const int64_t total = run.tally.ok.load();
  ASSERT_GT(total, 200) << run.tally.Describe();
  // Round robin would give it a third; least-outstanding P2C still a large share.
  EXPECT_LT(to_slow * 20, total) << "the slow server got " << to_slow << " of " << total;
  EXPECT_GT(to_slow, 0) << "the slow server was never probed";
}

TEST(RecoveryTest, FailingServerIsEjectedThenRevived) {
  test::MuxReferenceServer good({"--mode", "finagle"});
  test::MuxReferenceServer bad({"--mode", "finagle", "--fail-all"});
  stats::StatsRegistry stats;
  auto o = MuxOptions("accrual", stats);
  o.balancer.kind = BalancerKind::kP2C;
  o.retry.reset();  // count each failure once
  o.failure_accrual->min_backoff = 300ms;
  o.failure_accrual->max_backoff = 600ms;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + good.endpoint() + "," + bad.endpoint(), o);

  LoadRun run(4, [&](LoadRun::Done done) { StartEcho(client, std::move(done)); });
  std::this_thread::sleep_for(2s);
  const int64_t removals = SumCounter(stats, "scales_failure_accrual_removals", bad.endpoint());
  EXPECT_GE(removals, 1) << run.tally.Describe();
  EXPECT_EQ(SumCounter(stats, "scales_failure_accrual_removals", good.endpoint()), 0);
  {
    // Ejected: the failing server gets only probes (one per backoff per event loop), so
    // nearly every call succeeds.
    std::lock_guard<std::mutex> lock(run.tally.mu);
    int64_t failed = run.tally.completed.load() - run.tally.ok.load();
    EXPECT_LT(failed * 20, run.tally.completed.load()) << run.tally.first_error;
  }
  // The server recovers (same port, no longer failing): the next probe succeeds and the
  // endpoint is revived.
  bad.Restart({"--mode", "finagle"});
  int64_t before = 0;
  {
    std::lock_guard<std::mutex> lock(run.tally.mu);
    before = run.tally.endpoints[bad.endpoint()];
    EXPECT_EQ(before, 0) << "a call to the failing server succeeded";
  }
  auto until = std::chrono::steady_clock::now() + 8s;
  while (std::chrono::steady_clock::now() < until &&
         SumCounter(stats, "scales_failure_accrual_revivals", bad.endpoint()) == 0) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_GE(SumCounter(stats, "scales_failure_accrual_revivals", bad.endpoint()), 1);
  std::this_thread::sleep_for(1s);
  run.Stop();
  ASSERT_TRUE(run.Drain(10s)) << run.tally.Describe();
  std::lock_guard<std::mutex> lock(run.tally.mu);
  EXPECT_GT(run.tally.endpoints[bad.endpoint()], before + 10) << "the revived server gets traffic again";
  client.Close();
}

// A server that refuses every call with a retryable Nack (an overloaded or shutting-down
// Finagle server) while another is healthy. Under light load the aperture holds one member per
// loop; failure accrual ignored Nacks, so the refusing member was never ejected, the aperture
// never widened, and every retry came back to it: all calls failed with the healthy server
// beside it. Nacks count as failures (as in Finagle): the refusing server is ejected and the
// calls go to the healthy one.
TEST(RecoveryTest, AServerThatNacksEverythingIsEjected) {
  test::MuxReferenceServer nacking({"--mode", "finagle", "--fail-all", "--fail-flags", "3"});
  test::MuxReferenceServer good({"--mode", "finagle"});
  stats::StatsRegistry stats;
  auto o = MuxOptions("nacking", stats);
  o.client.runtime = MakeRuntime(1);
  auto endpoint = [](const test::MuxReferenceServer& s) {
    return Endpoint{"127.0.0.1", static_cast<uint16_t>(std::stoi(s.endpoint().substr(s.endpoint().rfind(':') + 1)))};
  };
  // The refusing server first, alone: it is the aperture's member when the healthy one joins.
  auto set = std::make_shared<StaticServerSet>(ServerSet::Members{endpoint(nacking)});
  o.client.server_set = set;
  auto client = ThriftMux::NewClient<EchoClient>("", o);
  set->Update({endpoint(nacking), endpoint(good)});
  int ok = 0;
  std::string first_error;
  for (int i = 0; i < 50; ++i) {
    try {
      std::string r;
      client->echo(r, "call " + std::to_string(i));
      ok += r == "call " + std::to_string(i);
    } catch (const Error& e) {
      if (first_error.empty()) first_error = e.what();
    }
  }
  EXPECT_GE(ok, 45) << first_error;
  EXPECT_GE(SumCounter(stats, "scales_failure_accrual_removals", nacking.endpoint()), 1);
  client.Close();
}

// --- faults across the whole stack --------------------------------------------------------

// Sockets open in this process (the client's connections; the runtime's own descriptors are
// not sockets).
int OpenFds() {
  int n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd", ec)) {
    std::error_code lec;
    n += std::filesystem::read_symlink(e.path(), lec).string().starts_with("socket:");
  }
  return n;
}

// Polls `cond` every 10 ms until it holds or `timeout` passed; returns whether it held.
bool WaitFor(std::chrono::milliseconds timeout, const std::function<bool()>& cond) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

// The server drains the session (Tdrain) while calls are in flight on it, as a server that
// recycles its connections does, and goes on accepting new ones. The draining session refuses
// new requests (a retryable kNack) and finishes its own; with one endpoint every retry came back
// to it, so every call made during the drain failed ("is draining ... all 3 attempts used"),
// although a new session would have taken it. New calls go to a new session; the calls in
// flight on the old one still get their replies, and the old session then closes.
TEST(RecoveryTest, MuxCallsDuringADrainGoToANewSession) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  const int sockets = OpenFds();
  stats::StatsRegistry stats;
  auto o = MuxOptions("drain", stats);
  o.client.runtime = MakeRuntime(1);  // one session to drain
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
  std::string r;
  client->echo(r, "warm-up");
  std::vector<std::future<std::string>> slow;
  for (int i = 0; i < 4; ++i) slow.push_back(SCALES_THRIFT_CALL(client, sleep, int32_t{800}, boost::asio::use_future));
  ASSERT_TRUE(WaitFor(5s, [&] { return SumGauge(stats, "scales_mux_tags_in_use") == 4; }));
  client->echo(r, "drain");  // answered, then Tdrain: the 4 slow calls keep the session draining
  ASSERT_TRUE(server.WaitForLog({"recv Rdrain"})) << server.Log();
  for (int i = 0; i < 10; ++i) {
    try {
      client->echo(r, "during the drain " + std::to_string(i));
      EXPECT_EQ(r, "during the drain " + std::to_string(i));
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
    }
  }
  for (auto& f : slow) {
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
    EXPECT_EQ(f.get(), "800");
  }
  // The drained session closes once its calls are answered: one connection is left.
  EXPECT_TRUE(WaitFor(3s, [&] { return OpenFds() == sockets + 1; })) << OpenFds() - sockets << " sockets";
  EXPECT_EQ(SumGauge(stats, "scales_mux_tags_in_use"), 0);
  EXPECT_EQ(SumGauge(stats, "scales_pending"), 0);
  client.Close();
  EXPECT_TRUE(WaitFor(3s, [&] { return OpenFds() == sockets; })) << OpenFds() - sockets << " sockets";
}

// A server that stops reading: the client's Tdispatches fill the socket buffers, then queue in
// the session behind the write that cannot finish. When the server resets the connection, a
// request still queued never left the process: it fails with kNotSent (retryable), not
// kConnectionClosed, so the retry sink sends it again (on a new session here) even though the
// call is not idempotent; so is one the reset cut mid-write (the server cannot have received it
// whole); requests written in whole are not retried.
struct StalledRun {
  std::vector<error_code> codes;     // the large calls' outcomes, in call order
  std::vector<std::string> details;  // their error messages
  error_code stall_code;             // the "stall" call's outcome
};

// `calls` calls of `payload_size` bytes each (24 MiB in all by default: far more than the socket
// buffers hold).
StalledRun RunAgainstAStalledServer(bool retries, stats::StatsRegistry& stats, int calls = 48,
                                    size_t payload_size = 512 * 1024) {
  const int kCalls = calls;
  const std::string payload(payload_size, 'p');
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto o = MuxOptions(retries ? "stalled-retry" : "stalled", stats);
  o.client.runtime = MakeRuntime(1);
  o.client.timeout = 30s;
  if (!retries) o.retry.reset();
  o.failure_accrual.reset();  // the codes and the retries only: the one endpoint stays in use
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
  std::string r;
  client->echo(r, "warm-up");  // the session is open

  auto outcome = [](std::exception_ptr e) -> std::pair<error_code, std::string> {
    if (!e) return {};
    try {
      std::rethrow_exception(e);
    } catch (const Error& err) {
      return {err.scales_code(), err.what()};
    } catch (const std::exception& err) {
      return {make_error_code(Errc::kServerError), err.what()};
    }
  };
  std::promise<error_code> stalled;
  SCALES_THRIFT_CALL(client, echo, std::string("stall"), [&](std::exception_ptr e, std::string) {
    stalled.set_value(outcome(e).first);
  });
  EXPECT_TRUE(server.WaitForLog({"stall tag="})) << server.Log();  // it reads nothing more from here on
  const int64_t sent_before = SumCounter(stats, "scales_bytes_sent");
  std::vector<std::promise<std::pair<error_code, std::string>>> done(kCalls);
  for (int i = 0; i < kCalls; ++i) {
    SCALES_THRIFT_CALL(client, echo, payload, [&, i](std::exception_ptr e, std::string) {
      done[i].set_value(outcome(e));
    });
  }
  // Every call is on the session (a tag each) before the reset.
  auto until = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < until && SumGauge(stats, "scales_mux_tags_in_use") < kCalls + 1) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(SumGauge(stats, "scales_mux_tags_in_use"), kCalls + 1);
  // And the socket has taken some of them (the session writes once the tags are given out).
  EXPECT_TRUE(WaitFor(20s, [&] { return SumCounter(stats, "scales_bytes_sent") - sent_before >= (1 << 20); }));
  {
    thriftmux::ThriftMuxOptions ro;
    ro.client.name = "resetter";
    auto resetter = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), ro);
    resetter->echo(r, "reset-stalled");
    EXPECT_EQ(r, "reset 1");
    resetter.Close();
  }
  StalledRun run;
  auto f = stalled.get_future();
  EXPECT_EQ(f.wait_for(20s), std::future_status::ready);
  if (f.valid()) run.stall_code = f.get();
  for (auto& d : done) {
    auto fd = d.get_future();
    if (fd.wait_for(20s) != std::future_status::ready) {
      ADD_FAILURE() << "a call did not complete";
      run.codes.push_back(make_error_code(Errc::kRequestTimeout));
      run.details.emplace_back("did not complete");
      continue;
    }
    auto [ec, detail] = fd.get();
    run.codes.push_back(ec);
    run.details.push_back(detail);
  }
  client->echo(r, "after");  // a new session
  EXPECT_EQ(r, "after");
  client.Close();
  return run;
}

TEST(RecoveryTest, MuxRequestsQueuedBehindAStalledWriteFailAsNotSent) {
  stats::StatsRegistry stats;
  StalledRun run = RunAgainstAStalledServer(/*retries=*/false, stats);
  EXPECT_EQ(run.stall_code, Errc::kConnectionClosed) << ErrorName(run.stall_code);
  int not_sent = 0, closed = 0;
  for (size_t i = 0; i < run.codes.size(); ++i) {
    if (run.codes[i] == Errc::kNotSent) {
      ++not_sent;
      EXPECT_NE(run.details[i].find("not sent"), std::string::npos) << run.details[i];
      EXPECT_NE(run.details[i].find("127.0.0.1:"), std::string::npos) << run.details[i];
    } else {
      // Written in whole before the reset: the server may have seen it.
      EXPECT_EQ(run.codes[i], Errc::kConnectionClosed) << i << ": " << run.details[i];
      ++closed;
      // Requests are written in order: a written one never follows one that was not.
      EXPECT_EQ(not_sent, 0) << "call " << i << " was written after a call that was not";
    }
  }
  // The socket buffers of loopback hold a few MiB: most of the 24 MiB stayed queued.
  EXPECT_GE(not_sent, static_cast<int>(run.codes.size()) / 2) << closed << " written";
}

// One request larger than the socket buffers hold: the reset cuts it mid-write. The server
// never received it whole (a Mux server handles a request once its last byte has come), so it
// fails as not sent, which the retry sink may send again; it used to fail as kConnectionClosed.
TEST(RecoveryTest, MuxRequestCutMidWriteFailsAsNotSent) {
  stats::StatsRegistry stats;
  StalledRun run = RunAgainstAStalledServer(/*retries=*/false, stats, 1, 24u << 20);
  ASSERT_EQ(run.codes.size(), 1u);
  EXPECT_EQ(run.codes[0], Errc::kNotSent) << run.details[0];
  EXPECT_NE(run.details[0].find("the request was cut mid-write (the server cannot have received it whole), not sent"),
            std::string::npos)
      << run.details[0];
}

TEST(RecoveryTest, MuxRequestsQueuedBehindAStalledWriteAreRetried) {
  stats::StatsRegistry stats;
  StalledRun run = RunAgainstAStalledServer(/*retries=*/true, stats);
  int ok = 0;
  for (size_t i = 0; i < run.codes.size(); ++i) {
    if (!run.codes[i]) {
      ++ok;
    } else {
      EXPECT_EQ(run.codes[i], Errc::kConnectionClosed) << i << ": " << run.details[i];
    }
  }
  // Not idempotent: only the requests that never left (kNotSent) could be retried, and they
  // succeed on the next session (the server never read any of these calls, so a success is a retry).
  EXPECT_GE(ok, static_cast<int>(run.codes.size()) / 2);
  EXPECT_GE(SumCounter(stats, "scales_retries"), ok);
}

// For ThreadSanitizer (the concurrency stage): threads outside the client call through the
// default stack (retry, aperture, failure accrual, resurrector) on two event loops while a
// server restarts, with a small pending limit so that rejections race with completions too.
TEST(ConcurrencyRecoveryTest, ThreadsCallWhileAServerRestarts) {
  test::MuxReferenceServer a({"--mode", "finagle"});
  test::MuxReferenceServer b({"--mode", "finagle"});
  stats::StatsRegistry stats;
  auto o = MuxOptions("concurrency", stats);
  o.client.max_pending = 6;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + a.endpoint() + "," + b.endpoint(), o);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> ok{0}, rejected{0}, other{0}, done{0}, started{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        std::atomic<int> in_flight{0};
        for (int k = 0; k < 4; ++k) {
          started.fetch_add(1);
          in_flight.fetch_add(1);
          StartEcho(client, [&](const error_code& ec, const std::string&, const std::string&) {
            if (!ec) {
              ok.fetch_add(1);
            } else if (ec == Errc::kTooManyPending) {
              rejected.fetch_add(1);
            } else {
              other.fetch_add(1);
            }
            done.fetch_add(1);
            in_flight.fetch_sub(1);
          });
        }
        while (in_flight.load() > 0) std::this_thread::sleep_for(1ms);
      }
    });
  }
  std::this_thread::sleep_for(800ms);
  b.Stop();
  std::this_thread::sleep_for(400ms);
  b.Restart();
  std::this_thread::sleep_for(800ms);
  stop.store(true);
  for (auto& t : threads) t.join();
  EXPECT_EQ(done.load(), started.load());
  EXPECT_GT(ok.load(), 50);
  EXPECT_GT(rejected.load(), 0) << "16 callers never passed a limit of 6";
  EXPECT_LT(other.load() * 100, done.load()) << "too many failures besides the limit";
  EXPECT_EQ(SumGauge(stats, "scales_pending"), 0);
  client.Close();
}

// For ThreadSanitizer: two ThriftMux clients share a runtime that the test lets go at once.
// Threads outside the clients start calls on copies of the handles; the first client's last
// handle goes inside a completion handler on its loop (which starts one more call from there
// first), the second is closed from two threads at once while the calls are being started.
// Every call completes exactly once, the calls of the first client's handlers succeed, and the
// runtime goes (destroyed on one of its own loops, or on a thread that released the last handle).
TEST(ConcurrencyRecoveryTest, MuxHandlesReleasedInHandlersAndClosedFromTwoThreads) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  constexpr int kThreads = 3, kCalls = 30;
  struct Counts {
    std::vector<std::atomic<int>> completions = std::vector<std::atomic<int>>(kThreads * kCalls * 3);
    std::atomic<int> completed{0}, first_ok{0}, closes{0}, late_not_closed{0};
  };
  auto counts = std::make_shared<Counts>();
  auto count = [counts](int id) {
    return [counts, id](const error_code&, const std::string&, const std::string&) {
      counts->completions[id]++;
      counts->completed++;
    };
  };
  std::weak_ptr<Runtime> weak_runtime;
  {
    // The default registry: the runtime may end on a thread of its own, after this test.
    auto o = TestOptions<thriftmux::ThriftMuxOptions>("mux-handles", stats::StatsRegistry::Default());
    weak_runtime = o.client.runtime;
    auto released = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    o.client.name = "mux-closed";
    auto closed = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    o.client.runtime.reset();  // the clients hold it
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([=, released = released, closed = closed]() mutable {
        std::thread closer;
        for (int i = 0; i < kCalls; ++i) {
          const int id = (t * kCalls + i) * 3;
          StartEcho(released, [=, client = released](const error_code& ec, const std::string& e,
                                                     const std::string& d) mutable {
            StartEcho(client, count(id + 1));  // from the client's loop
            client = {};                        // maybe its last handle
            if (!ec) counts->first_ok++;
            count(id)(ec, e, d);
          });
          const bool after_close = counts->closes.load() == 2;
          StartEcho(closed, [=](const error_code& ec, const std::string& e, const std::string& d) {
            if (after_close && ec != Errc::kClientClosed) counts->late_not_closed++;
            count(id + 2)(ec, e, d);
          });
          if (t == 0 && i == kCalls / 3) {
            closer = std::thread([closed, counts] {
              closed.Close();
              counts->closes++;
            });
            closed.Close();
            counts->closes++;
          }
        }
        if (closer.joinable()) closer.join();
      });
    }
    for (auto& th : threads) th.join();
  }
  const int total = kThreads * kCalls * 3;
  ASSERT_TRUE(WaitFor(10s, [&] { return counts->completed.load() == total; }))
      << counts->completed.load() << " of " << total << " calls completed";
  for (int i = 0; i < total; ++i) EXPECT_EQ(counts->completions[i].load(), 1) << "call " << i;
  EXPECT_EQ(counts->first_ok.load(), kThreads * kCalls);
  EXPECT_EQ(counts->late_not_closed.load(), 0);
  EXPECT_TRUE(WaitFor(5s, [&] { return weak_runtime.expired(); })) << "the runtime was not released";
}

}  // namespace
}  // namespace scales
