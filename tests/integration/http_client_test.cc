// The HTTP client against real peers on 127.0.0.1: nginx (several instances = several
// servers) and the scales test server (slow, broken and oversize responses).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "scales/discovery/server_set.h"
#include "scales/http/client.h"
#include "support/fixtures.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using test::NginxServer;
using test::TestHttpServer;

std::shared_ptr<Runtime> MakeRuntime(size_t threads = 2) {
  RuntimeOptions o;
  o.threads = threads;
  return std::make_shared<Runtime>(o);
}

http::HttpOptions Options(std::shared_ptr<Runtime> rt, stats::StatsRegistry* stats = nullptr) {
  http::HttpOptions o;
  o.client.name = "it";
  o.client.runtime = std::move(rt);
  o.client.stats = stats;
  o.client.timeout = 5s;
  o.resurrector.initial_backoff = 100ms;
  o.resurrector.max_backoff = 400ms;
  return o;
}

std::string Uri(const std::vector<std::string>& endpoints) {
  std::string uri = "tcp://";
  for (size_t i = 0; i < endpoints.size(); ++i) uri += (i ? "," : "") + endpoints[i];
  return uri;
}

// Waits until `pred` holds, up to `timeout`, polling (no fixed sleeps in assertions).
template <class Pred>
bool Eventually(Pred pred, std::chrono::milliseconds timeout = 5000ms) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

class NginxClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int i = 0; i < 3; ++i) servers_.push_back(std::make_unique<NginxServer>("n" + std::to_string(i)));
    for (auto& s : servers_) endpoints_.push_back(s->endpoint());
  }
  std::vector<std::unique_ptr<NginxServer>> servers_;
  std::vector<std::string> endpoints_;
};

TEST_F(NginxClusterTest, GetAndPostThroughThreeServers) {
  auto client = Http::NewClient(Uri(endpoints_), Options(MakeRuntime()));
  http::Response r = client.Get("/");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body.rfind("nginx n", 0), 0u) << r.body;
  http::Response p = client.Post("/echo", std::string(10000, 'p'), {{"Content-Type", "text/plain"}});
  EXPECT_EQ(p.status, 200);
  EXPECT_EQ(p.body, "posted\n");
  http::Response n = client.Get("/name");
  EXPECT_FALSE(n.Header("X-Server").empty());
}

// nginx answers a request with `Expect: 100-continue` with an interim "100 Continue" and then
// the response, in one write even when the body came with the headers. The interim response is
// skipped: the call gets the final one, and the connection stays in step for the next requests
// (no response is taken for the next request's).
TEST_F(NginxClusterTest, InterimContinueResponseIsSkipped) {
  auto client = Http::NewClient(Uri({endpoints_[0]}), Options(MakeRuntime(1)));
  for (int i = 0; i < 3; ++i) {
    http::Response p = client.Post("/echo", "body " + std::to_string(i), {{"Expect", "100-continue"}});
    EXPECT_EQ(p.status, 200) << p.reason;
    EXPECT_EQ(p.body, "posted\n");
    http::Response n = client.Get("/name");
    EXPECT_EQ(n.status, 200);
    EXPECT_EQ(n.body, "n0");
  }
  ASSERT_TRUE(servers_[0]->WaitForAccessLogRequests(6));
  EXPECT_EQ(servers_[0]->AccessLogConnectionCount(), 1) << "the connection was kept";
}

// The verbs put a '/' in front of a relative target, but not in front of one in absolute form
// (RFC 9112 3.2.2), which Send() sends as given: "http://host/name" used to go out as
// "/http://host/name", a path nginx answered with 200 and another resource.
TEST_F(NginxClusterTest, VerbsSendAnAbsoluteFormTargetAsGiven) {
  auto client = Http::NewClient(Uri({endpoints_[0]}), Options(MakeRuntime(1)));
  const std::string absolute = "http://" + endpoints_[0] + "/name";
  EXPECT_EQ(client.Send({"GET", absolute, {}, {}}).body, "n0");
  EXPECT_EQ(client.Get(absolute).body, "n0");
  EXPECT_EQ(client.AsyncGet(absolute, boost::asio::use_future).get().body, "n0");
  EXPECT_EQ(client.Get("name").body, "n0");  // relative: "/name"
  EXPECT_EQ(client.Get("HTTP://" + endpoints_[0] + "/name").body, "n0");  // the scheme ignores case
  // "*" (asterisk form) goes out as given too; whatever nginx makes of it, it is sent.
  try {
    client.Send({"OPTIONS", "*", {}, {}});
  } catch (const Error& e) {
    EXPECT_NE(e.code(), Errc::kInvalidArgument) << e.what();
  }
}

TEST_F(NginxClusterTest, RequestsSpreadOverEveryServer) {
  // The heap balancer uses idle nodes in random order. (The default, aperture, keeps a
  // sequential caller on the smallest subset that carries its load.)
  auto o = Options(MakeRuntime());
  o.balancer.kind = BalancerKind::kHeap;
  auto client = Http::NewClient(Uri(endpoints_), o);
  std::map<std::string, int> by_server;
  for (int i = 0; i < 300; ++i) ++by_server[std::string(client.Get("/name").Header("X-Server"))];
  ASSERT_EQ(by_server.size(), 3u);
  for (auto& [name, count] : by_server) EXPECT_GE(count, 40) << name;
}

