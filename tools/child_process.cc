#include "child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

#include <fmt/format.h>

extern char** environ;

namespace scales::tools {

namespace {

// The children running now, for the signal handler: a SIGTERM, SIGINT, SIGHUP or SIGPIPE that
// ends the tool (Ctrl-C, a CI harness, systemd, a closed output pipe) stops them too instead of
// leaving them behind.
constexpr size_t kMaxChildren = 64;
std::atomic<pid_t> running_children[kMaxChildren];
// Starts under way: the handler waits for them to be recorded (a child spawned while the tool
// ends would be missed). The spawning thread blocks the signals meanwhile, so the handler never
// waits on its own thread.
std::atomic<int> spawning{0};
constexpr int kTerminatingSignals[] = {SIGTERM, SIGINT, SIGHUP, SIGPIPE};  // SIGPIPE: `scales demo | head`

void OnTerminatingSignal(int signal) {
  for (long i = 0; spawning.load() > 0 && i < 200'000'000; ++i) {
  }
  for (auto& slot : running_children) {
    const pid_t pid = slot.load();
    if (pid > 0) kill(pid, SIGTERM);  // async-signal-safe
  }
  // Then end as the signal would have.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigaction(signal, &dfl, nullptr);
  raise(signal);
}

void InstallHandlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (int signal : kTerminatingSignals) {
      struct sigaction old {};
      sigaction(signal, nullptr, &old);
      if (old.sa_handler != SIG_DFL) continue;  // the command handles (or ignores) it itself
      struct sigaction act {};
      act.sa_handler = &OnTerminatingSignal;
      sigemptyset(&act.sa_mask);
      sigaction(signal, &act, nullptr);
    }
  });
}

void Track(pid_t pid) {
  for (auto& slot : running_children) {
    pid_t empty = 0;
    if (slot.compare_exchange_strong(empty, pid)) return;
  }
}

void Untrack(pid_t pid) {
  for (auto& slot : running_children) {
    pid_t expected = pid;
    if (slot.compare_exchange_strong(expected, 0)) return;
  }
}

// Blocks the terminating signals on this thread and marks a start under way, while it lives.
class SpawnGuard {
 public:
  SpawnGuard() {
    sigset_t block;
    sigemptyset(&block);
    for (int signal : kTerminatingSignals) sigaddset(&block, signal);
    pthread_sigmask(SIG_BLOCK, &block, &old_);
    spawning.fetch_add(1);
  }
  ~SpawnGuard() {
    spawning.fetch_sub(1);
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);  // a signal that came meanwhile is handled now
  }
  // The mask the child starts with: the thread's own, not the one blocking the signals.
  const sigset_t& child_mask() const noexcept { return old_; }

 private:
  sigset_t old_;
};

}  // namespace

bool ChildProcess::Start(const std::string& path, std::vector<std::string> args, std::string* first_line,
                         const std::string& output_file) {
  Stop();
  error_.clear();
  int fds[2] = {-1, -1};
  // Close-on-exec: a child started later (a restarted server) must not hold this pipe.
  if (first_line && pipe2(fds, O_CLOEXEC) != 0) {
    error_ = fmt::format("cannot start {}: no pipe for its output: {}", path, std::strerror(errno));
    return false;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (first_line) {
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  } else if (!output_file.empty()) {
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, output_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  } else {
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  }
  // Nothing else of ours (the clients' sockets, ZooKeeper's) reaches the child.
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  InstallHandlers();
  int rc;
  {
    SpawnGuard guard;
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setsigmask(&attr, &guard.child_mask());
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    rc = posix_spawn(&pid_, path.c_str(), &actions, &attr, argv.data(), environ);
    posix_spawnattr_destroy(&attr);
    if (rc == 0) Track(pid_);
  }
  posix_spawn_file_actions_destroy(&actions);
  if (first_line) close(fds[1]);
  if (rc != 0) {
    pid_ = -1;
    if (first_line) close(fds[0]);
    error_ = fmt::format("cannot start {}: {}", path, std::strerror(rc));
    return false;
  }
  if (first_line) {
    // Bounded: a child that prints half a line and hangs (or never prints) must not hang the
    // tool. The end of its output (it exited) ends the line as well.
    first_line->clear();
    const auto deadline = std::chrono::steady_clock::now() + kFirstLineTimeout;
    bool whole = false;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{fds[0], POLLIN, 0};
      const int ready = left.count() > 0 ? poll(&p, 1, static_cast<int>(left.count())) : 0;
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) break;
      char c;
      const ssize_t n = read(fds[0], &c, 1);
      if (n < 0 && errno == EINTR) continue;
      if (n != 1 || c == '\n') {
        whole = true;
        break;
      }
      *first_line += c;
    }
    close(fds[0]);
    if (!whole) {
      error_ = fmt::format("{} printed no whole first line within {} s (so far: '{}')", path,
                           std::chrono::duration_cast<std::chrono::seconds>(kFirstLineTimeout).count(), *first_line);
      Kill();
      return false;
    }
  }
  return true;
}

std::optional<std::string> ChildProcess::Exited() {
  if (pid_ <= 0) return std::nullopt;
  // Looked at without reaping first: the signal handler must forget the pid before it can be
  // reused by another process.
  siginfo_t info{};
  if (waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid != pid_) {
    return std::nullopt;
  }
  Untrack(pid_);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  if (WIFSIGNALED(status)) return "signal " + std::to_string(WTERMSIG(status));
  return "status " + std::to_string(WEXITSTATUS(status));
}

void ChildProcess::Stop() { Signal(SIGTERM); }

void ChildProcess::Kill() { Signal(SIGKILL); }

void ChildProcess::Signal(int signal) {
  if (pid_ <= 0) return;
  kill(pid_, signal);
  Untrack(pid_);  // before the pid is reaped (and could be reused): the child has its signal
  int status;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::string StartTestServer(ChildProcess& child, const std::string& kind, int port, std::vector<std::string> extra,
                            std::string& why) {
  std::vector<std::string> args = {"scales", "testserver", kind, "--port", std::to_string(port)};
  for (auto& e : extra) args.push_back(std::move(e));
  std::string line;
  if (!child.Start("/proc/self/exe", std::move(args), &line)) {
    why = child.error();
    return "";
  }
  if (line.rfind("listening ", 0) == 0) return line.substr(std::string("listening ").size());
  // Its stdout ended (or it printed something else): it is exiting, or failed on the way.
  std::optional<std::string> status;
  for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
       !(status = child.Exited()) && std::chrono::steady_clock::now() < until;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (status) {
    why = fmt::format("`scales testserver {} --port {}` exited ({}) before it printed \"listening HOST:PORT\"", kind,
                      port, *status);
  } else {
    why = fmt::format("`scales testserver {} --port {}` printed \"{}\" instead of \"listening HOST:PORT\"", kind,
                      port, line);
    child.Stop();
  }
  if (!line.empty() && status) why += fmt::format(" (it printed \"{}\")", line);
  return "";
}

}  // namespace scales::tools
