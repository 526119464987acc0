#include "scales/core/client.h"

#include <algorithm>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include <boost/asio/post.hpp>

#include "core/duration_text.h"
#include "core/fork_locks.h"
#include "core/own_thread.h"
#include "scales/core/error.h"
#include "scales/core/forwarding_sink.h"
#include "scales/discovery/uri.h"
#include "scales/discovery/zookeeper.h"

namespace scales {
namespace {

// The live clients, for ForEachLiveClient. Raw pointers, not weak_ptrs: a client registers in
// its constructor, before any shared_ptr owns it (weak_from_this() is only assigned after the
// constructor returns). A client unregisters in Close(), which its destructor calls first, so
// a pointer in the set is always to a complete object.
struct LiveClients {
  std::mutex mu;
  std::set<const ClientCore*> clients;
};

LiveClients& Live() {
  static LiveClients* const live = [] {
    auto* l = new LiveClients();  // never destroyed: clients may outlive main
    internal::HoldAcrossFork(l->mu, internal::ForkLockRank::kLiveClients);
    return l;
  }();
  return *live;
}

// Why a shard's open failed, in the words of the sink that failed it ("connect to 10.0.0.1:80
// failed: Connection refused"): the first sink down the shard's chain that says, through the
// sinks that forward their open (timeout, retry, formatters): a connection's or session's
// open_failure_detail(), or the fault a pool raised with it. Empty when none says. On the
// shard's loop.
std::string OpenFailureDetail(const MessageDispatcher& shard) {
  ClientMessageSink* sink = shard.next().get();
  while (sink != nullptr) {
    if (std::string detail = sink->open_failure_detail(); !detail.empty()) return detail;
    if (const auto& fault = sink->on_faulted().value(); fault && fault->error && !fault->detail.empty()) {
      return fault->detail;
    }
    auto* forwarding = dynamic_cast<ForwardingSink*>(sink);
    sink = forwarding != nullptr ? forwarding->next().get() : nullptr;
  }
  return {};
}

}  // namespace

ClientCore::ClientCore(ClientOptions options, SinkStackSpec spec)
    : options_(std::move(options)), spec_(std::move(spec)) {
  runtime_ = options_.runtime ? options_.runtime : Runtime::Default();
  stats_ = options_.stats ? options_.stats : &stats::StatsRegistry::Default();
  if (options_.name.empty()) {
    throw Error(make_error_code(Errc::kInvalidArgument), "client name must not be empty");
  }
  if (runtime_->made_before_fork()) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("client {}: its runtime was created before this process was forked: "
                            "its event loops do not run here; create a Runtime in this process "
                            "(Runtime::Default() gives a new one here)",
                            options_.name));
  }
  if (options_.timeout < Duration::zero()) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("client {}: timeout must not be negative", options_.name));
  }
  if (options_.open_timeout < Duration::zero()) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("client {}: open_timeout must not be negative", options_.name));
  }
  if (options_.server_set) {
    server_set_ = options_.server_set;
  } else {
    if (options_.uri.empty()) {
      throw Error(make_error_code(Errc::kBadUri),
                  fmt::format("client {}: no URI given (tcp://host:port[,host:port...] or "
                              "zk://host:port/path)", options_.name));
    }
    server_set_ = CreateServerSet(ScalesUriParser::Parse(options_.uri));
  }
  SinkFactory top = spec_.Build();
  stats::StatsScope scope(stats_, {{"client", options_.name}});
  auto limit = std::make_shared<MessageDispatcher::PendingLimit>(options_.max_pending, runtime_->size());
  try {
    for (size_t i = 0; i < runtime_->size(); ++i) {
      EventLoop& loop = runtime_->loop(i);
      SinkContext ctx;
      ctx.loop = &loop;
      ctx.client_name = options_.name;
      ctx.stats = scope;
      ctx.server_set = server_set_;
      SinkPtr head = top(ctx);
      shards_.push_back(std::make_shared<MessageDispatcher>(loop, options_.name, std::move(head),
                                                            options_.timeout, scope, limit,
                                                            options_.trace_ids));
    }
    // After the last step that may throw (a provider's validation): a constructor that throws
    // runs no destructor, and the registry would keep the collector (and its gauges) for good.
    ReportDiscoveryStats(scope);
  } catch (const std::logic_error& e) {
    // The registry refuses a metric the user registered with another type (the dispatcher's,
    // the discovery gauges): "stats: metric NAME{labels} is a gauge, not a counter".
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("client {}: {}", options_.name, stats::StatsRegistry::MetricErrorReason(e)));
  }
  std::lock_guard lock(Live().mu);
  Live().clients.insert(this);
}

