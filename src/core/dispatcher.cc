#include "scales/core/dispatcher.h"

#include <chrono>
#include <exception>
#include <stdexcept>

#include <fmt/format.h>

#include "core/own_thread.h"
#include "scales/core/log.h"

namespace scales {

// --- call objects ------------------------------------------------------------------------------

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SCALES_CALL_CACHE 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SCALES_CALL_CACHE 0
#endif
#endif
#ifndef SCALES_CALL_CACHE
#define SCALES_CALL_CACHE 1
#endif

namespace {

#if SCALES_CALL_CACHE
// Freed call blocks of this thread, by size class (multiples of kGranule bytes). Plain data,
// so it is usable at any point of the thread's life; CallCacheOwner frees the blocks when the
// thread exits and turns the cache off for whatever is destroyed after it.
constexpr size_t kGranule = 64;
constexpr size_t kClasses = 32;  // blocks of up to 2 KiB
constexpr size_t kMaxCachedBytes = 64 * 1024;

struct FreeBlock {
  FreeBlock* next;
};
struct CallCache {
  FreeBlock* heads[kClasses];
  size_t bytes;
  bool registered;
  bool closed;
};
thread_local CallCache t_call_cache{};

struct CallCacheOwner {
  ~CallCacheOwner() {
    CallCache& c = t_call_cache;
    for (size_t i = 0; i < kClasses; ++i) {
      while (FreeBlock* b = c.heads[i]) {
        c.heads[i] = b->next;
        ::operator delete(b, (i + 1) * kGranule);
      }
    }
    c.bytes = 0;
    c.closed = true;
  }
};
thread_local CallCacheOwner t_call_cache_owner;

// The size class of a block of `size` bytes, or kClasses when it is not cached.
size_t SizeClass(size_t size) { return size == 0 ? 0 : std::min((size - 1) / kGranule, kClasses); }
#endif

}  // namespace

void* CallBase::operator new(std::size_t size) {
#if SCALES_CALL_CACHE
  const size_t cls = SizeClass(size);
  if (cls < kClasses) {
    CallCache& c = t_call_cache;
    if (FreeBlock* b = c.heads[cls]) {
      c.heads[cls] = b->next;
      c.bytes -= (cls + 1) * kGranule;
      return b;
    }
    return ::operator new((cls + 1) * kGranule);
  }
#endif
  return ::operator new(size);
}

void CallBase::operator delete(void* p, std::size_t size) noexcept {
  if (p == nullptr) return;
#if SCALES_CALL_CACHE
  const size_t cls = SizeClass(size);
  if (cls < kClasses) {
    const size_t block = (cls + 1) * kGranule;
    CallCache& c = t_call_cache;
    if (!c.registered && !c.closed) {
      c.registered = true;
      (void)&t_call_cache_owner;  // constructs it, so it frees the cache at thread exit
    }
    if (!c.closed && c.bytes + block <= kMaxCachedBytes) {
      auto* b = static_cast<FreeBlock*>(p);
      b->next = c.heads[cls];
      c.heads[cls] = b;
      c.bytes += block;
      return;
    }
    ::operator delete(p, block);
    return;
  }
#endif
  ::operator delete(p, size);
}

void FailEmptyClient(CallBase* call, CallInfo* info, std::string detail) {
  call->info = info;
  if (info != nullptr) {
    info->error = make_error_code(Errc::kClientClosed);
    info->detail = detail;
  }
  auto complete = [call, detail = std::move(detail)] {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kClientClosed), detail);
    call->Complete(m, boost::asio::system_executor());
  };
  // Not posted to the system executor: that would start its threads, which a child made by
  // fork() inherits without them and cannot join when it exits (std::exit hangs or crashes in
  // the system context's destructor), and which do not run its posts.
  internal::RunOnAThreadOfItsOwn(std::move(complete));
}

void FailCallMadeBeforeFork(CallBase* call, std::string detail) {
  if (call->info != nullptr) {
    call->info->error = make_error_code(Errc::kClientClosed);
    call->info->detail = detail;
  }
  internal::RunOnAThreadOfItsOwn([call, detail = std::move(detail)] {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kClientClosed), detail);
    call->Complete(m, boost::asio::system_executor());
  });
}

// --- dispatcher --------------------------------------------------------------------------------

