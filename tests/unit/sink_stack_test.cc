// SinkStack: push/unwind order, inline and overflow storage, the cancellation hook.

#include "scales/core/sink_stack.h"

#include "scales/core/observable.h"

#include <string>
#include <utility>
#include <vector>

#include <boost/asio/deferred.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace scales {
namespace {

using ::testing::ElementsAre;

struct Event {
  std::string sink;
  void* context;
  error_code error;
};

// Records the responses it sees (and the cancellations it is asked for); passes responses on
// unless it is the terminal one.
class RecordingSink final : public ClientMessageSink {
 public:
  RecordingSink(std::string label, std::vector<Event>* log, bool terminal = false)
      : label_(std::move(label)), log_(log), terminal_(terminal) {}

  void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override {
    log_->push_back({label_, context, msg.error});
    depth_seen_.push_back(stack.depth());
    if (!terminal_) stack.AsyncProcessResponse(stream, msg);
  }
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override {
    ++cancels_;
    cancel_context_ = context;
    cancel_reason_ = reason;
    handler_present_during_cancel_ = stack.has_cancel_handler();
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return label_; }

  int cancels_ = 0;
  void* cancel_context_ = nullptr;
  error_code cancel_reason_;
  bool handler_present_during_cancel_ = true;
  std::vector<size_t> depth_seen_;

 protected:
  void DoOpen(OpenHandler) override {}

