// TimerQueue on a ManualClock: ordering, cancel, reschedule, past deadlines, destruction.

#include "scales/core/timer_queue.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/clock.h"
#include "scales/core/random.h"
#include "scales/core/runtime.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using ::testing::ElementsAre;
using ::testing::IsEmpty;

struct Probe {
  std::vector<int>* log = nullptr;
  int id = 0;
  TimePoint* fired_at = nullptr;
  Clock* clock = nullptr;
  static void Fire(void* arg) {
    auto* p = static_cast<Probe*>(arg);
    p->log->push_back(p->id);
    if (p->fired_at != nullptr) *p->fired_at = p->clock->Now();
  }
};

class TimerQueueTest : public ::testing::Test {
 protected:
  TimerQueue& timers() { return env_.loop().timers(); }
  TimePoint Now() { return env_.Now(); }

  test::ManualEnv env_;
  std::vector<int> log_;
};

TEST_F(TimerQueueTest, FiresInDeadlineOrder) {
  TimerEntry a, b, c;
  Probe pa{&log_, 1}, pb{&log_, 2}, pc{&log_, 3};
  timers().Schedule(a, Now() + milliseconds(30), &Probe::Fire, &pa);
  timers().Schedule(b, Now() + milliseconds(10), &Probe::Fire, &pb);
  timers().Schedule(c, Now() + milliseconds(20), &Probe::Fire, &pc);
  EXPECT_EQ(timers().size(), 3u);
  EXPECT_TRUE(a.scheduled());
  EXPECT_EQ(a.deadline(), Now() + milliseconds(30));

  env_.Run();
  EXPECT_THAT(log_, IsEmpty());
  env_.Advance(milliseconds(10) - nanoseconds(1));
  EXPECT_THAT(log_, IsEmpty());
  env_.Advance(nanoseconds(1));
  EXPECT_THAT(log_, ElementsAre(2));
  EXPECT_FALSE(b.scheduled());
  env_.Advance(milliseconds(20));
  EXPECT_THAT(log_, ElementsAre(2, 3, 1));
  EXPECT_EQ(timers().size(), 0u);
  EXPECT_FALSE(a.scheduled());
}

TEST_F(TimerQueueTest, OneBigAdvanceFiresAllDueInOrder) {
  std::vector<std::unique_ptr<TimerEntry>> entries;
  std::vector<Probe> probes(50);
  // Deadlines in a scrambled order, with duplicates.
  for (int i = 0; i < 50; ++i) {
    probes[i] = Probe{&log_, i};
    entries.push_back(std::make_unique<TimerEntry>());
    int ms = (i * 37) % 25;
    timers().Schedule(*entries.back(), Now() + milliseconds(ms), &Probe::Fire, &probes[i]);
  }
  env_.Advance(seconds(1));
  ASSERT_EQ(log_.size(), 50u);
  for (size_t k = 1; k < log_.size(); ++k) {
    int prev = (log_[k - 1] * 37) % 25, cur = (log_[k] * 37) % 25;
    ASSERT_LE(prev, cur) << "at " << k;
    if (prev == cur) {
      ASSERT_LT(log_[k - 1], log_[k]) << "equal deadlines fire in scheduling order";
    }
  }
}

TEST_F(TimerQueueTest, EqualDeadlinesFireInSchedulingOrder) {
  TimerEntry a, b, c;
  Probe pa{&log_, 1}, pb{&log_, 2}, pc{&log_, 3};
  const TimePoint t = Now() + milliseconds(5);
  timers().Schedule(c, t, &Probe::Fire, &pc);
  timers().Schedule(a, t, &Probe::Fire, &pa);
  timers().Schedule(b, t, &Probe::Fire, &pb);
  env_.Advance(milliseconds(5));
  EXPECT_THAT(log_, ElementsAre(3, 1, 2));
}

TEST_F(TimerQueueTest, CancelledEntryDoesNotFire) {
  TimerEntry a, b;
  Probe pa{&log_, 1}, pb{&log_, 2};
  timers().Schedule(a, Now() + milliseconds(10), &Probe::Fire, &pa);
  timers().Schedule(b, Now() + milliseconds(20), &Probe::Fire, &pb);
  a.Cancel();  // the head: the alarm stays armed for it and wakes up spuriously
  EXPECT_FALSE(a.scheduled());
  EXPECT_EQ(timers().size(), 1u);
  env_.Advance(milliseconds(10));
  EXPECT_THAT(log_, IsEmpty());
  env_.Advance(milliseconds(10));
  EXPECT_THAT(log_, ElementsAre(2));
  // Cancelling twice, or an unscheduled entry, is harmless.
  a.Cancel();
  b.Cancel();
  timers().Cancel(a);
}

