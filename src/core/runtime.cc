#include "scales/core/runtime.h"

#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <vector>

#include <pthread.h>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>

#include "core/fork_locks.h"
#include "scales/core/error.h"
#include "scales/core/log.h"

namespace scales {
namespace {
thread_local EventLoop* current_loop = nullptr;

// Sets the thread's current loop for a scope (restoring the previous one: polls may nest
// when a test drives one loop from inside another's handler).
class CurrentLoopScope {
 public:
  explicit CurrentLoopScope(EventLoop* loop) : previous_(current_loop) { current_loop = loop; }
  ~CurrentLoopScope() { current_loop = previous_; }

 private:
  EventLoop* previous_;
};

// The loops that wrap a user's io_context (OnAnyLoopThread): their threads are the user's, and
// nothing sets Current() there. A loop is registered for its whole life; ~EventLoop removes it
// under the mutex before the io_context can go (the io_context outlives its loop: LoopKeeper),
// so a registered loop's io_context may be asked from any thread meanwhile.
struct WrappingLoops {
  std::mutex mu;
  std::vector<const EventLoop*> loops;  // guarded by mu
  std::atomic<size_t> count{0};  // loops.size(): OnAnyLoopThread skips the lock at 0
};

WrappingLoops& TheWrappingLoops() {
  static WrappingLoops* const loops = [] {
    auto* l = new WrappingLoops();  // never destroyed: loops may outlive main
    internal::HoldAcrossFork(l->mu, internal::ForkLockRank::kWrappingLoops);
    return l;
  }();
  return *loops;
}
}  // namespace

EventLoop::EventLoop(size_t index, std::shared_ptr<Clock> clock, uint64_t seed,
                     boost::asio::io_context* external, std::chrono::microseconds busy_poll)
    : index_(index),
      clock_(std::move(clock)),
      owned_ioc_(external ? nullptr : std::make_unique<boost::asio::io_context>(1)),
      ioc_(external ? external : owned_ioc_.get()),
      random_(seed),
      timers_(std::make_unique<TimerQueue>(*clock_, ioc_->get_executor())),
      busy_poll_(busy_poll) {
  if (!owned_ioc_) {
    WrappingLoops& wrapping = TheWrappingLoops();
    std::lock_guard lock(wrapping.mu);
    wrapping.loops.push_back(this);
    wrapping.count.store(wrapping.loops.size(), std::memory_order_release);
  }
}

EventLoop::~EventLoop() {
  if (!owned_ioc_) {
    WrappingLoops& wrapping = TheWrappingLoops();
    std::lock_guard lock(wrapping.mu);
    std::erase(wrapping.loops, this);
    wrapping.count.store(wrapping.loops.size(), std::memory_order_release);
  }
  // Timers go first: their alarm's Asio timer must not outlive the io_context.
  timers_.reset();
}

namespace internal {

void ReportHandlerException(std::exception_ptr e) noexcept {
  std::string what = "an exception not derived from std::exception";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    what = ex.what();
  } catch (...) {
  }
  SCALES_LOG_RATE_LIMITED(kError, 5,
                          "a handler on an event loop threw ({}); the exception was dropped: handlers must "
                          "not throw",
                          what);
}

}  // namespace internal

EventLoop* EventLoop::Current() noexcept { return current_loop; }

bool EventLoop::OnAnyLoopThread() noexcept {
  if (current_loop != nullptr) return true;
  WrappingLoops& wrapping = TheWrappingLoops();
  if (wrapping.count.load(std::memory_order_acquire) == 0) return false;
  // Perhaps a thread inside the user's run() of a wrapped io_context.
  std::lock_guard lock(wrapping.mu);
  for (const EventLoop* loop : wrapping.loops) {
    if (loop->ioc_->get_executor().running_in_this_thread()) return true;
  }
  return false;
}

size_t EventLoop::Poll() {
  // A handler may release the runtime's last reference (a client that held it, released in its
  // own callback): the loop then goes with this Poll(), not under it, and the handlers queued
  // behind that one (the client's shutdown, the completions it posts) still run in it.
  const std::shared_ptr<EventLoop> keep = shared_from_this();
  driver_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  CurrentLoopScope scope(this);
  if (ioc_->stopped()) ioc_->restart();
  return ioc_->poll();
}

