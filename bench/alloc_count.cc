// bench_alloc_count: heap allocations per ThriftMux call in steady state, and heap bytes per
// outstanding request and per idle connection, measured with a counting global operator new.
//
//   bench_alloc_count --mux-port P --thrift-port Q [--calls 20000] [--outstanding 1000]
//                     [--idle 64]
//
// Every operator new/delete of the process (the client's event loop included) is counted, and
// every std::aligned_alloc (Asio's handler memory); live bytes are malloc_usable_size of what
// operator new allocated and operator delete has not yet freed. The client runs on one event
// loop.
//
//   allocs_per_call_c1 / _c64   allocations per echo call through the ThriftMux client
//                               (SCALES_THRIFT_CALL with a callback: the whole user-visible
//                               call), at 1 and 64 calls outstanding, after a warm-up
//   bytes_per_outstanding       live bytes with --outstanding sleep(2000) calls in flight on
//                               the Mux session, minus live bytes before, per call
//   bytes_per_idle_thrift_conn  one plain Thrift client whose pool holds --idle idle framed
//                               connections (opened by as many concurrent sleep calls) versus
//                               holding one, per extra connection
//   bytes_per_idle_mux_client   --idle ThriftMux clients (one idle session each) on a shared
//                               runtime, per client: the upper bound of a Mux connection's
//                               cost (it includes the client's own balancer, pool and stats)
//   bytes_per_idle_mux_session  --idle Mux session sinks (MuxSessionProvider, default options)
//                               opened to the server (connect, Tinit/Rinit) and idle, per
//                               session: what one more Mux connection of a client costs (its
//                               endpoint's stats are shared, as a client's are per endpoint)
//
// Prints one JSON line with these fields. Heap only: kernel socket buffers are not counted.
// Every wait is bounded: a call or session that does not complete in time (a hung server) ends
// the program with an error (exit status 2), as does a failed call.
#include <malloc.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/post.hpp>

#include "Echo.h"
#include "bench_util.h"
#include "scales/core/provider.h"
#include "scales/core/runtime.h"
#include "scales/mux/session.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"