TEST_F(TimerQueueTest, CancelMiddleOfHeap) {
  std::vector<std::unique_ptr<TimerEntry>> entries;
  std::vector<Probe> probes(10);
  for (int i = 0; i < 10; ++i) {
    probes[i] = Probe{&log_, i};
    entries.push_back(std::make_unique<TimerEntry>());
    timers().Schedule(*entries.back(), Now() + milliseconds(10 - i), &Probe::Fire, &probes[i]);
  }
  for (int i : {3, 7, 0, 9}) entries[i]->Cancel();
  EXPECT_EQ(timers().size(), 6u);
  env_.Advance(milliseconds(10));
  EXPECT_THAT(log_, ElementsAre(8, 6, 5, 4, 2, 1));
}

TEST_F(TimerQueueTest, RescheduleLaterAndEarlier) {
  TimerEntry a, b;
  Probe pa{&log_, 1}, pb{&log_, 2};
  timers().Schedule(a, Now() + milliseconds(10), &Probe::Fire, &pa);
  timers().Schedule(a, Now() + milliseconds(50), &Probe::Fire, &pa);  // later
  EXPECT_EQ(timers().size(), 1u);
  timers().Schedule(b, Now() + milliseconds(40), &Probe::Fire, &pb);
  timers().Schedule(b, Now() + milliseconds(5), &Probe::Fire, &pb);  // earlier
  env_.Advance(milliseconds(5));
  EXPECT_THAT(log_, ElementsAre(2));
  env_.Advance(milliseconds(5));
  EXPECT_THAT(log_, ElementsAre(2));  // a's old deadline is gone
  env_.Advance(milliseconds(40) - nanoseconds(1));
  EXPECT_THAT(log_, ElementsAre(2));
  env_.Advance(nanoseconds(1));
  EXPECT_THAT(log_, ElementsAre(2, 1));
}

TEST_F(TimerQueueTest, PastDeadlineFiresOnTheNextTurnNotInline) {
  TimerEntry a, b;
  Probe pa{&log_, 1}, pb{&log_, 2};
  timers().Schedule(a, Now() - seconds(1), &Probe::Fire, &pa);
  timers().Schedule(b, Now(), &Probe::Fire, &pb);
  EXPECT_THAT(log_, IsEmpty());  // not inside Schedule
  EXPECT_TRUE(a.scheduled());
  env_.Run();
  EXPECT_THAT(log_, ElementsAre(1, 2));
}

TEST_F(TimerQueueTest, PastDeadlineWhileArmedForLater) {
  TimerEntry later, past;
  Probe pl{&log_, 1}, pp{&log_, 2};
  timers().Schedule(later, Now() + seconds(10), &Probe::Fire, &pl);
  env_.Run();
  timers().Schedule(past, Now() - milliseconds(1), &Probe::Fire, &pp);
  EXPECT_THAT(log_, IsEmpty());
  env_.Run();
  EXPECT_THAT(log_, ElementsAre(2));
  EXPECT_TRUE(later.scheduled());
}

TEST_F(TimerQueueTest, DestroyingAScheduledEntryCancelsIt) {
  Probe pa{&log_, 1}, pb{&log_, 2};
  auto a = std::make_unique<TimerEntry>();
  TimerEntry b;
  timers().Schedule(*a, Now() + milliseconds(10), &Probe::Fire, &pa);
  timers().Schedule(b, Now() + milliseconds(20), &Probe::Fire, &pb);
  a.reset();
  EXPECT_EQ(timers().size(), 1u);
  env_.Advance(milliseconds(30));
  EXPECT_THAT(log_, ElementsAre(2));
}

// A callback that re-schedules its own entry (a periodic timer) and one that schedules an
// already-due entry from inside the queue's callback loop.
struct Periodic {
  explicit Periodic(TimerQueue* q, Duration p) : queue(q), period(p) {}
  TimerQueue* queue;
  TimerEntry entry;
  Duration period;
  int count = 0;
  std::vector<TimePoint> at;
  static void Fire(void* arg) {
    auto* p = static_cast<Periodic*>(arg);
    ++p->count;
    p->at.push_back(p->queue->Now());
    if (p->count < 3) p->queue->Schedule(p->entry, p->queue->Now() + p->period, &Fire, p);
  }
};

