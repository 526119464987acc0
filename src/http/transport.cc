#include "scales/http/transport.h"

#include <tuple>

#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <fmt/format.h>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"
#include "scales/http/message.h"

namespace scales::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;

namespace {

std::string Snippet(std::string_view body, size_t max = 200) {
  std::string s(body.substr(0, max));
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  if (body.size() > max) s += "...";
  return s;
}

// B3 propagation headers (https://github.com/openzipkin/b3-propagation): 16 lower-hex digits
// per id.
template <class Request>
void AddB3Headers(Request& request, const TraceContext& t) {
  request.set("X-B3-TraceId", fmt::format("{:016x}", t.trace_id));
  request.set("X-B3-SpanId", fmt::format("{:016x}", t.span_id));
  if (t.parent_id != 0 && t.parent_id != t.span_id) {
    request.set("X-B3-ParentSpanId", fmt::format("{:016x}", t.parent_id));
  }
  if (t.flags & 1) {
    request.set("X-B3-Flags", "1");  // debug implies sampled
  } else if (t.flags & 2) {
    request.set("X-B3-Sampled", (t.flags & 4) ? "1" : "0");
  }
}

}  // namespace

void Validate(const TransportOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.connect_timeout < Duration::zero()) fail("transport.connect_timeout must be >= 0 (0 = no timeout)");
  if (o.max_response_header_bytes == 0) fail("transport.max_response_header_bytes must be > 0");
  if (o.max_response_body_bytes == 0) fail("transport.max_response_body_bytes must be > 0");
  Validate(o.tls);
}

namespace {

// Host header: the endpoint, or the TLS server name (the virtual host the certificate is for).
std::string HostHeader(const SinkContext& ctx, const TransportOptions& o) {
  if (!ctx.endpoint) return {};
  if (o.tls.enabled && !o.tls.server_name.empty()) {
    return Endpoint{o.tls.server_name, ctx.endpoint->port}.ToString();
  }
  return ctx.endpoint->ToString();
}

}  // namespace

HttpTransportSink::HttpTransportSink(const SinkContext& ctx, TransportOptions options)
    : ConnectionSink(ctx, options.connect_timeout, options.tls),
      options_(std::move(options)),
      host_header_(HostHeader(ctx, options_)) {}

HttpTransportSink::~HttpTransportSink() = default;

void HttpTransportSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream*) {
  auto* req = msg.payload<Request>();
  if (req == nullptr || msg.reply_slot<Response>() == nullptr) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kInvalidArgument),
                                          "the HTTP transport needs an http::Request payload and an "
                                          "http::Response reply slot");
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  if (auto [code, detail] = CheckUsable(); code) {
    auto m = MethodReturnMessage::Failure(code, std::move(detail));
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  if (stack.cancelled()) {
    auto m = MethodReturnMessage::Failure(stack.cancel_reason(), "cancelled before it was sent");
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  current_ = &stack;
  const uint64_t gen = BeginRequest();
  stack.SetCancelHandler(this, nullptr);

  request_ = {};
  request_.version(11);
  bhttp::verb verb = bhttp::string_to_verb(req->method);
  if (verb == bhttp::verb::unknown) {
    request_.method_string(req->method);
  } else {
    request_.method(verb);
  }
  request_.target(req->target);
  bool has_host = false;
  bool has_agent = false;
  for (const auto& [name, value] : req->headers) {
    has_host = has_host || HeaderNameEquals(name, "host");
    has_agent = has_agent || HeaderNameEquals(name, "user-agent");
    request_.insert(name, value);
  }
  for (const auto& [name, value] : msg.properties.headers) {
    has_host = has_host || HeaderNameEquals(name, "host");
    has_agent = has_agent || HeaderNameEquals(name, "user-agent");
    request_.insert(name, value);
  }
  if (options_.b3_headers && msg.properties.trace.valid()) AddB3Headers(request_, msg.properties.trace);
  if (!has_host) request_.set(bhttp::field::host, host_header_);
  if (!has_agent) request_.set(bhttp::field::user_agent, "scales/0.1");
  request_.body() = req->body;
  request_.prepare_payload();

  writing_ = true;
  conn().WithStream([&](auto& stream) {
    bhttp::async_write(stream, request_, [self = self(), gen](const boost::system::error_code& ec, size_t n) {
      self->OnWritten(gen, ec, n);
    });
  });
}

void HttpTransportSink::OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != this->generation() || current_ == nullptr) return;
  writing_ = false;
  if (!WriteDone(ec, bytes)) return;
  parser_.emplace();
  parser_->header_limit(static_cast<std::uint32_t>(
      std::min<size_t>(options_.max_response_header_bytes, UINT32_MAX)));
  parser_->body_limit(options_.max_response_body_bytes);
  if (request_.method() == bhttp::verb::head) parser_->skip(true);
  conn().WithStream([&](auto& stream) {
    bhttp::async_read(stream, buffer_, *parser_, [self = self(), gen = generation](const boost::system::error_code& e,
                                                                                   size_t n) {
      self->OnRead(gen, e, n);
    });
  });
}

