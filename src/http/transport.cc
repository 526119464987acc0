#include "scales/http/transport.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <iterator>
#include <optional>
#include <string_view>

#include <boost/beast/http/error.hpp>
#include <boost/beast/http/rfc7230.hpp>
#include <fmt/format.h>

#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"
#include "scales/http/message.h"

namespace scales::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using namespace std::string_view_literals;

namespace {

// The start of a response body for an error message: CR and LF become spaces, other control
// characters and DEL are escaped (a NUL would end what(), an escape sequence reach the terminal
// the log goes to; error bodies may be binary, compressed for one).
std::string Snippet(std::string_view body, size_t max = 200) {
  std::string s;
  s.reserve(std::min(body.size(), max) + 3);
  for (unsigned char c : body.substr(0, max)) {
    if (c == '\n' || c == '\r') {
      s.push_back(' ');
    } else if ((c < 0x20 && c != '\t') || c == 0x7f) {
      fmt::format_to(std::back_inserter(s), "\\x{:02x}", c);
    } else {
      s.push_back(static_cast<char>(c));
    }
  }
  if (body.size() > max) s += "...";
  return s;
}

// B3 propagation headers (https://github.com/openzipkin/b3-propagation): 16 lower-hex digits
// per id; a 128-bit trace id is 32 (high half first).
void AppendB3Headers(std::string& out, const TraceContext& t) {
  auto it = std::back_inserter(out);
  if (t.trace_id_high != 0) {
    fmt::format_to(it, "X-B3-TraceId: {:016x}{:016x}\r\n", t.trace_id_high, t.trace_id);
  } else {
    fmt::format_to(it, "X-B3-TraceId: {:016x}\r\n", t.trace_id);
  }
  fmt::format_to(it, "X-B3-SpanId: {:016x}\r\n", t.span_id);
  if (t.parent_id != 0 && t.parent_id != t.span_id) {
    fmt::format_to(it, "X-B3-ParentSpanId: {:016x}\r\n", t.parent_id);
  }
  if (t.flags & 1) {
    out += "X-B3-Flags: 1\r\n";  // debug implies sampled
  } else if (t.flags & 2) {
    out += (t.flags & 4) ? "X-B3-Sampled: 1\r\n" : "X-B3-Sampled: 0\r\n";
  }
}

// A B3 header: the multi-header form's five and the single `b3` header. With b3_headers on, the
// caller's own (forwarded from an upstream request, say) are dropped for the call's, as
// Finagle's HTTP client does: two X-B3-TraceId values leave the server to pick one.
bool IsB3Header(std::string_view name) noexcept {
  if (HeaderNameEquals(name, "b3")) return true;
  if (name.size() < 5 || !HeaderNameEquals(name.substr(0, 5), "x-b3-")) return false;
  const std::string_view rest = name.substr(5);
  return HeaderNameEquals(rest, "traceid") || HeaderNameEquals(rest, "spanid") ||
         HeaderNameEquals(rest, "parentspanid") || HeaderNameEquals(rest, "sampled") ||
         HeaderNameEquals(rest, "flags");
}

constexpr std::string_view kUserAgentLine = "User-Agent: scales/0.1\r\n";

// A token (RFC 9110 5.6.2): what a method and a header name may be. A table, as it runs for
// the method and every header name of every request.
constexpr std::array<bool, 256> kTokenChars = [] {
  std::array<bool, 256> t{};
  for (int c = 33; c < 127; ++c) t[static_cast<size_t>(c)] = true;
  for (char c : std::string_view("\"(),/:;<=>?@[\\]{}")) t[static_cast<unsigned char>(c)] = false;
  return t;
}();

bool IsToken(std::string_view s) noexcept {
  if (s.empty()) return false;
  for (unsigned char c : s) {
    if (!kTokenChars[c]) return false;
  }
  return true;
}

// No CR, LF or NUL: a value that cannot end the line it is on.
bool IsFieldValue(std::string_view s) noexcept {
  return s.find_first_of(std::string_view("\r\n\0", 3)) == std::string_view::npos;
}

bool IsTarget(std::string_view s) noexcept {
  if (s.empty()) return false;
  for (unsigned char c : s) {
    if (c <= 32 || c == 127) return false;
  }
  return true;
}

// A refused method, target or header name as an error message quotes it: control characters
// and DEL escaped (a NUL would end what(), a CR or LF split the message and the log line it
// goes to), at most `max` bytes.
std::string Quoted(std::string_view s, size_t max = 200) {
  std::string out;
  for (unsigned char c : s.substr(0, max)) {
    if (c == '\r') {
      out += "\\r";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7f) {
      fmt::format_to(std::back_inserter(out), "\\x{:02x}", c);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (s.size() > max) out += "...";
  return out;
}

}  // namespace

namespace internal {

bool IsAbsoluteFormTarget(std::string_view target) noexcept {
  const size_t colon = target.find("://");
  if (colon == 0 || colon == std::string_view::npos) return false;
  auto alpha = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  if (!alpha(target[0])) return false;
  for (char c : target.substr(1, colon - 1)) {
    if (!alpha(c) && !(c >= '0' && c <= '9') && c != '+' && c != '-' && c != '.') return false;
  }
  return true;
}

std::string HeaderProblem(std::string_view name, std::string_view value) {
  if (!IsToken(name)) return fmt::format("the header name '{}' is not an HTTP token", Quoted(name));
  if (!IsFieldValue(value)) return fmt::format("the value of header {} has a CR, LF or NUL", name);
  return {};
}

}  // namespace internal

void Validate(const TransportOptions& o) {
  auto fail = [](const std::string& what) { throw Error(make_error_code(Errc::kInvalidArgument), what); };
  if (o.connect_timeout < Duration::zero()) fail("transport.connect_timeout must be >= 0 (0 = no timeout)");
  if (o.max_response_header_bytes == 0) fail("transport.max_response_header_bytes must be > 0");
  if (o.max_response_body_bytes == 0) fail("transport.max_response_body_bytes must be > 0");
  Validate(o.tls);
}

namespace internal {
namespace {

// What ParseSimpleResponse takes in a reason phrase or a field value: SP, HTAB and visible
// ASCII. Anything else (obs-text, control characters, a bare CR or LF) is left to Beast.
constexpr std::array<bool, 256> kSimpleValueChars = [] {
  std::array<bool, 256> t{};
  for (int c = 0x20; c < 0x7f; ++c) t[static_cast<size_t>(c)] = true;
  t['\t'] = true;
  return t;
}();

// Scans a reason phrase or field value from `i` to its CR: returns the CR's index, or npos when
// a byte is not a simple value byte or the buffer ends first. Eight bytes at a time while none of
// them is below 0x20 or above 0x7e (the common case: no HTAB, no CR).
size_t ScanValue(std::string_view wire, size_t i) noexcept {
  constexpr std::uint64_t kOnes = 0x0101010101010101ULL;
  constexpr std::uint64_t kHighs = 0x8080808080808080ULL;
  for (;;) {
    while (i + 8 <= wire.size()) {
      std::uint64_t x;
      std::memcpy(&x, wire.data() + i, 8);
      const std::uint64_t below_space = (x - kOnes * 0x20) & ~x & kHighs;
      const std::uint64_t above_tilde = ((x + kOnes * 1) | x) & kHighs;
      if ((below_space | above_tilde) != 0) break;
      i += 8;
    }
    if (i >= wire.size()) return std::string_view::npos;
    const auto c = static_cast<unsigned char>(wire[i]);
    if (c == '\r') return i;
    if (!kSimpleValueChars[c]) return std::string_view::npos;
    ++i;
  }
}

// `name` (token characters, or a value without CR) equals the lower-case `lower` ignoring ASCII
// case: `| 0x20` maps only A-Z onto a-z among the bytes these can hold.
bool EqualsLower(std::string_view name, std::string_view lower) noexcept {
  if (name.size() != lower.size()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if ((static_cast<unsigned char>(name[i]) | 0x20) != static_cast<unsigned char>(lower[i])) return false;
  }
  return true;
}

}  // namespace

size_t ParseSimpleResponse(std::string_view wire, size_t header_limit, std::uint64_t body_limit, Response& out,
                           bool& keep_alive) {
  // "HTTP/1.x DDD " then the reason: 13 bytes before the reason.
  constexpr size_t kReasonAt = 13;
  if (wire.size() < kReasonAt + 4 || wire.substr(0, 7) != "HTTP/1."sv || (wire[7] != '0' && wire[7] != '1') ||
      wire[8] != ' ' || wire[12] != ' ') {
    return 0;
  }
  int status = 0;
  for (size_t i = 9; i < 12; ++i) {
    if (wire[i] < '0' || wire[i] > '9') return 0;
    status = status * 10 + (wire[i] - '0');
  }
  // 1xx, 204 and 304 have no body whatever their fields say.
  if (status < 200 || status == 204 || status == 304) return 0;
  // Only the header block (blank line included) under the limit is looked at.
  const std::string_view head = wire.substr(0, std::min(wire.size(), header_limit - 1));
  size_t cr = ScanValue(head, kReasonAt);
  if (cr == std::string_view::npos || cr + 1 >= head.size() || head[cr + 1] != '\n') return 0;

  auto decline = [&out] {
    out.reason.clear();
    out.headers.clear();
    return size_t{0};
  };
  out.reason.assign(head.data() + kReasonAt, cr - kReasonAt);
  out.headers.reserve(8);
  std::optional<std::uint64_t> content_length;
  bool close = false;
  bool keep = false;
  bool connection_seen = false;
  size_t i = cr + 2;
  for (;;) {
    if (i + 1 >= head.size()) return decline();  // incomplete, or over the limit
    if (head[i] == '\r') {
      if (head[i + 1] != '\n') return decline();
      i += 2;  // the blank line
      break;
    }
    // A token name (which also rules out obs-fold: a line starting with SP or HTAB), ':'.
    const size_t name_at = i;
    while (i < head.size() && kTokenChars[static_cast<unsigned char>(head[i])]) ++i;
    if (i == name_at || i >= head.size() || head[i] != ':') return decline();
    const std::string_view name = head.substr(name_at, i - name_at);
    ++i;
    while (i < head.size() && (head[i] == ' ' || head[i] == '\t')) ++i;
    cr = ScanValue(head, i);
    if (cr == std::string_view::npos || cr + 1 >= head.size() || head[cr + 1] != '\n') return decline();
    std::string_view value = head.substr(i, cr - i);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    i = cr + 2;
    if (EqualsLower(name, "content-length"sv)) {
      if (content_length || value.empty() || value.size() > 19) return decline();
      std::uint64_t n = 0;
      for (char c : value) {
        if (c < '0' || c > '9') return decline();
        n = n * 10 + static_cast<std::uint64_t>(c - '0');
      }
      content_length = n;
    } else if (EqualsLower(name, "transfer-encoding"sv) || EqualsLower(name, "proxy-connection"sv)) {
      return decline();  // Beast takes Proxy-Connection as Connection: its rules
    } else if (EqualsLower(name, "connection"sv)) {
      if (connection_seen) return decline();
      connection_seen = true;
      if (EqualsLower(value, "close"sv)) {
        close = true;
      } else if (EqualsLower(value, "keep-alive"sv)) {
        keep = true;
      } else {
        return decline();  // upgrade, lists of options: Beast's rules
      }
    }
    out.headers.emplace_back(std::piecewise_construct, std::forward_as_tuple(name.data(), name.size()),
                             std::forward_as_tuple(value.data(), value.size()));
  }
  const size_t body_at = i;
  if (!content_length || *content_length > body_limit || wire.size() - body_at < *content_length) {
    return decline();
  }
  out.status = status;
  out.body.assign(wire.data() + body_at, static_cast<size_t>(*content_length));
  keep_alive = wire[7] == '1' ? !close : keep && !close;
  return body_at + static_cast<size_t>(*content_length);
}

}  // namespace internal

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
      host_line_(fmt::format("Host: {}\r\n", HostHeader(ctx, options_))),
      default_lines_(host_line_ + std::string(kUserAgentLine)) {}

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
    auto m = MethodReturnMessage::Failure(stack.cancel_reason(),
                                          fmt::format("cancelled before the request was sent to {}", conn().address()));
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  // Serialised here rather than by Beast's serializer: one string, reused per connection,
  // written in one send.
  std::string& w = write_buf_;
  w.clear();
  auto bad = [&](std::string what) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kInvalidArgument),
                                          fmt::format("HTTP request to {} not sent: {}", conn().address(), what));
    stack.AsyncProcessResponse(nullptr, m);
  };
  if (!IsToken(req->method)) {
    return bad(fmt::format("the method '{}' is not an HTTP token", Quoted(req->method)));
  }
  if (!IsTarget(req->target)) {
    return bad(fmt::format("the target '{}' is empty or has spaces or control characters",
                           Quoted(req->target)));
  }
  // The forms of RFC 9112 3.2: a path ("/a?b"), an absolute URI, "*", and for CONNECT host:port.
  // Anything else ("a/b") a server answers with 400.
  if (req->target.front() != '/' && req->target != "*"sv && req->method != "CONNECT"sv &&
      !internal::IsAbsoluteFormTarget(req->target)) {
    return bad(fmt::format("the target '{}' is neither a path starting with '/', an absolute URI nor '*'",
                           Quoted(req->target)));
  }
  w.append(req->method);
  w.push_back(' ');
  w.append(req->target).append(" HTTP/1.1\r\n"sv);
  bool has_host = false;
  bool has_agent = false;
  request_close_ = false;
  const bool b3 = options_.b3_headers && msg.properties.trace.valid();
  auto add_headers = [&](const Headers& headers) {
    for (const auto& [name, value] : headers) {
      if (!IsToken(name) || !IsFieldValue(value)) {
        bad(internal::HeaderProblem(name, value));
        return false;
      }
      // The transport frames the body itself: a fixed Content-Length.
      if (HeaderNameEquals(name, "content-length") || HeaderNameEquals(name, "transfer-encoding")) continue;
      if (b3 && IsB3Header(name)) continue;
      if (HeaderNameEquals(name, "connection") && bhttp::token_list(value).exists("close")) request_close_ = true;
      if (HeaderNameEquals(name, "host")) {
        if (has_host) {
          // A server must answer 400 to a request with two (RFC 9112 3.2).
          bad(fmt::format("it has a second Host header field ('{}'; the request's and the call's "
                          "headers together may have one)",
                          Quoted(value)));
          return false;
        }
        has_host = true;
      }
      has_agent = has_agent || HeaderNameEquals(name, "user-agent");
      w.append(name).append(": "sv).append(value).append("\r\n"sv);
    }
    return true;
  };
  if (!add_headers(req->headers) || !add_headers(msg.properties.headers)) return;
  if (b3) AppendB3Headers(w, msg.properties.trace);
  if (!has_host && !has_agent) {
    w.append(default_lines_);  // the usual case: one append
  } else if (!has_host) {
    w.append(host_line_);
  } else if (!has_agent) {
    w.append(kUserAgentLine);
  }
  const std::string_view method = req->method;
  if (!req->body.empty() || method == "POST"sv || method == "PUT"sv || method == "PATCH"sv) {
    fmt::format_to(std::back_inserter(w), "Content-Length: {}\r\n", req->body.size());
  }
  w.append("\r\n"sv);
  if (!req->body.empty()) w.append(req->body);

  current_ = &stack;
  BeginRequest();
  stack.SetCancelHandler(this, nullptr);
  auto& out = *msg.reply_slot<Response>();
  out.status = 0;
  out.reason.clear();
  out.headers.clear();
  out.body.clear();
  parser_.reset();
  head_ = method == "HEAD"sv;
  connect_ = method == "CONNECT"sv;
  Exchange(w, /*expect_reply=*/true);
}

