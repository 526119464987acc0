#pragma once
// TcpConnection: a TCP socket plus the connect step every transport needs: name resolution
// (skipped for IP literals), connect with a timeout on the loop's timer queue, TCP_NODELAY;
// and, when TLS is on, the client handshake (SNI, chain and host-name verification) within the
// same timeout. Transports read and write through WithStream(), which hands them the plain
// socket or the TLS stream.

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/stream.hpp>

#include "scales/core/error.h"
#include "scales/core/timer_queue.h"
#include "scales/discovery/endpoint.h"
#include "scales/stats/stats.h"
#include "scales/transport/tls.h"

namespace scales {

class EventLoop;

// Thread safety: used on one event loop. The owner keeps itself alive (shared_ptr captured
// in `done`) until the connect completes.
class TcpConnection {
 public:
  using TlsStream = boost::asio::ssl::stream<boost::asio::ip::tcp::socket&>;

  TcpConnection(EventLoop& loop, Endpoint endpoint, Duration connect_timeout, const stats::StatsScope& stats);
  // With `tls.enabled`, AsyncConnect also does the TLS client handshake. The SSL context is
  // the shared one (SharedTlsContext); if none can be made, AsyncConnect fails with kTlsFailed and
  // the reason in failure_detail() (clients validate their options first, so this is rare).
  // `may_upgrade`: AsyncStartTls may upgrade it (Mux opportunistic TLS). With TLS possible and
  // tls.resume_sessions on, the connection counts its resumed handshakes in
  // scales_tls_resumptions.
  TcpConnection(EventLoop& loop, Endpoint endpoint, Duration connect_timeout,
                const stats::StatsScope& stats, TlsOptions tls, bool may_upgrade = false);
  ~TcpConnection();
  TcpConnection(const TcpConnection&) = delete;
  TcpConnection& operator=(const TcpConnection&) = delete;

  // Resolves and connects (and with TLS on, handshakes). `done` runs on the loop, never
  // inline, with: success, a kConnectTimeout error (connect and handshake together exceeded
  // connect_timeout), kTlsFailed (handshake failed), or the system error of the
  // resolve/connect (connection refused, host not found, ...); or operation_aborted if Close()
  // was called meanwhile. On failure, failure_detail() says why, naming the endpoint.
  void AsyncConnect(std::function<void(error_code)> done);
  // Upgrades the connected socket to TLS with `tls` (whether or not tls.enabled is set):
  // Mux opportunistic TLS, after Tinit/Rinit. `done` runs on the loop, never inline, with
  // success, kTlsFailed, kConnectTimeout (handshake longer than connect_timeout) or
  // operation_aborted (Close()). Nothing else may read or write meanwhile.
  void AsyncStartTls(const TlsOptions& tls, std::function<void(error_code)> done);
  // Closes the socket; pending operations complete with operation_aborted. Once TLS is active
  // it first sends the TLS close_notify alert, as far as the socket takes it at once: it never
  // waits, neither for the socket nor for the server's own close_notify.
  void Close();

  // Completes `done` once the idle connection becomes unusable: the peer closed it or sent
  // bytes nobody asked for (with TLS: application data or an alert; TLS 1.3 session tickets
  // are consumed and ignored; what OpenSSL already holds, read with the handshake or a reply,
  // counts too). Completes with operation_aborted after CancelIdleWatch() or Close(). At most
  // one watch at a time; cancel it before reading or writing (the watch never has a read in
  // flight, so the request's own reads may start right away).
  void AsyncWatchIdle(std::function<void(error_code)> done);
  void CancelIdleWatch();
  // TLS, with no read or write in progress: whether the stream has anything to read right now
  // (application bytes OpenSSL already holds or the socket has, an alert, or the end of the
  // stream), by a non-blocking read of one byte that consumes it (TLS 1.3 session tickets are
  // consumed and ignored). False when a read would block.
  bool TlsReadableNow();

