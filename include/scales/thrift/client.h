#pragma once
// The typed Thrift client: calls go through the code Apache Thrift's compiler generates for a
// service (`FooClient`), over any scales stack whose formatter and transport carry Thrift
// messages as a scales::Stream (plain Thrift here; ThriftMux reuses this template over its
// Mux stack). Entry points: scales::Thrift::NewClient<FooClient>(uri) (scales/thrift/thrift.h).
//
//   auto client = scales::Thrift::NewClient<scales::echo::EchoClient>("tcp://127.0.0.1:9090");
//   std::string r;
//   client->echo(r, "hi");                                              // blocking
//   client.Async(&EchoClient::send_echo, &EchoClient::recv_echo, std::string("hi"),
//                [](std::exception_ptr e, std::string r) { ... });      // callback
//   auto f = SCALES_THRIFT_CALL(client, echo, "hi", boost::asio::use_future);   // future
//   std::string r2 = co_await SCALES_THRIFT_CALL(client, echo, "hi", boost::asio::use_awaitable);
//
// How a call runs: the generated send_X() serialises the call into a memory buffer (binary or
// compact protocol; sequence id 0); the bytes become the call's Stream and travel down the
// stack (the formatter gives them a real sequence id and checks it on the reply); the reply
// bytes come back and the generated recv_X() decodes them. So the value, a declared Thrift
// exception and TApplicationException (unknown method, internal error) all come from the
// generated code and reach the caller as themselves.
//
// Errors:
//  - Blocking calls throw the declared exception / TApplicationException as themselves, or
//    scales::Error (code() a scales::Errc; what() names the client, endpoint and step) when
//    the stack failed (timeout, connect, pool, protocol). A blocking call made on one of the
//    client's event loops throws scales::Error(kBlockingCallOnEventLoop) at once.
//  - Async calls complete with void(std::exception_ptr, R) (R what recv_X returns;
//    void(std::exception_ptr) for void and oneway methods): a null pointer on success; else
//    the declared exception, TApplicationException or scales::Error. use_future and
//    use_awaitable rethrow that exception itself.
//  - A reply whose body does not decode (truncated, a string or container declaring more than
//    the reply holds, structs nested deeper than 64 levels, a type the compact protocol does not
//    know; in a field the generated code skips too; CheckedReads): scales::Error(
//    kProtocolError, "client <name>: malformed Thrift reply from <endpoint> for <method>: ...")
//    for async and blocking calls alike (a blocking call's protocol turns what Apache's reads
//    throw into it). A reply whose declared contents cannot be allocated (std::bad_alloc while
//    decoding): scales::Error(kResponseTooLarge, "client <name>:
//    decoding reply of <method> from <endpoint> (<N> bytes) failed: ..."). The exceptions, for
//    blocking calls only: what the generated code itself throws outside the protocol's reads
//    reaches the caller as itself — a required field missing from a returned struct (Apache's
//    TProtocolException INVALID_DATA) and an allocation failure while it sizes a container
//    (std::bad_alloc) — as the generated recv_X() runs in the caller's frame, with nothing of
//    ours around it (client->X() calls the generated X() itself, which sends, then decodes
//    after our last read returned). A caller that wants the scales::Error there waits on the
//    async call instead: SCALES_THRIFT_CALL(client, X, args..., boost::asio::use_future).get().
//
// The contract with the stack (what another stack, e.g. ThriftMux, must keep to reuse this
// client): the MethodCallMessage's payload is a scales::Stream holding one whole Thrift message
// (strict binary or compact; sequence id 0; message type T_CALL or T_ONEWAY) and its reply slot
// is a scales::Stream; on success the stack leaves one whole reply message (method name as
// sent, sequence id 0) in the reply slot, or nothing for oneway calls. msg.method is the Thrift
// method name and msg.properties.client_id the client id.
//
// Handlers run on their associated executor, else on one of the client's event loops; never
// inside the Async call. The call is serialised on the calling thread, inside Async (an
// exception from the generated send code, e.g. a required field unset, propagates from Async).
//
// Thread safety: ThriftClient is a cheap handle (shared ownership of the client); all calls are
// safe from any thread. Each blocking call uses its own generated client object; Async calls
// serialise and decode with one kept per thread (internal::Codec).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>
#include <thrift/protocol/TProtocolException.h>
#include <thrift/protocol/TProtocol.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TTransportException.h>

#include "scales/core/client.h"
#include "scales/core/dispatcher.h"
#include "scales/thrift/message.h"

namespace scales::thrift {

// Bounds what a protocol reading one reply may allocate from the lengths the reply declares.
// Apache's readers size a string or a container from its declared length before they read it
// (TBinaryProtocol resizes the string, TCompactProtocol reallocates its buffer, the generated
// code resizes the vector), and their own check counts a struct element as 0 bytes: a reply of
// a few bytes declaring a 2 GiB string, or a list of 2^31 structs, would allocate all of it.
// Nothing in a reply is longer, or has more elements, than the reply has bytes (every element
// takes at least one): LimitReadsTo(reply size) makes anything beyond that fail with
// TProtocolException SIZE_LIMIT. The protocols also hold a string's length and a container's
// element count to the bytes still unread (CheckedReads), so bytes before it (an unknown field of
// padding) buy it nothing. A container may still cost its element size per byte after it.
class ReadLimits {
 public:
  virtual void LimitReadsTo(size_t reply_bytes) noexcept = 0;

