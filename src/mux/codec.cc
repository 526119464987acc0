// The Mux wire codec. See include/scales/mux/codec.h and ../shared/mux-protocol.md §1.

#include "scales/mux/codec.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <type_traits>

#include <fmt/format.h>

namespace scales::mux {
namespace {

CodecError ProtocolError(std::string detail) {
  return CodecError{make_error_code(Errc::kProtocolError), std::move(detail)};
}
CodecError InvalidArgument(std::string detail) {
  return CodecError{make_error_code(Errc::kInvalidArgument), std::move(detail)};
}

// How a size over a limit is reported: "the limit of N bytes" from the codec used alone, or
// "<what> (limit <option> = N)" when the user of the codec named the option that sets it.
std::string OverLimit(std::string_view what, std::string_view limit_name, std::uint64_t limit) {
  if (limit_name.empty()) return fmt::format("the limit of {} bytes", limit);
  return fmt::format("{} (limit {} = {})", what, limit_name, limit);
}

// Big-endian reader over a body that records the first failure with the field and offset.
class Reader {
 public:
  Reader(std::string_view what, std::string_view data) : what_(what), data_(data) {}

  bool ok() const { return !error_; }
  std::size_t offset() const { return pos_; }
  std::size_t remaining() const { return data_.size() - pos_; }
  CodecError TakeError() { return std::move(*error_); }

  std::uint64_t Int(std::size_t n, std::string_view field) {
    if (!Need(n, field)) return 0;
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) {
      v = (v << 8) | static_cast<std::uint8_t>(data_[pos_ + i]);
    }
    pos_ += n;
    return v;
  }
  std::string_view Bytes(std::size_t n, std::string_view field) {
    if (!Need(n, field)) return {};
    std::string_view v = data_.substr(pos_, n);
    pos_ += n;
    return v;
  }
  // A length-prefixed byte string (prefix of `prefix` bytes).
  std::string_view Prefixed(std::size_t prefix, std::string_view field) {
    std::size_t len_at = pos_;
    std::uint64_t n = Int(prefix, field);
    if (!ok()) return {};
    if (n > remaining()) {
      Fail(fmt::format("{}: {} length {} at offset {} runs past the end (have {} bytes)", what_,
                       field, n, len_at, remaining()));
      return {};
    }
    return Bytes(static_cast<std::size_t>(n), field);
  }
  std::string_view Rest() {
    std::string_view v = data_.substr(pos_);
    pos_ = data_.size();
    return v;
  }
  void Fail(std::string detail) {
    if (!error_) error_ = ProtocolError(std::move(detail));
  }

 private:
  bool Need(std::size_t n, std::string_view field) {
    if (error_) return false;
    if (remaining() < n) {
      Fail(fmt::format("{}: truncated {} at offset {} (need {} bytes, have {})", what_, field, pos_,
                       n, remaining()));
      return false;
    }
    return true;
  }

