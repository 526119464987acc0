#include "scales/core/dispatcher.h"

#include <fmt/format.h>

namespace scales {

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
  if (limit_ && limit_->max > 0) {
    auto labels = stats_.labels();
    labels.emplace_back("reason", "max_pending");
    rejected_max_pending_ = &stats_.registry()->GetCounter("scales_rejected", labels);
  }
}

MessageDispatcher::~MessageDispatcher() = default;

void MessageDispatcher::Dispatch(CallBase* call, bool initiating) {
  MethodCallMessage& msg = call->message;
  msg.service = client_name_;
  auto& props = msg.properties;
  props.start = loop_.Now();
  Duration timeout = call->timeout.value_or(default_timeout_);
  if (timeout > Duration::zero() && timeout < Duration::max() / 2) {
    props.deadline = props.start + timeout;
  }
  if (trace_ids_ && !props.trace.valid()) {
    // A root span: trace, span and parent ids are equal (Finagle's convention); never 0.
    const uint64_t id = loop_.random().Next() | 1;
    props.trace.trace_id = props.trace.span_id = props.trace.parent_id = id;
  }
  requests_.Increment();
  pending_gauge_.Add(1);
  ++pending_;
  // Counted for every call: the response path gives it back, whichever way the call ends.
  const size_t held = limit_ ? limit_->pending.fetch_add(1, std::memory_order_relaxed) + 1 : 0;
  call->in_initiation = initiating;
  call->stack.Push(this, call);
  if (const auto& cs = call->cancel_state()) {
    cs->call = call;
    cs->loop.store(&loop_);
    // Cancelled before it reached the loop: the first sink that would hold it answers.
    if (cs->requested.load()) call->stack.Cancel(make_error_code(Errc::kCancelled));
  }
  if (call->timeout && *call->timeout < Duration::zero()) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kInvalidArgument),
                                          "CallOptions::timeout must not be negative");
    call->stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  if (closed_) {
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kClientClosed),
        "the client is closed; the request was not sent");
    call->stack.AsyncProcessResponse(nullptr, m);
  } else if (rejected_max_pending_ != nullptr && held > limit_->max) {
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
  auto& c = stats_.registry()->GetCounter("scales_failures_by_error",
                                         [&] {
                                           auto labels = stats_.labels();
                                           labels.emplace_back("error", name);
                                           return labels;
                                         }());
  failures_by_code_.emplace(std::move(name), &c);
  return c;
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
    call->info->detail =
        msg.error ? fmt::format("client {}: {}", client_name_, msg.detail.empty() ? msg.error.message() : msg.detail)
                  : std::string();
    call->info->endpoint = call->message.properties.endpoint;
    call->info->response_headers = std::move(msg.headers);
    call->info->elapsed = elapsed;
    call->info->trace = call->message.properties.trace;
  }
  pending_gauge_.Add(-1);
  --pending_;
  if (limit_) limit_->pending.fetch_sub(1, std::memory_order_relaxed);
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
