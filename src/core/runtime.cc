#include "scales/core/runtime.h"

#include <chrono>
#include <exception>
#include <string>

#include <boost/asio/post.hpp>
#include <fmt/format.h>

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
}  // namespace

EventLoop::EventLoop(size_t index, std::shared_ptr<Clock> clock, uint64_t seed,
                     boost::asio::io_context* external, std::chrono::microseconds busy_poll)
    : index_(index),
      clock_(std::move(clock)),
      owned_ioc_(external ? nullptr : std::make_unique<boost::asio::io_context>(1)),
      ioc_(external ? external : owned_ioc_.get()),
      random_(seed),
      timers_(std::make_unique<TimerQueue>(*clock_, ioc_->get_executor())),
      busy_poll_(busy_poll) {}

EventLoop::~EventLoop() {
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

size_t EventLoop::Poll() {
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
  for (auto& loop : loops_) {
    guards_.emplace_back(loop->io_context().get_executor());
  }
  for (auto& loop : loops_) {
    threads_.emplace_back([l = loop] { l->Run(); });
  }
}

Runtime::~Runtime() {
  // Let the loops finish the work they have (closing clients post their shutdown), then
  // stop them; bounded so a stuck peer cannot hang the process at exit.
  guards_.clear();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (size_t i = 0; i < threads_.size(); ++i) {
    auto& ioc = loops_[i]->io_context();
    // Destroyed from one of this loop's handlers: it cannot run out of work before we return.
    const bool ours = threads_[i].get_id() == std::this_thread::get_id();
    while (!ours && !ioc.stopped() && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ioc.stop();
  }
  for (auto& t : threads_) {
    if (t.get_id() == std::this_thread::get_id()) {
      // Cannot join ourselves: the thread's own reference keeps its loop alive until run()
      // returns, after the handler that destroys us.
      t.detach();
    } else {
      t.join();
    }
  }
  loops_.clear();
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

size_t Runtime::RunUntilIdle(size_t max_rounds) {
  size_t total = 0;
  for (size_t round = 0; round < max_rounds; ++round) {
    size_t ran = 0;
    for (auto& l : loops_) ran += l->Poll();
    total += ran;
    if (ran == 0) break;
  }
  return total;
}

std::shared_ptr<Runtime> Runtime::Default() {
  static std::shared_ptr<Runtime> instance = std::make_shared<Runtime>();
  return instance;
}

}  // namespace scales
