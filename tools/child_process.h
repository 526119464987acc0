#pragma once
// A child process of the tool (the demo's servers): started with posix_spawn, stopped with
// SIGTERM (or killed with SIGKILL) and waited for on destruction. Not thread-safe. The child gets
// none of the tool's file descriptors but 0-2. While children run, a SIGTERM, SIGINT, SIGHUP or
// SIGPIPE that ends the tool (one it does not handle itself) first sends them SIGTERM, so none is
// left behind.

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace scales::tools {

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { Stop(); }

  // Starts `path` with `args` (args[0] is the program name). With `first_line`, stdout is a
  // pipe and the first line the child prints is read into it (the test servers print
  // "listening HOST:PORT"; stderr stays the tool's): a child that prints no whole line within
  // kFirstLineTimeout (and has not exited) is killed and Start() fails; otherwise stdout and stderr go to
  // `output_file` (created or truncated), or to /dev/null when it is empty. On failure, error()
  // says why.
  bool Start(const std::string& path, std::vector<std::string> args, std::string* first_line,
             const std::string& output_file = "");
  static constexpr std::chrono::seconds kFirstLineTimeout{30};
  void Stop();
  // Kills the child with SIGKILL, like a crash, and waits for it.
  void Kill();
  bool running() const noexcept { return pid_ > 0; }
  // If the child has exited (it is then reaped and no longer running): how ("status 1",
  // "signal 9"); nullopt while it runs or when there is none.
  std::optional<std::string> Exited();
  // Why the last Start() failed ("cannot start /usr/bin/java: No such file or directory").
  const std::string& error() const noexcept { return error_; }

 private:
  void Signal(int signal);  // sends it and waits for the child

  pid_t pid_ = -1;
  std::string error_;
};

// Starts `scales testserver <kind> --port <port> [extra...]` (this same binary) and returns its
// endpoint ("127.0.0.1:PORT"), or "" when it did not start, with the reason in `why` (the spawn
// error, or how the server exited; its own message went to the tool's stderr).
std::string StartTestServer(ChildProcess& child, const std::string& kind, int port,
                            std::vector<std::string> extra, std::string& why);

}  // namespace scales::tools