 private:
  std::string label_;
  std::vector<Event>* log_;
  bool terminal_;
};

std::vector<std::string> Labels(const std::vector<Event>& log) {
  std::vector<std::string> out;
  for (auto& e : log) out.push_back(e.sink);
  return out;
}

TEST(SinkStackTest, UnwindsInReverseOrderOfPush) {
  std::vector<Event> log;
  RecordingSink top("top", &log, /*terminal=*/true), mid("mid", &log), bottom("bottom", &log);
  MethodCallMessage message;
  SinkStack stack(message);
  EXPECT_EQ(&stack.message(), &message);
  int a = 1, b = 2, c = 3;
  stack.Push(&top, &a);
  stack.Push(&mid, &b);
  stack.Push(&bottom, &c);
  EXPECT_EQ(stack.depth(), 3u);

  auto msg = MethodReturnMessage::Failure(make_error_code(Errc::kServerError), "x");
  stack.AsyncProcessResponse(nullptr, msg);

  EXPECT_THAT(Labels(log), ElementsAre("bottom", "mid", "top"));
  EXPECT_EQ(log[0].context, &c);
  EXPECT_EQ(log[1].context, &b);
  EXPECT_EQ(log[2].context, &a);
  for (auto& e : log) EXPECT_EQ(e.error, Errc::kServerError);
  EXPECT_EQ(stack.depth(), 0u);
  // Each sink sees the stack with its own entry already popped.
  EXPECT_THAT(bottom.depth_seen_, ElementsAre(2u));
  EXPECT_THAT(mid.depth_seen_, ElementsAre(1u));
  EXPECT_THAT(top.depth_seen_, ElementsAre(0u));
}

TEST(SinkStackTest, DefaultContextIsNull) {
  std::vector<Event> log;
  RecordingSink top("top", &log, true);
  MethodCallMessage message;
  SinkStack stack(message);
  stack.Push(&top);
  auto msg = MethodReturnMessage::Ok();
  stack.AsyncProcessResponse(nullptr, msg);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_EQ(log[0].context, nullptr);
  EXPECT_FALSE(log[0].error);
}

TEST(SinkStackTest, DeeperThanInlineStorageKeepsOrderAndContexts) {
  constexpr size_t kDepth = SinkStack::kInlineDepth * 2 + 3;  // 19: 8 inline, 11 overflow
  std::vector<Event> log;
  std::vector<std::unique_ptr<RecordingSink>> sinks;
  std::vector<int> contexts(kDepth);
  MethodCallMessage message;
  SinkStack stack(message);
  for (size_t i = 0; i < kDepth; ++i) {
    contexts[i] = static_cast<int>(i);
    sinks.push_back(std::make_unique<RecordingSink>("s" + std::to_string(i), &log, /*terminal=*/i == 0));
    stack.Push(sinks.back().get(), &contexts[i]);
  }
  EXPECT_EQ(stack.depth(), kDepth);
  auto msg = MethodReturnMessage::Ok();
  stack.AsyncProcessResponse(nullptr, msg);
  ASSERT_EQ(log.size(), kDepth);
  for (size_t k = 0; k < kDepth; ++k) {
    const size_t i = kDepth - 1 - k;
    EXPECT_EQ(log[k].sink, "s" + std::to_string(i));
    EXPECT_EQ(log[k].context, &contexts[i]);
  }
  EXPECT_EQ(stack.depth(), 0u);
}

// A sink pushed after part of the stack was already unwound (a retry re-sending the request
// below the point the response reached) lands in the right slot, across the inline boundary.
TEST(SinkStackTest, PushAfterPartialUnwindAcrossInlineBoundary) {
  std::vector<Event> log;
  std::vector<std::unique_ptr<RecordingSink>> sinks;
  MethodCallMessage message;
  SinkStack stack(message);
  for (size_t i = 0; i < SinkStack::kInlineDepth + 1; ++i) {
    sinks.push_back(std::make_unique<RecordingSink>("a" + std::to_string(i), &log, /*terminal=*/true));
    stack.Push(sinks.back().get());
  }
  // Pop the overflow entry and one inline entry (the terminal sinks stop after themselves).
  auto msg = MethodReturnMessage::Ok();
  stack.AsyncProcessResponse(nullptr, msg);
  stack.AsyncProcessResponse(nullptr, msg);
  EXPECT_THAT(Labels(log), ElementsAre("a8", "a7"));
  EXPECT_EQ(stack.depth(), SinkStack::kInlineDepth - 1);
  RecordingSink again1("b1", &log, true), again2("b2", &log, true);
  stack.Push(&again1);  // inline slot 7
  stack.Push(&again2);  // overflow
  log.clear();
  for (int i = 0; i < 3; ++i) stack.AsyncProcessResponse(nullptr, msg);
  EXPECT_THAT(Labels(log), ElementsAre("b2", "b1", "a6"));
}

TEST(SinkStackTest, CancelCallsTheHandlerOnceAndClearsIt) {
  std::vector<Event> log;
  RecordingSink holder("holder", &log);
  MethodCallMessage message;
  SinkStack stack(message);
  int ctx = 7;
  EXPECT_FALSE(stack.has_cancel_handler());
  stack.SetCancelHandler(&holder, &ctx);
  EXPECT_TRUE(stack.has_cancel_handler());
  EXPECT_FALSE(stack.cancelled());

  stack.Cancel(make_error_code(Errc::kRequestTimeout));
  EXPECT_EQ(holder.cancels_, 1);
  EXPECT_EQ(holder.cancel_context_, &ctx);
  EXPECT_EQ(holder.cancel_reason_, Errc::kRequestTimeout);
  // Cleared before the sink is called, so the sink may re-park or answer freely.
  EXPECT_FALSE(holder.handler_present_during_cancel_);
  EXPECT_FALSE(stack.has_cancel_handler());
  EXPECT_TRUE(stack.cancelled());
  EXPECT_EQ(stack.cancel_reason(), Errc::kRequestTimeout);

  // A second Cancel is a no-op and keeps the first reason.
  stack.SetCancelHandler(&holder, &ctx);
  stack.Cancel(make_error_code(Errc::kCancelled));
  EXPECT_EQ(holder.cancels_, 1);
  EXPECT_EQ(stack.cancel_reason(), Errc::kRequestTimeout);
}

TEST(SinkStackTest, ResponseClearsTheCancelHandler) {
  std::vector<Event> log;
  RecordingSink top("top", &log, true), holder("holder", &log);
  MethodCallMessage message;
  SinkStack stack(message);
  stack.Push(&top);
  stack.SetCancelHandler(&holder);
  auto msg = MethodReturnMessage::Ok();
  stack.AsyncProcessResponse(nullptr, msg);
  EXPECT_FALSE(stack.has_cancel_handler());
  stack.Cancel(make_error_code(Errc::kRequestTimeout));
  EXPECT_EQ(holder.cancels_, 0);
  EXPECT_TRUE(stack.cancelled());
}

TEST(SinkStackTest, ClearCancelHandler) {
  std::vector<Event> log;
  RecordingSink holder("holder", &log);
  MethodCallMessage message;
  SinkStack stack(message);
  stack.SetCancelHandler(&holder);
  stack.ClearCancelHandler();
  EXPECT_FALSE(stack.has_cancel_handler());
  stack.Cancel(make_error_code(Errc::kCancelled));
  EXPECT_EQ(holder.cancels_, 0);
}

TEST(SinkStackTest, CancelWithoutHandlerOnlyMarksTheStack) {
  MethodCallMessage message;
  SinkStack stack(message);
  EXPECT_FALSE(stack.cancelled());
  EXPECT_FALSE(stack.cancel_reason());
  stack.Cancel(make_error_code(Errc::kCancelled));
  EXPECT_TRUE(stack.cancelled());
  EXPECT_EQ(stack.cancel_reason(), Errc::kCancelled);
  EXPECT_EQ(stack.depth(), 0u);
}

TEST(SinkStackTest, DefaultCancelRequestAnswersTheRequest) {
  // A sink that parks a request without overriding CancelRequest still answers it once.
  std::vector<Event> log;
  RecordingSink top("top", &log, true);
  class Parker final : public ClientMessageSink {
   public:
    void AsyncProcessRequest(SinkStack& stack, MethodCallMessage&, Stream*) override {
      stack.SetCancelHandler(this);
    }
    void Close() override {}
    SinkStatus status() const override { return SinkStatus::kOpen; }
    std::string_view name() const override { return "parker"; }

   protected:
    void DoOpen(OpenHandler) override {}
  } parker;
  MethodCallMessage message;
  SinkStack stack(message);
  stack.Push(&top);
  parker.AsyncProcessRequest(stack, message, nullptr);
  stack.Cancel(make_error_code(Errc::kCancelled));
  ASSERT_EQ(log.size(), 1u);
  EXPECT_EQ(log[0].error, Errc::kCancelled);
}

TEST(SinkStackTest, DeadlineTimerStorageIsUnscheduled) {
  MethodCallMessage message;
  SinkStack stack(message);
  EXPECT_FALSE(stack.deadline_timer().scheduled());
}

TEST(MethodCallMessageTest, TypedPayloadAndReplySlot) {
  MethodCallMessage msg;
  int payload = 5;
  std::string reply;
  EXPECT_EQ(msg.payload<int>(), nullptr);
  msg.SetPayload(&payload);
  msg.SetReplySlot(&reply);
  EXPECT_EQ(msg.payload<int>(), &payload);
  EXPECT_EQ(msg.payload<long>(), nullptr);  // wrong type: no access
  EXPECT_EQ(msg.reply_slot<std::string>(), &reply);
  EXPECT_EQ(msg.reply_slot<int>(), nullptr);
  EXPECT_TRUE(MethodReturnMessage::Ok().ok());
  auto f = MethodReturnMessage::Failure(make_error_code(Errc::kNack), "nope");
  EXPECT_FALSE(f.ok());
  EXPECT_EQ(f.detail, "nope");
}

// A subscriber that raises the observable again (a fault handler whose reaction faults the same
// sink) must not make the outer notification skip or repeat subscribers: the inner Set() used to
// compact the subscriber list under the outer one's index, so B missed the first value and C
// got both.
TEST(ObservableTest, ASetFromInsideANotificationSkipsAndRepeatsNoSubscriber) {
  Observable<int> o;
  std::vector<int> b_seen, c_seen;
  uint64_t a = 0;
  a = o.Subscribe([&](const int& v) {
    o.Unsubscribe(a);
    o.Set(v + 1);
  });
  o.Subscribe([&](const int& v) { b_seen.push_back(v); });
  o.Subscribe([&](const int& v) { c_seen.push_back(v); });
  o.Set(1);
  EXPECT_THAT(b_seen, ElementsAre(2, 1));
  EXPECT_EQ(b_seen, c_seen);
  EXPECT_EQ(o.subscriber_count(), 2u);
  o.Set(5);
  EXPECT_THAT(c_seen, ElementsAre(2, 1, 5));
}

// Counts its opens; says when it is destroyed, and how many opens it had by then.
class OpenRecordingSink final : public ClientMessageSink {
 public:
  explicit OpenRecordingSink(int* opens_when_destroyed) : opens_when_destroyed_(opens_when_destroyed) {}
  ~OpenRecordingSink() override { *opens_when_destroyed_ = opens; }
  void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kIdle; }
  std::string_view name() const override { return "open-recording"; }

