// The Thrift and ThriftMux rounds of `scales demo`: two Apache Thrift servers (framed) and two
// ThriftMux servers (`scales testserver thrift|thriftmux`), each pair called through one scales
// client with the code Apache Thrift generates for tools/echo.thrift: a blocking call, an
// asynchronous one, a declared exception arriving as itself, a timeout, and a short load run.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/use_future.hpp>
#include <fmt/format.h>

#include "Echo.h"
#include "child_process.h"
#include "commands.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales::tools {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;

// `concurrency` callers in a closed loop for `seconds`; prints requests, failures, rate, p99.
void LoadRun(const thrift::ThriftClient<EchoClient>& client, int concurrency, double seconds) {
  struct Caller {
    CallInfo info;
  };
  std::atomic<bool> stop{false};
  std::atomic<int64_t> ok{0}, failed{0};
  std::atomic<int> active{concurrency};
  std::promise<void> drained;
  stats::Histogram latency;
  std::mutex mu;
  std::map<std::string, int64_t> by_endpoint;
  std::vector<std::unique_ptr<Caller>> callers;
  for (int i = 0; i < concurrency; ++i) callers.push_back(std::make_unique<Caller>());
  std::function<void(Caller*)> next = [&](Caller* c) {
    if (stop) {
      if (--active == 0) drained.set_value();
      return;
    }
    CallOptions o;
    o.info = &c->info;
    auto start = std::chrono::steady_clock::now();
    client.WithOptions(o).Async(&EchoClient::send_echo, &EchoClient::recv_echo, std::string("load"),
                                [&, c, start](std::exception_ptr e, std::string) {
                                  latency.Record(std::chrono::duration_cast<std::chrono::microseconds>(
                                                     std::chrono::steady_clock::now() - start)
                                                     .count());
                                  if (e) {
                                    ++failed;
                                  } else {
                                    ++ok;
                                    std::lock_guard lock(mu);
                                    ++by_endpoint[c->info.endpoint];
                                  }
                                  next(c);
                                });
  };
  auto start = std::chrono::steady_clock::now();
  for (auto& c : callers) next(c.get());
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  drained.get_future().wait();
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  auto snap = latency.Snapshot();
  std::printf("   load: %d callers for %.1f s: %lld ok, %lld failed, %.0f calls/s, p50 %lld us, p99 %lld us;",
              concurrency, seconds, static_cast<long long>(ok.load()), static_cast<long long>(failed.load()),
              static_cast<double>(ok + failed) / elapsed, static_cast<long long>(snap.Percentile(0.5)),
              static_cast<long long>(snap.Percentile(0.99)));
  for (auto& [ep, n] : by_endpoint) std::printf(" %s %lld", ep.c_str(), static_cast<long long>(n));
  std::printf("\n");
}

void Round(const char* title, const thrift::ThriftClient<EchoClient>& client, double seconds) {
  std::printf("\n%s\n", title);
  std::string r;
  client->echo(r, "hi");
  std::printf("   blocking   client->echo(r, \"hi\")                                 -> \"%s\"\n", r.c_str());
  auto f = SCALES_THRIFT_CALL(client, echo, std::string("async hi"), boost::asio::use_future);
  std::printf("   future     SCALES_THRIFT_CALL(client, echo, \"async hi\", use_future) -> \"%s\"\n", f.get().c_str());
  try {
    client->fail(r, "no such user");
  } catch (const scales::echo::EchoError& e) {
    std::printf("   declared   client->fail(r, \"no such user\") threw EchoError(\"%s\")\n", e.message.c_str());
  }
  CallOptions quick;
  quick.timeout = 100ms;
  try {
    client.WithOptions(quick)->sleep(r, 1000);
  } catch (const Error& e) {
    std::printf("   timeout    sleep(1000) with a 100 ms timeout -> %s\n              %s\n",
                ErrorName(e.scales_code()).c_str(), e.what());
  }
  LoadRun(client, 16, seconds);
}

}  // namespace

int RunThriftDemo(double seconds) {
  ChildProcess t1, t2, m1, m2;
  std::string ta = StartTestServer(t1, "thrift", 0), tb = StartTestServer(t2, "thrift", 0);
  std::string ma = StartTestServer(m1, "thriftmux", 0), mb = StartTestServer(m2, "thriftmux", 0);
  if (ta.empty() || tb.empty() || ma.empty() || mb.empty()) {
    std::fprintf(stderr, "demo: could not start the Thrift/ThriftMux test servers\n");
    return 2;
  }
  // The registry outlives the runtime: closing clients still report into it on the loops.
  stats::StatsRegistry registry;
  RuntimeOptions ro;
  ro.threads = 2;
  auto runtime = std::make_shared<Runtime>(ro);
  try {
    thrift::ThriftOptions topts;
    topts.client.name = "demo-thrift";
    topts.client.runtime = runtime;
    topts.client.stats = &registry;
    auto tclient = Thrift::NewClient<EchoClient>("tcp://" + ta + "," + tb, topts);
    Round(fmt::format("9. Thrift (framed, binary) over Apache Thrift's TThreadedServer on {} and {}:", ta, tb).c_str(),
          tclient, seconds / 3);
    tclient.Close();

    thriftmux::ThriftMuxOptions mopts;
    mopts.client.name = "demo-thriftmux";
    mopts.client.runtime = runtime;
    mopts.client.stats = &registry;
    mopts.client_id = "scales-demo";
    auto mclient = ThriftMux::NewClient<EchoClient>("tcp://" + ma + "," + mb, mopts);
    Round(fmt::format("10. ThriftMux (one multiplexed Mux session per server and loop) on {} and {}:", ma, mb).c_str(),
          mclient, seconds / 3);
    std::printf("   mux: %lld Tdiscarded sent for the timed-out call, %lld Mux tags in use now\n",
                [&] {
                  long long n = 0;
                  for (auto& m : registry.Snapshot()) {
                    if (m.name == "scales_mux_discards") n += m.value;
                  }
                  return n;
                }(),
                [&] {
                  long long n = 0;
                  for (auto& m : registry.Snapshot()) {
                    if (m.name == "scales_mux_tags_in_use") n += m.value;
                  }
                  return n;
                }());
    mclient.Close();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 2;
  }
  return 0;
}

}  // namespace scales::tools