void EventLoop::Run() {
  CurrentLoopScope scope(this);
  for (;;) {
    try {
      if (busy_poll_ > std::chrono::microseconds::zero()) {
        RunBusyPolling();
      } else {
        ioc_->run();
      }
      return;
    } catch (...) {
      // A handler someone posted to the loop threw (the completions of scales calls never let an
      // exception out: internal::InvokeHandler). Asio leaves the io_context usable: report the
      // exception and keep serving every other connection and call of the loop.
      internal::ReportHandlerException(std::current_exception());
    }
  }
}

void EventLoop::RunBusyPolling() {
  // The spin window is real time (the runtime's Clock may be a test's manual one, but a loop
  // thread spins on the machine's time). poll() runs every ready handler and, when none is
  // queued, asks the reactor once without blocking (epoll_wait with a zero timeout).
  using SpinClock = std::chrono::steady_clock;
  auto last_work = SpinClock::now();
  for (;;) {
    if (ioc_->poll() > 0) {
      last_work = SpinClock::now();
      continue;
    }
    if (ioc_->stopped()) return;  // stop() or out of work (the runtime's guard is gone)
    // Spin only while a reply is expected: an idle client's loop sleeps at once.
    if (calls_in_flight_ > 0 && SpinClock::now() - last_work < busy_poll_) continue;
    // No call in flight, or idle for the whole window: sleep until the next handler, run it,
    // and spin again.
    if (ioc_->run_one() == 0) return;
    last_work = SpinClock::now();
  }
}

Runtime::Runtime(RuntimeOptions options)
    : clock_(options.clock ? std::move(options.clock) : SteadyClock::Instance()) {
  if (options.busy_poll < std::chrono::microseconds::zero() ||
      options.busy_poll > std::chrono::seconds(1)) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("runtime.busy_poll must be in 0..1000000us (0 = no busy polling), "
                            "got {}us",
                            options.busy_poll.count()));
  }
  if (options.threads > RuntimeOptions::kMaxThreads) {
    // Each loop is a thread, an io_context and, per client, a stack per endpoint: a count this
    // large is a mistake (a negative number through size_t), not a machine.
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("runtime.threads must be in 0..{} (0 = one per core), got {}", RuntimeOptions::kMaxThreads,
                            options.threads));
  }
  size_t n = options.threads;
  if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
  for (size_t i = 0; i < n; ++i) {
    loops_.push_back(
        std::make_shared<EventLoop>(i, clock_, options.seed + i, nullptr, options.busy_poll));
  }
  if (options.start_threads) StartThreads();
}

Runtime::Runtime(boost::asio::io_context& external, std::shared_ptr<Clock> clock, uint64_t seed)
    : clock_(clock ? std::move(clock) : SteadyClock::Instance()) {
  loops_.push_back(std::make_shared<EventLoop>(0, clock_, seed, &external));
}

void Runtime::StartThreads() {
  guards_.reserve(loops_.size());
  threads_.reserve(loops_.size());
  for (auto& loop : loops_) {
    guards_.emplace_back(loop->io_context().get_executor());
  }
  try {
    for (auto& loop : loops_) {
      threads_.emplace_back([l = loop] { l->Run(); });
    }
  } catch (...) {
    // A thread could not be started (the process's thread limit, or memory): the constructor
    // fails, so stop and join the threads already running (a joinable std::thread destroyed
    // while unwinding would terminate the process). No client uses the loops yet.
    guards_.clear();
    for (auto& loop : loops_) loop->io_context().stop();
    for (auto& t : threads_) t.join();
    threads_.clear();
    throw;
  }
}

