#pragma once
// WatermarkPool: a pool of single-request sinks (connections) to one endpoint, as in scales
// and Finagle. It keeps up to `low_watermark` connections open forever, opens more on demand
// up to `high_watermark`, and beyond that queues requests FIFO up to `max_waiters`; a request
// past that fails with kPoolQueueFull. Connections above the low watermark that stay idle
// for `idle_timeout` are closed. A queued request whose deadline passes leaves the queue with
// a timeout (the TimeoutSink cancels it). A connection that dies is dropped and replaced on
// demand; it does not close the pool. A failed connect fails the request that wanted it and
// raises on_faulted (the resurrector above marks the endpoint down).

#include <chrono>
#include <cstddef>
#include <deque>
#include <list>
#include <string>
#include <utility>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/core/timer_queue.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

struct WatermarkPoolOptions {
  // Connections kept open while idle. Default 1.
  size_t low_watermark = 1;
  // Most connections open at once (per endpoint, per event loop). Default 256; >= 1.
  size_t high_watermark = 256;
  // Most requests waiting for a connection; beyond it requests fail with kPoolQueueFull.
  // Default 4096.
  size_t max_waiters = 4096;
  // Idle connections above the low watermark are closed after this long. Default 60 s.
  Duration idle_timeout = std::chrono::seconds(60);
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable:
// high_watermark >= 1, low_watermark <= high_watermark, idle_timeout > 0.
void Validate(const WatermarkPoolOptions& o);

// Thread safety: one pool per endpoint per event loop; used on that loop.
class WatermarkPool final : public ClientMessageSink {
 public:
  WatermarkPool(const SinkContext& ctx, SinkFactory connection_factory, WatermarkPoolOptions options);
  ~WatermarkPool() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  bool RequestUnsent(const SinkStack& stack, void* context) const override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "watermark-pool"; }

  size_t size() const noexcept { return conns_.size(); }
  size_t idle() const noexcept { return idle_.size(); }
  size_t waiters() const noexcept { return waiters_.size(); }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  struct Conn {
    SinkPtr sink;
    std::list<Conn>::iterator self;
    TimePoint idle_since{};
    bool opening = false;
    SinkStack* opening_for = nullptr;  // the request waiting for this connect, if any
    Stream* opening_stream = nullptr;
  };
  struct Waiter {
    SinkStack* stack;
    Stream* stream;
  };

  Conn* TakeIdle();
  Conn* NewConn();
  void StartOpen(Conn* c, SinkStack* stack, Stream* stream);
  void OnConnOpened(Conn* c, error_code ec);
  void Send(Conn* c, SinkStack& stack, Stream* stream);
  // Reuses (idle or a waiter's) or drops a connection whose request was answered.
  void Release(Conn* c);
  void ReleaseOne(Conn* c);
  void Drop(Conn* c);
  void ServeWaiters();
  void ArmIdleTimer();
  static void OnIdleTimer(void* self);
  void ExpireIdle();
  void Fail(SinkStack& stack, Stream* stream, error_code ec, std::string detail);

  EventLoop& loop_;
  SinkContext ctx_;
  SinkFactory factory_;
  WatermarkPoolOptions options_;
  std::string address_;
  std::list<Conn> conns_;
  std::deque<Conn*> idle_;      // front: idle longest; back: most recently released
  std::deque<Waiter> waiters_;  // FIFO
  bool releasing_ = false;       // Release() is on the stack
  std::deque<Conn*> released_;   // answered meanwhile, for that Release() to take on
  OpenWaiters open_waiters_;
  bool closed_ = false;
  TimerEntry idle_timer_;
  stats::Gauge& size_gauge_;
  stats::Gauge& idle_gauge_;
  stats::Gauge& waiters_gauge_;
  stats::Counter& queue_full_;
  stats::Counter& expired_;
  stats::Counter& connect_failures_;
};

SinkProvider WatermarkPoolProvider(WatermarkPoolOptions options = {});

}  // namespace scales
