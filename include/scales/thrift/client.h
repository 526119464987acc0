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

#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <thrift/protocol/TProtocol.h>
#include <thrift/transport/TBufferTransports.h>

#include "scales/core/client.h"
#include "scales/core/dispatcher.h"
#include "scales/thrift/message.h"

namespace scales::thrift {

// A protocol writer/reader of kind `protocol` over `transport`.
std::shared_ptr<apache::thrift::protocol::TProtocol> MakeProtocol(
    Protocol protocol, std::shared_ptr<apache::thrift::transport::TTransport> transport);

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
  // Consumes the outcome, on the call's event loop. `defer`: the call is still inside its
  // initiating function, so the user's handler must be posted, not run inline. The call is
  // destroyed right after.
  virtual void Deliver(RawReply reply, const boost::asio::any_io_executor& fallback, bool defer) = 0;

 private:
  CallInfo own_info_;
};

// Starts `call` on `core` (or fails it, later, when `core` is empty). Applies `options`.
void StartThriftCall(const std::shared_ptr<ClientCore>& core, ThriftCall* call, std::string bytes,
                     const CallOptions& options, const std::string& client_id);

// Sends `request` through `core` and waits for the reply bytes. Throws scales::Error on any
// failure, and kBlockingCallOnEventLoop on one of the client's loops.
std::string BlockingRoundTrip(const std::shared_ptr<ClientCore>& core, std::string request,
                              const CallOptions& options, const std::string& client_id);

// The transport under a blocking call's generated client: a memory buffer whose flush() (which
// the generated send_X() calls after writing) sends the written message through the stack,
// waits, and leaves the reply in the buffer for recv_X(). One per call; not thread-safe.
class BlockingTransport final : public apache::thrift::transport::TMemoryBuffer {
 public:
  BlockingTransport(std::shared_ptr<ClientCore> core, CallOptions options, std::string client_id)
      : core_(std::move(core)), options_(std::move(options)), client_id_(std::move(client_id)) {}
  void flush() override;

 private:
  std::shared_ptr<ClientCore> core_;
  CallOptions options_;
  std::string client_id_;
};

namespace internal {

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

// A generated client over a memory buffer, kept per thread, service and protocol (Codec<G>::
// For) and reused by every call made on that thread: building one costs about five heap
// allocations (buffer, its TConfiguration, protocol), more than the rest of a ThriftMux call.
// Only Encode and Decode use it, and neither runs user code while it is in use.
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
  // Messages larger than this are not copied into the reused buffer (Decode), and a buffer
  // that grew past it is dropped after use, so a thread keeps little memory.
  static constexpr size_t kReuseLimit = 64 * 1024;

  explicit Codec(Protocol protocol) : buffer_(std::make_shared<Buffer>()), gen_(MakeProtocol(protocol, buffer_)) {}

  static std::unique_ptr<Codec>& For(Protocol protocol) {
    thread_local std::unique_ptr<Codec> codecs[2];
    auto& c = codecs[protocol == Protocol::kCompact ? 1 : 0];
    if (!c) c = std::make_unique<Codec>(protocol);
    return c;
  }
  Buffer& buffer() noexcept { return *buffer_; }
  G& gen() noexcept { return gen_; }

 private:
  std::shared_ptr<Buffer> buffer_;
  G gen_;
};

// Serialises a call with the thread's generated client `G` (Codec).
template <class G, class Write>
std::string Encode(Protocol protocol, Write&& write) {
  auto& codec = Codec<G>::For(protocol);
  codec->buffer().Reset();
  write(codec->gen());
  std::string bytes = codec->buffer().getBufferAsString();
  codec->buffer().Reset();
  if (bytes.size() > Codec<G>::kReuseLimit) codec.reset();
  return bytes;
}

// Decodes a reply with the thread's generated client `G` (Codec; a large reply with a fresh one
// reading it in place); throws what recv_X throws.
template <class G, class Recv>
typename RecvTraits<Recv>::Result Decode(Protocol protocol, std::string& bytes, Recv recv) {
  using R = typename RecvTraits<Recv>::Result;
  auto run = [&](G& gen) -> R {
    if constexpr (RecvTraits<Recv>::kOutParam) {
      R r{};
      (gen.*recv)(r);
      return r;
    } else {
      return (gen.*recv)();
    }
  };
  if (bytes.size() > Codec<G>::kReuseLimit) {  // read in place rather than copy a large reply
    auto buf = std::make_shared<apache::thrift::transport::TMemoryBuffer>(
        reinterpret_cast<uint8_t*>(bytes.data()), static_cast<uint32_t>(bytes.size()));
    G gen(MakeProtocol(protocol, buf));
    return run(gen);
  }
  auto& codec = Codec<G>::For(protocol);
  codec->buffer().Reset();
  codec->buffer().write(reinterpret_cast<const uint8_t*>(bytes.data()), static_cast<uint32_t>(bytes.size()));
  return run(codec->gen());
}

// Runs `h(args...)` on its associated executor (else `fallback`); posted first when `defer`.
template <class Handler, class... Args>
void CompleteHandler(Handler h, const boost::asio::any_io_executor& fallback, bool defer, Args... args) {
  scales::internal::CompleteOn(std::move(h), fallback, defer, std::move(args)...);
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
  }

 protected:
  void Deliver(RawReply reply, const boost::asio::any_io_executor& fallback, bool defer) override {
    std::exception_ptr error;
    if constexpr (std::is_void_v<Result>) {
      if (reply.error) {
        error = std::make_exception_ptr(Error(reply.error, reply.detail));
      } else {
        try {
          Decode<G>(protocol_, reply.bytes, recv_);
        } catch (...) {
          error = std::current_exception();
        }
      }
      CompleteHandler(std::move(handler_), fallback, defer, error);
    } else {
      Result value{};
      if (reply.error) {
        error = std::make_exception_ptr(Error(reply.error, reply.detail));
      } else {
        try {
          value = Decode<G>(protocol_, reply.bytes, recv_);
        } catch (...) {
          error = std::current_exception();
        }
      }
      CompleteHandler(std::move(handler_), fallback, defer, error, std::move(value));
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
  explicit OnewayCall(Handler handler) : handler_(std::move(handler)) { ConnectCancellation(handler_); }

 protected:
  void Deliver(RawReply reply, const boost::asio::any_io_executor& fallback, bool defer) override {
    std::exception_ptr error;
    if (reply.error) error = std::make_exception_ptr(Error(reply.error, reply.detail));
    CompleteHandler(std::move(handler_), fallback, defer, error);
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
          generated_(MakeProtocol(protocol, transport_)) {}
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
    return boost::asio::async_initiate<Token, Signature>(
        [core = core_, protocol = protocol_, recv, options = options_, client_id = client_id_](
            auto handler, std::string bytes) {
          using Call = internal::DecodingCall<G, Recv, decltype(handler)>;
          auto* call = new Call(std::move(handler), protocol, recv);
          StartThriftCall(core, call, std::move(bytes), options, client_id);
        },
        std::get<kArgs>(all), std::move(bytes));
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
        [core = core_, options = options_, client_id = client_id_](auto handler, std::string bytes) {
          auto* call = new internal::OnewayCall(internal::OnewayCall::Handler(std::move(handler)));
          StartThriftCall(core, call, std::move(bytes), options, client_id);
        },
        std::get<kArgs>(all), std::move(bytes));
  }

  // A handle to the same client whose calls use `options` (per-call timeout, CallInfo).
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
