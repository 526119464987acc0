#include "fake_sinks.h"

#include <algorithm>
#include <cstdlib>
#include <utility>

#include <boost/asio/post.hpp>

namespace scales::test {

// --- FakeTransport ---------------------------------------------------------------------------

FakeTransport::FakeTransport(EventLoop& loop, std::optional<Endpoint> endpoint, size_t serial)
    : loop_(loop), endpoint_(std::move(endpoint)), serial_(serial), created_at_(loop.Now()) {}

void FakeTransport::DoOpen(OpenHandler handler) {
  ++open_calls_;
  if (closed_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kConnectionClosed));
    return;
  }
  if (opened_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), {});
    return;
  }
  open_waiters_.Add(std::move(handler));
  if (open_mode_ == OpenMode::kHang || open_scheduled_) return;
  open_scheduled_ = true;
  const error_code result = open_mode_ == OpenMode::kFail ? open_error_ : error_code();
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  boost::asio::post(loop_.executor(), [weak, this, result] {
    if (auto self = weak.lock()) {
      if (open_scheduled_) CompleteOpen(result);
    }
  });
}

void FakeTransport::CompleteOpen(error_code ec) {
  open_scheduled_ = false;
  if (closed_) return;  // Close() completed the waiters
  if (ec) {
    closed_ = true;  // a transport whose connect failed is unusable
  } else {
    opened_ = true;
  }
  open_waiters_.CompleteAll(loop_.executor(), ec);
}

void FakeTransport::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  ++total_requests_;
  streams_seen_.push_back(stream);
  if (closed_) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kConnectionClosed),
                                          "fake transport is closed");
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  if (stack.cancelled()) {
    auto m = MethodReturnMessage::Failure(stack.cancel_reason(), "cancelled before it was sent");
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  if (auto_reply_) {
    if (int* slot = msg.reply_slot<int>()) *slot = *auto_reply_;
    auto m = MethodReturnMessage::Ok();
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  requests_.push_back({&stack, &msg, stream, ++next_id_});
  stack.SetCancelHandler(this, nullptr);
}

void FakeTransport::Answer(Request r, MethodReturnMessage& m) {
  // The request left requests_ before this: the response path may re-enter the fake.
  r.stack->AsyncProcessResponse(r.stream, m);
}

bool FakeTransport::Reply(size_t i, int value) {
  if (i >= requests_.size()) return false;
  Request r = requests_[i];
  requests_.erase(requests_.begin() + static_cast<std::ptrdiff_t>(i));
  if (int* slot = r.message->reply_slot<int>()) *slot = value;
  auto m = MethodReturnMessage::Ok();
  Answer(r, m);
  return true;
}

bool FakeTransport::Fail(size_t i, error_code ec, std::string detail) {
  if (i >= requests_.size()) return false;
  Request r = requests_[i];
  requests_.erase(requests_.begin() + static_cast<std::ptrdiff_t>(i));
  auto m = MethodReturnMessage::Failure(ec, std::move(detail));
  Answer(r, m);
  return true;
}

void FakeTransport::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  ++cancels_;
  auto it = std::find_if(requests_.begin(), requests_.end(),
                         [&](const Request& r) { return r.stack == &stack; });
  if (it == requests_.end()) {
    ADD_FAILURE() << "FakeTransport::CancelRequest for a request it does not hold";
    return;
  }
  Request r = *it;
  requests_.erase(it);
  if (close_on_cancel_) closed_ = true;
  auto m = MethodReturnMessage::Failure(reason, "cancelled in the fake transport");
  Answer(r, m);
  if (close_on_cancel_) Shutdown();
}

void FakeTransport::Shutdown() {
  closed_ = true;
  open_scheduled_ = false;
  open_waiters_.CompleteAll(loop_.executor(), make_error_code(Errc::kClientClosed));
  auto held = std::move(requests_);
  requests_.clear();
  for (auto& r : held) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kConnectionClosed),
                                          "fake transport closed with the request in flight");
    Answer(r, m);
  }
}

void FakeTransport::Close() {
  ++close_calls_;
  Shutdown();
}

SinkStatus FakeTransport::status() const {
  if (status_override_) return *status_override_;
  if (closed_) return SinkStatus::kClosed;
  return opened_ ? SinkStatus::kOpen : SinkStatus::kIdle;
}

// --- FakeTransportFactory --------------------------------------------------------------------

SinkFactory FakeTransportFactory::AsFactory() {
  return [this](const SinkContext& ctx) -> SinkPtr { return Create(ctx); };
}

std::shared_ptr<FakeTransport> FakeTransportFactory::Create(const SinkContext& ctx) {
  EventLoop& loop = ctx.loop != nullptr ? *ctx.loop : loop_;
  auto fake = std::make_shared<FakeTransport>(loop, ctx.endpoint, created_.size());
  fake->set_open_mode(open_mode, open_error);
  if (on_create) on_create(*fake);
  created_.push_back(fake);
  return fake;
}

