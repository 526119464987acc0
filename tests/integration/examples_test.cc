// The examples, built and run as smoke tests against the scales test servers (and a real
// ZooKeeper for the discovery example). Each example prints one line per style or step; the
// tests check those lines and the exit code. Against servers that fail on cue they check that
// a failed call in any style ends the example with exit code 1 and the error on stderr (not an
// abort, not a silent exit 0), that the custom sink's header is sent once per attempt
// when the retry sink sends a request again, and that the ThriftMux example's client id and
// deadline reach the server as Mux contexts.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/server/TThreadedServer.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TServerSocket.h>

#include "Echo.h"
#include "support/faulty_http_server.h"
#include "support/fixtures.h"
#include "support/mux_server_fixture.h"
#include "support/zookeeper_fixture.h"

namespace scales {
namespace {

// tests/CMakeLists.txt defines the SCALES_EXAMPLE_* paths together, or none (examples off).
#ifdef SCALES_EXAMPLE_HTTP_STYLES

// How a command ended: its wait status (as from pclose) and what it wrote.
struct Ran {
  int status = -1;
  std::string out;
  std::string err;
};

// Runs `cmd` through the shell, with its stderr in a temporary file.
Ran Execute(const std::string& cmd) {
  Ran ran;
  std::string err_path =
      (std::filesystem::temp_directory_path() / "scales-example-XXXXXX").string();
  int fd = ::mkstemp(err_path.data());
  if (fd < 0) {
    ADD_FAILURE() << "mkstemp failed";
    return ran;
  }
  ::close(fd);
  FILE* p = popen((cmd + " 2>" + err_path).c_str(), "r");
  if (p == nullptr) {
    ADD_FAILURE() << "popen failed: " << cmd;
    std::filesystem::remove(err_path);
    return ran;
  }
  char buf[1024];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) ran.out.append(buf, n);
  ran.status = pclose(p);
  std::ifstream err(err_path);
  ran.err.assign(std::istreambuf_iterator<char>(err), std::istreambuf_iterator<char>());
  std::filesystem::remove(err_path);
  return ran;
}

// Runs `cmd` through the shell; returns its stdout, and fails the test unless it exits with 0.
std::string RunExample(const std::string& cmd) {
  Ran ran = Execute(cmd);
  EXPECT_TRUE(WIFEXITED(ran.status) && WEXITSTATUS(ran.status) == 0)
      << cmd << " exited with " << ran.status << "\n"
      << ran.out << ran.err;
  return ran.out;
}

// Runs `cmd`, which must fail the way every example does: exit code 1 with "error: " on
// stderr. Not 0 (a failure dropped) and not 134 (an exception nothing caught: std::terminate,
// SIGABRT, which the shell reports as 128 + 6). Returns its stdout.
std::string RunFailingExample(const std::string& cmd) {
  Ran ran = Execute(cmd);
  EXPECT_TRUE(WIFEXITED(ran.status) && WEXITSTATUS(ran.status) == 1)
      << cmd << " exited with " << (WIFEXITED(ran.status) ? WEXITSTATUS(ran.status) : -1)
      << " (wait status " << ran.status << "), not 1\nstdout:\n"
      << ran.out << "stderr:\n"
      << ran.err;
  EXPECT_NE(ran.err.find("error: "), std::string::npos) << cmd << "\nstderr:\n" << ran.err;
  EXPECT_EQ(ran.err.find("terminate called"), std::string::npos) << cmd << "\n" << ran.err;
  return ran.out;
}

void ExpectLines(const std::string& out, std::initializer_list<const char*> lines) {
  for (const char* line : lines)
    EXPECT_NE(out.find(line), std::string::npos) << line << "\n" << out;
}

// Runs an Echo example (Thrift or ThriftMux) against `scales testserver PROTOCOL --port 0`.
void ExpectEchoStyles(const std::string& example, const char* protocol) {
  test::ChildProcess server({test::ToolPath(), "testserver", protocol, "--port", "0"});
  auto line = server.ReadLine(std::chrono::seconds(10));
  ASSERT_TRUE(line && line->starts_with("listening "))
      << protocol << ": " << (line ? *line : "no output");
  std::string out =
      RunExample(example + " tcp://" + line->substr(std::string("listening ").size()) + " hello");
  ExpectLines(out, {"blocking:  hello", "callback:  hello", "future:    hello", "coroutine: hello",
                    "declared:  EchoError(on purpose)"});
}

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t pos = 0; (pos = text.find(what, pos)) != std::string::npos; pos += what.size()) ++n;
  return n;
}

