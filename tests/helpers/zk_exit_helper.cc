// Processes that exit with ZooKeeper sessions still to close, for the exit tests in
// tests/integration/zookeeper_test.cc: what happens at exit needs a process of its own.
//
//   scales_zk_exit_helper closer <zk:// URI> <port>
//
// (ZooKeeperTest.AShutdownLeftToTheCloserRunsAtExit.) Announces 127.0.0.1:<port> under the
// URI's path and prints "announced <member path>". Then, in a handler on a runtime's event loop,
// hands the closer as many stops as it has threads, each holding its thread until the process
// has begun to exit (an atexit handler lets them go), and releases the Announcer there, so that
// its Shutdown() is queued behind them; prints "exiting, <n> stops pending" and calls
// std::exit(0) with the runtime still alive. The test checks that the member is gone as soon as the
// process is: the closer ran the shutdown at exit, rather than the ensemble expiring the session a
// session timeout later.
//
//   scales_zk_exit_helper global <zk:// URI> <port>
//
// (ZooKeeperTest.AnAnnouncerInAGlobalShutsDownAtExitWithTheEnsembleGone.) Announces as above
// with an Announcer held by a global, which exit() destroys after the library's own statics (this
// file's are initialised first); waits until a server set on the URI reports the ensemble
// gone (the test stops it), prints "ensemble gone, exiting" and calls std::exit(0). The
// Announcer's Shutdown() then waits 2 s for the ensemble while the ZooKeeper C client logs its
// failed connects, all after the library's statics were destroyed.
//
// Both exit 2 (with a message on stderr) when something before the exit fails.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include <boost/asio/post.hpp>

#include "discovery/zk_connection.h"
#include "scales/core/runtime.h"
#include "scales/discovery/zookeeper.h"

namespace {

using namespace std::chrono_literals;

// Set by the atexit handler: the closer's first stop waits for it. Bounded, so that a closer
// that is never drained at exit still lets this process end.
std::promise<void> g_exiting;
// The "global" mode's Announcer.
std::unique_ptr<scales::Announcer> g_announcer;

int Fail(const std::string& why) {
  std::fprintf(stderr, "scales_zk_exit_helper: %s\n", why.c_str());
  return 2;
}

// Announces 127.0.0.1:`port` under `uri`; prints "announced <member path>". Null on failure.
std::unique_ptr<scales::Announcer> Announce(const std::string& uri, int port) {
  scales::ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", static_cast<uint16_t>(port)};
  auto announcer = std::make_unique<scales::Announcer>(scales::ScalesUriParser::Parse(uri), instance);
  if (!announcer->WaitAnnounced(30s)) {
    Fail("not announced: " + announcer->Describe());
    return nullptr;
  }
  std::printf("announced %s\n", announcer->node_path().c_str());
  std::fflush(stdout);
  return announcer;
}

int RunCloser(const std::string& uri, int port) {
  scales::RuntimeOptions runtime_options;
  runtime_options.threads = 1;
  auto runtime = std::make_shared<scales::Runtime>(runtime_options);
  auto announcer = Announce(uri, port);
  if (!announcer) return 2;

  std::promise<void> released;
  boost::asio::post(runtime->loop(0).executor(), [&announcer, &released] {
    using scales::zk_internal::ZkConnection;
    auto exiting = g_exiting.get_future().share();
    for (size_t i = 0; i < ZkConnection::kMaxCloserThreads; ++i) {
      ZkConnection::StopOffLoop([exiting] { exiting.wait_for(30s); });
    }
    announcer.reset();  // on the loop: the Announcer's Shutdown() goes to the closer, queued
    released.set_value();
  });
  if (released.get_future().wait_for(30s) != std::future_status::ready) {
    return Fail("the runtime's loop did not run the release");
  }
  // Registered now, after the closer was started: runs before the closer is drained at exit.
  if (std::atexit([] { g_exiting.set_value(); }) != 0) return Fail("atexit failed");
  std::printf("exiting, %zu stops pending\n", scales::zk_internal::ZkConnection::StopsPending());
  std::fflush(stdout);
  // The runtime is left alive (std::exit does not unwind), like clients that outlive main.
  std::exit(0);
}

int RunGlobal(const std::string& uri, int port) {
  g_announcer = Announce(uri, port);
  if (!g_announcer) return 2;
  {
    scales::ZooKeeperServerSet watcher(scales::ScalesUriParser::Parse(uri));
    const auto give_up = std::chrono::steady_clock::now() + 60s;
    while (watcher.Describe().find("connection refused") == std::string::npos) {
      if (std::chrono::steady_clock::now() > give_up) {
        return Fail("the ensemble did not go: " + watcher.Describe());
      }
      std::this_thread::sleep_for(20ms);  // polling for the test to stop the ensemble
    }
  }
  std::printf("ensemble gone, exiting\n");
  std::fflush(stdout);
  std::exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 4 ? argv[1] : "";
  if (mode != "closer" && mode != "global") {
    return Fail("usage: scales_zk_exit_helper closer|global <zk:// URI> <port>");
  }
  try {
    const int port = std::atoi(argv[3]);
    return mode == "closer" ? RunCloser(argv[2], port) : RunGlobal(argv[2], port);
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
}
