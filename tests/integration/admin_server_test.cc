// The admin HTTP server against real clients: a scales HTTP client talks to the scales test
// server while a second scales HTTP client (its own registry, so it does not disturb what is
// checked) fetches /metrics, /admin/metrics.json and /admin/clients from the admin server.

#include "scales/admin/admin_server.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <boost/json.hpp>

#include "Echo.h"
#include "scales/http/client.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/fixtures.h"
#include "support/prometheus_text.h"
#include "support/zookeeper_fixture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using ::testing::AllOf;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string Str(const boost::json::value& v) { return std::string(v.as_string()); }

std::shared_ptr<Runtime> MakeRuntime(size_t threads) {
  RuntimeOptions o;
  o.threads = threads;
  return std::make_shared<Runtime>(o);
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

class AdminServerTest : public ::testing::Test {
 protected:
  AdminServerTest() {
    http::HttpOptions o;
    o.client.name = "admin-it";
    o.client.runtime = MakeRuntime(2);
    o.client.stats = &registry_;
    o.client.timeout = 5s;
    client_.emplace(Http::NewClient("tcp://" + server_.endpoint(), o));
    admin::AdminServerOptions admin_options;
    admin_options.stats = &registry_;
    admin_.emplace(admin_options);
  }

  // A client of the admin server: its own runtime and registry, errors as responses.
  http::HttpClient& Fetcher() {
    if (!fetcher_) {
      http::HttpOptions o;
      o.client.name = "admin-fetcher";
      o.client.runtime = MakeRuntime(1);
      o.client.stats = &fetcher_registry_;
      o.client.timeout = 5s;
      o.transport.raise_on_http_error = false;
      fetcher_.emplace(Http::NewClient(fmt::format("tcp://127.0.0.1:{}", admin_->port()), o));
    }
    return *fetcher_;
  }

  boost::json::object ClientJson(const std::string& name) {
    http::Response r = Fetcher().Get("/admin/clients");
    EXPECT_EQ(r.status, 200);
    boost::json::value v = boost::json::parse(r.body);
    for (const auto& c : v.at("clients").as_array()) {
      if (c.at("name").as_string() == name) return c.as_object();
    }
    return {};
  }

  test::TestHttpServer server_;
  stats::StatsRegistry registry_;
  stats::StatsRegistry fetcher_registry_;
  std::optional<http::HttpClient> client_;
  std::optional<admin::AdminServer> admin_;
  std::optional<http::HttpClient> fetcher_;
};

TEST_F(AdminServerTest, MetricsInPrometheusFormat) {
  for (int i = 0; i < 3; ++i) EXPECT_EQ(client_->Get("/").status, 200);
  EXPECT_NE(admin_->port(), 0);
  EXPECT_EQ(admin_->url(), fmt::format("http://127.0.0.1:{}", admin_->port()));

  http::Response r = Fetcher().Get("/metrics");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.Header("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  test::PromText prom = test::ParsePrometheusText(r.body);
  const test::PromLabels client{{"client", "admin-it"}};
  const test::PromLabels endpoint{{"client", "admin-it"}, {"endpoint", server_.endpoint()}};
  EXPECT_EQ(prom.Value("scales_requests_total", client), 3);
  EXPECT_EQ(prom.Value("scales_successes_total", client), 3);
  EXPECT_EQ(prom.Value("scales_request_latency_us_count", client), 3);
  EXPECT_EQ(
      prom.Value("scales_request_latency_us_bucket", {{"client", "admin-it"}, {"le", "+Inf"}}), 3);
  EXPECT_GE(prom.Value("scales_connects_total", endpoint).value_or(0), 1);
  EXPECT_GT(prom.Value("scales_bytes_sent_total", endpoint).value_or(0), 0);
  EXPECT_EQ(prom.Family("scales_lb_size")->type, "gauge");
  EXPECT_EQ(prom.Value("scales_lb_size", client), 1);
  // The fetcher reports elsewhere: nothing of it here.
  EXPECT_THAT(r.body, ::testing::Not(HasSubstr("admin-fetcher")));

  // HEAD: the headers of GET, no body.
  http::Response head = Fetcher().Head("/metrics");
  EXPECT_EQ(head.status, 200);
  EXPECT_TRUE(head.body.empty());
  EXPECT_NE(head.Header("Content-Length"), "0");
}

TEST_F(AdminServerTest, MetricsAsFlatJson) {
  for (int i = 0; i < 2; ++i) EXPECT_EQ(client_->Get("/").status, 200);
  http::Response r = Fetcher().Get("/admin/metrics.json");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.Header("Content-Type"), "application/json");
  boost::json::object o = boost::json::parse(r.body).as_object();
  EXPECT_EQ(o.at("clnt/admin-it/scales_requests").as_int64(), 2);
  EXPECT_EQ(o.at("clnt/admin-it/scales_request_latency_us.count").as_int64(), 2);
  EXPECT_GT(o.at("clnt/admin-it/scales_request_latency_us.p99").as_int64(), 0);
  EXPECT_GE(o.at("clnt/admin-it/" + server_.endpoint() + "/scales_connects").as_int64(), 1);
}

// docs/metrics.md against what the clients really export: an HTTP client (aperture, backup
// requests, a 404), a Thrift client (heap balancer), a ThriftMux client and a zk:// client
// report into one registry, and every family of its Prometheus text must be a row of the page
// with the same type, every row must be exported, and every family has its built-in HELP. A
// metric added, renamed or retyped in src/ without the page fails here.
TEST(MetricsDocTest, EveryExportedMetricIsDocumentedAndEveryDocumentedOneExported) {
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "ZooKeeper (java) not installed";
  // SCALES_THRIFT_PY_SERVER is <source>/tests/integration/python/thrift_server.py.
  const auto doc_path = std::filesystem::path(SCALES_THRIFT_PY_SERVER).parent_path().parent_path().parent_path().parent_path() /
                        "docs" / "metrics.md";
  std::ifstream doc_file(doc_path);
  ASSERT_TRUE(doc_file) << doc_path;
  std::stringstream doc;
  doc << doc_file.rdbuf();
  // The rows of the metric tables: "| `scales_x` | counter ..." (type first in the second column).
  std::map<std::string, std::string> documented;
  const std::string text = doc.str();
  const std::regex row(R"(\n\| `(scales_[a-z0-9_]+)` \| (counter|gauge|histogram))");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), row); it != std::sregex_iterator(); ++it) {
    documented.emplace((*it)[1].str(), (*it)[2].str());
  }
  ASSERT_GT(documented.size(), 40u) << "the metric tables of " << doc_path << " did not parse";

  stats::StatsRegistry registry;
  test::TestHttpServer http_server;
  test::TestThriftServer thrift_server;
  test::ZooKeeperServer zk;
  auto options = [&](ClientOptions& o, const std::string& name) {
    o.name = name;
    o.runtime = MakeRuntime(1);
    o.stats = &registry;
    o.timeout = 5s;
  };
  http::HttpOptions h;
  options(h.client, "doc-http");
  h.backup = BackupRequestOptions{};
  auto http_client = Http::NewClient("tcp://" + http_server.endpoint(), h);
  EXPECT_EQ(http_client.Get("/").status, 200);
  EXPECT_THROW(http_client.Get("/status/404"), Error);

  thrift::ThriftOptions t;
  options(t.client, "doc-thrift");
  t.balancer.kind = BalancerKind::kHeap;
  auto thrift_client = Thrift::NewClient<echo::EchoClient>("tcp://" + thrift_server.endpoint(), t);
  std::string reply;
  thrift_client->echo(reply, "hi");
  EXPECT_EQ(reply, "hi");

  // The session's sinks and their metrics exist once the endpoint joined; that the Thrift
  // server does not speak Mux (the handshake fails) does not matter here. Opportunistic TLS
  // (with resume_sessions, the default) registers the TLS metrics.
  thriftmux::ThriftMuxOptions m;
  options(m.client, "doc-mux");
  m.session.opportunistic_tls = mux::OpportunisticTls::kDesired;
  auto mux_client = ThriftMux::NewClient<echo::EchoClient>("tcp://" + thrift_server.endpoint(), m);

  http::HttpOptions z;
  options(z.client, "doc-zk");
  auto zk_client = Http::NewClient(zk.Uri("/services/doc"), z);

  const std::string prom_text = registry.ToPrometheus();
  test::PromText prom = test::ParsePrometheusText(prom_text);
  std::map<std::string, std::string> exported;  // registry name -> type
  for (const auto& f : prom.families) {
    std::string name = f.name;
    if (f.type == "counter" && name.ends_with("_total")) name.resize(name.size() - 6);
    if (f.type == "gauge" && name.ends_with("_quantile") && prom.Family(name.substr(0, name.size() - 9)) != nullptr) {
      continue;  // a histogram's quantiles
    }
    exported.emplace(name, f.type);
    EXPECT_TRUE(f.help && !f.help->starts_with("scales metric ")) << name << " has no built-in HELP text";
  }
  for (const auto& [name, type] : exported) {
    auto it = documented.find(name);
    if (it == documented.end()) {
      ADD_FAILURE() << name << " (" << type << ") is exported but not a row of " << doc_path;
    } else {
      EXPECT_EQ(it->second, type) << name << ": docs/metrics.md says " << it->second;
    }
  }
  for (const auto& [name, type] : documented) {
    EXPECT_TRUE(exported.contains(name)) << name << " is documented but was not exported:\n" << prom_text;
  }
}

