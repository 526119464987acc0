// bench_soak: the soak benchmark (docs/soak.md; not part of CI). Mixed HTTP, framed Thrift and
// ThriftMux traffic for --minutes against three local servers of each protocol (two nginx and
// one `scales testserver http`; `scales testserver thrift`; `scales testserver thriftmux`),
// which the clients find through zk:// server sets in a local ZooKeeper (Debian's package, the
// test fixture). Every minute runs the same churn cycle: servers crashed (SIGKILL; nginx gets
// SIGTERM, its fast shutdown) and restarted, members removed and added back, a member with
// nothing listening added and removed, a server crashing together with its member, and
// ZooKeeper itself restarted.
//
// At the end of every minute the load pauses until every call completed (a quiet point) and
// the driver samples: resident memory, open descriptors and threads of this process; the
// clients' connections, Mux tags in use and pending calls (from the stats registry, the same
// gauges /metrics exports); calls done/ok/failed per protocol in the minute. The load runs on
// after the last minute until Close(), so that Close() fails calls in flight; then it counts the
// calls that never completed (issued - completed, after Close()) and judges the run; see
// docs/soak.md for the checks. Exit status: 0 all checks passed, 1 a check failed, 2 the harness
// failed (a server would not start, bad flags).
//
//   bench_soak [--minutes 10] [--rate 200] [--json FILE] [--seed 1] [--max-outstanding 200]
//              [--rss-slack-mib 4] [--fd-slack 2]
#include <unistd.h>
#include <zookeeper/zookeeper.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "Echo.h"
#include "bench_util.h"
#include "scales/discovery/serverset_member.h"
#include "scales/http/client.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/fixtures.h"
#include "support/zookeeper_fixture.h"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using scales::error_code;
namespace test = scales::test;

// Every call's deadline; a quiet point waits this long plus a margin for the last calls.
constexpr auto kCallTimeout = 2s;
// 3 % of the calls ask for a reply after kSlowReplyMs with a deadline of kSlowTimeout, so timeouts
// (a Thrift connection closed, a Mux Tdiscarded and its tag held until Rdiscarded, an HTTP
// connection closed) happen all the time, not only when a server dies.
constexpr double kSlowShare = 0.03;
constexpr int kSlowReplyMs = 1000;
constexpr auto kSlowTimeout = 300ms;
constexpr auto kMinute = 60s;
constexpr auto kQuietAt = 57s;      // the load pauses here; the minute's sample follows
constexpr auto kMaxBehind = 100ms;  // LoadLoop(): calls later than this are skipped
constexpr int kServersPerProtocol = 3;
// A membership change must reach every client's balancer within this (ExpectMembers()).
constexpr auto kMembershipWait = 2s;
// After Close(), how long the driver still counts completions before judging: a call that
// Close() fails although it had completed already (a double completion) is completed on its
// event loop a moment after Close() returns.
constexpr auto kCloseSettle = 1s;
// At the end the load runs on until every protocol has calls in flight (this long at most), and
// the clients are closed at that moment.
constexpr auto kCloseInFlightWait = 10s;
// Event loops of the clients' runtime.
constexpr int64_t kLoops = 2;

std::atomic<bool> g_interrupted{false};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---------------------------------------------------------------------------------------------
// The servers.

// `scales testserver thrift|thriftmux` in a child process. Crash() is SIGKILL; Restart() starts
// it again on the same port, retrying while the port is still taken. Its stderr goes to `log`.
class ToolServer {
 public:
  ToolServer(std::string kind, std::filesystem::path log) : kind_(std::move(kind)), log_(log) {
    Start();
  }
  int port() const { return port_; }
  void Crash() {
    if (process_) process_->Kill();
    process_.reset();
  }
  void Restart() {
    Crash();
    Start();
  }

 private:
  void Start() {
    auto until = Clock::now() + 5s;
    for (;;) {
      // Through sh only to send stderr to the log, so that whatever a server complains about
      // while the churn kills its clients' connections stays out of the churn log.
      auto process = std::make_unique<test::ChildProcess>(std::vector<std::string>{
          "/bin/sh", "-c", "exec \"$0\" \"$@\" 2>>" + log_.string(), test::ToolPath(), "testserver",
          kind_, "--port", std::to_string(port_)});
      auto line = process->ReadLine(10s);
      if (line && line->starts_with("listening 127.0.0.1:")) {
        port_ = std::stoi(line->substr(line->rfind(':') + 1));
        process_ = std::move(process);
        return;
      }
      process->Kill();
      if (port_ == 0 || Clock::now() > until) {
        throw std::runtime_error(fmt::format(
            "scales testserver {} did not start on port {}; see {}", kind_, port_, log_.string()));
      }
      std::this_thread::sleep_for(100ms);
    }
  }

  std::string kind_;
  std::filesystem::path log_;
  int port_ = 0;
  std::unique_ptr<test::ChildProcess> process_;
};

// One server of a protocol, whatever runs it.
struct Server {
  std::string name;  // "thrift-1": also its member node, /soak/thrift/member_thrift-1
  int port = 0;
  std::function<void()> crash;
  std::function<void()> restart;
};

// ---------------------------------------------------------------------------------------------
// Members: written with the ZooKeeper C client on one session for the whole run (so the churn
// adds no sessions, threads or descriptors to the process it measures). Persistent nodes with
// fixed names: a create or delete retried after a connection loss is harmless, and they
// survive ZooKeeper's restarts.
class Members {
 public:
  explicit Members(std::string hosts) : hosts_(std::move(hosts)) { Connect(); }
  ~Members() {
    if (zh_) zookeeper_close(zh_);
  }
  Members(const Members&) = delete;
  Members& operator=(const Members&) = delete;

  void EnsurePath(const std::string& path) {
    std::string prefix;
    for (size_t slash = path.find('/', 1);; slash = path.find('/', slash + 1)) {
      prefix = path.substr(0, slash);
      Check(Retry([&] {
              return zoo_create(zh_, prefix.c_str(), "", 0, &ZOO_OPEN_ACL_UNSAFE, 0, nullptr, 0);
            }),
            "create", prefix, ZNODEEXISTS);
      if (slash == std::string::npos) break;
    }
  }
  // Registers 127.0.0.1:port as member `name` of the server set at `path`.
  void Add(const std::string& path, const std::string& name, int port) {
    scales::ServiceInstance instance;
    instance.service_endpoint = {"127.0.0.1", static_cast<uint16_t>(port)};
    std::string data = scales::SerializeServiceInstance(instance);
    std::string node = path + "/member_" + name;
    Check(Retry([&] {
            return zoo_create(zh_, node.c_str(), data.data(), static_cast<int>(data.size()),
                              &ZOO_OPEN_ACL_UNSAFE, 0, nullptr, 0);
          }),
          "create", node, ZNODEEXISTS);
  }
  void Remove(const std::string& path, const std::string& name) {
    std::string node = path + "/member_" + name;
    Check(Retry([&] { return zoo_delete(zh_, node.c_str(), -1); }), "delete", node, ZNONODE);
  }

