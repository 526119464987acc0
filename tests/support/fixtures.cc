#include "support/fixtures.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "zk_probe.h"

namespace scales::test {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr const char* kNginxPath = "/usr/sbin/nginx";
constexpr auto kStartTimeout = std::chrono::seconds(10);
constexpr auto kBindRetry = std::chrono::seconds(5);

std::runtime_error SystemError(const std::string& what) {
  return std::runtime_error(fmt::format("{}: {}", what, std::strerror(errno)));
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

sockaddr_in Loopback(int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return addr;
}

std::string DescribeWaitStatus(int status) {
  if (status == -1) return "exit status unknown";
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("killed by signal {}", WTERMSIG(status));
  return fmt::format("wait status {}", status);
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void SleepFor(milliseconds duration) { std::this_thread::sleep_for(duration); }

}  // namespace

std::vector<int> FreeTcpPorts(size_t n) {
  std::vector<Fd> held;
  std::vector<int> ports;
  for (size_t i = 0; i < n; ++i) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) throw SystemError("FreeTcpPorts: socket");
    sockaddr_in addr = Loopback(0);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      throw SystemError("FreeTcpPorts: bind 127.0.0.1:0");
    }
    socklen_t len = sizeof addr;
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      throw SystemError("FreeTcpPorts: getsockname");
    }
    ports.push_back(ntohs(addr.sin_port));
    held.push_back(std::move(fd));
  }
  return ports;
}

int FreeTcpPort() { return FreeTcpPorts(1)[0]; }

PortHold::PortHold(int port) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return;
  const int on = 1;
  ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  sockaddr_in addr = Loopback(port);
  if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) Release();
}

PortHold& PortHold::operator=(PortHold&& other) noexcept {
  if (this != &other) {
    Release();
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

void PortHold::Release() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

bool ZooKeeperAnswersRuok(int port, milliseconds timeout) { return tools::ZooKeeperAnswersRuok(port, timeout); }

bool CanConnect(int port, milliseconds timeout) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.get() < 0) return false;
  sockaddr_in addr = Loopback(port);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return true;
  if (errno != EINPROGRESS) return false;
  pollfd pfd{fd.get(), POLLOUT, 0};
  int ready;
  do {
    ready = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  } while (ready < 0 && errno == EINTR);
  if (ready <= 0) return false;
  int error = 0;
  socklen_t len = sizeof error;
  return ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
}

std::string ToolPath() {
  if (const char* env = std::getenv("SCALES_TOOL_PATH"); env != nullptr && *env != '\0') {
    return env;
  }
#ifdef SCALES_TOOL_PATH
  return SCALES_TOOL_PATH;
#else
  throw std::runtime_error(
      "path of the scales tool unknown: set SCALES_TOOL_PATH or compile with -DSCALES_TOOL_PATH");
#endif
}

// ---------------------------------------------------------------------------------------------
// ChildProcess

