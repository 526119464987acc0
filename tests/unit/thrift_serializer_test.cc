// Thrift formatter: message headers (binary strict and lenient, compact), sequence ids,
// reply checks, oneway detection, message scanning and the golden vectors of scales'
// thrift/test_serialization. No sockets, no event loop.
#include <algorithm>
#include <memory>
#include <memory_resource>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <thrift/TApplicationException.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>
#include <thrift/protocol/TProtocolException.h>
#include <thrift/transport/TBufferTransports.h>

#include "Derived.h"
#include "Hello.h"
#include "scales/core/sink_stack.h"
#include "scales/thrift/client.h"
#include "scales/thrift/message.h"
#include "scales/thrift/serializer.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales::thrift {
namespace {

using apache::thrift::protocol::TBinaryProtocol;
using apache::thrift::protocol::TCompactProtocol;
using apache::thrift::transport::TMemoryBuffer;
using scales::thrifttest::DerivedClient;
using scales::thrifttest::HelloClient;

std::string Bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b) s.push_back(static_cast<char>(c));
  return s;
}

// The message header and an empty struct, written by libthrift itself.
std::string WriteMessage(Protocol p, const std::string& name, apache::thrift::protocol::TMessageType type,
                         int32_t seqid, bool strict = true) {
  auto buf = std::make_shared<TMemoryBuffer>();
  std::shared_ptr<apache::thrift::protocol::TProtocol> proto;
  if (p == Protocol::kCompact) {
    proto = std::make_shared<TCompactProtocol>(buf);
  } else {
    proto = std::make_shared<TBinaryProtocol>(buf, 0, 0, strict, strict);
  }
  proto->writeMessageBegin(name, type, seqid);
  proto->writeStructBegin("args");
  proto->writeFieldBegin("s", apache::thrift::protocol::T_STRING, 1);
  proto->writeString("payload");
  proto->writeFieldEnd();
  proto->writeFieldStop();
  proto->writeStructEnd();
  proto->writeMessageEnd();
  return buf->getBufferAsString();
}

// Reads the header back with libthrift (the authority on what the bytes mean).
void ReadHeader(Protocol p, std::string bytes, std::string& name, int32_t& seqid,
                apache::thrift::protocol::TMessageType& type) {
  auto buf = std::make_shared<TMemoryBuffer>(reinterpret_cast<uint8_t*>(bytes.data()),
                                             static_cast<uint32_t>(bytes.size()), TMemoryBuffer::COPY);
  std::shared_ptr<apache::thrift::protocol::TProtocol> proto;
  if (p == Protocol::kCompact) {
    proto = std::make_shared<TCompactProtocol>(buf);
  } else {
    proto = std::make_shared<TBinaryProtocol>(buf);
  }
  proto->readMessageBegin(name, type, seqid);
}

TEST(ThriftMessageTest, GoldenCallVectorFromScales) {
  // scales thrift/test_serialization: Hello.hi('this_is_test_data').
  std::string bytes = internal::Encode<HelloClient>(Protocol::kBinary,
                                                    [](HelloClient& c) { c.send_hi("this_is_test_data"); });
  std::string expected = Bytes({0x80, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x68, 0x69, 0x00, 0x00, 0x00,
                                0x00, 0x0b, 0x00, 0x01, 0x00, 0x00, 0x00, 0x11}) +
                         "this_is_test_data" + Bytes({0x00});
  EXPECT_EQ(bytes, expected);
  auto h = ParseMessageHeader(bytes);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->format, HeaderFormat::kBinaryStrict);
  EXPECT_EQ(h->type, MessageType::kCall);
  EXPECT_EQ(h->name, "hi");
  EXPECT_EQ(h->seqid, 0);
  EXPECT_EQ(h->seqid_offset, 10u);
  EXPECT_EQ(h->size, 14u);
}

TEST(ThriftMessageTest, GoldenReplyVectorFromScales) {
  std::string reply = Bytes({0x80, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x68, 0x69, 0x00, 0x00, 0x00, 0x00,
                             0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x18}) +
                      "this is a return message" + Bytes({0x00});
  auto h = ParseMessageHeader(reply);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->type, MessageType::kReply);
  EXPECT_EQ(h->name, "hi");
  EXPECT_EQ(internal::Decode<HelloClient>(Protocol::kBinary, reply, &HelloClient::recv_hi),
            "this is a return message");
  auto scan = ScanMessage(reply);
  EXPECT_EQ(scan.status, MessageScan::Status::kComplete);
  EXPECT_EQ(scan.size, reply.size());
}

TEST(ThriftMessageTest, ParsesAndRewritesEveryHeaderFormat) {
  struct Case {
    Protocol protocol;
    bool strict;
    HeaderFormat format;
  };
  for (Case c : {Case{Protocol::kBinary, true, HeaderFormat::kBinaryStrict},
                 Case{Protocol::kBinary, false, HeaderFormat::kBinaryLenient},
                 Case{Protocol::kCompact, true, HeaderFormat::kCompact}}) {
    SCOPED_TRACE(static_cast<int>(c.format));
    std::string bytes = WriteMessage(c.protocol, "method_name", apache::thrift::protocol::T_CALL, 0, c.strict);
    auto h = ParseMessageHeader(bytes);
    ASSERT_TRUE(h);
    EXPECT_EQ(h->format, c.format);
    EXPECT_EQ(h->name, "method_name");
    EXPECT_EQ(h->type, MessageType::kCall);
    EXPECT_EQ(h->seqid, 0);
    // Small and large ids (the compact varint grows from 1 to 5 bytes), then back to 0.
    for (int32_t id : {1, 127, 128, 300000, 0x7fffffff, -5, 0}) {
      RewriteSeqId(bytes, *h, id);
      std::string name;
      int32_t seqid = -1;
      apache::thrift::protocol::TMessageType type;
      ReadHeader(c.protocol, bytes, name, seqid, type);
      EXPECT_EQ(name, "method_name");
      EXPECT_EQ(seqid, id);
      EXPECT_EQ(type, apache::thrift::protocol::T_CALL);
      auto again = ParseMessageHeader(bytes);
      ASSERT_TRUE(again);
      EXPECT_EQ(again->seqid, id);
      EXPECT_EQ(again->size, h->size);
      // The body is untouched: the message still scans to its end.
      auto scan = ScanMessage(bytes);
      EXPECT_EQ(scan.status, MessageScan::Status::kComplete);
      EXPECT_EQ(scan.size, bytes.size());
    }
    EXPECT_EQ(bytes, WriteMessage(c.protocol, "method_name", apache::thrift::protocol::T_CALL, 0, c.strict));
  }
}

