// A process that forks (without exec) while it has clients, for the fork tests in
// tests/integration/fork_test.cc: what a child made by fork() can do needs a process of its own.
//
//   scales_fork_helper client <host:port>
//
// (ForkTest.AChildFailsTheParentsClientsAndMakesItsOwn.) Calls GET /name through an HTTP client
// on a runtime of one loop, makes the default runtime, then forks. The child:
//   1. calls through the parent's client, blocking and with a callback: both fail at once
//      (within 10 s) with kClientClosed saying the client was created before the fork;
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

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "discovery/zk_connection.h"
#include "scales/core/error.h"
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
  const auto released_at = std::chrono::steady_clock::now();
  parents = scales::http::HttpClient();
  parents_runtime.reset();
  const auto took = std::chrono::steady_clock::now() - released_at;
  if (took > 2s) {
    ChildFails("releasing the parent's client and runtime took " +
               std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(took).count()) +
               " ms");
  }
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
  // Still the first connection: the child closed nothing of it.
  const scales::stats::Counter* connects = scales::stats::StatsRegistry::Default().FindCounter(
      "scales_connects", {{"client", "forked-parent"}, {"endpoint", endpoint}});
  const int64_t n = connects != nullptr ? connects->value() : -1;
  if (n == 1) {
    std::printf("parent call ok on its first connection\n");
  } else {
    std::printf("parent call ok after %lld connects\n", static_cast<long long>(n));
  }
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

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc >= 2 ? argv[1] : "";
  try {
    if (mode == "client" && argc == 3) return RunClient(argv[2]);
    if (mode == "zk" && argc == 4) return RunZooKeeper(argv[2], std::atoi(argv[3]));
    if (mode == "closer" && argc == 3) return RunCloser(argv[2]);
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
  return Fail(
      "usage: scales_fork_helper client <host:port> | zk <zk:// URI> <port> | closer <zk:// URI>");
}
