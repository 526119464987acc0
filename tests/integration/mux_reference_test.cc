// The Mux reference server (tests/integration/mux_reference/mux_server.py) exercised over a raw
// socket with the C++ Mux codec: this checks the server the ThriftMux tests rely on, and the
// codec against an implementation written independently of it.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/transport/TBufferTransports.h>

#include "scales/mux/codec.h"
#include "support/mux_server_fixture.h"

namespace scales::mux {
namespace {

using ::scales::test::MuxReferenceServer;
using std::chrono::milliseconds;
using ::testing::HasSubstr;

// --- Thrift payloads (libthrift binary protocol over a memory buffer). -------------------------

std::string ThriftCall(const std::string& method, int16_t field_type, const std::string& s,
                       int32_t i = 0) {
  auto buffer = std::make_shared<apache::thrift::transport::TMemoryBuffer>();
  apache::thrift::protocol::TBinaryProtocol proto(buffer);  // strict write
  proto.writeMessageBegin(method, apache::thrift::protocol::T_CALL, 0);
  proto.writeStructBegin("args");
  if (field_type == apache::thrift::protocol::T_STRING) {
    proto.writeFieldBegin("message", apache::thrift::protocol::T_STRING, 1);
    proto.writeString(s);
    proto.writeFieldEnd();
  } else if (field_type == apache::thrift::protocol::T_I32) {
    proto.writeFieldBegin("millis", apache::thrift::protocol::T_I32, 1);
    proto.writeI32(i);
    proto.writeFieldEnd();
  }
  proto.writeFieldStop();
  proto.writeStructEnd();
  proto.writeMessageEnd();
  return buffer->getBufferAsString();
}

std::string EchoCall(const std::string& message) {
  return ThriftCall("echo", apache::thrift::protocol::T_STRING, message);
}
std::string SleepCall(int32_t millis) {
  return ThriftCall("sleep", apache::thrift::protocol::T_I32, "", millis);
}

// The success string of a REPLY (field 0).
std::optional<std::string> ThriftReplyString(const std::string& payload) {
  auto buffer = std::make_shared<apache::thrift::transport::TMemoryBuffer>(
      reinterpret_cast<uint8_t*>(const_cast<char*>(payload.data())),
      static_cast<uint32_t>(payload.size()));
  apache::thrift::protocol::TBinaryProtocol proto(buffer);
  std::string name;
  apache::thrift::protocol::TMessageType type;
  int32_t seqid = -1;
  proto.readMessageBegin(name, type, seqid);
  if (type != apache::thrift::protocol::T_REPLY || seqid != 0) return std::nullopt;
  std::string struct_name, value;
  proto.readStructBegin(struct_name);
  apache::thrift::protocol::TType ftype;
  int16_t fid;
  std::optional<std::string> out;
  for (;;) {
    std::string fname;
    proto.readFieldBegin(fname, ftype, fid);
    if (ftype == apache::thrift::protocol::T_STOP) break;
    if (fid == 0 && ftype == apache::thrift::protocol::T_STRING) {
      proto.readString(value);
      out = value;
    } else {
      proto.skip(ftype);
    }
    proto.readFieldEnd();
  }
  return out;
}

Tdispatch Dispatch(std::uint32_t tag, std::string payload, Contexts contexts = {}) {
  Tdispatch d;
  d.tag = tag;
  d.contexts = std::move(contexts);
  d.payload = std::move(payload);
  return d;
}

// --- A raw Mux connection. ---------------------------------------------------------------------

class RawConnection {
 public:
  explicit RawConnection(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ADD_FAILURE() << "connect to port " << port << " failed";
    }
  }
  ~RawConnection() {
    if (fd_ >= 0) ::close(fd_);
  }

  void SendBytes(const std::string& bytes) {
    std::size_t off = 0;
    while (off < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      ASSERT_GT(n, 0);
      off += static_cast<std::size_t>(n);
    }
  }
  void Send(const Message& m) { SendBytes(Encode(m)); }

