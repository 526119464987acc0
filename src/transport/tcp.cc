#include "scales/transport/tcp.h"

#include <sys/socket.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <fmt/format.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/duration_text.h"
#include "scales/core/runtime.h"

namespace scales {

namespace asio = boost::asio;
using asio::ip::tcp;

TcpConnection::TcpConnection(EventLoop& loop, Endpoint endpoint, Duration connect_timeout,
                             const stats::StatsScope& stats)
    : loop_(loop),
      endpoint_(std::move(endpoint)),
      address_(endpoint_.ToString()),
      connect_timeout_(connect_timeout),
      socket_(loop.executor()),
      resolver_(loop.executor()),
      connects_(stats.GetCounter("scales_connects")),
      connect_errors_(stats.GetCounter("scales_connect_errors")),
      connections_(stats.GetGauge("scales_connections")),
      connect_latency_us_(stats.GetHistogram("scales_connect_latency_us")),
      bytes_sent_(stats.GetCounter("scales_bytes_sent")),
      bytes_received_(stats.GetCounter("scales_bytes_received")) {}

TcpConnection::TcpConnection(EventLoop& loop, Endpoint endpoint, Duration connect_timeout,
                             const stats::StatsScope& stats, TlsOptions tls, bool may_upgrade)
    : TcpConnection(loop, std::move(endpoint), connect_timeout, stats) {
  tls_ = std::move(tls);
  if (tls_.resume_sessions && (tls_.enabled || may_upgrade)) {
    tls_resumptions_ = &stats.GetCounter("scales_tls_resumptions");
  }
  if (tls_.enabled) {
    try {
      tls_context_ = SharedTlsContext(tls_);
    } catch (const Error& e) {
      tls_setup_error_ = e.what();  // reported by AsyncConnect, on the loop
    }
  }
}

TcpConnection::~TcpConnection() {
  if (connected_) connections_.Add(-1);
}

void TcpConnection::AsyncConnect(std::function<void(error_code)> done) {
  done_ = std::move(done);
  started_ = loop_.Now();
  timed_out_ = false;
  closed_ = false;
  upgrading_ = false;
  tls_active_ = false;
  failure_detail_.clear();
  const uint64_t attempt = ++attempt_;
  if (tls_.enabled && !tls_context_) {
    failure_detail_ = fmt::format("TLS setup for {} failed: {}", address_, tls_setup_error_);
    asio::post(loop_.executor(), [this] { Finish(make_error_code(Errc::kTlsFailed)); });
    return;
  }
  if (connect_timeout_ > Duration::zero()) {
    loop_.timers().Schedule(timer_, DeadlineAfter(started_, connect_timeout_), &OnTimeout, this);
  }
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(endpoint_.host, ec);
  if (!ec) {
    tcp::endpoint ep(addr, endpoint_.port);
    socket_.async_connect(ep, [this](const boost::system::error_code& e) { OnTcpConnected(e); });
    return;
  }
  resolving_ = true;
  resolver_.async_resolve(endpoint_.host, std::to_string(endpoint_.port),
                          [this, attempt, alive = std::weak_ptr<char>(alive_)](
                              const boost::system::error_code& e, tcp::resolver::results_type results) {
                            // A cancel cannot stop a getaddrinfo already running: its results
                            // may come after the timeout finished the attempt (and the owner
                            // may be gone), or after Close(); they are not connected to.
                            if (alive.expired() || attempt != attempt_ || !resolving_) return;
                            resolving_ = false;
                            if (e || timed_out_ || closed_) {
                              OnTcpConnected(e ? e : make_error_code(asio::error::operation_aborted));
                              return;
                            }
                            ConnectTo(results);
                          });
}

void TcpConnection::ConnectTo(const tcp::resolver::results_type& results) {
  asio::async_connect(socket_, results,
                      [this](const boost::system::error_code& e, const tcp::endpoint&) { OnTcpConnected(e); });
}

void TcpConnection::OnTcpConnected(error_code ec) {
  if (ec || timed_out_ || !tls_.enabled) {
    Finish(ec);
    return;
  }
  boost::system::error_code ignored;
  socket_.set_option(tcp::no_delay(true), ignored);  // the handshake is a few small writes too
  StartHandshake();
}

void TcpConnection::AsyncStartTls(const TlsOptions& tls, std::function<void(error_code)> done) {
  done_ = std::move(done);
  started_ = loop_.Now();
  timed_out_ = false;
  upgrading_ = true;
  failure_detail_.clear();
  try {
    if (!tls_context_ || !(tls == tls_)) tls_context_ = SharedTlsContext(tls);
    tls_ = tls;
  } catch (const Error& e) {
    failure_detail_ = fmt::format("TLS setup for {} failed: {}", address_, e.what());
    asio::post(loop_.executor(), [this] { Finish(make_error_code(Errc::kTlsFailed)); });
    return;
  }
  if (connect_timeout_ > Duration::zero()) {
    loop_.timers().Schedule(timer_, DeadlineAfter(started_, connect_timeout_), &OnTimeout, this);
  }
  StartHandshake();
}

void TcpConnection::StartHandshake() {
  if (ssl_) retired_ssl_.push_back(std::move(ssl_));
  ssl_ = std::make_unique<TlsStream>(socket_, *tls_context_);
  SSL* handle = ssl_->native_handle();
  // The name to present (SNI) and to check: server_name, else the endpoint's host. An IP
  // literal is checked against the certificate's IP addresses and sends no SNI (RFC 6066).
  std::string name = tls_.server_name.empty() ? endpoint_.host : tls_.server_name;
  // An absolute name ("svc.example.") is the same host: the SNI has no trailing dot (RFC 6066),
  // and OpenSSL's host check would compare the dot with the certificate's names.
  if (name.size() > 1 && name.back() == '.') name.pop_back();
  boost::system::error_code not_ip;
  asio::ip::make_address(name, not_ip);
  bool checked = true;
  if (not_ip) {
    SSL_set_tlsext_host_name(handle, name.c_str());
    if (tls_.verify_peer) checked = SSL_set1_host(handle, name.c_str()) == 1;
  } else if (tls_.verify_peer) {
    // An IPv6 literal's zone ("fe80::1%eth0", which make_address accepts) is no part of the
    // address a certificate names, and OpenSSL refuses the whole string.
    const std::string address = name.substr(0, name.find('%'));
    checked = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(handle), address.c_str()) == 1;
  }
  if (!checked) {
    // Never handshake without the check: any certificate the CA signed would do.
    failure_detail_ = fmt::format("TLS setup for {} failed: OpenSSL cannot check the certificate against '{}'",
                                  address_, name);
    asio::post(loop_.executor(), [this] { Finish(make_error_code(Errc::kTlsFailed)); });
    return;
  }
  session_key_ = fmt::format("{} {}", address_, name);
  PrepareTlsResumption(handle, &session_key_);
  handshaking_ = true;
  ssl_->async_handshake(asio::ssl::stream_base::client,
                        [this](const boost::system::error_code& e) { OnHandshake(e); });
}

