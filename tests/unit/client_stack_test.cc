// The whole default-shaped stack through ClientCore, on a manual runtime:
// dispatcher -> timeout -> heap balancer -> per endpoint [resurrector -> watermark pool ->
// fake connection]. Every call completes exactly once.

#include "scales/core/client.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/log.h"
#include "scales/core/random.h"
#include "scales/core/timeout_sink.h"
#include "scales/http/client.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/pool/watermark_pool.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using ::testing::HasSubstr;

const Endpoint kA{"10.9.0.1", 80};
const Endpoint kB{"10.9.0.2", 80};

// The options of a client named `name` over kA alone, on `runtime`, counting into `registry`.
ClientOptions SingleEndpointOptions(std::string name, std::shared_ptr<Runtime> runtime,
                                    stats::StatsRegistry& registry) {
  ClientOptions options;
  options.name = std::move(name);
  options.runtime = std::move(runtime);
  options.stats = &registry;
  options.server_set = std::make_shared<StaticServerSet>(ServerSet::Members{kA});
  return options;
}

// The timeout sink over the fake transports `make` creates.
SinkStackSpec TimeoutOverFakes(std::function<SinkPtr(const SinkContext&)> make) {
  return SinkStackSpec({TimeoutSinkProvider(),
                        SinkProvider{"transport", "fake", [make = std::move(make)](const SinkContext& ctx, SinkFactory) {
                                       return make(ctx);
                                     }}});
}

class ClientStackTest : public ::testing::Test {
 protected:
  ClientStackTest()
      : clock_(std::make_shared<ManualClock>()),
        runtime_(std::make_shared<Runtime>(
            RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock_, .seed = 42})),
        factory_(runtime_->loop(0)),
        calls_(*clock_) {}

  // `edit`, if given, changes the stack before the client is built (as a builder's edits do).
  void Build(Duration timeout = seconds(10), const std::function<void(SinkStackSpec&)>& edit = nullptr) {
    set_ = std::make_shared<StaticServerSet>(ServerSet::Members{kA, kB});
    ClientOptions options;
    options.name = "stack";
    options.timeout = timeout;
    options.runtime = runtime_;
    options.stats = &registry_;
    options.server_set = set_;
    ResurrectorOptions res;
    res.initial_backoff = seconds(1);
    res.jitter = 0;
    WatermarkPoolOptions pool;
    pool.low_watermark = 1;
    pool.high_watermark = 2;
    pool.max_waiters = 10;
    SinkStackSpec spec({TimeoutSinkProvider(), HeapBalancerProvider(), ResurrectorProvider(res),
                        WatermarkPoolProvider(pool),
                        SinkProvider{"transport", "fake", [this](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                                       return factory_.Create(ctx);
                                     }}});
    if (edit) edit(spec);
    core_ = std::make_shared<ClientCore>(options, spec);
  }

  error_code Open() {
    error_code result = make_error_code(Errc::kProtocolError);
    int done = 0;
    core_->AsyncOpen([&](error_code ec) {
      result = ec;
      ++done;
    });
    Run();
    EXPECT_EQ(done, 1);
    return result;
  }

  void TearDown() override {
    if (core_) core_->Close();
    Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    core_.reset();
    Run();
    factory_.Clear();
    Run();
  }

  void Run() { runtime_->RunUntilIdle(); }
  void Advance(Duration d) {
    clock_->Advance(d);
    Run();
  }
  size_t Start(std::optional<Duration> timeout = std::nullopt) {
    return calls_.StartWith([this](CallBase* c) { core_->Dispatch(c); }, timeout);
  }
  size_t InFlightAt(const Endpoint& ep) {
    size_t n = 0;
    for (FakeTransport* f : factory_.ForEndpoint(ep)) n += f->in_flight();
    return n;
  }
  void ReplyAll(int value) {
    for (size_t i = 0; i < factory_.count(); ++i) {
      while (factory_.at(i).in_flight() > 0) factory_.at(i).Reply(0, value);
    }
    Run();
  }
  int64_t Counter(std::string_view name) {
    const stats::Counter* c = registry_.FindCounter(name, {{"client", "stack"}});
    return c ? c->value() : 0;
  }

  stats::StatsRegistry registry_;
  std::shared_ptr<ManualClock> clock_;
  std::shared_ptr<Runtime> runtime_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<StaticServerSet> set_;
  std::shared_ptr<ClientCore> core_;
};

