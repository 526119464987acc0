#include "scales/thrift/client.h"

#include <future>
#include <memory>
#include <new>
#include <optional>
#include <string_view>

#include <fmt/format.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>

#include "scales/core/timeout_sink.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/thrift/thrift.h"

namespace scales::thrift {

namespace {

using apache::thrift::protocol::TMessageType;
using apache::thrift::protocol::TType;

// Apache's protocol P (TBinaryProtocol or TCompactProtocol) with CheckedReads, whose reads (and
// skips) throw the scales::Error an async call gets where Apache's throw TProtocolException,
// TTransportException or std::bad_alloc (BlockingTransport::ThrowDecodeError). The generated
// code calls the *_virt functions through TProtocol.
template <class P>
class BlockingProtocol final : public CheckedReads<P> {
 public:
  explicit BlockingProtocol(std::shared_ptr<BlockingTransport> transport)
      : CheckedReads<P>(transport), transport_(*transport) {}

  uint32_t readMessageBegin_virt(std::string& name, TMessageType& type, int32_t& seqid) override {
    return Guard([&] { return CheckedReads<P>::readMessageBegin_virt(name, type, seqid); });
  }
  uint32_t readMessageEnd_virt() override {
    return Guard([&] { return P::readMessageEnd_virt(); });
  }
  uint32_t readStructBegin_virt(std::string& name) override {
    return Guard([&] { return CheckedReads<P>::readStructBegin_virt(name); });
  }
  uint32_t readStructEnd_virt() override {
    return Guard([&] { return CheckedReads<P>::readStructEnd_virt(); });
  }
  uint32_t readFieldBegin_virt(std::string& name, TType& type, int16_t& id) override {
    return Guard([&] { return CheckedReads<P>::readFieldBegin_virt(name, type, id); });
  }
  uint32_t readFieldEnd_virt() override {
    return Guard([&] { return P::readFieldEnd_virt(); });
  }
  uint32_t readMapBegin_virt(TType& key, TType& value, uint32_t& size) override {
    return Guard([&] { return CheckedReads<P>::readMapBegin_virt(key, value, size); });
  }
  uint32_t readMapEnd_virt() override {
    return Guard([&] { return P::readMapEnd_virt(); });
  }
  uint32_t readListBegin_virt(TType& element, uint32_t& size) override {
    return Guard([&] { return CheckedReads<P>::readListBegin_virt(element, size); });
  }
  uint32_t readListEnd_virt() override {
    return Guard([&] { return P::readListEnd_virt(); });
  }
  uint32_t readSetBegin_virt(TType& element, uint32_t& size) override {
    return Guard([&] { return CheckedReads<P>::readSetBegin_virt(element, size); });
  }
  uint32_t readSetEnd_virt() override {
    return Guard([&] { return P::readSetEnd_virt(); });
  }
  uint32_t readBool_virt(bool& value) override {
    return Guard([&] { return P::readBool_virt(value); });
  }
  uint32_t readBool_virt(std::vector<bool>::reference value) override {
    return Guard([&] { return P::readBool_virt(value); });
  }
  uint32_t readByte_virt(int8_t& value) override {
    return Guard([&] { return P::readByte_virt(value); });
  }
  uint32_t readI16_virt(int16_t& value) override {
    return Guard([&] { return P::readI16_virt(value); });
  }
  uint32_t readI32_virt(int32_t& value) override {
    return Guard([&] { return P::readI32_virt(value); });
  }
  uint32_t readI64_virt(int64_t& value) override {
    return Guard([&] { return P::readI64_virt(value); });
  }
  uint32_t readDouble_virt(double& value) override {
    return Guard([&] { return P::readDouble_virt(value); });
  }
  uint32_t readString_virt(std::string& value) override {
    return Guard([&] { return CheckedReads<P>::readString_virt(value); });
  }
  uint32_t readBinary_virt(std::string& value) override {
    return Guard([&] { return CheckedReads<P>::readBinary_virt(value); });
  }
  uint32_t skip_virt(TType type) override {
    return Guard([&] { return CheckedReads<P>::skip_virt(type); });
  }

 private:
  template <class Read>
  uint32_t Guard(Read read) {
    try {
      return read();
    } catch (const std::exception& e) {
      transport_.ThrowDecodeError(e);
      throw;
    }
  }

  size_t BytesLeft() const noexcept override { return transport_.available_read(); }

