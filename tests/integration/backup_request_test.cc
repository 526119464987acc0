// Backup requests against real peers, two endpoints of which one is slow:
//   - ThriftMux: two Mux reference servers, one started with --delay (every dispatch waits).
//     With the backup sink the calls complete at the fast server's speed, the slow server
//     receives a Tdiscarded for every backup that won, and every backup carries the
//     com.twitter.finagle.BackupRequest context.
//   - HTTP: nginx and a "black hole" (a listening socket nobody accepts on: connects succeed,
//     requests are never answered). The backup to nginx wins, and the cancelled first attempt's
//     connection is closed by the client (the black hole reads EOF on it).
// The round-robin balancer sends every other call's first attempt to the slow endpoint; the
// backup avoids that endpoint (CallProperties::avoid_endpoints).
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/use_future.hpp>
#include <gtest/gtest.h>

#include "Echo.h"
#include "scales/http/client.h"
#include "scales/resilience/backup_request.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/fixtures.h"
#include "support/mux_server_fixture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;
using Clock = std::chrono::steady_clock;

std::shared_ptr<Runtime> MakeRuntime() {
  RuntimeOptions o;
  o.threads = 1;  // one backup sink, one latency window
  return std::make_shared<Runtime>(o);
}

// Backups after 50 ms (the fast peers answer well within it); a budget that never refuses here.
BackupRequestOptions Hedging() {
  BackupRequestOptions o;
  o.percentile = 0.1;
  o.max_extra_load = 0.5;
  o.min_send_backup_after = 50ms;
  o.refresh_interval = 100ms;
  o.budget_min_per_sec = 10;
  return o;
}

int64_t Counter(const stats::StatsRegistry& s, const char* name, const char* client) {
  const auto* c = s.FindCounter(name, {{"client", client}});
  return c ? c->value() : 0;
}

TEST(BackupRequestIntegrationTest, ThriftMuxSlowServerLosesAndGetsTdiscarded) {
  test::MuxReferenceServer fast({"--mode", "finagle"});
  test::MuxReferenceServer slow({"--mode", "finagle", "--delay", "3000"});
  stats::StatsRegistry stats;
  thriftmux::ThriftMuxOptions o;
  o.client.name = "hedge";
  o.client.runtime = MakeRuntime();
  o.client.stats = &stats;
  o.client.timeout = 10s;
  o.balancer.kind = BalancerKind::kRoundRobin;
  auto client = ThriftMux::NewBuilder<EchoClient>(o)
                    .SetUri("tcp://" + fast.endpoint() + "," + slow.endpoint())
                    .InsertBefore(roles::kLoadBalancer, BackupRequestProvider<Stream>(Hedging()))
                    .Build();
  CallOptions idempotent;
  idempotent.idempotent = true;
  auto hedged = client.WithOptions(idempotent);

  // Warm up: one call to each server; the fast one's latency becomes the first sample.
  auto first = SCALES_THRIFT_CALL(hedged, echo, std::string("warm-1"), boost::asio::use_future);
  auto second = SCALES_THRIFT_CALL(hedged, echo, std::string("warm-2"), boost::asio::use_future);
  auto ready = [](auto& f) { return f.wait_for(0ms) == std::future_status::ready; };
  const auto until = Clock::now() + 2s;
  while (!ready(first) && !ready(second) && Clock::now() < until) std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(ready(first) || ready(second)) << "the fast server did not answer";
  std::this_thread::sleep_for(150ms);  // past a refresh of the delay

  // Every call now completes at the fast server's speed, half of them through a backup.
  for (int i = 0; i < 6; ++i) {
    const auto start = Clock::now();
    std::string r;
    hedged->echo(r, "call-" + std::to_string(i));
    EXPECT_EQ(r, "call-" + std::to_string(i));
    EXPECT_LT(Clock::now() - start, 1500ms) << "call " << i << " waited for the slow server";
  }
  const int64_t sent = Counter(stats, "scales_backup_requests_sent", "hedge");
  const int64_t won = Counter(stats, "scales_backup_requests_won", "hedge");
  EXPECT_GE(sent, 2);
  EXPECT_GE(won, 2);
  // Each winning backup discarded its first attempt on the slow server.
  EXPECT_TRUE(slow.WaitForLog({"recv Tdiscarded"}));
  const auto discards = [&] { return static_cast<int64_t>(slow.LogLinesWith({"recv Tdiscarded"}).size()); };
  const auto deadline = Clock::now() + 5s;
  while (discards() < won && Clock::now() < deadline) std::this_thread::sleep_for(10ms);
  EXPECT_GE(discards(), won) << slow.Log();
  EXPECT_EQ(fast.LogLinesWith({"recv Tdiscarded"}).size(), 0u) << "a fast first attempt was hedged";
  // Every backup (all of them went to the fast server: each avoids its first attempt's
  // endpoint) carried the BackupRequest context; no first attempt did.
  EXPECT_EQ(static_cast<int64_t>(fast.LogLinesWith({"recv Tdispatch", "com.twitter.finagle.BackupRequest"}).size()),
            sent)
      << fast.Log();
  EXPECT_EQ(slow.LogLinesWith({"com.twitter.finagle.BackupRequest"}).size(), 0u) << slow.Log();
  EXPECT_EQ(first.get(), "warm-1");
  EXPECT_EQ(second.get(), "warm-2");
}

