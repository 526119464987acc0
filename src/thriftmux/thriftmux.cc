#include "scales/thriftmux/thriftmux.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <map>
#include <optional>
#include <string_view>

#include <fmt/format.h>

#include "scales/core/sink_stack.h"
#include "scales/core/timeout_sink.h"
#include "scales/discovery/uri.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/pool/singleton_pool.h"
#include "scales/thrift/message.h"
#include "scales/transport/tls.h"

namespace scales::thriftmux {

void Validate(const ThriftMuxOptions& o) {
  mux::Validate(o.session);
  scales::Validate(static_cast<const ResilienceOptions&>(o));
  // Sent as the ClientId context, whose value has a 2-byte length: a longer one would fail every
  // call at encoding.
  if (o.client_id.size() > 0xFFFF) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("client_id is {} bytes; limit 65535 (the ClientId context's 2-byte length)",
                            o.client_id.size()));
  }
}

namespace {

bool IsSessionUriKey(std::string_view key) {
  return key == "tls" || key.starts_with("tls_") || key == "opportunistic_tls";
}

// What a message is, for errors: "strict binary call", "compact reply", ...
std::string Kind(const thrift::MessageHeader& h) {
  const char* format = h.format == thrift::HeaderFormat::kBinaryStrict    ? "strict binary"
                       : h.format == thrift::HeaderFormat::kBinaryLenient ? "lenient binary"
                                                                          : "compact";
  const char* type = "oneway";
  if (h.type == thrift::MessageType::kCall) type = "call";
  if (h.type == thrift::MessageType::kReply) type = "reply";
  if (h.type == thrift::MessageType::kException) type = "exception";
  return fmt::format("{} {}", format, type);
}


}  // namespace

void ApplyUriOptions(ThriftMuxOptions& o) {
  std::string& uri = o.client.uri;
  const std::string original = uri;
  auto bad = [&](const std::string& why) {
    return Error(make_error_code(Errc::kBadUri), fmt::format("bad URI '{}': {}", original, why));
  };
  // https:// is tcp:// with TLS from the first byte, as for the other clients. The URI parser
  // adds tls=on to the query it gives discovery, which does not reach the session: say it here.
  constexpr std::string_view kHttps = "https://";
  const bool https = uri.size() >= kHttps.size() &&
                     std::equal(kHttps.begin(), kHttps.end(), uri.begin(), [](char a, char b) {
                       return a == static_cast<char>(std::tolower(static_cast<unsigned char>(b)));
                     });
  if (https) o.session.tls.enabled = true;
  // The query runs from '?' to a '#' after it (zk:// allows either order) or the end. The
  // URI parser reports malformed pairs; only ours are taken out here.
  const size_t q = uri.find('?');
  if (q == std::string::npos) return;
  size_t end = uri.find('#', q);
  if (end == std::string::npos) end = uri.size();
  std::map<std::string, std::string> ours;
  std::string rest;  // the other pairs, in order
  std::string_view query = std::string_view(uri).substr(q + 1, end - q - 1);
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    size_t eq = pair.find('=');
    std::string_view key = pair.substr(0, eq);
    if (eq == std::string_view::npos || !IsSessionUriKey(key)) {
      if (!rest.empty()) rest += '&';
      rest += pair;
      continue;
    }
    // Decoded as the URI parser decodes the other keys' values (tls_ca_file=/a%20b.pem).
    std::string value;
    const size_t offset = static_cast<size_t>(pair.data() - uri.data()) + eq + 1;
    if (std::string problem = DecodeUriQueryValue(key, offset, pair.substr(eq + 1), value); !problem.empty()) {
      throw bad(problem);
    }
    if (!ours.emplace(std::string(key), std::move(value)).second) {
      throw bad(fmt::format("query parameter '{}' is given twice", key));
    }
  }
  if (ours.empty()) return;
  if (auto it = ours.find("opportunistic_tls"); it != ours.end()) {
    auto level = mux::ParseOpportunisticTls(it->second);
    if (!level) throw bad(fmt::format("opportunistic_tls='{}' must be off, desired or required", it->second));
    o.session.opportunistic_tls = *level;
    ours.erase(it);
  }
  try {
    ApplyTlsQuery(ours, o.session.tls);
    if (o.session.opportunistic_tls == mux::OpportunisticTls::kOff) {
      RefuseIneffectiveTlsKeys(ours, o.session.tls,
                               "add tls=on, opportunistic_tls=desired|required, or use https://");
    }
  } catch (const Error& e) {
    throw bad(e.what());
  }
  if (https && !o.session.tls.enabled) throw bad(fmt::format("tls={} contradicts the https:// scheme", ours["tls"]));
  uri = original.substr(0, q) + (rest.empty() ? std::string() : "?" + rest) + original.substr(end);
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
  if (auto fast = thrift::internal::ParseStrictHeader(s->data); fast && fast->type == thrift::MessageType::kCall) {
    if (msg.method != fast->name) msg.method.assign(fast->name);
    stack.Push(this, reinterpret_cast<void*>(static_cast<intptr_t>(fast->seqid)));
    next_->AsyncProcessRequest(stack, msg, s);
    return;
  }
  // Not a strict binary call: say what it is.
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
    fail(Errc::kInvalidArgument, fmt::format("ThriftMux carries strict binary Thrift CALL messages only ({} is a {} "
                                             "message)",
                                             header->name, Kind(*header)));
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
    const auto expected_seqid = static_cast<int32_t>(reinterpret_cast<intptr_t>(context));
    if (auto fast = s ? thrift::internal::ParseStrictHeader(s->data) : std::nullopt;
        fast && fast->name == call.method && fast->seqid == expected_seqid &&
        (fast->type == thrift::MessageType::kReply || fast->type == thrift::MessageType::kException)) {
      stack.AsyncProcessResponse(stream, msg);
      return;
    }
    // Not a well-formed strict binary reply to this call: the full parser says what is wrong.
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
          fmt::format("bad ThriftMux reply from {} for {}: {}",
                      call.properties.endpoint.empty() ? std::string_view("the server")
                                                       : std::string_view(call.properties.endpoint),
                      call.method, problem));
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
                      },
                      {}};
}

SinkStackSpec DefaultThriftMuxStack(const ThriftMuxOptions& options) {
  SinkStackSpec spec = ResilientStack<Stream>(options, ThriftMuxSerializerProvider());
  spec.WithSink(SingletonPoolProvider(options.pool))
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
