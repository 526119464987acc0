#pragma once
// The Mux wire codec (see docs: ../shared/mux-protocol.md §1): message types, frame headers, a
// streaming frame decoder, fragment reassembly, fragmenting encoders and the Finagle broadcast
// context encodings used by ThriftMux.
//
// No I/O happens here. Byte strings (context keys and values, payloads, bodies) are held in
// std::string; inputs are std::string_view. The read path can work on views instead
// (FrameDecoder::NextView, Reassembler::Add(FrameView)) and the request path can encode
// contexts into reused strings (Append*), so that a call costs the codec no allocation. Decoding never throws: every decode function returns
// a mux::Result whose error is a CodecError (code Errc::kProtocolError plus a detail naming what
// is wrong and at which offset). Encoding functions that can meet an unrepresentable value
// (a field longer than its length prefix, a tag past 0x7FFFFF) return Result<void> with
// Errc::kInvalidArgument.
//
// Thread safety: the free functions are pure; FrameDecoder, Reassembler and FragmentWriter are
// plain values, to be used from one thread at a time.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <boost/assert/source_location.hpp>
#include <boost/system/result.hpp>

#include "scales/core/error.h"

namespace scales::mux {

// ---------------------------------------------------------------------------------------------
// Errors.

struct CodecError {
  error_code code;     // Errc::kProtocolError (decode) or Errc::kInvalidArgument (encode)
  std::string detail;  // e.g. "Tdispatch: truncated context value at offset 12 (need 5, have 2)"
};

// Throws scales::Error (used by Result<T>::value() when the result holds an error).
[[noreturn]] void throw_exception_from_error(const CodecError& e,
                                             const boost::source_location& loc);

template <class T>
using Result = boost::system::result<T, CodecError>;

// ---------------------------------------------------------------------------------------------
// Wire constants.

// Type bytes as they appear on the wire (§1.2).
namespace wire {
inline constexpr std::uint8_t kTreq = 0x01;
inline constexpr std::uint8_t kRreq = 0xFF;
inline constexpr std::uint8_t kTdispatch = 0x02;
inline constexpr std::uint8_t kRdispatch = 0xFE;
inline constexpr std::uint8_t kTdrain = 0x40;
inline constexpr std::uint8_t kRdrain = 0xC0;
inline constexpr std::uint8_t kTping = 0x41;
inline constexpr std::uint8_t kRping = 0xBF;
inline constexpr std::uint8_t kTdiscarded = 0x42;
inline constexpr std::uint8_t kTdiscardedLegacy = 0xC2;  // what we (and Finagle) send
inline constexpr std::uint8_t kRdiscarded = 0xBE;
inline constexpr std::uint8_t kTlease = 0x43;
inline constexpr std::uint8_t kTinit = 0x44;
inline constexpr std::uint8_t kRinit = 0xBC;
inline constexpr std::uint8_t kRerr = 0x80;
inline constexpr std::uint8_t kRerrLegacy = 0x7F;  // what we (and Finagle) send
}  // namespace wire

inline constexpr std::uint32_t kFragmentBit = 0x800000;
inline constexpr std::uint32_t kMaxTag = 0x7FFFFF;
inline constexpr std::uint32_t kMarkerTag = 0;   // Tdiscarded, Tlease
inline constexpr std::uint32_t kControlTag = 1;  // pings, handshake, drain
inline constexpr std::uint32_t kMinDispatchTag = 2;
inline constexpr std::size_t kHeaderSize = 8;  // size:4 type:1 tag:3
// Largest `size` field Finagle accepts.
inline constexpr std::uint32_t kMaxWireFrameSize = 0x7FFFFFFF;
// Default limit of FrameDecoder (size field, i.e. type + tag + body).
inline constexpr std::uint32_t kDefaultMaxFrameSize = 32u << 20;
// Default limit of Reassembler (buffered fragment body bytes per tag).
inline constexpr std::size_t kDefaultMaxReassembledBytes = 32u << 20;
// `mux-framer` value meaning "do not fragment" (Finagle's default).
inline constexpr std::uint32_t kUnlimitedFragmentSize = 0x7FFFFFFF;

// The handshake probe text: Rerr (legacy code) on tag 1 with this body.
inline constexpr std::string_view kProbeText = "tinit check";
inline constexpr std::uint16_t kMuxVersion = 1;

// ---------------------------------------------------------------------------------------------
// Messages (§1.5). Each carries its own tag (the 23-bit tag number, without the fragment bit).

struct Context {
  std::string key;
  std::string value;
  friend bool operator==(const Context&, const Context&) = default;
};
using Contexts = std::vector<Context>;

struct DtabEntry {
  std::string prefix;  // e.g. "/s/users"
  std::string tree;    // e.g. "/$/inet/127.0.0.1/8080"
  friend bool operator==(const DtabEntry&, const DtabEntry&) = default;
};

// Rreq / Rdispatch status byte. Anything else is a decode error.
enum class ReplyStatus : std::uint8_t { kOk = 0, kError = 1, kNack = 2 };

// Treq keys (§1.5).
inline constexpr std::uint8_t kTreqTraceIdKey = 1;    // 24 bytes: span, parent, trace ids
inline constexpr std::uint8_t kTreqTraceFlagKey = 2;  // 1 byte, bit 0 = debug

struct TreqKey {
  std::uint8_t key = 0;
  std::string value;  // at most 255 bytes
  friend bool operator==(const TreqKey&, const TreqKey&) = default;
};

struct Treq {
  std::uint32_t tag = 0;
  std::vector<TreqKey> keys;
  std::string payload;
  friend bool operator==(const Treq&, const Treq&) = default;
};
struct Rreq {
  std::uint32_t tag = 0;
  ReplyStatus status = ReplyStatus::kOk;
  std::string body;  // reply (Ok), UTF-8 message (Error), empty (Nack)
  friend bool operator==(const Rreq&, const Rreq&) = default;
};
struct Tdispatch {
  std::uint32_t tag = 0;
  Contexts contexts;
  std::string dst;  // Finagle path; empty = none
  std::vector<DtabEntry> dtab;
  std::string payload;
  friend bool operator==(const Tdispatch&, const Tdispatch&) = default;
};
struct Rdispatch {
  std::uint32_t tag = 0;
  ReplyStatus status = ReplyStatus::kOk;
  Contexts contexts;
  std::string body;  // reply (Ok), UTF-8 message (Error), empty (Nack)
  friend bool operator==(const Rdispatch&, const Rdispatch&) = default;
};
struct Tdrain {
  std::uint32_t tag = kControlTag;
  friend bool operator==(const Tdrain&, const Tdrain&) = default;
};
struct Rdrain {
  std::uint32_t tag = kControlTag;
  friend bool operator==(const Rdrain&, const Rdrain&) = default;
};
struct Tping {
  std::uint32_t tag = kControlTag;
  friend bool operator==(const Tping&, const Tping&) = default;
};
struct Rping {
  std::uint32_t tag = kControlTag;
  friend bool operator==(const Rping&, const Rping&) = default;
};
// Marker: the frame tag is normally 0 (decoding accepts any tag and keeps it).
struct Tdiscarded {
  std::uint32_t tag = kMarkerTag;
  std::uint32_t which = 0;  // tag of the abandoned request
  std::string why;          // UTF-8 reason
  friend bool operator==(const Tdiscarded&, const Tdiscarded&) = default;
};
struct Rdiscarded {
  std::uint32_t tag = 0;  // the discarded request's tag
  friend bool operator==(const Rdiscarded&, const Rdiscarded&) = default;
};
enum class LeaseUnit : std::uint8_t { kDurationMillis = 0, kEpochMillis = 1 };
// Marker (tag 0). `unit` is kept raw so that a session can decide what to do with unknown units.
struct Tlease {
  std::uint32_t tag = kMarkerTag;
  std::uint8_t unit = static_cast<std::uint8_t>(LeaseUnit::kDurationMillis);
  std::uint64_t amount = 0;
  friend bool operator==(const Tlease&, const Tlease&) = default;
};
// Handshake headers: key~4 val~4, in order.
using InitHeaders = std::vector<std::pair<std::string, std::string>>;
struct Tinit {
  std::uint32_t tag = kControlTag;
  std::uint16_t version = kMuxVersion;
  InitHeaders headers;
  friend bool operator==(const Tinit&, const Tinit&) = default;
};
struct Rinit {
  std::uint32_t tag = kControlTag;
  std::uint16_t version = kMuxVersion;
  InitHeaders headers;
  friend bool operator==(const Rinit&, const Rinit&) = default;
};
// Decoded from both 0x7F and 0x80; encoded as 0x7F.
struct Rerr {
  std::uint32_t tag = 0;
  std::string why;
  friend bool operator==(const Rerr&, const Rerr&) = default;
};

using Message = std::variant<Treq, Rreq, Tdispatch, Rdispatch, Tdrain, Rdrain, Tping, Rping,
                             Tdiscarded, Rdiscarded, Tlease, Tinit, Rinit, Rerr>;

// The handshake probe (Rerr tag 1 "tinit check").
Rerr ProbeMessage();
bool IsProbe(const Message& m);

// The message's tag.
std::uint32_t TagOf(const Message& m);
// The type byte the encoder writes for `m` (legacy codes for Rerr and Tdiscarded).
std::uint8_t WireTypeOf(const Message& m);
// "Tdispatch", "Rerr", ... for a type byte ("unknown(0x12)" otherwise). Both codes of Rerr and
// Tdiscarded give the same name.
std::string TypeName(std::uint8_t type_byte);
// Whether the type byte is one the decoder knows.
bool IsKnownType(std::uint8_t type_byte);
// Only Tdispatch and Rdispatch may be fragmented.
bool IsFragmentable(std::uint8_t type_byte);
// A short human-readable description ("Tdispatch tag=2 contexts=1 payload=25"), for logs.
std::string Describe(const Message& m);

// ---------------------------------------------------------------------------------------------
// Frames.

// One frame as read from the wire: header fields and the body bytes.
struct Frame {
  std::uint8_t type = 0;
  std::uint32_t tag = 0;  // without the fragment bit
  bool fragment = false;  // the fragment bit: more pieces follow
  std::string body;
  friend bool operator==(const Frame&, const Frame&) = default;
};

// A frame whose body is a view into bytes someone else holds (FrameDecoder::NextView: its
// buffer; Reassembler::Add(FrameView): the input or its own reassembled body). Lets the read
// path decode a reply without copying the frame body first.
struct FrameView {
  std::uint8_t type = 0;
  std::uint32_t tag = 0;
  bool fragment = false;
  std::string_view body;
  explicit operator Frame() const { return Frame{type, tag, fragment, std::string(body)}; }
};

struct FrameHeader {
  std::uint32_t size = 0;  // type + tag + body
  std::uint8_t type = 0;
  std::uint32_t tag = 0;
  bool fragment = false;
  std::size_t body_size() const { return size - 4; }
};

// Parses the 8 header bytes. Error when fewer than 8 bytes, size < 4 or size > max_frame_size.
// `limit_name` names the setting max_frame_size comes from (e.g. "session.max_frame_size"): the
// error then says "(limit <limit_name> = N)"; empty (the codec used alone): "the limit of N
// bytes". Limit names here and below are views of strings that outlive the decoder (literals).
Result<FrameHeader> DecodeFrameHeader(std::string_view bytes,
                                      std::uint32_t max_frame_size = kMaxWireFrameSize,
                                      std::string_view limit_name = {});
// Appends a header for a body of `body_size` bytes.
void AppendFrameHeader(std::uint8_t type, std::uint32_t tag, bool fragment, std::size_t body_size,
                       std::string* out);

// ---------------------------------------------------------------------------------------------
// Decoding.

// Decodes a complete (reassembled) message body. Errors: unknown type, truncated body, bad
// Rdispatch/Rreq status, Tinit/Rinit header lengths past the end.
Result<Message> DecodeMessage(std::uint8_t type, std::uint32_t tag, std::string_view body);
// Decodes an unfragmented frame (error if frame.fragment is set).
Result<Message> DecodeMessage(const Frame& frame);
Result<Message> DecodeMessage(const FrameView& frame);
// Decodes `bytes`, which must hold exactly one complete unfragmented frame (header included).
Result<Message> DecodeFrameBytes(std::string_view bytes,
                                 std::uint32_t max_frame_size = kMaxWireFrameSize);

// Streaming frame decoder: feed bytes as they arrive (split anywhere), take complete frames.
// After an error the decoder stays failed (every Next() returns the same error).
class FrameDecoder {
 public:
  // `limit_name`: the setting max_frame_size comes from, for the error (DecodeFrameHeader).
  explicit FrameDecoder(std::uint32_t max_frame_size = kDefaultMaxFrameSize,
                        std::string_view limit_name = {})
      : max_frame_size_(max_frame_size), limit_name_(limit_name) {}