// The styles the HTTP and Thrift examples run, in the order of their calls (the Thrift example
// ends with a call of `fail`, in the coroutine, whose declared exception it expects).
constexpr const char* kStyleNames[] = {"blocking", "callback", "future", "coroutine", "declared"};

std::string StyleName(const testing::TestParamInfo<int>& info) {
  return kStyleNames[info.param - 1];
}

// Echo on Apache Thrift's TThreadedServer in this process, framed and binary (what the example's
// client speaks), whose calls from the fail_from-th on (counted over every method) throw an
// exception the IDL does not declare: the client gets an apache::thrift::TApplicationException.
class FailingEchoServer {
 public:
  explicit FailingEchoServer(int fail_from) : handler_(std::make_shared<Handler>(fail_from)) {
    using namespace apache::thrift;
    auto socket = std::make_shared<transport::TServerSocket>("127.0.0.1", 0);
    server_ = std::make_shared<server::TThreadedServer>(
        std::make_shared<scales::echo::EchoProcessor>(handler_), socket,
        std::make_shared<transport::TFramedTransportFactory>(),
        std::make_shared<protocol::TBinaryProtocolFactory>());
    auto events = std::make_shared<ReadyHandler>();
    auto ready = events->ready.get_future();
    server_->setServerEventHandler(events);
    thread_ = std::thread([this] { server_->serve(); });
    if (ready.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      server_->stop();
      thread_.join();
      throw std::runtime_error("the Thrift server did not start");
    }
    port_ = socket->getPort();
  }
  ~FailingEchoServer() {
    server_->stop();
    thread_.join();
  }
  std::string uri() const { return "tcp://127.0.0.1:" + std::to_string(port_); }
  // Calls received so far, failed ones included.
  int calls() const { return handler_->calls(); }

 private:
  class Handler final : public scales::echo::EchoIf {
   public:
    explicit Handler(int fail_from) : fail_from_(fail_from) {}
    void echo(std::string& r, const std::string& m) override {
      Count();
      r = m;
    }
    void ping() override { Count(); }
    void fail(std::string&, const std::string& m) override {
      Count();
      scales::echo::EchoError e;
      e.message = m;
      throw e;
    }
    void sleep(std::string& r, const int32_t millis) override {
      Count();
      std::this_thread::sleep_for(std::chrono::milliseconds(millis));
      r = std::to_string(millis);
    }
    int calls() const { return calls_.load(); }

   private:
    void Count() {
      if (++calls_ >= fail_from_) throw std::runtime_error("failing on purpose");
    }
    const int fail_from_;
    std::atomic<int> calls_{0};
  };
  struct ReadyHandler : apache::thrift::server::TServerEventHandler {
    std::promise<void> ready;
    void preServe() override { ready.set_value(); }
  };

  std::shared_ptr<Handler> handler_;
  std::shared_ptr<apache::thrift::server::TThreadedServer> server_;
  std::thread thread_;
  int port_ = 0;
};

