// The Mux codec against the golden byte vectors of ../shared/mux-protocol.md (typed in from the
// document, never produced by our encoder) and scales-reference.md §3.

#include "scales/mux/codec.h"

#include <cctype>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace scales::mux {
namespace {

using ::testing::HasSubstr;

// Bytes from a spec-style string: hex pairs separated by spaces/bars, and "quoted text" copied
// as is, e.g. Bytes(R"(00 0a "MuxFailure" 00 08)").
std::string Bytes(std::string_view spec) {
  std::string out;
  std::size_t i = 0;
  auto hexval = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  while (i < spec.size()) {
    char c = spec[i];
    if (c == ' ' || c == '|' || c == '\n') {
      ++i;
    } else if (c == '"') {
      std::size_t end = spec.find('"', i + 1);
      out.append(spec.substr(i + 1, end - i - 1));
      i = end + 1;
    } else {
      int hi = hexval(spec[i]);
      int lo = hexval(spec[i + 1]);
      if (hi < 0 || lo < 0) ADD_FAILURE() << "bad hex at " << i << " in " << spec;
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    }
  }
  return out;
}

std::string ToHex(std::string_view s) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    if (!out.empty()) out.push_back(' ');
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

// --- The golden vectors, typed in from mux-protocol.md. ----------------------------------------

// §1.7 probe.
const std::string kProbe = Bytes("00 00 00 0f 7f 00 00 01 74 69 6e 69 74 20 63 68 65 63 6b");
// §1.7 probe echoed by elixir-mux (new Rerr code).
const std::string kProbeNewCode = Bytes("00 00 00 0f 80 00 00 01 74 69 6e 69 74 20 63 68 65 63 6b");
// §1.7 handshake.
const std::string kTinit = Bytes(
    R"(00 00 00 2a 44 00 00 01 00 01
       00 00 00 0a "mux-framer" 00 00 00 04 7f ff ff ff
       00 00 00 03 "tls"        00 00 00 03 "off")");
const std::string kRinit = Bytes(
    R"(00 00 00 2a bc 00 00 01 00 01
       00 00 00 0a "mux-framer" 00 00 00 04 7f ff ff ff
       00 00 00 03 "tls"        00 00 00 03 "off")");
// §1.8.
const std::string kTping = Bytes("00 00 00 04 41 00 00 01");
const std::string kRping = Bytes("00 00 00 04 bf 00 00 01");
const std::string kTdrain = Bytes("00 00 00 04 40 00 00 01");
const std::string kRdrain = Bytes("00 00 00 04 c0 00 00 01");
const std::string kTdiscardedLegacy =
    Bytes("00 00 00 0e c2 00 00 00 00 00 02 74 69 6d 65 6f 75 74");
const std::string kRdiscarded = Bytes("00 00 00 04 be 00 00 02");
const std::string kTlease10s = Bytes("00 00 00 0d 43 00 00 00 00 00 00 00 00 00 00 27 10");
const std::string kRdispatchNack =
    Bytes(R"(00 00 00 1d fe 00 00 03 02 00 01 00 0a "MuxFailure" 00 08 00 00 00 00 00 00 00 03)");
const std::string kRdispatchError = Bytes("00 00 00 0b fe 00 00 04 01 00 00 62 6f 6f 6d");
// §1.10.
const std::string kEchoTdispatch = Bytes(R"(
    00 00 00 57
    02
    00 00 02
    00 01
    00 2a 63 6f 6d 2e 74 77 69 74 74 65 72 2e 66 69 6e 61 67 6c 65 2e 74 68
          72 69 66 74 2e 43 6c 69 65 6e 74 49 64 43 6f 6e 74 65 78 74
    00 05 73 76 63 2d 61
    00 00
    00 00
    80 01 00 01
    00 00 00 04 65 63 68 6f
    00 00 00 00
    0b 00 01 00 00 00 02 68 69
    00)");
const std::string kEchoThriftCall =
    Bytes("80 01 00 01 00 00 00 04 65 63 68 6f 00 00 00 00 0b 00 01 00 00 00 02 68 69 00");
const std::string kEchoRdispatch = Bytes(R"(
    00 00 00 21  fe  00 00 02
    00
    00 00
    80 01 00 02 00 00 00 04 65 63 68 6f 00 00 00 00
    0b 00 00 00 00 00 02 68 69 00)");
const std::string kEchoThriftReply =
    Bytes("80 01 00 02 00 00 00 04 65 63 68 6f 00 00 00 00 0b 00 00 00 00 00 02 68 69 00");
// scales-reference.md §3: Tdispatch tag 2, no contexts, Hello.hi("this_is_test_data").
const std::string kScalesTdispatch = Bytes(
    R"(00 00 00 31 02 00 00 02 | 00 00 | 00 00 | 00 00 | 80 01 00 01 00 00 00 02 68 69 00 00 00
       00 0b 00 01 00 00 00 11 "this_is_test_data" 00)");
const std::string kScalesThriftCall = Bytes(
    R"(80 01 00 01 00 00 00 02 68 69 00 00 00 00 0b 00 01 00 00 00 11 "this_is_test_data" 00)");
// scales-reference.md §3: Tdiscarded with the new code 0x42, tag 2, "Client timeout".
const std::string kScalesTdiscardedNewCode =
    Bytes(R"(00 00 00 15 42 00 00 00 00 00 02 "Client timeout")");

// The §1.10 Tdispatch fragmented at mux-framer 16: five 16-byte pieces with the fragment bit,
// then a 3-byte final piece. The pieces are cut from the typed-in body.
std::string FragmentedEchoTdispatch() {
  std::string body = kEchoTdispatch.substr(8);
  EXPECT_EQ(body.size(), 83u);
  std::string out;
  for (int i = 0; i < 5; ++i) out += Bytes("00 00 00 14 02 80 00 02") + body.substr(16 * i, 16);
  out += Bytes("00 00 00 07 02 00 00 02") + body.substr(80, 3);
  return out;
}

Tdispatch EchoTdispatchMessage() {
  Tdispatch m;
  m.tag = 2;
  m.contexts = {{"com.twitter.finagle.thrift.ClientIdContext", "svc-a"}};
  m.payload = kEchoThriftCall;
  return m;
}

InitHeaders ExampleInitHeaders() { return {{"mux-framer", Bytes("7f ff ff ff")}, {"tls", "off"}}; }

struct Golden {
  const char* name;
  std::string bytes;
  Message message;
};

std::vector<Golden> GoldenVectors() {
  Rdispatch nack;
  nack.tag = 3;
  nack.status = ReplyStatus::kNack;
  nack.contexts = {{"MuxFailure", Bytes("00 00 00 00 00 00 00 03")}};
  Rdispatch error;
  error.tag = 4;
  error.status = ReplyStatus::kError;
  error.body = "boom";
  Rdispatch echo_reply;
  echo_reply.tag = 2;
  echo_reply.status = ReplyStatus::kOk;
  echo_reply.body = kEchoThriftReply;
  Tdispatch scales_dispatch;
  scales_dispatch.tag = 2;
  scales_dispatch.payload = kScalesThriftCall;
  return {
      {"probe", kProbe, Rerr{1, "tinit check"}},
      {"Tinit", kTinit, Tinit{1, 1, ExampleInitHeaders()}},
      {"Rinit", kRinit, Rinit{1, 1, ExampleInitHeaders()}},
      {"Tping", kTping, Tping{1}},
      {"Rping", kRping, Rping{1}},
      {"Tdrain", kTdrain, Tdrain{1}},
      {"Rdrain", kRdrain, Rdrain{1}},
      {"Tdiscarded", kTdiscardedLegacy, Tdiscarded{0, 2, "timeout"}},
      {"Rdiscarded", kRdiscarded, Rdiscarded{2}},
      {"Tlease", kTlease10s, Tlease{0, 0, 10000}},
      {"RdispatchNack", kRdispatchNack, nack},
      {"RdispatchError", kRdispatchError, error},
      {"EchoTdispatch", kEchoTdispatch, EchoTdispatchMessage()},
      {"EchoRdispatch", kEchoRdispatch, echo_reply},
      {"ScalesTdispatch", kScalesTdispatch, scales_dispatch},
  };
}

// --- Golden vectors: decode and encode byte-exact. ---------------------------------------------

TEST(MuxCodecTest, GoldenVectorsDecode) {
  for (const auto& g : GoldenVectors()) {
    SCOPED_TRACE(g.name);
    auto m = DecodeFrameBytes(g.bytes);
    ASSERT_TRUE(m.has_value()) << m.error().detail;
    EXPECT_TRUE(*m == g.message) << Describe(*m) << " vs " << Describe(g.message);
  }
}

TEST(MuxCodecTest, GoldenVectorsEncode) {
  for (const auto& g : GoldenVectors()) {
    SCOPED_TRACE(g.name);
    std::string out;
    ASSERT_TRUE(EncodeMessage(g.message, &out).has_value());
    EXPECT_EQ(ToHex(out), ToHex(g.bytes));
    EXPECT_EQ(Encode(g.message), g.bytes);
  }
}

TEST(MuxCodecTest, ProbeHelpers) {
  EXPECT_EQ(Encode(ProbeMessage()), kProbe);
  EXPECT_TRUE(IsProbe(ProbeMessage()));
  EXPECT_TRUE(IsProbe(*DecodeFrameBytes(kProbeNewCode)));
  EXPECT_FALSE(IsProbe(Rerr{2, "tinit check"}));
  EXPECT_FALSE(IsProbe(Tping{1}));
}

TEST(MuxCodecTest, InitHeadersDecodeToFramerAndTls) {
  auto m = DecodeFrameBytes(kRinit);
  ASSERT_TRUE(m.has_value());
  const auto& rinit = std::get<Rinit>(*m);
  const std::string* framer = FindInitHeader(rinit.headers, kMuxFramerHeader);
  ASSERT_NE(framer, nullptr);
  EXPECT_EQ(*DecodeMuxFramer(*framer), 0x7FFFFFFF);
  EXPECT_EQ(*FindInitHeader(rinit.headers, kTlsHeader), "off");
  EXPECT_EQ(FindInitHeader(rinit.headers, "compress"), nullptr);
  EXPECT_EQ(EncodeMuxFramer(0x7FFFFFFF), Bytes("7f ff ff ff"));
  EXPECT_FALSE(DecodeMuxFramer(Bytes("00 00 00 00")).has_value());
  EXPECT_FALSE(DecodeMuxFramer(Bytes("ff ff ff ff")).has_value());
  EXPECT_FALSE(DecodeMuxFramer(Bytes("00 10")).has_value());
}

TEST(MuxCodecTest, EchoPayloadsAreTheThriftMessages) {
  auto call = DecodeFrameBytes(kEchoTdispatch);
  ASSERT_TRUE(call.has_value());
  EXPECT_EQ(std::get<Tdispatch>(*call).payload, kEchoThriftCall);
  const std::string* id = FindContext(std::get<Tdispatch>(*call).contexts, kClientIdKey);
  ASSERT_NE(id, nullptr);
  EXPECT_EQ(**DecodeClientId(*id), "svc-a");
  auto reply = DecodeFrameBytes(kEchoRdispatch);
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(std::get<Rdispatch>(*reply).body, kEchoThriftReply);
}

// --- Type codes. --------------------------------------------------------------------------------

TEST(MuxCodecTest, BothRerrCodesDecode) {
  auto legacy = DecodeFrameBytes(kProbe);
  auto current = DecodeFrameBytes(kProbeNewCode);
  ASSERT_TRUE(legacy.has_value());
  ASSERT_TRUE(current.has_value());
  EXPECT_TRUE(*legacy == *current);
  EXPECT_TRUE((*current == Message(Rerr{1, "tinit check"})));
  // The encoder sends the legacy code.
  EXPECT_EQ(static_cast<std::uint8_t>(Encode(Rerr{5, "x"})[4]), 0x7F);
  EXPECT_EQ(WireTypeOf(Rerr{}), wire::kRerrLegacy);
}

TEST(MuxCodecTest, BothTdiscardedCodesDecode) {
  auto legacy = DecodeFrameBytes(kTdiscardedLegacy);
  ASSERT_TRUE(legacy.has_value());
  EXPECT_TRUE((*legacy == Message(Tdiscarded{0, 2, "timeout"})));
  auto current = DecodeFrameBytes(kScalesTdiscardedNewCode);
  ASSERT_TRUE(current.has_value()) << current.error().detail;
  EXPECT_TRUE((*current == Message(Tdiscarded{0, 2, "Client timeout"})));
  // Re-encoded with the legacy code.
  std::string again = Encode(*current);
  EXPECT_EQ(static_cast<std::uint8_t>(again[4]), 0xC2);
  EXPECT_EQ(again.substr(5), kScalesTdiscardedNewCode.substr(5));
  EXPECT_EQ(WireTypeOf(Tdiscarded{}), wire::kTdiscardedLegacy);
}

TEST(MuxCodecTest, UnknownTypesAreDecodeErrors) {
  const std::vector<int> known = {0x01, 0xFF, 0x02, 0xFE, 0x40, 0xC0, 0x41, 0xBF,
                                  0x42, 0xC2, 0xBE, 0x43, 0x44, 0xBC, 0x80, 0x7F};
  for (int t = 0; t < 256; ++t) {
    bool is_known = std::find(known.begin(), known.end(), t) != known.end();
    EXPECT_EQ(IsKnownType(static_cast<std::uint8_t>(t)), is_known) << t;
    if (is_known) continue;
    std::string frame =
        Bytes("00 00 00 04") + std::string(1, static_cast<char>(t)) + Bytes("00 00 07");
    auto m = DecodeFrameBytes(frame);
    ASSERT_FALSE(m.has_value()) << t;
    EXPECT_EQ(m.error().code, make_error_code(Errc::kProtocolError));
    EXPECT_THAT(m.error().detail, HasSubstr("unknown mux message type"));
  }
  // 0xBD (-67) would be "Rlease", which does not exist.
  EXPECT_FALSE(DecodeMessage(0xBD, 0, "").has_value());
}

// --- Statuses. ----------------------------------------------------------------------------------

TEST(MuxCodecTest, EveryRdispatchStatus) {
  for (int status = 0; status < 3; ++status) {
    std::string body = std::string(1, static_cast<char>(status)) + Bytes("00 00") + "text";
    auto m = DecodeMessage(wire::kRdispatch, 9, body);
    ASSERT_TRUE(m.has_value()) << status;
    const auto& r = std::get<Rdispatch>(*m);
    EXPECT_EQ(static_cast<int>(r.status), status);
    EXPECT_EQ(r.body, "text");
    EXPECT_EQ(r.tag, 9u);
    std::string out;
    ASSERT_TRUE(EncodeBody(*m, &out).has_value());
    EXPECT_EQ(out, body);
  }
  for (int status : {3, 4, 0x7F, 0x80, 0xFF}) {
    std::string body = std::string(1, static_cast<char>(status)) + Bytes("00 00");
    auto m = DecodeMessage(wire::kRdispatch, 9, body);
    ASSERT_FALSE(m.has_value()) << status;
    EXPECT_EQ(m.error().code, make_error_code(Errc::kProtocolError));
    EXPECT_THAT(m.error().detail, HasSubstr("invalid status " + std::to_string(status)));
    EXPECT_THAT(m.error().detail, HasSubstr("offset 0"));
  }
}

TEST(MuxCodecTest, EveryRreqStatus) {
  for (int status = 0; status < 3; ++status) {
    std::string body = std::string(1, static_cast<char>(status)) + "r";
    auto m = DecodeMessage(wire::kRreq, 4, body);
    ASSERT_TRUE(m.has_value());
    EXPECT_TRUE((*m == Message(Rreq{4, static_cast<ReplyStatus>(status), "r"})));
    EXPECT_EQ(Encode(*m), Bytes("00 00 00 06 ff 00 00 04") + body);
  }
  EXPECT_FALSE(DecodeMessage(wire::kRreq, 4, Bytes("03")).has_value());
  EXPECT_FALSE(DecodeMessage(wire::kRreq, 4, "").has_value());
}

TEST(MuxCodecTest, TreqRoundTrip) {
  std::string body = Bytes(R"(02 01 03 "abc" 02 01 01 "payload")");
  auto m = DecodeMessage(wire::kTreq, 2, body);
  ASSERT_TRUE(m.has_value()) << m.error().detail;
  const auto& t = std::get<Treq>(*m);
  ASSERT_EQ(t.keys.size(), 2u);
  EXPECT_EQ(t.keys[0].key, kTreqTraceIdKey);
  EXPECT_EQ(t.keys[0].value, "abc");
  EXPECT_EQ(t.keys[1].key, kTreqTraceFlagKey);
  EXPECT_EQ(t.payload, "payload");
  std::string out;
  ASSERT_TRUE(EncodeBody(*m, &out).has_value());
  EXPECT_EQ(out, body);
}

TEST(MuxCodecTest, DispatchWithDstAndDtab) {
  Tdispatch m;
  m.tag = 7;
  m.contexts = {{"k", "v"}, {"k2", ""}};
  m.dst = "/s/users";
  m.dtab = {{"/s/users", "/$/inet/127.0.0.1/8080"}};
  m.payload = "xyz";
  std::string expected = Bytes(
      R"(00 02 00 01 "k" 00 01 "v" 00 02 "k2" 00 00 00 08 "/s/users" 00 01
         00 08 "/s/users" 00 16 "/$/inet/127.0.0.1/8080" "xyz")");
  std::string body;
  ASSERT_TRUE(EncodeBody(m, &body).has_value());
  EXPECT_EQ(ToHex(body), ToHex(expected));
  auto back = DecodeMessage(wire::kTdispatch, 7, expected);
  ASSERT_TRUE(back.has_value()) << back.error().detail;
  EXPECT_TRUE(*back == Message(m));
}

// --- Truncated and malformed bodies. -----------------------------------------------------------

// Every cut of `body` shorter than `min_len` fails with a protocol error naming an offset.
void ExpectTruncationsFail(std::uint8_t type, std::string_view body, std::size_t min_len) {
  for (std::size_t n = 0; n < min_len; ++n) {
    auto m = DecodeMessage(type, 2, body.substr(0, n));
    ASSERT_FALSE(m.has_value()) << TypeName(type) << " cut at " << n;
    EXPECT_EQ(m.error().code, make_error_code(Errc::kProtocolError));
    EXPECT_THAT(m.error().detail, HasSubstr("offset")) << m.error().detail;
    EXPECT_THAT(m.error().detail, HasSubstr(TypeName(type)));
  }
  EXPECT_TRUE(DecodeMessage(type, 2, body.substr(0, min_len)).has_value()) << TypeName(type);
}

TEST(MuxCodecTest, TruncatedBodies) {
  // Tdispatch: 2 (nctx) + 2 + 42 + 2 + 5 (context) + 2 (dst) + 2 (nd) before the payload.
  ExpectTruncationsFail(wire::kTdispatch, kEchoTdispatch.substr(8), 57);
  ExpectTruncationsFail(wire::kRdispatch, kRdispatchNack.substr(8), 25);
  ExpectTruncationsFail(wire::kRdispatch, kRdispatchError.substr(8), 3);
  ExpectTruncationsFail(wire::kTdiscardedLegacy, kTdiscardedLegacy.substr(8), 3);
  ExpectTruncationsFail(wire::kTlease, kTlease10s.substr(8), 9);
  ExpectTruncationsFail(wire::kTinit, kTinit.substr(8), 2);
  // Cuts inside a Tinit header entry (not at an entry boundary) fail.
  std::string tinit_body = kTinit.substr(8);
  for (std::size_t n = 3; n < tinit_body.size(); ++n) {
    bool boundary = n == 2 + 22;
    EXPECT_EQ(DecodeMessage(wire::kTinit, 1, tinit_body.substr(0, n)).has_value(), boundary) << n;
  }
  // A Treq key value running past the end.
  auto treq = DecodeMessage(wire::kTreq, 2, Bytes("01 01 05 61 62"));
  ASSERT_FALSE(treq.has_value());
  EXPECT_THAT(treq.error().detail, HasSubstr("length 5 at offset 2"));
}

TEST(MuxCodecTest, LengthPastTheEndNamesTheFieldAndOffset) {
  // One context whose key claims 0x2a bytes but only 3 follow.
  auto m = DecodeMessage(wire::kTdispatch, 2, Bytes("00 01 00 2a 63 6f 6d"));
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().detail,
            "Tdispatch: context key length 42 at offset 2 runs past the end (have 3 bytes)");
}

