#pragma once
// The runtime: event loops (each an io_context run by one thread) that own all hot-path
// state. A client builds one replica of its sink stack per loop ("shard"); a call made on a
// loop thread stays on that loop, calls from other threads are spread over the loops.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "scales/core/clock.h"
#include "scales/core/random.h"
#include "scales/core/timer_queue.h"

namespace scales {

namespace internal {
// Logs an exception that escaped a handler on an event loop (error level, rate limited) and
// drops it: scales' completion handlers (InvokeHandler, scales/core/dispatcher.h) and the
// loop's run (EventLoop::Run) go on serving the loop's other calls and connections.
void ReportHandlerException(std::exception_ptr e) noexcept;
// How many fork()s lie between the process that started and this one: 0 there, one more in each
// child made by fork(). Counted by a pthread_atfork handler that the library installs as it is
// loaded.
uint64_t ForkGeneration() noexcept;
// Keeps `object` for the rest of the process, never destroyed: what a child made by fork() holds
// of its parent's (loops, ZooKeeper sessions), whose destruction would act on descriptors the
// two processes share. Reachable, so a leak checker does not report it.
void KeepForever(std::shared_ptr<void> object) noexcept;
}  // namespace internal

// One event loop. Thread safety: executor() and IsCurrent() from any thread; timers(),
// random() only on the loop's own thread. Owned by shared_ptr (the runtime, the loop's thread).
class EventLoop : public std::enable_shared_from_this<EventLoop> {
 public:
  EventLoop(size_t index, std::shared_ptr<Clock> clock, uint64_t seed,
            boost::asio::io_context* external = nullptr,
            std::chrono::microseconds busy_poll = std::chrono::microseconds::zero());
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  boost::asio::io_context& io_context() noexcept { return *ioc_; }
  boost::asio::any_io_executor executor() noexcept { return ioc_->get_executor(); }
  TimerQueue& timers() noexcept { return *timers_; }
  Random& random() noexcept { return random_; }
  Clock& clock() const noexcept { return *clock_; }
  const std::shared_ptr<Clock>& shared_clock() const noexcept { return clock_; }
  TimePoint Now() const noexcept { return clock_->Now(); }
  size_t index() const noexcept { return index_; }

  // True on a thread currently running this loop (also when the loop wraps a user's
  // io_context that the user runs).
  bool IsCurrent() const noexcept {
    return Current() == this || ioc_->get_executor().running_in_this_thread();
  }
  // The loop whose handlers the calling thread is running, or nullptr. Set by the runtime's
  // own loop threads and by Poll(); not on a thread running a wrapped user's io_context (the
  // user's run()): see OnAnyLoopThread().
  static EventLoop* Current() noexcept;
  // True on a thread running any scales event loop: Current(), or a user's io_context that a
  // live loop wraps (Runtime(io_context&)), run by the user. Code that must not block a loop
  // (a ZooKeeper session's close) asks this. Cheap while no loop wraps a user's io_context.
  static bool OnAnyLoopThread() noexcept;

  // Runs ready handlers without blocking; returns how many ran. Sets Current() meanwhile. The
  // loop outlives the call even when a handler releases the runtime's last reference. The
  // calling thread becomes the loop's driver (Runtime::IsDriverThread).
  size_t Poll();

  // Calls of any client in flight on this loop (between a dispatcher's Dispatch and its
  // completion). Busy polling spins only while there are some: a reply is then on its way.
  // On the loop's own thread only.
  void CallStarted() noexcept { ++calls_in_flight_; }
  void CallEnded() noexcept { --calls_in_flight_; }
  size_t calls_in_flight() const noexcept { return calls_in_flight_; }

 private:
  friend class Runtime;
  void Run();  // blocks until Stop(); used by the runtime's thread
  void RunBusyPolling();  // Run() when busy_poll_ > 0

