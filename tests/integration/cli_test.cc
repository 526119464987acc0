// The `scales` command-line tool against real servers: exit statuses and the bench report.
#include <sys/wait.h>

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

Result RunTool(const std::string& args) {
  std::string cmd = test::ToolPath() + " " + args + " 2>/dev/null";
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

TEST(CliTest, HttpGetExitStatus) {
  test::TestHttpServer server("cli");
  std::string uri = "tcp://" + server.endpoint();
  Result ok = RunTool("http get " + uri + " /");
  EXPECT_EQ(ok.exit_code, 0);
  EXPECT_EQ(ok.out, "hello from cli\n");
  Result included = RunTool("http get " + uri + " / --include -H 'X-A: b'");
  EXPECT_EQ(included.out.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << included.out;
  Result not_found = RunTool("http get " + uri + " /status/404");
  EXPECT_EQ(not_found.exit_code, 1);
  Result posted = RunTool("http post " + uri + " /echo --data hello");
  EXPECT_EQ(posted.exit_code, 0);
  EXPECT_EQ(posted.out, "hello");
  Result timed_out = RunTool("http get " + uri + " /delay/2000 --timeout 100ms");
  EXPECT_EQ(timed_out.exit_code, 2);
  Result refused = RunTool("http get tcp://127.0.0.1:" + std::to_string(test::FreeTcpPort()) + " /");
  EXPECT_EQ(refused.exit_code, 2);
  Result bad_uri = RunTool("http get tcp://nope /");
  EXPECT_EQ(bad_uri.exit_code, 2);
}

TEST(CliTest, BenchJsonReportCountsEveryRequestOnce) {
  test::TestHttpServer a("a"), b("b");
  std::string uri = "tcp://" + a.endpoint() + "," + b.endpoint();
  Result r = RunTool("bench http " + uri + " --path / --concurrency 4 --requests 400 --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto v = boost::json::parse(r.out).as_object();
  EXPECT_EQ(v.at("requests").as_int64(), 400);
  EXPECT_EQ(v.at("succeeded").as_int64(), 400);
  EXPECT_EQ(v.at("failed").as_int64(), 0);
  EXPECT_TRUE(v.at("errors").as_object().empty());
  EXPECT_GT(v.at("throughput_rps").to_number<double>(), 0);
  for (const char* k : {"p50", "p90", "p99", "p999", "max"}) {
    EXPECT_TRUE(v.at("latency_us").as_object().contains(k)) << k;
  }
  auto& eps = v.at("endpoints").as_object();
  ASSERT_EQ(eps.size(), 2u);
  EXPECT_EQ(eps.at(a.endpoint()).as_int64() + eps.at(b.endpoint()).as_int64(), 400);

  // Failures are counted by error code, still once per request.
  Result f = RunTool("bench http " + uri + " --path /status/500 --concurrency 2 --requests 50 --json");
  EXPECT_EQ(f.exit_code, 1);
  auto fv = boost::json::parse(f.out).as_object();
  EXPECT_EQ(fv.at("requests").as_int64(), 50);
  EXPECT_EQ(fv.at("failed").as_int64(), 50);
  EXPECT_EQ(fv.at("errors").as_object().at("http_error").as_int64(), 50);
}

TEST(CliTest, BenchUsageErrors) {
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --path /").exit_code, 2);  // neither --requests nor --duration
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --requests 0").exit_code, 2);
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --duration 10parsecs").exit_code, 2);
}

}  // namespace
}  // namespace scales
