// Fuzz target: the Mux frame decoder, fragment reassembly and message decoding
// (include/scales/mux/codec.h) fed arbitrary server bytes.
//
// Input: byte 0 picks how the rest is split into reads (1..16 bytes, or all at once); the rest
// is the byte stream. Every frame goes through Reassembler and DecodeMessage as the session
// does; each decoded message must survive a round trip (encode, fragment with a small framer,
// decode again) unchanged, and the context decoders must accept or reject its contexts without
// crashing. Limits are tiny (frames of at most 512 bytes, 96 reassembled bytes per tag) so that
// short inputs and the seeds (make_corpus.py has some just under and over each) reach them:
// no frame over the frame limit is returned, no tag ever buffers more than the reassembly
// limit, and a message put together from fragments is within it.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <variant>

#include "scales/mux/codec.h"

namespace {

using namespace scales::mux;

constexpr std::uint32_t kMaxFrame = 512;
constexpr std::size_t kMaxReassembled = 96;
// All tags together: below twice the per-tag bound, so the two limits meet.
constexpr std::size_t kMaxReassembledTotal = kMaxReassembled * 3 / 2;

void Require(bool ok) {
  if (!ok) std::abort();
}

void DecodeContexts(const Contexts& contexts) {
  for (const auto& c : contexts) {
    (void)DecodeDeadline(c.value);
    (void)DecodeTraceContext(c.value);
    (void)DecodeRetries(c.value);
    (void)DecodeClientId(c.value);
    (void)DecodeHeaders(c.value);
    (void)DecodeMuxFailure(c.value);
  }
}

// Encode, fragment with `framer`, decode through a fresh decoder: the same message comes back.
void RoundTrip(const Message& m, std::uint32_t framer) {
  std::string bytes;
  auto encoded = EncodeFragmented(m, framer, &bytes);
  Require(static_cast<bool>(encoded));
  FrameDecoder decoder(kMaxWireFrameSize);
  Reassembler reassembler(kMaxWireFrameSize);
  decoder.Feed(bytes);
  int messages = 0;
  for (;;) {
    auto next = decoder.Next();
    Require(static_cast<bool>(next));
    if (!next->has_value()) break;
    auto whole = reassembler.Add(std::move(**next));
    Require(static_cast<bool>(whole));
    if (!whole->has_value()) continue;
    auto again = DecodeMessage(**whole);
    Require(static_cast<bool>(again) && *again == m);
    ++messages;
  }
  Require(messages == 1 && decoder.buffered() == 0 && reassembler.pending_tags() == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t chunk = (data[0] & 0x0f) == 0 ? size : (data[0] & 0x0f);
  std::string_view stream(reinterpret_cast<const char*>(data + 1), size - 1);

  (void)DecodeFrameBytes(stream, kMaxFrame);

  FrameDecoder decoder(kMaxFrame);
  Reassembler reassembler(kMaxReassembled, {}, kMaxReassembledTotal);
  for (std::size_t off = 0; off < stream.size(); off += chunk) {
    decoder.Feed(stream.substr(off, chunk));
    for (;;) {
      auto next = decoder.Next();
      if (!next) {
        // A failed decoder stays failed.
        Require(!decoder.Next());
        return 0;
      }
      if (!next->has_value()) break;
      Require((**next).body.size() + 4 <= kMaxFrame);
      const std::uint32_t tag = (**next).tag;
      const bool fragmentable = IsFragmentable((**next).type);
      const std::size_t partials_before = reassembler.pending_tags();
      auto whole = reassembler.Add(std::move(**next));
      Require(reassembler.buffered_bytes(tag) <= kMaxReassembled);
      Require(reassembler.buffered_bytes() <= kMaxReassembledTotal);
      Require(reassembler.buffered_bytes(tag) <= reassembler.buffered_bytes());
      Require(reassembler.pending_tags() != 0 || reassembler.buffered_bytes() == 0);
      if (!whole) continue;  // the session would close; keep exercising the decoder
      if (!whole->has_value()) continue;
      // A message that completed a partial one (one partial fewer) was put together from
      // fragments: within the reassembly limit.
      const bool reassembled = fragmentable && reassembler.pending_tags() + 1 == partials_before;
      Require(!reassembled || (**whole).body.size() <= kMaxReassembled);
      Require((**whole).body.size() + 4 <= kMaxFrame || reassembled);
      auto msg = DecodeMessage(**whole);
      if (!msg) continue;
      (void)Describe(*msg);
      if (const auto* d = std::get_if<Tdispatch>(&*msg)) DecodeContexts(d->contexts);
      if (const auto* r = std::get_if<Rdispatch>(&*msg)) DecodeContexts(r->contexts);
      if (const auto* i = std::get_if<Rinit>(&*msg)) {
        if (const auto* f = FindInitHeader(i->headers, kMuxFramerHeader)) (void)DecodeMuxFramer(*f);
      }
      RoundTrip(*msg, kUnlimitedFragmentSize);
      RoundTrip(*msg, 1 + data[0] % 7);
    }
    Require(decoder.buffered() <= stream.size());
  }
  return 0;
}
