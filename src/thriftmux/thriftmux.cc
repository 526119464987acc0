#include "scales/thriftmux/thriftmux.h"

#include <fmt/format.h>

#include "scales/core/sink_stack.h"
#include "scales/core/timeout_sink.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/pool/singleton_pool.h"
#include "scales/thrift/message.h"

namespace scales::thriftmux {

void Validate(const ThriftMuxOptions& o) {
  mux::Validate(o.session);
  scales::Validate(static_cast<const ResilienceOptions&>(o));
}

void ThriftMuxSerializerSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  Stream* s = stream != nullptr ? stream : msg.payload<Stream>();
  auto fail = [&](Errc code, std::string detail) {
    auto m = MethodReturnMessage::Failure(make_error_code(code), std::move(detail));
    stack.AsyncProcessResponse(stream, m);
  };
  if (s == nullptr) {
    fail(Errc::kInvalidArgument, "the ThriftMux serializer needs a scales::Stream payload");
    return;
  }
  std::string error;
  auto header = thrift::ParseMessageHeader(s->data, &error);
  if (!header) {
    fail(Errc::kInvalidArgument, fmt::format("the request is not a Thrift message: {}", error));
    return;
  }
  if (header->type == thrift::MessageType::kOneway) {
    fail(Errc::kInvalidArgument,
         fmt::format("ThriftMux does not support one-way calls ({} is one-way)", header->name));
    return;
  }
  if (header->format != thrift::HeaderFormat::kBinaryStrict || header->type != thrift::MessageType::kCall) {
    fail(Errc::kInvalidArgument, "ThriftMux carries strict binary Thrift CALL messages only");
    return;
  }
  msg.method = header->name;
  stack.Push(this, reinterpret_cast<void*>(static_cast<intptr_t>(header->seqid)));
  next_->AsyncProcessRequest(stack, msg, s);
}

void ThriftMuxSerializerSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                                   MethodReturnMessage& msg) {
  if (msg.ok()) {
    const auto& call = stack.message();
    Stream* s = stream != nullptr ? stream : call.reply_slot<Stream>();
    std::string error;
    auto header = s ? thrift::ParseMessageHeader(s->data, &error) : std::nullopt;
    const auto expected = static_cast<int32_t>(reinterpret_cast<intptr_t>(context));
    std::string problem;
    if (!header) {
      problem = fmt::format("the reply is not a Thrift message: {}", error);
    } else if (header->name != call.method) {
      problem = fmt::format("the reply names method '{}', the call was '{}'", header->name, call.method);
    } else if (header->seqid != expected) {
      problem = fmt::format("the reply carries sequence id {}, the call had {}", header->seqid, expected);
    } else if (header->type != thrift::MessageType::kReply && header->type != thrift::MessageType::kException) {
      problem = "the reply is neither a REPLY nor an EXCEPTION message";
    }
    if (!problem.empty()) {
      auto m = MethodReturnMessage::Failure(
          make_error_code(Errc::kProtocolError),
          fmt::format("bad ThriftMux reply from {}: {}", call.properties.endpoint, problem));
      stack.AsyncProcessResponse(nullptr, m);
      return;
    }
  }
  stack.AsyncProcessResponse(stream, msg);
}

SinkProvider ThriftMuxSerializerProvider() {
  return SinkProvider{std::string(roles::kFormatter), "thriftmux-serializer",
                      [](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                        return std::make_shared<ThriftMuxSerializerSink>(next(ctx));
                      }};
}

SinkStackSpec DefaultThriftMuxStack(const ThriftMuxOptions& options) {
  SinkStackSpec spec = ResilientStack<Stream>(options, ThriftMuxSerializerProvider());
  spec.WithSink(SingletonPoolProvider())
      .WithSink(mux::MuxSessionProvider(options.session));
  return spec;
}

std::shared_ptr<ClientCore> BuildThriftMuxCore(const ThriftMuxOptions& options, SinkStackSpec spec) {
  Validate(options);
  auto core = std::make_shared<ClientCore>(options.client, std::move(spec));
  core->OpenAndWait();
  return core;
}

}  // namespace scales::thriftmux
