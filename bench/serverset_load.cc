// Time to load a large ZooKeeper server set: 10,000 members (Finagle JSON) created in a real
// ZooKeeper server (started like the integration tests do), then
//   - ZooKeeperServerSet: from construction to the first snapshot (pipelined async reads);
//   - a baseline: get_children + one synchronous get per member (what scales' Python did).
// Not part of CI pass/fail. Usage: bench_serverset_load [members] (default 10000).
#include <zookeeper/zookeeper.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <mutex>
#include <string>

#include <boost/asio/thread_pool.hpp>

#include "scales/discovery/serverset_member.h"
#include "scales/discovery/zookeeper.h"
#include "support/zookeeper_fixture.h"

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

zhandle_t* Connect(const std::string& hosts) {
  zhandle_t* zh = zookeeper_init2(hosts.c_str(), nullptr, 30000, nullptr, nullptr, 0,
                                  [](const char*) {});
  if (!zh) std::abort();
  auto until = Clock::now() + std::chrono::seconds(30);
  while (zoo_state(zh) != ZOO_CONNECTED_STATE && Clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return zh;
}

// Creates `n` persistent sequential members under /bench, pipelined (async creates).
void CreateMembers(zhandle_t* zh, int n) {
  zoo_create(zh, "/bench", "", 0, &ZOO_OPEN_ACL_UNSAFE, 0, nullptr, 0);
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    int left;
    int failed = 0;
  } done;
  done.left = n;
  for (int i = 0; i < n; ++i) {
    scales::ServiceInstance instance;
    instance.service_endpoint = {"10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250),
                                 static_cast<uint16_t>(9000 + i % 1000)};
    instance.additional_endpoints["http"] = {instance.service_endpoint.host, 8080};
    std::string data = scales::SerializeServiceInstance(instance);
    zoo_acreate(
        zh, "/bench/member_", data.data(), static_cast<int>(data.size()), &ZOO_OPEN_ACL_UNSAFE,
        ZOO_SEQUENCE,
        [](int rc, const char*, const void* ctx) {
          auto* d = static_cast<Done*>(const_cast<void*>(ctx));
          std::lock_guard lock(d->mu);
          if (rc != ZOK) ++d->failed;
          if (--d->left == 0) d->cv.notify_all();
        },
        &done);
  }
  std::unique_lock lock(done.mu);
  done.cv.wait(lock, [&] { return done.left == 0; });
  if (done.failed) std::fprintf(stderr, "%d creates failed\n", done.failed);
}

}  // namespace

int main(int argc, char** argv) {
  int n = argc > 1 ? std::atoi(argv[1]) : 10000;
  scales::test::ZooKeeperServer zk;
  zhandle_t* zh = Connect(zk.connect_string());

  auto t0 = Clock::now();
  CreateMembers(zh, n);
  auto created = Clock::now() - t0;

  // ZooKeeperServerSet: construction to first snapshot.
  boost::asio::thread_pool pool(1);
  std::promise<size_t> first;
  auto t1 = Clock::now();
  auto set = std::make_shared<scales::ZooKeeperServerSet>(
      scales::ScalesUriParser::Parse(zk.Uri("/bench")));
  std::atomic<bool> once{false};
  uint64_t id = set->Subscribe(pool.get_executor(), [&](const scales::ServerSet::Members& m) {
    if (!once.exchange(true)) first.set_value(m.size());
  });
  size_t loaded = first.get_future().get();
  auto scales_load = Clock::now() - t1;
  set->Unsubscribe(id);
  set.reset();
  pool.join();

  // Baseline: sequential synchronous reads.
  auto t2 = Clock::now();
  String_vector children{};
  zoo_get_children(zh, "/bench", 0, &children);
  size_t parsed = 0;
  std::string error;
  for (int i = 0; i < children.count; ++i) {
    char buffer[1024];
    int len = sizeof buffer;
    std::string path = std::string("/bench/") + children.data[i];
    if (zoo_get(zh, path.c_str(), 0, buffer, &len, nullptr) == ZOK &&
        scales::ParseServiceInstance(std::string_view(buffer, len > 0 ? len : 0), error)) {
      ++parsed;
    }
  }
  deallocate_String_vector(&children);
  auto sequential = Clock::now() - t2;
  zookeeper_close(zh);

  std::printf(
      "{\"members\": %d, \"create_pipelined_ms\": %.1f, \"zookeeper_server_set_load_ms\": %.1f, "
      "\"loaded\": %zu, \"sequential_get_ms\": %.1f, \"sequential_parsed\": %zu, "
      "\"speedup\": %.2f}\n",
      n, Ms(created), Ms(scales_load), loaded, Ms(sequential), parsed,
      Ms(sequential) / Ms(scales_load));
  return loaded == static_cast<size_t>(n) ? 0 : 1;
}