  void Feed(std::string_view bytes);
  void Feed(const void* data, std::size_t size) {
    Feed(std::string_view(static_cast<const char*>(data), size));
  }
  // The next complete frame, std::nullopt when more bytes are needed, or an error (size < 4,
  // size > max frame size) naming the offending size, the limit and the stream offset.
  Result<std::optional<Frame>> Next();
  // As Next(), without copying the body: the view points into the decoder's buffer and stays
  // valid until the next call of Feed, Next or NextView.
  Result<std::optional<FrameView>> NextView();

  // Drops the bytes fed but not yet returned as frames and gives their memory back (a session
  // that closed). A failed decoder stays failed.
  void Clear() {
    std::string().swap(buffer_);
    read_ = 0;
  }
  // Bytes fed but not yet returned as frames.
  std::size_t buffered() const { return buffer_.size() - read_; }
  std::uint32_t max_frame_size() const { return max_frame_size_; }
  void set_max_frame_size(std::uint32_t v) { max_frame_size_ = v; }
  // As set_max_frame_size, naming the limit's setting in errors (static storage).
  void set_max_frame_size(std::uint32_t v, std::string_view limit_name) {
    max_frame_size_ = v;
    limit_name_ = limit_name;
  }
  // Total bytes consumed as complete frames since construction.
  std::uint64_t stream_offset() const { return consumed_; }

