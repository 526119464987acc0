#pragma once
// ZooKeeper server sets (zk:// URIs): discovery of a service's members through the serverset
// znodes that Finagle, Twitter commons and this library's Announcer write.
//
//   zk://zk1:2181,zk2:2181/path/to/serverset[#endpoint][?session_timeout=10s&chroot=/x&auth=...]
//
// The members are the children of the path named `member_*`; their data is the serverset JSON
// (scales/discovery/serverset_member.h). Only ALIVE members receive traffic; `#endpoint`
// selects `additionalEndpoints[endpoint]` instead of `serviceEndpoint`. See
// docs/configuration.md, section "ZooKeeper", for every option and for the behaviour on
// connection loss, session expiry and a missing path.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "scales/discovery/server_set.h"
#include "scales/discovery/serverset_member.h"
#include "scales/discovery/uri.h"

namespace scales {

// Options of a ZooKeeper session, shared by ZooKeeperServerSet and Announcer. Every field can
// also be given as a zk:// URI query parameter (the URI wins over the struct).
struct ZooKeeperOptions {
  // Session timeout requested from the ensemble (the server clamps it to its own
  // [minSessionTimeout, maxSessionTimeout], by default 2..20 ticks). Query:
  // `session_timeout=10s` (units ms, s, m). Default 10 s. Must be > 0.
  std::chrono::milliseconds session_timeout{std::chrono::seconds(10)};
  // A chroot for the session: the znode path of the URI is then resolved below it, exactly as
  // ZooKeeper's "host:port/chroot" connect strings do. Empty (default): the URI path is the full
  // path from the root. Query: `chroot=/prefix`. Must start with '/' and not end with '/'.
  std::string chroot;
  // Authentication added to the session, "scheme:credentials"; for digest authentication
  // "digest:user:password". Empty (default): none. Query: `auth=digest:user:password`.
  std::string auth;
  // Wait before the first retry of a failure that the C client does not retry itself: a new
  // session after the ensemble rejected one (authentication failed) or no handle could be made,
  // a server set's read refused (no read permission, throttled), an Announcer's create refused.
  // Query: `retry_interval=1s`. Default 1 s. At least kMinRetryInterval (a rejected session
  // re-made 1,000 times a second would load the ensemble), at most 24 h.
  std::chrono::milliseconds retry_interval{std::chrono::seconds(1)};
  static constexpr std::chrono::milliseconds kMinRetryInterval{10};
  // The longest wait between retries of a failure that persists: each retry after the first
  // waits twice as long as the one before (drawn uniformly from its upper half, so that a fleet
  // whose sessions failed together spreads out) until the wait reaches max_retry_interval. The
  // waits start again from retry_interval once the failure is over (connected and
  // authenticated; every member read; the member created). A value not above retry_interval
  // makes every retry wait retry_interval. Query: `max_retry_interval=60s`. Default 60 s. At
  // least kMinRetryInterval, at most 24 h.
  std::chrono::milliseconds max_retry_interval{std::chrono::seconds(60)};
  // The largest request the ensemble reads: its jute.maxbuffer setting (ZooKeeper's default,
  // 0xfffff = 1048575 bytes). A larger request makes the server close the connection, so the
  // Announcer refuses member data whose create would not fit. Set it when the servers run with
  // a raised jute.maxbuffer. No query parameter. At least kMinMaxRequestBytes, at most 2^31 - 1.
  size_t max_request_bytes = 0xfffff;
  static constexpr size_t kMinMaxRequestBytes = 4096;

  // `defaults` overridden by the query parameters of a zk:// `uri`. Throws scales::Error
  // (kBadUri) naming the parameter when a parameter is unknown or its value invalid, or when
  // the URI is not zk://.
  static ZooKeeperOptions FromUri(const ParsedUri& uri, ZooKeeperOptions defaults);
  static ZooKeeperOptions FromUri(const ParsedUri& uri);
  // Throws scales::Error(kInvalidArgument) when a field is out of range.
  void Validate() const;
  // The C client's connect string: "h1:p1,h2:p2[/chroot]".
  std::string ConnectString(const ParsedUri& uri) const;
};

// Parses a ZooKeeper option duration: "<integer>ms", "<integer>s" or "<integer>m", at most 24 h.
std::optional<std::chrono::milliseconds> ParseZooKeeperDuration(std::string_view text);

// A ServerSet that follows a serverset znode.
//
// Threading: the ZooKeeper C client runs its I/O and completion threads; its callbacks only
// post to this server set's own discovery thread (one io_context run by one thread), which owns
// all membership state. Snapshots are posted from there to each subscriber's executor, in
// order; no balancer or user code runs on ZooKeeper's threads. All public functions are safe
// from any thread. After the destructor returns no listener is called again. Joining the
// discovery thread and closing the session, which blocks (a frozen ensemble: 1.5 s), are left to
// the process-wide closer (a few threads, closing many sets side by side) and the destructor
// returns at once: neither an event loop (a client's last handle released in one of its
// handlers) nor a program releasing its clients waits for the ensemble (docs/service-discovery.md,
// "Threads"). The closer finishes its work at process exit. In a child made by fork(), a set
// made before the fork is set aside, never closed: its session is the parent's.
//
// Behaviour: the first snapshot is delivered once the member list is known (the path was read,
// or found missing: an empty snapshot). Until then a client's open waits (and times out with
// Describe() saying why). Watches are re-armed on every read; member data changes are followed.
// Connection loss keeps the members; session expiry starts a new session and re-reads
// everything while the last known members keep serving. Malformed members are skipped and
// counted; the others are used. A list equal to the last one is published again only when the
// path was created or deleted meanwhile (path_missing() changed; read it in the listener).
class ZooKeeperServerSet final : public ServerSet {
 public:
  struct Stats {
    uint64_t malformed_members = 0;    // member reads whose data did not parse
    uint64_t sessions = 0;             // sessions established (1 + re-creations)
    uint64_t session_expirations = 0;  // sessions the ensemble expired
    uint64_t connection_losses = 0;    // disconnects (the session may survive them)
    uint64_t snapshots = 0;            // member lists published (first + each change)
    uint64_t member_reads = 0;         // member data reads completed
    uint64_t read_retries = 0;         // reads scheduled again after a refusal (max_retry_interval)
  };