TEST(MuxCodecTest, FrameBytesMustBeExactlyOneFrame) {
  EXPECT_FALSE(DecodeFrameBytes(kTping.substr(0, 7)).has_value());
  EXPECT_FALSE(DecodeFrameBytes(kTping + "x").has_value());
  EXPECT_FALSE(DecodeFrameBytes(kRdispatchError.substr(0, 10)).has_value());
  // A non-final fragment cannot be decoded on its own.
  EXPECT_FALSE(DecodeFrameBytes(FragmentedEchoTdispatch().substr(0, 24)).has_value());
}

// --- Frame headers and the streaming decoder. --------------------------------------------------

TEST(MuxCodecTest, FrameHeader) {
  auto h = DecodeFrameHeader(Bytes("00 00 00 14 02 80 00 02"));
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->size, 0x14u);
  EXPECT_EQ(h->type, 0x02);
  EXPECT_EQ(h->tag, 2u);
  EXPECT_TRUE(h->fragment);
  EXPECT_EQ(h->body_size(), 16u);
  auto max_tag = DecodeFrameHeader(Bytes("00 00 00 04 41 7f ff ff"));
  ASSERT_TRUE(max_tag.has_value());
  EXPECT_EQ(max_tag->tag, kMaxTag);
  EXPECT_FALSE(max_tag->fragment);
  std::string out;
  AppendFrameHeader(0x02, 2, true, 16, &out);
  EXPECT_EQ(out, Bytes("00 00 00 14 02 80 00 02"));
}