// A Mux proxy on 127.0.0.1 in front of a Mux server (the reference server), for the ThriftMux
// example: it forwards every frame both ways, but answers the Tdispatches from the fail_from-th
// on (1-based, counted over all its connections) itself with an Rdispatch Error (no MuxFailure
// context: kServerError on the client, not retried) instead of forwarding them. The reference
// server's --fail-first fails the first calls, and every call of the example carries the same
// echo() argument, so neither can fail its third call alone. Frames are copied whole (blocking
// sockets, two threads per connection; writes to the client under a lock so an injected reply
// never splits a forwarded frame). Tdispatches must come whole (the example's are small): a
// fragmented one is not supported.
class FailingMuxProxy {
 public:
  FailingMuxProxy(int target_port, int fail_from) : target_port_(target_port), fail_from_(fail_from) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (listen_fd_ < 0 || ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listen_fd_, 16) != 0 || ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      if (listen_fd_ >= 0) ::close(listen_fd_);
      throw std::runtime_error("FailingMuxProxy: cannot listen on 127.0.0.1");
    }
    port_ = ntohs(addr.sin_port);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~FailingMuxProxy() {
    stopping_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
    accept_thread_.join();
    ::close(listen_fd_);
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& c : conns_) {
        ::shutdown(c->client, SHUT_RDWR);
        ::shutdown(c->server, SHUT_RDWR);
      }
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
    for (auto& c : conns_) {
      ::close(c->client);
      ::close(c->server);
    }
  }
  FailingMuxProxy(const FailingMuxProxy&) = delete;
  FailingMuxProxy& operator=(const FailingMuxProxy&) = delete;

  std::string uri() const { return "tcp://127.0.0.1:" + std::to_string(port_); }
  // Tdispatches received from clients so far, forwarded or failed.
  int dispatches() const { return dispatches_.load(); }

 private:
  struct Conn {
    int client = -1;
    int server = -1;
    std::mutex client_write;  // the injected replies and the forwarded server frames
  };
  static bool ReadFull(int fd, char* p, size_t n) {
    while (n > 0) {
      ssize_t r = ::recv(fd, p, n, 0);
      if (r <= 0) return false;
      p += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }
  static bool WriteFull(int fd, const std::string& bytes) {
    for (size_t at = 0; at < bytes.size();) {
      ssize_t w = ::send(fd, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
      if (w <= 0) return false;
      at += static_cast<size_t>(w);
    }
    return true;
  }
  // One frame: the 4-byte size and what it counts (type, tag, body); empty at EOF or an error.
  static std::string ReadFrame(int fd) {
    std::string frame(4, '\0');
    if (!ReadFull(fd, frame.data(), 4)) return {};
    const uint32_t size = uint32_t{static_cast<uint8_t>(frame[0])} << 24 | uint32_t{static_cast<uint8_t>(frame[1])} << 16 |
                          uint32_t{static_cast<uint8_t>(frame[2])} << 8 | static_cast<uint8_t>(frame[3]);
    if (size < 4 || size > (64u << 20)) return {};
    frame.resize(4 + size);
    if (!ReadFull(fd, frame.data() + 4, size)) return {};
    return frame;
  }
  void AcceptLoop() {
    while (!stopping_) {
      int client = ::accept(listen_fd_, nullptr, nullptr);
      if (client < 0) return;
      int server = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(static_cast<uint16_t>(target_port_));
      if (server < 0 || ::connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        if (server >= 0) ::close(server);
        ::close(client);
        continue;
      }
      std::lock_guard<std::mutex> lock(mu_);
      auto conn = std::make_shared<Conn>();
      conn->client = client;
      conn->server = server;
      conns_.push_back(conn);
      threads_.emplace_back([this, conn] { ClientToServer(*conn); });
      threads_.emplace_back([conn] { ServerToClient(*conn); });
    }
  }
  void ClientToServer(Conn& c) {
    for (std::string frame; !(frame = ReadFrame(c.client)).empty();) {
      const uint8_t type = static_cast<uint8_t>(frame[4]);
      const bool fragment = (static_cast<uint8_t>(frame[5]) & 0x80) != 0;
      if (type == 0x02 && !fragment && ++dispatches_ >= fail_from_) {  // Tdispatch
        // Rdispatch (0xFE) on the same tag: status Error, no contexts, the reason.
        std::string body = std::string("\xFE") + frame.substr(5, 3) + std::string("\x01\x00\x00", 3) +
                           "the proxy fails Tdispatch " + std::to_string(dispatches_.load()) + " on purpose";
        const uint32_t size = static_cast<uint32_t>(body.size());
        std::string reply{static_cast<char>(size >> 24), static_cast<char>(size >> 16), static_cast<char>(size >> 8),
                          static_cast<char>(size)};
        std::lock_guard<std::mutex> lock(c.client_write);
        if (!WriteFull(c.client, reply + body)) break;
        continue;
      }
      if (!WriteFull(c.server, frame)) break;
    }
    ::shutdown(c.client, SHUT_RDWR);
    ::shutdown(c.server, SHUT_RDWR);
  }
  static void ServerToClient(Conn& c) {
    for (std::string frame; !(frame = ReadFrame(c.server)).empty();) {
      std::lock_guard<std::mutex> lock(c.client_write);
      if (!WriteFull(c.client, frame)) break;
    }
    ::shutdown(c.client, SHUT_RDWR);
    ::shutdown(c.server, SHUT_RDWR);
  }

  const int target_port_;
  const int fail_from_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int> dispatches_{0};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Conn>> conns_;
  std::vector<std::thread> threads_;
};

#endif  // SCALES_EXAMPLE_HTTP_STYLES

#ifdef SCALES_EXAMPLE_HTTP_STYLES
TEST(ExamplesTest, HttpStylesRunsEveryStyle) {
  test::TestHttpServer server("example");
  std::string out =
      RunExample(std::string(SCALES_EXAMPLE_HTTP_STYLES) + " tcp://" + server.endpoint() + " /");
  ExpectLines(out, {"blocking:  200", "callback:  200", "future:    200", "coroutine: 200"});
}

// Parameter: the call (1-based, kStyleNames) from which on the server fails.
class ExamplesHttpStylesTest : public testing::TestWithParam<int> {};

// A server that resets the connection of every request from the Nth on fails the Nth style's
// call (a GET is not idempotent by default, so it is not retried). The example reports it and
// exits with 1 after the styles before it succeeded; it used to exit 0 when the coroutine
// failed and to abort when the future did.
TEST_P(ExamplesHttpStylesTest, FailedCallEndsTheExampleWithAnError) {
  const int failing = GetParam();
  test::FaultyHttpServer server({.reset_from = failing});
  std::string out =
      RunFailingExample(std::string(SCALES_EXAMPLE_HTTP_STYLES) + " " + server.uri() + " /");
  const char* lines[] = {"blocking:  200", "callback:  200", "future:    200", "coroutine: 200"};
  for (int call = 1; call <= 4; ++call) {
    EXPECT_EQ(out.find(lines[call - 1]) != std::string::npos, call < failing)
        << lines[call - 1] << "\n"
        << out;
  }
  EXPECT_EQ(server.requests(), failing) << "the example went on after the failed call\n" << out;
}

INSTANTIATE_TEST_SUITE_P(FailingCall, ExamplesHttpStylesTest, testing::Range(1, 5), StyleName);
#endif

#ifdef SCALES_EXAMPLE_THRIFT_STYLES
TEST(ExamplesTest, ThriftStylesRunsEveryStyle) {
  ExpectEchoStyles(SCALES_EXAMPLE_THRIFT_STYLES, "thrift");
}

// Parameter: the call (1-based, kStyleNames) from which on the server fails.
class ExamplesThriftStylesTest : public testing::TestWithParam<int> {};

// A server whose calls from the Nth on fail with an exception the IDL does not declare
// (TApplicationException on the client) fails the Nth style's call. The example reports it and
// exits with 1; it used to abort when the blocking call or the future failed and to exit 0 when
// the coroutine did.
TEST_P(ExamplesThriftStylesTest, FailedCallEndsTheExampleWithAnError) {
  const int failing = GetParam();
  FailingEchoServer server(failing);
  std::string out =
      RunFailingExample(std::string(SCALES_EXAMPLE_THRIFT_STYLES) + " " + server.uri() + " hello");
  const char* lines[] = {"blocking:  hello", "callback:  hello", "future:    hello",
                         "coroutine: hello", "declared:  EchoError"};
  for (int call = 1; call <= 5; ++call) {
    EXPECT_EQ(out.find(lines[call - 1]) != std::string::npos, call < failing)
        << lines[call - 1] << "\n"
        << out;
  }
  EXPECT_EQ(server.calls(), failing) << "the example went on after the failed call\n" << out;
}

INSTANTIATE_TEST_SUITE_P(FailingCall, ExamplesThriftStylesTest, testing::Range(1, 6), StyleName);
#endif

#ifdef SCALES_EXAMPLE_THRIFTMUX_STYLES
TEST(ExamplesTest, ThriftMuxStylesRunsEveryStyle) {
  ExpectEchoStyles(SCALES_EXAMPLE_THRIFTMUX_STYLES, "thriftmux");
}

// What the example's comments promise the server sees: the client id (SetClientId) in the
// ClientIdContext and the deadline (SetTimeout) in the Deadline context, on every call. The Mux
// reference server logs the contexts of each Tdispatch.
TEST(ExamplesTest, ThriftMuxStylesSendsClientIdAndDeadline) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  std::string out = RunExample(std::string(SCALES_EXAMPLE_THRIFTMUX_STYLES) + " tcp://" +
                               server.endpoint() + " hello");
  ExpectLines(out, {"blocking:  hello", "callback:  hello", "future:    hello", "coroutine: hello",
                    "declared:  EchoError(on purpose)"});
  auto dispatches = server.LogLinesWith({"recv Tdispatch"});
  EXPECT_EQ(dispatches.size(), 5u) << server.Log();
  EXPECT_EQ(server.LogLinesWith({"recv Tdispatch", "client_id=example-client", "deadline_ns="}).size(),
            dispatches.size())
      << server.Log();
}

