// A process that forks (without exec) while it has clients, for the fork tests in
// tests/integration/fork_test.cc: what a child made by fork() can do needs a process of its own.
//
//   scales_fork_helper client <host:port>
//
// (ForkTest.AChildFailsTheParentsClientsAndMakesItsOwn.) Calls GET /name through an HTTP client
// on a runtime of one loop, makes the default runtime, calls through an empty client (which
// started the system executor's threads, which the child could not join: its std::exit hung or
// crashed), then forks. The child:
//   1. calls through the parent's client, blocking and with a callback: both fail at once
//      (within 10 s) with kClientClosed saying the client was created before the fork; so do a
//      call through an empty client (within 10 s) and opening the parent's client (2 s);
//   2. builds a client on the parent's runtime: kInvalidArgument;
//   3. makes a client of its own (Runtime::Default() is a new runtime there) and calls through
//      it;
//   4. releases the parent's client and runtime (at once: within 2 s), and exits through
//      std::exit.
// It exits 0 if every step went so, else 3 with the failed step on stderr. The parent waits up
// to 30 s for it and prints "child exited <status>" (or "child hung", and kills it), then calls
// through its client again, which must still work over the connection it had before the fork
// (the child closed nothing of it): prints "parent call ok on its first connection".
//
//   scales_fork_helper zk <zk:// URI> <port>
//
// (ForkTest.AChildLeavesTheParentsZooKeeperSessionsAlone.) Announces 127.0.0.1:<port> under the
// URI's path and reads the path through a server set until the member is seen; forks. The child
// destroys its copies of both and exits through std::exit (exit code 0). The parent waits for
// it as above, then watches for 3 s that the member stays and that its server set's session
// was neither closed nor replaced, and prints "parent session intact" or what changed.
//
//   scales_fork_helper closer <zk:// URI>
//
// (ForkTest.AChildsShutdownsRunOnTheChildsCloser.) Reads the URI's server set and releases it
// (its close starts a ZooKeeper closer thread), waits for that close, then forks. The child hands
// the closer a stop of its own and exits through std::exit (which drains the closer), 0 if the
// stop ran within 10 s, else 3. The parent waits for it as above.
//
//   scales_fork_helper locks <host:port>
//
// (ForkTest.AChildFindsTheLibrarysLocksFree.) Calls GET /name through an HTTP client, then a
// thread of the parent's holds the live clients' lock (inside ClientCore::ForEachLiveClient) for
// 300 ms, and the main thread forks meanwhile. The child releases the parent's client, makes a
// client of its own and calls through it, reads the stats registry and logs a line: 0 if all that
// returned within 10 s, else 3 (the lock, held at the fork by a thread the child does not have,
// stayed locked there). The parent waits for it as above.
//
//   scales_fork_helper manual <host:port>
//
// (ForkTest.AChildLeavesTheParentsLoopsAlone.) Calls GET /name through an HTTP client on a
// runtime of one loop that the helper polls itself (RuntimeOptions::start_threads = false, a
// manual clock), polls until nothing is left to run, and forks. The child opens the parent's
// client (fails at once: kClientClosed), releases it and polls the parent's loop: 0 if nothing had
// been queued on it (the release posted the client's close there, which would take the loop's
// locks and close the connection the two processes share), else 3. The parent waits for it as
// above and calls again: "parent call ok on its first connection".
//
//   scales_fork_helper admin
//
// (ForkTest.AChildLeavesTheParentsAdminServerServing.) Starts an admin server and reads
// /metrics from it, then forks. The child destroys its copy of the server: 0 if that returned
// within 2 s, else 3. The parent waits for it as above, then reads /metrics again and prints
// "parent admin ok".
//
//   scales_fork_helper register
//
// (ForkTest.RegisteringALockDuringAForkDoesNotDeadlock.) A thread holds a mutex registered with
// internal::HoldAcrossFork and, 200 ms later, registers another (as when a lock's owner is made
// under another lock: a first rate-limited log line under the live clients' lock) while the main
// thread forks, whose pthread_atfork handler waits for the first. The child exits 0 if it finds
// both free. The parent waits for it as above. (When registering waited for the fork's list
// lock, the two waited for each other and the helper printed nothing.)
//
// All exit 2 (with a message on stderr) when something fails in the parent.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/fork_locks.h"
#include "discovery/zk_connection.h"
#include "scales/admin/admin_server.h"
#include "scales/core/client.h"
#include "scales/core/clock.h"
#include "scales/core/error.h"
#include "scales/core/log.h"
#include "scales/core/runtime.h"
#include "scales/discovery/zookeeper.h"
#include "scales/http/client.h"
#include "scales/stats/stats.h"

