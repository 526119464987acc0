// The examples, built and run as smoke tests against the scales test servers (and a real
// ZooKeeper for the discovery example). Each example prints one line per style or step; the
// tests check those lines and the exit code. Against servers that fail on cue they check that
// a failed call in any style ends the example with exit code 1 and the error on stderr (not an
// abort, not a silent exit 0), that the custom sink's header is sent once per attempt
// when the retry sink sends a request again, and that the ThriftMux example's client id and
// deadline reach the server as Mux contexts.
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <initializer_list>
#include <iterator>
#include <memory>
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
