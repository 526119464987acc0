#pragma once
// ConnectionSink: what every one-request-at-a-time connection transport (HTTP/1.1, plain
// Thrift) does around its protocol: open (TCP connect, TLS handshake) shared by concurrent
// AsyncOpen callers, an idle watch that notices a server closing the connection before it is
// reused, shutdown with a fault, Close() answering the request in flight, and the status. The
// protocol subclass writes requests and reads replies through conn().WithStream().

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/transport/tcp.h"
#include "scales/transport/tls.h"

namespace scales {

// Thread safety: one connection, used on one event loop.
class ConnectionSink : public ClientMessageSink {
 public:
  void Close() final;
  SinkStatus status() const final;

  // Why the last open failed, naming the endpoint and the step ("TLS handshake with
  // 127.0.0.1:4443 failed: certificate verify failed (certificate has expired)"); empty if it
  // did not fail. Pools use it as the failed request's detail.
  std::string open_failure_detail() const override { return open_failure_detail_; }

 protected:
  ConnectionSink(const SinkContext& ctx, Duration connect_timeout, const TlsOptions& tls);
  ~ConnectionSink() override;

  void DoOpen(OpenHandler handler) final;

  // Whether a request is on the connection (written or being answered).
  virtual bool busy() const = 0;
  // Answers the request on the connection with `ec` and `detail` (Close(), failures).
  virtual void Finish(error_code ec, std::string detail) = 0;

  // Checks that a new request may use the connection (open, idle). Otherwise returns the
  // error and detail to fail it with: kConnectionClosed, or the error that closed the
  // connection (kTlsFailed for a TLS alert received while idle).
  std::pair<error_code, std::string> CheckUsable() const;
  // Starts a request: bumps the generation (stale handlers compare it) and ends the idle
  // watch. Returns the new generation.
  uint64_t BeginRequest();
  // Watches the idle connection; a close or unexpected bytes shut it down.
  void WatchIdle();
  // Closes the connection because it is unusable and raises on_faulted. The first reason
  // recorded is what later requests are told.
  void Shutdown(error_code why = {}, std::string detail = {});
  // Accounts the finished write of a request; on error closes the connection, answers the
  // request (kTlsFailed, else kConnectionClosed, naming the endpoint) and returns false.
  bool WriteDone(const boost::system::error_code& ec, size_t bytes);
  // For a read or write error that is a TLS error (an alert such as "certificate required",
  // a bad record; not a plain close), or any error of the first request after the server asked
  // for a client certificate we do not have: kTlsFailed with a detail naming the endpoint,
  // `step` ("reading the reply") and the reason. nullopt for other errors.
  std::optional<std::pair<error_code, std::string>> TlsFailure(const boost::system::error_code& ec,
                                                               std::string_view step) const;

  TcpConnection& conn() noexcept { return conn_; }
  const TcpConnection& conn() const noexcept { return conn_; }
  EventLoop& loop() noexcept { return loop_; }
  uint64_t generation() const noexcept { return generation_; }

 private:
  enum class State { kIdle, kConnecting, kOpen, kClosed };

  void OnConnected(error_code ec);

  EventLoop& loop_;
  TcpConnection conn_;
  State state_ = State::kIdle;
  OpenWaiters open_waiters_;
  uint64_t generation_ = 0;
  uint64_t requests_ = 0;  // started on this connection
  error_code closed_code_;
  std::string closed_detail_;
  std::string open_failure_detail_;
};

}  // namespace scales
