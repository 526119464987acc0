// HeapBalancerSink over fake endpoint sinks and a StaticServerSet: least-loaded choice,
// down/up marking, random placement of idle nodes, joins and leaves, parking before the
// first member list, and exactly-once completion throughout.

#include "scales/loadbalancer/heap_balancer.h"

#include <chrono>
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/forwarding_sink.h"
#include "scales/core/log.h"
#include "scales/core/random.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/server_set.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using test::CallTracker;
using test::FakeTransport;
using test::FakeTransportFactory;
using ::testing::HasSubstr;

Endpoint Ep(int i) { return Endpoint{"10.0.0." + std::to_string(i + 1), 9090}; }

ServerSet::Members Eps(std::initializer_list<int> ids) {
  ServerSet::Members m;
  for (int i : ids) m.push_back(Ep(i));
  return m;
}

// Stands for a formatter above the balancer: attaches a serialised stream to each request.
class StreamingSink final : public ForwardingSink {
 public:
  explicit StreamingSink(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream*) override {
    next_->AsyncProcessRequest(stack, msg, &stream_);
  }
  std::string_view name() const override { return "streaming"; }
  Stream stream_{"serialised"};
};

// Stands for a sink above the balancer that cancels another request from inside a response
// path, as the backup-request sink cancels the losing attempt when the other one wins: on
// the first request's response it cancels the second request (if still unanswered) and notes
// whether that one was answered by the time Cancel() returned.
class CancelSecondOnFirstResponseSink final : public ForwardingSink {
 public:
  explicit CancelSecondOnFirstResponseSink(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    stacks_.push_back(&stack);
    stack.Push(this, reinterpret_cast<void*>(stacks_.size()));  // 1-based
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream, MethodReturnMessage& msg) override {
    const auto i = reinterpret_cast<uintptr_t>(context);
    answered_.insert(i);
    if (i == 1 && stacks_.size() >= 2 && answered_.count(2) == 0) {
      cancelled_second_ = true;
      stacks_[1]->Cancel(make_error_code(Errc::kCancelled));
      second_answered_on_cancel_ = answered_.count(2) > 0;
    }
    stack.AsyncProcessResponse(stream, msg);
  }
  std::string_view name() const override { return "cancel-second"; }

  std::vector<SinkStack*> stacks_;
  std::set<uintptr_t> answered_;
  bool cancelled_second_ = false;
  bool second_answered_on_cancel_ = false;
};

class HeapBalancerTest : public ::testing::Test {
 protected:
  HeapBalancerTest() : factory_(env_.loop()), calls_(*env_.clock) {}

  void Build(ServerSet::Members members, Duration timeout = seconds(10), bool with_stream = false) {
    set_ = std::make_shared<StaticServerSet>(std::move(members));
    balancer_ = std::make_shared<HeapBalancerSink>(test::MakeContext(env_.loop(), env_.scope, set_),
                                                   factory_.AsFactory());
    SinkPtr below = balancer_;
    if (with_stream) {
      streaming_ = std::make_shared<StreamingSink>(balancer_);
      below = streaming_;
    }
    timeout_ = std::make_shared<TimeoutSink>(env_.loop(), below, env_.scope);
    dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, timeout, env_.scope);
  }

  void Open() {
    int done = 0;
    error_code result = make_error_code(Errc::kProtocolError);
    balancer_->AsyncOpen([&](error_code ec) {
      ++done;
      result = ec;
    });
    EXPECT_EQ(done, 0);
    env_.Run();
    ASSERT_EQ(done, 1);
    EXPECT_FALSE(result) << result.message();
  }

  void TearDown() override {
    if (dispatcher_) dispatcher_->Close();
    env_.Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    EXPECT_EQ(factory_.TotalInFlight(), 0u);
    dispatcher_.reset();
    timeout_.reset();
    streaming_.reset();
    balancer_.reset();
    env_.Run();
    factory_.Clear();
  }

  size_t Start(std::optional<Duration> timeout = std::nullopt) { return calls_.Start(*dispatcher_, timeout); }
  FakeTransport& Node(int i) {
    FakeTransport* f = factory_.LatestFor(Ep(i));
    EXPECT_NE(f, nullptr) << "no fake for " << Ep(i).ToString();
    return *f;
  }
  std::vector<size_t> InFlight(int n) {
    std::vector<size_t> v;
    for (int i = 0; i < n; ++i) v.push_back(Node(i).in_flight());
    return v;
  }

  test::ManualEnv env_;
  FakeTransportFactory factory_;
  CallTracker calls_;
  std::shared_ptr<StaticServerSet> set_;
  std::shared_ptr<HeapBalancerSink> balancer_;
  std::shared_ptr<StreamingSink> streaming_;
  std::shared_ptr<TimeoutSink> timeout_;
  std::shared_ptr<MessageDispatcher> dispatcher_;
};