  const BlockingTransport& transport_;  // owned by the same Proxy, which outlives the reads
};

}  // namespace

std::shared_ptr<apache::thrift::protocol::TProtocol> MakeProtocol(Protocol protocol,
                                                                  std::shared_ptr<BlockingTransport> transport) {
  if (protocol == Protocol::kCompact) {
    return std::make_shared<BlockingProtocol<apache::thrift::protocol::TCompactProtocol>>(std::move(transport));
  }
  return std::make_shared<BlockingProtocol<apache::thrift::protocol::TBinaryProtocol>>(std::move(transport));
}

const std::shared_ptr<apache::thrift::TConfiguration>& ReplyConfiguration() {
  static const auto config = std::make_shared<apache::thrift::TConfiguration>(INT32_MAX);
  return config;
}

// --- spare strings for call bytes ---------------------------------------------------------

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SCALES_SPARE_BYTES 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SCALES_SPARE_BYTES 0
#endif
#endif
#ifndef SCALES_SPARE_BYTES
#define SCALES_SPARE_BYTES 1
#endif

namespace internal {
namespace {

#if SCALES_SPARE_BYTES
// Plain data (the strings live in raw slots), so it is usable at any point of the thread's
// life; SpareBytesOwner destroys the strings when the thread exits and closes the pool for
// whatever completes after it.
struct SpareBytes {
  alignas(std::string) unsigned char slots[kMaxSpareBytes][sizeof(std::string)];
  size_t count;
  bool registered;
  bool closed;
  std::string* at(size_t i) noexcept { return std::launder(reinterpret_cast<std::string*>(slots[i])); }
};
thread_local SpareBytes t_spare_bytes{};

struct SpareBytesOwner {
  ~SpareBytesOwner() {
    SpareBytes& p = t_spare_bytes;
    while (p.count > 0) std::destroy_at(p.at(--p.count));
    p.closed = true;
  }
};
thread_local SpareBytesOwner t_spare_bytes_owner;
#endif

}  // namespace

std::string TakeSpareBytes() noexcept {
#if SCALES_SPARE_BYTES
  SpareBytes& p = t_spare_bytes;
  if (p.count > 0) {
    std::string* s = p.at(--p.count);
    std::string bytes = std::move(*s);
    std::destroy_at(s);
    return bytes;
  }
#endif
  return {};
}

void RecycleBytes(std::string&& bytes) noexcept {
#if SCALES_SPARE_BYTES
  const size_t capacity = bytes.capacity();
  if (capacity <= std::string().capacity() || capacity > kMaxSpareCapacity) return;  // no storage / too big
  SpareBytes& p = t_spare_bytes;
  if (p.count == kMaxSpareBytes || p.closed) return;
  if (!p.registered) {
    p.registered = true;
    (void)&t_spare_bytes_owner;  // constructs it, so it frees the spares at thread exit
  }
  bytes.clear();
  std::construct_at(p.at(p.count), std::move(bytes));
  ++p.count;
#else
  (void)bytes;
#endif
}

}  // namespace internal

// --- calls ---------------------------------------------------------------------------------

ThriftCall::ThriftCall() {
  message.SetPayload(&request);
  message.SetReplySlot(&reply);
  info = &own_info_;
  // The transport writes the reply into it: storage kept from an earlier call saves an
  // allocation.
  reply.data = internal::TakeSpareBytes();
}

void ThriftCall::Complete(MethodReturnMessage& msg, const boost::asio::any_io_executor& fallback) {
  DisconnectCancellation();
  // Deliver hands work_ to CompleteOn, which releases it once the handler is on its way.
  std::string detail;
  if (msg.error) detail = info->detail.empty() ? msg.error.message() : info->detail;
  Deliver(msg.error, detail, fallback, in_initiation);
  internal::RecycleBytes(std::move(request.data));
  internal::RecycleBytes(std::move(reply.data));
  delete this;
}

namespace {

// What decoding the reply to `method` threw (`e`), as async and blocking calls report it: a
// reply that did not decode (kProtocolError) or whose declared contents could not be allocated
// (kResponseTooLarge); nullopt for what the reply carries (a declared exception,
// TApplicationException). The call's CallInfo, if any, says so too: the stack saw a whole reply,
// a success.
std::optional<Error> ReplyDecodeError(std::string_view client, const std::string& endpoint,
                                      const std::string& method, size_t reply_bytes, const std::exception& e,
                                      CallInfo* info) {
  const std::string_view where = endpoint.empty() ? std::string_view("?") : std::string_view(endpoint);
  std::optional<Error> error;
  if (internal::OutOfMemory(e)) {
    error.emplace(make_error_code(Errc::kResponseTooLarge),
                  fmt::format("client {}: decoding reply of {} from {} ({} bytes) failed: {} (what the reply "
                              "declares could not be allocated)",
                              client, method, where, reply_bytes, e.what()));
  } else if (internal::Malformed(e)) {
    error.emplace(make_error_code(Errc::kProtocolError),
                  fmt::format("client {}: malformed Thrift reply from {} for {}: {}", client, where, method, e.what()));
  } else {
    return std::nullopt;
  }
  if (info != nullptr) {
    info->error = error->scales_code();
    info->detail = error->what();
  }
  return error;
}

}  // namespace

std::exception_ptr ThriftCall::DecodeError(const std::exception& e) {
  auto error = ReplyDecodeError(client_name != nullptr ? std::string_view(*client_name) : "?", info->endpoint,
                                   message.method, reply.data.size(), e, info);
  return error ? std::make_exception_ptr(*error) : nullptr;
}

void StartThriftCall(const std::shared_ptr<ClientCore>& core, ThriftCall* call, std::string bytes,
                     const CallOptions& options, const std::string& client_id) {
  if (!core) {
    // An empty client handle: complete with an error, never inline.
    FailEmptyClient(call, options.info != nullptr ? options.info : call->info,
                    "ThriftClient is empty (default-constructed)");
    return;
  }
  call->request.data = std::move(bytes);
  if (auto strict = internal::ParseStrictHeader(call->request.data)) {
    call->message.method.assign(strict->name);
  } else if (auto header = ParseMessageHeader(call->request.data)) {
    call->message.method = std::move(header->name);
  }
  if (!options.headers.empty()) call->message.properties.headers = options.headers;
  if (options.trace) call->message.properties.trace = *options.trace;
  if (!client_id.empty()) call->message.properties.client_id = client_id;
  call->message.properties.idempotent = options.idempotent;
  call->timeout = options.timeout;
  // The dispatcher fills the caller's CallInfo directly (else the call's own, for the detail).
  if (options.info != nullptr) call->info = options.info;
  core->Dispatch(call);
}

namespace {

class BlockingCall final : public ThriftCall {
 public:
  std::promise<RawReply> done;
  std::string* endpoint = nullptr;  // receives the endpoint that answered, when set

