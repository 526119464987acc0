#include "scales/thrift/message.h"

#include <algorithm>
#include <climits>
#include <memory>


namespace scales::thrift {

namespace {

constexpr uint8_t kCompactProtocolId = 0x82;
constexpr uint8_t kCompactVersion = 1;

uint32_t ReadBe32(std::string_view b, size_t at) {
  return (static_cast<uint32_t>(static_cast<uint8_t>(b[at])) << 24) |
         (static_cast<uint32_t>(static_cast<uint8_t>(b[at + 1])) << 16) |
         (static_cast<uint32_t>(static_cast<uint8_t>(b[at + 2])) << 8) |
         static_cast<uint32_t>(static_cast<uint8_t>(b[at + 3]));
}

void WriteBe32(std::string& b, size_t at, uint32_t v) {
  b[at] = static_cast<char>(v >> 24);
  b[at + 1] = static_cast<char>(v >> 16);
  b[at + 2] = static_cast<char>(v >> 8);
  b[at + 3] = static_cast<char>(v);
}

// Reads an unsigned LEB128 varint of at most 5 bytes (a 32-bit value).
bool ReadVarint32(std::string_view b, size_t& at, uint32_t& out) {
  uint32_t v = 0;
  for (int i = 0; i < 5; ++i) {
    if (at >= b.size()) return false;
    auto byte = static_cast<uint8_t>(b[at++]);
    v |= static_cast<uint32_t>(byte & 0x7f) << (7 * i);
    if ((byte & 0x80) == 0) {
      out = v;
      return true;
    }
  }
  return false;
}

std::string EncodeVarint32(uint32_t v) {
  std::string out;
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
  return out;
}

bool ValidType(uint32_t t) { return t >= 1 && t <= 4; }

std::optional<MessageHeader> Fail(std::string* error, const char* why) {
  if (error != nullptr) *error = why;
  return std::nullopt;
}

}  // namespace

const char* ToString(Protocol p) noexcept {
  switch (p) {
    case Protocol::kBinary:
      return "binary";
    case Protocol::kCompact:
      return "compact";
  }
  return "?";
}

std::optional<MessageHeader> ParseMessageHeader(std::string_view b, std::string* error) {
  if (b.empty()) return Fail(error, "empty message");
  MessageHeader h;
  const auto first = static_cast<uint8_t>(b[0]);
  if (first == kCompactProtocolId) {
    if (b.size() < 2) return Fail(error, "truncated compact header");
    const auto vt = static_cast<uint8_t>(b[1]);
    if ((vt & 0x1f) != kCompactVersion) return Fail(error, "unsupported compact protocol version");
    const uint32_t type = (vt >> 5) & 0x07;
    if (!ValidType(type)) return Fail(error, "bad message type");
    size_t at = 2;
    uint32_t seqid = 0;
    const size_t seq_at = at;
    if (!ReadVarint32(b, at, seqid)) return Fail(error, "truncated or bad compact sequence id");
    const size_t seq_size = at - seq_at;
    uint32_t len = 0;
    if (!ReadVarint32(b, at, len)) return Fail(error, "truncated or bad compact method name length");
    if (len > b.size() - at) return Fail(error, "truncated method name");
    h.format = HeaderFormat::kCompact;
    h.type = static_cast<MessageType>(type);
    h.seqid = static_cast<int32_t>(seqid);
    h.seqid_offset = seq_at;
    h.seqid_size = seq_size;
    h.name.assign(b.substr(at, len));
    h.size = at + len;
    return h;
  }
  if (b.size() < 4) return Fail(error, "truncated binary header");
  const uint32_t word = ReadBe32(b, 0);
  size_t at = 4;
  if ((word & 0x80000000u) != 0) {
    // Strict binary: version 0x8001, a zero byte, the type.
    if ((word & 0xffff0000u) != 0x80010000u) return Fail(error, "unsupported binary protocol version");
    const uint32_t type = word & 0xff;
    if (!ValidType(type)) return Fail(error, "bad message type");
    if (b.size() < at + 4) return Fail(error, "truncated method name length");
    const uint32_t len = ReadBe32(b, at);
    at += 4;
    if (len > b.size() - at) return Fail(error, "truncated method name");
    h.name.assign(b.substr(at, len));
    at += len;
    if (b.size() < at + 4) return Fail(error, "truncated sequence id");
    h.format = HeaderFormat::kBinaryStrict;
    h.type = static_cast<MessageType>(type);
  } else {
    // Lenient (old) binary: name length, name, type byte, sequence id.
    const uint32_t len = word;
    if (len > b.size() - at) return Fail(error, "truncated method name");
    h.name.assign(b.substr(at, len));
    at += len;
    if (b.size() < at + 5) return Fail(error, "truncated message type or sequence id");
    const auto type = static_cast<uint8_t>(b[at]);
    if (!ValidType(type)) return Fail(error, "bad message type");
    ++at;
    h.format = HeaderFormat::kBinaryLenient;
    h.type = static_cast<MessageType>(type);
  }
  h.seqid = static_cast<int32_t>(ReadBe32(b, at));
  h.seqid_offset = at;
  h.seqid_size = 4;
  h.size = at + 4;
  return h;
}

void RewriteSeqId(std::string& bytes, MessageHeader& header, int32_t seqid) {
  if (header.format == HeaderFormat::kCompact) {
    std::string enc = EncodeVarint32(static_cast<uint32_t>(seqid));
    bytes.replace(header.seqid_offset, header.seqid_size, enc);
    header.size = header.size - header.seqid_size + enc.size();
    header.seqid_size = enc.size();
  } else {
    WriteBe32(bytes, header.seqid_offset, static_cast<uint32_t>(seqid));
  }
  header.seqid = seqid;
}

namespace {

// Walks over one encoded value without decoding it (no copies, no allocation). Running out of
// bytes is "need more"; anything the protocol does not allow is "malformed". Written here
// rather than with libthrift's skip() because that loads arbitrary bytes into its TType enum
// (undefined behaviour on garbage) and copies every string it skips.
class Skipper {
 public:
  enum class Result { kOk, kNeedMore, kMalformed };
  static constexpr int kMaxDepth = 64;

