#pragma once
// BackupRequestSink (role "backup"): hedged requests, after Finagle's BackupRequestFilter. When
// an idempotent call has not been answered after a latency percentile of recent calls, a second
// attempt goes to another node; the first successful answer wins and the other attempt is
// cancelled down its own stack (Mux sends Tdiscarded; an HTTP or Thrift connection with the
// request on it is closed by its transport).
//
// Which calls: only calls marked idempotent (CallOptions::idempotent, i.e.
// msg.properties.idempotent) whose reply slot has the type the sink was built for (Stream for
// Thrift, ThriftMux and Mux; http::Response for HTTP; see BackupRequestProvider<Reply>). Every
// other call passes straight through, untouched and unmeasured.
//
// When: the delay is the `percentile` (default 1 - max_extra_load, Finagle's choice: 99 % for
// 1 % extra load) of the latencies of the sink's recent attempts (a window of `window`, in
// `window_slices` slices), at least `min_send_backup_after`. It is recomputed every
// `refresh_interval`; until the first refresh that finds samples no backup is sent. Recorded:
// attempts that succeeded, timed out (kRequestTimeout, including a backup cancelled because the
// call timed out), or lost to the other attempt (so a slow node does not hide its slowness by
// being cancelled); other failures are fast failures that would pull the percentile down
// (Finagle's rule). A backup is sent only if
//   - the first attempt has not been answered when the delay ends, and was dispatched: the
//     balancer gave it an endpoint for the backup to avoid (a first attempt still waiting for
//     the server set's first members gets no backup, as in Finagle),
//   - the call's deadline is after the delay's end (no backup after the deadline),
//   - the request was not cancelled and the sink is not closed,
//   - both budgets allow it, checked in Finagle's order:
//     1. the backup budget: a RetryBudget of its own where every hedged call deposits (once:
//        not again for its retries, which the retry sink sends through here) and every backup
//        withdraws, with percent_can_retry = max_extra_load, so backups stay below
//        max_extra_load of the calls of the last budget_ttl (plus budget_min_per_sec per second);
//     2. then the client's retry budget (the RetrySink's, one per client per event loop, handed
//        down in SinkContext::retry_budget; none when the stack has no retry sink above): a
//        backup withdraws from it like a retry, so retries and backups together stay within
//        it. This sink never deposits there (the retry sink deposits once per call).
//     As in Finagle, a backup the retry budget refuses has still spent its backup-budget
//     tokens (the backup budget is normally the tighter one).
// A refused backup is counted (scales_backup_requests_budget_exhausted, whichever budget
// refused; scales_backup_requests_retry_budget_exhausted also counts those the retry budget
// refused).
//
// Who wins: the first attempt to answer successfully. A failed answer while the other attempt
// is still out is dropped and the other attempt's outcome is delivered, whatever it is (if both
// fail, the later failure, with the earlier one's detail appended; the caller's
// properties.avoid_endpoints then also names the other attempt's endpoint, so that a retry
// avoids both). A failed first attempt before the backup was sent is delivered at once (the
// retry sink above may retry it). When the request is cancelled (the timeout sink above, the
// caller) the outcome is that cancellation:
// the first attempt is cancelled through the caller's stack as usual (its endpoint's failure
// accrual sees the caller's reason, e.g. kRequestTimeout, as for a call without backup), and
// this sink cancels the backup.
//
// Failure accrual: an attempt this sink cancels never counts against its endpoint. It cancels
// with kCancelled, which failure accrual ignores (as Finagle's superseded request is a
// Failure.ignorable): the loser when the other attempt won, and the backup when the call is
// cancelled (a backup cut off by the call's timeout only had the tail of the deadline; Finagle
// passes the timeout interrupt on to it, and counts it). When the answer of a backup cancelled
// along with the call is the one delivered, its code is replaced by the caller's reason
// (kRequestTimeout stays kRequestTimeout for the caller, and counts as a latency above).
//
// Design (why attempts look the way they do):
//   - The first attempt runs on the caller's SinkStack and message, as if this sink were not
//     there: hedging costs nothing for the calls (99 %) that never need a backup.
//   - The backup runs on a SinkStack and MethodCallMessage of its own (a copy of the caller's,
//     with properties.endpoint cleared and the first attempt's endpoint added to
//     properties.avoid_endpoints, so the balancer picks a node neither attempt nor an earlier
//     attempt of the call went to). It shares the request: the payload pointer
//     and the request Stream, which the transports only read. It has its own reply slot (a
//     Reply the sink owns), because two attempts must never write the same reply: the winner's
//     reply is moved into the caller's slot only after the loser was cancelled.
//   - The sink must sit BELOW the formatter (Thrift, ThriftMux), i.e. just above the balancer:
//     timeout -> retry -> formatter -> backup -> balancer. There both attempts carry the bytes
//     the formatter produced (sequence id included, which stays valid: each attempt goes on
//     its own connection), and the formatter checks whichever reply won. For HTTP (no
//     formatter) it sits just above the balancer too.
//   - The backup winning cancels the first attempt with SinkStack::Cancel(kCancelled) on the
//     caller's stack, whose holder answers it; that cancellation unwinds to this sink, which
//     then passes the backup's reply up instead (the caller's stack stays marked cancelled(),
//     which sinks above only consult on failures). A first attempt winning cancels the
//     backup's own stack.
//   - The caller is answered only once both attempts have unwound back to this sink, so
//     neither attempt can outlive the caller's payload, reply slot or stack. Holders answer a
//     cancellation at once (sink.h), so this costs nothing in practice.
//   - While the first attempt has failed and only the backup is out, this sink holds the
//     caller's request (SetCancelHandler): a cancellation is passed on to the backup.
//   - Close() stops new backups and closes the sink below, which answers every attempt; each
//     call is then answered, once, before Close() returns.
//
// Metrics (client labels): counters scales_backup_requests_sent (backups sent),
// scales_backup_requests_won (the call's reply came from a successful backup),
// scales_backup_requests_budget_exhausted (backups a budget refused, either one),
// scales_backup_requests_retry_budget_exhausted (of those, the ones the client's retry budget
// refused after the backup budget allowed them); histogram scales_backup_send_after_us (the
// delay, recorded at each refresh that finds samples).

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "scales/core/clock.h"
#include "scales/core/forwarding_sink.h"
#include "scales/core/provider.h"
#include "scales/core/timer_queue.h"
#include "scales/resilience/retry_budget.h"
#include "scales/stats/stats.h"