TEST_F(HeapBalancerTest, OpenCreatesAndOpensOneSinkPerMember) {
  Build(Eps({0, 1, 2}));
  EXPECT_EQ(balancer_->status(), SinkStatus::kIdle);
  Open();
  EXPECT_EQ(balancer_->size(), 3u);
  ASSERT_EQ(factory_.count(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Node(i).open_calls(), 1u);
    EXPECT_TRUE(Node(i).opened());
    ASSERT_TRUE(Node(i).endpoint().has_value());
  }
  EXPECT_EQ(balancer_->status(), SinkStatus::kOpen);
  EXPECT_EQ(env_.CounterValue("scales_lb_joins"), 3);
  EXPECT_EQ(env_.GaugeValue("scales_lb_size"), 3);
  // A second open completes at once.
  Open();
}

TEST_F(HeapBalancerTest, LeastLoadedNodeIsChosen) {
  Build(Eps({0, 1, 2}));
  Open();
  Start();
  Start();
  env_.Run();
  auto loads = InFlight(3);
  EXPECT_EQ(loads[0] + loads[1] + loads[2], 2u);
  EXPECT_LE(std::max({loads[0], loads[1], loads[2]}), 1u) << "two requests on one node";
  int idle = loads[0] == 0 ? 0 : loads[1] == 0 ? 1 : 2;
  ASSERT_NE(balancer_->top(), nullptr);
  EXPECT_EQ(balancer_->top()->load, 0);
  EXPECT_EQ(balancer_->top()->endpoint, Ep(idle));
  Start();
  env_.Run();
  EXPECT_EQ(Node(idle).in_flight(), 1u);
  // With loads (1,1,1), answering one makes its node the least loaded again.
  ASSERT_TRUE(Node(1).Reply(0, 1));
  env_.Run();
  Start();
  env_.Run();
  EXPECT_EQ(Node(1).in_flight(), 1u);
  EXPECT_EQ(Node(1).total_requests(), 2u);
  // The endpoint is recorded on the message and in CallInfo.
  EXPECT_EQ(Node(1).request(0).message->properties.endpoint, Ep(1).ToString());
  for (int i = 0; i < 3; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, i);
  }
  env_.Run();
  for (size_t c = 0; c < calls_.size(); ++c) EXPECT_FALSE(calls_[c].info.endpoint.empty());
}

TEST_F(HeapBalancerTest, LoadFollowsOutstandingRequests) {
  Build(Eps({0, 1}));
  Open();
  for (int i = 0; i < 10; ++i) Start();
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 5u);
  EXPECT_EQ(Node(1).in_flight(), 5u);
  for (auto& n : balancer_->nodes()) EXPECT_EQ(n->load, 5);
  for (int k = 0; k < 4; ++k) Node(0).Reply(0, 0);
  env_.Run();
  // (1, 5): the next four go to node 0.
  for (int k = 0; k < 4; ++k) Start();
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 5u);
  EXPECT_EQ(Node(1).in_flight(), 5u);
  for (int i = 0; i < 2; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Fail(0, make_error_code(Errc::kServerError));
  }
  env_.Run();
  for (auto& n : balancer_->nodes()) EXPECT_EQ(n->load, 0);
}