TEST_F(AdminServerTest, ClientsShowStackMembersAndLoad) {
  EXPECT_EQ(client_->Get("/").status, 200);
  boost::json::object c = ClientJson("admin-it");
  ASSERT_FALSE(c.empty());
  EXPECT_EQ(Str(c.at("uri")), "tcp://" + server_.endpoint());
  EXPECT_EQ(c.at("options").at("timeout_ms"), 5000);
  EXPECT_EQ(c.at("options").at("event_loops"), 2);
  EXPECT_EQ(c.at("options").at("stats"), "custom");
  // The stack as the client's spec has it, top to bottom.
  std::vector<std::string> stack, expected;
  for (const auto& s : c.at("stack").as_array())
    stack.push_back(Str(s.at("role")) + ":" + Str(s.at("name")));
  for (const SinkProvider& p : client_->core()->spec().providers())
    expected.push_back(p.role + ":" + p.name);
  EXPECT_EQ(stack, expected);
  EXPECT_EQ(stack.front(), "timeout:timeout");
  EXPECT_EQ(stack.back(), "transport:http-transport");
  EXPECT_THAT(stack, ::testing::Contains(::testing::StartsWith("loadbalancer:")));
  // Each provider shows the options it was built with.
  for (const auto& s : c.at("stack").as_array()) {
    const auto& settings = s.at("settings").as_object();
    if (Str(s.at("role")) == "retry") {
      EXPECT_EQ(Str(settings.at("max_retries")), "2");
      EXPECT_EQ(Str(settings.at("budget.percent_can_retry")), "0.2");
    }
    if (Str(s.at("role")) == "pool") {
      EXPECT_EQ(Str(settings.at("high_watermark")), "256");
    }
    if (Str(s.at("name")) == "aperture-balancer") {
      EXPECT_EQ(Str(settings.at("smoothing_window")), "5000ms");
    }
  }
  EXPECT_THAT(stack, ::testing::Contains("retry:retry"));
  EXPECT_THAT(std::string(c.at("describe").as_string()), HasSubstr("client admin-it"));

  ASSERT_EQ(c.at("loops").as_array().size(), 2u);
  for (const auto& loop : c.at("loops").as_array()) {
    EXPECT_EQ(loop.at("sinks").at(0).at("name"), "timeout");
    EXPECT_FALSE(loop.at("balancer").as_string().empty());
    ASSERT_EQ(loop.at("members").as_array().size(), 1u);
    EXPECT_EQ(Str(loop.at("members").at(0).at("endpoint")), server_.endpoint());
    EXPECT_THAT(std::string(loop.at("members").at(0).at("state").as_string()),
                ::testing::AnyOf("open", "idle"));
  }
  ASSERT_EQ(c.at("members").as_array().size(), 1u);
  const auto& member = c.at("members").at(0);
  EXPECT_EQ(Str(member.at("endpoint")), server_.endpoint());
  EXPECT_EQ(member.at("load"), 0);
  int64_t loops = 0;
  for (const auto& [state, n] : member.at("states").as_object()) loops += n.as_int64();
  EXPECT_EQ(loops, 2);

  // A slow call in flight shows as load on its member.
  auto slow = client_->AsyncGet("/delay/3000", boost::asio::use_future);
  EXPECT_TRUE(
      Eventually([&] { return ClientJson("admin-it").at("members").at(0).at("load") == 1; }));
  EXPECT_EQ(slow.get().status, 200);
  EXPECT_EQ(ClientJson("admin-it").at("members").at(0).at("load"), 0);

  // A closed client is no longer listed.
  client_->Close();
  EXPECT_TRUE(ClientJson("admin-it").empty());
}