TEST_F(ClientStackTest, CallsAreBalancedAndCompleteOnce) {
  Build();
  EXPECT_FALSE(Open());
  // Opening made one connection per endpoint (each pool's low watermark).
  EXPECT_EQ(factory_.ForEndpoint(kA).size(), 1u);
  EXPECT_EQ(factory_.ForEndpoint(kB).size(), 1u);
  for (int i = 0; i < 4; ++i) Start();
  Run();
  EXPECT_EQ(InFlightAt(kA), 2u);
  EXPECT_EQ(InFlightAt(kB), 2u);
  EXPECT_EQ(factory_.count(), 4u);  // high watermark 2 per endpoint
  ReplyAll(5);
  for (size_t c = 0; c < calls_.size(); ++c) {
    EXPECT_EQ(calls_[c].value, 5);
    EXPECT_THAT(calls_[c].info.endpoint, ::testing::AnyOf(kA.ToString(), kB.ToString()));
  }
  EXPECT_EQ(Counter("scales_requests"), 4);
  EXPECT_EQ(Counter("scales_successes"), 4);
  EXPECT_THAT(core_->Describe(), HasSubstr("timeout(timeout) -> loadbalancer(heap-balancer)"));
}

TEST_F(ClientStackTest, UnreachableEndpointIsMarkedDownAndAvoided) {
  factory_.on_create = [](FakeTransport& f) {
    if (f.endpoint() == kA) f.set_open_mode(FakeTransport::OpenMode::kFail, make_error_code(Errc::kConnectFailed));
  };
  Build();
  EXPECT_FALSE(Open());  // one endpoint is enough
  for (int i = 0; i < 6; ++i) Start();
  Run();
  EXPECT_EQ(InFlightAt(kA), 0u);
  EXPECT_EQ(InFlightAt(kB), 2u);  // two connections, four queued in B's pool
  EXPECT_GE(Counter("scales_lb_marked_down"), 1);
  for (int round = 0; round < 3; ++round) ReplyAll(1);
  for (size_t c = 0; c < calls_.size(); ++c) {
    EXPECT_FALSE(calls_[c].error) << c << ": " << calls_[c].info.detail;
    EXPECT_EQ(calls_[c].info.endpoint, kB.ToString());
  }
  // A becomes reachable; after the backoff it is marked up and used again.
  factory_.on_create = nullptr;
  Advance(seconds(1));
  Start();
  Start();
  Start();
  Run();
  EXPECT_GE(InFlightAt(kA), 1u);
  ReplyAll(2);
}

// A provider below the balancer is instantiated on the event loop, when an endpoint joins (or a
// pool connects): one that throws or returns no sink must not escape into the loop (the
// balancer stopped half-way, the open and every call then waited forever) nor crash it.
// Each endpoint's calls fail at once, naming the client, the endpoint and the provider.
SinkProvider BrokenProvider(std::string role, bool throws) {
  return SinkProvider{std::move(role), "broken", [throws](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        if (throws) throw Error(make_error_code(Errc::kInvalidArgument), "tap file unreadable");
                        return nullptr;
                      }};
}

TEST_F(ClientStackTest, ProviderThrowingBelowTheBalancerFailsCallsClearly) {
  Build(seconds(10), [](SinkStackSpec& s) { s.InsertBefore(roles::kPool, BrokenProvider("tap", true)); });
  EXPECT_FALSE(Open());  // the open completes (the balancer does not fail on a node's open)
  auto c = Start();
  Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kFailedFast);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("client stack: endpoint 10.9.0."));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("sink provider 'tap' (broken) failed: tap file unreadable"));
}

// A transport is made by the pool, per connection: the connection fails to open with the reason.
TEST_F(ClientStackTest, TransportProviderThrowingFailsTheConnectionClearly) {
  Build(seconds(10), [](SinkStackSpec& s) { s.ReplaceRole(roles::kTransport, BrokenProvider("transport", true)); });
  EXPECT_FALSE(Open());
  auto c = Start();
  Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_TRUE(calls_[c].error);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("client stack: endpoint 10.9.0."));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("sink provider 'transport' (broken) failed: tap file unreadable"));
}

