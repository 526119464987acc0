// The ThriftMux client against the Mux reference server (tests/integration/mux_reference/,
// Python, written independently of the C++ codec): Finagle-style, strict (handshake required,
// pings, fragments at a small mux-framer) and old (no negotiation) servers, and every
// misbehaviour on demand. Every call completes exactly once; tags are freed; the client
// recovers for the next call.
#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <future>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "Derived.h"
#include "Echo.h"
#include "scales/mux/codec.h"
#include "scales/mux/session.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/fake_sinks.h"
#include "support/fixtures.h"
#include "support/log_capture.h"
#include "support/mux_server_fixture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;
using scales::echo::EchoError;

std::shared_ptr<Runtime> MakeRuntime(size_t threads = 1) {
  RuntimeOptions o;
  o.threads = threads;
  return std::make_shared<Runtime>(o);
}

thriftmux::ThriftMuxOptions Options(std::shared_ptr<Runtime> rt, stats::StatsRegistry* stats = nullptr) {
  thriftmux::ThriftMuxOptions o;
  o.client.name = "tmux";
  o.client.runtime = std::move(rt);
  o.client.stats = stats;
  o.client.timeout = 5s;
  o.client_id = "scales-test";
  o.resurrector.initial_backoff = 50ms;
  o.resurrector.max_backoff = 200ms;
  return o;
}

template <class Pred>
bool Eventually(Pred pred, std::chrono::milliseconds timeout = 5000ms) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

int64_t GaugeValue(const stats::StatsRegistry& s, const char* name, const std::string& endpoint) {
  const auto* g = s.FindGauge(name, {{"client", "tmux"}, {"endpoint", endpoint}});
  return g ? g->value() : -1;
}

error_code CallError(const thrift::ThriftClient<EchoClient>& client, const std::string& arg,
                     std::string* what = nullptr) {
  try {
    std::string r;
    client->echo(r, arg);
    return {};
  } catch (const Error& e) {
    if (what) *what = e.what();
    return e.scales_code();
  }
}

TEST(ThriftMuxTest, FinagleServerEveryCallStyle) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  std::string r;
  client->echo(r, "hi");
  EXPECT_EQ(r, "hi");
  client->ping();
  try {
    client->fail(r, "bad thing");
    FAIL() << "expected EchoError";
  } catch (const EchoError& e) {
    EXPECT_EQ(e.message, "bad thing");  // the declared exception, as itself
  }
  auto f = SCALES_THRIFT_CALL(client, echo, std::string("async"), boost::asio::use_future);
  EXPECT_EQ(f.get(), "async");
  auto slow = SCALES_THRIFT_CALL(client, sleep, 100, boost::asio::use_future);
  auto fast = SCALES_THRIFT_CALL(client, echo, std::string("fast"), boost::asio::use_future);
  EXPECT_EQ(fast.get(), "fast");  // answered before the slow one: out of order on one session
  EXPECT_EQ(slow.get(), "100");
  // The handshake happened and the contexts went out.
  EXPECT_TRUE(server.WaitForLog({"recv Rerr", "tag=1"}));
  EXPECT_TRUE(server.WaitForLog({"recv Tinit"}));
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch", "com.twitter.finagle.Deadline",
                                 "com.twitter.finagle.thrift.ClientIdContext"}));
  client->echo(r, "contexts");
  EXPECT_NE(r.find("com.twitter.finagle.Retries"), std::string::npos) << r;
}

TEST(ThriftMuxTest, OldServerWithoutNegotiation) {
  test::MuxReferenceServer server({"--mode", "old"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  std::string r;
  client->echo(r, "old school");
  EXPECT_EQ(r, "old school");
  EXPECT_EQ(server.LogLinesWith({"recv Tinit"}).size(), 0u) << server.Log();
}

// Duration::max() for the session's timers means "never": their deadlines (now + duration)
// used to overflow into the past, so every open failed at once with kConnectTimeout, and a
// ping_interval of Duration::max() re-armed its timer in the past for ever, spinning the loop.
TEST(ThriftMuxTest, DurationMaxSessionTimersMeanNever) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = Options(MakeRuntime(1));
  options.session.connect_timeout = Duration::max();
  options.session.ping_interval = Duration::max();
  options.session.ping_timeout = Duration::max();
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  std::string r;
  client->echo(r, "first");
  EXPECT_EQ(r, "first");
  std::this_thread::sleep_for(200ms);  // a loop spinning on a timer would not answer below
  client->echo(r, "second");
  EXPECT_EQ(r, "second");
  EXPECT_EQ(server.LogLinesWith({"recv Tping"}).size(), 0u) << "no ping was due";
}

TEST(ThriftMuxTest, StrictServerFragmentsAndPings) {
  test::MuxReferenceServer server({"--mode", "strict", "--framer", "16", "--ping-interval", "50"});
  auto opts = Options(MakeRuntime());
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), opts);
  std::string big(20000, 'x');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  std::string r;
  client->echo(r, big);
  EXPECT_EQ(r, big);  // the reply came in 16-byte fragments and was reassembled
  // Our request honoured the server's mux-framer: it arrived in fragments too.
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch-fragment"})) << server.Log().substr(0, 2000);
  // The server pings; the client answers.
  EXPECT_TRUE(server.WaitForLog({"recv Rping"}));
  client->echo(r, "after pings");
  EXPECT_EQ(r, "after pings");
}

// The handshake's frame limit (mux::kMaxHandshakeFrameSize, 64 KiB) ends with the handshake: a
// reply of 1 MiB in one frame is accepted on the open session (max_frame_size, 32 MiB).
TEST(ThriftMuxTest, ARepliesFrameOverTheHandshakeLimitIsAcceptedOnceOpen) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client =
      ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  std::string big(1u << 20, 'x');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  std::string r;
  client->echo(r, big);
  EXPECT_EQ(r, big);
  const auto sent = server.LogLinesWith({"send Rdispatch"});
  ASSERT_EQ(sent.size(), 1u) << server.Log().substr(0, 2000);
  EXPECT_EQ(sent[0].find("fragments="), std::string::npos) << sent[0];  // one frame
}

TEST(ThriftMuxTest, ThousandsOfConcurrentCallsOnOneSession) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  stats::StatsRegistry stats;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime(), &stats));
  constexpr int kCalls = 3000;
  std::vector<std::future<std::string>> futures;
  futures.reserve(kCalls);
  for (int i = 0; i < kCalls; ++i) {
    futures.push_back(SCALES_THRIFT_CALL(client, echo, "m" + std::to_string(i), boost::asio::use_future));
  }
  int ok = 0;
  for (int i = 0; i < kCalls; ++i) ok += futures[i].get() == "m" + std::to_string(i);
  EXPECT_EQ(ok, kCalls);
  EXPECT_EQ(GaugeValue(stats, "scales_mux_tags_in_use", server.endpoint()), 0);
  // One session (one connection) carried them all, and tags were reused: none got past the
  // number of calls in flight at once.
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty());
  EXPECT_TRUE(server.LogLinesWith({"recv Tdispatch tag=3002"}).empty());
}

// Calls echo("noreply"), which the reference server never answers, with a timeout; expects
// kRequestTimeout and returns the error's text ("" when the call did not time out).
template <typename Client>
std::string CallNoReply(Client& client, Duration timeout) {
  CallOptions quick;
  quick.timeout = timeout;
  try {
    std::string r;
    client.WithOptions(quick)->echo(r, "noreply");
    ADD_FAILURE() << "expected a timeout, got a reply";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kRequestTimeout) << e.what();
    return e.what();
  }
  return "";
}

// Runs kChains chains of kLength echo calls on the client, each call started by the previous
// one's handler, and checks that every one was answered once, with its own reply.
template <typename Client>
void RunChainedCalls(Client& client) {
  constexpr int kChains = 32;
  constexpr int kLength = 40;
  std::atomic<int> ok{0};
  std::atomic<int> failed{0};
  std::atomic<int> chains_done{0};
  std::promise<void> all_done;
  std::function<void(int, int)> next = [&](int chain, int step) {
    const std::string m = "c" + std::to_string(chain) + "." + std::to_string(step);
    SCALES_THRIFT_CALL(client, echo, m, [&, chain, step, m](std::exception_ptr e, std::string r) {
      if (!e && r == m) {
        ++ok;
      } else {
        ++failed;
      }
      if (step + 1 < kLength) {
        next(chain, step + 1);
      } else if (++chains_done == kChains) {
        all_done.set_value();
      }
    });
  };
  for (int c = 0; c < kChains; ++c) next(c, 0);
  ASSERT_EQ(all_done.get_future().wait_for(30s), std::future_status::ready) << ok.load() << " ok";
  EXPECT_EQ(ok.load(), kChains * kLength);
  EXPECT_EQ(failed.load(), 0);
}

// Handlers run inside the session's read loop, and the requests they start are written
// together: at the end of the read's frames, or earlier in a few writes when many are waiting
// (SessionOptions::write_splits; with 1000 every 4 requests, the minimum, so a write is often
// still in flight when the next requests queue and the read ends). Every chained request must
// still go out: 32 chains of 40 calls each, each call started by the previous one's handler; a
// request left unwritten would end in a timeout (the client's 5 s), failing the count or the wait.
class WriteSplitsTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(WriteSplitsTest, CallsStartedFromHandlersAreAllWrittenAndAnswered) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = Options(MakeRuntime());
  options.session.write_splits = GetParam();
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  RunChainedCalls(client);
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty()) << "one session throughout";
}

INSTANTIATE_TEST_SUITE_P(ThriftMuxTest, WriteSplitsTest, ::testing::Values(1u, 4u, 1000u),
                         [](const ::testing::TestParamInfo<uint32_t>& info) {
                           return "Splits" + std::to_string(info.param);
                         });

// Loops that busy-poll (RuntimeOptions::busy_poll) serve the same traffic: chained calls from
// handlers, blocking calls from other threads, and a timeout, whose timer fires while the loop
// spins or after it went back to sleep; the session answers each call once.
TEST(ThriftMuxTest, BusyPollingLoopsAnswerEveryCallAndFireTimeouts) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  RuntimeOptions runtime_options;
  runtime_options.threads = 2;
  runtime_options.busy_poll = 200us;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Options(std::make_shared<Runtime>(runtime_options)));
  RunChainedCalls(client);
  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        const std::string m = "t" + std::to_string(t) + "." + std::to_string(i);
        std::string r;
        client->echo(r, m);
        ok += r == m;
      }
    });
  }
  for (auto& c : callers) c.join();
  EXPECT_EQ(ok.load(), 400);
  EXPECT_NE(CallNoReply(client, 100ms), "");
  std::string r;
  client->echo(r, "after");
  EXPECT_EQ(r, "after");
}

// Completion handlers that throw run inside the session's read loop: the exception is logged
// and dropped, and the session goes on answering every other call (none hangs).
// Starts `slow` calls that the server answers after 3 s, then one that it answers at once, whose
// handler releases the last handle to `client` (the client holds the last reference to its
// runtime). The client's shutdown must still run on every loop and answer the slow calls
// (kClientClosed), and nothing may be used after it is freed.
void ReleaseInOwnCallback(thrift::ThriftClient<EchoClient> client, const test::MuxReferenceServer& server,
                          int slow_calls) {
  std::vector<std::future<std::string>> slow;
  for (int i = 0; i < slow_calls; ++i) {
    slow.push_back(SCALES_THRIFT_CALL(client, sleep, 3000 + i, boost::asio::use_future));
  }
  for (int i = 0; i < slow_calls; ++i) {
    ASSERT_TRUE(server.WaitForLog({"method=sleep", "arg=" + std::to_string(3000 + i)})) << server.Log();
  }
  // Shared with the handler, which may outlive this function when an assertion below fails.
  auto last = std::make_shared<std::promise<std::exception_ptr>>();
  auto dropped = std::make_shared<std::promise<void>>();
  auto released = last->get_future();
  SCALES_THRIFT_CALL(client, sleep, 100,
                     [last, dropped = dropped->get_future().share(), c = client](std::exception_ptr e, std::string) mutable {
                       dropped.wait();  // this thread's handle is gone: the handler's is the last
                       c = {};          // the client goes, and with it the last reference to the runtime
                       last->set_value(e);
                     });
  client = {};
  dropped->set_value();
  ASSERT_EQ(released.wait_for(10s), std::future_status::ready);
  EXPECT_FALSE(released.get()) << "the call answered before the client was released";
  for (int i = 0; i < slow_calls; ++i) {
    ASSERT_EQ(slow[i].wait_for(10s), std::future_status::ready) << "call " << i << " never completed";
    try {
      slow[i].get();
      ADD_FAILURE() << "call " << i << " was answered after its client was released";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kClientClosed) << e.what();
    }
  }
}