  std::string_view what_;
  std::string_view data_;
  std::size_t pos_ = 0;
  std::optional<CodecError> error_;
};

// Stores the low `n` bytes of `v` big-endian at `p`.
void StoreBe(std::uint64_t v, std::size_t n, char* p) {
  if (n == 8 && std::endian::native == std::endian::little) {
    const std::uint64_t be = __builtin_bswap64(v);
    std::memcpy(p, &be, 8);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<char>((v >> (8 * (n - 1 - i))) & 0xFF);
}

void PutInt(std::uint64_t v, std::size_t n, std::string* out) {
  // One append of the whole integer: byte-wise push_back is several times slower.
  char bytes[8];
  StoreBe(v, n, bytes);
  out->append(bytes, n);
}

// Writer that records the first field that does not fit its length prefix.
class Writer {
 public:
  Writer(std::string_view what, std::string* out) : what_(what), out_(out) {}
  void Int(std::uint64_t v, std::size_t n) { PutInt(v, n, out_); }
  void Count(std::size_t v, std::size_t n, std::string_view field) {
    if (!Fits(v, n, field)) return;
    PutInt(v, n, out_);
  }
  void Prefixed(std::string_view s, std::size_t n, std::string_view field) {
    if (!Fits(s.size(), n, field)) return;
    PutInt(s.size(), n, out_);
    out_->append(s);
  }
  void Raw(std::string_view s) { out_->append(s); }
  Result<void> Finish() {
    if (error_) return *error_;
    return {};
  }

 private:
  bool Fits(std::size_t v, std::size_t n, std::string_view field) {
    std::uint64_t max = n >= 8 ? ~0ull : (1ull << (8 * n)) - 1;
    if (v > max) {
      if (!error_) {
        error_ =
            InvalidArgument(fmt::format("{}: {} {} does not fit in {} bytes", what_, field, v, n));
      }
      return false;
    }
    return true;
  }
  std::string_view what_;
  std::string* out_;
  std::optional<CodecError> error_;
};

Result<ReplyStatus> ParseStatus(Reader& r, std::string_view what) {
  std::size_t at = r.offset();
  std::uint64_t s = r.Int(1, "status");
  if (!r.ok()) return r.TakeError();
  if (s > 2) {
    return ProtocolError(
        fmt::format("{}: invalid status {} at offset {} (expected 0, 1 or 2)", what, s, at));
  }
  return static_cast<ReplyStatus>(s);
}

Contexts ParseContexts(Reader& r) {
  Contexts contexts;
  std::uint64_t n = r.Int(2, "context count");
  if (!r.ok()) return contexts;
  contexts.reserve(std::min<std::uint64_t>(n, r.remaining() / 4));
  for (std::uint64_t i = 0; i < n && r.ok(); ++i) {
    std::string_view key = r.Prefixed(2, "context key");
    std::string_view value = r.Prefixed(2, "context value");
    if (r.ok()) contexts.push_back(Context{std::string(key), std::string(value)});
  }
  return contexts;
}

void WriteContexts(const Contexts& contexts, Writer& w) {
  w.Count(contexts.size(), 2, "context count");
  for (const auto& c : contexts) {
    w.Prefixed(c.key, 2, "context key length");
    w.Prefixed(c.value, 2, "context value length");
  }
}

InitHeaders ParseInitHeaders(Reader& r) {
  InitHeaders headers;
  while (r.ok() && r.remaining() > 0) {
    std::string_view key = r.Prefixed(4, "header key");
    std::string_view value = r.Prefixed(4, "header value");
    if (r.ok()) headers.emplace_back(std::string(key), std::string(value));
  }
  return headers;
}

template <class T>
Result<Message> Finish(Reader& r, T&& m) {
  if (!r.ok()) return r.TakeError();
  return Message(std::forward<T>(m));
}

const char* NameOf(std::uint8_t type) {
  switch (type) {
    case wire::kTreq:
      return "Treq";
    case wire::kRreq:
      return "Rreq";
    case wire::kTdispatch:
      return "Tdispatch";
    case wire::kRdispatch:
      return "Rdispatch";
    case wire::kTdrain:
      return "Tdrain";
    case wire::kRdrain:
      return "Rdrain";
    case wire::kTping:
      return "Tping";
    case wire::kRping:
      return "Rping";
    case wire::kTdiscarded:
    case wire::kTdiscardedLegacy:
      return "Tdiscarded";
    case wire::kRdiscarded:
      return "Rdiscarded";
    case wire::kTlease:
      return "Tlease";
    case wire::kTinit:
      return "Tinit";
    case wire::kRinit:
      return "Rinit";
    case wire::kRerr:
    case wire::kRerrLegacy:
      return "Rerr";
    default:
      return nullptr;
  }
}

}  // namespace

void throw_exception_from_error(const CodecError& e, const boost::source_location&) {
  throw Error(e.code, "mux codec: " + e.detail);
}

// ---------------------------------------------------------------------------------------------

Rerr ProbeMessage() { return Rerr{kControlTag, std::string(kProbeText)}; }

bool IsProbe(const Message& m) {
  const auto* rerr = std::get_if<Rerr>(&m);
  return rerr != nullptr && rerr->tag == kControlTag && rerr->why == kProbeText;
}

std::uint32_t TagOf(const Message& m) {
  return std::visit([](const auto& v) { return v.tag; }, m);
}

std::uint8_t WireTypeOf(const Message& m) {
  static constexpr std::uint8_t kByIndex[] = {
      wire::kTreq,   wire::kRreq,  wire::kTdispatch, wire::kRdispatch,        wire::kTdrain,
      wire::kRdrain, wire::kTping, wire::kRping,     wire::kTdiscardedLegacy, wire::kRdiscarded,
      wire::kTlease, wire::kTinit, wire::kRinit,     wire::kRerrLegacy};
  static_assert(std::size(kByIndex) == std::variant_size_v<Message>);
  return kByIndex[m.index()];
}

std::string TypeName(std::uint8_t type_byte) {
  const char* name = NameOf(type_byte);
  return name != nullptr ? std::string(name) : fmt::format("unknown(0x{:02x})", type_byte);
}

bool IsKnownType(std::uint8_t type_byte) { return NameOf(type_byte) != nullptr; }

bool IsFragmentable(std::uint8_t type_byte) {
  return type_byte == wire::kTdispatch || type_byte == wire::kRdispatch;
}

std::string Describe(const Message& m) {
  std::string s = fmt::format("{} tag={}", TypeName(WireTypeOf(m)), TagOf(m));
  std::visit(
      [&s](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, Tdispatch>) {
          s += fmt::format(" contexts={} dst={} dtab={} payload={}", v.contexts.size(),
                           v.dst.size(), v.dtab.size(), v.payload.size());
        } else if constexpr (std::is_same_v<T, Rdispatch>) {
          s += fmt::format(" status={} contexts={} body={}", static_cast<int>(v.status),
                           v.contexts.size(), v.body.size());
        } else if constexpr (std::is_same_v<T, Treq>) {
          s += fmt::format(" keys={} payload={}", v.keys.size(), v.payload.size());
        } else if constexpr (std::is_same_v<T, Rreq>) {
          s += fmt::format(" status={} body={}", static_cast<int>(v.status), v.body.size());
        } else if constexpr (std::is_same_v<T, Tdiscarded>) {
          s += fmt::format(" which={} why=\"{}\"", v.which, v.why);
        } else if constexpr (std::is_same_v<T, Tlease>) {
          s += fmt::format(" unit={} amount={}", v.unit, v.amount);
        } else if constexpr (std::is_same_v<T, Tinit> || std::is_same_v<T, Rinit>) {
          s += fmt::format(" version={} headers={}", v.version, v.headers.size());
        } else if constexpr (std::is_same_v<T, Rerr>) {
          s += fmt::format(" why=\"{}\"", v.why);
        }
      },
      m);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Frame headers.

Result<FrameHeader> DecodeFrameHeader(std::string_view bytes, std::uint32_t max_frame_size,
                                      std::string_view limit_name) {
  if (bytes.size() < kHeaderSize) {
    return ProtocolError(
        fmt::format("frame header truncated: have {} of {} bytes", bytes.size(), kHeaderSize));
  }
  // Read in place (once per frame received): size (4), type (1), tag with the fragment bit (3).
  const auto* p = reinterpret_cast<const std::uint8_t*>(bytes.data());
  FrameHeader h;
  h.size = std::uint32_t{p[0]} << 24 | std::uint32_t{p[1]} << 16 | std::uint32_t{p[2]} << 8 | p[3];
  h.type = p[4];
  const std::uint32_t tag = std::uint32_t{p[5]} << 16 | std::uint32_t{p[6]} << 8 | p[7];
  h.tag = tag & kMaxTag;
  h.fragment = (tag & kFragmentBit) != 0;
  if (h.size < 4) {
    return ProtocolError(fmt::format("frame size {} is below the minimum of 4", h.size));
  }
  if (h.size > max_frame_size) {
    return ProtocolError(fmt::format("frame size {} exceeds {}", h.size,
                                     OverLimit("the largest frame accepted", limit_name, max_frame_size)));
  }
  return h;
}

void AppendFrameHeader(std::uint8_t type, std::uint32_t tag, bool fragment, std::size_t body_size,
                       std::string* out) {
  // One append of the whole header (once per frame sent).
  char header[kHeaderSize];
  StoreBe(static_cast<std::uint32_t>(body_size + 4), 4, header);
  header[4] = static_cast<char>(type);
  StoreBe((tag & kMaxTag) | (fragment ? kFragmentBit : 0), 3, header + 5);
  out->append(header, kHeaderSize);
}

// ---------------------------------------------------------------------------------------------
// Decoding.

Result<Message> DecodeMessage(std::uint8_t type, std::uint32_t tag, std::string_view body) {
  const char* name = NameOf(type);
  if (name == nullptr) {
    return ProtocolError(fmt::format("unknown mux message type 0x{:02x} ({}) on tag {}", type,
                                     static_cast<std::int8_t>(type), tag));
  }
  Reader r(name, body);
  switch (type) {
    case wire::kTreq: {
      Treq m;
      m.tag = tag;
      std::uint64_t n = r.Int(1, "key count");
      for (std::uint64_t i = 0; i < n && r.ok(); ++i) {
        std::uint8_t key = static_cast<std::uint8_t>(r.Int(1, "key"));
        std::string_view value = r.Prefixed(1, "key value");
        if (r.ok()) m.keys.push_back(TreqKey{key, std::string(value)});
      }
      m.payload = std::string(r.Rest());
      return Finish(r, std::move(m));
    }
    case wire::kRreq: {
      auto status = ParseStatus(r, name);
      if (!status) return status.error();
      return Rreq{tag, *status, std::string(r.Rest())};
    }
    case wire::kTdispatch: {
      Tdispatch m;
      m.tag = tag;
      m.contexts = ParseContexts(r);
      m.dst = std::string(r.Prefixed(2, "dst"));
      std::uint64_t nd = r.Int(2, "dtab count");
      for (std::uint64_t i = 0; i < nd && r.ok(); ++i) {
        std::string_view src = r.Prefixed(2, "dtab prefix");
        std::string_view tree = r.Prefixed(2, "dtab tree");
        if (r.ok()) m.dtab.push_back(DtabEntry{std::string(src), std::string(tree)});
      }
      if (r.ok()) m.payload = std::string(r.Rest());
      return Finish(r, std::move(m));
    }
    case wire::kRdispatch: {
      auto status = ParseStatus(r, name);
      if (!status) return status.error();
      Rdispatch m;
      m.tag = tag;
      m.status = *status;
      m.contexts = ParseContexts(r);
      if (r.ok()) m.body = std::string(r.Rest());
      return Finish(r, std::move(m));
    }
    case wire::kTdrain:
      return Tdrain{tag};
    case wire::kRdrain:
      return Rdrain{tag};
    case wire::kTping:
      return Tping{tag};
    case wire::kRping:
      return Rping{tag};
    case wire::kTdiscarded:
    case wire::kTdiscardedLegacy: {
      Tdiscarded m;
      m.tag = tag;
      m.which = static_cast<std::uint32_t>(r.Int(3, "discarded tag")) & kMaxTag;
      m.why = std::string(r.Rest());
      return Finish(r, std::move(m));
    }
    case wire::kRdiscarded:
      return Rdiscarded{tag};
    case wire::kTlease: {
      Tlease m;
      m.tag = tag;
      m.unit = static_cast<std::uint8_t>(r.Int(1, "unit"));
      m.amount = r.Int(8, "amount");
      return Finish(r, std::move(m));
    }
    case wire::kTinit:
    case wire::kRinit: {
      std::uint16_t version = static_cast<std::uint16_t>(r.Int(2, "version"));
      InitHeaders headers = ParseInitHeaders(r);
      if (!r.ok()) return r.TakeError();
      if (type == wire::kTinit) return Tinit{tag, version, std::move(headers)};
      return Rinit{tag, version, std::move(headers)};
    }
    case wire::kRerr:
    case wire::kRerrLegacy:
      return Rerr{tag, std::string(body)};
  }
  return ProtocolError("unreachable");
}

Result<Message> DecodeMessage(const FrameView& frame) {
  if (frame.fragment) {
    return ProtocolError(fmt::format("{} tag {}: cannot decode a non-final fragment",
                                     TypeName(frame.type), frame.tag));
  }
  return DecodeMessage(frame.type, frame.tag, frame.body);
}

Result<Message> DecodeMessage(const Frame& frame) {
  return DecodeMessage(FrameView{frame.type, frame.tag, frame.fragment, frame.body});
}

Result<Message> DecodeFrameBytes(std::string_view bytes, std::uint32_t max_frame_size) {
  auto h = DecodeFrameHeader(bytes, max_frame_size);
  if (!h) return h.error();
  if (bytes.size() != 4 + std::size_t{h->size}) {
    return ProtocolError(fmt::format("frame of size {} needs {} bytes, got {}", h->size,
                                     4 + std::size_t{h->size}, bytes.size()));
  }
  if (h->fragment) {
    return ProtocolError(
        fmt::format("{} tag {}: cannot decode a non-final fragment", TypeName(h->type), h->tag));
  }
  return DecodeMessage(h->type, h->tag, bytes.substr(kHeaderSize));
}

// ---------------------------------------------------------------------------------------------
// FrameDecoder.

void FrameDecoder::Feed(std::string_view bytes) {
  if (error_) return;
  if (read_ > 0 && read_ == buffer_.size()) {
    buffer_.clear();
    read_ = 0;
  } else if (read_ > 4096 && read_ * 2 > buffer_.size()) {
    buffer_.erase(0, read_);
    read_ = 0;
  }
  buffer_.append(bytes);
}

Result<std::optional<FrameView>> FrameDecoder::NextView() {
  if (error_) return *error_;
  std::string_view avail(buffer_.data() + read_, buffer_.size() - read_);
  if (avail.size() < kHeaderSize) return std::optional<FrameView>();
  auto h = DecodeFrameHeader(avail, max_frame_size_, limit_name_);
  if (!h) {
    error_ = h.error();
    error_->detail += fmt::format(" (frame at stream offset {})", consumed_);
    return *error_;
  }
  std::size_t total = 4 + std::size_t{h->size};
  if (avail.size() < total) {
    // Reserve once so that a large frame arriving in pieces is not copied repeatedly.
    if (buffer_.capacity() < read_ + total) buffer_.reserve(read_ + total);
    return std::optional<FrameView>();
  }
  // The consumed bytes stay where they are until the next Feed(), which drops them.
  read_ += total;
  consumed_ += total;
  return std::optional<FrameView>(
      FrameView{h->type, h->tag, h->fragment, avail.substr(kHeaderSize, h->body_size())});
}

Result<std::optional<Frame>> FrameDecoder::Next() {
  auto view = NextView();
  if (!view) return view.error();
  if (!view->has_value()) return std::optional<Frame>();
  return std::optional<Frame>(Frame(**view));
}

// ---------------------------------------------------------------------------------------------
// Reassembler.

Result<std::optional<FrameView>> Reassembler::Add(FrameView frame) {
  switch (frame.type) {
    case wire::kTdiscarded:
    case wire::kTdiscardedLegacy:
      if (frame.body.size() >= 3) {
        // It names a dispatch its sender sent (tags count separately in each direction), so
        // only a partial Tdispatch/Treq of that tag goes: a client reassembling the reply to its
        // own request on the same tag number keeps it.
        Reader r("Tdiscarded", frame.body);
        const auto which = static_cast<std::uint32_t>(r.Int(3, "discarded tag")) & kMaxTag;
        auto it = partial_.find(which);
        if (it != partial_.end() && (it->second.type == wire::kTdispatch || it->second.type == wire::kTreq)) {
          Erase(it);
        }
      }
      break;
    case wire::kRdiscarded:
    case wire::kRerr:
    case wire::kRerrLegacy:
      Drop(frame.tag);
      break;
    default:
      break;
  }
  if (!IsFragmentable(frame.type)) {
    if (frame.fragment) {
      return ProtocolError(
          fmt::format("{} tag {} has the fragment bit set, but only Tdispatch "
                      "and Rdispatch may be fragmented",
                      TypeName(frame.type), frame.tag));
    }
    return std::optional<FrameView>(frame);
  }
  if (!frame.fragment && partial_.empty()) return std::optional<FrameView>(frame);  // the common case
  auto it = partial_.find(frame.tag);
  if (it == partial_.end()) {
    if (!frame.fragment) return std::optional<FrameView>(frame);
    if (frame.body.size() > max_bytes_per_tag_) {
      return ProtocolError(OverLimitDetail(frame, frame.body.size()));
    }
    if (frame.body.size() > max_total_bytes_ - total_bytes_) return ProtocolError(OverTotalDetail(frame));
    partial_.emplace(frame.tag, Partial{frame.type, std::string(frame.body)});
    total_bytes_ += frame.body.size();
    return std::optional<FrameView>();
  }
  Partial& p = it->second;
  if (p.type != frame.type) {
    std::string detail = fmt::format("tag {}: a {} fragment continues a {} message", frame.tag,
                                     TypeName(frame.type), TypeName(p.type));
    Erase(it);
    return ProtocolError(std::move(detail));
  }
  if (p.body.size() + frame.body.size() > max_bytes_per_tag_) {
    std::string detail = OverLimitDetail(frame, p.body.size() + frame.body.size());
    Erase(it);
    return ProtocolError(std::move(detail));
  }
  // Only a final fragment's bytes are not kept buffered: its message leaves at once.
  if (frame.fragment && frame.body.size() > max_total_bytes_ - total_bytes_) {
    std::string detail = OverTotalDetail(frame);
    Erase(it);
    return ProtocolError(std::move(detail));
  }
  p.body.append(frame.body);
  total_bytes_ += frame.body.size();
  if (frame.fragment) return std::optional<FrameView>();
  const std::uint8_t type = p.type;
  total_bytes_ -= p.body.size();
  completed_ = std::move(p.body);
  partial_.erase(it);
  return std::optional<FrameView>(FrameView{type, frame.tag, false, completed_});
}

Result<std::optional<Frame>> Reassembler::Add(Frame frame) {
  auto whole = Add(FrameView{frame.type, frame.tag, frame.fragment, frame.body});
  if (!whole) return whole.error();
  if (!whole->has_value()) return std::optional<Frame>();
  if ((*whole)->body.data() == frame.body.data()) {  // `frame` itself: move, do not copy
    frame.fragment = false;
    return std::optional<Frame>(std::move(frame));
  }
  return std::optional<Frame>(Frame{(*whole)->type, frame.tag, false, std::move(completed_)});
}

std::string Reassembler::OverLimitDetail(const FrameView& frame, std::size_t buffered) const {
  return fmt::format("{} tag {}: {} buffered fragment bytes exceed {}", TypeName(frame.type), frame.tag, buffered,
                     OverLimit("the largest message accepted", limit_name_, max_bytes_per_tag_));
}

std::string Reassembler::OverTotalDetail(const FrameView& frame) const {
  return fmt::format("{} tag {}: {} more fragment bytes with {} buffered for {} tags exceed {}", TypeName(frame.type),
                     frame.tag, frame.body.size(), total_bytes_, partial_.size(),
                     OverLimit("the most buffered for reassembly", total_limit_name_, max_total_bytes_));
}

void Reassembler::Erase(std::unordered_map<std::uint32_t, Partial>::iterator it) {
  total_bytes_ -= it->second.body.size();
  partial_.erase(it);
}

bool Reassembler::Drop(std::uint32_t tag) {
  auto it = partial_.find(tag);
  if (it == partial_.end()) return false;
  Erase(it);
  return true;
}

std::size_t Reassembler::buffered_bytes(std::uint32_t tag) const {
  auto it = partial_.find(tag);
  return it == partial_.end() ? 0 : it->second.body.size();
}

// ---------------------------------------------------------------------------------------------
// Encoding.

namespace {
// The encoded size of a Tdispatch body (what EncodeBody appends when every field fits).
std::size_t TdispatchBodySize(const Tdispatch& d) {
  std::size_t n = 2 + 2 + d.dst.size() + 2 + d.payload.size();
  for (const auto& c : d.contexts) n += 4 + c.key.size() + c.value.size();
  for (const auto& e : d.dtab) n += 4 + e.prefix.size() + e.tree.size();
  return n;
}

// Writes fields through a pointer into storage already sized for them (no bounds checks: the
// caller sized it from the same fields).
struct BodyCursor {
  char* p;
  void U16(std::size_t v) {
    p[0] = static_cast<char>(v >> 8);
    p[1] = static_cast<char>(v & 0xFF);
    p += 2;
  }
  void Bytes(std::string_view s) {
    if (!s.empty()) std::memcpy(p, s.data(), s.size());
    p += s.size();
  }
  void Prefixed(std::string_view s) {
    U16(s.size());
    Bytes(s);
  }
};

// Writes a Tdispatch body through a pointer into storage sized once, when every field fits
// its 2-byte prefix (else returns false and the Writer reports the field that does not). The
// Writer's field-by-field appends cost several times more, and every request is a Tdispatch.
bool EncodeTdispatchDirect(const Tdispatch& d, std::string* out) {
  auto fits = [](std::size_t n) { return n <= 0xFFFF; };
  if (!fits(d.contexts.size()) || !fits(d.dst.size()) || !fits(d.dtab.size())) return false;
  for (const auto& c : d.contexts) {
    if (!fits(c.key.size()) || !fits(c.value.size())) return false;
  }
  for (const auto& e : d.dtab) {
    if (!fits(e.prefix.size()) || !fits(e.tree.size())) return false;
  }
  const std::size_t start = out->size();
  out->resize(start + TdispatchBodySize(d));
  BodyCursor w{out->data() + start};
  w.U16(d.contexts.size());
  for (const auto& c : d.contexts) {
    w.Prefixed(c.key);
    w.Prefixed(c.value);
  }
  w.Prefixed(d.dst);
  w.U16(d.dtab.size());
  for (const auto& e : d.dtab) {
    w.Prefixed(e.prefix);
    w.Prefixed(e.tree);
  }
  w.Bytes(d.payload);
  return true;
}
}  // namespace

Result<void> EncodeBody(const Message& m, std::string* out) {
  const char* name = NameOf(WireTypeOf(m));
  if (const auto* d = std::get_if<Tdispatch>(&m); d != nullptr && EncodeTdispatchDirect(*d, out)) return {};
  Writer w(name, out);
  std::visit(
      [&w](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, Treq>) {
          w.Count(v.keys.size(), 1, "key count");
          for (const auto& k : v.keys) {
            w.Int(k.key, 1);
            w.Prefixed(k.value, 1, "key value length");
          }
          w.Raw(v.payload);
        } else if constexpr (std::is_same_v<T, Rreq>) {
          w.Int(static_cast<std::uint8_t>(v.status), 1);
          w.Raw(v.body);
        } else if constexpr (std::is_same_v<T, Tdispatch>) {
          WriteContexts(v.contexts, w);
          w.Prefixed(v.dst, 2, "dst length");
          w.Count(v.dtab.size(), 2, "dtab count");
          for (const auto& d : v.dtab) {
            w.Prefixed(d.prefix, 2, "dtab prefix length");
            w.Prefixed(d.tree, 2, "dtab tree length");
          }
          w.Raw(v.payload);
        } else if constexpr (std::is_same_v<T, Rdispatch>) {
          w.Int(static_cast<std::uint8_t>(v.status), 1);
          WriteContexts(v.contexts, w);
          w.Raw(v.body);
        } else if constexpr (std::is_same_v<T, Tdiscarded>) {
          w.Count(v.which, 3, "discarded tag");
          w.Raw(v.why);
        } else if constexpr (std::is_same_v<T, Tlease>) {
          w.Int(v.unit, 1);
          w.Int(v.amount, 8);
        } else if constexpr (std::is_same_v<T, Tinit> || std::is_same_v<T, Rinit>) {
          w.Int(v.version, 2);
          for (const auto& [key, value] : v.headers) {
            w.Prefixed(key, 4, "header key length");
            w.Prefixed(value, 4, "header value length");
          }
        } else if constexpr (std::is_same_v<T, Rerr>) {
          w.Raw(v.why);
        }
        // Tdrain, Rdrain, Tping, Rping, Rdiscarded: empty bodies.
      },
      m);
  return w.Finish();
}

