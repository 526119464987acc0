#pragma once
// MessageDispatcher: the entry of the sink stack. It packs a call into a MethodCallMessage,
// computes its deadline, sends it down the stack and, when the response comes back up,
// completes the caller's handler exactly once.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>

#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/asio/post.hpp>

#include "scales/core/message.h"
#include "scales/core/runtime.h"
#include "scales/core/sink.h"
#include "scales/core/sink_stack.h"
#include "scales/stats/stats.h"

namespace scales {

// What happened to one call, for callers that want more than the error code. Filled just
// before the handler runs.
struct CallInfo {
  error_code error;
  // Human-readable explanation of the error: client, endpoint, step, limit.
  std::string detail;
  // The endpoint the call went to ("host:port"), empty if none was chosen.
  std::string endpoint;
  // Time from the call's start to its completion.
  Duration elapsed{};
  // Response headers the protocol carried (ThriftMux: com.twitter.finagle.thrift.Response.headers).
  Headers response_headers;
  // The call's trace identifiers (given in CallOptions::trace, with the span id the client drew
  // when it was 0; or assigned by the client when ClientOptions::trace_ids is set; trace_id 0 =
  // none).
  TraceContext trace;
};

// Per-call options, all optional.
struct CallOptions {
  // Overrides the client's timeout for this call. Duration::zero() = no timeout.
  std::optional<Duration> timeout;
  // Extra application headers (HTTP headers; Mux request headers).
  Headers headers;
  // Trace identifiers to send (Mux TraceContext, B3 headers), e.g. an upstream request's,
  // forwarded; trace_id_high != 0 sends a 128-bit trace id. With trace_id != 0 and span_id 0
  // the call gets a new span id (drawn as root ids are) under the given parent_id (0 = none),
  // as Finagle's Trace.nextId. Default: a new root trace id per call (ClientOptions::trace_ids).
  std::optional<TraceContext> trace;
  // When set, receives the call's CallInfo before the handler runs. Must stay valid until
  // then, and belongs to one call at a time: the call writes it on its event loop, so two
  // calls in flight with the same CallInfo (e.g. through one ThriftClient::WithOptions handle)
  // race on it. Give each concurrent call its own.
  CallInfo* info = nullptr;
  // The call may safely be sent again after its connection closed with the request on it (the
  // retry sink then also retries kConnectionClosed). Default false: only failures known not to
  // have reached the server's application are retried.
  bool idempotent = false;
};

namespace internal {

// True if `ex` is the event loop's executor `loop` (null: `fallback` is not a loop's).
template <class Executor>
bool IsLoopExecutor(const Executor& ex, const boost::asio::io_context::executor_type* loop) {
  using LoopExecutor = boost::asio::io_context::executor_type;
  if (loop == nullptr) return false;
  if constexpr (std::is_same_v<Executor, LoopExecutor>) {
    return ex == *loop;
  } else if constexpr (requires { ex.template target<LoopExecutor>(); }) {  // a type-erased executor
    const LoopExecutor* own = ex.template target<LoopExecutor>();
    return own != nullptr && *own == *loop;
  } else {
    return false;
  }
}

// Runs `h(args...)`; an exception it throws is reported and dropped (ReportHandlerException,
// scales/core/runtime.h). A handler runs inside the transport that answered its call (a Mux
// session's read loop, a connection's read): an exception unwinding through it would leave the
// session not reading and the other calls on it unanswered, or end the event loop's thread.
template <class Handler, class... Args>
void InvokeHandler(Handler& h, Args&&... args) noexcept {
  try {
    std::move(h)(std::forward<Args>(args)...);
  } catch (...) {
    ReportHandlerException(std::current_exception());
  }
}

// The outstanding work a call holds on its handler's executor (CallBase::TrackWork).
using TrackedWork = std::optional<boost::asio::any_completion_executor>;

// Outstanding work on `handler`'s associated executor, or none for a handler without an
// executor of its own (it runs on the operation's loop).
template <class Handler>
TrackedWork HandlerWork(Handler& handler) {
  using Ex = boost::asio::associated_executor_t<Handler, boost::asio::system_executor>;
  if constexpr (!std::is_same_v<Ex, boost::asio::system_executor>) {
    boost::asio::any_completion_executor ex(
        boost::asio::get_associated_executor(handler, boost::asio::system_executor()));
    if (ex.template target<boost::asio::system_executor>() != nullptr) return {};  // type-erased, none of its own
    return TrackedWork(boost::asio::prefer(ex, boost::asio::execution::outstanding_work.tracked));
  }
  return {};
}

// Runs `h(args...)` on its associated executor (else `fallback`, the call's event loop, whose
// thread calls this); posted to `fallback` first when `defer` (never inside an initiating
// function). A handler without an executor of its own runs in place: that is what dispatching
// to the loop from the loop's own thread does, without type-erasing the handler into an Asio
// function object (an allocation and two indirect calls per call). Exceptions from the handler
// are reported and dropped (InvokeHandler). `work` is released only once the handler was handed
// to its executor: when deferred, after the post, or that executor's io_context could run out
// of work and return from run() before the handler reached it.
template <class Handler, class... Args>
void CompleteOn(Handler h, const boost::asio::any_io_executor& fallback, bool defer, TrackedWork work,
                Args... args) {
  if (!defer) {
    auto ex = boost::asio::get_associated_executor(h, fallback);
    if (IsLoopExecutor(ex, fallback.template target<boost::asio::io_context::executor_type>())) {
      InvokeHandler(h, std::move(args)...);
      return;
    }
    boost::asio::dispatch(ex, [h = std::move(h), ... args = std::move(args)]() mutable {
      InvokeHandler(h, std::move(args)...);
    });
    return;  // `work` goes now: the handler is queued on (or ran in) its executor
  }
  boost::asio::post(fallback, [h = std::move(h), fallback, work = std::move(work),
                               ... args = std::move(args)]() mutable {
    auto ex = boost::asio::get_associated_executor(h, fallback);
    boost::asio::dispatch(ex, [h = std::move(h), ... args = std::move(args)]() mutable {
      InvokeHandler(h, std::move(args)...);
    });
    work.reset();
  });
}

}  // namespace internal

// One call in flight: the message, its sink stack and the typed reply storage. Allocated by
// the typed client, destroyed by Complete().
//
// Call objects (every subclass) are allocated through a small per-thread cache of freed
// blocks: a call completes on its loop, and the call its handler starts there reuses the
// block, so a steady stream of calls costs no heap allocation for its call objects. Blocks of
// up to 2 KiB are cached, at most 64 KiB per thread; sanitizer builds bypass the cache so that
// use-after-free stays visible.
class CallBase {
 public:
  CallBase() : stack(message) {}
  virtual ~CallBase() = default;
  CallBase(const CallBase&) = delete;
  CallBase& operator=(const CallBase&) = delete;