TEST_F(AdminServerTest, IndexErrorsAndStop) {
  http::Response index = Fetcher().Get("/");
  EXPECT_EQ(index.status, 200);
  EXPECT_THAT(index.body, HasSubstr("/admin/clients"));
  http::Response missing = Fetcher().Get("/nope?x=1");
  EXPECT_EQ(missing.status, 404);
  EXPECT_THAT(missing.body, HasSubstr("no such path: /nope"));
  http::Response post = Fetcher().Post("/metrics", "x");
  EXPECT_EQ(post.status, 405);
  EXPECT_EQ(post.Header("Allow"), "GET, HEAD");
  // The query string is ignored.
  EXPECT_EQ(Fetcher().Get("/metrics?name[]=x").status, 200);

  int port = admin_->port();
  admin_->Stop();
  admin_->Stop();  // idempotent
  EXPECT_FALSE(test::CanConnect(port));
}

// The admin server shares the process's descriptors with its clients: it serves at most 64
// connections at once and answers the ones beyond 503 as it accepts them (without reading a
// request), then closes them, and serves again once some are gone.
TEST_F(AdminServerTest, ConnectionsBeyondTheLimitAreClosed) {
  boost::asio::io_context io;
  const boost::asio::ip::tcp::endpoint endpoint(boost::asio::ip::make_address("127.0.0.1"), admin_->port());
  std::vector<boost::asio::ip::tcp::socket> idle;
  for (int i = 0; i < 64; ++i) {
    idle.emplace_back(io).connect(endpoint);
  }
  // Each of those is a session once accepted: a GET on the first one is answered.
  boost::asio::write(idle[0], boost::asio::buffer(std::string("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")));
  char buf[256];
  EXPECT_GT(idle[0].read_some(boost::asio::buffer(buf)), 0u);
  boost::asio::ip::tcp::socket extra(io);
  extra.connect(endpoint);
  boost::system::error_code ec;
  std::string answer;
  for (size_t n; (n = extra.read_some(boost::asio::buffer(buf), ec)) > 0 || !ec;)
    answer.append(buf, n);  // answered without a request, then closed by the server
  EXPECT_THAT(answer, StartsWith("HTTP/1.1 503 Service Unavailable\r\n"));
  EXPECT_THAT(answer, HasSubstr("\r\n\r\nadmin server: at its limit of 64 connections "
                                "(max_connections); try again later\n"));
  EXPECT_EQ(ec, boost::asio::error::eof) << ec.message();
  idle.clear();
  // Until the server has seen those closes, a new connection is still one too many: 503.
  EXPECT_TRUE(Eventually([&] {
    try {
      return Fetcher().Get("/metrics").status == 200;
    } catch (const Error&) {
      return false;
    }
  }));
}

// Clients built, used and closed on other threads while /admin/clients is read: every read
// parses and lists only whole clients (run under TSan by the concurrency label).
// A stuck event loop delays the clients page by clients_timeout once, not once per client: the
// admin server answers every connection from one thread, so /metrics waited too.
TEST(AdminClientsTest, AStuckLoopDelaysThePageOnceNotPerClient) {
  test::TestHttpServer server;
  stats::StatsRegistry registry;
  auto runtime = MakeRuntime(1);
  std::vector<http::HttpClient> clients;
  for (int i = 0; i < 4; ++i) {
    http::HttpOptions o;
    o.client.name = fmt::format("stuck-{}", i);
    o.client.runtime = runtime;
    o.client.stats = &registry;
    clients.push_back(Http::NewClient("tcp://" + server.endpoint(), o));
  }
  std::promise<void> release;
  auto released = release.get_future().share();
  boost::asio::post(runtime->loop(0).executor(), [released] { released.wait(); });  // the user's code, stuck
  const auto start = std::chrono::steady_clock::now();
  boost::json::value v = boost::json::parse(admin::ClientsJson(400ms));
  const auto took = std::chrono::steady_clock::now() - start;
  release.set_value();
  int not_answering = 0;
  for (const auto& c : v.at("clients").as_array()) {
    for (const auto& loop : c.at("loops").as_array()) {
      if (loop.as_object().contains("error")) ++not_answering;
    }
  }
  EXPECT_EQ(not_answering, 4) << v;
  EXPECT_LT(took, 1200ms) << "4 clients x 400 ms would be 1600 ms";
}

TEST(ConcurrencyAdminTest, ClientsComeAndGoWhileListed) {
  test::TestHttpServer server;
  stats::StatsRegistry registry;  // outlives the runtime, where closed clients still report
  auto runtime = MakeRuntime(2);
  std::atomic<bool> stop{false};
  std::atomic<int> built{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10 && !stop; ++i) {
        http::HttpOptions o;
        o.client.name = fmt::format("churn-{}-{}", t, i);
        o.client.runtime = runtime;
        o.client.stats = &registry;
        auto client = Http::NewClient("tcp://" + server.endpoint(), o);
        EXPECT_EQ(client.Get("/").status, 200);
        ++built;
        if (i % 2 == 0) client.Close();  // the others close when the handle goes
      }
    });
  }
  do {
    boost::json::value v = boost::json::parse(admin::ClientsJson(2s));
    for (const auto& c : v.at("clients").as_array()) {
      EXPECT_THAT(Str(c.at("name")), StartsWith("churn-"));
      EXPECT_FALSE(c.at("stack").as_array().empty());
    }
  } while (built < 20);
  stop = true;
  for (auto& th : threads) th.join();
  // Every client was closed or lost its last handle.
  EXPECT_TRUE(Eventually([] {
    return boost::json::parse(admin::ClientsJson(2s)).at("clients").as_array().empty();
  })) << admin::ClientsJson(2s);
}

// What the admin server sent back on a new connection given `request` (then the client's end of
// stream when `half_close`), and whether it closed the connection (within 5 s; its idle timeout is
// 30 s unless set shorter): with its end of stream, or a reset.
struct Exchange {
  std::string response;
  bool closed = false;
  bool reset = false;
  bool sent = false;  // the whole request was sent
  std::chrono::steady_clock::duration took{};  // from the connection to its close
};

