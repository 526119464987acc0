#include "scales/resilience/backup_request.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <utility>

#include <fmt/format.h>

#include "core/duration_text.h"
#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales {
namespace {

using std::chrono::duration_cast;
using std::chrono::microseconds;


RetryBudgetOptions BudgetOptions(const BackupRequestOptions& o) {
  RetryBudgetOptions b;
  b.ttl = o.budget_ttl;
  b.min_retries_per_sec = o.budget_min_per_sec;
  b.percent_can_retry = o.max_extra_load;
  return b;
}

}  // namespace

void Validate(const BackupRequestOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (!(o.max_extra_load >= RetryBudgetOptions::kMinPercentCanRetry && o.max_extra_load < 1.0)) {
    fail(fmt::format("backup.max_extra_load must be in [{}, 1) (got {})", RetryBudgetOptions::kMinPercentCanRetry,
                     o.max_extra_load));
  }
  if (!(o.percentile == 0.0 || (o.percentile > 0.0 && o.percentile < 1.0))) {
    fail(fmt::format("backup.percentile must be 0 (1 - max_extra_load) or in (0, 1) (got {})", o.percentile));
  }
  if (o.min_send_backup_after < Duration::zero()) {
    fail(fmt::format("backup.min_send_backup_after must be >= 0 (got {})", DurationText(o.min_send_backup_after)));
  }
  if (o.window <= Duration::zero()) fail(fmt::format("backup.window must be > 0 (got {})", DurationText(o.window)));
  if (o.window_slices < 1 || o.window_slices > 60) {
    fail(fmt::format("backup.window_slices must be in [1, 60] (got {})", o.window_slices));
  }
  if (o.refresh_interval <= Duration::zero()) {
    fail(fmt::format("backup.refresh_interval must be > 0 (got {})", DurationText(o.refresh_interval)));
  }
  if (o.budget_ttl < std::chrono::seconds(1) || o.budget_ttl > std::chrono::seconds(60)) {
    fail(fmt::format("backup.budget_ttl must be in [1 s, 60 s] (got {})", DurationText(o.budget_ttl)));
  }
  if (o.budget_min_per_sec < 0 || o.budget_min_per_sec > RetryBudgetOptions::kMaxMinRetriesPerSec) {
    fail(fmt::format("backup.budget_min_per_sec must be in [0, {}] (got {})", RetryBudgetOptions::kMaxMinRetriesPerSec,
                     o.budget_min_per_sec));
  }
}

// --- LatencyWindow ----------------------------------------------------------------------------

LatencyWindow::LatencyWindow(const Clock& clock, Duration window, int slices)
    : clock_(clock),
      slice_(std::max<Duration>(window / std::max(slices, 1), Duration(1))),
      epoch_(clock.Now()),
      slices_(static_cast<size_t>(std::max(slices, 1)), std::vector<uint32_t>(stats::Histogram::kBucketCount, 0)),
      slice_counts_(slices_.size(), 0) {}

void LatencyWindow::Roll() {
  const int64_t now_index = (clock_.Now() - epoch_) / slice_;
  if (now_index <= current_) return;
  const auto n = static_cast<int64_t>(slices_.size());
  for (int64_t i = 1; i <= std::min(now_index - current_, n); ++i) {
    const auto s = static_cast<size_t>((current_ + i) % n);
    if (slice_counts_[s] != 0) std::fill(slices_[s].begin(), slices_[s].end(), 0);
    slice_counts_[s] = 0;
  }
  current_ = now_index;
}

void LatencyWindow::Record(Duration latency) {
  Roll();
  const auto s = static_cast<size_t>(current_ % static_cast<int64_t>(slices_.size()));
  ++slices_[s][static_cast<size_t>(stats::Histogram::BucketIndex(duration_cast<microseconds>(latency).count()))];
  ++slice_counts_[s];
}

int64_t LatencyWindow::count() {
  Roll();
  int64_t n = 0;
  for (int64_t c : slice_counts_) n += c;
  return n;
}