 protected:
  void Deliver(const error_code& error, std::string& detail, const boost::asio::any_io_executor&, bool) override {
    RawReply r{error, std::move(detail), {}};
    if (!error) r.bytes = std::move(reply.data);
    if (endpoint != nullptr) *endpoint = info->endpoint;  // seen by the waiter after the promise
    done.set_value(std::move(r));
  }
};

}  // namespace

std::string BlockingRoundTrip(const std::shared_ptr<ClientCore>& core, std::string request,
                              const CallOptions& options, const std::string& client_id, std::string* endpoint) {
  if (!core) throw Error(make_error_code(Errc::kClientClosed), "ThriftClient is empty (default-constructed)");
  if (core->IsLoopThread()) {
    throw Error(make_error_code(Errc::kBlockingCallOnEventLoop),
                fmt::format("client {}: blocking Thrift call made on one of the client's event loops; "
                            "use Async there",
                            core->name()));
  }
  auto* call = new BlockingCall;
  call->endpoint = endpoint;
  auto fut = call->done.get_future();
  StartThriftCall(core, call, std::move(request), options, client_id);
  RawReply reply = fut.get();
  if (reply.error) throw Error(reply.error, reply.detail);
  return std::move(reply.bytes);
}

void BlockingTransport::flush() {
  std::string request = getBufferAsString();
  resetBuffer();
  auto header = ParseMessageHeader(request);
  method_ = header ? header->name : std::string();
  endpoint_.clear();
  std::string reply = BlockingRoundTrip(core_, std::move(request), options_, client_id_, &endpoint_);
  reply_bytes_ = reply.size();
  if (reader_ != nullptr) reader_->LimitReadsTo(reply.size());
  write(reinterpret_cast<const uint8_t*>(reply.data()), static_cast<uint32_t>(reply.size()));
}

void BlockingTransport::ThrowDecodeError(const std::exception& e) const {
  if (auto error = ReplyDecodeError(core_->name(), endpoint_, method_, reply_bytes_, e, options_.info)) throw *error;
}

void Validate(const ThriftOptions& o) {
  Validate(o.transport);
  Validate(o.pool);
  Validate(static_cast<const ResilienceOptions&>(o));
}

SinkStackSpec DefaultThriftStack(const ThriftOptions& options) {
  SinkStackSpec spec = ResilientStack<Stream>(options, ThriftSerializerProvider());
  // The URI's TLS keys (?tls=on&tls_ca_file=...) override the options.
  TransportOptions transport = options.transport;
  transport.tls = TlsOptionsForUri(options.client.uri, transport.tls);
  spec.WithSink(WatermarkPoolProvider(options.pool))
      .WithSink(ThriftTransportProvider(std::move(transport)));
  return spec;
}

std::shared_ptr<ClientCore> BuildThriftCore(const ThriftOptions& options, SinkStackSpec spec) {
  Validate(options);
  auto core = std::make_shared<ClientCore>(options.client, std::move(spec));
  core->OpenAndWait();
  return core;
}

}  // namespace scales::thrift
