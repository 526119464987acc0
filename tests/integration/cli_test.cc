// The `scales` command-line tool against real servers: exit statuses, the bench report (text,
// JSON, HTML), open-loop load and the progress line.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "support/fixtures.h"
#include "support/zookeeper_fixture.h"

namespace scales {
namespace {

struct Result {
  int exit_code = -1;
  std::string out;
};

// Runs the tool; `redirect` is appended to the command (e.g. "2>&1", "2>/dev/null"); `prefix`
// (a shell command line) goes before it: by default a time limit, so that a hang fails the test
// (exit status 124) instead of stalling the suite.
Result RunTool(const std::string& args, const std::string& redirect = "2>/dev/null",
               const std::string& prefix = "timeout -k 5 300") {
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

// A file name in the temporary directory, removed at the end of the test.
class TempFile {
 public:
  explicit TempFile(const std::string& name)
      : path_(std::filesystem::temp_directory_path() / ("scales-cli-" + std::to_string(getpid()) + "-" + name)) {}
  ~TempFile() { std::filesystem::remove(path_); }
  std::string path() const { return path_.string(); }
  std::string Read() const {
    std::ifstream f(path_);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

 private:
  std::filesystem::path path_;
};

// The value of attribute `name` in every element of `html` that matches `element_regex`.
std::vector<std::string> Attributes(const std::string& html, const std::string& element_regex, const std::string& name) {
  std::vector<std::string> out;
  std::regex element(element_regex), attribute(name + "=\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(html.begin(), html.end(), element); it != std::sregex_iterator(); ++it) {
    std::smatch m;
    std::string text = it->str();
    if (std::regex_search(text, m, attribute)) out.push_back(m[1]);
  }
  return out;
}

// The text of the <svg> element with `id`, or "".
std::string Chart(const std::string& html, const std::string& id) {
  size_t begin = html.find("<svg class=\"chart\" id=\"" + id + "\"");
  if (begin == std::string::npos) return "";
  size_t end = html.find("</svg>", begin);
  return end == std::string::npos ? "" : html.substr(begin, end + 6 - begin);
}

// The data-y values of series `series` in `chart`.
std::vector<double> SeriesValues(const std::string& chart, const std::string& series) {
  size_t begin = chart.find("data-series=\"" + series + "\"");
  if (begin == std::string::npos) return {};
  std::string group = chart.substr(begin, chart.find("</g>", begin) - begin);
  std::vector<double> out;
  for (auto& v : Attributes(group, "<circle [^>]*>", "data-y")) out.push_back(std::stod(v));
  return out;
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

// A raw HTTP peer on 127.0.0.1 that records the request line of each request it gets (one per
// connection) and answers it `200 OK` with `Connection: close`: what the client sent, verbatim.
class RequestLinePeer {
 public:
  RequestLinePeer() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(fd_, 16) != 0 ||
        getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      throw std::runtime_error("RequestLinePeer: cannot listen");
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }
  ~RequestLinePeer() {
    stop_ = true;
    shutdown(fd_, SHUT_RDWR);  // wakes accept()
    thread_.join();
    close(fd_);
  }
  std::string uri() const { return "tcp://127.0.0.1:" + std::to_string(port_); }
  std::vector<std::string> lines() const {
    std::lock_guard lock(mu_);
    return lines_;
  }

 private:
  void Serve() {
    // A thread per connection: a client may open one it does not use (yet).
    std::vector<std::thread> connections;
    while (!stop_) {
      int c = accept(fd_, nullptr, nullptr);
      if (c >= 0) connections.emplace_back([this, c] { Answer(c); });
    }
    for (auto& t : connections) t.join();
  }
  void Answer(int c) {
    timeval five{5, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &five, sizeof five);
    std::string got;
    char buf[4096];
    ssize_t n;
    while (got.find("\r\n\r\n") == std::string::npos && (n = read(c, buf, sizeof buf)) > 0) got.append(buf, n);
    if (!got.empty()) {
      std::lock_guard lock(mu_);
      lines_.push_back(got.substr(0, got.find("\r\n")));
    }
    const std::string answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    (void)!write(c, answer.data(), answer.size());
    close(c);
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::vector<std::string> lines_;
  std::thread thread_;
};

// The tool sends "*" and an absolute-form target as given, as the client's verbs do
// (HttpClient::Make): it made "OPTIONS *" an "OPTIONS /*", another resource.
TEST(CliTest, HttpSendsAsteriskAndAbsoluteTargetsAsGiven) {
  RequestLinePeer peer;
  for (auto [args, line] : std::vector<std::pair<std::string, std::string>>{
           {"http options " + peer.uri() + " '*'", "OPTIONS * HTTP/1.1"},
           {"http get " + peer.uri() + " http://example.test/x?y=1", "GET http://example.test/x?y=1 HTTP/1.1"},
           {"http get " + peer.uri() + " users", "GET /users HTTP/1.1"},
           {"bench http " + peer.uri() + " --method OPTIONS --path '*' --requests 1", "OPTIONS * HTTP/1.1"}}) {
    Result r = RunTool(args, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.out;
    auto lines = peer.lines();
    EXPECT_TRUE(!lines.empty() && lines.back() == line) << args << "\n" << (lines.empty() ? "(none)" : lines.back());
  }
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
  EXPECT_TRUE(v.at("endpoint_errors").as_object().empty());
  // The closed loop: latency from the actual send, no offered rate.
  EXPECT_EQ(v.at("mode").as_string(), "closed");
  EXPECT_EQ(v.at("latency_from").as_string(), "actual_send");
  EXPECT_EQ(v.at("concurrency").as_int64(), 4);
  EXPECT_TRUE(v.at("offered_rps").is_null());
  EXPECT_DOUBLE_EQ(v.at("achieved_rps").to_number<double>(), v.at("throughput_rps").to_number<double>());
  EXPECT_EQ(v.at("queued").as_int64(), 0);

  // --stats with --json leaves stdout to the JSON document (the stats go to stderr).
  Result with_stats = RunTool("bench http " + uri + " --path / --concurrency 1 --requests 5 --json --stats");
  ASSERT_EQ(with_stats.exit_code, 0) << with_stats.out;
  EXPECT_EQ(boost::json::parse(with_stats.out).as_object().at("requests").as_int64(), 5) << with_stats.out;

  // Failures are counted by error code, still once per request.
  Result f = RunTool("bench http " + uri + " --path /status/500 --concurrency 2 --requests 50 --json");
  EXPECT_EQ(f.exit_code, 1);
  auto fv = boost::json::parse(f.out).as_object();
  EXPECT_EQ(fv.at("requests").as_int64(), 50);
  EXPECT_EQ(fv.at("failed").as_int64(), 50);
  EXPECT_EQ(fv.at("errors").as_object().at("http_error").as_int64(), 50);
  int64_t endpoint_errors = 0;
  for (auto& [ep, n] : fv.at("endpoint_errors").as_object()) endpoint_errors += n.as_int64();
  EXPECT_EQ(endpoint_errors, 50);
}

TEST(CliTest, BenchHtmlReportHasItsCharts) {
  test::TestHttpServer a("a"), b("b");
  std::string uri = "tcp://" + a.endpoint() + "," + b.endpoint();
  TempFile report("report.html");
  Result r = RunTool("bench http " + uri + " --path / --concurrency 4 --duration 1.5s --json --report " + report.path());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto v = boost::json::parse(r.out).as_object();
  const std::string html = report.Read();
  ASSERT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u) << html.substr(0, 200);
  // Self-contained: nothing to fetch.
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.find(" src="), std::string::npos);
  EXPECT_EQ(Attributes(html, "<svg [^>]*>", "data-title"),
            (std::vector<std::string>{"Latency over time", "Latency distribution", "Throughput over time",
                                      "Requests per endpoint"}));
  for (const char* title : {"Latency over time", "Latency distribution", "Throughput over time", "Requests per endpoint"}) {
    EXPECT_NE(html.find(std::string("<title>") + title + "</title>"), std::string::npos) << title;
  }
  // The run's settings and summary.
  EXPECT_NE(html.find("<td>" + uri + "</td>"), std::string::npos);
  EXPECT_NE(html.find("<td>" + std::to_string(v.at("requests").as_int64()) + "</td>"), std::string::npos);

  // Latency over time: a point per 100 ms for a short run, and the largest per-interval
  // maximum is the run's maximum.
  std::string over_time = Chart(html, "latency-over-time");
  for (const char* s : {"p50", "p99", "max"}) {
    EXPECT_GE(SeriesValues(over_time, s).size(), 10u) << s;  // 1.5 s at 100 ms
  }
  auto maxima = SeriesValues(over_time, "max");
  ASSERT_FALSE(maxima.empty());
  EXPECT_EQ(*std::max_element(maxima.begin(), maxima.end()), v.at("latency_us").at("max").to_number<double>());
  // The distribution ends at the maximum and never decreases.
  auto spectrum = SeriesValues(Chart(html, "latency-distribution"), "latency");
  ASSERT_GE(spectrum.size(), 2u);
  EXPECT_TRUE(std::is_sorted(spectrum.begin(), spectrum.end()));
  EXPECT_EQ(spectrum.back(), v.at("latency_us").at("max").to_number<double>());
  // Throughput over time: successes per second, no failures.
  std::string throughput = Chart(html, "throughput-over-time");
  EXPECT_GE(SeriesValues(throughput, "succeeded/s").size(), 10u);
  for (double f : SeriesValues(throughput, "failed/s")) EXPECT_EQ(f, 0);
  // One bar per endpoint, with the JSON report's counts.
  auto eps = Attributes(html, "<g class=\"bar\"[^>]*>", "data-endpoint");
  auto counts = Attributes(html, "<g class=\"bar\"[^>]*>", "data-requests");
  ASSERT_EQ(eps.size(), 2u);
  ASSERT_EQ(counts.size(), 2u);
  for (size_t i = 0; i < eps.size(); ++i) {
    EXPECT_EQ(std::stoll(counts[i]), v.at("endpoints").at(eps[i]).as_int64()) << eps[i];
  }
}

TEST(CliTest, BenchOpenLoopOffersTheRate) {
  test::TestHttpServer server("open");
  Result r = RunTool("bench http tcp://" + server.endpoint() + " --path / --rate 200 --duration 2s --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto v = boost::json::parse(r.out).as_object();
  EXPECT_EQ(v.at("mode").as_string(), "open");
  EXPECT_EQ(v.at("latency_from").as_string(), "intended_send");
  EXPECT_EQ(v.at("offered_rps").to_number<double>(), 200);
  EXPECT_EQ(v.at("concurrency").as_int64(), 1000);  // the default cap
  // Exactly the calls due in 2 s at 200/s, sent on schedule: the run ends with the last reply.
  EXPECT_EQ(v.at("requests").as_int64(), 400);
  EXPECT_EQ(v.at("succeeded").as_int64(), 400);
  EXPECT_GT(v.at("achieved_rps").to_number<double>(), 160);
  EXPECT_LT(v.at("achieved_rps").to_number<double>(), 210);
  EXPECT_EQ(v.at("queued").as_int64(), 0);
  EXPECT_GT(v.at("latency_us").at("p50").as_int64(), 0);

  Result text = RunTool("bench http tcp://" + server.endpoint() + " --rate 100 --requests 50");
  EXPECT_EQ(text.exit_code, 0);
  EXPECT_NE(text.out.find("offered       100 req/s"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("achieved      "), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("intended send time"), std::string::npos) << text.out;

  // A rate below 0.1/s is reported as given (it was rounded to 0.0: "offered_rps":0.0).
  Result slow = RunTool("bench http tcp://" + server.endpoint() + " --path / --rate 0.04 --requests 1 --json");
  ASSERT_EQ(slow.exit_code, 0) << slow.out;
  EXPECT_DOUBLE_EQ(boost::json::parse(slow.out).as_object().at("offered_rps").to_number<double>(), 0.04) << slow.out;
  // The text report and the progress line print the rate as --json does (one decimal made 0.25
  // read 0.2, and the progress line's none 2.5 read 2).
  Result quarter = RunTool("bench http tcp://" + server.endpoint() + " --path / --rate 0.25 --requests 1");
  ASSERT_EQ(quarter.exit_code, 0) << quarter.out;
  EXPECT_NE(quarter.out.find("offered       0.25 req/s\n"), std::string::npos) << quarter.out;
  // ... and so does the HTML report's summary table (it still read "0.2 req/s").
  TempFile page("offered.html");
  Result html = RunTool("bench http tcp://" + server.endpoint() + " --path / --rate 0.25 --requests 1 --report " +
                        page.path());
  ASSERT_EQ(html.exit_code, 0) << html.out;
  EXPECT_NE(page.Read().find("<tr><th>offered rate</th><td>0.25 req/s</td></tr>"), std::string::npos) << page.Read();
  TempFile err("offered-progress.txt");
  Result progress = RunTool("bench http tcp://" + server.endpoint() + " --path / --rate 2.5 --duration 1.5s --progress",
                            "2>" + err.path());
  ASSERT_EQ(progress.exit_code, 0) << progress.out;
  EXPECT_NE(progress.out.find("offered       2.5 req/s\n"), std::string::npos) << progress.out;
  EXPECT_NE(err.Read().find("offered 2.5/s backlog"), std::string::npos) << err.Read();
}

// A closed loop whose --duration ends before its callers started (1ns, 1us) sent no call, or
// one caller's only, and exited 0 as if every call had succeeded: each caller sends at least
// its first call, as an open loop sends at least one.
TEST(CliTest, BenchShorterThanOneCallSendsOnePerCaller) {
  test::TestHttpServer server("short");
  const std::string uri = "tcp://" + server.endpoint();
  for (const char* duration : {"1ns", "1us"}) {
    Result r = RunTool("bench http " + uri + " --path /delay/100 --concurrency 3 --duration " + duration + " --json");
    ASSERT_EQ(r.exit_code, 0) << duration << "\n" << r.out;
    auto v = boost::json::parse(r.out).as_object();
    EXPECT_EQ(v.at("requests").as_int64(), 3) << duration << "\n" << r.out;
    EXPECT_EQ(v.at("succeeded").as_int64(), 3) << duration << "\n" << r.out;
  }
  Result open = RunTool("bench http " + uri + " --path /delay/100 --rate 10 --duration 1ns --json");
  ASSERT_EQ(open.exit_code, 0) << open.out;
  EXPECT_EQ(boost::json::parse(open.out).as_object().at("requests").as_int64(), 1) << open.out;
}

// HTTP methods are case-sensitive: `--method get` ran the whole load for 400 or 405 answers, and
// a method that is not a token failed every call (kInvalidArgument). Both are usage errors.
TEST(CliTest, BenchRefusesAMethodThatIsNotOne) {
  Result lower = RunTool("bench http tcp://127.0.0.1:1 --method get --requests 1", "2>&1");
  EXPECT_EQ(lower.exit_code, 2) << lower.out;
  EXPECT_NE(lower.out.find("--method 'get': HTTP methods are case-sensitive; did you mean GET?"), std::string::npos)
      << lower.out;
  for (const char* method : {"'G T'", "''", "'GET\r\n'", "'GET/'"}) {
    Result bad = RunTool(std::string("bench http tcp://127.0.0.1:1 --method ") + method + " --requests 1", "2>&1");
    EXPECT_EQ(bad.exit_code, 2) << method << "\n" << bad.out;
    EXPECT_NE(bad.out.find("is not an HTTP method"), std::string::npos) << method << "\n" << bad.out;
  }
  // An extension method is sent as given: the server answers it (405), as counted failures.
  test::TestHttpServer server("method");
  Result custom = RunTool("bench http tcp://" + server.endpoint() + " --method PURGE --requests 2", "2>&1");
  EXPECT_EQ(custom.exit_code, 1) << custom.out;
  EXPECT_NE(custom.out.find("for PURGE /"), std::string::npos) << custom.out;
}

// A --path that is not a request target (a space, a control character) failed every call of the
// run (kInvalidArgument from the transport, exit 1), as a bad --method did: a usage error now.
TEST(CliTest, BenchRefusesAPathThatIsNotATarget) {
  test::TestHttpServer server("path");
  const std::string uri = "tcp://" + server.endpoint();
  // (popen's sh is dash: printf makes the control characters.)
  for (const char* path : {"'/a b'", "'a b'", "\"$(printf '/a\\tb')\"", "\"$(printf '/a\\177')\"",
                           "\"$(printf '/\\r\\nX-Injected: 1')\""}) {
    Result bad = RunTool("bench http " + uri + " --path " + path + " --requests 2", "2>&1");
    EXPECT_EQ(bad.exit_code, 2) << path << "\n" << bad.out;
    EXPECT_NE(bad.out.find("--path has a space or control character"), std::string::npos) << path << "\n" << bad.out;
    EXPECT_EQ(bad.out.find("succeeded "), std::string::npos) << path << ": no run, no report\n" << bad.out;
  }
  // Percent-encoded, the same path is sent (and answered).
  Result encoded = RunTool("bench http " + uri + " --path /a%20b --requests 2", "2>&1");
  EXPECT_EQ(encoded.exit_code, 0) << encoded.out;
  EXPECT_NE(encoded.out.find("succeeded     2"), std::string::npos) << encoded.out;
}

// The wait status of `child` once it exits within `limit` (nullopt if it did not: then killed).
std::optional<int> ExitWithin(test::ChildProcess& child, std::chrono::seconds limit) {
  auto status = child.WaitForExit(limit);
  if (!status) child.Kill();
  return status;
}

// SIGINT or SIGTERM (Ctrl-C, a CI harness) in the middle of a run stops the load and prints the
// report of the calls sent, each counted once, instead of ending the process without one.
TEST(CliTest, BenchInterruptedStopsAndReports) {
  test::TestHttpServer server("interrupted");
  const std::string uri = "tcp://" + server.endpoint();
  struct sigaction current {};
  sigaction(SIGINT, nullptr, &current);
  // (A background job may have SIGINT ignored, which the tool then leaves ignored.)
  const int sigint = current.sa_handler == SIG_IGN ? SIGTERM : SIGINT;
  // Runs `scales bench http URI args...` for a second, sends it `sig`, and returns its JSON
  // report once it exited with 128 + sig (a test failure and nothing otherwise).
  auto interrupted = [&](std::vector<std::string> args, int sig) -> std::optional<boost::json::object> {
    args.insert(args.begin(), {test::ToolPath(), "bench", "http", uri});
    for (const char* a : {"--duration", "60s", "--json", "--no-progress"}) args.emplace_back(a);
    test::ChildProcess bench(args);
    std::this_thread::sleep_for(std::chrono::seconds(1));
    kill(bench.pid(), sig);
    auto line = bench.ReadLine(std::chrono::seconds(30));
    auto status = ExitWithin(bench, std::chrono::seconds(30));
    if (!status) {
      ADD_FAILURE() << "still running 30 s after the signal";
      return std::nullopt;
    }
    if (!WIFEXITED(*status)) {
      ADD_FAILURE() << "ended by signal " << WTERMSIG(*status) << " without a report";
      return std::nullopt;
    }
    EXPECT_EQ(WEXITSTATUS(*status), 128 + sig);
    if (!line) {
      ADD_FAILURE() << "no report";
      return std::nullopt;
    }
    return boost::json::parse(*line).as_object();
  };
  // Closed loop: the callers stop, the calls outstanding complete.
  {
    auto v = interrupted({"--path", "/", "--concurrency", "2"}, sigint);
    ASSERT_TRUE(v);
    EXPECT_GT(v->at("requests").as_int64(), 0);
    EXPECT_EQ(v->at("succeeded").as_int64(), v->at("requests").as_int64());
    EXPECT_LT(v->at("elapsed_s").to_number<double>(), 30);
  }
  // Open loop over capacity (calls waiting for a slot): the calls due but not sent are dropped,
  // the two outstanding complete, and the report counts those sent.
  {
    auto v = interrupted({"--path", "/delay/200", "--rate", "50", "--concurrency", "2"}, SIGTERM);
    ASSERT_TRUE(v);
    EXPECT_GT(v->at("requests").as_int64(), 0);
    EXPECT_LT(v->at("requests").as_int64(), 50);  // 2 at a time, 200 ms each, for about a second
    EXPECT_EQ(v->at("succeeded").as_int64(), v->at("requests").as_int64());
    EXPECT_LT(v->at("elapsed_s").to_number<double>(), 30);
  }
}

// A signal while the client still opens (a zk:// ensemble that does not answer) was held back
// until the open timed out 10 s later, and the run then ended with status 2 as if no signal had
// come. It ends the process at once now, as the signal would any other command.
TEST(CliTest, BenchInterruptedWhileItsClientOpensEndsAtOnce) {
  const std::string uri = "zk://127.0.0.1:" + std::to_string(test::FreeTcpPort()) + "/svc";
  test::ChildProcess bench({test::ToolPath(), "bench", "http", uri, "--duration", "60s", "--json", "--no-progress"});
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const auto sent = std::chrono::steady_clock::now();
  kill(bench.pid(), SIGTERM);
  auto status = ExitWithin(bench, std::chrono::seconds(30));
  ASSERT_TRUE(status);
  EXPECT_LT(std::chrono::steady_clock::now() - sent, std::chrono::seconds(5));
  EXPECT_TRUE((WIFSIGNALED(*status) && WTERMSIG(*status) == SIGTERM) ||
              (WIFEXITED(*status) && WEXITSTATUS(*status) == 128 + SIGTERM))
      << "wait status " << *status;
}

// Ctrl-C while `scales serverset` (without --watch) still waits for the members printed nothing:
// not a success (it exited 0, as for a set known to be empty).
TEST(CliTest, ServerSetInterruptedBeforeTheMembersIsNotASuccess) {
  // Nothing listens there: the members never become known.
  const std::string uri = "zk://127.0.0.1:" + std::to_string(test::FreeTcpPort()) + "/svc";
  test::ChildProcess tool({test::ToolPath(), "serverset", uri, "--timeout", "60s"});
  std::this_thread::sleep_for(std::chrono::seconds(1));
  kill(tool.pid(), SIGTERM);
  auto status = ExitWithin(tool, std::chrono::seconds(10));
  ASSERT_TRUE(status);
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 128 + SIGTERM);
  EXPECT_EQ(tool.ReadLine(std::chrono::seconds(1)), std::nullopt);  // nothing on stdout
}

// A one-shot listing of a zk:// path that does not exist printed nothing and exited 0 (stderr:
// "no members (... path /x does not exist, waiting for it)"), as for an existing empty set.
// It fails now, naming the path and the ensemble; --watch says it waits for the path.
TEST(CliTest, ServerSetOfAMissingPathFailsOrSaysItWaits) {
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "needs java and Debian's zookeeper package";
  test::ZooKeeperServer zk;
  Result once = RunTool("serverset " + zk.Uri("/no/such/svc") + " --timeout 20s", "2>&1");
  EXPECT_EQ(once.exit_code, 1) << once.out;
  EXPECT_NE(once.out.find("scales serverset: path /no/such/svc does not exist in ZooKeeper " + zk.connect_string() +
                          " (" + zk.Uri("/no/such/svc") + ")"),
            std::string::npos)
      << once.out;
  // An existing path without members is a known, empty set: a success.
  test::RunKazoo(zk.connect_string(), "zk.ensure_path('/empty')");
  Result empty = RunTool("serverset " + zk.Uri("/empty") + " --timeout 20s", "2>&1");
  EXPECT_EQ(empty.exit_code, 0) << empty.out;
  EXPECT_NE(empty.out.find("no members"), std::string::npos) << empty.out;
  EXPECT_EQ(empty.out.find("does not exist"), std::string::npos) << empty.out;
  // ... and says why it is empty (it said only "connected, 0 members").
  EXPECT_NE(empty.out.find("0 members (path /empty exists with no member_ children)"), std::string::npos) << empty.out;
  // --watch waits for the path, and says so.
  TempFile err("serverset-watch.txt");
  test::ChildProcess watch({test::ToolPath(), "serverset", zk.Uri("/later"), "--watch"}, err.path());
  EXPECT_EQ(watch.ReadLine(std::chrono::seconds(20)), "# 0 members");
  EXPECT_NE(err.Read().find("path /later does not exist in ZooKeeper " + zk.connect_string() + " (" +
                            zk.Uri("/later") + "); waiting for it to be created"),
            std::string::npos)
      << err.Read();
  test::RunKazoo(zk.connect_string(), "zk.create('/later/member_', " + test::FinagleMemberPython("127.0.0.1", 1001) +
                                          ", sequence=True, makepath=True)");
  EXPECT_EQ(watch.ReadLine(std::chrono::seconds(20)), "+ 127.0.0.1:1001");
  EXPECT_EQ(watch.ReadLine(std::chrono::seconds(5)), "# 1 members");
}

// Over capacity, the open loop keeps the schedule: calls wait for a slot, and their latency,
// measured from when they should have been sent, grows far beyond the service time. A
// closed loop at the same concurrency only ever sees the service time (coordinated omission).
TEST(CliTest, BenchOpenLoopOverCapacityHasNoCoordinatedOmission) {
  test::TestHttpServer server("slow");
  const std::string uri = "tcp://" + server.endpoint();
  // 50 ms per call and 2 calls at a time: a capacity of 40/s, offered 100/s for 1 s.
  Result open = RunTool("bench http " + uri + " --path /delay/50 --rate 100 --requests 100 --concurrency 2 --json");
  ASSERT_EQ(open.exit_code, 0) << open.out;
  auto o = boost::json::parse(open.out).as_object();
  EXPECT_EQ(o.at("requests").as_int64(), 100);
  EXPECT_EQ(o.at("succeeded").as_int64(), 100);
  EXPECT_LT(o.at("achieved_rps").to_number<double>(), 50);
  EXPECT_GT(o.at("queued").as_int64(), 50);
  EXPECT_GT(o.at("max_backlog").as_int64(), 10);
  // The median call was due at ~0.5 s but sent at ~1.25 s: ~750 ms late, plus 50 ms of service.
  EXPECT_GT(o.at("latency_us").at("p50").as_int64(), 400000);
  EXPECT_GT(o.at("latency_us").at("p99").as_int64(), 1000000);

  Result closed = RunTool("bench http " + uri + " --path /delay/50 --requests 40 --concurrency 2 --json");
  ASSERT_EQ(closed.exit_code, 0) << closed.out;
  auto c = boost::json::parse(closed.out).as_object();
  EXPECT_GE(c.at("latency_us").at("p50").as_int64(), 50000);
  EXPECT_LT(c.at("latency_us").at("p50").as_int64(), 250000);
}

TEST(CliTest, BenchProgressLineOnlyWhenAsked) {
  test::TestHttpServer server("progress");
  const std::string uri = "tcp://" + server.endpoint();
  TempFile err("progress.txt");
  Result forced = RunTool("bench http " + uri + " --concurrency 2 --duration 1.3s --progress", "2>" + err.path());
  ASSERT_EQ(forced.exit_code, 0) << forced.out;
  std::string progress = err.Read();
  // Rewritten in place once per second, then cleared before the report.
  EXPECT_NE(progress.find("\r    1s "), std::string::npos) << progress;
  for (const char* part : {"req/s", "p50 ", "p99 ", "errors 0"}) EXPECT_NE(progress.find(part), std::string::npos) << part;
  // No newline after a progress line; the last one is blanked out (spaces, then "\r").
  EXPECT_EQ(progress.find("backlog"), std::string::npos);  // closed loop: no offered rate
  EXPECT_EQ(std::regex_search(progress, std::regex("errors [0-9]+ *\n")), false) << progress;
  EXPECT_NE(progress.find("    \r"), std::string::npos) << progress;
  EXPECT_EQ(forced.out.find("req/s   p50"), std::string::npos);  // not on stdout

  // Not a terminal, not asked: no progress line.
  Result quiet = RunTool("bench http " + uri + " --concurrency 2 --duration 1.3s", "2>" + err.path());
  ASSERT_EQ(quiet.exit_code, 0) << quiet.out;
  EXPECT_EQ(err.Read().find("req/s"), std::string::npos);
}

// The README's demo, short: every protocol's load run counts each call once, the server killed
// and restarted is marked, and the report has a section with four charts per protocol.
TEST(CliTest, DemoTellsTheWholeStory) {
  TempFile report("demo.html");
  Result r = RunTool("demo --seconds 3 --rate 100 --report " + report.path(), "2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  // The test machine has Java and Debian's zookeeper (the fixtures need them): the demo finds
  // its servers through its own ZooKeeper, not the static lists it falls back to without one.
  for (const char* part : {"1. ZooKeeper on 127.0.0.1:", "-> zk://127.0.0.1:", "2. One client per protocol",
                           "3. Load", "4. Summary", "beta killed",
                           "beta restarted", "threw EchoError(\"no such user\")", "report: "}) {
    EXPECT_NE(r.out.find(part), std::string::npos) << part << "\n" << r.out;
  }
  std::regex row(R"(\n   (HTTP|Thrift|ThriftMux) +(\d+) +(\d+) +(\d+) +(\d+) )");
  std::vector<std::string> protocols;
  for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), row); it != std::sregex_iterator(); ++it) {
    const auto& m = *it;
    protocols.push_back(m[1]);
    EXPECT_EQ(std::stoll(m[2]), 300) << m[1];  // 3 s at 100/s, every due call sent
    EXPECT_EQ(std::stoll(m[3]) + std::stoll(m[4]), 300) << m[1];
  }
  EXPECT_EQ(protocols, (std::vector<std::string>{"HTTP", "Thrift", "ThriftMux"})) << r.out;
  const std::string html = report.Read();
  EXPECT_EQ(Attributes(html, "<section [^>]*>", "class").size(), 3u);
  EXPECT_EQ(Attributes(html, "<svg [^>]*>", "data-title").size(), 12u);
  EXPECT_EQ(Attributes(html, "<g class=\"event\"[^>]*>", "data-x").size(), 12u);  // 2 per time chart
  EXPECT_GE(Attributes(html, "<g class=\"bar\"[^>]*>", "data-endpoint").size(), 9u);  // and "(none)" if a call found no server
}

// Every 127.0.0.1 port that section 1 of the demo's output `text` names (its servers and
// ZooKeeper; at least `min_ports`) is closed, the JVM given some 10 s to exit.
void ExpectNoDemoServerLeft(const std::string& text, size_t min_ports = 9) {
  std::vector<int> ports;
  std::regex endpoint(R"(127\.0\.0\.1:(\d+))");
  const std::string servers = text.substr(0, text.find("2. One client"));
  for (auto it = std::sregex_iterator(servers.begin(), servers.end(), endpoint); it != std::sregex_iterator(); ++it) {
    ports.push_back(std::stoi((*it)[1]));
  }
  EXPECT_GE(ports.size(), min_ports) << servers;  // three per protocol (and ZooKeeper's when Java is there)
  for (int port : ports) {
    bool closed = false;
    for (int i = 0; i < 100 && !closed; ++i) {  // the JVM takes a moment to exit
      closed = !test::CanConnect(port, std::chrono::milliseconds(100));
      if (!closed) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_TRUE(closed) << "127.0.0.1:" << port << " still accepts after the demo ended\n" << servers;
  }
}

// Terminating the demo (SIGTERM, as a CI harness or systemd does) stops its test servers and
// ZooKeeper too: none is left listening (they were orphaned, still serving).
TEST(CliTest, ATerminatedDemoLeavesNoServerBehind) {
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  const std::string tool = test::ToolPath();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    const int null = open("/dev/null", O_WRONLY);
    dup2(null, STDERR_FILENO);
    close(out[0]);
    execl(tool.c_str(), "scales", "demo", "--seconds", "60", "--rate", "10", static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  // Section 1 names every server; the load's first progress line flushes it all.
  std::string text;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  while (text.find("3. Load") == std::string::npos && std::chrono::steady_clock::now() < give_up) {
    pollfd p{out[0], POLLIN, 0};
    if (poll(&p, 1, 1000) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(out[0], buf, sizeof buf);
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  kill(pid, SIGTERM);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  close(out[0]);
  ASSERT_NE(text.find("3. Load"), std::string::npos) << text;
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << status;
  ExpectNoDemoServerLeft(text);
}

// `scales serverset zk://...` whose server set could not start its discovery thread (no address
// space for a stack) ended by std::terminate (SIGABRT, "terminate called after throwing an
// instance of 'std::system_error'"); it says which step failed now, exit status 2.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST(CliTest, AServerSetThatCannotStartItsThreadSaysSo) {
  // Thread stacks of 1 GB in 1 GB of address space. Nothing listens on port 1: the thread is
  // refused before any connection is tried.
  Result r = RunTool("serverset zk://127.0.0.1:1/svc --timeout 5s", "2>&1",
                     "ulimit -s 1000000; ulimit -v 1000000; timeout -k 5 60");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("scales serverset: cannot start the server set's discovery thread: "), std::string::npos)
      << r.out;
}
#endif

// A failure after the demo started its servers (here: no thread for the clients' event loops,
// or for a ZooKeeper announcer's session) escaped as an exception: std::terminate, exit by
// SIGABRT, the output lost and every server and ZooKeeper left running. It is a message naming
// the step and exit status 2 now, and the servers are stopped.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST(CliTest, ADemoThatCannotStartItsThreadsSaysSoAndStopsItsServers) {
  TempFile report("demo-threads.html");
  // Into a file: a server left behind would hold a pipe open, and the test would hang.
  TempFile output("demo-threads.txt");
  // Thread stacks of 1 GB in 2 GB of address space: the servers (processes of their own) start,
  // the clients' two event loops cannot. Java's bad option keeps ZooKeeper out of it.
  Result runtime = RunTool("demo --seconds 3 --rate 10 --report " + report.path(), ">" + output.path() + " 2>&1",
                           "ulimit -s 1000000; ulimit -v 2000000; JAVA_TOOL_OPTIONS=-XX:+ScalesNoSuchOption "
                           "timeout -k 5 120");
  runtime.out = output.Read();
  EXPECT_EQ(runtime.exit_code, 2) << runtime.out;
  EXPECT_NE(runtime.out.find("demo: cannot start the clients' 2 event loops: "), std::string::npos) << runtime.out;
  ExpectNoDemoServerLeft(runtime.out);
  if (!test::ZooKeeperAvailable()) return;
  // With 4 GB, ZooKeeper starts, but an announcer cannot start its session's threads.
  Result announce = RunTool("demo --seconds 3 --rate 10 --report " + report.path(), ">" + output.path() + " 2>&1",
                            "ulimit -s 1000000; ulimit -v 4000000; timeout -k 5 120");
  announce.out = output.Read();
  EXPECT_EQ(announce.exit_code, 2) << announce.out;
  EXPECT_NE(announce.out.find("1. ZooKeeper on 127.0.0.1:"), std::string::npos) << announce.out;
  EXPECT_NE(announce.out.find(": cannot announce: "), std::string::npos) << announce.out;
  ExpectNoDemoServerLeft(announce.out, 1);  // ZooKeeper's (the servers are named once registered)
}
#endif

// A process the demo could not start is named with the reason: a test server's exit status
// (its own message goes to stderr), Java's exit status and the end of its output. The messages
// said only "could not start" and "java exited (status 1) ... (is the port taken?)".
TEST(CliTest, DemoSaysWhyAProcessDidNotStart) {
  TempFile report("demo-start.html");
  // Six file descriptors: enough for the demo, not for a test server's sockets (`timeout` needs
  // more: the limit is set after it, with 3 to 5 free).
  Result r = RunTool("demo --seconds 3 --rate 10 --report " + report.path(), "2>&1",
                     "JAVA_TOOL_OPTIONS=-XX:+ScalesNoSuchOption timeout -k 5 120 "
                     "sh -c 'exec 3>&- 4>&- 5>&-; ulimit -n 6; exec \"$0\" \"$@\"'");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("demo: could not start the HTTP test server alpha: `scales testserver http --port 0` exited "
                       "(status 1) before it printed \"listening HOST:PORT\""),
            std::string::npos)
      << r.out;
  if (test::ZooKeeperAvailable()) {
    EXPECT_NE(r.out.find("1. No ZooKeeper: java exited (status 1) before ZooKeeper answered on 127.0.0.1:"),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("Unrecognized VM option 'ScalesNoSuchOption'"), std::string::npos) << r.out;
  }
}

TEST(CliTest, BenchUsageErrors) {
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --path /").exit_code, 2);  // neither --requests nor --duration
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --requests 0").exit_code, 2);
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --duration 10parsecs").exit_code, 2);
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --requests 5 --rate 0").exit_code, 2);
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --requests 5 --rate fast").exit_code, 2);
  // A duration past 365 days (2562047 h would overflow the clock: the run ended at once, exit 0).
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --duration 2562047h").exit_code, 2);
  // Numbers are whole: no silent prefix ("9090x") or garbage ("abc" was port 0).
  EXPECT_EQ(RunTool("testserver thriftmux --port abc").exit_code, 2);
  EXPECT_EQ(RunTool("testserver thriftmux --port 9090x").exit_code, 2);
  EXPECT_EQ(RunTool("testserver thriftmux --ping-interval 99999999999").exit_code, 2);
  // The same for the Thrift test server, whose numbers strtol took with a sign or leading
  // spaces: such a server started (and ran until `timeout` ended it, exit 124).
  for (const char* args : {"testserver thrift --port +0", "testserver thrift --port ' 0'",
                           "testserver thrift --port 0 --io-threads +2", "testserver thrift --port 0 --io-threads 2x"}) {
    EXPECT_EQ(RunTool(args, "2>/dev/null", "timeout -k 1 5").exit_code, 2) << args;
  }
  EXPECT_EQ(RunTool("thrift call tcp://127.0.0.1:1 sleep ''").exit_code, 2);
  EXPECT_EQ(RunTool("demo --seconds 5x").exit_code, 2);
  // Values that used to crash (std::bad_alloc for the payload, std::system_error when event
  // loops cannot start) or hang (the second call due in 30,000 years), and an option that does
  // not apply (a ping has no payload).
  Result payload = RunTool("bench thrift tcp://127.0.0.1:1 --method echo --payload-size 999999999999999999 --requests 1", "2>&1");
  EXPECT_EQ(payload.exit_code, 2);
  EXPECT_NE(payload.out.find("--payload-size"), std::string::npos) << payload.out;
  EXPECT_EQ(RunTool("bench thrift tcp://127.0.0.1:1 --method ping --payload-size 5 --requests 1").exit_code, 2);
  EXPECT_EQ(RunTool("bench http tcp://127.0.0.1:1 --threads 100000 --requests 1").exit_code, 2);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // (Not under a sanitizer, whose shadow memory alone needs more address space than this.)
  Result loops = RunTool("bench http tcp://127.0.0.1:1 --threads 1000 --requests 1", "2>&1",
                         "ulimit -v 1000000; timeout -k 5 60");  // 1 GB of address space: no room for 1000 stacks
  EXPECT_EQ(loops.exit_code, 2);
  EXPECT_NE(loops.out.find("cannot start 1000 event loops"), std::string::npos) << loops.out;
#endif
  // A busy poll below the runtime's unit (1 us) was silently off.
  Result spin = RunTool("bench http tcp://127.0.0.1:1 --requests 1 --busy-poll 500ns", "2>&1");
  EXPECT_EQ(spin.exit_code, 2) << spin.out;
  EXPECT_NE(spin.out.find("at least 1us"), std::string::npos) << spin.out;
  Result schedule = RunTool("bench http tcp://127.0.0.1:1 --requests 2 --rate 1e-12", "2>&1", "timeout -k 5 20");
  EXPECT_EQ(schedule.exit_code, 2);
  EXPECT_NE(schedule.out.find("365 days"), std::string::npos) << schedule.out;
  // An option given twice is an error naming it, in every command (the last value silently won).
  for (const char* args : {"bench http tcp://127.0.0.1:1 --requests 5 --requests 10",
                           "bench http tcp://127.0.0.1:1 -n 5 --requests 10",
                           "http get tcp://127.0.0.1:1 / --timeout 1s --timeout 2s",
                           "thrift call tcp://127.0.0.1:1 ping --timeout 1s --timeout 2s",
                           "serverset tcp://127.0.0.1:1 --timeout 1s --timeout 2s",
                           "demo --report /nonexistent-dir/a.html --report /nonexistent-dir/b.html"}) {
    Result twice = RunTool(args, "2>&1");
    EXPECT_EQ(twice.exit_code, 2) << args;
    EXPECT_NE(twice.out.find("given twice"), std::string::npos) << args << "\n" << twice.out;
  }
  // Contradictory flags (the last silently won), and an option of another protocol (it was
  // "unknown", though the usage lists it).
  Result both = RunTool("bench http tcp://127.0.0.1:1 --requests 1 --progress --no-progress", "2>&1");
  EXPECT_EQ(both.exit_code, 2) << both.out;
  EXPECT_NE(both.out.find("give one of --progress and --no-progress"), std::string::npos) << both.out;
  for (auto [args, message] : {std::pair{"bench thrift tcp://127.0.0.1:1 --requests 1 --path /", "--path does not apply to bench thrift"},
                               std::pair{"bench http tcp://127.0.0.1:1 --requests 1 --payload-size 5", "--payload-size does not apply to bench http"},
                               std::pair{"bench http tcp://127.0.0.1:1 --requests 1 --protocol compact", "--protocol does not apply to bench http"}}) {
    Result other = RunTool(args, "2>&1");
    EXPECT_EQ(other.exit_code, 2) << args << "\n" << other.out;
    EXPECT_NE(other.out.find(message), std::string::npos) << args << "\n" << other.out;
  }
  // An unwritable report fails before the run.
  Result report = RunTool("bench http tcp://127.0.0.1:1 --requests 5 --report /nonexistent-dir/r.html", "2>&1");
  EXPECT_EQ(report.exit_code, 2);
  EXPECT_NE(report.out.find("/nonexistent-dir/r.html"), std::string::npos) << report.out;
  // A run that fails before its report is written (here the client: a bad port) leaves the
  // previous report as it was; the check before the run used to empty it.
  TempFile previous("previous-report.html");
  {
    std::ofstream(previous.path()) << "the previous report";
  }
  Result bad_uri = RunTool("bench http tcp://127.0.0.1:99999 --requests 1 --report " + previous.path(), "2>&1");
  EXPECT_EQ(bad_uri.exit_code, 2) << bad_uri.out;
  EXPECT_NE(bad_uri.out.find("out of range"), std::string::npos) << bad_uri.out;
  EXPECT_EQ(previous.Read(), "the previous report");
}

// Every command and sub-command prints its usage on --help or -h, on stdout, with exit status 0
// and without opening anything. Only `scales serverset` and the test servers took it: `scales http
// get URI --help` requested /--help, the others called it an unknown option or a missing value.
TEST(CliTest, EveryCommandPrintsItsUsageOnHelp) {
  const std::string nowhere = "tcp://127.0.0.1:" + std::to_string(test::FreeTcpPort());
  for (auto [args, usage] : std::vector<std::pair<std::string, std::string>>{
           {"--help", "usage: scales <command>"},
           {"http --help", "usage: scales http"},
           {"http -h", "usage: scales http"},
           {"http get --help", "usage: scales http"},
           {"http get " + nowhere + " --help", "usage: scales http"},
           {"http post " + nowhere + " / --data x -h", "usage: scales http"},
           {"thrift --help", "usage: scales thrift"},
           {"thrift call --help", "usage: scales thrift"},
           {"thrift call " + nowhere + " -h", "usage: scales thrift"},
           {"thrift call " + nowhere + " echo --help", "usage: scales thrift"},
           {"thriftmux call " + nowhere + " ping --timeout 1s --help", "scales thriftmux call"},
           {"bench --help", "usage: scales bench"},
           {"bench http --help", "usage: scales bench"},
           {"bench http " + nowhere + " --help", "usage: scales bench"},
           {"bench thrift " + nowhere + " --requests 1 -h", "usage: scales bench"},
           {"bench thriftmux " + nowhere + " --help", "usage: scales bench"},
           {"serverset --help", "usage: scales serverset"},
           {"serverset " + nowhere + " -h", "usage: scales serverset"},
           {"demo --help", "usage: scales demo"},
           {"demo -h", "usage: scales demo"},
           {"testserver --help", "usage: scales testserver"},
           {"testserver http --help", "usage: scales testserver http"},
           {"testserver thrift --help", "usage: scales testserver thrift"},
           {"testserver thriftmux -h", "usage: scales testserver thriftmux"}}) {
    Result help = RunTool(args, "2>/dev/null", "timeout -k 5 20");
    EXPECT_EQ(help.exit_code, 0) << args << "\n" << help.out;
    EXPECT_NE(help.out.find(usage), std::string::npos) << args << "\n" << help.out;
  }
}

// An option where a positional argument or a value belongs is reported as the one it stands for:
// `scales http get URI --timeout 1s` took --timeout as the PATH and said "unknown option '1s'";
// `--path --json` ran the load on /--json, with a text report; `--report --json` wrote the
// page to a file named --json; `--client-id --timeout 1s` echoed "1s" with the default timeout.
TEST(CliTest, AnOptionWhereAnArgumentBelongsNamesTheMissingOne) {
  const std::string in_tmp = "cd " + std::filesystem::temp_directory_path().string() + " && timeout -k 5 20";
  for (auto [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"http get tcp://127.0.0.1:1 --timeout 1s", "missing PATH before option '--timeout'"},
           {"http get tcp://127.0.0.1:1", "missing PATH"},
           {"http get --timeout 1s /", "missing URI before option '--timeout'"},
           {"http", "missing method"},
           {"thrift call tcp://127.0.0.1:1 --timeout 1s", "missing method (echo, ping, fail, sleep) before option '--timeout'"},
           {"thriftmux call --client-id x tcp://127.0.0.1:1 ping", "missing URI before option '--client-id'"},
           {"bench http --requests 5", "missing URI before option '--requests'"},
           {"bench --requests 5", "missing the protocol (http, thrift or thriftmux) before option '--requests'"},
           {"bench http tcp://127.0.0.1:1 --requests 1 --path --json", "--path needs a value (got option '--json')"},
           {"bench http tcp://127.0.0.1:1 --requests 1 --method --json", "--method needs a value (got option '--json')"},
           {"bench http tcp://127.0.0.1:1 --requests 1 --report --json",
            "--report needs a file name, such as report.html (got option '--json')"},
           {"thrift call tcp://127.0.0.1:1 echo --client-id --timeout 1s", "--client-id needs a value (got option '--timeout')"},
           {"demo --report --seconds 5", "missing value: '--report'"}}) {
    Result r = RunTool(args, "2>&1", in_tmp);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(message), std::string::npos) << args << "\n" << r.out;
  }
  std::filesystem::remove(std::filesystem::temp_directory_path() / "--json");
}

// Help anywhere on the line wins over an error before it: `http get --timeout 1s --help` said
// "missing URI before option '--timeout'", `serverset --timeout --help` took --help as the
// duration, `bench http --requests 5 --help` said "missing URI".
TEST(CliTest, HelpAnywhereOnTheLineWins) {
  for (auto [args, usage] : std::vector<std::pair<std::string, std::string>>{
           {"http get --timeout 1s --help", "usage: scales http"},
           {"http --data x -h", "usage: scales http"},
           {"thrift call --timeout 1s --help", "usage: scales thrift"},
           {"thriftmux --client-id x -h", "usage: scales thrift"},
           {"bench http --requests 5 --help", "usage: scales bench"},
           {"bench --requests 5 -h", "usage: scales bench"},
           {"serverset --timeout --help", "usage: scales serverset"},
           {"serverset --watch --watch --help", "usage: scales serverset"},
           {"demo --seconds 1 --help", "usage: scales demo"},
           {"testserver --port 1 --help", "usage: scales testserver http"},
           {"testserver http --port abc --help", "usage: scales testserver http"},
           {"testserver thrift --port --help", "usage: scales testserver thrift"},
           {"testserver thriftmux --port abc -h", "usage: scales testserver thriftmux"}}) {
    Result help = RunTool(args, "2>/dev/null", "timeout -k 5 20");
    EXPECT_EQ(help.exit_code, 0) << args << "\n" << help.out;
    EXPECT_NE(help.out.find(usage), std::string::npos) << args << "\n" << help.out;
  }
}

// But a value that is any text is the value, not help: `http post URI /echo --data -h` printed the
// usage and sent nothing, as did `bench http URI --data -h`.
TEST(CliTest, HelpAsTheValueOfATextOptionIsTheValue) {
  test::TestHttpServer server("help-value");
  const std::string uri = "tcp://" + server.endpoint();
  for (const char* data : {"-h", "--help"}) {
    Result posted = RunTool("http post " + uri + " /echo --data " + data, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(posted.exit_code, 0) << data << "\n" << posted.out;
    EXPECT_EQ(posted.out, data);
  }
  Result short_form = RunTool("http post " + uri + " /echo -d -h --include", "2>&1", "timeout -k 5 20");
  EXPECT_EQ(short_form.out.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << short_form.out;
  Result bench = RunTool("bench http " + uri + " --requests 1 --method POST --path /echo --data -h --json", "2>&1",
                         "timeout -k 5 20");
  EXPECT_EQ(bench.exit_code, 0) << bench.out;
  EXPECT_EQ(bench.out.find("usage:"), std::string::npos) << bench.out;
  // Help after the value still wins.
  Result help = RunTool("http post " + uri + " /echo --data -h --help", "2>/dev/null", "timeout -k 5 20");
  EXPECT_EQ(help.exit_code, 0) << help.out;
  EXPECT_NE(help.out.find("usage: scales http"), std::string::npos) << help.out;
}

// An argument where only options may come is named as unexpected, not as an unknown option
// (`http get URI / extra` said "unknown option 'extra'").
TEST(CliTest, AnExtraArgumentIsNamedAsUnexpected) {
  for (auto [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"http get tcp://127.0.0.1:1 / extra", "scales http: unexpected argument 'extra'"},
           {"http get tcp://127.0.0.1:1 / --timeout 1s extra", "scales http: unexpected argument 'extra'"},
           {"bench http tcp://127.0.0.1:1 extra --requests 1", "scales bench: unexpected argument 'extra'"},
           {"demo extra", "scales demo: unexpected argument 'extra'"},
           {"testserver http extra", "scales testserver: unexpected argument 'extra'"},
           {"testserver thrift extra 1", "scales testserver thrift: unexpected argument 'extra'"},
           {"testserver thriftmux extra 1", "scales testserver thriftmux: unexpected argument 'extra'"},
           // (These two said so already.)
           {"thrift call tcp://127.0.0.1:1 echo a b", "scales thrift: unexpected argument 'b'"},
           {"serverset tcp://127.0.0.1:1 extra", "scales serverset: unexpected argument 'extra'"}}) {
    Result r = RunTool(args, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(message), std::string::npos) << args << "\n" << r.out;
    EXPECT_EQ(r.out.find("unknown option"), std::string::npos) << args << "\n" << r.out;
  }
}

// A duration is a whole number of nanoseconds, the unit the options take: "0.5ns" was rounded to
// 1 ns ("0.4ns" to 0) silently. --busy-poll, in microseconds, likewise ("1500ns" was 1 us).
TEST(CliTest, ADurationFinerThanItsUnitIsRefused) {
  for (auto [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"http get tcp://127.0.0.1:1 / --timeout 0.5ns",
            "--timeout needs a duration such as 300ms or 2s ('0.5ns' is not a whole number of nanoseconds"},
           {"http get tcp://127.0.0.1:1 / --timeout 1.5ns", "('1.5ns' is not a whole number of nanoseconds"},
           {"http get tcp://127.0.0.1:1 / --timeout 0.0000000001", "('0.0000000001' is not a whole number of nanoseconds"},
           {"thrift call tcp://127.0.0.1:1 ping --timeout 0.5ns", "('0.5ns' is not a whole number of nanoseconds"},
           {"bench http tcp://127.0.0.1:1 --requests 1 --timeout 0.5ns", "('0.5ns' is not a whole number of nanoseconds"},
           {"bench http tcp://127.0.0.1:1 --duration 0.5ns", "('0.5ns' is not a whole number of nanoseconds"},
           {"bench http tcp://127.0.0.1:1 --requests 1 --busy-poll 1500ns", "whole microseconds, at least 1us"},
           {"serverset tcp://127.0.0.1:1 --timeout 0.5ns", "('0.5ns' is not a whole number of nanoseconds"}}) {
    Result r = RunTool(args, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(message), std::string::npos) << args << "\n" << r.out;
  }
  // What stays: fractions that are whole nanoseconds, in any unit (each long enough for the
  // static set's members to come first).
  for (const char* timeout : {"1.000000001s", "1.5", "2.", "0.05m", ".001h", "1500.000001ms", "007s", "2.50s"}) {
    Result ok = RunTool(std::string("serverset tcp://127.0.0.1:1 --timeout ") + timeout, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(ok.exit_code, 0) << timeout << "\n" << ok.out;
    EXPECT_NE(ok.out.find("127.0.0.1:1"), std::string::npos) << timeout << "\n" << ok.out;
  }
}

// Numbers are plain decimal. --rate (strtod) took hex ("0x10": 16/s), leading spaces and a '+',
// the demo's --seconds and --rate and `thrift call ... sleep` (strtoll) a '+' or "-0" too.
TEST(CliTest, NumbersArePlainDecimal) {
  for (const char* rate : {"0x10", "' 5'", "+5", "0x1p4", "inf", "nan", "1e999", "5.5.5", "'5 '", "''", "."}) {
    Result r = RunTool(std::string("bench http tcp://127.0.0.1:1 --requests 1 --rate ") + rate, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(r.exit_code, 2) << rate << "\n" << r.out;
    EXPECT_NE(r.out.find("--rate needs a request rate per second"), std::string::npos) << rate << "\n" << r.out;
  }
  // (The unwritable report would stop the demo before it starts anything, were --rate taken.)
  for (const char* args : {"--rate 0x10", "--rate ' 20'", "--rate +20", "--seconds 0x5", "--seconds +5"}) {
    Result r = RunTool(std::string("demo ") + args + " --report /nonexistent-dir/d.html", "2>&1", "timeout -k 5 20");
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(std::string(args).starts_with("--rate") ? "--rate is 10 to 100000" : "--seconds is 3 to 600"),
              std::string::npos)
        << args << "\n" << r.out;
  }
  for (const char* millis : {"+5", "-0", "' 5'"}) {
    Result r = RunTool(std::string("thrift call tcp://127.0.0.1:1 sleep ") + millis, "2>&1", "timeout -k 5 20");
    EXPECT_EQ(r.exit_code, 2) << millis << "\n" << r.out;
    EXPECT_NE(r.out.find("sleep needs a number of milliseconds"), std::string::npos) << millis << "\n" << r.out;
  }
  // What stays: decimals, fractions and exponents.
  test::TestHttpServer server("numbers");
  for (const char* rate : {"1000", "1e3", "2.5e2", ".5e3"}) {
    Result ok = RunTool("bench http tcp://" + server.endpoint() + " --requests 2 --rate " + rate, "2>&1");
    EXPECT_EQ(ok.exit_code, 0) << rate << "\n" << ok.out;
  }
  // Leading zeros are taken, as by every other number: --admin-port took "0" but refused "00".
  for (const char* port : {"0", "00", "000"}) {
    Result ok = RunTool("bench http tcp://" + server.endpoint() + " --requests 1 --admin-port " + port, "2>&1");
    EXPECT_EQ(ok.exit_code, 0) << port << "\n" << ok.out;
  }
  Result bad = RunTool("bench http tcp://" + server.endpoint() + " --requests 1 --admin-port 065536", "2>&1");
  EXPECT_EQ(bad.exit_code, 2) << bad.out;
  EXPECT_NE(bad.out.find("--admin-port needs a port number"), std::string::npos) << bad.out;
}

}  // namespace
}  // namespace scales