namespace {
// A bucket's upper bound as a Duration: the last bucket's (INT64_MAX µs) saturates at
// Duration::max() instead of wrapping, in nanoseconds, into a negative delay.
Duration BucketBound(int b) {
  const int64_t us = stats::Histogram::BucketUpperBound(b);
  if (us > duration_cast<microseconds>(Duration::max()).count()) return Duration::max();
  return microseconds(us);
}
}  // namespace

std::optional<Duration> LatencyWindow::Percentile(double fraction) {
  const int64_t total = count();
  if (total == 0) return std::nullopt;
  // The rank of the sample at `fraction` (1-based), as HdrHistogram's getValueAtPercentile.
  const auto rank = std::max<int64_t>(1, static_cast<int64_t>(fraction * static_cast<double>(total) + 0.5));
  int64_t seen = 0;
  for (int b = 0; b < stats::Histogram::kBucketCount; ++b) {
    for (const auto& slice : slices_) seen += slice[static_cast<size_t>(b)];
    if (seen >= rank) return BucketBound(b);
  }
  return BucketBound(stats::Histogram::kBucketCount - 1);
}

// --- BackupRequestSink ------------------------------------------------------------------------

// One hedged call. Pooled: reused across calls. The caller's stack carries it as the context;
// the backup's stack carries it with the low bit set.
struct BackupRequestSink::Hedge {
  BackupRequestSink* sink = nullptr;
  SinkStack* caller = nullptr;
  Stream* stream = nullptr;  // the request stream passed to this sink
  TimePoint start{};
  TimePoint backup_start{};
  TimerEntry timer;
  bool primary_out = false;
  bool backup_out = false;
  bool superseded[2] = {false, false};  // [backup]: cancelled by this sink because the other won
  error_code backup_cancel_reason;      // the call's, when the backup was cancelled along with it
  int handling = 0;                     // response handlers of this hedge on the call stack
  // The outcome to deliver, once decided.
  bool decided = false;
  MethodReturnMessage result;
  Stream* result_stream = nullptr;
  std::string first_failure;  // a failure dropped while the other attempt was out
  // The backup attempt.
  std::optional<MethodCallMessage> backup_msg;
  std::optional<SinkStack> backup_stack;
  std::shared_ptr<void> backup_reply;
};

namespace {
void* Tag(void* h, bool backup) {
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(h) | (backup ? 1u : 0u));
}
}  // namespace

BackupRequestSink::BackupRequestSink(EventLoop& loop, SinkPtr next, BackupRequestOptions options,
                                     const BackupReplyOps& ops, const stats::StatsScope& stats,
                                     std::shared_ptr<RetryBudget> retry_budget)
    : ForwardingSink(std::move(next)),
      loop_(loop),
      options_((Validate(options), std::move(options))),  // before budget_ checks its own copy
      ops_(ops),
      percentile_(options_.percentile > 0 ? options_.percentile : 1.0 - options_.max_extra_load),
      latencies_(loop.clock(), options_.window, options_.window_slices),
      budget_(loop.clock(), BudgetOptions(options_)),
      retry_budget_(std::move(retry_budget)),
      next_refresh_(DeadlineAfter(loop.Now(), options_.refresh_interval)),
      sent_(stats.GetCounter("scales_backup_requests_sent")),
      won_(stats.GetCounter("scales_backup_requests_won")),
      budget_exhausted_(stats.GetCounter("scales_backup_requests_budget_exhausted")),
      retry_budget_exhausted_(stats.GetCounter("scales_backup_requests_retry_budget_exhausted")),
      send_after_hist_(stats.GetHistogram("scales_backup_send_after_us")) {}

BackupRequestSink::~BackupRequestSink() = default;

