#include "scales/thrift/transport.h"

#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"
#include "scales/thrift/message.h"

namespace scales::thrift {

namespace asio = boost::asio;

namespace {
constexpr size_t kReadChunk = 64 * 1024;
constexpr size_t kMaxFrameLimit = 0x7fffffff;
}  // namespace

const char* ToString(Framing f) noexcept {
  return f == Framing::kFramed ? "framed" : "buffered";
}

void Validate(const TransportOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.connect_timeout < Duration::zero()) fail("transport.connect_timeout must be >= 0 (0 = no timeout)");
  if (o.max_frame_bytes == 0 || o.max_frame_bytes > kMaxFrameLimit) {
    fail("transport.max_frame_bytes must be > 0 and < 2 GiB");
  }
}

ThriftTransportSink::ThriftTransportSink(const SinkContext& ctx, TransportOptions options)
    : loop_(*ctx.loop),
      options_(options),
      conn_(*ctx.loop, ctx.endpoint.value_or(Endpoint{}), options.connect_timeout, ctx.stats) {}

ThriftTransportSink::~ThriftTransportSink() = default;

void ThriftTransportSink::DoOpen(OpenHandler handler) {
  switch (state_) {
    case State::kOpen:
      PostOpenCompletion(std::move(handler), loop_.executor(), {});
      return;
    case State::kClosed:
      PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kConnectionClosed));
      return;
    case State::kConnecting:
      open_waiters_.Add(std::move(handler));
      return;
    case State::kIdle:
      open_waiters_.Add(std::move(handler));
      state_ = State::kConnecting;
      conn_.AsyncConnect([self = self()](error_code ec) { self->OnConnected(ec); });
      return;
  }
}

void ThriftTransportSink::OnConnected(error_code ec) {
  if (state_ != State::kConnecting) return;  // closed meanwhile; waiters were answered
  if (ec) {
    state_ = State::kClosed;
    conn_.Close();
    open_waiters_.CompleteAll(loop_.executor(), ec);
    return;
  }
  state_ = State::kOpen;
  WatchIdle();
  open_waiters_.CompleteAll(loop_.executor(), {});
}

void ThriftTransportSink::WatchIdle() {
  const uint64_t gen = generation_;
  conn_.socket().async_wait(asio::ip::tcp::socket::wait_read,
                            [self = self(), gen](const boost::system::error_code& ec) {
                              if (ec || self->generation_ != gen || self->current_ != nullptr ||
                                  self->state_ != State::kOpen) {
                                return;
                              }
                              // Readable while idle: the server closed the connection (a Thrift
                              // server never speaks first). It cannot be reused.
                              self->Shutdown();
                            });
}

void ThriftTransportSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  Stream* request = stream != nullptr ? stream : msg.payload<Stream>();
  Stream* reply = msg.reply_slot<Stream>();
  auto fail = [&](error_code ec, std::string detail) {
    auto m = MethodReturnMessage::Failure(ec, std::move(detail));
    stack.AsyncProcessResponse(nullptr, m);
  };
  if (request == nullptr || reply == nullptr) {
    fail(make_error_code(Errc::kInvalidArgument),
         "the Thrift transport needs a scales::Stream payload and a scales::Stream reply slot");
    return;
  }
  if (state_ != State::kOpen || current_ != nullptr) {
    fail(make_error_code(Errc::kConnectionClosed),
         fmt::format("connection to {} is not usable ({})", conn_.address(),
                     current_ ? "busy with another request" : "not open"));
    return;
  }
  if (stack.cancelled()) {
    fail(stack.cancel_reason(), "cancelled before it was sent");
    return;
  }
  if (request->data.size() > options_.max_frame_bytes) {
    fail(make_error_code(Errc::kRequestTooLarge),
         fmt::format("Thrift request {} to {} is {} bytes, above max_frame_bytes ({} bytes)", msg.method,
                     conn_.address(), request->data.size(), options_.max_frame_bytes));
    return;
  }
  auto header = ParseMessageHeader(request->data);
  oneway_ = header && header->type == MessageType::kOneway;
  current_ = &stack;
  reply_ = reply;
  ++generation_;
  stack.SetCancelHandler(this, nullptr);
  boost::system::error_code ignored;
  conn_.socket().cancel(ignored);  // ends the idle watch

  write_buf_.clear();
  if (options_.framing == Framing::kFramed) {
    const auto n = static_cast<uint32_t>(request->data.size());
    const char len[4] = {static_cast<char>(n >> 24), static_cast<char>(n >> 16), static_cast<char>(n >> 8),
                         static_cast<char>(n)};
    write_buf_.reserve(4 + request->data.size());
    write_buf_.append(len, 4);
  }
  write_buf_.append(request->data);
  writing_ = true;
  asio::async_write(conn_.socket(), asio::buffer(write_buf_),
                    [self = self(), gen = generation_](const boost::system::error_code& ec, size_t n) {
                      self->OnWritten(gen, ec, n);
                    });
}