TEST(ThriftMessageTest, DetectsOnewayAndRejectsGarbage) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    auto h = ParseMessageHeader(WriteMessage(p, "notify", apache::thrift::protocol::T_ONEWAY, 0));
    ASSERT_TRUE(h);
    EXPECT_EQ(h->type, MessageType::kOneway);
  }
  std::string why;
  EXPECT_FALSE(ParseMessageHeader("", &why));
  EXPECT_FALSE(ParseMessageHeader(Bytes({0x80, 0x02, 0x00, 0x01}), &why));  // bad version
  EXPECT_NE(why.find("version"), std::string::npos);
  EXPECT_FALSE(ParseMessageHeader(Bytes({0x80, 0x01, 0x00, 0x09, 0, 0, 0, 0, 0, 0, 0, 0}), &why));  // bad type
  EXPECT_FALSE(ParseMessageHeader(Bytes({0xff, 0xff, 0xff, 0xff}), &why));
  EXPECT_FALSE(ParseMessageHeader(Bytes({0x82, 0x21}), &why));  // truncated compact
}

// A compact header whose sequence id (or name length) runs over the 5 bytes a 32-bit varint may
// take can never parse: the scanner of a buffered reply says so at once, instead of waiting for
// bytes that cannot help until the request times out.
TEST(ThriftMessageTest, AnOverlongCompactHeaderVarintIsMalformedNotShort) {
  std::string why;
  EXPECT_FALSE(ParseMessageHeader(Bytes({0x82, 0x41, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00}), &why));
  EXPECT_EQ(why, "compact sequence id over 5 bytes");
  EXPECT_FALSE(ParseMessageHeader(Bytes({0x82, 0x41, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00}), &why));
  EXPECT_EQ(why, "compact method name length over 5 bytes");
  MessageScan scan = MessageScanner().Scan(Bytes({0x82, 0x41, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00}));
  EXPECT_EQ(scan.status, MessageScan::Status::kMalformed);
  EXPECT_NE(scan.error.find("over 5 bytes"), std::string::npos) << scan.error;
  // Cut short inside a varint: more bytes may still come.
  EXPECT_EQ(MessageScanner().Scan(Bytes({0x82, 0x41, 0xff, 0xff})).status, MessageScan::Status::kNeedMore);
  EXPECT_FALSE(ParseMessageHeader(Bytes({0x82, 0x41, 0xff, 0xff}), &why));
  EXPECT_EQ(why, "truncated compact sequence id");
}

TEST(ThriftMessageTest, ScanNeedsMoreUntilTheWholeMessageArrived) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    std::string msg = WriteMessage(p, "echo", apache::thrift::protocol::T_REPLY, 7);
    for (size_t n = 1; n < msg.size(); ++n) {
      auto scan = ScanMessage(std::string_view(msg).substr(0, n));
      EXPECT_EQ(scan.status, MessageScan::Status::kNeedMore) << n;
    }
    std::string two = msg + msg.substr(0, 3);
    auto scan = ScanMessage(two);
    EXPECT_EQ(scan.status, MessageScan::Status::kComplete);
    EXPECT_EQ(scan.size, msg.size());
  }
  std::string garbage = WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_REPLY, 7);
  garbage[16] = 0x42;  // an unknown field type (after the 16-byte header)
  EXPECT_EQ(ScanMessage(garbage).status, MessageScan::Status::kMalformed);
}

// What `write` writes with libthrift's protocol `p` (binary strict or compact).
template <class Write>
std::string Written(Protocol p, Write write) {
  auto buf = std::make_shared<TMemoryBuffer>();
  std::shared_ptr<apache::thrift::protocol::TProtocol> proto;
  if (p == Protocol::kCompact) {
    proto = std::make_shared<TCompactProtocol>(buf);
  } else {
    proto = std::make_shared<TBinaryProtocol>(buf);
  }
  write(proto);
  return buf->getBufferAsString();
}

// A message with every field type (nested, containers, booleans in fields and in lists).
std::string WriteRichMessage(Protocol p) {
  return Written(p, [](const auto& proto) {
    using namespace apache::thrift::protocol;
    proto->writeMessageBegin("rich", T_REPLY, 3);
    proto->writeStructBegin("r");
    proto->writeFieldBegin("b", T_BOOL, 1);
    proto->writeBool(true);
    proto->writeFieldEnd();
    proto->writeFieldBegin("y", T_BYTE, 2);
    proto->writeByte(-3);
    proto->writeFieldEnd();
    proto->writeFieldBegin("s", T_I16, 3);
    proto->writeI16(-300);
    proto->writeFieldEnd();
    proto->writeFieldBegin("l", T_I64, 40);  // a field id delta > 15
    proto->writeI64(-1234567890123LL);
    proto->writeFieldEnd();
    proto->writeFieldBegin("d", T_DOUBLE, 41);
    proto->writeDouble(3.5);
    proto->writeFieldEnd();
    proto->writeFieldBegin("bin", T_STRING, 42);
    proto->writeBinary(std::string(300, 'z'));
    proto->writeFieldEnd();
    proto->writeFieldBegin("bools", T_LIST, 43);
    proto->writeListBegin(T_BOOL, 20);
    for (int i = 0; i < 20; ++i) proto->writeBool(i % 3 == 0);
    proto->writeListEnd();
    proto->writeFieldEnd();
    proto->writeFieldBegin("m", T_MAP, 44);
    proto->writeMapBegin(T_STRING, T_I64, 2);
    proto->writeString("a");
    proto->writeI64(1);
    proto->writeString("b");
    proto->writeI64(2);
    proto->writeMapEnd();
    proto->writeFieldEnd();
    proto->writeFieldBegin("empty", T_MAP, 45);
    proto->writeMapBegin(T_STRING, T_I64, 0);
    proto->writeMapEnd();
    proto->writeFieldEnd();
    proto->writeFieldBegin("set", T_SET, 46);
    proto->writeSetBegin(T_I16, 3);
    for (int16_t v : {1, 2, 3}) proto->writeI16(v);
    proto->writeSetEnd();
    proto->writeFieldEnd();
    proto->writeFieldBegin("nested", T_STRUCT, 47);
    proto->writeStructBegin("n");
    proto->writeFieldBegin("f", T_BOOL, 1);
    proto->writeBool(false);
    proto->writeFieldEnd();
    proto->writeFieldBegin("structs", T_LIST, 2);
    proto->writeListBegin(T_STRUCT, 16);  // a list size >= 15 (compact: varint size)
    for (int i = 0; i < 16; ++i) {
      proto->writeStructBegin("e");
      proto->writeFieldBegin("i", T_I32, 1);
      proto->writeI32(i);
      proto->writeFieldEnd();
      proto->writeFieldStop();
      proto->writeStructEnd();
    }
    proto->writeListEnd();
    proto->writeFieldEnd();
    proto->writeFieldStop();
    proto->writeStructEnd();
    proto->writeFieldEnd();
    proto->writeFieldStop();
    proto->writeStructEnd();
    proto->writeMessageEnd();
  });
}