 protected:
  ~ReadLimits() = default;
  static int32_t Limit(size_t reply_bytes) noexcept {
    return static_cast<int32_t>(std::clamp<size_t>(reply_bytes, 1, INT32_MAX));  // 0 = no limit
  }
};

namespace internal {
template <class P>
struct IsCompactProtocol : std::false_type {};
template <class T>
struct IsCompactProtocol<apache::thrift::protocol::TCompactProtocolT<T>> : std::true_type {};
}  // namespace internal

// Apache's protocol P (a TBinaryProtocolT or TCompactProtocolT) with ReadLimits, whose reads
// fail with TProtocolException before the generated code sizes anything for what a reply
// declares, naming what was declared, the bytes of the reply left and the reply's size:
//  - SIZE_LIMIT: a string (or binary) longer than the bytes left after its length, a list, set or
//    map with more elements than those bytes can hold (BytesLeft(); an element takes at least
//    one byte, a map entry two);
//  - DEPTH_LIMIT: structs nested deeper than Apache's recursion limit (TConfiguration's, 64),
//    checked in readStructBegin. Apache's own check runs in the generated code's recursion
//    tracker, outside any read, where the blocking protocol cannot translate what it throws:
//    while a reply is read Apache's limit is one level higher, so this check comes first;
//  - INVALID_DATA: a type TCompactProtocol does not know ("unknown compact type 13": Apache's own
//    plain TException ends with the type as a raw byte, unprintable), a value of a type skip()
//    does not know.
// skip() (what the generated code calls for a field it does not know) goes through the same
// checked reads, and counts each list, set and map it goes into towards the depth limit.
template <class P>
class CheckedReads : public P, public ReadLimits {
 public:
  using P::P;

  void LimitReadsTo(size_t reply_bytes) noexcept override {
    reply_bytes_ = reply_bytes;
    this->string_limit_ = Limit(reply_bytes);
    this->container_limit_ = Limit(reply_bytes);
  }

  uint32_t readMessageBegin_virt(std::string& name, apache::thrift::protocol::TMessageType& type,
                                 int32_t& seqid) override {
    this->setRecurisionLimit(depth_limit_ + 1);
    depth_ = 0;  // a read that failed left them anywhere
    skipped_containers_ = 0;
    return P::readMessageBegin_virt(name, type, seqid);
  }
  uint32_t writeMessageBegin_virt(const std::string& name, const apache::thrift::protocol::TMessageType type,
                                  const int32_t seqid) override {
    this->setRecurisionLimit(depth_limit_);  // writes keep Apache's limit
    return P::writeMessageBegin_virt(name, type, seqid);
  }
  uint32_t readStructBegin_virt(std::string& name) override {
    Enter();
    return P::readStructBegin_virt(name);
  }
  uint32_t readStructEnd_virt() override {
    --depth_;
    return P::readStructEnd_virt();
  }
  uint32_t readFieldBegin_virt(std::string& name, apache::thrift::protocol::TType& type, int16_t& id) override {
    if constexpr (internal::IsCompactProtocol<P>::value) {
      return NamingUnknownTypes([&] { return P::readFieldBegin_virt(name, type, id); });
    } else {
      uint32_t n = ReadBinaryType(type, "field");
      if (type == apache::thrift::protocol::T_STOP) {
        id = 0;
        return n;
      }
      return n + P::readI16(id);
    }
  }
  uint32_t readString_virt(std::string& value) override {
    CheckString();
    return P::readString_virt(value);
  }
  uint32_t readBinary_virt(std::string& value) override {
    CheckString();
    return P::readBinary_virt(value);
  }
  uint32_t readListBegin_virt(apache::thrift::protocol::TType& element, uint32_t& size) override {
    const uint32_t n = NamingUnknownTypes([&] {
      if constexpr (internal::IsCompactProtocol<P>::value)
        return P::readListBegin_virt(element, size);
      else
        return ReadBinaryType(element, "list element") + ReadBinarySize(size);
    });
    CheckContainer("list", size, 1);
    return n;
  }
  uint32_t readSetBegin_virt(apache::thrift::protocol::TType& element, uint32_t& size) override {
    const uint32_t n = NamingUnknownTypes([&] {
      if constexpr (internal::IsCompactProtocol<P>::value)
        return P::readSetBegin_virt(element, size);
      else
        return ReadBinaryType(element, "set element") + ReadBinarySize(size);
    });
    CheckContainer("set", size, 1);
    return n;
  }
  uint32_t readMapBegin_virt(apache::thrift::protocol::TType& key, apache::thrift::protocol::TType& value,
                             uint32_t& size) override {
    const uint32_t n = NamingUnknownTypes([&] {
      if constexpr (internal::IsCompactProtocol<P>::value)
        return P::readMapBegin_virt(key, value, size);
      else
        return ReadBinaryType(key, "map key") + ReadBinaryType(value, "map value") +
               ReadBinarySize(size);
    });
    CheckContainer("map", size, 2);
    return n;
  }
  // Apache's skip (TVirtualProtocol's) reads through P's own, non-virtual reads, past the checks
  // here: an unknown field declaring a 2 GiB string failed with Apache's bare 'Exceeded size
  // limit', and one nesting lists thousands deep met only the recursion tracker's bare
  // DEPTH_LIMIT. This one reads through the protocol's virtual reads (the most derived's, so a
  // blocking call's translate what they throw), as the generated code's do.
  uint32_t skip_virt(apache::thrift::protocol::TType type) override {
    namespace tp = apache::thrift::protocol;
    tp::TProtocol& in = *this;
    switch (type) {
      case tp::T_BOOL:
        return ReadOne<bool>(in, &tp::TProtocol::readBool);
      case tp::T_BYTE:
        return ReadOne<int8_t>(in, &tp::TProtocol::readByte);
      case tp::T_I16:
        return ReadOne<int16_t>(in, &tp::TProtocol::readI16);
      case tp::T_I32:
        return ReadOne<int32_t>(in, &tp::TProtocol::readI32);
      case tp::T_I64:
        return ReadOne<int64_t>(in, &tp::TProtocol::readI64);
      case tp::T_DOUBLE:
        return ReadOne<double>(in, &tp::TProtocol::readDouble);
      case tp::T_STRING:
        return ReadOne<std::string>(in, &tp::TProtocol::readBinary);
      case tp::T_STRUCT: {
        std::string name;
        tp::TType field = tp::T_STOP;
        int16_t id = 0;
        uint32_t n = in.readStructBegin(name);
        for (n += in.readFieldBegin(name, field, id); field != tp::T_STOP; n += in.readFieldBegin(name, field, id)) {
          n += in.skip(field);
          n += in.readFieldEnd();
        }
        return n + in.readStructEnd();
      }
      case tp::T_LIST:
      case tp::T_SET:
      case tp::T_MAP: {
        ++skipped_containers_;
        Enter();
        tp::TType key = tp::T_STOP;
        tp::TType element = tp::T_STOP;  // a map's value
        uint32_t size = 0;
        uint32_t n = type == tp::T_MAP    ? in.readMapBegin(key, element, size)
                     : type == tp::T_LIST ? in.readListBegin(element, size)
                                          : in.readSetBegin(element, size);
        for (uint32_t i = 0; i < size; ++i) {
          if (type == tp::T_MAP) n += in.skip(key);
          n += in.skip(element);
        }
        n += type == tp::T_MAP ? in.readMapEnd() : type == tp::T_LIST ? in.readListEnd() : in.readSetEnd();
        --depth_;
        --skipped_containers_;
        return n;
      }
      default:
        throw tp::TProtocolException(tp::TProtocolException::INVALID_DATA,
                                     "cannot skip a value of unknown type " + std::to_string(static_cast<int>(type)));
    }
  }

