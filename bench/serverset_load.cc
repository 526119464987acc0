// Time to load a large ZooKeeper server set: 10,000 members (Finagle JSON) created in a real
// ZooKeeper server (started like the integration tests do), then
//   - ZooKeeperServerSet: from construction to the first snapshot (pipelined async reads);
//   - a baseline: get_children + one synchronous get per member (what scales' Python did).
// Not part of CI pass/fail. Usage: bench_serverset_load [members] (default 10000).
// Every wait is bounded; a ZooKeeper error or a wait that runs out ends the program with a
// message and exit status 2 (the ZooKeeper server is stopped on the way out).
#include <zookeeper/zookeeper.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include <boost/asio/thread_pool.hpp>

#include "scales/discovery/serverset_member.h"
#include "scales/discovery/zookeeper.h"
#include "support/zookeeper_fixture.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr auto kConnectLimit = 30s;
constexpr auto kCreateLimit = 120s;  // every create answered
constexpr auto kLoadLimit = 120s;    // ZooKeeperServerSet's first snapshot

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

[[noreturn]] void Fail(const std::string& what) { throw std::runtime_error(what); }

std::string ZooError(int rc) { return std::string(zerror(rc)) + " (" + std::to_string(rc) + ")"; }

// The handle closes the session when it goes out of scope.
using ZooHandle = std::unique_ptr<zhandle_t, decltype(&zookeeper_close)>;

ZooHandle Connect(const std::string& hosts) {
  ZooHandle zh(
      zookeeper_init2(hosts.c_str(), nullptr, 30000, nullptr, nullptr, 0, [](const char*) {}),
      &zookeeper_close);
  if (!zh) Fail("zookeeper_init2(" + hosts + ") failed");
  auto until = Clock::now() + kConnectLimit;
  while (zoo_state(zh.get()) != ZOO_CONNECTED_STATE) {
    if (Clock::now() >= until) Fail("no ZooKeeper session with " + hosts + " within 30 s");
    std::this_thread::sleep_for(10ms);
  }
  return zh;
}

// Creates `n` persistent sequential members under /bench, pipelined (async creates).
void CreateMembers(zhandle_t* zh, int n) {
  if (int rc = zoo_create(zh, "/bench", "", 0, &ZOO_OPEN_ACL_UNSAFE, 0, nullptr, 0);
      rc != ZOK && rc != ZNODEEXISTS) {
    Fail("create /bench: " + ZooError(rc));
  }
  // Shared with the completions: each holds a reference (a heap copy of the pointer is the
  // completion's context), so a wait that gives up leaves nothing dangling.
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    int left = 0;
    int failed = 0;
    int first_error = ZOK;
    void Finish(int rc) {
      std::lock_guard lock(mu);
      if (rc != ZOK && failed++ == 0) first_error = rc;
      if (--left == 0) cv.notify_all();
    }
  };
  auto done = std::make_shared<Done>();
  done->left = n;
  for (int i = 0; i < n; ++i) {
    scales::ServiceInstance instance;
    instance.service_endpoint = {"10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250),
                                 static_cast<uint16_t>(9000 + i % 1000)};
    instance.additional_endpoints["http"] = {instance.service_endpoint.host, 8080};
    std::string data = scales::SerializeServiceInstance(instance);
    auto* ctx = new std::shared_ptr<Done>(done);
    int rc = zoo_acreate(
        zh, "/bench/member_", data.data(), static_cast<int>(data.size()), &ZOO_OPEN_ACL_UNSAFE,
        ZOO_SEQUENCE,
        [](int rc, const char*, const void* ctx) {
          std::unique_ptr<std::shared_ptr<Done>> d(
              static_cast<std::shared_ptr<Done>*>(const_cast<void*>(ctx)));
          (*d)->Finish(rc);
        },
        ctx);
    if (rc != ZOK) {  // not queued: its completion will never run
      delete ctx;
      done->Finish(rc);
    }
  }
  std::unique_lock lock(done->mu);
  if (!done->cv.wait_for(lock, kCreateLimit, [&] { return done->left == 0; })) {
    Fail(std::to_string(done->left) + " of " + std::to_string(n) +
         " member creates unanswered after 120 s");
  }
  if (done->failed > 0) {
    Fail(std::to_string(done->failed) + " of " + std::to_string(n) +
         " member creates failed, the first with " + ZooError(done->first_error));
  }
}

int Run(int n) {
  scales::test::ZooKeeperServer zk;
  ZooHandle handle = Connect(zk.connect_string());
  zhandle_t* zh = handle.get();

  auto t0 = Clock::now();
  CreateMembers(zh, n);
  auto created = Clock::now() - t0;

  // ZooKeeperServerSet: construction to first snapshot.
  boost::asio::thread_pool pool(1);
  std::promise<size_t> first;
  std::atomic<bool> once{false};
  auto t1 = Clock::now();
  auto set = std::make_shared<scales::ZooKeeperServerSet>(
      scales::ScalesUriParser::Parse(zk.Uri("/bench")));
  uint64_t id = set->Subscribe(pool.get_executor(), [&](const scales::ServerSet::Members& m) {
    if (!once.exchange(true)) first.set_value(m.size());
  });
  auto first_snapshot = first.get_future();
  if (first_snapshot.wait_for(kLoadLimit) != std::future_status::ready) {
    set->Unsubscribe(id);
    set.reset();
    pool.join();  // no callback runs after `first` and `once` are gone
    Fail("ZooKeeperServerSet gave no snapshot of /bench within 120 s");
  }
  size_t loaded = first_snapshot.get();
  auto scales_load = Clock::now() - t1;
  set->Unsubscribe(id);
  set.reset();
  pool.join();

  // Baseline: sequential synchronous reads.
  auto t2 = Clock::now();
  String_vector children{};
  if (int rc = zoo_get_children(zh, "/bench", 0, &children); rc != ZOK) {
    Fail("get_children /bench: " + ZooError(rc));
  }
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
  handle.reset();

  std::printf(
      "{\"members\": %d, \"create_pipelined_ms\": %.1f, \"zookeeper_server_set_load_ms\": %.1f, "
      "\"loaded\": %zu, \"sequential_get_ms\": %.1f, \"sequential_parsed\": %zu, "
      "\"speedup\": %.2f}\n",
      n, Ms(created), Ms(scales_load), loaded, Ms(sequential), parsed,
      Ms(sequential) / Ms(scales_load));
  return loaded == static_cast<size_t>(n) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 10000;
  if (n <= 0) {
    std::fprintf(stderr, "usage: bench_serverset_load [members > 0]\n");
    return 2;
  }
  try {
    return Run(n);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_serverset_load: %s\n", e.what());
    return 2;
  }
}
