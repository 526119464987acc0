// Fuzz target: the admin server's request handling (src/admin/admin_http.h, what AdminServer
// runs for each connection): Beast's request parser with the session's limits, the GET/HEAD
// check, the routing of the target to a page, keep-alive and pipelining, on a real loopback
// connection whose client is the fuzzer.
//
// Input: byte 0 holds flags: bit 0 = the client keeps its end open after its bytes (else it
// half-closes: end of stream), bit 1 = building /admin/clients throws, bits 4-7 = the size of
// the client's writes (fuzz::WriteSize: 0 is one write; after each the loop runs until the
// session has read it). The rest is what the client sends.
//
// The limits are tiny (128-byte header block, 64-byte body) so that short inputs and the seeds
// reach them (make_corpus.py has seeds just under and over each). A model reads the same bytes
// with Beast's request parser under the documented limits (a header block, a chunk-size line
// and a trailer section each within max_header_bytes; the body within max_body_bytes; empty
// lines before a request line dropped, counted towards its header block, RFC 9112 2.2), checks
// the transfer-codings, decodes the target's path and removes its dot-segments by its own reading
// of RFC 9112 and 3986, and says which requests the session must answer, which it must refuse
// with which status, and whether it must close. Checked:
// - the session answers exactly those requests, in order, then the refused one if any, and
//   nothing else: the bytes it sends parse as that many HTTP/1.x responses and no more;
// - each response: HTTP/1.1 (HTTP/1.0 to a 1.0 request), keep-alive as the request asked, a
//   Server and a Content-Type field; 405 with Allow for a method other than GET and HEAD; for
//   GET the page Route() builds for the decoded path (status and body), for HEAD its status and
//   its body's length and no body; 404 exactly for the paths that are not pages, 500 when the
//   page threw;
// - a refusal: HTTP/1.1 with "Connection: close", text/plain, a body naming the problem (its
//   length and no body to a HEAD), and the status the model gives (400 malformed or a bad
//   target, 414 or 431 a header block over the limit, 413 a body or chunk-size line over it, 431
//   a trailer section over it, 400 or 501 a transfer-coding other than chunked, 400 a request
//   cut short by the client's end of stream);
// - every answered request's header block is within the limit (counted on the bytes);
// - the connection is closed when the model says so (a request without keep-alive, a refused
//   request, the client's end of stream), and kept open otherwise; either way the session object
//   goes away once it is closed (after its linger: the client's end of stream, or a 1 ms
//   linger_timeout when the client keeps its end open).
// FUZZ_DEBUG=1 prints what the model expected and what came back.

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/buffer.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/http.hpp>

#include "admin/admin_http.h"
#include "loopback.h"

