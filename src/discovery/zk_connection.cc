#include "discovery/zk_connection.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <new>
#include <random>

#include <pthread.h>

#include <boost/asio/ip/address_v4.hpp>
#include <boost/asio/post.hpp>
#include <fmt/format.h>

#include "core/backoff.h"
#include "core/fork_locks.h"
#include "scales/core/error.h"
#include "scales/core/log.h"
#include "scales/core/runtime.h"

namespace scales::zk_internal {
namespace {

// The C client logs through a per-handle callback without a context argument, so the lines
// are routed here and matched to connections by the server address they name. This is how
// Describe() can say "connection refused" although the C client reports no such state.
// Capturing the lines also keeps the C client from writing to stderr. The list is never
// destroyed: connections may outlive it at exit (a server set or announcer in a global, which
// exit() destroys after this file's statics, logs and stops then; clients may outlive main).
struct LogRoutes {
  std::mutex mu;
  std::vector<ZkConnection*> connections;  // guarded by mu
};

LogRoutes& TheLogRoutes() {
  static LogRoutes* const routes = [] {
    auto* r = new LogRoutes();
    internal::HoldAcrossFork(r->mu, internal::ForkLockRank::kZooKeeperLogRoutes);
    return r;
  }();
  return *routes;
}

std::string SummarizeLogLine(std::string_view line) {
  // "... Socket [127.0.0.1:2181] zk retcode=-4, errno=111(Connection refused): server refused ..."
  if (auto e = line.find("errno="); e != std::string_view::npos) {
    auto open = line.find('(', e);
    auto close = open == std::string_view::npos ? open : line.find(')', open);
    if (close != std::string_view::npos) {
      std::string text(line.substr(open + 1, close - open - 1));
      for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return text;
    }
  }
  // Drop the "date:pid(tid):ZOO_ERROR@function@line: " prefix.
  if (auto at = line.find("ZOO_"); at != std::string_view::npos) {
    if (auto colon = line.find(": ", at); colon != std::string_view::npos) {
      line = line.substr(colon + 2);
    }
  }
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.remove_suffix(1);
  return std::string(line);
}

void LogSink(const char* message) {
  std::string_view line(message);
  if (line.find("ZOO_ERROR") == std::string_view::npos) return;
  LogRoutes& routes = TheLogRoutes();
  std::lock_guard lock(routes.mu);
  for (ZkConnection* c : routes.connections) {
    if (c->Mentions(line)) c->SetLastError(SummarizeLogLine(line));
  }
}

// The closer (ZkConnection::StopOffLoop, StopInBackground): worker threads, started as the stops
// handed over need them (at most kMaxCloserThreads), that run those stops. A stop's close may
// block for seconds (a frozen ensemble: 1.5 s per session), so they run side by side: a process
// releasing many server sets, or exiting with them, waits about as long as for one. Its state is
// never destroyed: a runtime's loop thread may still hand it a stop while the process exits
// (clients may outlive main). CloserAtExit drains it and joins its threads at exit; stops handed
// over after that run where they are given. A child made by fork() has none of the parent's
// threads: the closer forgets them there, with the stops they had (the parent's objects).
struct Closer {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  size_t pending = 0;  // queued or running
  size_t idle = 0;     // workers waiting for a stop
  bool exiting = false;
  std::vector<std::thread> workers;
  // A fork()'s child: the parent's workers and stops (ForgetParentsCloser).
  std::vector<std::thread> forgotten_workers;
  std::vector<std::function<void()>> forgotten_stops;
};

Closer& TheCloser();

void ForgetParentsCloser() {
  // In the child of a fork(): the mutex was taken by the thread that forked (its pthread_atfork
  // prepare handler), and that thread's copy runs this. The workers are the parent's threads,
  // which the child does not have (counted idle, they would be left a stop that nothing runs),
  // and the stops queued for them close the parent's sessions: both are set aside, never run,
  // joined or destroyed. The condition variable may count waiters of the parent's: it is made
  // anew.
  Closer& closer = TheCloser();
  for (std::thread& t : closer.workers) closer.forgotten_workers.push_back(std::move(t));
  for (auto& stop : closer.queue) closer.forgotten_stops.push_back(std::move(stop));
  closer.workers.clear();
  closer.queue.clear();
  closer.pending = 0;
  closer.idle = 0;
  new (&closer.cv) std::condition_variable();
  closer.mu.unlock();
}

Closer& TheCloser() {
  static Closer* const closer = [] {
    auto* c = new Closer();
    pthread_atfork([] { TheCloser().mu.lock(); }, [] { TheCloser().mu.unlock(); },
                   &ForgetParentsCloser);
    return c;
  }();
  return *closer;
}

void RunCloser(Closer& closer) {
  std::unique_lock lock(closer.mu);
  for (;;) {
    ++closer.idle;
    closer.cv.wait(lock, [&] { return !closer.queue.empty() || closer.exiting; });
    --closer.idle;
    if (closer.queue.empty()) return;  // exiting, and nothing is left
    std::function<void()> stop = std::move(closer.queue.front());
    closer.queue.pop_front();
    lock.unlock();
    try {
      stop();
    } catch (...) {
      SCALES_LOG(kError, "zookeeper: a session's shutdown failed; continuing with the next one");
    }
    stop = nullptr;  // what it holds goes here too, unlocked (it may be what stops the connections)
    lock.lock();
    --closer.pending;
  }
}

struct CloserAtExit {
  ~CloserAtExit() {
    Closer& closer = TheCloser();
    std::vector<std::thread> workers;
    {
      std::lock_guard lock(closer.mu);
      closer.exiting = true;
      workers = std::move(closer.workers);
    }
    closer.cv.notify_all();
    for (std::thread& t : workers) t.join();
  }
};
CloserAtExit closer_at_exit;

// Queues `stop` for the closer's workers, starting one if none is free to take it. False, and
// `stop` left as it was, when the process is exiting or no worker could be started for it.
bool HandToCloser(std::function<void()>& stop) {
  Closer& closer = TheCloser();
  std::unique_lock lock(closer.mu);
  if (closer.exiting) return false;
  try {
    closer.queue.push_back(std::move(stop));
  } catch (const std::exception&) {
    return false;  // no memory: `stop` was not moved
  }
  ++closer.pending;
  if (closer.queue.size() > closer.idle &&
      closer.workers.size() < ZkConnection::kMaxCloserThreads) {
    try {
      closer.workers.emplace_back([&closer] { RunCloser(closer); });
    } catch (const std::exception& e) {
      if (closer.workers.empty()) {
        stop = std::move(closer.queue.back());
        closer.queue.pop_back();
        --closer.pending;
        lock.unlock();
        SCALES_LOG(kWarning,
                   "zookeeper: cannot start a thread to close a session off the caller's ({}); "
                   "closing it on the caller's thread",
                   e.what());
        return false;
      }
      // The workers already there take it in turn.
    }
  }
  lock.unlock();
  closer.cv.notify_one();
  return true;
}

}  // namespace

void ZkConnection::StopOffLoop(std::function<void()> stop) {
  if (EventLoop::OnAnyLoopThread() && HandToCloser(stop)) return;
  if (stop) stop();
}

void ZkConnection::StopInBackground(std::function<void()> stop) {
  if (HandToCloser(stop)) return;
  if (stop) stop();
}

size_t ZkConnection::StopsPending() {
  Closer& closer = TheCloser();
  std::lock_guard lock(closer.mu);
  return closer.pending;
}

RetryBackoff::RetryBackoff(const ZooKeeperOptions& options, uint64_t seed)
    : first_(options.retry_interval),
      max_(std::max(options.retry_interval, options.max_retry_interval)),
      random_(seed != 0 ? seed
                        : (static_cast<uint64_t>(std::random_device{}()) << 32) ^
                              std::random_device{}()) {}

std::chrono::milliseconds RetryBackoff::Next() {
  const int k = retries_;
  if (retries_ < 64) ++retries_;
  // Every bound is whole milliseconds: the draw, floored to them, stays within [d / 2, d].
  return std::chrono::duration_cast<std::chrono::milliseconds>(
      EqualJitterBackoff(first_, max_, k, random_));
}

std::string ZkErrorText(int rc) {
  const char* text = zerror(rc);
  return text ? std::string(text) : fmt::format("error {}", rc);
}

// One operation of the C client, handed back to exactly one completion (also on close:
// ZCLOSING): Finish posts the result to the loop, if the session it was issued on is still
// current, and frees the op.
template <typename... R>
struct ZkConnection::Op {
  ZkConnection* connection;
  uint64_t generation;
  std::function<void(int, R...)> done;

