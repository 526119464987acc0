#pragma once
// HttpTransportSink: one HTTP/1.1 keep-alive connection carrying one request at a time
// (pooled by the WatermarkPool). The request is serialised into one reused string (the method,
// target and header names must be tokens and header values free of CR/LF: kInvalidArgument
// otherwise); Beast's parser reads the response; limits on header and body size protect the
// client. While idle, the connection watches its socket so that a server closing
// a keep-alive connection is noticed before the connection is reused. A 2xx response to CONNECT
// ends with its header (the connection would be a tunnel) and closes the connection. With
// `tls.enabled` the connection is HTTPS: TLS from the first byte (see docs/tls.md).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/basic_parser.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/field.hpp>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/http/message.h"
#include "scales/transport/connection_sink.h"
#include "scales/transport/tls.h"

namespace scales::http {

struct TransportOptions {
  // TCP connect timeout. Default 5 s.
  Duration connect_timeout = std::chrono::seconds(5);
  // Largest response header block accepted; beyond it the request fails with
  // kResponseTooLarge and the connection is closed. Default 64 KiB.
  size_t max_response_header_bytes = 64 * 1024;
  // Largest response body accepted (after de-chunking). Default 8 MiB.
  size_t max_response_body_bytes = 8 * 1024 * 1024;
  // Interim (1xx) responses skipped before a request's response; one more fails the call
  // (kProtocolError) and closes the connection. 0: any interim response fails it. Default 8.
  size_t max_interim_responses = 8;
  // Status >= 400 (or an invalid one under 100, RFC 9110 15) completes the call with
  // kHttpError (detail: status, reason, start of the body) instead of returning the response.
  // Default true, as in scales.
  bool raise_on_http_error = true;
  // Send the call's trace identifiers as B3 headers (X-B3-TraceId, X-B3-SpanId,
  // X-B3-ParentSpanId when it differs from the span, X-B3-Sampled when the sampling decision
  // is known, X-B3-Flags: 1 for debug). Default false.
  bool b3_headers = false;
  // TLS (HTTPS). Off by default; an https:// URI or ?tls=on turns it on. With
  // tls.server_name set, the Host header names it too (unless the request sets Host).
  TlsOptions tls;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable:
// connect_timeout >= 0 (0 = none), size limits > 0, TLS options (Validate(TlsOptions)).
void Validate(const TransportOptions& o);

namespace internal {

// Why the field `name: value` cannot be sent ("" when it can): a name that is not a token, or a
// value with a CR, LF or NUL (header injection). The transport refuses such a request with it,
// and HttpClientBuilder::Build() a default header.
std::string HeaderProblem(std::string_view name, std::string_view value);

// Whether `target` is a request target in absolute form (RFC 9112 3.2.2): a scheme (RFC 3986
// 3.1), then "://" ("http://host/path").
bool IsAbsoluteFormTarget(std::string_view target) noexcept;

// Beast's HTTP/1.1 response parser writing straight into a scales Response: status, reason,
// each header and the (de-chunked) body, with no Beast message or field container in between.
// Beast enforces the header and body limits and the framing rules; this adds what Beast lets
// through: a Content-Length after a Transfer-Encoding is an error as the other way round is
// (RFC 9112 6.3), an HTTP/1.0 response with Transfer-Encoding ends its connection (6.1), and the
// fields of a trailer section are dropped, not merged into the header fields (RFC 9110 6.5.2).
class ResponseParser final : public boost::beast::http::basic_parser<false> {
 public:
  explicit ResponseParser(Response& out) : out_(out) {}

  // Whether the connection may carry another request: Beast's keep_alive(), but not after an
  // HTTP/1.0 response with Transfer-Encoding (its framing is faulty, RFC 9112 6.1).
  bool reusable() const { return keep_alive() && !(http10_ && transfer_encoding_); }

 private:
  using string_view = boost::beast::string_view;
  using error_code = boost::beast::error_code;

