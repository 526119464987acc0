// The HTTP value types and the response parser, without sockets: header-name comparison and
// Beast's parser writing straight into an http::Response.

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <boost/beast/http/error.hpp>
#include <gtest/gtest.h>

#include "scales/http/message.h"
#include "scales/http/transport.h"

namespace scales::http {
namespace {

TEST(HeaderNameEqualsTest, IgnoresAsciiCaseOnly) {
  EXPECT_TRUE(HeaderNameEquals("Content-Length", "content-length"));
  EXPECT_TRUE(HeaderNameEquals("X-B3-TRACEID", "x-b3-traceid"));
  EXPECT_FALSE(HeaderNameEquals("Host", "Hos"));
  EXPECT_FALSE(HeaderNameEquals("Host", "Hosu"));
  // Characters 0x20 apart that are not letters stay different ('[' and '{', '@' and '`').
  EXPECT_FALSE(HeaderNameEquals("a[", "a{"));
  EXPECT_FALSE(HeaderNameEquals("@", "`"));
  EXPECT_TRUE(HeaderNameEquals("", ""));
}

// Parses `wire` in one piece into a fresh Response; returns the parser's error.
boost::system::error_code Parse(std::string_view wire, Response& out) {
  internal::ResponseParser parser(out);
  parser.eager(true);
  boost::system::error_code ec;
  size_t used = 0;
  while (!ec && !parser.is_done() && used < wire.size()) {
    used += parser.put(boost::asio::buffer(wire.data() + used, wire.size() - used), ec);
  }
  return ec;
}

TEST(ResponseParserTest, FillsStatusReasonHeadersAndBody) {
  Response r;
  ASSERT_FALSE(Parse("HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 23:21:00 GMT\r\n"
                     "Content-Type: text/plain\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\n"
                     "hello from nginx\n",
                     r));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.reason, "OK");
  ASSERT_EQ(r.headers.size(), 5u);
  EXPECT_EQ(r.headers[1].first, "Date");
  EXPECT_EQ(r.headers[1].second, "Thu, 03 Dec 2026 23:21:00 GMT");
  EXPECT_EQ(r.Header("content-type"), "text/plain");
  EXPECT_EQ(r.body, "hello from nginx\n");
}

TEST(ResponseParserTest, KeepsEveryHeaderInOrderBeyondTheReservedCount) {
  std::string wire = "HTTP/1.1 404 Not Found\r\n";
  for (int i = 0; i < 20; ++i) wire += "X-H" + std::to_string(i) + ": value-" + std::to_string(i) + "\r\n";
  wire += "Content-Length: 0\r\n\r\n";
  Response r;
  ASSERT_FALSE(Parse(wire, r));
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(r.reason, "Not Found");
  ASSERT_EQ(r.headers.size(), 21u);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(r.headers[static_cast<size_t>(i)].first, "X-H" + std::to_string(i));
    EXPECT_EQ(r.headers[static_cast<size_t>(i)].second, "value-" + std::to_string(i));
  }
  EXPECT_TRUE(r.body.empty());
}

TEST(ResponseParserTest, DechunksTheBody) {
  Response r;
  ASSERT_FALSE(Parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", r));
  EXPECT_EQ(r.body, "hello world");
  EXPECT_EQ(r.Header("TRANSFER-ENCODING"), "chunked");
}

// What Beast lets through and the parser stops: a Content-Length after a Transfer-Encoding
// that does not end with chunked (Beast fails the other orders), trailer fields merged into the
// header fields, and an HTTP/1.0 response with Transfer-Encoding kept alive.
TEST(ResponseParserTest, HoldsToTheFramingRulesBeastLeavesOut) {
  Response r;
  EXPECT_EQ(Parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok", r),
            boost::beast::http::error::bad_content_length);
  r = {};
  EXPECT_EQ(Parse("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: gzip\r\n\r\nok", r),
            boost::beast::http::error::bad_transfer_encoding);

  r = {};
  ASSERT_FALSE(Parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: h\r\n\r\n2\r\nok\r\n0\r\n"
                     "X-Trailer: t\r\n\r\n",
                     r));
  EXPECT_EQ(r.body, "ok");
  EXPECT_EQ(r.Header("X-Head"), "h");
  EXPECT_FALSE(r.HasHeader("X-Trailer"));

  for (const char* version : {"1.0", "1.1"}) {
    SCOPED_TRACE(version);
    r = {};
    internal::ResponseParser parser(r);
    parser.eager(true);
    const std::string wire = std::string("HTTP/") + version +
                             " 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    boost::system::error_code ec;
    parser.put(boost::asio::buffer(wire), ec);
    ASSERT_FALSE(ec);
    ASSERT_TRUE(parser.is_done());
    EXPECT_TRUE(parser.keep_alive());
    EXPECT_EQ(parser.reusable(), std::string_view(version) == "1.1");
  }
}