  static void Finish(const void* data, int rc, R... results) {
    auto* op = static_cast<Op*>(const_cast<void*>(data));
    ZkConnection* connection = op->connection;
    connection->PostIfCurrent(op->generation, [connection, f = std::move(op->done), rc,
                                               ... results = std::move(results)]() mutable {
      // A request answered: the session is up and authenticated, so the next rejection or
      // missing handle is retried after retry_interval again.
      if (rc == ZOK) connection->backoff_.Reset();
      f(rc, std::move(results)...);
    });
    delete op;
  }
};

ZkConnection::ZkConnection(std::string connect_string, ZooKeeperOptions options)
    : connect_string_(std::move(connect_string)), options_(std::move(options)) {
  std::string hosts = connect_string_.substr(0, connect_string_.find('/'));
  size_t start = 0;
  while (start <= hosts.size()) {
    size_t comma = hosts.find(',', start);
    std::string host = hosts.substr(start, comma == std::string::npos ? std::string::npos
                                                                       : comma - start);
    if (auto colon = host.rfind(':'); colon != std::string::npos) {
      boost::system::error_code ec;
      boost::asio::ip::make_address_v4(host.substr(0, colon), ec);
      markers_.push_back(ec ? host.substr(colon) : host);
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
}

ZkConnection::~ZkConnection() { Stop(); }

bool ZkConnection::Mentions(std::string_view line) const {
  // Lines name servers as "127.0.0.1:2181" or "[127.0.0.1:2181]": match the marker as a whole
  // (not inside "127.0.0.11:2181" or ":21810"). Two ensembles on the same port are told apart
  // when their hosts are IPv4 literals; by port only otherwise.
  auto part_of_address = [](char c) { return std::isdigit(static_cast<unsigned char>(c)) || c == '.'; };
  for (const std::string& m : markers_) {
    for (size_t at = line.find(m); at != std::string_view::npos; at = line.find(m, at + 1)) {
      const size_t end = at + m.size();
      const bool starts = m.front() == ':' || at == 0 || !part_of_address(line[at - 1]);
      const bool ends = end == line.size() || !std::isdigit(static_cast<unsigned char>(line[end]));
      if (starts && ends) return true;
    }
  }
  return false;
}

void ZkConnection::Start(Handlers handlers) {
  handlers_ = std::move(handlers);
  {
    std::lock_guard lock(TheLogRoutes().mu);
    TheLogRoutes().connections.push_back(this);
  }
  started_ = true;
  work_.emplace(ioc_.get_executor());
  boost::asio::post(ioc_, [this] { NewSession(); });
  thread_ = std::thread([this] { ioc_.run(); });
}

void ZkConnection::Stop() {
  if (!started_ || stopped_) return;
  stopped_ = true;
  work_.reset();
  ioc_.stop();
  if (thread_.joinable()) thread_.join();
  // No loop thread any more: the sessions can be closed here. zookeeper_close() calls the
  // pending completions (they post into the stopped loop, which drops them) and joins the C
  // client's threads, so after it no callback refers to a Session.
  for (auto& s : sessions_list_) {
    if (s->handle) zookeeper_close(s->handle);
    s->handle = nullptr;
  }
  {
    std::lock_guard lock(TheLogRoutes().mu);
    std::erase(TheLogRoutes().connections, this);
  }
}

void ZkConnection::NewSession() {
  // Close the previous handle first; its callbacks only post, so closing from the loop cannot
  // deadlock with them.
  if (!sessions_list_.empty() && sessions_list_.back()->handle) {
    zookeeper_close(sessions_list_.back()->handle);
    sessions_list_.back()->handle = nullptr;
  }
  // zookeeper_close() ran the closed handle's last completions (ZCLOSING) and joined its
  // threads: no watcher or completion names an old Session any more. (Keeping them leaked one
  // per retry while no handle could be made.)
  sessions_list_.clear();
  uint64_t generation = generation_.load() + 1;
  generation_.store(generation);
  auto session = std::make_unique<Session>();
  session->connection = this;
  session->generation = generation;
  connected_ = false;
  zhandle_t* zh = zookeeper_init2(connect_string_.c_str(), &ZkConnection::SessionWatcher,
                                  static_cast<int>(options_.session_timeout.count()), nullptr,
                                  session.get(), 0, &LogSink);
  if (!zh) {
    // The C client reports a host it cannot resolve as ENOENT and a connect string it cannot
    // parse as EINVAL.
    const int err = errno;
    const char* why = err == ENOENT   ? "a host could not be resolved"
                      : err == EINVAL ? "the host list is not valid"
                                      : "";
    SetLastError(fmt::format("cannot create a ZooKeeper handle for '{}': {}{}{}", connect_string_, why,
                             *why ? " - " : "", std::strerror(err)));
    SetStatus(fmt::format("not connected: {}, retrying", last_error()));
    retry_timer_.expires_after(backoff_.Next());
    retry_timer_.async_wait([this](boost::system::error_code ec) {
      if (!ec) NewSession();
    });
    return;  // nothing refers to `session`: it goes now
  }
  session->handle = zh;
  if (!options_.auth.empty()) {
    auto colon = options_.auth.find(':');
    std::string scheme = options_.auth.substr(0, colon);
    std::string cert = colon == std::string::npos ? "" : options_.auth.substr(colon + 1);
    // The C client re-sends the credentials after each reconnect; a rejection arrives as
    // ZOO_AUTH_FAILED_STATE on the session watcher.
    zoo_add_auth(zh, scheme.c_str(), cert.data(), static_cast<int>(cert.size()), nullptr, nullptr);
  }
  sessions_list_.push_back(std::move(session));
  SetStatus(last_error().empty() ? "connecting" : fmt::format("not connected: {}, retrying",
                                                              last_error()));
}

template <typename F>
void ZkConnection::PostIfCurrent(uint64_t generation, F f) {
  boost::asio::post(ioc_, [this, generation, f = std::move(f)]() mutable {
    if (generation == generation_.load()) f();
  });
}

void ZkConnection::SessionWatcher(zhandle_t*, int type, int state, const char*, void* ctx) {
  // C client completion thread: only post.
  if (type != ZOO_SESSION_EVENT) return;
  auto* session = static_cast<Session*>(ctx);
  ZkConnection* self = session->connection;
  uint64_t generation = session->generation;
  self->PostIfCurrent(generation, [self, generation, state] { self->OnSessionEvent(generation, state); });
}

void ZkConnection::NodeWatcher(zhandle_t*, int type, int, const char* path, void* ctx) {
  // Session events also reach node watchers; the session watcher handles those.
  if (type == ZOO_SESSION_EVENT || type == ZOO_NOTWATCHING_EVENT) return;
  auto* session = static_cast<Session*>(ctx);
  ZkConnection* self = session->connection;
  std::string p = path ? path : "";
  self->PostIfCurrent(session->generation, [self, type, p = std::move(p)] {
    if (self->handlers_.watch) self->handlers_.watch(type, p);
  });
}

void ZkConnection::OnSessionEvent(uint64_t generation, int state) {
  if (sessions_list_.empty()) return;  // not reached: events come only from a live handle
  Session* session = sessions_list_.back().get();
  if (state == ZOO_CONNECTED_STATE) {
    bool new_session = !session->ever_connected;
    session->ever_connected = true;
    connected_ = true;
    if (new_session) sessions_.fetch_add(1);
    if (const clientid_t* id = zoo_client_id(session->handle)) {
      std::lock_guard lock(mu_);
      session_id_ = std::make_pair(static_cast<int64_t>(id->client_id),
                                   std::string(id->passwd, sizeof(id->passwd)));
    }
    SetStatus("connected");
    SCALES_LOG(kInfo, "zookeeper {}: {} (session 0x{:x})", connect_string_,
               new_session ? "connected, new session" : "reconnected, same session",
               session->handle && zoo_client_id(session->handle)
                   ? static_cast<uint64_t>(zoo_client_id(session->handle)->client_id)
                   : 0);
    if (handlers_.connected) handlers_.connected(new_session);
  } else if (state == ZOO_EXPIRED_SESSION_STATE) {
    expirations_.fetch_add(1);
    connected_ = false;
    SetLastError("session expired");
    SetStatus("session expired, starting a new one");
    SCALES_LOG(kWarning, "zookeeper {}: session expired; starting a new session (watches are set again)",
               connect_string_);
    if (handlers_.disconnected) handlers_.disconnected();
    NewSession();
  } else if (state == ZOO_AUTH_FAILED_STATE) {
    connected_ = false;
    SetLastError(fmt::format("authentication failed (scheme '{}')",
                             options_.auth.substr(0, options_.auth.find(':'))));
    SetStatus(fmt::format("not connected: {}, retrying", last_error()));
    // The handle is unusable after an auth failure: a new session after a pause, longer each
    // time the credentials are refused again (max_retry_interval).
    const std::chrono::milliseconds wait = backoff_.Next();
    SCALES_LOG(kError, "zookeeper {}: {}; retrying in {} ms", connect_string_, last_error(),
               wait.count());
    if (handlers_.disconnected) handlers_.disconnected();
    retry_timer_.expires_after(wait);
    retry_timer_.async_wait([this, generation](boost::system::error_code ec) {
      if (!ec && generation == generation_.load()) NewSession();
    });
  } else {
    // ZOO_CONNECTING_STATE / ZOO_ASSOCIATING_STATE: connection lost, the client reconnects.
    if (connected_) {
      connection_losses_.fetch_add(1);
      connected_ = false;
      SCALES_LOG(kWarning, "zookeeper {}: connection lost; reconnecting (the session survives if it is back "
                 "within the session timeout)", connect_string_);
      if (handlers_.disconnected) handlers_.disconnected();
    }
    SetStatus(last_error().empty() || last_error() == "session expired"
                  ? "not connected: connection lost, retrying"
                  : fmt::format("not connected: {}, retrying", last_error()));
  }
}

void ZkConnection::SetStatus(std::string status) {
  std::lock_guard lock(mu_);
  status_ = std::move(status);
}

std::string ZkConnection::StatusText() const {
  std::lock_guard lock(mu_);
  if (status_ == "connecting" && !last_error_.empty()) {
    return fmt::format("not connected: {}, retrying", last_error_);
  }
  if (status_ == "connecting") return "not connected: connecting, retrying";
  if (status_.starts_with("not connected: connection lost") && !last_error_.empty() &&
      last_error_ != "session expired") {
    return fmt::format("not connected: {}, retrying", last_error_);
  }
  return status_;
}

std::string ZkConnection::last_error() const {
  std::lock_guard lock(mu_);
  return last_error_;
}

void ZkConnection::SetLastError(std::string error) {
  std::lock_guard lock(mu_);
  last_error_ = std::move(error);
}

std::optional<std::pair<int64_t, std::string>> ZkConnection::session() const {
  std::lock_guard lock(mu_);
  return session_id_;
}

// The operations. `issue` starts one on the current session's handle with the op as its
// completion's data; without a session, or when the C client refuses it, the error goes to
// `done` on the loop (with empty results) all the same.

template <typename... R, typename Issue>
void ZkConnection::Run(std::function<void(int, R...)> done, Issue issue) {
  Session* s = CurrentSession();
  auto* op = new Op<R...>{this, generation_.load(), std::move(done)};
  const int rc = s && s->handle ? issue(s->handle, static_cast<const void*>(op)) : ZINVALIDSTATE;
  if (rc != ZOK) Op<R...>::Finish(op, rc, R{}...);
}

void ZkConnection::GetChildren(const std::string& path, bool watch,
                               std::function<void(int, std::vector<std::string>)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_awget_children2(
        zh, path.c_str(), watch ? &ZkConnection::NodeWatcher : nullptr, watch ? CurrentSession() : nullptr,
        [](int rc, const String_vector* strings, const Stat*, const void* data) {
          std::vector<std::string> names;
          if (rc == ZOK && strings) {
            names.reserve(strings->count);
            for (int i = 0; i < strings->count; ++i) names.emplace_back(strings->data[i]);
          }
          Op<std::vector<std::string>>::Finish(data, rc, std::move(names));
        },
        op);
  });
}

void ZkConnection::Get(const std::string& path, bool watch, std::function<void(int, std::string)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_awget(
        zh, path.c_str(), watch ? &ZkConnection::NodeWatcher : nullptr, watch ? CurrentSession() : nullptr,
        [](int rc, const char* value, int len, const Stat*, const void* data) {
          std::string text;
          if (rc == ZOK && value && len > 0) text.assign(value, static_cast<size_t>(len));
          Op<std::string>::Finish(data, rc, std::move(text));
        },
        op);
  });
}