namespace {

using namespace std::chrono_literals;

int Fail(const std::string& why) {
  std::fprintf(stderr, "scales_fork_helper: %s\n", why.c_str());
  return 2;
}

// In the child: a failed step, on stderr, and exit code 3.
[[noreturn]] void ChildFails(const std::string& why) {
  std::fprintf(stderr, "scales_fork_helper child: %s\n", why.c_str());
  std::fflush(stderr);
  std::exit(3);
}

// Waits up to 30 s for `child`; prints how it ended. False if it had to be killed.
bool WaitForChild(pid_t child) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  int status = 0;
  for (;;) {
    const pid_t reaped = ::waitpid(child, &status, WNOHANG);
    if (reaped == child) break;
    if (reaped < 0) {
      std::printf("waitpid failed\n");
      return false;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      std::printf("child hung\n");
      return false;
    }
    std::this_thread::sleep_for(10ms);  // polling the child
  }
  if (WIFEXITED(status)) {
    std::printf("child exited %d\n", WEXITSTATUS(status));
  } else {
    std::printf("child ended by signal %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  }
  std::fflush(stdout);
  return true;
}

// In the child: runs `step`, which must return within `limit`; otherwise (or if it never
// returns, when the parent reports "child hung") the child fails.
template <class Step>
void WithinInChild(std::chrono::milliseconds limit, const std::string& what, Step step) {
  const auto started = std::chrono::steady_clock::now();
  step();
  const auto took = std::chrono::steady_clock::now() - started;
  if (took > limit) {
    ChildFails(what + " took " +
               std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(took).count()) +
               " ms");
  }
}

// After the parent's call that followed the child: whether it went over the parent's client
// `name`'s first connection to `endpoint` (the child closed nothing of it).
void PrintParentsConnects(const std::string& name, const std::string& endpoint) {
  const scales::stats::Counter* connects = scales::stats::StatsRegistry::Default().FindCounter(
      "scales_connects", {{"client", name}, {"endpoint", endpoint}});
  const int64_t n = connects != nullptr ? connects->value() : -1;
  if (n == 1) {
    std::printf("parent call ok on its first connection\n");
  } else {
    std::printf("parent call ok after %lld connects\n", static_cast<long long>(n));
  }
}

void ExpectMadeBeforeFork(const scales::Error& e, const std::string& step) {
  if (e.code() != scales::Errc::kClientClosed ||
      std::string(e.what()).find("forked") == std::string::npos) {
    ChildFails(step + ": not the expected error: " + e.code().message() + ": " + e.what());
  }
}

void RunClientChild(scales::http::HttpClient& parents,
                    std::shared_ptr<scales::Runtime>& parents_runtime, const std::string& uri) {
  // 1. The parent's client, blocking: it used to wait for a loop that does not run here.
  auto blocking = std::async(std::launch::async, [&parents] {
    try {
      parents.Get("/name");
      return std::optional<scales::Error>();
    } catch (const scales::Error& e) {
      return std::optional<scales::Error>(e);
    }
  });
  if (blocking.wait_for(10s) != std::future_status::ready)
    ChildFails("the blocking call did not complete");
  const std::optional<scales::Error> error = blocking.get();
  if (!error) ChildFails("the blocking call through the parent's client succeeded");
  ExpectMadeBeforeFork(*error, "the blocking call");
  // ... and with a callback.
  auto called = std::make_shared<std::promise<scales::error_code>>();
  auto callback_done = called->get_future();
  parents.AsyncGet(
      "/name", [called](scales::error_code ec, scales::http::Response) { called->set_value(ec); });
  if (callback_done.wait_for(10s) != std::future_status::ready)
    ChildFails("the callback was not called");
  if (callback_done.get() != scales::Errc::kClientClosed)
    ChildFails("the callback's error is not kClientClosed");
  // An empty client's call (completed on the system executor's threads, the parent's, when
  // its first call there had started them).
  auto empty_called = std::make_shared<std::promise<scales::error_code>>();
  auto empty_done = empty_called->get_future();
  scales::http::HttpClient().AsyncGet(
      "/name", [empty_called](scales::error_code ec, scales::http::Response) {
        empty_called->set_value(ec);
      });
  if (empty_done.wait_for(10s) != std::future_status::ready)
    ChildFails("the empty client's callback was not called");
  if (empty_done.get() != scales::Errc::kClientClosed)
    ChildFails("the empty client's error is not kClientClosed");
  // ... and so does opening it (it waited for the open timeout).
  auto opening = std::async(std::launch::async, [&parents] {
    try {
      parents.core()->OpenAndWait();
      return std::optional<scales::Error>();
    } catch (const scales::Error& e) {
      return std::optional<scales::Error>(e);
    }
  });
  if (opening.wait_for(2s) != std::future_status::ready) ChildFails("the open did not complete");
  const std::optional<scales::Error> open_error = opening.get();
  if (!open_error) ChildFails("the parent's client opened");
  ExpectMadeBeforeFork(*open_error, "the open");

  // 2. No client on the parent's runtime.
  try {
    scales::Http::NewBuilder().SetUri(uri).SetRuntime(parents_runtime).Build();
    ChildFails("a client was built on the parent's runtime");
  } catch (const scales::Error& e) {
    if (e.code() != scales::Errc::kInvalidArgument ||
        std::string(e.what()).find("forked") == std::string::npos) {
      ChildFails(std::string("building on the parent's runtime: not the expected error: ") +
                 e.what());
    }
  }

  // 3. A client of the child's own.
  try {
    auto own = scales::Http::NewClient(uri);
    if (own.Get("/name").status != 200) ChildFails("the child's own client got no 200");
  } catch (const std::exception& e) {
    ChildFails(std::string("the child's own client failed: ") + e.what());
  }

  // 4. The parent's client and runtime go: they must not wait for the parent's loops (stopping
  // them waited 5 s for loops that never run here), nor close its connection (the parent
  // checks).
  WithinInChild(2s, "releasing the parent's client and runtime", [&] {
    parents = scales::http::HttpClient();
    parents_runtime.reset();
  });
  std::exit(0);
}

int RunClient(const std::string& endpoint) {
  const std::string uri = "tcp://" + endpoint;
  // One loop, so that every call of the parent's goes over one connection.
  scales::RuntimeOptions runtime_options;
  runtime_options.threads = 1;
  auto runtime = std::make_shared<scales::Runtime>(runtime_options);
  scales::http::HttpOptions options;
  options.client.runtime = runtime;
  options.client.name = "forked-parent";
  auto client =
      scales::Http::NewClient(uri, std::move(options));  // `runtime` and the client hold it
  if (client.Get("/name").status != 200) return Fail("the parent's first call got no 200");
  // The parent's default runtime exists too: the child must not use it.
  const std::shared_ptr<scales::Runtime> parents_default = scales::Runtime::Default();
  // An empty client's call (which started the system executor's threads).
  std::promise<void> empty_called;
  scales::http::HttpClient().AsyncGet(
      "/name",
      [&empty_called](scales::error_code, scales::http::Response) { empty_called.set_value(); });
  if (empty_called.get_future().wait_for(10s) != std::future_status::ready)
    return Fail("the parent's empty client's callback was not called");
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) RunClientChild(client, runtime, uri);
  if (!WaitForChild(child)) return 0;
  try {
    if (client.Get("/name").status != 200) {
      std::printf("parent call got no 200\n");
      return 0;
    }
  } catch (const std::exception& e) {
    std::printf("parent call failed: %s\n", e.what());
    return 0;
  }
  PrintParentsConnects("forked-parent", endpoint);
  return 0;
}