void ThriftTransportSink::OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != generation_ || current_ == nullptr) return;
  writing_ = false;
  conn_.bytes_sent().Increment(static_cast<int64_t>(bytes));
  if (ec) {
    Shutdown();
    Finish(make_error_code(Errc::kConnectionClosed),
           fmt::format("writing the request to {} failed: {}", conn_.address(), ec.message()));
    return;
  }
  if (oneway_) {
    reply_->data.clear();
    WatchIdle();
    Finish({}, {});
    return;
  }
  read_size_ = 0;
  if (options_.framing == Framing::kFramed) {
    ReadFrameHeader();
  } else {
    ReadSome();
  }
}

void ThriftTransportSink::ReadFrameHeader() {
  asio::async_read(conn_.socket(), asio::buffer(frame_header_),
                   [self = self(), gen = generation_](const boost::system::error_code& ec, size_t n) {
                     self->OnFrameHeader(gen, ec, n);
                   });
}

void ThriftTransportSink::OnFrameHeader(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != generation_ || current_ == nullptr) return;
  conn_.bytes_received().Increment(static_cast<int64_t>(bytes));
  if (ec) {
    ReadFailed(ec);
    return;
  }
  const uint32_t len = (static_cast<uint32_t>(frame_header_[0]) << 24) |
                       (static_cast<uint32_t>(frame_header_[1]) << 16) |
                       (static_cast<uint32_t>(frame_header_[2]) << 8) | static_cast<uint32_t>(frame_header_[3]);
  if (len > options_.max_frame_bytes) {
    Shutdown();
    Finish(make_error_code(Errc::kResponseTooLarge),
           fmt::format("Thrift reply frame from {} is {} bytes, above max_frame_bytes ({} bytes)", conn_.address(),
                       len, options_.max_frame_bytes));
    return;
  }
  if (len == 0) {
    Shutdown();
    Finish(make_error_code(Errc::kProtocolError), fmt::format("empty Thrift frame from {}", conn_.address()));
    return;
  }
  read_buf_.resize(len);
  asio::async_read(conn_.socket(), asio::buffer(read_buf_),
                   [self = self(), gen = generation_](const boost::system::error_code& e, size_t n) {
                     self->OnFrameBody(gen, e, n);
                   });
}

void ThriftTransportSink::OnFrameBody(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != generation_ || current_ == nullptr) return;
  conn_.bytes_received().Increment(static_cast<int64_t>(bytes));
  if (ec) {
    ReadFailed(ec);
    return;
  }
  reply_->data.swap(read_buf_);
  WatchIdle();
  Finish({}, {});
}

void ThriftTransportSink::ReadSome() {
  if (read_buf_.size() < read_size_ + kReadChunk) read_buf_.resize(read_size_ + kReadChunk);
  conn_.socket().async_read_some(
      asio::buffer(read_buf_.data() + read_size_, read_buf_.size() - read_size_),
      [self = self(), gen = generation_](const boost::system::error_code& ec, size_t n) {
        self->OnReadSome(gen, ec, n);
      });
}

