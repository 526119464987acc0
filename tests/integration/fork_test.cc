// A process that forks (without exec) while it holds clients, ZooKeeper server sets and
// announcers: the child cannot run the parent's event loops or sessions (their threads are not
// in it, their descriptors are shared with the parent). Its calls through the parent's clients
// fail at once with a clear error instead of waiting for ever, it makes clients of its own, and
// what it releases of the parent's does not touch the parent's connections or sessions. Each
// test runs scales_fork_helper (tests/helpers/fork_helper.cc), which forks, and reads what it
// prints.
//
// Not in the ThreadSanitizer set (it cannot start threads in the child of a multi-threaded
// fork); skipped under AddressSanitizer, whose leak check in the child takes memory that only the
// parent's threads referred to for leaks.
#include <sys/wait.h>

#include <chrono>
#include <optional>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "support/fixtures.h"
#include "support/zookeeper_fixture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;

#if defined(__SANITIZE_ADDRESS__)
#define SKIP_UNDER_LEAK_CHECK() \
  GTEST_SKIP() << "LeakSanitizer reports the parent's threads' memory in a forked child"
#else
#define SKIP_UNDER_LEAK_CHECK() (void)0
#endif

void ExpectHelperExitedCleanly(test::ChildProcess& helper) {
  const std::optional<int> status = helper.WaitForExit(60s);
  ASSERT_TRUE(status.has_value()) << "the helper did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
}

// Through the parent's HTTP client the child's calls, blocking and with a callback, fail at once
// with kClientClosed (they waited for ever for a loop whose thread is the parent's); no client
// can be built on the parent's runtime; a client of the child's own (the default runtime is a
// new one there) works; releasing the parent's client and runtime in the child returns at once
// (it waited 5 s for the parent's loops) and leaves the parent's connection alone: the parent's
// next call goes over it.
TEST(ForkTest, AChildFailsTheParentsClientsAndMakesItsOwn) {
  SKIP_UNDER_LEAK_CHECK();
  test::TestHttpServer server("s0");
  test::ChildProcess helper({SCALES_FORK_HELPER, "client", server.endpoint()});
  EXPECT_EQ(helper.ReadLine(60s).value_or("(nothing)"), "child exited 0");
  EXPECT_EQ(helper.ReadLine(30s).value_or("(nothing)"), "parent call ok on its first connection");
  ExpectHelperExitedCleanly(helper);
}

// The child releases its copies of the parent's server set and announcer: the parent's session
// is not closed (the child closed it over the socket they share: the member went, and the
// parent's set saw its session end) and the parent's member stays.
TEST(ForkTest, AChildLeavesTheParentsZooKeeperSessionsAlone) {
  SKIP_UNDER_LEAK_CHECK();
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "ZooKeeper (java) not installed";
  test::ZooKeeperServer zk;
  test::ChildProcess helper({SCALES_FORK_HELPER, "zk", zk.Uri("/forked/svc"), "4321"});
  EXPECT_EQ(helper.ReadLine(60s).value_or("(nothing)"), "child exited 0");
  EXPECT_EQ(helper.ReadLine(30s).value_or("(nothing)"), "parent session intact");
  ExpectHelperExitedCleanly(helper);
}

// A child made by fork() after the ZooKeeper closer had started a thread: a stop handed to the
// closer in the child runs, on a thread of the child's, and the child exits. (The closer counted
// the parent's idle thread as the child's: the stop waited for ever, "child exited 3".)
TEST(ForkTest, AChildsShutdownsRunOnTheChildsCloser) {
  SKIP_UNDER_LEAK_CHECK();
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "ZooKeeper (java) not installed";
  test::ZooKeeperServer zk;
  test::RunKazoo(zk.connect_string(), "zk.ensure_path('/forking/svc')");
  test::ChildProcess helper({SCALES_FORK_HELPER, "closer", zk.Uri("/forking/svc")});
  EXPECT_EQ(helper.ReadLine(60s).value_or("(nothing)"), "child exited 0");
  ExpectHelperExitedCleanly(helper);
}

// A thread of the parent's holds the live clients' lock (ForEachLiveClient) when the main thread
// forks. The child releases the parent's client, builds and calls one of its own, reads the stats
// registry and logs: all within 10 s. (The lock stayed locked in the child, where the thread that
// held it does not exist, and the child's first step waited for ever: "child hung". fork() now
// waits for the library's locks, taken and released around it by a pthread_atfork handler.)
TEST(ForkTest, AChildFindsTheLibrarysLocksFree) {
  SKIP_UNDER_LEAK_CHECK();
  test::TestHttpServer server("s0");
  test::ChildProcess helper({SCALES_FORK_HELPER, "locks", server.endpoint()});
  EXPECT_EQ(helper.ReadLine(60s).value_or("(nothing)"), "child exited 0");
  ExpectHelperExitedCleanly(helper);
}

// A parent's client on a runtime the helper polls itself (so that what is queued on its loop
// can be seen): in the child, opening it fails at once with kClientClosed, and releasing it
// queues nothing on the parent's loop (it posted the client's close there: a post takes the
// io_context's lock, which a loop thread of the parent's may have held at the fork, and the close
// would shut the connection the two processes share). The parent's next call goes over its
// first connection.
TEST(ForkTest, AChildLeavesTheParentsLoopsAlone) {
  SKIP_UNDER_LEAK_CHECK();
  test::TestHttpServer server("s0");
  test::ChildProcess helper({SCALES_FORK_HELPER, "manual", server.endpoint()});
  EXPECT_EQ(helper.ReadLine(60s).value_or("(nothing)"), "child exited 0");
  EXPECT_EQ(helper.ReadLine(30s).value_or("(nothing)"), "parent call ok on its first connection");
  ExpectHelperExitedCleanly(helper);
}

// The child destroys its copy of the parent's admin server at once, and the parent's server
// goes on serving. (So it did before the server was set aside in the child: what that guards
// against, a post from the child to the server's io_context, whose lock the server's thread may
// hold at the instant of the fork, cannot be brought about from outside. This checks that the
// child's release neither waits nor touches the parent's server.)
TEST(ForkTest, AChildLeavesTheParentsAdminServerServing) {
  SKIP_UNDER_LEAK_CHECK();
  test::ChildProcess helper({SCALES_FORK_HELPER, "admin"});
  EXPECT_EQ(helper.ReadLine(60s).value_or("(nothing)"), "child exited 0");
  EXPECT_EQ(helper.ReadLine(30s).value_or("(nothing)"), "parent admin ok");
  ExpectHelperExitedCleanly(helper);
}

// A lock registered to be held across fork() while another registered one is held, by the
// thread that holds it, as a fork waits for that one: neither waits for the other (registering
// took the fork handler's list lock, which the fork held while it waited: the helper hung).
TEST(ForkTest, RegisteringALockDuringAForkDoesNotDeadlock) {
  SKIP_UNDER_LEAK_CHECK();
  test::ChildProcess helper({SCALES_FORK_HELPER, "register"});
  EXPECT_EQ(helper.ReadLine(30s).value_or("(nothing)"), "child exited 0");
  ExpectHelperExitedCleanly(helper);
}

}  // namespace
}  // namespace scales