 protected:
  ~CheckedReads() override = default;
  virtual size_t BytesLeft() const noexcept = 0;

 private:
  // Reads one value of type T with `read` (a virtual read of TProtocol's), for skip().
  template <class T>
  static uint32_t ReadOne(apache::thrift::protocol::TProtocol& in,
                          uint32_t (apache::thrift::protocol::TProtocol::*read)(T&)) {
    T value{};
    return (in.*read)(value);
  }
  // The binary protocol's type byte, checked before it becomes a TType: Apache's readFieldBegin
  // and read{List,Set,Map}Begin cast any byte to the enum, and a byte outside its values
  // (0..17) is undefined behaviour there (UBSan: "load of value 4294967277, which is not a valid
  // value for type 'TType'", a reply's type byte altered on the way). Those reads are done here
  // instead, as Apache does them otherwise.
  uint32_t ReadBinaryType(apache::thrift::protocol::TType& type, const char* what) {
    int8_t raw = 0;
    const uint32_t n = P::readByte(raw);
    if (raw < apache::thrift::protocol::T_STOP || raw > apache::thrift::protocol::T_UTF16) {
      throw apache::thrift::protocol::TProtocolException(
          apache::thrift::protocol::TProtocolException::INVALID_DATA,
          std::string("unknown binary type ") + std::to_string(raw) + " for a " + what);
    }
    type = static_cast<apache::thrift::protocol::TType>(raw);
    return n;
  }
  // A list's, set's or map's element count, checked as Apache's binary protocol does (the
  // bytes it needs are checked by CheckContainer).
  uint32_t ReadBinarySize(uint32_t& size) {
    int32_t declared = 0;
    const uint32_t n = P::readI32(declared);
    if (declared < 0) {
      throw apache::thrift::protocol::TProtocolException(
          apache::thrift::protocol::TProtocolException::NEGATIVE_SIZE);
    }
    if (this->container_limit_ && declared > this->container_limit_) {
      throw apache::thrift::protocol::TProtocolException(
          apache::thrift::protocol::TProtocolException::SIZE_LIMIT);
    }
    size = static_cast<uint32_t>(declared);
    return n;
  }
  // One level deeper: a struct, or a list, set or map skip() goes into.
  void Enter() {
    if (++depth_ <= depth_limit_) return;
    throw apache::thrift::protocol::TProtocolException(
        apache::thrift::protocol::TProtocolException::DEPTH_LIMIT,
        std::string(skipped_containers_ > 0 ? "structs, lists, sets and maps" : "structs") + " nest deeper than " +
            std::to_string(depth_limit_) + " levels");
  }
  // TCompactProtocol refuses a type nibble it does not know (13 to 15) with a plain TException
  // whose message ends with the nibble as a char ('\r' for 13): rethrown as a TProtocolException
  // naming it as a number.
  template <class Read>
  static uint32_t NamingUnknownTypes(Read read) {
    if constexpr (!internal::IsCompactProtocol<P>::value) {
      return read();
    } else {
      try {
        return read();
      } catch (const apache::thrift::TException& e) {
        constexpr std::string_view kApache = "don't know what type: ";
        const std::string_view what = e.what();
        if (typeid(e) != typeid(apache::thrift::TException) || what.size() != kApache.size() + 1 ||
            !what.starts_with(kApache)) {
          throw;
        }
        throw apache::thrift::protocol::TProtocolException(
            apache::thrift::protocol::TProtocolException::INVALID_DATA,
            "unknown compact type " + std::to_string(static_cast<uint8_t>(what.back())));
      }
    }
  }
  void CheckContainer(const char* kind, uint32_t count, size_t min_bytes) const {
    const size_t left = BytesLeft();
    if (static_cast<uint64_t>(count) * min_bytes <= left) return;
    Refuse("a " + std::string(kind) + " declares " + std::to_string(count) + " elements", left);
  }
  // The length ahead is read here without consuming it, as P is about to read it (binary: a
  // big-endian i32; compact: a varint, of which P keeps the low 32 bits). When the reply ends
  // inside it, or it is not positive, P's read fails (truncated, NEGATIVE_SIZE) or reads nothing.
  void CheckString() const {
    uint32_t available = 1;
    const uint8_t* p = this->trans_->borrow(nullptr, &available);
    if (p == nullptr) return;
    int64_t declared = 0;
    size_t prefix = 0;
    if constexpr (internal::IsCompactProtocol<P>::value) {
      uint64_t v = 0;
      for (;; ++prefix) {
        if (prefix == available || prefix == 10) return;
        v |= static_cast<uint64_t>(p[prefix] & 0x7f) << (7 * prefix);
        if ((p[prefix] & 0x80) == 0) break;
      }
      ++prefix;
      declared = static_cast<int32_t>(v);
    } else {
      if (available < 4) return;
      prefix = 4;
      declared = static_cast<int32_t>(static_cast<uint32_t>(p[0]) << 24 | static_cast<uint32_t>(p[1]) << 16 |
                                      static_cast<uint32_t>(p[2]) << 8 | static_cast<uint32_t>(p[3]));
    }
    const size_t left = BytesLeft() - prefix;
    if (declared <= 0 || static_cast<uint64_t>(declared) <= left) return;
    Refuse("a string declares " + std::to_string(declared) + " bytes", left);
  }
  [[noreturn]] void Refuse(const std::string& what, size_t left) const {
    throw apache::thrift::protocol::TProtocolException(
        apache::thrift::protocol::TProtocolException::SIZE_LIMIT,
        what + " with " + std::to_string(left) + " bytes of the reply left (the reply is " +
            std::to_string(reply_bytes_) + " bytes)");
  }