std::optional<Duration> BackupRequestSink::SendBackupAfter() {
  const TimePoint now = loop_.Now();
  if (now >= next_refresh_) {
    next_refresh_ = DeadlineAfter(now, options_.refresh_interval);
    if (auto p = latencies_.Percentile(percentile_)) {
      send_after_ = std::max(*p, options_.min_send_backup_after);
      send_after_hist_.Record(duration_cast<microseconds>(*send_after_).count());
    } else {
      send_after_.reset();
    }
  }
  return send_after_;
}

BackupRequestSink::Hedge* BackupRequestSink::Acquire() {
  Hedge* h;
  if (free_.empty()) {
    all_.push_back(std::make_unique<Hedge>());
    h = all_.back().get();
    h->sink = this;
  } else {
    h = free_.back();
    free_.pop_back();
  }
  ++outstanding_;
  return h;
}

void BackupRequestSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  if (closed_ || !msg.properties.idempotent || !ops_.matches(msg)) {
    next_->AsyncProcessRequest(stack, msg, stream);
    return;
  }
  // One deposit per call: the retry sink sends a call's retries through here again.
  if (msg.properties.retries == 0) budget_.Deposit();
  Hedge* h = Acquire();
  h->caller = &stack;
  h->stream = stream;
  h->start = loop_.Now();
  h->primary_out = true;
  if (auto delay = SendBackupAfter()) {
    // Saturating: a min_send_backup_after of Duration::max() means never, not a wrapped past.
    const TimePoint at = DeadlineAfter(h->start, *delay);
    if (at != TimePoint::max() && (!msg.properties.deadline || at < *msg.properties.deadline)) {
      loop_.timers().Schedule(h->timer, at, &OnTimer, h);
    }
  }
  stack.Push(this, Tag(h, false));
  next_->AsyncProcessRequest(stack, msg, stream);
}

void BackupRequestSink::OnTimer(void* arg) {
  auto* h = static_cast<Hedge*>(arg);
  h->sink->SendBackup(h);
}

void BackupRequestSink::SendBackup(Hedge* h) {
  if (closed_ || !h->primary_out || h->caller->cancelled()) return;
  // Only a dispatched first attempt is hedged (as Finagle's): one still waiting in the balancer
  // (for the server set's first members) has no endpoint yet, and a backup sent now could not
  // avoid it (the balancer routes the backup right after it, perhaps to the same node).
  if (h->caller->message().properties.endpoint.empty()) return;
  // A timer run late (a busy loop) can find the deadline passed: its own timer, due after this
  // one, is about to cancel the call. A backup now would only spend both budgets.
  const std::optional<TimePoint>& deadline = h->caller->message().properties.deadline;
  if (deadline && loop_.Now() >= *deadline) return;
  // Finagle's order: the backup budget, then the client's retry budget. A backup the retry
  // budget refuses keeps its backup-budget withdrawal (as in Finagle: that budget is normally
  // the tighter one, so this is rare).
  if (!budget_.TryWithdraw()) {
    budget_exhausted_.Increment();
    return;
  }
  if (retry_budget_ && !retry_budget_->TryWithdraw()) {
    budget_exhausted_.Increment();
    retry_budget_exhausted_.Increment();
    return;
  }
  sent_.Increment();
  const MethodCallMessage& caller = h->caller->message();
  h->backup_stack.reset();  // it refers to the previous backup message
  h->backup_msg.emplace(caller);
  MethodCallMessage& m = *h->backup_msg;
  m.properties.AddAvoidEndpoint(caller.properties.endpoint);  // besides those the caller avoids
  m.properties.endpoint.clear();
  m.properties.backup = true;
  // A span of its own in the call's trace, under the same parent, as a retry's: the server's
  // spans of the two attempts must not merge.
  if (m.properties.trace.valid()) m.properties.trace.span_id = NewTraceId(loop_.random());
  if (!h->backup_reply) h->backup_reply = ops_.create();
  ops_.attach(h->backup_reply.get(), m);
  h->backup_stack.emplace(m);
  h->backup_start = loop_.Now();
  h->backup_cancel_reason.clear();
  h->backup_out = true;
  h->caller->set_hedged(true);  // `total` may no longer cancel the first attempt (CancelUnsent)
  h->backup_stack->Push(this, Tag(h, true));
  next_->AsyncProcessRequest(*h->backup_stack, m, h->stream);
}

