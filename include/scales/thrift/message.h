#pragma once
// Thrift message headers on the wire: parsing and sequence-id rewriting for the binary
// (strict and lenient) and compact protocols, and finding the end of one whole message in a
// byte stream (for the unframed "buffered" transport). No I/O; pure functions over bytes.
//
// Thread safety: stateless functions, safe from any thread.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace scales::thrift {

// Wire protocols. Binary is Apache Thrift's default (and the only one ThriftMux carries).
enum class Protocol { kBinary, kCompact };

// Message types (Apache Thrift's TMessageType values).
enum class MessageType : uint8_t { kCall = 1, kReply = 2, kException = 3, kOneway = 4 };

const char* ToString(Protocol p) noexcept;

// How the header of one message was encoded.
enum class HeaderFormat { kBinaryStrict, kBinaryLenient, kCompact };

// A parsed message header and where its parts are in the bytes.
struct MessageHeader {
  HeaderFormat format = HeaderFormat::kBinaryStrict;
  MessageType type = MessageType::kCall;
  std::string name;
  int32_t seqid = 0;
  // Byte range of the encoded sequence id (4 bytes for binary; a varint for compact).
  size_t seqid_offset = 0;
  size_t seqid_size = 0;
  // Size of the whole header (the message's struct starts here).
  size_t size = 0;
};

// Parses the header at the start of `bytes`: binary strict (0x80 0x01 ...), binary lenient
// (i32 name length first) or compact (0x82 ...), detected from the first byte. Returns nullopt
// if the bytes are not (or not yet, when truncated) a Thrift message header; `error`, when
// given, then says why.
std::optional<MessageHeader> ParseMessageHeader(std::string_view bytes, std::string* error = nullptr);

// Replaces the sequence id of the message in `bytes` (whose header is `header`) by `seqid`,
// in place for binary and re-encoding the varint for compact; updates `header`.
void RewriteSeqId(std::string& bytes, MessageHeader& header, int32_t seqid);

// The result of looking for the end of the first message in a byte stream.
struct MessageScan {
  enum class Status { kComplete, kNeedMore, kMalformed };
  Status status = Status::kNeedMore;
  size_t size = 0;       // kComplete: the message's size in bytes
  std::string error;     // kMalformed: why
};

// Finds the end of the first whole message in `bytes` (binary strict or lenient, or compact,
// detected from the header) by walking its encoding without decoding it: no copies, depth at
// most 64. The caller bounds how many bytes it buffers while the result is kNeedMore.
MessageScan ScanMessage(std::string_view bytes);

}  // namespace scales::thrift