  int opens = 0;

 protected:
  void DoOpen(OpenHandler) override { ++opens; }

 private:
  int* opens_when_destroyed_;
};

// An open whose initiation a token defers, started after its owner let the sink go: the
// operation holds the sink until then (it held only `this`, and the open ran on a destroyed
// sink). A sink no shared_ptr owns opens as before.
TEST(ClientMessageSinkTest, ADeferredOpenKeepsItsSinkUntilItStarts) {
  int opens_when_destroyed = -1;  // -1: alive
  {
    auto sink = std::make_shared<OpenRecordingSink>(&opens_when_destroyed);
    auto open = sink->AsyncOpen(boost::asio::deferred);
    sink.reset();
    ASSERT_EQ(opens_when_destroyed, -1) << "the deferred open does not hold its sink";
    std::move(open)([](error_code) {});
  }
  EXPECT_EQ(opens_when_destroyed, 1) << "the open did not run on the live sink";

  int unowned_opens = -1;
  {
    OpenRecordingSink unowned(&unowned_opens);
    unowned.AsyncOpen([](error_code) {});
    EXPECT_EQ(unowned.opens, 1);
  }
  EXPECT_EQ(unowned_opens, 1);
}

TEST(SinkStatusTest, ToString) {
  EXPECT_STREQ(ToString(SinkStatus::kIdle), "idle");
  EXPECT_STREQ(ToString(SinkStatus::kOpen), "open");
  EXPECT_STREQ(ToString(SinkStatus::kBusy), "busy");
  EXPECT_STREQ(ToString(SinkStatus::kClosed), "closed");
}

}  // namespace
}  // namespace scales