ConnectionSink::ParseResult HttpTransportSink::ParseReply(boost::beast::flat_buffer& in) {
  if (!parser_) {
    auto& out = *current_->message().reply_slot<Response>();
    if (!head_ && !connect_) {
      const auto data = in.data();
      bool keep_alive = false;
      const size_t used = internal::ParseSimpleResponse(
          std::string_view(static_cast<const char*>(data.data()), data.size()), options_.max_response_header_bytes,
          options_.max_response_body_bytes, out, keep_alive);
      if (used > 0) {
        in.consume(used);
        return Complete(keep_alive);
      }
    }
    interim_responses_ = 0;
    StartParser(out);
  }
  for (;;) {
    while (!parser_->is_done()) {
      if (connect_ && !parser_->got_some()) {
        // Whether the response has a body depends on its status: a 2xx has none, whatever its
        // header says. Beast skips a body only if told before its first byte.
        const auto data = in.data();
        constexpr size_t kStatusAt = 9;  // "HTTP/1.1 200"
        if (data.size() <= kStatusAt) return ParseResult::NeedMore();
        if (static_cast<const char*>(data.data())[kStatusAt] == '2') parser_->skip(true);
      }
      const bool in_header = !parser_->is_header_done();
      auto data = in.data();
      bool capped = false;
      bool at_limit = false;  // the header bytes given reach the limit given to Beast
      if (in_header) {
        // What is left of the limit for the header block's bytes still to come.
        const size_t limit = options_.max_response_header_bytes;
        if (header_consumed_ >= limit) return ParseFailure(bhttp::error::header_limit);
        const size_t left = limit - header_consumed_;
        parser_->header_limit(static_cast<std::uint32_t>(std::min<size_t>(left, UINT32_MAX)));
        // Beast holds the status line and the fields to its header limit each, apart: given
        // more bytes than are left of the limit, one put() could take a block of up to twice
        // it. Given no more, the block ends within the limit or not at all (need_more, below).
        capped = data.size() > left;
        data = boost::asio::buffer(data, left);
        at_limit = data.size() >= std::min<size_t>(left, UINT32_MAX);
      }
      // A last chunk Beast must see again with more bytes (a malformed chunk line is not held
      // back: Beast fails it at once).
      if (!in_header && parser_->chunked() &&
          internal::HoldBackShortLastChunk(std::string_view(static_cast<const char*>(data.data()), data.size()))) {
        return ParseResult::NeedMore();
      }
      boost::system::error_code ec;
      const size_t n = parser_->put(data, ec);
      in.consume(n);
      if (in_header && !parser_->is_header_done()) header_consumed_ += n;
      // The header ended within the capped bytes, and what follows (a chunk-size line cut by
      // the cap) needs more of them: they are in `in`, and the next put() gives them all. Not
      // when nothing was cut: Beast must not be given the same bytes again after need_more
      // (it asserts that a final chunk's next put() brings more).
      if (capped && parser_->is_header_done() && ec == bhttp::error::need_more) continue;
      if (ec == bhttp::error::need_more || (!ec && n == 0)) {
        // An unfinished header block that has reached the limit cannot end within it. Beast
        // says so only while the limit it was given exceeds what it holds unconsumed; with the
        // limit shrunk by the consumed bytes it would wait for ever instead.
        if (!parser_->is_header_done() && header_consumed_ + in.size() >= options_.max_response_header_bytes) {
          return ParseFailure(bhttp::error::header_limit);
        }
        // Beast keeps a chunk-size line (with its extensions) or the trailer section unconsumed
        // until it ends, and bounds neither: a server that never ends one would fill memory.
        if (parser_->is_header_done() && in.size() > options_.max_response_header_bytes) {
          return ParseResult::Failed(
              make_error_code(Errc::kResponseTooLarge),
              fmt::format("response from {}: a chunk-size line or the trailer section exceeds "
                          "max_response_header_bytes ({} bytes)",
                          conn().address(), options_.max_response_header_bytes));
        }
        return ParseResult::NeedMore();
      }
      if (ec == bhttp::error::header_limit && !at_limit) {
        // Not the header block (nor a trailer section) over the limit, which Beast says only
        // when given bytes up to it: Beast unfolds a field value folded over several lines
        // (obs-fold, RFC 9112 5.2) into a buffer of its own, and fails a longer one so.
        return ParseResult::Failed(
            make_error_code(Errc::kResponseTooLarge),
            fmt::format("response from {}: a header field folded over several lines (obs-fold) exceeds {} bytes "
                        "unfolded (the parser's own limit)",
                        conn().address(), bhttp::detail::basic_parser_base::max_obs_fold));
      }
      if (ec) return ParseFailure(ec);
    }
    auto& out = *current_->message().reply_slot<Response>();
    // A status under 100 is invalid, and taken as a server error (RFC 9110 15), not skipped.
    if (out.status >= 200 || out.status < 100) break;
    // An interim response (RFC 9110 15.2): "100 Continue" (nginx sends it for
    // `Expect: 100-continue` even when the body came along), "103 Early Hints", ... The final
    // response follows on the same connection: skip this one and parse that.
    if (out.status == 101) {
      return ParseResult::Failed(make_error_code(Errc::kProtocolError),
                                 fmt::format("{} switched protocols (101 {}), which the request did not ask for",
                                             conn().address(), out.reason));
    }
    if (++interim_responses_ > options_.max_interim_responses) {
      return ParseResult::Failed(make_error_code(Errc::kProtocolError),
                                 fmt::format("{} sent more than {} interim (1xx) responses before the response "
                                             "(limit transport.max_interim_responses)",
                                             conn().address(), options_.max_interim_responses));
    }
    out.status = 0;
    out.reason.clear();
    out.headers.clear();
    out.body.clear();
    StartParser(out);
  }
  // After a 2xx response to CONNECT the connection is a tunnel, not for another request.
  const bool tunnel = connect_ && current_->message().reply_slot<Response>()->status / 100 == 2;
  const bool keep_alive = parser_->reusable() && !tunnel;
  parser_.reset();
  return Complete(keep_alive);
}

