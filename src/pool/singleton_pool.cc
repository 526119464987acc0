#include "scales/pool/singleton_pool.h"

#include <algorithm>

#include <fmt/format.h>

#include <boost/asio/post.hpp>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"
#include "scales/pool/pool_util.h"

namespace scales {

SingletonPool::SingletonPool(const SinkContext& ctx, SinkFactory factory, SingletonPoolOptions options)
    : loop_(*ctx.loop),
      ctx_(ctx),
      factory_(std::move(factory)),
      options_(options),
      address_(ctx.endpoint ? ctx.endpoint->ToString() : std::string("?")),
      connect_failures_(ctx.stats.GetCounter("scales_pool_connect_failures")),
      waiters_gauge_(ctx.stats.GetGauge("scales_pool_waiters")),
      queue_full_(ctx.stats.GetCounter("scales_pool_queue_full")) {}

SingletonPool::~SingletonPool() {
  waiters_gauge_.Add(-static_cast<int64_t>(waiting_.size()));
  if (child_) child_->Close();
  for (auto& s : retired_) s->Close();
}

void SingletonPool::Connect() {
  if (opening_ || closed_) return;
  SinkPtr old = std::move(child_);
  opening_ = true;
  child_ = factory_(ctx_);
  ++created_;
  for (auto it = retired_.begin(); it != retired_.end();) {
    if ((*it)->status() != SinkStatus::kClosed) {
      ++it;
      continue;
    }
    // It may be on the call stack (its last reply's path): destroy it on a later turn.
    boost::asio::post(loop_.executor(), [done = std::move(*it)] {});
    it = retired_.erase(it);
  }
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  // A child that reports a fault while it is open and not closed (a drained Mux session: it
  // refuses new requests but finishes its own) is set aside: the next request connects anew.
  child_->on_faulted().Subscribe([weak, this, raw = child_.get()](const Fault&) {
    auto self = weak.lock();
    if (!self || closed_ || opening_ || child_.get() != raw || raw->status() == SinkStatus::kClosed) return;
    retired_.push_back(std::move(child_));
  });
  child_->AsyncOpen([weak, this, sink = child_](error_code ec) {
    if (auto self = weak.lock()) OnOpened(sink, ec);
  });
  if (old) {
    // The old sink is unusable; Close() answers anything still on it. Only now: a request
    // started inside one of those answers waits for the new sink instead of making another.
    old->Close();
    boost::asio::post(loop_.executor(), [old = std::move(old)] {});
  }
}

std::deque<SingletonPool::Waiter> SingletonPool::TakeWaiting() {
  waiters_gauge_.Add(-static_cast<int64_t>(waiting_.size()));
  auto waiting = std::move(waiting_);
  waiting_.clear();
  return waiting;
}

void SingletonPool::OnOpened(const SinkPtr& sink, error_code ec) {
  if (sink != child_) return;  // replaced or closed meanwhile
  opening_ = false;
  if (closed_) return;  // Close() answered the waiters
  if (ec) {
    auto waiting = TakeWaiting();
    connect_failures_.Increment();
    auto [code, detail] = ConnectFailure(address_, ec, sink->open_failure_detail());
    on_faulted_.Set({code, detail});
    open_waiters_.CompleteAll(loop_.executor(), code);
    for (auto& w : waiting) {
      w.stack->ClearCancelHandler();
      auto m = MethodReturnMessage::Failure(code, detail);
      w.stack->AsyncProcessResponse(w.stream, m);
    }
    return;
  }
  open_waiters_.CompleteAll(loop_.executor(), {});
  // One at a time, each leaving waiting_ only when it is handed over: until then a cancellation
  // finds it there (CancelRequest) and Close() answers it; and if the child was replaced
  // meanwhile (it died, and a request arriving made a new one), the rest wait for the new one.
  while (!waiting_.empty() && !closed_ && !opening_ && child_ == sink) {
    Waiter w = waiting_.front();
    waiting_.pop_front();
    waiters_gauge_.Add(-1);
    w.stack->ClearCancelHandler();
    child_->AsyncProcessRequest(*w.stack, w.stack->message(), w.stream);
  }
  // Set aside meanwhile (it drained): the rest wait for a new one.
  if (!waiting_.empty() && !closed_ && !opening_ && !child_) Connect();
}

void SingletonPool::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  if (closed_) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kClientClosed),
                                          fmt::format("pool for {} is closed", address_));
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  if (child_ && !opening_ && child_->status() != SinkStatus::kClosed) {
    child_->AsyncProcessRequest(stack, msg, stream);
    return;
  }
  if (stack.cancelled()) {
    auto m = MethodReturnMessage::Failure(stack.cancel_reason(),
                                          fmt::format("cancelled before a connection to {} was assigned", address_));
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  if (waiting_.size() >= options_.max_waiters) {
    queue_full_.Increment();
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kPoolQueueFull),
        fmt::format("pool for {} is full: {} requests wait for the connection to open (max_waiters {})",
                    address_, waiting_.size(), options_.max_waiters));
    Connect();  // with max_waiters 0 nothing else would start one
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  waiting_.push_back({&stack, stream});
  waiters_gauge_.Add(1);
  stack.SetCancelHandler(this, nullptr);
  Connect();
}

void SingletonPool::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  auto it = std::find_if(waiting_.begin(), waiting_.end(), [&](const Waiter& w) { return w.stack == &stack; });
  if (it == waiting_.end()) return;
  Stream* stream = it->stream;
  waiting_.erase(it);
  waiters_gauge_.Add(-1);
  auto m = MethodReturnMessage::Failure(reason, fmt::format("while connecting to {}", address_));
  stack.AsyncProcessResponse(stream, m);
}

bool SingletonPool::RequestUnsent(const SinkStack&, void*) const {
  return true;  // Waiting for the connect, the request went nowhere
}

void SingletonPool::DoOpen(OpenHandler handler) {
  if (closed_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kClientClosed));
    return;
  }
  if (child_ && !opening_ && child_->status() != SinkStatus::kClosed) {
    PostOpenCompletion(std::move(handler), loop_.executor(), {});
    return;
  }
  open_waiters_.Add(std::move(handler));
  Connect();
}

void SingletonPool::Close() {
  if (closed_) return;
  closed_ = true;
  open_waiters_.CompleteAll(loop_.executor(), make_error_code(Errc::kClientClosed));
  auto waiting = TakeWaiting();
  for (auto& w : waiting) {
    w.stack->ClearCancelHandler();
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kClientClosed),
                                          fmt::format("pool for {} closed while connecting", address_));
    w.stack->AsyncProcessResponse(w.stream, m);
  }
  if (child_) child_->Close();
  // Closing a draining child answers what it still holds.
  auto retired = std::move(retired_);
  retired_.clear();
  for (auto& s : retired) s->Close();
}

SinkStatus SingletonPool::status() const {
  if (closed_) return SinkStatus::kClosed;
  if (!child_ || opening_) return SinkStatus::kIdle;
  SinkStatus s = child_->status();
  // A dead connection is replaced on the next request: the pool itself stays usable.
  return s == SinkStatus::kClosed ? SinkStatus::kIdle : s;
}

SinkProvider SingletonPoolProvider(SingletonPoolOptions options) {
  SinkProvider p{std::string(roles::kPool), "singleton-pool",
                 [options](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<SingletonPool>(ctx, std::move(next), options);
                 }};
  p.settings = {{"max_waiters", SettingText(options.max_waiters)}};
  return p;
}

}  // namespace scales
