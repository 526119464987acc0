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
  Validate(o.tls);
}

ThriftTransportSink::ThriftTransportSink(const SinkContext& ctx, TransportOptions options)
    : ConnectionSink(ctx, options.connect_timeout, options.tls), options_(std::move(options)) {}

ThriftTransportSink::~ThriftTransportSink() = default;

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
  if (auto [code, detail] = CheckUsable(); code) {
    fail(code, std::move(detail));
    return;
  }
  if (stack.cancelled()) {
    fail(stack.cancel_reason(), "cancelled before it was sent");
    return;
  }
  if (request->data.size() > options_.max_frame_bytes) {
    fail(make_error_code(Errc::kRequestTooLarge),
         fmt::format("Thrift request {} to {} is {} bytes, above max_frame_bytes ({} bytes)", msg.method,
                     conn().address(), request->data.size(), options_.max_frame_bytes));
    return;
  }
  auto header = ParseMessageHeader(request->data);
  oneway_ = header && header->type == MessageType::kOneway;
  current_ = &stack;
  reply_ = reply;
  const uint64_t gen = BeginRequest();
  stack.SetCancelHandler(this, nullptr);

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
  conn().WithStream([&](auto& stream) {
    asio::async_write(stream, asio::buffer(write_buf_), [self = self(), gen](const boost::system::error_code& ec,
                                                                             size_t n) {
      self->OnWritten(gen, ec, n);
    });
  });
}

void ThriftTransportSink::OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != this->generation() || current_ == nullptr) return;
  writing_ = false;
  if (!WriteDone(ec, bytes)) return;
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
  conn().WithStream([&](auto& stream) {
    asio::async_read(stream, asio::buffer(frame_header_),
                     [self = self(), gen = generation()](const boost::system::error_code& ec, size_t n) {
                       self->OnFrameHeader(gen, ec, n);
                     });
  });
}

void ThriftTransportSink::OnFrameHeader(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != this->generation() || current_ == nullptr) return;
  conn().bytes_received().Increment(static_cast<int64_t>(bytes));
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
           fmt::format("Thrift reply frame from {} is {} bytes, above max_frame_bytes ({} bytes)", conn().address(),
                       len, options_.max_frame_bytes));
    return;
  }
  if (len == 0) {
    Shutdown();
    Finish(make_error_code(Errc::kProtocolError), fmt::format("empty Thrift frame from {}", conn().address()));
    return;
  }
  read_buf_.resize(len);
  conn().WithStream([&](auto& stream) {
    asio::async_read(stream, asio::buffer(read_buf_),
                     [self = self(), gen = generation](const boost::system::error_code& e, size_t n) {
                       self->OnFrameBody(gen, e, n);
                     });
  });
}

void ThriftTransportSink::OnFrameBody(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != this->generation() || current_ == nullptr) return;
  conn().bytes_received().Increment(static_cast<int64_t>(bytes));
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
  conn().WithStream([&](auto& stream) {
    stream.async_read_some(asio::buffer(read_buf_.data() + read_size_, read_buf_.size() - read_size_),
                           [self = self(), gen = generation()](const boost::system::error_code& ec, size_t n) {
                             self->OnReadSome(gen, ec, n);
                           });
  });
}

void ThriftTransportSink::OnReadSome(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != this->generation() || current_ == nullptr) return;
  conn().bytes_received().Increment(static_cast<int64_t>(bytes));
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
               fmt::format("Thrift reply from {} is {} bytes, above max_frame_bytes ({} bytes)", conn().address(),
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
             fmt::format("malformed Thrift reply from {}: {}", conn().address(), scan.error));
      return;
    case MessageScan::Status::kNeedMore:
      if (read_size_ > options_.max_frame_bytes) {
        Shutdown();
        Finish(make_error_code(Errc::kResponseTooLarge),
               fmt::format("Thrift reply from {} exceeds max_frame_bytes ({} bytes)", conn().address(),
                           options_.max_frame_bytes));
        return;
      }
      ReadSome();
      return;
  }
}

void ThriftTransportSink::ReadFailed(const boost::system::error_code& ec) {
  auto tls = TlsFailure(ec, "reading the reply");
  Shutdown();
  if (tls) {
    Finish(tls->first, std::move(tls->second));
    return;
  }
  Finish(make_error_code(Errc::kConnectionClosed),
         fmt::format("connection to {} closed while reading the reply: {}", conn().address(), ec.message()));
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
  std::string detail = writing_ ? fmt::format("while sending the request to {}", conn().address())
                                : fmt::format("while waiting for the reply from {}", conn().address());
  // A connection with an unanswered request cannot be reused: its reply would go to the
  // next request.
  Shutdown();
  Finish(reason, std::move(detail));
}

SinkProvider ThriftTransportProvider(TransportOptions options) {
  Validate(options);
  // Loaded now, so that a missing or bad file fails the client's creation; kept by the
  // provider so that every connection shares it (MakeTlsContext's cache).
  std::shared_ptr<asio::ssl::context> tls_context;
  if (options.tls.enabled) tls_context = MakeTlsContext(options.tls);
  return SinkProvider{std::string(roles::kTransport),
                      options.framing == Framing::kFramed ? "thrift-framed-transport" : "thrift-buffered-transport",
                      [options, tls_context](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<ThriftTransportSink>(ctx, options);
                      }};
}

}  // namespace scales::thrift
