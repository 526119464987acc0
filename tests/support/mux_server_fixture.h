#pragma once
// The Mux reference server (tests/integration/mux_reference/mux_server.py, run with Debian's
// /usr/bin/python3 and python3-thrift) in a child process, for ThriftMux/Mux integration tests.
// The server is written independently of the C++ Mux codec; see the script's docstring for its
// modes (--mode finagle|strict|old, --framer N, --ping-interval MS, --greet tping|tdrain: a
// control message written as a connection opens, before the probe's answer; --greet-after-tinit
// tping|tdrain: one written on Tinit, before the Rinit; --hang-up-on-tinit: the connection
// ended abruptly on Tinit; --fail-first N [--fail-flags F]: the
// first N calls answered with an Rdispatch Error, with MuxFailure flags F) and for the
// misbehaviours that echo() arguments trigger ("drain", "lease:MS", "nack", "error:T",
// "error-flags:F:T", "rerr:T", "noreply", "hang-up",
// "garbage", "close-mid-frame", "contexts", "tls-info", "ping-flood"; sleep(MS) replies late).
// TLS (Python's ssl module): TlsArgs() gives the arguments for TLS from the first byte or for
// opportunistic TLS at a level (--tls-mode first-byte|off|desired|required), optionally
// requiring client certificates (mutual TLS).
//
// Every instance logs one line per message received or sent to a private log file (removed by
// the destructor), readable with Log(), so tests can assert what the client sent, e.g.
//   conn=1 recv Tdiscarded tag=0 code=0xc2 which=2 why=timeout
//   conn=1 recv Tdispatch tag=2 size=83 contexts=com.twitter.finagle.Deadline ... method=echo
// Not thread-safe: use from the test's main thread (ChildProcess's rule).
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "support/fixtures.h"

namespace scales::test {

class MuxReferenceServer {
 public:
  // Starts the server on a free port with `extra_args` (e.g. {"--mode", "strict", "--framer",
  // "16"}) and waits (15 s at most) for its `listening` line; throws std::runtime_error
  // otherwise.
  explicit MuxReferenceServer(std::vector<std::string> extra_args = {});
  ~MuxReferenceServer();
  MuxReferenceServer(const MuxReferenceServer&) = delete;
  MuxReferenceServer& operator=(const MuxReferenceServer&) = delete;

  int port() const { return port_; }
  // "127.0.0.1:<port>".
  std::string endpoint() const;
  bool running() const { return process_ != nullptr; }

  // Terminates the server (open connections are closed). The port stays in port().
  void Stop();
  // Stops the server if it runs and starts it again on the same port with the same arguments
  // (retrying for up to 5 s while the port cannot be bound). The log is kept.
  void Restart();
  // Same, with `extra_args` replacing the arguments given so far (e.g. a server that failed
  // every call coming back healthy on the same port).
  void Restart(std::vector<std::string> extra_args);

  // The whole log so far.
  std::string Log() const;
  std::vector<std::string> LogLines() const;
  // Log lines containing every one of `needles`.
  std::vector<std::string> LogLinesWith(std::vector<std::string_view> needles) const;
  // Waits until some log line contains every one of `needles` (the server logs asynchronously
  // to the client's view of the exchange). Returns whether it happened within `timeout`.
  bool WaitForLog(std::vector<std::string_view> needles,
                  std::chrono::milliseconds timeout = std::chrono::seconds(5)) const;

  // Path of mux_server.py in the source tree.
  static std::string ScriptPath();

  // Arguments for a TLS server: --tls-mode `mode` (first-byte, off, desired or required)
  // --tls-cert `cert` --tls-key `key`, and --tls-client-ca `client_ca` when not empty (the
  // server then requires a client certificate signed by it). Append to the mode arguments.
  static std::vector<std::string> TlsArgs(std::string_view mode, const std::string& cert, const std::string& key,
                                          const std::string& client_ca = "");

 private:
  void Start(int port, std::chrono::milliseconds bind_retry);

  std::vector<std::string> extra_args_;
  std::filesystem::path dir_;
  std::filesystem::path log_path_;
  int port_ = 0;
  std::unique_ptr<ChildProcess> process_;
  PortHold hold_;  // while stopped
};

}  // namespace scales::test
