#pragma once
// ZkConnection: one logical ZooKeeper session on the C client (libzookeeper_mt), re-created
// when the ensemble expires it, with all of its callbacks moved onto a private event loop.
//
// Why a private loop: the C client calls watchers and completions on its own completion
// thread. Everything they carry is posted to this connection's io_context (run by one thread
// this class owns), so the users of a ZkConnection (ZooKeeperServerSet, Announcer) keep their
// state single-threaded and never run their code on ZooKeeper's threads. Events of a session
// that was replaced are dropped (each handle has a generation).
//
// Thread safety: Start/Stop and the "any thread" accessors are safe from any thread; the
// operations (GetChildren, Get, ...) must be called on the loop thread, and their callbacks
// and the Handlers run there.
#include <zookeeper/zookeeper.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "scales/core/random.h"
#include "scales/core/runtime.h"
#include "scales/discovery/zookeeper.h"

namespace scales::zk_internal {

// The waits between the retries of one failure that persists (ZooKeeperOptions::
// max_retry_interval), EqualJitterBackoff (core/backoff.h) as failure accrual uses it:
// retry_interval first; then the k-th retry waits a time drawn uniformly
// from [d / 2, d] for d = retry_interval * 2^k ("equal jitter"), until d reaches
// max_retry_interval, and max_retry_interval from then on. A max_retry_interval not above
// retry_interval gives retry_interval every time. Reset() when the failure is over. Not thread
// safe (one per loop-thread user).
class RetryBackoff {
 public:
  // `seed` 0: drawn from the OS, so that the processes of a fleet do not wait alike.
  explicit RetryBackoff(const ZooKeeperOptions& options, uint64_t seed = 0);
  std::chrono::milliseconds Next();
  void Reset() { retries_ = 0; }
  // Retries since the last Reset().
  int retries() const { return retries_; }

 private:
  std::chrono::milliseconds first_;
  std::chrono::milliseconds max_;
  int retries_ = 0;
  Random random_;
};

class ZkConnection {
 public:
  struct Handlers {
    // Connected. `new_session`: the first connect of a new session (watches and ephemeral
    // nodes of an earlier session are gone); false after a reconnect of the same session.
    std::function<void(bool new_session)> connected;
    // Connection lost or session expired; a new connection is being made.
    std::function<void()> disconnected;
    // A node watch fired (type ZOO_CREATED_EVENT, ..., path relative to the chroot).
    std::function<void(int type, const std::string& path)> watch;
  };

  ZkConnection(std::string connect_string, ZooKeeperOptions options);
  ~ZkConnection();  // Stop()

  void Start(Handlers handlers);
  // Joins the loop thread and closes the session (its ephemeral nodes go). Not from the loop.
  // Blocks: closing a connected session waits for the ensemble's reply to the close request
  // (up to 1.5 s when the ensemble is frozen) and joins the C client's threads.
  void Stop();

  // The closer: worker threads of the process (started as needed, at most kMaxCloserThreads)
  // that run the shutdowns handed to them, several side by side, so that many sessions closing
  // against a frozen ensemble take about as long as one. `stop` (which ends with Stop() of the
  // connections it owns, e.g. by releasing their owner) must keep alive whatever the
  // connection's callbacks use until Stop() returns. At process exit the closer runs what is
  // left and its threads are joined (no thread outlives main); stops handed over after that,
  // or when no thread can be started, run at once on the caller's thread.
  static constexpr size_t kMaxCloserThreads = 8;
  // Runs `stop` at once, unless the calling thread runs a scales event loop (a client's last
  // handle released in one of its own handlers), where it would hold up every other client of
  // that loop meanwhile; that includes a user's thread running a wrapped io_context
  // (EventLoop::OnAnyLoopThread). There `stop` goes to the closer. (Announcer: its destructor
  // returns once the member is deleted, where it can wait for that.)
  static void StopOffLoop(std::function<void()> stop);
  // Hands `stop` to the closer from any thread. (A server set: nothing waits for its close.)
  static void StopInBackground(std::function<void()> stop);
  // Stops handed to the closer that have not finished (tests).
  static size_t StopsPending();