int RunZooKeeper(const std::string& uri, int port) {
  scales::ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", static_cast<uint16_t>(port)};
  const scales::ParsedUri parsed = scales::ScalesUriParser::Parse(uri);
  auto announcer = std::make_unique<scales::Announcer>(parsed, instance);
  if (!announcer->WaitAnnounced(30s)) return Fail("not announced: " + announcer->Describe());
  auto set = std::make_unique<scales::ZooKeeperServerSet>(parsed);
  const scales::ServerSet::Members expected{{"127.0.0.1", static_cast<uint16_t>(port)}};
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (set->members() != expected) {
    if (std::chrono::steady_clock::now() > give_up)
      return Fail("member not seen: " + set->Describe());
    std::this_thread::sleep_for(10ms);  // polling for the first read
  }
  const scales::ZooKeeperServerSet::Stats before = set->stats();
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) {
    set.reset();
    announcer.reset();
    std::exit(0);
  }
  if (!WaitForChild(child)) return 0;
  const auto until = std::chrono::steady_clock::now() + 3s;
  while (std::chrono::steady_clock::now() < until) {
    const scales::ZooKeeperServerSet::Stats now = set->stats();
    if (set->members() != expected) {
      std::printf("parent member gone: %s\n", set->Describe().c_str());
      return 0;
    }
    if (now.sessions != before.sessions || now.session_expirations != before.session_expirations ||
        now.connection_losses != before.connection_losses) {
      std::printf("parent session changed: %s\n", set->Describe().c_str());
      return 0;
    }
    std::this_thread::sleep_for(20ms);  // watching the parent's session
  }
  std::printf("parent session intact\n");
  return 0;
}

