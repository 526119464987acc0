#pragma once
// AdminServer: an optional HTTP/1.1 server (Boost.Beast) a program starts to expose what its
// scales clients are doing, as Finagle's TwitterServer and brpc's builtin services do:
//
//   GET /metrics              the stats registry in the Prometheus text format 0.0.4
//   GET /admin/metrics.json   the same registry as Finagle-style flat JSON
//   GET /admin/clients        every live client: name, URI, effective options, its sink stack
//                             in order (role and name), and, per event loop, the sinks it
//                             passes through down to the load balancer and the balancer's
//                             members with their state and load (JSON; see ClientsJson)
//   GET /                     a plain-text index of these paths
//
//   scales::admin::AdminServer admin({.port = 9990});   // 0 = any free port; see port()
//
// It binds 127.0.0.1 by default: the endpoints reveal the service topology, so expose them on
// another address only on purpose. It runs on a thread of its own, never on the clients' event
// loops; /admin/clients asks every client's loops for their state at once and waits for the
// answers (up to AdminServerOptions::clients_timeout in all), so a stuck loop delays the admin
// server (all its connections: it answers them from one thread) by that much, and the clients
// not at all.
// GET and HEAD only; other methods get 405, other paths 404. Connections are kept alive as
// HTTP/1.1 allows; an idle connection is closed after AdminServerOptions::idle_timeout (30 s).
//
// Thread safety: the constructor, Stop(), the destructor and the accessors may be called from
// any thread except the server's own.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "scales/core/clock.h"
#include "scales/stats/stats.h"

namespace scales::admin {

struct AdminServerOptions {
  // Address to listen on (IPv4 or IPv6 literal). Default "127.0.0.1": loopback only.
  std::string address = "127.0.0.1";
  // TCP port. Default 0: the kernel picks a free port (read it back with port()).
  uint16_t port = 0;
  // Registry served by /metrics and /admin/metrics.json. Default: StatsRegistry::Default(),
  // where clients report unless ClientOptions::stats names another one. Must outlive the server.
  stats::StatsRegistry* stats = nullptr;
  // How long /admin/clients waits for a client's event loops to report. Default 2 s; a loop
  // that does not answer in time is reported as such instead of its members.
  Duration clients_timeout = std::chrono::seconds(2);
  // How long a connection may wait for its next request, all of it (from the connection's
  // opening or the previous answer). Then an idle connection is closed, and a request partly
  // received is answered 408 Request Timeout (a slow sender holds a connection no longer).
  // Default 30 s; must be > 0.
  Duration idle_timeout = std::chrono::seconds(30);
  // After the last answer on a connection (a refused request, or one without keep-alive) the
  // server stops sending and reads on, dropping what comes, until the client closes its end or
  // for this long, so that the client reads the answer before the connection is closed: closing
  // with unread bytes resets it, which may discard the answer. Default 2 s; must be >= 0 (0
  // closes at once, at that risk).
  Duration linger_timeout = std::chrono::seconds(2);
};

class AdminServer {
 public:
  // Binds, listens and starts serving. Throws scales::Error (kInvalidArgument for a bad
  // address or timeout, naming the option; the system error for bind/listen
  // failures such as address in use), with a message naming the address and port.
  explicit AdminServer(AdminServerOptions options = {});
  // Stop().
  ~AdminServer();
  AdminServer(const AdminServer&) = delete;
  AdminServer& operator=(const AdminServer&) = delete;

  // Stops accepting, closes every connection and joins the server thread. Idempotent.
  void Stop();

  // The port the server listens on (the kernel's choice when options.port was 0).
  uint16_t port() const noexcept;
  // "http://127.0.0.1:PORT".
  std::string url() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// The bodies of the endpoints, for programs that serve them from their own HTTP server.
// ClientsJson asks every loop of every client at once and blocks up to `timeout` in all for the
// answers. Called on one of the clients' event loops, it inspects that loop's shards in place
// (waiting for them would deadlock), but it blocks that loop while it waits for the others.
std::string ClientsJson(Duration timeout = std::chrono::seconds(2));

}  // namespace scales::admin