 private:
  void Connect() {
    if (zh_) zookeeper_close(zh_);
    zh_ = zookeeper_init2(hosts_.c_str(), nullptr, 10000, nullptr, nullptr, 0, [](const char*) {});
    if (!zh_) throw std::runtime_error("zookeeper_init2 failed for " + hosts_);
  }
  // Runs `op` until it gets an answer from the ensemble (30 s at most): ZooKeeper restarts
  // every minute, and this session reconnects by itself (or is replaced if it expired).
  template <class F>
  int Retry(F op) {
    auto until = Clock::now() + 30s;
    for (;;) {
      if (zoo_state(zh_) == ZOO_EXPIRED_SESSION_STATE) Connect();
      int rc = zoo_state(zh_) == ZOO_CONNECTED_STATE ? op() : ZCONNECTIONLOSS;
      if ((rc != ZCONNECTIONLOSS && rc != ZOPERATIONTIMEOUT && rc != ZSESSIONEXPIRED &&
           rc != ZINVALIDSTATE) ||
          Clock::now() > until) {
        return rc;
      }
      std::this_thread::sleep_for(100ms);
    }
  }
  void Check(int rc, const char* what, const std::string& node, int benign) {
    if (rc != ZOK && rc != benign) {
      throw std::runtime_error(
          fmt::format("ZooKeeper {} {} at {}: {}", what, node, hosts_, zerror(rc)));
    }
  }

  std::string hosts_;
  zhandle_t* zh_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Calls, counted by the driver.

struct Calls;

// One call in flight. Its handler owns it (so `info`, which the client fills before the handler
// runs, stays valid) and calls Complete().
struct Call {
  Calls* calls = nullptr;
  scales::CallInfo info;
  std::atomic<bool> done{false};
  void Complete(error_code ec);
};
using CallPtr = std::shared_ptr<Call>;

// Calls per endpoint ("host:port"; "" when none was chosen).
struct EndpointCounts {
  int64_t ok = 0, failed = 0;
};

// One protocol's calls. Every call is made by NewCall(); its first completion counts it as ok or
// failed (by error name and by endpoint), any further one as a double completion.
struct Calls {
  std::atomic<int64_t> issued{0}, ok{0}, failed{0}, twice{0}, skipped{0};
  // At the end (Soak::CloseUnderLoad): the calls in flight when Close() began, and how many of
  // them Close() failed (client_closed) or still completed otherwise (a reply or a timeout that
  // raced Close()); read after the settle.
  int64_t in_flight_at_close = 0, closed_by_close = 0, completed_after_close = 0;
  int64_t completed_at_close = 0, client_closed_before = 0;  // CloseUnderLoad()'s baselines
  int64_t issued_at_close = 0;
  std::mutex mu;
  std::map<std::string, int64_t> errors;
  std::map<std::string, EndpointCounts> endpoints;

  CallPtr NewCall() {
    issued.fetch_add(1);
    auto call = std::make_shared<Call>();
    call->calls = this;
    return call;
  }
  void Completed(const Call& call, error_code ec) {
    {
      std::lock_guard lock(mu);
      EndpointCounts& e = endpoints[call.info.endpoint];
      ++(ec ? e.failed : e.ok);
      if (ec) ++errors[scales::ErrorName(ec)];
    }
    (ec ? failed : ok).fetch_add(1);
  }
  // Completions are read before `issued`, so the difference is never negative.
  int64_t Outstanding() const {
    int64_t completed = ok.load() + failed.load();
    return issued.load() - completed;
  }
  std::map<std::string, int64_t> Errors() {
    std::lock_guard lock(mu);
    return errors;
  }
  int64_t ClientClosed() {
    std::lock_guard lock(mu);
    auto it = errors.find(scales::ErrorName(scales::make_error_code(scales::Errc::kClientClosed)));
    return it == errors.end() ? 0 : it->second;
  }
  std::map<std::string, EndpointCounts> Endpoints() {
    std::lock_guard lock(mu);
    return endpoints;
  }
};

void Call::Complete(error_code ec) {
  if (done.exchange(true)) {
    calls->twice.fetch_add(1);
    return;
  }
  calls->Completed(*this, ec);
}

// A Thrift outcome as an error code: scales errors keep theirs; anything else the server
// answered counts as a server error (as `scales bench`).
error_code CodeOf(std::exception_ptr e) {
  if (!e) return {};
  try {
    std::rethrow_exception(e);
  } catch (const scales::Error& err) {
    return err.scales_code();
  } catch (...) {
    return scales::make_error_code(scales::Errc::kServerError);
  }
}

using EchoClient = scales::thrift::ThriftClient<scales::echo::EchoClient>;

// One protocol: its servers, its client, its calls.
struct Protocol {
  std::string name;
  std::string path;  // its server set: /soak/<name>
  std::vector<Server> servers;
  Calls calls;
  // Starts one call; `slow` asks for a reply after kSlowReplyMs with a kSlowTimeout deadline.
  std::function<void(bool slow, CallPtr call)> start;
  std::function<void()> close;
};

scales::CallOptions OptionsFor(bool slow, Call& call) {
  scales::CallOptions options;
  if (slow) options.timeout = kSlowTimeout;
  options.info = &call.info;
  return options;
}

void StartThriftCall(const EchoClient& client, bool slow, const std::string& payload,
                     CallPtr call) {
  auto c = client.WithOptions(OptionsFor(slow, *call));
  auto handler = [call = std::move(call)](std::exception_ptr e, std::string) {
    call->Complete(CodeOf(e));
  };
  if (slow) {
    SCALES_THRIFT_CALL(c, sleep, kSlowReplyMs, std::move(handler));
  } else {
    SCALES_THRIFT_CALL(c, echo, payload, std::move(handler));
  }
}

// ---------------------------------------------------------------------------------------------
// Samples.

struct ProcessSample {
  int64_t rss_kb = 0;
  int64_t threads = 0;
  int64_t fds = 0;
};

ProcessSample SampleProcess() {
  ProcessSample s;
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with("VmRSS:")) s.rss_kb = std::stoll(line.substr(6));
    if (line.starts_with("Threads:")) s.threads = std::stoll(line.substr(8));
  }
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++s.fds;
  }
  --s.fds;  // the iterator's own descriptor
  return s;
}

// The gauges of every client, summed over endpoints and event loops.
// One client's connections (scales_connections) and its pools' connections
// (scales_pool_size, open or connecting; WatermarkPool only) and idle ones; the endpoints in its
// balancer (scales_lb_size: the members it sees, those draining after a leave not counted).
struct ClientConnections {
  int64_t connections = 0, pool_size = 0, pool_idle = 0, lb_size = 0;
};

struct GaugeSample {
  int64_t pending = 0;
  int64_t tags = 0;
  int64_t connections = 0;
  std::map<std::string, ClientConnections> clients;  // by client name
};