namespace {

using namespace scales;
using fuzz::Check;
namespace bhttp = boost::beast::http;
using admin::internal::Response;
using admin::internal::Session;
using admin::internal::SessionLimits;

constexpr size_t kMaxHeader = 128;
constexpr size_t kMaxBody = 64;

struct ModelRequest {
  bhttp::verb method;
  std::string path;  // decoded: what Route() is given
  unsigned version = 11;
  bool keep_alive = true;
  size_t begin = 0;  // offset of its first byte in the input (after the empty lines before it)
  size_t empty_lines = 0;  // bytes of empty lines (CRLF) before it, which count towards the limit
};

struct Model {
  std::vector<ModelRequest> requests;  // answered, in order
  bool closes = false;                 // the session closes after answering them
  // The statuses the session may refuse the request after them with, then closing; empty: it
  // refuses none.
  std::vector<unsigned> refusals;
  bool refused_head = false;  // the refused request is a HEAD: its answer has no body
  // It may also wait for more instead: the bytes after the last request are a malformed header
  // block and the connection stays open. Beast's parser, given a request line or fields in
  // pieces, waits for a blank line past the point where it stopped before it looks at them
  // again, so whether it sees the error now depends on how the bytes were cut into reads (it
  // sees it at the latest when the block reaches the limit, which it may then refuse as over
  // the limit).
  bool may_stay_open = false;
};

// The status of a header block that does not end within the limit: 414 when its request line
// (the block's first line, at `start`) does not either, in what the `empty_lines` before it left
// of the limit.
unsigned OversizedHeaderStatus(std::string_view bytes, size_t start, size_t empty_lines) {
  return bytes.substr(start, kMaxHeader - empty_lines).find('\n') == std::string_view::npos ? 414 : 431;
}

// Whether `rest` is empty lines only (CRLF), the last one maybe cut short after its CR: no part
// of a request (RFC 9112 2.2: ignored before a request line).
bool OnlyEmptyLines(std::string_view rest) {
  while (rest.starts_with("\r\n")) rest.remove_prefix(2);
  return rest.empty() || rest == "\r";
}

// The status of the refusal of an unfinished header block a parser given all of it at once
// fails (any parser given it in pieces fails it no sooner); 0 if it does not.
unsigned MalformedHeaderStatus(std::string_view block) {
  bhttp::request_parser<bhttp::string_body> p;
  p.header_limit(UINT32_MAX);
  p.body_limit(kMaxBody);
  boost::system::error_code ec;
  p.put(boost::asio::buffer(block), ec);
  if (!ec || ec == bhttp::error::need_more) return 0;
  return ec == bhttp::error::body_limit ? 413 : 400;
}

// RFC 9112 6.1: the codings of all the Transfer-Encoding fields must end in chunked, once, or the
// body has no known end (400; Beast's chunked() says whether they do); a coding besides chunked
// is one the session does not decode (501). 0: no refusal.
unsigned TransferCodingStatus(const bhttp::request_parser<bhttp::string_body>& p) {
  bool any = false;
  bool other = false;
  for (const auto& field : p.get()) {
    if (field.name() != bhttp::field::transfer_encoding) continue;
    any = true;
    std::istringstream list{std::string(field.value())};
    for (std::string element; std::getline(list, element, ',');) {
      element = element.substr(0, element.find(';'));
      const size_t first = element.find_first_not_of(" \t");
      if (first == std::string::npos) continue;
      element = element.substr(first, element.find_last_not_of(" \t") + 1 - first);
      for (char& c : element) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (element != "chunked") other = true;
    }
  }
  if (!any) return 0;
  if (!p.chunked()) return 400;
  return other ? 501 : 0;
}

// RFC 3986 5.2.4's result for a path starting with '/', by segments rather than by the RFC's
// loop: a "." goes, a ".." takes the segment before it along (none at the root), and either of
// them last leaves the path ending in '/'.
std::string ModelRemoveDotSegments(const std::string& path) {
  std::vector<std::string> kept;
  for (size_t begin = 1;;) {
    const size_t end = std::min(path.find('/', begin), path.size());
    const std::string segment = path.substr(begin, end - begin);
    const bool dots = segment == "." || segment == "..";
    if (segment == "..") {
      if (!kept.empty()) kept.pop_back();
    } else if (segment != ".") {
      kept.push_back(segment);
    }
    if (end == path.size()) {
      if (dots) kept.emplace_back();
      break;
    }
    begin = end + 1;
  }
  std::string out;
  for (const std::string& segment : kept) out += "/" + segment;
  return out;
}

// The path the session must route a GET or HEAD of `target` to: of the origin form, or of an
// http or https URL in absolute form (RFC 9112 3.2.2; "/" when it has none), without the query,
// each %XX decoded (RFC 3986 2.1), without dot-segments (5.2.4); nothing when the session must
// refuse the target: another form, a '%' without two hex digits, an escaped '/' or NUL.
std::optional<std::string> ModelPath(std::string target) {
  target = target.substr(0, target.find('?'));
  if (target.empty() || target[0] != '/') {
    std::string lower = target.substr(0, 8);
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    size_t authority;
    if (lower.starts_with("http://")) {
      authority = 7;
    } else if (lower.starts_with("https://")) {
      authority = 8;
    } else {
      return std::nullopt;
    }
    const size_t slash = target.find('/', authority);
    target = slash == std::string::npos ? "/" : target.substr(slash);
  }
  std::string path;
  for (size_t i = 0; i < target.size();) {
    if (target[i] != '%') {
      path += target[i++];
      continue;
    }
    if (i + 3 > target.size() || !std::isxdigit(static_cast<unsigned char>(target[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(target[i + 2]))) {
      return std::nullopt;
    }
    const char c = static_cast<char>(std::stoi(target.substr(i + 1, 2), nullptr, 16));
    if (c == '/' || c == '\0') return std::nullopt;
    path += c;
    i += 3;
  }
  return ModelRemoveDotSegments(path);
}

// What the session must do with `bytes` (followed by the end of stream when `eof`): reads them
// through a buffer that never holds more than kMaxHeader unparsed bytes (what is unparsed is
// part of a header block, a chunk-size line or a trailer section, each bounded by the header
// limit), drops the empty lines (CRLF) before each request line, counting them towards its header
// block (RFC 9112 2.2), gives the rest to a request parser with the body limit and refuses a
// request whose header block (counted as the parser consumes it) is over the header limit.
Model Expect(std::string_view bytes, bool eof) {
  Model m;
  size_t next = 0;   // the first input byte not yet read
  std::string held;  // read, not yet consumed by the parser
  size_t start = 0;  // offset of the current request (its request line)
  // The session refuses the current request with one of `statuses`, and closes.
  auto refuse = [&m](std::vector<unsigned> statuses, bool head) {
    m.closes = true;
    m.refusals = std::move(statuses);
    m.refused_head = head;
    return m;
  };
  for (;;) {
    bhttp::request_parser<bhttp::string_body> p;
    p.header_limit(UINT32_MAX);
    p.body_limit(kMaxBody);
    size_t header = 0;  // bytes of the header block consumed (empty lines before it included)
    // The empty lines before the request line: skipped while they fit the limit.
    for (;;) {
      if (held.size() < 2 && next < bytes.size()) {
        const size_t take = std::min(kMaxHeader - held.size(), bytes.size() - next);
        held.append(bytes.substr(next, take));
        next += take;
      }
      if (header + 2 > kMaxHeader || !held.starts_with("\r\n")) break;
      held.erase(0, 2);
      header += 2;
    }
    const size_t empty_lines = header;
    start = next - held.size();
    if (header >= kMaxHeader) {
      // Refused as soon as they reach it: as empty lines over the limit (431), or, when more of a
      // request has arrived by then, as a request line that does not end within what they left
      // of the limit (414).
      if (OnlyEmptyLines(bytes.substr(start))) return refuse({431}, false);
      return refuse({431, 414}, false);
    }
    for (;;) {
      // A CR that may begin one more empty line (the input's last byte) is held back.
      if (!held.empty() && (p.got_some() || held != "\r")) {
        // Not eager while in the header: the put that ends it consumes the header only.
        const bool in_header = !p.is_header_done();
        p.eager(!in_header);
        boost::system::error_code ec;
        const size_t n = p.put(boost::asio::buffer(held), ec);
        held.erase(0, n);
        if (in_header) header += n;
        if (header > kMaxHeader) return refuse({OversizedHeaderStatus(bytes, start, empty_lines)}, false);
        const bool head = p.is_header_done() && p.get().method() == bhttp::verb::head;
        if (in_header && p.is_header_done()) {
          if (const unsigned status = TransferCodingStatus(p)) return refuse({status}, head);
        }
        if (p.is_done()) break;
        if (ec && ec != bhttp::error::need_more) {
          if (p.is_header_done())
            return refuse({ec == bhttp::error::body_limit ? 413u : 400u}, head);
          // Or, at the client's end of stream, 400 for the request cut short by it.
          m.may_stay_open = !eof;
          std::vector<unsigned> statuses = {ec == bhttp::error::body_limit ? 413u : 400u, 400u};
          if (empty_lines + bytes.size() - start >= kMaxHeader)
            statuses.push_back(OversizedHeaderStatus(bytes, start, empty_lines));
          return refuse(std::move(statuses), false);
        }
        if (in_header && p.is_header_done()) continue;  // on with the body, eagerly
      }
      // Needs more: an unfinished header block at the limit (or a chunk-size line or trailer
      // section as long) cannot end within it.
      if ((p.is_header_done() ? 0 : header) + held.size() >= kMaxHeader) {
        // Or malformed where this parser, given the block in other pieces, has not looked yet.
        if (!p.is_header_done()) return refuse({OversizedHeaderStatus(bytes, start, empty_lines), 400}, false);
        // Beast holds a chunk-size line (after the CRLF ending the chunk before it), and the last
        // one with the trailer section: a line end past that CRLF is in the trailer section.
        std::string_view line = held;
        if (line.starts_with("\r\n")) line.remove_prefix(2);
        return refuse({line.find("\r\n") == std::string_view::npos ? 413u : 431u},
                      p.get().method() == bhttp::verb::head);
      }
      if (next == bytes.size()) {
        m.closes = eof;
        // Malformed where this parser has not looked yet (see may_stay_open): the session, given
        // the bytes in other pieces, may have seen it; if not, and at the client's end of stream,
        // it refuses the request as cut short (400).
        if (!p.is_header_done() && !OnlyEmptyLines(bytes.substr(start))) {
          if (const unsigned status = MalformedHeaderStatus(bytes.substr(start, next - start))) {
            m.may_stay_open = !eof;
            return refuse({status, 400}, false);
          }
        }
        // Part of a request, cut short by the client's end of stream (a CR that may begin one
        // more empty line is none).
        if (eof && !OnlyEmptyLines(bytes.substr(start)))
          return refuse({400}, p.is_header_done() && p.get().method() == bhttp::verb::head);
        return m;
      }
      const size_t take = std::min(kMaxHeader - held.size(), bytes.size() - next);
      held.append(bytes.substr(next, take));
      next += take;
    }
    const auto& req = p.get();
    const bool head = req.method() == bhttp::verb::head;
    std::optional<std::string> path;
    if (head || req.method() == bhttp::verb::get) {
      path = ModelPath(std::string(req.target()));
      if (!path) return refuse({400}, head);
    }
    m.requests.push_back({req.method(), path.value_or(""), req.version(), req.keep_alive(), start, empty_lines});
    start = next - held.size();
    if (!req.keep_alive()) {
      m.closes = true;
      return m;
    }
  }
}

bool IsPage(std::string_view path) {
  return path == "/metrics" || path == "/admin/metrics.json" || path == "/admin/clients" ||
         path == "/" || path == "/admin";
}

stats::StatsRegistry& Registry() {
  static stats::StatsRegistry* r = [] {
    auto* reg = new stats::StatsRegistry();
    stats::StatsScope(reg, {{"client", "fuzz"}}).GetCounter("requests").Increment(3);
    return reg;
  }();
  return *r;
}

// How many complete responses `out` starts with, read as the answers to the model's requests.
size_t Responses(std::string_view out, const Model& m) {
  size_t at = 0;
  size_t count = 0;
  for (const ModelRequest& req : m.requests) {
    bhttp::response_parser<bhttp::string_body> p;
    p.header_limit(UINT32_MAX);
    p.body_limit(boost::none);
    p.eager(true);
    if (req.method == bhttp::verb::head) p.skip(true);
    boost::system::error_code ec;
    at += p.put(boost::asio::buffer(out.data() + at, out.size() - at), ec);
    if (ec || !p.is_done()) break;
    ++count;
  }
  return count;
}

// Checks the responses in `out` against the model's requests, then the refusal if the model has
// one; the session closed the connection when `closed`.
void CheckResponses(std::string_view out, const Model& m, const Session::Handler& handler,
                    bool closed) {
  size_t at = 0;
  for (const ModelRequest& req : m.requests) {
    Check(at < out.size(), "a request the model answers got no response");
    bhttp::response_parser<bhttp::string_body> p;
    p.header_limit(UINT32_MAX);
    p.body_limit(boost::none);
    p.eager(true);
    const bool head = req.method == bhttp::verb::head;
    if (head) p.skip(true);
    boost::system::error_code ec;
    const size_t n = p.put(boost::asio::buffer(out.data() + at, out.size() - at), ec);
    Check(!ec && p.is_done(), "a response that does not parse as HTTP (or is cut short)");
    at += n;
    const auto& res = p.get();
    Check(res.version() == (req.version == 10 ? 10u : 11u),
          "a response version other than HTTP/1.1 (1.0 to 1.0)");
    Check(res.keep_alive() == req.keep_alive,
          "a response whose keep-alive differs from the request's");
    Check(res[bhttp::field::server] == "scales-admin", "a response without the Server field");
    Check(!res[bhttp::field::content_type].empty(), "a response without a Content-Type");
    if (req.method != bhttp::verb::get && !head) {
      Check(res.result() == bhttp::status::method_not_allowed &&
                res[bhttp::field::allow] == "GET, HEAD",
            "a method other than GET and HEAD not refused with 405 and Allow");
      continue;
    }
    const Response page = handler(req.path);
    Check((page.status == bhttp::status::not_found) == !IsPage(req.path),
          "404 for a page, or a page for another path");
    Check(res.result() == page.status, "the response's status is not the page's");
    Check(res[bhttp::field::content_type] == page.content_type,
          "the response's Content-Type is not the page's");
    if (head) {
      Check(res.body().empty() && p.content_length() == page.body.size(),
            "a HEAD response with a body, or a Content-Length other than the page's");
    } else {
      Check(res.body() == page.body, "a GET response whose body is not the page");
    }
  }
  if (at < out.size() && !m.refusals.empty()) {
    bhttp::response_parser<bhttp::string_body> p;
    p.header_limit(UINT32_MAX);
    p.body_limit(boost::none);
    p.eager(true);
    if (m.refused_head) p.skip(true);
    boost::system::error_code ec;
    at += p.put(boost::asio::buffer(out.data() + at, out.size() - at), ec);
    Check(!ec && p.is_done(), "a refusal that does not parse as HTTP (or is cut short)");
    const auto& res = p.get();
    Check(res.version() == 11 && !res.keep_alive(),
          "a refusal other than HTTP/1.1 with Connection: close");
    Check(std::find(m.refusals.begin(), m.refusals.end(), res.result_int()) != m.refusals.end(),
          "a refusal with a status the model does not give");
    Check(res[bhttp::field::server] == "scales-admin", "a refusal without the Server field");
    Check(res[bhttp::field::content_type] == "text/plain; charset=utf-8",
          "a refusal other than text/plain");
    if (m.refused_head) {
      Check(res.body().empty() && p.content_length().value_or(0) > 1,
            "a refusal of a HEAD with a body, or without the length of the text");
    } else {
      Check(res.body().size() > 1 && res.body().back() == '\n',
            "a refusal without a text naming the problem");
    }
  } else {
    Check(m.refusals.empty() || !closed, "a refused request without an answer");
  }
  Check(at == out.size(), "bytes after the last response the model expects");
}

// Every answered request's header block ends within the limit (the bytes up to the blank line).
void CheckHeaderBlocks(std::string_view bytes, const Model& m) {
  for (const ModelRequest& req : m.requests) {
    const size_t end = bytes.find("\r\n\r\n", req.begin);
    Check(end != std::string_view::npos && req.empty_lines + end + 4 - req.begin <= kMaxHeader,
          "a request answered whose header block is over the limit");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool keep_open = (data[0] & 1) != 0;
  const bool clients_throw = (data[0] & 2) != 0;
  const size_t chunk = fuzz::WriteSize(data[0]);
  const std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  const Model model = Expect(bytes, !keep_open);
  CheckHeaderBlocks(bytes, model);

  auto& h = fuzz::Harness::Get();
  admin::internal::Pages pages;
  pages.stats = &Registry();
  pages.clients = [clients_throw]() -> std::string {
    if (clients_throw) throw std::runtime_error("the fuzzer's clients page failed");
    return R"({"clients":[]})";
  };
  const Session::Handler handler = [&pages](const std::string& path) {
    return admin::internal::Route(path, pages);
  };
  SessionLimits limits;
  limits.max_header_bytes = kMaxHeader;
  limits.max_body_bytes = kMaxBody;
  // In real time: a client that keeps its end open holds a closing session this long.
  limits.linger_timeout = std::chrono::milliseconds(1);

  const auto conn = h.Connect();
  boost::asio::ip::tcp::socket socket(h.loop().io_context());
  socket.assign(boost::asio::ip::tcp::v4(), conn.server);
  auto session = std::make_shared<Session>(std::move(socket), &handler, limits);
  std::weak_ptr<Session> alive = session;
  session->Start();
  session.reset();  // its pending read keeps it
  fuzz::Peer peer(conn.client);
  peer.SendChunks(bytes, chunk);
  if (!keep_open) peer.ShutdownWrite();
  // The model's close, or its responses; then whatever else comes.
  const bool settled = h.RunUntil([&] {
    peer.Drain();
    return peer.closed() || ((!model.closes || model.may_stay_open) &&
                             Responses(peer.received(), model) == model.requests.size());
  });
  h.Settle();
  peer.Drain();
  static const bool debug = std::getenv("FUZZ_DEBUG") != nullptr;
  if (debug) {
    std::string refusals;
    for (unsigned status : model.refusals) refusals += " " + std::to_string(status);
    std::fprintf(stderr, "model: %zu request(s), refused with [%s ], %s; got %zu bytes, %s\n%s\n",
                 model.requests.size(), refusals.c_str(), model.closes ? "closes" : "stays open",
                 peer.received().size(), peer.closed() ? "closed" : "open",
                 peer.received().c_str());
  }
  Check(settled, model.closes ? "the session did not close the connection"
                              : "the session did not answer every request");
  Check(peer.closed() == model.closes || (model.may_stay_open && !peer.closed()),
        model.closes ? "the connection was left open" : "the connection was closed");
  CheckResponses(peer.received(), model, handler, peer.closed());
  if (!peer.closed()) {
    const auto open = alive.lock();
    Check(open != nullptr, "the session went away with its connection open");
    open->Close();
  }
  // A session that closed lingers until the client's end of stream (sent unless keep_open) or
  // its linger_timeout.
  Check(h.RunUntil([&] { return alive.expired(); }), "the session outlived its connection");
  return 0;
}