TEST_F(NginxClusterTest, KeepAliveReusesConnections) {
  auto client = Http::NewClient(Uri({endpoints_[0]}), Options(MakeRuntime(1)));
  for (int i = 0; i < 50; ++i) ASSERT_EQ(client.Get("/").status, 200);
  ASSERT_TRUE(servers_[0]->WaitForAccessLogRequests(50));
  // One event loop, one request at a time: one connection carries all 50 requests.
  EXPECT_EQ(servers_[0]->AccessLogConnectionCount(), 1);
  EXPECT_EQ(servers_[0]->AccessLogRequestCount(), 50);
}

// Runs `concurrency` callers in a closed loop until `stop`; counts every completion.
struct Load {
  http::HttpClient client;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> started{0}, completed{0}, failed{0};
  std::atomic<int> active{0};
  std::mutex mu;
  std::vector<std::string> recent;  // endpoints of recent successes, newest last
  std::promise<void> drained;

  struct Caller {
    CallInfo info;
  };
  std::vector<std::unique_ptr<Caller>> callers;

  void Start(int concurrency) {
    active = concurrency;
    for (int i = 0; i < concurrency; ++i) callers.push_back(std::make_unique<Caller>());
    for (auto& c : callers) Next(c.get());
  }
  void Next(Caller* c) {
    if (stop) {
      if (--active == 0) drained.set_value();
      return;
    }
    ++started;
    CallOptions o;
    o.info = &c->info;
    client.AsyncSend(http::Request{"GET", "/name", {}, {}}, o, [this, c](error_code ec, http::Response) {
      ++completed;
      if (ec) {
        ++failed;
      } else {
        std::lock_guard lock(mu);
        recent.push_back(c->info.endpoint);
        if (recent.size() > 200) recent.erase(recent.begin());
      }
      Next(c);
    });
  }
  std::set<std::string> RecentEndpoints(size_t last) {
    std::lock_guard lock(mu);
    std::set<std::string> s;
    for (size_t i = recent.size() > last ? recent.size() - last : 0; i < recent.size(); ++i) s.insert(recent[i]);
    return s;
  }
  void StopAndWait() {
    if (waited) return;
    waited = true;
    stop = true;
    ASSERT_EQ(drained.get_future().wait_for(10s), std::future_status::ready) << "calls did not all complete";
  }
  // A failed ASSERT leaves the test early: the calls must still end before the Load goes.
  ~Load() {
    if (!callers.empty()) StopAndWait();
  }
  bool waited = false;
};

TEST_F(NginxClusterTest, ServerStoppedMidRunThenRestarted) {
  stats::StatsRegistry stats;
  Load load;
  // The heap balancer spreads 8 callers over all three servers (aperture may use fewer).
  auto o = Options(MakeRuntime(), &stats);
  o.balancer.kind = BalancerKind::kHeap;
  load.client = Http::NewClient(Uri(endpoints_), o);
  load.Start(8);
  ASSERT_TRUE(Eventually([&] { return load.RecentEndpoints(100).size() == 3; }));

  servers_[1]->Stop();
  const std::string stopped = endpoints_[1];
  // The balancer stops choosing the stopped server: the last 100 successes avoid it.
  const int64_t at_stop = load.completed;
  ASSERT_TRUE(Eventually([&] {
    auto eps = load.RecentEndpoints(100);
    return load.completed > at_stop + 200 && eps.count(stopped) == 0 && eps.size() == 2;
  }));
  EXPECT_GE(stats.FindCounter("scales_lb_marked_down", {{"client", "it"}})->value(), 1);

  servers_[1]->Restart();
  // Chosen again once the resurrector reconnects.
  ASSERT_TRUE(Eventually([&] { return load.RecentEndpoints(100).count(stopped) == 1; }, 10000ms));

  load.StopAndWait();
  EXPECT_EQ(load.started.load(), load.completed.load()) << "every request completes exactly once";
  EXPECT_LT(load.failed.load(), load.completed.load() / 10);
  const auto* pending = stats.FindGauge("scales_pending", {{"client", "it"}});
  ASSERT_NE(pending, nullptr);
  EXPECT_EQ(pending->value(), 0);
}

class TestServerTest : public ::testing::Test {
 protected:
  TestHttpServer server_{"ts"};
};

TEST_F(TestServerTest, SlowReplyTimesOutWithinTheDeadline) {
  auto opts = Options(MakeRuntime(1));  // one loop: one pool, so the last call reuses a connection
  opts.client.timeout = 200ms;
  auto client = Http::NewClient(Uri({server_.endpoint()}), opts);
  auto start = std::chrono::steady_clock::now();
  try {
    client.Get("/delay/3000");
    FAIL() << "expected a timeout";
  } catch (const Error& e) {
    auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(e.scales_code(), Errc::kRequestTimeout);
    EXPECT_TRUE(e.scales_code() == Condition::kTimeout);
    EXPECT_GE(elapsed, 190ms);
    EXPECT_LT(elapsed, 1500ms);
    std::string what = e.what();
    EXPECT_NE(what.find("timed out after 200 ms"), std::string::npos) << what;
    EXPECT_NE(what.find(server_.endpoint()), std::string::npos) << what;
  }
  // Per-call override: a longer timeout lets a short delay through.
  CallOptions longer;
  longer.timeout = 3s;
  http::Response slow = client.Send({"GET", "/delay/300", {}, {}}, longer);
  EXPECT_EQ(slow.status, 200);
  http::Response after = client.Get("/");  // the client keeps working
  EXPECT_EQ(after.status, 200);
  EXPECT_EQ(after.Header("X-Connection"), slow.Header("X-Connection")) << "keep-alive connection reused";
}

