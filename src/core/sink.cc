#include "scales/core/sink.h"

#include "scales/core/sink_stack.h"

#include <boost/asio/dispatch.hpp>

namespace scales {

const char* ToString(SinkStatus s) noexcept {
  switch (s) {
    case SinkStatus::kIdle: return "idle";
    case SinkStatus::kOpen: return "open";
    case SinkStatus::kBusy: return "busy";
    case SinkStatus::kClosed: return "closed";
  }
  return "unknown";
}

void ClientMessageSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                             MethodReturnMessage& msg) {
  stack.AsyncProcessResponse(stream, msg);
}

void ClientMessageSink::CancelRequest(SinkStack& stack, void* context, const error_code& reason) {
  // A sink that installs a cancel handler must override this; reaching here is a bug, but
  // answering keeps the exactly-once promise.
  auto msg = MethodReturnMessage::Failure(reason, "request cancelled");
  stack.AsyncProcessResponse(nullptr, msg);
}

void PostOpenCompletion(ClientMessageSink::OpenHandler handler,
                        const boost::asio::any_io_executor& fallback, error_code ec) {
  // Post to the loop first (never complete inside the initiating call), then dispatch to the
  // handler's own executor (a coroutine's strand, a future's system executor, ...).
  boost::asio::post(fallback, [h = std::move(handler), ec, fallback]() mutable {
    auto ex = boost::asio::get_associated_executor(h, fallback);
    boost::asio::dispatch(ex, [h = std::move(h), ec]() mutable { std::move(h)(ec); });
  });
}

void OpenWaiters::CompleteAll(const boost::asio::any_io_executor& fallback, error_code ec) {
  auto handlers = std::move(handlers_);
  handlers_.clear();
  for (auto& h : handlers) PostOpenCompletion(std::move(h), fallback, ec);
}

}  // namespace scales