// A server that answers the first call with an Rdispatch Error (no MuxFailure flags: not
// retryable) fails the blocking call: the example reports it and exits with 1 ("The first call
// that fails ends the program"), making no further call.
TEST(ExamplesTest, ThriftMuxStylesFailedCallEndsTheExampleWithAnError) {
  test::MuxReferenceServer server({"--mode", "finagle", "--fail-first", "1"});
  std::string out = RunFailingExample(std::string(SCALES_EXAMPLE_THRIFTMUX_STYLES) + " tcp://" +
                                      server.endpoint() + " hello");
  EXPECT_EQ(out.find("hello"), std::string::npos) << out;
  EXPECT_EQ(server.LogLinesWith({"recv Tdispatch"}).size(), 1u)
      << "the example went on after the failed call\n"
      << server.Log();
}

// Parameter: the call (1-based, kStyleNames) from which on the proxy fails; the blocking call
// (1) is the test above.
class ExamplesThriftMuxStylesTest : public testing::TestWithParam<int> {};

// The later calls keep the same promise ("The first call that fails ends the program: exit
// code 1, the error on stderr"): a proxy in front of the Mux reference server answers the Nth
// call (callback, future, coroutine, or the `fail` call whose declared exception the example
// expects) with an Rdispatch Error (kServerError, not retried). The example prints the styles
// before it, reports the error and exits with 1, making no further call: not exit 0 with the
// failure dropped, not an abort.
TEST_P(ExamplesThriftMuxStylesTest, FailedCallEndsTheExampleWithAnError) {
  const int failing = GetParam();
  test::MuxReferenceServer server({"--mode", "finagle"});
  FailingMuxProxy proxy(server.port(), failing);
  std::string out =
      RunFailingExample(std::string(SCALES_EXAMPLE_THRIFTMUX_STYLES) + " " + proxy.uri() + " hello");
  const char* lines[] = {"blocking:  hello", "callback:  hello", "future:    hello", "coroutine: hello",
                         "declared:  EchoError"};
  for (int call = 1; call <= 5; ++call) {
    EXPECT_EQ(out.find(lines[call - 1]) != std::string::npos, call < failing)
        << lines[call - 1] << "\n"
        << out;
  }
  EXPECT_EQ(proxy.dispatches(), failing) << "the example went on after the failed call\n" << out;
  EXPECT_EQ(server.LogLinesWith({"recv Tdispatch"}).size(), static_cast<size_t>(failing - 1)) << server.Log();
}