  // The plain socket: socket options, cancel, close. Read and write through WithStream.
  boost::asio::ip::tcp::socket& socket() noexcept { return socket_; }
  bool tls_active() const noexcept { return tls_active_; }
  // Calls f(tcp::socket&) or, once TLS is active, f(TlsStream&). `f` must accept both (a
  // generic lambda); both branches are instantiated.
  template <class F>
  decltype(auto) WithStream(F&& f) {
    if (tls_active_) return f(*ssl_);
    return f(socket_);
  }
  // Why the last connect or handshake failed, naming the endpoint ("TLS handshake with
  // 127.0.0.1:4443 failed: certificate verify failed (certificate has expired)"); empty
  // after success.
  const std::string& failure_detail() const noexcept { return failure_detail_; }
  // True when TLS is active, the server asked for a client certificate during the handshake
  // and none is configured: a later failure is most likely the server refusing us (TLS 1.3
  // servers reject after the handshake).
  bool tls_client_certificate_missing() const noexcept;
  const Endpoint& endpoint() const noexcept { return endpoint_; }
  const std::string& address() const noexcept { return address_; }
  bool connected() const noexcept { return connected_; }

  stats::Counter& bytes_sent() noexcept { return bytes_sent_; }
  stats::Counter& bytes_received() noexcept { return bytes_received_; }

 private:
  void ConnectTo(const boost::asio::ip::tcp::resolver::results_type& results);
  void OnTcpConnected(error_code ec);
  void StartHandshake();
  // TLS: a non-blocking read of one byte into idle_byte_; false if it would block (`e` says
  // what it got otherwise).
  bool ReadOneNonBlocking(boost::system::error_code& e);
  void OnHandshake(const boost::system::error_code& ec);
  void Finish(error_code ec);
  void SendCloseNotify();
  void DiscardUnread() noexcept;  // before a close: so that it is a FIN, not an RST
  static void OnTimeout(void* self);

  EventLoop& loop_;
  Endpoint endpoint_;
  std::string address_;
  Duration connect_timeout_;
  boost::asio::ip::tcp::socket socket_;
  boost::asio::ip::tcp::resolver resolver_;
  TimerEntry timer_;
  std::function<void(error_code)> done_;
  TimePoint started_{};
  bool timed_out_ = false;
  bool connected_ = false;
  bool resolving_ = false;  // the attempt waits for its name resolution
  bool closed_ = false;     // Close() ran since the attempt started: it must not connect
  uint64_t attempt_ = 0;    // bumps per AsyncConnect; a resolution's late result compares it
  // The resolution's handler may run after this object is gone (a timeout finishes the attempt
  // without waiting for a getaddrinfo that cannot be stopped): it holds this weakly.
  std::shared_ptr<char> alive_ = std::make_shared<char>();
  TlsOptions tls_;
  std::shared_ptr<boost::asio::ssl::context> tls_context_;
  std::unique_ptr<TlsStream> ssl_;
  // Streams of earlier connections: an aborted operation may still refer to one until its
  // handler ran, so they live as long as the connection object (reconnects are rare).
  std::vector<std::unique_ptr<TlsStream>> retired_ssl_;
  // The endpoint and the name checked: the key of the TLS sessions this connection offers and
  // keeps (PrepareTlsResumption).
  std::string session_key_;
  bool tls_active_ = false;
  bool handshaking_ = false;
  bool upgrading_ = false;  // AsyncStartTls: the TCP connection was up before the handshake
  char idle_byte_ = 0;
  uint64_t idle_watch_ = 0;  // bumps per watch and on cancel; a stale wait does nothing
  std::string tls_setup_error_;
  std::string failure_detail_;
  stats::Counter& connects_;
  stats::Counter& connect_errors_;
  stats::Gauge& connections_;
  stats::Histogram& connect_latency_us_;
  stats::Counter& bytes_sent_;
  stats::Counter& bytes_received_;
  stats::Counter* tls_resumptions_ = nullptr;  // registered only where a handshake may resume
};

}  // namespace scales