Exchange Send(const admin::AdminServer& admin, const std::string& request,
              bool half_close = false) {
  const auto start = std::chrono::steady_clock::now();
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), admin.port()});
  // Plain send() and recv(): Asio's blocking write and read would wait past SO_SNDTIMEO and
  // SO_RCVTIMEO.
  const timeval timeout{5, 0};
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  Exchange out;
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n =
        ::send(socket.native_handle(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server closed, or stopped reading
    sent += static_cast<size_t>(n);
  }
  out.sent = sent == request.size();
  if (half_close) ::shutdown(socket.native_handle(), SHUT_WR);
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(socket.native_handle(), buf, sizeof buf, 0);
    if (n > 0) {
      out.response.append(buf, static_cast<size_t>(n));
      continue;
    }
    out.reset = n < 0 && errno == ECONNRESET;
    out.closed = n == 0 || out.reset;
    out.took = std::chrono::steady_clock::now() - start;
    return out;
  }
}

// `e` is one answer with `status_line`, then the server's end of stream (not a reset, which may
// discard the answer before it is read).
void ExpectOneAnswer(const Exchange& e, std::string_view status_line) {
  EXPECT_THAT(e.response, StartsWith(fmt::format("{}\r\n", status_line)));
  EXPECT_EQ(e.response.find("HTTP/1.1", 1), std::string::npos) << "more than one answer";
  EXPECT_TRUE(e.closed && !e.reset) << "closed " << e.closed << ", reset " << e.reset;
}

// `e` is one answer with `status_line`, "Connection: close" and the text `body`, then the
// server's end of stream.
void ExpectRefused(const Exchange& e, std::string_view status_line, std::string_view body) {
  ExpectOneAnswer(e, status_line);
  EXPECT_THAT(e.response, HasSubstr("\r\nConnection: close\r\n"));
  EXPECT_THAT(e.response, HasSubstr("\r\nContent-Type: text/plain; charset=utf-8\r\n"));
  EXPECT_THAT(e.response, EndsWith(fmt::format("\r\n\r\n{}\n", body)));
}

// A GET of `target` (with Connection: close) is answered with /metrics, of a registry whose
// counter "requests" is 1, then the end of the connection.
void ExpectMetricsServed(const admin::AdminServer& admin, std::string_view target) {
  SCOPED_TRACE(target);
  const Exchange e =
      Send(admin, fmt::format("GET {} HTTP/1.1\r\nConnection: close\r\n\r\n", target));
  ExpectOneAnswer(e, "HTTP/1.1 200 OK");
  EXPECT_THAT(e.response, HasSubstr("\nrequests_total 1\n"));
}

// A request the admin server refuses gets an answer naming the problem, with the status for it,
// then the end of the connection (it was only closed before): malformed requests get 400.
TEST(AdminRefusalTest, AMalformedRequestGets400) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  ExpectRefused(Send(admin, "GET /metrics HTTP/1.1\r\nBad Field\r\n\r\n"),
                "HTTP/1.1 400 Bad Request", "malformed request (bad field)");
  ExpectRefused(Send(admin, "GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
                "HTTP/1.1 400 Bad Request", "malformed request (bad Content-Length)");
  // After a request that was answered (keep-alive).
  const Exchange e =
      Send(admin, "GET /nope HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nBad Field\r\n\r\n");
  EXPECT_THAT(e.response, StartsWith("HTTP/1.1 404 Not Found\r\n"));
  const size_t second = e.response.find("HTTP/1.1", 1);
  ASSERT_NE(second, std::string::npos);
  ExpectRefused({e.response.substr(second), e.closed, e.reset, e.sent, e.took},
                "HTTP/1.1 400 Bad Request",
                "malformed request (bad field)");
}

TEST(AdminRefusalTest, OversizedHeadersGet431AndAnOversizedRequestLine414) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  ExpectRefused(Send(admin, fmt::format("GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
                                        std::string(9000, 'p'))),
                "HTTP/1.1 431 Request Header Fields Too Large", "header block over 8192 bytes");
  ExpectRefused(
      Send(admin, fmt::format("GET /metrics?{} HTTP/1.1\r\n\r\n", std::string(9000, 'q'))),
      "HTTP/1.1 414 URI Too Long", "request line over 8192 bytes");
}

TEST(AdminRefusalTest, AnOversizedBodyGets413) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  ExpectRefused(Send(admin, "POST /metrics HTTP/1.1\r\nContent-Length: 9000\r\n\r\n" +
                                std::string(9000, 'b')),
                "HTTP/1.1 413 Content Too Large", "body over 8192 bytes");
  ExpectRefused(Send(admin, "POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n" +
                                std::string(0x2000, 'b') + "\r\n1\r\nb\r\n0\r\n\r\n"),
                "HTTP/1.1 413 Content Too Large", "body over 8192 bytes");
}

// RFC 9112 6.1: a Transfer-Encoding whose last coding is not chunked leaves the body without a
// known end (400); a coding the server does not decode gets 501.
TEST(AdminRefusalTest, TransferCodingsOtherThanChunkedAreRefused) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  ExpectRefused(
      Send(admin,
           "POST /metrics HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n"),
      "HTTP/1.1 501 Not Implemented", "transfer-coding gzip not supported (only chunked)");
  ExpectRefused(Send(admin, "POST /metrics HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nb"),
                "HTTP/1.1 400 Bad Request", "Transfer-Encoding without chunked as its last coding");
}

// The answer reaches a client that is still sending its request: the server stops sending and
// reads on (dropping the bytes) instead of closing with unread bytes, which resets the connection:
// the client's sending fails (most clients then give up without reading the answer), and the
// reset may discard the answer before it is read.
TEST(AdminRefusalTest, TheAnswerReachesAClientStillSending) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  const size_t size = 16 << 20;
  const Exchange e =
      Send(admin, fmt::format("POST /metrics HTTP/1.1\r\nContent-Length: {}\r\n\r\n", size) +
                      std::string(size, 'b'));
  EXPECT_TRUE(e.sent);
  ExpectRefused(e, "HTTP/1.1 413 Content Too Large", "body over 8192 bytes");
}

