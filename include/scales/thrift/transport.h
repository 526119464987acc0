#pragma once
// ThriftTransportSink (role "transport"): one TCP connection carrying one Thrift request at a
// time (pooled by the WatermarkPool). Framed (default: a 4-byte big-endian length before every
// message, as TFramedTransport) or buffered (unframed: the reply's end is found by parsing the
// protocol incrementally). The request is the MethodCallMessage's Stream (the serializer passes
// it down); the reply bytes are written into the message's reply slot (a scales::Stream) and
// passed up. Oneway calls complete once written. A request that is cancelled (timeout) or a
// reply that breaks a limit closes the connection: a Thrift connection with an unanswered
// request on it cannot be reused. While idle the connection watches its socket so a server
// that closed it is noticed before reuse. With `tls.enabled`, TLS from the first byte (as
// Apache Thrift's TSSLSocket; see docs/tls.md).
//
// Thread safety: one connection, used on one event loop.

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/thrift/message.h"
#include "scales/transport/connection_sink.h"
#include "scales/transport/tls.h"

namespace scales::thrift {

// How messages are delimited on the connection.
enum class Framing { kFramed, kBuffered };

const char* ToString(Framing f) noexcept;

struct TransportOptions {
  // Framed (TFramedTransport; the default, as scales and Finagle) or buffered (unframed).
  Framing framing = Framing::kFramed;
  // TCP connect timeout. Default 5 s; zero = none.
  Duration connect_timeout = std::chrono::seconds(5);
  // Largest reply accepted (the frame length for framed, the message for buffered); a larger
  // one fails the call with kResponseTooLarge and closes the connection. Also the largest
  // request sent (kRequestTooLarge). Default 16,384,000 bytes, libthrift's default frame limit
  // (TConfiguration::DEFAULT_MAX_FRAME_SIZE): a default Apache server closes the connection on a
  // larger request frame, so the client refuses it before sending.
  size_t max_frame_bytes = 16384000;
  // TLS from the first byte (Apache Thrift's TSSLSocket / TSSLServerSocket). Off by default;
  // ?tls=on in the URI turns it on.
  TlsOptions tls;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable:
// connect_timeout >= 0, 0 < max_frame_bytes <= 2 GiB - 1, TLS options (Validate(TlsOptions)).
void Validate(const TransportOptions& o);

class ThriftTransportSink final : public ConnectionSink {
 public:
  ThriftTransportSink(const SinkContext& ctx, TransportOptions options);
  ~ThriftTransportSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  std::string_view name() const override {
    return options_.framing == Framing::kFramed ? "thrift-framed-transport" : "thrift-buffered-transport";
  }

 protected:
  bool busy() const override { return current_ != nullptr; }
  // A Thrift server handles a call once its whole frame (or message) has come.
  bool needs_whole_request() const override { return true; }
  void Finish(error_code ec, std::string detail) override;

 private:
  ParseResult ParseReply(boost::beast::flat_buffer& in) override;
  // The default, plus a hint when no reply has come on the connection: a server of the other
  // framing closes the connection at the first request.
  ParseResult ParseEof(size_t bytes) override;
  // "reply for <method>" and "request for <method>" while a request is on the connection, so
  // that what the connection reports about writing it or reading its reply (a failed write, a
  // close mid-reply, a reset, a TLS error, Close()) names the method.
  std::string_view reply_noun() const override;
  std::string_view request_noun() const override;

  TransportOptions options_;
  // Owned by the connection (not the call) so that an operation still pending when the call
  // is answered never touches the call's memory.
  std::string write_buf_;
  SinkStack* current_ = nullptr;
  Stream* reply_ = nullptr;
  bool oneway_ = false;
  // The sequence id of the request on the connection (the serializer's): a reply with another
  // (a stray reply, e.g. to a oneway call, or a duplicate) closes the connection, which would
  // otherwise stay one reply behind.
  std::optional<int32_t> seqid_;
  // The method of the request on the connection (the call's message, alive until Finish), which
  // the reply's errors name.
  const std::string* method_ = nullptr;
  std::string_view Method() const noexcept {
    return method_ != nullptr && !method_->empty() ? std::string_view(*method_) : std::string_view("?");
  }
  mutable std::string reply_noun_;  // reply_noun()'s text
  mutable std::string request_noun_;  // request_noun()'s text
  // Whether a reply has been read on the connection (ParseEof's hint).
  bool replied_ = false;
  // Buffered framing: where the reply's walk stopped, so each read resumes it.
  thrift::MessageScanner scanner_;
  ParseResult Done();
};

// Provider of the ThriftTransportSink (role "transport"). Throws like Validate(options), and
// kInvalidArgument naming the file when a TLS file cannot be loaded (MakeTlsContext).
SinkProvider ThriftTransportProvider(TransportOptions options = {});

}  // namespace scales::thrift