  static void* operator new(std::size_t size);
  static void operator delete(void* p, std::size_t size) noexcept;
  // Over-aligned calls (a handler with an alignas(32) member, say) bypass the cache.
  static void* operator new(std::size_t size, std::align_val_t alignment) { return ::operator new(size, alignment); }
  static void operator delete(void* p, std::size_t size, std::align_val_t alignment) noexcept {
    ::operator delete(p, size, alignment);
  }

  MethodCallMessage message;
  SinkStack stack;
  std::optional<Duration> timeout;
  CallInfo* info = nullptr;
  // Set by the dispatcher just before Complete(): true when a user's initiating function is on
  // this thread's stack (the call completing inside its own, or another, initiating call), so
  // the handler must be posted; false when it may run in place.
  bool in_initiation = false;
  // The call holds a slot of the client's max_pending limit (given back when it completes).
  bool holds_pending_slot = false;
  // Set by the dispatcher just before Complete(), valid during it: the client's name, for an
  // error the call itself finds while completing (a reply that does not decode).
  const std::string* client_name = nullptr;

  // Completes the caller's handler with the outcome and destroys the call. `fallback` runs
  // the handler when it has no associated executor.
  virtual void Complete(MethodReturnMessage& msg, const boost::asio::any_io_executor& fallback) = 0;