TEST_F(ClientStackTest, ProviderReturningNoSinkBelowTheBalancerFailsCallsClearly) {
  Build(seconds(10), [](SinkStackSpec& s) { s.InsertBefore(roles::kPool, BrokenProvider("tap", false)); });
  EXPECT_FALSE(Open());
  auto c = Start();
  Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kFailedFast);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("sink provider 'tap' (broken) returned no sink"));
}

// Above the balancer the stack is instantiated when the client is built: the error is thrown
// there, naming the client and the provider, instead of a client whose first call crashes.
TEST_F(ClientStackTest, ProviderReturningNoSinkAboveTheBalancerFailsTheBuild) {
  try {
    Build(seconds(10), [](SinkStackSpec& s) { s.InsertBefore(roles::kLoadBalancer, BrokenProvider("tap", false)); });
    ADD_FAILURE() << "built a client whose stack has no sink";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("client stack: sink provider 'tap' (broken) returned no sink"));
  }
}

// The resurrector, the pool (and failure accrual) work per endpoint: without a balancer above
// them they have none, and the client connected to nothing (":0") and failed to open with a
// bare "connect failed". The build names the provider and what it lacks instead.
TEST_F(ClientStackTest, PerEndpointSinksWithoutABalancerFailTheBuild) {
  try {
    Build(seconds(10), [](SinkStackSpec& s) { s.RemoveRole(roles::kLoadBalancer); });
    ADD_FAILURE() << "built a client whose resurrector has no endpoint";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("client stack: sink provider 'resurrector' (resurrector) works per "
                                    "endpoint: put it below a load balancer"));
  }
  // Without the resurrector too, the pool is named.
  try {
    Build(seconds(10), [](SinkStackSpec& s) { s.RemoveRole(roles::kLoadBalancer).RemoveRole(roles::kResurrector); });
    ADD_FAILURE() << "built a client whose pool has no endpoint";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("sink provider 'pool' (watermark-pool) works per endpoint"));
  }
}

// The user's own metric under a name scales registers per endpoint, with another type: the
// endpoint's chain is built on the event loop when the endpoint joins, where the registry's
// std::logic_error becomes that endpoint's failure (CreateSink): calls fail fast naming the
// client, the endpoint, the metric and both types; the open and the calls still complete.
TEST_F(ClientStackTest, PerEndpointMetricOfAnotherTypeFailsThatEndpointClearly) {
  for (const Endpoint& ep : {kA, kB}) {
    registry_.GetCounter("scales_pool_size", {{"client", "stack"}, {"endpoint", ep.ToString()}});
  }
  Build();
  EXPECT_FALSE(Open());
  auto c = Start();
  Run();
  ASSERT_TRUE(calls_.done(c));
  EXPECT_EQ(calls_[c].error, Errc::kFailedFast);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("client stack: endpoint 10.9.0."));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("sink provider 'pool' (watermark-pool) failed: stats: metric "
                                               "scales_pool_size{client=\"stack\",endpoint=\"10.9.0."));
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("is a counter, not a gauge"));
}

// scales_failures_by_error{error=...} is registered on the response path, at the first failure
// of a kind: a user's metric of another type there made the registry throw out of the
// dispatcher's response path, before the call completed, and the loop dropped the exception:
// the call never completed. It completes with its own error; the clash is logged (client,
// metric, both types) and that kind of failure is not counted there.
TEST_F(ClientStackTest, FailureCounterOfAnotherTypeStillCompletesTheCall) {
  stats::Gauge& users = registry_.GetGauge("scales_failures_by_error",
                                           {{"client", "stack"}, {"error", "request_timeout"}});
  std::vector<std::string> records;
  const LogLevel old_level = SetLogLevel(LogLevel::kWarning);
  LogSink old_sink = SetLogSink([&](const LogRecord& r) { records.emplace_back(r.message); });
  Build(milliseconds(200));
  EXPECT_FALSE(Open());
  auto c = Start();
  auto d = Start();
  Run();
  Advance(milliseconds(200));
  SetLogSink(std::move(old_sink));
  SetLogLevel(old_level);
  ASSERT_TRUE(calls_.done(c));
  ASSERT_TRUE(calls_.done(d));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_EQ(calls_[d].error, Errc::kRequestTimeout);
  EXPECT_EQ(users.value(), 0);
  EXPECT_EQ(Counter("scales_failures"), 2);
  ASSERT_EQ(records.size(), 1u);  // once per kind, not per failure
  EXPECT_THAT(records[0], HasSubstr("client stack: metric scales_failures_by_error{client=\"stack\","
                                    "error=\"request_timeout\"} is a gauge, not a counter: its "
                                    "'request_timeout' failures are not counted there"));
}