  // Reads until `n` bytes arrived (or EOF / timeout).
  std::string ReadBytes(std::size_t n, milliseconds timeout = milliseconds(5000)) {
    std::string out;
    while (out.size() < n && Fill(timeout)) {
      out += raw_;
      raw_.clear();
    }
    std::string rest = out.size() > n ? out.substr(n) : std::string();
    out.resize(std::min(out.size(), n));
    raw_ = rest + raw_;
    return out;
  }

  // Next frame as read (fragments not reassembled).
  std::optional<Frame> ReadFrame(milliseconds timeout = milliseconds(5000)) {
    auto until = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (!raw_.empty()) {
        decoder_.Feed(raw_);
        raw_.clear();
      }
      auto f = decoder_.Next();
      if (!f.has_value()) {
        ADD_FAILURE() << f.error().detail;
        return std::nullopt;
      }
      if (f->has_value()) return std::move(**f);
      auto left =
          std::chrono::duration_cast<milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0 || !Fill(left)) return std::nullopt;
    }
  }

  // Next whole message (fragments reassembled), decoded.
  std::optional<Message> ReadMessage(milliseconds timeout = milliseconds(5000)) {
    for (;;) {
      auto f = ReadFrame(timeout);
      if (!f) return std::nullopt;
      auto whole = reassembler_.Add(std::move(*f));
      if (!whole.has_value()) {
        ADD_FAILURE() << whole.error().detail;
        return std::nullopt;
      }
      if (!whole->has_value()) continue;
      auto m = DecodeMessage(**whole);
      if (!m.has_value()) {
        ADD_FAILURE() << m.error().detail;
        return std::nullopt;
      }
      return std::move(*m);
    }
  }

  // Reads messages, answering server Tpings, until one that is not a Tping arrives.
  std::optional<Message> ReadReply(milliseconds timeout = milliseconds(5000)) {
    for (;;) {
      auto m = ReadMessage(timeout);
      if (m && std::holds_alternative<Tping>(*m)) {
        Send(Rping{std::get<Tping>(*m).tag});
        continue;
      }
      return m;
    }
  }

  // Whether the server closed the connection (EOF) within `timeout`.
  bool WaitForEof(milliseconds timeout = milliseconds(5000)) {
    while (Fill(timeout)) raw_.clear();
    return eof_;
  }

  bool eof() const { return eof_; }
  std::string TakeRaw() { return std::exchange(raw_, std::string()); }
  const FrameDecoder& decoder() const { return decoder_; }

  // Probe (+ Tinit) handshake. Returns the Rinit.
  Rinit Handshake(InitHeaders headers = {{"mux-framer", EncodeMuxFramer(0x7FFFFFFF)},
                                         {"tls", "off"}}) {
    Send(ProbeMessage());
    auto echo = ReadMessage();
    EXPECT_TRUE(echo && IsProbe(*echo));
    Send(Tinit{1, 1, std::move(headers)});
    auto rinit = ReadMessage();
    EXPECT_TRUE(rinit && std::holds_alternative<Rinit>(*rinit));
    return rinit ? std::get<Rinit>(*rinit) : Rinit{};
  }

 private:
  bool Fill(milliseconds timeout) {
    if (eof_) return false;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    char buf[65536];
    ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) {
      eof_ = true;
      return false;
    }
    raw_.append(buf, static_cast<std::size_t>(n));
    return true;
  }

  int fd_ = -1;
  bool eof_ = false;
  std::string raw_;
  FrameDecoder decoder_;
  Reassembler reassembler_;
};

std::string ReplyText(const std::optional<Message>& m) {
  if (!m || !std::holds_alternative<Rdispatch>(*m)) return "<not an Rdispatch>";
  const auto& r = std::get<Rdispatch>(*m);
  if (r.status != ReplyStatus::kOk) return "<status " + std::to_string(int(r.status)) + ">";
  return ThriftReplyString(r.body).value_or("<bad thrift reply>");
}

