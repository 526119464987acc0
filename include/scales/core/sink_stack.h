#pragma once
// SinkStack: per request, the (sink, context) pairs that want to see the response, plus the
// request's cancellation hook. Allocation-free up to kInlineDepth entries.

#include <array>
#include <cassert>
#include <cstddef>
#include <vector>

#include "scales/core/error.h"
#include "scales/core/message.h"
#include "scales/core/sink.h"
#include "scales/core/timer_queue.h"

namespace scales {

// Thread safety: belongs to one request on one event loop.
class SinkStack {
 public:
  static constexpr size_t kInlineDepth = 8;

  explicit SinkStack(MethodCallMessage& message) : message_(message) {}
  SinkStack(const SinkStack&) = delete;
  SinkStack& operator=(const SinkStack&) = delete;

  MethodCallMessage& message() noexcept { return message_; }
  const MethodCallMessage& message() const noexcept { return message_; }

  // Registers `sink` to receive the response with `context`.
  void Push(ClientMessageSink* sink, void* context = nullptr) {
    if (size_ < kInlineDepth) {
      inline_[size_] = {sink, context};
    } else {
      overflow_.push_back({sink, context});
    }
    ++size_;
  }

  // Pops the top entry and hands it the response. The request is no longer parked anywhere
  // below, so the cancellation handler is cleared first.
  void AsyncProcessResponse(Stream* stream, MethodReturnMessage& msg) {
    assert(size_ > 0 && "response unwound past the bottom of the sink stack");
    cancel_sink_ = nullptr;
    --size_;
    Entry e = size_ < kInlineDepth ? inline_[size_] : overflow_.back();
    if (size_ >= kInlineDepth) overflow_.pop_back();
    e.sink->AsyncProcessResponse(*this, e.context, stream, msg);
  }

  size_t depth() const noexcept { return size_; }

  // The sink holding the request installs itself here while the request waits in it (in a
  // queue, on a connect, on the wire). Cancel() calls it once and clears it.
  void SetCancelHandler(ClientMessageSink* sink, void* context = nullptr) noexcept {
    cancel_sink_ = sink;
    cancel_context_ = context;
  }
  void ClearCancelHandler() noexcept { cancel_sink_ = nullptr; }
  bool has_cancel_handler() const noexcept { return cancel_sink_ != nullptr; }

  // Requests cancellation with `reason`. If a sink holds the request it answers it now;
  // otherwise the next sink that would park the request sees cancelled() and answers instead.
  void Cancel(const error_code& reason) {
    if (cancelled_) return;
    cancelled_ = true;
    cancel_reason_ = reason;
    if (cancel_sink_ != nullptr) {
      ClientMessageSink* s = cancel_sink_;
      cancel_sink_ = nullptr;
      s->CancelRequest(*this, cancel_context_, reason);
    }
  }
  // Cancels with `reason` only a request that a sink holds and has sent nowhere yet
  // (ClientMessageSink::RequestUnsent): Asio's `total`, no side effects. Never a retry's
  // attempt (an earlier attempt may have reached the server), nor an attempt whose backup is
  // out (cancelling it cancels the backup) or came back from a server that may have acted on
  // it. Otherwise nothing changes (a later Cancel() still acts).
  void CancelUnsent(const error_code& reason) {
    if (cancelled_ || cancel_sink_ == nullptr || message_.properties.retries > 0 || hedged_ ||
        !cancel_sink_->RequestUnsent(*this, cancel_context_)) {
      return;
    }
    Cancel(reason);
  }
  bool cancelled() const noexcept { return cancelled_; }
  // Set by the backup-request sink while a backup of this call is out on a stack of its own,
  // and for good once a backup may have reached a server.
  void set_hedged(bool hedged) noexcept { hedged_ = hedged; }
  const error_code& cancel_reason() const noexcept { return cancel_reason_; }

  // Storage for the TimeoutSink's per-request timer (so it needs no allocation).
  TimerEntry& deadline_timer() noexcept { return deadline_timer_; }

 private:
  struct Entry {
    ClientMessageSink* sink = nullptr;
    void* context = nullptr;
  };
  MethodCallMessage& message_;
  std::array<Entry, kInlineDepth> inline_{};
  std::vector<Entry> overflow_;
  size_t size_ = 0;
  ClientMessageSink* cancel_sink_ = nullptr;
  void* cancel_context_ = nullptr;
  bool cancelled_ = false;
  bool hedged_ = false;
  error_code cancel_reason_;
  TimerEntry deadline_timer_;
};

}  // namespace scales