  size_t reply_bytes_ = 0;
  const uint32_t depth_limit_ = this->getRecursionLimit();
  uint32_t depth_ = 0;  // of the structs being read, and of the containers skip() is in
  uint32_t skipped_containers_ = 0;  // that skip() is in
};

class BlockingTransport;

// The libthrift configuration of the transports replies are read from. libthrift's default caps
// what one message may read at 100 MiB (TConfiguration::DEFAULT_MAX_MESSAGE_SIZE), below the
// max_frame_bytes a client accepts (up to 2 GiB): a reply is already bounded by max_frame_bytes
// (framed) or max_response_bytes (buffered) before it is decoded, so this one does not cap it.
const std::shared_ptr<apache::thrift::TConfiguration>& ReplyConfiguration();

// The protocol of a blocking call's generated client, of kind `protocol` over the call's
// `transport`: Apache's TBinaryProtocol or TCompactProtocol with CheckedReads, whose reads turn
// what they throw when a reply does not decode (Apache's TProtocolException and
// TTransportException, std::bad_alloc) into the scales::Error an async call gets
// (BlockingTransport::ThrowDecodeError).
std::shared_ptr<apache::thrift::protocol::TProtocol> MakeProtocol(Protocol protocol,
                                                                  std::shared_ptr<BlockingTransport> transport);

// The outcome of one Thrift call as bytes, before decoding.
struct RawReply {
  error_code error;
  // On error: what happened, naming the client, endpoint and step.
  std::string detail;
  // On success: the reply message (empty for oneway calls).
  std::string bytes;
};

// One Thrift call in flight: the request bytes (the message's payload Stream) and the reply
// bytes (its reply slot). Subclasses decide what completing means. `info` points to the
// caller's CallInfo when CallOptions::info is set, else to the call's own.
class ThriftCall : public CallBase {
 public:
  ThriftCall();
  Stream request;
  Stream reply;

  void Complete(MethodReturnMessage& msg, const boost::asio::any_io_executor& fallback) final;

 protected:
  // Consumes the outcome, on the call's event loop: on failure `error` and `detail` (what
  // happened, naming the client, endpoint and step); on success the reply message is in
  // `reply.data` (empty for oneway calls), which the subclass may decode in place or take.
  // `defer`: the call is still inside its initiating function, so the user's handler must be
  // posted, not run inline. Pass work_ (the work tracked on the handler's executor) to
  // CompleteOn with the handler. The call is destroyed right after.
  virtual void Deliver(const error_code& error, std::string& detail, const boost::asio::any_io_executor& fallback,
                       bool defer) = 0;
  // What recv_X threw (`e`) when the reply's body did not decode (internal::Malformed: e.g.
  // truncated, a length over the bytes left) or what it declares could not be allocated
  // (internal::OutOfMemory): scales::Error(kProtocolError, resp. kResponseTooLarge) naming the
  // client, the endpoint, the method and what was wrong, also put in `info`. Null for anything
  // else (a declared exception, TApplicationException: what the reply carries).
  std::exception_ptr DecodeError(const std::exception& e);

 private:
  CallInfo own_info_;
};

// Starts `call` on `core` (or fails it, later, when `core` is empty). Applies `options`.
void StartThriftCall(const std::shared_ptr<ClientCore>& core, ThriftCall* call, std::string bytes,
                     const CallOptions& options, const std::string& client_id);

// Sends `request` through `core` and waits for the reply bytes. Throws scales::Error on any
// failure, and kBlockingCallOnEventLoop on one of the client's loops. `endpoint`, when given,
// receives the endpoint that answered.
std::string BlockingRoundTrip(const std::shared_ptr<ClientCore>& core, std::string request,
                              const CallOptions& options, const std::string& client_id,
                              std::string* endpoint = nullptr);

// The transport under a blocking call's generated client: a memory buffer whose flush() (which
// the generated send_X() calls after writing) sends the written message through the stack,
// waits, and leaves the reply in the buffer for recv_X(). One per call; not thread-safe.
class BlockingTransport final : public apache::thrift::transport::TMemoryBuffer {
 public:
  BlockingTransport(std::shared_ptr<ClientCore> core, CallOptions options, std::string client_id)
      : TMemoryBuffer(ReplyConfiguration()),
        core_(std::move(core)), options_(std::move(options)), client_id_(std::move(client_id)) {}
  void flush() override;
  // The limits of the protocol that reads the reply from this buffer: flush() bounds its
  // reads by the reply's size (ReadLimits). It must outlive the flush.
  void ReadsWith(ReadLimits* reader) noexcept { reader_ = reader; }
  // What the protocol reading the reply threw (`e`), when the reply did not decode or what it
  // declares could not be allocated: throws the scales::Error an async call gets
  // (ThriftCall::DecodeError; also in the call's CallInfo, when it asked for one). Returns for
  // anything else.
  void ThrowDecodeError(const std::exception& e) const;