GaugeSample SampleGauges(const scales::stats::StatsRegistry& registry) {
  GaugeSample g;
  for (const auto& m : registry.Snapshot()) {
    std::string client;
    for (auto& [key, value] : m.labels) {
      if (key == "client") client = value;
    }
    if (m.name == "scales_pending") g.pending += m.value;
    if (m.name == "scales_mux_tags_in_use") g.tags += m.value;
    if (m.name == "scales_connections") {
      g.connections += m.value;
      g.clients[client].connections += m.value;
    }
    if (m.name == "scales_pool_size") g.clients[client].pool_size += m.value;
    if (m.name == "scales_pool_idle") g.clients[client].pool_idle += m.value;
    if (m.name == "scales_lb_size") g.clients[client].lb_size += m.value;
  }
  return g;
}

std::string JsonClients(const std::map<std::string, ClientConnections>& clients) {
  std::string out;
  for (auto& [name, c] : clients) {
    out += fmt::format(
        "{}\"{}\": {{\"connections\": {}, \"pool_size\": {}, \"pool_idle\": {}, \"lb_size\": {}}}",
        out.empty() ? "" : ", ", name, c.connections, c.pool_size, c.pool_idle, c.lb_size);
  }
  return "{" + out + "}";
}

struct ProtocolMinute {
  int64_t done = 0, ok = 0, failed = 0;
};

struct MinuteRow {
  int minute = 0;
  double at_s = 0;
  ProcessSample process;
  GaugeSample quiet;  // at the quiet point
  GaugeSample peak;   // highest values sampled every second under load
  double peak_connections_at_s = 0;
  int64_t outstanding = 0;  // driver's count at the quiet point (0 unless a call outlived it)
  double quiet_wait_s = 0;
  std::vector<ProtocolMinute> protocols;
  std::vector<std::map<std::string, int64_t>> errors;          // per protocol, in this minute
  std::vector<std::map<std::string, EndpointCounts>> servers;  // per protocol, by server name
  int events = 0;
};

struct Check {
  std::string name;
  bool ok;
  std::string detail;
};

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", c);
      continue;
    }
    out += c;
  }
  return out + "\"";
}

// {"name": count, ...}
std::string JsonCounts(const std::map<std::string, int64_t>& counts) {
  std::string out;
  for (auto& [name, count] : counts) {
    out += fmt::format("{}{}: {}", out.empty() ? "" : ", ", JsonString(name), count);
  }
  return "{" + out + "}";
}

// {"http-0": {"ok": n, "failed": m}, ...}
std::string JsonServers(const std::map<std::string, EndpointCounts>& servers) {
  std::string out;
  for (auto& [name, c] : servers) {
    out += fmt::format("{}{}: {{\"ok\": {}, \"failed\": {}}}", out.empty() ? "" : ", ",
                       JsonString(name), c.ok, c.failed);
  }
  return "{" + out + "}";
}

