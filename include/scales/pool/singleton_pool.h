#pragma once
// SingletonPool: at most one underlying sink (connection) per endpoint, shared by every
// request with unlimited concurrency; for multiplexing transports (Mux). Not for transports
// that carry one request at a time (HTTP/1.1, framed Thrift): use the WatermarkPool there. The sink is created on the first request or Open, and replaced when
// it is no longer usable (status Closed). Requests that arrive while it connects wait for
// the connect (cancellable). A failed connect fails them and raises on_faulted. A sink that
// raises on_faulted while it still runs (a Mux session the server drains) gets no new
// requests: they go to a new sink, while the old one finishes its own and closes itself.
// At most `max_waiters` requests wait for a connect; a request past that fails at once with
// kPoolQueueFull.

#include <deque>
#include <string>
#include <vector>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

struct SingletonPoolOptions {
  // Most requests waiting while the sink connects (per endpoint, per event loop); beyond it
  // requests fail with kPoolQueueFull. 0 means no queue: a request arriving while no sink is
  // open fails at once. Default 16384.
  size_t max_waiters = 16384;
};

// Thread safety: one pool per endpoint per event loop; used on that loop.
class SingletonPool final : public ClientMessageSink {
 public:
  SingletonPool(const SinkContext& ctx, SinkFactory factory, SingletonPoolOptions options = {});
  ~SingletonPool() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  bool RequestUnsent(const SinkStack& stack, void* context) const override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "singleton-pool"; }

  // Number of underlying sinks created so far (tests).
  size_t created() const noexcept { return created_; }
  size_t waiting() const noexcept { return waiting_.size(); }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  struct Waiter {
    SinkStack* stack;
    Stream* stream;
  };
  void Connect();
  // Takes every waiter out of the queue (and the waiters gauge).
  std::deque<Waiter> TakeWaiting();
  void OnOpened(const SinkPtr& sink, error_code ec);

  EventLoop& loop_;
  SinkContext ctx_;
  SinkFactory factory_;
  SingletonPoolOptions options_;
  std::string address_;
  SinkPtr child_;
  // Former children that raised on_faulted while still finishing requests (draining): kept,
  // unclosed, until they close themselves (or the pool closes).
  std::vector<SinkPtr> retired_;
  bool opening_ = false;
  bool closed_ = false;
  size_t created_ = 0;
  std::deque<Waiter> waiting_;  // FIFO
  OpenWaiters open_waiters_;
  stats::Counter& connect_failures_;
  stats::Gauge& waiters_gauge_;
  stats::Counter& queue_full_;
};

SinkProvider SingletonPoolProvider(SingletonPoolOptions options = {});

}  // namespace scales