 private:
  std::shared_ptr<ClientCore> core_;
  CallOptions options_;
  std::string client_id_;
  ReadLimits* reader_ = nullptr;
  std::string method_;    // of the last call flushed
  std::string endpoint_;  // that answered it
  size_t reply_bytes_ = 0;  // of its reply
};

namespace internal {

// What `e`, thrown while a reply was decoded, says, when it is not what the reply carries (a
// declared exception, TApplicationException: subclasses of TException). Malformed: its body did
// not decode (Apache's TProtocolException or TTransportException, or a plain TException:
// TCompactProtocol's "don't know what type" for an unknown type nibble, which CheckedReads
// rethrows as a TProtocolException naming the type). OutOfMemory: what it declares could not be
// allocated.
inline bool Malformed(const std::exception& e) noexcept {
  return dynamic_cast<const apache::thrift::protocol::TProtocolException*>(&e) != nullptr ||
         dynamic_cast<const apache::thrift::transport::TTransportException*>(&e) != nullptr ||
         typeid(e) == typeid(apache::thrift::TException);
}
inline bool OutOfMemory(const std::exception& e) noexcept { return dynamic_cast<const std::bad_alloc*>(&e) != nullptr; }

// What recv_X returns: `void recv_x(T& _return)` -> T; `T recv_x()` -> T (T may be void).
template <class Recv>
struct RecvTraits;
template <class C, class T>
struct RecvTraits<void (C::*)(T&)> {
  using Result = T;
  static constexpr bool kOutParam = true;
};
template <class C, class T>
struct RecvTraits<T (C::*)()> {
  using Result = T;
  static constexpr bool kOutParam = false;
};

template <class R>
struct CompletionSignature {
  using type = void(std::exception_ptr, R);
};
template <>
struct CompletionSignature<void> {
  using type = void(std::exception_ptr);
};

// A strict binary message header (what the generated code writes, and the only format
// ThriftMux carries), read without copying the method name: the per-call fast path of the
// client and the ThriftMux serializer. nullopt for anything else (thrift::ParseMessageHeader
// then reads other formats or explains what is wrong).
struct StrictHeader {
  MessageType type;
  std::string_view name;
  int32_t seqid;
};

inline std::optional<StrictHeader> ParseStrictHeader(std::string_view b) {
  auto be32 = [&b](size_t at) {
    return static_cast<uint32_t>(static_cast<uint8_t>(b[at])) << 24 |
           static_cast<uint32_t>(static_cast<uint8_t>(b[at + 1])) << 16 |
           static_cast<uint32_t>(static_cast<uint8_t>(b[at + 2])) << 8 |
           static_cast<uint32_t>(static_cast<uint8_t>(b[at + 3]));
  };
  if (b.size() < 12) return std::nullopt;  // version+type, name length, sequence id
  const uint32_t word = be32(0);
  if ((word & 0xffff0000u) != 0x80010000u) return std::nullopt;
  const uint32_t type = word & 0xff;
  if (type < 1 || type > 4) return std::nullopt;
  const uint32_t len = be32(4);
  if (len > b.size() - 12) return std::nullopt;
  return StrictHeader{static_cast<MessageType>(type), b.substr(8, len), static_cast<int32_t>(be32(8 + len))};
}

// A read-only Thrift transport over bytes owned elsewhere: a reply the generated client decodes
// in place, straight from the reply's bytes (no copy into a memory buffer). Observe() points it
// at the bytes; reading past them fails as a truncated message does (TTransportException
// END_OF_FILE from readAll). Under TBinaryProtocolT<ReplyReader> the reads are inline.
class ReplyReader final
    : public apache::thrift::transport::TVirtualTransport<ReplyReader, apache::thrift::transport::TBufferBase> {
 public:
  ReplyReader() : TVirtualTransport(ReplyConfiguration()) {}
  // TVirtualTransport's readAll would hide TBufferBase's inline fast path.
  using TBufferBase::readAll;

  void Observe(std::string_view bytes) noexcept {
    // Only read through: the const_cast never leads to a write (writeSlow refuses, and the
    // write area is empty).
    setReadBuffer(reinterpret_cast<uint8_t*>(const_cast<char*>(bytes.data())), static_cast<uint32_t>(bytes.size()));
    resetConsumedMessageSize();
  }
  // Forgets the bytes (they may be freed now).
  void Clear() noexcept { setReadBuffer(nullptr, 0); }
  // Bytes not yet read.
  uint32_t available_read() const noexcept { return static_cast<uint32_t>(rBound_ - rBase_); }
  bool isOpen() const override { return true; }

 protected:
  // The fast path found too few bytes: give what is left (readAll then reports the end).
  uint32_t readSlow(uint8_t* buf, uint32_t len) override {
    const auto give = static_cast<uint32_t>(std::min<ptrdiff_t>(len, rBound_ - rBase_));
    if (give > 0) std::memcpy(buf, rBase_, give);
    rBase_ += give;
    return give;
  }
  void writeSlow(const uint8_t*, uint32_t) override {
    throw apache::thrift::transport::TTransportException(apache::thrift::transport::TTransportException::BAD_ARGS,
                                                         "ReplyReader is read-only");
  }
  const uint8_t* borrowSlow(uint8_t*, uint32_t*) override { return nullptr; }
};

// Protocol P over transport T whose getTransport() copies no reference count. The generated
// send_X and recv_X call getTransport() three times per call, and each copy of a shared
// shared_ptr is two atomic read-modify-writes (together about 5 % of a ThriftMux call's CPU):
// here ptrans_ points at the transport without owning it (a shared_ptr aliasing an empty one
// has no control block, so its copies touch no counter) and owner_ keeps the transport alive.
template <class P, class T>
class UncountedTransportProtocol final : public CheckedReads<P> {
 public:
  explicit UncountedTransportProtocol(std::shared_ptr<T> transport)
      : CheckedReads<P>(transport), owner_(std::move(transport)) {
    this->ptrans_ = std::shared_ptr<apache::thrift::transport::TTransport>(
        std::shared_ptr<apache::thrift::transport::TTransport>(), owner_.get());
  }

