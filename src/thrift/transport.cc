#include "scales/thrift/transport.h"

#include <fmt/format.h>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"
#include "scales/thrift/message.h"

namespace scales::thrift {

namespace asio = boost::asio;

namespace {
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
  if (auto [code, detail] = CheckUsable(msg.method); code) {
    fail(code, std::move(detail));
    return;
  }
  if (stack.cancelled()) {
    fail(stack.cancel_reason(),
         fmt::format("cancelled before the request{}{} was sent to {}", msg.method.empty() ? "" : " for ", msg.method,
                     conn().address()));
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
  seqid_ = header ? std::optional<int32_t>(header->seqid) : std::nullopt;
  method_ = &msg.method;
  current_ = &stack;
  reply_ = reply;
  scanner_.Reset();
  BeginRequest();
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
  if (oneway_) reply->data.clear();
  Exchange(write_buf_, /*expect_reply=*/!oneway_);
}

ConnectionSink::ParseResult ThriftTransportSink::ParseReply(boost::beast::flat_buffer& in) {
  const auto* p = static_cast<const unsigned char*>(in.data().data());
  const size_t size = in.size();
  if (options_.framing == Framing::kBuffered) {
    auto scan = scanner_.Scan(std::string_view(reinterpret_cast<const char*>(p), size));
    switch (scan.status) {
      case MessageScan::Status::kComplete:
        if (scan.size > options_.max_frame_bytes) {
          return ParseResult::Failed(make_error_code(Errc::kResponseTooLarge),
                                     fmt::format("Thrift reply from {} for {} is {} bytes, above max_frame_bytes "
                                                 "({} bytes)",
                                                 conn().address(), Method(), scan.size, options_.max_frame_bytes));
        }
        reply_->data.assign(reinterpret_cast<const char*>(p), scan.size);
        in.consume(scan.size);
        return Done();
      case MessageScan::Status::kMalformed:
        return ParseResult::Failed(make_error_code(Errc::kProtocolError),
                                   fmt::format("malformed Thrift reply from {} for {}: {}", conn().address(), Method(),
                                               scan.error));
      case MessageScan::Status::kNeedMore:
        if (size > options_.max_frame_bytes) {
          return ParseResult::Failed(make_error_code(Errc::kResponseTooLarge),
                                     fmt::format("Thrift reply from {} for {} exceeds max_frame_bytes ({} bytes)",
                                                 conn().address(), Method(), options_.max_frame_bytes));
        }
        return ParseResult::NeedMore();
    }
  }
  if (size < 4) return ParseResult::NeedMore();
  const uint32_t len = (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) |
                       (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
  if (len > options_.max_frame_bytes) {
    return ParseResult::Failed(make_error_code(Errc::kResponseTooLarge),
                               fmt::format("Thrift reply frame from {} for {} is {} bytes, above max_frame_bytes "
                                           "({} bytes)",
                                           conn().address(), Method(), len, options_.max_frame_bytes));
  }
  if (len == 0) {
    return ParseResult::Failed(make_error_code(Errc::kProtocolError),
                               fmt::format("empty Thrift frame from {} for {}", conn().address(), Method()));
  }
  if (size - 4 < len) return ParseResult::NeedMore();
  reply_->data.assign(reinterpret_cast<const char*>(p + 4), len);
  in.consume(4 + static_cast<size_t>(len));
  return Done();
}

ConnectionSink::ParseResult ThriftTransportSink::ParseEof(size_t bytes) {
  ParseResult r = ConnectionSink::ParseEof(bytes);
  if (!replied_ && bytes == 0) {
    r.detail += fmt::format(
        " (no reply came on this connection: a server whose framing or protocol differs from the client's closes "
        "it so; this client's framing is {})",
        ToString(options_.framing));
  }
  return r;
}

std::string_view ThriftTransportSink::reply_noun() const {
  if (method_ == nullptr || method_->empty()) return "reply";
  reply_noun_ = fmt::format("reply for {}", *method_);
  return reply_noun_;
}

std::string_view ThriftTransportSink::request_noun() const {
  if (method_ == nullptr || method_->empty()) return "request";
  request_noun_ = fmt::format("request for {}", *method_);
  return request_noun_;
}

ConnectionSink::ParseResult ThriftTransportSink::Done() {
  replied_ = true;
  if (seqid_) {
    auto header = ParseMessageHeader(reply_->data);  // undecodable: the serializer says why
    // A reply whose header does not parse may be anything but this request's reply, which may
    // still come: the serializer fails the call, and the connection, possibly one reply behind,
    // must not be reused.
    if (!header) return ParseResult::Done(/*reusable=*/false);
    if (header->seqid != *seqid_) {
      // Not this request's reply: the connection is out of step. The serializer would report the
      // mismatch too, but the connection must not be reused.
      return ParseResult::Failed(make_error_code(Errc::kProtocolError),
                                 fmt::format("Thrift reply from {} for {} has seqid {}, expected {} (a stray or "
                                             "duplicate reply); connection closed",
                                             conn().address(), Method(), header->seqid, *seqid_));
    }
  }
  return ParseResult::Done();
}

void ThriftTransportSink::Finish(error_code ec, std::string detail) {
  SinkStack* s = current_;
  Stream* reply = reply_;
  current_ = nullptr;
  reply_ = nullptr;
  method_ = nullptr;
  TrimRequestBuffer(write_buf_);
  MethodReturnMessage m{ec, std::move(detail), {}};
  s->AsyncProcessResponse(ec ? nullptr : reply, m);
}

void ThriftTransportSink::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  if (current_ != &stack) return;
  // A timeout's detail names the method above this (the timeout sink); any other reason (the
  // caller's cancellation) has nothing above that would, so the request is named here.
  const bool named_above = reason == Errc::kRequestTimeout;
  std::string detail =
      writing() ? fmt::format("while sending the {} to {}", named_above ? "request" : request_noun(), conn().address())
                : fmt::format("while waiting for the {} from {}", named_above ? "reply" : reply_noun(),
                              conn().address());
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
  ProviderSettings settings = {
      {"connect_timeout", SettingText(options.connect_timeout)},
      {"max_frame_bytes", SettingText(options.max_frame_bytes)},
      {"tls", SettingText(options.tls.enabled)},
  };
  if (options.tls.enabled) {
    tls_context = MakeTlsContext(options.tls);
    AppendTlsFileSettings(options.tls, settings);
  }
  return SinkProvider{std::string(roles::kTransport),
                      options.framing == Framing::kFramed ? "thrift-framed-transport" : "thrift-buffered-transport",
                      [options, tls_context](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<ThriftTransportSink>(ctx, options);
                      },
                      std::move(settings)};
}

}  // namespace scales::thrift
