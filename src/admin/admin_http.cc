#include "admin/admin_http.h"

#include <algorithm>
#include <cstdint>
#include <exception>
#include <utility>

#include <fmt/format.h>

#include "scales/core/log.h"
#include "scales/http/message.h"

namespace scales::admin::internal {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

constexpr std::string_view kIndex =
    "scales admin\n"
    "  /metrics             Prometheus text format 0.0.4\n"
    "  /admin/metrics.json  Finagle-style flat JSON\n"
    "  /admin/clients       live clients: options, sink stack, members (JSON)\n";

}  // namespace

Response Route(std::string_view target, const Pages& pages) {
  std::string_view path = target.substr(0, target.find('?'));
  Response r;
  try {
    if (path == "/metrics") {
      r.content_type = std::string(stats::StatsRegistry::kPrometheusContentType);
      r.body = pages.stats->ToPrometheus();
    } else if (path == "/admin/metrics.json") {
      r.content_type = "application/json";
      r.body = pages.stats->ToJson();
    } else if (path == "/admin/clients") {
      r.content_type = "application/json";
      r.body = pages.clients();
    } else if (path == "/" || path == "/admin") {
      r.body = std::string(kIndex);
    } else {
      r.status = http::status::not_found;
      r.body = fmt::format("no such path: {}\n{}", path, kIndex);
    }
  } catch (const std::exception& e) {
    SCALES_LOG_RATE_LIMITED(kError, 1, "admin server: {} failed: {}", path, e.what());
    r = Response{http::status::internal_server_error, "text/plain; charset=utf-8",
                 fmt::format("{} failed: {}\n", path, e.what())};
  }
  return r;
}

Session::Session(asio::ip::tcp::socket socket, const Handler* handler, SessionLimits limits)
    : stream_(std::move(socket)),
      limits_(limits),
      buffer_(limits.max_header_bytes),
      handler_(handler) {}

void Session::Close() {
  beast::error_code ignored;
  stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  stream_.close();
}

void Session::Read() {
  parser_.emplace();
  parser_->body_limit(limits_.max_body_bytes);
  parser_->eager(true);
  header_bytes_ = 0;
  stream_.expires_after(limits_.idle_timeout);
  Parse();
}

// Not http::async_read: Beast bounds the request line and the fields by its header limit each,
// not together (a block of twice the limit passes), and bounds neither a chunk-size line nor the
// trailer section, which it keeps unconsumed until they end (a client that never ends one would
// fill the buffer, and memory, for as long as the idle timeout lets it send).
void Session::Parse() {
  const size_t limit = limits_.max_header_bytes;
  while (buffer_.size() > 0) {
    const bool in_header = !parser_->is_header_done();
    auto data = buffer_.data();
    bool capped = false;
    if (in_header) {
      // No more than is left of the limit for the block: it ends within that or not at all.
      const size_t left = limit - header_bytes_;
      parser_->header_limit(static_cast<uint32_t>(std::min<size_t>(left, UINT32_MAX)));
      capped = data.size() > left;
      data = asio::buffer(data, left);
    }
    // A last chunk Beast must see again with more bytes (scales/http/message.h); a malformed
    // chunk line is not held back: Beast fails it at once.
    if (!in_header && parser_->chunked() &&
        scales::http::internal::HoldBackShortLastChunk(
            std::string_view(static_cast<const char*>(data.data()), data.size()))) {
      break;
    }
    beast::error_code ec;
    const size_t n = parser_->put(data, ec);
    buffer_.consume(n);
    if (in_header && !parser_->is_header_done()) header_bytes_ += n;
    if (parser_->is_done()) return Answer();
    // The header ended within the capped bytes and the body needs the bytes cut off: they are
    // in the buffer. Otherwise, after need_more, Beast must be given more bytes than before.
    if (ec == http::error::need_more && capped && parser_->is_header_done()) continue;
    if (ec && ec != http::error::need_more) return Fail(ec, "reading a request failed");
    break;
  }
  if (!parser_->is_header_done() ? header_bytes_ + buffer_.size() >= limit
                                 : buffer_.size() >= limit) {
    return Fail(
        http::error::header_limit,
        parser_->is_header_done()
            ? fmt::format("a chunk-size line or the trailer section exceeds {} bytes", limit)
            : fmt::format("a request's header block exceeds {} bytes", limit));
  }
  stream_.async_read_some(buffer_.prepare(limit - buffer_.size()),
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            self->buffer_.commit(n);
                            if (ec == asio::error::eof) {
                              ec = self->parser_->got_some() ? http::error::partial_message
                                                             : http::error::end_of_stream;
                            }
                            if (ec) return self->Fail(ec, "reading a request failed");
                            self->Parse();
                          });
}

void Session::Fail(beast::error_code ec, std::string_view what) {
  if (ec != http::error::end_of_stream && ec != beast::error::timeout &&
      ec != asio::error::operation_aborted) {
    SCALES_LOG_RATE_LIMITED(kInfo, 5, "admin server: {}: {}; connection closed", what,
                            ec.message());
  }
  Close();
}

void Session::Answer() {
  const auto& req = parser_->get();
  auto res = std::make_shared<http::response<http::string_body>>();
  res->version(req.version());
  res->keep_alive(req.keep_alive());
  res->set(http::field::server, "scales-admin");
  Response r;
  if (req.method() != http::verb::get && req.method() != http::verb::head) {
    r.status = http::status::method_not_allowed;
    r.body = "only GET and HEAD are supported\n";
    res->set(http::field::allow, "GET, HEAD");
  } else {
    r = (*handler_)(std::string(req.target()));
  }
  res->result(r.status);
  res->set(http::field::content_type, r.content_type);
  if (req.method() == http::verb::head) {
    res->content_length(r.body.size());
  } else {
    res->body() = std::move(r.body);
    res->prepare_payload();
  }
  stream_.expires_after(
      limits_.write_timeout);  // its own deadline, not what the read left of its own
  http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
    if (ec || !res->keep_alive()) return self->Close();
    self->Read();
  });
}

}  // namespace scales::admin::internal