TEST_F(TimerQueueTest, CallbackMayRescheduleItself) {
  Periodic p(&timers(), milliseconds(100));
  const TimePoint t0 = Now();
  timers().Schedule(p.entry, t0 + p.period, &Periodic::Fire, &p);
  for (int i = 0; i < 5; ++i) env_.Advance(milliseconds(100));
  EXPECT_EQ(p.count, 3);
  ASSERT_EQ(p.at.size(), 3u);
  EXPECT_EQ(p.at[0], t0 + milliseconds(100));
  EXPECT_EQ(p.at[1], t0 + milliseconds(200));
  EXPECT_EQ(p.at[2], t0 + milliseconds(300));
  EXPECT_FALSE(p.entry.scheduled());
}

// An entry whose callback keeps re-scheduling it in the past fires once per loop turn, after
// what else was due: it used to fire again and again inside one turn (the loop hung there) and
// the other due entries waited behind it.
struct PastRescheduler {
  TimerQueue* queue;
  TimerEntry entry;
  std::vector<int>* log;
  int left = 50;
  static void Fire(void* arg) {
    auto* p = static_cast<PastRescheduler*>(arg);
    p->log->push_back(1);
    if (--p->left > 0) p->queue->Schedule(p->entry, p->queue->Now() - seconds(1), &Fire, p);
  }
};

TEST_F(TimerQueueTest, AnEntryReschedulingItselfInThePastStarvesNothing) {
  PastRescheduler r{&timers(), {}, &log_};
  TimerEntry other;
  Probe po{&log_, 2};
  timers().Schedule(r.entry, Now() + milliseconds(10), &PastRescheduler::Fire, &r);
  timers().Schedule(other, Now() + milliseconds(20), &Probe::Fire, &po);
  env_.clock->Advance(milliseconds(30));
  EXPECT_EQ(env_.loop().io_context().poll_one(), 1u);  // one turn: the alarm's handler
  EXPECT_THAT(log_, ElementsAre(1, 2)) << "the other due entry fired in the same turn, once each";
  env_.Run();
  EXPECT_EQ(std::count(log_.begin(), log_.end(), 1), 50);
  EXPECT_FALSE(r.entry.scheduled());
}

// A callback that throws (the exception leaves the loop's handler; the loop reports it and goes
// on) must not leave the other entries without an alarm: they used to never fire.
TEST_F(TimerQueueTest, ACallbackThatThrowsLeavesTheOthersScheduled) {
  TimerEntry thrower, later;
  Probe pl{&log_, 2};
  timers().Schedule(thrower, Now() + milliseconds(10), [](void*) { throw std::runtime_error("callback failed"); },
                    nullptr);
  timers().Schedule(later, Now() + milliseconds(20), &Probe::Fire, &pl);
  env_.clock->Advance(milliseconds(30));
  EXPECT_THROW(env_.loop().Poll(), std::runtime_error);
  EXPECT_TRUE(later.scheduled());
  env_.Run();
  EXPECT_THAT(log_, ElementsAre(2));
  EXPECT_FALSE(later.scheduled());
}

struct Canceller {
  TimerEntry* victim;
  std::vector<int>* log;
  static void Fire(void* arg) {
    auto* c = static_cast<Canceller*>(arg);
    c->log->push_back(0);
    c->victim->Cancel();
  }
};

TEST_F(TimerQueueTest, CallbackMayCancelAnotherDueEntry) {
  TimerEntry first, victim;
  Probe pv{&log_, 9};
  Canceller c{&victim, &log_};
  timers().Schedule(first, Now() + milliseconds(1), &Canceller::Fire, &c);
  timers().Schedule(victim, Now() + milliseconds(2), &Probe::Fire, &pv);
  env_.Advance(milliseconds(5));  // both due in the same wake-up
  EXPECT_THAT(log_, ElementsAre(0));
}

TEST_F(TimerQueueTest, FiresAtExactTimeOnManualClock) {
  TimerEntry a;
  TimePoint fired{};
  Probe pa{&log_, 1, &fired, env_.clock.get()};
  const TimePoint deadline = Now() + milliseconds(250);
  timers().Schedule(a, deadline, &Probe::Fire, &pa);
  for (int i = 0; i < 249; ++i) env_.Advance(milliseconds(1));
  EXPECT_THAT(log_, IsEmpty());
  env_.Advance(milliseconds(1));
  EXPECT_THAT(log_, ElementsAre(1));
  EXPECT_EQ(fired, deadline);
}

