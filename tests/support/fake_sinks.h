#pragma once
// Fake sinks and call helpers for deterministic unit tests of the sink machinery: a fake
// transport whose open, status and replies the test controls, a factory that creates fakes
// and keeps them, and a tracker that runs TypedCall<int> calls through a MessageDispatcher
// and counts completions (every call must complete exactly once).
//
// Everything here runs on one EventLoop of a Runtime in manual mode (ManualClock,
// start_threads = false); none of it is thread safe.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "scales/core/clock.h"
#include "scales/core/dispatcher.h"
#include "scales/core/provider.h"
#include "scales/core/runtime.h"
#include "scales/core/sink.h"
#include "scales/core/sink_stack.h"
#include "scales/discovery/server_set.h"
#include "scales/stats/stats.h"

namespace scales::test {

// A bottom-of-the-stack sink (a connection, or a whole endpoint chain) that holds every
// request until the test answers it.
//
// Contract it follows (sink.h): open handlers never run inside AsyncOpen; several
// concurrent opens complete together; a held request installs a cancel handler and is
// answered at once by CancelRequest; Close() answers every held request synchronously
// (kConnectionClosed) and completes pending opens (kClientClosed); requests after Close()
// fail synchronously with kConnectionClosed. A failed open leaves the fake Closed, like a
// real transport whose connect failed.
class FakeTransport final : public ClientMessageSink {
 public:
  enum class OpenMode {
    kSucceed,  // open completes successfully on a later loop turn
    kFail,     // open completes with open_error() on a later loop turn
    kHang,     // open stays pending until CompleteOpen() or Close()
  };

  struct Request {
    SinkStack* stack = nullptr;
    MethodCallMessage* message = nullptr;
    Stream* stream = nullptr;
    uint64_t id = 0;  // order of arrival over the fake's life, from 1
  };

  FakeTransport(EventLoop& loop, std::optional<Endpoint> endpoint, size_t serial);

  // --- configuration -------------------------------------------------------------------
  void set_open_mode(OpenMode mode, error_code error = {}) {
    open_mode_ = mode;
    open_error_ = error;
  }
  const error_code& open_error() const noexcept { return open_error_; }
  // Overrides the status the fake reports (nullopt: report the real one).
  void set_status(std::optional<SinkStatus> status) { status_override_ = status; }
  // When set, requests are answered synchronously, inside AsyncProcessRequest, with `value`.
  void set_auto_reply(std::optional<int> value) { auto_reply_ = value; }
  // When set, a cancelled request also kills the fake (as an HTTP/1.1 connection with an
  // unanswered request must be closed).
  void set_close_on_cancel(bool v) { close_on_cancel_ = v; }
  // When set, the fake says the requests it holds were sent nowhere (RequestUnsent), as a
  // pool's queue does: Asio's `total` cancellation (SinkStack::CancelUnsent) may cancel them.
  void set_holds_unsent(bool v) { holds_unsent_ = v; }

  // --- ClientMessageSink ---------------------------------------------------------------
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  bool RequestUnsent(const SinkStack&, void*) const override { return holds_unsent_; }
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "fake-transport"; }

  // --- test control --------------------------------------------------------------------
  // Answers the i-th held request (oldest first) with success and `value` written into the
  // call's int reply slot. Returns false if there is no such request.
  bool Reply(size_t i = 0, int value = 0);
  // Answers the i-th held request with an error.
  bool Fail(size_t i, error_code ec, std::string detail = "fake failure");
  // Completes the pending opens (OpenMode::kHang) with `ec`.
  void CompleteOpen(error_code ec = {});
  // Raises on_faulted.
  void RaiseFault(error_code ec, std::string detail = "fake fault") { on_faulted_.Set(Fault{ec, std::move(detail)}); }

  // --- observations --------------------------------------------------------------------
  size_t in_flight() const noexcept { return requests_.size(); }
  const Request& request(size_t i) const { return requests_.at(i); }
  const std::deque<Request>& requests() const noexcept { return requests_; }
  // Requests that reached the fake, answered or not.
  size_t total_requests() const noexcept { return total_requests_; }
  // Streams of every request that reached the fake, in order.
  const std::vector<Stream*>& streams_seen() const noexcept { return streams_seen_; }
  size_t open_calls() const noexcept { return open_calls_; }
  size_t pending_opens() const noexcept { return open_waiters_.size(); }
  size_t close_calls() const noexcept { return close_calls_; }
  size_t cancels() const noexcept { return cancels_; }
  bool closed() const noexcept { return closed_; }
  bool opened() const noexcept { return opened_; }
  const std::optional<Endpoint>& endpoint() const noexcept { return endpoint_; }
  // Creation order within its factory (0-based).
  size_t serial() const noexcept { return serial_; }
  TimePoint created_at() const noexcept { return created_at_; }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  void Answer(Request r, MethodReturnMessage& m);
  void Shutdown();  // Close() without counting it as the owner's close

  EventLoop& loop_;
  std::optional<Endpoint> endpoint_;
  size_t serial_;
  TimePoint created_at_;
  OpenMode open_mode_ = OpenMode::kSucceed;
  error_code open_error_;
  std::optional<SinkStatus> status_override_;
  std::optional<int> auto_reply_;
  bool close_on_cancel_ = false;
  bool holds_unsent_ = false;
  bool opened_ = false;
  bool closed_ = false;
  bool open_scheduled_ = false;
  OpenWaiters open_waiters_;
  std::deque<Request> requests_;
  std::vector<Stream*> streams_seen_;
  uint64_t next_id_ = 0;
  size_t total_requests_ = 0;
  size_t open_calls_ = 0;
  size_t close_calls_ = 0;
  size_t cancels_ = 0;
};

