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

enum class Varint { kRead, kTruncated, kTooLong };

// A 32-bit varint at `at`. kTruncated: the bytes end inside it (more may come); kTooLong: it
// runs over 5 bytes (no more bytes can fix it).
Varint ReadVarint32(std::string_view b, size_t& at, uint32_t& out) {
  uint32_t v = 0;
  for (int i = 0; i < 5; ++i) {
    if (at >= b.size()) return Varint::kTruncated;
    auto byte = static_cast<uint8_t>(b[at++]);
    v |= static_cast<uint32_t>(byte & 0x7f) << (7 * i);
    if ((byte & 0x80) == 0) {
      out = v;
      return Varint::kRead;
    }
  }
  return Varint::kTooLong;
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
    if (const Varint r = ReadVarint32(b, at, seqid); r != Varint::kRead) {
      return Fail(error, r == Varint::kTruncated ? "truncated compact sequence id" : "compact sequence id over 5 bytes");
    }
    const size_t seq_size = at - seq_at;
    uint32_t len = 0;
    if (const Varint r = ReadVarint32(b, at, len); r != Varint::kRead) {
      return Fail(error, r == Varint::kTruncated ? "truncated compact method name length"
                                                 : "compact method name length over 5 bytes");
    }
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

constexpr int kMaxDepth = 64;

// These advance `p` only over a whole item; the scanner commits `p` once its item is whole.
bool Take(std::string_view b, size_t& p, uint64_t n) {
  if (n > b.size() - p) return false;
  p += static_cast<size_t>(n);
  return true;
}

bool TakeByte(std::string_view b, size_t& p, uint8_t& out) {
  if (p >= b.size()) return false;
  out = static_cast<uint8_t>(b[p++]);
  return true;
}

bool TakeBe32(std::string_view b, size_t& p, int32_t& out) {
  if (b.size() - p < 4) return false;
  out = static_cast<int32_t>(ReadBe32(b, p));
  p += 4;
  return true;
}

}  // namespace

auto MessageScanner::TakeVarint(std::string_view b, size_t& p, uint64_t& out) -> Result {
  uint64_t v = 0;
  for (int i = 0; i < 10; ++i) {
    uint8_t byte = 0;
    if (!TakeByte(b, p, byte)) return Result::kNeedMore;
    v |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
    if ((byte & 0x80) == 0) {
      out = v;
      return Result::kOk;
    }
  }
  return Malformed("varint longer than 10 bytes");
}

auto MessageScanner::Malformed(std::string why) -> Result {
  error_ = std::move(why);
  return Result::kMalformed;
}

void MessageScanner::Push(Frame::Kind kind, int depth, int containers, uint64_t count, uint8_t first_type,
                          uint8_t second_type) {
  Frame f;
  f.kind = kind;
  f.depth = depth;
  f.containers = containers;
  f.remaining = count;
  f.first_type = first_type;
  f.second_type = second_type;
  frames_.push_back(f);
}

// Takes one value of `type` in a frame at `depth` with `containers`: a scalar or string whole, or
// a container's header (pushing its frame). Nothing changes unless it returns kOk.
auto MessageScanner::StartValue(std::string_view b, uint8_t type, int depth, int containers) -> Result {
  const bool is_struct = type == 12;
  const bool is_container = compact_ ? type >= 9 && type <= 11 : type >= 13 && type <= 15;
  if (is_struct && depth + 1 > kMaxDepth) return Malformed("nesting deeper than 64");
  if (is_container && containers + 1 > kMaxDepth) return Malformed("lists, sets and maps nesting deeper than 64");
  const int struct_depth = depth + 1;
  const int inner = containers + 1;  // a container's run of containers
  size_t p = at_;
  if (!compact_) {
    int32_t n = 0;
    switch (type) {
      case 2:  // bool
      case 3:  // byte
        if (!Take(b, p, 1)) return Result::kNeedMore;
        break;
      case 6:  // i16
        if (!Take(b, p, 2)) return Result::kNeedMore;
        break;
      case 8:  // i32
        if (!Take(b, p, 4)) return Result::kNeedMore;
        break;
      case 4:   // double
      case 10:  // i64
        if (!Take(b, p, 8)) return Result::kNeedMore;
        break;
      case 11:  // string / binary
        if (!TakeBe32(b, p, n)) return Result::kNeedMore;
        if (n < 0) return Malformed("negative string length");
        if (!Take(b, p, static_cast<uint64_t>(n))) return Result::kNeedMore;
        break;
      case 12:
        Push(Frame::Kind::kStruct, struct_depth, 0, 0, 0, 0);
        break;
      case 13: {  // map
        uint8_t k = 0, v = 0;
        if (!TakeByte(b, p, k) || !TakeByte(b, p, v) || !TakeBe32(b, p, n)) return Result::kNeedMore;
        if (n < 0) return Malformed("negative map size");
        Push(Frame::Kind::kMap, depth, inner, static_cast<uint64_t>(n), k, v);
        break;
      }
      case 14:    // set
      case 15: {  // list
        uint8_t e = 0;
        if (!TakeByte(b, p, e) || !TakeBe32(b, p, n)) return Result::kNeedMore;
        if (n < 0) return Malformed("negative list size");
        Push(Frame::Kind::kList, depth, inner, static_cast<uint64_t>(n), e, 0);
        break;
      }
      default:
        return Malformed("unknown binary field type " + std::to_string(type));
    }
    at_ = p;
    return Result::kOk;
  }
  uint64_t n = 0;
  switch (type) {
    case 1:  // booleans as list elements: one byte
    case 2:
    case 3:  // byte
      if (!Take(b, p, 1)) return Result::kNeedMore;
      break;
    case 4:  // i16
    case 5:  // i32
    case 6:  // i64
      if (Result r = TakeVarint(b, p, n); r != Result::kOk) return r;
      break;
    case 7:  // double
      if (!Take(b, p, 8)) return Result::kNeedMore;
      break;
    case 8:  // binary
      if (Result r = TakeVarint(b, p, n); r != Result::kOk) return r;
      if (!Take(b, p, n)) return Result::kNeedMore;
      break;
    case 9:     // list
    case 10: {  // set
      uint8_t head = 0;
      if (!TakeByte(b, p, head)) return Result::kNeedMore;
      n = head >> 4;
      if (n == 15) {
        if (Result r = TakeVarint(b, p, n); r != Result::kOk) return r;
      }
      Push(Frame::Kind::kList, depth, inner, n, head & 0x0f, 0);
      break;
    }
    case 11: {  // map
      if (Result r = TakeVarint(b, p, n); r != Result::kOk) return r;
      if (n == 0) break;
      uint8_t kv = 0;
      if (!TakeByte(b, p, kv)) return Result::kNeedMore;
      Push(Frame::Kind::kMap, depth, inner, n, kv >> 4, kv & 0x0f);
      break;
    }
    case 12:
      Push(Frame::Kind::kStruct, struct_depth, 0, 0, 0, 0);
      break;
    default:
      return Malformed("unknown compact field type " + std::to_string(type));
  }
  at_ = p;
  return Result::kOk;
}

