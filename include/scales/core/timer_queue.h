#pragma once
// Per-event-loop timers without per-timer allocation: TimerEntry objects live inside the
// objects that need them (a request, a pool, a connection) and are linked into the loop's
// TimerQueue, woken by one Alarm from the Clock. The queue is a sorted list for entries that
// arrive in about deadline order (every request with the same timeout: scheduling one is O(1)
// when its place is among the list's last few entries, cancelling one always is) plus a binary
// heap for the others; both fire in (deadline, schedule) order.

#include <cstddef>
#include <memory>
#include <vector>

#include "scales/core/clock.h"

namespace scales {

class TimerQueue;

// One pending timer. Not copyable or movable (the queue points to it). Destroying a
// scheduled entry cancels it. Thread safety: used only on its queue's event loop.
class TimerEntry {
 public:
  using Callback = void (*)(void* arg);

  TimerEntry() = default;
  TimerEntry(const TimerEntry&) = delete;
  TimerEntry& operator=(const TimerEntry&) = delete;
  ~TimerEntry() { Cancel(); }

  bool scheduled() const noexcept { return queue_ != nullptr; }
  TimePoint deadline() const noexcept { return deadline_; }
  void Cancel() noexcept;

 private:
  friend class TimerQueue;
  TimerQueue* queue_ = nullptr;
  size_t index_ = 0;  // in the heap; kListed when in the list
  TimerEntry* prev_ = nullptr;  // list neighbours
  TimerEntry* next_ = nullptr;
  TimePoint deadline_{};
  uint64_t seq_ = 0;
  Callback callback_ = nullptr;
  void* arg_ = nullptr;
};

// Thread safety: all calls on the owning event loop's thread.
class TimerQueue {
 public:
  TimerQueue(Clock& clock, boost::asio::any_io_executor executor);
  ~TimerQueue();
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;

  // Schedules (or re-schedules) `entry` to run `callback(arg)` at `deadline` on this loop.
  // A deadline in the past fires on the next loop turn, never inline (from a timer callback
  // too: after the entries that were due when that callback's turn began).
  void Schedule(TimerEntry& entry, TimePoint deadline, TimerEntry::Callback callback, void* arg);
  void Cancel(TimerEntry& entry) noexcept;

  Clock& clock() const noexcept { return clock_; }
  TimePoint Now() const noexcept { return clock_.Now(); }
  size_t size() const noexcept { return heap_.size() + listed_; }

 private:
  static constexpr size_t kListed = static_cast<size_t>(-1);
  // How far back from the list's end Schedule looks for an entry's place.
  static constexpr int kListSearch = 8;
  // The entry that fires first, or null.
  TimerEntry* Earliest() const noexcept;
  void Remove(TimerEntry& entry) noexcept;
  bool Less(const TimerEntry* a, const TimerEntry* b) const noexcept;
  void SiftUp(size_t i) noexcept;
  void SiftDown(size_t i) noexcept;
  void Swap(size_t i, size_t j) noexcept;
  void RemoveAt(size_t i) noexcept;
  void Rearm();
  void OnAlarm();

  Clock& clock_;
  std::unique_ptr<Alarm> alarm_;
  std::vector<TimerEntry*> heap_;
  // Entries scheduled in (deadline, schedule) order, earliest first.
  TimerEntry* head_ = nullptr;
  TimerEntry* tail_ = nullptr;
  size_t listed_ = 0;
  uint64_t next_seq_ = 0;
  bool firing_ = false;     // OnAlarm is running callbacks
  TimePoint firing_now_{};  // its idea of now
  bool armed_ = false;
  TimePoint armed_at_{};
};

}  // namespace scales
