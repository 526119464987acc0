#pragma once
// The HTTP side of the admin server (scales/admin/admin_server.h), apart from what its pages
// show: one connection's request loop (Beast's request parser with the size limits, GET and
// HEAD only, keep-alive, the idle and write timeouts, an answer to a refused request) and the
// routing of a request's path to its page. AdminServer runs these on its own thread; they need
// nothing of the clients', so fuzz/admin_request_fuzzer.cc drives them over a loopback connection
// on its own loop.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "scales/core/clock.h"
#include "scales/stats/stats.h"

namespace scales::admin::internal {

struct Response {
  boost::beast::http::status status = boost::beast::http::status::ok;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

// What the pages show.
struct Pages {
  stats::StatsRegistry* stats = nullptr;  // /metrics and /admin/metrics.json
  std::function<std::string()> clients;   // the body of /admin/clients (ClientsJson)
};

// RFC 3986 5.2.4 remove_dot_segments: "/a/b/c/./../../g" is "/a/g". A ".." at the root stays
// there ("/../x" is "/x"), as the RFC has it. Applied to the decoded path (an escaped '.',
// %2E, is the same character), so /stats/../metrics is /metrics.
std::string RemoveDotSegments(std::string_view path);

// The page for a GET of `path` (the request target's path, percent-decoded, without its query):
// 200 with the page, 404 with the index for an unknown path, 500 naming the error when building
// the page threw.
Response Route(std::string_view path, const Pages& pages);

// AdminServer fills these from AdminServerOptions, which has the same defaults.
struct SessionLimits {
  // The header block (request line, fields, blank line, and the empty lines ignored before the
  // request line), and the body (an admin request has none that matters); a request over either
  // is refused (414 for a request line that does not end within max_header_bytes, else 431;
  // 413) and its connection closed. A chunk-size line (with its extensions, 413) and the trailer
  // section (431) are bounded by max_header_bytes too: no more than that of a request is ever
  // held unparsed. Empty lines alone over max_header_bytes get 431.
  size_t max_header_bytes = 8 * 1024;
  size_t max_body_bytes = 8 * 1024;
  // A request must arrive in full within this of the previous one's answer (or of the
  // connection's opening). An idle connection is closed then; a request partly received is
  // refused with 408.
  Duration idle_timeout = std::chrono::seconds(30);
  // A response not written within this closes its connection (a client that stopped reading).
  Duration write_timeout = std::chrono::seconds(30);
  // After the last response of a connection (a refusal, or one without keep-alive) the session
  // stops sending, which the client reads as the end of the connection, and reads on, dropping
  // what comes, until the client's end of stream or for this long: closing with unread bytes
  // would reset the connection, and a reset may discard the response before the client has read
  // it (RFC 9112 9.6).
  Duration linger_timeout = std::chrono::seconds(2);
};

// Why a session refuses a request (defined, with the status of each, in admin_http.cc).
enum class Refusal;

// One connection: reads requests one after the other (pipelined ones included; empty lines
// before a request line ignored, RFC 9112 2.2: they count towards max_header_bytes but are no
// part of a request for the 408 and 400 below) and answers each, GET and HEAD through `handler`
// with the target's path, any other method with 405. A request it refuses (malformed, over a
// limit, a transfer-coding other than chunked, a target that is not origin or absolute form or
// whose path has a bad escape or an encoded '/' or NUL) gets a text/plain answer with
// "Connection: close" naming the problem (logged), and so does a request cut short by the idle
// timeout (408) or by the client's end of stream (400). Closes the connection after a refusal or
// a response without keep-alive (lingering: linger_timeout), at the client's end of stream, and
// on a timeout.
class Session : public std::enable_shared_from_this<Session> {
 public:
  using Handler = std::function<Response(const std::string& path)>;

  // `handler` must outlive the session.
  Session(boost::asio::ip::tcp::socket socket, const Handler* handler, SessionLimits limits = {});

  void Start() { Read(); }
  // Instead of Start() when the server is at its connection limit: answers 503 Service
  // Unavailable with `what` as the body at once, without reading a request (nothing of it is
  // parsed or held), then lingers and closes as after any refusal.
  void StartRefused(std::string what);
  void Close();

 private:
  // Starts reading the next request.
  void Read();
  // Parses what the buffer holds; reads more, answers the request, refuses it or fails.
  void Parse();
  // Closes the connection without an answer (the client's end of stream, a timeout, an error).
  void Fail(boost::beast::error_code ec, std::string_view what);
  // Ends a read the idle timeout cut short: refuses a request partly received, else closes.
  void TimedOut();
  // The read is over (answered, refused, closed): the idle timer must not cancel what follows.
  void StopIdleTimer();
  // Before the request line: drops the empty lines (CRLF) the buffer starts with, counting them
  // in header_bytes_ (no more than is left of max_header_bytes).
  void SkipEmptyLines();
  // Whether some of a request has arrived (consumed by the parser or held in the buffer), empty
  // lines before its request line not counted.
  bool PartlyReceived() const;
  // Refuses the request: answers with the status of `why` and `what` as the body, then closes.
  void Refuse(Refusal why, std::string what);
  // Refuses a header block, chunk-size line or trailer section that does not end within
  // max_header_bytes.
  void RefuseOversized();
  void Answer();
  // Writes `r` (without its body to a HEAD), then reads the next request or, without
  // keep-alive, lingers and closes.
  void Write(Response r, unsigned version, bool keep_alive, bool head, std::string_view allow = {});
  // Stops sending and drops what the client sends until its end of stream, a read error or
  // linger_timeout; then closes.
  void Linger();
  void DropUntilClosed();

  boost::beast::tcp_stream stream_;
  // The idle timeout's own timer: the stream's closes the socket when it fires, and a request it
  // cuts short gets an answer (408). When it fires while `idle_id_` is still the one it was
  // armed with, it cancels the read; a later arming or the end of the read changes the id, so a
  // firing already queued then does nothing.
  boost::asio::steady_timer idle_timer_;
  uint64_t idle_id_ = 0;
  bool idle_expired_ = false;
  SessionLimits limits_;
  boost::beast::flat_buffer buffer_;  // at most limits_.max_header_bytes
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  // Of the current request's header block, consumed by the parser or skipped as empty lines.
  size_t header_bytes_ = 0;
  size_t empty_line_bytes_ = 0;  // of those, the empty lines before the request line
  const Handler* handler_;
};

}  // namespace scales::admin::internal
