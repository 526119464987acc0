#pragma once
// Fixtures for integration tests: real peer processes on 127.0.0.1 (the `scales testserver
// http` tool and nginx), started on free ports and stopped by their destructors so that a failing
// test leaks no processes. None of these classes is thread-safe: use each from one thread.
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace scales::test {

// Returns a TCP port on 127.0.0.1 that was free a moment ago: binds port 0, reads the port the
// kernel chose and closes the socket. Best effort: another process may take the port before the
// caller binds it, so callers retry on EADDRINUSE. Throws std::runtime_error if no socket.
int FreeTcpPort();
// `n` distinct such ports: every socket is held open until all are chosen.
std::vector<int> FreeTcpPorts(size_t n);

// Keeps 127.0.0.1:port bound while a test's server on it is down (stopped or killed, to be
// restarted there, or for its clients to be refused). The socket does not listen, so a connect
// is refused as to a port nobody holds, and the kernel gives the port to no other bind of port 0
// meanwhile (FreeTcpPort, a proxy or server picking its own port): another test running at the
// same time would otherwise put its server there and take this test's reconnects (seen: the
// ZooKeeper client of a test whose ensemble was stopped talking to another test's proxy). With
// SO_REUSEADDR, so that it binds beside the stopped server's TIME_WAIT connections. Best
// effort: holds nothing if the bind fails. Release() (or destruction) lets the server have it.
class PortHold {
 public:
  PortHold() = default;
  explicit PortHold(int port);
  ~PortHold() { Release(); }
  PortHold(PortHold&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  PortHold& operator=(PortHold&& other) noexcept;
  void Release() noexcept;
  bool holding() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// Whether a TCP connection to 127.0.0.1:port is accepted (within `timeout`).
bool CanConnect(int port, std::chrono::milliseconds timeout = std::chrono::milliseconds(500));

// Whether a ZooKeeper server answers "imok" to the "ruok" four-letter command on
// 127.0.0.1:port (within `timeout`): proves the port is ZooKeeper's, not another listener's.
bool ZooKeeperAnswersRuok(int port, std::chrono::milliseconds timeout = std::chrono::milliseconds(500));

// Path of the `scales` tool binary: $SCALES_TOOL_PATH if set, else the compile-time
// SCALES_TOOL_PATH definition. Throws std::runtime_error when neither is available.
std::string ToolPath();

// A child process whose stdout is a pipe to this process (stderr and stdin are inherited).
// The child gets SIGTERM if the thread that started it dies (PR_SET_PDEATHSIG), so even a
// crashing test binary leaves no peers behind; start children from the test's main thread.
class ChildProcess {
 public:
  // Starts argv[0] (a path, not searched in $PATH) with `argv`. Throws std::runtime_error when
  // the process cannot be created or the program cannot be executed. The child's stderr is the
  // test's, or the file `stderr_path` (created or truncated) when one is given.
  explicit ChildProcess(std::vector<std::string> argv, const std::string& stderr_path = "");
  ~ChildProcess();  // Stop().
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Reads one line of the child's stdout, without the trailing newline. Returns std::nullopt on
  // timeout or at end of file (the child closed stdout or exited).
  std::optional<std::string> ReadLine(std::chrono::milliseconds timeout);

  // Whether the child has not exited yet (reaps it if it has).
  bool Running();

  // SIGTERM, then waits up to `grace` for the exit; SIGKILL after that. Returns the wait status
  // (as from waitpid), or the one already collected. Idempotent.
  int Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));

  // SIGKILL and reap. Returns the wait status.
  int Kill();

  // Waits up to `timeout` for the child to exit on its own; returns its wait status if it did.
  std::optional<int> WaitForExit(std::chrono::milliseconds timeout);

  pid_t pid() const { return pid_; }
  const std::vector<std::string>& argv() const { return argv_; }
  // The command line, for error messages.
  std::string CommandLine() const;

 private:
  bool Reap(bool block);

  std::vector<std::string> argv_;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string buffer_;  // Bytes read past the last returned line.
  bool eof_ = false;
  std::optional<int> wait_status_;
};

// `scales testserver http` in a child process (see tools/testserver_http.cc for the paths it
// serves). Listens on 127.0.0.1.
class TestHttpServer {
 public:
  // Starts the server and waits (10 s at most) for its `listening` line; throws
  // std::runtime_error otherwise. `name` defaults to the tool's "server-<port>"; `port` 0 lets
  // the kernel pick a free port.
  explicit TestHttpServer(std::string name = "", int port = 0, int threads = 1);
  ~TestHttpServer();
  TestHttpServer(const TestHttpServer&) = delete;
  TestHttpServer& operator=(const TestHttpServer&) = delete;

  int port() const { return port_; }
  // "127.0.0.1:<port>".
  std::string endpoint() const;
  const std::string& name() const { return name_; }
  bool running() const { return process_ != nullptr; }
  pid_t pid() const;

  // Terminates the server (SIGTERM, SIGKILL after 5 s). The port stays reserved in port().
  void Stop();
  // Kills the server with SIGKILL, like a crash.
  void Kill();
  // Stops the server if it runs and starts it again on the same port and with the same name,
  // retrying for up to 5 s while the port cannot be bound.
  void Restart();

 private:
  void Start(int port, std::chrono::milliseconds bind_retry);

  std::string name_;
  int port_ = 0;
  int threads_ = 1;
  std::unique_ptr<ChildProcess> process_;
  PortHold hold_;  // while stopped or killed
};

// `scales testserver thrift` (the Echo service on Apache Thrift's TThreadedServer, see
// tools/testserver_thrift.cc) in a child process on a kernel-chosen port of 127.0.0.1.
// `args` are extra flags: --transport buffered, --protocol compact, --tls-cert PEM --tls-key PEM
// [--tls-client-ca PEM].
class TestThriftServer {
 public:
  // Starts the server and waits (10 s at most) for its `listening` line; throws
  // std::runtime_error otherwise.
  explicit TestThriftServer(std::vector<std::string> args = {});
  // The same, with the server's stderr (where Apache Thrift logs what its connections died of)
  // kept in a temporary file for Stderr() when `capture_stderr` is set.
  TestThriftServer(std::vector<std::string> args, bool capture_stderr);
  ~TestThriftServer();
  TestThriftServer(const TestThriftServer&) = delete;
  TestThriftServer& operator=(const TestThriftServer&) = delete;
  int port() const { return port_; }
  pid_t pid() const { return process_->pid(); }
  // What the server wrote to stderr so far (capture_stderr), else "".
  std::string Stderr() const;
  // "127.0.0.1:<port>".
  const std::string& endpoint() const { return endpoint_; }
  // Kills the server with SIGKILL, like a crash.
  void Kill() { process_->Kill(); }

 private:
  std::string stderr_path_;
  std::unique_ptr<ChildProcess> process_;
  std::string endpoint_;
  int port_ = 0;
};

// TLS for NginxServer: the certificate chain and key it serves, and the CA whose client
// certificates it requires (`ssl_verify_client on`; empty = no client certificate asked for).
// Without a client certificate nginx answers 400 "No required SSL certificate was sent".
struct NginxTls {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;
  // nginx's ssl_protocols. Debian 12's nginx (1.22) offers TLS 1.2 only unless told otherwise;
  // TLS 1.3 is what a current server negotiates, so the tests offer both by default.
  std::string protocols = "TLSv1.2 TLSv1.3";
};

// The real nginx (/usr/sbin/nginx) in the foreground, listening on a free port on 127.0.0.1,
// with its configuration, logs and temp paths in a private temporary directory that the
// destructor removes. Locations:
//   /            200 "nginx <name>\n"
//   /echo        200 "posted\n" (request bodies up to 10 MB are read and discarded)
//   = /name      200 "<name>"
//   /uri/...     200 "<the request's target>" (the path and query as sent)
//   /status/404  404 "nope\n"
//   = /client    200 "<the client certificate's subject>" (empty without TLS or certificate)
//   = /tls       200 "<the TLS version negotiated>" ("TLSv1.3"; empty without TLS)
//   = /tls-reused  200 "<the TLS version> <r if the TLS session was resumed, else .>"
// Every response carries `X-Server: <name>`. Keep-alive: 65 s, 100000 requests per connection.
// The access log is unbuffered, one line per request: `$connection $connection_requests
// $status "$request"`.
class NginxServer {
 public:
  // Starts nginx and waits (10 s at most) until its port accepts connections; throws
  // std::runtime_error with the error log otherwise.
  explicit NginxServer(std::string name = "nginx");
  // The same over TLS (HTTPS only on the port).
  NginxServer(std::string name, NginxTls tls);
  ~NginxServer();
  NginxServer(const NginxServer&) = delete;
  NginxServer& operator=(const NginxServer&) = delete;

  int port() const { return port_; }
  // "127.0.0.1:<port>".
  std::string endpoint() const;
  const std::string& name() const { return name_; }
  const std::filesystem::path& dir() const { return dir_; }
  bool running() const { return process_ != nullptr; }

  // Fast shutdown (SIGTERM): open connections are closed.
  void Stop();
  // Stops nginx if it runs and starts it again on the same port (retrying for up to 5 s).
  void Restart();

  // Number of distinct $connection values in the access log (connections that carried at least
  // one complete request).
  int AccessLogConnectionCount() const;
  // Number of requests in the access log.
  int AccessLogRequestCount() const;
  // nginx writes the log line just after sending the response, so a client can see the
  // response before the line exists: wait for `requests` lines before checking counts.
  bool WaitForAccessLogRequests(int requests,
                                std::chrono::milliseconds timeout = std::chrono::seconds(2)) const;
  std::string AccessLog() const;
  std::string ErrorLog() const;

 private:
  void WriteConfig() const;
  // Starts nginx on port_; returns an empty string on success, else why it failed.
  std::string TryStart();

  std::string name_;
  NginxTls tls_;
  std::filesystem::path dir_;
  int port_ = 0;
  std::unique_ptr<ChildProcess> process_;
  PortHold hold_;  // while stopped
};

}  // namespace scales::test