void HttpTransportSink::OnRead(uint64_t generation, const boost::system::error_code& ec, size_t bytes) {
  if (generation != this->generation() || current_ == nullptr) return;
  conn().bytes_received().Increment(static_cast<int64_t>(bytes));
  if (ec) {
    error_code code;
    std::string detail;
    if (auto tls = TlsFailure(ec, "reading the response")) {
      std::tie(code, detail) = std::move(*tls);
    } else if (ec == bhttp::error::body_limit) {
      code = make_error_code(Errc::kResponseTooLarge);
      detail = fmt::format("response body from {} exceeds max_response_body_bytes ({} bytes)",
                           conn().address(), options_.max_response_body_bytes);
    } else if (ec == bhttp::error::header_limit) {
      code = make_error_code(Errc::kResponseTooLarge);
      detail = fmt::format("response headers from {} exceed max_response_header_bytes ({} bytes)",
                           conn().address(), options_.max_response_header_bytes);
    } else if (ec == bhttp::error::end_of_stream || ec == bhttp::error::partial_message ||
               ec == asio::error::eof || ec == asio::error::connection_reset ||
               ec == asio::error::broken_pipe || ec == asio::ssl::error::stream_truncated) {
      code = make_error_code(Errc::kConnectionClosed);
      detail = fmt::format("connection to {} closed by the server while reading the response "
                           "(after {} bytes): {}",
                           conn().address(), bytes, ec.message());
    } else if (ec.category() == bhttp::make_error_code(bhttp::error::bad_version).category()) {
      code = make_error_code(Errc::kProtocolError);
      detail = fmt::format("malformed HTTP response from {}: {}", conn().address(), ec.message());
    } else {
      code = make_error_code(Errc::kConnectionClosed);
      detail = fmt::format("reading the response from {} failed: {}", conn().address(), ec.message());
    }
    Shutdown();
    Finish(code, std::move(detail));
    return;
  }
  auto& out = *current_->message().reply_slot<Response>();
  auto res = parser_->release();
  parser_.reset();
  out.status = static_cast<int>(res.result_int());
  out.reason = std::string(res.reason());
  out.headers.clear();
  for (const auto& field : res) {
    out.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
  }
  out.body = std::move(res.body());
  // A response without keep-alive, or bytes after it that nobody asked for, end the
  // connection's life.
  if (!res.keep_alive() || buffer_.size() > 0) {
    Shutdown();
  } else {
    WatchIdle();
  }
  if (options_.raise_on_http_error && out.status >= 400) {
    const auto& msg = current_->message();
    auto* req = msg.payload<Request>();
    Finish(make_error_code(Errc::kHttpError),
           fmt::format("HTTP {} {} from {} for {} {}: {}", out.status, out.reason, conn().address(),
                       req->method, req->target, Snippet(out.body)));
    return;
  }
  Finish({}, {});
}

void HttpTransportSink::Finish(error_code ec, std::string detail) {
  SinkStack* s = current_;
  current_ = nullptr;
  writing_ = false;
  MethodReturnMessage m{ec, std::move(detail), {}};
  s->AsyncProcessResponse(nullptr, m);
}

void HttpTransportSink::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  if (current_ != &stack) return;
  std::string detail = writing_ ? fmt::format("while sending the request to {}", conn().address())
                                : fmt::format("while waiting for the response from {}", conn().address());
  // An HTTP/1.1 connection with an unanswered request cannot be reused.
  Shutdown();
  Finish(reason, std::move(detail));
}

SinkProvider HttpTransportProvider(TransportOptions options) {
  Validate(options);
  // Loaded now, so that a missing or bad file fails the client's creation; kept by the
  // provider so that every connection shares it (MakeTlsContext's cache).
  std::shared_ptr<asio::ssl::context> tls_context;
  if (options.tls.enabled) tls_context = MakeTlsContext(options.tls);
  return SinkProvider{std::string(roles::kTransport), "http-transport",
                      [options, tls_context](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<HttpTransportSink>(ctx, options);
                      }};
}

}  // namespace scales::http