// Two loops, slow calls on both (one session each). (The runtime's destructor stopped the
// callback's loop with the client's close still queued on it: the calls there never completed,
// and the process died of a pure virtual call.)
TEST(ThriftMuxTest, ClientOwningItsRuntimeReleasedInItsOwnCallback) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  ReleaseInOwnCallback(ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime(2))),
                       server, 4);
  EXPECT_EQ(server.LogLinesWith({"recv Tinit"}).size(), 2u) << "one session per loop";
}

// The same on a runtime wrapping an io_context run by another thread. (The loop was destroyed
// with the runtime, under the client's close queued on the io_context: a use after free.)
TEST(ThriftMuxTest, ClientOwningAWrappedIoContextRuntimeReleasedInItsOwnCallback) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  boost::asio::io_context ioc;
  auto work = boost::asio::make_work_guard(ioc);
  std::thread runner([&ioc] { ioc.run(); });
  ReleaseInOwnCallback(
      ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(std::make_shared<Runtime>(ioc))),
      server, 2);
  work.reset();
  runner.join();  // the closed client leaves nothing behind: the io_context runs out of work
}

TEST(ThriftMuxTest, ThrowingHandlersLeaveTheSessionServingTheOtherCalls) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  test::LogCapture log(LogLevel::kError);
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  constexpr int kEach = 200;
  std::atomic<int> handled{0};
  std::promise<void> all_handled;
  std::vector<std::future<std::string>> futures;
  for (int i = 0; i < kEach; ++i) {
    SCALES_THRIFT_CALL(client, echo, "t" + std::to_string(i), [&](std::exception_ptr e, std::string r) {
      if (++handled == kEach) all_handled.set_value();
      if (!e) throw std::runtime_error("user handler broke on " + r);
    });
    futures.push_back(SCALES_THRIFT_CALL(client, echo, "f" + std::to_string(i), boost::asio::use_future));
  }
  ASSERT_EQ(all_handled.get_future().wait_for(10s), std::future_status::ready) << handled.load();
  int ok = 0;
  for (int i = 0; i < kEach; ++i) ok += futures[i].get() == "f" + std::to_string(i);
  EXPECT_EQ(ok, kEach);
  std::string back;
  client->echo(back, "after");
  EXPECT_EQ(back, "after");
  EXPECT_TRUE(log.Has({"a handler on an event loop threw", "user handler broke on t"})) << log.All();
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty()) << "one session throughout";
}

TEST(ThriftMuxTest, TimeoutSendsTdiscardedAndKeepsTheTagUntilAnswered) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  stats::StatsRegistry stats;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime(), &stats));
  auto start = std::chrono::steady_clock::now();
  const std::string what = CallNoReply(client, 200ms);
  EXPECT_NE(what.find("Tdiscarded sent"), std::string::npos) << what;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
  EXPECT_TRUE(server.WaitForLog({"recv Tdiscarded", "which=2"})) << server.Log();
  // The server answers the discarded tag (Rdiscarded): the tag is freed.
  EXPECT_TRUE(Eventually([&] { return GaugeValue(stats, "scales_mux_tags_in_use", server.endpoint()) == 0; }));
  std::string r;
  client->echo(r, "next");
  EXPECT_EQ(r, "next");
  // Tags are reused from the lowest free one: the next dispatch used tag 2 again.
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch tag=2", "method=echo"}));
}

TEST(ThriftMuxTest, ServerErrorsMapToDistinctCodes) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  std::string what;
  EXPECT_EQ(CallError(client, "nack", &what), Errc::kNack) << what;
  EXPECT_TRUE(error_code(Errc::kNack) == Condition::kRetryable);
  const size_t retryable_nacks = server.LogLinesWith({"send Rdispatch", "nack"}).size();
  EXPECT_GT(retryable_nacks, 1u) << "a retryable Nack is retried\n" << server.Log();
  // MuxFailure NonRetryable (Finagle's NonRetryableNackFailure): its own code, not retried.
  EXPECT_EQ(CallError(client, "nack-final", &what), Errc::kNonRetryableNack) << what;
  EXPECT_FALSE(error_code(Errc::kNonRetryableNack) == Condition::kRetryable);
  EXPECT_NE(what.find(fmt::format("{} refused the request (Nack, flagged rejected, non-retryable); it was not "
                                   "processed and must not be retried",
                                   server.endpoint())),
            std::string::npos)
      << what;
  EXPECT_EQ(server.LogLinesWith({"send Rdispatch", "nack-final"}).size(), 1u) << server.Log();
  EXPECT_EQ(CallError(client, "error:it broke", &what), Errc::kServerError);
  EXPECT_NE(what.find("it broke"), std::string::npos) << what;
  EXPECT_EQ(CallError(client, "rerr:session trouble", &what), Errc::kServerError);
  EXPECT_NE(what.find("session trouble"), std::string::npos) << what;
  EXPECT_EQ(CallError(client, "fine"), error_code());
}

// An Rdispatch Error whose MuxFailure context has the Retryable (1) or Rejected (2) flag, and
// not NonRetryable (4), is a retryable kNack (Finagle's requeue filter re-issues such work), so
// the retry sink sends it again: 3 attempts (max_retries 2), each answered with the error.
// Without those flags, or with NonRetryable, it stays kServerError, sent once. The detail keeps
// the server's message and names the flags. They used to be kServerError with or without flags.
TEST(ThriftMuxTest, RdispatchErrorFlaggedRetryableOrRejectedIsARetriedNack) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  struct Case {
    int flags;
    Errc code;
    const char* flagged;  // what the detail says after the endpoint
    size_t attempts;
  };
  const Case cases[] = {
      {1, Errc::kNack, " (flagged retryable)", 3},
      {2, Errc::kNack, " (flagged rejected)", 3},
      {3, Errc::kNack, " (flagged retryable, rejected)", 3},
      {5, Errc::kServerError, " (flagged retryable, non-retryable)", 1},
      {6, Errc::kServerError, " (flagged rejected, non-retryable)", 1},
      {0, Errc::kServerError, "", 1},
  };
  for (const Case& c : cases) {
    const std::string arg = fmt::format("error-flags:{}:broken {}", c.flags, c.flags);
    SCOPED_TRACE(arg);
    std::string what;
    EXPECT_EQ(CallError(client, arg, &what), c.code) << what;
    EXPECT_NE(what.find(fmt::format("server error from {}{}: broken {}", server.endpoint(), c.flagged, c.flags)),
              std::string::npos)
        << what;
    EXPECT_EQ(server.LogLinesWith({"recv Tdispatch", "arg=" + arg}).size(), c.attempts) << server.Log();
  }
  EXPECT_EQ(CallError(client, "fine"), error_code());
}

// A server that fails a call once with an Rdispatch Error flagged Retryable and answers its
// retry: the caller gets the reply, and the server saw the request twice, the second time with
// the Retries context at 1. Flagged NonRetryable as well, the error reaches the caller.
TEST(ThriftMuxTest, RetrySinkRepeatsARetryableServerError) {
  {
    test::MuxReferenceServer server({"--mode", "finagle", "--fail-first", "1", "--fail-flags", "1"});
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
    std::string r;
    client->echo(r, "again");
    EXPECT_EQ(r, "again");
    EXPECT_EQ(server.LogLinesWith({"send Rdispatch", "error fail-first"}).size(), 1u) << server.Log();
    EXPECT_EQ(server.LogLinesWith({"recv Tdispatch", "retries=0", "arg=again"}).size(), 1u) << server.Log();
    EXPECT_EQ(server.LogLinesWith({"recv Tdispatch", "retries=1", "arg=again"}).size(), 1u) << server.Log();
  }
  {
    test::MuxReferenceServer server({"--mode", "finagle", "--fail-first", "1", "--fail-flags", "5"});
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
    std::string what;
    EXPECT_EQ(CallError(client, "once", &what), Errc::kServerError) << what;
    EXPECT_NE(what.find("fails its first 1 calls"), std::string::npos) << what;
    EXPECT_EQ(server.LogLinesWith({"recv Tdispatch", "arg=once"}).size(), 1u) << server.Log();
  }
}

TEST(ThriftMuxTest, DrainLeaseGarbageAndCloseMidFrameRecover) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  std::string r;
  client->echo(r, "drain");
  EXPECT_EQ(r, "drain");
  EXPECT_TRUE(server.WaitForLog({"recv Rdrain"})) << server.Log();
  // After the drain the session closes; the next call gets a new session.
  EXPECT_TRUE(Eventually([&] { return CallError(client, "after drain") == error_code(); }));
  client->echo(r, "lease:1");
  EXPECT_EQ(r, "lease:1");
  std::string what;
  error_code ec = CallError(client, "garbage", &what);
  EXPECT_EQ(ec, Errc::kProtocolError) << what;
  EXPECT_TRUE(Eventually([&] { return CallError(client, "after garbage") == error_code(); }));
  ec = CallError(client, "close-mid-frame", &what);
  EXPECT_EQ(ec, Errc::kConnectionClosed) << what;
  EXPECT_TRUE(Eventually([&] { return CallError(client, "after close") == error_code(); }));
}

// The server stops reading, and sends Tdrain 1.5 s later, while the client is still writing
// its last request (16 MiB, more than the loopback socket buffers hold), which times out at 3 s.
// The session is drained, but Rdrain (and the Tdiscarded) are queued behind the unfinished
// write. The server reads again at 6 s.
// Returns the client, which must live on for its session to.
thrift::ThriftClient<EchoClient> DrainWhileTheLastWriteStalls(test::MuxReferenceServer& server,
                                                              thriftmux::ThriftMuxOptions options) {
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), std::move(options));
  const std::string stall = "drain-stalled:1500:6000";
  auto drain = SCALES_THRIFT_CALL(client, echo, stall, boost::asio::use_future);
  EXPECT_TRUE(server.WaitForLog({"stall tag=2"})) << server.Log();
  CallOptions quick;
  quick.timeout = 3000ms;
  auto big = SCALES_THRIFT_CALL(client.WithOptions(quick), echo, std::string(16u << 20, 'x'), boost::asio::use_future);
  EXPECT_EQ(drain.get(), stall);
  try {
    big.get();
    ADD_FAILURE() << "the 16 MiB call was answered\n" << server.Log();
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kRequestTimeout) << e.what();
  }
  return client;
}

// The Rdrain must reach the server before the session closes. (The session closed at once,
// and the server never got its Rdrain.)
TEST(ThriftMuxTest, RdrainIsWrittenBeforeADrainedSessionCloses) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = Options(MakeRuntime());
  options.session.ping_timeout = 20s;  // the bound of the wait below: far away
  auto client = DrainWhileTheLastWriteStalls(server, options);
  ASSERT_TRUE(server.WaitForLog({"resume reading"}, 15s)) << server.Log();
  EXPECT_TRUE(server.WaitForLog({"recv Rdrain"})) << server.Log();
  EXPECT_EQ(server.LogLinesWith({"conn=1 recv Tdispatch", "size=16777"}).size(), 1u)
      << "the 16 MiB call was not written on the drained session\n" << server.Log();
}

// The wait for that write is bounded by session.ping_timeout, pings on or off: a server that
// does not read cannot be told anything, and a draining session refuses new requests.
TEST(ThriftMuxTest, ADrainedSessionWaitsForItsLastWriteOnlyUntilThePingTimeout) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  test::LogCapture log(LogLevel::kInfo);
  auto options = Options(MakeRuntime());
  options.session.ping_interval = Duration::zero();
  options.session.ping_timeout = 500ms;
  auto client = DrainWhileTheLastWriteStalls(server, options);
  EXPECT_TRUE(Eventually([&] { return log.Has({"drained, but the write to", "(limit session.ping_timeout = 500 ms)"}); }))
      << log.All();
  EXPECT_TRUE(server.LogLinesWith({"resume reading"}).empty()) << "the session waited for the server";
}

TEST(ThriftMuxTest, SessionEventsAreLogged) {
  // Tdrain, the drained close, a protocol error (with the endpoint and the detail) and a ping
  // timeout each write a log line naming the endpoint.
  test::MuxReferenceServer server({"--mode", "finagle", "--no-ping-reply"});
  test::LogCapture log;
  auto opts = Options(MakeRuntime());
  opts.session.ping_interval = 50ms;
  opts.session.ping_timeout = 100ms;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), opts);
  const std::string& ep = server.endpoint();
  std::string r;
  client->echo(r, "drain");
  EXPECT_TRUE(Eventually([&] { return log.Has({"Mux session to " + ep, "Tdrain received"}); })) << log.All();
  EXPECT_TRUE(Eventually([&] { return log.Has({"Mux session to " + ep, "drained"}); })) << log.All();
  EXPECT_TRUE(Eventually([&] { return CallError(client, "garbage") == Errc::kProtocolError; }));
  EXPECT_TRUE(log.Has({"Mux session to " + ep + " closed", "unknown mux message type", "[protocol_error]"}))
      << log.All();
  EXPECT_TRUE(Eventually([&] { return CallError(client, "hello") == error_code(); }));  // a new session
  EXPECT_TRUE(Eventually([&] { return log.Has({"no Rping from " + ep, "(limit session.ping_timeout = 100 ms)"}); }))
      << log.All();
}

