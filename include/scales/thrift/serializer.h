#pragma once
// ThriftSerializerSink (role "formatter"): the Thrift formatter of the sink stack.
//
// The typed client serialises each call with the code Apache Thrift generates (which always
// writes sequence id 0) and puts the bytes in the call's Stream (the MethodCallMessage's
// payload, a scales::Stream). This sink parses the message header (binary strict or lenient,
// compact), gives the call a real sequence id (unique among the calls of this sink), records
// the method name in the message, and passes the Stream down. On the way back it checks that
// the reply names the same method and carries the same sequence id — a mismatch fails the
// call with kProtocolError naming the endpoint, the method and both ids — and then restores
// the caller's original sequence id so the generated recv_X() code accepts the reply.
// Oneway calls (T_ONEWAY) get no reply: the transport answers once the bytes are written.
// When the response passes, the request bytes get the caller's sequence id back (so a sink
// above that resends the same request, a retry, gets a fresh id again).
//
// Thread safety: one sink per client per event loop; used on that loop only.

#include <cstdint>
#include <string>

#include "scales/core/forwarding_sink.h"
#include "scales/core/provider.h"

namespace scales::thrift {

class ThriftSerializerSink final : public ForwardingSink {
 public:
  explicit ThriftSerializerSink(SinkPtr next) : ForwardingSink(std::move(next)) {}

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  std::string_view name() const override { return "thrift-serializer"; }

  // The sequence id the next request will get (for tests).
  int32_t next_seqid() const noexcept { return next_seqid_; }

 private:
  int32_t next_seqid_ = 1;  // 1 .. INT32_MAX, then wraps to 1
};

// Provider of the ThriftSerializerSink (role "formatter").
SinkProvider ThriftSerializerProvider();

}  // namespace scales::thrift
