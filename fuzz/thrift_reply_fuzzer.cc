// Fuzz target: Thrift reply decoding (include/scales/thrift/message.h and the reply path of
// ThriftSerializerSink, include/scales/thrift/serializer.h), binary and compact.
//
// The input is a reply as a server would send it. Checked on it: ParseMessageHeader and
// RewriteSeqId agree with each other (a rewritten sequence id parses back, the name and the
// rest of the message stay put), ScanMessage never reports a message longer than its bytes and
// agrees with ParseMessageHeader on what is malformed; and a ThriftSerializerSink that sent an
// "echo" call (sequence id 1) gets the bytes as its reply and answers the call exactly once,
// restoring the caller's sequence id 0 when it accepts the reply. A MessageScanner fed the
// bytes in pieces agrees with ScanMessage. The fast path for strict binary headers
// (internal::ParseStrictHeader, used on every call and reply by the Thrift client and the
// ThriftMux serializer) takes exactly the strict binary headers ParseMessageHeader takes, and
// reads them the same way. The typed client's compact reply protocol (thrift::CheckedReads, which
// reads the varint length of each string ahead of Apache's reader), reading the bytes as a
// TApplicationException (skipping the fields it does not know through the same checks), fails
// only with what the client reports as a malformed reply (thrift::internal::Malformed), and never
// with Apache's plain TException (CheckedReads names an unknown compact type in a
// TProtocolException).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <typeinfo>

#include <thrift/TApplicationException.h>

#include "loopback.h"
#include "scales/thrift/client.h"
#include "scales/thrift/message.h"
#include "scales/thrift/serializer.h"

namespace {

using namespace scales;
using fuzz::Check;

// The transport below the serializer: answers every request with the fuzzer's bytes.
class ReplyWith final : public ClientMessageSink {
 public:
  explicit ReplyWith(std::string_view bytes) : bytes_(bytes) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream*) override {
    Stream* reply = msg.reply_slot<Stream>();
    reply->data.assign(bytes_);
    auto ok = MethodReturnMessage::Ok();
    stack.AsyncProcessResponse(reply, ok);
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "reply-with"; }

 protected:
  void DoOpen(OpenHandler) override {}

 private:
  std::string_view bytes_;
};

// echo("hi") as the generated code writes it (sequence id 0), binary strict or compact.
std::string EchoCall(bool compact) {
  if (compact) return std::string("\x82\x21\x00\x04" "echo" "\x18\x02hi\x00", 13);
  return std::string("\x80\x01\x00\x01\x00\x00\x00\x04" "echo" "\x00\x00\x00\x00"
                     "\x0b\x00\x01\x00\x00\x00\x02hi\x00", 26);
}

void CheckHeader(std::string_view bytes) {
  std::string why;
  auto header = thrift::ParseMessageHeader(bytes, &why);
  if (auto strict = thrift::internal::ParseStrictHeader(bytes)) {
    Check(header && header->format == thrift::HeaderFormat::kBinaryStrict,
          "ParseStrictHeader took a header ParseMessageHeader does not take as strict binary");
    Check(strict->type == header->type && strict->name == header->name && strict->seqid == header->seqid &&
              strict->name.data() == bytes.data() + 8 && 8 + strict->name.size() + 4 == header->size,
          "ParseStrictHeader and ParseMessageHeader read a strict header differently");
  } else {
    Check(!header || header->format != thrift::HeaderFormat::kBinaryStrict,
          "ParseStrictHeader refused a strict binary header ParseMessageHeader takes");
  }
  auto scan = thrift::ScanMessage(bytes);
  Check(scan.status != thrift::MessageScan::Status::kComplete || scan.size <= bytes.size(),
        "ScanMessage: message longer than its bytes");
  if (!header) {
    Check(!why.empty(), "ParseMessageHeader failed without saying why");
    Check(scan.status != thrift::MessageScan::Status::kComplete, "ScanMessage accepts a bad header");
    return;
  }
  Check(header->size <= bytes.size(), "header longer than its bytes");
  Check(header->seqid_offset + header->seqid_size <= header->size, "sequence id outside the header");
  if (scan.status == thrift::MessageScan::Status::kComplete) {
    Check(scan.size > header->size, "a complete message without its struct");
  }
  for (int32_t seqid : {0, 1, -1, 0x7fffffff, 300}) {
    std::string copy(bytes);
    thrift::MessageHeader h = *header;
    thrift::RewriteSeqId(copy, h, seqid);
    auto again = thrift::ParseMessageHeader(copy);
    Check(again.has_value(), "a rewritten header does not parse");
    Check(again->seqid == seqid && again->name == header->name && again->type == header->type &&
              again->size == h.size,
          "RewriteSeqId changed more than the sequence id");
    Check(std::string_view(copy).substr(h.size) == bytes.substr(header->size),
          "RewriteSeqId changed the message body");
  }
}

