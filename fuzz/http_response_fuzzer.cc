// Fuzz target: the HTTP response path of HttpTransportSink (include/scales/http/transport.h):
// Beast's response parser with our header and body limits, the mapping of its errors to ours,
// and the filling of http::Response, on a real loopback connection.
//
// Input: byte 0 picks the request method (bit 0: HEAD, whose response has no body) and whether
// the response arrives in one write or two (bit 1); the rest is what the server answers once
// it has read the request, followed by end of stream. Limits are small (1 KiB headers, 4 KiB
// body) so that the fuzzer reaches them. Checked: the call completes exactly once, a success
// respects the limits, a failure names its cause and closes the connection; and whatever the
// fast path for simple responses (internal::ParseSimpleResponse) takes, Beast's parser takes
// the same way (status, reason, fields, body, keep-alive, length).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "loopback.h"
#include "scales/http/message.h"
#include "scales/http/transport.h"

namespace {

using namespace scales;
using fuzz::Check;

constexpr size_t kMaxHeader = 1024;
constexpr size_t kMaxBody = 4096;

// The fast path against Beast, without sockets.
void CheckSimpleResponse(std::string_view bytes) {
  http::Response fast;
  bool fast_keep_alive = false;
  const size_t used = http::internal::ParseSimpleResponse(bytes, kMaxHeader, kMaxBody, fast, fast_keep_alive);
  if (used == 0) return;
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
  Check(used == beast_used && fast_keep_alive == parser.keep_alive() && fast.status == beast.status &&
            fast.reason == beast.reason && fast.headers == beast.headers && fast.body == beast.body,
        "the fast path and Beast parsed a response differently");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool head = (data[0] & 1) != 0;
  const bool split = (data[0] & 2) != 0;
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
  call.message().SetPayload(&request);
  call.message().SetReplySlot(&response);
  sink->AsyncProcessRequest(call.stack(), call.message(), nullptr);
  // Answer only once the whole request has arrived, as a server does.
  Check(h.RunUntil([&] {
          peer->Drain();
          return peer->received().find("\r\n\r\n") != std::string::npos;
        }),
        "the request was not sent");
  peer->SendAndClose(bytes, split);
  Check(h.RunUntil([&] { return call.completions() > 0; }), "the response never completed the call");
  h.Settle();
  Check(call.completions() == 1, "the call completed more than once");
  if (call.result().ok()) {
    Check(response.status >= 0 && response.status <= 999, "status out of range");
    Check(response.body.size() <= kMaxBody, "body larger than max_response_body_bytes");
    if (head) Check(response.body.empty(), "a HEAD response with a body");
  } else {
    Check(!call.result().detail.empty(), "an error without a detail");
    Check(sink->status() == SinkStatus::kClosed || call.result().error == make_error_code(Errc::kHttpError),
          "a failed response left the connection open");
  }
  sink->Close();
  h.Settle();
  return 0;
}