namespace {

// Keeps the loops of runtimes that wrapped a user's io_context until that io_context is
// destroyed. Handlers still queued on it when the runtime goes (a closed client's shutdown, the
// completions and releases that shutdown posts) refer to the loop, and the user may run them
// at any later time. Released in the destructor, which Asio calls once every handler of the
// io_context has been destroyed (shutdown), while older services (the timer service of the
// loop's alarm) still exist.
class LoopKeeper final : public boost::asio::execution_context::service {
 public:
  using key_type = LoopKeeper;
  static inline boost::asio::execution_context::id id;

  explicit LoopKeeper(boost::asio::execution_context& context) : service(context) {
    // The kept loops' alarms use the timer service: register it first, so that it is destroyed
    // after this service (newest first), even when the first runtime kept here had no Asio
    // timer (a ManualClock).
    boost::asio::steady_timer register_timer_service(static_cast<boost::asio::io_context&>(context));
  }
  ~LoopKeeper() override = default;

  void Keep(std::shared_ptr<EventLoop> loop) {
    std::lock_guard lock(mu_);
    loops_.push_back(std::move(loop));
  }

 private:
  void shutdown() override {}

  std::mutex mu_;
  std::vector<std::shared_ptr<EventLoop>> loops_;
};

// Lets each loop run out of work (the shutdown its clients posted), for up to 5 s in all, so
// that a stuck peer cannot hang the process at exit; then stops the loops and joins their
// threads. Not on one of those threads.
void StopLoops(std::vector<std::shared_ptr<EventLoop>>& loops, std::vector<std::thread>& threads) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (auto& loop : loops) {
    auto& ioc = loop->io_context();
    while (!ioc.stopped() && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ioc.stop();
  }
  for (auto& t : threads) t.join();
  loops.clear();
}

}  // namespace

Runtime::~Runtime() {
  if (made_before_fork()) {
    // A child made by fork(): the loops' threads are the parent's, so stopping the loops would
    // wait its 5 s for loops that never run here, and destroying them would run here the
    // destructors of the parent's objects (shards, connections, timers) on descriptors the two
    // processes share. Set aside, never destroyed.
    struct Parents {
      std::vector<std::shared_ptr<EventLoop>> loops;
      std::vector<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> guards;
      std::vector<std::thread> threads;
    };
    std::shared_ptr<Parents> kept;
    try {
      kept = std::make_shared<Parents>();
    } catch (...) {
      std::terminate();  // no memory for it, and destroying them is not an option
    }
    kept->loops = std::move(loops_);
    kept->guards = std::move(guards_);
    kept->threads = std::move(threads_);
    internal::KeepForever(std::move(kept));
    return;
  }
  guards_.clear();
  if (threads_.empty() && !IsLoopThread()) {
    // Manual mode: nobody polls the loops after this, and what the last clients posted when
    // they went (their Close(), calls still on their way to a loop, the completions that
    // follow) would be destroyed unrun: calls never completed, their objects leaked. Run it,
    // as a threaded runtime lets its loops run out of work. Not from inside a Poll() of ours.
    for (size_t round = 0, ran = 1; ran > 0 && round < 100000; ++round) {
      ran = 0;
      for (auto& loop : loops_) {
        if (!loop->owned_ioc_) continue;  // a wrapped io_context: its user runs it
        try {
          ran += loop->Poll();
        } catch (...) {
          ran = 1;  // a handler threw: the others are still queued
          internal::ReportHandlerException(std::current_exception());
        }
      }
    }
  }
  if (threads_.empty()) {
    // A wrapped io_context: the loop lives as long as the io_context, which may still hold
    // handlers that use it. Manual mode (the owner polls) owns its io_context, which goes with
    // the loop: it must not be destroyed from inside its own Poll().
    for (auto& loop : loops_) {
      if (loop->owned_ioc_) continue;
      try {
        boost::asio::use_service<LoopKeeper>(loop->io_context()).Keep(loop);
      } catch (...) {
        // Out of memory: the loop goes now, as it did before loops were kept.
      }
    }
    loops_.clear();
    return;
  }
  bool on_own_loop = false;
  for (auto& t : threads_) on_own_loop = on_own_loop || t.get_id() == std::this_thread::get_id();
  if (on_own_loop) {
    // Destroyed inside a handler of one of our loops (a client that held the last reference,
    // released in its own callback). This thread cannot wait for its own loop, and the
    // shutdown the client has just posted to every loop must still run, so a thread of the
    // runtime's own does what the destructor would: the loops go on until they run out of
    // work (5 s at most), then stop, and it joins them and destroys them.
    struct Loops {
      std::vector<std::shared_ptr<EventLoop>> loops;
      std::vector<std::thread> threads;
    };
    std::shared_ptr<Loops> rest;
    try {
      rest = std::make_shared<Loops>();
      rest->loops = std::move(loops_);  // no-throw moves, once the allocation succeeded
      rest->threads = std::move(threads_);
      std::thread([rest] { StopLoops(rest->loops, rest->threads); }).detach();
      return;
    } catch (...) {
      // No thread (or no memory) to be had: stop the loops where they are. Handlers still
      // queued on them are destroyed without running, and each loop thread destroys its loop
      // when run() returns.
    }
    auto& loops = rest ? rest->loops : loops_;
    auto& threads = rest ? rest->threads : threads_;
    for (auto& loop : loops) loop->io_context().stop();
    for (auto& t : threads) t.detach();
    loops.clear();
    return;
  }
  StopLoops(loops_, threads_);
}

