#include "scales/thrift/client.h"

#include <future>

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
    return std::make_shared<apache::thrift::protocol::TCompactProtocol>(std::move(transport));
  }
  return std::make_shared<apache::thrift::protocol::TBinaryProtocol>(std::move(transport));
}

ThriftCall::ThriftCall() {
  message.SetPayload(&request);
  message.SetReplySlot(&reply);
  info = &own_info_;
}

void ThriftCall::Complete(MethodReturnMessage& msg, const boost::asio::any_io_executor& fallback) {
  DisconnectCancellation();
  RawReply r;
  r.error = msg.error;
  if (msg.error) {
    r.detail = info->detail.empty() ? msg.error.message() : info->detail;
  } else {
    r.bytes = std::move(reply.data);
  }
  const bool defer = in_initiation;
  Deliver(std::move(r), fallback, defer);
  delete this;
}

void StartThriftCall(const std::shared_ptr<ClientCore>& core, ThriftCall* call, std::string bytes,
                     const CallOptions& options, const std::string& client_id) {
  if (!core) {
    // An empty client handle: complete with an error, never inline.
    boost::asio::post(boost::asio::system_executor(), [call] {
      MethodReturnMessage m = MethodReturnMessage::Failure(make_error_code(Errc::kClientClosed),
                                                           "ThriftClient is empty (default-constructed)");
      call->Complete(m, boost::asio::system_executor());
    });
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
  void Deliver(RawReply reply, const boost::asio::any_io_executor&, bool) override {
    done.set_value(std::move(reply));
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