// ParseSimpleResponse against Beast: whatever the fast path takes, Beast must parse to the same
// Response, keep-alive and length. What it declines is Beast's alone (checked by the tests above
// and the fuzzer).
struct Parsed {
  size_t used = 0;
  bool keep_alive = false;
  Response response;
};

constexpr size_t kHeaderLimit = 8192;
constexpr std::uint64_t kBodyLimit = 1 << 20;

std::optional<Parsed> ParseFast(std::string_view wire, size_t header_limit = kHeaderLimit,
                                std::uint64_t body_limit = kBodyLimit) {
  Parsed p;
  p.used = internal::ParseSimpleResponse(wire, header_limit, body_limit, p.response, p.keep_alive);
  if (p.used == 0) {
    // Declined: the response is left as it was (empty), for Beast to fill.
    EXPECT_EQ(p.response.status, 0);
    EXPECT_TRUE(p.response.reason.empty());
    EXPECT_TRUE(p.response.headers.empty());
    EXPECT_TRUE(p.response.body.empty());
    return std::nullopt;
  }
  return p;
}

// Beast with the same limits, the whole input in one buffer; nullopt on error or if incomplete.
std::optional<Parsed> ParseWithBeast(std::string_view wire, size_t header_limit = kHeaderLimit,
                                     std::uint64_t body_limit = kBodyLimit) {
  Parsed p;
  internal::ResponseParser parser(p.response);
  parser.eager(true);
  parser.header_limit(static_cast<std::uint32_t>(header_limit));
  parser.body_limit(body_limit);
  boost::system::error_code ec;
  while (!ec && !parser.is_done() && p.used < wire.size()) {
    const size_t n = parser.put(boost::asio::buffer(wire.data() + p.used, wire.size() - p.used), ec);
    p.used += n;
    if (n == 0) break;
  }
  if (ec || !parser.is_done()) return std::nullopt;
  p.keep_alive = parser.keep_alive();
  return p;
}

void ExpectSame(const Parsed& fast, const Parsed& beast, std::string_view wire) {
  SCOPED_TRACE(::testing::Message() << "response: " << ::testing::PrintToString(std::string(wire)));
  EXPECT_EQ(fast.used, beast.used);
  EXPECT_EQ(fast.keep_alive, beast.keep_alive);
  EXPECT_EQ(fast.response.status, beast.response.status);
  EXPECT_EQ(fast.response.reason, beast.response.reason);
  EXPECT_EQ(fast.response.headers, beast.response.headers);
  EXPECT_EQ(fast.response.body, beast.response.body);
}

constexpr std::string_view kNginx =
    "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 02:00:00 GMT\r\n"
    "Content-Type: text/plain\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\nhello from nginx\n";

TEST(SimpleResponseTest, TakesTheCommonResponsesAsBeastParsesThem) {
  const std::vector<std::string> cases = {
      std::string(kNginx),
      std::string(kNginx) + "HTTP/1.1 200 OK\r\n",  // the start of a next response stays unread
      "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 500 \r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad",
      "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
      "HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 2\r\n\r\nok",
      "HTTP/1.1 201 Created\r\nX-Empty:\r\nX-Spaces: \t a  b \t\r\nContent-Length: 007\r\n\r\n1234567",
      "HTTP/1.1 999 Whatever (it is) \"fine\"\r\nContent-Length: 1\r\n\r\n\x01",
  };
  for (const auto& wire : cases) {
    auto fast = ParseFast(wire);
    auto beast = ParseWithBeast(wire);
    ASSERT_TRUE(fast.has_value()) << wire;
    ASSERT_TRUE(beast.has_value()) << wire;
    ExpectSame(*fast, *beast, wire);
  }
  auto nginx = ParseFast(kNginx);
  ASSERT_TRUE(nginx);
  EXPECT_EQ(nginx->response.status, 200);
  EXPECT_EQ(nginx->response.Header("content-length"), "17");
  EXPECT_EQ(nginx->response.body, "hello from nginx\n");
  EXPECT_TRUE(nginx->keep_alive);
  EXPECT_EQ(nginx->used, kNginx.size());
}

