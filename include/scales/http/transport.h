#pragma once
// HttpTransportSink: one HTTP/1.1 keep-alive connection carrying one request at a time
// (pooled by the WatermarkPool). Beast parses and serialises; limits on header and body size
// protect the client. While idle, the connection watches its socket so that a server closing
// a keep-alive connection is noticed before the connection is reused. With `tls.enabled` the
// connection is HTTPS: TLS from the first byte (see docs/tls.md).

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
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
  // Status >= 400 completes the call with kHttpError (detail: status, reason, start of the
  // body) instead of returning the response. Default true, as in scales.
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
  using BeastRequest = boost::beast::http::request<boost::beast::http::string_body>;
  using BeastParser = boost::beast::http::response_parser<boost::beast::http::string_body>;

  std::shared_ptr<HttpTransportSink> self() {
    return std::static_pointer_cast<HttpTransportSink>(shared_from_this());
  }
  void OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes);
  void OnRead(uint64_t generation, const boost::system::error_code& ec, size_t bytes);

  TransportOptions options_;
  std::string host_header_;
  boost::beast::flat_buffer buffer_;
  BeastRequest request_;
  std::optional<BeastParser> parser_;
  SinkStack* current_ = nullptr;
  bool writing_ = false;
};

// Provider of the HttpTransportSink. Throws like Validate(options), and kInvalidArgument
// naming the file when a TLS file cannot be loaded (MakeTlsContext).
SinkProvider HttpTransportProvider(TransportOptions options = {});

}  // namespace scales::http