// The calls per endpoint, keyed by server name ("http-0"); a member with nothing listening as
// "dead 127.0.0.1:<port>", calls that reached no endpoint as "(none)".
std::map<std::string, EndpointCounts> ByServer(Protocol& p) {
  std::map<std::string, EndpointCounts> out;
  for (auto& [endpoint, counts] : p.calls.Endpoints()) {
    std::string name = endpoint.empty() ? "(none)" : "dead " + endpoint;
    for (auto& s : p.servers) {
      if (endpoint == fmt::format("127.0.0.1:{}", s.port)) name = s.name;
    }
    out[name].ok += counts.ok;
    out[name].failed += counts.failed;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

class Soak {
 public:
  struct Options {
    int minutes = 10;
    double rate = 200;  // calls per second per protocol
    int64_t max_outstanding = 200;
    uint64_t seed = 1;
    int64_t busy_poll_us = 0;  // RuntimeOptions::busy_poll
    int64_t rss_slack_kb = 4 * 1024;
    int64_t fd_slack = 2;
    std::string json;
  };

  explicit Soak(Options options) : options_(std::move(options)) {}
  int Run();

 private:
  void StartServers();
  void StartClients();
  void LoadLoop();
  // The quiet point's handshake with LoadLoop: once SetPaused(true) returns, the load thread
  // is not between its check and its calls, and no call starts until SetPaused(false).
  void SetPaused(bool paused);
  std::vector<std::pair<std::chrono::seconds, std::function<void()>>> MinuteEvents(int minute);
  void Event(const std::string& what, const std::function<void()>& action);
  // Waits (kMembershipWait at most) until every client's balancer holds `expected` endpoints
  // (scales_lb_size), so that a membership change that never reaches a client fails the run.
  void ExpectMembers(int64_t expected);
  // Sleeps until `until`, sampling the gauges every second into `peak`.
  void WaitUntil(Clock::time_point until, GaugeSample& peak);
  int64_t Outstanding() const;
  // Logs the failures of the last second other than the intended timeouts of slow calls.
  void LogFailures();
  // Waits (until `deadline`) for no outstanding call, no pending call and no tag in use.
  bool WaitQuiet(Clock::time_point deadline);
  // The end of the run: with the load still running, waits (kCloseInFlightWait at most) for a
  // moment when every protocol has calls in flight, pauses the load there and closes every
  // client, then stops the load and waits for the completions Close() causes.
  void CloseUnderLoad(std::thread& load);
  void PrintHeader() const;
  void PrintRow(const MinuteRow& row, int64_t first_rss_kb) const;
  std::vector<Check> Judge(const std::vector<MinuteRow>& rows, const GaugeSample& final_quiet);
  // False (and a message) when the file cannot be written.
  bool WriteJson(const std::vector<MinuteRow>& rows, const GaugeSample& final_quiet,
                 const std::vector<Check>& checks, bool pass) const;

  Options options_;
  std::filesystem::path dir_;
  Clock::time_point t0_ = Clock::now();
  int harness_errors_ = 0;
  int membership_changes_ = 0, membership_misses_ = 0;  // ExpectMembers()
  std::map<std::string, int64_t> logged_failures_;      // LogFailures(): counts already logged
  double peak_connections_at_ = 0;                      // WaitUntil(): when the minute's peak was

  std::unique_ptr<test::ZooKeeperServer> zk_;
  std::unique_ptr<Members> members_;
  std::vector<std::unique_ptr<test::NginxServer>> nginx_;
  std::unique_ptr<test::TestHttpServer> http_server_;
  std::vector<std::unique_ptr<ToolServer>> tool_servers_;
  std::vector<std::unique_ptr<Protocol>> protocols_;

  // Declared after the servers so that they are destroyed first; the registry before the
  // runtime, which it must outlive.
  scales::stats::StatsRegistry registry_;
  std::shared_ptr<scales::Runtime> runtime_;
  std::optional<scales::http::HttpClient> http_client_;
  std::optional<EchoClient> thrift_client_, mux_client_;

  // LoadLoop checks paused_ and issues its calls under load_mu_ (SetPaused).
  std::mutex load_mu_;
  bool paused_ = false;  // guarded by load_mu_
  std::atomic<bool> stop_load_{false};
};

void Soak::StartServers() {
  zk_ = std::make_unique<test::ZooKeeperServer>();
  members_ = std::make_unique<Members>(zk_->connect_string());

  auto http = std::make_unique<Protocol>();
  http->name = "http";
  for (int i = 0; i < 2; ++i) {
    auto* n =
        nginx_.emplace_back(std::make_unique<test::NginxServer>(fmt::format("http-{}", i))).get();
    http->servers.push_back({n->name(), n->port(), [n] { n->Stop(); }, [n] { n->Restart(); }});
  }
  // Answers /delay/N late (nginx does not), so HTTP has slow calls too.
  http_server_ = std::make_unique<test::TestHttpServer>("http-2");
  auto* hs = http_server_.get();
  http->servers.push_back({"http-2", hs->port(), [hs] { hs->Kill(); }, [hs] { hs->Restart(); }});
  protocols_.push_back(std::move(http));

  for (std::string kind : {"thrift", "thriftmux"}) {
    auto p = std::make_unique<Protocol>();
    p->name = kind;
    for (int i = 0; i < kServersPerProtocol; ++i) {
      auto* s =
          tool_servers_.emplace_back(std::make_unique<ToolServer>(kind, dir_ / (kind + ".stderr")))
              .get();
      p->servers.push_back(
          {fmt::format("{}-{}", kind, i), s->port(), [s] { s->Crash(); }, [s] { s->Restart(); }});
    }
    protocols_.push_back(std::move(p));
  }
  for (auto& p : protocols_) {
    p->path = "/soak/" + p->name;
    members_->EnsurePath(p->path);
    for (auto& s : p->servers) members_->Add(p->path, s.name, s.port);
  }
}

void Soak::StartClients() {
  scales::RuntimeOptions runtime_options;
  runtime_options.threads = kLoops;
  runtime_options.seed = options_.seed;
  runtime_options.busy_poll = std::chrono::microseconds(options_.busy_poll_us);
  runtime_ = std::make_shared<scales::Runtime>(runtime_options);
  auto client_options = [&](const std::string& name) {
    scales::ClientOptions o;
    o.name = "soak-" + name;
    o.timeout = kCallTimeout;
    o.runtime = runtime_;
    o.stats = &registry_;
    return o;
  };
  auto uri = [&](const Protocol& p) { return zk_->Uri(p.path); };

  Protocol& http = *protocols_[0];
  scales::http::HttpOptions http_options;
  http_options.client = client_options("http");
  http_client_.emplace(scales::Http::NewClient(uri(http), http_options));
  http.start = [this](bool slow, CallPtr call) {
    scales::http::Request request;
    request.method = "GET";
    request.target = slow ? fmt::format("/delay/{}", kSlowReplyMs) : "/";
    scales::CallOptions options = OptionsFor(slow, *call);
    http_client_->AsyncSend(
        std::move(request), std::move(options),
        [call = std::move(call)](error_code ec, scales::http::Response) { call->Complete(ec); });
  };
  http.close = [this] { http_client_->Close(); };

  // Thrift and ThriftMux: the same Echo calls through either client.
  auto use = [](Protocol& p, std::optional<EchoClient>& slot, EchoClient client) {
    static const std::string payload(64, 'x');
    EchoClient* c = &slot.emplace(std::move(client));
    p.start = [c](bool slow, CallPtr call) { StartThriftCall(*c, slow, payload, std::move(call)); };
    p.close = [c] { c->Close(); };
  };
  scales::thrift::ThriftOptions thrift_options;
  thrift_options.client = client_options("thrift");
  use(*protocols_[1], thrift_client_,
      scales::Thrift::NewClient<scales::echo::EchoClient>(uri(*protocols_[1]), thrift_options));
  scales::thriftmux::ThriftMuxOptions mux_options;
  mux_options.client = client_options("thriftmux");
  use(*protocols_[2], mux_client_,
      scales::ThriftMux::NewClient<scales::echo::EchoClient>(uri(*protocols_[2]), mux_options));
}

// Paced open-loop load from one thread: `rate` calls per second per protocol, each protocol
// capped at max_outstanding calls in flight. Calls over the cap, and calls more than kMaxBehind
// late (this thread was not scheduled for a while: the machine is shared), are skipped and
// counted rather than sent in a burst, which would leave the pools with connections for a burst
// that the memory and descriptor samples would then have to tell from a leak.
void Soak::LoadLoop() {
  std::mt19937_64 rng(options_.seed);
  std::bernoulli_distribution slow(kSlowShare);
  std::vector<double> credit(protocols_.size(), 0.0);
  auto last = Clock::now();
  while (!stop_load_.load()) {
    std::this_thread::sleep_for(5ms);
    auto now = Clock::now();
    double dt = Seconds(now - last);
    last = now;
    // Held from the check to the last call issued: SetPaused(true) cannot return in between.
    std::lock_guard lock(load_mu_);
    if (paused_) continue;
    for (size_t i = 0; i < protocols_.size(); ++i) {
      Protocol& p = *protocols_[i];
      credit[i] += options_.rate * dt;
      if (double most = options_.rate * Seconds(kMaxBehind) + 1; credit[i] > most) {
        p.calls.skipped.fetch_add(static_cast<int64_t>(credit[i] - most));
        credit[i] = most;
      }
      for (; credit[i] >= 1; credit[i] -= 1) {
        if (p.calls.Outstanding() >= options_.max_outstanding) {
          p.calls.skipped.fetch_add(1);
          continue;
        }
        p.start(slow(rng), p.calls.NewCall());
      }
    }
  }
}

void Soak::SetPaused(bool paused) {
  std::lock_guard lock(load_mu_);
  paused_ = paused;
}

void Soak::Event(const std::string& what, const std::function<void()>& action) {
  std::fprintf(stderr, "[%7.1fs] %s\n", Seconds(Clock::now() - t0_), what.c_str());
  try {
    action();
  } catch (const std::exception& e) {
    ++harness_errors_;
    std::fprintf(stderr, "[%7.1fs] harness error: %s: %s\n", Seconds(Clock::now() - t0_),
                 what.c_str(), e.what());
  }
}

void Soak::ExpectMembers(int64_t expected) {
  ++membership_changes_;
  const auto begin = Clock::now();
  std::string seen;
  for (;;) {
    GaugeSample g = SampleGauges(registry_);
    bool all = true;
    seen.clear();
    for (auto& p : protocols_) {
      int64_t size = g.clients["soak-" + p->name].lb_size;
      all = all && size == expected;
      seen += fmt::format("{}soak-{} {}", seen.empty() ? "" : ", ", p->name, size);
    }
    if (all) {
      std::fprintf(stderr, "[%7.1fs]   the clients see %lld members (after %.2f s)\n",
                   Seconds(Clock::now() - t0_), static_cast<long long>(expected),
                   Seconds(Clock::now() - begin));
      return;
    }
    if (g_interrupted.load()) return;
    if (Clock::now() - begin >= kMembershipWait) break;
    std::this_thread::sleep_for(20ms);
  }
  ++membership_misses_;
  std::fprintf(stderr,
               "[%7.1fs]   membership not seen: expected %lld members within %.0f s, the "
               "clients' balancers have %s (scales_lb_size)\n",
               Seconds(Clock::now() - t0_), static_cast<long long>(expected),
               Seconds(kMembershipWait), seen.c_str());
}

// The churn of one minute. Server i is crashed and restarted, server j leaves and comes back
// while it keeps running, server k crashes and leaves at once (as an ephemeral member would) and
// comes back; i, j and k rotate so that every server takes every part.
std::vector<std::pair<std::chrono::seconds, std::function<void()>>> Soak::MinuteEvents(int minute) {
  const int i = minute % 3, j = (minute + 1) % 3, k = (minute + 2) % 3;
  std::vector<std::pair<std::chrono::seconds, std::function<void()>>> events;
  auto at = [&](int second, std::function<void()> f) {
    events.emplace_back(std::chrono::seconds(second), std::move(f));
  };
  auto each = [this](const std::function<void(Protocol&)>& f) {
    for (auto& p : protocols_) f(*p);
  };
  for (size_t n = 0; n < protocols_.size(); ++n) {
    Protocol* p = protocols_[n].get();
    Server* s = &p->servers[i];
    at(3 + 3 * static_cast<int>(n), [this, s] { Event("crash " + s->name, s->crash); });
    at(15 + 3 * static_cast<int>(n), [this, s] { Event("restart " + s->name, s->restart); });
  }
  at(24, [=, this] {
    each([&](Protocol& p) {
      Event("member leaves: " + p.servers[j].name,
            [&] { members_->Remove(p.path, p.servers[j].name); });
    });
    ExpectMembers(2);
  });
  auto dead_port = std::make_shared<int>(0);
  at(27, [=, this] {
    *dead_port = test::FreeTcpPort();
    each([&](Protocol& p) {
      Event(fmt::format("member joins: {}-dead (127.0.0.1:{}, nothing listening)", p.name,
                        *dead_port),
            [&] { members_->Add(p.path, p.name + "-dead", *dead_port); });
    });
    ExpectMembers(3);
  });
  at(33, [=, this] {
    each([&](Protocol& p) {
      Event("member joins: " + p.servers[j].name,
            [&] { members_->Add(p.path, p.servers[j].name, p.servers[j].port); });
    });
    ExpectMembers(4);
  });
  at(36, [=, this] {
    each([&](Protocol& p) {
      Event("member leaves: " + p.name + "-dead",
            [&] { members_->Remove(p.path, p.name + "-dead"); });
    });
    ExpectMembers(3);
  });
  at(39, [=, this] {
    each([&](Protocol& p) {
      Server& s = p.servers[k];
      Event("crash " + s.name + " and its member leaves", [&] {
        s.crash();
        members_->Remove(p.path, s.name);
      });
    });
    ExpectMembers(2);
  });
  at(45, [=, this] {
    each([&](Protocol& p) {
      Server& s = p.servers[k];
      Event("restart " + s.name + " and its member joins", [&] {
        s.restart();
        members_->Add(p.path, s.name, s.port);
      });
    });
    ExpectMembers(3);
  });
  at(48, [this] { Event("restart ZooKeeper", [this] { zk_->Restart(); }); });
  std::stable_sort(events.begin(), events.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  return events;
}

void Soak::WaitUntil(Clock::time_point until, GaugeSample& peak) {
  auto next_sample = Clock::now();
  while (!g_interrupted.load()) {
    auto now = Clock::now();
    if (now >= next_sample) {
      LogFailures();
      GaugeSample g = SampleGauges(registry_);
      peak.pending = std::max(peak.pending, g.pending);
      peak.tags = std::max(peak.tags, g.tags);
      if (g.connections > peak.connections) {
        // The clients' split at the moment of the most connections.
        peak.connections = g.connections;
        peak.clients = g.clients;
        peak_connections_at_ = Seconds(now - t0_);
      }
      next_sample = now + 1s;
    }
    if (now >= until) return;
    std::this_thread::sleep_for(std::min<Clock::duration>(100ms, until - now));
  }
}

void Soak::LogFailures() {
  std::string line;
  for (auto& p : protocols_) {
    for (auto& [name, count] : p->calls.Errors()) {
      int64_t& logged = logged_failures_[p->name + " " + name];
      if (count != logged && name != "request_timeout") {
        line += fmt::format(", {} {} +{}", p->name, name, count - logged);
      }
      logged = count;
    }
  }
  if (!line.empty()) {
    std::fprintf(stderr, "[%7.1fs]   failed: %s\n", Seconds(Clock::now() - t0_), line.c_str() + 2);
  }
}

int64_t Soak::Outstanding() const {
  int64_t n = 0;
  for (auto& p : protocols_) n += p->calls.Outstanding();
  return n;
}

bool Soak::WaitQuiet(Clock::time_point deadline) {
  for (;;) {
    GaugeSample g = SampleGauges(registry_);
    if (Outstanding() == 0 && g.pending == 0 && g.tags == 0) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(20ms);
  }
}

void Soak::CloseUnderLoad(std::thread& load) {
  const auto until = Clock::now() + kCloseInFlightWait;
  for (;;) {
    {
      // Under load_mu_, LoadLoop is between two batches: nothing starts between the count and
      // Close() once paused_ is set.
      std::lock_guard lock(load_mu_);
      bool all = true;
      for (auto& p : protocols_) all = all && p->calls.Outstanding() > 0;
      if (all || Clock::now() >= until || g_interrupted.load()) {
        paused_ = true;
        for (auto& p : protocols_) {
          Calls& c = p->calls;
          c.client_closed_before = c.ClientClosed();
          c.completed_at_close = c.ok.load() + c.failed.load();
          c.issued_at_close = c.issued.load();
          c.in_flight_at_close = c.issued_at_close - c.completed_at_close;
        }
        break;
      }
    }
    std::this_thread::sleep_for(2ms);
  }
  std::fprintf(stderr, "[%7.1fs] Close() with calls in flight:", Seconds(Clock::now() - t0_));
  for (auto& p : protocols_) {
    std::fprintf(stderr, " %s %lld", p->name.c_str(),
                 static_cast<long long>(p->calls.in_flight_at_close));
  }
  std::fprintf(stderr, "\n");
  for (auto& p : protocols_) p->close();
  stop_load_ = true;
  load.join();
  // Close() completes the calls on their event loops; a call that Close() completes a second
  // time is counted during the settle.
  auto until_done = Clock::now() + 5s;
  while (Outstanding() > 0 && Clock::now() < until_done) std::this_thread::sleep_for(20ms);
  std::this_thread::sleep_for(kCloseSettle);
  for (auto& p : protocols_) {
    Calls& c = p->calls;
    c.closed_by_close = c.ClientClosed() - c.client_closed_before;
    c.completed_after_close = c.ok.load() + c.failed.load() - c.completed_at_close;
  }
}

void Soak::PrintHeader() const {
  std::printf("%3s %7s %6s %4s %4s %5s %9s %9s %7s", "min", "rss_mib", "d_rss", "fds", "thr",
              "conns", "tags q/pk", "pend q/pk", "quiet_s");
  for (auto& p : protocols_) std::printf(" %24s", (p->name + " done/ok/failed").c_str());
  std::printf("\n");
  std::fflush(stdout);
}

void Soak::PrintRow(const MinuteRow& row, int64_t first_rss_kb) const {
  std::printf("%3d %7.1f %+6.1f %4lld %4lld %5lld %4lld/%-4lld %4lld/%-4lld %7.2f", row.minute,
              row.process.rss_kb / 1024.0, (row.process.rss_kb - first_rss_kb) / 1024.0,
              static_cast<long long>(row.process.fds), static_cast<long long>(row.process.threads),
              static_cast<long long>(row.quiet.connections), static_cast<long long>(row.quiet.tags),
              static_cast<long long>(row.peak.tags), static_cast<long long>(row.quiet.pending),
              static_cast<long long>(row.peak.pending), row.quiet_wait_s);
  for (auto& p : row.protocols) {
    std::printf(" %24s", fmt::format("{}/{}/{}", p.done, p.ok, p.failed).c_str());
  }
  std::printf("\n");
  std::fflush(stdout);
}

std::vector<Check> Soak::Judge(const std::vector<MinuteRow>& rows, const GaugeSample& final_quiet) {
  std::vector<Check> checks;
  auto add = [&](std::string name, bool ok, std::string detail) {
    checks.push_back({std::move(name), ok, std::move(detail)});
  };
  for (size_t n = 0; n < protocols_.size(); ++n) {
    const auto& p = protocols_[n];
    int64_t never = p->calls.Outstanding();
    add(p->name + ": every call completed", never == 0,
        fmt::format("issued {}, completed {}, never completed {}; {} in flight at Close(): {} "
                    "completed after it, {} of them failed by Close() (client_closed)",
                    p->calls.issued.load(), p->calls.ok.load() + p->calls.failed.load(), never,
                    p->calls.in_flight_at_close, p->calls.completed_after_close,
                    p->calls.closed_by_close));
    // The calls in flight when Close() began, each completed once since (Close() failed it, or
    // its reply or timeout won the race), and no call started after it: counted apart from the
    // run's other calls, which a miscount among them could hide.
    const Calls& c = p->calls;
    const int64_t issued_after_close = c.issued.load() - c.issued_at_close;
    add(p->name + ": calls in flight at Close() completed",
        c.completed_after_close == c.in_flight_at_close && issued_after_close == 0,
        fmt::format("{} in flight at Close(), {} completed after it ({} failed by Close() with "
                    "client_closed, the others by their reply or a timeout), {} started after it",
                    c.in_flight_at_close, c.completed_after_close, c.closed_by_close, issued_after_close));
    add(p->name + ": no call completed twice", p->calls.twice.load() == 0,
        fmt::format("{} double completions", p->calls.twice.load()));
    // The client's own counters agree with the driver's.
    scales::stats::Labels labels = {{"client", "soak-" + p->name}};
    auto counter = [&](const char* name) {
      auto* c = registry_.FindCounter(name, labels);
      return c ? c->value() : -1;
    };
    int64_t requests = counter("scales_requests"), successes = counter("scales_successes"),
            failures = counter("scales_failures");
    add(p->name + ": client counters match",
        requests == p->calls.issued.load() && successes == p->calls.ok.load() &&
            failures == p->calls.failed.load(),
        fmt::format("scales_requests {} (driver issued {}), scales_successes {} (ok {}), "
                    "scales_failures {} (failed {})",
                    requests, p->calls.issued.load(), successes, p->calls.ok.load(), failures,
                    p->calls.failed.load()));
    size_t ok_minutes = 0;
    for (auto& row : rows) ok_minutes += row.protocols[n].ok > 0 ? 1 : 0;
    add(p->name + ": traffic flowed every minute", ok_minutes == rows.size(),
        fmt::format("{} of {} minutes had successful calls", ok_minutes, rows.size()));
  }
  if (rows.empty()) {
    add("at least one minute ran", false, "interrupted before the first sample");
    return checks;
  }
  const MinuteRow& first = rows.front();
  const MinuteRow& last = rows.back();
  int64_t rss_slack = std::max(options_.rss_slack_kb, first.process.rss_kb / 10);
  add("memory flat", last.process.rss_kb - first.process.rss_kb <= rss_slack,
      fmt::format("VmRSS {:.1f} MiB after minute 1, {:.1f} MiB after minute {} (allowed +{:.1f} "
                  "MiB: max(--rss-slack-mib, 10 %))",
                  first.process.rss_kb / 1024.0, last.process.rss_kb / 1024.0, last.minute,
                  rss_slack / 1024.0));
  // The clients' connections at a quiet point follow the load of the last minute (a pool keeps
  // idle connections for its idle_timeout, 60 s); every other descriptor (ZooKeeper sessions,
  // event loops, pipes to the servers) must not change. The connections are checked apart:
  // each must belong to a pool.
  auto other = [](const MinuteRow& r) { return r.process.fds - r.quiet.connections; };
  add("descriptors flat (besides the clients' connections)",
      other(last) - other(first) <= options_.fd_slack,
      fmt::format("{} after minute 1, {} after minute {} (allowed +{}: --fd-slack); all "
                  "descriptors {} and {}",
                  other(first), other(last), last.minute, options_.fd_slack, first.process.fds,
                  last.process.fds));
  // HTTP and Thrift: every connection is in its endpoint's WatermarkPool (scales_pool_size
  // counts open and connecting ones). ThriftMux: one session per endpoint per event loop.
  std::string unaccounted;
  for (auto& row : rows) {
    for (auto& [client, c] : row.quiet.clients) {
      int64_t limit = client == "soak-thriftmux" ? kLoops * (kServersPerProtocol + 1) : c.pool_size;
      if (c.connections > limit) {
        unaccounted +=
            fmt::format("{}minute {}: {} has {} connections, at most {} expected",
                        unaccounted.empty() ? "" : "; ", row.minute, client, c.connections, limit);
      }
    }
  }
  add("connections accounted for by pools (every quiet point)", unaccounted.empty(),
      unaccounted.empty()
          ? fmt::format("{} connections after minute 1, {} after minute {}",
                        first.quiet.connections, last.quiet.connections, last.minute)
          : unaccounted);
  add("threads flat", last.process.threads <= first.process.threads,
      fmt::format("{} after minute 1, {} after minute {}", first.process.threads,
                  last.process.threads, last.minute));
  std::string tags_seen, pending_seen, outstanding_seen;
  bool tags_ok = final_quiet.tags == 0, pending_ok = final_quiet.pending == 0;
  for (auto& row : rows) {
    tags_ok = tags_ok && row.quiet.tags == 0;
    pending_ok = pending_ok && row.quiet.pending == 0 && row.outstanding == 0;
    tags_seen += fmt::format("{}{}", tags_seen.empty() ? "" : " ", row.quiet.tags);
    pending_seen += fmt::format("{}{}", pending_seen.empty() ? "" : " ", row.quiet.pending);
    outstanding_seen += fmt::format("{}{}", outstanding_seen.empty() ? "" : " ", row.outstanding);
  }
  add("Mux tags flat (0 at every quiet point)", tags_ok,
      fmt::format("per minute: {}; after Close(): {}", tags_seen, final_quiet.tags));
  add("pending flat (0 at every quiet point)", pending_ok,
      fmt::format(
          "per minute: {}; after Close(): {}; the driver's calls outstanding per minute: {}",
          pending_seen, final_quiet.pending, outstanding_seen));
  add("clients saw every membership change", membership_misses_ == 0,
      fmt::format("{} of {} changes not seen by every client's balancer within {:.0f} s "
                  "(scales_lb_size)",
                  membership_misses_, membership_changes_, Seconds(kMembershipWait)));
  add("harness", harness_errors_ == 0, fmt::format("{} churn steps failed", harness_errors_));
  add("ran to the end", !g_interrupted.load() && static_cast<int>(rows.size()) == options_.minutes,
      fmt::format("{} of {} minutes{}", rows.size(), options_.minutes,
                  g_interrupted.load() ? " (interrupted)" : ""));
  return checks;
}

bool Soak::WriteJson(const std::vector<MinuteRow>& rows, const GaugeSample& final_quiet,
                     const std::vector<Check>& checks, bool pass) const {
  std::string out = fmt::format(
      "{{\n  \"config\": {{\"minutes\": {}, \"rate_per_protocol\": {}, \"max_outstanding\": {}, "
      "\"seed\": {}, \"busy_poll_us\": {}, \"call_timeout_ms\": {}, \"slow_share\": {}, "
      "\"slow_timeout_ms\": {}, \"rss_slack_kib\": {}, \"fd_slack\": {}}},\n  \"minutes\": [",
      options_.minutes, options_.rate, options_.max_outstanding, options_.seed,
      options_.busy_poll_us, std::chrono::milliseconds(kCallTimeout).count(), kSlowShare,
      kSlowTimeout.count(), options_.rss_slack_kb, options_.fd_slack);
  for (size_t r = 0; r < rows.size(); ++r) {
    const MinuteRow& row = rows[r];
    out += fmt::format(
        "{}\n    {{\"minute\": {}, \"at_s\": {:.1f}, \"rss_kib\": {}, \"fds\": {}, "
        "\"threads\": {}, \"connections\": {}, \"mux_tags_in_use\": {}, \"pending\": {}, "
        "\"clients\": {}, \"peak_connections\": {}, \"peak_connections_at_s\": {:.1f}, "
        "\"peak_clients\": {}, \"peak_mux_tags_in_use\": {}, \"peak_pending\": {}, "
        "\"outstanding_at_quiet\": {}, \"quiet_wait_s\": {:.2f}, \"churn_events\": {}, "
        "\"protocols\": {{",
        r ? "," : "", row.minute, row.at_s, row.process.rss_kb, row.process.fds,
        row.process.threads, row.quiet.connections, row.quiet.tags, row.quiet.pending,
        JsonClients(row.quiet.clients), row.peak.connections, row.peak_connections_at_s,
        JsonClients(row.peak.clients), row.peak.tags, row.peak.pending, row.outstanding,
        row.quiet_wait_s, row.events);
    for (size_t n = 0; n < protocols_.size(); ++n) {
      const ProtocolMinute& p = row.protocols[n];
      out += fmt::format(
          "{}{}: {{\"done\": {}, \"ok\": {}, \"failed\": {}, \"errors\": {}, \"servers\": {}}}",
          n ? ", " : "", JsonString(protocols_[n]->name), p.done, p.ok, p.failed,
          JsonCounts(row.errors[n]), JsonServers(row.servers[n]));
    }
    out += "}}";
  }
  out += fmt::format(
      "\n  ],\n  \"final\": {{\"mux_tags_in_use\": {}, \"pending\": {}, \"protocols\": {{",
      final_quiet.tags, final_quiet.pending);
  for (size_t n = 0; n < protocols_.size(); ++n) {
    Calls& c = protocols_[n]->calls;
    out += fmt::format(
        "{}\n    {}: {{\"issued\": {}, \"ok\": {}, \"failed\": {}, \"never_completed\": {}, "
        "\"completed_twice\": {}, \"skipped\": {}, \"in_flight_at_close\": {}, "
        "\"completed_after_close\": {}, \"failed_by_close\": {}, \"errors\": {}, "
        "\"servers\": {}}}",
        n ? "," : "", JsonString(protocols_[n]->name), c.issued.load(), c.ok.load(),
        c.failed.load(), c.Outstanding(), c.twice.load(), c.skipped.load(), c.in_flight_at_close,
        c.completed_after_close, c.closed_by_close, JsonCounts(c.Errors()),
        JsonServers(ByServer(*protocols_[n])));
  }
  out += "\n  }},\n  \"checks\": [";
  for (size_t n = 0; n < checks.size(); ++n) {
    out += fmt::format("{}\n    {{\"name\": {}, \"ok\": {}, \"detail\": {}}}", n ? "," : "",
                       JsonString(checks[n].name), checks[n].ok ? "true" : "false",
                       JsonString(checks[n].detail));
  }
  out += fmt::format("\n  ],\n  \"verdict\": \"{}\"\n}}\n", pass ? "pass" : "fail");
  std::ofstream file(options_.json);
  file << out;
  file.close();
  if (!file) {
    std::fprintf(stderr, "bench_soak: cannot write --json %s: %s\n", options_.json.c_str(), std::strerror(errno));
    return false;
  }
  return true;
}

int Soak::Run() {
  dir_ = std::filesystem::temp_directory_path() / fmt::format("scales-soak-{}", getpid());
  std::filesystem::create_directories(dir_);
  std::fprintf(stderr, "bench_soak: starting ZooKeeper and %d servers per protocol (logs in %s)\n",
               kServersPerProtocol, dir_.c_str());
  StartServers();
  StartClients();
  std::fprintf(stderr, "bench_soak: %d minute(s), %.0f calls/s per protocol; churn on stderr\n",
               options_.minutes, options_.rate);
  PrintHeader();

  std::thread load([this] { LoadLoop(); });
  std::vector<MinuteRow> rows;
  std::vector<ProtocolMinute> previous(protocols_.size());
  std::vector<std::map<std::string, int64_t>> previous_errors(protocols_.size());
  std::vector<std::map<std::string, EndpointCounts>> previous_servers(protocols_.size());
  auto next_start = Clock::now();
  for (int m = 0; m < options_.minutes && !g_interrupted.load(); ++m) {
    // A minute that overran (a slow ZooKeeper restart) delays the next one.
    const auto start = std::max(next_start, Clock::now());
    next_start = start + kMinute;
    MinuteRow row;
    row.minute = m + 1;
    peak_connections_at_ = 0;
    for (auto& [offset, action] : MinuteEvents(m)) {
      WaitUntil(start + offset, row.peak);
      if (g_interrupted.load()) break;
      action();
      ++row.events;
    }
    WaitUntil(start + kQuietAt, row.peak);
    // The quiet point: no new calls; every call must end within its deadline, and a Mux tag
    // within a moment of that (a discarded call's tag is freed when Rdiscarded arrives).
    SetPaused(true);
    auto quiet_start = Clock::now();
    WaitQuiet(std::max(start + kMinute, quiet_start + kCallTimeout + 1s));
    row.quiet_wait_s = Seconds(Clock::now() - quiet_start);
    row.peak_connections_at_s = peak_connections_at_;
    row.quiet = SampleGauges(registry_);
    row.outstanding = Outstanding();
    row.process = SampleProcess();
    row.at_s = Seconds(Clock::now() - t0_);
    for (size_t n = 0; n < protocols_.size(); ++n) {
      Calls& c = protocols_[n]->calls;
      ProtocolMinute now{c.ok.load() + c.failed.load(), c.ok.load(), c.failed.load()};
      row.protocols.push_back(
          {now.done - previous[n].done, now.ok - previous[n].ok, now.failed - previous[n].failed});
      previous[n] = now;
      std::map<std::string, int64_t> errors = c.Errors();
      for (auto& [name, count] : previous_errors[n]) errors[name] -= count;
      std::erase_if(errors, [](const auto& e) { return e.second == 0; });
      row.errors.push_back(std::move(errors));
      previous_errors[n] = c.Errors();
      std::map<std::string, EndpointCounts> servers = ByServer(*protocols_[n]);
      for (auto& [name, counts] : previous_servers[n]) {
        servers[name].ok -= counts.ok;
        servers[name].failed -= counts.failed;
      }
      row.servers.push_back(std::move(servers));
      previous_servers[n] = ByServer(*protocols_[n]);
    }
    SetPaused(false);
    rows.push_back(row);
    PrintRow(row, rows.front().process.rss_kb);
  }
  // Shutdown under load: Close() fails the calls in flight (slow ones included); every call,
  // those too, must have completed exactly once afterwards.
  CloseUnderLoad(load);
  GaugeSample final_quiet = SampleGauges(registry_);

  std::vector<Check> checks = Judge(rows, final_quiet);
  bool pass = true;
  std::printf("\n");
  for (auto& c : checks) {
    std::printf("%-4s %s: %s\n", c.ok ? "ok" : "FAIL", c.name.c_str(), c.detail.c_str());
    pass = pass && c.ok;
  }
  for (auto& p : protocols_) {
    std::string errors;
    for (auto& [name, count] : p->calls.Errors()) {
      errors += fmt::format("{}{} {}", errors.empty() ? "" : ", ", name, count);
    }
    std::string servers;
    for (auto& [name, c] : ByServer(*p)) {
      servers += fmt::format("{}{} {}/{}", servers.empty() ? "" : ", ", name, c.ok, c.failed);
    }
    std::printf(
        "%s: issued %lld, ok %lld, failed %lld (%s), skipped %lld\n"
        "  ok/failed by server: %s\n",
        p->name.c_str(), static_cast<long long>(p->calls.issued.load()),
        static_cast<long long>(p->calls.ok.load()), static_cast<long long>(p->calls.failed.load()),
        errors.empty() ? "none" : errors.c_str(), static_cast<long long>(p->calls.skipped.load()),
        servers.c_str());
  }
  std::printf("verdict: %s\n", pass ? "PASS" : "FAIL");
  std::fflush(stdout);
  // A report asked for and not written is the harness's failure (exit 2), not a silent pass.
  if (!options_.json.empty() && !WriteJson(rows, final_quiet, checks, pass)) ++harness_errors_;
  // The servers' stderr logs are kept when something failed.
  std::error_code ec;
  if (pass) {
    std::filesystem::remove_all(dir_, ec);
  } else {
    std::fprintf(stderr, "bench_soak: server logs kept in %s\n", dir_.c_str());
  }
  if (harness_errors_ > 0) return 2;
  return pass ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  scales::bench::Flags flags(argc, argv);
  Soak::Options options;
  const long minutes = flags.GetInt("minutes", options.minutes);
  options.minutes = static_cast<int>(std::min(minutes, 100000L));
  options.rate = flags.GetDouble("rate", options.rate);
  options.max_outstanding = flags.GetInt("max-outstanding", options.max_outstanding);
  options.seed = static_cast<uint64_t>(flags.GetInt("seed", 1));
  options.busy_poll_us = flags.GetInt("busy-poll-us", 0);
  const long rss_slack_mib = flags.GetInt("rss-slack-mib", options.rss_slack_kb / 1024);
  options.fd_slack = flags.GetInt("fd-slack", options.fd_slack);
  options.json = flags.Get("json", "");
  flags.RejectUnknown();
  // Memory, descriptors and threads are judged by the last minute against minute 1.
  if (minutes < 2 || minutes > 100000) {
    scales::bench::Flags::Die(
        "--minutes must be in 2..100000 (the flatness checks compare the last minute with "
        "minute 1), got %ld",
        minutes);
  }
  if (!std::isfinite(options.rate) || options.rate <= 0 || options.rate > 100000) {
    scales::bench::Flags::Die("--rate must be in (0, 100000] calls per second, got %g",
                              options.rate);
  }
  if (options.max_outstanding < 1) {
    scales::bench::Flags::Die("%s", "--max-outstanding must be at least 1 (0 skips every call)");
  }
  if (options.busy_poll_us < 0 || options.busy_poll_us > 1000000) {
    scales::bench::Flags::Die("%s", "--busy-poll-us must be in 0..1000000");
  }
  // In KiB it must not overflow (a negative allowance would judge memory by the 10 % alone).
  if (rss_slack_mib > 1048576) {
    scales::bench::Flags::Die("--rss-slack-mib must be in 0..1048576 MiB, got %ld", rss_slack_mib);
  }
  options.rss_slack_kb = static_cast<int64_t>(rss_slack_mib) * 1024;
  if (!test::ZooKeeperAvailable()) {
    scales::bench::Flags::Die("%s",
                              "bench_soak: needs /usr/bin/java and Debian's zookeeper package");
  }
  struct sigaction on_signal {};
  on_signal.sa_handler = [](int) { g_interrupted = true; };
  sigaction(SIGINT, &on_signal, nullptr);
  sigaction(SIGTERM, &on_signal, nullptr);
  try {
    Soak soak(options);
    return soak.Run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_soak: %s\n", e.what());
    return 2;
  }
}