int RunCloser(const std::string& uri) {
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
    // The closer's thread is the parent's. A stop handed over here needs a thread of the
    // child's; exit() drains the closer and joins its threads.
    auto ran = std::make_shared<std::promise<void>>();
    auto done = ran->get_future();
    ZkConnection::StopInBackground([ran] { ran->set_value(); });
    std::exit(done.wait_for(10s) == std::future_status::ready ? 0 : 3);
  }
  WaitForChild(child);
  return 0;
}

int RunLocks(const std::string& endpoint) {
  const std::string uri = "tcp://" + endpoint;
  scales::RuntimeOptions runtime_options;
  runtime_options.threads = 1;
  scales::http::HttpOptions options;
  options.client.runtime = std::make_shared<scales::Runtime>(runtime_options);
  options.client.name = "locked-parent";
  auto client = scales::Http::NewClient(uri, std::move(options));
  if (client.Get("/name").status != 200) return Fail("the parent's first call got no 200");
  // A thread of the parent's holds the live clients' lock while the main thread forks.
  std::promise<void> holding;
  std::future<void> held = holding.get_future();
  std::thread holder([&holding] {
    bool first = true;
    scales::ClientCore::ForEachLiveClient([&](const scales::ClientCore&) {
      if (!std::exchange(first, false)) return;
      holding.set_value();
      std::this_thread::sleep_for(300ms);  // holding the lock across the main thread's fork()
    });
  });
  held.wait();
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) {
    WithinInChild(10s, "using the library after the fork", [&] {
      client = scales::http::HttpClient();  // leaves the live clients' registry
      try {
        auto own = scales::Http::NewClient(uri);  // joins it
        if (own.Get("/name").status != 200) ChildFails("the child's own client got no 200");
      } catch (const std::exception& e) {
        ChildFails(std::string("the child's own client failed: ") + e.what());
      }
      if (scales::stats::StatsRegistry::Default().ToPrometheus().empty())
        ChildFails("the registry is empty");
      bool logged = false;
      scales::SetLogSink([&logged](const scales::LogRecord&) { logged = true; });
      scales::SetLogLevel(scales::LogLevel::kInfo);
      SCALES_LOG(kInfo, "a log line from the forked child");
      scales::SetLogLevel(scales::LogLevel::kOff);
      scales::SetLogSink({});
      if (!logged) ChildFails("the log line did not reach the log sink");
    });
    std::exit(0);
  }
  holder.join();
  WaitForChild(child);
  return 0;
}