std::string AllGoldenFrames() {
  std::string all;
  for (const auto& g : GoldenVectors()) all += g.bytes;
  all += kProbeNewCode + kScalesTdiscardedNewCode + FragmentedEchoTdispatch();
  return all;
}

std::vector<Frame> DrainFrames(FrameDecoder& d) {
  std::vector<Frame> frames;
  while (true) {
    auto f = d.Next();
    EXPECT_TRUE(f.has_value()) << f.error().detail;
    if (!f.has_value() || !f->has_value()) break;
    frames.push_back(std::move(**f));
  }
  return frames;
}

std::vector<Frame> ExpectedFrames(std::string_view stream) {
  // Parsed by hand from the header fields, independent of FrameDecoder.
  std::vector<Frame> frames;
  std::size_t i = 0;
  while (i < stream.size()) {
    auto h = DecodeFrameHeader(stream.substr(i));
    EXPECT_TRUE(h.has_value());
    frames.push_back(
        Frame{h->type, h->tag, h->fragment, std::string(stream.substr(i + 8, h->body_size()))});
    i += 4 + h->size;
  }
  EXPECT_EQ(i, stream.size());
  return frames;
}

// The whole messages `frames` reassemble into through `r`, in the order they complete (every
// frame must be accepted).
std::vector<Frame> Reassembled(Reassembler& r, std::vector<Frame> frames) {
  std::vector<Frame> whole;
  for (auto& f : frames) {
    auto x = r.Add(std::move(f));
    EXPECT_TRUE(x.has_value()) << x.error().detail;
    if (!x.has_value()) break;
    if (x->has_value()) whole.push_back(std::move(**x));
  }
  return whole;
}

TEST(MuxCodecTest, FrameDecoderSplitAtEveryByteBoundary) {
  const std::string all = AllGoldenFrames();
  const std::vector<Frame> expected = ExpectedFrames(all);
  ASSERT_EQ(expected.size(), GoldenVectors().size() + 2 + 6);
  for (std::size_t cut = 0; cut <= all.size(); ++cut) {
    FrameDecoder d;
    std::vector<Frame> got;
    d.Feed(std::string_view(all).substr(0, cut));
    for (auto& f : DrainFrames(d)) got.push_back(std::move(f));
    d.Feed(std::string_view(all).substr(cut));
    for (auto& f : DrainFrames(d)) got.push_back(std::move(f));
    ASSERT_EQ(got, expected) << "cut at " << cut;
    EXPECT_EQ(d.buffered(), 0u);
    EXPECT_EQ(d.stream_offset(), all.size());
  }
}

TEST(MuxCodecTest, FrameDecoderEachVectorSplitAtEveryBoundaryAndByteByByte) {
  for (const auto& g : GoldenVectors()) {
    SCOPED_TRACE(g.name);
    for (std::size_t cut = 0; cut <= g.bytes.size(); ++cut) {
      FrameDecoder d;
      d.Feed(std::string_view(g.bytes).substr(0, cut));
      auto first = DrainFrames(d);
      EXPECT_EQ(first.size(), cut == g.bytes.size() ? 1u : 0u);
      d.Feed(std::string_view(g.bytes).substr(cut));
      auto second = DrainFrames(d);
      first.insert(first.end(), second.begin(), second.end());
      ASSERT_EQ(first.size(), 1u) << cut;
      auto m = DecodeMessage(first[0]);
      ASSERT_TRUE(m.has_value());
      EXPECT_TRUE(*m == g.message);
    }
    FrameDecoder d;
    std::vector<Frame> frames;
    for (char c : g.bytes) {
      d.Feed(&c, 1);
      for (auto& f : DrainFrames(d)) frames.push_back(std::move(f));
    }
    ASSERT_EQ(frames.size(), 1u);
    EXPECT_TRUE(*DecodeMessage(frames[0]) == g.message);
  }
}