// The application's own gauge under scales_failures_by_error, with the client's labels: scales
// registers that counter at the first failure of a kind, on the response path, and the
// registry's exception escaped into the event loop (logged and dropped there) before the call
// completed: the timed-out call never completed, and a blocking Get waited for ever. The call
// completes with its timeout; the clash is logged and the gauge is left alone.
TEST_F(TestServerTest, AFailureCounterRegisteredAsAGaugeStillCompletesTheCall) {
  stats::StatsRegistry stats;
  stats::Gauge& users = stats.GetGauge("scales_failures_by_error", {{"client", "it"}, {"error", "request_timeout"}});
  auto opts = Options(MakeRuntime(1), &stats);
  opts.client.timeout = 200ms;
  auto client = Http::NewClient(Uri({server_.endpoint()}), opts);
  auto done = std::make_shared<std::promise<error_code>>();
  client.AsyncGet("/delay/3000", [done](error_code ec, http::Response) { done->set_value(ec); });
  auto slow = done->get_future();
  ASSERT_EQ(slow.wait_for(2s), std::future_status::ready) << "the timed-out call never completed";
  EXPECT_EQ(slow.get(), Errc::kRequestTimeout);
  EXPECT_EQ(users.value(), 0);
}

// A per-connection metric (the TCP transport's, registered on the loop when the pool connects)
// of another type: the connection fails, and the call says which client, endpoint and metric.
TEST_F(TestServerTest, AConnectionMetricOfAnotherTypeFailsTheCallClearly) {
  stats::StatsRegistry stats;
  stats.GetGauge("scales_connects", {{"client", "it"}, {"endpoint", server_.endpoint()}});
  auto opts = Options(MakeRuntime(1), &stats);
  opts.client.open_timeout = Duration::zero();  // the open fails too: the call says why
  auto client = Http::NewClient(Uri({server_.endpoint()}), opts);
  try {
    client.Get("/");
    ADD_FAILURE() << "expected a failure";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("client it: endpoint " + server_.endpoint()), std::string::npos) << what;
    EXPECT_NE(what.find("scales_connects{"), std::string::npos) << what;
    EXPECT_NE(what.find("is a gauge, not a counter"), std::string::npos) << what;
  }
}

// A handler that runs long (here 300 ms, the timeout is 200 ms) and then starts a call, inline on
// the event loop: the call's clock starts when it starts, not at the reply the handler came from
// (the turn's shared clock reading). It used to start 300 ms in the past, so it timed out after
// being sent.
TEST_F(TestServerTest, ACallStartedAfterALongHandlerGetsItsWholeTimeout) {
  auto opts = Options(MakeRuntime(1));
  opts.client.timeout = 200ms;
  auto client = Http::NewClient(Uri({server_.endpoint()}), opts);
  std::promise<error_code> second;
  client.AsyncGet("/", [&](error_code first, http::Response) {
    EXPECT_FALSE(first) << first.message();
    std::this_thread::sleep_for(300ms);  // the user's work, on the loop
    client.AsyncGet("/", [&](error_code ec, http::Response) { second.set_value(ec); });
  });
  auto result = second.get_future();
  ASSERT_EQ(result.wait_for(5s), std::future_status::ready);
  const error_code ec = result.get();
  EXPECT_FALSE(ec) << ec.message();
}

TEST_F(TestServerTest, BrokenResponsesGiveClearErrorsAndTheClientRecovers) {
  auto opts = Options(MakeRuntime());
  opts.transport.max_response_body_bytes = 1000;
  auto client = Http::NewClient(Uri({server_.endpoint()}), opts);
  struct Case {
    const char* path;
    Errc code;
    const char* text;
  } cases[] = {
      {"/close-mid-response", Errc::kConnectionClosed, "closed by the server while reading the response"},
      {"/garbage", Errc::kProtocolError, "malformed HTTP response"},
      {"/big/5000", Errc::kResponseTooLarge, "exceeds max_response_body_bytes (1000 bytes)"},
  };
  for (const auto& c : cases) {
    try {
      client.Get(c.path);
      ADD_FAILURE() << c.path << " did not fail";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), c.code) << c.path << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find(c.text), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(server_.endpoint()), std::string::npos) << e.what();
    }
    EXPECT_EQ(client.Get("/").status, 200) << "after " << c.path;
  }
  EXPECT_EQ(client.Get("/big/1000").body.size(), 1000u);
}

