#pragma once
// ConnectionSink: what every one-request-at-a-time connection transport (HTTP/1.1, plain
// Thrift) does around its protocol: open (TCP connect, TLS handshake) shared by concurrent
// AsyncOpen callers, the exchange of one request's bytes for one reply's bytes, an idle watch
// that notices a server closing the connection before it is reused, shutdown with a fault,
// Close() answering the request in flight, and the status. The protocol subclass serialises the
// request, calls Exchange(), and parses the reply from the bytes ParseReply() is given.
//
// The exchange costs as few system calls and event-loop hops as the socket allows. On a plain
// TCP connection the request is written at once with a non-blocking `send` (an async write
// takes over only when the socket buffer is full), and one receive stays armed for the
// connection's whole life: while idle its completion means the server closed the connection or
// sent bytes nobody asked for; while a request is out it brings the reply (a reply that fills the
// read buffer is read on with non-blocking `recv`s until it is complete or the socket is
// drained). Asio queues a receive after a read that drained the socket without any system call
// (a readiness wait would re-register the descriptor with `epoll_ctl` each time), so one request
// costs a `send`, a `recv` and a share of the loop's `epoll_wait`, and one handler. With TLS the stream's
// async operations do the same work (OpenSSL buffers records, so readiness of the socket says
// little): the reply's read starts beside the request's write, and the idle watch is cancelled
// and re-armed around each request. Either way a reply that comes before the request is
// written (a server refusing a large upload and no longer reading) answers the call at once and
// retires the connection; on plain TCP also when the server then closes the connection and the
// write fails with a reset.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <boost/beast/core/flat_buffer.hpp>

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
  // Answers the request on the connection with `ec` and `detail` (Close(), failures, and the
  // outcome of a parsed reply).
  virtual void Finish(error_code ec, std::string detail) = 0;

  // What ParseReply made of the bytes read so far.
  struct ParseResult {
    enum class Kind { kNeedMore, kDone, kFailed };
    Kind kind = Kind::kNeedMore;
    // kDone: the call's outcome (usually success; kHttpError for an HTTP error status with
    // raise_on_http_error). kFailed: why the reply is unusable; the connection is closed.
    error_code ec;
    std::string detail;
    // kDone: false when the reply ends the connection's life (HTTP without keep-alive).
    bool reusable = true;

    static ParseResult NeedMore() { return {}; }
    static ParseResult Done(bool reusable = true) { return {Kind::kDone, {}, {}, reusable}; }
    static ParseResult Failed(error_code ec, std::string detail) {
      return {Kind::kFailed, ec, std::move(detail), false};
    }
  };
  // Parses the reply from `in`: the bytes received since the request was sent, minus what
  // earlier calls consumed. Consumes the bytes it used. Called after every read while a request
  // waits for its reply. Must not call Finish(): the sink does, after it decided the
  // connection's fate (bytes left over after a complete reply close it).
  virtual ParseResult ParseReply(boost::beast::flat_buffer& in) = 0;
  // The server closed the connection while a reply was expected (after `bytes` bytes of it).
  // A protocol whose reply may end at end of stream (HTTP without Content-Length) completes it
  // here. The default fails with kConnectionClosed.
  virtual ParseResult ParseEof(size_t bytes);
  // "reply" or "response": how error messages name what was being read.
  virtual std::string_view reply_noun() const { return "reply"; }
  // "request" (or "request for echo"): how error messages name the request being written.
  virtual std::string_view request_noun() const { return "request"; }
  // Whether a server can only act on a request it received whole (a Thrift frame or message),
  // so that a request cut mid-write by a failed write is as unsent as one not started (kNotSent,
  // which the retry sink may send again). HTTP: no (a server may answer the header section, or
  // act on part of a body, before the rest came).
  virtual bool needs_whole_request() const { return false; }

  // Checks that a new request may use the connection (open, idle). Otherwise returns the
  // error and detail to fail it with: the error that closed the connection (a connect
  // failure, or kTlsFailed for a TLS alert received while idle), kNotSent for a connection
  // closed otherwise (by the server, or retired by its pool) or busy with another request.
  // `method`: the new request's method, for a protocol whose messages name it ("the request
  // for echo", as request_noun() does for the request on the connection, which may be another
  // one here).
  std::pair<error_code, std::string> CheckUsable(std::string_view method = {}) const;
  // Starts a request: bumps the generation (stale handlers compare it) and ends the idle
  // watch. Returns the new generation.
  uint64_t BeginRequest();
  // Sends `request` (owned by the subclass and left unchanged until the call is answered),
  // then reads the reply through ParseReply and answers the call with Finish(). Without
  // `expect_reply` (a oneway request) the call is answered with success once the bytes are
  // written. Call after BeginRequest(); may answer the call before it returns.
  void Exchange(std::string_view request, bool expect_reply);
  // Whether the current request's bytes are still being written (for cancellation messages).
  bool writing() const noexcept { return writing_; }
  // Frees `request` (the buffer given to Exchange) if a large request grew it and no write
  // still uses it, so an idle connection does not keep it. Call from Finish().
  void TrimRequestBuffer(std::string& request) const;
  // Closes the connection because it is unusable and raises on_faulted. The first reason
  // recorded is what later requests are told.
  void Shutdown(error_code why = {}, std::string detail = {});
  // Accounts the finished write of a request; on error closes the connection, answers the
  // request (kTlsFailed; kNotSent if not a byte of it was written, or not all of it with
  // needs_whole_request(); else kConnectionClosed;
  // naming the endpoint) and returns false. On plain TCP with a reply expected, a reply the
  // server sent before the write failed (read from the socket next) answers the request
  // instead; the failure does if none comes.
  bool WriteDone(const boost::system::error_code& ec, size_t bytes);
  // With needs_whole_request(): the outcome (kNotSent) of a connection that the server ended
  // (`how`: "closed by the server", ...) while the request was still being written and before
  // any of the reply came; std::nullopt otherwise.
  std::optional<ParseResult> CutByTheServer(std::string_view how) const;
  // For a read or write error that is a TLS error (an alert such as "certificate required";
  // not a plain close, nor a record OpenSSL rejected: IsTlsRecordFailure), or any error of the
  // first request after the server asked for a client certificate we do not have: kTlsFailed
  // with a detail naming the endpoint, `step` ("reading the reply") and the reason. nullopt for
  // other errors.
  std::optional<std::pair<error_code, std::string>> TlsFailure(const boost::system::error_code& ec,
                                                               std::string_view step) const;

  TcpConnection& conn() noexcept { return conn_; }
  const TcpConnection& conn() const noexcept { return conn_; }
  EventLoop& loop() noexcept { return loop_; }
  uint64_t generation() const noexcept { return generation_; }

 private:
  enum class State { kIdle, kConnecting, kOpen, kClosed };

  void OnConnected(error_code ec);
  void WatchIdle();
  void ArmReadable();
  void OnReadable(const boost::system::error_code& ec, size_t n);
  void ReadPlain();
  void ReadTls();
  void OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes);
  void AfterWrite();
  // Accounts `n` bytes just read into in_.prepare(read_chunk_), then ProcessReply.
  bool Received(size_t n, bool drained);
  // Hands the new bytes to ParseReply; answers the call when the reply is complete or bad.
  // Returns true while more bytes are needed. `drained`: the last read left the socket empty.
  bool ProcessReply(bool drained);
  void ReadFailed(const boost::system::error_code& ec);
  void Answer(ParseResult r);

  EventLoop& loop_;
  TcpConnection conn_;
  State state_ = State::kIdle;
  OpenWaiters open_waiters_;
  uint64_t generation_ = 0;
  uint64_t requests_ = 0;  // started on this connection
  boost::beast::flat_buffer in_;
  size_t read_chunk_ = 4096;  // grows (to 64 KiB) after reads that fill it
  size_t reply_bytes_ = 0;    // received for the current request
  size_t request_written_ = 0;  // bytes of the current request written so far
  size_t request_size_ = 0;     // bytes of the current request
  bool expect_reply_ = false;
  bool writing_ = false;
  bool readable_armed_ = false;   // plain TCP: a receive into in_.prepare(read_chunk_) is pending
  bool unexpected_bytes_ = false;  // the server spoke during a oneway request
  // Plain TCP: the request's write failed while the receive was armed for its reply (WriteDone).
  // The call's outcome if no reply comes.
  std::optional<std::pair<error_code, std::string>> write_failure_;
  error_code closed_code_;
  std::string closed_detail_;
  std::string open_failure_detail_;
};

}  // namespace scales
