#include "scales/core/timer_queue.h"

#include <cassert>
#include <utility>

namespace scales {

void TimerEntry::Cancel() noexcept {
  if (queue_ != nullptr) queue_->Cancel(*this);
}

TimerQueue::TimerQueue(Clock& clock, boost::asio::any_io_executor executor)
    : clock_(clock), alarm_(clock.CreateAlarm(std::move(executor), [this] { OnAlarm(); })) {}

TimerQueue::~TimerQueue() {
  for (TimerEntry* e : heap_) e->queue_ = nullptr;
  heap_.clear();
  for (TimerEntry* e = head_; e != nullptr; e = e->next_) e->queue_ = nullptr;
  head_ = tail_ = nullptr;
  listed_ = 0;
  alarm_->Cancel();
}

TimerEntry* TimerQueue::Earliest() const noexcept {
  TimerEntry* top = heap_.empty() ? nullptr : heap_.front();
  if (top == nullptr) return head_;
  if (head_ == nullptr) return top;
  return Less(head_, top) ? head_ : top;
}

void TimerQueue::Remove(TimerEntry& e) noexcept {
  if (e.index_ != kListed) {
    RemoveAt(e.index_);
    return;
  }
  (e.prev_ != nullptr ? e.prev_->next_ : head_) = e.next_;
  (e.next_ != nullptr ? e.next_->prev_ : tail_) = e.prev_;
  e.prev_ = e.next_ = nullptr;
  --listed_;
  e.queue_ = nullptr;
}

bool TimerQueue::Less(const TimerEntry* a, const TimerEntry* b) const noexcept {
  if (a->deadline_ != b->deadline_) return a->deadline_ < b->deadline_;
  return a->seq_ < b->seq_;
}

void TimerQueue::Swap(size_t i, size_t j) noexcept {
  std::swap(heap_[i], heap_[j]);
  heap_[i]->index_ = i;
  heap_[j]->index_ = j;
}

void TimerQueue::SiftUp(size_t i) noexcept {
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!Less(heap_[i], heap_[parent])) break;
    Swap(i, parent);
    i = parent;
  }
}

void TimerQueue::SiftDown(size_t i) noexcept {
  const size_t n = heap_.size();
  for (;;) {
    size_t smallest = i;
    size_t l = 2 * i + 1;
    size_t r = l + 1;
    if (l < n && Less(heap_[l], heap_[smallest])) smallest = l;
    if (r < n && Less(heap_[r], heap_[smallest])) smallest = r;
    if (smallest == i) return;
    Swap(i, smallest);
    i = smallest;
  }
}

void TimerQueue::RemoveAt(size_t i) noexcept {
  TimerEntry* e = heap_[i];
  const size_t last = heap_.size() - 1;
  if (i != last) {
    Swap(i, last);
    heap_.pop_back();
    SiftDown(i);
    SiftUp(i);
  } else {
    heap_.pop_back();
  }
  e->queue_ = nullptr;
}

void TimerQueue::Schedule(TimerEntry& entry, TimePoint deadline, TimerEntry::Callback callback,
                          void* arg) {
  if (entry.queue_ != nullptr) entry.queue_->Cancel(entry);
  entry.queue_ = this;
  // Scheduled from a callback of the pass in progress, a deadline already passed counts as
  // that pass's time: the entries that were due before it go first, and it fires on a later
  // turn (OnAlarm), so an entry that keeps re-scheduling itself in the past starves none.
  if (firing_ && deadline < firing_now_) deadline = firing_now_;
  entry.deadline_ = deadline;
  entry.seq_ = next_seq_++;
  entry.callback_ = callback;
  entry.arg_ = arg;
  // The list's place for it: after every entry due no later (its sequence is the largest),
  // looked for among the last few entries only. Those are usually a loop's few long timers
  // (pings, ticks), which the requests' timeouts, all alike, keep arriving before.
  TimerEntry* after = tail_;
  for (int steps = 0; after != nullptr && after->deadline_ > deadline && steps < kListSearch; ++steps) {
    after = after->prev_;
  }
  if (after == nullptr ? head_ == nullptr || head_->deadline_ > deadline : after->deadline_ <= deadline) {
    entry.index_ = kListed;
    entry.prev_ = after;
    entry.next_ = after != nullptr ? after->next_ : head_;
    (entry.next_ != nullptr ? entry.next_->prev_ : tail_) = &entry;
    (after != nullptr ? after->next_ : head_) = &entry;
    ++listed_;
  } else {
    entry.index_ = heap_.size();
    heap_.push_back(&entry);
    SiftUp(entry.index_);
  }
  if (Earliest() == &entry) Rearm();
}

void TimerQueue::Cancel(TimerEntry& entry) noexcept {
  if (entry.queue_ != this) return;
  Remove(entry);
  // With timers left, the alarm stays armed for the old head (a spurious wake-up only
  // re-checks the heap). With none left, disarm it: an armed Asio timer would keep the event
  // loop busy long after the last user of the queue went away.
  if (size() == 0 && armed_) {
    alarm_->Cancel();
    armed_ = false;
  }
}

void TimerQueue::Rearm() {
  const TimerEntry* first = Earliest();
  if (first == nullptr) {
    if (armed_) alarm_->Cancel();
    armed_ = false;
    return;
  }
  TimePoint head = first->deadline_;
  if (armed_ && armed_at_ <= head) return;
  armed_ = true;
  armed_at_ = head;
  alarm_->Set(head);
}

void TimerQueue::OnAlarm() {
  armed_ = false;
  const TimePoint now = clock_.Now();
  firing_ = true;
  firing_now_ = now;
  // A callback that throws leaves through here (the loop reports the exception and goes on):
  // the alarm must be set again for the entries left, or none of them would ever fire.
  struct RearmOnExit {
    TimerQueue& queue;
    ~RearmOnExit() {
      queue.firing_ = false;
      try {
        queue.Rearm();
      } catch (...) {
      }
    }
  } rearm{*this};
  // Fire what was due when the alarm went off. A callback may schedule or cancel other
  // entries (even re-schedule itself), so take the earliest afresh each time. An entry
  // scheduled during this pass fires on a later loop turn even when its deadline has passed
  // (never inline): one that keeps re-scheduling itself in the past must not hold the loop.
  const uint64_t scheduled_before = next_seq_;
  for (TimerEntry* e = Earliest(); e != nullptr && e->deadline_ <= now && e->seq_ < scheduled_before;
       e = Earliest()) {
    Remove(*e);
    e->callback_(e->arg_);
  }
}

}  // namespace scales