// RFC 9112 3.2.2: a server accepts a request target in absolute form (as a client configured with
// a proxy sends it) and serves its path; an escaped path is decoded before it is routed.
TEST(AdminRefusalTest, AbsoluteFormAndEscapedPathsAreServed) {
  stats::StatsRegistry registry;
  registry.GetCounter("requests").Increment();
  admin::AdminServer admin({.stats = &registry});
  for (const std::string& target :
       {fmt::format("http://127.0.0.1:{}/metrics?x=1", admin.port()),
        std::string("HTTPS://admin.example/metrics"), std::string("/%6detrics")}) {
    ExpectMetricsServed(admin, target);
  }
  const Exchange clients =
      Send(admin, "GET /admin/%63lients HTTP/1.1\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(clients.response, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(clients.response, HasSubstr("\r\nContent-Type: application/json\r\n"));
  EXPECT_TRUE(clients.closed && !clients.reset);
  // No path: the index. An escaped '?' is part of the path, not the start of a query.
  EXPECT_THAT(Send(admin, "GET http://a HTTP/1.1\r\nConnection: close\r\n\r\n").response,
              AllOf(StartsWith("HTTP/1.1 200 OK\r\n"), HasSubstr("/admin/clients")));
  EXPECT_THAT(
      Send(admin, "GET /metrics%3Fx HTTP/1.1\r\nConnection: close\r\n\r\n").response,
      AllOf(StartsWith("HTTP/1.1 404 Not Found\r\n"), HasSubstr("no such path: /metrics?x\n")));
}

// A bad escape, an escaped '/' (/admin%2Fclients is not /admin/clients) or NUL, or a target in
// neither form is refused, even on a keep-alive connection.
TEST(AdminRefusalTest, ABadTargetGets400) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  const std::pair<std::string_view, std::string_view> cases[] = {
      {"/admin/%6", "malformed percent-escape in the path (% and two hex digits)"},
      {"/admin/%zzclients", "malformed percent-escape in the path (% and two hex digits)"},
      {"/admin%2Fclients", "encoded '/' (%2F) in the path"},
      {"/metrics%00", "encoded NUL (%00) in the path"},
      {"ftp://a/metrics",
       "request target is neither a path (/metrics) nor an http URL (http://host/metrics)"},
  };
  for (const auto& [target, body] : cases) {
    SCOPED_TRACE(target);
    ExpectRefused(
        Send(admin, fmt::format("GET {} HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n", target)),
        "HTTP/1.1 400 Bad Request", body);
  }
  // A HEAD's answer has the body's length, not the body.
  const Exchange head = Send(admin, "HEAD /%2F HTTP/1.1\r\n\r\n");
  EXPECT_THAT(head.response, StartsWith("HTTP/1.1 400 Bad Request\r\n"));
  EXPECT_THAT(head.response, AllOf(HasSubstr("\r\nContent-Length: 30\r\n"), EndsWith("\r\n\r\n")));
  EXPECT_TRUE(head.closed && !head.reset);
}

// RFC 3986 5.2.4: dot-segments are removed from the decoded path before it is routed (an escaped
// '.' is a '.'), a ".." at the root staying there.
TEST(AdminRefusalTest, DotSegmentsAreRemovedFromThePath) {
  stats::StatsRegistry registry;
  registry.GetCounter("requests").Increment();
  admin::AdminServer admin({.stats = &registry});
  for (std::string_view target : {"/stats/../metrics", "/./metrics", "/../metrics",
                                  "/a/b/%2E%2e/.././metrics", "http://a/x/../metrics"}) {
    ExpectMetricsServed(admin, target);
  }
  // A trailing dot-segment leaves a trailing '/': /admin/clients/.. is /admin/, not a page.
  EXPECT_THAT(
      Send(admin, "GET /admin/clients/.. HTTP/1.1\r\nConnection: close\r\n\r\n").response,
      AllOf(StartsWith("HTTP/1.1 404 Not Found\r\n"), HasSubstr("no such path: /admin/\n")));
}

// A request partly received when the idle timeout fires is answered 408 (it was only closed
// before), whether it stopped in its request line, its fields or its body; a connection idle
// between requests is closed without an answer.
TEST(AdminRefusalTest, ARequestCutShortByTheIdleTimeoutGets408) {
  stats::StatsRegistry registry;
  admin::AdminServer admin(
      // Long enough that a loaded machine (sanitizers, parallel tests) reads a whole first
      // request before the timer, which starts at the accept, fires.
      {.stats = &registry, .idle_timeout = 300ms, .linger_timeout = 100ms});
  const std::string_view partial[] = {
      "GET /metr",
      "GET /metrics HTTP/1.1\r\nHost: x\r\n",
      "POST /metrics HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
      "GET /nope HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n",  // after an answered request
  };
  for (std::string_view request : partial) {
    SCOPED_TRACE(request);
    Exchange e = Send(admin, std::string(request));
    EXPECT_GE(e.took, 300ms);
    if (request.starts_with("GET /nope")) {
      EXPECT_THAT(e.response, StartsWith("HTTP/1.1 404 Not Found\r\n"));
      const size_t second = e.response.find("HTTP/1.1", 1);
      ASSERT_NE(second, std::string::npos);
      e.response.erase(0, second);
    }
    ExpectRefused(e, "HTTP/1.1 408 Request Timeout",
                  "request incomplete after 300 ms (the idle timeout)");
  }
  // A HEAD's answer has the body's length, not the body.
  const Exchange head = Send(admin, "HEAD /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nab");
  ExpectOneAnswer(head, "HTTP/1.1 408 Request Timeout");
  EXPECT_THAT(head.response, AllOf(HasSubstr("\r\nConnection: close\r\n"), EndsWith("\r\n\r\n")));
  // Idle: nothing at all, or nothing after an answered request.
  const Exchange idle = Send(admin, "");
  EXPECT_EQ(idle.response, "");
  EXPECT_TRUE(idle.closed && !idle.reset);
  ExpectOneAnswer(Send(admin, "GET /nope HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found");
}

// A client's end of stream (a half-close) in the middle of a request gets 400 naming it (the
// connection was only closed before); after a whole request, just the answer and the close.
TEST(AdminRefusalTest, AHalfCloseInTheMiddleOfARequestGets400) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  for (std::string_view request :
       {"GET /metr", "GET /metrics HTTP/1.1\r\nHost: x\r\n",
        "POST /metrics HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
        "POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab"}) {
    SCOPED_TRACE(request);
    ExpectRefused(Send(admin, std::string(request), /*half_close=*/true),
                  "HTTP/1.1 400 Bad Request", "request incomplete at the client's end of stream");
  }
  ExpectOneAnswer(Send(admin, "GET /nope HTTP/1.1\r\n\r\n", /*half_close=*/true),
                  "HTTP/1.1 404 Not Found");
}