TEST_F(HeapBalancerTest, ClosedNodeIsMarkedDownAndUpAgain) {
  Build(Eps({0, 1, 2}));
  Open();
  Node(0).set_status(SinkStatus::kClosed);
  for (int i = 0; i < 3; ++i) Start();
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 0u);
  EXPECT_EQ(Node(1).in_flight() + Node(2).in_flight(), 3u);
  EXPECT_EQ(env_.CounterValue("scales_lb_marked_down"), 1);
  EXPECT_EQ(balancer_->status(), SinkStatus::kOpen);  // other nodes are usable

  // More requests still avoid it, and it is not marked down twice.
  for (int i = 0; i < 3; ++i) Start();
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 0u);
  EXPECT_EQ(env_.CounterValue("scales_lb_marked_down"), 1);

  // Back up: the next request goes to it (it is by far the least loaded).
  Node(0).set_status(std::nullopt);
  ASSERT_EQ(Node(0).status(), SinkStatus::kOpen);
  Start();
  env_.Run();
  EXPECT_EQ(env_.CounterValue("scales_lb_marked_up"), 1);
  EXPECT_EQ(Node(0).in_flight(), 1u);
  for (int i = 0; i < 3; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, 0);
  }
}

TEST_F(HeapBalancerTest, BusyNodeIsAlsoAvoided) {
  Build(Eps({0, 1}));
  Open();
  Node(1).set_status(SinkStatus::kBusy);
  for (int i = 0; i < 4; ++i) Start();
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 4u);
  EXPECT_EQ(Node(1).in_flight(), 0u);
  while (Node(0).in_flight() > 0) Node(0).Reply(0, 0);
}

TEST_F(HeapBalancerTest, AllDownFallsBackToLeastLoadedDownNode) {
  Build(Eps({0, 1, 2}));
  Open();
  for (int i = 0; i < 3; ++i) Node(i).set_status(SinkStatus::kClosed);
  Start();
  Start();
  Start();
  env_.Run();
  EXPECT_EQ(env_.CounterValue("scales_lb_marked_down"), 3);
  EXPECT_EQ(InFlight(3), (std::vector<size_t>{1, 1, 1}));
  EXPECT_EQ(balancer_->status(), SinkStatus::kBusy);
  // Answer node 2's request: it becomes the least loaded down node.
  Node(2).Reply(0, 0);
  env_.Run();
  Start();
  env_.Run();
  EXPECT_EQ(Node(2).in_flight(), 1u);
  EXPECT_EQ(Node(2).total_requests(), 2u);
  // One node recovers: everything goes to it.
  Node(1).set_status(std::nullopt);
  Start();
  Start();
  env_.Run();
  EXPECT_EQ(Node(1).in_flight(), 3u);
  for (int i = 0; i < 3; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, 0);
  }
}

TEST_F(HeapBalancerTest, IdleNodesAreUsedInRandomOrder) {
  Build(Eps({0, 1, 2}));
  Open();
  constexpr int kRequests = 300;
  for (int k = 0; k < kRequests; ++k) {
    Start();
    env_.Run();
    int answered = 0;
    for (int i = 0; i < 3; ++i) {
      if (Node(i).in_flight() > 0) {
        Node(i).Reply(0, k);
        ++answered;
      }
    }
    ASSERT_EQ(answered, 1);
    env_.Run();
  }
  std::vector<size_t> counts;
  for (int i = 0; i < 3; ++i) counts.push_back(Node(i).total_requests());
  // Sequential requests always see three idle nodes: each should get about a third.
  for (size_t c : counts) {
    EXPECT_GE(c, 60u) << ::testing::PrintToString(counts);
    EXPECT_LE(c, 140u) << ::testing::PrintToString(counts);
  }
  EXPECT_TRUE(calls_.AllCompletedOnce());
}

TEST_F(HeapBalancerTest, SameSeedSamePlacement) {
  // Placement depends only on the loop's seeded generator.
  auto run = [](std::vector<int>* order) {
    test::ManualEnv env;
    FakeTransportFactory factory(env.loop());
    CallTracker calls(*env.clock);
    auto set = std::make_shared<StaticServerSet>(Eps({0, 1, 2, 3}));
    auto lb = std::make_shared<HeapBalancerSink>(test::MakeContext(env.loop(), env.scope, set),
                                                 factory.AsFactory());
    auto d = std::make_shared<MessageDispatcher>(env.loop(), "test", lb, seconds(1), env.scope);
    d->AsyncOpen([](error_code) {});
    env.Run();
    for (int k = 0; k < 40; ++k) {
      calls.Start(*d);
      env.Run();
      for (size_t i = 0; i < factory.count(); ++i) {
        if (factory.at(i).in_flight() > 0) {
          order->push_back(static_cast<int>(i));
          factory.at(i).Reply(0, 0);
        }
      }
      env.Run();
    }
    d->Close();
    env.Run();
    EXPECT_TRUE(calls.AllCompletedOnce());
  };
  std::vector<int> a, b;
  run(&a);
  run(&b);
  EXPECT_EQ(a.size(), 40u);
  EXPECT_EQ(a, b);
}