TEST(ThriftMuxTest, OnewayCallsAreRefused) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<scales::thrifttest::DerivedClient>("tcp://" + server.endpoint(),
                                                                         Options(MakeRuntime()));
  auto f = SCALES_THRIFT_ONEWAY(client, notify, std::string("x"), boost::asio::use_future);
  try {
    f.get();
    FAIL() << "expected kInvalidArgument";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("one-way"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// `scales testserver thriftmux` (the demo's and the benchmarks' server) with the client.
TEST(ThriftMuxTest, ToolTestServer) {
  test::ChildProcess server({test::ToolPath(), "testserver", "thriftmux", "--port", "0", "--framer", "64"});
  auto line = server.ReadLine(std::chrono::seconds(10));
  ASSERT_TRUE(line.has_value());
  ASSERT_EQ(line->rfind("listening 127.0.0.1:", 0), 0u) << *line;
  std::string endpoint = line->substr(std::string("listening ").size());
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + endpoint, Options(MakeRuntime()));
  std::string r;
  client->echo(r, std::string(1000, 'z'));  // fragmented both ways at 64 bytes
  EXPECT_EQ(r, std::string(1000, 'z'));
  auto slow = SCALES_THRIFT_CALL(client, sleep, 150, boost::asio::use_future);
  auto fast = SCALES_THRIFT_CALL(client, echo, std::string("fast"), boost::asio::use_future);
  EXPECT_EQ(fast.get(), "fast");
  EXPECT_EQ(slow.get(), "150");
  try {
    client->fail(r, "nope");
    FAIL() << "expected EchoError";
  } catch (const EchoError& e) {
    EXPECT_EQ(e.message, "nope");
  }
  client->echo(r, "drain");
  EXPECT_TRUE(Eventually([&] { return CallError(client, "after drain") == error_code(); }));
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// Request headers beyond the Mux limit (the Request.headers context holds 32767 bytes): the
// tail that does not fit is left out, as Finagle does, and the call goes on; the server gets,
// and echoes, the pairs that fit. Not silently: a warning names the client, the method, the
// endpoint and how many were left out (they were dropped without a word).
TEST(ThriftMuxTest, RequestHeadersBeyondTheMuxLimitAreDroppedWithAWarning) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  test::LogCapture log(LogLevel::kWarning);
  auto options = Options(MakeRuntime());
  options.client.name = "big-headers";
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  CallInfo info;
  CallOptions opts;
  opts.headers = {{"a", std::string(20000, 'x')}, {"b", std::string(12000, 'y')},
                  {"c", std::string(1000, 'z')}, {"d", "small"}};
  opts.info = &info;
  std::string r;
  client.WithOptions(opts)->echo(r, "big headers");
  EXPECT_EQ(r, "big headers");
  ASSERT_EQ(info.response_headers.size(), 2u);
  EXPECT_EQ(info.response_headers[0].first, "a");
  EXPECT_EQ(info.response_headers[1].first, "b");
  EXPECT_TRUE(log.Has({"client big-headers: Mux request echo to " + server.endpoint(), "2 of its 4 header(s) not sent",
                       "at most 32767 bytes"}))
      << log.All();
  // Within the limit: no warning.
  log.Clear();
  opts.headers = {{"x-tenant", "blue"}};
  client.WithOptions(opts)->echo(r, "small headers");
  EXPECT_EQ(info.response_headers.size(), 1u);
  EXPECT_FALSE(log.Has({"not sent"})) << log.All();
}

TEST(ThriftMuxTest, HeadersTraceAndCancellation) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  // Request headers go out as the Request.headers context; the server echoes them back as
  // response headers, which reach CallInfo. The trace context goes out as given.
  CallInfo info;
  CallOptions opts;
  opts.headers = {{"x-tenant", "blue"}};
  opts.trace = TraceContext{0x1111, 0x2222, 0x3333, 2};
  opts.info = &info;
  std::string r;
  client.WithOptions(opts)->echo(r, "with headers");
  EXPECT_EQ(r, "with headers");
  ASSERT_EQ(info.response_headers.size(), 1u);
  EXPECT_EQ(info.response_headers[0], (std::pair<std::string, std::string>{"x-tenant", "blue"}));
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch", "com.twitter.finagle.tracing.TraceContext", "trace=1111/3333/2222/2"}))
      << server.Log();
  // Asio cancellation: the call completes with kCancelled and the server gets Tdiscarded.
  boost::asio::cancellation_signal signal;
  std::promise<std::exception_ptr> got;
  SCALES_THRIFT_CALL(client, echo, std::string("noreply"),
                     boost::asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, std::string) {
                       got.set_value(e);
                     }));
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch", "arg=noreply"}));
  signal.emit(boost::asio::cancellation_type::terminal);
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::seconds(2)), std::future_status::ready);
  try {
    std::rethrow_exception(f.get());
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kCancelled) << e.what();
  }
  EXPECT_TRUE(server.WaitForLog({"recv Tdiscarded"}));
  client->echo(r, "still fine");
  EXPECT_EQ(r, "still fine");
}

// A cancellation slot keeps its handler after the call completed (the signal is the caller's).
// Emitting it once the client and its runtime are gone does nothing. (The handler held the
// call's loop by a raw pointer: ASan reported the loop used after it was freed.)
TEST(ThriftMuxTest, CancellationSignalEmittedAfterTheRuntimeIsGone) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  boost::asio::cancellation_signal signal;
  std::promise<std::string> got;
  SCALES_THRIFT_CALL(client, echo, std::string("answered"),
                     boost::asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, std::string r) {
                       got.set_value(e ? "failed" : r);
                     }));
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(f.get(), "answered");
  EXPECT_TRUE(signal.slot().has_handler());
  client = {};  // the runtime goes with it
  signal.emit(boost::asio::cancellation_type::terminal);
}

TEST(ThriftMuxTest, ExpiredLeaseMakesTheSessionBusy) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  stats::StatsRegistry stats;
  auto o = Options(MakeRuntime(), &stats);
  o.balancer.kind = BalancerKind::kHeap;  // counts scales_lb_marked_down
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
  std::string r;
  client->echo(r, "lease:1");  // a 1 ms lease
  std::this_thread::sleep_for(20ms);
  client->echo(r, "after the lease");  // still served (the only node), but it was marked down
  EXPECT_EQ(r, "after the lease");
  const auto* down = stats.FindCounter("scales_lb_marked_down", {{"client", "tmux"}});
  ASSERT_NE(down, nullptr);
  EXPECT_GE(down->value(), 1);
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

TEST(ThriftMuxTest, UnansweredPingsCloseTheSession) {
  test::MuxReferenceServer server({"--mode", "finagle", "--no-ping-reply"});
  stats::StatsRegistry stats;
  auto opts = Options(MakeRuntime(), &stats);
  opts.session.ping_interval = 50ms;
  opts.session.ping_timeout = 100ms;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), opts);
  std::string r;
  client->echo(r, "hello");
  EXPECT_EQ(r, "hello");
  EXPECT_TRUE(server.WaitForLog({"recv Tping", "tag=1"}));
  auto timeouts = [&] {
    const auto* c = stats.FindCounter("scales_mux_ping_timeouts", {{"client", "tmux"}, {"endpoint", server.endpoint()}});
    return c ? c->value() : 0;
  };
  EXPECT_TRUE(Eventually([&] { return timeouts() >= 1; }));
  EXPECT_TRUE(server.WaitForLog({"close"}));  // the client closed the dead session
  // A new session serves the next call (until its own pings go unanswered).
  EXPECT_TRUE(Eventually([&] { return CallError(client, "again") == error_code(); }));
}

// A server honouring our mux-framer must never send a frame over our max_frame_size: we
// advertise the largest body it allows (max_frame_size - 4: the size field counts type and tag),
// so a reply larger than a frame comes in fragments and max_message_size decides.
TEST(ThriftMuxTest, RepliesLargerThanMaxFrameSizeComeInFragmentsOfTheAdvertisedSize) {
  mux::SessionOptions session;
  session.max_frame_size = 4096;
  EXPECT_EQ(mux::AdvertisedFragmentSize(session), 4092u);
  session.max_fragment_size = 1000;
  EXPECT_EQ(mux::AdvertisedFragmentSize(session), 1000u);

  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = Options(MakeRuntime());
  options.session.max_frame_size = 4096;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  const std::string big(20000, 'b');
  std::string r;
  client->echo(r, big);
  EXPECT_EQ(r, big);
  // The server cut the reply at the framer it was given: 4092 body bytes a frame.
  auto sent = server.LogLinesWith({"send Rdispatch", "fragments="});
  ASSERT_EQ(sent.size(), 1u) << server.Log();
  size_t size = 0;
  size_t fragments = 0;
  ASSERT_EQ(std::sscanf(sent[0].c_str() + sent[0].find("size="), "size=%zu fragments=%zu", &size, &fragments), 2)
      << sent[0];
  EXPECT_GT(size, 20000u);
  EXPECT_EQ(fragments, (size + 4091) / 4092) << sent[0];
  client->echo(r, "after");  // on the same session
  EXPECT_EQ(r, "after");
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty()) << server.Log();
}

// A frame must hold the messages that are never fragmented (Rinit, Rerr, a Nack's MuxFailure):
// the builder refuses a max_frame_size below mux::kMinMaxFrameSize. 4 used to pass, advertising
// a mux-framer of 1 byte.
TEST(ThriftMuxTest, MaxFrameSizeBelowTheMinimumIsRefused) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  for (uint32_t size : {4u, 5u, mux::kMinMaxFrameSize - 1, mux::kMaxWireFrameSize + 1, ~0u}) {
    auto options = Options(MakeRuntime());
    options.session.max_frame_size = size;
    try {
      ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
      ADD_FAILURE() << "max_frame_size " << size << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
      // Named, as every error of a client is.
      EXPECT_EQ(std::string(e.what()), "client tmux: session.max_frame_size must be in 512..2147483647");
    }
  }
  auto options = Options(MakeRuntime());
  options.session.max_frame_size = mux::kMinMaxFrameSize;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  std::string r;
  client->echo(r, "small frames");
  EXPECT_EQ(r, "small frames");
}

// ping_timeout also bounds a drained session's wait for its Rdrain, pings on or off: with pings
// off a negative one was accepted (and closed drained sessions at once, as 0 does); it is
// refused when the client is built, as a negative ping_interval is.
TEST(ThriftMuxTest, NegativePingTimeoutIsRefusedWithPingsOff) {
  auto options = Options(MakeRuntime());
  options.session.ping_interval = Duration::zero();
  options.session.ping_timeout = -1s;
  try {
    ThriftMux::NewClient<EchoClient>("tcp://127.0.0.1:9", options);
    ADD_FAILURE() << "a negative ping_timeout was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
    EXPECT_EQ(std::string(e.what()),
              "client tmux: session.ping_timeout must be >= 0 (0 with pings off: a drained session closes at once)");
  }
  options.session.ping_timeout = Duration::zero();  // pings off, no wait: allowed
  EXPECT_NO_THROW(ThriftMux::NewClient<EchoClient>("tcp://127.0.0.1:9", options));
}

// The ClientId context's value has a 2-byte length: a longer client_id is refused when the
// client is built, not by every call at encoding. The longest one is sent whole.
TEST(ThriftMuxTest, ClientIdLongerThanItsContextHoldsIsRefused) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = Options(MakeRuntime());
  options.client_id = std::string(0x10000, 'c');
  try {
    ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
    ADD_FAILURE() << "a client_id of 65536 bytes was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
    EXPECT_EQ(std::string(e.what()),
              "client tmux: client_id is 65536 bytes; limit 65535 (the ClientId context's 2-byte length)");
  }
  options.client_id.pop_back();
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  std::string r;
  client->echo(r, "longest id");
  EXPECT_EQ(r, "longest id");
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch", "client_id=" + options.client_id})) << "the id arrived cut";
}

// Against a reference server started with `args`, which sends a Tping during the handshake: the
// session answers it and opens, and serves the calls.
void ExpectTpingAnsweredAndCallsServed(std::vector<std::string> args) {
  test::MuxReferenceServer server(std::move(args));
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
  std::string r;
  client->echo(r, "hello");
  EXPECT_EQ(r, "hello");
  EXPECT_TRUE(server.WaitForLog({"conn=1 recv Rping tag=1"})) << server.Log();
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty()) << "one session\n" << server.Log();
}