TEST(MuxCodecTest, FrameDecoderLimits) {
  {
    FrameDecoder d(100);
    d.Feed(Bytes("00 00 00 65 02 00 00 02"));  // 101 > 100
    auto f = d.Next();
    ASSERT_FALSE(f.has_value());
    EXPECT_EQ(f.error().code, make_error_code(Errc::kProtocolError));
    EXPECT_THAT(f.error().detail, HasSubstr("101"));
    EXPECT_THAT(f.error().detail, HasSubstr("limit of 100"));
    // Sticky.
    d.Feed(kTping);
    EXPECT_FALSE(d.Next().has_value());
  }
  {
    FrameDecoder d(100);
    d.Feed(Bytes("00 00 00 64 02 00 00 02"));  // exactly 100: waits for the body
    auto f = d.Next();
    ASSERT_TRUE(f.has_value());
    EXPECT_FALSE(f->has_value());
  }
  for (const char* small : {"00 00 00 00 41 00 00 01", "00 00 00 03 41 00 00 01"}) {
    FrameDecoder d;
    d.Feed(kTping + Bytes(small));
    auto ok = d.Next();
    ASSERT_TRUE(ok.has_value() && ok->has_value());
    auto f = d.Next();
    ASSERT_FALSE(f.has_value());
    EXPECT_THAT(f.error().detail, HasSubstr("below the minimum of 4"));
    EXPECT_THAT(f.error().detail, HasSubstr("stream offset 8"));
  }
  {
    // Finagle's maximum: 0x7FFFFFFF passes the header check with the default-wide limit.
    EXPECT_TRUE(DecodeFrameHeader(Bytes("7f ff ff ff 02 00 00 02")).has_value());
    EXPECT_FALSE(DecodeFrameHeader(Bytes("80 00 00 00 02 00 00 02")).has_value());
  }
}

// NextView gives the frames Next gives, as views into the decoder's buffer (no copy), split
// anywhere; the stream offset and the buffered count advance the same way.
TEST(MuxCodecTest, FrameDecoderViewsMatchFramesAtEveryCut) {
  const std::string all = AllGoldenFrames();
  const std::vector<Frame> expected = ExpectedFrames(all);
  for (std::size_t cut = 0; cut <= all.size(); cut += 7) {
    FrameDecoder d;
    std::vector<Frame> got;
    for (std::string_view part : {std::string_view(all).substr(0, cut), std::string_view(all).substr(cut)}) {
      d.Feed(part);
      while (true) {
        auto v = d.NextView();
        ASSERT_TRUE(v.has_value()) << v.error().detail;
        if (!v->has_value()) break;
        got.push_back(Frame(**v));
      }
    }
    ASSERT_EQ(got, expected) << "cut at " << cut;
    EXPECT_EQ(d.buffered(), 0u);
    EXPECT_EQ(d.stream_offset(), all.size());
  }
  FrameDecoder d;
  d.Feed(kTping + kEchoTdispatch);
  auto ping = d.NextView();
  ASSERT_TRUE(ping.has_value() && ping->has_value());
  EXPECT_EQ((*ping)->type, wire::kTping);
  auto dispatch = d.NextView();
  ASSERT_TRUE(dispatch.has_value() && dispatch->has_value());
  EXPECT_EQ((*dispatch)->body, kEchoTdispatch.substr(8));
  EXPECT_TRUE(*DecodeMessage(**dispatch) == Message(EchoTdispatchMessage()));
  // A decode error is sticky for views too.
  FrameDecoder bad(100);
  bad.Feed(Bytes("00 00 00 65 02 00 00 02"));
  EXPECT_FALSE(bad.NextView().has_value());
  EXPECT_FALSE(bad.Next().has_value());
}

// --- Fragmentation. ----------------------------------------------------------------------------

TEST(MuxCodecTest, EncodeFragmentedAtFramer16IsTheGoldenVector) {
  std::string out;
  ASSERT_TRUE(EncodeFragmented(EchoTdispatchMessage(), 16, &out).has_value());
  EXPECT_EQ(ToHex(out), ToHex(FragmentedEchoTdispatch()));
  // Unlimited: not fragmented.
  for (std::uint32_t unlimited : {0u, kUnlimitedFragmentSize, 0xFFFFFFFFu, 83u, 1000u}) {
    std::string whole;
    ASSERT_TRUE(EncodeFragmented(EchoTdispatchMessage(), unlimited, &whole).has_value());
    EXPECT_EQ(whole, kEchoTdispatch) << unlimited;
  }
  // Control messages are never split.
  std::string rinit;
  ASSERT_TRUE(EncodeFragmented(Rinit{1, 1, ExampleInitHeaders()}, 4, &rinit).has_value());
  EXPECT_EQ(rinit, kRinit);
}

TEST(MuxCodecTest, EncodeFragmentedExactMultiple) {
  Rdispatch r;
  r.tag = 5;
  r.body = std::string(29, 'x');  // body = 1 + 2 + 29 = 32 bytes
  std::string out;
  ASSERT_TRUE(EncodeFragmented(r, 16, &out).has_value());
  ASSERT_EQ(out.size(), 2 * 8 + 32u);
  EXPECT_EQ(out.substr(0, 8), Bytes("00 00 00 14 fe 80 00 05"));
  EXPECT_EQ(out.substr(24, 8), Bytes("00 00 00 14 fe 00 00 05"));
}

TEST(MuxCodecTest, GoldenFragmentsReassemble) {
  const std::string stream = FragmentedEchoTdispatch();
  for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
    FrameDecoder d;
    Reassembler r;
    std::vector<Frame> whole;
    for (std::string_view part :
         {std::string_view(stream).substr(0, cut), std::string_view(stream).substr(cut)}) {
      d.Feed(part);
      for (auto& f : DrainFrames(d)) {
        auto out = r.Add(std::move(f));
        ASSERT_TRUE(out.has_value()) << out.error().detail;
        if (out->has_value()) whole.push_back(std::move(**out));
      }
    }
    ASSERT_EQ(whole.size(), 1u) << cut;
    EXPECT_EQ(whole[0].body, kEchoTdispatch.substr(8));
    EXPECT_TRUE(*DecodeMessage(whole[0]) == Message(EchoTdispatchMessage()));
    EXPECT_EQ(r.pending_tags(), 0u);
  }
}

TEST(MuxCodecTest, InterleavedFragmentsReassemble) {
  Reassembler r;
  auto add = [&r](std::uint8_t type, std::uint32_t tag, bool more, std::string body) {
    auto out = r.Add(Frame{type, tag, more, std::move(body)});
    EXPECT_TRUE(out.has_value()) << out.error().detail;
    return out.has_value() ? *out : std::optional<Frame>();
  };
  EXPECT_FALSE(add(wire::kRdispatch, 2, true, "a1"));
  EXPECT_FALSE(add(wire::kRdispatch, 3, true, "b1"));
  auto ping = add(wire::kTping, 1, false, "");  // control frames pass through
  ASSERT_TRUE(ping);
  EXPECT_EQ(ping->type, wire::kTping);
  EXPECT_FALSE(add(wire::kRdispatch, 2, true, "a2"));
  EXPECT_EQ(r.pending_tags(), 2u);
  EXPECT_EQ(r.buffered_bytes(2), 4u);
  auto b = add(wire::kRdispatch, 3, false, "b2");
  ASSERT_TRUE(b);
  EXPECT_EQ(*b, (Frame{wire::kRdispatch, 3, false, "b1b2"}));
  auto a = add(wire::kRdispatch, 2, false, "a3");
  ASSERT_TRUE(a);
  EXPECT_EQ(*a, (Frame{wire::kRdispatch, 2, false, "a1a2a3"}));
  EXPECT_EQ(r.pending_tags(), 0u);
  // An unfragmented dispatch passes through.
  auto c = add(wire::kRdispatch, 4, false, "c");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->body, "c");
}

