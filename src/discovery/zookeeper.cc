#include "scales/discovery/zookeeper.h"

#include <algorithm>
#include <future>
#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/duration_text.h"
#include "discovery/zk_connection.h"
#include "scales/core/error.h"
#include "scales/core/log.h"

namespace scales {

using zk_internal::RetryBackoff;
using zk_internal::ZkConnection;
using zk_internal::ZkErrorText;

namespace {

// An operation that failed with the connection or its session: the reply was lost, not
// refused, and the reconnect is what retries it. (The C client fails every pending operation
// with ZOPERATIONTIMEOUT when the server went quiet for 2/3 of the session timeout, and
// reconnects.)
bool ConnectionError(int rc) {
  return rc == ZCONNECTIONLOSS || rc == ZOPERATIONTIMEOUT || rc == ZCLOSING || rc == ZSESSIONEXPIRED ||
         rc == ZINVALIDSTATE;
}

// An operation refused for now, not for what it asked: the same request may well succeed when
// sent again (ZTHROTTLEDOP: "not executed at all, please retry"; ZSESSIONMOVED: sent over a
// connection the session has left; ZNEWCONFIGNOQUORUM: an ensemble reconfiguration; the C
// client's own ZSYSTEMERROR / ZMARSHALLINGERROR: a local failure, out of memory).
bool TransientError(int rc) {
  return rc == ZTHROTTLEDOP || rc == ZSESSIONMOVED || rc == ZNEWCONFIGNOQUORUM || rc == ZSYSTEMERROR ||
         rc == ZMARSHALLINGERROR;
}

// How many times a member never read yet is read after transient errors (the retries'
// pauses apart) before it is skipped like an unreadable member, so that a persistent throttle on
// one read cannot hold back every later change of the server set.
constexpr int kTransientMemberReads = 3;

// A ParsedUri's description without secrets: the auth credentials are not shown.
std::string DescribeUri(const ParsedUri& uri) { return RedactUriSecrets(uri.ToString()); }

ZooKeeperOptions CheckedOptions(const ParsedUri& uri, ZooKeeperOptions options) {
  ZooKeeperOptions out = ZooKeeperOptions::FromUri(uri, std::move(options));
  out.Validate();
  if (uri.path.empty() || uri.path == "/") {
    throw Error(make_error_code(Errc::kBadUri),
                fmt::format("bad URI '{}': the server set path is missing", RedactUriSecrets(uri.ToString())));
  }
  return out;
}

// A member create's bytes besides its path and data: header, lengths, the open ACL, the flags.
constexpr size_t kCreateRequestOverhead = 64;

// The member data of `instance`, checked as every reader parses it: an instance they would
// skip as malformed (no host, port 0), or one with an additional endpoint they would drop, is
// refused here rather than announced to no effect; so is
// one whose create the server would not read: a request over its jute.maxbuffer
// (options.max_request_bytes) makes it close the connection ("Len error"), which the C client
// reports as a connection loss, so such a create would only ever be retried.
std::string CheckedMemberData(const ParsedUri& uri, const ServiceInstance& instance, const ZooKeeperOptions& options) {
  std::string data = SerializeServiceInstance(instance);
  std::string error;
  std::vector<std::string> skipped;
  if (!ParseServiceInstance(data, error, &skipped) || !skipped.empty()) {
    if (error.empty()) error = skipped.front();
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("announcer {}: the instance is not a valid serverset member: {}", DescribeUri(uri),
                            error));
  }
  const size_t path = options.chroot.size() + uri.path.size() + std::string_view("/member_0000000000").size();
  const size_t max_request = options.max_request_bytes;
  const size_t limit = max_request - kCreateRequestOverhead - std::min(path, max_request / 2);
  if (data.size() > limit) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("announcer {}: member data of {} bytes is over the limit of {} bytes "
                            "(max_request_bytes {}, the servers' jute.maxbuffer, less the path and the request "
                            "header): the server would close the connection on each create",
                            DescribeUri(uri), data.size(), limit, max_request));
  }
  return data;
}