// The process out of file descriptors (EMFILE) when a client opens: the call fails at once with
// the connect error naming the client, the endpoint and the reason (no hang, no crash); once
// descriptors are free again the client recovers by itself. Not under the sanitizers: UBSan's
// vptr check tells readable memory by writing it into a pipe, which it cannot make then, and
// reports every virtual call as one on an invalid object.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST_F(TestServerTest, OutOfFileDescriptorsFailsTheCallClearlyAndRecovers) {
  auto opts = Options(MakeRuntime(1));
  opts.client.timeout = 2s;
  // Every descriptor under a lowered limit taken (the limit only keeps the loop short); given
  // back, and the limit restored, however the test ends.
  struct Exhaustion {
    rlimit saved{};
    std::vector<int> held;
    Exhaustion() {
      if (::getrlimit(RLIMIT_NOFILE, &saved) != 0) return;
      rlimit low = saved;
      low.rlim_cur = std::min<rlim_t>(saved.rlim_cur, 1024);
      if (::setrlimit(RLIMIT_NOFILE, &low) != 0) return;
      for (int fd; (fd = ::dup(2)) >= 0;) held.push_back(fd);
    }
    void End() {
      for (int fd : held) ::close(fd);
      held.clear();
      ::setrlimit(RLIMIT_NOFILE, &saved);
    }
    ~Exhaustion() { End(); }
  };
  Exhaustion exhaustion;
  ASSERT_EQ(errno, EMFILE) << "the descriptors were not used up";
  std::string what;
  const auto start = std::chrono::steady_clock::now();
  std::optional<http::HttpClient> client;
  try {
    client.emplace(Http::NewClient(Uri({server_.endpoint()}), opts));
    client->Get("/");
  } catch (const Error& e) {
    what = e.what();
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  exhaustion.End();
  EXPECT_NE(what.find("client it: "), std::string::npos) << what;
  EXPECT_NE(what.find("connect to " + server_.endpoint() + " failed: Too many open files"), std::string::npos) << what;
  EXPECT_LT(elapsed, 1500ms) << what;
  // Recovered: the next calls connect.
  bool ok = false;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!ok && std::chrono::steady_clock::now() < deadline) {
    try {
      if (!client) client.emplace(Http::NewClient(Uri({server_.endpoint()}), opts));
      ok = client->Get("/").status == 200;
    } catch (const Error&) {
      std::this_thread::sleep_for(50ms);  // the endpoint is marked down until its reconnect
    }
  }
  EXPECT_TRUE(ok) << "the client did not recover";
}
#endif

TEST_F(TestServerTest, HttpErrorStatusRaisedOrReturned) {
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime()));
  try {
    client.Get("/status/503");
    FAIL() << "expected kHttpError";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kHttpError);
    EXPECT_NE(std::string(e.what()).find("HTTP 503"), std::string::npos) << e.what();
  }
  auto opts = Options(MakeRuntime());
  opts.transport.raise_on_http_error = false;
  auto lenient = Http::NewClient(Uri({server_.endpoint()}), opts);
  EXPECT_EQ(lenient.Get("/status/404").status, 404);
}

TEST_F(TestServerTest, ChunkedHeadAndConnectionClose) {
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime(1)));
  EXPECT_EQ(client.Get("/chunked/3").body, "chunk-0\nchunk-1\nchunk-2\n");
  http::Response head = client.Head("/");
  EXPECT_EQ(head.status, 200);
  EXPECT_TRUE(head.body.empty());
  std::string first = std::string(client.Get("/close").Header("X-Connection"));
  std::string second = std::string(client.Get("/").Header("X-Connection"));
  EXPECT_NE(first, second) << "a Connection: close response must not be reused";
  std::string third = std::string(client.Get("/").Header("X-Connection"));
  EXPECT_EQ(second, third) << "keep-alive connection reused";
  http::Response h = client.Get("/headers", {{"X-Custom", "yes"}});
  EXPECT_NE(h.body.find("X-Custom: yes"), std::string::npos) << h.body;
  EXPECT_EQ(client.Delete("/").status, 200);
  EXPECT_EQ(client.Put("/", "put-body").body, "put-body");
  EXPECT_EQ(client.Patch("/", "patch-body").body, "patch-body");
  EXPECT_EQ(client.Options("/").status, 200);
}