// Tdiscarded names a dispatch sent by the side that sends it: a server's Tdiscarded for tag 5
// must not drop the fragments of the reply to the client's own request 5; a client's Tdiscarded
// drops the fragments of its Tdispatch 5 that a server was reassembling.
TEST(MuxCodecTest, TdiscardedDropsOnlyTheFragmentsOfTheDispatchItNames) {
  const std::string discard5("\x00\x00\x05" "gone", 7);  // which = 5, why = "gone"
  Reassembler client;
  ASSERT_TRUE(client.Add(Frame{wire::kRdispatch, 5, true, "part-a|"}).has_value());
  ASSERT_TRUE(client.Add(Frame{wire::kTdiscarded, 0, false, discard5}).has_value());
  EXPECT_EQ(client.buffered_bytes(5), 7u) << "the reply's fragments stay";
  auto whole = client.Add(Frame{wire::kRdispatch, 5, false, "part-b"});
  ASSERT_TRUE(whole.has_value() && whole->has_value());
  EXPECT_EQ((*whole)->body, "part-a|part-b");
  Reassembler server;
  ASSERT_TRUE(server.Add(Frame{wire::kTdispatch, 5, true, "request-a"}).has_value());
  ASSERT_TRUE(server.Add(Frame{wire::kTdiscarded, 0, false, discard5}).has_value());
  EXPECT_EQ(server.buffered_bytes(5), 0u) << "the discarded request's fragments go";
  EXPECT_EQ(server.pending_tags(), 0u);
}

// Add(FrameView): an unfragmented frame comes back as the same bytes (nothing copied); a
// fragmented one as a view of the body reassembled inside; errors as for Add(Frame).
TEST(MuxCodecTest, ReassemblerViews) {
  Reassembler r;
  const std::string c = "c-body";
  auto whole = r.Add(FrameView{wire::kRdispatch, 4, false, c});
  ASSERT_TRUE(whole.has_value() && whole->has_value());
  EXPECT_EQ((*whole)->body.data(), c.data());
  const std::string a1 = "a1", a2 = "a2", a3 = "a3";
  EXPECT_FALSE(r.Add(FrameView{wire::kRdispatch, 2, true, a1})->has_value());
  EXPECT_FALSE(r.Add(FrameView{wire::kRdispatch, 2, true, a2})->has_value());
  auto ping = r.Add(FrameView{wire::kTping, 1, false, {}});
  ASSERT_TRUE(ping.has_value() && ping->has_value());
  EXPECT_EQ((*ping)->type, wire::kTping);
  auto a = r.Add(FrameView{wire::kRdispatch, 2, false, a3});
  ASSERT_TRUE(a.has_value() && a->has_value());
  EXPECT_EQ((*a)->type, wire::kRdispatch);
  EXPECT_EQ((*a)->tag, 2u);
  EXPECT_FALSE((*a)->fragment);
  EXPECT_EQ((*a)->body, "a1a2a3");
  EXPECT_EQ(r.pending_tags(), 0u);
  auto bad = r.Add(FrameView{wire::kTping, 1, true, {}});
  ASSERT_FALSE(bad.has_value());
  EXPECT_THAT(bad.error().detail, HasSubstr("fragment bit"));
  Reassembler small(3);
  EXPECT_FALSE(small.Add(FrameView{wire::kRdispatch, 2, true, "abcd"}).has_value());
}

TEST(MuxCodecTest, FragmentWriterRoundRobin) {
  FragmentWriter w(16);
  Tdispatch a = EchoTdispatchMessage();  // 83-byte body: 6 frames
  Rdispatch b;
  b.tag = 3;
  b.body = std::string(20, 'b');  // 23-byte body: 2 frames
  ASSERT_TRUE(w.Enqueue(a).has_value());
  ASSERT_TRUE(w.Enqueue(Tping{1}).has_value());
  ASSERT_TRUE(w.Enqueue(b).has_value());
  std::string out;
  EXPECT_EQ(w.WriteRound(&out), 3u);
  EXPECT_EQ(w.size(), 2u);
  w.WriteAll(&out);
  EXPECT_TRUE(w.empty());
  auto frames = ExpectedFrames(out);
  std::vector<std::pair<std::uint32_t, bool>> order;
  for (const auto& f : frames) order.emplace_back(f.tag, f.fragment);
  std::vector<std::pair<std::uint32_t, bool>> want = {{2, true}, {1, false}, {3, true},
                                                      {2, true}, {3, false}, {2, true},
                                                      {2, true}, {2, true},  {2, false}};
  EXPECT_EQ(order, want);
  Reassembler r;
  std::vector<Frame> whole = Reassembled(r, std::move(frames));
  ASSERT_EQ(whole.size(), 3u);
  EXPECT_EQ(Encode(*DecodeMessage(whole[2])), kEchoTdispatch);
  EXPECT_TRUE(*DecodeMessage(whole[1]) == Message(b));
}

TEST(MuxCodecTest, FragmentWriterRemove) {
  FragmentWriter w(16);
  ASSERT_TRUE(w.Enqueue(EchoTdispatchMessage()).has_value());
  EXPECT_EQ(w.Remove(wire::kTdispatch, 2), std::optional<bool>(false));  // nothing written yet
  ASSERT_TRUE(w.Enqueue(EchoTdispatchMessage()).has_value());
  std::string out;
  w.WriteRound(&out);
  EXPECT_EQ(w.Remove(wire::kTdispatch, 3), std::nullopt);
  EXPECT_EQ(w.Remove(wire::kTdispatch, 2), std::optional<bool>(true));  // peer holds a piece
  EXPECT_TRUE(w.empty());
  // Unlimited: each message whole in its turn.
  FragmentWriter u;
  ASSERT_TRUE(u.Enqueue(EchoTdispatchMessage()).has_value());
  ASSERT_TRUE(u.Enqueue(Tping{1}).has_value());
  std::string all;
  EXPECT_EQ(u.WriteRound(&all), 2u);
  EXPECT_EQ(all, kEchoTdispatch + kTping);
}

// The writer encodes into bodies kept from written messages: whatever was written before,
// removed or left half-written, every message comes out exactly as Encode gives it.
TEST(MuxCodecTest, FragmentWriterReusedBodiesEncodeExactly) {
  FragmentWriter w;
  auto dispatch = [](std::uint32_t tag, std::size_t payload) {
    Tdispatch d = EchoTdispatchMessage();
    d.tag = tag;
    d.payload = std::string(payload, static_cast<char>('a' + tag % 26));
    return d;
  };
  for (int round = 0; round < 4; ++round) {
    std::string want;
    for (std::uint32_t tag = 2; tag < 40; ++tag) {
      // Sizes vary per round, so a reused body is sometimes larger, sometimes smaller.
      Tdispatch d = dispatch(tag, (tag * 37 + round * 101) % 300);
      ASSERT_TRUE(w.Enqueue(d).has_value());
      if (tag % 5 == 0) {
        EXPECT_EQ(w.Remove(wire::kTdispatch, tag), std::optional<bool>(false));
      } else {
        want += Encode(d);
      }
    }
    ASSERT_TRUE(w.Enqueue(Rping{1}).has_value());
    want += kRping;
    std::string out = "prefix";
    w.WriteAll(&out);
    EXPECT_EQ(out, "prefix" + want) << "round " << round;
    EXPECT_TRUE(w.empty());
  }
  // Bodies larger than the spares keep, and fragments, still come out right.
  w.set_max_fragment_body(1000);
  Tdispatch big = dispatch(7, 100000);
  ASSERT_TRUE(w.Enqueue(big).has_value());
  ASSERT_TRUE(w.Enqueue(dispatch(8, 10)).has_value());
  std::string out;
  w.WriteAll(&out);
  Reassembler r;
  std::vector<Frame> whole = Reassembled(r, ExpectedFrames(out));
  ASSERT_EQ(whole.size(), 2u);
  EXPECT_TRUE(*DecodeMessage(whole[0]) == Message(dispatch(8, 10)));
  EXPECT_TRUE(*DecodeMessage(whole[1]) == Message(big));
  // A message that fails to encode leaves nothing queued.
  Tdispatch bad = dispatch(9, 1);
  bad.dst = std::string(0x10000, 'd');
  EXPECT_FALSE(w.Enqueue(bad).has_value());
  EXPECT_TRUE(w.empty());
}

// `w` holds exactly `queued` (messages encoded whole, in this order): WriteAll writes them.
void ExpectWritesExactly(FragmentWriter& w, const std::vector<Message>& queued) {
  EXPECT_EQ(w.size(), queued.size());
  std::string want;
  for (const auto& m : queued) want += Encode(m);
  std::string out;
  w.WriteAll(&out);
  EXPECT_EQ(out, want);
  EXPECT_TRUE(w.empty());
}