void BackupRequestSink::AsyncProcessResponse(SinkStack&, void* context, Stream* stream, MethodReturnMessage& msg) {
  const auto bits = reinterpret_cast<uintptr_t>(context);
  const bool backup = (bits & 1u) != 0;
  auto* h = reinterpret_cast<Hedge*>(bits & ~uintptr_t{1});
  ++h->handling;
  (backup ? h->backup_out : h->primary_out) = false;
  // Back: `total` may cancel the first attempt again (alive until both are back: MaybeDeliver),
  // unless the backup may have reached a server (a failure not known unprocessed, such as
  // kServerError or a timeout): then the call may have had side effects.
  if (backup && msg.error == Condition::kRetryable) h->caller->set_hedged(false);
  if (!backup) h->timer.Cancel();
  // A backup cancelled along with the call answers with the call's reason from here up (its
  // endpoint's failure accrual, below, saw kCancelled).
  if (backup && h->backup_cancel_reason && msg.error == Errc::kCancelled) msg.error = h->backup_cancel_reason;
  const bool superseded = h->superseded[backup ? 1 : 0];
  if (msg.ok() || msg.error == Errc::kRequestTimeout || superseded) {
    latencies_.Record(loop_.Now() - (backup ? h->backup_start : h->start));
  }
  if (!h->decided) Finish(h, backup, stream, msg);
  --h->handling;
  MaybeDeliver(h);
}

// Decides what a response means for the call: the outcome, or (a failure while the other
// attempt is out) nothing yet.
void BackupRequestSink::Finish(Hedge* h, bool backup, Stream* stream, MethodReturnMessage& msg) {
  const bool other_out = backup ? h->primary_out : h->backup_out;
  const bool cancelled = h->caller->cancelled();
  if (!msg.ok() && other_out && !cancelled) {
    // Wait for the other attempt (also while closing: Close() answers it); hold the caller's
    // request meanwhile if it is ours to hold.
    h->first_failure = fmt::format("{} to {} failed first: {}", backup ? "the backup request" : "the first attempt",
                                   backup ? h->backup_msg->properties.endpoint : h->caller->message().properties.endpoint,
                                   msg.detail);
    if (!backup) {
      h->caller->SetCancelHandler(this, h);
    }
    return;
  }
  h->decided = true;
  MethodCallMessage& caller = h->caller->message();
  h->result = std::move(msg);
  h->result_stream = nullptr;
  if (h->result.ok()) {
    if (backup) {
      won_.Increment();
      // The first attempt must stop before its reply slot (the caller's) is written.
      if (other_out) CancelLoser(h, backup);
      ops_.adopt(h->backup_reply.get(), stream, caller);
      caller.properties.endpoint = h->backup_msg->properties.endpoint;
      caller.properties.trace = h->backup_msg->properties.trace;  // CallInfo: the span that answered
    } else {
      if (other_out) CancelLoser(h, backup);
      // The winner's bytes go into the caller's slot, in case a transport passed its own.
      if (Stream* slot = caller.reply_slot<Stream>(); slot != nullptr && stream != nullptr && stream != slot) {
        slot->data = std::move(stream->data);
      }
    }
    h->result_stream = caller.reply_slot<Stream>();
    return;
  }
  // The delivered failure names one attempt's endpoint (which a retry avoids); the caller's
  // avoid list gains the other attempt's, so that a retry avoids both.
  if (backup) {
    caller.properties.AddAvoidEndpoint(std::move(caller.properties.endpoint));
    caller.properties.endpoint = h->backup_msg->properties.endpoint;
    h->result.detail += " (backup request)";
  } else if (h->backup_msg) {
    caller.properties.AddAvoidEndpoint(h->backup_msg->properties.endpoint);
  }
  if (!h->first_failure.empty()) h->result.detail += fmt::format("; {}", h->first_failure);
  // A failure with the other attempt out means the request was cancelled. The first attempt
  // was cancelled through the caller's stack (if it is the one still out, its answer follows);
  // cancel the backup too.
  if (other_out && !backup) CancelBackupWithCall(h, h->caller->cancel_reason());
}

