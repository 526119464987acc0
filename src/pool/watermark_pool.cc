#include "scales/core/log.h"
#include "scales/pool/watermark_pool.h"

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#include <boost/asio/post.hpp>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"
#include "scales/pool/pool_util.h"

namespace scales {

void Validate(const WatermarkPoolOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.high_watermark < 1) fail("pool.high_watermark must be >= 1");
  if (o.low_watermark > o.high_watermark) {
    fail(fmt::format("pool.low_watermark ({}) must be <= high_watermark ({})", o.low_watermark, o.high_watermark));
  }
  if (o.idle_timeout <= Duration::zero()) fail("pool.idle_timeout must be > 0");
}

WatermarkPool::WatermarkPool(const SinkContext& ctx, SinkFactory connection_factory,
                             WatermarkPoolOptions options)
    : loop_(*ctx.loop),
      ctx_(ctx),
      factory_(std::move(connection_factory)),
      options_(options),
      address_(ctx.endpoint ? ctx.endpoint->ToString() : std::string("?")),
      size_gauge_(ctx.stats.GetGauge("scales_pool_size")),
      idle_gauge_(ctx.stats.GetGauge("scales_pool_idle")),
      waiters_gauge_(ctx.stats.GetGauge("scales_pool_waiters")),
      queue_full_(ctx.stats.GetCounter("scales_pool_queue_full")),
      expired_(ctx.stats.GetCounter("scales_pool_idle_expired")),
      connect_failures_(ctx.stats.GetCounter("scales_pool_connect_failures")) {
  if (options_.high_watermark == 0) options_.high_watermark = 1;
  if (options_.low_watermark > options_.high_watermark) options_.low_watermark = options_.high_watermark;
}

WatermarkPool::~WatermarkPool() {
  size_gauge_.Add(-static_cast<int64_t>(conns_.size()));
  idle_gauge_.Add(-static_cast<int64_t>(idle_.size()));
  waiters_gauge_.Add(-static_cast<int64_t>(waiters_.size()));
  for (auto& c : conns_) c.sink->Close();
}

void WatermarkPool::Fail(SinkStack& stack, Stream* stream, error_code ec, std::string detail) {
  auto m = MethodReturnMessage::Failure(ec, std::move(detail));
  stack.AsyncProcessResponse(stream, m);
}

WatermarkPool::Conn* WatermarkPool::TakeIdle() {
  while (!idle_.empty()) {
    Conn* c = idle_.back();
    idle_.pop_back();
    idle_gauge_.Add(-1);
    if (c->sink->status() == SinkStatus::kClosed) {
      Drop(c);  // died while idle (the server closed it)
      continue;
    }
    return c;
  }
  return nullptr;
}

WatermarkPool::Conn* WatermarkPool::NewConn() {
  conns_.emplace_back();
  Conn* c = &conns_.back();
  c->self = std::prev(conns_.end());
  c->sink = factory_(ctx_);
  size_gauge_.Add(1);
  return c;
}

void WatermarkPool::Drop(Conn* c) {
  auto it = std::find(idle_.begin(), idle_.end(), c);
  if (it != idle_.end()) {
    idle_.erase(it);
    idle_gauge_.Add(-1);
  }
  SinkPtr sink = std::move(c->sink);
  conns_.erase(c->self);
  size_gauge_.Add(-1);
  // The connection may be on the call stack (its own response path): destroy it later.
  boost::asio::post(loop_.executor(), [sink = std::move(sink)] {});
}

void WatermarkPool::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  if (closed_) {
    Fail(stack, stream, make_error_code(Errc::kClientClosed), fmt::format("pool for {} is closed", address_));
    return;
  }
  if (stack.cancelled()) {
    Fail(stack, stream, stack.cancel_reason(),
         fmt::format("cancelled before a connection to {} was assigned", address_));
    return;
  }
  if (Conn* c = TakeIdle()) {
    Send(c, stack, stream);
    return;
  }
  if (conns_.size() < options_.high_watermark) {
    StartOpen(NewConn(), &stack, stream);
    return;
  }
  if (waiters_.size() < options_.max_waiters) {
    waiters_.push_back({&stack, stream});
    waiters_gauge_.Add(1);
    stack.SetCancelHandler(this, nullptr);
    return;
  }
  queue_full_.Increment();
  SCALES_LOG_RATE_LIMITED(kWarning, 1, "pool for {} is full: {} connections busy, {} requests queued", address_,
                          conns_.size(), waiters_.size());
  Fail(stack, stream, make_error_code(Errc::kPoolQueueFull),
       fmt::format("pool for {} is full: {} connections (high watermark) busy and {} requests "
                   "queued (max_waiters {})",
                   address_, conns_.size(), waiters_.size(), options_.max_waiters));
}