MessageDispatcher::MessageDispatcher(EventLoop& loop, std::string client_name, SinkPtr next,
                                     Duration default_timeout, const stats::StatsScope& stats,
                                     std::shared_ptr<PendingLimit> limit, bool trace_ids)
    : loop_(loop),
      client_name_(std::move(client_name)),
      next_(std::move(next)),
      default_timeout_(default_timeout),
      stats_(stats),
      requests_(stats.GetCounter("scales_requests")),
      successes_(stats.GetCounter("scales_successes")),
      failures_(stats.GetCounter("scales_failures")),
      pending_gauge_(stats.GetGauge("scales_pending")),
      latency_us_(stats.GetHistogram("scales_request_latency_us")),
      limit_(std::move(limit)),
      trace_ids_(trace_ids) {
  if (limit_ && limit_->max == 0) limit_.reset();  // no limit: nothing to count
  if (limit_) {
    auto labels = stats_.labels();
    labels.emplace_back("reason", "max_pending");
    rejected_max_pending_ = &stats_.registry()->GetCounter("scales_rejected", labels);
  }
}

MessageDispatcher::~MessageDispatcher() {
  if (limit_ && slots_reserved_ > 0) {
    limit_->pending.fetch_sub(slots_reserved_, std::memory_order_relaxed);
  }
}

bool MessageDispatcher::AcquirePendingSlot() {
  if (slots_used_ == slots_reserved_) {
    size_t reserved = limit_->pending.load(std::memory_order_relaxed);
    size_t take = 0;
    do {
      if (reserved >= limit_->max) return false;
      take = std::min(limit_->batch, limit_->max - reserved);
    } while (!limit_->pending.compare_exchange_weak(reserved, reserved + take, std::memory_order_relaxed));
    slots_reserved_ += take;
  }
  ++slots_used_;
  return true;
}

void MessageDispatcher::ReleasePendingSlot() {
  --slots_used_;
  // Keep up to one batch in reserve (none when batch is 1: the limit is then exact), and only
  // give back above two, so a loop hovering around a batch boundary does not touch the atomic
  // on every call.
  const size_t unused = slots_reserved_ - slots_used_;
  const size_t high = limit_->batch > 1 ? 2 * limit_->batch : 0;
  if (unused > high) {
    const size_t give = unused - high / 2;
    slots_reserved_ -= give;
    limit_->pending.fetch_sub(give, std::memory_order_relaxed);
  }
}

void MessageDispatcher::Dispatch(CallBase* call, bool initiating, bool refuse) {
  MethodCallMessage& msg = call->message;
  msg.service = client_name_;
  auto& props = msg.properties;
  props.start = loop_.Now();
  Duration timeout = call->timeout.value_or(default_timeout_);
  if (timeout > Duration::zero() && timeout < Duration::max() / 2) {
    // Saturated: a long timeout on a clock far from its epoch must not wrap into the past (the
    // call would time out at once).
    props.deadline = DeadlineAfter(props.start, timeout);
  }
  if (trace_ids_ && !props.trace.valid()) {
    // A root span: trace, span and parent ids are equal (Finagle's convention); never 0.
    const uint64_t id = NewTraceId(loop_.random());
    props.trace.trace_id = props.trace.span_id = props.trace.parent_id = id;
    props.trace.trace_id_high = 0;  // a high half alone is no trace: the root is 64-bit
  } else if (props.trace.valid() && props.trace.span_id == 0) {
    // A caller's trace without a span of its own (an upstream trace id, forwarded): span id 0
    // is invalid (B3 servers reject X-B3-SpanId 0), so the call gets a new span in that trace,
    // drawn as root ids are, under the given parent (0 = none), as Finagle's Trace.nextId.
    props.trace.span_id = NewTraceId(loop_.random());
  }
  requests_.Increment();
  pending_gauge_.Add(1);
  ++pending_;
  loop_.CallStarted();
  // The response path gives the slot back, whichever way the call ends.
  const bool admitted = !limit_ || AcquirePendingSlot();
  call->holds_pending_slot = limit_ && admitted;
  call->stack.Push(this, call);
  // Until this function returns, a completion (this call's or another's answered meanwhile) is
  // posted rather than run inside the user's initiating function.
  struct InitiationScope {
    size_t& depth;
    const bool on;
    InitiationScope(size_t& d, bool o) : depth(d), on(o) { depth += on; }
    ~InitiationScope() { depth -= on; }
  } initiation(initiating_, initiating);
  if (const auto& cs = call->cancel_state()) {
    cs->call = call;
    cs->loop = loop_.weak_from_this();
    cs->dispatched.store(true);  // seq_cst, as `requested`: one side sees the other
    // Cancelled before it reached the loop: the first sink that would hold it answers.
    if (cs->requested.load()) call->stack.Cancel(make_error_code(Errc::kCancelled));
  }
  if (call->timeout && *call->timeout < Duration::zero()) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kInvalidArgument),
                                          "CallOptions::timeout must not be negative");
    call->stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  if (closed_ || refuse) {
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kClientClosed),
        "the client is closed; the request was not sent");
    call->stack.AsyncProcessResponse(nullptr, m);
  } else if (!admitted) {
    rejected_max_pending_->Increment();
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kTooManyPending),
        fmt::format("max_pending ({}) calls already outstanding; the request was not sent", limit_->max));
    call->stack.AsyncProcessResponse(nullptr, m);
  } else {
    next_->AsyncProcessRequest(call->stack, msg, nullptr);
  }
  // `call` may be gone now; only touch it through the response path.
}