INSTANTIATE_TEST_SUITE_P(FailingCall, ExamplesThriftMuxStylesTest, testing::Range(2, 6), StyleName);
#endif

#ifdef SCALES_EXAMPLE_ZOOKEEPER_DISCOVERY
TEST(ExamplesTest, ZooKeeperDiscoveryAnnouncesFindsAndCalls) {
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "ZooKeeper (java) not installed";
  test::ZooKeeperServer zk;
  test::TestHttpServer server("announced");
  std::string out = RunExample(std::string(SCALES_EXAMPLE_ZOOKEEPER_DISCOVERY) + " " +
                               zk.Uri("/services/web") + " " + server.endpoint() + " /");
  ExpectLines(
      out, {"announced: /services/web/member_", ("members:   [" + server.endpoint() + "]").c_str(),
            "call:      200", "withdrawn: []"});
}

// The Announcer refuses a URI that is not zk:// (kBadUri), so the example ends with exit code 1
// and the reason on stderr, before any client exists (its comment: the dynamic_cast to
// ZooKeeperServerSet therefore cannot fail). Needs no ZooKeeper.
TEST(ExamplesTest, ZooKeeperDiscoveryRefusesANonZooKeeperUri) {
  Ran ran = Execute(std::string(SCALES_EXAMPLE_ZOOKEEPER_DISCOVERY) +
                    " tcp://127.0.0.1:1/services/web 127.0.0.1:1 /");
  EXPECT_TRUE(WIFEXITED(ran.status) && WEXITSTATUS(ran.status) == 1) << ran.status << "\n" << ran.err;
  EXPECT_NE(ran.err.find("error: bad URI"), std::string::npos) << ran.err;
  EXPECT_NE(ran.err.find("not a zk:// URI"), std::string::npos) << ran.err;
  EXPECT_EQ(ran.out, "");
}
#endif

