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
//   scales_zk_exit_helper fork <zk:// URI> <port>
//
// (ZooKeeperTest.AForkedChildExitsWithoutTheParentsCloser.) Reads the URI's server set and
// releases it (its close starts a closer thread), then forks. The child hands the closer a stop
// of its own and exits through std::exit (which drains the closer), 0 if the stop ran within
// 10 s, else 3. The parent waits up to 20 s and prints "child exited <status>" (or "child hung",
// and kills it), then exits 0. <port> is not used.
//
// All exit 2 (with a message on stderr) when something before the exit fails.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

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

int RunFork(const std::string& uri) {
  using scales::zk_internal::ZkConnection;
  {
    scales::ZooKeeperServerSet set(scales::ScalesUriParser::Parse(uri));
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (!set.members()) {
      if (std::chrono::steady_clock::now() > give_up) return Fail("not read: " + set.Describe());
      std::this_thread::sleep_for(10ms);  // polling for the first read
    }
  }  // its close goes to the closer, which starts a thread for it
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (ZkConnection::StopsPending() != 0) {
    if (std::chrono::steady_clock::now() > give_up)
      return Fail("the server set's close did not end");
    std::this_thread::sleep_for(10ms);
  }
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) {
    // The child: the closer's thread is the parent's. A stop handed over here needs a thread of
    // the child's; exit() drains the closer and joins its threads.
    auto ran = std::make_shared<std::promise<void>>();
    auto done = ran->get_future();
    ZkConnection::StopInBackground([ran] { ran->set_value(); });
    std::exit(done.wait_for(10s) == std::future_status::ready ? 0 : 3);
  }
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  int status = 0;
  for (;;) {
    const pid_t reaped = ::waitpid(child, &status, WNOHANG);
    if (reaped == child) break;
    if (reaped < 0) return Fail("waitpid failed");
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      std::printf("child hung\n");
      return 0;
    }
    std::this_thread::sleep_for(10ms);  // polling the child
  }
  if (WIFEXITED(status)) {
    std::printf("child exited %d\n", WEXITSTATUS(status));
  } else {
    std::printf("child ended by signal %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 4 ? argv[1] : "";
  if (mode != "closer" && mode != "global" && mode != "fork") {
    return Fail("usage: scales_zk_exit_helper closer|global|fork <zk:// URI> <port>");
  }
  try {
    const int port = std::atoi(argv[3]);
    if (mode == "fork") return RunFork(argv[2]);
    return mode == "closer" ? RunCloser(argv[2], port) : RunGlobal(argv[2], port);
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
}