namespace {
Result<void> CheckTag(const Message& m) {
  std::uint32_t tag = TagOf(m);
  if (tag > kMaxTag) {
    return InvalidArgument(
        fmt::format("{}: tag {} exceeds the maximum 0x7FFFFF", TypeName(WireTypeOf(m)), tag));
  }
  if (const auto* d = std::get_if<Tdiscarded>(&m); d != nullptr && d->which > kMaxTag) {
    return InvalidArgument(
        fmt::format("Tdiscarded: discarded tag {} exceeds the maximum 0x7FFFFF", d->which));
  }
  return {};
}
}  // namespace

Result<void> EncodeMessage(const Message& m, std::string* out) {
  return EncodeFragmented(m, kUnlimitedFragmentSize, out);
}

std::string Encode(const Message& m) {
  std::string out;
  EncodeMessage(m, &out).value();
  return out;
}

namespace {
Result<void> CheckBodySize(const Message& m, std::size_t body_size) {
  if (body_size + 4 > kMaxWireFrameSize) {
    return InvalidArgument(fmt::format("{}: body of {} bytes exceeds the largest frame",
                                       TypeName(WireTypeOf(m)), body_size));
  }
  return {};
}
}  // namespace

Result<void> EncodeFragmented(const Message& m, std::uint32_t max_fragment_body, std::string* out) {
  if (auto ok = CheckTag(m); !ok) return ok;
  std::uint8_t type = WireTypeOf(m);
  if (!IsFragmentable(type)) max_fragment_body = kUnlimitedFragmentSize;
  if (max_fragment_body == 0 || max_fragment_body >= kUnlimitedFragmentSize) {
    // One frame: encode the body in place after a header written once its size is known.
    const std::size_t start = out->size();
    out->append(kHeaderSize, '\0');
    auto ok = EncodeBody(m, out);
    if (ok) ok = CheckBodySize(m, out->size() - start - kHeaderSize);
    if (!ok) {
      out->resize(start);
      return ok;
    }
    std::string header;
    AppendFrameHeader(type, TagOf(m), false, out->size() - start - kHeaderSize, &header);
    out->replace(start, kHeaderSize, header);
    return {};
  }
  std::string body;
  if (auto ok = EncodeBody(m, &body); !ok) return ok;
  if (auto ok = CheckBodySize(m, body.size()); !ok) return ok;
  AppendFragments(type, TagOf(m), body, max_fragment_body, out);
  return {};
}

