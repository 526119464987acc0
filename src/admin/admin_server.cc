#include "scales/admin/admin_server.h"

#include <algorithm>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/json.hpp>

#include "admin/admin_http.h"
#include "scales/core/client.h"
#include "scales/core/dispatcher.h"
#include "scales/core/error.h"
#include "scales/core/forwarding_sink.h"
#include "scales/core/log.h"
#include "scales/core/runtime.h"
#include "scales/discovery/uri.h"
#include "scales/loadbalancer/heap_balancer.h"

namespace scales::admin {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace json = boost::json;
using tcp = asio::ip::tcp;

// After a failed accept (out of descriptors: the listening socket stays readable), wait this
// long before accepting again rather than spin.
constexpr auto kAcceptRetryDelay = std::chrono::milliseconds(100);

int64_t Millis(Duration d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

// Throws kInvalidArgument naming the option unless `value` is positive (or zero, if allowed).
void CheckTimeout(std::string_view name, Duration value, bool zero_allowed) {
  if (value > Duration::zero() || (zero_allowed && value == Duration::zero())) return;
  throw Error(make_error_code(Errc::kInvalidArgument),
              fmt::format("admin server: {} must {}", name,
                          zero_allowed ? "not be negative" : "be > 0"));
}

// Throws kInvalidArgument naming the option unless `value` is at least `min`.
void CheckSize(std::string_view name, size_t value, size_t min) {
  if (value >= min) return;
  throw Error(make_error_code(Errc::kInvalidArgument),
              min == 1 ? fmt::format("admin server: {} must be > 0", name)
                       : fmt::format("admin server: {} must be >= {}", name, min));
}

// ---- /admin/clients ----

// What a client's stack looks like on one event loop, gathered on that loop.
struct MemberReport {
  std::string endpoint;
  std::string state;  // "down" (marked down by the balancer) or the chain's status
  int64_t load = 0;
  std::string sink;  // top of the per-endpoint chain
};

struct ShardReport {
  size_t loop = 0;
  size_t pending = 0;
  std::vector<std::pair<std::string, std::string>> sinks;  // name, status; top to bottom
  std::string balancer;                                    // empty if not reached
  size_t draining = 0;
  std::vector<MemberReport> members;
};

// Runs on the shard's loop: walks from the dispatcher through the pass-through sinks to the
// balancer. A sink that is not a ForwardingSink hides what is below it (user sinks may be
// anything), so the walk stops there.
ShardReport InspectShard(const MessageDispatcher& shard) {
  ShardReport r;
  r.loop = shard.loop().index();
  r.pending = shard.pending();
  SinkPtr sink = shard.next();
  while (sink) {
    r.sinks.emplace_back(std::string(sink->name()), ToString(sink->status()));
    if (const auto* lb = dynamic_cast<const LoadBalancerSink*>(sink.get())) {
      r.balancer = std::string(lb->name());
      r.draining = lb->draining();
      for (const auto& node : lb->nodes()) {
        MemberReport m;
        m.endpoint = node->address;
        m.load = node->load;
        m.state = node->down ? "down" : ToString(node->sink->status());
        m.sink = std::string(node->sink->name());
        r.members.push_back(std::move(m));
      }
      break;
    }
    const auto* forwarding = dynamic_cast<const ForwardingSink*>(sink.get());
    if (!forwarding) break;
    sink = forwarding->next();
  }
  return r;
}

// What ClientsJson copies from a client while holding the live-client lock.
struct ClientCopy {
  std::string name;
  std::string uri;
  std::string server_set;
  std::string describe;
  Duration timeout{};
  Duration open_timeout{};
  bool default_stats = true;
  struct StackEntry {
    std::string role, name;
    ProviderSettings settings;
  };
  std::vector<StackEntry> stack;
  std::shared_ptr<Runtime> runtime;                        // keeps the loops alive
  std::vector<std::shared_ptr<MessageDispatcher>> shards;
  // AskLoops: each shard's report to come, and its loop's index.
  std::vector<std::future<ShardReport>> futures;
  std::vector<size_t> indices;
};

// Asks every loop of the client for its shard's report (a task posted to each; the shard is
// released on its own loop, as ClientCore does). A shard of the calling thread's loop answers in
// place: waiting for its own loop would deadlock.
void AskLoops(ClientCopy& c) {
  for (auto& shard : c.shards) {
    c.indices.push_back(shard->loop().index());
    auto promise = std::make_shared<std::promise<ShardReport>>();
    c.futures.push_back(promise->get_future());
    if (shard->loop().IsCurrent()) {
      promise->set_value(InspectShard(*shard));
      continue;
    }
    EventLoop& loop = shard->loop();
    asio::post(loop.executor(),
               [shard = std::move(shard), promise] { promise->set_value(InspectShard(*shard)); });
  }
  c.shards.clear();
}

json::object ShardJson(const ShardReport& r) {
  json::array sinks;
  for (const auto& [name, status] : r.sinks)
    sinks.push_back(json::object{{"name", name}, {"status", status}});
  json::array members;
  for (const MemberReport& m : r.members) {
    members.push_back(json::object{
        {"endpoint", m.endpoint}, {"state", m.state}, {"load", m.load}, {"sink", m.sink}});
  }
  json::object o{{"loop", r.loop}, {"pending", r.pending}, {"sinks", std::move(sinks)}};
  if (!r.balancer.empty()) {
    o["balancer"] = r.balancer;
    o["draining"] = r.draining;
    o["members"] = std::move(members);
  }
  return o;
}

// The client's JSON, its loops' reports waited for until `deadline` (shared by every client of
// the request, so loops that do not answer delay it by `timeout` at most, not per client).
json::object ClientJson(ClientCopy& c, Duration timeout, std::chrono::steady_clock::time_point deadline) {
  json::array stack;
  for (const auto& entry : c.stack) {
    json::object settings;
    for (const auto& [key, value] : entry.settings) settings[key] = value;
    stack.push_back(json::object{{"role", entry.role}, {"name", entry.name}, {"settings", std::move(settings)}});
  }
  json::object client{
      {"name", c.name},
      {"uri", c.uri},
      {"server_set", c.server_set},
      {"options", json::object{{"timeout_ms", Millis(c.timeout)},
                               {"open_timeout_ms", Millis(c.open_timeout)},
                               {"event_loops", c.futures.size()},
                               {"stats", c.default_stats ? "default" : "custom"}}},
      {"stack", std::move(stack)},
      {"describe", c.describe},
  };

  std::vector<std::future<ShardReport>>& futures = c.futures;
  const std::vector<size_t>& indices = c.indices;
  json::array shards;
  std::map<std::string, std::pair<int64_t, std::map<std::string, int64_t>>>
      members;  // load, states
  std::vector<std::string> order;
  for (size_t i = 0; i < futures.size(); ++i) {
    if (futures[i].wait_until(deadline) != std::future_status::ready) {
      shards.push_back(json::object{
          {"loop", indices[i]},
          {"error", fmt::format("event loop did not answer within {} ms", Millis(timeout))}});
      continue;
    }
    ShardReport r = futures[i].get();
    for (const MemberReport& m : r.members) {
      auto [it, inserted] = members.try_emplace(m.endpoint);
      if (inserted) order.push_back(m.endpoint);
      it->second.first += m.load;
      ++it->second.second[m.state];
    }
    shards.push_back(ShardJson(r));
  }
  // Members over all loops, in the first loop's order: total load and how many loops see the
  // member in each state ({"open": 2} on a healthy 2-loop client).
  json::array all_members;
  for (const std::string& endpoint : order) {
    const auto& [load, states] = members[endpoint];
    json::object s;
    for (const auto& [state, n] : states) s[state] = n;
    all_members.push_back(
        json::object{{"endpoint", endpoint}, {"load", load}, {"states", std::move(s)}});
  }
  client["members"] = std::move(all_members);
  client["loops"] = std::move(shards);
  return client;
}

}  // namespace

std::string ClientsJson(Duration timeout) {
  std::vector<ClientCopy> copies;
  ClientCore::ForEachLiveClient([&](const ClientCore& core) {
    ClientCopy c;
    c.name = core.options().name;
    c.uri = RedactUriSecrets(core.options().uri);
    c.server_set = core.server_set()->Describe();
    c.describe = core.Describe();
    c.timeout = core.options().timeout;
    c.open_timeout = core.options().open_timeout;
    c.default_stats = &core.stats() == &stats::StatsRegistry::Default();
    for (const SinkProvider& p : core.spec().providers()) c.stack.push_back({p.role, p.name, p.settings});
    c.runtime = core.runtime().weak_from_this().lock();
    c.shards = core.shards();
    copies.push_back(std::move(c));
  });
  std::sort(copies.begin(), copies.end(),
            [](const ClientCopy& a, const ClientCopy& b) { return a.name < b.name; });
  // Every loop of every client is asked at once, then waited for with one deadline.
  for (ClientCopy& c : copies) AskLoops(c);
  const auto deadline = DeadlineAfter(std::chrono::steady_clock::now(), timeout);
  json::array clients;
  for (ClientCopy& c : copies) clients.push_back(ClientJson(c, timeout, deadline));
  return json::serialize(json::object{{"clients", std::move(clients)}});
}

class AdminServer::Impl {
 public:
  explicit Impl(AdminServerOptions options) : options_(std::move(options)), acceptor_(ioc_) {
    stats_ = options_.stats ? options_.stats : &stats::StatsRegistry::Default();
    CheckTimeout("clients_timeout", options_.clients_timeout, /*zero_allowed=*/true);
    // 0 would close every connection before its first request.
    CheckTimeout("idle_timeout", options_.idle_timeout, /*zero_allowed=*/false);
    CheckTimeout("linger_timeout", options_.linger_timeout, /*zero_allowed=*/true);
    CheckTimeout("write_timeout", options_.write_timeout, /*zero_allowed=*/false);
    CheckSize("max_header_bytes", options_.max_header_bytes, AdminServerOptions::kMinHeaderBytes);
    CheckSize("max_body_bytes", options_.max_body_bytes, 1);
    CheckSize("max_connections", options_.max_connections, 1);
    limits_.max_header_bytes = options_.max_header_bytes;
    limits_.max_body_bytes = options_.max_body_bytes;
    limits_.idle_timeout = options_.idle_timeout;
    limits_.write_timeout = options_.write_timeout;
    limits_.linger_timeout = options_.linger_timeout;
    beast::error_code ec;
    auto address = asio::ip::make_address(options_.address, ec);
    if (ec) {
      throw Error(
          make_error_code(Errc::kInvalidArgument),
          fmt::format("admin server: bad listen address '{}': {}", options_.address, ec.message()));
    }
    tcp::endpoint endpoint(address, options_.port);
    auto fail = [&](const char* step) {
      throw Error(ec, fmt::format("admin server: cannot {} {}:{}: {}", step, options_.address,
                                  options_.port, ec.message()));
    };
    acceptor_.open(endpoint.protocol(), ec);
    if (ec) fail("open a socket for");
    acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (ec) fail("set SO_REUSEADDR on");
    acceptor_.bind(endpoint, ec);
    if (ec) fail("bind");
    acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) fail("listen on");
    port_ = acceptor_.local_endpoint().port();
    pages_.stats = stats_;
    pages_.clients = [this] { return ClientsJson(options_.clients_timeout); };
    handler_ = [this](const std::string& path) { return internal::Route(path, pages_); };
    Accept();
    thread_ = std::thread([this] { ioc_.run(); });
  }