// The dispatcher registers its metrics when the client is built: a clash there fails the build
// with a scales::Error naming the client, the metric and both types (a bare std::logic_error
// escaped before, past callers that catch scales::Error).
TEST_F(ClientStackTest, ClientMetricOfAnotherTypeFailsTheBuild) {
  registry_.GetGauge("scales_requests", {{"client", "stack"}});
  try {
    Build();
    ADD_FAILURE() << "built a client whose request counter is the user's gauge";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("client stack: metric scales_requests{client=\"stack\"} is a gauge, "
                                    "not a counter"));
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a scales::Error: " << e.what();
  }
}

TEST_F(ClientStackTest, TimeoutOnTheWireCancelsTheConnectionsRequest) {
  Build(milliseconds(200));
  EXPECT_FALSE(Open());
  auto c = Start();
  Run();
  Advance(milliseconds(200));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  size_t cancels = 0;
  for (auto& f : factory_.created()) cancels += f->cancels();
  EXPECT_EQ(cancels, 1u);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("10.9.0."));  // names the endpoint
  EXPECT_EQ(Counter("scales_timeouts"), 1);
}

TEST_F(ClientStackTest, CloseAnswersEverythingAndLaterCallsFail) {
  Build();
  EXPECT_FALSE(Open());
  for (int i = 0; i < 8; ++i) Start();  // 4 on connections, 4 queued
  Run();
  core_->Close();
  EXPECT_TRUE(core_->closed());
  Run();
  EXPECT_EQ(calls_.completed(), 8u);
  auto late = Start();
  Run();
  EXPECT_EQ(calls_[late].error, Errc::kClientClosed);
}

// Close() and then a call from a handler on the client's own loop: the call is refused, not
// sent to a dispatcher that the posted Close() has not reached yet (a POST run by the server
// while the caller hears kClientClosed).
TEST_F(ClientStackTest, ACallAfterCloseOnTheLoopIsNotSent) {
  Build();
  EXPECT_FALSE(Open());
  auto total_requests = [&] {
    size_t n = 0;
    for (const auto& f : factory_.created()) n += f->total_requests();
    return n;
  };
  const size_t sent_before = total_requests();
  size_t late = 0;
  boost::asio::post(runtime_->loop(0).executor(), [&] {
    core_->Close();
    late = Start();
  });
  Run();
  ASSERT_TRUE(calls_.done(late));
  EXPECT_EQ(calls_[late].error, Errc::kClientClosed);
  EXPECT_EQ(total_requests(), sent_before) << "the call reached a transport";
}

// A call made once closed() reads true is refused even when its post reaches the loop before
// that loop's Close(): Close() sets the flag, then waits for the live-client registry (held here
// as an /admin/clients request holds it while it describes every client) before it posts.
TEST_F(ClientStackTest, ACallMadeOnceClosedReadsTrueIsNotSent) {
  Build();
  EXPECT_FALSE(Open());
  size_t sent_before = 0;
  for (const auto& f : factory_.created()) sent_before += f->total_requests();
  std::promise<void> holding;
  std::promise<void> release;
  std::thread holder([&] {
    bool first = true;
    ClientCore::ForEachLiveClient([&](const ClientCore&) {
      if (!std::exchange(first, false)) return;
      holding.set_value();
      release.get_future().wait();
    });
  });
  holding.get_future().wait();
  std::thread closer([&] { core_->Close(); });  // sets closed_, then waits for the registry
  while (!core_->closed()) std::this_thread::yield();
  const size_t late = Start();  // posted to the loop ahead of Close()'s post
  release.set_value();
  holder.join();
  closer.join();
  Run();
  ASSERT_TRUE(calls_.done(late));
  EXPECT_EQ(calls_[late].error, Errc::kClientClosed) << calls_[late].error.message();
  size_t sent = 0;
  for (const auto& f : factory_.created()) sent += f->total_requests();
  EXPECT_EQ(sent, sent_before) << "the call reached a transport";
}