 private:
  std::uint32_t max_frame_size_;
  std::string_view limit_name_;
  std::string buffer_;
  std::size_t read_ = 0;
  std::uint64_t consumed_ = 0;
  std::optional<CodecError> error_;
};

// Reassembles fragmented Tdispatch/Rdispatch bodies per tag (interleaved tags allowed).
// Add() passes unfragmented frames of other tags through unchanged. Tdiscarded (for `which`),
// Rdiscarded and Rerr (for their tag) drop any partial fragments of that tag and are passed
// through. Errors: fragment bit on a type that cannot be fragmented, a tag's pieces with
// different types, more than `max_bytes_per_tag` buffered body bytes for one tag.
class Reassembler {
 public:
  // `limit_name`: the setting max_bytes_per_tag comes from (e.g. "session.max_message_size"),
  // named in the error as "(limit <limit_name> = N)"; empty: "the limit of N bytes".
  // `max_total_bytes` bounds the fragment bytes buffered for all tags together (unbounded by
  // default), named by `total_limit_name` the same way.
  explicit Reassembler(std::size_t max_bytes_per_tag = kDefaultMaxReassembledBytes,
                       std::string_view limit_name = {},
                       std::size_t max_total_bytes = std::numeric_limits<std::size_t>::max(),
                       std::string_view total_limit_name = {})
      : max_bytes_per_tag_(max_bytes_per_tag),
        limit_name_(limit_name),
        max_total_bytes_(max_total_bytes),
        total_limit_name_(total_limit_name) {}