  boost::asio::io_context& io_context() { return ioc_; }
  // True in a child made by fork() after this connection was created (Runtime::made_before_fork):
  // its threads are the parent's and its session's socket is shared with the parent.
  bool made_before_fork() const noexcept { return fork_generation_ != internal::ForkGeneration(); }

  // Loop thread only. `watch`: leave a watch that reports to Handlers::watch.
  void GetChildren(const std::string& path, bool watch,
                   std::function<void(int rc, std::vector<std::string> names)> done);
  void Get(const std::string& path, bool watch, std::function<void(int rc, std::string data)> done);
  void Exists(const std::string& path, bool watch, std::function<void(int rc)> done);
  // The session id owning the ephemeral node at `path` (0 for a persistent node).
  void EphemeralOwner(const std::string& path, std::function<void(int rc, int64_t owner)> done);
  void Create(const std::string& path, const std::string& data, int flags,
              std::function<void(int rc, std::string created)> done);
  void Delete(const std::string& path, std::function<void(int rc)> done);
  // Brings the server this session is connected to up to date with the leader (ZooKeeper's
  // sync), so that the reads after it see every write committed before it, also writes this
  // session made but never got the reply of.
  void Sync(const std::string& path, std::function<void(int rc)> done);
  bool connected() const { return connected_; }

  // Any thread.
  // "connected", "not connected: connection refused, retrying", "session expired, ...".
  std::string StatusText() const;
  std::string last_error() const;
  void SetLastError(std::string error);
  std::optional<std::pair<int64_t, std::string>> session() const;
  uint64_t sessions() const { return sessions_.load(); }
  uint64_t expirations() const { return expirations_.load(); }
  uint64_t connection_losses() const { return connection_losses_.load(); }
  // Session records held (the current one, if it has a handle). Loop thread, or after Stop().
  size_t sessions_held() const { return sessions_list_.size(); }
  // Whether a C client log line (which names servers as "host:port") concerns this
  // connection.
  bool Mentions(std::string_view log_line) const;

 private:
  struct Session {
    ZkConnection* connection;
    uint64_t generation;
    zhandle_t* handle = nullptr;
    bool ever_connected = false;
  };
  template <typename... R>
  struct Op;

  template <typename... R, typename Issue>
  void Run(std::function<void(int, R...)> done, Issue issue);  // loop thread
  Session* CurrentSession() { return sessions_list_.empty() ? nullptr : sessions_list_.back().get(); }

  static void SessionWatcher(zhandle_t* zh, int type, int state, const char* path, void* ctx);
  static void NodeWatcher(zhandle_t* zh, int type, int state, const char* path, void* ctx);
  void NewSession();  // loop thread
  void OnSessionEvent(uint64_t generation, int state);  // loop thread
  template <typename F>
  void PostIfCurrent(uint64_t generation, F f);
  void SetStatus(std::string status);

  const std::string connect_string_;
  const ZooKeeperOptions options_;
  const uint64_t fork_generation_ = internal::ForkGeneration();
  // What Mentions() looks for in a log line: "10.0.0.1:2181" for an IPv4 literal host; ":2181"
  // for a host name or an IPv6 literal (the line names the address it resolved to).
  std::vector<std::string> markers_;
  Handlers handlers_;

  boost::asio::io_context ioc_{1};
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::thread thread_;
  boost::asio::steady_timer retry_timer_{ioc_};
  RetryBackoff backoff_{options_};  // new sessions after a rejection or without a handle
  bool started_ = false;
  bool stopped_ = false;

  // Loop thread (generation_ is also read by C client threads, hence atomic).
  std::atomic<uint64_t> generation_{0};
  std::vector<std::unique_ptr<Session>> sessions_list_;  // current last; older ones closed
  bool connected_ = false;

  std::atomic<uint64_t> sessions_{0};
  std::atomic<uint64_t> expirations_{0};
  std::atomic<uint64_t> connection_losses_{0};

  mutable std::mutex mu_;  // guards the fields below
  std::string status_ = "connecting";
  std::string last_error_;
  std::optional<std::pair<int64_t, std::string>> session_id_;
};

// ZooKeeper C client return code as text ("connection loss", "no node").
std::string ZkErrorText(int rc);

}  // namespace scales::zk_internal
