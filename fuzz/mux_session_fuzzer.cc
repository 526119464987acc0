// Fuzz target: a MuxSessionSink (include/scales/mux/session.h) on a real loopback connection,
// fed arbitrary server bytes.
//
// Input: byte 0 selects the scenario: bit 0 on = the session opens with the handshake (the
// bytes answer the probe and Tinit), off = no handshake and three requests in flight (tags 2,
// 3, 4; the one on tag 3 is cancelled after it was written, so it is discarded and its tag
// stays reserved). Bit 1 splits the bytes into two writes. The rest is what the server sends,
// followed by end of stream. Checked: the session reaches Closed, every request completes
// exactly once, and a closed session holds no tags and no pending requests.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "loopback.h"
#include "scales/mux/session.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace scales;
  using fuzz::Check;
  if (size == 0) return 0;
  const bool handshake = (data[0] & 1) != 0;
  const bool split = (data[0] & 2) != 0;
  std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  auto& h = fuzz::Harness::Get();

  mux::SessionOptions options;
  options.handshake = handshake;
  options.ping_interval = Duration::zero();
  options.max_frame_size = 1 << 16;
  options.max_message_size = 1 << 14;
  auto session = std::make_shared<mux::MuxSessionSink>(h.Context(), options);
  fuzz::Harness::OpenResult open;
  auto peer = h.Open(*session, open);

  std::vector<std::unique_ptr<fuzz::Call>> calls;
  if (!handshake) {
    Check(h.RunUntil([&] { return open.done; }) && !open.error, "open without handshake failed");
    for (int i = 0; i < 3; ++i) {
      calls.push_back(std::make_unique<fuzz::Call>());
      calls.back()->request().data = "request";
      session->AsyncProcessRequest(calls.back()->stack(), calls.back()->message(), nullptr);
    }
    h.Settle();
    calls[1]->stack().Cancel(make_error_code(Errc::kRequestTimeout));
    Check(calls[1]->completions() == 1, "cancel did not answer the request");
  }
  peer->SendAndClose(bytes, split);
  Check(h.RunUntil([&] { return session->status() == SinkStatus::kClosed; }),
        "session not closed after the server's end of stream");
  if (handshake) Check(open.done, "open never completed");
  for (const auto& c : calls) Check(c->completions() == 1, "a request did not complete exactly once");
  Check(session->tags_in_use() == 0 && session->pending() == 0, "closed session holds tags");
  session->Close();
  h.Settle();
  return 0;
}