  void on_request_impl(boost::beast::http::verb, string_view, string_view, int, error_code&) override {}
  void on_response_impl(int code, string_view reason, int version, error_code&) override {
    http10_ = version < 11;
    out_.status = code;
    out_.reason.assign(reason.data(), reason.size());
    // One allocation for a typical header block (nginx sends 5 fields) rather than the
    // vector's 1, 2, 4, 8 growth with every field moved at each step.
    out_.headers.reserve(kExpectedFields);
  }
  void on_field_impl(boost::beast::http::field f, string_view name, string_view value, error_code& ec) override {
    if (in_trailer_) return;
    // Beast fails a Transfer-Encoding after a Content-Length, and a Content-Length after a
    // chunked one, but frames the body by a Content-Length after another coding.
    if (f == boost::beast::http::field::transfer_encoding) {
      transfer_encoding_ = true;
    } else if (f == boost::beast::http::field::content_length && transfer_encoding_) {
      ec = boost::beast::http::error::bad_content_length;
      return;
    }
    // Built in place: no temporary strings moved into the pair.
    out_.headers.emplace_back(std::piecewise_construct, std::forward_as_tuple(name.data(), name.size()),
                              std::forward_as_tuple(value.data(), value.size()));
  }
  void on_header_impl(error_code&) override {}
  void on_body_init_impl(const boost::optional<std::uint64_t>& length, error_code&) override {
    // Within body_limit (checked before), but the limit may be huge and the length is only
    // what the server declares: reserve at most kMaxBodyReserve up front, grow past it as the
    // body arrives.
    if (length) out_.body.reserve(static_cast<size_t>(std::min<std::uint64_t>(*length, kMaxBodyReserve)));
  }
  size_t on_body_impl(string_view body, error_code&) override {
    out_.body.append(body.data(), body.size());
    return body.size();
  }
  void on_chunk_header_impl(std::uint64_t size, string_view, error_code&) override {
    if (size == 0) in_trailer_ = true;  // the last chunk: the trailer section's fields follow
  }
  size_t on_chunk_body_impl(std::uint64_t, string_view body, error_code&) override {
    out_.body.append(body.data(), body.size());
    return body.size();
  }
  void on_finish_impl(error_code&) override {}

  static constexpr size_t kExpectedFields = 8;
  static constexpr std::uint64_t kMaxBodyReserve = 1 << 20;
  Response& out_;
  bool http10_ = false;
  bool transfer_encoding_ = false;
  bool in_trailer_ = false;
};

// The common response without Beast: a complete HTTP/1.0 or 1.1 response at the front of
// `wire` whose header block fits `header_limit`, with a status from 200 to 999 other than 204 and
// 304, fields of visible ASCII, exactly one Content-Length of at most `body_limit`, no
// Transfer-Encoding, at most a `Connection: keep-alive` or `close` (no Proxy-Connection, which
// Beast takes as Connection), and its whole body buffered.
// Fills `out` and `keep_alive` as ResponseParser would and returns the bytes it used; returns 0
// for anything else (partial, chunked, obs-fold, other octets, ...), leaving `out` as it was, and
// Beast parses the response from the start (with its errors and limits).
size_t ParseSimpleResponse(std::string_view wire, size_t header_limit, std::uint64_t body_limit, Response& out,
                           bool& keep_alive);

}  // namespace internal

// Thread safety: one connection, used on one event loop.
class HttpTransportSink final : public ConnectionSink {
 public:
  HttpTransportSink(const SinkContext& ctx, TransportOptions options);
  ~HttpTransportSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  std::string_view name() const override { return "http-transport"; }

 protected:
  bool busy() const override { return current_ != nullptr; }
  void Finish(error_code ec, std::string detail) override;

 private:
  ParseResult ParseReply(boost::beast::flat_buffer& in) override;
  ParseResult ParseEof(size_t bytes) override;
  std::string_view reply_noun() const override { return "response"; }
  ParseResult ParseFailure(const boost::system::error_code& ec);
  // The response is complete (in the call's reply slot): done, or kHttpError if asked for.
  ParseResult Complete(bool keep_alive);
  // (Re)makes Beast's parser for the call's response, with the limits and HEAD's skip.
  void StartParser(Response& out);


  TransportOptions options_;
  std::string host_line_;      // "Host: <endpoint>\r\n"
  std::string default_lines_;  // host_line_ and the User-Agent line: what most requests add
  std::string write_buf_;  // the serialised request
  // Beast's parser, made for a response ParseSimpleResponse does not take (and kept until the
  // response is complete).
  std::optional<internal::ResponseParser> parser_;
  SinkStack* current_ = nullptr;
  bool head_ = false;  // the current request is a HEAD: its response has no body
  // The current request is a CONNECT: a 2xx response to it ends with its header, the connection
  // being a tunnel from there on (RFC 9112 6.3), and is the last on the connection.
  bool connect_ = false;
  // The current request carries `Connection: close`: its connection is not reused, whatever
  // the response says (RFC 9112 9.6: no request follows one with the close option).
  bool request_close_ = false;
  size_t interim_responses_ = 0;  // 1xx responses skipped for the current request
  // Header bytes of the current response Beast has consumed: it parses complete fields as they
  // come and checks its header limit against the bytes it has not consumed, so the limit it is
  // given shrinks by these to bound the whole header block.
  size_t header_consumed_ = 0;
};

// Provider of the HttpTransportSink. Throws like Validate(options), and kInvalidArgument
// naming the file when a TLS file cannot be loaded (MakeTlsContext).
SinkProvider HttpTransportProvider(TransportOptions options = {});

}  // namespace scales::http