// --- Finagle mode. ------------------------------------------------------------------------------

TEST(MuxReferenceServerTest, FinagleEchoesProbeWithLegacyCode) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(ProbeMessage());
  // Byte-exact: Rerr 0x7F, tag 1, "tinit check".
  std::string echoed = c.ReadBytes(19);
  EXPECT_EQ(echoed, Encode(ProbeMessage()));
  EXPECT_EQ(static_cast<uint8_t>(echoed[4]), 0x7F);
}

TEST(MuxReferenceServerTest, FinagleTinitRinitExchange) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  Rinit rinit = c.Handshake();
  EXPECT_EQ(rinit.tag, 1u);
  EXPECT_EQ(rinit.version, 1);
  const std::string* framer = FindInitHeader(rinit.headers, kMuxFramerHeader);
  ASSERT_NE(framer, nullptr);
  EXPECT_EQ(*DecodeMuxFramer(*framer), 0x7FFFFFFF);
  ASSERT_NE(FindInitHeader(rinit.headers, kTlsHeader), nullptr);
  EXPECT_EQ(*FindInitHeader(rinit.headers, kTlsHeader), "off");
  EXPECT_TRUE(server.WaitForLog({"recv Tinit tag=1", "headers=mux-framer,tls"}));
}

TEST(MuxReferenceServerTest, TpingIsAnsweredWithRping) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Tping{1});
  EXPECT_EQ(c.ReadBytes(8), Encode(Rping{1}));
  c.Send(Tping{7});
  auto m = c.ReadMessage();
  ASSERT_TRUE(m);
  EXPECT_TRUE(*m == Message(Rping{7}));
}

TEST(MuxReferenceServerTest, EchoRoundTripWithoutTinit) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  Contexts contexts = {{std::string(kClientIdKey), EncodeClientId("svc-a")},
                       {std::string(kDeadlineKey), EncodeDeadline({1, 2'000'000'000})},
                       {std::string(kRetriesKey), EncodeRetries(0)}};
  c.Send(Dispatch(2, EchoCall("hi"), contexts));
  // The reply for echo("hi") is the 37 bytes of mux-protocol.md §1.10.
  std::string reply = c.ReadBytes(37);
  EXPECT_EQ(reply, std::string("\x00\x00\x00\x21\xfe\x00\x00\x02"
                               "\x00\x00\x00"
                               "\x80\x01\x00\x02\x00\x00\x00\x04"
                               "echo"
                               "\x00\x00\x00\x00"
                               "\x0b\x00\x00\x00\x00\x00\x02"
                               "hi"
                               "\x00",
                               37));
  auto m = DecodeFrameBytes(reply);
  ASSERT_TRUE(m.has_value()) << m.error().detail;
  EXPECT_EQ(ReplyText(*m), "hi");
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch tag=2", "client_id=svc-a", "retries=0",
                                 "deadline_ns=2000000000", "method=echo arg=hi"}))
      << server.Log();
}

TEST(MuxReferenceServerTest, MethodsAndOutOfOrderReplies) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Dispatch(2, SleepCall(300)));
  c.Send(Dispatch(3, EchoCall("fast")));
  c.Send(Dispatch(4, ThriftCall("ping", apache::thrift::protocol::T_STOP, "")));
  auto first = c.ReadMessage();
  auto second = c.ReadMessage();
  auto third = c.ReadMessage();
  ASSERT_TRUE(first && second && third);
  EXPECT_EQ(TagOf(*first), 3u);
  EXPECT_EQ(ReplyText(first), "fast");
  EXPECT_EQ(TagOf(*second), 4u);
  EXPECT_EQ(TagOf(*third), 2u);
  EXPECT_EQ(ReplyText(third), "300");
  // Tags are reusable once answered.
  c.Send(Dispatch(2, EchoCall("again")));
  EXPECT_EQ(ReplyText(c.ReadMessage()), "again");
}