  Skipper(std::string_view b, size_t at) : b_(b), at_(at) {}
  size_t at() const noexcept { return at_; }
  const std::string& error() const noexcept { return error_; }

  Result BinaryStruct(int depth) {
    if (depth > kMaxDepth) return Malformed("nesting deeper than 64");
    for (;;) {
      uint8_t type = 0;
      if (!Byte(type)) return Result::kNeedMore;
      if (type == 0) return Result::kOk;  // T_STOP
      if (!Advance(2)) return Result::kNeedMore;  // field id
      if (Result r = BinaryValue(type, depth + 1); r != Result::kOk) return r;
    }
  }

  Result CompactStruct(int depth) {
    if (depth > kMaxDepth) return Malformed("nesting deeper than 64");
    for (;;) {
      uint8_t head = 0;
      if (!Byte(head)) return Result::kNeedMore;
      if (head == 0) return Result::kOk;  // stop
      const uint8_t type = head & 0x0f;
      if ((head >> 4) == 0) {
        uint64_t id = 0;
        if (Result r = Varint(id); r != Result::kOk) return r;  // explicit field id
      }
      if (type == 1 || type == 2) continue;  // boolean true/false: in the header
      if (Result r = CompactValue(type, depth + 1); r != Result::kOk) return r;
    }
  }

 private:
  bool Byte(uint8_t& out) {
    if (at_ >= b_.size()) return false;
    out = static_cast<uint8_t>(b_[at_++]);
    return true;
  }
  bool Advance(uint64_t n) {
    if (n > b_.size() - at_) return false;
    at_ += static_cast<size_t>(n);
    return true;
  }
  bool Be32(int32_t& out) {
    if (b_.size() - at_ < 4) return false;
    out = static_cast<int32_t>(ReadBe32(b_, at_));
    at_ += 4;
    return true;
  }
  Result Malformed(std::string why) {
    error_ = std::move(why);
    return Result::kMalformed;
  }
  Result Varint(uint64_t& out) {
    uint64_t v = 0;
    for (int i = 0; i < 10; ++i) {
      uint8_t byte = 0;
      if (!Byte(byte)) return Result::kNeedMore;
      v |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
      if ((byte & 0x80) == 0) {
        out = v;
        return Result::kOk;
      }
    }
    return Malformed("varint longer than 10 bytes");
  }