// A listening socket on 127.0.0.1 that nobody accepts on until Drain().
class BlackHole {
 public:
  BlackHole() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(fd_, 64) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      throw std::runtime_error("black hole: cannot listen");
    }
    port_ = ntohs(a.sin_port);
  }
  ~BlackHole() {
    for (int c : accepted_) ::close(c);
    ::close(fd_);
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }

  // Accepts every connection made so far and returns how many of them the client has closed
  // (EOF after the request bytes) within `timeout`.
  int ClosedByClient(std::chrono::milliseconds timeout) {
    pollfd p{fd_, POLLIN, 0};
    while (::poll(&p, 1, 0) > 0) accepted_.push_back(::accept(fd_, nullptr, nullptr));
    int closed = 0;
    const auto until = Clock::now() + timeout;
    for (int c : accepted_) {
      char buf[4096];
      for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
        pollfd q{c, POLLIN, 0};
        if (left <= 0 || ::poll(&q, 1, static_cast<int>(left)) <= 0) break;
        ssize_t n = ::recv(c, buf, sizeof(buf), 0);
        if (n <= 0) {
          ++closed;
          break;
        }
      }
    }
    return closed;
  }
  size_t accepted() const { return accepted_.size(); }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::vector<int> accepted_;
};

TEST(BackupRequestIntegrationTest, HttpLoserConnectionIsClosed) {
  test::NginxServer nginx("fast");
  BlackHole hole;
  stats::StatsRegistry stats;
  http::HttpOptions o;
  o.client.name = "hedge-http";
  o.client.runtime = MakeRuntime();
  o.client.stats = &stats;
  o.client.timeout = 10s;
  o.balancer.kind = BalancerKind::kRoundRobin;
  auto client = Http::NewBuilder(o)
                    .SetUri("tcp://" + nginx.endpoint() + "," + hole.endpoint())
                    .InsertBefore(roles::kLoadBalancer, BackupRequestProvider<http::Response>(Hedging()))
                    .Build();
  CallOptions idempotent;
  idempotent.idempotent = true;
  idempotent.timeout = 300ms;

  // Warm up until nginx has answered twice (calls to the black hole time out meanwhile).
  int answered = 0;
  for (int i = 0; i < 8 && answered < 2; ++i) {
    try {
      answered += client.Send({"GET", "/name", {}, {}}, idempotent).status == 200;
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kRequestTimeout) << e.what();
    }
  }
  ASSERT_EQ(answered, 2);
  std::this_thread::sleep_for(150ms);  // past a refresh of the delay
  const int64_t sent_before = Counter(stats, "scales_backup_requests_sent", "hedge-http");

  idempotent.timeout = 5s;
  for (int i = 0; i < 6; ++i) {
    const auto start = Clock::now();
    auto r = client.Send({"GET", "/name", {}, {}}, idempotent);
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.body, "fast");
    EXPECT_LT(Clock::now() - start, 1500ms) << "call " << i << " waited for the black hole";
  }
  const int64_t sent = Counter(stats, "scales_backup_requests_sent", "hedge-http") - sent_before;
  EXPECT_GE(sent, 1);
  EXPECT_GE(Counter(stats, "scales_backup_requests_won", "hedge-http"), sent);
  // Every connection to the black hole carried an unanswered request, timed out or lost to a
  // backup: the client closed each one.
  const int closed = hole.ClosedByClient(3s);
  EXPECT_GE(hole.accepted(), 1u);
  EXPECT_EQ(static_cast<size_t>(closed), hole.accepted());
}

}  // namespace
}  // namespace scales