// Asio's rule, kept for calls (CallBase::TrackWork) and opens alike: the open's handler's own
// executor counts outstanding work until the handler reaches it, so an io_context that runs
// only that handler does not run out of work and return first. AsyncOpen tracked none: run()
// returned at once, and the handler was later queued on a stopped io_context.
TEST_F(ClientStackTest, OpenKeepsItsHandlersExecutorWorkingUntilTheHandlerRuns) {
  Build();
  boost::asio::io_context other;
  int opened = 0;
  error_code result = make_error_code(Errc::kProtocolError);
  core_->AsyncOpen(boost::asio::bind_executor(other, [&](error_code ec) {
    ++opened;
    result = ec;
  }));
  other.poll();
  EXPECT_FALSE(other.stopped()) << "the open's handler's executor ran out of work before the open completed";
  Run();  // the shards open; the handler is handed to `other`
  EXPECT_EQ(opened, 0);
  other.restart();
  other.run();  // runs the handler, then has no work left and returns
  EXPECT_EQ(opened, 1);
  EXPECT_FALSE(result);
}

TEST_F(ClientStackTest, MembershipChangesReachTheBalancer) {
  Build();
  EXPECT_FALSE(Open());
  set_->Update({kB});
  Run();
  for (int i = 0; i < 3; ++i) Start();
  Run();
  EXPECT_EQ(InFlightAt(kA), 0u);
  EXPECT_EQ(InFlightAt(kB), 2u);
  ReplyAll(0);
  ReplyAll(0);
  EXPECT_EQ(calls_.completed(), 3u);
}


// The whole stack under random traffic, answers, dying connections, unreachable endpoints,
// slow connects, membership changes and time. No call is lost or completed twice, and no
// connection ever carries two requests.
TEST_F(ClientStackTest, RandomOperationsCompleteEveryCallOnce) {
  const Endpoint kC{"10.9.0.3", 80};
  Random rng(test::TestSeed(2024));
  std::set<std::string> unreachable;
  factory_.on_create = [&](FakeTransport& f) {
    if (unreachable.count(f.endpoint()->ToString())) {
      f.set_open_mode(FakeTransport::OpenMode::kFail, make_error_code(Errc::kConnectFailed));
    } else if (rng.Uniform(8) == 0) {
      f.set_open_mode(FakeTransport::OpenMode::kHang);
    }
    if (rng.Uniform(3) == 0) f.set_close_on_cancel(true);
  };
  Build(milliseconds(400));
  core_->AsyncOpen([](error_code) {});  // may not finish: first connects can hang
  Run();
  const std::vector<Endpoint> all = {kA, kB, kC};
  std::set<int> members = {0, 1};
  for (int step = 0; step < 4000; ++step) {
    const uint64_t op = rng.Uniform(100);
    if (op < 35) {
      Start(milliseconds(50 + static_cast<int64_t>(rng.Uniform(700))));
      Run();
    } else if (op < 60) {
      std::vector<FakeTransport*> busy;
      for (auto& f : factory_.created()) {
        if (f->in_flight() > 0) busy.push_back(f.get());
      }
      if (!busy.empty()) {
        FakeTransport* f = busy[rng.Uniform(busy.size())];
        if (rng.Uniform(6) == 0) f->set_status(SinkStatus::kClosed);
        if (rng.Uniform(4) == 0) {
          f->Fail(0, make_error_code(Errc::kServerError));
        } else {
          f->Reply(0, 1);
        }
        Run();
      }
    } else if (op < 65) {
      for (auto& f : factory_.created()) {
        if (f->pending_opens() > 0) {
          f->CompleteOpen(rng.Uniform(3) == 0 ? make_error_code(Errc::kConnectTimeout) : error_code());
          break;
        }
      }
      Run();
    } else if (op < 70) {
      const std::string ep = all[rng.Uniform(all.size())].ToString();
      if (unreachable.count(ep)) {
        unreachable.erase(ep);
      } else {
        unreachable.insert(ep);
      }
    } else if (op < 74) {
      int id = static_cast<int>(rng.Uniform(all.size()));
      if (members.count(id)) {
        members.erase(id);
      } else {
        members.insert(id);
      }
      ServerSet::Members m;
      for (int i : members) m.push_back(all[i]);
      set_->Update(m);
      Run();
    } else {
      Advance(milliseconds(static_cast<int64_t>(rng.Uniform(300))));
    }
    for (auto& f : factory_.created()) ASSERT_LE(f->in_flight(), 1u) << "step " << step;
    ASSERT_TRUE(calls_.NoneCompletedTwice()) << "step " << step;
  }
  // Finish: slow connects end, deadlines pass, the client closes.
  for (auto& f : factory_.created()) {
    if (f->pending_opens() > 0) f->CompleteOpen();
  }
  Advance(seconds(2));
  EXPECT_TRUE(calls_.AllCompletedOnce());
  std::map<std::string, int> outcomes;
  for (size_t c = 0; c < calls_.size(); ++c) outcomes[calls_[c].error ? ErrorName(calls_[c].error) : "ok"]++;
  EXPECT_GT(outcomes["ok"], 100) << ::testing::PrintToString(outcomes);
  EXPECT_GT(calls_.size(), 1000u);
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// A manual-mode runtime destroyed with its last client while a call waits on a connection and
// another is still posted to the loop: the client's Close() and the completions still run
// (nobody would poll the loops later). They used to be destroyed unrun: both calls never
// completed, and their objects leaked.
TEST(ClientCoreShutdownTest, ManualRuntimeDestroyedWithPendingCallsCompletesThem) {
  stats::StatsRegistry registry;
  auto clock = std::make_shared<ManualClock>();
  auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock, .seed = 42});
  FakeTransportFactory factory(runtime->loop(0));
  CallTracker calls(*clock);
  {
    auto core = std::make_shared<ClientCore>(
        SingleEndpointOptions("shutdown", runtime, registry),
        TimeoutOverFakes([&](const SinkContext& ctx) -> SinkPtr { return factory.Create(ctx); }));
    calls.StartWith([&](CallBase* c) { core->Dispatch(c); });  // on the loop once polled
    runtime->RunUntilIdle();
    calls.StartWith([&](CallBase* c) { core->Dispatch(c); });  // posted, not run yet
    ASSERT_EQ(factory.TotalInFlight(), 1u);
  }
  runtime.reset();
  EXPECT_TRUE(calls.AllCompletedOnce());
  // The posted call reaches the loop ahead of the Close() posted after it: both are answered
  // by the closing connection.
  EXPECT_EQ(calls[0].error, Errc::kConnectionClosed);
  EXPECT_EQ(calls[1].error, Errc::kConnectionClosed);
  factory.Clear();
}