TEST(MuxReferenceServerTest, ManyConnectionsConcurrently) {
  MuxReferenceServer server;
  std::vector<std::unique_ptr<RawConnection>> conns;
  for (int i = 0; i < 8; ++i) conns.push_back(std::make_unique<RawConnection>(server.port()));
  for (int i = 0; i < 8; ++i) {
    for (std::uint32_t tag = 2; tag < 12; ++tag) {
      conns[i]->Send(Dispatch(tag, EchoCall(std::to_string(i) + "/" + std::to_string(tag))));
    }
  }
  for (int i = 0; i < 8; ++i) {
    for (int k = 0; k < 10; ++k) {
      auto m = conns[i]->ReadMessage();
      ASSERT_TRUE(m);
      EXPECT_EQ(ReplyText(m), std::to_string(i) + "/" + std::to_string(TagOf(*m)));
    }
  }
}

TEST(MuxReferenceServerTest, ClientFragmentsAreReassembled) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Handshake();
  FragmentWriter w(8);
  std::string long_text(100, 'x');
  ASSERT_TRUE(w.Enqueue(Dispatch(2, EchoCall(long_text))).has_value());
  ASSERT_TRUE(w.Enqueue(Dispatch(3, EchoCall("short"))).has_value());
  std::string bytes;
  w.WriteAll(&bytes);
  c.SendBytes(bytes);
  auto a = c.ReadMessage();
  auto b = c.ReadMessage();
  ASSERT_TRUE(a && b);
  EXPECT_EQ(ReplyText(TagOf(*a) == 2 ? a : b), long_text);
  EXPECT_EQ(ReplyText(TagOf(*a) == 3 ? a : b), "short");
  EXPECT_TRUE(server.WaitForLog({"recv Tdispatch-fragment tag=2 size=8"}));
}

TEST(MuxReferenceServerTest, TdiscardedForPendingTagGetsRdiscarded) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Dispatch(2, EchoCall("noreply")));
  ASSERT_TRUE(server.WaitForLog({"recv Tdispatch tag=2", "arg=noreply"}));
  c.Send(Tdiscarded{0, 2, "timeout"});  // legacy code 0xC2
  auto m = c.ReadMessage();
  ASSERT_TRUE(m);
  EXPECT_TRUE(*m == Message(Rdiscarded{2}));
  EXPECT_TRUE(server.WaitForLog({"recv Tdiscarded", "code=0xc2", "which=2", "why=timeout"}));
  // Unknown tag: nothing is sent back (the next thing we read is the Rping).
  c.Send(Tdiscarded{0, 9, "late"});
  c.Send(Tping{1});
  m = c.ReadMessage();
  ASSERT_TRUE(m);
  EXPECT_TRUE(*m == Message(Rping{1}));
  // The new Tdiscarded code is accepted too.
  c.Send(Dispatch(3, EchoCall("noreply")));
  ASSERT_TRUE(server.WaitForLog({"recv Tdispatch tag=3"}));
  c.SendBytes(std::string("\x00\x00\x00\x07\x42\x00\x00\x00\x00\x00\x03", 11));
  m = c.ReadMessage();
  ASSERT_TRUE(m);
  EXPECT_TRUE(*m == Message(Rdiscarded{3}));
}

