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

// std::chrono::steady_clock / system_clock, with alarms on Asio steady timers.
class SteadyClock final : public Clock {
 public:
  TimePoint Now() const noexcept override { return std::chrono::steady_clock::now(); }
  WallTime WallNow() const noexcept override { return std::chrono::system_clock::now(); }
  std::unique_ptr<Alarm> CreateAlarm(boost::asio::any_io_executor executor,
                                     std::function<void()> on_fire) override;
  // The process-wide instance (stateless).
  static std::shared_ptr<SteadyClock> Instance();
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