TEST(ThriftMessageTest, ScanWalksEveryTypeAtEveryPrefix) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    SCOPED_TRACE(ToString(p));
    const std::string msg = WriteRichMessage(p);
    for (size_t n = 0; n < msg.size(); ++n) {
      ASSERT_EQ(ScanMessage(std::string_view(msg).substr(0, n)).status, MessageScan::Status::kNeedMore) << n;
    }
    auto scan = ScanMessage(msg + "trailing");
    ASSERT_EQ(scan.status, MessageScan::Status::kComplete) << scan.error;
    EXPECT_EQ(scan.size, msg.size());
  }
  // A header that can never parse is malformed at once (not "need more").
  EXPECT_EQ(ScanMessage(Bytes({0x80, 0x07, 0x00, 0x01})).status, MessageScan::Status::kMalformed);
}

// Feeds `msg` to one MessageScanner in pieces whose ends come from `rng` (every byte on its own
// when max_piece is 1) and returns its first answer other than kNeedMore (or kNeedMore).
MessageScan ScanInPieces(MessageScanner& scanner, const std::string& msg, std::mt19937& rng, size_t max_piece) {
  std::uniform_int_distribution<size_t> piece(1, max_piece);
  size_t have = 0;
  MessageScan scan;
  while (have < msg.size()) {
    have = std::min(msg.size(), have + piece(rng));
    // A copy per piece: the scanner must not rely on the buffer staying put.
    const std::string so_far = msg.substr(0, have);
    scan = scanner.Scan(so_far);
    if (scan.status != MessageScan::Status::kNeedMore) return scan;
  }
  return scan;
}

TEST(ThriftMessageTest, ScannerFedInPiecesAgreesWithAWholeScan) {
  std::mt19937 rng(20261205);
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    SCOPED_TRACE(ToString(p));
    const std::string rich = WriteRichMessage(p);
    MessageScanner scanner;
    for (size_t max_piece : {size_t{1}, size_t{3}, size_t{17}, size_t{400}}) {
      scanner.Reset();
      auto scan = ScanInPieces(scanner, rich + "trailing", rng, max_piece);
      ASSERT_EQ(scan.status, MessageScan::Status::kComplete) << max_piece << " " << scan.error;
      EXPECT_EQ(scan.size, rich.size());
      // The answer stays until Reset(), whatever follows.
      EXPECT_EQ(scanner.Scan(rich + "more").size, rich.size());
    }
    // Damaged copies (a byte changed at a seeded position): the same answer in pieces as whole,
    // malformed ones with the same reason.
    std::uniform_int_distribution<size_t> at(0, rich.size() - 1);
    std::uniform_int_distribution<int> byte(0, 255);
    int malformed = 0;
    for (int i = 0; i < 3000; ++i) {
      std::string bad = rich;
      bad[at(rng)] = static_cast<char>(byte(rng));
      const MessageScan whole = ScanMessage(bad);
      scanner.Reset();
      const MessageScan pieces = ScanInPieces(scanner, bad, rng, 1 + i % 40);
      ASSERT_EQ(pieces.status, whole.status) << i;
      if (whole.status == MessageScan::Status::kComplete) {
        EXPECT_EQ(pieces.size, whole.size) << i;
      }
      EXPECT_EQ(pieces.error, whole.error) << i;
      malformed += whole.status == MessageScan::Status::kMalformed;
    }
    EXPECT_GT(malformed, 100);  // the damage does reach the checks
  }
}

// A reply whose result is a list of `n` i32 (field 0), as a server writes it.
std::string WriteListReply(Protocol p, int32_t n) {
  return Written(p, [n](const auto& proto) {
    using namespace apache::thrift::protocol;
    proto->writeMessageBegin("numbers", T_REPLY, 1);
    proto->writeStructBegin("result");
    proto->writeFieldBegin("success", T_LIST, 0);
    proto->writeListBegin(T_I32, static_cast<uint32_t>(n));
    for (int32_t i = 0; i < n; ++i) proto->writeI32(i * 7919);
    proto->writeListEnd();
    proto->writeFieldEnd();
    proto->writeFieldStop();
    proto->writeStructEnd();
    proto->writeMessageEnd();
  });
}

TEST(ThriftMessageTest, AReplyReadInManyPiecesIsWalkedOnce) {
  // 200,000 small values read 4 KiB at a time (about 200 reads): a walk from the first byte on
  // every read would take some 20 million steps.
  constexpr int32_t kValues = 200000;
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    SCOPED_TRACE(ToString(p));
    const std::string msg = WriteListReply(p, kValues);
    MessageScanner scanner;
    MessageScan scan;
    size_t reads = 0;
    for (size_t have = 0; have < msg.size();) {
      have = std::min(msg.size(), have + 4096);
      ++reads;
      scan = scanner.Scan(std::string_view(msg).substr(0, have));
      if (have < msg.size()) {
        ASSERT_EQ(scan.status, MessageScan::Status::kNeedMore) << have;
      }
    }
    ASSERT_EQ(scan.status, MessageScan::Status::kComplete) << scan.error;
    EXPECT_EQ(scan.size, msg.size());
    // Each value once, plus one attempt per read that ran out of bytes and a few steps for the
    // field, the list and the struct's end.
    EXPECT_LE(scanner.steps(), static_cast<uint64_t>(kValues) + reads + 8);
    EXPECT_GE(scanner.steps(), static_cast<uint64_t>(kValues));
  }
}

// The top of a test stack: records the response.
class Top final : public ClientMessageSink {
 public:
  void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
  void AsyncProcessResponse(SinkStack&, void*, Stream* stream, MethodReturnMessage& msg) override {
    ++responses;
    last = msg;
    last_stream = stream;
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "top"; }
  int responses = 0;
  MethodReturnMessage last;
  Stream* last_stream = nullptr;

 protected:
  void DoOpen(OpenHandler) override {}
};

// The bottom: keeps the request for the test to answer.
class Bottom final : public ClientMessageSink {
 public:
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage&, Stream* stream) override {
    this->stack = &stack;
    this->stream = stream;
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "bottom"; }
  // Answers with `bytes` in the call's reply slot.
  void Answer(std::string bytes) {
    Stream* reply = stack->message().reply_slot<Stream>();
    reply->data = std::move(bytes);
    MethodReturnMessage ok;
    stack->AsyncProcessResponse(reply, ok);
  }
  SinkStack* stack = nullptr;
  Stream* stream = nullptr;

 protected:
  void DoOpen(OpenHandler) override {}
};