TEST_F(HeapBalancerTest, JoinAtRuntime) {
  Build(Eps({0, 1}));
  Open();
  Start();
  Start();
  env_.Run();
  EXPECT_EQ(InFlight(2), (std::vector<size_t>{1, 1}));
  set_->Update(Eps({0, 1, 2}));
  env_.Run();
  EXPECT_EQ(balancer_->size(), 3u);
  EXPECT_EQ(factory_.count(), 3u);
  EXPECT_EQ(Node(2).open_calls(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_lb_joins"), 3);
  Start();
  env_.Run();
  EXPECT_EQ(Node(2).in_flight(), 1u);
  // Re-announcing the same members changes nothing.
  set_->Update(Eps({2, 1, 0}));
  env_.Run();
  EXPECT_EQ(factory_.count(), 3u);
  EXPECT_EQ(env_.CounterValue("scales_lb_leaves"), 0);
  for (int i = 0; i < 3; ++i) Node(i).Reply(0, i);
}

// Membership changes are logged once per change (by the loop that reports membership), with
// who joined and who left.
TEST_F(HeapBalancerTest, JoinsAndLeavesAreLogged) {
  std::vector<std::string> records;
  const LogLevel old_level = SetLogLevel(LogLevel::kInfo);
  LogSink old_sink = SetLogSink([&](const LogRecord& r) { records.emplace_back(r.message); });
  Build(Eps({0, 1}));
  Open();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_THAT(records[0], HasSubstr("heap-balancer: joined [" + Ep(0).ToString() + ", " + Ep(1).ToString() +
                                    "], left []; 2 members now"));
  set_->Update(Eps({1, 2}));
  env_.Run();
  ASSERT_EQ(records.size(), 2u);
  EXPECT_THAT(records[1], HasSubstr("joined [" + Ep(2).ToString() + "], left [" + Ep(0).ToString() + "]"));
  set_->Update(Eps({2, 1}));  // the same members: no change, no line
  env_.Run();
  EXPECT_EQ(records.size(), 2u);
  SetLogSink(std::move(old_sink));
  SetLogLevel(old_level);
}

TEST_F(HeapBalancerTest, IdleNodeLeavingIsClosedAtOnce) {
  Build(Eps({0, 1, 2}));
  Open();
  set_->Update(Eps({1, 2}));
  env_.Run();
  EXPECT_EQ(balancer_->size(), 2u);
  EXPECT_EQ(balancer_->draining(), 0u);
  EXPECT_EQ(Node(0).close_calls(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_lb_leaves"), 1);
  EXPECT_EQ(env_.GaugeValue("scales_lb_size"), 2);
  for (int i = 0; i < 6; ++i) Start();
  env_.Run();
  EXPECT_EQ(Node(0).total_requests(), 0u);
  EXPECT_EQ(Node(1).in_flight(), 3u);
  EXPECT_EQ(Node(2).in_flight(), 3u);
  for (int i = 1; i < 3; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, 0);
  }
}

TEST_F(HeapBalancerTest, LeavingNodeFinishesItsRequestsThenCloses) {
  Build(Eps({0, 1, 2}));
  Open();
  for (int i = 0; i < 6; ++i) Start();
  env_.Run();
  ASSERT_EQ(InFlight(3), (std::vector<size_t>{2, 2, 2}));
  set_->Update(Eps({1, 2}));
  env_.Run();
  EXPECT_EQ(balancer_->size(), 2u);
  EXPECT_EQ(balancer_->draining(), 1u);
  EXPECT_EQ(Node(0).close_calls(), 0u);  // still has requests
  // New requests avoid the leaving node, although it is now the least loaded.
  Node(0).Reply(0, 7);
  env_.Run();
  for (int i = 0; i < 4; ++i) Start();
  env_.Run();
  EXPECT_EQ(Node(0).in_flight(), 1u);
  EXPECT_EQ(Node(0).total_requests(), 2u);
  EXPECT_EQ(Node(0).close_calls(), 0u);
  // Its last request completes: now it is closed.
  Node(0).Reply(0, 8);
  env_.Run();
  EXPECT_EQ(Node(0).close_calls(), 1u);
  EXPECT_EQ(balancer_->draining(), 0u);
  size_t completed_ok = 0;
  for (size_t c = 0; c < calls_.size(); ++c) completed_ok += calls_.done(c) && !calls_[c].error;
  EXPECT_EQ(completed_ok, 2u);
  for (int i = 1; i < 3; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, 0);
  }
}

TEST_F(HeapBalancerTest, DownNodeLeavingIsForgotten) {
  Build(Eps({0, 1}));
  Open();
  Node(0).set_status(SinkStatus::kClosed);
  Start();
  Start();
  env_.Run();
  ASSERT_EQ(env_.CounterValue("scales_lb_marked_down"), 1);
  set_->Update(Eps({1}));  // the down node leaves, then comes back as a new node
  env_.Run();
  set_->Update(Eps({0, 1}));
  env_.Run();
  ASSERT_EQ(factory_.ForEndpoint(Ep(0)).size(), 2u);
  Start();
  env_.Run();
  // The fresh node for endpoint 0 is healthy and idle: it gets the request.
  EXPECT_EQ(Node(0).in_flight(), 1u);
  EXPECT_EQ(env_.CounterValue("scales_lb_marked_up"), 0);
  for (int i = 0; i < 2; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, 0);
  }
}

TEST_F(HeapBalancerTest, CloseWithSeveralDrainingNodesAnswersEverything) {
  Build(Eps({0, 1, 2}));
  Open();
  for (int i = 0; i < 6; ++i) Start();
  env_.Run();
  set_->Update(Eps({2}));  // two loaded nodes leave
  env_.Run();
  EXPECT_EQ(balancer_->draining(), 2u);
  dispatcher_->Close();
  env_.Run();
  EXPECT_TRUE(calls_.AllCompletedOnce());
  for (size_t c = 0; c < calls_.size(); ++c) EXPECT_EQ(calls_[c].error, Errc::kConnectionClosed);
  EXPECT_EQ(balancer_->draining(), 0u);
  for (int i = 0; i < 3; ++i) EXPECT_GE(Node(i).close_calls(), 1u) << i;
}

TEST_F(HeapBalancerTest, EmptyServerSetFailsWithNoMembers) {
  Build({});
  Open();  // an empty set still opens
  auto c = Start();
  EXPECT_EQ(calls_[c].completions, 0);  // deferred, as every completion of an initiating call
  env_.Run();
  EXPECT_EQ(calls_[c].error, Errc::kNoMembers);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("no members"));
  EXPECT_EQ(env_.CounterValue("scales_lb_no_members"), 1);
  EXPECT_EQ(factory_.count(), 0u);
}