// Creates FakeTransports (as a SinkFactory: a pool's connection factory, a balancer's
// endpoint factory, a resurrector's child factory) and keeps every one it created, so tests
// can drive them and see them after their owner dropped them.
class FakeTransportFactory {
 public:
  explicit FakeTransportFactory(EventLoop& loop) : loop_(loop) {}
  FakeTransportFactory(const FakeTransportFactory&) = delete;
  FakeTransportFactory& operator=(const FakeTransportFactory&) = delete;

  // The factory function; it refers to *this, which must outlive every use.
  SinkFactory AsFactory();
  std::shared_ptr<FakeTransport> Create(const SinkContext& ctx);

  // Settings applied to every fake created from now on.
  FakeTransport::OpenMode open_mode = FakeTransport::OpenMode::kSucceed;
  error_code open_error;
  // Called on every new fake after the settings above (may change them).
  std::function<void(FakeTransport&)> on_create;

  size_t count() const noexcept { return created_.size(); }
  FakeTransport& at(size_t i) const { return *created_.at(i); }
  FakeTransport& last() const { return *created_.back(); }
  const std::vector<std::shared_ptr<FakeTransport>>& created() const noexcept { return created_; }
  // Fakes created for `endpoint`, in creation order.
  std::vector<FakeTransport*> ForEndpoint(const Endpoint& endpoint) const;
  // The newest fake for `endpoint`, or nullptr.
  FakeTransport* LatestFor(const Endpoint& endpoint) const;
  // Sum of in_flight() over every fake.
  size_t TotalInFlight() const;
  // Drops the factory's references (at the end of a test, after the sinks are closed).
  void Clear() { created_.clear(); }

 private:
  EventLoop& loop_;
  std::vector<std::shared_ptr<FakeTransport>> created_;
};

// Runs TypedCall<int> calls through a MessageDispatcher and records how each completed.
class CallTracker {
 public:
  struct Record {
    int completions = 0;
    error_code error;
    int value = 0;
    // The handler ran while Dispatch() was still on the stack.
    bool completed_inside_dispatch = false;
    // Dispatched as an initiating call (its handler must never run inside Dispatch()).
    bool initiating = true;
    TimePoint completed_at{};
    CallInfo info;
  };

  explicit CallTracker(Clock& clock) : state_(std::make_shared<State>(clock)) {}

  // Starts one call; returns its index. `timeout` overrides the dispatcher's default
  // (CallOptions::timeout semantics: zero = none).
  size_t Start(MessageDispatcher& dispatcher, std::optional<Duration> timeout = std::nullopt,
               bool initiating = true, std::string method = "Get");
  // Same, through any dispatch function (ClientCore::Dispatch, ...).
  size_t StartWith(const std::function<void(CallBase*)>& dispatch,
                   std::optional<Duration> timeout = std::nullopt, std::string method = "Get");

  size_t size() const noexcept { return state_->records.size(); }
  const Record& operator[](size_t i) const { return state_->records.at(i); }
  bool done(size_t i) const { return state_->records.at(i).completions > 0; }
  // Calls completed at least once.
  size_t completed() const;
  // Sum of completions over all calls (== completed() when none completed twice).
  int total_completions() const;
  // GoogleTest assertions: every call completed exactly once (and no initiating call inside
  // its Dispatch()) / none completed twice.
  ::testing::AssertionResult AllCompletedOnce() const;
  ::testing::AssertionResult NoneCompletedTwice() const;

 private:
  struct State {
    explicit State(Clock& c) : clock(c) {}
    Clock& clock;
    std::deque<Record> records;
    bool in_dispatch = false;
  };
  std::shared_ptr<State> state_;
};

// A manual-mode runtime (one loop, no threads, ManualClock, seed 42) with its own stats
// registry. Declare it before every sink that uses it so it outlives them.
struct ManualEnv {
  ManualEnv();
  ~ManualEnv();
  ManualEnv(const ManualEnv&) = delete;
  ManualEnv& operator=(const ManualEnv&) = delete;

  EventLoop& loop() { return runtime.loop(0); }
  // Runs posted work until nothing is ready.
  size_t Run() { return runtime.RunUntilIdle(); }
  // Moves the clock and runs what became due.
  void Advance(Duration d) {
    clock->Advance(d);
    runtime.RunUntilIdle();
  }
  TimePoint Now() const { return clock->Now(); }
  // Value of a counter / gauge with the scope's labels plus `extra`; 0 when absent.
  int64_t CounterValue(std::string_view name, stats::Labels extra = {}) const;
  int64_t GaugeValue(std::string_view name, stats::Labels extra = {}) const;

  std::shared_ptr<ManualClock> clock;
  Runtime runtime;
  stats::StatsRegistry registry;
  stats::StatsScope scope;  // {client="test"}
};

// Seed for the randomised (but deterministic) tests: `fallback`, or $SCALES_TEST_SEED when set
// (to explore other sequences locally).
uint64_t TestSeed(uint64_t fallback);

// A SinkContext for `loop` with the given stats scope, server set and endpoint.
SinkContext MakeContext(EventLoop& loop, const stats::StatsScope& stats,
                        std::shared_ptr<ServerSet> server_set = nullptr,
                        std::optional<Endpoint> endpoint = std::nullopt);

}  // namespace scales::test
