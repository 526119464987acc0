#include "scales/core/log.h"

#include <cstdio>
#include <memory>
#include <utility>

#include "core/fork_locks.h"

namespace scales {
namespace log_internal {

std::atomic<int> g_level{static_cast<int>(LogLevel::kOff)};

}  // namespace log_internal

namespace {

// The sink, behind a mutex: records copy the shared_ptr and call it unlocked, so a slow sink
// does not serialise the threads that log, and SetLogSink never waits for a running call.
struct SinkHolder {
  std::mutex mu;
  std::shared_ptr<const LogSink> sink;
  std::shared_ptr<const Clock> clock;  // null: steady clock
};

SinkHolder& Holder() {
  static SinkHolder* const holder = [] {
    auto* h = new SinkHolder();  // never destroyed: logging at exit works
    internal::HoldAcrossFork(h->mu, internal::ForkLockRank::kLog);
    return h;
  }();
  return *holder;
}

void WriteToStderr(const LogRecord& r) {
  std::string line =
      fmt::format("scales {} {}:{}: {}\n", ToString(r.level), r.file, r.line, r.message);
  std::fwrite(line.data(), 1, line.size(), stderr);  // one call, so lines do not interleave
}

}  // namespace

const char* ToString(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
    case LogLevel::kOff:
      return "off";
  }
  return "unknown";
}

LogLevel SetLogLevel(LogLevel level) noexcept {
  return static_cast<LogLevel>(log_internal::g_level.exchange(static_cast<int>(level)));
}

LogLevel GetLogLevel() noexcept {
  return static_cast<LogLevel>(log_internal::g_level.load(std::memory_order_relaxed));
}

LogSink SetLogSink(LogSink sink) {
  std::shared_ptr<const LogSink> next;
  if (sink) next = std::make_shared<const LogSink>(std::move(sink));
  std::shared_ptr<const LogSink> previous;
  {
    std::lock_guard lock(Holder().mu);
    previous = std::exchange(Holder().sink, std::move(next));
  }
  return previous ? *previous : LogSink();
}

void LogMessage(LogLevel level, const char* file, int line, std::string_view message) {
  if (!LogEnabled(level)) return;
  std::shared_ptr<const LogSink> sink;
  {
    std::lock_guard lock(Holder().mu);
    sink = Holder().sink;
  }
  LogRecord record{level, message, file ? file : "", line};
  if (sink) {
    (*sink)(record);
  } else {
    WriteToStderr(record);
  }
}

std::shared_ptr<const Clock> SetLogClock(std::shared_ptr<const Clock> clock) {
  std::lock_guard lock(Holder().mu);
  return std::exchange(Holder().clock, std::move(clock));
}

LogRateLimiter::LogRateLimiter(int per_second) noexcept : per_second_(per_second) {
  internal::HoldAcrossFork(mu_, internal::ForkLockRank::kLog);
}

LogRateLimiter::~LogRateLimiter() { internal::StopHoldingAcrossFork(mu_); }

bool LogRateLimiter::Allow(TimePoint now, uint64_t* suppressed) {
  std::lock_guard lock(mu_);
  // A clock that went back (a different injected clock) also starts a new window.
  if (!started_ || now < window_start_ || now - window_start_ >= std::chrono::seconds(1)) {
    started_ = true;
    window_start_ = now;
    in_window_ = 0;
  }
  if (in_window_ >= per_second_) {
    ++suppressed_;
    return false;
  }
  ++in_window_;
  *suppressed = std::exchange(suppressed_, 0);
  return true;
}

namespace log_internal {

TimePoint Now() noexcept {
  std::shared_ptr<const Clock> clock;
  {
    std::lock_guard lock(Holder().mu);
    clock = Holder().clock;
  }
  return clock ? clock->Now() : std::chrono::steady_clock::now();
}

void LogLimited(LogLevel level, const char* file, int line, uint64_t suppressed,
                std::string message) {
  if (suppressed > 0) message += fmt::format(" ({} similar messages suppressed)", suppressed);
  LogMessage(level, file, line, message);
}

}  // namespace log_internal
}  // namespace scales