TEST_F(HeapBalancerTest, EmptyServerSetWithoutOpenFailsAfterTheFirstList) {
  Build({});
  auto c = Start();  // subscribes; the (empty) list arrives on a later turn
  env_.Run();
  EXPECT_EQ(calls_[c].error, Errc::kNoMembers);
}

TEST_F(HeapBalancerTest, EveryMemberLeavingGivesNoMembers) {
  Build(Eps({0, 1}));
  Open();
  set_->Update({});
  env_.Run();
  EXPECT_EQ(balancer_->size(), 0u);
  auto c = Start();
  env_.Run();
  EXPECT_EQ(calls_[c].error, Errc::kNoMembers);
  // And members coming back are used again.
  set_->Update(Eps({1}));
  env_.Run();
  auto d = Start();
  env_.Run();
  ASSERT_EQ(Node(1).in_flight(), 1u);
  Node(1).Reply(0, 5);
  env_.Run();
  EXPECT_EQ(calls_[d].value, 5);
}

TEST_F(HeapBalancerTest, RequestsBeforeTheFirstMemberListAreParkedThenRouted) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Eps({0, 1}));
  auto a = Start();
  auto b = Start();
  env_.Run();  // the member list arrives; the nodes are opening
  ASSERT_EQ(factory_.count(), 2u);
  EXPECT_EQ(factory_.TotalInFlight(), 0u);
  EXPECT_FALSE(calls_.done(a));
  EXPECT_EQ(balancer_->status(), SinkStatus::kIdle);
  Node(1).CompleteOpen();
  env_.Run();
  // Routed once a node finished opening (least loaded: one each).
  EXPECT_EQ(factory_.TotalInFlight(), 2u);
  EXPECT_EQ(balancer_->status(), SinkStatus::kOpen);
  Node(0).CompleteOpen();
  env_.Run();
  for (int i = 0; i < 2; ++i) {
    while (Node(i).in_flight() > 0) Node(i).Reply(0, 3);
  }
  env_.Run();
  EXPECT_EQ(calls_[a].value, 3);
  EXPECT_EQ(calls_[b].value, 3);
}

