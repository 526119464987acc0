// The examples, built and run as smoke tests against the scales test servers (and a real
// ZooKeeper for the discovery example). Each example prints one line per style or step; the
// tests check those lines and the exit code.
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/fixtures.h"
#include "support/zookeeper_fixture.h"

namespace scales {
namespace {

// tests/CMakeLists.txt defines the SCALES_EXAMPLE_* paths together, or none (examples off).
#ifdef SCALES_EXAMPLE_HTTP_STYLES

// Runs `cmd` through the shell; returns its stdout, and fails the test unless it exits with 0.
std::string RunExample(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) {
    ADD_FAILURE() << "popen failed: " << cmd;
    return "";
  }
  std::string out;
  char buf[1024];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << cmd << " exited with " << status << "\n"
      << out;
  return out;
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

#endif  // SCALES_EXAMPLE_HTTP_STYLES

#ifdef SCALES_EXAMPLE_HTTP_STYLES
TEST(ExamplesTest, HttpStylesRunsEveryStyle) {
  test::TestHttpServer server("example");
  std::string out =
      RunExample(std::string(SCALES_EXAMPLE_HTTP_STYLES) + " tcp://" + server.endpoint() + " /");
  ExpectLines(out, {"blocking:  200", "callback:  200", "future:    200", "coroutine: 200"});
}
#endif

#ifdef SCALES_EXAMPLE_THRIFT_STYLES
TEST(ExamplesTest, ThriftStylesRunsEveryStyle) {
  ExpectEchoStyles(SCALES_EXAMPLE_THRIFT_STYLES, "thrift");
}
#endif

#ifdef SCALES_EXAMPLE_THRIFTMUX_STYLES
TEST(ExamplesTest, ThriftMuxStylesRunsEveryStyle) {
  ExpectEchoStyles(SCALES_EXAMPLE_THRIFTMUX_STYLES, "thriftmux");
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
#endif

}  // namespace
}  // namespace scales
