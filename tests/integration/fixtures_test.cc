// Tests of the integration-test fixtures themselves (and of `scales testserver http`), with a raw
// Boost.Beast synchronous client so that they do not depend on the library under test.
#include "support/fixtures.h"

#include "support/fault_proxy.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <optional>
#include <string>

#include <gtest/gtest.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

namespace scales::test {
namespace {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;
using Response = http::response<http::string_body>;

// One keep-alive HTTP/1.1 connection to 127.0.0.1:port.
class RawClient {
 public:
  explicit RawClient(int port) : socket_(ioc_) {
    socket_.connect(tcp::endpoint(asio::ip::address_v4::loopback(), static_cast<uint16_t>(port)));
  }

  // Throws boost::system::system_error when the exchange fails.
  Response Send(http::verb method, std::string target, std::string body = "") {
    Response res;
    boost::system::error_code ec = TrySend(method, std::move(target), std::move(body), res);
    if (ec) throw boost::system::system_error(ec);
    return res;
  }

  Response Get(std::string target) { return Send(http::verb::get, std::move(target)); }

  boost::system::error_code TrySend(http::verb method, std::string target, std::string body,
                                    Response& res) {
    http::request<http::string_body> req{method, target, 11};
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::user_agent, "scales-fixtures-test");
    if (!body.empty() || method == http::verb::post) {
      req.body() = std::move(body);
      req.prepare_payload();
    }
    boost::system::error_code ec;
    http::write(socket_, req, ec);
    if (ec) return ec;
    http::read(socket_, buffer_, res, ec);
    return ec;
  }