void HttpTransportSink::StartParser(Response& out) {
  header_consumed_ = 0;
  parser_.emplace(out);
  parser_->eager(true);
  parser_->header_limit(static_cast<std::uint32_t>(std::min<size_t>(options_.max_response_header_bytes, UINT32_MAX)));
  parser_->body_limit(options_.max_response_body_bytes);
  if (head_) parser_->skip(true);
}

ConnectionSink::ParseResult HttpTransportSink::ParseEof(size_t bytes) {
  boost::system::error_code ec = bhttp::error::end_of_stream;  // nothing of the response came
  if (parser_ && parser_->got_some()) {
    ec = {};
    parser_->put_eof(ec);  // completes a body that ends with the connection
    if (!ec && parser_->is_done()) {
      parser_.reset();
      return Complete(/*keep_alive=*/false);
    }
    if (!ec) ec = bhttp::error::partial_message;
  }
  return ParseResult::Failed(make_error_code(Errc::kConnectionClosed),
                             fmt::format("connection to {} closed by the server while reading the response "
                                         "(after {} bytes): {}",
                                         conn().address(), bytes, ec.message()));
}

ConnectionSink::ParseResult HttpTransportSink::ParseFailure(const boost::system::error_code& ec) {
  if (ec == bhttp::error::body_limit) {
    return ParseResult::Failed(make_error_code(Errc::kResponseTooLarge),
                               fmt::format("response body from {} exceeds max_response_body_bytes ({} bytes)",
                                           conn().address(), options_.max_response_body_bytes));
  }
  if (ec == bhttp::error::header_limit) {
    return ParseResult::Failed(make_error_code(Errc::kResponseTooLarge),
                               fmt::format("response headers from {} exceed max_response_header_bytes ({} bytes)",
                                           conn().address(), options_.max_response_header_bytes));
  }
  return ParseResult::Failed(make_error_code(Errc::kProtocolError),
                             fmt::format("malformed HTTP response from {}: {}", conn().address(), ec.message()));
}