ClientCore::~ClientCore() {
  Close();
  if (runtime_->made_before_fork()) [[unlikely]] {
    // In a child made by fork(): the shards are the parent's, on loops that do not run here
    // (Close). Kept, not destroyed: their connections are the parent's too.
    for (auto& shard : shards_) internal::KeepForever(std::move(shard));
    return;
  }
  // A shard may be running on its loop right now (e.g. completing the very call whose
  // handler released the last client handle): release each shard on its own loop, after
  // whatever it is doing.
  for (auto& shard : shards_) {
    EventLoop& loop = shard->loop();
    boost::asio::post(loop.executor(), [shard = std::move(shard)] {});
  }
}

void ClientCore::DoOpen(ClientMessageSink::OpenHandler handler, std::shared_ptr<std::string> detail) {
  if (runtime_->made_before_fork()) [[unlikely]] {
    // In a child made by fork(): as a call (Dispatch), failed at once from a thread of its own.
    if (detail) *detail = MadeBeforeForkDetail();
    auto h = std::make_shared<ClientMessageSink::OpenHandler>(std::move(handler));  // move-only
    internal::RunOnAThreadOfItsOwn([h] {
      internal::CompleteOn(std::move(*h), boost::asio::system_executor(), /*defer=*/false, {},
                           make_error_code(Errc::kClientClosed));
    });
    return;
  }
  struct OpenState {
    std::mutex mu;
    size_t remaining;
    error_code first_error;
    std::string first_detail;             // the first error's, when `detail` is wanted
    std::shared_ptr<std::string> detail;  // receives it before the handler is on its way
    // std::optional because any_completion_handler's move assignment recurses forever in
    // Boost 1.81; only move construction is safe.
    std::optional<ClientMessageSink::OpenHandler> handler;
    boost::asio::any_io_executor executor;
    // On the handler's own executor until the handler reaches it (Asio's rule, as for calls).
    internal::TrackedWork work;
  };
  auto state = std::make_shared<OpenState>();
  state->remaining = shards_.size();
  state->handler.emplace(std::move(handler));
  state->detail = std::move(detail);
  state->executor = runtime_->loop(0).executor();
  state->work = internal::HandlerWork(*state->handler);
  if (!state->work && shards_.size() > 1) {
    // The handler runs on the first loop, posted from whichever loop answers last: that loop
    // counts it as work until then. A runtime going away lets each loop run out of work, the
    // first loop first, and one already stopped would destroy the handler unrun.
    state->work.emplace(boost::asio::prefer(runtime_->loop(0).io_context().get_executor(),
                                            boost::asio::execution::outstanding_work.tracked));
  }
  for (auto& shard : shards_) {
    boost::asio::post(shard->loop().executor(), [shard, state] {
      shard->AsyncOpen([state, shard](error_code ec) {
        {
          std::lock_guard lock(state->mu);
          if (ec && !state->first_error) {
            state->first_error = ec;
            // A closed client's open says nothing about its endpoints (a fault may be old).
            if (state->detail && ec != Errc::kClientClosed) state->first_detail = OpenFailureDetail(*shard);
          }
          if (--state->remaining != 0) return;
        }
        if (state->detail) *state->detail = std::move(state->first_detail);
        internal::CompleteOn(std::move(*state->handler), state->executor, /*defer=*/true,
                             std::move(state->work), state->first_error);
      });
    });
  }
}

void ClientCore::OpenAndWait() {
  auto done = std::make_shared<std::promise<error_code>>();
  auto result = done->get_future();
  auto detail = std::make_shared<std::string>();
  DoOpen(ClientMessageSink::OpenHandler([done](error_code ec) { done->set_value(ec); }), detail);
  if (options_.open_timeout <= Duration::zero() || IsLoopThread()) return;
  // wait_for() waits until now + timeout: a timeout near Duration::max() (as long as it takes)
  // would overflow that deadline and not wait at all. A century is as long as it takes.
  const Duration wait = std::min<Duration>(options_.open_timeout, std::chrono::hours(24 * 365 * 100));
  if (result.wait_for(wait) != std::future_status::ready) {
    throw Error(make_error_code(Errc::kOpenTimeout),
                fmt::format("client {} did not open within {} (server set {})", options_.name,
                            DurationText(options_.open_timeout),
                            server_set_->Describe()));
  }
  if (error_code ec = result.get()) {
    // The step and endpoint the failing sink reported (read once the handler ran: written before).
    throw Error(ec, fmt::format("client {} failed to open (server set {}): {}", options_.name,
                                server_set_->Describe(), detail->empty() ? ec.message() : *detail));
  }
}