// Before the probe's answer the server may already send a Tping or a Tdrain on tag 1 (a server
// pinging at once, or shutting down as we connect): only an Rerr on tag 1 answers the probe;
// the others are messages, answered with Rping / Rdrain.
TEST(ThriftMuxTest, TpingAndTdrainBeforeTheProbesAnswerAreAnswered) {
  ExpectTpingAnsweredAndCallsServed({"--mode", "old", "--greet", "tping"});
  {
    test::MuxReferenceServer server({"--mode", "finagle", "--greet", "tdrain"});
    auto options = Options(MakeRuntime());
    options.client.timeout = 500ms;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
    (void)CallError(client, "hello");  // a draining session takes no request: not the point here
    EXPECT_TRUE(server.WaitForLog({"conn=1 recv Rdrain tag=1"})) << server.Log();
  }
}

// After Tinit, before its Rinit, the server may ping (answered, and the session opens as
// negotiated) or start draining (answered with Rdrain; the open fails, retryably, and nothing is
// sent on that session): they used to fail the open as "answered Tinit with Tping instead of Rinit".
TEST(ThriftMuxTest, TpingAndTdrainBeforeRinitAreAnswered) {
  ExpectTpingAnsweredAndCallsServed({"--mode", "finagle", "--greet-after-tinit", "tping"});
  {
    test::MuxReferenceServer server({"--mode", "finagle", "--greet-after-tinit", "tdrain"});
    test::LogCapture log;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options(MakeRuntime()));
    std::string what;
    const error_code ec = CallError(client, "hello", &what);
    EXPECT_TRUE(ec == Condition::kRetryable) << ErrorName(ec) << ": " << what;
    EXPECT_TRUE(server.WaitForLog({"conn=1 recv Rdrain tag=1"})) << server.Log();
    EXPECT_TRUE(server.LogLinesWith({"recv Tdispatch"}).empty()) << server.Log();
    EXPECT_TRUE(log.Has({"Mux session to " + server.endpoint() + " failed to open",
                         "sent Tdrain before answering Tinit", "[nack]"}))
        << log.All();
  }
}

// --- The session alone (MuxSessionSink) on a manual runtime, against a raw peer ---------------