ConnectionSink::ParseResult HttpTransportSink::Complete(bool keep_alive) {
  const auto& out = *current_->message().reply_slot<Response>();
  auto r = ParseResult::Done(keep_alive && !request_close_);
  if (options_.raise_on_http_error && (out.status >= 400 || out.status < 100)) {
    const auto* req = current_->message().payload<Request>();
    r.ec = make_error_code(Errc::kHttpError);
    r.detail = fmt::format("HTTP {} {} from {} for {} {}: {}", out.status, out.reason, conn().address(), req->method,
                           req->target, Snippet(out.body));
  }
  return r;
}

void HttpTransportSink::Finish(error_code ec, std::string detail) {
  SinkStack* s = current_;
  current_ = nullptr;
  parser_.reset();  // it refers to the call's response
  TrimRequestBuffer(write_buf_);
  MethodReturnMessage m{ec, std::move(detail), {}};
  s->AsyncProcessResponse(nullptr, m);
}

void HttpTransportSink::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  if (current_ != &stack) return;
  std::string detail = writing() ? fmt::format("while sending the request to {}", conn().address())
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
  ProviderSettings settings = {
      {"connect_timeout", SettingText(options.connect_timeout)},
      {"max_response_header_bytes", SettingText(options.max_response_header_bytes)},
      {"max_response_body_bytes", SettingText(options.max_response_body_bytes)},
      {"max_interim_responses", SettingText(options.max_interim_responses)},
      {"raise_on_http_error", SettingText(options.raise_on_http_error)},
      {"b3_headers", SettingText(options.b3_headers)},
      {"tls", SettingText(options.tls.enabled)},
  };
  if (options.tls.enabled) {
    tls_context = MakeTlsContext(options.tls);
    AppendTlsFileSettings(options.tls, settings);
  }
  return SinkProvider{std::string(roles::kTransport), "http-transport",
                      [options, tls_context](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return std::make_shared<HttpTransportSink>(ctx, options);
                      },
                      std::move(settings)};
}

}  // namespace scales::http