  // Returns the complete frame (fragment == false) when `frame` completes a message,
  // std::nullopt when it was a non-final fragment.
  Result<std::optional<Frame>> Add(Frame frame);
  // The same for a frame held elsewhere (FrameDecoder::NextView). The complete message is a
  // view of `frame` itself when it was not fragmented (nothing is copied), else of a body
  // reassembled here, valid until the next call of Add, Drop or Clear.
  Result<std::optional<FrameView>> Add(FrameView frame);

  // Drops partial fragments of `tag`; returns whether there were any.
  bool Drop(std::uint32_t tag);
  // Drops every partial message and gives back the memory of the last reassembled one.
  void Clear() {
    partial_.clear();
    total_bytes_ = 0;
    std::string().swap(completed_);
  }
  std::size_t pending_tags() const { return partial_.size(); }
  std::size_t buffered_bytes(std::uint32_t tag) const;
  // Fragment bytes buffered for all tags together.
  std::size_t buffered_bytes() const { return total_bytes_; }
  std::size_t max_bytes_per_tag() const { return max_bytes_per_tag_; }

 private:
  struct Partial {
    std::uint8_t type = 0;
    std::string body;
  };
  std::string OverLimitDetail(const FrameView& frame, std::size_t buffered) const;
  // The error for a fragment that would take the bytes of all tags past max_total_bytes_.
  std::string OverTotalDetail(const FrameView& frame) const;
  void Erase(std::unordered_map<std::uint32_t, Partial>::iterator it);

