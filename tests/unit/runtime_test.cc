// The runtime's loop threads with busy polling (RuntimeOptions::busy_poll): the option's range,
// and loops that spin before they sleep still run every handler once, fire timers, survive a
// throwing handler and stop when the runtime goes. Real threads (the spin is real time), so
// every wait is on a future with a generous bound, never a sleep.
#include <dirent.h>
#include <sys/resource.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include "scales/core/clock.h"
#include "scales/core/error.h"
#include "scales/core/log.h"
#include "scales/core/runtime.h"
#include "support/log_capture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;

TEST(RuntimeTest, BusyPollOutsideItsRangeIsRejected) {
  for (auto bad : {std::chrono::microseconds(-1), std::chrono::microseconds(1'000'001)}) {
    RuntimeOptions options;
    options.threads = 1;
    options.busy_poll = bad;
    try {
      Runtime runtime(options);
      FAIL() << "busy_poll " << bad.count() << "us was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("runtime.busy_poll must be in 0..1000000us"),
                std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("got " + std::to_string(bad.count()) + "us"),
                std::string::npos)
          << e.what();
    }
  }
  RuntimeOptions edge;
  edge.threads = 1;
  edge.busy_poll = 1s;
  EXPECT_NO_THROW(Runtime{edge});
}

// A thread count past any machine (a negative number through size_t) failed with bad_alloc or
// std::system_error after starting threads; it is an invalid option, named.
TEST(RuntimeTest, ThreadsOverTheLimitAreRejected) {
  for (size_t bad : {RuntimeOptions::kMaxThreads + 1, static_cast<size_t>(-1)}) {
    RuntimeOptions options;
    options.threads = bad;
    options.start_threads = false;
    try {
      Runtime runtime(options);
      FAIL() << bad << " threads were accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
      EXPECT_EQ(std::string(e.what()),
                "runtime.threads must be in 0..1024 (0 = one per core), got " + std::to_string(bad));
    }
  }
  RuntimeOptions edge;
  edge.threads = RuntimeOptions::kMaxThreads;
  edge.start_threads = false;
  Runtime runtime(edge);
  EXPECT_EQ(runtime.size(), RuntimeOptions::kMaxThreads);
}

// Four threads post 20,000 handlers over two spinning loops: each runs exactly once, on its
// loop's thread (EventLoop::Current()).
TEST(ConcurrencyRuntimeTest, BusyPollingLoopsRunEveryPostedHandlerOnce) {
  RuntimeOptions options;
  options.threads = 2;
  options.busy_poll = 100us;
  auto runtime = std::make_unique<Runtime>(options);
  // As if a call were in flight on each loop, so that the loops spin between handlers.
  for (size_t l = 0; l < 2; ++l) {
    EventLoop& loop = runtime->loop(l);
    boost::asio::post(loop.executor(), [&loop] { loop.CallStarted(); });
  }
  constexpr int kThreads = 4;
  constexpr int kEach = 5000;
  std::vector<std::atomic<int>> runs(kThreads * kEach);
  std::atomic<int> wrong_loop{0};
  std::atomic<int> done{0};
  std::promise<void> all_ran;
  std::vector<std::thread> posters;
  for (int t = 0; t < kThreads; ++t) {
    posters.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        EventLoop& loop = runtime->loop(static_cast<size_t>(i % 2));
        boost::asio::post(loop.executor(), [&, &loop = loop, id = t * kEach + i] {
          if (EventLoop::Current() != &loop) ++wrong_loop;
          ++runs[static_cast<size_t>(id)];
          if (++done == kThreads * kEach) all_ran.set_value();
        });
      }
    });
  }
  for (auto& p : posters) p.join();
  ASSERT_EQ(all_ran.get_future().wait_for(30s), std::future_status::ready) << done.load();
  for (size_t l = 0; l < 2; ++l) {
    EventLoop& loop = runtime->loop(l);
    boost::asio::post(loop.executor(), [&loop] { loop.CallEnded(); });  // runs as the runtime goes
  }
  runtime.reset();  // returns once the loops stop: spinning does not keep them going
  int not_once = 0;
  for (auto& r : runs) not_once += r.load() != 1;
  EXPECT_EQ(not_once, 0);
  EXPECT_EQ(wrong_loop.load(), 0);
}

