// The per-call fast paths: clock readings shared within a ClockTurn, handlers completed in place
// (CompleteOn), the Tdispatch encoded from views (FragmentWriter::EnqueueTdispatch) and the
// strict binary Thrift header read without copies (thrift::internal::ParseStrictHeader). Each
// must give exactly what the general path gives.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "support/log_capture.h"
#include "scales/core/clock.h"
#include "scales/core/dispatcher.h"
#include "scales/core/timer_queue.h"
#include "scales/mux/codec.h"
#include "scales/thrift/client.h"
#include "scales/thrift/message.h"
#include "Echo.h"

namespace scales {
namespace {

// Reads the steady clock until it moves past `t` (no sleep: the clock has nanosecond ticks).
TimePoint After(TimePoint t) {
  TimePoint now = std::chrono::steady_clock::now();
  while (now <= t) now = std::chrono::steady_clock::now();
  return now;
}

TEST(ClockTurnTest, ReadingsAreSharedWithinATurnUntilRefresh) {
  SteadyClock clock;
  ClockTurn turn;
  const TimePoint first = clock.Now();
  After(first);
  EXPECT_EQ(clock.Now(), first);  // shared: the clock moved, the reading did not
  ClockTurn::Refresh();
  const TimePoint second = clock.Now();
  EXPECT_GT(second, first);
  {
    ClockTurn inner;  // nested turns share the outer's reading
    After(second);
    EXPECT_EQ(clock.Now(), second);
  }
  After(second);
  EXPECT_EQ(clock.Now(), second);  // the outer turn still holds it
}

TEST(ClockTurnTest, OutsideATurnEveryReadIsFresh) {
  SteadyClock clock;
  TimePoint in_turn;
  {
    ClockTurn turn;
    in_turn = clock.Now();
  }
  After(in_turn);
  EXPECT_GT(clock.Now(), in_turn);
  const TimePoint a = clock.Now();
  After(a);
  EXPECT_GT(clock.Now(), a);
}

TEST(ClockTurnTest, WallTimeFollowsTheSharedSteadyReading) {
  SteadyClock clock;
  ClockTurn turn;
  const WallTime w1 = clock.WallNow();
  const TimePoint s1 = clock.Now();
  EXPECT_EQ(clock.WallNow(), w1);  // same steady reading, same wall time
  After(s1);
  ClockTurn::Refresh();
  const TimePoint s2 = clock.Now();
  // One wall reading per turn; later ones advance with the steady clock.
  EXPECT_EQ(clock.WallNow() - w1, std::chrono::duration_cast<WallTime::duration>(s2 - s1));
  // And stay close to the system clock (the turn is microseconds old).
  EXPECT_LT(std::chrono::abs(clock.WallNow() - std::chrono::system_clock::now()), std::chrono::seconds(1));
}

TEST(ClockTurnTest, ManualClockIgnoresTurns) {
  ManualClock clock;
  ClockTurn turn;
  const TimePoint t = clock.Now();
  clock.Advance(std::chrono::milliseconds(5));
  EXPECT_EQ(clock.Now(), t + std::chrono::milliseconds(5));
}

// --- CompleteOn ----------------------------------------------------------------------------------

TEST(CompleteOnTest, RunsInPlaceOnTheLoopAndPostsWhenDeferred) {
  boost::asio::io_context ioc;
  const boost::asio::any_io_executor loop = ioc.get_executor();
  std::vector<int> ran;
  internal::CompleteOn([&](int v) { ran.push_back(v); }, loop, /*defer=*/false, {}, 1);
  EXPECT_EQ(ran, std::vector<int>{1});  // in place: no trip through the queue
  internal::CompleteOn([&](int v) { ran.push_back(v); }, loop, /*defer=*/true, {}, 2);
  EXPECT_EQ(ran, std::vector<int>{1});  // never inside the initiating function
  ioc.run();
  EXPECT_EQ(ran, (std::vector<int>{1, 2}));
}

// A deferred completion goes through the call's loop before its handler's executor: the work
// tracked on that executor lasts until the handler is queued there, or an io_context that runs
// only the handler would run out of work (and return from run()) in between.
TEST(CompleteOnTest, DeferredCompletionKeepsTheWorkUntilTheHandlerReachesItsExecutor) {
  boost::asio::io_context ioc;
  boost::asio::io_context other;
  const boost::asio::any_io_executor loop = ioc.get_executor();
  internal::TrackedWork work(boost::asio::prefer(boost::asio::any_completion_executor(other.get_executor()),
                                                 boost::asio::execution::outstanding_work.tracked));
  int ran = 0;
  internal::CompleteOn(boost::asio::bind_executor(other, [&](int v) { ran = v; }), loop, /*defer=*/true,
                       std::move(work), 4);
  other.poll();
  EXPECT_FALSE(other.stopped()) << "the work was released before the handler reached its executor";
  ioc.run();  // the loop hands the handler to `other`
  other.restart();
  other.run();  // runs it, then has no work left and returns
  EXPECT_EQ(ran, 4);
}

TEST(CompleteOnTest, AHandlerWithItsOwnExecutorRunsThere) {
  boost::asio::io_context ioc;
  boost::asio::io_context other;
  const boost::asio::any_io_executor loop = ioc.get_executor();
  int ran = 0;
  internal::CompleteOn(boost::asio::bind_executor(other, [&](int v) { ran = v; }), loop, false, {}, 3);
  EXPECT_EQ(ran, 0);  // dispatched to `other`, which this thread does not run
  ioc.run();
  EXPECT_EQ(ran, 0);
  other.run();
  EXPECT_EQ(ran, 3);
  // A strand on the loop is not the loop: it keeps its ordering guarantee.
  auto strand = boost::asio::make_strand(ioc);
  ioc.restart();
  internal::CompleteOn(boost::asio::bind_executor(strand, [&](int v) { ran = v; }), loop, false, {}, 4);
  EXPECT_EQ(ran, 3);  // not in place: this thread is not in the strand
  ioc.run();
  EXPECT_EQ(ran, 4);
}

// A handler that throws does not unwind through the transport that completed it, nor end the
// loop: the exception is logged and dropped, in place, deferred and on another executor alike.
// So is one from any handler posted to an EventLoop.
TEST(CompleteOnTest, AThrowingHandlerIsReportedAndDropped) {
  test::LogCapture log(LogLevel::kError);
  boost::asio::io_context ioc;
  const boost::asio::any_io_executor loop = ioc.get_executor();
  int ran = 0;
  auto thrower = [&](int v) {
    ran += v;
    throw std::runtime_error("handler " + std::to_string(v) + " failed");
  };
  EXPECT_NO_THROW(internal::CompleteOn(thrower, loop, /*defer=*/false, {}, 1));
  internal::CompleteOn(thrower, loop, /*defer=*/true, {}, 2);
  auto strand = boost::asio::make_strand(ioc);
  internal::CompleteOn(boost::asio::bind_executor(strand, thrower), loop, /*defer=*/false, {}, 4);
  EXPECT_NO_THROW(ioc.run());
  EXPECT_EQ(ran, 7);
  for (const char* which : {"handler 1 failed", "handler 2 failed", "handler 4 failed"}) {
    EXPECT_TRUE(log.Has({"a handler on an event loop threw", which, "must not throw"})) << log.All();
  }

  RuntimeOptions options;
  options.threads = 1;  // a real loop thread: an exception out of run() would end the process
  Runtime runtime(options);
  std::promise<void> after;
  boost::asio::post(runtime.loop(0).executor(), [] { throw std::logic_error("posted work failed"); });
  boost::asio::post(runtime.loop(0).executor(), [&] { after.set_value(); });
  EXPECT_EQ(after.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready)
      << "the loop went on after the exception";
  EXPECT_TRUE(log.Has({"posted work failed"})) << log.All();
}

// A handler with an over-aligned member lives inside its call object: the object must be
// allocated with that alignment (the call cache's blocks are aligned for ordinary types only).
struct alignas(64) AlignedHandler {
  // Atomic: an empty client completes on the system executor's thread, which moves the handler.
  static inline std::atomic<int> misaligned{0};
  static inline std::atomic<int> ran{0};
  char payload[64] = {};
  AlignedHandler() { Check(); }
  AlignedHandler(const AlignedHandler&) { Check(); }
  AlignedHandler(AlignedHandler&&) noexcept { Check(); }
  AlignedHandler& operator=(const AlignedHandler&) = default;
  void Check() const { misaligned += reinterpret_cast<std::uintptr_t>(this) % 64 != 0; }
  void operator()(std::exception_ptr, std::string) const {
    Check();
    ++ran;
  }
};

TEST(CallObjectTest, AnOverAlignedHandlerIsStoredAligned) {
  thrift::ThriftClient<echo::EchoClient> empty;  // completes every call: no server needed
  boost::asio::io_context ioc;
  for (int i = 0; i < 4; ++i) {
    SCALES_THRIFT_CALL(empty, echo, std::string("x"), boost::asio::bind_executor(ioc, AlignedHandler{}));
  }
  ioc.run();
  EXPECT_EQ(AlignedHandler::ran.load(), 4);
  EXPECT_EQ(AlignedHandler::misaligned.load(), 0);
}

// --- TimerQueue's list ----------------------------------------------------------------------------

// Request timeouts (all alike) keep arriving before a loop's few long timers: they go into the
// sorted list before those, are cancelled from its middle, and everything fires in order.
TEST(TimerListTest, AlikeTimeoutsBeforeLongTimersFireInOrder) {
  test::ManualEnv env;
  TimerQueue& timers = env.loop().timers();
  std::vector<int> fired;
  struct Probe {
    std::vector<int>* fired;
    int id;
    static void Fire(void* p) {
      auto* self = static_cast<Probe*>(p);
      self->fired->push_back(self->id);
    }
  };
  constexpr int kRequests = 20;
  std::vector<std::unique_ptr<TimerEntry>> entries;
  std::vector<std::unique_ptr<Probe>> probes;
  auto schedule = [&](int id, Duration after) {
    entries.push_back(std::make_unique<TimerEntry>());
    probes.push_back(std::make_unique<Probe>(Probe{&fired, id}));
    timers.Schedule(*entries.back(), env.Now() + after, &Probe::Fire, probes.back().get());
  };
  schedule(1000, std::chrono::seconds(10));  // a ping
  schedule(1001, std::chrono::seconds(5));   // a tick, before the ping
  for (int i = 0; i < kRequests; ++i) {
    schedule(i, std::chrono::seconds(1));  // equal deadlines: scheduling order
    env.clock->Advance(std::chrono::milliseconds(1));
  }
  schedule(999, std::chrono::milliseconds(500));  // earlier than the whole list's tail
  for (int i = 0; i < kRequests; i += 3) entries[2 + i]->Cancel();
  EXPECT_EQ(timers.size(), 2u + kRequests + 1 - (kRequests + 2) / 3);
  env.Advance(std::chrono::seconds(11));
  std::vector<int> expected = {999};
  for (int i = 0; i < kRequests; ++i) {
    if (i % 3 != 0) expected.push_back(i);
  }
  expected.push_back(1001);
  expected.push_back(1000);
  EXPECT_EQ(fired, expected);
  EXPECT_EQ(timers.size(), 0u);
}

// --- EnqueueTdispatch ----------------------------------------------------------------------------

std::string WriteAll(mux::FragmentWriter& w) {
  std::string out;
  w.WriteAll(&out);
  return out;
}

TEST(EnqueueTdispatchTest, SameBytesAsTheMessageEncoder) {
  const std::string payload = "\x80\x01\x00\x01\x00\x00\x00\x04" "echo\x00\x00\x00\x00";
  const std::string trace(32, '\x07');
  const std::vector<mux::ContextView> views = {
      {mux::kRetriesKey, std::string_view("\x00\x00\x00\x02", 4)},
      {mux::kClientIdKey, "bench"},
      {mux::kTraceContextKey, trace},
  };
  for (uint32_t max_fragment : {0u, 8u, 1000u}) {
    mux::Tdispatch d;
    d.tag = 77;
    for (const auto& v : views) d.contexts.push_back({std::string(v.key), std::string(v.value)});
    d.payload = payload;
    mux::FragmentWriter general(max_fragment);
    ASSERT_TRUE(general.Enqueue(mux::Message(d)));
    mux::FragmentWriter fast(max_fragment);
    ASSERT_TRUE(fast.EnqueueTdispatch(77, views, payload));
    EXPECT_EQ(WriteAll(fast), WriteAll(general)) << "max fragment " << max_fragment;
  }
  // No contexts, empty payload.
  mux::FragmentWriter general;
  ASSERT_TRUE(general.Enqueue(mux::Message(mux::Tdispatch{5, {}, {}, {}, {}})));
  mux::FragmentWriter fast;
  ASSERT_TRUE(fast.EnqueueTdispatch(5, {}, {}));
  EXPECT_EQ(WriteAll(fast), WriteAll(general));
}

TEST(EnqueueTdispatchTest, UnrepresentableRequestsFailAsTheMessageEncoderSays) {
  const std::string huge(70000, 'v');
  const std::vector<mux::ContextView> views = {{mux::kClientIdKey, huge}};
  mux::Tdispatch d;
  d.tag = 9;
  d.contexts.push_back({std::string(mux::kClientIdKey), huge});
  mux::FragmentWriter general;
  auto expected = general.Enqueue(mux::Message(d));
  mux::FragmentWriter fast;
  auto got = fast.EnqueueTdispatch(9, views, "p");
  ASSERT_FALSE(expected);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().detail, expected.error().detail);
  EXPECT_TRUE(fast.empty());
  // A tag past the 23-bit space.
  auto bad_tag = fast.EnqueueTdispatch(mux::kMaxTag + 1, {}, "p");
  ASSERT_FALSE(bad_tag);
  EXPECT_NE(bad_tag.error().detail.find("tag"), std::string::npos) << bad_tag.error().detail;
  // A payload one frame's 31-bit size cannot hold, to a peer that takes no fragments: refused
  // (kRequestTooLarge) before anything is queued, not a wrapped size field. The view is never
  // read: the size alone decides.
  const char byte = 'x';
  const std::string_view two_gib(&byte, std::size_t{1} << 31);
  auto too_large = fast.EnqueueTdispatch(9, {}, two_gib);
  ASSERT_FALSE(too_large);
  EXPECT_EQ(too_large.error().code, Errc::kRequestTooLarge);
  EXPECT_NE(too_large.error().detail.find("exceeds the largest frame"), std::string::npos) << too_large.error().detail;
  EXPECT_TRUE(fast.empty());
}

// --- ParseStrictHeader ---------------------------------------------------------------------------

TEST(ParseStrictHeaderTest, AgreesWithTheFullParserOnStrictBinary) {
  const std::string call = std::string("\x80\x01\x00\x01\x00\x00\x00\x04" "echo", 12) + std::string("\x00\x00\x01\x02", 4);
  auto fast = thrift::internal::ParseStrictHeader(call);
  auto full = thrift::ParseMessageHeader(call);
  ASSERT_TRUE(fast.has_value());
  ASSERT_TRUE(full.has_value());
  EXPECT_EQ(fast->name, full->name);
  EXPECT_EQ(fast->seqid, full->seqid);
  EXPECT_EQ(fast->seqid, 0x102);
  EXPECT_EQ(fast->type, full->type);
}

TEST(ParseStrictHeaderTest, LeavesEverythingElseToTheFullParser) {
  // Truncated, an unknown type, the lenient binary and the compact headers.
  const std::string truncated("\x80\x01\x00\x01\x00\x00\x00\x04" "ech", 11);
  const std::string bad_type = std::string("\x80\x01\x00\x09\x00\x00\x00\x01" "e", 9) + std::string(4, '\0');
  const std::string name_past_end = std::string("\x80\x01\x00\x01\x00\x00\x01\x00" "e", 9) + std::string(4, '\0');
  const std::string lenient = std::string("\x00\x00\x00\x04" "echo" "\x01", 9) + std::string(4, '\0');
  const std::string compact("\x82\x21\x00\x04" "echo", 8);
  for (const std::string* bytes : {&truncated, &bad_type, &name_past_end, &lenient, &compact}) {
    EXPECT_FALSE(thrift::internal::ParseStrictHeader(*bytes).has_value());
  }
  EXPECT_TRUE(thrift::ParseMessageHeader(lenient).has_value());
  EXPECT_TRUE(thrift::ParseMessageHeader(compact).has_value());
}

}  // namespace
}  // namespace scales