// A listening socket on 127.0.0.1 and the connection it accepts, which the test reads only when
// it says so: until then the client's writes fill the socket buffers and stop.
class QuietPeer {
 public:
  QuietPeer() {
    listen_ = ::socket(AF_INET, SOCK_STREAM, 0);
    const int small = 64 * 1024;  // a small receive window: the client's write stalls sooner
    ::setsockopt(listen_, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(listen_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_, 4) != 0 ||
        ::getsockname(listen_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      throw std::runtime_error("cannot listen on 127.0.0.1");
    }
    port_ = ntohs(addr.sin_port);
  }
  ~QuietPeer() {
    if (conn_ >= 0) ::close(conn_);
    ::close(listen_);
  }
  uint16_t port() const { return port_; }
  // Accepts the connection (the client's connect has completed in the kernel).
  void Accept() { conn_ = ::accept4(listen_, nullptr, nullptr, SOCK_NONBLOCK); }
  // What the client has sent since the last Read().
  std::string Read() {
    std::string out;
    char buf[64 * 1024];
    ssize_t n;
    while ((n = ::recv(conn_, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
    return out;
  }
  void Send(const std::string& bytes) { ASSERT_EQ(::send(conn_, bytes.data(), bytes.size(), 0), ssize_t(bytes.size())); }
  // Sends what the socket takes now of `bytes` and removes it from them.
  void SendSome(std::string& bytes) {
    const ssize_t n = ::send(conn_, bytes.data(), bytes.size(), MSG_DONTWAIT);
    if (n > 0) bytes.erase(0, static_cast<size_t>(n));
  }
  // Appends what the client has sent to `out`, and once its stream ended says how: 0 for the
  // client's FIN (a clean end after all it wrote), otherwise the errno (ECONNRESET: its RST,
  // which discards whatever its socket still held to send); nullopt while the stream goes on.
  std::optional<int> ReadToEnd(std::string& out) {
    char buf[64 * 1024];
    for (;;) {
      const ssize_t n = ::recv(conn_, buf, sizeof buf, 0);
      if (n > 0) {
        out.append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) return 0;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return std::nullopt;
      return errno;
    }
  }

 private:
  int listen_ = -1;
  int conn_ = -1;
  uint16_t port_ = 0;
};

// Runs the manual loop until `done` holds, waiting for socket events in between (bounded: the
// kernel delivers loopback bytes on its own time).
bool RunUntil(test::ManualEnv& env, const std::function<bool()>& done,
              std::chrono::seconds limit = std::chrono::seconds(10)) {
  const auto give_up = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    env.Run();
    auto& ioc = env.loop().io_context();
    if (ioc.stopped()) ioc.restart();
    ioc.run_one_for(std::chrono::milliseconds(1));
    env.Run();
  }
  return true;
}

// Accepts the session's connection, waits for its handshake probe and echoes it, as a server
// that negotiates does (Tinit follows). `received`: what the peer read.
void AcceptAndEchoTheProbe(test::ManualEnv& env, QuietPeer& peer, std::string& received) {
  peer.Accept();
  ASSERT_TRUE(RunUntil(env, [&] {
    received += peer.Read();
    return received.size() >= 19;  // the probe (mux-protocol.md 1.7)
  }));
  peer.Send(std::string("\x00\x00\x00\x0f\x7f\x00\x00\x01tinit check", 19));  // its echo
}

// One call through the session: its message, stack and Streams, and the sink at the bottom of
// the stack that records the completions.
class SessionCall {
 public:
  explicit SessionCall(std::string payload) : stack_(message_), catcher_(std::make_shared<Catcher>()) {
    request_.data = std::move(payload);
    message_.SetPayload(&request_);
    message_.SetReplySlot(&reply_);
    stack_.Push(catcher_.get());
  }
  void Start(mux::MuxSessionSink& session) { session.AsyncProcessRequest(stack_, message_, nullptr); }
  void Cancel(Errc reason = Errc::kRequestTimeout) { stack_.Cancel(make_error_code(reason)); }
  // Asio's `total` as the dispatcher passes it on: cancels only a request sent nowhere yet.
  void CancelUnsent() { stack_.CancelUnsent(make_error_code(Errc::kCancelled)); }
  CallProperties& properties() { return message_.properties; }
  int completions() const { return catcher_->completions; }
  const MethodReturnMessage& result() const { return catcher_->result; }
  const std::string& reply() const { return catcher_->reply; }

 private:
  class Catcher final : public ClientMessageSink {
   public:
    void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
    void AsyncProcessResponse(SinkStack&, void*, Stream* stream, MethodReturnMessage& msg) override {
      ++completions;
      result = msg;
      if (stream != nullptr) reply = stream->data;
    }
    void Close() override {}
    SinkStatus status() const override { return SinkStatus::kOpen; }
    std::string_view name() const override { return "test-catcher"; }
    int completions = 0;
    MethodReturnMessage result;
    std::string reply;

   protected:
    void DoOpen(OpenHandler) override {}
  };
  MethodCallMessage message_;
  SinkStack stack_;
  Stream request_;
  Stream reply_;
  std::shared_ptr<Catcher> catcher_;
};

// The server stops reading but keeps the connection open (pings off: nothing closes the
// session). Each new request queues behind the write that cannot finish and is cancelled (its
// timeout) before it was written: its caller is answered at once, and its bytes must go too,
// or the session grows with every request ever started. Then the same with the dispatches
// queued behind a control message (the Tdiscarded of the stuck request). The few requests
// that stay are written intact, in order, once the server reads again, and answered.
TEST(MuxSessionTest, RequestsCancelledBehindAStuckWriteGiveTheirBytesBack) {
  test::ManualEnv env;
  QuietPeer peer;
  mux::SessionOptions o;
  o.handshake = false;
  o.ping_interval = Duration::zero();
  auto session = std::make_shared<mux::MuxSessionSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", peer.port()}), o);
  bool opened = false;
  session->AsyncOpen([&](error_code ec) {
    EXPECT_FALSE(ec) << ec.message();
    opened = true;
  });
  peer.Accept();
  ASSERT_TRUE(RunUntil(env, [&] { return opened; }));

  // Far more than the socket buffers hold: this write never finishes while the peer does not read.
  SessionCall stuck(std::string(16u << 20, 's'));
  stuck.Start(*session);
  env.Run();
  constexpr size_t kPayload = 4096;
  std::vector<std::unique_ptr<SessionCall>> kept;
  size_t live_bytes = 0;  // of the requests that stay: payload and a generous frame overhead
  size_t cancelled = 0;
  for (int phase = 0; phase < 2; ++phase) {
    if (phase == 1) {
      stuck.Cancel();  // written in part: Tdiscarded is queued, the dispatches queue behind it
      env.Run();
      ASSERT_EQ(stuck.completions(), 1);
    }
    for (int i = 0; i < 3000; ++i) {
      if (i % 500 == 0) {
        kept.push_back(std::make_unique<SessionCall>(std::string(kPayload, static_cast<char>('a' + kept.size()))));
        kept.back()->Start(*session);
        live_bytes += kPayload + 256;
      }
      SessionCall call(std::string(kPayload, 'x'));
      call.Start(*session);
      env.Run();
      call.Cancel();
      env.Run();
      ASSERT_EQ(call.completions(), 1);
      ASSERT_NE(call.result().detail.find("before it was written"), std::string::npos) << call.result().detail;
      ++cancelled;
      ASSERT_LE(session->queued_bytes(), 2 * live_bytes + 4096)
          << "phase " << phase << ", after " << cancelled << " cancelled requests";
    }
  }
  EXPECT_EQ(session->pending(), kept.size());

  // The server reads again: the stuck request, its Tdiscarded and the requests that stayed,
  // each once and whole, in write order (the whole frames queued before the Tdiscarded first).
  mux::FrameDecoder decoder(64u << 20);
  std::vector<mux::Message> got;
  auto dispatches = [&] {
    return std::count_if(got.begin(), got.end(), [](const mux::Message& m) { return std::holds_alternative<mux::Tdispatch>(m); });
  };
  ASSERT_TRUE(RunUntil(env, [&] {
    decoder.Feed(peer.Read());
    for (;;) {
      auto frame = decoder.Next();
      if (!frame || !frame->has_value()) break;
      auto m = mux::DecodeMessage(**frame);
      if (m) got.push_back(std::move(*m));
    }
    return dispatches() == static_cast<std::ptrdiff_t>(1 + kept.size());
  })) << dispatches() << " dispatches received";
  ASSERT_EQ(got.size(), 2 + kept.size());
  ASSERT_TRUE(std::holds_alternative<mux::Tdispatch>(got[0]));
  EXPECT_EQ(std::get<mux::Tdispatch>(got[0]).payload.size(), 16u << 20);
  const uint32_t stuck_tag = std::get<mux::Tdispatch>(got[0]).tag;
  size_t k = 0;
  for (size_t i = 1; i < got.size(); ++i) {
    if (i == 1 + kept.size() / 2) {  // the Tdiscarded, between the phases' requests
      ASSERT_TRUE(std::holds_alternative<mux::Tdiscarded>(got[i])) << mux::Describe(got[i]);
      EXPECT_EQ(std::get<mux::Tdiscarded>(got[i]).which, stuck_tag);
      continue;
    }
    ASSERT_TRUE(std::holds_alternative<mux::Tdispatch>(got[i])) << mux::Describe(got[i]);
    const auto& d = std::get<mux::Tdispatch>(got[i]);
    EXPECT_EQ(d.payload, std::string(kPayload, static_cast<char>('a' + k))) << "request " << k;
    mux::Rdispatch reply;
    reply.tag = d.tag;
    reply.body = "reply " + std::to_string(k);
    peer.Send(mux::Encode(reply));
    ++k;
  }
  ASSERT_TRUE(RunUntil(env, [&] {
    return std::all_of(kept.begin(), kept.end(), [](const auto& c) { return c->completions() == 1; });
  }));
  for (size_t i = 0; i < kept.size(); ++i) {
    EXPECT_FALSE(kept[i]->result().error) << i << ": " << kept[i]->result().detail;
    EXPECT_EQ(kept[i]->reply(), "reply " + std::to_string(i));
  }
  EXPECT_EQ(session->pending(), 0u);
  EXPECT_EQ(session->queued_bytes(), 0u);
  session->Close();
  env.Run();
}

// A session (pings off) to `server` on a manual runtime, and the outcome of its open.
struct ReferenceSession {
  explicit ReferenceSession(test::ManualEnv& env, const test::MuxReferenceServer& server) {
    mux::SessionOptions o;
    o.ping_interval = Duration::zero();
    session = std::make_shared<mux::MuxSessionSink>(
        test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", static_cast<uint16_t>(server.port())}),
        o);
    session->AsyncOpen([this](error_code ec) { opened = ec; });
  }
  std::shared_ptr<mux::MuxSessionSink> session;
  std::optional<error_code> opened;
};

// Against a reference server started with `args`, which sends Tdrain during the handshake
// before it answers `step` ("Tinit" or "the handshake probe"): the session answers Rdrain and,
// once it is written, fails the open with kNack (retryable: nothing was sent), whatever follows
// (the probe's echo sends no Tinit, an Rinit opens nothing); a request then gets kNotSent.
void ExpectTdrainFailsTheOpenRetryably(std::vector<std::string> args, const std::string& step) {
  test::MuxReferenceServer server(std::move(args));
  test::ManualEnv env;
  ReferenceSession s(env, server);
  ASSERT_TRUE(RunUntil(env, [&] { return s.opened.has_value(); }));
  EXPECT_EQ(*s.opened, Errc::kNack) << s.session->open_failure_detail();
  EXPECT_TRUE(*s.opened == Condition::kRetryable);
  EXPECT_EQ(s.session->open_failure_detail(),
            server.endpoint() + " sent Tdrain before answering " + step +
                " (it is shutting down): answered Rdrain; the session was not opened and no request was sent on it");
  EXPECT_FALSE(s.session->negotiated());
  EXPECT_TRUE(server.WaitForLog({"conn=1 recv Rdrain tag=1"})) << server.Log();
  EXPECT_EQ(server.LogLinesWith({"recv Tinit"}).size(), step == "Tinit" ? 1u : 0u) << server.Log();
  SessionCall call("x");
  call.Start(*s.session);
  env.Run();
  ASSERT_EQ(call.completions(), 1);
  EXPECT_EQ(call.result().error, Errc::kNotSent) << call.result().detail;
}

// A Tdrain between Tinit and Rinit (the Rinit follows it in the same write).
TEST(MuxSessionTest, TdrainBeforeRinitFailsTheOpenRetryably) {
  ExpectTdrainFailsTheOpenRetryably({"--mode", "finagle", "--greet-after-tinit", "tdrain"}, "Tinit");
}

// A Tdrain before the probe's answer (a server shutting down as we connect; the reference
// server writes it first, then reads and echoes the probe), handled as one before Rinit. It
// used to be taken for an old server's answer: the open succeeded with an un-negotiated
// session that was draining from the start.
TEST(MuxSessionTest, TdrainBeforeTheProbesAnswerFailsTheOpenRetryably) {
  ExpectTdrainFailsTheOpenRetryably({"--mode", "finagle", "--greet", "tdrain"}, "the handshake probe");
}

// The server answers the probe, then floods Tping without reading until the session's Rping
// replies queue behind a write that cannot finish, then sends Tdrain: the Rdrain queues behind
// them, so the open cannot fail with kNack (that waits for the Rdrain to be written). At the
// handshake's deadline the open fails, saying the Rdrain was still unwritten, not merely that
// the handshake "did not finish".
TEST(MuxSessionTest, TdrainWhoseRdrainIsNeverWrittenFailsTheOpenAtTheDeadlineSayingSo) {
  test::ManualEnv env;
  QuietPeer peer;
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  o.connect_timeout = 5s;
  o.max_queued_control_replies = size_t{1} << 40;  // the flood must not close the session first
  auto session = std::make_shared<mux::MuxSessionSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", peer.port()}), o);
  std::optional<error_code> opened;
  session->AsyncOpen([&](error_code ec) { opened = ec; });
  std::string sent;
  AcceptAndEchoTheProbe(env, peer, sent);
  if (HasFatalFailure()) return;
  const std::string tping("\x00\x00\x00\x04\x41\x00\x00\x01", 8);
  std::string flood;
  ASSERT_TRUE(RunUntil(env, [&] {
    if (flood.empty()) {
      for (int i = 0; i < 8192; ++i) flood += tping;
    }
    peer.SendSome(flood);
    return session->queued_bytes() > 0;  // Rpings wait behind a write that does not finish
  }));
  std::string drain = std::string("\x00\x00\x00\x04\x40\x00\x00\x01", 8);  // Tdrain, tag 1
  ASSERT_TRUE(RunUntil(env, [&] {
    if (!flood.empty()) {
      peer.SendSome(flood);
    } else {
      peer.SendSome(drain);
    }
    return session->draining();
  }));
  env.Run();
  EXPECT_FALSE(opened.has_value()) << "the open waits for the Rdrain to be written";
  env.Advance(5s);
  env.Run();
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(*opened, Errc::kConnectTimeout);
  EXPECT_EQ(session->open_failure_detail(),
            fmt::format("Mux handshake with 127.0.0.1:{} did not finish within 5000 ms (limit "
                        "session.connect_timeout): it sent Tdrain before answering Tinit, and the Rdrain answering it "
                        "was still unwritten (the server does not read)",
                        peer.port()));
  session->Close();
  env.Run();
}

// Until the session opens, a frame may be at most mux::kMaxHandshakeFrameSize (64 KiB): a size
// field over it (a length altered on the way, a server of another protocol) fails the open at
// once, naming the limit and the handshake step. Before, only max_frame_size (32 MiB) bounded
// it: the session waited for bytes that never came until connect_timeout. Once open, frames up to
// max_frame_size are accepted as before.
TEST(MuxSessionTest, AnRinitOverTheHandshakeFrameLimitFailsTheOpenAtOnce) {
  for (const uint32_t max_frame_size : {mux::kDefaultMaxFrameSize, uint32_t{4096}}) {
    SCOPED_TRACE(max_frame_size);
    test::ManualEnv env;
    QuietPeer peer;
    mux::SessionOptions o;
    o.ping_interval = Duration::zero();
    o.connect_timeout = 30s;
    o.max_frame_size = max_frame_size;
    auto session = std::make_shared<mux::MuxSessionSink>(
        test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", peer.port()}), o);
    std::optional<error_code> opened;
    session->AsyncOpen([&](error_code ec) { opened = ec; });
    std::string sent;
    ASSERT_NO_FATAL_FAILURE(AcceptAndEchoTheProbe(env, peer, sent));
    ASSERT_TRUE(RunUntil(env, [&] {
      sent += peer.Read();
      return sent.size() > 19;  // Tinit
    }));
    // An Rinit (type -68, tag 1) announcing one byte over the limit; its body never comes.
    const uint32_t limit = std::min(max_frame_size, mux::kMaxHandshakeFrameSize);
    const uint32_t size = limit + 1;
    std::string header("\x00\x00\x00\x00\xbc\x00\x00\x01", 8);
    for (int i = 0; i < 4; ++i) header[i] = static_cast<char>(size >> (24 - 8 * i));
    peer.Send(header);
    ASSERT_TRUE(RunUntil(env, [&] { return opened.has_value(); }))
        << "the open waits for the frame's body";
    EXPECT_EQ(*opened, Errc::kProtocolError);
    EXPECT_EQ(
        session->open_failure_detail(),
        fmt::format(
            "undecodable frame from 127.0.0.1:{}: frame size {} exceeds the largest frame accepted "
            "(limit {} = {}) (frame at stream offset 19) during the Mux handshake: Tinit was still "
            "unanswered",
            peer.port(), size,
            max_frame_size > mux::kMaxHandshakeFrameSize ? "mux::kMaxHandshakeFrameSize"
                                                         : "session.max_frame_size",
            limit));
    session->Close();
    env.Run();
  }
}

// The peer answers the probe, floods Tping without reading (the Rping replies pile up behind a
// write that cannot finish), reads until that write is done and the piled-up replies went into
// the next one (megabytes: many pieces of kMaxWriteChunk), stops reading again and sends an
// Rinit negotiating TLS. `received`: what the peer read.
void FloodTpingThenNegotiateTls(test::ManualEnv& env, QuietPeer& peer, mux::MuxSessionSink* session,
                                std::string& received) {
  ASSERT_NO_FATAL_FAILURE(AcceptAndEchoTheProbe(env, peer, received));
  const std::string tping("\x00\x00\x00\x04\x41\x00\x00\x01", 8);
  std::string flood;
  for (int i = 0; i < (4 << 20); ++i) flood += tping;  // 32 MiB: more than the socket buffers hold
  // Four million Tpings to handle (and Rpings to queue): seconds under ASan on a loaded machine.
  ASSERT_TRUE(RunUntil(
      env,
      [&] {
        peer.SendSome(flood);
        return flood.empty() && session->queued_bytes() > 0;  // Rpings behind a write that does not finish
      },
      60s));
  const auto read_all = std::chrono::steady_clock::now() + 300ms;  // the session reads every Tping
  RunUntil(env, [&] { return std::chrono::steady_clock::now() > read_all; });
  // Read until the piled-up Rpings are handed to the next write.
  ASSERT_TRUE(RunUntil(
      env,
      [&] {
        received += peer.Read();
        return session->queued_bytes() == 0;
      },
      60s));
  mux::Rinit rinit;
  rinit.headers.emplace_back(std::string(mux::kMuxFramerHeader), mux::EncodeMuxFramer(0x7FFFFFFF));
  rinit.headers.emplace_back(std::string(mux::kTlsHeader), "desired");
  std::string rinit_bytes = mux::Encode(rinit);
  ASSERT_TRUE(RunUntil(env, [&] {
    peer.SendSome(rinit_bytes);
    return rinit_bytes.empty();
  }));
}

mux::SessionOptions DesiredTlsUnderTpingFlood() {
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  o.connect_timeout = 5s;
  o.max_queued_control_replies = size_t{1} << 40;  // the flood must not close the session
  o.opportunistic_tls = mux::OpportunisticTls::kDesired;
  return o;
}

// After FloodTpingThenNegotiateTls, the plaintext write in flight must end before the ClientHello,
// and no plaintext byte may follow it. (The rest of that write went out after the ClientHello,
// in plaintext, corrupting the TLS handshake.)
TEST(MuxSessionTest, APlaintextWriteInFlightAtRinitEndsBeforeTheTlsUpgradeStarts) {
  test::ManualEnv env;
  QuietPeer peer;
  auto session = std::make_shared<mux::MuxSessionSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", peer.port()}), DesiredTlsUnderTpingFlood());
  std::optional<error_code> opened;
  session->AsyncOpen([&](error_code ec) { opened = ec; });
  std::string received;
  FloodTpingThenNegotiateTls(env, peer, session.get(), received);
  if (HasFatalFailure()) return;
  // What the client sends from here on: the rest of the Rpings, the ClientHello (a TLS
  // handshake record, 0x16), and nothing after it (the client waits for the ServerHello).
  const std::string rping("\x00\x00\x00\x04\xbf\x00\x00\x01", 8);
  const size_t tinit_end = 19 + 4 + ((static_cast<uint8_t>(received[19]) << 24) |
                                     (static_cast<uint8_t>(received[20]) << 16) |
                                     (static_cast<uint8_t>(received[21]) << 8) | static_cast<uint8_t>(received[22]));
  size_t record_end = 0;  // of the ClientHello, once whole
  std::string bad;
  auto parse = [&] {
    size_t pos = tinit_end;
    while (pos + 8 <= received.size() && received.compare(pos, 8, rping) == 0) pos += 8;
    if (received.size() - pos < 8 && rping.compare(0, received.size() - pos, received, pos) == 0) return false;
    if (received[pos] != '\x16') {
      bad = fmt::format("byte {} (after {} whole Rping frames) begins neither an Rping nor a TLS record:", pos,
                        (pos - tinit_end) / 8);
      for (char c : received.substr(pos, 16)) bad += fmt::format(" {:02x}", static_cast<uint8_t>(c));
      return true;
    }
    if (received.size() - pos < 5) return false;
    const size_t len = (static_cast<uint8_t>(received[pos + 3]) << 8) | static_cast<uint8_t>(received[pos + 4]);
    if (received.size() < pos + 5 + len) return false;
    record_end = pos + 5 + len;
    return true;
  };
  ASSERT_TRUE(RunUntil(env, [&] {
    received += peer.Read();
    return parse();
  })) << received.size() << " bytes received";
  ASSERT_TRUE(bad.empty()) << bad;
  // Anything the client still writes (a plaintext piece would be at once) comes now.
  const auto until = std::chrono::steady_clock::now() + 300ms;
  RunUntil(env, [&] {
    received += peer.Read();
    return std::chrono::steady_clock::now() > until;
  });
  std::string after;
  for (char c : received.substr(std::min(record_end, received.size()), 8)) after += fmt::format(" {:02x}", static_cast<uint8_t>(c));
  EXPECT_EQ(received.size(), record_end) << received.size() - record_end << " byte(s) after the ClientHello:" << after;
  EXPECT_FALSE(opened.has_value());  // the TLS handshake waits for the peer
  session->Close();
  env.Run();
  EXPECT_EQ(*opened, Errc::kClientClosed);
}

// The same peer never reads again: the open fails at its deadline, naming the write it waited for.
TEST(MuxSessionTest, APlaintextWriteThatNeverEndsBeforeTheTlsUpgradeFailsTheOpenSayingSo) {
  test::ManualEnv env;
  QuietPeer peer;
  auto session = std::make_shared<mux::MuxSessionSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", peer.port()}), DesiredTlsUnderTpingFlood());
  std::optional<error_code> opened;
  session->AsyncOpen([&](error_code ec) { opened = ec; });
  std::string received;
  FloodTpingThenNegotiateTls(env, peer, session.get(), received);
  if (HasFatalFailure()) return;
  const auto until = std::chrono::steady_clock::now() + 200ms;  // the session reads the Rinit
  RunUntil(env, [&] { return std::chrono::steady_clock::now() > until; });
  EXPECT_FALSE(opened.has_value());
  env.Advance(5s);
  env.Run();
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(*opened, Errc::kConnectTimeout);
  EXPECT_EQ(session->open_failure_detail(),
            fmt::format("Mux handshake with 127.0.0.1:{} did not finish within 5000 ms (limit "
                        "session.connect_timeout): the plaintext write that must end before the TLS upgrade "
                        "negotiated in Rinit was still unfinished (the server does not read)",
                        peer.port()));
  session->Close();
  env.Run();
}

// The Tdiscarded of a request the client gave up on says why in words for the server's
// operators: a timeout, the caller's cancellation or a backup that answered first (kCancelled
// on the first attempt), a backup that lost the race or was cut off by the call's deadline
// (kCancelled on the backup attempt), not kCancelled's "request cancelled".
TEST(MuxSessionTest, TdiscardedSaysWhyTheClientGaveUp) {
  test::MuxReferenceServer server({"--mode", "finagle", "--delay", "60000"});  // replies only Rdiscarded
  test::ManualEnv env;
  ReferenceSession s(env, server);
  ASSERT_TRUE(RunUntil(env, [&] { return s.opened.has_value(); }));
  ASSERT_FALSE(*s.opened) << s.session->open_failure_detail();
  struct Case {
    bool backup;
    bool deadline_passed;
    Errc reason;
    std::string why;
  };
  const Case cases[] = {
      {false, true, Errc::kRequestTimeout, "request timed out: the client's deadline for it passed"},
      {false, false, Errc::kCancelled,
       "cancelled by the client: a backup request answered first, or the caller gave up on the call"},
      {true, false, Errc::kCancelled,
       "backup request lost the race: another attempt answered first, or the caller cancelled the call"},
      {true, true, Errc::kCancelled, "backup request cut off: the call's deadline passed"},
  };
  for (size_t i = 0; i < std::size(cases); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(c.why);
    SessionCall call("x");
    call.properties().backup = c.backup;
    call.properties().deadline = env.Now() + 1s;
    call.Start(*s.session);
    ASSERT_TRUE(RunUntil(env, [&] { return server.LogLinesWith({"recv Tdispatch"}).size() == i + 1; }))
        << server.Log();
    if (c.deadline_passed) env.Advance(1s);
    call.Cancel(c.reason);
    ASSERT_TRUE(RunUntil(env, [&] { return server.LogLinesWith({"recv Tdiscarded"}).size() == i + 1; }))
        << server.Log();
    const std::string line = server.LogLinesWith({"recv Tdiscarded"}).back();
    EXPECT_EQ(line.substr(line.find("why=") + 4), c.why) << line;
    ASSERT_EQ(call.completions(), 1);
    EXPECT_EQ(call.result().error, c.reason);
  }
  s.session->Close();
  env.Run();
}

// --- The session alone against a raw peer that answers frame by frame -----------------------

// A session on a manual runtime to a QuietPeer, and the messages the peer received whole.
struct PeerSession {
  explicit PeerSession(mux::SessionOptions o) {
    session = std::make_shared<mux::MuxSessionSink>(
        test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", peer.port()}), o);
    session->AsyncOpen([this](error_code ec) { opened = ec; });
    peer.Accept();
  }
  // Reads what the client sent until `done` holds for the messages received so far.
  bool ReadUntil(const std::function<bool()>& done) {
    return RunUntil(env, [&] {
      decoder.Feed(peer.Read());
      for (;;) {
        auto frame = decoder.Next();
        if (!frame || !frame->has_value()) break;
        if ((*frame)->fragment) continue;  // the tests here read whole messages
        auto m = mux::DecodeMessage(**frame);
        if (m) got.push_back(std::move(*m));
      }
      return done();
    });
  }
  // Sends all of `bytes`, running the client's loop while the socket is full.
  bool SendAll(std::string bytes) {
    return RunUntil(env, [&] {
      peer.SendSome(bytes);
      return bytes.empty();
    });
  }
  template <class T>
  const T* Last() const {
    for (auto it = got.rbegin(); it != got.rend(); ++it) {
      if (auto* m = std::get_if<T>(&*it)) return m;
    }
    return nullptr;
  }
  test::ManualEnv env;
  QuietPeer peer;
  std::shared_ptr<mux::MuxSessionSink> session;
  std::optional<error_code> opened;
  mux::FrameDecoder decoder{64u << 20};
  std::vector<mux::Message> got;
};

// Heap bytes allocated (small blocks and mmapped ones).
size_t HeapInUse() {
  const struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

// A server sends most of a large reply to each of two requests in fragments, then a frame that
// closes the session (an unknown type): the requests fail, and the closed session must not keep
// the half-received replies (nor the read buffer grown for them). It stays with its pool until
// the next request replaces it, which may be long, and a hostile server chooses their size
// (up to max_message_size per tag in use).
TEST(MuxSessionTest, AClosedSessionKeepsNoHalfReceivedReplies) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "mallinfo2 does not see the sanitizer's heap";
#endif
  mux::SessionOptions o;
  o.handshake = false;
  o.ping_interval = Duration::zero();
  PeerSession f(o);
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall a("a"), b("b");
  a.Start(*f.session);
  b.Start(*f.session);
  ASSERT_TRUE(f.ReadUntil([&] { return f.got.size() == 2; }));
  const size_t before = HeapInUse();
  constexpr size_t kPart = 8u << 20;
  for (const auto& m : f.got) {
    std::string fragment;
    mux::AppendFrameHeader(mux::wire::kRdispatch, mux::TagOf(m), /*more=*/true, kPart, &fragment);
    // Status Ok, no contexts: the start of a well-formed Rdispatch.
    fragment.append(3, '\0').append(kPart - 3, 'f');
    ASSERT_TRUE(f.SendAll(std::move(fragment)));
  }
  std::string garbage;
  mux::AppendFrameHeader(0x12, 2, false, 0, &garbage);
  ASSERT_TRUE(f.SendAll(garbage));
  ASSERT_TRUE(RunUntil(f.env, [&] { return a.completions() == 1 && b.completions() == 1; }));
  EXPECT_EQ(a.result().error, Errc::kProtocolError) << a.result().detail;
  EXPECT_EQ(f.session->status(), SinkStatus::kClosed);
  EXPECT_LT(HeapInUse(), before + (4u << 20)) << "heap grew by " << (HeapInUse() - before) << " bytes";
}

// The messages in `bytes` (whole frames), described: "Tdispatch tag=2 (524288 bytes)",
// "Rdrain tag=1", "Tdiscarded which=2"; a cut frame at the end as "cut".
std::vector<std::string> Frames(const std::string& bytes) {
  mux::FrameDecoder decoder(64u << 20);
  decoder.Feed(bytes);
  std::vector<std::string> out;
  for (;;) {
    auto frame = decoder.Next();
    if (!frame || !frame->has_value()) break;
    auto m = mux::DecodeMessage(**frame);
    if (!m) {
      out.push_back("undecodable");
    } else if (auto* d = std::get_if<mux::Tdispatch>(&*m)) {
      out.push_back(fmt::format("Tdispatch tag={} ({} bytes)", d->tag, d->payload.size()));
    } else if (auto* t = std::get_if<mux::Tdiscarded>(&*m)) {
      out.push_back(fmt::format("Tdiscarded which={}", t->which));
    } else {
      out.push_back(fmt::format("{} tag={}", mux::TypeName(mux::WireTypeOf(*m)), mux::TagOf(*m)));
    }
  }
  if (decoder.buffered() != 0) out.push_back("cut");
  return out;
}

// Reads what the session's peer receives until the client's stream ends; how it ended (0: FIN).
std::optional<int> ReadToTheEnd(test::ManualEnv& env, QuietPeer& peer, std::string& received) {
  std::optional<int> end;
  if (!RunUntil(env, [&] { return (end = peer.ReadToEnd(received)).has_value(); })) return std::nullopt;
  return end;
}

// Options of the close tests: no handshake, no pings.
mux::SessionOptions QuietCloseOptions() {
  mux::SessionOptions o;
  o.handshake = false;
  o.ping_interval = Duration::zero();
  return o;
}

// A drained session closes once its last request is answered. The server sent more behind that
// reply (here a late reply for a tag the client no longer uses), which the client had not read
// when it closed: Linux answers a close() with unread bytes with an RST, which discards what
// the socket still held to send (the end of a large request the server had not read yet, and
// the Rdrain queued behind it), and the server read ECONNRESET after 128 KiB of the request
// instead of its Rdrain. The connection reads the unread bytes away before it closes
// (TcpConnection::Close), so the close is a FIN behind everything written.
TEST(MuxSessionTest, ADrainedSessionsRdrainIsNotLostToAResetOverUnreadBytes) {
  PeerSession f(QuietCloseOptions());
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  // More than the server's receive window: the end of it waits in the client's send buffer.
  SessionCall call(std::string(512u << 10, 'r'));
  call.Start(*f.session);
  f.peer.Send(mux::Encode(mux::Tdrain{}));
  // The Rdrain is handed to the socket (behind the request), which takes it whole.
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.session->draining() && f.session->queued_bytes() == 0; }));
  f.env.Run();
  mux::Rdispatch reply;
  reply.tag = 2;
  reply.body = "ok";
  mux::Rdispatch late;
  late.tag = 3;
  late.body = std::string(32u << 10, 'l');
  f.peer.Send(mux::Encode(reply) + mux::Encode(late));
  ASSERT_TRUE(RunUntil(f.env, [&] { return call.completions() == 1; }));
  EXPECT_FALSE(call.result().error) << call.result().detail;
  EXPECT_EQ(call.reply(), "ok");
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.session->status() == SinkStatus::kClosed; }));

  std::string received;
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(*end, 0) << "the server's read failed: " << std::strerror(*end) << " after " << received.size()
                     << " bytes";
  EXPECT_EQ(Frames(received), (std::vector<std::string>{"Tdispatch tag=2 (524288 bytes)", "Rdrain tag=1"}));
  EXPECT_EQ(f.env.GaugeValue("scales_connections"), 0);
}

