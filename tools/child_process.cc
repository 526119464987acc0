#include "child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace scales::tools {

bool ChildProcess::Start(const std::string& path, std::vector<std::string> args, std::string* first_line) {
  Stop();
  int fds[2] = {-1, -1};
  if (first_line && pipe(fds) != 0) return false;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (first_line) {
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
  } else {
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  }
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
