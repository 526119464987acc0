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
// Empty lines (CRLF) before a request line are ignored (RFC 9112 2.2), within max_header_bytes.
// Its limits (header and body sizes, connections, timeouts) are AdminServerOptions fields.
//
// Thread safety: the constructor, Stop(), the destructor and the accessors may be called from
// any thread except the server's own.

#include <chrono>
#include <cstddef>
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
  // How long writing a response may take; a client that does not take it in time (stopped
  // reading) has its connection closed. Default 30 s; must be > 0.
  Duration write_timeout = std::chrono::seconds(30);
  // The most a request's header block (request line, fields and the blank line that ends them,
  // with any empty lines before the request line) may take; over it the request is refused with
  // 431 Request Header Fields Too Large (414 URI Too Long when the request line does not end
  // within it) and the connection closed. It also bounds a chunk-size line (413) and a trailer
  // section (431) of a chunked body. Each connection may hold this much of a request unparsed.
  // Default 8 KiB; must be >= kMinHeaderBytes (1 KiB: a request line and the fields a client
  // such as a scraper sends).
  size_t max_header_bytes = 8 * 1024;
  static constexpr size_t kMinHeaderBytes = 1024;
  // The most a request's body may take (GET and HEAD need none); over it the request is refused
  // with 413 Content Too Large and the connection closed. Default 8 KiB; must be > 0.
  size_t max_body_bytes = 8 * 1024;
  // Connections served at once; more are answered 503 Service Unavailable as they are accepted
  // (without reading their request) and closed, so that a flood of connections cannot take the
  // descriptors the process's clients need. At most this many are being answered 503 at once
  // (each lingers up to linger_timeout); beyond that they are closed without an answer.
  // Default 64; must be > 0.
  size_t max_connections = 64;
};

class AdminServer {
 public:
  // Binds, listens and starts serving. Throws scales::Error (kInvalidArgument for a bad
  // address, timeout or limit, naming the option; the system error for bind/listen
  // failures such as address in use), with a message naming the address and port.
  explicit AdminServer(AdminServerOptions options = {});
  // Stop(). In a child made by fork() after the server was started, the server is the
  // parent's: Stop() there does nothing and the destructor leaves it serving the parent.
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