void TcpConnection::OnHandshake(const boost::system::error_code& ec) {
  handshaking_ = false;
  if (timed_out_ || ec == asio::error::operation_aborted) {
    Finish(ec);
    return;
  }
  if (ec) {
    // A connection that ended under the handshake (a FIN or a reset, no alert) failed to open,
    // as one refused would: kConnectFailed, retryable (no request went out). A server that does
    // not speak TLS and hangs up on the ClientHello looks the same (the detail says so). So does
    // a record that failed its integrity check, here or at the server (bytes altered on the
    // way): no TLS set-up causes that. Any other alert or bad record is TLS's verdict,
    // kTlsFailed (a certificate refused, a protocol not spoken, an altered certificate that no
    // longer verifies: in general not told apart from a wrong set-up).
    ForgetTlsSession(tls_context_->native_handle(), session_key_);  // if one was offered, not again
    const bool corrupted = IsTlsRecordCorrupted(ec);
    failure_detail_ = fmt::format("TLS handshake with {} failed: {}{}", address_,
                                  DescribeTlsError(ec, ssl_->native_handle()),
                                  corrupted ? " (were bytes altered on the way?)" : "");
    Finish(make_error_code(IsTlsConnectionEnd(ec) || corrupted ? Errc::kConnectFailed
                                                               : Errc::kTlsFailed));
    return;
  }
  tls_active_ = true;
  if (tls_resumptions_ != nullptr && SSL_session_reused(ssl_->native_handle()) == 1) {
    tls_resumptions_->Increment();
  }
  Finish({});
}

