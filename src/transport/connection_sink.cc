#include "scales/transport/connection_sink.h"

#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <fmt/format.h>

#include "scales/core/runtime.h"

namespace scales {

ConnectionSink::ConnectionSink(const SinkContext& ctx, Duration connect_timeout, const TlsOptions& tls)
    : loop_(*ctx.loop), conn_(*ctx.loop, ctx.endpoint.value_or(Endpoint{}), connect_timeout, ctx.stats, tls) {}

ConnectionSink::~ConnectionSink() = default;

void ConnectionSink::DoOpen(OpenHandler handler) {
  switch (state_) {
    case State::kOpen:
      PostOpenCompletion(std::move(handler), loop_.executor(), {});
      return;
    case State::kClosed:
      PostOpenCompletion(std::move(handler), loop_.executor(),
                         closed_code_ ? closed_code_ : make_error_code(Errc::kConnectionClosed));
      return;
    case State::kConnecting:
      open_waiters_.Add(std::move(handler));
      return;
    case State::kIdle: {
      open_waiters_.Add(std::move(handler));
      state_ = State::kConnecting;
      auto self = shared_from_this();
      conn_.AsyncConnect([this, self](error_code ec) { OnConnected(ec); });
      return;
    }
  }
}

void ConnectionSink::OnConnected(error_code ec) {
  if (state_ != State::kConnecting) return;  // closed meanwhile; waiters were answered
  if (ec) {
    state_ = State::kClosed;
    open_failure_detail_ = conn_.failure_detail();
    closed_code_ = ec.category() == error_category() ? ec : make_error_code(Errc::kConnectFailed);
    closed_detail_ = open_failure_detail_;
    conn_.Close();
    open_waiters_.CompleteAll(loop_.executor(), ec);
    return;
  }
  state_ = State::kOpen;
  WatchIdle();
  open_waiters_.CompleteAll(loop_.executor(), {});
}

std::pair<error_code, std::string> ConnectionSink::CheckUsable() const {
  if (state_ == State::kOpen && !busy()) return {};
  if (state_ == State::kClosed && closed_code_) return {closed_code_, closed_detail_};
  return {make_error_code(Errc::kConnectionClosed),
          fmt::format("connection to {} is not usable ({})", conn_.address(),
                      busy() ? "busy with another request" : "not open")};
}

uint64_t ConnectionSink::BeginRequest() {
  ++requests_;
  ++generation_;
  conn_.CancelIdleWatch();
  return generation_;
}

void ConnectionSink::WatchIdle() {
  const uint64_t gen = generation_;
  auto self = shared_from_this();
  conn_.AsyncWatchIdle([this, self, gen](error_code ec) {
    if (ec == boost::asio::error::operation_aborted || generation_ != gen || busy() || state_ != State::kOpen) {
      return;
    }
    // The server closed the connection while idle, or sent bytes nobody asked for (a
    // protocol where the server never speaks first), or a TLS alert. It cannot be reused.
    if (IsTlsError(ec)) {
      Shutdown(make_error_code(Errc::kTlsFailed),
               fmt::format("TLS error on the idle connection to {}: {}", conn_.address(), DescribeTlsError(ec)));
    } else {
      Shutdown();
    }
  });
}

std::optional<std::pair<error_code, std::string>> ConnectionSink::TlsFailure(const boost::system::error_code& ec,
                                                                             std::string_view step) const {
  if (ec == boost::asio::error::operation_aborted) return std::nullopt;
  if (requests_ == 1 && conn_.tls_client_certificate_missing()) {
    // With TLS 1.3 a server that insists on a client certificate says so after the
    // handshake, often by closing the connection before our first request gets through.
    return std::make_pair(make_error_code(Errc::kTlsFailed),
                          fmt::format("TLS connection to {} failed while {}: {}; the server asked for a client "
                                      "certificate and none is configured (tls.cert_file, tls.key_file)",
                                      conn_.address(), step, IsTlsError(ec) ? DescribeTlsError(ec) : ec.message()));
  }
  if (!IsTlsError(ec) || ec == boost::asio::ssl::error::stream_truncated) return std::nullopt;
  return std::make_pair(make_error_code(Errc::kTlsFailed), fmt::format("TLS error from {} while {}: {}",
                                                                       conn_.address(), step, DescribeTlsError(ec)));
}

bool ConnectionSink::WriteDone(const boost::system::error_code& ec, size_t bytes) {
  conn_.bytes_sent().Increment(static_cast<int64_t>(bytes));
  if (!ec) return true;
  auto tls = TlsFailure(ec, "writing the request");
  Shutdown();
  if (tls) {
    Finish(tls->first, std::move(tls->second));
  } else {
    Finish(make_error_code(Errc::kConnectionClosed),
           fmt::format("writing the request to {} failed: {}", conn_.address(), ec.message()));
  }
  return false;
}

void ConnectionSink::Shutdown(error_code why, std::string detail) {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  ++generation_;
  conn_.Close();
  if (why) {
    closed_code_ = why;
    closed_detail_ = detail;
  }
  if (detail.empty()) detail = fmt::format("connection to {} closed", conn_.address());
  on_faulted_.Set({why ? why : make_error_code(Errc::kConnectionClosed), std::move(detail)});
}

void ConnectionSink::Close() {
  if (state_ == State::kConnecting) {
    state_ = State::kClosed;
    conn_.Close();
    open_waiters_.CompleteAll(loop_.executor(), make_error_code(Errc::kClientClosed));
  }
  state_ = State::kClosed;
  ++generation_;
  conn_.Close();
  if (busy()) {
    Finish(make_error_code(Errc::kClientClosed),
           fmt::format("connection to {} closed by the client while the request was in flight", conn_.address()));
  }
}

SinkStatus ConnectionSink::status() const {
  switch (state_) {
    case State::kIdle:
    case State::kConnecting:
      return SinkStatus::kIdle;
    case State::kOpen:
      return SinkStatus::kOpen;
    case State::kClosed:
      return SinkStatus::kClosed;
  }
  return SinkStatus::kClosed;
}

}  // namespace scales