std::string TrimSlash(std::string path) {
  while (path.size() > 1 && path.ends_with('/')) path.pop_back();
  return path;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ZooKeeperServerSet

class ZooKeeperServerSet::Impl {
 public:
  Impl(ParsedUri uri, ZooKeeperOptions options)
      : uri_(std::move(uri)),
        description_(DescribeUri(uri_)),
        path_(TrimSlash(uri_.path)),
        options_(CheckedOptions(uri_, std::move(options))),
        connection_(options_.ConnectString(uri_), options_) {}

  void Start() {
    connection_.Start({
        .connected = [this](bool new_session) { OnConnected(new_session); },
        .disconnected = [] {},  // the members stay as they are
        .watch = [this](int type, const std::string& path) { OnWatch(type, path); },
    });
  }

  ~Impl() {
    connection_.Stop();
    Deactivate();
  }

  bool made_before_fork() const noexcept { return connection_.made_before_fork(); }

  // No listener is called after this returns (a delivery checks `active` when it runs).
  void Deactivate() { subscribers_.DeactivateAll(); }

  // The first snapshot is posted at once if one was published (the list published_ holds).
  uint64_t Subscribe(boost::asio::any_io_executor executor, Listener listener) {
    return subscribers_.Subscribe(std::move(executor), std::move(listener));
  }

  void Unsubscribe(uint64_t id) { subscribers_.Unsubscribe(id); }

  std::string Describe() const {
    std::string state;
    if (!connection_.StatusText().starts_with("connected")) {
      state = connection_.StatusText();
      std::lock_guard lock(mu_);
      if (published_) state += fmt::format(", keeping {} members", published_->size());
    } else {
      std::lock_guard lock(mu_);
      state = "connected, " + path_status_;
    }
    return fmt::format("{} ({})", description_, state);
  }

  std::optional<Members> members() const {
    std::lock_guard lock(mu_);
    return published_;
  }

  PathStatus path_status() const {
    std::lock_guard lock(mu_);
    return status_;
  }

  Stats stats() const {
    Stats s;
    s.malformed_members = malformed_.load();
    s.sessions = connection_.sessions();
    s.session_expirations = connection_.expirations();
    s.connection_losses = connection_.connection_losses();
    s.snapshots = snapshots_.load();
    s.member_reads = member_reads_.load();
    s.read_retries = read_retries_.load();
    return s;
  }

  std::string last_error() const { return connection_.last_error(); }
  std::optional<std::pair<int64_t, std::string>> session() const { return connection_.session(); }

 private:
  // One member_ child, as last read. Loop thread only.
  struct Child {
    std::optional<ServiceInstance> instance;  // nullopt: never read, malformed or unreadable
    bool loaded = false;      // publishable in the current session: read, kept or skipped
    bool unreadable = false;  // its last read failed (no auth, throttled, ...): read again later
    int transient_failures = 0;  // of a never-read member, in a row (kTransientMemberReads)
  };

  // Everything below runs on the connection's loop thread.

  void OnConnected(bool new_session) {
    if (new_session) {
      // The previous session's reads were dropped with it and its watches are gone: re-read
      // every member (keeping the last known data, so members keep serving meanwhile).
      outstanding_ = 0;
      for (auto& [name, child] : children_) child.loaded = false;
    }
    Refresh();
  }

  void OnWatch(int type, const std::string& path) {
    if (path == path_) {
      if (type == ZOO_CHILD_EVENT) {
        ReadChildren();
      } else {
        Refresh();  // created, deleted or data changed: check existence, re-arm the watches
      }
      return;
    }
    if (path.size() > path_.size() + 1 && path.starts_with(path_) && path[path_.size()] == '/') {
      std::string name = path.substr(path_.size() + 1);
      if (type == ZOO_CHANGED_EVENT) {
        if (children_.contains(name)) ReadMember(name);
      } else if (type == ZOO_DELETED_EVENT) {
        children_.erase(name);
        MaybePublish();
      }
    }
  }

  // Checks that the path exists (leaving an exists watch, which reports its creation or
  // deletion), then reads the children.
  void Refresh() {
    ++outstanding_;
    connection_.Exists(path_, true, [this](int rc) {
      --outstanding_;
      if (rc == ZOK) {
        path_exists_ = true;
        ReadChildren();
      } else if (rc == ZNONODE) {
        PathMissing();
      } else {
        read_failed_ = true;
        Failed(fmt::format("exists {}", path_), rc);
      }
      MaybePublish();
    });
  }

  void PathMissing() {
    path_exists_ = false;
    read_failed_ = false;
    children_.clear();
    other_children_ = 0;
    std::lock_guard lock(mu_);
    path_status_ = fmt::format("path {} does not exist, waiting for it", path_);
    status_ = PathStatus{.known = true};
  }

  void ReadChildren() {
    ++outstanding_;
    connection_.GetChildren(path_, true, [this](int rc, std::vector<std::string> names) {
      --outstanding_;
      if (rc == ZOK) {
        path_exists_ = true;
        read_failed_ = false;
        std::set<std::string> now;
        for (auto& n : names) {
          if (n.starts_with("member_")) now.insert(std::move(n));
        }
        other_children_ = names.size() - now.size();
        std::erase_if(children_, [&](const auto& kv) { return !now.contains(kv.first); });
        // Pipelined: every read is sent before any reply is awaited.
        for (const std::string& name : now) {
          auto [it, inserted] = children_.try_emplace(name);
          if (inserted || !it->second.loaded || it->second.unreadable) ReadMember(name);
        }
      } else if (rc == ZNONODE) {
        // Deleted between the exists check and this read: wait for it again.
        PathMissing();
        Refresh();
      } else {
        read_failed_ = true;
        Failed(fmt::format("get children of {}", path_), rc);
      }
      MaybePublish();
    });
  }

  void ReadMember(const std::string& name) {
    ++outstanding_;
    connection_.Get(path_ + "/" + name, true, [this, name](int rc, std::string data) {
      --outstanding_;
      auto it = children_.find(name);
      if (rc == ZOK && it != children_.end()) {
        member_reads_.fetch_add(1, std::memory_order_relaxed);
        std::string error;
        std::vector<std::string> skipped;
        it->second.instance = ParseServiceInstance(data, error, &skipped);
        it->second.loaded = true;
        it->second.unreadable = false;
        it->second.transient_failures = 0;
        if (!it->second.instance) {
          malformed_.fetch_add(1, std::memory_order_relaxed);
          std::string text = fmt::format("malformed member {}/{} skipped: {}", path_, name, error);
          // Once per read: a member is read again when its data changes or a new session begins.
          SCALES_LOG(kWarning, "server set {}: {}", description_, text);
          connection_.SetLastError(std::move(text));
        } else if (!skipped.empty()) {
          std::string text = fmt::format("member {}/{}: bad additional endpoints skipped (the member is used "
                                         "without them): {}",
                                         path_, name, fmt::join(skipped, "; "));
          SCALES_LOG(kWarning, "server set {}: {}", description_, text);
          connection_.SetLastError(std::move(text));
        }
      } else if (rc == ZNONODE) {
        if (it != children_.end()) children_.erase(it);
      } else if (rc != ZOK) {
        if (it != children_.end() && ConnectionError(rc)) {
          // The reply was lost: the member keeps its last data (nothing is published until it is
          // read again) and is read again once connected. Its data watch may be gone too (the
          // one that fired for this read, or this read's, which never took), so a change would
          // otherwise never be seen.
          it->second.loaded = false;
        } else if (it != children_.end()) {
          ReadRefused(it->second, rc);
        }
        Failed(fmt::format("get {}/{}", path_, name), rc);
      }
      MaybePublish();
    });
  }

  // A member's read failed, not with the connection nor for lack of the node; the retry
  // (Failed) reads it again. A member with data (from this session or the last) keeps it
  // meanwhile, and one already settled in this session (malformed, skipped) stays so: a
  // throttled read, or one pending when the authentication failed, must not drop a live member
  // (clients would see a partial list). A member without data waits for its read
  // after a transient error (nothing is published without it, as after a lost reply) for
  // kTransientMemberReads attempts; after those, or after a refusal that would not change by
  // itself (no read permission), it is skipped like a malformed member, so it blocks no one.
  void ReadRefused(Child& child, int rc) {
    child.unreadable = true;
    if (child.instance || child.loaded) {
      child.loaded = true;
      return;
    }
    child.loaded = !TransientError(rc) || ++child.transient_failures >= kTransientMemberReads;
  }

  void Failed(const std::string& what, int rc) {
    // Connection loss / closing: the reconnect (same or new session) re-reads what is missing.
    if (ConnectionError(rc)) return;
    // Anything else (no auth, ...) would not change by itself: show it and read again later.
    std::string error = fmt::format("{}: {}", what, ZkErrorText(rc));
    connection_.SetLastError(error);
    if (retry_pending_) {
      std::lock_guard lock(mu_);
      path_status_ = fmt::format("cannot read: {}, retrying", error);
    } else {
      // A failure that persists (a member nobody may read) is read again less and less often,
      // so that a fleet of clients does not poll the ensemble every retry_interval for ever.
      const std::chrono::milliseconds wait = backoff_.Next();
      {
        std::lock_guard lock(mu_);
        path_status_ = fmt::format("cannot read: {}, retrying in {}", error, DurationText(wait));
      }
      retry_pending_ = true;
      read_retries_.fetch_add(1, std::memory_order_relaxed);
      retry_timer_.expires_after(wait);
      retry_timer_.async_wait([this](boost::system::error_code ec) {
        retry_pending_ = false;
        if (!ec && connection_.connected()) Refresh();
      });
    }
  }

  // Why the `members` served are not one per member node: "path /svc exists with no member_
  // children", "3 member nodes: 2 malformed, 1 not ALIVE".
  std::string Explain(const PathStatus& status, size_t members) const {
    if (status.member_nodes == 0) {
      std::string out = fmt::format("path {} exists with no member_ children", path_);
      if (status.other_children != 0) out += fmt::format("; {} other children ignored", status.other_children);
      return out;
    }
    const size_t serving =
        status.member_nodes - status.malformed - status.unreadable - status.not_alive - status.without_endpoint;
    std::string out = fmt::format("{} member nodes:", status.member_nodes);
    const char* sep = " ";
    auto part = [&](size_t n, std::string_view what) {
      if (n == 0) return;
      out += fmt::format("{}{} {}", sep, n, what);
      sep = ", ";
    };
    part(status.malformed, "malformed");
    part(status.unreadable, "unreadable");
    part(status.not_alive, "not ALIVE");
    part(status.without_endpoint, fmt::format("without endpoint '{}'", uri_.endpoint_name));
    part(serving > members ? serving - members : 0, "sharing an endpoint with another");
    return out;
  }

  // Publishes when no read is in flight and every member of this session has been read, so a
  // partial list (some reads lost with the connection) is never published.
  void MaybePublish() {
    if (outstanding_ > 0 || read_failed_) return;
    bool failing = false;  // a member's last read was refused: its retries keep backing off
    std::vector<const ServiceInstance*> instances;
    instances.reserve(children_.size());
    PathStatus status{.known = true, .exists = path_exists_, .member_nodes = children_.size(),
                      .other_children = other_children_};
    for (const auto& [name, child] : children_) {
      if (!child.loaded) return;
      if (child.unreadable) failing = true;
      if (child.instance) {
        instances.push_back(&*child.instance);
        if (child.instance->status != "ALIVE") {
          ++status.not_alive;
        } else if (!SelectEndpoint(*child.instance, uri_.endpoint_name)) {
          ++status.without_endpoint;
        }
      } else {
        ++(child.unreadable ? status.unreadable : status.malformed);
      }
    }
    if (!failing) backoff_.Reset();  // everything read: the next failure is retried soon
    Members members = SelectEndpoints(instances, uri_.endpoint_name);
    std::lock_guard lock(mu_);
    if (path_exists_) {
      status_ = status;
      path_status_ = fmt::format("{} members", members.size());
      if (members.size() != children_.size() || children_.empty()) {
        path_status_ += fmt::format(" ({})", Explain(status, members.size()));
      }
    }
    // The same list is published again when the path came or went (an empty set became a
    // missing path, as it does when a path is deleted: its members go first), so that a
    // subscriber reading path_missing() on delivery (scales serverset --watch) sees the change.
    if (published_ && *published_ == members && published_exists_ == path_exists_) return;
    published_ = members;
    published_exists_ = path_exists_;
    snapshots_.fetch_add(1, std::memory_order_relaxed);
    subscribers_.Publish(std::move(members));  // under mu_: in the order of published_
  }

  const ParsedUri uri_;
  const std::string description_;
  const std::string path_;
  const ZooKeeperOptions options_;

  // Loop thread only.
  std::map<std::string, Child> children_;
  int outstanding_ = 0;  // reads in flight
  bool path_exists_ = false;
  bool read_failed_ = false;  // the path's children could not be read (other than conn. loss)
  size_t other_children_ = 0;  // children of the path not named member_*, at the last read

  std::atomic<uint64_t> malformed_{0};
  std::atomic<uint64_t> snapshots_{0};
  std::atomic<uint64_t> member_reads_{0};
  std::atomic<uint64_t> read_retries_{0};

  mutable std::mutex mu_;  // guards the fields below
  std::optional<Members> published_;
  bool published_exists_ = false;  // path_exists_ when published_ was published
  std::string path_status_ = "loading";
  PathStatus status_;
  ServerSetSubscribers subscribers_;  // delivers published_ (published under mu_)

  ZkConnection connection_;  // stopped first (in ~Impl)
  // Declared after connection_ (whose io_context it uses), so destroyed before it.
  boost::asio::steady_timer retry_timer_{connection_.io_context()};
  bool retry_pending_ = false;  // loop thread
  RetryBackoff backoff_{options_};  // loop thread
};

ZooKeeperServerSet::ZooKeeperServerSet(ParsedUri uri, ZooKeeperOptions options)
    : impl_(std::make_shared<Impl>(std::move(uri), std::move(options))) {
  impl_->Start();
}

ZooKeeperServerSet::~ZooKeeperServerSet() {
  if (impl_->made_before_fork()) {
    // A child made by fork(): the discovery thread and the ZooKeeper client's threads are the
    // parent's, and the session's socket and the discovery loop's descriptors are shared with
    // the parent: closing the session would end the parent's, stopping the loop would touch its
    // timers. Set aside, never destroyed.
    internal::KeepForever(std::move(impl_));
    return;
  }
  impl_->Deactivate();
  // The session's close blocks (a frozen ensemble: 1.5 s), and nothing needs to wait for it (a
  // server set owns no node): it is closed by the closer, which keeps the Impl, whose state the
  // discovery thread uses, until the connection has stopped, and closes many sets side by side.
  // So releasing a set does not hold up an event loop (the last client holding it went in one
  // of its handlers), nor a program releasing its clients one by one (1.5 s each).
  ZkConnection::StopInBackground([impl = std::move(impl_)]() mutable { impl.reset(); });
}

uint64_t ZooKeeperServerSet::Subscribe(boost::asio::any_io_executor executor, Listener listener) {
  return impl_->Subscribe(std::move(executor), std::move(listener));
}
void ZooKeeperServerSet::Unsubscribe(uint64_t id) { impl_->Unsubscribe(id); }
std::string ZooKeeperServerSet::Describe() const { return impl_->Describe(); }
std::optional<ServerSet::Members> ZooKeeperServerSet::members() const { return impl_->members(); }
ZooKeeperServerSet::PathStatus ZooKeeperServerSet::path_status() const { return impl_->path_status(); }
bool ZooKeeperServerSet::path_missing() const {
  const PathStatus status = impl_->path_status();
  return status.known && !status.exists;
}
ZooKeeperServerSet::Stats ZooKeeperServerSet::stats() const { return impl_->stats(); }
std::string ZooKeeperServerSet::last_error() const { return impl_->last_error(); }
std::optional<std::pair<int64_t, std::string>> ZooKeeperServerSet::session() const {
  return impl_->session();
}

// ---------------------------------------------------------------------------------------------
// Announcer

class Announcer::Impl {
 public:
  Impl(const ParsedUri& uri, ServiceInstance instance, ZooKeeperOptions options)
      : description_(DescribeUri(uri)),
        path_(TrimSlash(uri.path)),
        options_(CheckedOptions(uri, std::move(options))),
        data_(CheckedMemberData(uri, instance, options_)),
        connection_(options_.ConnectString(uri), options_) {}

  void Start() {
    connection_.Start({
        .connected = [this](bool new_session) {
          if (new_session) {
            SetNode("");  // an expired session's ephemeral node is gone
            // ... and so are its operations: a create in flight then never completes (the
            // connection drops the old session's completions).
            creating_ = false;
            create_uncertain_ = false;
          }
          if (shutting_down_) {
            FinishShutdown();  // its delete waited for this (re)connect
          } else {
            Resume();
          }
        },
        .disconnected = [] {},
        .watch = [this](int type, const std::string& path) {
          if (type == ZOO_DELETED_EVENT) {
            MemberGone(path);
          } else if (type == ZOO_CHANGED_EVENT && !shutting_down_ && !path.empty() && path == node_path()) {
            // Another client rewrote the member: the one-shot watch went with that event, so a
            // delete after it would go unseen. (Its exists finds it gone if it went meanwhile.)
            WatchNode(path);
          }
        },
    });
  }

  ~Impl() { Shutdown(); }

  bool made_before_fork() const noexcept { return connection_.made_before_fork(); }

  void Shutdown() {
    if (made_before_fork()) {
      // A child made by fork(): the member and the session are the parent's (its announcement
      // goes on); nothing of the connection runs here.
      SCALES_LOG(kWarning,
                 "zookeeper: announcer {} was created before this process was forked: "
                 "its member stays the parent's",
                 description_);
      return;
    }
    std::call_once(shutdown_once_, [this] {
      // Delete the node explicitly (closing the session would also remove it, but only once
      // the ensemble processes the close, and not at all while the connection is down: the
      // delete then waits for the reconnect, within the 2 s).
      auto done = std::make_shared<std::promise<void>>();
      auto future = done->get_future();
      boost::asio::post(connection_.io_context(), [this, done] {
        // Before the delete, whose watch event must not be taken for another client's delete.
        shutting_down_ = true;
        shutdown_done_ = done;
        FinishShutdown();
      });
      future.wait_for(std::chrono::seconds(2));
      connection_.Stop();
    });
  }

  bool WaitAnnounced(std::chrono::milliseconds timeout) const {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [this] { return !node_.empty(); });
  }

  std::string node_path() const {
    std::lock_guard lock(mu_);
    return node_;
  }

  std::optional<std::pair<int64_t, std::string>> session() const { return connection_.session(); }

  std::string Describe() const {
    std::string node = node_path();
    if (!node.empty()) return fmt::format("announcer {} (announced as {})", description_, node);
    std::string status = connection_.StatusText();
    if (status.starts_with("connected")) {
      // Connected but not announced: say what the last create ran into.
      if (std::string error = connection_.last_error(); !error.empty()) {
        status += fmt::format(", not announced: {}, retrying", error);
      }
    }
    return fmt::format("announcer {} ({})", description_, status);
  }

 private:
  void SetNode(std::string node) {
    {
      std::lock_guard lock(mu_);
      node_ = std::move(node);
    }
    cv_.notify_all();
  }

  // Loop thread, connected: announces when not announced and no create is in flight, else sets
  // the watch on the member again (its exists may have been lost with the connection; a watch
  // the server kept fires once all the same).
  void Resume() {
    if (std::string node = node_path(); !node.empty()) {
      WatchNode(node);
    } else if (!creating_) {
      Announce();
    }
  }

  // Loop thread: `node` was created, or adopted (FindOwnMember), in this session. Shutdown()
  // deletes it if it began meanwhile.
  void Announced(std::string node) {
    backoff_.Reset();
    SetNode(node);
    if (shutting_down_) {
      FinishShutdown();
      return;
    }
    WatchNode(node);
  }

  // An exists watch on the member, so that its deletion by another client (an operator, a
  // cleanup script) is seen while the session lives: Finagle's announcer (twitter-commons
  // Group.ActiveMembership) joins again then, and so does this one (MemberGone).
  void WatchNode(const std::string& node) {
    connection_.Exists(node, true, [this, node](int rc) {
      if (rc == ZNONODE) {
        MemberGone(node);  // deleted before the watch was set
      } else if (rc != ZOK) {
        // Lost with the connection: the reconnect sets it again (Resume); else after a pause.
        CreateFailed(fmt::format("watch {}: {}", node, ZkErrorText(rc)), rc);
      }
    });
  }

  // Loop thread: a member node was deleted while the session lives. When it is the current one
  // and not by Shutdown(), announce again (a new sequence number). Only the current node
  // counts, so a late event or exists reply about an earlier member cannot start a second
  // create, and the session never owns two members.
  void MemberGone(const std::string& node) {
    if (shutting_down_ || node.empty() || node != node_path()) return;
    SCALES_LOG(kWarning, "announcer {}: member {} was deleted by another client; announcing again",
               description_, node);
    SetNode("");
    if (!creating_) Announce();
  }

  // Loop thread, shutting down: deletes the member, now if connected, else on the reconnect
  // (the connected handler calls this again; a new session means the member is gone already),
  // then releases Shutdown(). Closing a session that is not connected sends nothing, so the
  // member would otherwise outlive this announcer by a session timeout. A create in flight (or
  // the search for one whose reply was lost) is waited for: its completion comes back here, and
  // a member it made, or one a lost create made (found as FindOwnMember finds it), is deleted.
  void FinishShutdown() {
    if (!shutdown_done_ || creating_) return;
    std::string node = node_path();
    if (node.empty()) {
      if (!create_uncertain_) {
        std::exchange(shutdown_done_, nullptr)->set_value();
      } else if (connection_.connected()) {
        FindOwnMember();  // shutting down: it creates nothing, and comes back here
      }
      return;
    }
    if (!connection_.connected()) return;
    connection_.Delete(node, [this](int rc) {
      if (ConnectionError(rc) || !shutdown_done_) return;  // deleted again after the reconnect
      SetNode("");
      std::exchange(shutdown_done_, nullptr)->set_value();
    });
  }

  // Loop thread: not announced, nothing in flight.
  void Announce() {
    if (create_uncertain_) {
      FindOwnMember();
    } else {
      CreateMember();
    }
  }

  // Loop thread.
  void CreateMember() {
    if (shutting_down_) {
      FinishShutdown();  // Shutdown() began while a lost create was looked for: nothing to create
      return;
    }
    creating_ = true;
    connection_.Create(path_ + "/member_", data_, ZOO_EPHEMERAL | ZOO_SEQUENCE,
                       [this](int rc, std::string created) {
                         creating_ = false;
                         // The connection went with the create in flight: the ensemble may
                         // have made the node all the same (FindOwnMember).
                         if (ConnectionError(rc)) create_uncertain_ = true;
                         if (rc == ZOK) {
                           Announced(std::move(created));
                         } else if (rc == ZNONODE) {
                           CreateParents(1);
                         } else {
                           CreateFailed(fmt::format("create {}/member_: {}", path_, ZkErrorText(rc)), rc);
                         }
                       });
  }

  // After a member create whose reply was lost with the connection (the session lives on): the
  // ensemble may have made the node, owned by this session. Adopt it rather than create a
  // second member, which would double this instance's share of the traffic for as long as the
  // session lives (Curator's "protected" creates solve the same problem with a name prefix,
  // which Finagle's readers would not take for a member). Extra members of this session
  // (several lost replies) are deleted.
  void FindOwnMember() {
    const auto session = connection_.session();
    if (!session) {
      CreateMember();
      return;
    }
    const int64_t me = session->first;
    creating_ = true;
    // The create may have reached the leader but not yet the server this session reconnected
    // to: a sync first, or the list could miss the node and a second member be made.
    connection_.Sync(path_, [this, me](int rc) {
      if (rc != ZOK) {
        creating_ = false;
        CreateFailed(fmt::format("sync {} to find this session's member: {}", path_, ZkErrorText(rc)), rc);
        return;
      }
      ListOwnMembers(me);
    });
  }

  // Loop thread, after FindOwnMember's sync.
  void ListOwnMembers(int64_t me) {
    connection_.GetChildren(path_, false, [this, me](int rc, std::vector<std::string> names) {
      if (rc != ZOK && rc != ZNONODE) {
        creating_ = false;
        CreateFailed(fmt::format("list {} to find this session's member: {}", path_, ZkErrorText(rc)), rc);
        return;
      }
      std::erase_if(names, [](const std::string& n) { return !n.starts_with("member_"); });
      if (names.empty()) {
        creating_ = false;
        create_uncertain_ = false;
        CreateMember();
        return;
      }
      struct Search {
        size_t left = 0;
        int error = ZOK;
        std::vector<std::string> ours;
      };
      auto search = std::make_shared<Search>();
      search->left = names.size();
      for (const auto& name : names) {
        std::string node = path_ + "/" + name;
        connection_.EphemeralOwner(node, [this, me, search, node](int rc, int64_t owner) {
          if (rc == ZOK && owner == me) search->ours.push_back(node);
          if (rc != ZOK && rc != ZNONODE) search->error = rc;  // ZNONODE: gone meanwhile, not ours
          if (--search->left != 0) return;
          creating_ = false;
          if (search->error != ZOK) {
            CreateFailed(fmt::format("read the members of {} to find this session's: {}", path_,
                                     ZkErrorText(search->error)),
                         search->error);
            return;
          }
          create_uncertain_ = false;
          if (search->ours.empty()) {
            CreateMember();
            return;
          }
          std::sort(search->ours.begin(), search->ours.end());
          SCALES_LOG(kInfo, "announcer {}: the create lost with the connection was made: {}", description_,
                     search->ours.front());
          for (size_t i = 1; i < search->ours.size(); ++i) DeleteExtra(search->ours[i]);
          Announced(search->ours.front());
        });
      }
    });
  }

  // A second member of this session (several creates whose replies were lost): deleted, as the
  // session must own one member. A failed delete is logged (not retried: the node goes with the
  // session).
  void DeleteExtra(const std::string& node) {
    connection_.Delete(node, [this, node](int rc) {
      if (rc == ZOK || rc == ZNONODE) return;
      SCALES_LOG(kWarning,
                 "announcer {}: could not delete {}, a second member of this session: {}; it stays until the "
                 "session ends",
                 description_, node, ZkErrorText(rc));
    });
  }

  // A create (or the watch on the member) failed: after a connection loss the next connect
  // retries; anything else (no permission, a missing chroot node) is retried after
  // retry_interval, backing off to max_retry_interval, as a server set's reads are. Shutting
  // down, nothing is retried: a lost create is still looked for after the reconnect; other
  // errors end the wait.
  void CreateFailed(std::string error, int rc) {
    connection_.SetLastError(std::move(error));
    if (shutting_down_) {
      if (!ConnectionError(rc)) create_uncertain_ = false;
      FinishShutdown();
      return;
    }
    if (ConnectionError(rc) || retry_pending_) return;
    retry_pending_ = true;
    retry_timer_.expires_after(backoff_.Next());
    retry_timer_.async_wait([this](boost::system::error_code ec) {
      retry_pending_ = false;
      if (!ec && connection_.connected() && !shutting_down_) Resume();
    });
  }

  // Creates the persistent ancestors of the member, from the root down, then the member.
  void CreateParents(size_t from) {
    size_t slash = path_.find('/', from);
    std::string prefix = slash == std::string::npos ? path_ : path_.substr(0, slash);
    creating_ = true;
    connection_.Create(prefix, "", 0, [this, slash, prefix](int rc, std::string) {
      if (rc == ZOK || rc == ZNODEEXISTS) {
        creating_ = false;
        NextParent(slash);
        return;
      }
      if (ConnectionError(rc)) {
        creating_ = false;
        CreateFailed(fmt::format("create parents of {}: {}", path_, ZkErrorText(rc)), rc);
        return;
      }
      // The server checks the permission to create in the parent before whether the node
      // exists: an ancestor that exists under a parent we may not create in answers ZNOAUTH
      // (kazoo's ensure_path and Curator's mkdirs check existence for the same reason).
      connection_.Exists(prefix, false, [this, slash, rc](int exists_rc) {
        creating_ = false;
        if (exists_rc == ZOK) {
          NextParent(slash);
          return;
        }
        CreateFailed(fmt::format("create parents of {}: {}", path_, ZkErrorText(rc)), rc);
      });
    });
  }

  // After the ancestor ending before `slash` exists: the next one, or the member.
  void NextParent(size_t slash) {
    if (shutting_down_) {
      FinishShutdown();
    } else if (slash == std::string::npos) {
      CreateMember();
    } else {
      CreateParents(slash + 1);
    }
  }

  const std::string description_;
  const std::string path_;
  const ZooKeeperOptions options_;
  const std::string data_;
  bool creating_ = false;       // loop thread
  bool create_uncertain_ = false;  // loop thread: a member create lost its reply (FindOwnMember)
  bool retry_pending_ = false;  // loop thread
  bool shutting_down_ = false;  // loop thread: Shutdown() began (no more creates)
  std::shared_ptr<std::promise<void>> shutdown_done_;  // loop thread: Shutdown() waits on it

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::string node_;
  std::once_flag shutdown_once_;

  ZkConnection connection_;
  boost::asio::steady_timer retry_timer_{connection_.io_context()};
  RetryBackoff backoff_{options_};  // loop thread
};

Announcer::Announcer(const ParsedUri& uri, ServiceInstance instance, ZooKeeperOptions options)
    : impl_(std::make_shared<Impl>(uri, std::move(instance), std::move(options))) {
  impl_->Start();
}
Announcer::~Announcer() {
  if (impl_->made_before_fork()) {
    // A child made by fork(): as a server set's (~ZooKeeperServerSet), and the member stays
    // the parent's.
    internal::KeepForever(std::move(impl_));
    return;
  }
  // Shutdown() blocks (up to 2 s for the delete, then the session's close). Released on an event
  // loop, it runs on the closer thread instead, which keeps the Impl until it is done.
  ZkConnection::StopOffLoop([impl = std::move(impl_)]() mutable { impl.reset(); });
}
bool Announcer::WaitAnnounced(std::chrono::milliseconds timeout) const {
  return impl_->WaitAnnounced(timeout);
}
std::string Announcer::node_path() const { return impl_->node_path(); }
void Announcer::Shutdown() { impl_->Shutdown(); }
std::string Announcer::Describe() const { return impl_->Describe(); }
std::optional<std::pair<int64_t, std::string>> Announcer::session() const {
  return impl_->session();
}

}  // namespace scales