// The same for the client's Close() of a session with nothing in flight, whose last write held
// the Tdiscarded of a request it gave up on (it was lost to the RST).
TEST(MuxSessionTest, TdiscardedWrittenBeforeTheClientsCloseIsNotLostToAReset) {
  PeerSession f(QuietCloseOptions());
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall call(std::string(512u << 10, 'r'));
  call.Start(*f.session);
  f.env.Run();
  call.Cancel();
  ASSERT_EQ(call.completions(), 1);
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.session->queued_bytes() == 0; }));
  f.env.Run();
  mux::Rdispatch late;
  late.tag = 7;
  late.body = std::string(32u << 10, 'l');
  f.peer.Send(mux::Encode(late));
  f.session->Close();  // before the client read the late reply

  std::string received;
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(*end, 0) << "the server's read failed: " << std::strerror(*end) << " after " << received.size()
                     << " bytes";
  EXPECT_EQ(Frames(received), (std::vector<std::string>{"Tdispatch tag=2 (524288 bytes)", "Tdiscarded which=2"}));
  EXPECT_EQ(f.env.GaugeValue("scales_connections"), 0);
}

// Counts the frames described as `what` (Frames()) in `bytes`.
size_t CountFrames(const std::string& bytes, const std::string& what) {
  const auto frames = Frames(bytes);
  return static_cast<size_t>(std::count(frames.begin(), frames.end(), what));
}