// A uid for the death test's child: one no other process uses (so that RLIMIT_NPROC counts only
// the child's threads), inside the range this user namespace maps; 0 if there is none.
uid_t UnusedUid() {
  std::ifstream map("/proc/self/uid_map");
  uint64_t inside = 0, outside = 0, count = 0;
  const uint64_t wanted = 0x7fff0000u + static_cast<unsigned>(getpid()) % 0xffffu;
  uint64_t fallback = 0;
  while (map >> inside >> outside >> count) {
    if (wanted >= inside && wanted < inside + count) return static_cast<uid_t>(wanted);
    // A small map (rootless containers: 65536 uids): the top of it, away from system users.
    if (count > 2000 && inside + count - 1 > 1000) fallback = inside + count - 1 - static_cast<unsigned>(getpid()) % 1000;
  }
  return static_cast<uid_t>(fallback);
}

// Takes `uid` with a thread limit of `threads` more than this process runs; false if it cannot.
bool TakeUidWithRoomFor(uid_t uid, size_t threads) {
  size_t tasks = 0;
  if (DIR* dir = opendir("/proc/self/task")) {
    while (dirent* entry = readdir(dir)) tasks += entry->d_name[0] != '.';
    closedir(dir);
  }
  rlimit limit{};
  if (tasks == 0 || getrlimit(RLIMIT_NPROC, &limit) != 0 || limit.rlim_max < tasks + threads) return false;
  limit.rlim_cur = tasks + threads;
  return setrlimit(RLIMIT_NPROC, &limit) == 0 && setuid(uid) == 0;
}

// A loop thread that cannot be started (the process is at its thread limit) makes the
// constructor throw std::system_error after stopping and joining the threads it did start;
// it must not destroy a joinable std::thread while unwinding (std::terminate). The child
// process of the death test takes a uid of its own and a limit of one more thread than it
// runs, so the runtime's first loop thread starts and its second does not.
void StartRuntimeWithRoomForOneThread(uid_t uid) {
  // A sanitizer's runtime may start a thread of its own with the first thread the process
  // makes (TSan does): make that happen before the threads are counted.
  std::thread([] {}).join();
  if (!TakeUidWithRoomFor(uid, 1)) _exit(6);
  try {
    RuntimeOptions options;
    options.threads = 3;
    Runtime runtime(options);
    _exit(2);  // every thread started: the limit did not hold
  } catch (const std::system_error&) {
    _exit(0);
  } catch (...) {
    _exit(4);
  }
}