TEST_F(HeapBalancerTest, ParkedRequestsKeepTheirStream) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Eps({0}), seconds(10), /*with_stream=*/true);
  Start();
  env_.Run();
  Node(0).CompleteOpen();
  env_.Run();
  ASSERT_EQ(Node(0).in_flight(), 1u);
  EXPECT_EQ(Node(0).request(0).stream, &streaming_->stream_);
  Node(0).Reply(0, 1);
  // After the balancer is ready, requests pass their stream straight through.
  Start();
  env_.Run();
  ASSERT_EQ(Node(0).in_flight(), 1u);
  EXPECT_EQ(Node(0).request(0).stream, &streaming_->stream_);
  Node(0).Reply(0, 1);
}

TEST_F(HeapBalancerTest, ParkedRequestIsCancelledByItsTimeout) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Eps({0}), milliseconds(100));
  auto c = Start();
  env_.Run();
  env_.Advance(milliseconds(100) - nanoseconds(1));
  EXPECT_FALSE(calls_.done(c));
  env_.Advance(nanoseconds(1));
  EXPECT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("server set"));
  // The open completing later does not route (or complete) it again.
  Node(0).CompleteOpen();
  env_.Run();
  EXPECT_EQ(Node(0).total_requests(), 0u);
  EXPECT_EQ(calls_[c].completions, 1);
}

// Members known, their endpoints' opens still pending (a slow connect): a request that times
// out, or is answered by Close(), says it waited for an endpoint to open and names it. It used
// to say "waiting for the server set's first members", pointing at discovery, which had
// answered long before.
TEST_F(HeapBalancerTest, ParkedRequestWaitingForAnEndpointToOpenNamesIt) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Eps({0}), milliseconds(100));
  auto c = Start();
  env_.Run();
  env_.Advance(milliseconds(100));
  ASSERT_EQ(calls_[c].error, Errc::kRequestTimeout);
  EXPECT_THAT(calls_[c].info.detail, HasSubstr("to open (" + Ep(0).ToString() + ")"));
  EXPECT_THAT(calls_[c].info.detail, ::testing::Not(HasSubstr("first members")));
  auto d = Start();
  env_.Run();
  dispatcher_->Close();
  env_.Run();
  ASSERT_EQ(calls_[d].error, Errc::kClientClosed);
  EXPECT_THAT(calls_[d].info.detail, HasSubstr("to open (" + Ep(0).ToString() + ")"));
}

TEST_F(HeapBalancerTest, ParkedRequestsFailWhenTheBalancerCloses) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Eps({0}));
  auto c = Start();
  env_.Run();
  dispatcher_->Close();
  env_.Run();
  EXPECT_EQ(calls_[c].error, Errc::kClientClosed);
  EXPECT_EQ(balancer_->status(), SinkStatus::kClosed);
  auto d = Start();
  env_.Run();
  EXPECT_EQ(calls_[d].error, Errc::kClientClosed);
}

