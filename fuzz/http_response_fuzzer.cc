// Fuzz target: the HTTP response path of HttpTransportSink (include/scales/http/transport.h):
// Beast's response parser with our header and body limits, the mapping of its errors to ours,
// the filling of http::Response and the connection's reuse, on a real loopback connection.
//
// Input: byte 0 holds flags: bit 0 = the request is a HEAD (its response has no body), bit 1 =
// the server keeps the connection open after its bytes (end of stream only if the response is
// still incomplete then), bit 2 = raise_on_http_error, bits 4-7 = the size of the server's
// writes (fuzz::WriteSize: 0 is one write; after each the loop runs until the client has read
// it). The rest is what the server answers once it has read the request.
//
// The limits are tiny (96-byte header block, 128-byte body) so that short inputs and the seeds
// reach them (make_corpus.py has seeds just under and over each). Checked:
// - the call completes exactly once, and never with the detail ConnectionSink gives an
//   exception thrown by ParseReply ("reading the response from ... failed: ..."): the parser
//   must not throw;
// - a response that is returned (success, or kHttpError) respects the limits: every header
//   block it took (interim 1xx responses' and the final one's) is within the header limit, the
//   body within the body limit, a HEAD response has no body;
// - a response refused for its headers' size has a header block that does not fit;
// - a failure (other than kHttpError) names its cause and closes the connection, and so does
//   the server's end of stream;
// - when the connection stays open after a response, a second request on it gets a clean
//   answer (nothing of the first response leaks into it); when it was closed, a second request
//   fails at once;
// - whatever the fast path for simple responses (internal::ParseSimpleResponse) takes, Beast's
//   parser takes the same way (status, reason, fields, body, keep-alive, length).
// FUZZ_DEBUG=1 prints how the call ended.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "loopback.h"
#include "scales/http/message.h"
#include "scales/http/transport.h"