// A manual-mode runtime whose last reference is its client's, released in the callback of one
// of that client's calls while the owner drives the loops (Runtime::RunUntilIdle): the runtime
// goes inside a Poll() of its own loop, with a second call still held by the connection. The
// loop (and its io_context) used to be destroyed under that Poll(), and RunUntilIdle went on
// over the destroyed runtime's loops: the client's Close(), posted behind the handler, never
// ran, and the second call never completed.
TEST(ClientCoreShutdownTest, ManualRuntimeReleasedInItsClientsCallbackCompletesTheRest) {
  stats::StatsRegistry registry;
  auto clock = std::make_shared<ManualClock>();
  std::optional<FakeTransportFactory> factory;
  CallTracker calls(*clock);
  std::shared_ptr<ClientCore> core;
  {
    auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock, .seed = 42});
    factory.emplace(runtime->loop(0));
    // The client holds the only reference to the runtime.
    core = std::make_shared<ClientCore>(
        SingleEndpointOptions("self-releasing", std::move(runtime), registry),
        TimeoutOverFakes([&](const SinkContext& ctx) -> SinkPtr { return factory->Create(ctx); }));
  }
  Runtime& runtime = core->runtime();
  int released_completions = 0;
  core->Dispatch(new TypedCall<int>([&](error_code, int) {
    ++released_completions;
    core.reset();  // the client, and with it the runtime
  }));
  calls.StartWith([&](CallBase* c) { core->Dispatch(c); });
  runtime.RunUntilIdle();
  ASSERT_EQ(factory->TotalInFlight(), 2u);
  EventLoop& loop = runtime.loop(0);
  boost::asio::post(loop.executor(), [&] { factory->at(0).Reply(0, 1); });
  runtime.RunUntilIdle();  // the runtime goes inside it
  EXPECT_EQ(released_completions, 1);
  EXPECT_TRUE(calls.AllCompletedOnce());
  EXPECT_EQ(calls[0].error, Errc::kConnectionClosed);
  factory->Clear();
}

