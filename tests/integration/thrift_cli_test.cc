// `scales thrift call`, `scales bench thrift` and `scales testserver thrift`: exit statuses,
// output and the bench report.
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <string>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "support/fixtures.h"

namespace scales {
namespace {

struct Result {
  int exit_code = -1;
  std::string out;
};

// Runs the tool; `redirect` is appended to the command (e.g. "2>&1", "2>/dev/null"); `prefix`
// (a shell command line, e.g. "ulimit -v 1000000;") goes before it.
Result RunTool(const std::string& args, const std::string& redirect = "2>/dev/null", const std::string& prefix = "") {
  std::string cmd = prefix + " " + test::ToolPath() + " " + args + " " + redirect;
  Result r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

class ThriftTool {
 public:
  explicit ThriftTool(const std::string& transport = "framed", const std::string& protocol = "binary")
      : server_({test::ToolPath(), "testserver", "thrift", "--port", "0", "--transport", transport, "--protocol",
                 protocol}) {
    auto line = server_.ReadLine(std::chrono::seconds(10));
    if (!line || !line->starts_with("listening ")) throw std::runtime_error("testserver thrift did not start");
    uri_ = "tcp://" + line->substr(std::string("listening ").size());
  }
  const std::string& uri() const { return uri_; }

 private:
  test::ChildProcess server_;
  std::string uri_;
};

TEST(ThriftCliTest, CallExitStatuses) {
  ThriftTool server;
  Result ok = RunTool("thrift call " + server.uri() + " echo hello");
  EXPECT_EQ(ok.exit_code, 0);
  EXPECT_EQ(ok.out, "hello\n");
  Result ping = RunTool("thrift call " + server.uri() + " ping --client-id cli");
  EXPECT_EQ(ping.exit_code, 0);
  Result slept = RunTool("thrift call " + server.uri() + " sleep 5");
  EXPECT_EQ(slept.exit_code, 0);
  EXPECT_EQ(slept.out, "5\n");
  Result declared = RunTool("thrift call " + server.uri() + " fail oops", "2>&1 >/dev/null");
  EXPECT_EQ(declared.exit_code, 1);
  EXPECT_NE(declared.out.find("oops"), std::string::npos) << declared.out;
  Result timed_out = RunTool("thrift call " + server.uri() + " sleep 2000 --timeout 100ms");
  EXPECT_EQ(timed_out.exit_code, 2);
  Result refused = RunTool("thrift call tcp://127.0.0.1:" + std::to_string(test::FreeTcpPort()) + " echo x");
  EXPECT_EQ(refused.exit_code, 2);
  Result usage = RunTool("thrift call " + server.uri() + " nosuchmethod");
  EXPECT_EQ(usage.exit_code, 2);
  // An argument a method does not take is a usage error, not silently dropped.
  Result ping_arg = RunTool("thrift call " + server.uri() + " ping extra", "2>&1");
  EXPECT_EQ(ping_arg.exit_code, 2);
  EXPECT_NE(ping_arg.out.find("extra"), std::string::npos) << ping_arg.out;
}

// --timeout bounds the whole call, as in `scales http`: against a zk:// ensemble that does not
// answer, the client waited its default open timeout (10 s) whatever --timeout said.
TEST(ThriftCliTest, CallTimeoutBoundsTheOpen) {
  const std::string uri = "zk://127.0.0.1:" + std::to_string(test::FreeTcpPort()) + "/svc";
  for (const char* tool : {"thrift", "thriftmux"}) {
    const auto begin = std::chrono::steady_clock::now();
    Result r = RunTool(std::string(tool) + " call " + uri + " ping --timeout 500ms", "2>&1");
    const auto took = std::chrono::steady_clock::now() - begin;
    EXPECT_EQ(r.exit_code, 2) << tool << "\n" << r.out;
    EXPECT_NE(r.out.find("did not open within 500 ms"), std::string::npos) << tool << "\n" << r.out;
    EXPECT_LT(took, std::chrono::seconds(5)) << tool;
  }
}

// Event loops that cannot start (no address space for their stacks) said only "scales: Resource
// temporarily unavailable"; the message names the step now.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST(ThriftCliTest, CallThatCannotStartItsEventLoopsSaysSo) {
  for (const char* tool : {"thrift", "thriftmux"}) {
    // Thread stacks of 1 GB in 1 GB of address space: no event loop can start.
    Result r = RunTool(std::string(tool) + " call tcp://127.0.0.1:1 ping", "2>&1", "ulimit -s 1000000; ulimit -v 1000000;");
    EXPECT_EQ(r.exit_code, 2) << tool << "\n" << r.out;
    EXPECT_NE(r.out.find(std::string("scales ") + tool + ": cannot start the client's event loops: "), std::string::npos)
        << tool << "\n" << r.out;
  }
}
#endif

TEST(ThriftCliTest, BufferedCompactServer) {
  ThriftTool server("buffered", "compact");
  Result ok = RunTool("thrift call " + server.uri() + " echo hi --transport buffered --protocol compact");
  EXPECT_EQ(ok.exit_code, 0);
  EXPECT_EQ(ok.out, "hi\n");
}

TEST(ThriftCliTest, BenchReportsLikeHttp) {
  ThriftTool server;
  Result r = RunTool("bench thrift " + server.uri() +
                     " --method echo --payload-size 64 --concurrency 4 --requests 200 --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto v = boost::json::parse(r.out).as_object();
  EXPECT_EQ(v.at("requests").as_int64(), 200);
  EXPECT_EQ(v.at("succeeded").as_int64(), 200);
  EXPECT_EQ(v.at("failed").as_int64(), 0);
  EXPECT_TRUE(v.contains("latency_us"));
  EXPECT_TRUE(v.contains("endpoints"));
  Result text = RunTool("bench thrift " + server.uri() + " --method ping --concurrency 2 --requests 50");
  EXPECT_EQ(text.exit_code, 0);
  EXPECT_NE(text.out.find("succeeded     50"), std::string::npos) << text.out;
  // Open loop, as for HTTP: every due call sent, latency from the intended send.
  Result open = RunTool("bench thrift " + server.uri() + " --method echo --rate 200 --requests 100 --json");
  ASSERT_EQ(open.exit_code, 0) << open.out;
  auto o = boost::json::parse(open.out).as_object();
  EXPECT_EQ(o.at("mode").as_string(), "open");
  EXPECT_EQ(o.at("latency_from").as_string(), "intended_send");
  EXPECT_EQ(o.at("offered_rps").to_number<double>(), 200);
  EXPECT_EQ(o.at("requests").as_int64(), 100);
  EXPECT_EQ(o.at("succeeded").as_int64(), 100);
}

}  // namespace
}  // namespace scales