void ZkConnection::Exists(const std::string& path, bool watch, std::function<void(int)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_awexists(
        zh, path.c_str(), watch ? &ZkConnection::NodeWatcher : nullptr, watch ? CurrentSession() : nullptr,
        [](int rc, const Stat*, const void* data) { Op<>::Finish(data, rc); }, op);
  });
}

void ZkConnection::EphemeralOwner(const std::string& path, std::function<void(int, int64_t)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_aexists(
        zh, path.c_str(), 0,
        [](int rc, const Stat* stat, const void* data) {
          Op<int64_t>::Finish(data, rc, rc == ZOK && stat != nullptr ? stat->ephemeralOwner : 0);
        },
        op);
  });
}

void ZkConnection::Create(const std::string& path, const std::string& data, int flags,
                          std::function<void(int, std::string)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_acreate(
        zh, path.c_str(), data.data(), static_cast<int>(data.size()), &ZOO_OPEN_ACL_UNSAFE, flags,
        [](int rc, const char* value, const void* op_data) {
          Op<std::string>::Finish(op_data, rc, rc == ZOK && value ? value : "");
        },
        op);
  });
}

void ZkConnection::Delete(const std::string& path, std::function<void(int)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_adelete(zh, path.c_str(), -1, [](int rc, const void* data) { Op<>::Finish(data, rc); }, op);
  });
}

void ZkConnection::Sync(const std::string& path, std::function<void(int)> done) {
  Run(std::move(done), [&](zhandle_t* zh, const void* op) {
    return zoo_async(zh, path.c_str(), [](int rc, const char*, const void* data) { Op<>::Finish(data, rc); },
                     op);
  });
}

}  // namespace scales::zk_internal