// open_timeout = Duration::max() (wait as long as it takes) used to overflow the wait's
// deadline (now + max): OpenAndWait gave up at once, failing the build with "did not open
// within 9223372036854 ms" although the open was about to succeed.
TEST(ClientCoreOpenTest, LongestOpenTimeoutWaitsForTheOpen) {
  stats::StatsRegistry registry;
  auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 1});
  FakeTransportFactory factory(runtime->loop(0));
  ClientOptions options = SingleEndpointOptions("patient", runtime, registry);
  options.open_timeout = Duration::max();
  auto core = std::make_shared<ClientCore>(
      options, TimeoutOverFakes([&](const SinkContext& ctx) -> SinkPtr { return factory.Create(ctx); }));
  EXPECT_NO_THROW(core->OpenAndWait());
  core.reset();
  runtime.reset();  // joins the loop thread: the fakes are no longer in use
  factory.Clear();
}

// A bottom sink whose open fails with `error`, giving its reason as a connection does
// (open_failure_detail()) or, as a pool does, only in the fault it raises.
class OpenFailingSink final : public ClientMessageSink {
 public:
  OpenFailingSink(EventLoop& loop, error_code error, std::string detail, bool detail_in_fault_only)
      : loop_(loop), error_(error), detail_(std::move(detail)), fault_only_(detail_in_fault_only) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage&, Stream* stream) override {
    auto m = MethodReturnMessage::Failure(error_, detail_);
    stack.AsyncProcessResponse(stream, m);
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kClosed; }
  std::string open_failure_detail() const override { return fault_only_ ? std::string() : detail_; }
  std::string_view name() const override { return "open-failing"; }

 protected:
  void DoOpen(OpenHandler handler) override {
    on_faulted_.Set(Fault{error_, detail_});
    PostOpenCompletion(std::move(handler), loop_.executor(), error_);
  }

 private:
  EventLoop& loop_;
  error_code error_;
  std::string detail_;
  bool fault_only_;
};

// A stack built by hand (no balancer: the open fails with the connection's error): OpenAndWait's
// error gives the step and endpoint the sink reported, as calls' errors do. It used to give
// only the code's message ("connect failed"), naming neither.
TEST(ClientCoreOpenTest, AFailedOpenNamesTheEndpointAndTheStep) {
  const std::string reason = "connect to 10.9.0.1:80 failed: Connection refused";
  for (bool fault_only : {false, true}) {
    stats::StatsRegistry registry;
    auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 1});
    ClientOptions options = SingleEndpointOptions("refused", runtime, registry);
    auto core = std::make_shared<ClientCore>(options, TimeoutOverFakes([&](const SinkContext& ctx) -> SinkPtr {
                                               return std::make_shared<OpenFailingSink>(
                                                   *ctx.loop, make_error_code(Errc::kConnectFailed), reason,
                                                   fault_only);
                                             }));
    try {
      core->OpenAndWait();
      ADD_FAILURE() << "the open did not fail";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kConnectFailed);
      EXPECT_THAT(e.what(), HasSubstr("client refused failed to open"));
      EXPECT_THAT(e.what(), HasSubstr(reason)) << "fault only: " << fault_only;
    }
    core.reset();
    runtime.reset();
  }
}

// A runtime in manual mode (start_threads = false) is driven by the thread that polls it: a
// blocking call made on that thread between two polls waits for a reply only its own next
// poll could bring (the call's timeout is a timer on the loop too), so it hung for good. It
// fails at once with kBlockingCallOnEventLoop, as on a loop thread; another thread's blocking
// call still waits for the polls.
TEST(ClientCoreBlockingTest, BlockingCallOnTheThreadDrivingAManualRuntimeFailsFast) {
  stats::StatsRegistry registry;
  auto clock = std::make_shared<ManualClock>();
  auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock, .seed = 42});
  FakeTransportFactory factory(runtime->loop(0));
  http::HttpOptions options;
  options.client = SingleEndpointOptions("driven", runtime, registry);
  options.client.open_timeout = seconds(1);
  runtime->RunUntilIdle();  // this thread drives the runtime from now on
  // Build() does not wait for the open on the driving thread (nothing would run it meanwhile:
  // it used to wait the whole open_timeout and fail with kOpenTimeout).
  http::HttpClient client =
      http::HttpClientBuilder(options)
          .ReplaceRole("transport", SinkProvider{"transport", "fake", [&](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                                                   return factory.Create(ctx);
                                                 }})
          .Build();
  runtime->RunUntilIdle();  // the open
  EXPECT_TRUE(client.core()->IsLoopThread());
  EXPECT_FALSE(std::async(std::launch::async, [&] { return client.core()->IsLoopThread(); }).get());
  try {
    client.Get("/");
    ADD_FAILURE() << "the blocking call returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kBlockingCallOnEventLoop);
    EXPECT_THAT(e.what(), HasSubstr("client driven"));
  }
  client.Close();
  client = {};
  runtime->RunUntilIdle();
  runtime.reset();
  factory.Clear();
}