// Requests timing out behind a peer that stopped reading are removed oldest first, from the
// whole frames and from the queue (where dispatches go once a control message is queued), and
// some from the middle or twice. What is written is exactly the messages left, in order.
TEST(MuxCodecTest, FragmentWriterRemovesManyInAnyOrder) {
  auto dispatch = [](std::uint32_t tag) {
    Tdispatch d;
    d.tag = tag;
    d.payload = std::string(20 + tag % 13, static_cast<char>('a' + tag % 26));
    return d;
  };
  FragmentWriter w;
  std::vector<Message> queued;  // in write order: whole frames, then the queue's
  for (std::uint32_t tag = 2; tag < 402; ++tag) {
    Tdispatch d = dispatch(tag);
    ContextView none[1];
    ASSERT_TRUE(w.EnqueueTdispatch(d.tag, std::span<const ContextView>(none, 0), d.payload).has_value());
    queued.emplace_back(d);
    if (tag == 201) {  // a control message: the dispatches after it go to the queue
      ASSERT_TRUE(w.Enqueue(Tping{1}).has_value());
      queued.emplace_back(Tping{1});
    }
  }
  auto remove = [&](std::uint32_t tag) {
    EXPECT_EQ(w.Remove(wire::kTdispatch, tag), std::optional<bool>(false)) << tag;
    std::erase_if(queued, [tag](const Message& m) {
      const auto* d = std::get_if<Tdispatch>(&m);
      return d != nullptr && d->tag == tag;
    });
  };
  for (std::uint32_t tag = 2; tag < 120; ++tag) remove(tag);    // whole frames, oldest first
  for (std::uint32_t tag = 202; tag < 300; ++tag) remove(tag);  // queued ones, oldest first
  for (std::uint32_t tag : {399u, 150u, 350u, 200u, 300u}) remove(tag);  // newest, middle, edges
  EXPECT_EQ(w.Remove(wire::kTdispatch, 150), std::nullopt) << "already removed";
  EXPECT_EQ(w.Remove(wire::kTdispatch, 2), std::nullopt) << "already removed";
  ExpectWritesExactly(w, queued);
  // Removing everything leaves nothing to write.
  for (std::uint32_t tag = 2; tag < 6; ++tag) {
    ContextView none[1];
    ASSERT_TRUE(w.EnqueueTdispatch(tag, std::span<const ContextView>(none, 0), "x").has_value());
  }
  for (std::uint32_t tag = 2; tag < 6; ++tag) EXPECT_EQ(w.Remove(wire::kTdispatch, tag), std::optional<bool>(false));
  EXPECT_TRUE(w.empty());
  std::string none_out;
  w.WriteAll(&none_out);
  EXPECT_EQ(none_out, "");
}

// Behind a write that never finishes (a peer that stopped reading) nothing is written, and each
// request times out before it was: removed. Its bytes must not stay until the next write (which
// may never come): the writer holds about twice what the live messages need, however many were
// removed, in whole frames and in the queue (where dispatches go once a control message is
// queued), and writes exactly the live ones, in order, when the write comes.
TEST(MuxCodecTest, FragmentWriterReleasesRemovedMessagesWhileNothingIsWritten) {
  auto dispatch = [](std::uint32_t tag, std::size_t payload) {
    Tdispatch d;
    d.tag = tag;
    d.payload = std::string(payload, static_cast<char>('a' + tag % 26));
    return d;
  };
  FragmentWriter w;
  std::vector<Message> live;  // in write order
  std::size_t live_bytes = 0;
  std::uint32_t next_keeper = 4;
  auto enqueue = [&](const Tdispatch& d) {
    ContextView none[1];
    ASSERT_TRUE(w.EnqueueTdispatch(d.tag, std::span<const ContextView>(none, 0), d.payload).has_value());
  };
  auto keep = [&](const Message& m) {
    live.push_back(m);
    live_bytes += Encode(m).size();
  };
  for (int phase = 0; phase < 2; ++phase) {
    if (phase == 1) {  // a control message: the dispatches after it go to the queue
      ASSERT_TRUE(w.Enqueue(Tping{1}).has_value());
      keep(Tping{1});
    }
    for (int i = 0; i < 5000; ++i) {
      if (i % 500 == 0) {  // a request that stays, now and then
        Tdispatch k = dispatch(next_keeper++, 1000);
        enqueue(k);
        keep(k);
      }
      enqueue(dispatch(3, 4096));  // the lowest free tag, again and again
      ASSERT_EQ(w.Remove(wire::kTdispatch, 3), std::optional<bool>(false)) << i;
      ASSERT_LE(w.buffered_bytes(), 2 * live_bytes + 4096) << "phase " << phase << " request " << i;
    }
  }
  ExpectWritesExactly(w, live);
  EXPECT_EQ(w.buffered_bytes(), 0u);

  // Fragmented messages partly written: removing most of them keeps the rest in order, each
  // continuing where it stopped.
  FragmentWriter f(16);
  std::vector<Tdispatch> sent;
  for (std::uint32_t tag = 2; tag < 42; ++tag) {
    Tdispatch d = dispatch(tag, 40 + tag);
    ASSERT_TRUE(f.Enqueue(d).has_value());
    sent.push_back(d);
  }
  std::string frames;
  EXPECT_EQ(f.WriteRound(&frames), 40u);  // every message's first piece
  const std::size_t before = f.buffered_bytes();
  std::vector<Tdispatch> kept;
  for (const auto& d : sent) {
    if (d.tag % 8 == 0) {
      kept.push_back(d);
    } else {
      EXPECT_EQ(f.Remove(wire::kTdispatch, d.tag), std::optional<bool>(true)) << d.tag;
    }
  }
  EXPECT_LT(f.buffered_bytes(), before / 2);
  EXPECT_EQ(f.size(), kept.size());
  f.WriteAll(&frames);
  Reassembler r;
  std::vector<Message> whole;
  for (const Frame& frame : Reassembled(r, ExpectedFrames(frames))) whole.push_back(*DecodeMessage(frame));
  ASSERT_EQ(whole.size(), kept.size());
  for (std::size_t i = 0; i < kept.size(); ++i) EXPECT_TRUE(whole[i] == Message(kept[i])) << i;
  EXPECT_EQ(r.pending_tags(), 35u) << "the removed messages' first pieces";
}

// The request path: EnqueueTdispatch encodes single-frame dispatches whole into one buffer
// that WriteAll hands over (swapping into an empty string). The bytes, the order against other
// queued messages, Remove and the reuse of the swapped buffers must match the Message path.
TEST(MuxCodecTest, FragmentWriterEnqueueTdispatchMatchesEncode) {
  auto dispatch = [](std::uint32_t tag, std::size_t payload) {
    Tdispatch d;
    d.tag = tag;
    d.contexts = {Context{"com.twitter.finagle.Retries", std::string("\0\0\0\1", 4)},
                  Context{"k" + std::to_string(tag), std::string(tag % 7, 'v')}};
    d.payload = std::string(payload, static_cast<char>('a' + tag % 26));
    return d;
  };
  auto enqueue = [](FragmentWriter& w, const Tdispatch& d) {
    std::vector<ContextView> views;
    for (const auto& c : d.contexts) views.push_back({c.key, c.value});
    return w.EnqueueTdispatch(d.tag, views, d.payload);
  };
  FragmentWriter w;
  for (int round = 0; round < 3; ++round) {
    std::string want;
    for (std::uint32_t tag = 2; tag < 30; ++tag) {
      Tdispatch d = dispatch(tag, (tag * 53 + round * 17) % 200);
      ASSERT_TRUE(enqueue(w, d).has_value());
      if (tag % 4 == 0) {
        // Not written yet: removed without a trace, from the middle of the whole frames.
        EXPECT_EQ(w.Remove(wire::kTdispatch, tag), std::optional<bool>(false));
      } else {
        want += Encode(d);
      }
    }
    EXPECT_EQ(w.size(), 21u);
    // Alternately into an empty string (the buffers are swapped) and after a prefix (appended).
    std::string out = round % 2 == 0 ? std::string() : std::string("prefix");
    w.WriteAll(&out);
    EXPECT_EQ(out, (round % 2 == 0 ? std::string() : std::string("prefix")) + want) << "round " << round;
    EXPECT_TRUE(w.empty());
    EXPECT_EQ(w.Remove(wire::kTdispatch, 3), std::nullopt);
  }
  // Behind a message still being fragmented, dispatches queue in order behind it; one queued
  // after them comes before neither.
  FragmentWriter f(16);
  Tdispatch small = dispatch(2, 0);
  small.contexts.clear();
  small.payload = "abcdefghij";  // a 16-byte body: one frame, encoded whole
  ASSERT_TRUE(enqueue(f, small).has_value());
  ASSERT_TRUE(f.Enqueue(Tping{1}).has_value());
  Tdispatch big = dispatch(3, 40);  // several frames
  ASSERT_TRUE(enqueue(f, big).has_value());
  Tdispatch after = dispatch(4, 0);
  after.contexts.clear();
  ASSERT_TRUE(enqueue(f, after).has_value());
  std::string out;
  EXPECT_EQ(f.WriteRound(&out), 4u);  // small (whole), Tping, big's first piece, after
  f.WriteAll(&out);
  std::vector<std::pair<std::uint32_t, bool>> order;
  Reassembler r;
  std::vector<Frame> whole;
  for (auto& frame : ExpectedFrames(out)) {
    order.emplace_back(frame.tag, frame.fragment);
    auto x = r.Add(std::move(frame));
    ASSERT_TRUE(x.has_value());
    if (x->has_value()) whole.push_back(std::move(**x));
  }
  ASSERT_GE(order.size(), 5u);
  EXPECT_EQ(order[0], std::make_pair(2u, false));
  EXPECT_EQ(order[1], std::make_pair(1u, false));
  EXPECT_EQ(order[2], std::make_pair(3u, true));
  EXPECT_EQ(order[3], std::make_pair(4u, false));
  ASSERT_EQ(whole.size(), 4u);
  EXPECT_TRUE(*DecodeMessage(whole[0]) == Message(small));
  EXPECT_TRUE(*DecodeMessage(whole[2]) == Message(after));
  EXPECT_TRUE(*DecodeMessage(whole[3]) == Message(big));
}

