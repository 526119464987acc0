#include "child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

extern char** environ;

namespace scales::tools {

namespace {

// The children running now, for the signal handler: a SIGTERM, SIGINT or SIGHUP to the tool
// (Ctrl-C, a CI harness, systemd) stops them too instead of leaving them behind.
constexpr size_t kMaxChildren = 64;
std::atomic<pid_t> running_children[kMaxChildren];

void OnTerminatingSignal(int signal) {
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

void Track(pid_t pid) {
  static std::once_flag handlers;
  std::call_once(handlers, [] {
    for (int signal : {SIGTERM, SIGINT, SIGHUP}) {
      struct sigaction old {};
      sigaction(signal, nullptr, &old);
      if (old.sa_handler != SIG_DFL) continue;  // the command handles it itself
      struct sigaction act {};
      act.sa_handler = &OnTerminatingSignal;
      sigemptyset(&act.sa_mask);
      sigaction(signal, &act, nullptr);
    }
  });
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

}  // namespace

bool ChildProcess::Start(const std::string& path, std::vector<std::string> args, std::string* first_line) {
  Stop();
  int fds[2] = {-1, -1};
  // Close-on-exec: a child started later (a restarted server) must not hold this pipe.
  if (first_line && pipe2(fds, O_CLOEXEC) != 0) return false;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (first_line) {
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  } else {
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  }
  // Nothing else of ours (the clients' sockets, ZooKeeper's) reaches the child.
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int rc = posix_spawn(&pid_, path.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (first_line) close(fds[1]);
  if (rc != 0) {
    pid_ = -1;
    if (first_line) close(fds[0]);
    return false;
  }
  Track(pid_);
  if (first_line) {
    first_line->clear();
    char c;
    while (read(fds[0], &c, 1) == 1 && c != '\n') *first_line += c;
    close(fds[0]);
  }
  return true;
}

void ChildProcess::Stop() { Signal(SIGTERM); }

void ChildProcess::Kill() { Signal(SIGKILL); }

void ChildProcess::Signal(int signal) {
  if (pid_ <= 0) return;
  kill(pid_, signal);
  int status;
  waitpid(pid_, &status, 0);
  Untrack(pid_);
  pid_ = -1;
}

std::string StartTestServer(ChildProcess& child, const std::string& kind, int port, std::vector<std::string> extra) {
  std::vector<std::string> args = {"scales", "testserver", kind, "--port", std::to_string(port)};
  for (auto& e : extra) args.push_back(std::move(e));
  std::string line;
  if (!child.Start("/proc/self/exe", std::move(args), &line) || line.rfind("listening ", 0) != 0) return "";
  return line.substr(std::string("listening ").size());
}

}  // namespace scales::tools
