#include "scales/thrift/client.h"

#include <future>
#include <memory>
#include <new>

#include <fmt/format.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>

#include "scales/core/timeout_sink.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/thrift/thrift.h"

namespace scales::thrift {

std::shared_ptr<apache::thrift::protocol::TProtocol> MakeProtocol(
    Protocol protocol, std::shared_ptr<apache::thrift::transport::TTransport> transport) {
  if (protocol == Protocol::kCompact) {
    return std::make_shared<LimitedProtocol<apache::thrift::protocol::TCompactProtocol>>(std::move(transport));
  }
  return std::make_shared<LimitedProtocol<apache::thrift::protocol::TBinaryProtocol>>(std::move(transport));
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
  auto work = std::move(work_);  // released once the handler is on its way (Deliver)
  std::string detail;
  if (msg.error) detail = info->detail.empty() ? msg.error.message() : info->detail;
  Deliver(msg.error, detail, fallback, in_initiation);
  internal::RecycleBytes(std::move(request.data));
  internal::RecycleBytes(std::move(reply.data));
  delete this;
}

std::exception_ptr ThriftCall::MalformedReply(const std::exception& e) const {
  return std::make_exception_ptr(
      Error(make_error_code(Errc::kProtocolError),
            fmt::format("malformed Thrift reply from {} for {}: {}", info->endpoint.empty() ? "?" : info->endpoint,
                        message.method, e.what())));
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

 protected:
  void Deliver(const error_code& error, std::string& detail, const boost::asio::any_io_executor&, bool) override {
    RawReply r{error, std::move(detail), {}};
    if (!error) r.bytes = std::move(reply.data);
    done.set_value(std::move(r));
  }
};

}  // namespace

std::string BlockingRoundTrip(const std::shared_ptr<ClientCore>& core, std::string request,
                              const CallOptions& options, const std::string& client_id) {
  if (!core) throw Error(make_error_code(Errc::kClientClosed), "ThriftClient is empty (default-constructed)");
  if (core->IsLoopThread()) {
    throw Error(make_error_code(Errc::kBlockingCallOnEventLoop),
                fmt::format("client {}: blocking Thrift call made on one of the client's event loops; "
                            "use Async there",
                            core->name()));
  }
  auto* call = new BlockingCall;
  auto fut = call->done.get_future();
  StartThriftCall(core, call, std::move(request), options, client_id);
  RawReply reply = fut.get();
  if (reply.error) throw Error(reply.error, reply.detail);
  return std::move(reply.bytes);
}

void BlockingTransport::flush() {
  std::string request = getBufferAsString();
  resetBuffer();
  std::string reply = BlockingRoundTrip(core_, std::move(request), options_, client_id_);
  if (reader_ != nullptr) reader_->LimitReadsTo(reply.size());
  write(reinterpret_cast<const uint8_t*>(reply.data()), static_cast<uint32_t>(reply.size()));
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