namespace scales {

namespace roles {
inline constexpr std::string_view kBackup = "backup";
}  // namespace roles

class EventLoop;

struct BackupRequestOptions {
  // Backups allowed, as a fraction of the hedged calls (the budget). Default 0.01; in
  // [1e-6, 1). budget_min_per_sec (below) is at most 1,000,000 (RetryBudgetOptions' bounds).
  double max_extra_load = 0.01;
  // Latency percentile after which a backup is sent, in (0, 1); 0 (the default) means
  // 1 - max_extra_load.
  double percentile = 0;
  // Lower bound of the delay. Default 1 ms; >= 0.
  Duration min_send_backup_after = std::chrono::milliseconds(1);
  // Latencies of the last `window` count, in `window_slices` slices (Finagle: 30 s in 3).
  // window > 0; 1 <= window_slices <= 60.
  Duration window = std::chrono::seconds(30);
  int window_slices = 3;
  // How often the delay is recomputed from the window (Finagle: 3 s). > 0.
  Duration refresh_interval = std::chrono::seconds(3);
  // The budget's deposit lifetime (1 s .. 60 s) and reserve (backups per second always
  // allowed; default 0: only max_extra_load counts). >= 0.
  Duration budget_ttl = std::chrono::seconds(10);
  int budget_min_per_sec = 0;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable.
void Validate(const BackupRequestOptions& o);

// Latencies over a sliding window, in log-linear buckets (stats::Histogram's layout, in
// microseconds: about 6 % precision). Thread safety: none (one event loop).
class LatencyWindow {
 public:
  LatencyWindow(const Clock& clock, Duration window, int slices);
  void Record(Duration latency);
  // The smallest bucket upper bound at or below which `fraction` of the live samples lie, or
  // nullopt when there are none.
  std::optional<Duration> Percentile(double fraction);
  int64_t count();

 private:
  void Roll();

