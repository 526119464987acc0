// Fuzz target: the reply path of ThriftTransportSink (include/scales/thrift/transport.h), framed
// and buffered, on a real loopback connection: the frame length and its limits, the buffered
// transport's incremental scan (MessageScanner) and its bound while it needs more bytes, the
// sequence-id check, bytes after the reply, and the connection's reuse.
//
// Input: byte 0 holds flags: bit 0 = buffered (unframed) transport, else framed; bit 1 = the
// server keeps the connection open after its bytes (end of stream only if the reply is still
// incomplete then); bit 2 = the request is oneway (answered once written; any byte from the
// server then closes the connection); bits 4-7 = the size of the server's writes (0: one
// write; see fuzz::WriteSize). The rest is what the server answers once it has read the request
// (a strict binary call "echo" with sequence id 1).
//
// max_frame_bytes is tiny (64) so that short inputs and the seeds (make_corpus.py has replies
// just under and over it, framed and buffered) reach it. The outcome is predicted from the
// bytes alone and checked exactly:
// - framed: under 4 bytes or a frame cut short: kConnectionClosed at end of stream; a length
//   over the limit: kResponseTooLarge; 0: kProtocolError; else the frame's bytes are the reply,
//   unless they are a message whose sequence id is not the call's (kProtocolError);
// - buffered: ScanMessage over all the bytes: a complete message within the limit is the reply
//   (sequence id checked as above), over it kResponseTooLarge; malformed: kProtocolError (or
//   kResponseTooLarge when the transport had buffered more than the limit before the scan saw
//   the fault); incomplete: kResponseTooLarge past the limit, else kConnectionClosed;
// and: the call completes exactly once, never with the detail ConnectionSink gives an exception
// out of ParseReply ("reading the reply from ... failed: ..."), a failure closes the
// connection, and a connection still open after a reply answers a second request cleanly.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "loopback.h"
#include "scales/thrift/message.h"
#include "scales/thrift/transport.h"

namespace {

using namespace scales;
using fuzz::Check;

constexpr size_t kMaxFrame = 64;

std::string Be32(uint32_t v) {
  return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                     static_cast<char>(v)};
}

// echo("hi") with `seqid`, strict binary: a call, or a oneway call, or the reply.
std::string Message(uint8_t type, int32_t seqid) {
  return std::string("\x80\x01\x00", 3) + static_cast<char>(type) + Be32(4) + "echo" +
         Be32(static_cast<uint32_t>(seqid)) + std::string("\x0b\x00\x00", 3) + Be32(2) + "hi" + std::string(1, '\0');
}

struct Prediction {
  error_code ec;
  error_code alt;     // also acceptable (the buffered transport's limit vs. a malformed message)
  std::string reply;  // success
};

// Whether `reply` is a message with a sequence id other than the call's (1).
bool WrongSeqId(std::string_view reply) {
  auto header = thrift::ParseMessageHeader(reply);
  return header && header->seqid != 1;
}