void TcpConnection::OnTimeout(void* self) {
  auto* c = static_cast<TcpConnection*>(self);
  c->timed_out_ = true;
  const std::string limit = DurationText(c->connect_timeout_);
  c->failure_detail_ = c->handshaking_
                           ? fmt::format("TLS handshake with {} did not finish within connect_timeout ({})",
                                         c->address_, limit)
                           : fmt::format("connect to {} did not finish within connect_timeout ({})",
                                         c->address_, limit);
  c->resolver_.cancel();
  if (c->resolving_) {
    // Finished now, not when getaddrinfo returns (a DNS server that does not answer holds it
    // for seconds per try): its late result is ignored (see AsyncConnect).
    c->resolving_ = false;
    c->failure_detail_ = fmt::format("resolving {} did not finish within connect_timeout ({})", c->address_, limit);
    c->Finish(make_error_code(Errc::kConnectTimeout));
    return;
  }
  boost::system::error_code ignored;
  c->socket_.close(ignored);
}

void TcpConnection::Finish(error_code ec) {
  timer_.Cancel();
  if (!done_) return;
  if (timed_out_) ec = make_error_code(Errc::kConnectTimeout);
  // Closed meanwhile: a connect or handshake that completed (or failed: a TLS setup failure is
  // reported on a later turn) before the close was seen is an attempt cut short, not a
  // connection nor a connect error (the socket is closed).
  if (closed_) ec = make_error_code(asio::error::operation_aborted);
  if (ec && failure_detail_.empty()) {
    failure_detail_ = fmt::format("connect to {} failed: {}", address_, ec.message());
  }
  if (upgrading_) {
    // The connection was counted when its TCP connect finished.
  } else if (!ec) {
    boost::system::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    connected_ = true;
    connects_.Increment();
    connections_.Add(1);
    connect_latency_us_.Record(
        std::chrono::duration_cast<std::chrono::microseconds>(loop_.Now() - started_).count());
  } else if (ec != boost::asio::error::operation_aborted) {
    connect_errors_.Increment();  // not counted: connects cut short by Close()
  }
  if (!ec) failure_detail_.clear();
  auto done = std::move(done_);
  done_ = nullptr;
  done(ec);
}