void AppendFragments(std::uint8_t type, std::uint32_t tag, std::string_view body,
                     std::uint32_t max_fragment_body, std::string* out) {
  if (max_fragment_body == 0 || max_fragment_body >= kUnlimitedFragmentSize ||
      body.size() <= max_fragment_body) {
    out->reserve(out->size() + kHeaderSize + body.size());
    AppendFrameHeader(type, tag, false, body.size(), out);
    out->append(body);
    return;
  }
  std::size_t pieces = (body.size() + max_fragment_body - 1) / max_fragment_body;
  out->reserve(out->size() + pieces * kHeaderSize + body.size());
  for (std::size_t off = 0; off < body.size(); off += max_fragment_body) {
    std::size_t n = std::min<std::size_t>(max_fragment_body, body.size() - off);
    bool more = off + n < body.size();
    AppendFrameHeader(type, tag, more, n, out);
    out->append(body.substr(off, n));
  }
}

std::string FragmentWriter::TakeSpare() {
  if (spare_.empty()) return {};
  std::string body = std::move(spare_.back());
  spare_.pop_back();
  spare_bytes_ -= body.capacity();
  return body;
}

void FragmentWriter::Recycle(std::string body) {
  const std::size_t capacity = body.capacity();
  if (capacity > kMaxSpareBody || spare_bytes_ + capacity > kSpareBytes) return;
  body.clear();
  spare_bytes_ += capacity;
  spare_.push_back(std::move(body));
}