void WatermarkPool::Send(Conn* c, SinkStack& stack, Stream* stream) {
  stack.Push(this, c);
  c->sink->AsyncProcessRequest(stack, stack.message(), stream);
}

void WatermarkPool::StartOpen(Conn* c, SinkStack* stack, Stream* stream) {
  c->opening = true;
  c->opening_for = stack;
  c->opening_stream = stream;
  if (stack != nullptr) stack->SetCancelHandler(this, c);
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  c->sink->AsyncOpen([weak, this, c](error_code ec) {
    if (auto self = weak.lock()) OnConnOpened(c, ec);
  });
}

void WatermarkPool::OnConnOpened(Conn* c, error_code ec) {
  c->opening = false;
  SinkStack* stack = c->opening_for;
  Stream* stream = c->opening_stream;
  c->opening_for = nullptr;
  c->opening_stream = nullptr;
  if (stack != nullptr) stack->ClearCancelHandler();
  if (closed_) {
    // Close() already answered the request that waited for this connection.
    c->sink->Close();
    Drop(c);
    return;
  }
  if (ec) {
    connect_failures_.Increment();
    auto [code, detail] = ConnectFailure(address_, ec, c->sink->open_failure_detail());
    Drop(c);  // frees c
    // The fault first: whoever watches it learns the details before open waiters resume.
    on_faulted_.Set({code, detail});
    open_waiters_.CompleteAll(loop_.executor(), code);
    if (stack != nullptr) Fail(*stack, stream, code, detail);
    ServeWaiters();
    return;
  }
  open_waiters_.CompleteAll(loop_.executor(), {});
  if (stack != nullptr) {
    Send(c, *stack, stream);
  } else {
    Release(c);
  }
}

void WatermarkPool::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                         MethodReturnMessage& msg) {
  auto* c = static_cast<Conn*>(context);
  // Answer first, then reuse the connection: a waiter's request then starts outside this
  // response's path.
  stack.AsyncProcessResponse(stream, msg);
  Release(c);
}

void WatermarkPool::Release(Conn* c) {
  if (releasing_) {
    // Answered inside a hand-over below (a connection that answered a waiter's request at once,
    // inside AsyncProcessRequest): that loop goes on with it, so that a long queue does not nest
    // a request's whole path on the stack per waiter.
    released_.push_back(c);
    return;
  }
  releasing_ = true;
  ReleaseOne(c);  // the common case: the queue of answered-meanwhile stays untouched
  while (!released_.empty()) {
    Conn* next = released_.front();
    released_.pop_front();
    ReleaseOne(next);
  }
  releasing_ = false;
}

void WatermarkPool::ReleaseOne(Conn* c) {
  if (closed_) {
    c->sink->Close();
    Drop(c);
    return;
  }
  if (c->sink->status() == SinkStatus::kClosed) {
    Drop(c);  // one dead connection does not close the pool
    ServeWaiters();
    return;
  }
  if (!waiters_.empty()) {
    Waiter w = waiters_.front();
    waiters_.pop_front();
    waiters_gauge_.Add(-1);
    w.stack->ClearCancelHandler();
    Send(c, *w.stack, w.stream);
    return;
  }
  c->idle_since = loop_.Now();
  idle_.push_back(c);
  idle_gauge_.Add(1);
  ArmIdleTimer();
}

void WatermarkPool::ServeWaiters() {
  while (!closed_ && !waiters_.empty() && conns_.size() < options_.high_watermark) {
    Waiter w = waiters_.front();
    waiters_.pop_front();
    waiters_gauge_.Add(-1);
    StartOpen(NewConn(), w.stack, w.stream);
  }
}

void WatermarkPool::ArmIdleTimer() {
  if (idle_timer_.scheduled() || idle_.empty() || conns_.size() <= options_.low_watermark) return;
  loop_.timers().Schedule(idle_timer_, DeadlineAfter(idle_.front()->idle_since, options_.idle_timeout), &OnIdleTimer, this);
}

void WatermarkPool::OnIdleTimer(void* self) { static_cast<WatermarkPool*>(self)->ExpireIdle(); }