class SerializerTest : public ::testing::Test {
 protected:
  struct Call {
    Stream request;
    Stream reply;
    MethodCallMessage msg;
    SinkStack stack{msg};
  };
  void SetUp() override {
    bottom_ = std::make_shared<Bottom>();
    serializer_ = std::make_shared<ThriftSerializerSink>(bottom_);
    formatter_ = serializer_;
  }
  std::unique_ptr<Call> Send(std::string bytes) {
    auto c = std::make_unique<Call>();
    c->request.data = std::move(bytes);
    c->msg.SetPayload(&c->request);
    c->msg.SetReplySlot(&c->reply);
    c->msg.properties.endpoint = "10.0.0.1:9090";
    c->stack.Push(&top_, nullptr);
    formatter_->AsyncProcessRequest(c->stack, c->msg, nullptr);
    return c;
  }
  Top top_;
  std::shared_ptr<Bottom> bottom_;
  std::shared_ptr<ThriftSerializerSink> serializer_;
  // The formatter Send() goes through: serializer_, unless a test sets another.
  SinkPtr formatter_;
};

TEST_F(SerializerTest, AssignsSequenceIdsAndRestoresTheCallersOnTheReply) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    for (int32_t expected_id = 1; expected_id <= 3; ++expected_id) {
      int32_t id = serializer_->next_seqid();
      auto call = Send(WriteMessage(p, "echo", apache::thrift::protocol::T_CALL, 0));
      ASSERT_EQ(bottom_->stream, &call->request);
      EXPECT_EQ(call->msg.method, "echo");
      auto h = ParseMessageHeader(call->request.data);
      ASSERT_TRUE(h);
      EXPECT_EQ(h->seqid, id);
      bottom_->Answer(WriteMessage(p, "echo", apache::thrift::protocol::T_REPLY, id));
      ASSERT_EQ(top_.responses, 1);
      top_.responses = 0;
      EXPECT_TRUE(top_.last.ok()) << top_.last.detail;
      auto r = ParseMessageHeader(call->reply.data);
      ASSERT_TRUE(r);
      EXPECT_EQ(r->seqid, 0);  // what the generated recv code expects back
      // The request is as the caller wrote it again (a retry would start from it).
      EXPECT_EQ(call->request.data, WriteMessage(p, "echo", apache::thrift::protocol::T_CALL, 0));
    }
  }
  EXPECT_EQ(serializer_->next_seqid(), 7);
}

TEST_F(SerializerTest, SeqidMismatchIsAProtocolErrorNamingEndpointMethodAndIds) {
  auto call = Send(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_CALL, 0));
  bottom_->Answer(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_REPLY, 99));
  ASSERT_EQ(top_.responses, 1);
  EXPECT_EQ(top_.last.error, make_error_code(Errc::kProtocolError));
  EXPECT_NE(top_.last.detail.find("10.0.0.1:9090"), std::string::npos) << top_.last.detail;
  EXPECT_NE(top_.last.detail.find("echo"), std::string::npos) << top_.last.detail;
  EXPECT_NE(top_.last.detail.find("seqid 99, expected 1"), std::string::npos) << top_.last.detail;
}

TEST_F(SerializerTest, WrongMethodNameIsAProtocolError) {
  auto call = Send(WriteMessage(Protocol::kCompact, "echo", apache::thrift::protocol::T_CALL, 0));
  bottom_->Answer(WriteMessage(Protocol::kCompact, "other", apache::thrift::protocol::T_REPLY, 1));
  ASSERT_EQ(top_.responses, 1);
  EXPECT_EQ(top_.last.error, make_error_code(Errc::kProtocolError));
  EXPECT_NE(top_.last.detail.find("'other'"), std::string::npos) << top_.last.detail;
}

TEST_F(SerializerTest, ExceptionRepliesPassAndGarbageRepliesFail) {
  auto call = Send(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_CALL, 0));
  bottom_->Answer(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_EXCEPTION, 1));
  EXPECT_TRUE(top_.last.ok());
  auto call2 = Send(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_CALL, 0));
  bottom_->Answer("not thrift");
  EXPECT_EQ(top_.last.error, make_error_code(Errc::kProtocolError));
  EXPECT_EQ(top_.responses, 2);
}

TEST_F(SerializerTest, OnewayPassesAnEmptyReplyUnchecked) {
  auto call = Send(internal::Encode<DerivedClient>(Protocol::kBinary,
                                                   [](DerivedClient& c) { c.send_notify("hello"); }));
  auto h = ParseMessageHeader(call->request.data);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->type, MessageType::kOneway);
  EXPECT_EQ(call->msg.method, "notify");
  bottom_->Answer("");
  ASSERT_EQ(top_.responses, 1);
  EXPECT_TRUE(top_.last.ok());
}

TEST_F(SerializerTest, RejectsAPayloadThatIsNotACall) {
  auto call = Send(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_REPLY, 0));
  ASSERT_EQ(top_.responses, 1);
  EXPECT_EQ(top_.last.error, make_error_code(Errc::kInvalidArgument));
  EXPECT_EQ(bottom_->stack, nullptr);
}

// The ThriftMux formatter over the same harness.
class ThriftMuxSerializerTest : public SerializerTest {
 protected:
  void SetUp() override {
    SerializerTest::SetUp();
    formatter_ = std::make_shared<thriftmux::ThriftMuxSerializerSink>(bottom_);
  }
};

// Every reply the ThriftMux formatter refuses fails the call once, with kProtocolError naming
// the endpoint and the call's method (not only when the reply names another one).
TEST_F(ThriftMuxSerializerTest, EveryRefusedReplyNamesTheEndpointAndTheMethod) {
  using apache::thrift::protocol::T_CALL;
  using apache::thrift::protocol::T_ONEWAY;
  using apache::thrift::protocol::T_REPLY;
  const std::string bad[] = {
      WriteMessage(Protocol::kBinary, "echo", T_REPLY, 7),  // another sequence id
      WriteMessage(Protocol::kBinary, "echo", T_CALL, 0),   // not a reply
      WriteMessage(Protocol::kBinary, "echo", T_ONEWAY, 0),
      WriteMessage(Protocol::kBinary, "other", T_REPLY, 0),
      "not thrift",
  };
  int responses = 0;
  for (const std::string& reply : bad) {
    auto call = Send(WriteMessage(Protocol::kBinary, "echo", T_CALL, 0));
    ASSERT_EQ(bottom_->stream, &call->request);
    bottom_->Answer(reply);
    ASSERT_EQ(top_.responses, ++responses);
    EXPECT_EQ(top_.last.error, make_error_code(Errc::kProtocolError));
    EXPECT_NE(top_.last.detail.find("bad ThriftMux reply from 10.0.0.1:9090 for echo: "), std::string::npos)
        << top_.last.detail;
  }
  auto call = Send(WriteMessage(Protocol::kBinary, "echo", T_CALL, 0));
  bottom_->Answer(WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_EXCEPTION, 0));
  EXPECT_TRUE(top_.last.ok()) << top_.last.detail;
}