// An open still pending on loop 1 when the client and its (threaded) runtime go: the client's
// Close() answers it there, and its handler (no executor of its own) is completed on loop 0.
// The runtime's destructor lets each loop run out of work, loop 0 first: loop 0 did not count
// the open as work, so it had stopped before loop 1 posted the handler to it, which was then
// destroyed unrun: the caller never heard of its open.
TEST(ClientCoreOpenTest, AnOpenPendingWhenTheRuntimeGoesStillCompletes) {
  stats::StatsRegistry registry;
  auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 2});
  FakeTransportFactory factory(runtime->loop(0));
  ClientOptions options = SingleEndpointOptions("opening", runtime, registry);
  options.open_timeout = Duration::zero();
  // Holds the runtime.
  auto core = std::make_shared<ClientCore>(std::move(options), TimeoutOverFakes([&](const SinkContext& ctx) -> SinkPtr {
                                             auto fake = factory.Create(ctx);
                                             // Loop 1's connection never opens on its own.
                                             if (ctx.loop->index() == 1) {
                                               fake->set_open_mode(FakeTransport::OpenMode::kHang);
                                             }
                                             return fake;
                                           }));
  auto completions = std::make_shared<std::atomic<int>>(0);
  std::promise<error_code> opened;
  auto result = opened.get_future();
  core->AsyncOpen([completions, &opened](error_code ec) {
    if (completions->fetch_add(1) == 0) opened.set_value(ec);
  });
  // Loop 1 answers the open (in the client's Close()) only once loop 0 had the chance to run
  // out of work and stop (or a while has passed, when it has not).
  boost::asio::io_context* loop0 = &runtime->loop(0).io_context();
  boost::asio::post(runtime->loop(1).executor(), [loop0] {
    const auto give_up = std::chrono::steady_clock::now() + milliseconds(300);
    while (!loop0->stopped() && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
  });
  core.reset();
  runtime.reset();  // joins both loop threads
  EXPECT_EQ(completions->load(), 1) << "the open's handler was dropped";
  ASSERT_EQ(result.wait_for(seconds(0)), std::future_status::ready);
  EXPECT_EQ(result.get(), Errc::kClientClosed);  // loop 1's open, answered by Close()
  factory.Clear();
}

// An open whose initiation a token defers (deferred, use_awaitable) and that starts after the
// caller let the client go, on another thread: the operation holds the client until then. It
// used to hold only `this`, and the open ran on a destroyed client.
TEST(ClientCoreOpenTest, ADeferredOpenKeepsItsClientUntilItStarts) {
  stats::StatsRegistry registry;
  auto clock = std::make_shared<ManualClock>();
  auto runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock, .seed = 42});
  FakeTransportFactory factory(runtime->loop(0));
  auto core = std::make_shared<ClientCore>(
      SingleEndpointOptions("deferred-open", runtime, registry),
      TimeoutOverFakes([&](const SinkContext& ctx) -> SinkPtr { return factory.Create(ctx); }));
  std::weak_ptr<ClientCore> weak = core;
  auto open = core->AsyncOpen(boost::asio::deferred);
  core.reset();
  ASSERT_FALSE(weak.expired()) << "the deferred open does not hold its client";
  int completions = 0;
  std::thread([&completions, open = std::move(open)]() mutable {
    std::move(open)([&completions](error_code) { ++completions; });
  }).join();
  runtime->RunUntilIdle();
  EXPECT_EQ(completions, 1);
  EXPECT_TRUE(weak.expired()) << "the client outlived its open";
  factory.Clear();
}

}  // namespace
}  // namespace scales