namespace {

std::atomic<int64_t> g_allocs{0};
std::atomic<int64_t> g_live_bytes{0};

void* CountedAlloc(size_t n, size_t align = 0) {
  // memalign, not aligned_alloc: this program's aligned_alloc (below) counts too.
  void* p = align > alignof(std::max_align_t) ? ::memalign(align, n == 0 ? 1 : n)
                                              : std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  g_live_bytes.fetch_add(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
  return p;
}

void CountedFree(void* p) noexcept {
  if (p == nullptr) return;
  g_live_bytes.fetch_sub(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
  std::free(p);
}

}  // namespace

// Asio's handler memory (its recycling allocator's misses: boost/asio/detail/memory.hpp
// aligned_new) comes from std::aligned_alloc, not operator new: it is an allocation per call
// too. Counted, not added to the live bytes: Asio frees it with std::free, which this program
// does not see.
extern "C" void* aligned_alloc(size_t align, size_t n) noexcept {
  void* p = ::memalign(align, n);
  if (p != nullptr) g_allocs.fetch_add(1, std::memory_order_relaxed);
  return p;
}

void* operator new(size_t n) { return CountedAlloc(n); }
void* operator new[](size_t n) { return CountedAlloc(n); }
void* operator new(size_t n, std::align_val_t a) { return CountedAlloc(n, static_cast<size_t>(a)); }
void* operator new[](size_t n, std::align_val_t a) {
  return CountedAlloc(n, static_cast<size_t>(a));
}
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  try {
    return CountedAlloc(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { CountedFree(p); }
void operator delete[](void* p) noexcept { CountedFree(p); }
void operator delete(void* p, size_t) noexcept { CountedFree(p); }
void operator delete[](void* p, size_t) noexcept { CountedFree(p); }
void operator delete(void* p, std::align_val_t) noexcept { CountedFree(p); }
void operator delete[](void* p, std::align_val_t) noexcept { CountedFree(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { CountedFree(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { CountedFree(p); }

namespace {

using scales::echo::EchoClient;
using Client = scales::thrift::ThriftClient<EchoClient>;
using std::chrono::seconds;

// Bounds of the waits: generous for the default sizes on a busy machine.
constexpr seconds kCallsLimit{120};  // a batch of echo calls (RunEchoCalls)
constexpr seconds kSleepLimit{60};   // sleep calls, beyond their own duration
constexpr seconds kLoopLimit{30};    // opening or closing sessions on the loop

// Waits for `f` at most `limit`; ends the program with an error when it is not ready by then.
// _Exit, not exit: the client's loop thread still runs and may touch what static destructors
// would destroy.
void WaitOrDie(std::future<void>& f, seconds limit, const char* what) {
  if (f.wait_for(limit) == std::future_status::ready) return;
  std::fprintf(stderr, "bench_alloc_count: %s did not complete within %lld s\n", what,
               static_cast<long long>(limit.count()));
  std::fflush(stderr);
  std::_Exit(2);
}

// Runs `total` echo calls with `concurrency` outstanding (closed loop); returns when all
// completed. Exits if any failed.
void RunEchoCalls(const Client& client, int64_t total, int concurrency) {
  // Shared with the callbacks: the last one may still be unwinding when the waiter returns.
  struct State : std::enable_shared_from_this<State> {
    const Client* client = nullptr;
    std::string payload = std::string(16, 'x');
    std::atomic<int64_t> issued{0};
    std::atomic<int64_t> failed{0};
    std::atomic<int> active{0};
    int64_t total = 0;
    std::promise<void> done;
    void Issue() {
      if (issued.fetch_add(1) >= total) {
        if (active.fetch_sub(1) == 1) done.set_value();
        return;
      }
      SCALES_THRIFT_CALL(*client, echo, payload,
                         [self = shared_from_this()](std::exception_ptr e, std::string) {
                           if (e) self->failed.fetch_add(1);
                           self->Issue();
                         });
    }
  };
  auto state = std::make_shared<State>();
  state->client = &client;
  state->total = total;
  state->active = concurrency;
  auto done = state->done.get_future();
  for (int i = 0; i < concurrency; ++i) state->Issue();
  WaitOrDie(done, kCallsLimit, "a batch of echo calls");
  if (state->failed > 0) {
    scales::bench::Flags::Die("bench_alloc_count: %lld echo calls failed",
                              static_cast<long long>(state->failed.load()));
  }
}

// Allocations per call over `calls` calls at `concurrency`, after a warm-up of the same size.
double AllocsPerCall(const Client& client, int64_t calls, int concurrency) {
  RunEchoCalls(client, calls, concurrency);
  const int64_t before = g_allocs.load();
  RunEchoCalls(client, calls, concurrency);
  return static_cast<double>(g_allocs.load() - before) / static_cast<double>(calls);
}

// `n` sleep(millis) calls in flight; Wait() returns when all completed, and ends the program
// if they take kSleepLimit longer than `millis` or any failed.
class Sleeps {
 public:
  Sleeps(const Client& client, int n, int millis) : millis_(millis) {
    auto left = std::make_shared<std::atomic<int>>(n);
    auto done = std::make_shared<std::promise<void>>();
    auto failed = failed_;
    done_ = done->get_future();
    for (int i = 0; i < n; ++i) {
      SCALES_THRIFT_CALL(client, sleep, millis,
                         [left, done, failed](std::exception_ptr e, std::string) {
                           if (e) failed->fetch_add(1);
                           if (left->fetch_sub(1) == 1) done->set_value();
                         });
    }
  }
  void Wait() {
    WaitOrDie(done_, seconds(millis_ / 1000 + 1) + kSleepLimit, "sleep calls");
    if (*failed_ > 0) {
      scales::bench::Flags::Die("bench_alloc_count: %d sleep calls failed", failed_->load());
    }
  }

 private:
  int millis_;
  std::shared_ptr<std::atomic<int>> failed_ = std::make_shared<std::atomic<int>>(0);
  std::future<void> done_;
};

void Settle() { std::this_thread::sleep_for(std::chrono::milliseconds(300)); }

// Opens `n` Mux session sinks to the server on the runtime's first loop and returns the live
// heap bytes they add, per session, once all are open and idle.
double BytesPerIdleMuxSession(scales::Runtime& runtime, int port, int n) {
  scales::stats::StatsRegistry registry;
  scales::EventLoop& loop = runtime.loop(0);
  scales::SinkContext ctx;
  ctx.loop = &loop;
  ctx.client_name = "idle-sessions";
  ctx.endpoint = scales::Endpoint{"127.0.0.1", static_cast<uint16_t>(port)};
  ctx.stats = scales::stats::StatsScope(&registry, {{"client", "idle-sessions"}, {"endpoint", "127.0.0.1"}});
  scales::SinkProvider provider = scales::mux::MuxSessionProvider();
  std::vector<scales::SinkPtr> sessions(static_cast<size_t>(n));
  auto open_all = [&](size_t from, size_t to) {
    std::promise<void> done;
    auto left = std::make_shared<std::atomic<size_t>>(to - from);
    boost::asio::post(loop.executor(), [&, left] {
      for (size_t i = from; i < to; ++i) {
        sessions[i] = provider.create(ctx, nullptr);
        sessions[i]->AsyncOpen([&, left](scales::error_code ec) {
          if (ec) scales::bench::Flags::Die("bench_alloc_count: a Mux session did not open: %s", ec.message().c_str());
          if (--*left == 0) done.set_value();
        });
      }
    });
    auto opened = done.get_future();
    WaitOrDie(opened, kLoopLimit, "opening the Mux sessions");
  };
  open_all(0, 1);  // the stats and the provider's shared state exist before the measurement
  Settle();
  const int64_t before = g_live_bytes.load();
  open_all(1, static_cast<size_t>(n));
  Settle();
  const double per_session = static_cast<double>(g_live_bytes.load() - before) / (n - 1);
  std::promise<void> closed;
  boost::asio::post(loop.executor(), [&] {
    for (auto& s : sessions) s->Close();
    sessions.clear();
    closed.set_value();
  });
  auto closing = closed.get_future();
  WaitOrDie(closing, kLoopLimit, "closing the Mux sessions");
  Settle();
  return per_session;
}

}  // namespace

int main(int argc, char** argv) {
  scales::bench::Flags flags(argc, argv);
  const int mux_port = static_cast<int>(flags.GetInt("mux-port", 0, 65535));
  const int thrift_port = static_cast<int>(flags.GetInt("thrift-port", 0, 65535));
  const int64_t calls = flags.GetInt("calls", 20000);
  const int outstanding = static_cast<int>(flags.GetInt("outstanding", 1000, INT_MAX));
  const int idle = static_cast<int>(flags.GetInt("idle", 64, INT_MAX));
  flags.RejectUnknown();
  if (mux_port <= 0 || thrift_port <= 0 || calls <= 0 || outstanding <= 0 || idle < 2) {
    scales::bench::Flags::Die(
        "usage: bench_alloc_count --mux-port P --thrift-port Q [--calls N] [--outstanding N] "
        "[--idle N>=2]");
  }
  scales::RuntimeOptions ro;
  ro.threads = 1;
  auto runtime = std::make_shared<scales::Runtime>(ro);
  const std::string mux_uri = "tcp://127.0.0.1:" + std::to_string(mux_port);

  scales::thriftmux::ThriftMuxOptions mo;
  mo.client.name = "alloc";
  mo.client.runtime = runtime;
  Client mux = scales::ThriftMux::NewClient<EchoClient>(mux_uri, mo);
  const double c1 = AllocsPerCall(mux, calls, 1);
  const double c64 = AllocsPerCall(mux, calls, 64);

  // Outstanding requests: sleep calls the server holds for 2 s without blocking other calls.
  Settle();
  const int64_t live_before = g_live_bytes.load();
  Sleeps sleeps(mux, outstanding, 2000);
  Settle();  // every request encoded, written and waiting for its reply
  const int64_t live_outstanding = g_live_bytes.load();
  sleeps.Wait();
  const double per_outstanding = static_cast<double>(live_outstanding - live_before) / outstanding;

  // Idle pooled Thrift connections: one connection, then `idle` (TThreadedServer answers the
  // concurrent sleeps on a thread each).
  scales::thrift::ThriftOptions to;
  to.client.name = "alloc-thrift";
  to.client.runtime = runtime;
  Client thrift =
      scales::Thrift::NewClient<EchoClient>("tcp://127.0.0.1:" + std::to_string(thrift_port), to);
  Sleeps(thrift, 1, 1).Wait();
  Settle();
  const int64_t live_one = g_live_bytes.load();
  Sleeps(thrift, idle, 200).Wait();
  Settle();
  const int64_t live_idle = g_live_bytes.load();
  const double per_thrift_conn = static_cast<double>(live_idle - live_one) / (idle - 1);

  // Idle ThriftMux clients, one session each, on the shared runtime.
  Settle();
  const int64_t live_no_clients = g_live_bytes.load();
  std::vector<Client> clients;
  for (int i = 0; i < idle; ++i) {
    mo.client.name = "idle" + std::to_string(i);
    clients.push_back(scales::ThriftMux::NewClient<EchoClient>(mux_uri, mo));
    Sleeps(clients.back(), 1, 0).Wait();  // the session is open and has carried a call
  }
  Settle();
  const double per_mux_client = static_cast<double>(g_live_bytes.load() - live_no_clients) / idle;

  const double per_mux_session = BytesPerIdleMuxSession(*runtime, mux_port, idle);

  std::printf(
      "{\"allocs_per_call_c1\":%.2f,\"allocs_per_call_c64\":%.2f,\"bytes_per_outstanding\":%.0f,"
      "\"bytes_per_idle_thrift_conn\":%.0f,\"bytes_per_idle_mux_client\":%.0f,"
      "\"bytes_per_idle_mux_session\":%.0f}\n",
      c1, c64, per_outstanding, per_thrift_conn, per_mux_client, per_mux_session);
  std::fflush(stdout);
  for (auto& c : clients) c.Close();
  thrift.Close();
  mux.Close();
  return 0;
}