// The request is serialised by the transport itself: what cannot be sent as HTTP/1.1 fails the
// call with kInvalidArgument naming the part, without touching the connection; a request and
// a response far larger than the socket buffers (written in pieces, read in growing chunks)
// go through on the same keep-alive connection.
TEST_F(TestServerTest, UnsendableRequestsSayWhyAndLargeBodiesGoBothWays) {
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime(1)));
  const std::string connection = std::string(client.Get("/").Header("X-Connection"));
  struct Case {
    http::Request request;
    const char* text;
  } cases[] = {
      {{"GET", "/", {{"X-Injected", "a\r\nX-Evil: 1"}}, {}}, "the value of header X-Injected has a CR, LF or NUL"},
      {{"GET", "/", {{"Bad Name", "v"}}, {}}, "the header name 'Bad Name' is not an HTTP token"},
      {{"GE T", "/", {}, {}}, "the method 'GE T' is not an HTTP token"},
      {{"GET", "/a b", {}, {}}, "the target '/a b' is empty or has spaces"},
      // Send() takes the target as given (Get("a") adds the '/'): a relative one is refused
      // rather than sent for the server's 400.
      {{"GET", "a/b?c", {}, {}}, "the target 'a/b?c' is neither a path starting with '/', an absolute URI nor '*'"},
      // The refused text is quoted escaped: a NUL used to end what() there, and a CR or LF to
      // split the message (and a log line) in two.
      {{"GET", std::string("/a\0b", 4), {}, {}}, "the target '/a\\x00b' is empty or has spaces"},
      {{"GET", "/a\r\nX-Evil: 1", {}, {}}, "the target '/a\\r\\nX-Evil: 1' is empty or has spaces"},
      {{std::string("GE\0T", 4), "/", {}, {}}, "the method 'GE\\x00T' is not an HTTP token"},
      {{"GET", "/", {{"X-A\r\nX-Evil", "1"}}, {}},
       "the header name 'X-A\\r\\nX-Evil' is not an HTTP token"},
  };
  for (auto& c : cases) {
    try {
      client.Send(c.request);
      ADD_FAILURE() << c.text << ": sent";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(c.text), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(server_.endpoint()), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find_first_of("\r\n"), std::string::npos) << e.what();
    }
  }
  std::string body(6 * 1024 * 1024, 'b');
  for (size_t i = 0; i < body.size(); i += 4096) body[i] = static_cast<char>('a' + (i / 4096) % 26);
  http::Response echoed = client.Put("/", body);
  EXPECT_EQ(echoed.body.size(), body.size());
  EXPECT_TRUE(echoed.body == body) << "the echoed body differs";
  EXPECT_EQ(client.Get("/big/5000000").body.size(), 5000000u);
  // Content-Length and Transfer-Encoding of the caller are replaced by the transport's own.
  http::Request framed{"POST", "/headers", {{"Content-Length", "999"}, {"Transfer-Encoding", "chunked"}}, "abc"};
  http::Response seen = client.Send(framed);
  EXPECT_NE(seen.body.find("Content-Length: 3"), std::string::npos) << seen.body;
  EXPECT_EQ(seen.body.find("chunked"), std::string::npos) << seen.body;
  EXPECT_EQ(client.Get("/").Header("X-Connection"), connection) << "one keep-alive connection throughout";
}

// Default headers go out with every request, in order, a repeated name included; one the
// request has itself (any case) is left out. A repeated default header used to go out once:
// the second was taken for one the request already had.
TEST_F(TestServerTest, DefaultHeadersAreAddedUnlessTheRequestHasThem) {
  auto opts = Options(MakeRuntime(1));
  opts.default_headers = {{"X-Default", "from-defaults"}, {"X-Twice", "1"}, {"X-Twice", "2"}};
  auto client = Http::NewClient(Uri({server_.endpoint()}), opts);
  http::Response plain = client.Get("/headers");
  EXPECT_NE(plain.body.find("X-Default: from-defaults\nX-Twice: 1\nX-Twice: 2\n"), std::string::npos)
      << plain.body;
  http::Response own = client.Get("/headers", {{"x-default", "own"}});
  EXPECT_NE(own.body.find("x-default: own\n"), std::string::npos) << own.body;
  EXPECT_EQ(own.body.find("from-defaults"), std::string::npos) << own.body;
  EXPECT_NE(own.body.find("X-Twice: 1\nX-Twice: 2\n"), std::string::npos) << own.body;
  // The call's own headers (CallOptions::headers) replace a default one too: a default Host
  // and a call's Host used to both go out, which a server must answer with 400.
  CallOptions per_call;
  per_call.headers = {{"x-default", "per-call"}, {"X-Twice", "3"}};
  http::Response call = client.Send(http::Request{"GET", "/headers", {}, {}}, per_call);
  EXPECT_NE(call.body.find("x-default: per-call\nX-Twice: 3\n"), std::string::npos) << call.body;
  EXPECT_EQ(call.body.find("from-defaults"), std::string::npos) << call.body;
  EXPECT_EQ(call.body.find("X-Twice: 1"), std::string::npos) << call.body;
}

// Two Host header fields (the request's and the call's, or two in one list) are refused before
// anything is sent: a server must answer such a request with 400 (RFC 9112 3.2). Both used to go
// out.
TEST_F(TestServerTest, ASecondHostHeaderIsRefusedBeforeSending) {
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime(1)));
  CallOptions per_call;
  per_call.headers = {{"host", "call.example"}};
  for (auto& [request, options] : {std::pair{http::Request{"GET", "/headers", {{"Host", "a.example"}}, {}}, per_call},
                                   std::pair{http::Request{"GET", "/headers", {{"Host", "a"}, {"HOST", "b"}}, {}},
                                             CallOptions{}}}) {
    try {
      client.Send(request, options);
      ADD_FAILURE() << "sent with two Host fields";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find("not sent: it has a second Host header field"), std::string::npos)
          << e.what();
    }
  }
  // One Host, from either list, goes out as given.
  http::Response own = client.Get("/headers", {{"Host", "own.example"}});
  EXPECT_NE(own.body.find("Host: own.example\n"), std::string::npos) << own.body;
  http::Response call = client.Send(http::Request{"GET", "/headers", {}, {}}, per_call);
  EXPECT_NE(call.body.find("host: call.example\n"), std::string::npos) << call.body;
}