Result<void> FragmentWriter::Enqueue(const Message& m) {
  if (auto ok = CheckTag(m); !ok) return ok;
  Pending p{WireTypeOf(m), TagOf(m), TakeSpare(), 0};
  if (auto ok = EncodeBody(m, &p.body); !ok) {
    Recycle(std::move(p.body));
    return ok;
  }
  queue_bytes_ += p.body.size();
  queue_.push_back(std::move(p));
  return {};
}

Result<void> FragmentWriter::EnqueueTdispatch(std::uint32_t tag, std::span<const ContextView> contexts,
                                              std::string_view payload) {
  constexpr std::size_t kMaxU16 = 0xFFFF;
  bool fits = tag <= kMaxTag && contexts.size() <= kMaxU16;
  std::size_t size = 2 + 2 + 2 + payload.size();  // context count, empty dst, dtab count
  for (const auto& c : contexts) {
    fits = fits && c.key.size() <= kMaxU16 && c.value.size() <= kMaxU16;
    size += 4 + c.key.size() + c.value.size();
  }
  if (!fits) {
    // Not representable: the Message encoder names the field.
    Tdispatch d;
    d.tag = tag;
    for (const auto& c : contexts) d.contexts.push_back(Context{std::string(c.key), std::string(c.value)});
    d.payload.assign(payload);
    return Enqueue(Message(std::move(d)));
  }
  const std::uint32_t max = max_fragment_body_;
  const bool unlimited = max == 0 || max >= kUnlimitedFragmentSize;
  if (unlimited && size + 4 > kMaxWireFrameSize) {
    // One frame's size field cannot hold it (the peer takes no fragments): refused before any
    // byte is queued, rather than a size that wraps and desynchronises the session.
    return CodecError{make_error_code(Errc::kRequestTooLarge),
                      fmt::format("Tdispatch: body of {} bytes exceeds the largest frame ({} bytes), and the peer "
                                  "does not take fragments (no mux-framer)",
                                  size, kMaxWireFrameSize - 4)};
  }
  if (queue_.empty() && (unlimited || size <= max)) {
    // One frame, and nothing queued that it must interleave with: encode the whole frame into
    // whole_, which the next write takes as it is.
    const std::size_t at = whole_.size();
    whole_.resize(at + kHeaderSize + size);
    char* frame = whole_.data() + at;
    StoreBe(static_cast<std::uint32_t>(size + 4), 4, frame);
    frame[4] = static_cast<char>(wire::kTdispatch);
    StoreBe(tag & kMaxTag, 3, frame + 5);
    WriteTdispatchBody(frame + kHeaderSize, contexts, payload);
    whole_index_.push_back(WholeFrame{tag, at, kHeaderSize + size});
    return {};
  }
  Pending p{wire::kTdispatch, tag, TakeSpare(), 0};
  p.body.resize(size);
  WriteTdispatchBody(p.body.data(), contexts, payload);
  queue_bytes_ += size;
  queue_.push_back(std::move(p));
  return {};
}