ChildProcess::ChildProcess(std::vector<std::string> argv, const std::string& stderr_path) : argv_(std::move(argv)) {
  if (argv_.empty()) throw std::invalid_argument("ChildProcess: empty argv");
  int err_fd = -1;
  if (!stderr_path.empty()) {
    err_fd = ::open(stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (err_fd < 0) throw SystemError("ChildProcess: open " + stderr_path);
  }
  struct ErrFdCloser {
    int fd;
    ~ErrFdCloser() {
      if (fd >= 0) ::close(fd);
    }
  } err_fd_closer{err_fd};
  int out_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) throw SystemError("ChildProcess: pipe");
  // Reports an exec failure (errno) to the parent; closed by a successful exec.
  int exec_pipe[2];
  if (::pipe2(exec_pipe, O_CLOEXEC) != 0) {
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    throw SystemError("ChildProcess: pipe");
  }
  // Everything the child needs is prepared here: after fork only async-signal-safe calls.
  std::vector<char*> args;
  for (auto& arg : argv_) args.push_back(arg.data());
  args.push_back(nullptr);
  rlimit files{};
  int max_fd = ::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY
                   ? static_cast<int>(std::min<rlim_t>(files.rlim_cur, 1 << 16))
                   : 4096;
  pid_t parent = ::getpid();

  pid_t pid = ::fork();
  if (pid < 0) {
    int saved = errno;
    for (int fd : {out_pipe[0], out_pipe[1], exec_pipe[0], exec_pipe[1]}) ::close(fd);
    errno = saved;
    throw SystemError("ChildProcess: fork");
  }
  if (pid == 0) {
    // A peer must not outlive a crashed test binary.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(out_pipe[1], STDOUT_FILENO);
    if (err_fd >= 0) ::dup2(err_fd, STDERR_FILENO);
    // Descriptors the test process opened without O_CLOEXEC (client sockets, say) must not
    // stay open in the peer, or closing them in the test would not close the connection.
    if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
      for (int fd = 3; fd < max_fd; ++fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    sigset_t none;
    ::sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGPIPE, &dfl, nullptr);
    ::execv(args[0], args.data());
    int error = errno;
    [[maybe_unused]] auto ignored = ::write(exec_pipe[1], &error, sizeof error);
    ::_exit(127);
  }
  pid_ = pid;
  ::close(out_pipe[1]);
  ::close(exec_pipe[1]);
  stdout_fd_ = out_pipe[0];
  int exec_error = 0;
  ssize_t n;
  do {
    n = ::read(exec_pipe[0], &exec_error, sizeof exec_error);
  } while (n < 0 && errno == EINTR);
  ::close(exec_pipe[0]);
  if (n == sizeof exec_error) {
    Reap(/*block=*/true);
    ::close(stdout_fd_);
    stdout_fd_ = -1;
    throw std::runtime_error(
        fmt::format("cannot execute {}: {}", argv_[0], std::strerror(exec_error)));
  }
}

ChildProcess::~ChildProcess() {
  Stop();
  if (stdout_fd_ >= 0) ::close(stdout_fd_);
}

std::string ChildProcess::CommandLine() const {
  std::string line;
  for (const auto& arg : argv_) {
    if (!line.empty()) line += ' ';
    bool quote = arg.empty() || arg.find_first_of(" \t'\";$") != std::string::npos;
    line += quote ? "'" + arg + "'" : arg;
  }
  return line;
}