// A MessageScanner given the bytes in pieces (their ends taken from the bytes themselves) gives
// the answer ScanMessage gives them whole: the buffered transport's reads resume the walk.
void CheckScanInPieces(std::string_view bytes) {
  const auto whole = thrift::ScanMessage(bytes);
  thrift::MessageScanner scanner;
  thrift::MessageScan pieces;
  size_t have = 0;
  for (size_t i = 0; have < bytes.size(); ++i) {
    have = std::min(bytes.size(), have + 1 + static_cast<uint8_t>(bytes[i % bytes.size()]) % 23);
    const std::string copy(bytes.substr(0, have));  // the buffer may move between reads
    pieces = scanner.Scan(copy);
    if (pieces.status != thrift::MessageScan::Status::kNeedMore) break;
  }
  Check(pieces.status == whole.status, "a scan in pieces disagrees with a whole scan");
  Check(pieces.status != thrift::MessageScan::Status::kComplete || pieces.size == whole.size,
        "a scan in pieces finds another message size");
  Check(pieces.error == whole.error, "a scan in pieces gives another reason");
}

void ThroughSerializer(std::string_view reply, bool compact) {
  auto sink = std::make_shared<thrift::ThriftSerializerSink>(std::make_shared<ReplyWith>(reply));
  fuzz::Call call;
  call.request().data = EchoCall(compact);
  sink->AsyncProcessRequest(call.stack(), call.message(), nullptr);
  Check(call.completions() == 1, "the serializer did not answer exactly once");
  Check(call.request().data == EchoCall(compact), "the request bytes were not restored");
  if (call.result().ok()) {
    auto h = thrift::ParseMessageHeader(call.reply().data);
    Check(h && h->seqid == 0 && h->name == "echo", "accepted a reply that is not echo's");
  }
}

// libthrift's TApplicationException, read with the compact protocol through its virtual reads
// (message, struct, field, string and container reads and skips: the ones CheckedReads checks)
// from a memory buffer observing the bytes (as a blocking call's transport holds its reply),
// limited by their size. A read past the bytes is an ASan report. Not binary: Apache's binary
// reader casts any type byte to TType (or TMessageType), which UBSan reports as an invalid enum
// load before it is refused.
void ThroughCompactReplyProtocol(std::string_view bytes) {
  auto buffer = std::make_shared<apache::thrift::transport::TMemoryBuffer>(
      reinterpret_cast<uint8_t*>(const_cast<char*>(bytes.data())), static_cast<uint32_t>(bytes.size()));
  auto in = thrift::internal::MakeProtocolOver(thrift::Protocol::kCompact, buffer);
  dynamic_cast<thrift::ReadLimits&>(*in).LimitReadsTo(bytes.size());
  try {
    std::string name;
    apache::thrift::protocol::TMessageType type;
    int32_t seqid = 0;
    in->readMessageBegin(name, type, seqid);
    apache::thrift::TApplicationException x;
    x.read(in.get());
    in->readMessageEnd();
  } catch (const std::exception& e) {
    Check(thrift::internal::Malformed(e), "the reply protocol threw what the client does not report as malformed");
    Check(typeid(e) != typeid(apache::thrift::TException), "the reply protocol threw Apache's plain TException");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  CheckHeader(bytes);
  CheckScanInPieces(bytes);
  ThroughSerializer(bytes, false);
  ThroughSerializer(bytes, true);
  ThroughCompactReplyProtocol(bytes);
  return 0;
}