 private:
  size_t BytesLeft() const noexcept override { return owner_->available_read(); }
  std::shared_ptr<T> owner_;
};

// A protocol of kind `protocol` over the concrete transport T: its transport calls are direct
// (and the buffer fast paths inline), unlike MakeProtocol's over a TTransport, and
// getTransport() costs no atomic operation (UncountedTransportProtocol).
template <class T>
std::shared_ptr<apache::thrift::protocol::TProtocol> MakeProtocolOver(Protocol protocol, std::shared_ptr<T> transport) {
  if (protocol == Protocol::kCompact) {
    return std::make_shared<UncountedTransportProtocol<apache::thrift::protocol::TCompactProtocolT<T>, T>>(
        std::move(transport));
  }
  return std::make_shared<UncountedTransportProtocol<apache::thrift::protocol::TBinaryProtocolT<T>, T>>(
      std::move(transport));
}

// A generated client kept per thread, service and protocol (Codec<G>::For) and reused by every
// call made on that thread: building one costs about five heap allocations (buffers, their
// TConfiguration, protocols), more than the rest of a ThriftMux call. It writes into a memory
// buffer (Encode) and reads a reply in place through a ReplyReader (Decode); both protocols are
// instantiated over the concrete transports. Only Encode and Decode use it, and neither runs
// user code while it is in use.
template <class G>
class Codec {
 public:
  // A memory buffer whose consumed-size budget can be reset after a failed read.
  class Buffer final : public apache::thrift::transport::TMemoryBuffer {
   public:
    void Reset() {
      resetBuffer();
      resetConsumedMessageSize();
    }
  };
  // A buffer that grew past this while encoding is dropped after use, so a thread keeps
  // little memory.
  static constexpr size_t kReuseLimit = 64 * 1024;

  explicit Codec(Protocol protocol)
      : buffer_(std::make_shared<Buffer>()),
        reader_(std::make_shared<ReplyReader>()),
        in_(MakeProtocolOver(protocol, reader_)),
        in_limits_(dynamic_cast<ReadLimits*>(in_.get())),
        gen_(in_, MakeProtocolOver(protocol, buffer_)) {}

  static std::unique_ptr<Codec>& For(Protocol protocol) {
    auto& c = Slot(protocol);
    if (!c) c = std::make_unique<Codec>(protocol);
    return c;
  }
  // Whether this thread keeps a codec for `protocol` now (one is dropped after a reply that
  // did not decode and after a large compact message).
  static bool Kept(Protocol protocol) { return Slot(protocol) != nullptr; }
  Buffer& buffer() noexcept { return *buffer_; }
  ReplyReader& reader() noexcept { return *reader_; }
  // The limits of the protocol gen() reads replies with (over reader()).
  ReadLimits& in_limits() noexcept { return *in_limits_; }
  G& gen() noexcept { return gen_; }

 private:
  static std::unique_ptr<Codec>& Slot(Protocol protocol) {
    thread_local std::unique_ptr<Codec> codecs[2];
    return codecs[protocol == Protocol::kCompact ? 1 : 0];
  }