// A request that is not a strict binary CALL is refused before it is sent, naming its method and
// what it is.
TEST_F(ThriftMuxSerializerTest, ARequestThatIsNotAStrictBinaryCallNamesItsMethodAndKind) {
  using apache::thrift::protocol::T_CALL;
  const struct {
    std::string bytes;
    std::string says;
  } cases[] = {
      {WriteMessage(Protocol::kCompact, "echo", T_CALL, 0), "echo is a compact call"},
      {WriteMessage(Protocol::kBinary, "echo", T_CALL, 0, /*strict=*/false), "echo is a lenient binary call"},
      {WriteMessage(Protocol::kBinary, "echo", apache::thrift::protocol::T_REPLY, 0), "echo is a strict binary reply"},
  };
  int responses = 0;
  for (const auto& c : cases) {
    bottom_->stack = nullptr;
    auto call = Send(c.bytes);
    ASSERT_EQ(top_.responses, ++responses);
    EXPECT_EQ(bottom_->stack, nullptr);
    EXPECT_EQ(top_.last.error, make_error_code(Errc::kInvalidArgument));
    EXPECT_NE(top_.last.detail.find("ThriftMux carries strict binary Thrift CALL messages only"), std::string::npos)
        << top_.last.detail;
    EXPECT_NE(top_.last.detail.find(c.says), std::string::npos) << top_.last.detail;
  }
}

TEST(ThriftCodecTest, InheritedMethodsEncodeAndDeclaredExceptionsDecodeAsThemselves) {
  // An inherited method through the derived client (service Derived extends Base).
  std::string bytes = internal::Encode<DerivedClient>(Protocol::kCompact,
                                                      [](DerivedClient& c) { c.send_add(2, 3); });
  auto h = ParseMessageHeader(bytes);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->name, "add");
  EXPECT_EQ(h->format, HeaderFormat::kCompact);

  // A reply carrying TestError, built the way a server's processor writes it.
  scales::thrifttest::Derived_boom_presult unused;
  (void)unused;
  auto buf = std::make_shared<TMemoryBuffer>();
  TBinaryProtocol proto(buf);
  scales::thrifttest::Derived_boom_result result;
  result.error.message = "kaput";
  result.error.code = 7;
  result.__isset.error = true;
  proto.writeMessageBegin("boom", apache::thrift::protocol::T_REPLY, 0);
  result.write(&proto);
  proto.writeMessageEnd();
  std::string reply = buf->getBufferAsString();
  try {
    internal::Decode<DerivedClient>(Protocol::kBinary, reply, &DerivedClient::recv_boom);
    FAIL() << "no exception";
  } catch (const scales::thrifttest::TestError& e) {
    EXPECT_EQ(e.message, "kaput");
    EXPECT_EQ(e.code, 7);
  }
}

// The REPLY to `method` carrying `result` (a generated *_result struct), written by libthrift.
template <class Result>
std::string WriteReply(Protocol p, const std::string& method, const Result& result) {
  auto buf = std::make_shared<TMemoryBuffer>();
  std::shared_ptr<apache::thrift::protocol::TProtocol> proto;
  if (p == Protocol::kCompact) {
    proto = std::make_shared<TCompactProtocol>(buf);
  } else {
    proto = std::make_shared<TBinaryProtocol>(buf);
  }
  proto->writeMessageBegin(method, apache::thrift::protocol::T_REPLY, 0);
  result.write(proto.get());
  proto->writeMessageEnd();
  return buf->getBufferAsString();
}

// A reply to hi() carrying `value`, written by libthrift.
std::string HiReply(Protocol p, const std::string& value) {
  scales::thrifttest::Hello_hi_result result;
  result.success = value;
  result.__isset.success = true;
  return WriteReply(p, "hi", result);
}

// A reply to tree(): a Node `levels` deep, each level the only child of the one above.
std::string TreeReply(Protocol p, int levels) {
  using scales::thrifttest::Node;
  Node node;
  node.id = levels;
  for (int level = levels - 1; level >= 1; --level) {
    Node parent;
    parent.id = level;
    parent.children.push_back(std::move(node));
    parent.__isset.children = true;
    node = std::move(parent);
  }
  scales::thrifttest::Hello_tree_result result;
  result.success = std::move(node);
  result.__isset.success = true;
  return WriteReply(p, "tree", result);
}

// Apache reads structs up to 64 levels deep (the result struct is the first) and does not count
// the lists between them: a Node 63 levels deep decodes. The buffered transport's scan for a
// reply's end counted every list too, so it refused such a reply from 33 levels on ("nesting
// deeper than 64") that the framed transport passes and recv_tree decodes.
TEST(ThriftMessageTest, TheScanAcceptsTheNestingTheGeneratedCodeDecodes) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    for (int levels : {32, 33, 40, 63}) {
      const std::string reply = TreeReply(p, levels);
      EXPECT_EQ(internal::Decode<HelloClient>(p, reply, &HelloClient::recv_tree).id, 1);
      auto scan = ScanMessage(reply);
      EXPECT_EQ(scan.status, MessageScan::Status::kComplete) << ToString(p) << ", " << levels << " levels: " << scan.error;
      EXPECT_EQ(scan.size, reply.size());
    }
    // One level more is what Apache refuses, and so does the scan.
    const std::string too_deep = TreeReply(p, 64);
    EXPECT_THROW(internal::Decode<HelloClient>(p, too_deep, &HelloClient::recv_tree),
                 apache::thrift::protocol::TProtocolException);
    auto scan = ScanMessage(too_deep);
    EXPECT_EQ(scan.status, MessageScan::Status::kMalformed) << ToString(p);
    EXPECT_NE(scan.error.find("nesting deeper than 64"), std::string::npos) << scan.error;
  }
}

// Containers nested in each other (in a field the generated code skips) are bounded too: the
// scan keeps a frame per level, and a compact list header is one byte.
TEST(ThriftMessageTest, ListsNestedThousandsDeepAreMalformed) {
  // Compact REPLY "m": field 1 a list of one list of one list ...
  std::string bytes = std::string("\x82\x41\x00\x01m", 5) + std::string(1, '\x19');
  for (int i = 0; i < 10000; ++i) bytes += '\x19';
  auto scan = ScanMessage(bytes);
  EXPECT_EQ(scan.status, MessageScan::Status::kMalformed);
  EXPECT_NE(scan.error.find("deeper than 64"), std::string::npos) << scan.error;
}

// Replies are decoded in place from their bytes (internal::ReplyReader): every truncation
// fails with an exception (never reads past the bytes, which ASan builds check), the reader
// keeps nothing of a reply once decoded (each reply below is freed before the next one), and
// small and large replies decode in both protocols.
TEST(ThriftCodecTest, DecodesInPlaceAndEveryTruncationFails) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    for (size_t size : {size_t{0}, size_t{20}, size_t{100000}}) {
      const std::string value(size, 'r');
      const std::string whole = HiReply(p, value);
      for (size_t cut = 0; cut < whole.size(); cut += (cut < 64 ? 1 : 997)) {
        auto truncated = std::make_unique<std::string>(whole.substr(0, cut));
        EXPECT_ANY_THROW(internal::Decode<HelloClient>(p, *truncated, &HelloClient::recv_hi)) << cut;
        truncated.reset();
        auto copy = std::make_unique<std::string>(whole);
        ASSERT_EQ(internal::Decode<HelloClient>(p, *copy, &HelloClient::recv_hi), value) << "after a cut at " << cut;
      }
    }
  }
}

