#pragma once
// ClientCore: the protocol-independent part of every client: the runtime, the server set,
// one replica of the sink stack per event loop (a "shard"), open and close. Typed clients
// (Http, and later Thrift and ThriftMux) own a ClientCore and give it calls.
//
// Threading: a shard's sinks run only on its loop. Dispatch() from a loop thread of the
// client's runtime stays on that loop; from any other thread it is posted to the loops in
// round-robin order. So one client object is safe to call from any thread and uses every
// loop of its runtime.

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/async_result.hpp>

#include "scales/core/dispatcher.h"
#include "scales/core/provider.h"
#include "scales/core/runtime.h"
#include "scales/discovery/server_set.h"
#include "scales/stats/stats.h"

namespace scales {

// Options every client has. Durations are std::chrono; the seed's builder setters map 1:1.
struct ClientOptions {
  // Client label, used in metrics (label `client`) and error messages. Default: "scales".
  std::string name = "scales";
  // Where the servers are: tcp://h:p[,h:p...], https://... or zk://... (see ScalesUriParser).
  // When `server_set` is set, only its TLS keys (https://, tls, tls_*) are still applied.
  std::string uri;
  // Timeout of every call, from its start to its completion (queueing and connecting
  // included). Default 10 s (the protocol builders set their own; HTTP 60 s as in scales).
  // Duration::zero() = no timeout. Overridable per call (CallOptions::timeout).
  Duration timeout = std::chrono::seconds(10);
  // How long Build()/NewClient wait for the client to open (discovery answered and a first
  // connection attempt finished). Default 10 s; zero = do not wait (the client then opens in
  // the background); Duration::max() = as long as it takes. When the wait ends first, Build()
  // fails with kOpenTimeout and the client is closed.
  Duration open_timeout = std::chrono::seconds(10);
  // Event loops to run on. Default: Runtime::Default() (one loop per core).
  std::shared_ptr<Runtime> runtime;
  // Where metrics go. Default: StatsRegistry::Default(). A registry you give must outlive the
  // client's runtime (sinks still report while a closed client drains on its loops); a runtime
  // released inside one of its own loops' handlers finishes on a thread of its own, so give
  // such a client a registry that lives until the process exits.
  stats::StatsRegistry* stats = nullptr;
  // Most calls the client holds at once (dispatched, not yet completed), over all its event
  // loops; a call beyond it fails at once with kTooManyPending (counter
  // scales_rejected{reason="max_pending"}). Default 100000; 0 = no limit. Each loop reserves
  // slots in batches (at most 64, and at most 1/32 of the limit per loop), so a call may be
  // refused up to (loops - 1) x 2 x batch calls early (128 of 100000 on 2 loops); small limits
  // are exact.
  size_t max_pending = 100000;
  // Give every call that has no TraceContext of its own (CallOptions::trace) a new root trace
  // id (trace = span = parent, from the loop's Random). It is sent on Mux (TraceContext), as
  // B3 headers on HTTP when http::TransportOptions::b3_headers is set, and returned in
  // CallInfo::trace. Default true.
  bool trace_ids = true;
  // Overrides the server set the URI would give (tests, custom discovery).
  std::shared_ptr<ServerSet> server_set;
};

// Thread safety: all public functions are safe from any thread.
class ClientCore : public std::enable_shared_from_this<ClientCore> {
 public:
  // Parses the URI, creates the server set and one stack per loop. Throws scales::Error
  // (kBadUri, kInvalidArgument) with a clear message.
  ClientCore(ClientOptions options, SinkStackSpec spec);
  ~ClientCore();
  ClientCore(const ClientCore&) = delete;
  ClientCore& operator=(const ClientCore&) = delete;

  // Opens every shard; the handler gets the first error, or success once all opened. It runs on
  // its associated executor (default: the first loop's), which counts outstanding work until then.
  // The core goes in as an initiation argument (as the typed clients' calls do): a token that
  // defers the initiation (deferred, use_awaitable) holds the client until the open starts.
  template <class CompletionToken>
  auto AsyncOpen(CompletionToken&& token) {
    return boost::asio::async_initiate<CompletionToken, void(error_code)>(
        [](auto handler, const std::shared_ptr<ClientCore>& core) {
          core->DoOpen(ClientMessageSink::OpenHandler(std::move(handler)));
        },
        token, shared_from_this());
  }
  // Opens and waits up to options().open_timeout (not at all if called on a loop thread).
  // Throws scales::Error(kOpenTimeout or the open error) with the client and server set, and
  // for an open error the failing sink's account of it (endpoint and step) when it gave one.
  void OpenAndWait();

  // Sends a call (from any thread). The call is completed exactly once.
  void Dispatch(CallBase* call);

  // Closes the client: every pending call completes with an error, later calls fail with
  // kClientClosed. Idempotent; does not wait.
  void Close();
  bool closed() const noexcept { return closed_.load(); }

  // True on a loop thread of this client's runtime, or on the thread that drives it in manual
  // mode (Runtime::IsDriverThread): where blocking calls must not be made.
  bool IsLoopThread() const noexcept { return runtime_->IsLoopThread() || runtime_->IsDriverThread(); }

  const ClientOptions& options() const noexcept { return options_; }
  const std::string& name() const noexcept { return options_.name; }
  Runtime& runtime() const noexcept { return *runtime_; }
  const std::shared_ptr<ServerSet>& server_set() const noexcept { return server_set_; }
  stats::StatsRegistry& stats() const noexcept { return *stats_; }
  // The stack, top to bottom, and the server set.
  std::string Describe() const;
  const SinkStackSpec& spec() const noexcept { return spec_; }
  // One dispatcher per event loop, in loop order; each is used only on its own loop.
  const std::vector<std::shared_ptr<MessageDispatcher>>& shards() const noexcept { return shards_; }

  // Calls `fn` with every live client of the process (constructed and not yet closed), under
  // a process-wide lock, for introspection (scales/admin). `fn` must be quick and must not
  // create, close or destroy a client, nor fork() (which waits for that lock); it copies what it
  // needs (shared_ptrs to the shards and runtime keep those alive after the client is gone). Thread
  // safe.
  static void ForEachLiveClient(const std::function<void(const ClientCore&)>& fn);

 private:
  // With a ZooKeeper server set: its session and update counts as gauges of this client.
  void ReportDiscoveryStats(const stats::StatsScope& scope);
  // `detail`, when given, receives why the first failed shard's open failed (its sinks' words)
  // before the handler is on its way.
  void DoOpen(ClientMessageSink::OpenHandler handler, std::shared_ptr<std::string> detail = nullptr);
  // Why a call or open of a client made before this process was forked fails (kClientClosed).
  std::string MadeBeforeForkDetail() const;

  ClientOptions options_;
  SinkStackSpec spec_;
  std::shared_ptr<Runtime> runtime_;
  stats::StatsRegistry* stats_;
  std::shared_ptr<ServerSet> server_set_;
  uint64_t discovery_collector_ = 0;  // StatsRegistry collector of a ZooKeeper server set's counts
  std::vector<std::shared_ptr<MessageDispatcher>> shards_;
  std::atomic<bool> closed_{false};
};

}  // namespace scales