// --greet-after-tinit: the control message comes after the probe's echo, between Tinit and its
// Rinit (a Tdrain also drains the connection: it closes once Rdrain came and nothing is left).
TEST(MuxReferenceServerTest, GreetAfterTinitComesBeforeRinit) {
  for (const char* greet : {"tping", "tdrain"}) {
    SCOPED_TRACE(greet);
    MuxReferenceServer server({"--greet-after-tinit", greet});
    RawConnection c(server.port());
    c.Send(ProbeMessage());
    auto echo = c.ReadMessage();
    ASSERT_TRUE(echo && IsProbe(*echo));
    c.Send(Tinit{1, 1, {{"mux-framer", EncodeMuxFramer(0x7FFFFFFF)}, {"tls", "off"}}});
    const bool ping = std::string_view(greet) == "tping";
    auto first = c.ReadMessage();
    ASSERT_TRUE(first);
    EXPECT_TRUE(*first == (ping ? Message(Tping{1}) : Message(Tdrain{1}))) << Describe(*first);
    auto rinit = c.ReadMessage();
    ASSERT_TRUE(rinit && std::holds_alternative<Rinit>(*rinit));
    if (ping) {
      c.Send(Rping{1});
      EXPECT_TRUE(server.WaitForLog({"conn=1 recv Rping tag=1"})) << server.Log();
      c.Send(Dispatch(2, EchoCall("after")));
      EXPECT_EQ(ReplyText(c.ReadReply()), "after");
    } else {
      c.Send(Rdrain{1});
      EXPECT_TRUE(c.WaitForEof());
      EXPECT_TRUE(server.WaitForLog({"conn=1 close drained"})) << server.Log();
    }
  }
}

// --- Strict mode. -------------------------------------------------------------------------------

TEST(MuxReferenceServerTest, StrictFragmentsRepliesAtFramer16) {
  MuxReferenceServer server({"--mode", "strict", "--framer", "16", "--ping-interval", "60000"});
  RawConnection c(server.port());
  Rinit rinit = c.Handshake();
  ASSERT_NE(FindInitHeader(rinit.headers, kMuxFramerHeader), nullptr);
  EXPECT_EQ(*DecodeMuxFramer(*FindInitHeader(rinit.headers, kMuxFramerHeader)), 16);
  std::string text(60, 'y');
  c.Send(Dispatch(2, EchoCall(text)));
  // Raw frames: non-final ones carry the fragment bit and 16-byte bodies.
  std::vector<Frame> frames;
  for (;;) {
    auto f = c.ReadFrame();
    ASSERT_TRUE(f);
    frames.push_back(*f);
    if (!f->fragment) break;
  }
  ASSERT_GT(frames.size(), 1u);
  std::string body;
  for (std::size_t i = 0; i < frames.size(); ++i) {
    EXPECT_EQ(frames[i].type, wire::kRdispatch);
    EXPECT_EQ(frames[i].tag, 2u);
    EXPECT_EQ(frames[i].fragment, i + 1 < frames.size());
    if (i + 1 < frames.size()) {
      EXPECT_EQ(frames[i].body.size(), 16u);
    } else {
      EXPECT_LE(frames[i].body.size(), 16u);
    }
    body += frames[i].body;
  }
  Reassembler r;
  std::optional<Frame> whole;
  for (auto& f : frames) {
    auto x = r.Add(f);
    ASSERT_TRUE(x.has_value());
    if (x->has_value()) whole = **x;
  }
  ASSERT_TRUE(whole);
  EXPECT_EQ(whole->body, body);
  auto m = DecodeMessage(*whole);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(ReplyText(*m), text);
}

TEST(MuxReferenceServerTest, StrictInterleavesFragmentsOfConcurrentReplies) {
  MuxReferenceServer server({"--mode", "strict", "--framer", "16", "--ping-interval", "60000"});
  RawConnection c(server.port());
  c.Handshake();
  // Both replies are queued in the same turn, so their fragments go out round-robin.
  c.SendBytes(Encode(Dispatch(2, SleepCall(200))) +
              Encode(Dispatch(3, EchoCall(std::string(50, 'a')))) +
              Encode(Dispatch(4, EchoCall(std::string(50, 'b')))));
  std::vector<std::uint32_t> order;
  std::vector<Message> replies;
  Reassembler r;
  while (replies.size() < 3) {
    auto f = c.ReadFrame();
    ASSERT_TRUE(f);
    order.push_back(f->tag);
    auto x = r.Add(std::move(*f));
    ASSERT_TRUE(x.has_value());
    if (x->has_value()) replies.push_back(*DecodeMessage(**x));
  }
  ASSERT_GE(order.size(), 4u);
  EXPECT_EQ(order[0], 3u);
  EXPECT_EQ(order[1], 4u);  // interleaved
  EXPECT_EQ(ReplyText(replies[0]), std::string(50, 'a'));
  EXPECT_EQ(ReplyText(replies[1]), std::string(50, 'b'));
  EXPECT_EQ(ReplyText(replies[2]), "200");
}