int RunManual(const std::string& endpoint) {
  const std::string uri = "tcp://" + endpoint;
  scales::RuntimeOptions runtime_options;
  runtime_options.threads = 1;
  runtime_options.start_threads = false;
  runtime_options.clock = std::make_shared<scales::ManualClock>();  // no timer comes due
  auto runtime = std::make_shared<scales::Runtime>(runtime_options);
  scales::http::HttpOptions options;
  options.client.runtime = runtime;
  options.client.name = "polled-parent";
  options.client.open_timeout = scales::Duration::zero();  // opened by the polls below
  auto client = scales::Http::NewClient(uri, std::move(options));
  // A call, driven by polling the loop until it completed and nothing is left to run.
  auto call = [&]() -> std::string {
    std::optional<std::string> outcome;
    client.AsyncGet("/name", [&](scales::error_code ec, scales::http::Response r) {
      outcome = ec ? ec.message() : (r.status == 200 ? "ok" : "status " + std::to_string(r.status));
    });
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (!outcome && std::chrono::steady_clock::now() < give_up) {
      if (runtime->RunUntilIdle() == 0) std::this_thread::sleep_for(1ms);  // awaiting the reply
    }
    runtime->RunUntilIdle();
    return outcome.value_or("no reply within 30 s");
  };
  if (const std::string first = call(); first != "ok")
    return Fail("the parent's first call: " + first);
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) {
    auto opened = std::make_shared<std::promise<scales::error_code>>();
    auto open_done = opened->get_future();
    client.core()->AsyncOpen([opened](scales::error_code ec) { opened->set_value(ec); });
    if (open_done.wait_for(10s) != std::future_status::ready)
      ChildFails("the open did not complete");
    if (open_done.get() != scales::Errc::kClientClosed)
      ChildFails("the open's error is not kClientClosed");
    client = scales::http::HttpClient();
    // Polled here only to see what the release queued on the parent's loop.
    const size_t queued = runtime->loop(0).Poll();
    if (queued != 0)
      ChildFails("releasing the parent's client queued " + std::to_string(queued) +
                 " handler(s) on its loop");
    std::exit(0);
  }
  if (!WaitForChild(child)) return 0;
  if (const std::string again = call(); again != "ok") {
    std::printf("parent call failed: %s\n", again.c_str());
    return 0;
  }
  PrintParentsConnects("polled-parent", endpoint);
  return 0;
}

int RunAdmin() {
  auto admin = std::make_unique<scales::admin::AdminServer>();
  const std::string uri = "tcp://127.0.0.1:" + std::to_string(admin->port());
  scales::http::HttpOptions options;
  options.client.name = "admin-reader";
  auto reader = scales::Http::NewClient(uri, std::move(options));
  if (reader.Get("/metrics").status != 200) return Fail("the first /metrics got no 200");
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) {
    WithinInChild(2s, "destroying the parent's admin server", [&] { admin.reset(); });
    std::exit(0);
  }
  if (!WaitForChild(child)) return 0;
  try {
    const auto r = reader.Get("/metrics");
    if (r.status != 200) {
      std::printf("parent admin answered %d\n", r.status);
      return 0;
    }
  } catch (const std::exception& e) {
    std::printf("parent admin failed: %s\n", e.what());
    return 0;
  }
  std::printf("parent admin ok\n");
  return 0;
}

int RunRegister() {
  using scales::internal::ForkLockRank;
  static std::mutex held;   // never destroyed: registered for good
  static std::mutex later;  // likewise
  scales::internal::HoldAcrossFork(held, ForkLockRank::kLiveClients);
  std::promise<void> holding;
  std::future<void> is_held = holding.get_future();
  std::thread holder([&holding] {
    std::lock_guard lock(held);
    holding.set_value();
    std::this_thread::sleep_for(200ms);  // the main thread's fork() is waiting for `held` by now
    scales::internal::HoldAcrossFork(later, ForkLockRank::kLog);
  });
  is_held.wait();
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) return Fail("fork failed");
  if (child == 0) std::_Exit(held.try_lock() && later.try_lock() ? 0 : 3);
  holder.join();
  WaitForChild(child);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc >= 2 ? argv[1] : "";
  try {
    if (mode == "client" && argc == 3) return RunClient(argv[2]);
    if (mode == "zk" && argc == 4) return RunZooKeeper(argv[2], std::atoi(argv[3]));
    if (mode == "closer" && argc == 3) return RunCloser(argv[2]);
    if (mode == "locks" && argc == 3) return RunLocks(argv[2]);
    if (mode == "manual" && argc == 3) return RunManual(argv[2]);
    if (mode == "admin" && argc == 2) return RunAdmin();
    if (mode == "register" && argc == 2) return RunRegister();
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
  return Fail(
      "usage: scales_fork_helper client <host:port> | zk <zk:// URI> <port> | closer <zk:// URI> | "
      "locks <host:port> | manual <host:port> | admin | register");
}
