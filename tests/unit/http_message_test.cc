// The HTTP value types and the response parser, without sockets: header-name comparison and
// Beast's parser writing straight into an http::Response.

#include <string>
#include <string_view>

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

}  // namespace
}  // namespace scales::http
