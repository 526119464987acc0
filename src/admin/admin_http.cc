#include "admin/admin_http.h"

#include <algorithm>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "scales/core/log.h"
#include "scales/http/message.h"

namespace scales::admin::internal {

// Why a session refuses a request. RefusalStatus() is the one place that gives each its status.
enum class Refusal {
  kMalformed,           // Beast's parser failed it: not a request as RFC 9112 has it
  kBadTarget,           // ParseTarget refused it
  kBadFraming,          // see CheckTransferCoding
  kRequestLineTooLong,  // no end of the request line within max_header_bytes
  kHeaderTooLarge,      // the header block, or the trailer section, over max_header_bytes
  kBodyTooLarge,        // the body over max_body_bytes, or a chunk-size line over max_header_bytes
  kUnsupportedCoding,   // see CheckTransferCoding
  kIncomplete,          // the client's end of stream in the middle of a request
  kTimedOut,            // the idle timeout in the middle of a request
  kOverloaded,          // the server is at its connection limit (Session::StartRefused)
};

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

constexpr std::string_view kIndex =
    "scales admin\n"
    "  /metrics             Prometheus text format 0.0.4\n"
    "  /admin/metrics.json  Finagle-style flat JSON\n"
    "  /admin/clients       live clients: options, sink stack, members (JSON)\n";

// The most a session reads at once: its buffer grows with what a client sends, up to
// max_header_bytes, rather than by that much at the first read.
constexpr size_t kMaxReadBytes = 64 * 1024;

// Whether `held` is nothing but empty lines (CRLF), the last one possibly cut short after its CR.
bool OnlyEmptyLines(std::string_view held) {
  while (held.starts_with("\r\n")) held.remove_prefix(2);
  return held.empty() || held == "\r";
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The path of a request target, without its query, percent-decoded; or why the target is
// refused.
struct TargetPath {
  std::string path;
  std::string error;  // empty when `path` is good
};

// Takes the origin form ("/a?q") and the absolute form ("http://host:port/a?q"), which RFC 9112
// 3.2.2 has servers accept (a client configured with a proxy sends it); its authority is ignored,
// as the Host field is. Escapes are decoded once the query is cut off, so an encoded '?' stays in
// the path. An encoded '/' is refused rather than decoded: /admin%2Fclients is one segment where
// /admin/clients is two, and a proxy in front that allows or denies by path would see them
// apart. An encoded NUL is refused too. Dot-segments are removed from the decoded path (an
// escaped '.' is a '.': RFC 3986 2.3), so that every spelling of a page reaches it.
TargetPath ParseTarget(std::string_view target) {
  TargetPath out;
  std::string_view path = target.substr(0, target.find('?'));
  if (!path.starts_with('/')) {
    const size_t scheme_end = path.find("://");
    const std::string_view scheme = path.substr(0, scheme_end);
    if (scheme_end == std::string_view::npos ||
        !(beast::iequals(scheme, "http") || beast::iequals(scheme, "https"))) {
      out.error =
          "request target is neither a path (/metrics) nor an http URL (http://host/metrics)";
      return out;
    }
    const size_t slash = path.find('/', scheme_end + 3);
    path = slash == std::string_view::npos ? std::string_view("/") : path.substr(slash);
  }
  out.path.reserve(path.size());
  for (size_t i = 0; i < path.size(); ++i) {
    if (path[i] != '%') {
      out.path += path[i];
      continue;
    }
    const int hi = i + 2 < path.size() ? HexDigit(path[i + 1]) : -1;
    const int lo = hi >= 0 ? HexDigit(path[i + 2]) : -1;
    if (lo < 0) {
      out.error = "malformed percent-escape in the path (% and two hex digits)";
    } else if (hi * 16 + lo == '/') {
      out.error = "encoded '/' (%2F) in the path";
    } else if (hi == 0 && lo == 0) {
      out.error = "encoded NUL (%00) in the path";
    }
    if (!out.error.empty()) return out;
    out.path += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  out.path = RemoveDotSegments(out.path);
  return out;
}

// A request with Transfer-Encoding must have chunked as its last coding, once, or its body has no
// known end (RFC 9112 6.1: 400; Beast's chunked() tells), and the admin server decodes no other
// coding (501, which RFC 9112 6.1 has for a coding the server does not implement).
std::optional<std::pair<Refusal, std::string>> CheckTransferCoding(
    const http::request_parser<http::string_body>& parser) {
  const auto [begin, end] = parser.get().equal_range(http::field::transfer_encoding);
  if (begin == end) return std::nullopt;
  if (!parser.chunked()) {
    return std::pair(Refusal::kBadFraming,
                     std::string("Transfer-Encoding without chunked as its last coding"));
  }
  for (auto field = begin; field != end; ++field) {
    std::string_view codings = field->value();
    while (!codings.empty()) {
      const size_t comma = std::min(codings.find(','), codings.size());
      std::string_view coding = codings.substr(0, std::min(codings.find(';'), comma));
      codings.remove_prefix(std::min(comma + 1, codings.size()));
      const size_t first = coding.find_first_not_of(" \t");
      if (first == std::string_view::npos) continue;  // an empty list element
      coding = coding.substr(first, coding.find_last_not_of(" \t") + 1 - first);
      if (!beast::iequals(coding, "chunked")) {
        return std::pair(Refusal::kUnsupportedCoding,
                         fmt::format("transfer-coding {} not supported (only chunked)", coding));
      }
    }
  }
  return std::nullopt;
}

http::status RefusalStatus(Refusal why) {
  switch (why) {
    case Refusal::kMalformed:
    case Refusal::kBadTarget:
    case Refusal::kBadFraming:
    case Refusal::kIncomplete:
      return http::status::bad_request;
    case Refusal::kTimedOut:
      return http::status::request_timeout;
    case Refusal::kRequestLineTooLong:
      return http::status::uri_too_long;
    case Refusal::kHeaderTooLarge:
      return http::status::request_header_fields_too_large;
    case Refusal::kBodyTooLarge:
      return http::status::payload_too_large;
    case Refusal::kUnsupportedCoding:
      return http::status::not_implemented;
    case Refusal::kOverloaded:
      return http::status::service_unavailable;
  }
  return http::status::bad_request;
}

}  // namespace

// The RFC's loop over an input buffer (rules A to E), the input a view that only shrinks from
// the front: rules B and C replace a prefix with "/", which is its last character.
std::string RemoveDotSegments(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  // Rule C: the last segment of the output goes, with the '/' before it if any.
  const auto drop_last_segment = [&out] {
    const size_t slash = out.rfind('/');
    out.resize(slash == std::string::npos ? 0 : slash);
  };
  while (!in.empty()) {
    if (in.starts_with("../")) {  // A
      in.remove_prefix(3);
    } else if (in.starts_with("./")) {  // A
      in.remove_prefix(2);
    } else if (in.starts_with("/./") || in == "/.") {  // B
      in.remove_prefix(2);
      if (in.empty()) in = "/";
    } else if (in.starts_with("/../") || in == "/..") {  // C
      in.remove_prefix(3);
      if (in.empty()) in = "/";
      drop_last_segment();
    } else if (in == "." || in == "..") {  // D
      in = {};
    } else {  // E: the first segment, with its leading '/' if any
      const size_t end = std::min(in.find('/', 1), in.size());
      out.append(in.substr(0, end));
      in.remove_prefix(end);
    }
  }
  return out;
}

Response Route(std::string_view path, const Pages& pages) {
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
      idle_timer_(stream_.get_executor()),
      limits_(limits),
      buffer_(limits.max_header_bytes),
      handler_(handler) {}

void Session::StartRefused(std::string what) { Refuse(Refusal::kOverloaded, std::move(what)); }

void Session::Close() {
  StopIdleTimer();
  beast::error_code ignored;
  stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  stream_.close();
}

void Session::Read() {
  parser_.emplace();
  parser_->body_limit(limits_.max_body_bytes);
  parser_->eager(true);
  header_bytes_ = 0;
  empty_line_bytes_ = 0;
  stream_.expires_never();  // the write's deadline is over; the idle timer bounds the reads
  idle_expired_ = false;
  idle_timer_.expires_after(limits_.idle_timeout);
  // Holds the session weakly: a session whose read ended goes away without waiting for it.
  idle_timer_.async_wait([weak = weak_from_this(), id = ++idle_id_](beast::error_code ec) {
    const auto self = weak.lock();
    if (ec || !self || self->idle_id_ != id) return;
    self->idle_expired_ = true;
    beast::error_code ignored;
    self->stream_.socket().cancel(ignored);  // the read ends with operation_aborted
  });
  Parse();
}

// Not http::async_read: Beast bounds the request line and the fields by its header limit each,
// not together (a block of twice the limit passes), and bounds neither a chunk-size line nor the
// trailer section, which it keeps unconsumed until they end (a client that never ends one would
// fill the buffer, and memory, for as long as the idle timeout lets it send).
void Session::Parse() {
  const size_t limit = limits_.max_header_bytes;
  while (buffer_.size() > 0) {
    if (!parser_->got_some()) {
      // RFC 9112 2.2: a server SHOULD ignore empty lines before a request line. They are no part
      // of a request, but they count towards its header block: an endless stream of them ends.
      SkipEmptyLines();
      if (header_bytes_ >= limit) return RefuseOversized();
      if (!PartlyReceived()) break;  // empty lines only, the last one maybe cut short
    }
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
    // Before the body (which an eager put may have read some of already, or all): whether it
    // can be read at all.
    if (in_header && parser_->is_header_done()) {
      if (auto refusal = CheckTransferCoding(*parser_))
        return Refuse(refusal->first, std::move(refusal->second));
    }
    if (parser_->is_done()) return Answer();
    // The header ended within the capped bytes and the body needs the bytes cut off: they are
    // in the buffer. Otherwise, after need_more, Beast must be given more bytes than before.
    if (ec == http::error::need_more && capped && parser_->is_header_done()) continue;
    if (ec == http::error::header_limit) return RefuseOversized();
    if (ec == http::error::body_limit) {
      return Refuse(Refusal::kBodyTooLarge,
                    fmt::format("body over {} bytes", limits_.max_body_bytes));
    }
    if (ec && ec != http::error::need_more) {
      return Refuse(Refusal::kMalformed, fmt::format("malformed request ({})", ec.message()));
    }
    break;
  }
  if (!parser_->is_header_done() ? header_bytes_ + buffer_.size() >= limit
                                 : buffer_.size() >= limit) {
    return RefuseOversized();
  }
  stream_.async_read_some(buffer_.prepare(std::min(limit - buffer_.size(), kMaxReadBytes)),
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            self->buffer_.commit(n);
                            // Even if the read completed meanwhile: the deadline has passed.
                            if (self->idle_expired_) return self->TimedOut();
                            if (ec == asio::error::eof && self->PartlyReceived()) {
                              // A half-close: the client may still read the answer.
                              return self->Refuse(
                                  Refusal::kIncomplete,
                                  "request incomplete at the client's end of stream");
                            }
                            if (ec == asio::error::eof) ec = http::error::end_of_stream;
                            if (ec) return self->Fail(ec, "reading a request failed");
                            self->Parse();
                          });
}

void Session::StopIdleTimer() {
  ++idle_id_;  // a firing already queued is stale
  idle_timer_.cancel();
}

void Session::SkipEmptyLines() {
  const std::string_view held(static_cast<const char*>(buffer_.data().data()), buffer_.size());
  const size_t left = limits_.max_header_bytes - header_bytes_;
  size_t n = 0;
  while (n + 2 <= left && held.substr(n).starts_with("\r\n")) n += 2;
  buffer_.consume(n);
  header_bytes_ += n;
  empty_line_bytes_ += n;
}

bool Session::PartlyReceived() const {
  return parser_->got_some() ||
         !OnlyEmptyLines(
             std::string_view(static_cast<const char*>(buffer_.data().data()), buffer_.size()));
}

void Session::TimedOut() {
  if (!PartlyReceived()) return Fail(beast::error::timeout, "waiting for a request");
  Refuse(Refusal::kTimedOut,
         fmt::format("request incomplete after {} ms (the idle timeout)",
                     std::chrono::duration_cast<std::chrono::milliseconds>(limits_.idle_timeout)
                         .count()));
}

void Session::Fail(beast::error_code ec, std::string_view what) {
  if (ec != http::error::end_of_stream && ec != beast::error::timeout &&
      ec != asio::error::operation_aborted) {
    SCALES_LOG_RATE_LIMITED(kInfo, 5, "admin server: {}: {}; connection closed", what,
                            ec.message());
  }
  Close();
}

void Session::Refuse(Refusal why, std::string what) {
  const http::status status = RefusalStatus(why);
  SCALES_LOG_RATE_LIMITED(kInfo, 5,
                          "admin server: refused a request with {}: {}; connection closed",
                          static_cast<unsigned>(status), what);
  // The answer to a HEAD has no body, once the request's header says it is one (none is read
  // before a 503 for the connection limit).
  const bool head =
      parser_ && parser_->is_header_done() && parser_->get().method() == http::verb::head;
  Response r;
  r.status = status;
  r.body = std::move(what) + "\n";
  // HTTP/1.1 whatever the request said (RFC 9110 6.2: the server's version; the request's may
  // not be known), and its last response: the rest of the connection cannot be trusted.
  Write(std::move(r), 11, /*keep_alive=*/false, head);
}

void Session::RefuseOversized() {
  const size_t limit = limits_.max_header_bytes;
  std::string_view held(static_cast<const char*>(buffer_.data().data()), buffer_.size());
  if (!parser_->is_header_done()) {
    if (!PartlyReceived()) {
      return Refuse(Refusal::kHeaderTooLarge,
                    fmt::format("empty lines before the request line over {} bytes", limit));
    }
    const std::string empty_lines =
        empty_line_bytes_ == 0
            ? std::string()
            : fmt::format(" (with {} bytes of empty lines before the request line)",
                          empty_line_bytes_);
    // Beast consumes the request line with the fields, or alone once it has read it, never
    // part of it: none consumed and no line end in what is left of the limit is a request line
    // over the limit, almost always for its target.
    if (header_bytes_ == empty_line_bytes_ &&
        held.substr(0, limit - header_bytes_).find('\n') == std::string_view::npos) {
      return Refuse(Refusal::kRequestLineTooLong,
                    fmt::format("request line over {} bytes{}", limit, empty_lines));
    }
    return Refuse(Refusal::kHeaderTooLarge,
                  fmt::format("header block over {} bytes{}", limit, empty_lines));
  }
  // Beast keeps a chunk-size line unconsumed until it ends (after the CRLF that ends the chunk
  // before it), and the last chunk's line until the trailer section ends too: a line end past
  // that CRLF means the trailer section.
  if (held.starts_with("\r\n")) held.remove_prefix(2);
  if (held.find("\r\n") == std::string_view::npos) {
    return Refuse(Refusal::kBodyTooLarge, fmt::format("chunk-size line over {} bytes", limit));
  }
  return Refuse(Refusal::kHeaderTooLarge, fmt::format("trailer section over {} bytes", limit));
}

void Session::Answer() {
  const auto& req = parser_->get();
  const bool head = req.method() == http::verb::head;
  if (!head && req.method() != http::verb::get) {
    Response r;
    r.status = http::status::method_not_allowed;
    r.body = "only GET and HEAD are supported\n";
    return Write(std::move(r), req.version(), req.keep_alive(), /*head=*/false, "GET, HEAD");
  }
  TargetPath target = ParseTarget(req.target());
  if (!target.error.empty()) return Refuse(Refusal::kBadTarget, std::move(target.error));
  Write((*handler_)(target.path), req.version(), req.keep_alive(), head);
}

void Session::Write(Response r, unsigned version, bool keep_alive, bool head,
                    std::string_view allow) {
  auto res = std::make_shared<http::response<http::string_body>>(r.status, version);
  res->keep_alive(keep_alive);
  res->set(http::field::server, "scales-admin");
  if (!allow.empty()) res->set(http::field::allow, allow);
  // RFC 9110's name; Beast has RFC 7231's (Payload Too Large).
  if (r.status == http::status::payload_too_large) res->reason("Content Too Large");
  res->set(http::field::content_type, r.content_type);
  if (head) {
    res->content_length(r.body.size());
  } else {
    res->body() = std::move(r.body);
    res->prepare_payload();
  }
  StopIdleTimer();
  stream_.expires_after(
      limits_.write_timeout);  // its own deadline, not what the read left of its own
  http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
    if (ec) return self->Close();
    if (!res->keep_alive()) return self->Linger();
    self->Read();
  });
}

void Session::Linger() {
  beast::error_code ec;
  stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_send, ec);
  if (ec) return Close();
  buffer_.clear();
  stream_.expires_after(limits_.linger_timeout);
  DropUntilClosed();
}

void Session::DropUntilClosed() {
  // Into the buffer's free space, never committed: dropped.
  stream_.async_read_some(buffer_.prepare(std::min(limits_.max_header_bytes, kMaxReadBytes)),
                          [self = shared_from_this()](beast::error_code ec, size_t) {
                            if (ec) return self->Close();
                            self->DropUntilClosed();
                          });
}

}  // namespace scales::admin::internal