// A server may send Tdrain more than once (twice in one write, and again later) while the
// session still has a request in flight: each is answered with an Rdrain (mux-protocol.md 1.9),
// but the drain is one: scales_mux_drains counts it once and on_faulted tells the pool once.
// (Each Tdrain counted a drain and raised on_faulted again.) The request is answered once and
// the session closes with a FIN behind the three Rdrains.
TEST(MuxSessionTest, ASecondTdrainIsAnsweredButTheDrainIsCountedAndReportedOnce) {
  PeerSession f(QuietCloseOptions());
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  int faults = 0;
  f.session->on_faulted().Subscribe([&](const Fault&) { ++faults; });
  SessionCall call("x");
  call.Start(*f.session);
  std::string received;
  ASSERT_TRUE(RunUntil(f.env, [&] {
    received += f.peer.Read();
    return CountFrames(received, "Tdispatch tag=2 (1 bytes)") == 1;
  }));
  f.peer.Send(mux::Encode(mux::Tdrain{}) + mux::Encode(mux::Tdrain{}));
  ASSERT_TRUE(RunUntil(f.env, [&] {
    received += f.peer.Read();
    return CountFrames(received, "Rdrain tag=1") == 2;
  })) << fmt::format("{}", fmt::join(Frames(received), ", "));
  f.peer.Send(mux::Encode(mux::Tdrain{}));
  ASSERT_TRUE(RunUntil(f.env, [&] {
    received += f.peer.Read();
    return CountFrames(received, "Rdrain tag=1") == 3;
  })) << fmt::format("{}", fmt::join(Frames(received), ", "));
  EXPECT_EQ(f.env.CounterValue("scales_mux_drains"), 1);
  EXPECT_EQ(faults, 1);
  EXPECT_EQ(f.session->status(), SinkStatus::kBusy);
  mux::Rdispatch reply;
  reply.tag = 2;
  reply.body = "ok";
  f.peer.Send(mux::Encode(reply));
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(*end, 0) << std::strerror(*end);
  EXPECT_EQ(Frames(received), (std::vector<std::string>{"Tdispatch tag=2 (1 bytes)", "Rdrain tag=1", "Rdrain tag=1",
                                                        "Rdrain tag=1"}));
  ASSERT_EQ(call.completions(), 1);
  EXPECT_FALSE(call.result().error) << call.result().detail;
  EXPECT_EQ(call.reply(), "ok");
  EXPECT_EQ(faults, 1);
}

// The same during the handshake: two Tdrains before the probe's answer get two Rdrains (the
// second was ignored with everything after the first), and the open fails once, with kNack.
TEST(MuxSessionTest, ASecondTdrainDuringTheHandshakeIsAnsweredToo) {
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  PeerSession f(o);
  int faults = 0;
  f.session->on_faulted().Subscribe([&](const Fault&) { ++faults; });
  ASSERT_TRUE(f.ReadUntil([&] { return !f.got.empty(); }));
  ASSERT_TRUE(mux::IsProbe(f.got[0]));
  f.peer.Send(mux::Encode(mux::Tdrain{}) + mux::Encode(mux::Tdrain{}));
  std::string received;
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(*end, 0) << std::strerror(*end);
  EXPECT_EQ(Frames(received), (std::vector<std::string>{"Rdrain tag=1", "Rdrain tag=1"}));
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  EXPECT_EQ(*f.opened, Errc::kNack) << f.session->open_failure_detail();
  EXPECT_EQ(f.env.CounterValue("scales_mux_drains"), 1);
  EXPECT_EQ(faults, 1);
}

// Behind a Tdrain during the handshake nothing changes how the open fails, a frame that does not
// decode included: a Tdrain's non-final fragment failed the open with kProtocolError ("cannot
// decode a non-final fragment") instead of kNack (found by mux_session_fuzzer). Neither it nor
// an Rinit behind it gets an answer; the first Tdrain gets its Rdrain.
TEST(MuxSessionTest, WhatDoesNotDecodeBehindAHandshakeTdrainIsIgnored) {
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  PeerSession f(o);
  ASSERT_TRUE(f.ReadUntil([&] { return !f.got.empty(); }));
  ASSERT_TRUE(mux::IsProbe(f.got[0]));
  // In one read (the Rdrain's write, which the open waits for, is not done before it is all
  // handled).
  std::string bytes = mux::Encode(mux::Tdrain{});
  mux::AppendFrameHeader(mux::wire::kTdrain, 1, /*fragment=*/true, 1, &bytes);
  bytes += "x";
  bytes += mux::Encode(mux::Rinit{});
  f.peer.Send(bytes);
  std::string received;
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(*end, 0) << std::strerror(*end);
  EXPECT_EQ(Frames(received), (std::vector<std::string>{"Rdrain tag=1"}));
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  EXPECT_EQ(*f.opened, Errc::kNack) << f.session->open_failure_detail();
}

// With pings off and ping_timeout 0 a drained session does not wait for its last write (a
// server that does not read is not waited for): the Rdrain answering a Tdrain that finds nothing
// in flight, or one that comes with the last reply in one read, still reaches the server (the
// socket takes the write at once), before the FIN.
TEST(MuxSessionTest, RdrainReachesTheServerWithPingsOffAndNoDrainWait) {
  for (const bool with_reply : {false, true}) {
    SCOPED_TRACE(with_reply ? "the last reply and Tdrain in one read" : "nothing in flight");
    auto o = QuietCloseOptions();
    o.ping_timeout = Duration::zero();
    PeerSession f(o);
    ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
    SessionCall call("x");
    std::string received;
    std::string bytes = mux::Encode(mux::Tdrain{});
    if (with_reply) {
      call.Start(*f.session);
      ASSERT_TRUE(RunUntil(f.env, [&] {
        received += f.peer.Read();
        return CountFrames(received, "Tdispatch tag=2 (1 bytes)") == 1;
      }));
      mux::Rdispatch reply;
      reply.tag = 2;
      reply.body = "ok";
      bytes = mux::Encode(reply) + bytes;
    }
    f.peer.Send(bytes);
    auto end = ReadToTheEnd(f.env, f.peer, received);
    ASSERT_TRUE(end.has_value());
    EXPECT_EQ(*end, 0) << std::strerror(*end);
    EXPECT_EQ(CountFrames(received, "Rdrain tag=1"), 1u) << fmt::format("{}", fmt::join(Frames(received), ", "));
    EXPECT_EQ(f.session->status(), SinkStatus::kClosed);
    if (with_reply) {
      ASSERT_EQ(call.completions(), 1);
      EXPECT_EQ(call.reply(), "ok");
    }
  }
}

// A request cancelled before the session took it (the pool hands a parked request over after
// its caller cancelled) is answered at once, naming the endpoint, and nothing is written: it
// said only "cancelled before it was sent".
TEST(MuxSessionTest, ARequestCancelledBeforeTheSessionTookItIsAnsweredNamingTheEndpoint) {
  PeerSession f(QuietCloseOptions());
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall call("x");
  call.Cancel(Errc::kCancelled);
  call.Start(*f.session);
  ASSERT_EQ(call.completions(), 1);
  EXPECT_EQ(call.result().error, Errc::kCancelled);
  EXPECT_EQ(call.result().detail, fmt::format("cancelled before the request was sent to 127.0.0.1:{}", f.peer.port()));
  SessionCall next("y");
  next.Start(*f.session);
  std::string received;
  ASSERT_TRUE(RunUntil(f.env, [&] {
    received += f.peer.Read();
    return !Frames(received).empty();
  }));
  EXPECT_EQ(Frames(received), (std::vector<std::string>{"Tdispatch tag=2 (1 bytes)"}));
  mux::Rdispatch reply;
  reply.tag = 2;
  reply.body = "ok";
  f.peer.Send(mux::Encode(reply));
  ASSERT_TRUE(RunUntil(f.env, [&] { return next.completions() == 1; }));
  EXPECT_EQ(next.reply(), "ok");
  EXPECT_EQ(call.completions(), 1);
}

// During a drain: a new request is refused at once (kNack, retryable, nothing written); one
// cancelled meanwhile completes once (Tdiscarded sent); the client's Close() answers the one
// still in flight once (kClientClosed), and its reply arriving after the close answers nothing.
TEST(MuxSessionTest, RequestsDuringADrainAndCloseDuringItCompleteOnce) {
  PeerSession f(QuietCloseOptions());
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall kept("k"), cancelled("c");
  kept.Start(*f.session);
  cancelled.Start(*f.session);
  ASSERT_TRUE(f.ReadUntil([&] { return f.got.size() == 2; }));
  f.peer.Send(mux::Encode(mux::Tdrain{}));
  ASSERT_TRUE(f.ReadUntil([&] { return f.Last<mux::Rdrain>() != nullptr; }));
  ASSERT_TRUE(f.session->draining());
  SessionCall refused("r");
  refused.Start(*f.session);
  f.env.Run();
  ASSERT_EQ(refused.completions(), 1);
  EXPECT_EQ(refused.result().error, Errc::kNack) << refused.result().detail;
  EXPECT_TRUE(refused.result().error == Condition::kRetryable);
  cancelled.Cancel();
  f.env.Run();
  ASSERT_TRUE(f.ReadUntil([&] { return f.Last<mux::Tdiscarded>() != nullptr; }));
  f.session->Close();
  f.env.Run();
  mux::Rdispatch reply;
  reply.tag = 2;
  reply.body = "late";
  f.peer.Send(mux::Encode(reply));
  std::string received;
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  f.env.Run();
  EXPECT_EQ(refused.completions(), 1);
  EXPECT_EQ(cancelled.completions(), 1);
  ASSERT_EQ(kept.completions(), 1);
  EXPECT_EQ(kept.result().error, Errc::kClientClosed) << kept.result().detail;
  EXPECT_EQ(f.session->tags_in_use(), 0u);
  EXPECT_EQ(f.session->status(), SinkStatus::kClosed);
}

// Session options with opportunistic TLS desired and pings off.
mux::SessionOptions DesiredTlsWithoutPings() {
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  o.opportunistic_tls = mux::OpportunisticTls::kDesired;
  return o;
}
// The server's side of the handshake up to Tinit: it answers the probe; false if the client sent
// no Tinit.
bool AnswerProbeUntilTinit(PeerSession& f) {
  if (!f.ReadUntil([&] { return !f.got.empty(); })) return false;
  f.peer.Send(mux::Encode(mux::ProbeMessage()));
  return f.ReadUntil([&] { return f.Last<mux::Tinit>() != nullptr; });
}
// An Rinit agreeing to TLS (desired).
mux::Rinit DesiredTlsRinit() {
  mux::Rinit rinit;
  rinit.headers.emplace_back(std::string(mux::kTlsHeader), "desired");
  return rinit;
}

// The same Tdrain in a later read, once the client's ClientHello is out: the handshake fails on
// the plaintext, with kTlsFailed as above.
TEST(MuxSessionTest, TdrainAfterAnRinitNegotiatingTlsInALaterReadFailsTheHandshake) {
  PeerSession f(DesiredTlsWithoutPings());
  ASSERT_TRUE(AnswerProbeUntilTinit(f));
  const std::string rinit = mux::Encode(DesiredTlsRinit());
  f.peer.Send(rinit);
  std::string hello;
  ASSERT_TRUE(RunUntil(f.env, [&] {
    hello += f.peer.Read();
    return !hello.empty();
  }));
  EXPECT_EQ(hello[0], '\x16') << "not a TLS handshake record";
  f.peer.Send(mux::Encode(mux::Tdrain{}));
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  EXPECT_EQ(*f.opened, Errc::kTlsFailed);
  const std::string detail = f.session->open_failure_detail();
  EXPECT_NE(detail.find(fmt::format("127.0.0.1:{}", f.peer.port())), std::string::npos) << detail;
  EXPECT_NE(detail.find("(opportunistic TLS: this client desired, the server desired)"), std::string::npos) << detail;
}

// A Tdrain right behind an Rinit that negotiated TLS, in plaintext (both ends should have
// started TLS): the open fails with kTlsFailed naming the endpoint and the step, the session
// sends nothing more (no Rdrain in plaintext, no ClientHello) and closes with a FIN. It was
// kProtocolError, while the same bytes in a later read fail the handshake with kTlsFailed
// (TdrainAfterAnRinitNegotiatingTlsInALaterReadFailsTheHandshake).
TEST(MuxSessionTest, TdrainBehindAnRinitNegotiatingTlsFailsTheOpenNamingTheStep) {
  PeerSession f(DesiredTlsWithoutPings());
  ASSERT_TRUE(AnswerProbeUntilTinit(f));
  const std::string rinit = mux::Encode(DesiredTlsRinit());
  f.peer.Send(rinit + mux::Encode(mux::Tdrain{}));
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  EXPECT_EQ(*f.opened, Errc::kTlsFailed);
  EXPECT_EQ(f.session->open_failure_detail(),
            fmt::format("127.0.0.1:{} sent 8 byte(s) after Rinit, before the TLS handshake it negotiated",
                        f.peer.port()));
  std::string received;
  auto end = ReadToTheEnd(f.env, f.peer, received);
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(*end, 0) << std::strerror(*end);
  EXPECT_EQ(received, "");
  // A request on the session gets the TLS failure, as after any failed TLS handshake (it was
  // kNotSent with kProtocolError).
  SessionCall call("x");
  call.Start(*f.session);
  f.env.Run();
  ASSERT_EQ(call.completions(), 1);
  EXPECT_EQ(call.result().error, Errc::kTlsFailed) << call.result().detail;
  EXPECT_NE(call.result().detail.find("the request was not sent"), std::string::npos) << call.result().detail;
}

