// bench_thrift_peer: the Apache Thrift C++ synchronous client as a peer for `scales bench thrift`.
//
//   bench_thrift_peer --port P [--threads N] [--duration-ms 3000] [--method echo|ping]
//                     [--payload-size 16]
//
// N threads, each with its own connection (TSocket + TFramedTransport + TBinaryProtocol, the
// generated EchoClient from tools/echo.thrift), call the same method as `scales bench thrift`
// back to back until the duration ends: a closed loop with N calls outstanding, which is what
// a user of Apache Thrift's own client gets with one thread per concurrent caller. Prints one
// JSON line (bench_util.h): throughput, latency percentiles and the process's CPU per call.
// Connect, send and receive time out after 10 s: a server that stops answering fails the
// thread's call (counted in `failed`, exit status 1) instead of hanging the benchmark.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TSocket.h>

#include "Echo.h"
#include "bench_util.h"

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kSocketTimeoutMs = 10000;

struct Worker {
  std::vector<int64_t> latency_us;
  int64_t failed = 0;
  std::string error;
};

}  // namespace

int main(int argc, char** argv) {
  using namespace apache::thrift;
  scales::bench::Flags flags(argc, argv);
  const int port = static_cast<int>(flags.GetInt("port", 0, 65535));
  const int threads = static_cast<int>(flags.GetInt("threads", 1, INT_MAX));
  const auto duration = std::chrono::milliseconds(flags.GetInt("duration-ms", 3000));
  const std::string method = flags.Get("method", "echo");
  const std::string payload(static_cast<size_t>(flags.GetInt("payload-size", 16)), 'x');
  flags.RejectUnknown();
  if (port <= 0 || threads <= 0)
    scales::bench::Flags::Die("bench_thrift_peer: --port and --threads > 0 needed");
  if (method != "echo" && method != "ping")
    scales::bench::Flags::Die("bench_thrift_peer: --method echo|ping");

  // Connect every client before the clock starts, as `scales bench` opens its client first.
  std::vector<std::unique_ptr<scales::echo::EchoClient>> clients;
  std::vector<std::shared_ptr<transport::TTransport>> transports;
  for (int i = 0; i < threads; ++i) {
    auto socket = std::make_shared<transport::TSocket>("127.0.0.1", port);
    socket->setNoDelay(true);
    socket->setConnTimeout(kSocketTimeoutMs);
    socket->setSendTimeout(kSocketTimeoutMs);
    socket->setRecvTimeout(kSocketTimeoutMs);
    auto framed = std::make_shared<transport::TFramedTransport>(socket);
    try {
      framed->open();
    } catch (const std::exception& e) {
      scales::bench::Flags::Die("bench_thrift_peer: connect 127.0.0.1:%d: %s", port, e.what());
    }
    transports.push_back(framed);
    clients.push_back(std::make_unique<scales::echo::EchoClient>(
        std::make_shared<protocol::TBinaryProtocol>(framed)));
  }
  std::vector<Worker> workers(static_cast<size_t>(threads));
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  Clock::time_point end;
  for (int i = 0; i < threads; ++i) {
    pool.emplace_back([&, i] {
      Worker& w = workers[static_cast<size_t>(i)];
      w.latency_us.reserve(1 << 20);
      auto& client = *clients[static_cast<size_t>(i)];
      std::string reply;
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      for (;;) {
        const auto start = Clock::now();
        if (start >= end) break;
        try {
          if (method == "ping") {
            client.ping();
          } else {
            client.echo(reply, payload);
          }
          w.latency_us.push_back(
              std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count());
        } catch (const std::exception& e) {
          ++w.failed;
          w.error = std::string("a call failed: ") + e.what();
          break;  // the connection is unusable after a transport error
        }
      }
    });
  }
  const double cpu_begin = scales::bench::ProcessCpuSeconds();
  const auto begin = Clock::now();
  end = begin + duration;
  go.store(true, std::memory_order_release);
  for (auto& t : pool) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - begin).count();
  const double cpu = scales::bench::ProcessCpuSeconds() - cpu_begin;
  std::vector<int64_t> all;
  int64_t failed = 0;
  for (auto& w : workers) {
    all.insert(all.end(), w.latency_us.begin(), w.latency_us.end());
    failed += w.failed;
    if (!w.error.empty()) std::fprintf(stderr, "bench_thrift_peer: %s\n", w.error.c_str());
  }
  for (auto& t : transports) t->close();
  const int64_t requests = static_cast<int64_t>(all.size()) + failed;
  scales::bench::PrintJson(requests, failed, elapsed, all, cpu);
  return failed == 0 ? 0 : 1;
}