// Default headers are options: one that could never be sent (a name that is not a token, a
// value with CR, LF or NUL) fails Build() naming the field, rather than every call after it.
TEST_F(TestServerTest, UnsendableDefaultHeadersFailTheBuild) {
  struct Case {
    Headers headers;
    const char* text;
  } cases[] = {
      {{{"X-Ok", "1"}, {"X-Injected", "a\r\nX-Evil: 1"}},
       "default_headers[1]: the value of header X-Injected has a CR, LF or NUL"},
      {{{"Bad Name", "v"}}, "default_headers[0]: the header name 'Bad Name' is not an HTTP token"},
      {{{"", "v"}}, "default_headers[0]: the header name '' is not an HTTP token"},
  };
  for (auto& c : cases) {
    auto opts = Options(MakeRuntime(1));
    opts.default_headers = c.headers;
    try {
      Http::NewClient(Uri({server_.endpoint()}), opts);
      ADD_FAILURE() << c.text << ": built";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(c.text), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).rfind("client it: ", 0), 0u) << e.what();
    }
  }
}

TEST_F(TestServerTest, EveryCompletionStyle) {
  // The coroutine's io_context outlives the client and its runtime: a loop thread may still be
  // inside the post that completed the coroutine's call when run() returns.
  boost::asio::io_context ioc;
  auto rt = MakeRuntime();
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(rt));
  // Blocking.
  EXPECT_EQ(client.Get("/").status, 200);
  // Callback.
  std::promise<int> cb;
  client.AsyncGet("/", [&](error_code ec, http::Response r) { cb.set_value(ec ? -1 : r.status); });
  EXPECT_EQ(cb.get_future().get(), 200);
  // Future.
  std::future<http::Response> f = client.AsyncPost("/", "abc", boost::asio::use_future);
  EXPECT_EQ(f.get().body, "abc");
  // A future of a failing call throws the error.
  auto bad = client.AsyncGet("/status/500", boost::asio::use_future);
  EXPECT_THROW(bad.get(), boost::system::system_error);
  // Coroutine, on the user's own io_context.
  int status = 0;
  boost::asio::co_spawn(
      ioc,
      [&]() -> boost::asio::awaitable<void> {
        http::Response r = co_await client.AsyncGet("/", boost::asio::use_awaitable);
        status = r.status;
      },
      boost::asio::detached);
  ioc.run();
  EXPECT_EQ(status, 200);
  // A deferred call made through a handle that is gone by the time it runs: the operation
  // keeps its own copies of the client's core and default headers.
  auto deferred_get = http::HttpClient(client).AsyncGet("/", boost::asio::deferred);
  std::promise<int> d;
  std::move(deferred_get)([&](error_code ec, http::Response r) { d.set_value(ec ? -1 : r.status); });
  EXPECT_EQ(d.get_future().get(), 200);
}

// Asio's rule: until the call completes, its handler's executor has outstanding work. An
// io_context that only runs the handler (bound with bind_executor) must not run out of work
// and return from run() while the reply is on its way.
TEST_F(TestServerTest, HandlerBoundToAnIoContextKeepsItRunning) {
  boost::asio::io_context ioc;  // outlives the client: a loop thread may still be in the post
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime()));
  int status = 0;
  std::thread::id ran_on;
  client.AsyncGet("/delay/100", boost::asio::bind_executor(ioc, [&](error_code ec, http::Response r) {
                    status = ec ? -1 : r.status;
                    ran_on = std::this_thread::get_id();
                  }));
  ioc.run();  // returns once the handler ran
  EXPECT_EQ(status, 200);
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  client.Close();
}

TEST_F(TestServerTest, AsioCancellationFromAnAwaitableRace) {
  using namespace boost::asio::experimental::awaitable_operators;
  // The coroutine's io_context outlives the client and its runtime: a loop thread may still be
  // inside the post that completed the coroutine's call when run() returns.
  boost::asio::io_context ioc;
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime()));
  bool timer_won = false;
  auto start = std::chrono::steady_clock::now();
  boost::asio::co_spawn(
      ioc,
      [&]() -> boost::asio::awaitable<void> {
        boost::asio::steady_timer timer(ioc, 100ms);
        // The slow call loses the race and is cancelled through its cancellation slot.
        auto result = co_await (client.AsyncGet("/delay/5000", boost::asio::as_tuple(boost::asio::use_awaitable)) ||
                                timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable)));
        timer_won = result.index() == 1;
      },
      boost::asio::detached);
  ioc.run();  // returns only once the cancelled call has completed too
  EXPECT_TRUE(timer_won);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s) << "the cancelled call did not complete promptly";
  // The cancellation reached the transport: a callback call cancelled the same way reports it.
  boost::asio::cancellation_signal signal;
  std::promise<error_code> got;
  client.AsyncGet("/delay/5000", boost::asio::bind_cancellation_slot(
                                     signal.slot(), [&](error_code ec, http::Response) { got.set_value(ec); }));
  std::this_thread::sleep_for(50ms);
  signal.emit(boost::asio::cancellation_type::terminal);
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(2s), std::future_status::ready);
  EXPECT_EQ(f.get(), Errc::kCancelled);
  EXPECT_EQ(client.Get("/").status, 200);
}