// admin_request_fuzzer: Beast keeps a chunk-size line (with its extensions) or a trailer section
// unconsumed until it ends and bounds neither, so a client that never ended one had the server
// buffer all it sent, for as long as the idle timeout let it send. Both are bounded by the
// header limit (8 KiB) now: the request is refused.
TEST(AdminRequestLimitsTest, AnEndlessChunkSizeLineOrTrailerIsRefused) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  const std::string chunked = "POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  ExpectRefused(Send(admin, chunked + "1;ext=" + std::string(64 * 1024, 'e')),
                "HTTP/1.1 413 Content Too Large", "chunk-size line over 8192 bytes");
  ExpectRefused(Send(admin, chunked + "1\r\nx\r\n0\r\nT: " + std::string(64 * 1024, 't')),
                "HTTP/1.1 431 Request Header Fields Too Large", "trailer section over 8192 bytes");
  // Short ones are fine: the POST is read, and refused for its method.
  const Exchange ok = Send(admin, chunked + "1;ext=e\r\nx\r\n0\r\nT: t\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(ok.response, StartsWith("HTTP/1.1 405 Method Not Allowed\r\n"));
}

// A chunked request body whose last chunk arrives split after "0\r\n" is read to its end (it
// tripped an assertion in Beast in builds with assertions on, the sanitizer builds: Beast keeps
// the last chunk's bytes unconsumed and asserts that the next put() gives it five or more).
TEST(AdminRequestLimitsTest, ALastChunkSplitAcrossReadsIsReadToItsEnd) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), admin.port()});
  socket.set_option(boost::asio::ip::tcp::no_delay(true));
  for (std::string_view part : {"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                "Transfer-Encoding: chunked\r\n\r\n0\r\n",
                                "\r", "\n"}) {
    boost::asio::write(socket, boost::asio::buffer(part));
    std::this_thread::sleep_for(50ms);  // each part in a read of its own
  }
  const timeval timeout{5, 0};
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = ::recv(socket.native_handle(), buf, sizeof buf, 0)) > 0;) response.append(buf, size_t(n));
  EXPECT_THAT(response, StartsWith("HTTP/1.1 405 Method Not Allowed\r\n"));
}

// admin_request_fuzzer: Beast bounds the request line and the fields by its header limit each,
// not together, when a put() gives it the whole block at once: a block of up to twice the limit
// was answered when it came in one read (here after a first request, pipelined with it, grew the
// server's buffer).
TEST(AdminRequestLimitsTest, TheHeaderBlockLimitCountsTheRequestLineAndTheFieldsTogether) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  // A GET of /metrics whose header block is `total` bytes, half of the padding in the query.
  auto get = [](size_t total, std::string_view connection) {
    const std::string bare = fmt::format("GET /metrics? HTTP/1.1\r\nConnection: {}\r\nX-Pad: \r\n\r\n", connection);
    const size_t pad = total - bare.size();
    return fmt::format("GET /metrics?{} HTTP/1.1\r\nConnection: {}\r\nX-Pad: {}\r\n\r\n", std::string(pad / 2, 'q'),
                       connection, std::string(pad - pad / 2, 'p'));
  };
  ASSERT_EQ(get(8192, "close").size(), 8192u);
  EXPECT_THAT(Send(admin, get(8192, "close")).response, StartsWith("HTTP/1.1 200 OK\r\n"));
  const Exchange over = Send(admin, get(8192, "keep-alive") + get(8193, "close"));
  EXPECT_TRUE(over.closed);
  EXPECT_THAT(over.response, StartsWith("HTTP/1.1 200 OK\r\n"));
  const size_t second = over.response.find("HTTP/1.1", 1);
  ASSERT_NE(second, std::string::npos);
  EXPECT_THAT(over.response.substr(second), StartsWith("HTTP/1.1 431 "))
      << "a header block over the limit was answered";
}

// After a refusal the server stops sending at once, then reads on (dropping what comes) for
// linger_timeout (2 s by default) while the client keeps its end open, then closes: a byte the
// client sends every 10 ms is taken until then, and gets a reset after.
TEST(AdminServerOptionsTest, TheLingerTimeoutIsAnOption) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry, .linger_timeout = 50ms});
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), admin.port()});
  const int fd = socket.native_handle();
  const timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  const std::string_view request = "GET /%2F HTTP/1.1\r\n\r\n";
  // Timed from the request, not from the end of stream we read: the linger starts before that,
  // by however late this thread reads it.
  const auto sent = std::chrono::steady_clock::now();
  ASSERT_EQ(::send(fd, request.data(), request.size(), MSG_NOSIGNAL), ssize_t(request.size()));
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) response.append(buf, size_t(n));
  EXPECT_THAT(response, StartsWith("HTTP/1.1 400 Bad Request\r\n"));
  const auto end_of_stream = std::chrono::steady_clock::now();
  bool reset = false;
  while (!reset && std::chrono::steady_clock::now() - end_of_stream < 5s) {
    ::send(fd, "x", 1, MSG_NOSIGNAL);
    pollfd p{fd, 0, 0};  // no events asked: waits for an error or hang-up only
    reset = ::poll(&p, 1, 10) > 0 && (p.revents & (POLLERR | POLLHUP)) != 0;
  }
  const auto lingered = std::chrono::steady_clock::now() - sent;
  EXPECT_TRUE(reset);
  EXPECT_GE(lingered, 50ms);
  EXPECT_LT(lingered, 1500ms) << "the default linger is 2 s";
}

// A connected socket to the admin server, with 5 s receive and send timeouts for plain recv()
// and send().
boost::asio::ip::tcp::socket Connect(boost::asio::io_context& io, const admin::AdminServer& admin,
                                     int receive_buffer = 0) {
  boost::asio::ip::tcp::socket socket(io);
  socket.open(boost::asio::ip::tcp::v4());
  if (receive_buffer > 0) {
    ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVBUF, &receive_buffer,
                 sizeof receive_buffer);
  }
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), admin.port()});
  const timeval timeout{5, 0};
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  return socket;
}

// Sends `request` on `socket` and returns the first bytes that come back ("" at the server's
// end of stream or a reset, or after 5 s of nothing).
std::string SendAndReceiveSome(boost::asio::ip::tcp::socket& socket, std::string_view request) {
  ::send(socket.native_handle(), request.data(), request.size(), MSG_NOSIGNAL);
  char buf[4096];
  const ssize_t n = ::recv(socket.native_handle(), buf, sizeof buf, 0);
  return n > 0 ? std::string(buf, size_t(n)) : std::string();
}

