#include "scales/transport/connection_sink.h"

#include <new>
#include <stdexcept>

#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include "scales/core/clock.h"
#include "scales/core/runtime.h"

namespace scales {

namespace asio = boost::asio;

namespace {
constexpr size_t kInitialReadChunk = 4096;
constexpr size_t kMaxReadChunk = 64 * 1024;
constexpr size_t kMaxIdleBuffer = 16 * 1024;
}  // namespace

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
  if (!conn_.tls_active()) {
    // Requests are written and replies read with non-blocking calls made on the loop
    // (Exchange); the socket's async operations are unaffected.
    boost::system::error_code ignored;
    conn_.socket().non_blocking(true, ignored);
  }
  WatchIdle();
  open_waiters_.CompleteAll(loop_.executor(), {});
}

std::pair<error_code, std::string> ConnectionSink::CheckUsable(std::string_view method) const {
  if (state_ == State::kOpen && !busy()) return {};
  if (busy()) {
    // Nothing of this request was written: as safe to retry as a closed connection's.
    return {make_error_code(Errc::kNotSent),
            fmt::format("connection to {} is not usable{}{} (busy with another request)", conn_.address(),
                        method.empty() ? "" : " for the request for ", method)};
  }
  // A failed connect or TLS handshake keeps its code. A connection the server closed (or that
  // failed) before this request came is kNotSent: nothing was written, so a retry is safe.
  if (state_ == State::kClosed && closed_code_) return {closed_code_, closed_detail_};
  return {make_error_code(Errc::kNotSent),
          fmt::format("connection to {} was {} before the request{}{} was sent", conn_.address(),
                      state_ == State::kClosed ? "closed" : "not open", method.empty() ? "" : " for ", method)};
}

uint64_t ConnectionSink::BeginRequest() {
  ++requests_;
  ++generation_;
  reply_bytes_ = 0;
  writing_ = false;
  unexpected_bytes_ = false;
  write_failure_.reset();
  // A plain connection's receive stays armed: it reads the reply.
  if (conn_.tls_active()) conn_.CancelIdleWatch();
  return generation_;
}

void ConnectionSink::WatchIdle() {
  if (!conn_.tls_active()) {
    ArmReadable();
    return;
  }
  const uint64_t gen = generation_;
  auto self = shared_from_this();
  conn_.AsyncWatchIdle([this, self, gen](error_code ec) {
    if (ec == boost::asio::error::operation_aborted || generation_ != gen || busy() || state_ != State::kOpen) {
      return;
    }
    // The server closed the connection while idle, or sent bytes nobody asked for (a
    // protocol where the server never speaks first), or a TLS alert. It cannot be reused. A
    // close without close_notify (a TCP FIN after the session, as many servers end an idle
    // keep-alive connection) is a close, not a TLS failure, as when a reply is read (TlsFailure).
    if (IsTlsError(ec) && ec != boost::asio::ssl::error::stream_truncated &&
        !IsTlsRecordFailure(ec)) {
      Shutdown(make_error_code(Errc::kTlsFailed),
               fmt::format("TLS error on the idle connection to {}: {}", conn_.address(), DescribeTlsError(ec)));
    } else {
      Shutdown();
    }
  });
}

void ConnectionSink::ArmReadable() {
  if (readable_armed_ || state_ != State::kOpen) return;
  readable_armed_ = true;
  // A receive, not a readiness wait: Asio queues it without a system call when the last read
  // drained the socket (a wait would re-register the descriptor with epoll_ctl every time), and
  // reads the reply itself when epoll reports it. in_ is not touched while it is pending: only
  // its completion (and what runs from it) reads, parses or consumes.
  conn_.socket().async_receive(in_.prepare(read_chunk_),
                               [this, self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                                 readable_armed_ = false;
                                 OnReadable(ec, n);
                               });
}