namespace {

using namespace scales;
using fuzz::Check;

constexpr size_t kMaxHeader = 96;
constexpr size_t kMaxBody = 128;

// The fast path against Beast, without sockets.
void CheckSimpleResponse(std::string_view bytes) {
  http::Response fast;
  bool fast_keep_alive = false;
  const size_t used = http::internal::ParseSimpleResponse(bytes, kMaxHeader, kMaxBody, fast, fast_keep_alive);
  if (used == 0) return;
  Check(bytes.find("\r\n\r\n") + 4 <= kMaxHeader, "the fast path took a header block over the limit");
  Check(fast.body.size() <= kMaxBody, "the fast path took a body over the limit");
  http::Response beast;
  http::internal::ResponseParser parser(beast);
  parser.eager(true);
  parser.header_limit(kMaxHeader);
  parser.body_limit(kMaxBody);
  boost::system::error_code ec;
  size_t beast_used = 0;
  while (!ec && !parser.is_done() && beast_used < bytes.size()) {
    const size_t n = parser.put(boost::asio::buffer(bytes.data() + beast_used, bytes.size() - beast_used), ec);
    beast_used += n;
    if (n == 0) break;
  }
  Check(!ec && parser.is_done(), "the fast path took a response Beast rejects");
  Check(used == beast_used && fast_keep_alive == parser.reusable() && fast.status == beast.status &&
            fast.reason == beast.reason && fast.headers == beast.headers && fast.body == beast.body,
        "the fast path and Beast parsed a response differently");
}

bool Interim(std::string_view block) {
  return block.size() > 12 && block[9] == '1' && block.substr(9, 3) != "101";
}

// Every header block a returned response went through (the interim 1xx responses' before it
// and its own) ends within the header limit.
bool HeaderBlocksWithin(std::string_view bytes, size_t limit) {
  for (;;) {
    const size_t end = bytes.find("\r\n\r\n");
    if (end == std::string_view::npos || end + 4 > limit) return false;
    const std::string_view block = bytes.substr(0, end + 4);
    if (!Interim(block)) return true;
    bytes.remove_prefix(end + 4);
  }
}

// The size of the header block Beast parses at the front of `bytes` given all of them at once
// (and no limit), if that is a final (not 1xx) response; else 0.
size_t FinalHeaderSize(std::string_view bytes, bool head) {
  http::Response r;
  http::internal::ResponseParser parser(r);
  parser.header_limit(UINT32_MAX);
  if (head) parser.skip(true);
  boost::system::error_code ec;
  const size_t n = parser.put(boost::asio::buffer(bytes.data(), bytes.size()), ec);  // the header only
  return !ec && parser.is_header_done() && r.status >= 200 ? n : 0;
}

bool StartsWith(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// ConnectionSink::ProcessReply's detail for an exception out of ParseReply.
bool FromException(const MethodReturnMessage& m) { return StartsWith(m.detail, "reading the response from "); }

// Sends one request on `sink`; true once the peer has read all of it.
bool Request(fuzz::Harness& h, http::HttpTransportSink& sink, fuzz::Peer& peer, fuzz::Call& call,
             http::Request& request, http::Response& response, size_t requests_before) {
  call.message().SetPayload(&request);
  call.message().SetReplySlot(&response);
  sink.AsyncProcessRequest(call.stack(), call.message(), nullptr);
  if (call.completions() > 0) return false;
  // Answer only once the whole request has arrived, as a server does.
  return h.RunUntil([&] {
    peer.Drain();
    size_t n = 0;
    for (size_t at = peer.received().find("\r\n\r\n"); at != std::string::npos;
         at = peer.received().find("\r\n\r\n", at + 4)) {
      ++n;
    }
    return n > requests_before;
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool head = (data[0] & 1) != 0;
  const bool keep_open = (data[0] & 2) != 0;
  const size_t chunk = fuzz::WriteSize(data[0]);
  std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  CheckSimpleResponse(bytes);
  auto& h = fuzz::Harness::Get();

  http::TransportOptions options;
  options.max_response_header_bytes = kMaxHeader;
  options.max_response_body_bytes = kMaxBody;
  options.raise_on_http_error = (data[0] & 4) != 0;
  auto sink = std::make_shared<http::HttpTransportSink>(h.Context(), options);
  fuzz::Harness::OpenResult open;
  auto peer = h.Open(*sink, open);
  Check(h.RunUntil([&] { return open.done; }) && !open.error, "open failed");

  http::Request request;
  request.method = head ? "HEAD" : "GET";
  request.target = "/fuzz";
  http::Response response;
  fuzz::Call call;
  Check(Request(h, *sink, *peer, call, request, response, 0), "the request was not sent");
  peer->SendChunks(bytes, chunk);
  const bool answered_before_eof = keep_open && call.completions() > 0;
  if (!answered_before_eof) peer->ShutdownWrite();
  Check(h.RunUntil([&] { return call.completions() > 0; }), "the response never completed the call");
  h.Settle();
  Check(call.completions() == 1, "the call completed more than once");
  if (!keep_open) Check(sink->status() == SinkStatus::kClosed, "the server's end of stream left the connection open");
  const MethodReturnMessage& result = call.result();
  static const bool debug = std::getenv("FUZZ_DEBUG") != nullptr;  // FUZZ_DEBUG=1: say how it ended
  if (debug) {
    std::fprintf(stderr, "status %d, %s: %s\n", response.status, result.error.message().c_str(), result.detail.c_str());
  }
  Check(!FromException(result), "ParseReply threw (ConnectionSink turned the exception into a failure)");
  const bool http_error = result.error == make_error_code(Errc::kHttpError);
  if (result.ok() || http_error) {
    Check(response.status >= 0 && response.status <= 999, "status out of range");
    Check(response.body.size() <= kMaxBody, "body larger than max_response_body_bytes");
    Check(HeaderBlocksWithin(bytes, kMaxHeader), "a response taken with a header block over the limit");
    if (head) Check(response.body.empty(), "a HEAD response with a body");
    // Error statuses: 400 and up, and an invalid one under 100 (RFC 9110 15).
    const bool error_status = response.status >= 400 || response.status < 100;
    if (http_error) Check(error_status && options.raise_on_http_error, "kHttpError for a non-error status");
    if (result.ok()) Check(!error_status || !options.raise_on_http_error, "an error status returned as a success");
  } else {
    Check(!result.detail.empty(), "an error without a detail");
    Check(sink->status() == SinkStatus::kClosed, "a failed response left the connection open");
    if (result.detail.find("exceed max_response_header_bytes") != std::string::npos) {
      const size_t block = FinalHeaderSize(bytes, head);
      Check(block == 0 || block >= kMaxHeader, "a header block within the limit was refused as too large");
    }
  }

  // The connection's next request: refused at once on a closed connection; on one kept open,
  // answered cleanly (the first response left nothing behind).
  if (answered_before_eof || sink->status() == SinkStatus::kClosed) {
    const bool reusable = sink->status() == SinkStatus::kOpen;
    http::Request again;
    again.method = "GET";
    again.target = "/again";
    http::Response second;
    fuzz::Call call2;
    const bool sent = Request(h, *sink, *peer, call2, again, second, 1);
    if (!reusable) {
      Check(!sent && call2.completions() == 1 && !call2.result().ok(),
            "a request on a closed connection was not refused at once");
    } else {
      Check(sent, "the second request was not sent on an open connection");
      peer->SendChunks("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", chunk);
      Check(h.RunUntil([&] { return call2.completions() > 0; }), "the second response never completed");
      Check(call2.completions() == 1 && call2.result().ok() && second.status == 200 && second.body == "ok" &&
                second.headers.size() == 1,
            "the second request on a kept-alive connection did not get its clean answer");
      Check(sink->status() == SinkStatus::kOpen, "a clean keep-alive response closed the connection");
    }
  }
  sink->Close();
  h.Settle();
  return 0;
}