  // Asio per-operation cancellation (e.g. the loser of an awaitable `||`): when the caller's
  // handler has a connected cancellation slot, emitting it cancels the call with kCancelled on
  // the call's loop. The slot may be emitted from any thread, before or after dispatch.
  // `terminal` and `partial` cancel at any point; `total` alone before dispatch, and after it
  // only while a sink holds the request unsent (SinkStack::CancelUnsent: queued in a pool).
  //
  // The slot's handler stays with the caller's signal after the call completed, and may be
  // emitted after the client and its runtime are gone: it holds the loop weakly.
  struct CancelState {
    // The call's loop, written once when the call reaches it, before `dispatched` is set: the
    // slot's handler reads it (from any thread) only once it saw `dispatched`.
    std::weak_ptr<EventLoop> loop;
    std::atomic<bool> dispatched{false};
    std::atomic<bool> requested{false};
    CallBase* call = nullptr;  // touched only on `loop`; null once completed
  };
  const std::shared_ptr<CancelState>& cancel_state() const noexcept { return cancel_state_; }

 protected:
  // Asio's rule for asynchronous operations: the handler's associated executor counts
  // outstanding work until the operation completes, so an io_context that runs only the
  // handler (`bind_executor(ioc, h)`, a coroutine's) does not run out of work and return
  // before the reply came. Nothing is tracked for a handler without an executor of its own
  // (it runs on the call's loop). Complete() hands the work to CompleteOn, which releases it
  // once the handler was handed to its executor.
  template <class Handler>
  void TrackWork(Handler& handler) {
    work_ = internal::HandlerWork(handler);
  }
  internal::TrackedWork work_;

  template <class Handler>
  void ConnectCancellation(Handler& handler) {
    auto slot = boost::asio::get_associated_cancellation_slot(handler);
    if (!slot.is_connected()) return;
    cancel_state_ = std::make_shared<CancelState>();
    slot.assign([state = cancel_state_](boost::asio::cancellation_type type) {
      using boost::asio::cancellation_type;
      if (type == cancellation_type::none) return;
      // `total` alone promises no side effects: true before the call reached its loop; past
      // that only while the sink holding the request has sent it nowhere (CancelUnsent).
      const bool total_only = (type & (cancellation_type::terminal | cancellation_type::partial)) ==
                              cancellation_type::none;
      if (!state->dispatched.load()) {
        state->requested = true;
        // Not yet dispatched: the dispatcher will see `requested` (seq_cst, as its store of
        // `dispatched`). Seen dispatched now, it may not have: post as after dispatch (the
        // second cancellation, if it did, finds the call cancelled or gone).
        if (!state->dispatched.load()) return;
      }
      if (auto loop = state->loop.lock()) {
        boost::asio::post(loop->executor(), [state, total_only] {
          if (state->call == nullptr) return;
          if (total_only) {
            state->call->stack.CancelUnsent(make_error_code(Errc::kCancelled));
          } else {
            state->call->stack.Cancel(make_error_code(Errc::kCancelled));
          }
        });
      }
    });
  }
  // On the loop, when the call completes.
  void DisconnectCancellation() noexcept {
    if (cancel_state_) cancel_state_->call = nullptr;
  }

  std::shared_ptr<CancelState> cancel_state_;
};

// A call whose reply is a `Reply` value; the handler gets (error_code, Reply).
template <class Reply>
class TypedCall : public CallBase {
 public:
  using Signature = void(error_code, Reply);
  using Handler = boost::asio::any_completion_handler<Signature>;

  explicit TypedCall(Handler handler) : handler_(std::move(handler)) {
    message.SetReplySlot(&reply);
    ConnectCancellation(handler_);
    TrackWork(handler_);
  }

  Reply reply{};

  void Complete(MethodReturnMessage& msg, const boost::asio::any_io_executor& fallback) override {
    DisconnectCancellation();
    internal::TrackedWork work = std::move(work_);  // released once the handler is on its way
    Handler h = std::move(handler_);
    error_code ec = msg.error;
    Reply r = ec ? Reply{} : std::move(reply);
    const bool defer = in_initiation;
    delete this;
    internal::CompleteOn(std::move(h), fallback, defer, std::move(work), ec, std::move(r));
  }