void ConnectionSink::OnReadable(const boost::system::error_code& ec, size_t n) {
  if (state_ != State::kOpen) return;  // closed meanwhile (the receive was aborted)
  ClockTurn turn;  // one clock reading for the reply's completion and the request it starts
  if (ec == asio::error::operation_aborted) {
    ArmReadable();  // a cancel() of the socket by someone else; keep watching
    return;
  }
  if (!busy()) {
    // The server closed the idle connection, or sent bytes nobody asked for (the server never
    // speaks first in these protocols). It cannot be reused.
    Shutdown();
    return;
  }
  if (!expect_reply_) {
    // A oneway request is being written and the server speaks: answered when the write ends,
    // then the connection is closed.
    unexpected_bytes_ = true;
    return;
  }
  if (ec) {
    ReadFailed(ec);
    return;
  }
  const bool filled = n == read_chunk_;
  if (!Received(n, /*drained=*/!filled)) return;
  if (filled) {
    ReadPlain();  // more may be waiting
  } else {
    ArmReadable();
  }
}

void ConnectionSink::Exchange(std::string_view request, bool expect_reply) {
  expect_reply_ = expect_reply;
  writing_ = true;
  request_written_ = 0;
  request_size_ = request.size();
  const uint64_t gen = generation_;
  size_t written = 0;
  if (!conn_.tls_active()) {
    // Most requests fit the socket buffer: write now, with no handler to wait for.
    boost::system::error_code ec;
    written = conn_.socket().write_some(asio::buffer(request), ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      written = 0;
    } else if (ec) {
      OnWritten(gen, ec, 0);
      return;
    }
    if (written == request.size()) {
      OnWritten(gen, {}, written);
      return;
    }
    conn_.bytes_sent().Increment(static_cast<int64_t>(written));
    request_written_ = written;
  }
  auto self = shared_from_this();
  conn_.WithStream([&](auto& stream) {
    asio::async_write(stream, asio::buffer(request.substr(written)),
                      [this, self, gen](const boost::system::error_code& ec, size_t n) { OnWritten(gen, ec, n); });
  });
  // With TLS the reply is read while the request is written (an SSL stream allows one read
  // beside one write), as the armed receive does on plain TCP: a server that answers before it
  // has read the whole request (413 to a large upload) and stops reading is heard at once
  // instead of leaving the write stuck until the call's deadline.
  if (conn_.tls_active() && expect_reply) ReadTls();
}

void ConnectionSink::OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != generation_ || !busy()) return;  // answered meanwhile
  writing_ = false;
  if (!WriteDone(ec, bytes)) return;
  AfterWrite();
}

void ConnectionSink::AfterWrite() {
  if (!expect_reply_) {
    if (unexpected_bytes_) {
      Shutdown();
    } else {
      WatchIdle();
    }
    Finish({}, {});
    return;
  }
  // The reply's read started with the write (the receive armed on plain TCP, ReadTls with TLS);
  // it may even be read already.
}

void ConnectionSink::ReadPlain() {
  for (;;) {
    auto space = in_.prepare(read_chunk_);
    boost::system::error_code ec;
    const size_t n = conn_.socket().read_some(space, ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      ArmReadable();
      return;
    }
    if (ec) {
      ReadFailed(ec);
      return;
    }
    const bool filled = n == space.size();
    if (!Received(n, /*drained=*/!filled)) return;
    if (!filled) {
      ArmReadable();
      return;
    }
  }
}

void ConnectionSink::ReadTls() {
  auto space = in_.prepare(read_chunk_);
  auto self = shared_from_this();
  const uint64_t gen = generation_;
  conn_.WithStream([&](auto& stream) {
    stream.async_read_some(space, [this, self, gen](const boost::system::error_code& ec, size_t n) {
      if (gen != generation_ || !busy()) return;
      ClockTurn turn;
      if (ec) {
        ReadFailed(ec);
        return;
      }
      if (Received(n, /*drained=*/true)) ReadTls();
    });
  });
}

bool ConnectionSink::Received(size_t n, bool drained) {
  in_.commit(n);
  reply_bytes_ += n;
  conn_.bytes_received().Increment(static_cast<int64_t>(n));
  if (n == read_chunk_ && read_chunk_ < kMaxReadChunk) read_chunk_ *= 2;
  return ProcessReply(drained);
}

