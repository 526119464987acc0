#pragma once
// HTTP request and response values of the scales HTTP client.

#include <string>
#include <string_view>

#include "scales/core/message.h"

namespace scales::http {

// Case-insensitive ASCII comparison of header names.
bool HeaderNameEquals(std::string_view a, std::string_view b) noexcept;

namespace internal {
// Whether Beast's parser must not be given `unconsumed` (the bytes it left, plus what came since)
// yet, in a chunked body: after a last chunk "0\r\n" it keeps those bytes unconsumed until the
// trailer section ends, and asserts that the next put() gives it at least five (Boost 1.81,
// basic_parser.ipp, `n >= 5`): "0\r\n" and one more byte are four. It needs more bytes then
// anyway (the end of the trailer section), so waiting for them changes nothing else.
inline bool HoldBackShortLastChunk(std::string_view unconsumed) noexcept {
  return unconsumed.size() < 5 && unconsumed.starts_with("0\r\n");
}
}  // namespace internal

struct Request {
  std::string method = "GET";  // any token; the common verbs are sent as such
  std::string target = "/";    // origin-form: path and query ("/a/b?x=1"); or an absolute URI,
                               // "*", or (CONNECT) host:port. Anything else fails the call.
  Headers headers;             // sent in order; Host and User-Agent are added when absent
  std::string body;            // Content-Length is set for non-empty bodies and for POST/PUT/PATCH;
                               // the caller's Content-Length and Transfer-Encoding are replaced
};

struct Response {
  int status = 0;
  std::string reason;
  Headers headers;  // the header section's fields; a chunked body's trailer fields are dropped
  std::string body;

  // Value of the first header named `name` (case-insensitive), or "" when absent.
  std::string_view Header(std::string_view name) const noexcept;
  bool HasHeader(std::string_view name) const noexcept;
};

}  // namespace scales::http