// Takes a field header of the struct on top (or its stop, popping it). Nothing changes unless
// it returns kOk.
auto MessageScanner::FieldHeader(std::string_view b) -> Result {
  size_t p = at_;
  uint8_t head = 0;
  if (!TakeByte(b, p, head)) return Result::kNeedMore;
  if (head == 0) {  // stop
    at_ = p;
    frames_.pop_back();
    return Result::kOk;
  }
  if (!compact_) {
    if (!Take(b, p, 2)) return Result::kNeedMore;  // field id
    at_ = p;
    frames_.back().pending = head;
    return Result::kOk;
  }
  const uint8_t type = head & 0x0f;
  if ((head >> 4) == 0) {
    uint64_t id = 0;
    if (Result r = TakeVarint(b, p, id); r != Result::kOk) return r;  // explicit field id
  }
  at_ = p;
  if (type != 1 && type != 2) frames_.back().pending = type;  // booleans are in the header
  return Result::kOk;
}

auto MessageScanner::Walk(std::string_view b) -> Result {
  while (!frames_.empty()) {
    ++steps_;
    const size_t top = frames_.size() - 1;
    Frame& f = frames_[top];
    Result r = Result::kOk;
    switch (f.kind) {
      case Frame::Kind::kStruct:
        if (f.pending < 0) {
          r = FieldHeader(b);
        } else if (r = StartValue(b, static_cast<uint8_t>(f.pending), f.depth, f.containers); r == Result::kOk) {
          frames_[top].pending = -1;
        }
        break;
      case Frame::Kind::kList:
        if (f.remaining == 0) {
          frames_.pop_back();
        } else if (r = StartValue(b, f.first_type, f.depth, f.containers); r == Result::kOk) {
          --frames_[top].remaining;
        }
        break;
      case Frame::Kind::kMap:
        if (f.remaining == 0) {
          frames_.pop_back();
        } else if (r = StartValue(b, f.value_next ? f.second_type : f.first_type, f.depth, f.containers);
                   r == Result::kOk) {
          Frame& m = frames_[top];
          if (m.value_next) --m.remaining;
          m.value_next = !m.value_next;
        }
        break;
    }
    if (r != Result::kOk) return r;
  }
  return Result::kOk;
}

void MessageScanner::Reset() {
  frames_.clear();
  error_.clear();
  at_ = 0;
  header_done_ = false;
  done_ = std::nullopt;
}

MessageScan MessageScanner::Scan(std::string_view bytes) {
  MessageScan scan;
  if (done_) {
    // Answered already: the same answer (the bytes after the message are not looked at).
    scan.status = *done_;
    scan.size = at_;
    scan.error = error_;
    return scan;
  }
  if (!header_done_) {
    if (bytes.empty()) return scan;
    std::string why;
    auto header = ParseMessageHeader(bytes, &why);
    if (!header) {
      // A header cut short needs more bytes; a wrong one never parses. Decide by whether a
      // longer prefix could still parse: only "truncated" errors can.
      if (why.find("truncated") != std::string::npos) return scan;
      error_ = std::move(why);
      done_ = scan.status = MessageScan::Status::kMalformed;
      scan.error = error_;
      return scan;
    }
    header_done_ = true;
    compact_ = header->format == HeaderFormat::kCompact;
    at_ = header->size;
    frames_.reserve(8);
    Push(Frame::Kind::kStruct, 1, 0, 0, 0, 0);  // the message's struct (arguments or result)
  }
  switch (Walk(bytes)) {
    case Result::kOk:
      done_ = scan.status = MessageScan::Status::kComplete;
      scan.size = at_;
      break;
    case Result::kNeedMore:
      break;
    case Result::kMalformed:
      done_ = scan.status = MessageScan::Status::kMalformed;
      scan.error = error_;
      break;
  }
  return scan;
}

MessageScan ScanMessage(std::string_view bytes) { return MessageScanner().Scan(bytes); }

}  // namespace scales::thrift