bool ConnectionSink::ProcessReply(bool drained) {
  ParseResult r;
  try {
    r = ParseReply(in_);
  } catch (const std::exception& e) {
    // Holding what the reply declares failed (std::bad_alloc, std::length_error under a huge
    // configured limit) or the parser threw: the call must still complete, and the connection's
    // framing is lost.
    const bool memory = dynamic_cast<const std::bad_alloc*>(&e) != nullptr ||
                        dynamic_cast<const std::length_error*>(&e) != nullptr;
    r = ParseResult::Failed(make_error_code(memory ? Errc::kResponseTooLarge : Errc::kProtocolError),
                            fmt::format("reading the {} from {} failed: {}", reply_noun(), conn_.address(),
                                        e.what()));
  }
  if (r.kind == ParseResult::Kind::kNeedMore) return true;
  if (r.kind == ParseResult::Kind::kDone && r.reusable && in_.size() == 0 && !writing_ && !drained) {
    // The last read filled the buffer: anything still in the socket was not asked for.
    char byte;
    boost::system::error_code ec;
    conn_.socket().receive(asio::buffer(&byte, 1), asio::socket_base::message_peek, ec);
    // Bytes (no error), end of stream or a reset: anything but "nothing there" retires it.
    if (ec != asio::error::would_block && ec != asio::error::try_again) r.reusable = false;
  } else if (r.kind == ParseResult::Kind::kDone && r.reusable && in_.size() == 0 && !writing_ &&
             conn_.tls_active() && conn_.TlsReadableNow()) {
    // TLS: bytes after the reply in a record of their own, read from the socket with the
    // reply's, are held by OpenSSL, where the idle watch (a wait on the socket) never sees
    // them: the next request would read them as its reply. Anything readable retires it.
    r.reusable = false;
  }
  Answer(std::move(r));
  return false;
}

void ConnectionSink::Answer(ParseResult r) {
  if (write_failure_) {
    // The request's write failed (WriteDone): a reply is the call's outcome, but without one
    // the failed write is; the connection is done either way.
    if (r.kind == ParseResult::Kind::kFailed && reply_bytes_ == 0) {
      r.ec = write_failure_->first;
      r.detail = std::move(write_failure_->second);
    }
    r.reusable = false;
    write_failure_.reset();
  }
  const bool leftover = in_.size() > 0;
  in_.consume(in_.size());  // the next request starts from an empty buffer
  if (in_.capacity() > kMaxIdleBuffer) {
    // A large reply grew the buffer: an idle connection keeps no more than a small one.
    in_.shrink_to_fit();
    read_chunk_ = kInitialReadChunk;
  }
  if (r.kind == ParseResult::Kind::kFailed || !r.reusable || leftover || writing_) {
    // A bad reply, the end of the connection's life, bytes after the reply that nobody asked
    // for (the framing is lost), or a reply that came before the request was written (the
    // rest of the request would reach the next call's reply): not reusable.
    Shutdown();
  } else {
    WatchIdle();
  }
  Finish(r.ec, std::move(r.detail));
}

void ConnectionSink::TrimRequestBuffer(std::string& request) const {
  if (!writing_ && request.capacity() > kMaxIdleBuffer) std::string().swap(request);
}

ConnectionSink::ParseResult ConnectionSink::ParseEof(size_t bytes) {
  return ParseResult::Failed(make_error_code(Errc::kConnectionClosed),
                             fmt::format("connection to {} closed by the server while reading the {} (after {} "
                                         "bytes): end of stream",
                                         conn_.address(), reply_noun(), bytes));
}

std::optional<ConnectionSink::ParseResult> ConnectionSink::CutByTheServer(std::string_view how) const {
  if (!writing_ || reply_bytes_ != 0 || !needs_whole_request()) return std::nullopt;
  return ParseResult::Failed(make_error_code(Errc::kNotSent),
                             fmt::format("connection to {} {} while the {} ({} bytes) was still being written: "
                                         "the server cannot have received it whole, so it was not sent",
                                         conn_.address(), how, request_noun(), request_size_));
}