TEST(MuxReferenceServerTest, StrictNacksDispatchesBeforeTinit) {
  MuxReferenceServer server({"--mode", "strict"});
  RawConnection c(server.port());
  c.Send(Dispatch(2, EchoCall("early")));
  auto m = c.ReadMessage();
  ASSERT_TRUE(m && std::holds_alternative<Rdispatch>(*m));
  const auto& r = std::get<Rdispatch>(*m);
  EXPECT_EQ(r.status, ReplyStatus::kNack);
  const std::string* flags = FindContext(r.contexts, kMuxFailureKey);
  ASSERT_NE(flags, nullptr);
  EXPECT_EQ(*DecodeMuxFailure(*flags), mux_failure::kRetryable | mux_failure::kRejected);
  c.Handshake();
  c.Send(Dispatch(2, EchoCall("late")));
  EXPECT_EQ(ReplyText(c.ReadReply()), "late");
}

TEST(MuxReferenceServerTest, StrictPingsTheClient) {
  MuxReferenceServer server({"--mode", "strict", "--ping-interval", "100"});
  RawConnection c(server.port());
  c.Handshake();
  auto m = c.ReadMessage(milliseconds(3000));
  ASSERT_TRUE(m);
  ASSERT_TRUE(std::holds_alternative<Tping>(*m));
  c.Send(Rping{std::get<Tping>(*m).tag});
  EXPECT_TRUE(server.WaitForLog({"recv Rping tag=1"}));
}

// --- Old mode. ----------------------------------------------------------------------------------

TEST(MuxReferenceServerTest, OldAnswersProbeWithRerrThenServes) {
  MuxReferenceServer server({"--mode", "old"});
  RawConnection c(server.port());
  c.Send(ProbeMessage());
  auto m = c.ReadMessage();
  ASSERT_TRUE(m && std::holds_alternative<Rerr>(*m));
  EXPECT_EQ(std::get<Rerr>(*m).tag, 1u);
  EXPECT_EQ(std::get<Rerr>(*m).why, "Unexpected mux message type 127");
  EXPECT_FALSE(IsProbe(*m));
  c.Send(Dispatch(2, EchoCall("old")));
  EXPECT_EQ(ReplyText(c.ReadMessage()), "old");
}

// --- Misbehaviours on demand. -------------------------------------------------------------------

TEST(MuxReferenceServerTest, NackErrorRerrAndLease) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Dispatch(2, EchoCall("nack")));
  auto nack = c.ReadMessage();
  ASSERT_TRUE(nack && std::holds_alternative<Rdispatch>(*nack));
  EXPECT_EQ(std::get<Rdispatch>(*nack).status, ReplyStatus::kNack);
  EXPECT_NE(FindContext(std::get<Rdispatch>(*nack).contexts, kMuxFailureKey), nullptr);

  c.Send(Dispatch(3, EchoCall("error:boom")));
  auto error = c.ReadMessage();
  ASSERT_TRUE(error);
  Rdispatch want_error;
  want_error.tag = 3;
  want_error.status = ReplyStatus::kError;
  want_error.body = "boom";
  EXPECT_TRUE(*error == Message(want_error));

  c.Send(Dispatch(4, EchoCall("rerr:bad things")));
  auto rerr = c.ReadMessage();
  ASSERT_TRUE(rerr);
  EXPECT_TRUE(*rerr == Message(Rerr{4, "bad things"}));

  c.Send(Dispatch(5, EchoCall("lease:10000")));
  auto lease = c.ReadMessage();
  ASSERT_TRUE(lease);
  EXPECT_TRUE(*lease == Message(Tlease{0, 0, 10000}));
  EXPECT_EQ(ReplyText(c.ReadMessage()), "lease:10000");
}

