#include "scales/core/timeout_sink.h"

#include <chrono>

#include <fmt/format.h>

#include "core/duration_text.h"
#include "scales/core/runtime.h"

namespace scales {
namespace {

std::string TimeoutDetail(const MethodCallMessage& msg, std::string_view below) {
  const auto& p = msg.properties;
  const Duration budget = p.deadline ? *p.deadline - p.start : Duration::zero();
  // No endpoint: none chosen yet, or a retry's attempt between its backoff and its endpoint
  // (the retry sink moved the failed attempt's endpoint to avoid_endpoints).
  std::string where = !p.endpoint.empty()              ? fmt::format("to {}", p.endpoint)
                      : !p.avoid_endpoints.empty() ? fmt::format("after an attempt to {}", p.avoid_endpoints.back())
                                                   : std::string("before an endpoint was chosen");
  std::string s = fmt::format("{} request {} timed out after {} (deadline)",
                              msg.method.empty() ? "the" : msg.method, where, DurationText(budget));
  if (p.retries > 0) s += fmt::format(", attempt {}", p.retries + 1);
  if (!below.empty()) s += fmt::format(": {}", below);
  return s;
}

}  // namespace

TimeoutSink::TimeoutSink(EventLoop& loop, SinkPtr next, const stats::StatsScope& stats)
    : ForwardingSink(std::move(next)), loop_(loop), timeouts_(stats.GetCounter("scales_timeouts")) {}

void TimeoutSink::OnDeadline(void* arg) {
  static_cast<SinkStack*>(arg)->Cancel(make_error_code(Errc::kRequestTimeout));
}

void TimeoutSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  stack.Push(this, nullptr);
  if (msg.properties.deadline) {
    if (loop_.Now() >= *msg.properties.deadline) {
      auto m = MethodReturnMessage::Failure(make_error_code(Errc::kRequestTimeout),
                                            "the deadline had passed before the request was sent");
      stack.AsyncProcessResponse(stream, m);
      return;
    }
    loop_.timers().Schedule(stack.deadline_timer(), *msg.properties.deadline, &OnDeadline, &stack);
  }
  next_->AsyncProcessRequest(stack, msg, stream);
}

void TimeoutSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                       MethodReturnMessage& msg) {
  stack.deadline_timer().Cancel();
  if (msg.error == Errc::kRequestTimeout) {
    timeouts_.Increment();
    msg.detail = TimeoutDetail(stack.message(), msg.detail);
  }
  stack.AsyncProcessResponse(stream, msg);
}

}  // namespace scales

#include "scales/core/provider.h"

namespace scales {
SinkProvider TimeoutSinkProvider() {
  return SinkProvider{std::string(roles::kTimeout), "timeout",
                      [](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                        return std::make_shared<TimeoutSink>(*ctx.loop, next(ctx), ctx.stats);
                      }};
}
}  // namespace scales