std::vector<FakeTransport*> FakeTransportFactory::ForEndpoint(const Endpoint& endpoint) const {
  std::vector<FakeTransport*> out;
  for (auto& f : created_) {
    if (f->endpoint() == endpoint) out.push_back(f.get());
  }
  return out;
}

FakeTransport* FakeTransportFactory::LatestFor(const Endpoint& endpoint) const {
  auto all = ForEndpoint(endpoint);
  return all.empty() ? nullptr : all.back();
}

size_t FakeTransportFactory::TotalInFlight() const {
  size_t n = 0;
  for (auto& f : created_) n += f->in_flight();
  return n;
}

// --- CallTracker -----------------------------------------------------------------------------

size_t CallTracker::Start(MessageDispatcher& dispatcher, std::optional<Duration> timeout,
                          bool initiating, std::string method) {
  size_t index = StartWith([&](CallBase* call) { dispatcher.Dispatch(call, initiating); }, timeout,
                           std::move(method));
  state_->records[index].initiating = initiating;
  return index;
}

size_t CallTracker::StartWith(const std::function<void(CallBase*)>& dispatch,
                              std::optional<Duration> timeout, std::string method) {
  std::shared_ptr<State> st = state_;
  const size_t index = st->records.size();
  st->records.emplace_back();
  auto* call = new TypedCall<int>([st, index](error_code ec, int value) {
    Record& r = st->records[index];
    ++r.completions;
    r.error = ec;
    r.value = value;
    r.completed_inside_dispatch = r.completed_inside_dispatch || st->in_dispatch;
    r.completed_at = st->clock.Now();
  });
  call->timeout = timeout;
  call->info = &st->records[index].info;
  call->message.method = std::move(method);
  st->in_dispatch = true;
  dispatch(call);
  st->in_dispatch = false;
  return index;
}

size_t CallTracker::completed() const {
  return static_cast<size_t>(std::count_if(state_->records.begin(), state_->records.end(),
                                           [](const Record& r) { return r.completions > 0; }));
}

int CallTracker::total_completions() const {
  int n = 0;
  for (auto& r : state_->records) n += r.completions;
  return n;
}

::testing::AssertionResult CallTracker::AllCompletedOnce() const {
  std::string problems;
  for (size_t i = 0; i < state_->records.size(); ++i) {
    const Record& r = state_->records[i];
    if (r.completions != 1) {
      problems += " call " + std::to_string(i) + " completed " + std::to_string(r.completions) + " times;";
    }
    if (r.initiating && r.completed_inside_dispatch) {
      problems += " call " + std::to_string(i) + " completed inside its initiating Dispatch();";
    }
  }
  if (problems.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << problems;
}

::testing::AssertionResult CallTracker::NoneCompletedTwice() const {
  std::string problems;
  for (size_t i = 0; i < state_->records.size(); ++i) {
    int c = state_->records[i].completions;
    if (c > 1) problems += " call " + std::to_string(i) + " completed " + std::to_string(c) + " times;";
  }
  if (problems.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << problems;
}

// --- ManualEnv -----------------------------------------------------------------------------

ManualEnv::ManualEnv()
    : clock(std::make_shared<ManualClock>()),
      runtime(RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock, .seed = 42}),
      scope(&registry, {{"client", "test"}}) {}

ManualEnv::~ManualEnv() {
  // Let posted work (deferred sink destructions, handlers) finish while everything it may
  // touch is still alive.
  runtime.RunUntilIdle();
}

int64_t ManualEnv::CounterValue(std::string_view name, stats::Labels extra) const {
  stats::Labels labels = scope.labels();
  labels.insert(labels.end(), extra.begin(), extra.end());
  const stats::Counter* c = registry.FindCounter(name, labels);
  return c ? c->value() : 0;
}

int64_t ManualEnv::GaugeValue(std::string_view name, stats::Labels extra) const {
  stats::Labels labels = scope.labels();
  labels.insert(labels.end(), extra.begin(), extra.end());
  const stats::Gauge* g = registry.FindGauge(name, labels);
  return g ? g->value() : 0;
}

// --- helpers ---------------------------------------------------------------------------------

uint64_t TestSeed(uint64_t fallback) {
  const char* env = std::getenv("SCALES_TEST_SEED");
  if (env == nullptr || *env == '\0') return fallback;
  return std::strtoull(env, nullptr, 10);
}

SinkContext MakeContext(EventLoop& loop, const stats::StatsScope& stats,
                        std::shared_ptr<ServerSet> server_set, std::optional<Endpoint> endpoint) {
  SinkContext ctx;
  ctx.loop = &loop;
  ctx.client_name = "test";
  ctx.stats = stats;
  ctx.server_set = std::move(server_set);
  ctx.endpoint = std::move(endpoint);
  return ctx;
}

}  // namespace scales::test