void TcpConnection::AsyncWatchIdle(std::function<void(error_code)> done) {
  // A wait, not a read: a wait that lost the race with CancelIdleWatch is harmless, while a TLS
  // read still running when the request's own read starts would be two reads on one stream.
  const uint64_t id = ++idle_watch_;
  SSL* handle = tls_active_ && ssl_ ? ssl_->native_handle() : nullptr;
  if (handle != nullptr && (SSL_has_pending(handle) == 1 || BIO_ctrl_pending(SSL_get_rbio(handle)) > 0)) {
    // Records read from the socket with the handshake's last flight (or a reply's) are held by
    // OpenSSL, where a wait on the socket never sees them.
    boost::system::error_code e;
    if (ReadOneNonBlocking(e)) {
      asio::post(loop_.executor(), [this, id, e, done = std::move(done)] {
        done(id != idle_watch_ ? make_error_code(asio::error::operation_aborted)
                               : e ? e : make_error_code(Errc::kProtocolError));
      });
      return;
    }
  }
  socket_.async_wait(tcp::socket::wait_read, [this, id, done = std::move(done)](
                                                 const boost::system::error_code& ec) mutable {
    if (ec || id != idle_watch_) {
      done(ec ? ec : make_error_code(asio::error::operation_aborted));
      return;
    }
    if (!tls_active_) {
      done(make_error_code(Errc::kConnectionClosed));  // closed, or bytes nobody asked for
      return;
    }
    // With TLS, readable is not yet unusable: TLS 1.3 servers send session tickets after the
    // handshake. Let OpenSSL read what is there, without blocking; it consumes tickets.
    boost::system::error_code e;
    if (!ReadOneNonBlocking(e)) {
      AsyncWatchIdle(std::move(done));
      return;
    }
    done(e ? e : make_error_code(Errc::kProtocolError));  // an alert, a close, or stray data
  });
}

bool TcpConnection::ReadOneNonBlocking(boost::system::error_code& e) {
  socket_.non_blocking(true, e);
  ssl_->read_some(asio::buffer(&idle_byte_, 1), e);
  boost::system::error_code ignored;
  socket_.non_blocking(false, ignored);
  return e != asio::error::would_block;
}

bool TcpConnection::TlsReadableNow() {
  boost::system::error_code e;
  return tls_active_ && ssl_ && ReadOneNonBlocking(e);
}

bool TcpConnection::tls_client_certificate_missing() const noexcept {
  return tls_active_ && ssl_ && TlsClientCertificateMissing(ssl_->native_handle());
}

void TcpConnection::CancelIdleWatch() {
  ++idle_watch_;
  boost::system::error_code ignored;
  socket_.cancel(ignored);
}

// Best effort and never blocking. With the socket in non-blocking mode Asio's synchronous
// shutdown writes the alert if the socket buffer takes it (it always has room for ~30 bytes
// unless the server stopped reading), then its wait for the server's close_notify ends at once
// with would_block; either failure is ignored, the connection is going anyway. Without the
// alert, servers see a truncated stream (Apache Thrift logs "SSL_read: unexpected eof"). A
// close in the middle of an async write may put the alert after part of a record: the server
// then reports a bad record instead of a truncation, which is no worse for a connection cut
// mid-request.
void TcpConnection::SendCloseNotify() {
  boost::system::error_code ec;
  socket_.non_blocking(true, ec);
  if (ec) return;
  ssl_->shutdown(ec);
}

// Linux answers a close() of a socket with unread bytes with an RST (RFC 2525 2.17), and an
// RST discards what the kernel still holds of the last writes (a Mux session's Rdrain or
// Tdiscarded, the end of a large request): the peer reads ECONNRESET instead. Reading the
// bytes already received away first makes the close a FIN behind everything written (bytes the
// peer sends after the close still reset it). Bounded, so a peer that floods the connection
// is not read for long: after kMax bytes the close resets as before.
void TcpConnection::DiscardUnread() noexcept {
  constexpr size_t kMax = 1u << 20;
  char buf[16384];
  for (size_t total = 0; total < kMax;) {
    const ssize_t n = ::recv(socket_.native_handle(), buf, sizeof buf, MSG_DONTWAIT);
    if (n <= 0) return;  // none left (EAGAIN), the peer's end of stream, or an error
    total += static_cast<size_t>(n);
  }
}

void TcpConnection::Close() {
  closed_ = true;
  timer_.Cancel();
  resolver_.cancel();
  boost::system::error_code ignored;
  if (socket_.is_open()) {
    if (tls_active_ && ssl_) SendCloseNotify();
    DiscardUnread();
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }
  if (connected_) {
    connected_ = false;
    connections_.Add(-1);
  }
}

}  // namespace scales