// Both cancel with kCancelled, which failure accrual ignores (Finagle's superseded request is
// Failure.ignorable): this sink's choice says nothing about the endpoint of the attempt it stops.
void BackupRequestSink::CancelLoser(Hedge* h, bool backup) {
  h->superseded[backup ? 0 : 1] = true;
  const error_code reason = make_error_code(Errc::kCancelled);
  if (backup) {
    h->caller->Cancel(reason);
  } else {
    h->backup_stack->Cancel(reason);
  }
}

void BackupRequestSink::CancelBackupWithCall(Hedge* h, const error_code& reason) {
  // Not with `reason`: a backup cut off by the call's timeout only had the tail of the deadline,
  // which is no failure of its endpoint. AsyncProcessResponse gives its answer `reason` back.
  h->backup_cancel_reason = reason;
  h->backup_stack->Cancel(make_error_code(Errc::kCancelled));
}

void BackupRequestSink::MaybeDeliver(Hedge* h) {
  if (h->handling > 0 || !h->decided || h->primary_out || h->backup_out) return;
  SinkStack* caller = h->caller;
  Stream* stream = h->result_stream;
  MethodReturnMessage result = std::move(h->result);
  // Pass the outcome up first, then reuse the hedge: the caller's handler may start another
  // call, which must not get this one.
  caller->AsyncProcessResponse(stream, result);
  h->caller = nullptr;
  h->stream = nullptr;
  h->result_stream = nullptr;
  h->decided = false;
  h->superseded[0] = h->superseded[1] = false;
  h->backup_cancel_reason.clear();
  h->first_failure.clear();
  // Both attempts have unwound: drop the backup's message, stack and reply (a lost backup's reply
  // may hold what its transport had read, e.g. an HTTP body) instead of keeping them in the pool
  // until this hedge's next backup. Backups are rare; the next one allocates its reply anew.
  h->backup_stack.reset();
  h->backup_msg.reset();
  h->backup_reply.reset();
  --outstanding_;
  free_.push_back(h);
}

void BackupRequestSink::CancelRequest(SinkStack&, void* context, const error_code& reason) {
  // Only while the first attempt has failed and the backup is out: pass the cancellation on.
  auto* h = static_cast<Hedge*>(context);
  if (h->backup_out) CancelBackupWithCall(h, reason);
}

void BackupRequestSink::Close() {
  if (!closed_) {
    closed_ = true;
    for (auto& h : all_) h->timer.Cancel();
  }
  // Answers every attempt below; each hedged call is then answered as its last attempt unwinds.
  next_->Close();
}

SinkProvider BackupRequestProvider(BackupRequestOptions options, const BackupReplyOps& ops) {
  Validate(options);
  SinkProvider p{std::string(roles::kBackup), "backup",
                 [options, &ops](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<BackupRequestSink>(*ctx.loop, next(ctx), options, ops, ctx.stats,
                                                              ctx.retry_budget);
                 }};
  p.settings = {{"max_extra_load", SettingText(options.max_extra_load)},
                {"percentile", SettingText(options.percentile)},
                {"min_send_backup_after", SettingText(options.min_send_backup_after)},
                {"window", SettingText(options.window)},
                {"window_slices", SettingText(options.window_slices)},
                {"refresh_interval", SettingText(options.refresh_interval)},
                {"budget_ttl", SettingText(options.budget_ttl)},
                {"budget_min_per_sec", SettingText(options.budget_min_per_sec)}};
  return p;
}

}  // namespace scales
