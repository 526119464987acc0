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
#include <vector>

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
// detected from the header) by walking its encoding without decoding it: no copies, no
// allocation per value. Structs nest at most 64 deep (the message's struct included; Apache's
// recursion limit, which the lists, sets and maps between them do not count), and lists, sets
// and maps at most 64 deep between two structs. The caller bounds how many bytes it buffers
// while the result is kNeedMore.
MessageScan ScanMessage(std::string_view bytes);

// ScanMessage for a message that arrives in pieces. Each Scan() is given every byte received so
// far (the earlier ones unchanged, the buffer may have moved) and resumes where the last one
// stopped, so a message that arrives in k reads costs O(size + k) rather than a walk from its
// first byte on every read (a large list of small values read 64 KiB at a time would otherwise
// cost O(size^2 / 64 KiB)). Once complete or malformed it keeps that answer until Reset().
//
// Thread safety: none; one scanner per connection.
class MessageScanner {
 public:
  MessageScan Scan(std::string_view bytes);
  // Forgets the message: the next Scan() starts a new one.
  void Reset();
  // The walking steps taken since construction (field headers, values and container ends,
  // attempts that needed more bytes included): how tests check that scanning resumes.
  uint64_t steps() const noexcept { return steps_; }

 private:
  enum class Result { kOk, kNeedMore, kMalformed };
  // A container being walked: the message's struct, a nested struct, a list or set, a map.
  struct Frame {
    enum class Kind : uint8_t { kStruct, kList, kMap } kind = Kind::kStruct;
    uint8_t first_type = 0;   // list: the element type; map: the key type
    uint8_t second_type = 0;  // map: the value type
    bool value_next = false;  // map: the next item is an entry's value
    int16_t pending = -1;     // struct: the type of the field whose header was read, -1 none
    // The structs it is in, itself included (the message's struct is 1), as Apache's recursion
    // limit counts them: the lists, sets and maps between them do not count.
    int depth = 0;
    // The lists, sets and maps nested since the innermost struct, itself included (0 for a
    // struct): bounded apart, as each costs a frame.
    int containers = 0;
    uint64_t remaining = 0;   // list: elements; map: entries
  };

  auto Walk(std::string_view b) -> Result;
  auto FieldHeader(std::string_view b) -> Result;
  // `depth` and `containers`: those of the frame the value is in.
  auto StartValue(std::string_view b, uint8_t type, int depth, int containers) -> Result;
  auto TakeVarint(std::string_view b, size_t& p, uint64_t& out) -> Result;
  auto Malformed(std::string why) -> Result;
  void Push(Frame::Kind kind, int depth, int containers, uint64_t count, uint8_t first_type, uint8_t second_type);

  std::vector<Frame> frames_;
  std::string error_;
  size_t at_ = 0;  // the bytes before it are walked
  uint64_t steps_ = 0;
  bool header_done_ = false;
  bool compact_ = false;
  std::optional<MessageScan::Status> done_;  // complete or malformed
};

}  // namespace scales::thrift