void WatermarkPool::ExpireIdle() {
  const TimePoint now = loop_.Now();
  while (!idle_.empty() && conns_.size() > options_.low_watermark &&
         DeadlineAfter(idle_.front()->idle_since, options_.idle_timeout) <= now) {
    Conn* c = idle_.front();
    idle_.pop_front();
    idle_gauge_.Add(-1);
    expired_.Increment();
    c->sink->Close();
    Drop(c);
  }
  ArmIdleTimer();
}

void WatermarkPool::CancelRequest(SinkStack& stack, void* context, const error_code& reason) {
  if (context != nullptr) {
    // Waiting for a connect: the connection goes on opening and becomes idle.
    auto* c = static_cast<Conn*>(context);
    Stream* stream = c->opening_stream;
    c->opening_for = nullptr;
    c->opening_stream = nullptr;
    Fail(stack, stream, reason, fmt::format("while connecting to {}", address_));
    return;
  }
  auto it = std::find_if(waiters_.begin(), waiters_.end(), [&](const Waiter& w) { return w.stack == &stack; });
  if (it == waiters_.end()) return;
  Stream* stream = it->stream;
  waiters_.erase(it);
  waiters_gauge_.Add(-1);
  Fail(stack, stream, reason,
       fmt::format("while queued for a connection to {} ({} connections busy, high watermark {})",
                   address_, conns_.size(), options_.high_watermark));
}

bool WatermarkPool::RequestUnsent(const SinkStack&, void*) const {
  return true;  // Queued or waiting for a connect, the request went nowhere
}

void WatermarkPool::DoOpen(OpenHandler handler) {
  if (closed_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kClientClosed));
    return;
  }
  bool have_usable = std::any_of(conns_.begin(), conns_.end(), [](const Conn& c) { return !c.opening; });
  if (have_usable) {
    PostOpenCompletion(std::move(handler), loop_.executor(), {});
    return;
  }
  bool opening = !conns_.empty();
  open_waiters_.Add(std::move(handler));
  if (!opening) StartOpen(NewConn(), nullptr, nullptr);
}

void WatermarkPool::Close() {
  if (closed_) return;
  closed_ = true;
  idle_timer_.Cancel();
  open_waiters_.CompleteAll(loop_.executor(), make_error_code(Errc::kClientClosed));
  auto waiters = std::move(waiters_);
  waiters_.clear();
  waiters_gauge_.Add(-static_cast<int64_t>(waiters.size()));
  for (auto& w : waiters) {
    w.stack->ClearCancelHandler();
    Fail(*w.stack, w.stream, make_error_code(Errc::kClientClosed),
         fmt::format("pool for {} closed while the request was queued", address_));
  }
  // Snapshot: closing a connection answers its request, whose response releases (drops) it.
  std::vector<Conn*> all;
  for (auto& c : conns_) all.push_back(&c);
  std::vector<SinkPtr> sinks;
  for (Conn* c : all) {
    if (c->opening && c->opening_for != nullptr) {
      SinkStack* s = c->opening_for;
      Stream* stream = c->opening_stream;
      c->opening_for = nullptr;
      s->ClearCancelHandler();
      Fail(*s, stream, make_error_code(Errc::kClientClosed),
           fmt::format("pool for {} closed while connecting", address_));
    }
    sinks.push_back(c->sink);
  }
  for (auto& s : sinks) s->Close();
  // Idle connections have no request to bring them back: drop them now.
  while (!idle_.empty()) {
    Conn* c = idle_.back();
    idle_.pop_back();
    idle_gauge_.Add(-1);
    Drop(c);
  }
}

SinkStatus WatermarkPool::status() const {
  if (closed_) return SinkStatus::kClosed;
  return conns_.empty() ? SinkStatus::kIdle : SinkStatus::kOpen;
}

SinkProvider WatermarkPoolProvider(WatermarkPoolOptions options) {
  Validate(options);
  SinkProvider p{std::string(roles::kPool), "watermark-pool",
                 [options](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<WatermarkPool>(ctx, std::move(next), options);
                 }};
  p.settings = {{"low_watermark", SettingText(options.low_watermark)},
                {"high_watermark", SettingText(options.high_watermark)},
                {"max_waiters", SettingText(options.max_waiters)},
                {"idle_timeout", SettingText(options.idle_timeout)}};
  return p;
}

}  // namespace scales