Prediction Predict(std::string_view bytes, bool buffered) {
  const auto fail = [](Errc e, std::optional<Errc> alt = std::nullopt) {
    return Prediction{make_error_code(e), alt ? make_error_code(*alt) : error_code{}, {}};
  };
  const auto ok = [&](std::string_view reply) {
    return WrongSeqId(reply) ? fail(Errc::kProtocolError) : Prediction{{}, {}, std::string(reply)};
  };
  if (!buffered) {
    if (bytes.size() < 4) return fail(Errc::kConnectionClosed);
    const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
    const uint32_t len = (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
    if (len > kMaxFrame) return fail(Errc::kResponseTooLarge);
    if (len == 0) return fail(Errc::kProtocolError);
    if (bytes.size() - 4 < len) return fail(Errc::kConnectionClosed);
    return ok(bytes.substr(4, len));
  }
  const auto scan = thrift::ScanMessage(bytes);
  switch (scan.status) {
    case thrift::MessageScan::Status::kComplete:
      if (scan.size > kMaxFrame) return fail(Errc::kResponseTooLarge);
      return ok(bytes.substr(0, scan.size));
    case thrift::MessageScan::Status::kMalformed:
      return bytes.size() > kMaxFrame ? fail(Errc::kProtocolError, Errc::kResponseTooLarge)
                                      : fail(Errc::kProtocolError);
    case thrift::MessageScan::Status::kNeedMore:
      return bytes.size() > kMaxFrame ? fail(Errc::kResponseTooLarge) : fail(Errc::kConnectionClosed);
  }
  return {};
}

bool StartsWith(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// ConnectionSink::ProcessReply's detail for an exception out of ParseReply.
bool FromException(const MethodReturnMessage& m) { return StartsWith(m.detail, "reading the reply from "); }

// Sends `request` on `sink`; true once the peer has read `expect_total` bytes in all.
bool Send(fuzz::Harness& h, thrift::ThriftTransportSink& sink, fuzz::Peer& peer, fuzz::Call& call,
          const std::string& request, size_t expect_total) {
  call.request().data = request;
  sink.AsyncProcessRequest(call.stack(), call.message(), nullptr);
  if (call.completions() > 0 && !call.result().ok()) return false;  // refused
  return h.RunUntil([&] {
    peer.Drain();
    return peer.received().size() >= expect_total;
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool buffered = (data[0] & 1) != 0;
  const bool keep_open = (data[0] & 2) != 0;
  const bool oneway = (data[0] & 4) != 0;
  const size_t chunk = fuzz::WriteSize(data[0]);
  const std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  auto& h = fuzz::Harness::Get();

  thrift::TransportOptions options;
  options.framing = buffered ? thrift::Framing::kBuffered : thrift::Framing::kFramed;
  options.max_frame_bytes = kMaxFrame;
  auto sink = std::make_shared<thrift::ThriftTransportSink>(h.Context(), options);
  fuzz::Harness::OpenResult open;
  auto peer = h.Open(*sink, open);
  Check(h.RunUntil([&] { return open.done; }) && !open.error, "open failed");

  const std::string request = Message(oneway ? 4 : 1, 1);
  const size_t request_bytes = request.size() + (buffered ? 0 : 4);
  fuzz::Call call;
  Check(Send(h, *sink, *peer, call, request, request_bytes), "the request was not sent");
  Check(peer->received() == (buffered ? request : Be32(static_cast<uint32_t>(request.size())) + request),
        "the request was not written as the transport frames it");
  if (oneway) {
    // Answered once written.
    Check(call.completions() == 1 && call.result().ok() && call.reply_at_completion().empty(),
          "a oneway call was not answered with success once written");
  }
  peer->SendChunks(bytes, chunk);
  const bool answered_before_eof = keep_open && call.completions() > 0;
  if (!answered_before_eof) peer->ShutdownWrite();
  Check(h.RunUntil([&] { return call.completions() > 0; }), "the reply never completed the call");
  h.Settle();
  Check(call.completions() == 1, "the call completed more than once");
  const MethodReturnMessage& result = call.result();
  Check(!FromException(result), "ParseReply threw (ConnectionSink turned the exception into a failure)");
  if (!keep_open) Check(sink->status() == SinkStatus::kClosed, "the server's end of stream left the connection open");
  if (oneway) {
    if (!bytes.empty()) Check(sink->status() == SinkStatus::kClosed, "bytes after a oneway call left the connection open");
  } else {
    const Prediction want = Predict(bytes, buffered);
    if (!want.ec) {
      Check(result.ok(), "a good reply failed the call");
      Check(call.reply_at_completion() == want.reply, "the reply is not the bytes of the server's reply");
      Check(call.reply_at_completion().size() <= kMaxFrame, "a reply larger than max_frame_bytes");
    } else {
      Check(result.error == want.ec || (want.alt && result.error == want.alt),
            "the call failed otherwise than the bytes say");
      Check(!result.detail.empty(), "an error without a detail");
      Check(sink->status() == SinkStatus::kClosed, "a failed reply left the connection open");
    }
  }

  // The connection's next request: refused at once on a closed connection; on one kept open,
  // answered cleanly (the first reply left nothing behind).
  if (answered_before_eof || sink->status() == SinkStatus::kClosed) {
    const bool reusable = sink->status() == SinkStatus::kOpen;
    const std::string again = Message(1, 2);
    fuzz::Call call2;
    const bool sent = Send(h, *sink, *peer, call2, again, request_bytes + again.size() + (buffered ? 0 : 4));
    if (!reusable) {
      Check(call2.completions() == 1 && !call2.result().ok(), "a request on a closed connection was not refused at once");
      (void)sent;
    } else {
      Check(sent && call2.completions() == 0, "the second request was not sent on an open connection");
      const std::string reply = Message(2, 2);
      peer->SendChunks(buffered ? reply : Be32(static_cast<uint32_t>(reply.size())) + reply, chunk);
      Check(h.RunUntil([&] { return call2.completions() > 0; }), "the second reply never completed");
      Check(call2.completions() == 1 && call2.result().ok() && call2.reply_at_completion() == reply,
            "the second request on a reused connection did not get its clean reply");
      Check(sink->status() == SinkStatus::kOpen, "a clean reply closed the connection");
    }
  }
  sink->Close();
  h.Settle();
  return 0;
}