TEST(SimpleResponseTest, LeavesEverythingElseToBeast) {
  const std::string full(kNginx);
  const std::vector<std::string> cases = {
      full.substr(0, 60),                 // the header block is not complete
      full.substr(0, full.size() - 1),    // nor the body
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
      "HTTP/1.1 200 OK\r\n\r\nuntil the end of the stream",
      "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
      "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
      "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 200 OK\r\nX-Obs: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
      "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nx",
      "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nx",
      "HTTP/1.1 200 OK\r\nConnection: upgrade\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 200 OK\nContent-Length: 0\n\n",
      "HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
  };
  for (const auto& wire : cases) EXPECT_FALSE(ParseFast(wire).has_value()) << wire;
  // The limits are Beast's to enforce (and to report): at or over them the fast path declines.
  const size_t header_size = kNginx.find("\r\n\r\n") + 4;
  EXPECT_FALSE(ParseFast(kNginx, /*header_limit=*/header_size).has_value());
  auto fast = ParseFast(kNginx, header_size + 1);
  auto beast = ParseWithBeast(kNginx, header_size + 1);
  ASSERT_TRUE(fast && beast);
  ExpectSame(*fast, *beast, kNginx);
  EXPECT_FALSE(ParseFast(kNginx, kHeaderLimit, /*body_limit=*/16).has_value());
  fast = ParseFast(kNginx, kHeaderLimit, /*body_limit=*/17);
  beast = ParseWithBeast(kNginx, kHeaderLimit, /*body_limit=*/17);
  ASSERT_TRUE(fast && beast);
  ExpectSame(*fast, *beast, kNginx);
}

// Beast takes Proxy-Connection as it takes Connection (close, keep-alive): the fast path must
// not decide the connection's reuse otherwise, or a response would keep its connection or not
// depending on whether it came in one read.
TEST(SimpleResponseTest, AgreesWithBeastOnProxyConnection) {
  for (const char* wire : {"HTTP/1.1 200 OK\r\nProxy-Connection: close\r\nContent-Length: 2\r\n\r\nok",
                           "HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\nok"}) {
    auto beast = ParseWithBeast(wire);
    ASSERT_TRUE(beast.has_value()) << wire;
    if (auto fast = ParseFast(wire)) ExpectSame(*fast, *beast, wire);
  }
}

// Seeded mutations of real-looking responses: every one the fast path takes, Beast parses the
// same way. (The reverse does not hold by design: the fast path declines much Beast accepts.)
TEST(SimpleResponseTest, AgreesWithBeastOnMutatedResponses) {
  const std::vector<std::string> seeds = {
      std::string(kNginx),
      "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nbody",
      "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
  };
  const std::string alphabet = std::string("\r\n :\t0123456789aAzZ-,;\"\x7f\x80\xff\x00", 28);
  std::mt19937 rng(20261204);
  int taken = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string wire = seeds[static_cast<size_t>(i) % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % wire.size();
      const char c = alphabet[rng() % alphabet.size()];
      switch (rng() % 3) {
        case 0: wire[at] = c; break;
        case 1: wire.insert(wire.begin() + static_cast<std::ptrdiff_t>(at), c); break;
        default: wire.erase(at, 1); break;
      }
      if (wire.empty()) wire = "x";
    }
    auto fast = ParseFast(wire);
    if (!fast) continue;
    ++taken;
    auto beast = ParseWithBeast(wire);
    ASSERT_TRUE(beast.has_value()) << "the fast path took what Beast rejects: "
                                   << ::testing::PrintToString(wire);
    ExpectSame(*fast, *beast, wire);
    if (HasFailure()) break;
  }
  // Many mutations keep the response valid (a changed header value, reason, body byte).
  EXPECT_GT(taken, 2000);
}

}  // namespace
}  // namespace scales::http