 private:
  asio::io_context ioc_;
  tcp::socket socket_;
  boost::beast::flat_buffer buffer_;
};

Response GetOnce(int port, std::string target) { return RawClient(port).Get(std::move(target)); }

TEST(FixturesTest, TwoTestServersAndNginxAnswer) {
  TestHttpServer alpha("alpha");
  TestHttpServer beta("beta");
  NginxServer nginx("web");
  EXPECT_NE(alpha.port(), beta.port());
  EXPECT_EQ(alpha.endpoint(), "127.0.0.1:" + std::to_string(alpha.port()));

  Response a = GetOnce(alpha.port(), "/");
  EXPECT_EQ(a.result_int(), 200);
  EXPECT_EQ(a.body(), "hello from alpha\n");
  EXPECT_EQ(a["X-Server"], "alpha");
  EXPECT_EQ(a["X-Connection"], "1");

  Response b = GetOnce(beta.port(), "/anything");
  EXPECT_EQ(b.body(), "hello from beta\n");
  EXPECT_EQ(b["X-Server"], "beta");

  Response n = GetOnce(nginx.port(), "/");
  EXPECT_EQ(n.result_int(), 200);
  EXPECT_EQ(n.body(), "nginx web\n");
  EXPECT_EQ(n["X-Server"], "web");
  EXPECT_EQ(GetOnce(nginx.port(), "/name").body(), "web");
  Response missing = GetOnce(nginx.port(), "/status/404");
  EXPECT_EQ(missing.result_int(), 404);
  EXPECT_EQ(missing.body(), "nope\n");
  EXPECT_EQ(missing["X-Server"], "web");
}

TEST(FixturesTest, TestServerDefaultNameIsServerPort) {
  TestHttpServer server;
  EXPECT_EQ(server.name(), "server-" + std::to_string(server.port()));
  EXPECT_EQ(GetOnce(server.port(), "/").body(), "hello from " + server.name() + "\n");
}

TEST(FixturesTest, TestServerDelayAnswersLater) {
  TestHttpServer server("slow");
  RawClient client(server.port());
  auto start = std::chrono::steady_clock::now();
  Response res = client.Get("/delay/50");
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(res.body(), "hello from slow\n");
  EXPECT_GE(elapsed, std::chrono::milliseconds(50));
  EXPECT_LT(elapsed, std::chrono::seconds(2));
}

TEST(FixturesTest, TestServerStatus) {
  TestHttpServer server("s");
  RawClient client(server.port());
  Response res = client.Get("/status/503");
  EXPECT_EQ(res.result_int(), 503);
  EXPECT_EQ(res.body(), "status 503\n");
  EXPECT_EQ(res["X-Server"], "s");
  // The connection stays usable after an error status.
  EXPECT_EQ(client.Get("/").result_int(), 200);
}

TEST(FixturesTest, TestServerStopThenRestartOnSamePort) {
  TestHttpServer server("phoenix");
  int port = server.port();
  {
    // A keep-alive connection open at Stop must not keep the port from being reused.
    RawClient client(port);
    EXPECT_EQ(client.Get("/").result_int(), 200);
    server.Stop();
    EXPECT_FALSE(server.running());
    Response res;
    EXPECT_TRUE(client.TrySend(http::verb::get, "/", "", res));
  }
  EXPECT_FALSE(CanConnect(port));
  EXPECT_THROW(RawClient{port}, boost::system::system_error);

  server.Restart();
  EXPECT_TRUE(server.running());
  EXPECT_EQ(server.port(), port);
  Response res = GetOnce(port, "/");
  EXPECT_EQ(res.body(), "hello from phoenix\n");
  EXPECT_EQ(res["X-Connection"], "1");  // A new process counts from 1 again.
}

TEST(FixturesTest, TestServerBehaviours) {
  TestHttpServer server("b");
  {
    RawClient client(server.port());
    Response echo = client.Send(http::verb::post, "/echo", "ping");
    EXPECT_EQ(echo.body(), "ping");
    EXPECT_EQ(client.Get("/big/1000").body(), std::string(1000, 'x'));
    Response chunked = client.Get("/chunked/3");
    EXPECT_TRUE(chunked.chunked());
    EXPECT_EQ(chunked.body(), "chunk-0\nchunk-1\nchunk-2\n");
    EXPECT_NE(client.Get("/headers").body().find("User-Agent: scales-fixtures-test\n"),
              std::string::npos);
    Response count = client.Get("/connections");
    EXPECT_EQ(count.body(), "1");
    EXPECT_EQ(count["X-Connection"], "1");
    Response close = client.Get("/close");
    EXPECT_EQ(close[http::field::connection], "close");
    Response after_close;
    EXPECT_TRUE(client.TrySend(http::verb::get, "/", "", after_close));
  }
  {
    RawClient client(server.port());
    Response res;
    EXPECT_EQ(client.TrySend(http::verb::get, "/close-mid-response", "", res),
              http::error::partial_message);
  }
  {
    RawClient client(server.port());
    Response res;
    EXPECT_TRUE(client.TrySend(http::verb::get, "/garbage", "", res));
  }
  EXPECT_EQ(GetOnce(server.port(), "/connections").body(), "4");
}

TEST(FixturesTest, NginxKeepAliveRequestsShareOneConnection) {
  NginxServer nginx("keep");
  {
    RawClient client(nginx.port());
    EXPECT_EQ(client.Get("/").body(), "nginx keep\n");
    EXPECT_EQ(client.Send(http::verb::post, "/echo", std::string(100000, 'b')).body(), "posted\n");
    EXPECT_EQ(client.Get("/name").body(), "keep");
  }
  ASSERT_TRUE(nginx.WaitForAccessLogRequests(3)) << nginx.AccessLog();
  EXPECT_EQ(nginx.AccessLogRequestCount(), 3) << nginx.AccessLog();
  EXPECT_EQ(nginx.AccessLogConnectionCount(), 1) << nginx.AccessLog();

  GetOnce(nginx.port(), "/");
  ASSERT_TRUE(nginx.WaitForAccessLogRequests(4)) << nginx.AccessLog();
  EXPECT_EQ(nginx.AccessLogConnectionCount(), 2) << nginx.AccessLog();
}

TEST(FixturesTest, NginxStopThenRestartOnSamePort) {
  NginxServer nginx("again");
  int port = nginx.port();
  std::filesystem::path dir = nginx.dir();
  EXPECT_TRUE(std::filesystem::exists(dir / "nginx.conf"));
  nginx.Stop();
  EXPECT_FALSE(CanConnect(port));
  nginx.Restart();
  EXPECT_EQ(nginx.port(), port);
  EXPECT_EQ(GetOnce(port, "/").body(), "nginx again\n");
}

TEST(FixturesTest, NginxTempDirRemoved) {
  std::filesystem::path dir;
  {
    NginxServer nginx;
    dir = nginx.dir();
    EXPECT_TRUE(std::filesystem::is_directory(dir));
  }
  EXPECT_FALSE(std::filesystem::exists(dir));
}

TEST(FixturesTest, ChildProcessReadsLinesAndStops) {
  ChildProcess echo({"/bin/sh", "-c", "echo one; echo two; exec sleep 60"});
  EXPECT_GT(echo.pid(), 0);
  EXPECT_EQ(echo.ReadLine(std::chrono::seconds(5)), "one");
  EXPECT_EQ(echo.ReadLine(std::chrono::seconds(5)), "two");
  EXPECT_EQ(echo.ReadLine(std::chrono::milliseconds(20)), std::nullopt);
  EXPECT_TRUE(echo.Running());
  int status = echo.Stop();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM);
  EXPECT_FALSE(echo.Running());

