#pragma once
// The real ZooKeeper server (Debian's `zookeeper` package, Java) for integration tests:
// standalone or a three-server ensemble on 127.0.0.1, on free ports, with a temporary data
// directory that the destructor removes, the admin server and four-letter words off. Plus a
// helper that runs Debian's python3-kazoo (/usr/bin/python3) to write serverset members the way
// Finagle's announcers do. None of these classes is thread-safe: use each from one thread.
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "support/fixtures.h"

namespace scales::test {

// Whether java and the ZooKeeper jars are installed (tests skip otherwise).
bool ZooKeeperAvailable();

// One ZooKeeper server process. Standalone unless constructed by ZooKeeperEnsemble.
class ZooKeeperServer {
 public:
  // Starts a standalone server (tickTime 500 ms: sessions 1..10 s) on `port` (0: a free one)
  // and waits until it answers "ruok" there (30 s at most; a free port taken by another
  // process first is chosen again, twice at most); throws std::runtime_error otherwise.
  // `start` false: only reserve the port; call Start() later.
  explicit ZooKeeperServer(int port = 0, bool start = true);
  ~ZooKeeperServer();
  ZooKeeperServer(const ZooKeeperServer&) = delete;
  ZooKeeperServer& operator=(const ZooKeeperServer&) = delete;

  int port() const { return client_port_; }
  // "127.0.0.1:<port>".
  std::string connect_string() const;
  // "zk://127.0.0.1:<port><path>".
  std::string Uri(const std::string& path) const;
  bool running() const { return process_ != nullptr; }
  // A JVM flag for the next Start() (e.g. "-Djute.maxbuffer=4194304"; construct with
  // start = false to have it on the first start).
  void AddJvmFlag(std::string flag) { jvm_flags_.push_back(std::move(flag)); }

  // SIGTERM and wait. The data directory is kept (a restart keeps the data and sessions).
  void Stop();
  // SIGKILL, like a crash.
  void Kill();
  // Starts the stopped server again on the same ports (retrying while they are in use).
  void Start();
  void Restart() {
    Stop();
    Start();
  }

 private:
  friend class ZooKeeperEnsemble;
  ZooKeeperServer(std::filesystem::path dir, int client_port, std::string config);
  void WriteConfig() const;

  std::filesystem::path dir_;
  bool owns_dir_ = false;
  int client_port_ = 0;
  bool start_exited_ = false;  // the last Start() failed because the JVM exited
  std::string config_;
  std::vector<std::string> jvm_flags_;
  std::unique_ptr<ChildProcess> process_;
  PortHold hold_;  // the client port, while stopped or killed
};

// Three servers on loopback forming one ensemble.
class ZooKeeperEnsemble {
 public:
  // Starts all three and waits until a session can be made (30 s at most).
  ZooKeeperEnsemble();
  ~ZooKeeperEnsemble();
  ZooKeeperServer& server(int i) { return *servers_.at(i); }
  // "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3".
  std::string connect_string() const;
  std::string Uri(const std::string& path) const;

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<ZooKeeperServer>> servers_;
};

// Runs a Python script with kazoo against `hosts`: the script body sees `zk`, a started
// KazooClient, and `json`; it is stopped after the body. Returns the script's stdout. Throws
// std::runtime_error (with the output) when it fails or takes longer than `timeout`.
std::string RunKazoo(const std::string& hosts, const std::string& body,
                     std::chrono::milliseconds timeout = std::chrono::seconds(30));

// A Python expression for Finagle's member JSON (json.dumps of a dict with serviceEndpoint,
// additionalEndpoints, status), for use in RunKazoo bodies.
std::string FinagleMemberPython(const std::string& host, int port,
                                const std::map<std::string, int>& additional = {},
                                const std::string& status = "ALIVE");

// Polls `condition` every 20 ms until it is true or `timeout` passed; returns its last value.
template <typename F>
bool WaitFor(F condition, std::chrono::milliseconds timeout = std::chrono::seconds(20));

}  // namespace scales::test

#include <thread>

template <typename F>
bool scales::test::WaitFor(F condition, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return condition();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}