void FragmentWriter::WriteTdispatchBody(char* at, std::span<const ContextView> contexts, std::string_view payload) {
  BodyCursor w{at};
  w.U16(contexts.size());
  for (const auto& c : contexts) {
    w.Prefixed(c.key);
    w.Prefixed(c.value);
  }
  w.U16(0);  // dst
  w.U16(0);  // dtab
  w.Bytes(payload);
}

std::size_t FragmentWriter::TakeWhole(std::string* out) {
  const std::size_t frames = whole_index_.size() - whole_removed_;
  if (whole_removed_ > 0) {
    // Only the frames still queued; the removed ones' bytes stay behind.
    for (const WholeFrame& f : whole_index_) {
      if (!f.removed) out->append(whole_, f.offset, f.size);
    }
  } else if (frames > 0 && out->empty()) {
    out->swap(whole_);  // no copy: `out`'s storage is kept for the next frames
  } else if (frames > 0) {
    out->append(whole_);
  }
  whole_.clear();
  whole_index_.clear();
  whole_removed_ = 0;
  whole_live_from_ = 0;
  whole_removed_bytes_ = 0;
  return frames;
}

void FragmentWriter::CompactWhole() {
  std::size_t to = 0;
  std::size_t kept = 0;
  for (WholeFrame& f : whole_index_) {
    if (f.removed) continue;
    if (f.offset != to) std::memmove(whole_.data() + to, whole_.data() + f.offset, f.size);
    f.offset = to;
    to += f.size;
    whole_index_[kept++] = f;
  }
  whole_.resize(to);
  whole_index_.resize(kept);
  whole_removed_ = 0;
  whole_live_from_ = 0;
  whole_removed_bytes_ = 0;
}

