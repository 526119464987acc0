// StaticServerSet (ServerSetSubscribers): lists reach a subscriber in the order the set took
// them, and a subscriber always ends on the set's newest list.
#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <thread>
#include <vector>

#include <boost/asio/execution.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <gtest/gtest.h>

#include "scales/discovery/server_set.h"
#include "support/handler_queue.h"

namespace scales {
namespace {

using namespace std::chrono_literals;

ServerSet::Members List(int n) { return {{"127.0.0.1", static_cast<uint16_t>(1000 + n)}}; }

// An executor over an io_context that runs `hook` (on the posting thread) before each post.
struct HookedExecutor {
  boost::asio::io_context* ctx;
  const std::function<void()>* hook;

  boost::asio::execution_context& query(boost::asio::execution::context_t) const noexcept { return *ctx; }
  static constexpr boost::asio::execution::blocking_t query(boost::asio::execution::blocking_t) noexcept {
    return boost::asio::execution::blocking.never;
  }
  HookedExecutor require(boost::asio::execution::blocking_t::never_t) const noexcept { return *this; }
  template <class F>
  void execute(F f) const {
    (*hook)();
    boost::asio::post(ctx->get_executor(), std::move(f));
  }
  friend bool operator==(const HookedExecutor& a, const HookedExecutor& b) noexcept {
    return a.ctx == b.ctx && a.hook == b.hook;
  }
  friend bool operator!=(const HookedExecutor& a, const HookedExecutor& b) noexcept { return !(a == b); }
};

// A subscription copies the set's list and posts it; an update that runs in between must not
// leave the subscriber on the older list. The hook holds the subscription's post until the
// update has returned (or 300 ms: with the set's lock held across the post, the update cannot
// return before it). Before, the post came after the lock was released: the update posted its
// list first and the subscriber ended on the older one. Both lists wait when the deliveries
// run, so only the newer is delivered.
TEST(ConcurrencyStaticServerSetTest, AnUpdateDuringASubscriptionIsDeliveredAfterItsList) {
  StaticServerSet set(List(0));
  boost::asio::io_context deliveries;
  std::promise<void> subscription_posting, update_returned;
  auto update_done = update_returned.get_future();
  std::atomic<bool> first{true};
  const std::function<void()> hook = [&] {
    if (!first.exchange(false)) return;  // only the subscription's post waits
    subscription_posting.set_value();
    update_done.wait_for(300ms);
  };
  std::thread updater([&] {
    subscription_posting.get_future().wait();
    set.Update(List(1));
    update_returned.set_value();
  });
  std::vector<int> seen;
  set.Subscribe(HookedExecutor{&deliveries, &hook},
                [&seen](const ServerSet::Members& m) { seen.push_back(m.front().port - 1000); });
  updater.join();
  deliveries.run();
  EXPECT_EQ(seen, (std::vector<int>{1})) << "the subscriber must end on the set's list";
  EXPECT_EQ(set.members(), List(1));
}

// "Snapshots are delivered in order": on a multi-threaded executor the deliveries ran in
// whatever order its threads took them, and the subscriber could end on an older list than the
// set's (until the next change). A list older than one already delivered is not delivered.
TEST(StaticServerSetTest, AnOlderListIsNotDeliveredAfterANewerOne) {
  StaticServerSet set(List(0));
  test::HandlerQueue queue;
  std::vector<int> seen;
  set.Subscribe(queue.executor(),
                [&seen](const ServerSet::Members& m) { seen.push_back(m.front().port - 1000); });
  set.Update(List(1));
  set.Update(List(2));
  auto handlers = queue.Take();
  ASSERT_EQ(handlers.size(), 3u);
  handlers[2]();  // the newest list first
  handlers[0]();
  handlers[1]();
  EXPECT_EQ(seen, (std::vector<int>{2})) << "the subscriber must end on the set's list";
}

// A loop behind a fast-changing set applies only the newest of the lists waiting for it: a
// list that a newer one replaced before its delivery ran is skipped. (Before, every list was
// delivered: a one-loop client under TSan fell some 50 lists behind a set updated every 2 ms,
// and spent its time opening and closing connections for lists already replaced.)
TEST(StaticServerSetTest, OnlyTheNewestOfTheListsWaitingIsDelivered) {
  StaticServerSet set(List(0));
  test::HandlerQueue queue;
  std::vector<int> seen;
  set.Subscribe(queue.executor(),
                [&seen](const ServerSet::Members& m) { seen.push_back(m.front().port - 1000); });
  for (auto& h : queue.Take()) h();
  for (int i = 1; i <= 100; ++i) set.Update(List(i));
  auto waiting = queue.Take();
  ASSERT_EQ(waiting.size(), 100u);
  for (auto& h : waiting) h();
  set.Update(List(101));  // delivered: nothing newer waits
  for (auto& h : queue.Take()) h();
  EXPECT_EQ(seen, (std::vector<int>{0, 100, 101}));
}

// A listener may unsubscribe itself, or publish, from its delivery (no lock of the set is held
// while it runs); after Unsubscribe returns no delivery reaches it.
TEST(StaticServerSetTest, AListenerMayUnsubscribeAndUpdateFromItsDelivery) {
  StaticServerSet set(List(0));
  test::HandlerQueue queue;
  std::vector<int> seen;
  uint64_t id = 0;
  id = set.Subscribe(queue.executor(), [&](const ServerSet::Members& m) {
    seen.push_back(m.front().port - 1000);
    set.Update(List(7));
    set.Unsubscribe(id);
  });
  for (auto& h : queue.Take()) h();
  for (auto& h : queue.Take()) h();  // List(7)'s delivery: unsubscribed
  set.Update(List(8));
  EXPECT_TRUE(queue.Take().empty());
  EXPECT_EQ(seen, (std::vector<int>{0}));
  EXPECT_EQ(set.members(), List(8));
}

}  // namespace
}  // namespace scales