TEST_F(TestServerTest, BlockingCallOnTheEventLoopFailsFast) {
  auto client = Http::NewClient(Uri({server_.endpoint()}), Options(MakeRuntime(1)));
  std::promise<error_code> result;
  client.AsyncGet("/", [&](error_code, http::Response) {
    try {
      client.Get("/");  // on the client's own loop: would deadlock
      result.set_value({});
    } catch (const Error& e) {
      result.set_value(e.scales_code());
    }
  });
  EXPECT_EQ(result.get_future().get(), Errc::kBlockingCallOnEventLoop);
}

TEST(HttpClientTest, UnreachableServerAndBadUri) {
  int port = test::FreeTcpPort();
  auto opts = Options(MakeRuntime());
  auto client = Http::NewClient("tcp://127.0.0.1:" + std::to_string(port), opts);
  try {
    client.Get("/");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_TRUE(e.scales_code() == Condition::kUnavailable) << e.what();
    EXPECT_NE(std::string(e.what()).find("Connection refused"), std::string::npos) << e.what();
  }
  try {
    Http::NewClient("tcp://127.0.0.1", opts);
    FAIL() << "expected kBadUri";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kBadUri);
  }
}

TEST(ConcurrencyHttpTest, ManyThreadsShareOneClient) {
  TestHttpServer a("a"), b("b");
  auto client = Http::NewClient(Uri({a.endpoint(), b.endpoint()}), Options(MakeRuntime(2)));
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) {
        if (client.Get("/").status == 200) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 400);
  client.Close();
  try {
    client.Get("/");
    FAIL() << "expected kClientClosed";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kClientClosed);
  }
}

// Handles copied to other threads and released there, or last inside a completion handler on
// the client's loop (which then starts one more call from that loop); three clients share a
// runtime whose last reference goes with them, so it is destroyed on one of its own loops.
// Every call completes exactly once, and the runtime goes.
TEST(ConcurrencyHttpTest, HandlesReleasedOnOtherThreadsAndInTheirOwnHandlers) {
  TestHttpServer server("handles");
  constexpr int kClients = 3, kThreads = 3, kCalls = 10;
  constexpr int kTotal = kClients * kThreads * kCalls * 2;  // each handler starts one more
  auto completions = std::make_shared<std::vector<std::atomic<int>>>(kTotal);
  auto completed = std::make_shared<std::atomic<int>>(0);
  auto ok = std::make_shared<std::atomic<int>>(0);
  std::weak_ptr<Runtime> weak_runtime;
  {
    auto runtime = MakeRuntime(2);
    weak_runtime = runtime;
    std::vector<http::HttpClient> clients;
    for (int c = 0; c < kClients; ++c) {
      auto o = Options(runtime);  // the default registry: the runtime may end on a thread of its own
      o.client.name = fmt::format("handles-{}", c);
      clients.push_back(Http::NewClient(Uri({server.endpoint()}), o));
    }
    runtime.reset();  // the clients hold it
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([=, copies = clients]() mutable {
        auto done = [=](int id) {
          return [=](error_code ec, const http::Response& r) {
            if (id % 2 == 0 && !ec && r.status == 200) ++*ok;  // the first calls of each pair
            (*completions)[id]++;
            ++*completed;
          };
        };
        for (int c = 0; c < kClients; ++c) {
          for (int i = 0; i < kCalls; ++i) {
            const int id = ((t * kClients + c) * kCalls + i) * 2;
            copies[c].AsyncGet("/", [client = copies[c], done, id](error_code ec, http::Response r) mutable {
              // On the client's loop: one more call from here, then this handle goes.
              client.AsyncGet("/", done(id + 1));
              done(id)(ec, r);
              client = http::HttpClient();
            });
          }
        }
        copies.clear();  // released on this thread
      });
    }
    clients.clear();
    for (auto& th : threads) th.join();
  }
  ASSERT_TRUE(Eventually([&] { return completed->load() == kTotal; }, 10000ms))
      << completed->load() << " of " << kTotal << " calls completed";
  for (int i = 0; i < kTotal; ++i) EXPECT_EQ((*completions)[i].load(), 1) << "call " << i;
  // A call made from the handler may fail kClientClosed: its client closes when the handler
  // drops the last handle.
  EXPECT_EQ(ok->load(), kTotal / 2);
  EXPECT_TRUE(Eventually([&] { return weak_runtime.expired(); })) << "the runtime was not released";
}