void FragmentWriter::CompactQueue() {
  std::erase_if(queue_, [](const Pending& p) { return p.removed; });
  queue_removed_ = 0;
  queue_live_from_ = 0;
}

std::size_t FragmentWriter::WriteRound(std::string* out) {
  // The whole frames come first (each was queued before anything in queue_). Messages that
  // still have frames to send stay, in order, at the front of the queue; the others (and the
  // removed ones) give their bodies to the spares.
  const std::size_t whole = TakeWhole(out);
  std::size_t kept = 0;
  std::size_t frames = 0;
  for (Pending& p : queue_) {
    if (p.removed) continue;  // its body is a spare already
    std::uint32_t max = max_fragment_body_;
    bool unlimited = max == 0 || max >= kUnlimitedFragmentSize || !IsFragmentable(p.type);
    std::size_t left = p.body.size() - p.offset;
    std::size_t take = unlimited ? left : std::min<std::size_t>(max, left);
    bool more = take < left;
    AppendFrameHeader(p.type, p.tag, more, take, out);
    out->append(p.body, p.offset, take);
    p.offset += take;
    queue_bytes_ -= take;
    ++frames;
    if (!more) {
      Recycle(std::move(p.body));
    } else {
      if (&queue_[kept] != &p) queue_[kept] = std::move(p);
      ++kept;
    }
  }
  queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(kept), queue_.end());
  queue_removed_ = 0;
  queue_live_from_ = 0;
  return whole + frames;
}

void FragmentWriter::WriteAll(std::string* out) {
  TakeWhole(out);
  while (!queue_.empty()) WriteRound(out);
}