// A reply padded with an unknown field, then declaring a list of a million structs and ending:
// the list cannot fit in the 0 bytes left, so it fails before the generated code resizes a
// vector for it (a million Blobs, ~56 MB; the padding bought it nothing). A list that fits in
// what is left still decodes.
TEST(ThriftCodecTest, AListDeclaringMoreElementsThanTheBytesLeftFailsBeforeItIsSized) {
  auto reply = [](Protocol p, int32_t declared, int32_t sent) {
    return Written(p, [&](const std::shared_ptr<apache::thrift::protocol::TProtocol>& proto) {
      proto->writeMessageBegin("blobs", apache::thrift::protocol::T_REPLY, 0);
      proto->writeStructBegin("Hello_blobs_result");
      proto->writeFieldBegin("padding", apache::thrift::protocol::T_STRING, 99);
      proto->writeBinary(std::string(2 << 20, 'p'));
      proto->writeFieldEnd();
      proto->writeFieldBegin("success", apache::thrift::protocol::T_LIST, 0);
      proto->writeListBegin(apache::thrift::protocol::T_STRUCT, static_cast<uint32_t>(declared));
      scales::thrifttest::Blob blob;
      blob.data = "b";
      for (int32_t i = 0; i < sent; ++i) blob.write(proto.get());
      if (sent < declared) return;  // the reply ends here
      proto->writeListEnd();
      proto->writeFieldEnd();
      proto->writeFieldStop();
      proto->writeStructEnd();
      proto->writeMessageEnd();
    });
  };
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    const std::string hostile = reply(p, 1000000, 0);
    try {
      internal::Decode<HelloClient>(p, hostile, &HelloClient::recv_blobs);
      ADD_FAILURE() << "decoded";
    } catch (const apache::thrift::protocol::TProtocolException& e) {
      EXPECT_EQ(e.getType(), apache::thrift::protocol::TProtocolException::SIZE_LIMIT) << e.what();
      EXPECT_NE(std::string_view(e.what()).find("a list declares 1000000 elements with 0 bytes of the reply left"),
                std::string_view::npos)
          << e.what();
    }
    const std::string fine = reply(p, 3, 3);
    EXPECT_EQ(internal::Decode<HelloClient>(p, fine, &HelloClient::recv_blobs).size(), 3u);
  }
}

// A reply to hi() whose string declares `declared` bytes and carries "abc", written byte by byte
// per the Thrift spec, not by libthrift or scales: the message header (binary strict: version and
// type, name, sequence id; compact: protocol id, version and type, varint sequence id, name), then
// field 0 of type string, its length (binary: big-endian i32; compact: varint) and "abc"; `whole`
// ends the result struct after it.
std::string CraftedHiReply(Protocol p, uint32_t declared, bool whole) {
  std::string length;
  std::string r;
  if (p == Protocol::kCompact) {
    for (uint32_t v = declared; ; v >>= 7) {
      length.push_back(static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0)));
      if (v <= 0x7f) break;
    }
    r = Bytes({0x82, 0x41, 0x00, 0x02}) + "hi" + Bytes({0x08, 0x00});  // REPLY; field: BINARY, i16 id 0
  } else {
    length = Bytes({static_cast<int>(declared >> 24), static_cast<int>((declared >> 16) & 0xff),
                    static_cast<int>((declared >> 8) & 0xff), static_cast<int>(declared & 0xff)});
    r = Bytes({0x80, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02}) + "hi" +
        Bytes({0x00, 0x00, 0x00, 0x00, 0x0b, 0x00, 0x00});  // seqid 0; field: STRING, id 0
  }
  r += length + "abc";
  if (whole) r += Bytes({0x00});  // STOP
  return r;
}

// A string declaring more bytes than the reply has left after its length fails before anything is
// sized for it — also one shorter than the whole reply, which Apache's own check lets through — and
// says what it declared, what was left and the reply's size.
TEST(ThriftCodecTest, AStringLongerThanTheBytesLeftFailsNamingItsLengthAndTheReplysSize) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    EXPECT_EQ(internal::Decode<HelloClient>(p, CraftedHiReply(p, 3, true), &HelloClient::recv_hi), "abc");
    for (uint32_t declared : {10u, 0x7fffffffu}) {
      const std::string reply = CraftedHiReply(p, declared, false);
      ASSERT_LT(10u, reply.size());
      try {
        internal::Decode<HelloClient>(p, reply, &HelloClient::recv_hi);
        ADD_FAILURE() << "decoded";
      } catch (const apache::thrift::protocol::TProtocolException& e) {
        EXPECT_EQ(e.getType(), apache::thrift::protocol::TProtocolException::SIZE_LIMIT) << e.what();
        const std::string expected = "a string declares " + std::to_string(declared) +
                                     " bytes with 3 bytes of the reply left (the reply is " +
                                     std::to_string(reply.size()) + " bytes)";
        EXPECT_NE(std::string_view(e.what()).find(expected), std::string_view::npos) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << "declaring " << declared << ": " << e.what();
      }
    }
  }
}

// TCompactProtocol refuses an unknown type nibble (13 to 15) with a plain TException whose message
// ends with the nibble as a raw byte: CheckedReads makes it a TProtocolException naming the type
// as a number, in a field header, a list header or a map header (the last two in an unknown
// field, which the generated code skips). Still a reply that does not decode (internal::Malformed,
// which the client turns into kProtocolError), and the thread's codec, whose reader stopped inside
// a struct, is dropped.
TEST(ThriftCodecTest, AnUnknownCompactTypeIsAMalformedReplyNamingTheType) {
  using C = internal::Codec<HelloClient>;
  const std::string header = Bytes({0x82, 0x41, 0x00, 0x02}) + "hi";  // as CraftedHiReply's
  const struct {
    std::string fields;
    int type;
  } cases[] = {
      {Bytes({0x1d, 0x00}), 13},  // field 1 of type 13 (short form: id delta 1, type)
      {Bytes({0x19, 0x1e, 0x00}), 14},  // field 1: LIST; a list of 1 element of type 14
      {Bytes({0x1b, 0x01, 0xf5, 0x00}), 15},  // field 1: MAP; 1 entry, key type 15, value type I32
  };
  for (const auto& c : cases) {
    EXPECT_EQ(internal::Decode<HelloClient>(Protocol::kCompact, CraftedHiReply(Protocol::kCompact, 3, true),
                                            &HelloClient::recv_hi),
              "abc");
    ASSERT_TRUE(C::Kept(Protocol::kCompact));
    try {
      internal::Decode<HelloClient>(Protocol::kCompact, header + c.fields + Bytes({0x00}), &HelloClient::recv_hi);
      ADD_FAILURE() << "decoded type " << c.type;
    } catch (const apache::thrift::protocol::TProtocolException& e) {
      EXPECT_EQ(e.getType(), apache::thrift::protocol::TProtocolException::INVALID_DATA) << e.what();
      EXPECT_EQ(std::string_view(e.what()), "unknown compact type " + std::to_string(c.type));
      EXPECT_TRUE(internal::Malformed(e)) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "type " << c.type << ": " << e.what();
    }
    EXPECT_FALSE(C::Kept(Protocol::kCompact));
  }
}