// `n` connections to `admin`, each answered one GET of /metrics (200) and kept open: sessions,
// which count against max_connections until their connections end.
std::vector<boost::asio::ip::tcp::socket> ServedConnections(boost::asio::io_context& io,
                                                            const admin::AdminServer& admin, int n) {
  std::vector<boost::asio::ip::tcp::socket> open;
  for (int i = 0; i < n; ++i) {
    open.push_back(Connect(io, admin));
    EXPECT_THAT(SendAndReceiveSome(open.back(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                StartsWith("HTTP/1.1 200 OK\r\n"));
  }
  return open;
}

// A GET of /metrics whose header block is `total` bytes, padded by a field.
std::string PaddedGet(size_t total) {
  const std::string bare = "GET /metrics HTTP/1.1\r\nConnection: close\r\nX-Pad: \r\n\r\n";
  return fmt::format("GET /metrics HTTP/1.1\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
                     std::string(total - bare.size(), 'p'));
}

// max_header_bytes is what the server enforces: 1 KiB refuses a 2 KiB header block (and a
// 2 KiB request line), which the default 8 KiB would take, and takes a block of 1 KiB.
TEST(AdminServerOptionsTest, TheHeaderLimitIsAnOption) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry, .max_header_bytes = 1024});
  ASSERT_EQ(PaddedGet(1024).size(), 1024u);
  ExpectOneAnswer(Send(admin, PaddedGet(1024)), "HTTP/1.1 200 OK");
  ExpectRefused(Send(admin, PaddedGet(2048)), "HTTP/1.1 431 Request Header Fields Too Large",
                "header block over 1024 bytes");
  ExpectRefused(
      Send(admin, fmt::format("GET /metrics?{} HTTP/1.1\r\n\r\n", std::string(2048, 'q'))),
      "HTTP/1.1 414 URI Too Long", "request line over 1024 bytes");
  // A chunk-size line is bounded by it too.
  ExpectRefused(Send(admin, "POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=" +
                                std::string(2048, 'e')),
                "HTTP/1.1 413 Content Too Large", "chunk-size line over 1024 bytes");
  // The default takes the 2 KiB block.
  admin::AdminServer by_default({.stats = &registry});
  ExpectOneAnswer(Send(by_default, PaddedGet(2048)), "HTTP/1.1 200 OK");
}

// max_body_bytes is what the server enforces: 1 KiB refuses a 2 KiB body, which the default
// would read (and then refuse the POST for its method).
TEST(AdminServerOptionsTest, TheBodyLimitIsAnOption) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry, .max_body_bytes = 1024});
  auto post = [](size_t size) {
    return fmt::format("POST /metrics HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                       size) +
           std::string(size, 'b');
  };
  ExpectOneAnswer(Send(admin, post(1024)), "HTTP/1.1 405 Method Not Allowed");
  ExpectRefused(Send(admin, post(2048)), "HTTP/1.1 413 Content Too Large",
                "body over 1024 bytes");
  admin::AdminServer by_default({.stats = &registry});
  ExpectOneAnswer(Send(by_default, post(2048)), "HTTP/1.1 405 Method Not Allowed");
}

// max_connections is what the server enforces: with 2, a third connection is answered 503 as it
// is accepted, without reading its request, and closed (the default, 64, would serve it), and a
// new one is served again once one of the two is gone.
TEST(AdminServerOptionsTest, TheConnectionLimitIsAnOption) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry, .max_connections = 2});
  const std::string_view get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  boost::asio::io_context io;
  auto open = ServedConnections(io, admin, 2);
  ExpectRefused(Send(admin, std::string(get)), "HTTP/1.1 503 Service Unavailable",
                "admin server: at its limit of 2 connections (max_connections); try again later");
  // Answered before it sends anything.
  auto silent = Connect(io, admin);
  char buf[4096];
  const ssize_t n = ::recv(silent.native_handle(), buf, sizeof buf, 0);
  EXPECT_THAT(std::string(buf, n > 0 ? size_t(n) : 0),
              StartsWith("HTTP/1.1 503 Service Unavailable\r\n"));
  open.pop_back();  // closed: the server sees its end of stream and forgets it
  EXPECT_TRUE(Eventually([&] {
    auto again = Connect(io, admin);
    return SendAndReceiveSome(again, get).starts_with("HTTP/1.1 200 OK\r\n");
  }));
}

// The connections answered 503 linger (linger_timeout) like any refused one, so they are bounded
// too: at most max_connections of them at once, the ones beyond closed without an answer, or a
// flood would still take the process's descriptors. They hold up neither the connections being
// served nor the limit: a new connection is served once one of those is gone.
TEST(AdminServerOptionsTest, TheConnectionsAnswered503AreBoundedToo) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry, .linger_timeout = 30s, .max_connections = 2});
  const std::string_view get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  boost::asio::io_context io;
  auto open = ServedConnections(io, admin, 2);
  // Held open by the client: the server lingers on them for 30 s.
  std::vector<boost::asio::ip::tcp::socket> refused;
  for (int i = 0; i < 2; ++i) {
    refused.push_back(Connect(io, admin));
    EXPECT_THAT(SendAndReceiveSome(refused.back(), get),
                StartsWith("HTTP/1.1 503 Service Unavailable\r\n"));
  }
  auto beyond = Connect(io, admin);
  EXPECT_EQ(SendAndReceiveSome(beyond, get), "") << "a fifth connection was answered";
  EXPECT_THAT(SendAndReceiveSome(open.front(), get), StartsWith("HTTP/1.1 200 OK\r\n"));
  open.pop_back();
  EXPECT_TRUE(Eventually([&] {
    auto again = Connect(io, admin);
    return SendAndReceiveSome(again, get).starts_with("HTTP/1.1 200 OK\r\n");
  }));
}