  size_t index_;
  std::shared_ptr<Clock> clock_;
  std::unique_ptr<boost::asio::io_context> owned_ioc_;
  boost::asio::io_context* ioc_;
  Random random_;
  std::unique_ptr<TimerQueue> timers_;
  std::chrono::microseconds busy_poll_;
  size_t calls_in_flight_ = 0;
  std::atomic<std::thread::id> driver_{};  // the thread that last called Poll()
};

struct RuntimeOptions {
  // Number of event loops. Default: one per core (std::thread::hardware_concurrency()).
  // At most kMaxThreads.
  size_t threads = 0;
  static constexpr size_t kMaxThreads = 1024;
  // When false, no threads are started: the owner drives the loops with Poll()/RunUntilIdle()
  // (unit tests with a ManualClock do this). The thread that last polled a loop counts as a
  // loop thread (Runtime::IsDriverThread): a blocking call made there fails at once with
  // kBlockingCallOnEventLoop, since its reply and its timeout would wait for that thread's
  // next poll, and Build()/OpenAndWait does not wait for the open there. A blocking call from
  // any other thread waits for the owner's polls: with nobody polling, it waits for good.
  bool start_threads = true;
  // Clock for every timer. Default: SteadyClock.
  std::shared_ptr<Clock> clock = nullptr;
  // Seed of the per-loop random generators (loop i uses seed + i).
  uint64_t seed = 0x5ca1e5;
  // Busy polling: a loop thread that has run out of ready handlers while calls are in flight on
  // it keeps polling its sockets and timers (a non-blocking epoll_wait) for up to this long,
  // counted from the last handler it ran, before it sleeps in a blocking epoll_wait; with no
  // call in flight it sleeps at once. 0 (default) = never: the loop sleeps as soon as it is
  // idle. A reply that arrives within the window is handled without the thread being woken,
  // which on a virtual machine can take tens of microseconds per wake-up; the price is CPU:
  // while calls are in flight, a loop spends up to this long spinning each time it runs out of
  // work. Worth it only when each loop has a core to itself (not shared with the servers it
  // calls). 0..1 s.
  std::chrono::microseconds busy_poll{0};
};

// Owns the event loops. Destroying the runtime lets the loops run out of work (a closed
// client's shutdown, the completions of its calls), for up to 5 s, then stops and joins their
// threads; in manual mode (start_threads = false) it polls them until they are idle instead.
// Clients hold their runtime, so it goes with the last of them when nothing else holds it.
// It may be destroyed from inside a handler on one of its own loops (a client that held
// the last reference, released in its own callback): the destructor then returns at once and
// a thread of its own does the same shutdown once the handler has returned. A runtime wrapping
// a user's io_context leaves its loop to that io_context: the loop is destroyed with it, since
// handlers queued there may use the loop whenever the user runs them.
// Thread safety: all public functions are safe from any thread.
class Runtime : public std::enable_shared_from_this<Runtime> {
 public:
  // Throws Error (kInvalidArgument) for a bad option, and std::system_error if a loop thread
  // cannot be started (the threads it did start are stopped and joined first).
  explicit Runtime(RuntimeOptions options = {});
  // Wraps a user's io_context as the single loop; the user runs it.
  explicit Runtime(boost::asio::io_context& external, std::shared_ptr<Clock> clock = nullptr,
                   uint64_t seed = 0x5ca1e5);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  size_t size() const noexcept { return loops_.size(); }
  EventLoop& loop(size_t i) noexcept { return *loops_[i]; }
  Clock& clock() const noexcept { return *clock_; }
  const std::shared_ptr<Clock>& shared_clock() const noexcept { return clock_; }

  // The loop for a new call: the caller's own loop if it runs one of ours, else round robin.
  EventLoop& PickLoop() noexcept;
  // True if the calling thread runs one of this runtime's loops.
  bool IsLoopThread() const noexcept;
  // Manual mode (start_threads = false): true on the thread that last polled one of the loops
  // (Poll(), RunUntilIdle()), between polls too: nothing runs the loops while it waits, so it
  // must not block waiting for them (RuntimeOptions::start_threads). False with loop threads.
  bool IsDriverThread() const noexcept;

  // Manual mode: polls every loop until none has ready handlers (or max_rounds passed).
  // Returns the number of handlers run. A handler may destroy the runtime meanwhile (its last
  // reference, a client's): its loops are polled to the end all the same.
  size_t RunUntilIdle(size_t max_rounds = 100000);

  // True in a child made by fork() (without exec) after this runtime was created. Its loops'
  // threads are not in this process, and its io_contexts and sockets are shared with the
  // parent's, so nothing of it may run here: the clients made on it fail their calls at once
  // there (kClientClosed), no client can be made on it (kInvalidArgument), and it is set aside
  // when destroyed rather than stopped (which would touch the parent's connections).
  bool made_before_fork() const noexcept { return fork_generation_ != internal::ForkGeneration(); }

  // The process-wide runtime used by NewClient when none is given (one loop per core,
  // created on first use; in a child made by fork(), a new one on first use there).
  static std::shared_ptr<Runtime> Default();

 private:
  void StartThreads();

  const uint64_t fork_generation_ = internal::ForkGeneration();

  std::shared_ptr<Clock> clock_;
  // Shared with each loop's thread (a loop outlives its run()), and handed over whole when the
  // runtime is destroyed from inside one of its own loops (~Runtime).
  std::vector<std::shared_ptr<EventLoop>> loops_;
  std::vector<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> guards_;
  std::vector<std::thread> threads_;
  std::atomic<size_t> next_{0};
};

}  // namespace scales