// TBinaryProtocol's type bytes (a field's, a list's, set's or map's element types) are cast to
// Apache's TType as they are read; a byte outside its values (0..17, e.g. 0xed, a type byte
// altered on the way) was undefined behaviour there (UBSan in the corrupting recovery run).
// CheckedReads reads those headers itself and refuses such a byte as a malformed reply naming it.
TEST(ThriftCodecTest, AnUnknownBinaryTypeIsAMalformedReplyNamingTheType) {
  using C = internal::Codec<HelloClient>;
  const std::string header = Bytes({0x80, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02}) + "hi" +
                             Bytes({0x00, 0x00, 0x00, 0x00});
  const struct {
    std::string fields;
    std::string expected;
  } cases[] = {
      {Bytes({0xed, 0x00, 0x05}), "unknown binary type -19 for a field"},
      {Bytes({0x12, 0x00, 0x05}), "unknown binary type 18 for a field"},
      {Bytes({0x0f, 0x00, 0x05, 0x80, 0x00, 0x00, 0x00, 0x01}),
       "unknown binary type -128 for a list element"},
      {Bytes({0x0e, 0x00, 0x05, 0xff, 0x00, 0x00, 0x00, 0x01}),
       "unknown binary type -1 for a set element"},
      {Bytes({0x0d, 0x00, 0x05, 0x08, 0x7f, 0x00, 0x00, 0x00, 0x01}),
       "unknown binary type 127 for a map value"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(
        internal::Decode<HelloClient>(Protocol::kBinary, CraftedHiReply(Protocol::kBinary, 3, true),
                                      &HelloClient::recv_hi),
        "abc");
    ASSERT_TRUE(C::Kept(Protocol::kBinary));
    try {
      internal::Decode<HelloClient>(Protocol::kBinary, header + c.fields + Bytes({0x00}),
                                    &HelloClient::recv_hi);
      ADD_FAILURE() << "decoded: " << c.expected;
    } catch (const apache::thrift::protocol::TProtocolException& e) {
      EXPECT_EQ(e.getType(), apache::thrift::protocol::TProtocolException::INVALID_DATA)
          << e.what();
      EXPECT_EQ(std::string_view(e.what()), c.expected);
      EXPECT_TRUE(internal::Malformed(e)) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.expected << ": " << e.what();
    }
    EXPECT_FALSE(C::Kept(Protocol::kBinary));
  }
}

// A reply to hi() per the Thrift spec (as CraftedHiReply's header), with field 5, which hi's result
// does not have, ahead of field 0 ("abc"): `unknown` is field 5's header and value, written by
// the callers per the spec. The generated code skips field 5.
std::string HiReplyWithUnknownField(Protocol p, const std::string& unknown) {
  if (p == Protocol::kCompact) {  // field 0 after it in the long form: BINARY, zigzag i16 id 0
    return Bytes({0x82, 0x41, 0x00, 0x02}) + "hi" + unknown + Bytes({0x08, 0x00, 0x03}) + "abc" + Bytes({0x00});
  }
  return Bytes({0x80, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02}) + "hi" + Bytes({0x00, 0x00, 0x00, 0x00}) + unknown +
         Bytes({0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03}) + "abc" + Bytes({0x00});
}

// Field 5 (its header and value, per the spec): a string declaring `declared` bytes and carrying
// "xyz"; `levels` lists each holding the next, the innermost empty (of i32); `levels` structs each
// holding the next as its field 1, the innermost empty.
std::string UnknownString(Protocol p, uint32_t declared) {
  std::string length;
  if (p == Protocol::kCompact) {
    for (uint32_t v = declared;; v >>= 7) {
      length.push_back(static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0)));
      if (v <= 0x7f) break;
    }
    return Bytes({0x58}) + length + "xyz";  // short form: id delta 5, BINARY
  }
  for (int shift = 24; shift >= 0; shift -= 8) length.push_back(static_cast<char>((declared >> shift) & 0xff));
  return Bytes({0x0b, 0x00, 0x05}) + length + "xyz";  // STRING, i16 id 5
}
std::string UnknownLists(Protocol p, int levels) {
  const bool compact = p == Protocol::kCompact;
  // compact: (size 1 << 4) | LIST, then (size 0 << 4) | I32; binary: element type and i32 size
  std::string lists = compact ? Bytes({0x05}) : Bytes({0x08, 0x00, 0x00, 0x00, 0x00});
  for (int level = 1; level < levels; ++level) {
    lists = (compact ? Bytes({0x19}) : Bytes({0x0f, 0x00, 0x00, 0x00, 0x01})) + lists;
  }
  return (compact ? Bytes({0x59}) : Bytes({0x0f, 0x00, 0x05})) + lists;  // field 5: LIST
}
std::string UnknownStructs(Protocol p, int levels) {
  const bool compact = p == Protocol::kCompact;
  std::string structs = Bytes({0x00});  // STOP
  for (int level = 1; level < levels; ++level) {
    structs = (compact ? Bytes({0x1c}) : Bytes({0x0c, 0x00, 0x01})) + structs + Bytes({0x00});  // field 1: STRUCT
  }
  return (compact ? Bytes({0x5c}) : Bytes({0x0c, 0x00, 0x05})) + structs;  // field 5: STRUCT
}