  std::shared_ptr<Buffer> buffer_;
  std::shared_ptr<ReplyReader> reader_;
  std::shared_ptr<apache::thrift::protocol::TProtocol> in_;
  ReadLimits* in_limits_;
  G gen_;
};

// Spare strings for the bytes of calls (request and reply), kept per thread: a finished call
// gives its two strings back (ThriftCall::Complete), the next call takes them (Encode, the
// ThriftCall constructor), so a steady stream of calls reuses their storage instead of two
// allocations and frees per call. At most kMaxSpareBytes strings of up to kMaxSpareCapacity
// bytes each are kept; sanitizer builds keep none (use-after-free stays visible).
inline constexpr size_t kMaxSpareBytes = 128;
inline constexpr size_t kMaxSpareCapacity = 4096;
// An empty string, with capacity when a spare was kept.
std::string TakeSpareBytes() noexcept;
// Keeps `bytes`' storage for a later TakeSpareBytes (or frees it).
void RecycleBytes(std::string&& bytes) noexcept;

// Serialises a call with the thread's generated client `G` (Codec).
template <class G, class Write>
std::string Encode(Protocol protocol, Write&& write) {
  auto& codec = Codec<G>::For(protocol);
  codec->buffer().Reset();
  try {
    write(codec->gen());
  } catch (...) {
    codec.reset();  // a half-written message and the writer's state (the compact field stack)
    throw;
  }
  uint8_t* data = nullptr;
  uint32_t size = 0;
  codec->buffer().getBuffer(&data, &size);
  std::string bytes = TakeSpareBytes();
  bytes.assign(reinterpret_cast<const char*>(data), size);
  codec->buffer().Reset();
  if (bytes.size() > Codec<G>::kReuseLimit) codec.reset();
  return bytes;
}

// Decodes a reply into `out` with the thread's generated client `G` (Codec), reading `bytes`
// in place; throws what recv_X throws (`out` is then unspecified). `bytes` must stay valid for
// the call only. For void methods `out` is an unused int.
template <class G, class Recv>
void DecodeInto(Protocol protocol, std::string_view bytes, Recv recv,
                std::conditional_t<std::is_void_v<typename RecvTraits<Recv>::Result>, int,
                                   typename RecvTraits<Recv>::Result>& out) {
  auto& codec = Codec<G>::For(protocol);
  // The codec is rebuilt after a reply that did not decode (its protocol may keep state from
  // it: the compact reader's stack of field ids) or a large compact one (the compact reader
  // keeps a buffer as large as the largest string it read: decided before reading, so that it
  // holds whatever recv_X throws, a large TApplicationException or declared exception
  // included). Declared before `forget`, so the reader is forgotten first.
  struct Drop {
    std::unique_ptr<Codec<G>>& codec;
    bool now = false;
    ~Drop() {
      if (now) codec.reset();
    }
  } drop{codec, protocol == Protocol::kCompact && bytes.size() > Codec<G>::kReuseLimit};
  ReplyReader& reader = codec->reader();
  reader.Observe(bytes);
  codec->in_limits().LimitReadsTo(bytes.size());
  struct Forget {
    ReplyReader& r;
    ~Forget() { r.Clear(); }
  } forget{reader};
  G& gen = codec->gen();
  try {
    if constexpr (RecvTraits<Recv>::kOutParam) {
      (gen.*recv)(out);
    } else if constexpr (std::is_void_v<typename RecvTraits<Recv>::Result>) {
      (gen.*recv)();
    } else {
      out = (gen.*recv)();
    }
  } catch (const std::exception& e) {
    if (Malformed(e) || OutOfMemory(e)) drop.now = true;
    throw;
  }
}

// As DecodeInto, returning the value.
template <class G, class Recv>
typename RecvTraits<Recv>::Result Decode(Protocol protocol, std::string_view bytes, Recv recv) {
  using R = typename RecvTraits<Recv>::Result;
  if constexpr (std::is_void_v<R>) {
    int unused = 0;
    DecodeInto<G>(protocol, bytes, recv, unused);
  } else {
    R r{};
    DecodeInto<G>(protocol, bytes, recv, r);
    return r;
  }
}

// A call whose reply is decoded by recv_X of the generated client G. The completion handler is
// kept as its own type (not type-erased into an any_completion_handler, which would allocate
// per call): the call object itself comes from the per-thread cache of call blocks.
template <class G, class Recv, class Handler>
class DecodingCall final : public ThriftCall {
 public:
  using Result = typename RecvTraits<Recv>::Result;

  DecodingCall(Handler handler, Protocol protocol, Recv recv)
      : handler_(std::move(handler)), protocol_(protocol), recv_(recv) {
    ConnectCancellation(handler_);
    TrackWork(handler_);
  }

 protected:
  void Deliver(const error_code& error, std::string& detail, const boost::asio::any_io_executor& fallback,
               bool defer) override {
    std::exception_ptr ep;
    std::conditional_t<std::is_void_v<Result>, int, Result> value{};
    if (error) {
      ep = std::make_exception_ptr(Error(error, std::move(detail)));
    } else {
      try {
        DecodeInto<G>(protocol_, reply.data, recv_, value);
      } catch (const std::exception& e) {
        ep = DecodeError(e);
        if (!ep) ep = std::current_exception();  // a declared exception, TApplicationException
        value = {};
      } catch (...) {
        ep = std::current_exception();
        value = {};
      }
    }
    // Straight to CompleteOn: each wrapper level would move the handler and the value once more.
    if constexpr (std::is_void_v<Result>) {
      scales::internal::CompleteOn(std::move(handler_), fallback, defer, std::move(work_), ep);
    } else {
      scales::internal::CompleteOn(std::move(handler_), fallback, defer, std::move(work_), ep, std::move(value));
    }
  }

 private:
  Handler handler_;
  Protocol protocol_;
  Recv recv_;
};

// A oneway call: complete once the bytes were written.
class OnewayCall final : public ThriftCall {
 public:
  using Handler = boost::asio::any_completion_handler<void(std::exception_ptr)>;
  explicit OnewayCall(Handler handler) : handler_(std::move(handler)) {
    ConnectCancellation(handler_);
    TrackWork(handler_);
  }

 protected:
  void Deliver(const error_code& error, std::string& detail, const boost::asio::any_io_executor& fallback,
               bool defer) override {
    std::exception_ptr ep;
    if (error) ep = std::make_exception_ptr(Error(error, std::move(detail)));
    scales::internal::CompleteOn(std::move(handler_), fallback, defer, std::move(work_), ep);
  }

 private:
  Handler handler_;
};

template <class Tuple, class F, size_t... I>
decltype(auto) ApplyFirst(Tuple& t, F&& f, std::index_sequence<I...>) {
  return std::forward<F>(f)(std::get<I>(t)...);
}

}  // namespace internal

// A client of the Thrift service whose generated client class is `G` (e.g. EchoClient).
// Cheap to copy; see the top of this file for the call styles.
template <class G>
class ThriftClient {
 public:
  using Generated = G;

  // The per-call object operator-> returns: it owns a fresh generated client over a
  // BlockingTransport, so `client->method(args)` is one blocking call. Lives until the end
  // of the full expression.
  class Proxy {
   public:
    Proxy(std::shared_ptr<ClientCore> core, Protocol protocol, CallOptions options, std::string client_id)
        : transport_(std::make_shared<BlockingTransport>(std::move(core), std::move(options), std::move(client_id))),
          generated_(MakeProtocol(protocol, transport_)) {
      transport_->ReadsWith(dynamic_cast<ReadLimits*>(generated_.getInputProtocol().get()));
    }
    Proxy(const Proxy&) = delete;
    Proxy& operator=(const Proxy&) = delete;
    G* operator->() noexcept { return &generated_; }

   private:
    std::shared_ptr<BlockingTransport> transport_;
    G generated_;
  };

