#pragma once
// ThriftTransportSink (role "transport"): one TCP connection carrying one Thrift request at a
// time (pooled by the WatermarkPool). Framed (default: a 4-byte big-endian length before every
// message, as TFramedTransport) or buffered (unframed: the reply's end is found by parsing the
// protocol incrementally). The request is the MethodCallMessage's Stream (the serializer passes
// it down); the reply bytes are written into the message's reply slot (a scales::Stream) and
// passed up. Oneway calls complete once written. A request that is cancelled (timeout) or a
// reply that breaks a limit closes the connection: a Thrift connection with an unanswered
// request on it cannot be reused. While idle the connection watches its socket so a server
// that closed it is noticed before reuse.
//
// Thread safety: one connection, used on one event loop.

#include <array>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/transport/tcp.h"

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
  // request sent (kRequestTooLarge). Default 16 MiB (libthrift's TFramedTransport default).
  size_t max_frame_bytes = 16 * 1024 * 1024;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable:
// connect_timeout >= 0, 0 < max_frame_bytes <= 2 GiB - 1.
void Validate(const TransportOptions& o);

class ThriftTransportSink final : public ClientMessageSink {
 public:
  ThriftTransportSink(const SinkContext& ctx, TransportOptions options);
  ~ThriftTransportSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  void Close() override;
  SinkStatus status() const override;
  std::string_view name() const override {
    return options_.framing == Framing::kFramed ? "thrift-framed-transport" : "thrift-buffered-transport";
  }

 protected:
  void DoOpen(OpenHandler handler) override;

 private:
  enum class State { kIdle, kConnecting, kOpen, kClosed };

  std::shared_ptr<ThriftTransportSink> self() {
    return std::static_pointer_cast<ThriftTransportSink>(shared_from_this());
  }
  void OnConnected(error_code ec);
  void OnWritten(uint64_t generation, const boost::system::error_code& ec, size_t bytes);
  void ReadFrameHeader();
  void OnFrameHeader(uint64_t generation, const boost::system::error_code& ec, size_t bytes);
  void OnFrameBody(uint64_t generation, const boost::system::error_code& ec, size_t bytes);
  void ReadSome();
  void OnReadSome(uint64_t generation, const boost::system::error_code& ec, size_t bytes);
  void ReadFailed(const boost::system::error_code& ec);
  void WatchIdle();
  void Finish(error_code ec, std::string detail);
  void Shutdown();

  EventLoop& loop_;
  TransportOptions options_;
  TcpConnection conn_;
  State state_ = State::kIdle;
  OpenWaiters open_waiters_;
  // Owned by the connection (not the call) so that an operation still pending when the call
  // is answered never touches the call's memory.
  std::string write_buf_;
  std::string read_buf_;
  size_t read_size_ = 0;
  std::array<unsigned char, 4> frame_header_{};
  SinkStack* current_ = nullptr;
  Stream* reply_ = nullptr;
  bool oneway_ = false;
  bool writing_ = false;
  uint64_t generation_ = 0;  // bumps per request and on close; stale handlers compare it
};

// Provider of the ThriftTransportSink (role "transport"). Throws like Validate(options).
SinkProvider ThriftTransportProvider(TransportOptions options = {});

}  // namespace scales::thrift