std::optional<bool> FragmentWriter::Remove(std::uint8_t type, std::uint32_t tag) {
  // Marks entry `i` of `v` removed and moves `live_from` past the removed entries at its front.
  auto mark = [](auto& v, std::size_t i, std::size_t& removed, std::size_t& live_from) {
    v[i].removed = true;
    ++removed;
    while (live_from < v.size() && v[live_from].removed) ++live_from;
  };
  if (type == wire::kTdispatch) {
    for (std::size_t i = whole_live_from_; i < whole_index_.size(); ++i) {
      if (whole_index_[i].removed || whole_index_[i].tag != tag) continue;
      mark(whole_index_, i, whole_removed_, whole_live_from_);
      whole_removed_bytes_ += whole_index_[i].size;
      if (2 * whole_removed_bytes_ > whole_.size()) CompactWhole();  // removed bytes > live bytes
      return false;  // whole frames are written all at once, and this one was not yet
    }
  }
  for (std::size_t i = queue_live_from_; i < queue_.size(); ++i) {
    Pending& p = queue_[i];
    if (p.removed || p.type != type || p.tag != tag) continue;
    const bool started = p.offset > 0;
    queue_bytes_ -= p.body.size() - p.offset;
    Recycle(std::move(p.body));
    p.body = std::string();
    mark(queue_, i, queue_removed_, queue_live_from_);
    if (2 * queue_removed_ > queue_.size()) CompactQueue();  // removed entries > live ones
    return started;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Contexts.

const std::string* FindContext(const Contexts& contexts, std::string_view key) {
  for (const auto& c : contexts) {
    if (c.key == key) return &c.value;
  }
  return nullptr;
}

void AppendDeadline(const Deadline& d, std::string* out) {
  char bytes[16];  // one append: these run once per request
  StoreBe(static_cast<std::uint64_t>(d.timestamp_ns), 8, bytes);
  StoreBe(static_cast<std::uint64_t>(d.deadline_ns), 8, bytes + 8);
  out->append(bytes, sizeof bytes);
}

std::string EncodeDeadline(const Deadline& d) {
  std::string out;
  out.reserve(16);
  AppendDeadline(d, &out);
  return out;
}

Result<Deadline> DecodeDeadline(std::string_view value) {
  if (value.size() != 16) {
    return ProtocolError(fmt::format("Deadline context: expected 16 bytes, got {}", value.size()));
  }
  Reader r("Deadline context", value);
  Deadline d;
  d.timestamp_ns = static_cast<std::int64_t>(r.Int(8, "timestamp"));
  d.deadline_ns = static_cast<std::int64_t>(r.Int(8, "deadline"));
  return d;
}

void AppendTraceContext(const TraceContext& t, std::string* out) {
  char bytes[40];  // one append: this runs once per request
  StoreBe(t.span_id, 8, bytes);
  StoreBe(t.parent_id, 8, bytes + 8);
  StoreBe(t.trace_id, 8, bytes + 16);
  StoreBe(t.flags, 8, bytes + 24);
  if (t.trace_id_high) StoreBe(*t.trace_id_high, 8, bytes + 32);
  out->append(bytes, t.trace_id_high ? 40 : 32);
}

std::string EncodeTraceContext(const TraceContext& t) {
  std::string out;
  out.reserve(40);
  AppendTraceContext(t, &out);
  return out;
}

Result<TraceContext> DecodeTraceContext(std::string_view value) {
  if (value.size() != 32 && value.size() != 40) {
    return ProtocolError(
        fmt::format("TraceContext context: expected 32 or 40 bytes, got {}", value.size()));
  }
  Reader r("TraceContext context", value);
  TraceContext t;
  t.span_id = r.Int(8, "span id");
  t.parent_id = r.Int(8, "parent id");
  t.trace_id = r.Int(8, "trace id");
  t.flags = r.Int(8, "flags");
  if (value.size() == 40) t.trace_id_high = r.Int(8, "trace id high");
  return t;
}

void AppendRetries(std::int32_t retries, std::string* out) {
  PutInt(static_cast<std::uint32_t>(retries), 4, out);
}

std::string EncodeRetries(std::int32_t retries) {
  std::string out;
  AppendRetries(retries, &out);
  return out;
}

Result<std::int32_t> DecodeRetries(std::string_view value) {
  if (value.size() != 4) {
    return ProtocolError(fmt::format("Retries context: expected 4 bytes, got {}", value.size()));
  }
  Reader r("Retries context", value);
  return static_cast<std::int32_t>(static_cast<std::uint32_t>(r.Int(4, "retries")));
}

std::string EncodeClientId(std::string_view id) { return std::string(id); }

Result<std::optional<std::string>> DecodeClientId(std::string_view value) {
  if (value.empty()) return std::optional<std::string>();
  if (!IsValidUtf8(value)) return ProtocolError("ClientId context: value is not valid UTF-8");
  return std::optional<std::string>(std::string(value));
}

bool IsBackupRequest(const Contexts& contexts) {
  return FindContext(contexts, kBackupRequestKey) != nullptr;
}

std::string EncodeHeaders(const Headers& headers, std::size_t* dropped) {
  std::string out;
  std::size_t kept = 0;
  for (const auto& [key, value] : headers) {
    if (key.size() > 0xFFFF || value.size() > 0xFFFF) continue;
    std::size_t n = 4 + key.size() + value.size();
    if (out.size() + n > kMaxHeadersBytes) break;  // drop the tail
    PutInt(key.size(), 2, &out);
    out.append(key);
    PutInt(value.size(), 2, &out);
    out.append(value);
    ++kept;
  }
  if (dropped != nullptr) *dropped = headers.size() - kept;
  return out;
}

Result<Headers> DecodeHeaders(std::string_view value) {
  Reader r("headers context", value);
  Headers headers;
  while (r.ok() && r.remaining() > 0) {
    std::string_view key = r.Prefixed(2, "header key");
    std::string_view v = r.Prefixed(2, "header value");
    if (r.ok()) headers.emplace_back(std::string(key), std::string(v));
  }
  if (!r.ok()) return r.TakeError();
  return headers;
}

std::string EncodeMuxFailure(std::uint64_t flags) {
  std::string out;
  PutInt(flags, 8, &out);
  return out;
}

Result<std::uint64_t> DecodeMuxFailure(std::string_view value) {
  if (value.size() < 8) {
    return ProtocolError(fmt::format("MuxFailure context: expected 8 bytes, got {}", value.size()));
  }
  Reader r("MuxFailure context", value);
  return r.Int(8, "flags");
}

std::string EncodeMuxFramer(std::int32_t max_fragment_body) {
  std::string out;
  PutInt(static_cast<std::uint32_t>(max_fragment_body), 4, &out);
  return out;
}

Result<std::int32_t> DecodeMuxFramer(std::string_view value) {
  if (value.size() != 4) {
    return ProtocolError(fmt::format("mux-framer header: expected 4 bytes, got {}", value.size()));
  }
  Reader r("mux-framer header", value);
  auto v = static_cast<std::int32_t>(static_cast<std::uint32_t>(r.Int(4, "value")));
  if (v <= 0) return ProtocolError(fmt::format("mux-framer header: {} is not positive", v));
  return v;
}

const std::string* FindInitHeader(const InitHeaders& headers, std::string_view key) {
  for (const auto& [k, v] : headers) {
    if (k == key) return &v;
  }
  return nullptr;
}

bool IsValidUtf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<std::uint8_t>(s[i]);
    std::size_t n;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      auto cc = static_cast<std::uint8_t>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr std::uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

}  // namespace scales::mux