TEST_F(TimerQueueTest, EmptyQueueDisarmsTheAlarm) {
  TimerEntry a;
  Probe pa{&log_, 1};
  timers().Schedule(a, Now() + milliseconds(10), &Probe::Fire, &pa);
  EXPECT_EQ(env_.clock->armed_alarms(), 1u);
  env_.Advance(milliseconds(10));
  EXPECT_EQ(env_.clock->armed_alarms(), 0u);
}

TEST(DeadlineAfterTest, SaturatesInsteadOfOverflowing) {
  const TimePoint t{seconds(5)};
  EXPECT_EQ(DeadlineAfter(t, seconds(1)), t + seconds(1));
  EXPECT_EQ(DeadlineAfter(t, -seconds(1)), t - seconds(1));
  EXPECT_EQ(DeadlineAfter(t, Duration::zero()), t);
  EXPECT_EQ(DeadlineAfter(t, Duration::max()), TimePoint::max());
  EXPECT_EQ(DeadlineAfter(t, TimePoint::max() - t), TimePoint::max());
  EXPECT_EQ(DeadlineAfter(TimePoint{}, Duration::max()), TimePoint::max());
  EXPECT_EQ(DeadlineAfter(TimePoint{-seconds(5)}, Duration::max()), TimePoint::max() - seconds(5));  // no overflow
  EXPECT_EQ(DeadlineAfter(TimePoint{-seconds(5)}, Duration::min()), TimePoint::min());
  const auto now = std::chrono::steady_clock::now();
  EXPECT_EQ(DeadlineAfter(now, Duration::max() - Duration(1)), TimePoint::max());  // a plain + overflows
}

TEST(ManualClockTest, AdvanceMovesBothClocks) {
  ManualClock clock;
  const TimePoint t0 = clock.Now();
  const WallTime w0 = clock.WallNow();
  clock.Advance(milliseconds(1500));
  EXPECT_EQ(clock.Now() - t0, milliseconds(1500));
  EXPECT_EQ(clock.WallNow() - w0, milliseconds(1500));
}

TEST(ManualClockTest, AlarmsAreDeliveredThroughTheExecutor) {
  auto clock = std::make_shared<ManualClock>();
  Runtime rt({.threads = 1, .start_threads = false, .clock = clock, .seed = 42});
  int fired = 0;
  auto alarm = clock->CreateAlarm(rt.loop(0).executor(), [&] { ++fired; });
  alarm->Set(clock->Now() + seconds(1));
  clock->Advance(seconds(1));
  EXPECT_EQ(fired, 0);  // posted, not run inline by Advance
  rt.RunUntilIdle();
  EXPECT_EQ(fired, 1);
  // A destroyed alarm whose callback was already posted is not called.
  alarm->Set(clock->Now());
  alarm.reset();
  rt.RunUntilIdle();
  EXPECT_EQ(fired, 1);
}

TEST(RandomTest, SeededSequencesRepeatAndStayInRange) {
  Random a(42), b(42);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(a.Next(), b.Next());
  Random r(7);
  EXPECT_EQ(r.Uniform(0), 0u);
  for (int i = 0; i < 1000; ++i) {
    ASSERT_LT(r.Uniform(3), 3u);
    double d = r.UniformDouble();
    ASSERT_GE(d, 0.0);
    ASSERT_LT(d, 1.0);
    Duration u = r.UniformDuration(milliseconds(500), milliseconds(1000));
    ASSERT_GE(u, milliseconds(500));
    ASSERT_LE(u, milliseconds(1000));
  }
  EXPECT_EQ(r.UniformDuration(seconds(2), seconds(1)), seconds(2));
}

TEST(RuntimeTest, ManualModeRunsOnlyWhenPolled) {
  auto clock = std::make_shared<ManualClock>();
  Runtime rt({.threads = 2, .start_threads = false, .clock = clock, .seed = 42});
  ASSERT_EQ(rt.size(), 2u);
  int ran = 0;
  bool was_loop_thread = false;
  boost::asio::post(rt.loop(1).executor(), [&] {
    ++ran;
    was_loop_thread = rt.IsLoopThread() && rt.loop(1).IsCurrent();
  });
  EXPECT_EQ(ran, 0);
  EXPECT_FALSE(rt.IsLoopThread());
  EXPECT_EQ(rt.RunUntilIdle(), 1u);
  EXPECT_EQ(ran, 1);
  EXPECT_TRUE(was_loop_thread);
  EXPECT_EQ(&rt.clock(), clock.get());
}