  Result BinaryValue(uint8_t type, int depth) {
    if (depth > kMaxDepth) return Malformed("nesting deeper than 64");
    int32_t n = 0;
    switch (type) {
      case 2:  // bool
      case 3:  // byte
        return Advance(1) ? Result::kOk : Result::kNeedMore;
      case 6:  // i16
        return Advance(2) ? Result::kOk : Result::kNeedMore;
      case 8:  // i32
        return Advance(4) ? Result::kOk : Result::kNeedMore;
      case 4:   // double
      case 10:  // i64
        return Advance(8) ? Result::kOk : Result::kNeedMore;
      case 11:  // string / binary
        if (!Be32(n)) return Result::kNeedMore;
        if (n < 0) return Malformed("negative string length");
        return Advance(static_cast<uint64_t>(n)) ? Result::kOk : Result::kNeedMore;
      case 12:
        return BinaryStruct(depth);
      case 13: {  // map
        uint8_t k = 0, v = 0;
        if (!Byte(k) || !Byte(v) || !Be32(n)) return Result::kNeedMore;
        if (n < 0) return Malformed("negative map size");
        for (int32_t i = 0; i < n; ++i) {
          if (Result r = BinaryValue(k, depth + 1); r != Result::kOk) return r;
          if (Result r = BinaryValue(v, depth + 1); r != Result::kOk) return r;
        }
        return Result::kOk;
      }
      case 14:    // set
      case 15: {  // list
        uint8_t e = 0;
        if (!Byte(e) || !Be32(n)) return Result::kNeedMore;
        if (n < 0) return Malformed("negative list size");
        for (int32_t i = 0; i < n; ++i) {
          if (Result r = BinaryValue(e, depth + 1); r != Result::kOk) return r;
        }
        return Result::kOk;
      }
      default:
        return Malformed("unknown binary field type " + std::to_string(type));
    }
  }

  // A compact value of compact type `type` (1/2 are booleans as list elements: one byte).
  Result CompactValue(uint8_t type, int depth) {
    if (depth > kMaxDepth) return Malformed("nesting deeper than 64");
    uint64_t n = 0;
    switch (type) {
      case 1:
      case 2:
      case 3:  // byte
        return Advance(1) ? Result::kOk : Result::kNeedMore;
      case 4:  // i16
      case 5:  // i32
      case 6:  // i64
        return Varint(n);
      case 7:  // double
        return Advance(8) ? Result::kOk : Result::kNeedMore;
      case 8:  // binary
        if (Result r = Varint(n); r != Result::kOk) return r;
        return Advance(n) ? Result::kOk : Result::kNeedMore;
      case 9:     // list
      case 10: {  // set
        uint8_t head = 0;
        if (!Byte(head)) return Result::kNeedMore;
        n = head >> 4;
        if (n == 15) {
          if (Result r = Varint(n); r != Result::kOk) return r;
        }
        const uint8_t e = head & 0x0f;
        for (uint64_t i = 0; i < n; ++i) {
          if (Result r = CompactValue(e, depth + 1); r != Result::kOk) return r;
        }
        return Result::kOk;
      }
      case 11: {  // map
        if (Result r = Varint(n); r != Result::kOk) return r;
        if (n == 0) return Result::kOk;
        uint8_t kv = 0;
        if (!Byte(kv)) return Result::kNeedMore;
        for (uint64_t i = 0; i < n; ++i) {
          if (Result r = CompactValue(kv >> 4, depth + 1); r != Result::kOk) return r;
          if (Result r = CompactValue(kv & 0x0f, depth + 1); r != Result::kOk) return r;
        }
        return Result::kOk;
      }
      case 12:
        return CompactStruct(depth);
      default:
        return Malformed("unknown compact field type " + std::to_string(type));
    }
  }

  std::string_view b_;
  size_t at_;
  std::string error_;
};

}  // namespace

MessageScan ScanMessage(std::string_view bytes) {
  MessageScan scan;
  if (bytes.empty()) return scan;
  std::string why;
  auto header = ParseMessageHeader(bytes, &why);
  if (!header) {
    // A header cut short needs more bytes; a wrong one never parses. Decide by whether a
    // longer prefix could still parse: only "truncated" errors can.
    if (why.find("truncated") != std::string::npos) return scan;
    scan.status = MessageScan::Status::kMalformed;
    scan.error = why;
    return scan;
  }
  Skipper skipper(bytes, header->size);
  auto r = header->format == HeaderFormat::kCompact ? skipper.CompactStruct(0) : skipper.BinaryStruct(0);
  switch (r) {
    case Skipper::Result::kOk:
      scan.status = MessageScan::Status::kComplete;
      scan.size = skipper.at();
      break;
    case Skipper::Result::kNeedMore:
      break;
    case Skipper::Result::kMalformed:
      scan.status = MessageScan::Status::kMalformed;
      scan.error = skipper.error();
      break;
  }
  return scan;
}

}  // namespace scales::thrift