// EventLoop::OnAnyLoopThread: true in the handlers of a runtime's loop threads, of a manual
// runtime's Poll(), and of a user's io_context that a runtime wraps, run by the user's own
// thread (where Current() is not set); false elsewhere: the test's thread, an io_context no
// runtime wraps, and one whose runtime and loop are gone.
TEST(ConcurrencyRuntimeTest, OnAnyLoopThreadCoversAWrappedIoContext) {
  // Runs `f` on `ioc` with a thread of its own (the user's run()); returns what it returned.
  auto on_user_thread = [](boost::asio::io_context& ioc, auto f) {
    std::promise<bool> result;
    boost::asio::post(ioc, [&] { result.set_value(f()); });
    std::thread user([&ioc] { ioc.run(); });
    user.join();  // run() returns once the handler ran: nothing else keeps it going
    ioc.restart();
    return result.get_future().get();
  };
  EXPECT_FALSE(EventLoop::OnAnyLoopThread());

  RuntimeOptions options;
  options.threads = 1;
  Runtime threaded(options);
  std::promise<bool> on_loop;
  boost::asio::post(threaded.loop(0).executor(), [&] { on_loop.set_value(EventLoop::OnAnyLoopThread()); });
  auto on_loop_result = on_loop.get_future();
  ASSERT_EQ(on_loop_result.wait_for(30s), std::future_status::ready);
  EXPECT_TRUE(on_loop_result.get());

  options.start_threads = false;
  Runtime manual(options);
  bool polled = false;
  boost::asio::post(manual.loop(0).executor(), [&] { polled = EventLoop::OnAnyLoopThread(); });
  manual.RunUntilIdle();
  EXPECT_TRUE(polled);

  boost::asio::io_context unwrapped;
  EXPECT_FALSE(on_user_thread(unwrapped, [] { return EventLoop::OnAnyLoopThread(); }));
  {
    boost::asio::io_context ioc;
    auto wrapping = std::make_shared<Runtime>(ioc);
    EXPECT_EQ(EventLoop::Current(), nullptr);
    EXPECT_TRUE(on_user_thread(ioc, [] {
      return EventLoop::Current() == nullptr && EventLoop::OnAnyLoopThread();
    }));
    EXPECT_FALSE(EventLoop::OnAnyLoopThread());
    EXPECT_FALSE(on_user_thread(unwrapped, [] { return EventLoop::OnAnyLoopThread(); }));
    wrapping.reset();  // the loop stays with the io_context, and so does its registration
    EXPECT_TRUE(on_user_thread(ioc, [] { return EventLoop::OnAnyLoopThread(); }));
  }
  // The io_context, and the loop with it, are gone: a new io_context (perhaps at the same
  // address) is nobody's loop.
  boost::asio::io_context later;
  EXPECT_FALSE(on_user_thread(later, [] { return EventLoop::OnAnyLoopThread(); }));
}

TEST(RuntimeTest, ThreadThatCannotStartFailsTheConstructorCleanly) {
  const uid_t uid = UnusedUid();
  // Whether a child can take the uid and the limit at all (root with CAP_SETUID and a mapped
  // uid); the test needs it, and skips without.
  pid_t probe = fork();
  if (probe == 0) _exit(TakeUidWithRoomFor(uid, 1) ? 0 : 1);
  int status = 0;
  if (uid == 0 || probe < 0 || waitpid(probe, &status, 0) != probe || !WIFEXITED(status) ||
      WEXITSTATUS(status) != 0) {
    GTEST_SKIP() << "cannot take a fresh uid with its own thread limit (needs root and CAP_SETUID)";
  }
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(StartRuntimeWithRoomForOneThread(uid), testing::ExitedWithCode(0), "");
}

