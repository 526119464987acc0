#pragma once

#include <utility>

#include "scales/core/sink.h"
#include "scales/core/sink_stack.h"

namespace scales {

// A sink with one next sink, to which Open, Close and status() are delegated. The base of
// every pass-through sink (timeout, formatters, user sinks that inspect messages).
class ForwardingSink : public ClientMessageSink {
 public:
  explicit ForwardingSink(SinkPtr next) : next_(std::move(next)) {}

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override {
    next_->AsyncProcessRequest(stack, msg, stream);
  }
  void Close() override { next_->Close(); }
  SinkStatus status() const override { return next_->status(); }
  const SinkPtr& next() const noexcept { return next_; }

 protected:
  void DoOpen(OpenHandler handler) override { next_->AsyncOpen(std::move(handler)); }

  SinkPtr next_;
};

}  // namespace scales