  const Clock& clock_;
  Duration slice_;
  TimePoint epoch_;
  std::vector<std::vector<uint32_t>> slices_;
  std::vector<int64_t> slice_counts_;
  int64_t current_ = 0;  // absolute index of the current slice since epoch_
};

// How the sink gives a backup attempt its own reply and hands the winner's to the caller,
// for one reply type (type-erased so the sink is not a template). See BackupReplyOpsFor.
struct BackupReplyOps {
  // Whether `caller` has a reply slot of this type.
  bool (*matches)(const MethodCallMessage& caller);
  std::shared_ptr<void> (*create)();
  // Resets `reply` and makes it the reply slot of `attempt`.
  void (*attach)(void* reply, MethodCallMessage& attempt);
  // Moves the winning backup's reply into the caller's slot. `stream` is the Stream the
  // backup's response carried (Stream replies: transports may pass the reply there).
  void (*adopt)(void* reply, Stream* stream, MethodCallMessage& caller);
};

template <class Reply>
const BackupReplyOps& BackupReplyOpsFor() {
  static_assert(std::is_default_constructible_v<Reply> && std::is_move_assignable_v<Reply>);
  static const BackupReplyOps ops{
      [](const MethodCallMessage& m) { return m.reply_slot<Reply>() != nullptr; },
      []() -> std::shared_ptr<void> { return std::make_shared<Reply>(); },
      [](void* r, MethodCallMessage& attempt) {
        auto* reply = static_cast<Reply*>(r);
        *reply = Reply{};
        attempt.SetReplySlot(reply);
      },
      [](void* r, Stream* stream, MethodCallMessage& caller) {
        Reply* from = static_cast<Reply*>(r);
        if constexpr (std::is_same_v<Reply, Stream>) {
          if (stream != nullptr) from = stream;
        }
        Reply* to = caller.reply_slot<Reply>();
        if (to != from) *to = std::move(*from);
      }};
  return ops;
}

// Thread safety: one per client per event loop; used on that loop.
class BackupRequestSink final : public ForwardingSink {
 public:
  // `retry_budget`: the client's retry budget on this loop (SinkContext::retry_budget), which
  // backups also withdraw from; null: only the sink's own budget limits backups.
  BackupRequestSink(EventLoop& loop, SinkPtr next, BackupRequestOptions options, const BackupReplyOps& ops,
                    const stats::StatsScope& stats, std::shared_ptr<RetryBudget> retry_budget = nullptr);
  ~BackupRequestSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  void Close() override;
  std::string_view name() const override { return "backup"; }

  // The current delay (nullopt: no backups yet), refreshing it first when it is due.
  std::optional<Duration> SendBackupAfter();
  const BackupRequestOptions& options() const noexcept { return options_; }
  RetryBudget& budget() noexcept { return budget_; }
  // The client's retry budget shared with the retry sink, or null.
  RetryBudget* retry_budget() noexcept { return retry_budget_.get(); }
  // Hedged calls not yet answered.
  size_t outstanding() const noexcept { return outstanding_; }
  // The latencies the delay is computed from.
  LatencyWindow& latencies() noexcept { return latencies_; }

 private:
  struct Hedge;

  Hedge* Acquire();
  static void OnTimer(void* arg);
  void SendBackup(Hedge* h);
  void Finish(Hedge* h, bool backup, Stream* stream, MethodReturnMessage& msg);
  // Cancels the attempt other than `backup`, because this one won (the loser's latency counts).
  void CancelLoser(Hedge* h, bool backup);
  // Cancels the backup because the call was cancelled with `reason`.
  void CancelBackupWithCall(Hedge* h, const error_code& reason);
  void MaybeDeliver(Hedge* h);

  EventLoop& loop_;
  BackupRequestOptions options_;
  const BackupReplyOps& ops_;
  double percentile_;
  LatencyWindow latencies_;
  RetryBudget budget_;
  std::shared_ptr<RetryBudget> retry_budget_;
  std::optional<Duration> send_after_;
  TimePoint next_refresh_;
  std::vector<std::unique_ptr<Hedge>> all_;
  std::vector<Hedge*> free_;
  size_t outstanding_ = 0;
  bool closed_ = false;
  stats::Counter& sent_;
  stats::Counter& won_;
  stats::Counter& budget_exhausted_;
  stats::Counter& retry_budget_exhausted_;
  stats::Histogram& send_after_hist_;
};

// Provider of the BackupRequestSink (role "backup") for reply type `ops` (one sink per client
// per event loop, each with its own latency window and budget, sharing the loop's retry budget
// when a retry sink is above it). Validates `options`.
SinkProvider BackupRequestProvider(BackupRequestOptions options, const BackupReplyOps& ops);

// Reply = scales::Stream for Thrift, ThriftMux and Mux; http::Response for HTTP. Insert it just
// above the balancer: builder.InsertBefore(roles::kLoadBalancer, BackupRequestProvider<...>()).
template <class Reply = Stream>
SinkProvider BackupRequestProvider(BackupRequestOptions options = {}) {
  return BackupRequestProvider(std::move(options), BackupReplyOpsFor<Reply>());
}

}  // namespace scales