void ConnectionSink::ReadFailed(const boost::system::error_code& ec) {
  if (ec == asio::error::eof) {
    std::optional<ParseResult> cut = CutByTheServer("closed by the server");
    ParseResult r = cut ? std::move(*cut) : ParseEof(reply_bytes_);
    if (r.kind == ParseResult::Kind::kNeedMore) {
      r = ConnectionSink::ParseEof(reply_bytes_);
    }
    r.reusable = false;  // the server closed it
    Answer(std::move(r));
    return;
  }
  auto tls = TlsFailure(ec, fmt::format("reading the {}", reply_noun()));
  Shutdown();
  if (tls) {
    Finish(tls->first, std::move(tls->second));
    return;
  }
  if (auto cut = CutByTheServer(fmt::format("failed ({})", ec.message()))) {
    Finish(cut->ec, std::move(cut->detail));
    return;
  }
  if (IsTlsRecordFailure(ec)) {
    // The bytes that came do not make a valid TLS record (most likely altered on the way): the
    // connection is unusable, as if the server had closed it; another one may well work.
    Finish(make_error_code(Errc::kConnectionClosed),
           fmt::format(
               "TLS connection to {} broke while reading the {} (after {} bytes): {} (were bytes "
               "altered on the way?)",
               conn_.address(), reply_noun(), reply_bytes_, DescribeTlsError(ec)));
    return;
  }
  if (write_failure_ && reply_bytes_ == 0) {
    // No reply came after the request's write failed (WriteDone): the call fails as the write.
    auto failure = std::move(*write_failure_);
    write_failure_.reset();
    Finish(failure.first, std::move(failure.second));
    return;
  }
  Finish(make_error_code(Errc::kConnectionClosed),
         fmt::format("connection to {} closed by the server while reading the {} (after {} bytes): {}",
                     conn_.address(), reply_noun(), reply_bytes_, ec.message()));
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
  // A record OpenSSL rejected broke this connection, not the endpoint's TLS: the caller's
  // classification of a broken connection applies (ReadFailed names the TLS reason).
  if (!IsTlsError(ec) || ec == boost::asio::ssl::error::stream_truncated || IsTlsRecordFailure(ec))
    return std::nullopt;
  return std::make_pair(make_error_code(Errc::kTlsFailed), fmt::format("TLS error from {} while {}: {}",
                                                                       conn_.address(), step, DescribeTlsError(ec)));
}

bool ConnectionSink::WriteDone(const boost::system::error_code& ec, size_t bytes) {
  conn_.bytes_sent().Increment(static_cast<int64_t>(bytes));
  request_written_ += bytes;
  if (!ec) return true;
  auto tls = TlsFailure(ec, fmt::format("writing the {}", request_noun()));
  std::pair<error_code, std::string> failure;
  if (tls) {
    failure = std::move(*tls);
  } else if (request_written_ == 0) {
    // Not a byte left: the server never saw the request (typically EPIPE or ECONNRESET from a
    // server that closed the connection before the request came).
    failure = {make_error_code(Errc::kNotSent),
               fmt::format("writing the {} to {} failed before any byte was sent: {}", request_noun(),
                           conn_.address(), ec.message())};
  } else if (needs_whole_request()) {
    // Cut mid-write: the server cannot have acted on it.
    failure = {make_error_code(Errc::kNotSent),
               fmt::format("writing the {} to {} failed after {} of its {} bytes: {}; the server cannot have "
                           "received it whole, so it was not sent",
                           request_noun(), conn_.address(), request_written_, request_size_, ec.message())};
  } else {
    failure = {make_error_code(Errc::kConnectionClosed),
               fmt::format("writing the {} to {} failed after {} of its {} bytes: {}", request_noun(),
                           conn_.address(), request_written_, request_size_, ec.message())};
  }
  if (!tls && expect_reply_ && readable_armed_) {
    // A server that answers before it has read the request and then closes the connection (a
    // 413 to a large upload) resets it: the write fails, but the reply it sent first is still
    // in the socket, and the armed receive may even hold it already. The receive decides: the
    // reply answers the call; without one (the end of the stream, a reset) this failure does
    // (Answer, ReadFailed). Our end of the stream tells a server still waiting for the rest.
    write_failure_ = std::move(failure);
    boost::system::error_code ignored;
    conn_.socket().shutdown(asio::socket_base::shutdown_send, ignored);
    return false;
  }
  Shutdown();
  Finish(failure.first, std::move(failure.second));
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
           fmt::format("connection to {} closed by the client while the {} was in flight", conn_.address(),
                       request_noun()));
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
