// bench_balancer_pick: what one request costs in a load balancer over 10 and over 10,000
// endpoints (Google Benchmark). bench/run reports the ratio 10,000 / 10 per balancer; a pick
// that walks the server set would make it grow with the set (the target is <= 2x).
//
// A request goes through the balancer sink itself: pick, route to the node's chain, and the
// response back through the balancer (load bookkeeping). Each endpoint's chain is one
// AutoReplySink that answers at once, and the stack's bottom is a sink that drops the response,
// so nothing but the balancer is measured; no dispatcher, timeout or allocation per request of
// ours. Runs on a manual-mode runtime (test::ManualEnv) from the benchmark's thread.
//
//   p2c                P2CBalancerSink
//   aperture           ApertureBalancerSink with its defaults (the aperture stays at min_size 1
//                      while idle: the pick is over the aperture, not the server set)
//   aperture_full      ApertureBalancerSink with min_size = the server set's size
#include <benchmark/benchmark.h>

#include <memory>
#include <string>

#include "scales/core/sink_stack.h"
#include "scales/discovery/server_set.h"
#include "scales/loadbalancer/aperture.h"
#include "scales/loadbalancer/p2c.h"
#include "support/fake_sinks.h"

namespace scales {
namespace {

// An endpoint chain that is always Open and answers every request synchronously.
class AutoReplySink final : public ClientMessageSink {
 public:
  explicit AutoReplySink(EventLoop& loop) : loop_(loop) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage&, Stream* stream) override {
    auto m = MethodReturnMessage::Ok();
    stack.AsyncProcessResponse(stream, m);
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "auto-reply"; }

 protected:
  void DoOpen(OpenHandler handler) override {
    PostOpenCompletion(std::move(handler), loop_.executor(), {});
  }

 private:
  EventLoop& loop_;
};

// The bottom of the sink stack: takes the response and drops it.
class DropSink final : public ClientMessageSink {
 public:
  void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
  void AsyncProcessResponse(SinkStack&, void*, Stream*, MethodReturnMessage& msg) override {
    if (!msg.ok()) failed_ = true;
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "drop"; }
  bool failed() const noexcept { return failed_; }

 protected:
  void DoOpen(OpenHandler handler) override {}

 private:
  bool failed_ = false;
};

enum class Kind { kP2C, kAperture, kApertureFull };

void BM_Pick(benchmark::State& state, Kind kind) {
  const int nodes = static_cast<int>(state.range(0));
  test::ManualEnv env;
  ServerSet::Members members;
  for (int i = 0; i < nodes; ++i) {
    members.push_back(Endpoint{"10." + std::to_string(i / 65536) + "." +
                                   std::to_string(i / 256 % 256) + "." + std::to_string(i % 256),
                               9090});
  }
  auto set = std::make_shared<StaticServerSet>(members);
  SinkFactory factory = [&env](const SinkContext&) -> SinkPtr {
    return std::make_shared<AutoReplySink>(env.loop());
  };
  const SinkContext ctx = test::MakeContext(env.loop(), env.scope, set);
  SinkPtr balancer;
  if (kind == Kind::kP2C) {
    balancer = std::make_shared<P2CBalancerSink>(ctx, factory);
  } else {
    ApertureOptions options;
    if (kind == Kind::kApertureFull) options.min_size = static_cast<size_t>(nodes);
    balancer = std::make_shared<ApertureBalancerSink>(ctx, factory, options);
  }
  bool opened = false;
  balancer->AsyncOpen([&](error_code ec) { opened = !ec; });
  env.Run();
  if (!opened) {
    state.SkipWithError("balancer did not open");
    return;
  }
  MethodCallMessage msg;
  msg.method = "Get";
  DropSink bottom;
  int64_t n = 0;
  for (auto _ : state) {
    SinkStack stack(msg);
    stack.Push(&bottom);
    balancer->AsyncProcessRequest(stack, msg, nullptr);
    // Whatever the balancer posted (ticks, deferred work) runs now and then, as a loop would.
    if ((++n & 1023) == 0) env.Run();
  }
  if (bottom.failed()) state.SkipWithError("a request failed");
  balancer->Close();
  env.Run();
}

BENCHMARK_CAPTURE(BM_Pick, p2c, Kind::kP2C)->Arg(10)->Arg(10000);
BENCHMARK_CAPTURE(BM_Pick, aperture, Kind::kAperture)->Arg(10)->Arg(10000);
BENCHMARK_CAPTURE(BM_Pick, aperture_full, Kind::kApertureFull)->Arg(10)->Arg(10000);

}  // namespace
}  // namespace scales

BENCHMARK_MAIN();