// A server that accepts the connection but never answers the probe, or echoes it and never
// answers Tinit: the open fails at connect_timeout with an error that says which step was still
// waiting and which setting bounds it.
TEST(MuxSessionTest, HandshakeTimeoutNamesTheStepAndTheLimit) {
  for (int phase = 1; phase <= 2; ++phase) {
    SCOPED_TRACE(phase);
    mux::SessionOptions o;
    o.ping_interval = Duration::zero();
    o.connect_timeout = 2s;
    PeerSession f(o);
    ASSERT_TRUE(f.ReadUntil([&] { return !f.got.empty(); }));
    ASSERT_TRUE(mux::IsProbe(f.got[0]));
    if (phase == 2) {
      f.peer.Send(mux::Encode(mux::ProbeMessage()));
      ASSERT_TRUE(f.ReadUntil([&] { return f.Last<mux::Tinit>() != nullptr; }));
    }
    f.env.Advance(2s);
    ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
    EXPECT_EQ(*f.opened, Errc::kConnectTimeout);
    const std::string detail = f.session->open_failure_detail();
    EXPECT_NE(detail.find("(limit session.connect_timeout): "), std::string::npos) << detail;
    EXPECT_NE(detail.find(phase == 1 ? "the handshake probe was still unanswered" : "Tinit was still unanswered"),
              std::string::npos)
        << detail;
  }
}

// The server answers a request from the first bytes of a write still in flight (a large request
// behind it); a new request takes the freed tag and queues behind that write; then the session
// fails. The new request never left, and its detail says it was still queued: the frame of its
// tag in the write in flight is the answered request's. It used to be taken for the new
// request's own, which was then reported "cut mid-write".
TEST(MuxSessionTest, ARequestOnTheTagOfOneAnsweredMidWriteIsReportedQueuedWhenTheSessionFails) {
  mux::SessionOptions o;
  o.handshake = false;
  o.ping_interval = Duration::zero();
  PeerSession f(o);
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall x("x");
  x.Start(*f.session);  // written at once; a and big queue behind it, and go in the next write
  SessionCall a("a");
  a.Start(*f.session);
  SessionCall big(std::string(16u << 20, 'b'));  // far more than the socket buffers hold
  big.Start(*f.session);
  ASSERT_TRUE(f.ReadUntil([&] { return f.got.size() == 2; }));
  ASSERT_TRUE(std::holds_alternative<mux::Tdispatch>(f.got[1]));
  const uint32_t a_tag = mux::TagOf(f.got[1]);
  mux::Rdispatch reply;
  reply.tag = a_tag;
  reply.body = "for a";
  f.peer.Send(mux::Encode(reply));
  ASSERT_TRUE(RunUntil(f.env, [&] { return a.completions() == 1; }));
  EXPECT_FALSE(a.result().error) << a.result().detail;
  SessionCall b("b");
  b.Start(*f.session);  // takes a's tag, queued behind the write of big
  ASSERT_EQ(f.session->tags_in_use(), 3u);
  std::string garbage;
  mux::AppendFrameHeader(0x12, 2, false, 0, &garbage);
  f.peer.Send(garbage);
  ASSERT_TRUE(RunUntil(f.env, [&] { return b.completions() == 1 && big.completions() == 1 && x.completions() == 1; }));
  EXPECT_EQ(x.result().error, Errc::kProtocolError) << x.result().detail;
  EXPECT_EQ(big.result().error, Errc::kNotSent) << big.result().detail;
  EXPECT_NE(big.result().detail.find("cut mid-write"), std::string::npos) << big.result().detail;
  EXPECT_EQ(b.result().error, Errc::kNotSent) << b.result().detail;
  EXPECT_NE(b.result().detail.find("still queued, not sent"), std::string::npos) << b.result().detail;
  EXPECT_EQ(b.result().detail.find("cut mid-write"), std::string::npos) << b.result().detail;
}

// Asio's `total` (SinkStack::CancelUnsent) on the session: a request queued behind a write that
// does not finish was sent nowhere, so it is answered at once, its tag freed and none of its
// bytes ever written; the request that write carries (partly on the wire) is left alone: no
// Tdiscarded, and the server's reply answers it.
TEST(MuxSessionTest, TotalCancelsOnlyARequestStillQueuedBehindAWrite) {
  mux::SessionOptions o;
  o.handshake = false;
  o.ping_interval = Duration::zero();
  PeerSession f(o);
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall big(std::string(16u << 20, 'b'));  // far more than the socket buffers hold
  big.Start(*f.session);
  SessionCall queued("queued");
  queued.Start(*f.session);
  f.env.Run();
  ASSERT_EQ(f.session->tags_in_use(), 2u);
  big.CancelUnsent();
  queued.CancelUnsent();
  f.env.Run();
  EXPECT_EQ(big.completions(), 0);
  EXPECT_EQ(queued.completions(), 1);
  EXPECT_EQ(queued.result().error, Errc::kCancelled) << queued.result().detail;
  EXPECT_NE(queued.result().detail.find("before it was written to 127.0.0.1:"), std::string::npos)
      << queued.result().detail;
  EXPECT_EQ(f.session->tags_in_use(), 1u);
  EXPECT_EQ(f.session->pending(), 1u);

  // The server reads: big's Tdispatch, answered; the next request is the next thing written.
  ASSERT_TRUE(f.ReadUntil([&] { return !f.got.empty(); }));
  ASSERT_TRUE(std::holds_alternative<mux::Tdispatch>(f.got[0])) << mux::Describe(f.got[0]);
  mux::Rdispatch reply;
  reply.tag = mux::TagOf(f.got[0]);
  reply.body = "for big";
  f.peer.Send(mux::Encode(reply));
  ASSERT_TRUE(RunUntil(f.env, [&] { return big.completions() == 1; }));
  EXPECT_FALSE(big.result().error) << big.result().detail;
  EXPECT_EQ(big.reply(), "for big");
  SessionCall after("after");
  after.Start(*f.session);
  ASSERT_TRUE(f.ReadUntil([&] { return f.got.size() >= 2; }));
  ASSERT_TRUE(std::holds_alternative<mux::Tdispatch>(f.got[1])) << mux::Describe(f.got[1]);
  EXPECT_EQ(std::get<mux::Tdispatch>(f.got[1]).payload, "after");
  EXPECT_EQ(queued.completions(), 1);
  f.session->Close();
  f.env.Run();
  EXPECT_EQ(after.completions(), 1);
}

// The same through the whole ThriftMux stack (dispatcher, timeout, retry, serializer, balancer,
// failure accrual, resurrector, SingletonPool): the caller's `total` reaches the session holding
// the call queued behind a write that does not finish, and cancels it.
TEST(ThriftMuxTest, TotalCancelsACallTheSessionHoldsUnsent) {
  QuietPeer peer;
  stats::StatsRegistry stats;
  std::promise<std::exception_ptr> big_done, queued_done;
  auto o = Options(MakeRuntime(), &stats);
  o.session.handshake = false;
  o.session.ping_interval = Duration::zero();
  o.client.timeout = 60s;
  const std::string endpoint = "127.0.0.1:" + std::to_string(peer.port());
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + endpoint, o);
  SCALES_THRIFT_CALL(client, echo, std::string(16u << 20, 'b'),
                     [&](std::exception_ptr e, std::string) { big_done.set_value(e); });
  peer.Accept();
  ASSERT_TRUE(Eventually([&] { return GaugeValue(stats, "scales_mux_tags_in_use", endpoint) == 1; }));
  boost::asio::cancellation_signal signal;
  SCALES_THRIFT_CALL(client, echo, std::string("queued"),
                     boost::asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, std::string) {
                       queued_done.set_value(e);
                     }));
  ASSERT_TRUE(Eventually([&] { return GaugeValue(stats, "scales_mux_tags_in_use", endpoint) == 2; }));
  signal.emit(boost::asio::cancellation_type::total);
  auto f = queued_done.get_future();
  ASSERT_EQ(f.wait_for(2s), std::future_status::ready) << "`total` did not cancel the queued call";
  try {
    std::rethrow_exception(f.get());
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kCancelled) << e.what();
    EXPECT_NE(std::string(e.what()).find("before it was written to " + endpoint), std::string::npos) << e.what();
  }
  EXPECT_TRUE(Eventually([&] { return GaugeValue(stats, "scales_mux_tags_in_use", endpoint) == 1; }));
  EXPECT_EQ(big_done.get_future().wait_for(0s), std::future_status::timeout);  // still writing
}

// A call whose deadline is as far as a time point goes (TimePoint::max(), which a sink of the
// stack may set for "never") is sent with the Deadline context's "no deadline" value. Its wall
// clock time (now + the time left) used to overflow into a deadline long past, which tells a
// server honouring deadlines to refuse the request.
TEST(MuxSessionTest, ADeadlineTooFarForTheWallClockIsSentAsNone) {
  mux::SessionOptions o;
  o.handshake = false;
  o.ping_interval = Duration::zero();
  PeerSession f(o);
  ASSERT_TRUE(RunUntil(f.env, [&] { return f.opened.has_value(); }));
  SessionCall call("far");
  call.properties().deadline = TimePoint::max();
  call.Start(*f.session);
  ASSERT_TRUE(f.ReadUntil([&] { return f.Last<mux::Tdispatch>() != nullptr; }));
  const std::string* value = mux::FindContext(f.Last<mux::Tdispatch>()->contexts, mux::kDeadlineKey);
  ASSERT_NE(value, nullptr);
  auto deadline = mux::DecodeDeadline(*value);
  ASSERT_TRUE(deadline.has_value());
  EXPECT_EQ(deadline->deadline_ns, mux::Deadline::kNone);
  EXPECT_EQ(deadline->timestamp_ns, std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        f.env.loop().clock().WallNow().time_since_epoch())
                                        .count());
  f.session->Close();
  f.env.Run();
}

// A server that does not speak Mux (here Apache Thrift's framed server, which reads the probe as
// a malformed call) closes the connection during the handshake: the open fails, and its detail
// says so, naming the step that was waiting. It used to read "connection to X closed by the
// server (0 request(s) in flight)", as if a session had been serving.
TEST(MuxSessionTest, ServerClosingDuringTheHandshakeIsNamedInTheOpenFailure) {
  test::TestThriftServer server;
  test::ManualEnv env;
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  auto session = std::make_shared<mux::MuxSessionSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", static_cast<uint16_t>(server.port())}),
      o);
  std::optional<error_code> opened;
  session->AsyncOpen([&](error_code ec) { opened = ec; });
  ASSERT_TRUE(RunUntil(env, [&] { return opened.has_value(); }));
  EXPECT_EQ(*opened, Errc::kConnectionClosed);
  const std::string detail = session->open_failure_detail();
  EXPECT_NE(detail.find("connection to 127.0.0.1:" + std::to_string(server.port()) + " closed by the server"),
            std::string::npos)
      << detail;
  EXPECT_NE(detail.find("during the Mux handshake: the handshake probe was still unanswered"), std::string::npos)
      << detail;
  EXPECT_EQ(detail.find("request(s) in flight"), std::string::npos) << detail;
}

// A server advertising an unusable mux-framer (not positive) fails the open, and the detail
// says which value it sent (it used to say only "sent a bad mux-framer header").
TEST(MuxSessionTest, BadMuxFramerInRinitIsNamedWithItsValue) {
  test::MuxReferenceServer server({"--mode", "finagle", "--framer", "-5"});
  test::ManualEnv env;
  mux::SessionOptions o;
  o.ping_interval = Duration::zero();
  auto session = std::make_shared<mux::MuxSessionSink>(
      test::MakeContext(env.loop(), env.scope, nullptr, Endpoint{"127.0.0.1", static_cast<uint16_t>(server.port())}),
      o);
  std::optional<error_code> opened;
  session->AsyncOpen([&](error_code ec) { opened = ec; });
  ASSERT_TRUE(RunUntil(env, [&] { return opened.has_value(); }));
  EXPECT_EQ(*opened, Errc::kProtocolError);
  EXPECT_EQ(session->open_failure_detail(), "bad handshake reply from 127.0.0.1:" + std::to_string(server.port()) +
                                                ": Rinit's mux-framer header: -5 is not positive");
  session->Close();
  env.Run();
}

}  // namespace
}  // namespace scales