void ThriftTransportSink::OnReadSome(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != generation_ || current_ == nullptr) return;
  conn_.bytes_received().Increment(static_cast<int64_t>(bytes));
  if (ec) {
    ReadFailed(ec);
    return;
  }
  read_size_ += bytes;
  auto scan = ScanMessage(std::string_view(read_buf_.data(), read_size_));
  switch (scan.status) {
    case MessageScan::Status::kComplete:
      if (scan.size > options_.max_frame_bytes) {
        Shutdown();
        Finish(make_error_code(Errc::kResponseTooLarge),
               fmt::format("Thrift reply from {} is {} bytes, above max_frame_bytes ({} bytes)", conn_.address(),
                           scan.size, options_.max_frame_bytes));
        return;
      }
      if (scan.size != read_size_) {
        // Bytes after the reply that nobody asked for: the connection's framing is lost.
        Shutdown();
      } else {
        WatchIdle();
      }
      read_buf_.resize(scan.size);
      reply_->data.swap(read_buf_);
      Finish({}, {});
      return;
    case MessageScan::Status::kMalformed:
      Shutdown();
      Finish(make_error_code(Errc::kProtocolError),
             fmt::format("malformed Thrift reply from {}: {}", conn_.address(), scan.error));
      return;
    case MessageScan::Status::kNeedMore:
      if (read_size_ > options_.max_frame_bytes) {
        Shutdown();
        Finish(make_error_code(Errc::kResponseTooLarge),
               fmt::format("Thrift reply from {} exceeds max_frame_bytes ({} bytes)", conn_.address(),
                           options_.max_frame_bytes));
        return;
      }
      ReadSome();
      return;
  }
}

void ThriftTransportSink::ReadFailed(const boost::system::error_code& ec) {
  Shutdown();
  Finish(make_error_code(Errc::kConnectionClosed),
         fmt::format("connection to {} closed while reading the reply: {}", conn_.address(), ec.message()));
}

void ThriftTransportSink::Finish(error_code ec, std::string detail) {
  SinkStack* s = current_;
  Stream* reply = reply_;
  current_ = nullptr;
  reply_ = nullptr;
  writing_ = false;
  MethodReturnMessage m{ec, std::move(detail), {}};
  s->AsyncProcessResponse(ec ? nullptr : reply, m);
}

void ThriftTransportSink::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  if (current_ != &stack) return;
  std::string detail = writing_ ? fmt::format("while sending the request to {}", conn_.address())
                                : fmt::format("while waiting for the reply from {}", conn_.address());
  // A connection with an unanswered request cannot be reused: its reply would go to the
  // next request.
  Shutdown();
  Finish(reason, std::move(detail));
}

void ThriftTransportSink::Shutdown() {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  ++generation_;
  conn_.Close();
  on_faulted_.Set({make_error_code(Errc::kConnectionClosed), fmt::format("connection to {} closed", conn_.address())});
}

void ThriftTransportSink::Close() {
  if (state_ == State::kConnecting) {
    state_ = State::kClosed;
    conn_.Close();
    open_waiters_.CompleteAll(loop_.executor(), make_error_code(Errc::kClientClosed));
  }
  state_ = State::kClosed;
  ++generation_;
  conn_.Close();
  if (current_ != nullptr) {
    Finish(make_error_code(Errc::kClientClosed),
           fmt::format("connection to {} closed by the client while the request was in flight", conn_.address()));
  }
}

SinkStatus ThriftTransportSink::status() const {
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

SinkProvider ThriftTransportProvider(TransportOptions options) {
  Validate(options);
  return SinkProvider{std::string(roles::kTransport),
                      options.framing == Framing::kFramed ? "thrift-framed-transport" : "thrift-buffered-transport",
                      [options](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<ThriftTransportSink>(ctx, options);
                      }};
}

}  // namespace scales::thrift