// An unknown field is skipped through CheckedReads (Apache's skip read past them): a string in it
// longer than the bytes left fails as a known one does, and so does nesting deeper than 64 levels
// — the result struct is one, so 63 lists or structs in it still decode — where Apache's skip let
// 64 through and met only its bare DEPTH_LIMIT beyond (or allocated a string as long as the reply).
TEST(ThriftCodecTest, AnUnknownFieldIsSkippedThroughTheCheckedReads) {
  using apache::thrift::protocol::TProtocolException;
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    for (const std::string& fine : {UnknownString(p, 3), UnknownLists(p, 63), UnknownStructs(p, 63)}) {
      EXPECT_EQ(internal::Decode<HelloClient>(p, HiReplyWithUnknownField(p, fine), &HelloClient::recv_hi), "abc");
    }
    const std::string too_long = HiReplyWithUnknownField(p, UnknownString(p, 0x7fffffffu));
    const struct {
      std::string reply;
      TProtocolException::TProtocolExceptionType type;
      std::string what;
    } cases[] = {
        {too_long, TProtocolException::SIZE_LIMIT,
         "a string declares 2147483647 bytes with " + std::to_string(too_long.size() - too_long.find("xyz")) +
             " bytes of the reply left (the reply is " + std::to_string(too_long.size()) + " bytes)"},
        {HiReplyWithUnknownField(p, UnknownLists(p, 64)), TProtocolException::DEPTH_LIMIT,
         "structs, lists, sets and maps nest deeper than 64 levels"},
        {HiReplyWithUnknownField(p, UnknownStructs(p, 64)), TProtocolException::DEPTH_LIMIT,
         "structs nest deeper than 64 levels"},
    };
    for (const auto& c : cases) {
      try {
        internal::Decode<HelloClient>(p, c.reply, &HelloClient::recv_hi);
        ADD_FAILURE() << "decoded: " << c.what;
      } catch (const TProtocolException& e) {
        EXPECT_EQ(e.getType(), c.type) << e.what();
        EXPECT_NE(std::string_view(e.what()).find(c.what), std::string_view::npos) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << c.what << ": " << e.what();
      }
    }
  }
}

// A reply whose declared contents cannot be allocated: what the allocator throws is OutOfMemory
// (which the client turns into kResponseTooLarge), and the thread's codec, whose reader stopped
// inside a struct, is dropped. Numbers (tests/thrift) is allocated from std::pmr's default
// resource, here one that gives nothing.
TEST(ThriftCodecTest, AReplyThatCannotBeAllocatedDropsTheCodec) {
  using C = internal::Codec<HelloClient>;
  // numbers() -> [1, 2, 3], compact, per the spec: the header, field 0 (long form: LIST, i16 id 0),
  // the list header (size 3, I64), three zigzag varints, STOP.
  const std::string reply =
      Bytes({0x82, 0x41, 0x00, 0x07}) + "numbers" + Bytes({0x09, 0x00, 0x36, 0x02, 0x04, 0x06, 0x00});
  const auto decoded = internal::Decode<HelloClient>(Protocol::kCompact, reply, &HelloClient::recv_numbers);
  EXPECT_EQ(std::vector<int64_t>(decoded.begin(), decoded.end()), (std::vector<int64_t>{1, 2, 3}));
  ASSERT_TRUE(C::Kept(Protocol::kCompact));
  std::pmr::memory_resource* before = std::pmr::set_default_resource(std::pmr::null_memory_resource());
  try {
    internal::Decode<HelloClient>(Protocol::kCompact, reply, &HelloClient::recv_numbers);
    ADD_FAILURE() << "decoded";
  } catch (const std::exception& e) {
    EXPECT_TRUE(internal::OutOfMemory(e)) << e.what();
    EXPECT_FALSE(internal::Malformed(e)) << e.what();
  }
  std::pmr::set_default_resource(before);
  EXPECT_FALSE(C::Kept(Protocol::kCompact));
}

// libthrift's transports stop a message at 100 MiB read (TConfiguration's default
// maxMessageSize); a reply is bounded by max_frame_bytes (up to 2 GiB) before it is decoded, so
// the reader must not stop it below that.
TEST(ThriftCodecTest, AReplyOverLibthriftsDefaultMessageSizeDecodes) {
  for (Protocol p : {Protocol::kBinary, Protocol::kCompact}) {
    const std::string value(101u << 20, 'r');
    const std::string reply = HiReply(p, value);
    EXPECT_EQ(internal::Decode<HelloClient>(p, reply, &HelloClient::recv_hi).size(), value.size());
  }
}

// The thread's compact codec keeps a buffer as large as the largest string it read, so it is
// dropped after a large message: after a large TApplicationException too (recv_hi throws it),
// which kept 8 MiB per loop thread until the next large value or a failed decode.
TEST(ThriftCodecTest, TheCompactCodecIsDroppedAfterALargeReplyWhateverRecvThrows) {
  auto exception_reply = [](const std::string& message) {
    auto buf = std::make_shared<TMemoryBuffer>();
    TCompactProtocol proto(buf);
    apache::thrift::TApplicationException x(apache::thrift::TApplicationException::INTERNAL_ERROR, message);
    proto.writeMessageBegin("hi", apache::thrift::protocol::T_EXCEPTION, 0);
    x.write(&proto);
    proto.writeMessageEnd();
    return buf->getBufferAsString();
  };
  using C = internal::Codec<HelloClient>;
  const std::string big(C::kReuseLimit + 1, 'e');
  for (const std::string& reply : {HiReply(Protocol::kCompact, big), exception_reply(big)}) {
    EXPECT_EQ(internal::Decode<HelloClient>(Protocol::kCompact, HiReply(Protocol::kCompact, "x"), &HelloClient::recv_hi),
              "x");
    ASSERT_TRUE(C::Kept(Protocol::kCompact));
    try {
      EXPECT_EQ(internal::Decode<HelloClient>(Protocol::kCompact, reply, &HelloClient::recv_hi), big);
    } catch (const apache::thrift::TApplicationException& e) {
      EXPECT_EQ(e.getType(), apache::thrift::TApplicationException::INTERNAL_ERROR);
    }
    EXPECT_FALSE(C::Kept(Protocol::kCompact)) << "the codec that read " << reply.size() << " bytes was kept";
  }
  // A small exception keeps it.
  internal::Decode<HelloClient>(Protocol::kCompact, HiReply(Protocol::kCompact, "x"), &HelloClient::recv_hi);
  EXPECT_THROW(internal::Decode<HelloClient>(Protocol::kCompact, exception_reply("small"), &HelloClient::recv_hi),
               apache::thrift::TApplicationException);
  EXPECT_TRUE(C::Kept(Protocol::kCompact));
}

TEST(ThriftCodecTest, SpareBytesComeBackEmpty) {
  while (internal::TakeSpareBytes().capacity() > std::string().capacity()) {
  }  // what earlier tests on this thread left
  internal::RecycleBytes(std::string(200, 'x'));
  internal::RecycleBytes(std::string(internal::kMaxSpareCapacity + 1, 'y'));  // too large to keep
  std::string s = internal::TakeSpareBytes();
  EXPECT_TRUE(s.empty());
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  EXPECT_GE(s.capacity(), 200u);  // the first string's storage, the second was not kept
  EXPECT_LE(s.capacity(), internal::kMaxSpareCapacity);
#endif
  EXPECT_EQ(internal::TakeSpareBytes().capacity(), std::string().capacity());
}

}  // namespace
}  // namespace scales::thrift
