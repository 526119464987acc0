#pragma once
// TimeoutSink: bounds the whole call by its deadline (MethodCallMessage::properties.deadline,
// computed by the dispatcher from the call's start and the client's or the call's timeout).
// When the deadline passes, it cancels the request (SinkStack::Cancel with kRequestTimeout):
// whichever sink holds the request — a pool queue, a connect, a transport with the request
// on the wire — answers it at once and releases what it held (an HTTP or Thrift connection
// with a request on it is closed; Mux sends Tdiscarded). The response then unwinds through
// every sink exactly once, so loads and pool slots are released in order.

#include <string>

#include "scales/core/forwarding_sink.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

// Thread safety: used on one event loop.
class TimeoutSink final : public ForwardingSink {
 public:
  TimeoutSink(EventLoop& loop, SinkPtr next, const stats::StatsScope& stats);

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  std::string_view name() const override { return "timeout"; }

 private:
  static void OnDeadline(void* stack);

  EventLoop& loop_;
  stats::Counter& timeouts_;
};

}  // namespace scales

namespace scales {
struct SinkProvider;
// Provider of the TimeoutSink (role "timeout").
SinkProvider TimeoutSinkProvider();
}  // namespace scales
