#pragma once
// Logging: scales writes its diagnostics through a logger the program supplies, and is quiet
// by default. The level starts at kOff: nothing is formatted or written until the program
// calls SetLogLevel (warnings included). With a level but no sink of its own, records go to
// stderr, one line each. scales installs nothing into other logging frameworks: to route its
// records into glog, spdlog or syslog, give SetLogSink a function that forwards them.
//
//   scales::SetLogLevel(scales::LogLevel::kWarning);
//   scales::SetLogSink([](const scales::LogRecord& r) { spdlog::warn("{}", r.message); });
//
// In scales' own code, use the macros: they test the level (one relaxed atomic load) before
// formatting anything, so a disabled log line costs next to nothing on the request path.
//
//   SCALES_LOG(kWarning, "client {}: connect to {} failed: {}", name, endpoint, ec.message());
//   SCALES_LOG_RATE_LIMITED(kWarning, 5, "client {}: request to {} failed: {}", ...);
//
// The rate-limited form lets through at most N records per second per call site and adds to
// the next record let through how many were suppressed ("(12 similar messages suppressed)").
//
// Thread safety: every function is safe from any thread. The sink is called from whichever
// thread logs (often an event loop), possibly from several at once: it must be thread safe
// and should not block. A sink must not call SetLogSink.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "scales/core/clock.h"

namespace scales {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kOff = 4 };

// "debug", "info", "warning", "error", "off".
const char* ToString(LogLevel level) noexcept;

struct LogRecord {
  LogLevel level = LogLevel::kInfo;
  std::string_view message;  // valid during the sink call only
  const char* file = "";     // source file of the log line (__FILE__)
  int line = 0;
};

using LogSink = std::function<void(const LogRecord&)>;

// Sets the minimum level written (kOff = nothing, the default). Returns the previous level.
LogLevel SetLogLevel(LogLevel level) noexcept;
LogLevel GetLogLevel() noexcept;
// Sets where records go; an empty function restores the default (stderr). Returns the
// previous sink (empty if it was the default). A sink call already running on another thread
// may finish after this returns.
LogSink SetLogSink(LogSink sink);

// The clock SCALES_LOG_RATE_LIMITED reads (nullptr: the steady clock, the default). Tests set
// a ManualClock. Returns the previous one.
std::shared_ptr<const Clock> SetLogClock(std::shared_ptr<const Clock> clock);

// Whether a record of `level` would be written now.
inline bool LogEnabled(LogLevel level) noexcept;

// Writes one record (if `level` is enabled). Prefer the macros.
void LogMessage(LogLevel level, const char* file, int line, std::string_view message);

// At most `per_second` records per one-second window (windows start at the first record let
// through after the previous window ended). Thread safe; for the SCALES_LOG_RATE_LIMITED
// macro (one static limiter per call site) and for code that keeps its own.
class LogRateLimiter {
 public:
  explicit LogRateLimiter(int per_second) noexcept;  // its lock is held across fork()
  ~LogRateLimiter();
  LogRateLimiter(const LogRateLimiter&) = delete;
  LogRateLimiter& operator=(const LogRateLimiter&) = delete;

  // Whether a record may be written at `now`. When it returns true, `*suppressed` is the
  // number of records refused since the last one let through (then reset to 0).
  bool Allow(TimePoint now, uint64_t* suppressed);

 private:
  std::mutex mu_;
  const int per_second_;
  TimePoint window_start_{};
  bool started_ = false;
  int in_window_ = 0;
  uint64_t suppressed_ = 0;
};

namespace log_internal {
extern std::atomic<int> g_level;
// Now() of the log clock.
TimePoint Now() noexcept;
// Writes a record the rate limiter let through, noting how many were suppressed before it.
void LogLimited(LogLevel level, const char* file, int line, uint64_t suppressed,
                std::string message);
}  // namespace log_internal

inline bool LogEnabled(LogLevel level) noexcept {
  return level != LogLevel::kOff &&
         static_cast<int>(level) >= log_internal::g_level.load(std::memory_order_relaxed);
}

}  // namespace scales

// SCALES_LOG(kWarning, "fmt {}", args...): formats and writes only when the level is enabled.
#define SCALES_LOG(level, ...)                                            \
  do {                                                                    \
    if (::scales::LogEnabled(::scales::LogLevel::level)) {                \
      ::scales::LogMessage(::scales::LogLevel::level, __FILE__, __LINE__, \
                           ::fmt::format(__VA_ARGS__));                   \
    }                                                                     \
  } while (false)

// SCALES_LOG_RATE_LIMITED(kWarning, N, "fmt {}", args...): as SCALES_LOG, at most N records
// per second from this call site (all threads together).
#define SCALES_LOG_RATE_LIMITED(level, per_second, ...)                                         \
  do {                                                                                          \
    if (::scales::LogEnabled(::scales::LogLevel::level)) {                                      \
      /* never destroyed: records may come from other threads during exit */                    \
      static ::scales::LogRateLimiter& scales_log_limiter_ =                                    \
          *new ::scales::LogRateLimiter(per_second);                                            \
      uint64_t scales_log_suppressed_ = 0;                                                      \
      if (scales_log_limiter_.Allow(::scales::log_internal::Now(), &scales_log_suppressed_)) {  \
        ::scales::log_internal::LogLimited(::scales::LogLevel::level, __FILE__, __LINE__,       \
                                           scales_log_suppressed_, ::fmt::format(__VA_ARGS__)); \
      }                                                                                         \
    }                                                                                           \
  } while (false)
