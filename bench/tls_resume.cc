// bench_tls_resume: what TLS session resumption (TlsOptions::resume_sessions) saves a client
// that opens many connections. A scales HTTPS client calls nginx (TLS 1.3 and 1.2 offered, the
// test CA's P-256 certificate) with every call on a new connection ("Connection: close"), in
// rounds that alternate resume_sessions off and on within one process; per mode it reports the
// median over rounds of the client's CPU per call (user + system of this process, whose only
// work is the calls: nginx runs as its own processes), the throughput, and the share of
// handshakes that resumed (scales_tls_resumptions). Not a test and not part of bench/run
// (docs/PERFORMANCE.md, "TLS session resumption").
//
//   bench_tls_resume [--calls 2000] [--rounds 5] [--callers 4] [--loops 1]
//                    [--protocols "TLSv1.2 TLSv1.3"]
//
// With --loops above 1 the connections are spread over the client's loops, and a loop parses the
// kept session when the newest came from another loop (docs/tls.md, "Session resumption").
//
// Exit status: 0 done, 1 a call failed or no handshake resumed with resume_sessions on, 2 the
// harness failed (bad flags, nginx would not start).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "bench_util.h"
#include "scales/core/runtime.h"
#include "scales/http/client.h"
#include "scales/stats/stats.h"
#include "support/fixtures.h"
#include "support/test_ca.h"

namespace {

using namespace std::chrono_literals;
using scales::bench::Flags;

struct Round {
  double cpu_us_per_call = 0;
  double calls_per_s = 0;
  int64_t failed = 0;
  int64_t resumed = 0;
};

Round RunRound(const std::string& endpoint, bool resume, long calls, long callers, long loops) {
  scales::stats::StatsRegistry stats;  // outlives the runtime below
  scales::RuntimeOptions ro;
  ro.threads = static_cast<size_t>(loops);
  auto runtime = std::make_shared<scales::Runtime>(ro);
  scales::http::HttpOptions o;
  o.client.name = "bench-tls";
  o.client.runtime = runtime;
  o.client.stats = &stats;
  o.client.timeout = 10s;
  o.transport.tls.enabled = true;
  o.transport.tls.ca_file = scales::testing::TestCa().ca_file;
  o.transport.tls.resume_sessions = resume;
  auto client = scales::Http::NewClient("https://" + endpoint, o);
  // One full handshake before the clock starts, so that a resuming round starts with a session.
  client.Get("/", {{"Connection", "close"}});
  const auto* resumptions = stats.FindCounter("scales_tls_resumptions",
                                              {{"client", "bench-tls"}, {"endpoint", endpoint}});
  const int64_t resumed_before = resumptions ? resumptions->value() : 0;

  std::atomic<int64_t> failed{0};
  const double cpu_before = scales::bench::ProcessCpuSeconds();
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (long t = 0; t < callers; ++t) {
    threads.emplace_back([&, t] {
      for (long i = t; i < calls; i += callers) {
        try {
          if (client.Get("/", {{"Connection", "close"}}).status != 200) failed.fetch_add(1);
        } catch (const std::exception&) {
          failed.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Round r;
  r.cpu_us_per_call =
      (scales::bench::ProcessCpuSeconds() - cpu_before) * 1e6 / static_cast<double>(calls);
  r.calls_per_s = static_cast<double>(calls) / elapsed;
  r.failed = failed.load();
  r.resumed = resumptions ? resumptions->value() - resumed_before : 0;
  client.Close();
  return r;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags(argc, argv);
  const long calls = std::max(1L, flags.GetInt("calls", 2000));
  const long rounds = std::max(1L, flags.GetInt("rounds", 5));
  const long callers = std::max(1L, flags.GetInt("callers", 4, 256));
  const long loops = std::max(1L, flags.GetInt("loops", 1, 64));
  const std::string protocols = flags.Get("protocols", "TLSv1.2 TLSv1.3");
  flags.RejectUnknown();

  std::unique_ptr<scales::test::NginxServer> nginx;
  try {
    const auto& ca = scales::testing::TestCa();
    scales::test::NginxTls tls{ca.server_cert, ca.server_key, {}};
    tls.protocols = protocols;
    nginx = std::make_unique<scales::test::NginxServer>("tls-resume", tls);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tls_resume: %s\n", e.what());
    return 2;
  }

  std::vector<double> cpu[2], rate[2];
  int64_t failed = 0, resumed_on = 0, resumed_off = 0;
  for (long round = 0; round < rounds; ++round) {
    for (const bool resume : {false, true}) {
      const Round r = RunRound(nginx->endpoint(), resume, calls, callers, loops);
      cpu[resume].push_back(r.cpu_us_per_call);
      rate[resume].push_back(r.calls_per_s);
      failed += r.failed;
      (resume ? resumed_on : resumed_off) += r.resumed;
      std::printf(
          "round %ld resume_sessions=%s: %.1f us CPU/call, %.0f calls/s, %lld of %ld resumed, %lld "
          "failed\n",
          round + 1, resume ? "on " : "off", r.cpu_us_per_call, r.calls_per_s,
          static_cast<long long>(r.resumed), calls, static_cast<long long>(r.failed));
    }
  }
  const double off_cpu = Median(cpu[0]), on_cpu = Median(cpu[1]);
  std::printf(
      "\n| resume_sessions | client CPU/call (median) | calls/s (median) | handshakes resumed |\n");
  std::printf("| --- | --- | --- | --- |\n");
  std::printf("| off | %.1f us | %.0f | %lld of %ld |\n", off_cpu, Median(rate[0]),
              static_cast<long long>(resumed_off), calls * rounds);
  std::printf("| on | %.1f us | %.0f | %lld of %ld |\n", on_cpu, Median(rate[1]),
              static_cast<long long>(resumed_on), calls * rounds);
  std::printf(
      "\nCPU per call, on / off: %.2f; throughput, on / off: %.2f (%ld calls per round, %ld "
      "callers, %ld event loop(s), %s)\n",
      off_cpu > 0 ? on_cpu / off_cpu : 0,
      Median(rate[0]) > 0 ? Median(rate[1]) / Median(rate[0]) : 0, calls, callers, loops,
      protocols.c_str());
  if (failed > 0 || resumed_on == 0) {
    std::fprintf(
        stderr,
        "bench_tls_resume: %lld calls failed, %lld handshakes resumed with resume_sessions on\n",
        static_cast<long long>(failed), static_cast<long long>(resumed_on));
    return 1;
  }
  return 0;
}