#ifdef SCALES_EXAMPLE_CUSTOM_SINK
TEST(ExamplesTest, CustomSinkAddsHeaderAndTimesEachCall) {
  test::TestHttpServer server("example");
  std::string out = RunExample(std::string(SCALES_EXAMPLE_CUSTOM_SINK) + " tcp://" +
                               server.endpoint() + " /headers 2");
  // Inserted by role, just above the load balancer.
  ExpectLines(out, {"-> tagging(tagging-sink) -> loadbalancer(", "call 1:    200", "call 2:    200",
                    ("timing:    GET to " + server.endpoint() + " took ").c_str()});
  // The server's /headers echoed the added header, once per call.
  size_t tags = 0;
  for (size_t pos = 0; (pos = out.find("X-Tag: example\n", pos)) != std::string::npos; ++pos)
    ++tags;
  EXPECT_EQ(tags, 2u) << out;
}

// A call whose first attempt fails retryably is sent again by the retry sink, through the
// custom sink, as the same message: the header must still go out once. Two listeners; the one
// that gets the first request answers it and goes away (its listening socket closed before the
// answer, its other connections reset). The next call on the event loop that made the first
// one goes there first (its aperture holds that listener alone): the connect is refused
// (kConnectFailed, retryable) and the retry goes to the other listener.
TEST(ExamplesTest, CustomSinkAddsHeaderOnceWhenACallIsRetried) {
  test::FaultyHttpServer server({.listeners = 2, .first_listener_dies = true});
  // Calls go round robin over the client's event loops, one per core: enough calls that the
  // loop of the first call makes another.
  const size_t calls = std::max(1u, std::thread::hardware_concurrency()) + 2;
  std::string out = RunExample(std::string(SCALES_EXAMPLE_CUSTOM_SINK) + " " + server.uri() +
                               " /headers " + std::to_string(calls));
  // Each attempt prints a timing line, with "(ok)" or the error.
  EXPECT_GT(Count(out, "timing:    "), Count(out, " (ok)\n"))
      << "no attempt failed, so nothing was retried and the test proves nothing\n"
      << out;
  std::vector<std::string> answered = server.answered();
  EXPECT_EQ(answered.size(), calls) << out;
  for (size_t i = 0; i < answered.size(); ++i) {
    EXPECT_EQ(Count(answered[i], "X-Tag: example\n"), 1u)
        << "request " << i + 1 << " of " << answered.size() << ":\n"
        << answered[i] << "\nexample output:\n"
        << out;
  }
}
#endif

}  // namespace
}  // namespace scales