// The parked requests are routed one after the other when the first node opens. One that a
// sink above cancels from inside an earlier one's response path is still parked: the balancer
// answers it at once, and it never reaches an endpoint.
TEST_F(HeapBalancerTest, ParkedRequestCancelledWhileTheParkedAreRoutedIsAnsweredAtOnce) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  factory_.on_create = [](FakeTransport& f) { f.set_auto_reply(7); };  // answers inside Route
  set_ = std::make_shared<StaticServerSet>(Eps({0}));
  balancer_ = std::make_shared<HeapBalancerSink>(test::MakeContext(env_.loop(), env_.scope, set_),
                                                 factory_.AsFactory());
  auto canceller = std::make_shared<CancelSecondOnFirstResponseSink>(balancer_);
  timeout_ = std::make_shared<TimeoutSink>(env_.loop(), canceller, env_.scope);
  dispatcher_ = std::make_shared<MessageDispatcher>(env_.loop(), "test", timeout_, seconds(10), env_.scope);
  auto a = Start();
  auto b = Start();
  env_.Run();
  ASSERT_FALSE(calls_.done(a));
  ASSERT_FALSE(calls_.done(b));
  Node(0).CompleteOpen();
  env_.Run();
  ASSERT_TRUE(canceller->cancelled_second_);
  EXPECT_TRUE(canceller->second_answered_on_cancel_) << "CancelRequest did not answer the parked request";
  EXPECT_EQ(Node(0).total_requests(), 1u) << "a cancelled request was sent to the endpoint";
  EXPECT_EQ(calls_[a].value, 7);
  EXPECT_EQ(calls_[b].error, Errc::kCancelled);
}

// The same member list delivered again (a discovery watch firing twice) while the first node
// is still opening does not complete the open early: it waits for a node to finish opening.
TEST_F(HeapBalancerTest, RepeatedMemberListDoesNotCompleteTheOpenBeforeANodeOpened) {
  factory_.open_mode = FakeTransport::OpenMode::kHang;
  Build(Eps({0, 1}));
  int done = 0;
  balancer_->AsyncOpen([&](error_code ec) {
    ++done;
    EXPECT_FALSE(ec);
  });
  env_.Run();
  ASSERT_EQ(balancer_->size(), 2u);
  set_->Update(Eps({0, 1}));
  env_.Run();
  EXPECT_EQ(done, 0) << "open completed while every node was still opening";
  EXPECT_EQ(balancer_->status(), SinkStatus::kIdle);
  Node(1).CompleteOpen();
  env_.Run();
  EXPECT_EQ(done, 1);
  EXPECT_EQ(balancer_->status(), SinkStatus::kOpen);
  Node(0).CompleteOpen();
  env_.Run();
  EXPECT_EQ(done, 1);
}

TEST_F(HeapBalancerTest, FailedOpenStillMakesTheBalancerReady) {
  factory_.open_mode = FakeTransport::OpenMode::kFail;
  factory_.open_error = make_error_code(Errc::kConnectFailed);
  Build(Eps({0}));
  auto c = Start();
  env_.Run();
  // The node's open failed (the fake is now Closed): the request is still answered once.
  EXPECT_EQ(calls_[c].completions, 1);
  EXPECT_TRUE(calls_[c].error);
  EXPECT_EQ(balancer_->status(), SinkStatus::kBusy);
}

TEST_F(HeapBalancerTest, CloseClosesEveryNodeAndAnswersInFlight) {
  Build(Eps({0, 1}));
  Open();
  Start();
  Start();
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_lb_size"), 2);
  dispatcher_->Close();
  EXPECT_EQ(Node(0).close_calls(), 1u);
  EXPECT_EQ(Node(1).close_calls(), 1u);
  env_.Run();
  EXPECT_TRUE(calls_.AllCompletedOnce());
  // A closed balancer serves no endpoint (as the pools' and connections' gauges drop to 0).
  EXPECT_EQ(env_.GaugeValue("scales_lb_size"), 0);
  // Membership changes after close are ignored.
  set_->Update(Eps({0, 1, 2}));
  env_.Run();
  EXPECT_EQ(factory_.count(), 2u);
  EXPECT_EQ(env_.GaugeValue("scales_lb_size"), 0);
  // Nor does its destruction count the members out again.
  dispatcher_.reset();
  timeout_.reset();
  streaming_.reset();
  balancer_.reset();
  env_.Run();
  EXPECT_EQ(env_.GaugeValue("scales_lb_size"), 0);
}