void ClientCore::Dispatch(CallBase* call) {
  if (runtime_->made_before_fork()) [[unlikely]] {
    FailCallMadeBeforeFork(call, MadeBeforeForkDetail());
    return;
  }
  // Once closed, a call is refused (kClientClosed) by the dispatcher it is posted to, whether or
  // not that shard's posted Close() has run yet: Close() sets the flag before it posts (and may
  // wait for the live-client registry in between), and a call dispatched in place on a loop, or
  // posted ahead of that loop's Close(), would reach a dispatcher not closed yet, and be sent.
  const bool closed = closed_.load();
  if (!closed) {
    for (auto& shard : shards_) {
      if (shard->loop().IsCurrent()) {
        // A user's handler may have run long since this turn's clock reading (ClockTurn): the
        // call's start and deadline must not be that much in the past.
        ClockTurn::Refresh();
        shard->Dispatch(call, /*initiating=*/true);
        return;
      }
    }
  }
  EventLoop& loop = runtime_->PickLoop();
  MessageDispatcher* shard = shards_[loop.index()].get();
  boost::asio::post(loop.executor(),
                    [shard, call, closed] { shard->Dispatch(call, /*initiating=*/false, /*refuse=*/closed); });
}

void ClientCore::ReportDiscoveryStats(const stats::StatsScope& scope) {
  // A ZooKeeper server set keeps its own counts (it may be shared by several clients and has
  // no registry); they are copied into this client's gauges whenever the registry is read.
  auto zk = std::dynamic_pointer_cast<ZooKeeperServerSet>(server_set_);
  if (!zk) return;
  struct Gauges {
    stats::Gauge& sessions;
    stats::Gauge& expirations;
    stats::Gauge& losses;
    stats::Gauge& updates;
    stats::Gauge& malformed;
    stats::Gauge& read_retries;
  };
  Gauges g{scope.GetGauge("scales_zk_sessions"),
           scope.GetGauge("scales_zk_session_expirations"),
           scope.GetGauge("scales_zk_connection_losses"),
           scope.GetGauge("scales_discovery_updates"),
           scope.GetGauge("scales_discovery_malformed_members"),
           scope.GetGauge("scales_discovery_read_retries")};
  std::weak_ptr<ZooKeeperServerSet> weak = zk;
  discovery_collector_ = stats_->AddCollector([weak, g] {
    auto set = weak.lock();
    if (!set) return;
    const ZooKeeperServerSet::Stats s = set->stats();
    g.sessions.Set(static_cast<int64_t>(s.sessions));
    g.expirations.Set(static_cast<int64_t>(s.session_expirations));
    g.losses.Set(static_cast<int64_t>(s.connection_losses));
    g.updates.Set(static_cast<int64_t>(s.snapshots));
    g.malformed.Set(static_cast<int64_t>(s.malformed_members));
    g.read_retries.Set(static_cast<int64_t>(s.read_retries));
  });
}

void ClientCore::Close() {
  if (closed_.exchange(true)) return;
  if (discovery_collector_ != 0) stats_->RemoveCollector(discovery_collector_);
  {
    std::lock_guard lock(Live().mu);
    Live().clients.erase(this);
  }
  // In a child made by fork() the shards are the parent's: their loops do not run here, a post
  // would take a lock of the io_context that one of the parent's loop threads may have held at
  // the fork, and closing would act on connections the two processes share. Left alone.
  if (runtime_->made_before_fork()) [[unlikely]]
    return;
  for (auto& shard : shards_) {
    boost::asio::post(shard->loop().executor(), [shard] { shard->Close(); });
  }
}

std::string ClientCore::MadeBeforeForkDetail() const {
  return fmt::format(
      "client {} was created before this process was forked: its event loops do "
      "not run here; create the client in the process that calls it",
      options_.name);
}

void ClientCore::ForEachLiveClient(const std::function<void(const ClientCore&)>& fn) {
  std::lock_guard lock(Live().mu);
  for (const ClientCore* client : Live().clients) fn(*client);
}

std::string ClientCore::Describe() const {
  return fmt::format("client {}: dispatcher -> {}; server set {}; {} event loop(s)", options_.name,
                     spec_.Describe(), server_set_->Describe(), shards_.size());
}

}  // namespace scales