  std::size_t max_bytes_per_tag_;
  std::string_view limit_name_;
  std::size_t max_total_bytes_;
  std::string_view total_limit_name_;
  std::size_t total_bytes_ = 0;  // the sum of partial_'s bodies
  std::unordered_map<std::uint32_t, Partial> partial_;
  std::string completed_;  // the last message Add(FrameView) reassembled
};

// ---------------------------------------------------------------------------------------------
// Encoding.

// Appends the message body (no header).
Result<void> EncodeBody(const Message& m, std::string* out);
// Appends one complete frame (never fragmented).
Result<void> EncodeMessage(const Message& m, std::string* out);
// Convenience: the encoded frame (throws scales::Error on an unrepresentable message).
std::string Encode(const Message& m);

// Appends `m` as frames whose bodies are at most `max_fragment_body` bytes (the peer's
// `mux-framer`). Only Tdispatch/Rdispatch are split; 0 or kUnlimitedFragmentSize (or larger)
// means no fragmentation. Non-final pieces carry tag | kFragmentBit, the final piece the tag.
Result<void> EncodeFragmented(const Message& m, std::uint32_t max_fragment_body, std::string* out);

// Appends the frames for an already-encoded body (as EncodeFragmented).
void AppendFragments(std::uint8_t type, std::uint32_t tag, std::string_view body,
                     std::uint32_t max_fragment_body, std::string* out);

// A broadcast context as views, for FragmentWriter::EnqueueTdispatch.
struct ContextView {
  std::string_view key;
  std::string_view value;
};

// Write queue that interleaves fragmented messages the way Finagle's writer does: each round
// emits one frame per queued message, in queue order; a message leaves the queue with its final
// frame. With no fragmentation every message is written whole in its turn.
//
// A Tdispatch that goes out as one frame while nothing else is queued is encoded, header and
// body, straight into one buffer of whole frames, which the next write takes without copying
// (WriteAll into an empty string swaps buffers): the request path of a session. Other queued
// bodies are encoded into strings kept from messages already written (up to kSpareBytes of
// capacity), so a steady stream of requests costs the writer no allocation.
class FragmentWriter {
 public:
  explicit FragmentWriter(std::uint32_t max_fragment_body = kUnlimitedFragmentSize)
      : max_fragment_body_(max_fragment_body) {}

  void set_max_fragment_body(std::uint32_t v) { max_fragment_body_ = v; }
  std::uint32_t max_fragment_body() const { return max_fragment_body_; }