TEST(MuxReferenceServerTest, DrainThenCloseAfterRdrain) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Dispatch(2, SleepCall(300)));
  c.Send(Dispatch(3, EchoCall("drain")));
  EXPECT_EQ(ReplyText(c.ReadMessage()), "drain");
  auto drain = c.ReadMessage();
  ASSERT_TRUE(drain);
  EXPECT_TRUE(*drain == Message(Tdrain{1}));
  // New work is refused while draining.
  c.Send(Dispatch(4, EchoCall("after drain")));
  auto refused = c.ReadMessage();
  ASSERT_TRUE(refused && std::holds_alternative<Rdispatch>(*refused));
  EXPECT_EQ(std::get<Rdispatch>(*refused).status, ReplyStatus::kNack);
  c.Send(Rdrain{1});
  // Outstanding work finishes, then the server closes.
  EXPECT_EQ(ReplyText(c.ReadMessage()), "300");
  EXPECT_TRUE(c.WaitForEof());
  EXPECT_TRUE(server.WaitForLog({"recv Rdrain tag=1"}));
  EXPECT_TRUE(server.WaitForLog({"close drained"}));
}

TEST(MuxReferenceServerTest, GarbageFrameKeepsTheConnection) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Dispatch(2, EchoCall("garbage")));
  auto f = c.ReadFrame();
  ASSERT_TRUE(f);
  EXPECT_FALSE(IsKnownType(f->type));
  auto m = DecodeMessage(*f);
  ASSERT_FALSE(m.has_value());
  EXPECT_THAT(m.error().detail, HasSubstr("unknown mux message type"));
  c.Send(Dispatch(3, EchoCall("still here")));
  EXPECT_EQ(ReplyText(c.ReadMessage()), "still here");
}

TEST(MuxReferenceServerTest, CloseMidFrame) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  c.Send(Dispatch(2, EchoCall("close-mid-frame")));
  EXPECT_FALSE(c.ReadFrame(milliseconds(3000)));
  EXPECT_TRUE(c.eof());
  EXPECT_GT(c.decoder().buffered(), 0u);  // half a frame
}

TEST(MuxReferenceServerTest, ContextsAndResponseHeaders) {
  MuxReferenceServer server;
  RawConnection c(server.port());
  TraceContext trace{5, 5, 5, TraceContext::kSamplingKnown, std::nullopt};
  Contexts contexts = {{std::string(kTraceContextKey), EncodeTraceContext(trace)},
                       {std::string(kRequestHeadersKey), EncodeHeaders({{"h", "v"}})}};
  c.Send(Dispatch(2, EchoCall("contexts"), contexts));
  auto m = c.ReadMessage();
  ASSERT_TRUE(m && std::holds_alternative<Rdispatch>(*m));
  EXPECT_EQ(ReplyText(m), std::string(kTraceContextKey) + "," + std::string(kRequestHeadersKey));
  const std::string* headers = FindContext(std::get<Rdispatch>(*m).contexts, kResponseHeadersKey);
  ASSERT_NE(headers, nullptr);
  EXPECT_EQ(*DecodeHeaders(*headers), (Headers{{"h", "v"}}));
  EXPECT_TRUE(server.WaitForLog({"trace=5/5/5/2"}));
}

TEST(MuxReferenceServerTest, RestartKeepsThePort) {
  MuxReferenceServer server;
  int port = server.port();
  server.Restart();
  EXPECT_EQ(server.port(), port);
  RawConnection c(server.port());
  c.Send(Dispatch(2, EchoCall("back")));
  EXPECT_EQ(ReplyText(c.ReadMessage()), "back");
  server.Stop();
  EXPECT_FALSE(server.running());
}

}  // namespace
}  // namespace scales::mux