// A manual-mode runtime whose last reference a handler releases while its owner polls a loop
// directly (EventLoop::Poll): the loop, with its io_context, used to be destroyed under that
// Poll() (use after free), and the handlers queued behind that one were dropped unrun.
TEST(RuntimeTest, ALoopPolledWhileItsRuntimeGoesOutlivesThePoll) {
  auto rt = std::make_shared<Runtime>(RuntimeOptions{.threads = 1, .start_threads = false, .seed = 42});
  EventLoop& loop = rt->loop(0);
  std::weak_ptr<EventLoop> weak = loop.weak_from_this();
  bool alive_after_release = false;
  int queued_ran = 0;
  boost::asio::post(loop.executor(), [rt = std::move(rt), &weak, &alive_after_release]() mutable {
    rt.reset();  // the last reference
    alive_after_release = !weak.expired();
  });
  boost::asio::post(loop.executor(), [&queued_ran] { ++queued_ran; });
  loop.Poll();
  EXPECT_TRUE(alive_after_release) << "the loop was destroyed inside its own Poll()";
  EXPECT_EQ(queued_ran, 1);
  EXPECT_TRUE(weak.expired());  // and goes once the Poll() returned
}

}  // namespace
}  // namespace scales

namespace scales {
namespace {

// Random schedules, reschedules, cancels and clock moves against a reference model: every
// entry fires once, at the first loop turn at or after its deadline, in (deadline,
// scheduling order) order; cancelled and rescheduled-away deadlines never fire.
TEST(TimerQueueFuzzTest, MatchesAReferenceModel) {
  test::ManualEnv env;
  TimerQueue& timers = env.loop().timers();
  Random rng(test::TestSeed(1234));
  constexpr int kEntries = 64;
  struct Slot {
    TimerEntry entry;
    int id = 0;
    std::vector<int>* log = nullptr;
    static void Fire(void* arg) {
      auto* s = static_cast<Slot*>(arg);
      s->log->push_back(s->id);
    }
  };
  std::vector<int> fired;
  std::vector<std::unique_ptr<Slot>> slots;
  for (int i = 0; i < kEntries; ++i) {
    slots.push_back(std::make_unique<Slot>());
    slots.back()->id = i;
    slots.back()->log = &fired;
  }
  // Model: id -> (deadline, seq) for scheduled entries.
  std::map<int, std::pair<TimePoint, uint64_t>> model;
  uint64_t seq = 0;
  std::vector<int> expected;
  auto fire_due = [&] {
    std::vector<std::pair<std::pair<TimePoint, uint64_t>, int>> due;
    for (auto& [id, key] : model) {
      if (key.first <= env.Now()) due.push_back({key, id});
    }
    std::sort(due.begin(), due.end());
    for (auto& d : due) {
      expected.push_back(d.second);
      model.erase(d.second);
    }
  };
  for (int step = 0; step < 5000; ++step) {
    const uint64_t op = rng.Uniform(10);
    const int id = static_cast<int>(rng.Uniform(kEntries));
    Slot& s = *slots[id];
    if (op < 5) {
      // Schedule or reschedule, sometimes in the past, often at equal deadlines.
      auto offset = milliseconds(static_cast<int64_t>(rng.Uniform(50))) - milliseconds(5);
      TimePoint deadline = env.Now() + offset;
      timers.Schedule(s.entry, deadline, &Slot::Fire, &s);
      model[id] = {deadline, seq++};
    } else if (op < 7) {
      s.entry.Cancel();
      model.erase(id);
    } else if (op < 8) {
      // Destroy and recreate the entry (destruction cancels).
      slots[id] = std::make_unique<Slot>();
      slots[id]->id = id;
      slots[id]->log = &fired;
      model.erase(id);
    } else {
      env.clock->Advance(milliseconds(static_cast<int64_t>(rng.Uniform(12))));
    }
    env.Run();
    fire_due();
    ASSERT_EQ(fired, expected) << "step " << step;
    ASSERT_EQ(timers.size(), model.size()) << "step " << step;
    for (auto& sl : slots) ASSERT_EQ(sl->entry.scheduled(), model.count(sl->id) == 1);
  }
  EXPECT_GT(fired.size(), 500u);
}

}  // namespace
}  // namespace scales