// A timer fires whether the loop is spinning or asleep (a window of 1 us ends long before a
// 20 ms timer; a 50 ms one outlasts it, with a call marked in flight), and a handler that throws
// is reported while the loop goes on spinning.
TEST(ConcurrencyRuntimeTest, BusyPollingLoopFiresTimersAndSurvivesAThrowingHandler) {
  test::LogCapture log(LogLevel::kError);
  // The report is rate limited per call site, and the limiter is shared by every test of the
  // process (CompleteOnTest reports from the same site): a log clock moved on by 2 s before each
  // throw gives each report a window of its own.
  auto log_clock = std::make_shared<ManualClock>();
  auto previous_log_clock = SetLogClock(log_clock);
  for (auto window : {std::chrono::microseconds(1), std::chrono::microseconds(50'000)}) {
    RuntimeOptions options;
    options.threads = 1;
    options.busy_poll = window;
    Runtime runtime(options);
    auto executor = runtime.loop(0).executor();
    boost::asio::steady_timer timer(executor);
    std::promise<std::chrono::steady_clock::duration> fired;
    const auto armed = std::chrono::steady_clock::now();
    boost::asio::post(executor, [&] {
      runtime.loop(0).CallStarted();
      timer.expires_after(20ms);
      timer.async_wait([&](const boost::system::error_code&) {
        fired.set_value(std::chrono::steady_clock::now() - armed);
      });
    });
    auto waited = fired.get_future();
    ASSERT_EQ(waited.wait_for(10s), std::future_status::ready)
        << "window " << window.count() << "us";
    EXPECT_GE(waited.get(), 20ms);

    std::promise<void> after;
    log_clock->Advance(std::chrono::seconds(2));
    boost::asio::post(executor, [window] {
      throw std::logic_error("posted work failed, window " + std::to_string(window.count()));
    });
    boost::asio::post(executor, [&] { after.set_value(); });
    EXPECT_EQ(after.get_future().wait_for(10s), std::future_status::ready) << "the loop went on";
    EXPECT_TRUE(log.Has({"posted work failed, window " + std::to_string(window.count())}))
        << log.All();
    boost::asio::post(executor, [&] { runtime.loop(0).CallEnded(); });
  }
  SetLogClock(previous_log_clock);
}

// The last reference to a runtime may go inside a handler on one of its own loops (a client
// that owns its runtime, released from its own callback). The destructor cannot wait for that
// loop, nor destroy it while its thread is inside it: it returns at once, and a thread of its
// own lets the loops run out of work, joins them and destroys them. (ASan reported the loop's
// io_context used after it was freed; the destructor also waited 5 s for its own loop.) What
// was queued on the loops still runs: ThriftMuxTest.ClientOwningItsRuntimeReleasedInItsOwnCallback.
TEST(ConcurrencyRuntimeTest, DestroyedFromOneOfItsOwnLoops) {
  RuntimeOptions options;
  options.threads = 2;
  auto runtime = std::make_shared<Runtime>(options);
  std::promise<std::chrono::steady_clock::duration> destroyed;
  std::promise<void> queued_ran[2];
  auto executor = runtime->loop(1).executor();
  boost::asio::post(executor, [&destroyed, &queued_ran, rt = std::move(runtime)]() mutable {
    // Work queued on both loops before the runtime goes (what a destroyed client posts).
    for (size_t i = 0; i < 2; ++i) {
      boost::asio::post(rt->loop(i).executor(), [&queued_ran, i] { queued_ran[i].set_value(); });
    }
    const auto start = std::chrono::steady_clock::now();
    rt.reset();  // the last reference
    destroyed.set_value(std::chrono::steady_clock::now() - start);
    // The handler returns into the loop's run(): the loop must still exist.
  });
  auto took = destroyed.get_future();
  ASSERT_EQ(took.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_LT(took.get(), std::chrono::seconds(4)) << "the destructor waited for its own loop";
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(queued_ran[i].get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready)
        << "work queued on loop " << i << " was dropped";
  }
  // The detached loop thread ends on its own, destroying its loop.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

// With no call in flight on it (nothing a reply could be on its way for), a busy-polling loop
// sleeps instead of spinning: its thread uses next to no CPU while a 50 ms timer runs, though its
// window is a whole second. (A loop that spun would use about 50 ms.)
TEST(ConcurrencyRuntimeTest, BusyPollingLoopWithNoCallInFlightSleeps) {
  RuntimeOptions options;
  options.threads = 1;
  options.busy_poll = 1s;
  Runtime runtime(options);
  auto executor = runtime.loop(0).executor();
  boost::asio::steady_timer timer(executor);
  auto thread_cpu = [] {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return std::chrono::seconds(t.tv_sec) + std::chrono::nanoseconds(t.tv_nsec);
  };
  std::promise<std::chrono::nanoseconds> used;
  boost::asio::post(executor, [&] {
    EXPECT_EQ(runtime.loop(0).calls_in_flight(), 0u);
    const auto before = thread_cpu();
    timer.expires_after(50ms);
    timer.async_wait(
        [&, before](const boost::system::error_code&) { used.set_value(thread_cpu() - before); });
  });
  auto f = used.get_future();
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  auto used_ns = f.get();
  EXPECT_LT(used_ns, 25ms) << "the loop spun with no call in flight: " << used_ns.count()
                           << " ns of CPU";
}

}  // namespace
}  // namespace scales
