#include "scales/thrift/serializer.h"

#include <climits>

#include <fmt/format.h>

#include "scales/core/sink_stack.h"
#include "scales/thrift/message.h"

namespace scales::thrift {

namespace {

// The per-request context fits in the pointer-sized slot of the sink stack (no allocation):
// bits 0-30 the assigned sequence id (always positive), bit 31 "oneway", bits 32-63 the
// caller's original sequence id.
static_assert(sizeof(void*) >= 8, "the Thrift serializer packs its context into a 64-bit pointer");

void* Pack(int32_t assigned, bool oneway, int32_t original) {
  uint64_t v = static_cast<uint32_t>(assigned) & 0x7fffffffu;
  if (oneway) v |= 0x80000000u;
  v |= static_cast<uint64_t>(static_cast<uint32_t>(original)) << 32;
  return reinterpret_cast<void*>(static_cast<uintptr_t>(v));
}

void Unpack(void* ctx, int32_t& assigned, bool& oneway, int32_t& original) {
  auto v = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ctx));
  assigned = static_cast<int32_t>(v & 0x7fffffffu);
  oneway = (v & 0x80000000u) != 0;
  original = static_cast<int32_t>(static_cast<uint32_t>(v >> 32));
}

const char* TypeName(MessageType t) {
  switch (t) {
    case MessageType::kCall:
      return "call";
    case MessageType::kReply:
      return "reply";
    case MessageType::kException:
      return "exception";
    case MessageType::kOneway:
      return "oneway";
  }
  return "?";
}

std::string Where(const MethodCallMessage& msg) {
  return msg.properties.endpoint.empty() ? std::string("the server") : msg.properties.endpoint;
}

}  // namespace

void ThriftSerializerSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  Stream* s = stream != nullptr ? stream : msg.payload<Stream>();
  if (s == nullptr) {
    auto m = MethodReturnMessage::Failure(make_error_code(Errc::kInvalidArgument),
                                          "the Thrift serializer needs a scales::Stream payload");
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  std::string why;
  auto header = ParseMessageHeader(s->data, &why);
  if (!header || (header->type != MessageType::kCall && header->type != MessageType::kOneway)) {
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kInvalidArgument),
        header ? fmt::format("Thrift request for {} is a {} message, not a call", header->name,
                             TypeName(header->type))
               : fmt::format("the request is not a Thrift message: {}", why));
    stack.AsyncProcessResponse(nullptr, m);
    return;
  }
  const int32_t assigned = next_seqid_;
  next_seqid_ = next_seqid_ == INT32_MAX ? 1 : next_seqid_ + 1;
  const int32_t original = header->seqid;
  RewriteSeqId(s->data, *header, assigned);
  msg.method = std::move(header->name);
  stack.Push(this, Pack(assigned, header->type == MessageType::kOneway, original));
  next_->AsyncProcessRequest(stack, msg, s);
}

void ThriftSerializerSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                                MethodReturnMessage& msg) {
  int32_t assigned = 0;
  int32_t original = 0;
  bool oneway = false;
  Unpack(context, assigned, oneway, original);
  // Leave the request bytes as the caller wrote them, so a sink above that sends the same
  // request again (a retry) starts from the caller's sequence id.
  if (Stream* request = stack.message().payload<Stream>()) {
    auto h = ParseMessageHeader(request->data);
    if (h && h->seqid == assigned) RewriteSeqId(request->data, *h, original);
  }
  if (!msg.ok() || oneway) {
    stack.AsyncProcessResponse(stream, msg);
    return;
  }
  const MethodCallMessage& call = stack.message();
  Stream* s = stream != nullptr ? stream : call.reply_slot<Stream>();
  if (s == nullptr) {
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kProtocolError),
        fmt::format("no reply bytes for {} from {}", call.method, Where(call)));
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  std::string why;
  auto header = ParseMessageHeader(s->data, &why);
  std::string problem;
  if (!header) {
    problem = fmt::format("undecodable reply header: {}", why);
  } else if (header->type != MessageType::kReply && header->type != MessageType::kException) {
    problem = fmt::format("reply is a {} message", TypeName(header->type));
  } else if (header->name != call.method) {
    problem = fmt::format("reply names method '{}' (seqid {}), expected '{}' (seqid {})", header->name,
                          header->seqid, call.method, assigned);
  } else if (header->seqid != assigned) {
    problem = fmt::format("reply has seqid {}, expected {}", header->seqid, assigned);
  }
  if (!problem.empty()) {
    auto m = MethodReturnMessage::Failure(
        make_error_code(Errc::kProtocolError),
        fmt::format("Thrift reply from {} for {}: {}", Where(call), call.method, problem));
    stack.AsyncProcessResponse(stream, m);
    return;
  }
  RewriteSeqId(s->data, *header, original);
  stack.AsyncProcessResponse(stream, msg);
}

SinkProvider ThriftSerializerProvider() {
  return SinkProvider{std::string(roles::kFormatter), "thrift-serializer",
                      [](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                        return std::make_shared<ThriftSerializerSink>(next(ctx));
                      }};
}

}  // namespace scales::thrift