// Blocking calls from six threads on a one-loop client, each with its own CallInfo, while
// another thread changes the static server set's members and a third scrapes the registry
// (text, JSON, Prometheus) as per-endpoint metrics appear and short-lived clients come and go.
TEST(ConcurrencyHttpTest, BlockingCallsWhileMembersChangeAndStatsAreScraped) {
  TestHttpServer a("a"), b("b");
  stats::StatsRegistry registry;  // outlives the runtime, where closed clients still report
  auto runtime = MakeRuntime(1);
  const Endpoint ea{"127.0.0.1", static_cast<uint16_t>(a.port())};
  const Endpoint eb{"127.0.0.1", static_cast<uint16_t>(b.port())};
  auto members = std::make_shared<StaticServerSet>(ServerSet::Members{ea});
  auto o = Options(runtime, &registry);
  o.client.server_set = members;
  auto client = Http::NewClient("", o);
  constexpr int kThreads = 6, kCalls = 40;
  std::atomic<int> ok{0}, callers_done{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, copy = client] {
      for (int i = 0; i < kCalls; ++i) {
        CallInfo info;
        CallOptions call;
        call.info = &info;
        try {
          if (copy.Send({"GET", "/", {}, {}}, call).status == 200 &&
              (info.endpoint == a.endpoint() || info.endpoint == b.endpoint()) && !info.error) {
            ++ok;
          }
        } catch (const Error& e) {
          ADD_FAILURE() << e.what();
        }
      }
      ++callers_done;
    });
  }
  std::thread updater([&] {
    const std::vector<ServerSet::Members> lists = {{ea, eb}, {eb}, {ea}, {eb, ea}};
    for (size_t i = 0; callers_done.load() < kThreads; ++i) {
      members->Update(lists[i % lists.size()]);
      std::this_thread::sleep_for(2ms);
    }
  });
  std::thread churn([&] {
    for (int i = 0; callers_done.load() < kThreads; ++i) {
      try {
        auto co = Options(runtime, &registry);
        co.client.name = fmt::format("churn-{}", i);
        auto c = Http::NewClient(Uri({i % 2 ? a.endpoint() : b.endpoint()}), co);
        EXPECT_EQ(c.Get("/").status, 200);
        if (i % 2) c.Close();
      } catch (const Error& e) {
        ADD_FAILURE() << e.what();  // not std::terminate: the test reports it
      }
    }
  });
  while (callers_done.load() < kThreads) {
    const auto scrape_start = std::chrono::steady_clock::now();
    EXPECT_FALSE(registry.ToPrometheus().empty());
    EXPECT_FALSE(registry.ToJson().empty());
    EXPECT_FALSE(registry.ToText().empty());
    // Paced, as a scraper is: the registry's lock is held while each scrape reads it, and
    // the metrics of the churn clients (kept after they close) make every scrape longer.
    // Scraping back to back, or 1 ms apart, kept that lock taken most of the time under TSan
    // on two busy cores, and the loop, which registers each new connection's metrics, waited
    // for it until calls timed out (5 s) and a churn client's open did (10 s). Waiting four
    // times as long as the scrape took keeps the lock free at least 80 % of the time.
    std::this_thread::sleep_for(std::max<std::chrono::steady_clock::duration>(
        1ms, 4 * (std::chrono::steady_clock::now() - scrape_start)));
  }
  for (auto& th : threads) th.join();
  updater.join();
  churn.join();
  EXPECT_EQ(ok.load(), kThreads * kCalls);
}

// Three clients share a runtime; each has slow calls in flight when the test drops the clients
// and then the runtime on its own thread: the runtime's destructor lets the loops run the
// clients' shutdown, which fails every call in flight with kClientClosed, and returns well
// within its 5 s limit.
TEST(ConcurrencyHttpTest, SharedRuntimeDestroyedRightAfterItsClientsWithCallsInFlight) {
  TestHttpServer server("slow", 0, 4);
  constexpr int kClients = 3, kCalls = 8;
  std::atomic<int> completed{0}, closed{0};
  std::vector<std::atomic<int>> completions(kClients * kCalls);
  auto runtime = MakeRuntime(2);
  {
    std::vector<http::HttpClient> clients;
    for (int c = 0; c < kClients; ++c) {
      auto o = Options(runtime);
      o.client.name = fmt::format("shared-{}", c);
      clients.push_back(Http::NewClient(Uri({server.endpoint()}), o));
    }
    for (int c = 0; c < kClients; ++c) {
      for (int i = 0; i < kCalls; ++i) {
        clients[c].AsyncGet("/delay/3000", [&, id = c * kCalls + i](error_code ec, http::Response) {
          if (ec == Errc::kClientClosed) ++closed;
          completions[id]++;
          ++completed;
        });
      }
    }
    // Every call reached its connection (the server holds them for 3 s).
    ASSERT_TRUE(Eventually([&] {
      int64_t pending = 0;
      for (const auto& m : stats::StatsRegistry::Default().Snapshot()) {
        if (m.name == "scales_pending" && m.labels.size() == 1 && m.labels[0].second.starts_with("shared-")) {
          pending += m.value;
        }
      }
      return pending == kClients * kCalls;
    }));
  }
  const auto start = std::chrono::steady_clock::now();
  runtime.reset();
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_LT(took, 2s) << "the runtime waited for its loops to give up";
  EXPECT_EQ(completed.load(), kClients * kCalls);
  EXPECT_EQ(closed.load(), kClients * kCalls);
  for (int i = 0; i < kClients * kCalls; ++i) EXPECT_EQ(completions[i].load(), 1) << "call " << i;
}

}  // namespace
}  // namespace scales