  ~Impl() { Stop(); }

  void Stop() {
    // In a child made by fork(): the server thread is the parent's, which serves on, and a
    // post here would take a lock of the io_context that the thread may have held at the fork.
    if (made_before_fork()) return;
    std::lock_guard lock(stop_mu_);
    if (!thread_.joinable()) return;
    asio::post(ioc_, [this] {
      beast::error_code ignored;
      acceptor_.close(ignored);
      accept_retry_.cancel();
      for (auto* list : {&sessions_, &refused_}) {
        for (auto& weak : *list) {
          if (auto s = weak.lock()) s->Close();
        }
        list->clear();
      }
      // Handlers still queued (the aborted reads and writes) are destroyed with the
      // io_context, which releases their sessions.
      ioc_.stop();
    });
    thread_.join();
  }

  uint16_t port() const noexcept { return port_; }
  const AdminServerOptions& options() const noexcept { return options_; }
  bool made_before_fork() const noexcept {
    return fork_generation_ != scales::internal::ForkGeneration();
  }

 private:
  void Accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
      if (ec) {
        SCALES_LOG_RATE_LIMITED(kWarning, 1, "admin server on port {}: accept failed: {}; retrying in {} ms",
                                port_, ec.message(), Millis(kAcceptRetryDelay));
        accept_retry_.expires_after(kAcceptRetryDelay);
        accept_retry_.async_wait([this](beast::error_code wait_ec) {
          if (!wait_ec && acceptor_.is_open()) Accept();
        });
        return;
      }
      // Forget sessions that are gone, so the lists do not grow with every connection.
      const auto gone = [](const std::weak_ptr<internal::Session>& w) { return w.expired(); };
      std::erase_if(sessions_, gone);
      std::erase_if(refused_, gone);
      // The process's descriptors are shared with its clients: the server must not exhaust them.
      // A connection over the limit is answered 503 without being read; those linger too (the
      // client must read the answer before the close), so they are bounded likewise: beyond
      // max_connections of them, one is closed without an answer.
      if (sessions_.size() >= options_.max_connections) {
        const bool answer = refused_.size() < options_.max_connections;
        SCALES_LOG_RATE_LIMITED(kWarning, 1,
                                "admin server on port {}: {} connections open (the limit, "
                                "max_connections); connection {}",
                                port_, sessions_.size(),
                                answer ? "refused with 503" : "closed (as many refused already)");
        if (answer) {
          auto session = std::make_shared<internal::Session>(std::move(socket), &handler_, limits_);
          refused_.push_back(session);
          session->StartRefused(fmt::format(
              "admin server: at its limit of {} connections (max_connections); try again later",
              options_.max_connections));
        } else {
          beast::error_code ignored;
          socket.close(ignored);
        }
      } else {
        auto session = std::make_shared<internal::Session>(std::move(socket), &handler_, limits_);
        sessions_.push_back(session);
        session->Start();
      }
      Accept();
    });
  }

  AdminServerOptions options_;
  stats::StatsRegistry* stats_;
  asio::io_context ioc_{1};
  tcp::acceptor acceptor_;
  asio::steady_timer accept_retry_{ioc_};
  uint16_t port_ = 0;
  internal::Pages pages_;
  internal::Session::Handler handler_;
  internal::SessionLimits limits_;  // the options' limits and timeouts
  std::vector<std::weak_ptr<internal::Session>> sessions_;  // on the server thread only
  std::vector<std::weak_ptr<internal::Session>> refused_;   // answered 503; likewise
  const uint64_t fork_generation_ = scales::internal::ForkGeneration();
  std::mutex stop_mu_;
  std::thread thread_;
};

AdminServer::AdminServer(AdminServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

AdminServer::~AdminServer() {
  // In a child made by fork(), the server is the parent's (Stop): kept, not destroyed, as its
  // io_context's destruction would close what the two processes share.
  if (impl_->made_before_fork())
    scales::internal::KeepForever(std::shared_ptr<Impl>(std::move(impl_)));
}

void AdminServer::Stop() { impl_->Stop(); }

uint16_t AdminServer::port() const noexcept { return impl_->port(); }

std::string AdminServer::url() const {
  const std::string& address = impl_->options().address;
  bool v6 = address.find(':') != std::string::npos;
  return fmt::format("http://{}{}{}:{}", v6 ? "[" : "", address, v6 ? "]" : "", port());
}

}  // namespace scales::admin
