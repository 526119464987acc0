#pragma once
// The injected clock. All time in scales goes through a Clock, so unit tests run on a
// ManualClock with exact results and no sleeps.

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <set>

#include <boost/asio/any_io_executor.hpp>

namespace scales {

using Duration = std::chrono::nanoseconds;
using TimePoint = std::chrono::steady_clock::time_point;
using WallTime = std::chrono::system_clock::time_point;

// `from + after`, saturated at the time point's largest value: a deadline for a duration as
// large as Duration::max() ("never") stays in the far future instead of overflowing into the
// past (which would make its timer fire at once).
template <class Clock, class Dur>
std::chrono::time_point<Clock, Dur> DeadlineAfter(std::chrono::time_point<Clock, Dur> from, Duration after) noexcept {
  using Point = std::chrono::time_point<Clock, Dur>;
  const auto step = std::chrono::duration_cast<Dur>(after);
  if (step > Dur::zero() && from > Point() && step > Point::max() - from) return Point::max();
  if (step < Dur::zero() && from < Point() && step < Point::min() - from) return Point::min();
  return from + step;
}

// A one-shot wake-up source bound to an executor; a TimerQueue owns one. Set() re-arms it
// (replacing the previous time); the callback given at creation then runs on the executor at
// or after that time. Spurious wake-ups are allowed: the owner re-checks Now().
// Thread safety: distinct objects safe; one object is used only from its executor's thread.
class Alarm {
 public:
  virtual ~Alarm() = default;
  virtual void Set(TimePoint when) = 0;
  virtual void Cancel() = 0;
};

// Thread safety: Now()/WallNow() are safe from any thread.
class Clock {
 public:
  virtual ~Clock() = default;
  // Monotonic time.
  virtual TimePoint Now() const noexcept = 0;
  // Wall-clock time (for deadlines sent to servers, e.g. Mux's Deadline context).
  virtual WallTime WallNow() const noexcept = 0;
  virtual std::unique_ptr<Alarm> CreateAlarm(boost::asio::any_io_executor executor,
                                             std::function<void()> on_fire) = 0;
};

// std::chrono::steady_clock / system_clock, with alarms on Asio steady timers. Inside a
// ClockTurn on the calling thread, readings are shared (see ClockTurn).
class SteadyClock final : public Clock {
 public:
  TimePoint Now() const noexcept override;
  WallTime WallNow() const noexcept override;
  std::unique_ptr<Alarm> CreateAlarm(boost::asio::any_io_executor executor,
                                     std::function<void()> on_fire) override;
  // The process-wide instance (stateless).
  static std::shared_ptr<SteadyClock> Instance();
};

// One turn of an event-loop handler that serves many calls (a Mux read that answers a batch of
// replies, whose handlers start the next requests). While a ClockTurn lives on a thread,
// SteadyClock::Now() on that thread reads the clock once and returns that reading until
// Refresh() (or the turn's end); WallNow() is derived from one wall-clock reading per turn plus
// the steady time since. Every sink of a call (dispatcher, timeout, balancer, retry budget,
// session) reads the time, and on virtual machines a read costs tens of nanoseconds: the owner
// of the turn calls Refresh() per event (per reply), so one read serves a whole reply's
// completion and the sinks below it, and a reading is never older than one event's
// processing. A call started on a loop (ClientCore::Dispatch) refreshes the reading first: the
// user's handler that starts it may have run for any time. Turns nest (an inner one shares the outer's reading). Other clocks (ManualClock)
// ignore turns: tests keep exact, injected time.
// Thread safety: a ClockTurn is used only on the thread that created it.
class ClockTurn {
 public:
  ClockTurn() noexcept;
  ~ClockTurn();
  ClockTurn(const ClockTurn&) = delete;
  ClockTurn& operator=(const ClockTurn&) = delete;
  // The next SteadyClock::Now() on this thread reads the clock again.
  static void Refresh() noexcept;
};

// A clock that moves only when told to. Advance() posts the callbacks of every alarm that
// became due to that alarm's executor; the test then runs the event loop
// (Runtime::RunUntilIdle) to execute them.
// Thread safety: safe from any thread.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(TimePoint start = TimePoint(std::chrono::hours(1)),
                       WallTime wall_start = WallTime(std::chrono::seconds(1700000000)));
  TimePoint Now() const noexcept override;
  WallTime WallNow() const noexcept override;
  std::unique_ptr<Alarm> CreateAlarm(boost::asio::any_io_executor executor,
                                     std::function<void()> on_fire) override;

  void Advance(Duration d);
  // Number of armed alarms (each TimerQueue with pending timers has one).
  size_t armed_alarms() const;

 private:
  class ManualAlarm;
  friend class ManualAlarm;

  mutable std::mutex mu_;
  TimePoint now_;
  WallTime wall_now_;
  std::set<ManualAlarm*> alarms_;
};

}  // namespace scales