  // Starts discovery in the background. Throws scales::Error(kBadUri) for bad options in the
  // URI and kInvalidArgument for bad `options`. A connect string the C client refuses is not
  // fatal: discovery retries (after retry_interval, backing off to max_retry_interval) and
  // Describe() says why.
  explicit ZooKeeperServerSet(ParsedUri uri, ZooKeeperOptions options = {});
  ~ZooKeeperServerSet() override;
  ZooKeeperServerSet(const ZooKeeperServerSet&) = delete;
  ZooKeeperServerSet& operator=(const ZooKeeperServerSet&) = delete;

  uint64_t Subscribe(boost::asio::any_io_executor executor, Listener listener) override;
  void Unsubscribe(uint64_t id) override;
  // What is known of the server set's path and of its children at the last member list (or
  // the last time the path was found missing): for tools and pages that must tell a missing
  // path from an empty set, and explain an empty set, without reading Describe()'s text.
  struct PathStatus {
    bool known = false;             // the path was read or found missing at least once
    bool exists = false;            // it exists (false while not known)
    size_t member_nodes = 0;        // its `member_*` children
    size_t other_children = 0;      // children with other names, ignored
    size_t malformed = 0;           // member nodes whose data did not parse: skipped
    size_t unreadable = 0;          // member nodes that could not be read (no permission): skipped
    size_t not_alive = 0;           // members whose status is not ALIVE
    size_t without_endpoint = 0;    // ALIVE members without the URI's #endpoint
  };

  // "zk://127.0.0.1:2181/svc (connected, 3 members)",
  // "zk://127.0.0.1:2181/svc (connected, 0 members (path /svc exists with no member_ children))",
  // "zk://127.0.0.1:2181/svc (connected, 0 members (2 member nodes: 2 malformed))",
  // "zk://127.0.0.1:2181/svc (connected, path /svc does not exist, waiting for it)",
  // "zk://127.0.0.1:2181/svc (not connected: connection refused, retrying)".
  std::string Describe() const override;
  // Thread-safe, like Describe(); consistent with what it says.
  PathStatus path_status() const;
  // The path was found missing (and not seen since): an empty member list means "no such
  // server set", not "no members". False while not known.
  bool path_missing() const;

  // The last published members, or nullopt while not yet known.
  std::optional<Members> members() const;
  Stats stats() const;
  // The last problem seen (connection error, malformed member, auth failure); empty if none.
  std::string last_error() const;
  // The current session's id and password, once connected (tests use them to force expiry).
  std::optional<std::pair<int64_t, std::string>> session() const;

 private:
  class Impl;
  std::shared_ptr<Impl> impl_;
};

// Registers a server in a ZooKeeper server set: an ephemeral sequential `member_` node under
// the URI's path holding the Finagle serverset JSON of `instance`. Creates missing parent
// znodes (persistent, open ACL). Re-creates the member after a session expiry, and when another
// client deletes it while the session lives; removes it on Shutdown() / destruction.
//
// Threading: runs on its own thread (like ZooKeeperServerSet); all public functions are safe
// from any thread.
class Announcer {
 public:
  // `uri` is a zk:// URI (its #fragment is ignored). Throws scales::Error like
  // ZooKeeperServerSet. Announcing happens in the background: see WaitAnnounced().
  Announcer(const ParsedUri& uri, ServiceInstance instance, ZooKeeperOptions options = {});
  // Shutdown(); on a scales event loop thread (a wrapped user's io_context's too), that runs on
  // the process-wide closer (as a ZooKeeperServerSet's close does) and the destructor returns
  // at once. In a child made by fork(), an announcer made before the fork is set aside: its
  // member and session are the parent's (Shutdown() there only logs a warning).
  ~Announcer();
  Announcer(const Announcer&) = delete;
  Announcer& operator=(const Announcer&) = delete;

  // Waits until the member node exists (true) or `timeout` passed (false).
  bool WaitAnnounced(std::chrono::milliseconds timeout) const;
  // The member node's path ("/svc/member_0000000003"), empty while not announced.
  std::string node_path() const;
  // Deletes the member (waiting up to 2 s for the ensemble, and for a reconnect if the connection
  // is down), closes the session. Idempotent.
  void Shutdown();
  std::string Describe() const;
  // The current session's id and password, once connected (tests use them to force expiry).
  std::optional<std::pair<int64_t, std::string>> session() const;

 private:
  class Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace scales
