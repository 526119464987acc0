#pragma once
// The HTTP side of the admin server (scales/admin/admin_server.h), apart from what its pages
// show: one connection's request loop (Beast's request parser with the size limits, GET and
// HEAD only, keep-alive, the idle and write timeouts) and the routing of a request target to
// its page. AdminServer runs these on its own thread; they need nothing of the clients', so
// fuzz/admin_request_fuzzer.cc drives them over a loopback connection on its own loop.

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <boost/asio/ip/tcp.hpp>
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

// The page for a GET of `target` (its query is ignored): 200 with the page, 404 with the index
// for an unknown path, 500 naming the error when building the page threw.
Response Route(std::string_view target, const Pages& pages);

struct SessionLimits {
  // The header block (request line, fields, blank line), and the body (an admin request has
  // none that matters); a request over either is refused and its connection closed. A
  // chunk-size line (with its extensions) and the trailer section are bounded by
  // max_header_bytes too: no more than that of a request is ever held unparsed.
  size_t max_header_bytes = 8 * 1024;
  size_t max_body_bytes = 8 * 1024;
  // An idle connection (no complete request) is closed after this.
  Duration idle_timeout = std::chrono::seconds(30);
  // A response not written within this closes its connection (a client that stopped reading).
  Duration write_timeout = std::chrono::seconds(30);
};

// One connection: reads requests one after the other (pipelined ones included) and answers
// each, GET and HEAD through `handler`, any other method with 405. Closes the connection after
// a response without keep-alive, at the client's end of stream, on a timeout, and on a request
// it cannot read (malformed, or over a limit; logged).
class Session : public std::enable_shared_from_this<Session> {
 public:
  using Handler = std::function<Response(const std::string& target)>;

  // `handler` must outlive the session.
  Session(boost::asio::ip::tcp::socket socket, const Handler* handler, SessionLimits limits = {});

  void Start() { Read(); }
  void Close();

 private:
  // Starts reading the next request.
  void Read();
  // Parses what the buffer holds; reads more, answers the request or fails.
  void Parse();
  void Fail(boost::beast::error_code ec, std::string_view what);
  void Answer();

  boost::beast::tcp_stream stream_;
  SessionLimits limits_;
  boost::beast::flat_buffer buffer_;  // at most limits_.max_header_bytes
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  size_t header_bytes_ = 0;  // of the current request's header block, consumed by the parser
  const Handler* handler_;
};

}  // namespace scales::admin::internal