// write_timeout is what the server enforces: a client that sends many requests for a large page
// and never reads the answers (they fill the socket buffers: a few MB, the answers are 100 MB)
// has its connection closed after write_timeout, not the default 30 s. The server closes with
// requests it has not read yet, so the client sees a reset without reading.
TEST(AdminServerOptionsTest, TheWriteTimeoutIsAnOption) {
  stats::StatsRegistry registry;
  for (int i = 0; i < 1000; ++i)
    registry.GetCounter(fmt::format("write_timeout_test_padding_counter_{:06}", i)).Increment();
  admin::AdminServer admin({.stats = &registry, .write_timeout = 300ms});
  ASSERT_GT(registry.ToPrometheus().size(), 100'000u);
  boost::asio::io_context io;
  const auto start = std::chrono::steady_clock::now();
  auto socket = Connect(io, admin, /*receive_buffer=*/4096);
  std::string requests;
  for (int i = 0; i < 1000; ++i) requests += "GET /metrics HTTP/1.1\r\n\r\n";
  const int fd = socket.native_handle();
  ASSERT_EQ(::send(fd, requests.data(), requests.size(), MSG_NOSIGNAL), ssize_t(requests.size()));
  bool reset = false;
  while (!reset && std::chrono::steady_clock::now() - start < 10s) {
    pollfd p{fd, 0, 0};  // no events asked: waits for an error or hang-up only
    reset = ::poll(&p, 1, 10) > 0 && (p.revents & (POLLERR | POLLHUP)) != 0;
  }
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(reset) << "the connection of a client that does not read was not closed";
  EXPECT_GE(took, 300ms);
  EXPECT_LT(took, 5s) << "the default write timeout is 30 s";
}

// RFC 9112 2.2: empty lines (CRLF) before a request line are ignored, at the start of a
// connection and between requests, the last one's CR and LF in reads of their own too (they
// were the start of a request: 400 for a bad method).
TEST(AdminEmptyLinesTest, EmptyLinesBeforeARequestAreIgnored) {
  stats::StatsRegistry registry;
  registry.GetCounter("requests").Increment();
  admin::AdminServer admin({.stats = &registry});
  const Exchange first =
      Send(admin, "\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
  ExpectOneAnswer(first, "HTTP/1.1 200 OK");
  EXPECT_THAT(first.response, HasSubstr("\nrequests_total 1\n"));
  Exchange between = Send(
      admin, "GET /nope HTTP/1.1\r\n\r\n\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(between.response, StartsWith("HTTP/1.1 404 Not Found\r\n"));
  const size_t second = between.response.find("HTTP/1.1", 1);
  ASSERT_NE(second, std::string::npos);
  between.response.erase(0, second);
  ExpectOneAnswer(between, "HTTP/1.1 200 OK");

  boost::asio::io_context io;
  auto socket = Connect(io, admin);
  socket.set_option(boost::asio::ip::tcp::no_delay(true));
  for (std::string_view part : {"\r\n\r", "\n", "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n"}) {
    ASSERT_EQ(::send(socket.native_handle(), part.data(), part.size(), MSG_NOSIGNAL),
              ssize_t(part.size()));
    std::this_thread::sleep_for(50ms);  // each part in a read of its own
  }
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = ::recv(socket.native_handle(), buf, sizeof buf, 0)) > 0;)
    response.append(buf, size_t(n));
  EXPECT_THAT(response, StartsWith("HTTP/1.1 200 OK\r\n"));
}

// Empty lines are no part of a request: a connection with nothing else (at its start, or after
// an answered request) is closed without an answer at the client's end of stream (not 400) and
// at the idle timeout (not 408).
TEST(AdminEmptyLinesTest, EmptyLinesAloneAreNoRequest) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry, .idle_timeout = 300ms});
  for (bool half_close : {true, false}) {
    SCOPED_TRACE(half_close ? "half-close" : "idle timeout");
    ExpectOneAnswer(Send(admin, "GET /nope HTTP/1.1\r\n\r\n\r\n", half_close),
                    "HTTP/1.1 404 Not Found");
    ExpectOneAnswer(Send(admin, "GET /nope HTTP/1.1\r\n\r\n\r\n\r", half_close),
                    "HTTP/1.1 404 Not Found");
    for (std::string_view alone : {"\r\n", "\r\n\r\n\r"}) {
      const Exchange e = Send(admin, std::string(alone), half_close);
      EXPECT_EQ(e.response, "");
      EXPECT_TRUE(e.closed && !e.reset);
      if (!half_close) {
        EXPECT_GE(e.took, 300ms);
      }
    }
  }
}

// Empty lines count towards max_header_bytes: an endless stream of them is refused (431) once
// they reach it, and with a request after them the whole must be within it.
TEST(AdminEmptyLinesTest, EmptyLinesCountTowardsTheHeaderLimit) {
  stats::StatsRegistry registry;
  admin::AdminServer admin({.stats = &registry});
  std::string endless;
  for (int i = 0; i < 32 * 1024; ++i) endless += "\r\n";
  const Exchange e = Send(admin, endless);
  EXPECT_TRUE(e.sent);
  ExpectRefused(e, "HTTP/1.1 431 Request Header Fields Too Large",
                "empty lines before the request line over 8192 bytes");

  admin::AdminServer small({.stats = &registry, .max_header_bytes = 1024});
  const std::string get = "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n";
  ExpectOneAnswer(Send(small, endless.substr(0, 1024 - get.size()) + get), "HTTP/1.1 200 OK");
  ExpectRefused(Send(small, endless.substr(0, 1000) + get),
                "HTTP/1.1 431 Request Header Fields Too Large",
                "header block over 1024 bytes (with 1000 bytes of empty lines before the request line)");
}

TEST(AdminServerOptionsTest, BadTimeoutsAndLimitsAreClearErrors) {
  const std::pair<admin::AdminServerOptions, std::string_view> cases[] = {
      {{.clients_timeout = -1ms}, "admin server: clients_timeout must not be negative"},
      {{.idle_timeout = 0ms}, "admin server: idle_timeout must be > 0"},
      {{.linger_timeout = -1ms}, "admin server: linger_timeout must not be negative"},
      {{.write_timeout = 0ms}, "admin server: write_timeout must be > 0"},
      {{.max_header_bytes = 0}, "admin server: max_header_bytes must be >= 1024"},
      {{.max_header_bytes = 1023}, "admin server: max_header_bytes must be >= 1024"},
      {{.max_body_bytes = 0}, "admin server: max_body_bytes must be > 0"},
      {{.max_connections = 0}, "admin server: max_connections must be > 0"},
  };
  for (const auto& [options, message] : cases) {
    try {
      admin::AdminServer bad(options);
      ADD_FAILURE() << "no error for " << message;
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), make_error_code(Errc::kInvalidArgument));
      EXPECT_THAT(e.what(), HasSubstr(std::string(message)));
    }
  }
  admin::AdminServer zero_linger({.linger_timeout = 0ms});
  admin::AdminServer smallest({.max_header_bytes = 1024, .max_body_bytes = 1, .max_connections = 1});
}

TEST(AdminServerOptionsTest, BadAddressAndBusyPortAreClearErrors) {
  try {
    admin::AdminServerOptions options;
    options.address = "not-an-ip";
    admin::AdminServer bad(options);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), make_error_code(Errc::kInvalidArgument));
    EXPECT_THAT(e.what(), HasSubstr("bad listen address 'not-an-ip'"));
  }
  admin::AdminServer first;
  try {
    admin::AdminServerOptions options;
    options.port = first.port();
    admin::AdminServer second(options);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(fmt::format("cannot bind 127.0.0.1:{}", first.port())));
  }
}

}  // namespace
}  // namespace scales