  // Encodes `m` and queues it.
  Result<void> Enqueue(const Message& m);
  // Queues a Tdispatch of `tag` with `contexts`, no destination and no dtab, carrying
  // `payload`: the bytes Enqueue(Tdispatch{...}) would queue, encoded straight into the queued
  // body (no Message is built, the payload is copied once). The request path of a session.
  Result<void> EnqueueTdispatch(std::uint32_t tag, std::span<const ContextView> contexts,
                                std::string_view payload);
  bool empty() const { return size() == 0; }
  // Messages queued (removed ones not counted).
  std::size_t size() const { return queue_.size() - queue_removed_ + whole_index_.size() - whole_removed_; }

  // Appends one round (one frame per queued message). Returns the number of frames appended.
  std::size_t WriteRound(std::string* out);
  // Appends rounds until the queue is empty.
  void WriteAll(std::string* out);

  // Removes the queued message with this tag and type. Returns std::nullopt if none is queued,
  // else whether some of its frames were already written (then the peer holds partial fragments
  // and the caller must send Tdiscarded). A removed message is marked, not erased, and left out
  // of the next write: removing the oldest of many queued messages (requests timing out in
  // order behind a peer that stopped reading) costs the same whatever is queued behind it.
  // Once the removed messages outweigh the live ones (bytes of whole frames, entries of the
  // queue), they are dropped for good, the live ones kept in order: messages removed while
  // nothing is written (a write that never finishes) cost no memory beyond that (amortised
  // O(size) per removed message).
  std::optional<bool> Remove(std::uint8_t type, std::uint32_t tag);

  // Bytes held for the queued messages: the whole frames (removed ones included until they are
  // dropped), the bodies still to write and the bookkeeping entries; at most about twice what
  // the live messages need, however many were removed. O(1): for tests and gauges.
  std::size_t buffered_bytes() const {
    return whole_.size() + whole_index_.size() * sizeof(WholeFrame) + queue_bytes_ +
           queue_.size() * sizeof(Pending);
  }

 private:
  // Capacity kept in spare bodies, and the largest body kept: enough for a few hundred
  // ordinary requests, little next to a session's read buffer.
  static constexpr std::size_t kSpareBytes = 64 * 1024;
  static constexpr std::size_t kMaxSpareBody = 16 * 1024;

  struct Pending {
    std::uint8_t type = 0;
    std::uint32_t tag = 0;
    std::string body;
    std::size_t offset = 0;
    bool removed = false;
  };
  // A Tdispatch encoded whole into whole_.
  struct WholeFrame {
    std::uint32_t tag = 0;
    std::size_t offset = 0;
    std::size_t size = 0;  // header included
    bool removed = false;
  };
  std::string TakeSpare();
  void Recycle(std::string body);
  static void WriteTdispatchBody(char* at, std::span<const ContextView> contexts, std::string_view payload);
  // Appends whole_ to `out` (swapping when `out` is empty); returns the number of frames.
  std::size_t TakeWhole(std::string* out);
  // Drop the removed whole frames / queue entries, keeping the others in order.
  void CompactWhole();
  void CompactQueue();