EventLoop& Runtime::PickLoop() noexcept {
  for (auto& l : loops_) {
    if (l->IsCurrent()) return *l;
  }
  size_t i = next_.fetch_add(1, std::memory_order_relaxed);
  return *loops_[i % loops_.size()];
}

bool Runtime::IsLoopThread() const noexcept {
  for (auto& l : loops_) {
    if (l->IsCurrent()) return true;
  }
  return false;
}

bool Runtime::IsDriverThread() const noexcept {
  if (!threads_.empty()) return false;  // the loops have threads of their own
  const std::thread::id self = std::this_thread::get_id();
  for (auto& l : loops_) {
    if (l->driver_.load(std::memory_order_relaxed) == self) return true;
  }
  return false;
}

size_t Runtime::RunUntilIdle(size_t max_rounds) {
  // A copy: a handler may destroy the runtime (its last reference), taking loops_ with it.
  const std::vector<std::shared_ptr<EventLoop>> loops = loops_;
  size_t total = 0;
  for (size_t round = 0; round < max_rounds; ++round) {
    size_t ran = 0;
    for (auto& l : loops) ran += l->Poll();
    total += ran;
    if (ran == 0) break;
  }
  return total;
}

std::shared_ptr<Runtime> Runtime::Default() {
  static std::mutex& mu = []() -> std::mutex& {
    auto* m = new std::mutex();  // never destroyed: Default() may run at exit
    internal::HoldAcrossFork(*m, internal::ForkLockRank::kDefaultRuntime);
    return *m;
  }();
  static std::shared_ptr<Runtime> instance;
  std::lock_guard lock(mu);
  // In a child made by fork(), the parent's default runtime cannot run here: a new one.
  if (!instance || instance->made_before_fork()) instance = std::make_shared<Runtime>();
  return instance;
}

namespace internal {

namespace {
std::atomic<uint64_t> fork_generation{0};
// Installed while the library is loaded, before any fork() that could matter.
[[maybe_unused]] const int fork_handler_installed = ::pthread_atfork(
    nullptr, nullptr, [] { fork_generation.fetch_add(1, std::memory_order_relaxed); });
}  // namespace

uint64_t ForkGeneration() noexcept { return fork_generation.load(std::memory_order_relaxed); }

void KeepForever(std::shared_ptr<void> object) noexcept {
  struct Kept {
    std::mutex mu;
    std::vector<std::shared_ptr<void>> objects;
  };
  static Kept* const kept = [] {
    auto* k = new Kept();
    HoldAcrossFork(k->mu, ForkLockRank::kKeptObjects);
    return k;
  }();
  std::lock_guard lock(kept->mu);
  try {
    kept->objects.push_back(std::move(object));
  } catch (...) {
    std::terminate();  // no memory for it, and destroying it is not an option
  }
}

}  // namespace internal

}  // namespace scales
