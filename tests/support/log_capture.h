#pragma once
// LogCapture: records what scales logs (SCALES_LOG, scales/core/log.h) while it lives, for tests
// that assert a log line was written. The log level and sink are process-wide: the capture sets
// them in its constructor and restores the previous ones in its destructor, so use one at a
// time. Thread safe: records arrive from event-loop threads.
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "scales/core/log.h"

namespace scales::test {

class LogCapture {
 public:
  explicit LogCapture(LogLevel level = LogLevel::kInfo) {
    previous_level_ = SetLogLevel(level);
    previous_sink_ = SetLogSink([this](const LogRecord& r) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.emplace_back(r.message);
    });
  }
  ~LogCapture() {
    SetLogSink(std::move(previous_sink_));
    SetLogLevel(previous_level_);
  }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  // Whether some record contains every one of `needles`.
  bool Has(std::vector<std::string_view> needles) const {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& line : lines_) {
      bool all = true;
      for (auto n : needles) all = all && line.find(n) != std::string::npos;
      if (all) return true;
    }
    return false;
  }
  // Forgets the records so far.
  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    lines_.clear();
  }
  // Every record so far, one per line (for failure messages).
  std::string All() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::string out;
    for (const auto& line : lines_) out += line + "\n";
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> lines_;
  LogLevel previous_level_;
  LogSink previous_sink_;
};

}  // namespace scales::test