  std::uint32_t max_fragment_body_;
  // Whole frames, all queued before anything in queue_ (they go first), and their index.
  std::string whole_;
  std::vector<WholeFrame> whole_index_;
  std::vector<Pending> queue_;  // in write order
  // Removed entries of whole_index_ and queue_, and where their first live entry may be (the
  // entries before it are all removed): where Remove starts looking.
  std::size_t whole_removed_ = 0;
  std::size_t whole_live_from_ = 0;
  std::size_t queue_removed_ = 0;
  std::size_t queue_live_from_ = 0;
  std::size_t whole_removed_bytes_ = 0;  // of whole_, the removed frames' bytes
  std::size_t queue_bytes_ = 0;          // of queue_'s live bodies, the bytes still to write
  std::vector<std::string> spare_;
  std::size_t spare_bytes_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Broadcast contexts (§1.6) and handshake headers (§1.7).

inline constexpr std::string_view kTraceContextKey = "com.twitter.finagle.tracing.TraceContext";
inline constexpr std::string_view kDeadlineKey = "com.twitter.finagle.Deadline";
inline constexpr std::string_view kRetriesKey = "com.twitter.finagle.Retries";
inline constexpr std::string_view kClientIdKey = "com.twitter.finagle.thrift.ClientIdContext";
inline constexpr std::string_view kBackupRequestKey = "com.twitter.finagle.BackupRequest";
inline constexpr std::string_view kRequestHeadersKey = "com.twitter.finagle.thrift.Request.headers";
inline constexpr std::string_view kResponseHeadersKey =
    "com.twitter.finagle.thrift.Response.headers";
inline constexpr std::string_view kMuxFailureKey = "MuxFailure";

inline constexpr std::string_view kMuxFramerHeader = "mux-framer";
inline constexpr std::string_view kTlsHeader = "tls";

// The value of the first context with this key, or nullptr.
const std::string* FindContext(const Contexts& contexts, std::string_view key);

// Deadline: timestamp and deadline, signed nanoseconds since the Unix epoch.
struct Deadline {
  static constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::max();
  std::int64_t timestamp_ns = 0;
  std::int64_t deadline_ns = kNone;
  friend bool operator==(const Deadline&, const Deadline&) = default;
};
std::string EncodeDeadline(const Deadline& d);
// Appends the 16 bytes (into a reused context value: no allocation once it has the capacity).
void AppendDeadline(const Deadline& d, std::string* out);
Result<Deadline> DecodeDeadline(std::string_view value);  // exactly 16 bytes

// TraceContext: 32 bytes, or 40 with the high 64 bits of a 128-bit trace id.
struct TraceContext {
  static constexpr std::uint64_t kDebug = 1;
  static constexpr std::uint64_t kSamplingKnown = 2;
  static constexpr std::uint64_t kSampled = 4;
  std::uint64_t span_id = 0;
  std::uint64_t parent_id = 0;
  std::uint64_t trace_id = 0;
  std::uint64_t flags = 0;
  std::optional<std::uint64_t> trace_id_high;
  friend bool operator==(const TraceContext&, const TraceContext&) = default;
};
std::string EncodeTraceContext(const TraceContext& t);
void AppendTraceContext(const TraceContext& t, std::string* out);
Result<TraceContext> DecodeTraceContext(std::string_view value);  // 32 or 40 bytes

// Retries (requeue attempt number): 4-byte signed int.
std::string EncodeRetries(std::int32_t retries);
void AppendRetries(std::int32_t retries, std::string* out);
Result<std::int32_t> DecodeRetries(std::string_view value);

// ClientId: UTF-8 text; empty = no id. Decoding checks the UTF-8.
std::string EncodeClientId(std::string_view id);
Result<std::optional<std::string>> DecodeClientId(std::string_view value);

// BackupRequest: key with an empty value.
bool IsBackupRequest(const Contexts& contexts);

// Request/response headers: a run of (k~2 v~2) with no count, total <= 32767 bytes. Encoding
// drops pairs from the tail that would exceed the limit (and pairs whose key or value is longer
// than 65535 bytes), as Finagle does; `dropped`, when given, gets how many pairs it left out.
using Headers = std::vector<std::pair<std::string, std::string>>;
inline constexpr std::size_t kMaxHeadersBytes = 32767;
std::string EncodeHeaders(const Headers& headers, std::size_t* dropped = nullptr);
Result<Headers> DecodeHeaders(std::string_view value);

// MuxFailure: 8-byte flag word; extra bytes are ignored.
namespace mux_failure {
inline constexpr std::uint64_t kRetryable = 1;
inline constexpr std::uint64_t kRejected = 2;
inline constexpr std::uint64_t kNonRetryable = 4;
}  // namespace mux_failure
std::string EncodeMuxFailure(std::uint64_t flags);
Result<std::uint64_t> DecodeMuxFailure(std::string_view value);

// mux-framer header value: 4-byte signed int > 0.
std::string EncodeMuxFramer(std::int32_t max_fragment_body);
Result<std::int32_t> DecodeMuxFramer(std::string_view value);
// The value of the first header with this key, or nullptr.
const std::string* FindInitHeader(const InitHeaders& headers, std::string_view key);

// Whether `s` is well-formed UTF-8.
bool IsValidUtf8(std::string_view s);

}  // namespace scales::mux