TEST(MuxCodecTest, DiscardsDropPartialFragments) {
  const std::string body = kEchoTdispatch.substr(8);
  for (const std::string& discard :
       {kTdiscardedLegacy, kScalesTdiscardedNewCode, kRdiscarded,
        Bytes("00 00 00 06 7f 00 00 02 6e 6f"), Bytes("00 00 00 06 80 00 00 02 6e 6f")}) {
    Reassembler r;
    ASSERT_TRUE(r.Add(Frame{wire::kTdispatch, 2, true, body.substr(0, 16)}).has_value());
    ASSERT_TRUE(r.Add(Frame{wire::kTdispatch, 5, true, "other"}).has_value());
    EXPECT_EQ(r.pending_tags(), 2u);
    FrameDecoder d;
    d.Feed(discard);
    auto frames = DrainFrames(d);
    ASSERT_EQ(frames.size(), 1u);
    auto passed = r.Add(frames[0]);
    ASSERT_TRUE(passed.has_value());
    ASSERT_TRUE(passed->has_value());  // the discard itself passes through
    EXPECT_EQ(r.buffered_bytes(2), 0u) << ToHex(discard);
    EXPECT_EQ(r.buffered_bytes(5), 5u);
    EXPECT_EQ(r.pending_tags(), 1u);
    // A later final piece for tag 2 is then a whole message of its own.
    auto after = r.Add(Frame{wire::kTdispatch, 2, false, body});
    ASSERT_TRUE(after.has_value() && after->has_value());
    EXPECT_EQ((*after)->body, body);
  }
}

TEST(MuxCodecTest, ReassemblerLimitsAndErrors) {
  {
    Reassembler r(40);
    ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 2, true, std::string(20, 'a')}).has_value());
    ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 3, true, std::string(20, 'c')}).has_value());
    ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 2, true, std::string(20, 'a')}).has_value());
    auto over = r.Add(Frame{wire::kRdispatch, 2, false, "x"});
    ASSERT_FALSE(over.has_value());
    EXPECT_EQ(over.error().code, make_error_code(Errc::kProtocolError));
    EXPECT_THAT(over.error().detail, HasSubstr("41 buffered fragment bytes"));
    EXPECT_THAT(over.error().detail, HasSubstr("limit of 40"));
    EXPECT_EQ(r.buffered_bytes(3), 20u);  // other tags unaffected
    EXPECT_FALSE(r.Add(Frame{wire::kRdispatch, 4, true, std::string(41, 'd')}).has_value());
  }
  {
    Reassembler r;
    auto bad = r.Add(Frame{wire::kTping, 1, true, ""});
    ASSERT_FALSE(bad.has_value());
    EXPECT_THAT(bad.error().detail, HasSubstr("fragment bit"));
  }
  {
    Reassembler r;
    ASSERT_TRUE(r.Add(Frame{wire::kTdispatch, 2, true, "a"}).has_value());
    auto mixed = r.Add(Frame{wire::kRdispatch, 2, false, "b"});
    ASSERT_FALSE(mixed.has_value());
    EXPECT_THAT(mixed.error().detail, HasSubstr("continues a Tdispatch"));
  }
}

TEST(MuxCodecTest, ReassemblerBoundsTheBytesOfAllTagsTogether) {
  Reassembler r(40, "session.max_message_size", 50, "session.max_reassembly_bytes");
  ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 2, true, std::string(20, 'a')}).has_value());
  ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 3, true, std::string(20, 'b')}).has_value());
  EXPECT_EQ(r.buffered_bytes(), 40u);
  // A final fragment leaves with its message: it may take the sum past the bound.
  auto whole = r.Add(Frame{wire::kRdispatch, 2, false, std::string(15, 'a')});
  ASSERT_TRUE(whole.has_value());
  ASSERT_TRUE(whole->has_value());
  EXPECT_EQ((*whole)->body.size(), 35u);
  EXPECT_EQ(r.buffered_bytes(), 20u);
  // A new tag's first fragment, and a buffered tag's next one, are refused past the bound.
  ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 4, true, std::string(25, 'c')}).has_value());
  EXPECT_EQ(r.buffered_bytes(), 45u);
  auto first = r.Add(Frame{wire::kRdispatch, 5, true, std::string(6, 'd')});
  ASSERT_FALSE(first.has_value());
  EXPECT_EQ(first.error().code, make_error_code(Errc::kProtocolError));
  EXPECT_THAT(first.error().detail,
              HasSubstr("Rdispatch tag 5: 6 more fragment bytes with 45 buffered for 2 tags exceed the most buffered "
                        "for reassembly (limit session.max_reassembly_bytes = 50)"));
  EXPECT_EQ(r.buffered_bytes(), 45u);
  auto next = r.Add(Frame{wire::kRdispatch, 3, true, std::string(6, 'b')});
  ASSERT_FALSE(next.has_value());
  EXPECT_THAT(next.error().detail, HasSubstr("limit session.max_reassembly_bytes = 50"));
  // The refused tag's fragments are gone, and with them their bytes.
  EXPECT_EQ(r.buffered_bytes(3), 0u);
  EXPECT_EQ(r.buffered_bytes(), 25u);
  // Dropped, discarded and cleared fragments give their bytes back.
  EXPECT_TRUE(r.Drop(4));
  EXPECT_EQ(r.buffered_bytes(), 0u);
  ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 6, true, std::string(40, 'e')}).has_value());
  ASSERT_TRUE(r.Add(Frame{wire::kRerr, 6, false, "gone"}).has_value());
  EXPECT_EQ(r.buffered_bytes(), 0u);
  ASSERT_TRUE(r.Add(Frame{wire::kRdispatch, 7, true, std::string(30, 'f')}).has_value());
  r.Clear();
  EXPECT_EQ(r.buffered_bytes(), 0u);
  EXPECT_TRUE(r.Add(Frame{wire::kRdispatch, 8, true, std::string(40, 'g')}).has_value());
}

// --- Encoding limits. ---------------------------------------------------------------------------

TEST(MuxCodecTest, UnrepresentableMessagesAreEncodeErrors) {
  std::string out;
  auto bad_tag = EncodeMessage(Tping{0x800000}, &out);
  ASSERT_FALSE(bad_tag.has_value());
  EXPECT_EQ(bad_tag.error().code, make_error_code(Errc::kInvalidArgument));
  EXPECT_FALSE(EncodeMessage(Tdiscarded{0, 0x800000, ""}, &out).has_value());
  Tdispatch big_key;
  big_key.tag = 2;
  big_key.contexts = {{std::string(0x10000, 'k'), ""}};
  auto e = EncodeMessage(big_key, &out);
  ASSERT_FALSE(e.has_value());
  EXPECT_THAT(e.error().detail, HasSubstr("context key length 65536"));
  EXPECT_TRUE(out.empty());
  EXPECT_THROW(Encode(big_key), scales::Error);
  EXPECT_TRUE(EncodeMessage(Tping{kMaxTag}, &out).has_value());
  EXPECT_EQ(out, Bytes("00 00 00 04 41 7f ff ff"));
  // A failed encode after other frames leaves those frames as they were.
  EXPECT_FALSE(EncodeMessage(big_key, &out).has_value());
  EXPECT_EQ(out, Bytes("00 00 00 04 41 7f ff ff"));
  EXPECT_TRUE(EncodeMessage(EchoTdispatchMessage(), &out).has_value());
  EXPECT_EQ(out, Bytes("00 00 00 04 41 7f ff ff") + kEchoTdispatch);
}