std::optional<std::string> ChildProcess::ReadLine(milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (auto newline = buffer_.find('\n'); newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      return line;
    }
    if (eof_ || stdout_fd_ < 0) {
      if (buffer_.empty()) return std::nullopt;
      return std::exchange(buffer_, std::string());
    }
    auto remaining = std::chrono::ceil<milliseconds>(deadline - Clock::now());
    if (remaining.count() < 0) return std::nullopt;
    pollfd pfd{stdout_fd_, POLLIN, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(remaining.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) return std::nullopt;
    char chunk[4096];
    ssize_t n = ::read(stdout_fd_, chunk, sizeof chunk);
    if (n > 0) {
      buffer_.append(chunk, static_cast<size_t>(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      eof_ = true;
    }
  }
}

bool ChildProcess::Reap(bool block) {
  if (wait_status_) return true;
  int status = 0;
  pid_t result;
  do {
    result = ::waitpid(pid_, &status, block ? 0 : WNOHANG);
  } while (result < 0 && errno == EINTR);
  if (result == pid_) {
    wait_status_ = status;
    return true;
  }
  if (result < 0) {  // ECHILD: someone else reaped it.
    wait_status_ = -1;
    return true;
  }
  return false;
}

bool ChildProcess::Running() { return pid_ > 0 && !Reap(/*block=*/false); }

std::optional<int> ChildProcess::WaitForExit(milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  auto pause = milliseconds(1);
  while (!Reap(/*block=*/false)) {
    if (Clock::now() >= deadline) return std::nullopt;
    SleepFor(pause);
    pause = std::min(pause * 2, milliseconds(20));
  }
  return wait_status_;
}

int ChildProcess::Stop(milliseconds grace) {
  if (pid_ <= 0) return -1;
  if (Reap(/*block=*/false)) return *wait_status_;
  ::kill(pid_, SIGTERM);
  if (auto status = WaitForExit(grace)) return *status;
  return Kill();
}

int ChildProcess::Kill() {
  if (pid_ <= 0) return -1;
  if (!Reap(/*block=*/false)) {
    ::kill(pid_, SIGKILL);
    Reap(/*block=*/true);
  }
  return *wait_status_;
}

// ---------------------------------------------------------------------------------------------
// TestHttpServer

TestHttpServer::TestHttpServer(std::string name, int port, int threads)
    : name_(std::move(name)), threads_(threads) {
  Start(port, port == 0 ? milliseconds(0) : kBindRetry);
}

TestHttpServer::~TestHttpServer() = default;  // ~ChildProcess stops the server.

std::string TestHttpServer::endpoint() const { return fmt::format("127.0.0.1:{}", port_); }

pid_t TestHttpServer::pid() const { return process_ ? process_->pid() : -1; }

void TestHttpServer::Stop() {
  if (process_) process_->Stop();
  process_.reset();
  hold_ = PortHold(port_);
}

void TestHttpServer::Kill() {
  if (process_) process_->Kill();
  process_.reset();
  hold_ = PortHold(port_);
}

void TestHttpServer::Restart() {
  Stop();
  Start(port_, kBindRetry);
}

void TestHttpServer::Start(int port, milliseconds bind_retry) {
  hold_.Release();
  auto retry_until = Clock::now() + bind_retry;
  for (;;) {
    std::vector<std::string> argv = {ToolPath(), "testserver", "http"};
    argv.insert(argv.end(),
                {"--port", std::to_string(port), "--threads", std::to_string(threads_)});
    if (!name_.empty()) {
      argv.push_back("--name");
      argv.push_back(name_);
    }
    auto process = std::make_unique<ChildProcess>(std::move(argv));
    std::optional<std::string> line = process->ReadLine(kStartTimeout);
    constexpr std::string_view kPrefix = "listening ";
    if (line && line->starts_with(kPrefix)) {
      auto colon = line->rfind(':');
      int bound = colon == std::string::npos ? 0 : std::atoi(line->c_str() + colon + 1);
      if (bound <= 0) {
        throw std::runtime_error(
            fmt::format("scales testserver printed a malformed line '{}'; "
                        "command: {}",
                        *line, process->CommandLine()));
      }
      port_ = bound;
      if (name_.empty()) name_ = fmt::format("server-{}", port_);
      process_ = std::move(process);
      return;
    }
    // No `listening` line: the server exited (e.g. the port was still taken) or hung.
    std::optional<int> status = process->WaitForExit(milliseconds(line ? 0 : 1000));
    std::string command = process->CommandLine();
    int final_status = process->Stop();
    if (status && port != 0 && Clock::now() < retry_until) {
      SleepFor(milliseconds(100));
      continue;
    }
    std::string why = line     ? fmt::format("printed '{}' instead", *line)
                      : status ? fmt::format("{} (its stderr is in the test output)",
                                             DescribeWaitStatus(final_status))
                               : fmt::format("printed nothing within {} s",
                                             std::chrono::seconds(kStartTimeout).count());
    throw std::runtime_error(
        fmt::format("scales testserver did not report 'listening': {}; command: {}", why, command));
  }
}

// ---------------------------------------------------------------------------------------------
// TestThriftServer

TestThriftServer::TestThriftServer(std::vector<std::string> args) : TestThriftServer(std::move(args), false) {}

TestThriftServer::TestThriftServer(std::vector<std::string> args, bool capture_stderr) {
  std::vector<std::string> argv{ToolPath(), "testserver", "thrift", "--port", "0"};
  argv.insert(argv.end(), args.begin(), args.end());
  if (capture_stderr) {
    std::string pattern = (std::filesystem::temp_directory_path() / "scales-thrift-stderr-XXXXXX").string();
    int fd = ::mkstemp(pattern.data());
    if (fd < 0) throw SystemError("TestThriftServer: mkstemp");
    ::close(fd);
    stderr_path_ = pattern;
  }
  // A constructor that throws runs no destructor: the capture file goes with the exception.
  auto fail = [this](std::string what) {
    process_.reset();
    if (!stderr_path_.empty()) {
      std::error_code ignored;
      std::filesystem::remove(stderr_path_, ignored);
    }
    return std::runtime_error(std::move(what));
  };
  try {
    process_ = std::make_unique<ChildProcess>(std::move(argv), stderr_path_);
  } catch (const std::exception& e) {
    throw fail(e.what());
  }
  auto line = process_->ReadLine(kStartTimeout);
  constexpr std::string_view kPrefix = "listening ";
  if (!line || !line->starts_with(kPrefix)) {
    throw fail(fmt::format("{} did not start: {}", process_->CommandLine(), line ? *line : std::string("no output")));
  }
  endpoint_ = line->substr(kPrefix.size());
  port_ = std::stoi(endpoint_.substr(endpoint_.rfind(':') + 1));
}

TestThriftServer::~TestThriftServer() {
  process_.reset();
  if (!stderr_path_.empty()) {
    std::error_code ignored;
    std::filesystem::remove(stderr_path_, ignored);
  }
}

std::string TestThriftServer::Stderr() const { return stderr_path_.empty() ? std::string() : ReadFile(stderr_path_); }

// ---------------------------------------------------------------------------------------------
// NginxServer

NginxServer::NginxServer(std::string name) : NginxServer(std::move(name), NginxTls{}) {}

NginxServer::NginxServer(std::string name, NginxTls tls) : name_(std::move(name)), tls_(std::move(tls)) {
  // The name is spliced into the config and into `return` strings, where `$`, quotes,
  // braces and semicolons mean something.
  if (name_.empty() ||
      name_.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                              "0123456789._-") != std::string::npos) {
    throw std::invalid_argument(
        fmt::format("NginxServer: name '{}' must be non-empty [A-Za-z0-9._-]", name_));
  }
  std::string pattern = (std::filesystem::temp_directory_path() / "scales-nginx-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) throw SystemError("NginxServer: mkdtemp");
  dir_ = pattern;

  std::string error;
  // FreeTcpPort is racy: another process may bind the port first, so pick again.
  for (int attempt = 0; attempt < 5; ++attempt) {
    port_ = FreeTcpPort();
    error = TryStart();
    if (error.empty()) return;
    if (error.find("Address already in use") == std::string::npos) break;
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
  throw std::runtime_error(error);
}

NginxServer::~NginxServer() {
  Stop();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

std::string NginxServer::endpoint() const { return fmt::format("127.0.0.1:{}", port_); }

void NginxServer::Stop() {
  if (process_) process_->Stop();
  process_.reset();
  hold_ = PortHold(port_);
}

void NginxServer::Restart() {
  Stop();
  auto retry_until = Clock::now() + kBindRetry;
  for (;;) {
    std::string error = TryStart();
    if (error.empty()) return;
    if (error.find("Address already in use") == std::string::npos || Clock::now() >= retry_until) {
      throw std::runtime_error(error);
    }
    SleepFor(milliseconds(100));
  }
}

void NginxServer::WriteConfig() const {
  auto in_dir = [this](const char* file) { return (dir_ / file).string(); };
  std::string tls;
  if (!tls_.cert_file.empty()) {
    tls =
        fmt::format("    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols {};\n",
                    tls_.cert_file, tls_.key_file, tls_.protocols);
    if (!tls_.client_ca_file.empty()) {
      tls += fmt::format("    ssl_client_certificate {};\n    ssl_verify_client on;\n", tls_.client_ca_file);
    }
  }
  std::string config = fmt::format(
      R"(# Written by scales::test::NginxServer.
{user}worker_processes 1;
pid {pid};
error_log {error_log} notice;
events {{
  worker_connections 1024;
}}
http {{
  log_format scales '$connection $connection_requests $status "$request"';
  access_log {access_log} scales;
  default_type text/plain;
  keepalive_timeout 65;
  keepalive_requests 100000;
  client_max_body_size 10m;
  client_body_temp_path {dir}/client_body_temp;
  proxy_temp_path {dir}/proxy_temp;
  fastcgi_temp_path {dir}/fastcgi_temp;
  uwsgi_temp_path {dir}/uwsgi_temp;
  scgi_temp_path {dir}/scgi_temp;
  server {{
    listen 127.0.0.1:{port}{ssl};
    server_name localhost;
{tls}    add_header X-Server "{name}" always;
    location / {{
      return 200 "nginx {name}\n";
    }}
    location /echo {{
      return 200 "posted\n";
    }}
    location = /name {{
      return 200 "{name}";
    }}
    location /uri/ {{
      return 200 "$request_uri";
    }}
    location /status/404 {{
      return 404 "nope\n";
    }}
    location = /client {{
      return 200 "$ssl_client_s_dn";
    }}
    location = /tls {{
      return 200 "$ssl_protocol";
    }}
    location = /tls-reused {{
      return 200 "$ssl_protocol $ssl_session_reused";
    }}
  }}
}}
)",
      // Workers of a root master would otherwise run as nobody, who cannot enter the 0700
      // temp dir.
      fmt::arg("user", ::geteuid() == 0 ? "user root;\n" : ""),
      fmt::arg("pid", in_dir("nginx.pid")), fmt::arg("error_log", in_dir("error.log")),
      fmt::arg("access_log", in_dir("access.log")), fmt::arg("dir", dir_.string()),
      fmt::arg("port", port_), fmt::arg("name", name_), fmt::arg("ssl", tls.empty() ? "" : " ssl"),
      fmt::arg("tls", tls));
  std::ofstream out(dir_ / "nginx.conf", std::ios::trunc);
  out << config;
  out.close();
  if (!out) throw std::runtime_error(fmt::format("cannot write {}", in_dir("nginx.conf")));
}

std::string NginxServer::TryStart() {
  hold_.Release();
  WriteConfig();
  std::filesystem::path pid_file = dir_ / "nginx.pid";
  std::error_code ignored;
  std::filesystem::remove(pid_file, ignored);
  size_t log_offset = ErrorLog().size();
  auto new_errors = [&] { return ErrorLog().substr(std::min(log_offset, ErrorLog().size())); };

  auto process = std::make_unique<ChildProcess>(std::vector<std::string>{
      kNginxPath, "-p", dir_.string() + "/", "-c", (dir_ / "nginx.conf").string(), "-e",
      (dir_ / "error.log").string(), "-g", "daemon off;"});
  auto deadline = Clock::now() + kStartTimeout;
  for (;;) {
    // nginx writes its pid file only after it bound the port, so a connection to the port when
    // the file exists is a connection to this nginx and not to whoever else may hold the port.
    if (std::filesystem::exists(pid_file, ignored) && CanConnect(port_, milliseconds(200))) {
      process_ = std::move(process);
      return "";
    }
    if (!process->Running()) {
      return fmt::format("nginx {} before accepting connections on {}; command: {}; error log:\n{}",
                         DescribeWaitStatus(process->Stop()), endpoint(), process->CommandLine(),
                         new_errors());
    }
    if (Clock::now() >= deadline) {
      std::string command = process->CommandLine();
      process->Stop();
      return fmt::format(
          "nginx did not accept connections on {} within {} s; command: {}; "
          "error log:\n{}",
          endpoint(), std::chrono::seconds(kStartTimeout).count(), command, new_errors());
    }
    SleepFor(milliseconds(10));
  }
}

std::string NginxServer::AccessLog() const { return ReadFile(dir_ / "access.log"); }

std::string NginxServer::ErrorLog() const { return ReadFile(dir_ / "error.log"); }

int NginxServer::AccessLogConnectionCount() const {
  std::istringstream log(AccessLog());
  std::set<std::string> connections;
  for (std::string line; std::getline(log, line);) {
    if (!line.empty()) connections.insert(line.substr(0, line.find(' ')));
  }
  return static_cast<int>(connections.size());
}

int NginxServer::AccessLogRequestCount() const {
  std::istringstream log(AccessLog());
  int requests = 0;
  for (std::string line; std::getline(log, line);) {
    if (!line.empty()) ++requests;
  }
  return requests;
}

bool NginxServer::WaitForAccessLogRequests(int requests, milliseconds timeout) const {
  auto deadline = Clock::now() + timeout;
  while (AccessLogRequestCount() < requests) {
    if (Clock::now() >= deadline) return false;
    SleepFor(milliseconds(5));
  }
  return true;
}

}  // namespace scales::test