  EXPECT_THROW(ChildProcess({"/nonexistent/program"}), std::runtime_error);
}

TEST(FixturesTest, FreeTcpPortIsBindable) {
  int port = FreeTcpPort();
  EXPECT_GT(port, 0);
  EXPECT_FALSE(CanConnect(port));
}

// A port a stopped server held stays bound until it starts again: a connect is refused, and a
// plain bind (as FreeTcpPort's of port 0, which then skips it) fails, so no other test's server
// lands there meanwhile; once released, the port binds again.
bool PlainBind(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool bound = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return bound;
}

TEST(FixturesTest, AStoppedServersPortIsHeldUntilItStartsAgain) {
  TestHttpServer server("held");
  const int port = server.port();
  server.Stop();
  EXPECT_FALSE(CanConnect(port));
  EXPECT_FALSE(PlainBind(port)) << "another test could take the port of a stopped server";
  server.Restart();
  EXPECT_EQ(GetOnce(port, "/").body(), "hello from held\n");
  server.Kill();
  EXPECT_FALSE(CanConnect(port));
  EXPECT_FALSE(PlainBind(port));

  const int free_port = FreeTcpPort();
  {
    PortHold hold(free_port);
    ASSERT_TRUE(hold.holding());
    EXPECT_FALSE(CanConnect(free_port));
    EXPECT_FALSE(PlainBind(free_port));
  }
  EXPECT_TRUE(PlainBind(free_port));
}

// A FaultProxy stall ends with Calm(): the stalled way then carries on from the byte it stopped
// at, so what arrives is still exactly what was sent (the rest of the chunk it had read past the
// stall point was dropped, and a ZooKeeper client resumed that way read a member's data skewed).
TEST(FaultProxyTest, AStallThatCalmEndsLosesNoByte) {
  asio::io_context ioc;
  tcp::acceptor upstream(ioc, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  int stalled_up = 0, stalled_down = 0;
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    FaultProxy proxy(upstream.local_endpoint().port(), seed);
    FaultProxy::Faults faults;
    faults.cut = 1;
    faults.cut_within = 1000;  // inside the first chunk the proxy reads
    faults.stall = 1;
    faults.split = 0.5;
    faults.pause = std::chrono::microseconds(100);
    proxy.SetFaults(faults);
    tcp::socket client(ioc);
    client.connect(
        tcp::endpoint(asio::ip::address_v4::loopback(), static_cast<uint16_t>(proxy.port())));
    tcp::socket server = upstream.accept();
    auto pattern = [](size_t size, unsigned salt) {
      std::string s(size, '\0');
      for (size_t i = 0; i < size; ++i) s[i] = static_cast<char>((i * 131 + salt) % 251);
      return s;
    };
    const std::string up = pattern(64 * 1024, 1), down = pattern(64 * 1024, 2);
    std::string got_up(up.size(), '\0'), got_down(down.size(), '\0');
    int done = 0;
    bool read_up = false, read_down = false;
    auto count = [&](bool* read) {
      return [&done, read](boost::system::error_code ec, size_t) {
        EXPECT_FALSE(ec) << ec.message();
        ++done;
        if (read != nullptr) *read = true;
      };
    };
    asio::async_write(client, asio::buffer(up), count(nullptr));
    asio::async_write(server, asio::buffer(down), count(nullptr));
    asio::async_read(server, asio::buffer(got_up), count(&read_up));
    asio::async_read(client, asio::buffer(got_down), count(&read_down));
    const auto run_until = [&](auto&& condition) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (!condition() && std::chrono::steady_clock::now() < deadline) {
        ioc.restart();
        ioc.run_for(std::chrono::milliseconds(10));
      }
      return condition();
    };
    ASSERT_TRUE(run_until([&] { return proxy.stalls() == 1; }));
    // The other way finishes; the stalled one is short of its bytes.
    ASSERT_TRUE(run_until([&] { return read_up || read_down; }));
    ++(read_up ? stalled_down : stalled_up);
    proxy.Calm();
    EXPECT_TRUE(run_until([&] { return done == 4; })) << done << " of 4 transfers done";
    EXPECT_TRUE(got_up == up) << "client to server: bytes lost or altered";
    EXPECT_TRUE(got_down == down) << "server to client: bytes lost or altered";
    client.close();
    server.close();
    ioc.restart();
    ioc.poll();
  }
  EXPECT_GT(stalled_up, 0);
  EXPECT_GT(stalled_down, 0);
}

}  // namespace
}  // namespace scales::test