// --- Contexts. ----------------------------------------------------------------------------------

TEST(MuxCodecTest, DeadlineContext) {
  Deadline d{1'000'000'000, Deadline::kNone};
  EXPECT_EQ(EncodeDeadline(d), Bytes("00 00 00 00 3b 9a ca 00 7f ff ff ff ff ff ff ff"));
  EXPECT_EQ(*DecodeDeadline(Bytes("00 00 00 00 3b 9a ca 00 7f ff ff ff ff ff ff ff")), d);
  Deadline neg{-1, -2};
  EXPECT_EQ(EncodeDeadline(neg), Bytes("ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff fe"));
  EXPECT_EQ(*DecodeDeadline(EncodeDeadline(neg)), neg);
  Deadline ns{1'700'000'000'123'456'789, 1'700'000'000'623'456'789};
  EXPECT_EQ(*DecodeDeadline(EncodeDeadline(ns)), ns);
  EXPECT_FALSE(DecodeDeadline(std::string(15, '\0')).has_value());
  EXPECT_FALSE(DecodeDeadline(std::string(17, '\0')).has_value());
}

// The Append forms write the same bytes after whatever the string holds.
TEST(MuxCodecTest, AppendContextsMatchEncode) {
  Deadline d{1'700'000'000'123'456'789, Deadline::kNone};
  TraceContext t{1, 2, 3, TraceContext::kDebug, 0x0102030405060708};
  std::string out = "x";
  AppendDeadline(d, &out);
  AppendTraceContext(t, &out);
  AppendRetries(-1, &out);
  EXPECT_EQ(out, "x" + EncodeDeadline(d) + EncodeTraceContext(t) + EncodeRetries(-1));
  EXPECT_EQ(out.size(), 1u + 16 + 40 + 4);
}

TEST(MuxCodecTest, TraceContext) {
  TraceContext t{1, 2, 3, TraceContext::kSamplingKnown | TraceContext::kSampled, std::nullopt};
  std::string v = EncodeTraceContext(t);
  EXPECT_EQ(v, Bytes("00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 02 "
                     "00 00 00 00 00 00 00 03 00 00 00 00 00 00 00 06"));
  EXPECT_EQ(*DecodeTraceContext(v), t);
  t.trace_id_high = 0x0102030405060708;
  v = EncodeTraceContext(t);
  ASSERT_EQ(v.size(), 40u);
  EXPECT_EQ(v.substr(32), Bytes("01 02 03 04 05 06 07 08"));
  EXPECT_EQ(*DecodeTraceContext(v), t);
  EXPECT_FALSE(DecodeTraceContext(std::string(33, '\0')).has_value());
  EXPECT_FALSE(DecodeTraceContext("").has_value());
}

TEST(MuxCodecTest, RetriesClientIdBackup) {
  EXPECT_EQ(EncodeRetries(0), Bytes("00 00 00 00"));
  EXPECT_EQ(EncodeRetries(3), Bytes("00 00 00 03"));
  EXPECT_EQ(*DecodeRetries(Bytes("ff ff ff ff")), -1);
  EXPECT_FALSE(DecodeRetries(Bytes("00 00 03")).has_value());
  EXPECT_EQ(EncodeClientId("svc-a"), "svc-a");
  EXPECT_EQ(*DecodeClientId(""), std::nullopt);
  EXPECT_EQ(**DecodeClientId("caf\xc3\xa9"), "caf\xc3\xa9");
  EXPECT_FALSE(DecodeClientId("bad\xc3").has_value());
  EXPECT_FALSE(DecodeClientId("\xff").has_value());
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));  // surrogate
  EXPECT_FALSE(IsValidUtf8("\xc0\x80"));      // overlong
  EXPECT_TRUE(IsValidUtf8("\xf0\x9f\x98\x80"));
  Contexts c = {{"a", "b"}};
  EXPECT_FALSE(IsBackupRequest(c));
  c.push_back({std::string(kBackupRequestKey), ""});
  EXPECT_TRUE(IsBackupRequest(c));
  EXPECT_EQ(*FindContext(c, "a"), "b");
  EXPECT_EQ(FindContext(c, "z"), nullptr);
}

TEST(MuxCodecTest, HeadersContext) {
  Headers h = {{"k", "v"}, {"key2", ""}};
  std::string v = EncodeHeaders(h);
  EXPECT_EQ(v, Bytes(R"(00 01 "k" 00 01 "v" 00 04 "key2" 00 00)"));
  EXPECT_EQ(*DecodeHeaders(v), h);
  EXPECT_TRUE(DecodeHeaders("")->empty());
  EXPECT_FALSE(DecodeHeaders(Bytes("00 01 6b 00")).has_value());
  EXPECT_FALSE(DecodeHeaders(Bytes("00 05 6b")).has_value());
  // Total <= 32767: excess pairs dropped from the tail.
  Headers big = {{"a", std::string(20000, 'x')},
                 {"b", std::string(12000, 'y')},
                 {"c", std::string(1000, 'z')},
                 {"d", "small"}};
  size_t dropped = 99;
  std::string enc = EncodeHeaders(big, &dropped);
  EXPECT_EQ(dropped, 2u);
  EXPECT_LE(enc.size(), kMaxHeadersBytes);
  auto back = DecodeHeaders(enc);
  ASSERT_TRUE(back.has_value());
  ASSERT_EQ(back->size(), 2u);
  EXPECT_EQ((*back)[1].first, "b");
  // Exactly at the limit is kept.
  Headers exact = {{"k", std::string(32767 - 5, 'v')}};
  EXPECT_EQ(EncodeHeaders(exact).size(), 32767u);
  Headers over = {{"k", std::string(32767 - 4, 'v')}};
  EXPECT_TRUE(EncodeHeaders(over, &dropped).empty());
  EXPECT_EQ(dropped, 1u);
  EXPECT_EQ(EncodeHeaders(h, &dropped).size(), v.size());
  EXPECT_EQ(dropped, 0u);
  // A pair whose value is longer than 65535 bytes is left out; the pairs after it are kept.
  Headers long_value = {{"a", std::string(70000, 'x')}, {"b", "y"}};
  EXPECT_EQ(EncodeHeaders(long_value, &dropped), Bytes(R"(00 01 "b" 00 01 "y")"));
  EXPECT_EQ(dropped, 1u);
}

TEST(MuxCodecTest, MuxFailureContext) {
  auto nack = DecodeFrameBytes(kRdispatchNack);
  ASSERT_TRUE(nack.has_value());
  const std::string* flags = FindContext(std::get<Rdispatch>(*nack).contexts, kMuxFailureKey);
  ASSERT_NE(flags, nullptr);
  EXPECT_EQ(*DecodeMuxFailure(*flags), mux_failure::kRetryable | mux_failure::kRejected);
  EXPECT_EQ(EncodeMuxFailure(mux_failure::kRetryable | mux_failure::kRejected),
            Bytes("00 00 00 00 00 00 00 03"));
  EXPECT_EQ(*DecodeMuxFailure(Bytes("00 00 00 00 00 00 00 04 ff ff")),
            mux_failure::kNonRetryable);  // extra bytes ignored
  EXPECT_FALSE(DecodeMuxFailure(Bytes("00 00 00 04")).has_value());
}

TEST(MuxCodecTest, DescribeAndNames) {
  EXPECT_EQ(TypeName(0x7F), "Rerr");
  EXPECT_EQ(TypeName(0x80), "Rerr");
  EXPECT_EQ(TypeName(0xC2), "Tdiscarded");
  EXPECT_EQ(TypeName(0x42), "Tdiscarded");
  EXPECT_EQ(TypeName(0x12), "unknown(0x12)");
  EXPECT_EQ(Describe(EchoTdispatchMessage()), "Tdispatch tag=2 contexts=1 dst=0 dtab=0 payload=26");
  EXPECT_EQ(TagOf(Message(Rdiscarded{9})), 9u);
}

TEST(MuxCodecTest, ValueThrowsScalesError) {
  auto m = DecodeFrameBytes(Bytes("00 00 00 04 12 00 00 01"));
  ASSERT_FALSE(m.has_value());
  try {
    (void)m.value();
    FAIL();
  } catch (const scales::Error& e) {
    EXPECT_EQ(e.scales_code(), make_error_code(Errc::kProtocolError));
    EXPECT_THAT(e.what(), HasSubstr("unknown mux message type 0x12"));
  }
}

}  // namespace
}  // namespace scales::mux