  ThriftClient() = default;
  // A client over `core`, whose stack carries Thrift messages as Streams (plain Thrift,
  // ThriftMux). `client_id` goes into every call's properties (ThriftMux sends it).
  ThriftClient(std::shared_ptr<ClientCore> core, Protocol protocol, std::string client_id = {})
      : core_(std::move(core)), protocol_(protocol), client_id_(std::move(client_id)) {}

  // Blocking calls: client->method(args...). Throws as described at the top of the file.
  Proxy operator->() const {
    if (!core_) throw Error(make_error_code(Errc::kClientClosed), "ThriftClient is empty (default-constructed)");
    if (core_->IsLoopThread()) {
      throw Error(make_error_code(Errc::kBlockingCallOnEventLoop),
                  "client " + core_->name() +
                      ": blocking Thrift call made on one of the client's event loops; use Async there");
    }
    return Proxy(core_, protocol_, options_, client_id_);
  }

  // Asynchronous call: Async(&G::send_x, &G::recv_x, args..., token). The arguments are what
  // send_x takes; the completion signature is void(std::exception_ptr, R) with R what recv_x
  // returns (void(std::exception_ptr) for void methods). See also SCALES_THRIFT_CALL.
  template <class Send, class Recv, class... ArgsAndToken>
  auto Async(Send send, Recv recv, ArgsAndToken&&... args_and_token) const {
    static_assert(sizeof...(ArgsAndToken) >= 1, "Async needs a completion token as its last argument");
    constexpr size_t kArgs = sizeof...(ArgsAndToken) - 1;
    using Result = typename internal::RecvTraits<Recv>::Result;
    using Signature = typename internal::CompletionSignature<Result>::type;
    auto all = std::forward_as_tuple(std::forward<ArgsAndToken>(args_and_token)...);
    std::string bytes = internal::Encode<G>(protocol_, [&](G& gen) {
      internal::ApplyFirst(all, [&](auto&&... a) { (gen.*send)(a...); }, std::make_index_sequence<kArgs>());
    });
    using Token = std::tuple_element_t<kArgs, std::tuple<ArgsAndToken&&...>>;
    // The client's core, options and id go in as initiation arguments, not captures: a token
    // that initiates at once (a handler, use_future) gets them by reference, one that defers
    // (use_awaitable, deferred) decay-copies them, as Asio does with every initiation argument.
    return boost::asio::async_initiate<Token, Signature>(
        [protocol = protocol_, recv](auto handler, std::string bytes, const std::shared_ptr<ClientCore>& core,
                                     const CallOptions& options, const std::string& client_id) {
          using Call = internal::DecodingCall<G, Recv, decltype(handler)>;
          auto* call = new Call(std::move(handler), protocol, recv);
          StartThriftCall(core, call, std::move(bytes), options, client_id);
        },
        std::get<kArgs>(all), std::move(bytes), core_, options_, client_id_);
  }

  // Asynchronous oneway call: AsyncOneway(&G::send_x, args..., token); completes with
  // void(std::exception_ptr) once the request was written. See also SCALES_THRIFT_ONEWAY.
  template <class Send, class... ArgsAndToken>
  auto AsyncOneway(Send send, ArgsAndToken&&... args_and_token) const {
    static_assert(sizeof...(ArgsAndToken) >= 1, "AsyncOneway needs a completion token as its last argument");
    constexpr size_t kArgs = sizeof...(ArgsAndToken) - 1;
    auto all = std::forward_as_tuple(std::forward<ArgsAndToken>(args_and_token)...);
    std::string bytes = internal::Encode<G>(protocol_, [&](G& gen) {
      internal::ApplyFirst(all, [&](auto&&... a) { (gen.*send)(a...); }, std::make_index_sequence<kArgs>());
    });
    using Token = std::tuple_element_t<kArgs, std::tuple<ArgsAndToken&&...>>;
    return boost::asio::async_initiate<Token, void(std::exception_ptr)>(
        [](auto handler, std::string bytes, const std::shared_ptr<ClientCore>& core, const CallOptions& options,
           const std::string& client_id) {
          auto* call = new internal::OnewayCall(internal::OnewayCall::Handler(std::move(handler)));
          StartThriftCall(core, call, std::move(bytes), options, client_id);
        },
        std::get<kArgs>(all), std::move(bytes), core_, options_, client_id_);
  }

  // A handle to the same client whose calls use `options` (per-call timeout, CallInfo). With
  // options.info set, use the handle for one call at a time (the CallInfo is the call's).
  // (Async calls also decode replies with a per-thread codec; one that failed to decode a
  // reply, or decoded a large one, is rebuilt so that it keeps no state or memory from it.)
  ThriftClient WithOptions(CallOptions options) const {
    ThriftClient c = *this;
    c.options_ = std::move(options);
    return c;
  }

  // Closes the client: pending calls fail, later calls fail with kClientClosed.
  void Close() const {
    if (core_) core_->Close();
  }
  const std::shared_ptr<ClientCore>& core() const noexcept { return core_; }
  Protocol protocol() const noexcept { return protocol_; }
  explicit operator bool() const noexcept { return core_ != nullptr; }

 private:
  std::shared_ptr<ClientCore> core_;
  Protocol protocol_ = Protocol::kBinary;
  std::string client_id_;
  CallOptions options_;
};

}  // namespace scales::thrift

// SCALES_THRIFT_CALL(client, method, args..., token): client.Async(&G::send_method,
// &G::recv_method, args..., token) without naming the generated class.
#define SCALES_THRIFT_CALL(client, method, ...)                                              \
  (client).Async(&::std::decay_t<decltype(client)>::Generated::send_##method,                \
                 &::std::decay_t<decltype(client)>::Generated::recv_##method, __VA_ARGS__)
// SCALES_THRIFT_ONEWAY(client, method, args..., token) for oneway methods.
#define SCALES_THRIFT_ONEWAY(client, method, ...) \
  (client).AsyncOneway(&::std::decay_t<decltype(client)>::Generated::send_##method, __VA_ARGS__)