// Random requests, replies, failures, timeouts, health flips, joins and leaves. Invariants:
// a request goes to a current member, to a usable one whenever one exists, and to one with
// the least load among the usable ones; every call completes exactly once.
TEST_F(HeapBalancerTest, RandomOperationsKeepTheInvariants) {
  Build(Eps({0, 1, 2}), milliseconds(300));
  Open();
  Random rng(test::TestSeed(99));
  std::set<int> members = {0, 1, 2};
  size_t routed = 0;
  for (int step = 0; step < 3000; ++step) {
    const uint64_t op = rng.Uniform(100);
    if (op < 40) {
      // Snapshot of what the balancer knows, then one request.
      std::map<const ClientMessageSink*, std::pair<int64_t, bool>> before;
      int64_t min_usable = INT64_MAX;
      for (auto& n : balancer_->nodes()) {
        SinkStatus st = n->sink->status();
        bool usable = st == SinkStatus::kOpen || st == SinkStatus::kIdle;
        before[n->sink.get()] = {n->load, usable};
        if (usable) min_usable = std::min(min_usable, n->load);
      }
      std::map<const FakeTransport*, size_t> counts;
      for (auto& f : factory_.created()) counts[f.get()] = f->total_requests();
      auto c = Start(milliseconds(50 + static_cast<int64_t>(rng.Uniform(400))));
      env_.Run();
      const FakeTransport* got = nullptr;
      for (auto& f : factory_.created()) {
        if (f->total_requests() != counts[f.get()]) {
          ASSERT_EQ(got, nullptr) << "one request reached two sinks";
          got = f.get();
        }
      }
      if (before.empty()) {
        ASSERT_EQ(got, nullptr);
        ASSERT_EQ(calls_[c].error, Errc::kNoMembers);
        continue;
      }
      ASSERT_NE(got, nullptr) << "step " << step;
      ++routed;
      auto it = before.find(got);
      ASSERT_NE(it, before.end()) << "request sent to a node that is not a member (step " << step << ")";
      if (min_usable != INT64_MAX) {
        EXPECT_TRUE(it->second.second) << "unusable node chosen although a usable one exists, step " << step;
        EXPECT_EQ(it->second.first, min_usable) << "not the least loaded usable node, step " << step;
      }
    } else if (op < 60) {
      // Answer a random in-flight request (value or error).
      std::vector<FakeTransport*> busy;
      for (auto& f : factory_.created()) {
        if (f->in_flight() > 0) busy.push_back(f.get());
      }
      if (busy.empty()) continue;
      FakeTransport* f = busy[rng.Uniform(busy.size())];
      size_t i = rng.Uniform(f->in_flight());
      if (rng.Uniform(2) == 0) {
        f->Reply(i, 1);
      } else {
        f->Fail(i, make_error_code(Errc::kServerError));
      }
      env_.Run();
    } else if (op < 72) {
      // Flip the health of a current member.
      int id = static_cast<int>(rng.Uniform(5));
      if (!members.count(id)) continue;
      const SinkStatus choices[] = {SinkStatus::kOpen, SinkStatus::kBusy, SinkStatus::kClosed};
      if (rng.Uniform(3) == 0) {
        Node(id).set_status(std::nullopt);
      } else {
        Node(id).set_status(choices[rng.Uniform(3)]);
      }
    } else if (op < 80) {
      // A member joins or leaves.
      int id = static_cast<int>(rng.Uniform(5));
      if (members.count(id)) {
        members.erase(id);
      } else {
        members.insert(id);
      }
      ServerSet::Members m;
      for (int i : members) m.push_back(Ep(i));
      set_->Update(m);
      env_.Run();
      ASSERT_EQ(balancer_->size(), members.size());
    } else {
      env_.Advance(milliseconds(static_cast<int64_t>(rng.Uniform(100))));
    }
    ASSERT_TRUE(calls_.NoneCompletedTwice()) << "step " << step;
    // Loads match what the fakes hold.
    int64_t total_load = 0;
    for (auto& n : balancer_->nodes()) total_load += n->load;
    size_t held_by_members = 0;
    for (auto& n : balancer_->nodes()) held_by_members += static_cast<FakeTransport*>(n->sink.get())->in_flight();
    ASSERT_EQ(static_cast<size_t>(total_load), held_by_members) << "step " << step;
  }
  EXPECT_GT(routed, 500u);
  // Let everything finish: the remaining requests time out.
  env_.Advance(seconds(1));
  EXPECT_EQ(factory_.TotalInFlight(), 0u);
  EXPECT_TRUE(calls_.AllCompletedOnce());
}

}  // namespace
}  // namespace scales