 private:
  Handler handler_;
};

// Completes `call`, made through an empty (default-constructed) client handle, with
// kClientClosed and `detail` (also into `info`, the call's CallInfo, when given), from a thread
// of its own: never inside the initiating function (unless no thread can be had).
void FailEmptyClient(CallBase* call, CallInfo* info, std::string detail);

// Completes `call`, made in a child made by fork() through a client whose runtime is the
// parent's (Runtime::made_before_fork), with kClientClosed and `detail` (also into the call's
// CallInfo), from a thread of its own: no loop of that runtime runs in this process, and the
// system executor's threads may be the parent's too. A handler bound to an executor of the
// parent's runtime is queued there and never runs.
void FailCallMadeBeforeFork(CallBase* call, std::string detail);

// Thread safety: one dispatcher per client per event loop, used only on that loop.
class MessageDispatcher final : public ClientMessageSink {
 public:
  // Admission limit shared by a client's dispatchers (one per event loop): the most calls the
  // client may hold at once (0 = no limit). So that a call costs no shared atomic, each
  // dispatcher reserves slots `batch` at a time and counts its calls against its reserve;
  // it gives slots back once more than 2 x batch are unused. A call is therefore refused when
  // the reserves are exhausted, which may be up to (loops - 1) x 2 x batch calls before `max`
  // calls are outstanding; batch is at most 1/32 of the limit per loop (and at most 64), and
  // 1 when the limit is small (every slot then reserved and returned one by one, exactly).
  struct PendingLimit {
    explicit PendingLimit(size_t max, size_t loops = 1)
        : max(max), batch(std::max<size_t>(1, std::min<size_t>(64, max / (32 * std::max<size_t>(1, loops))))) {}
    const size_t max;
    const size_t batch;
    // Slots reserved by the dispatchers: their outstanding calls plus their unused reserves.
    std::atomic<size_t> pending{0};
  };

  MessageDispatcher(EventLoop& loop, std::string client_name, SinkPtr next, Duration default_timeout,
                    const stats::StatsScope& stats, std::shared_ptr<PendingLimit> limit = nullptr,
                    bool trace_ids = false);
  ~MessageDispatcher() override;

  // Sends `call` down the stack. On the loop's thread. `initiating`: the caller is the
  // user's initiating function (completion must not be inline). `refuse`: the client was closed
  // when the call was made: answer kClientClosed as a closed dispatcher does.
  void Dispatch(CallBase* call, bool initiating, bool refuse = false);

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override { return "dispatcher"; }

  EventLoop& loop() const noexcept { return loop_; }
  const SinkPtr& next() const noexcept { return next_; }
  size_t pending() const noexcept { return pending_; }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  stats::Counter& FailureCounter(const error_code& ec);
  // Takes a max_pending slot for one call; false when the limit is reached.
  bool AcquirePendingSlot();
  void ReleasePendingSlot();

  EventLoop& loop_;
  std::string client_name_;
  SinkPtr next_;
  Duration default_timeout_;
  stats::StatsScope stats_;
  stats::Counter& requests_;
  stats::Counter& successes_;
  stats::Counter& failures_;
  stats::Gauge& pending_gauge_;
  stats::Histogram& latency_us_;
  std::unordered_map<std::string, stats::Counter*> failures_by_code_;
  std::shared_ptr<PendingLimit> limit_;  // null when there is no limit
  size_t slots_reserved_ = 0;            // of limit_->pending, for this loop's calls
  size_t slots_used_ = 0;
  bool trace_ids_ = false;
  stats::Counter* rejected_max_pending_ = nullptr;
  size_t pending_ = 0;
  // Dispatch(initiating = true) calls on the stack: a call completing meanwhile is posted.
  size_t initiating_ = 0;
  bool closed_ = false;
  std::shared_ptr<ClientMessageSink> self_while_draining_;
};

}  // namespace scales