void MessageDispatcher::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream*) {
  // The dispatcher is the top of the stack; requests enter through Dispatch().
  auto m = MethodReturnMessage::Failure(make_error_code(Errc::kInvalidArgument),
                                        "requests enter the dispatcher through Dispatch()");
  stack.AsyncProcessResponse(nullptr, m);
}

stats::Counter& MessageDispatcher::FailureCounter(const error_code& ec) {
  std::string name = ErrorName(ec);
  auto it = failures_by_code_.find(name);
  if (it != failures_by_code_.end()) return *it->second;
  stats::Counter* c = nullptr;
  try {
    c = &stats_.registry()->GetCounter("scales_failures_by_error", [&] {
      auto labels = stats_.labels();
      labels.emplace_back("error", name);
      return labels;
    }());
  } catch (const std::logic_error& e) {
    // The user registered this name and label set with another type. We are on the response
    // path: throwing would leave the call uncompleted (the loop drops the exception). Such
    // failures are counted nowhere (scales_failures still counts them); say so once per kind.
    static stats::Counter uncounted;
    c = &uncounted;
    SCALES_LOG(kError, "client {}: {}: its '{}' failures are not counted there (scales_failures counts them)",
               client_name_, stats::StatsRegistry::MetricErrorReason(e), name);
  }
  failures_by_code_.emplace(std::move(name), c);
  return *c;
}

void MessageDispatcher::AsyncProcessResponse(SinkStack& stack, void* context, Stream*,
                                             MethodReturnMessage& msg) {
  auto* call = static_cast<CallBase*>(context);
  auto elapsed = loop_.Now() - call->message.properties.start;
  latency_us_.Record(std::chrono::duration_cast<std::chrono::microseconds>(elapsed).count());
  if (msg.ok()) {
    successes_.Increment();
  } else {
    failures_.Increment();
    FailureCounter(msg.error).Increment();
  }
  if (call->info != nullptr) {
    call->info->error = msg.error;
    if (msg.error) {
      call->info->detail =
          fmt::format("client {}: {}", client_name_, msg.detail.empty() ? msg.error.message() : msg.detail);
    } else {
      call->info->detail.clear();
    }
    call->info->endpoint = call->message.properties.endpoint;
    call->info->response_headers = std::move(msg.headers);
    call->info->elapsed = elapsed;
    call->info->trace = call->message.properties.trace;
  }
  pending_gauge_.Add(-1);
  --pending_;
  loop_.CallEnded();
  if (call->holds_pending_slot) ReleasePendingSlot();
  call->in_initiation = initiating_ > 0;
  call->client_name = &client_name_;
  call->Complete(msg, loop_.executor());
  if (closed_ && pending_ == 0 && self_while_draining_) {
    // Destroying the stack from inside its own response path would pull it out from under
    // the frames below us: release on a later turn.
    boost::asio::post(loop_.executor(), [self = std::move(self_while_draining_)] {});
  }
}

void MessageDispatcher::Close() {
  if (closed_) return;
  closed_ = true;
  if (pending_ > 0) self_while_draining_ = shared_from_this();
  next_->Close();
}

SinkStatus MessageDispatcher::status() const {
  return closed_ ? SinkStatus::kClosed : next_->status();
}

void MessageDispatcher::DoOpen(OpenHandler handler) {
  if (closed_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kClientClosed));
    return;
  }
  next_->AsyncOpen(std::move(handler));
}

}  // namespace scales
