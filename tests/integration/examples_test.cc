// The examples, built and run as smoke tests against the scales test server.
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <string>

#include <gtest/gtest.h>

#include "support/fixtures.h"

namespace scales {
namespace {

#ifdef SCALES_EXAMPLE_HTTP_STYLES
TEST(ExamplesTest, HttpStylesRunsEveryStyle) {
  test::TestHttpServer server("example");
  std::string cmd = std::string(SCALES_EXAMPLE_HTTP_STYLES) + " tcp://" + server.endpoint() + " /";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[1024];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  for (const char* style : {"blocking:  200", "callback:  200", "future:    200", "coroutine: 200"}) {
    EXPECT_NE(out.find(style), std::string::npos) << style << "\n" << out;
  }
}
#endif

#ifdef SCALES_EXAMPLE_THRIFT_STYLES
TEST(ExamplesTest, ThriftStylesRunsEveryStyle) {
  test::ChildProcess server({test::ToolPath(), "testserver", "thrift", "--port", "0"});
  auto line = server.ReadLine(std::chrono::seconds(10));
  ASSERT_TRUE(line && line->starts_with("listening ")) << (line ? *line : "no output");
  std::string cmd = std::string(SCALES_EXAMPLE_THRIFT_STYLES) + " tcp://" +
                    line->substr(std::string("listening ").size()) + " hello";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[1024];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  for (const char* style : {"blocking:  hello", "callback:  hello", "future:    hello", "coroutine: hello",
                            "declared:  EchoError(on purpose)"}) {
    EXPECT_NE(out.find(style), std::string::npos) << style << "\n" << out;
  }
}
#endif

}  // namespace
}  // namespace scales
