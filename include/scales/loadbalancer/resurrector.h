#pragma once
// ResurrectorSink: sits above an endpoint's pool. When the pool reports a fault (a connect
// failed), the endpoint is marked down: status() becomes Closed, so balancers stop choosing
// it, and requests that still reach it fail fast (kFailedFast). Requests already in the
// faulted pool finish there (with their reply or their own error); the pool is closed once
// they have. In the background it reconnects with jittered exponential backoff; the first
// successful open marks the endpoint up again.

#include <memory>
#include <string>
#include <vector>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/core/timer_queue.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

struct ResurrectorOptions {
  // First reconnect delay after a fault. Default 1 s.
  Duration initial_backoff = std::chrono::seconds(1);
  // Upper bound of the delay. Default 30 s.
  Duration max_backoff = std::chrono::seconds(30);
  // Growth of the delay after each failed reconnect. Default 2.0; must be >= 1.
  double multiplier = 2.0;
  // Each delay is drawn uniformly from [d * (1 - jitter), d]. Default 0.5; in [0, 1].
  double jitter = 0.5;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable:
// initial_backoff > 0, max_backoff >= initial_backoff, multiplier >= 1, jitter in [0, 1].
void Validate(const ResurrectorOptions& o);

// Thread safety: one per endpoint per event loop; used on that loop.
class ResurrectorSink final : public ClientMessageSink {
 public:
  // Validates `options` (throws as Validate does).
  ResurrectorSink(const SinkContext& ctx, SinkFactory next, ResurrectorOptions options);
  ~ResurrectorSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "resurrector"; }

  bool down() const noexcept { return down_; }
  Duration current_backoff() const noexcept { return backoff_; }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  // One child (the endpoint's pool) and the requests it holds.
  struct Child {
    SinkPtr sink;
    int64_t inflight = 0;
    bool retired = false;
  };

  void EnsureChild();
  void Adopt(SinkPtr sink);
  void OnFault(const Fault& fault);
  void ScheduleReconnect();
  static void OnReconnectTimer(void* self);
  void Reconnect();
  void RetireChild();
  void Destroy(Child* child);

  EventLoop& loop_;
  SinkContext ctx_;
  SinkFactory next_factory_;
  ResurrectorOptions options_;
  std::string address_;
  std::unique_ptr<Child> child_;
  std::vector<std::unique_ptr<Child>> retired_;
  SinkPtr candidate_;  // the reconnect attempt's child while it opens (closed by Close())
  uint64_t fault_subscription_ = 0;
  bool down_ = false;
  bool closed_ = false;
  bool reconnecting_ = false;
  Fault last_error_;
  TimePoint down_since_{};
  Duration backoff_{};
  TimerEntry reconnect_timer_;
  stats::Counter& marked_down_;
  stats::Counter& reconnects_;
  stats::Counter& failed_fast_;
};

SinkProvider ResurrectorProvider(ResurrectorOptions options = {});

}  // namespace scales
