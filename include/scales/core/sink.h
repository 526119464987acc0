#pragma once
// ClientMessageSink: every layer of the stack (timeout, formatter, balancer, pool, transport)
// is a sink. Requests travel down through AsyncProcessRequest; a sink that wants the response
// pushes itself on the request's SinkStack, and the response travels back up through
// AsyncProcessResponse, each pushed sink seeing it exactly once.

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>

#include "scales/core/error.h"
#include "scales/core/message.h"
#include "scales/core/observable.h"

namespace scales {

class SinkStack;

// Channel state, as in scales: Idle (not connected yet, usable), Open (usable), Busy
// (usable but should be avoided: draining, lease expired, marked dead), Closed (unusable).
enum class SinkStatus { kIdle = 1, kOpen = 2, kBusy = 3, kClosed = 4 };

const char* ToString(SinkStatus s) noexcept;

// What a sink reports through on_faulted: the error and a message naming the endpoint and
// the step ("connect to 10.0.0.1:80 failed: Connection refused").
struct Fault {
  error_code error;
  std::string detail;
};

// Serialised bytes of a request or reply, produced and consumed by formatter and transport
// sinks (Thrift, Mux). HTTP transports work on the typed message directly.
struct Stream {
  std::string data;
};

// The base of every sink.
//
// Thread safety: a sink belongs to one event loop and is used only on its thread. AsyncOpen
// may be called several times concurrently: every caller's handler completes once the one
// underlying open does. Open handlers never run inside AsyncOpen; they run on the handler's
// associated executor (default: the loop's executor).
class ClientMessageSink : public std::enable_shared_from_this<ClientMessageSink> {
 public:
  using OpenSignature = void(error_code);
  using OpenHandler = boost::asio::any_completion_handler<OpenSignature>;

  virtual ~ClientMessageSink() = default;

  // Processes a request. The sink either answers it (stack.AsyncProcessResponse) or passes it
  // on; either way, exactly one response eventually unwinds `stack`. Once a sink has passed
  // a response up it must not touch the stack or the message again: the call may be gone.
  // It must not throw: nothing above it can tell whether the request was answered, passed on
  // or dropped, so a sink that cannot take a request answers it with a failure instead (the
  // call would otherwise never complete, and its client-wide accounting would leak).
  virtual void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) = 0;

  // Called for a response when this sink pushed itself with `context`. The default passes the
  // response on up.
  virtual void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                    MethodReturnMessage& msg);

  // Called when a request parked in this sink (SinkStack::SetCancelHandler) is cancelled
  // (timeout, caller cancellation, close). The sink must answer the request promptly, with
  // `reason` as the error, and forget it.
  virtual void CancelRequest(SinkStack& stack, void* context, const error_code& reason);

  // For a request parked in this sink: true if this sink sent nothing of it anywhere yet, so
  // that cancelling it has no side effects (Asio's `total`, SinkStack::CancelUnsent, which
  // leaves a retry's attempt alone itself). The default, false, is always safe: such a
  // cancellation is then ignored.
  virtual bool RequestUnsent(const SinkStack& /*stack*/, void* /*context*/) const { return false; }

  // The sink goes to the initiation as an argument, held by a shared_ptr when one owns it: a
  // token that defers the initiation (boost::asio::deferred, an awaitable awaited later) then
  // keeps the sink alive until the open starts, rather than starting it on a destroyed sink.
  template <class CompletionToken>
  auto AsyncOpen(CompletionToken&& token) {
    return boost::asio::async_initiate<CompletionToken, OpenSignature>(
        [](auto handler, ClientMessageSink* sink, const std::shared_ptr<ClientMessageSink>& /*keep*/) {
          sink->DoOpen(OpenHandler(std::move(handler)));
        },
        token, this, weak_from_this().lock());
  }

  // Closes the sink. Every request the sink (or a sink below it) holds is answered, with an
  // error, before Close() returns; so once it returns nothing refers to the sink and its
  // owner may destroy it (on a later loop turn: Close() may run inside a response path).
  // Later requests fail. Idempotent.
  virtual void Close() = 0;
  virtual SinkStatus status() const = 0;
  // Why the last open failed, in words (e.g. the TLS handshake's reason), or empty. Pools put
  // it into the error of the requests that waited for the connection.
  virtual std::string open_failure_detail() const { return {}; }

  // Raised by a sink whose underlying resource (connection, endpoint) became unusable.
  Observable<Fault>& on_faulted() noexcept { return on_faulted_; }

  // Short name for describe output and logs ("timeout", "heap-balancer", ...).
  virtual std::string_view name() const = 0;

 protected:
  virtual void DoOpen(OpenHandler handler) = 0;

  Observable<Fault> on_faulted_;
};

using SinkPtr = std::shared_ptr<ClientMessageSink>;

// Completes an open handler later (never inline): posts it to its associated executor, or to
// `fallback` when it has none.
void PostOpenCompletion(ClientMessageSink::OpenHandler handler,
                        const boost::asio::any_io_executor& fallback, error_code ec);

// Collects the handlers of concurrent AsyncOpen calls and completes them together.
class OpenWaiters {
 public:
  void Add(ClientMessageSink::OpenHandler h) { handlers_.push_back(std::move(h)); }
  bool empty() const noexcept { return handlers_.empty(); }
  size_t size() const noexcept { return handlers_.size(); }
  void CompleteAll(const boost::asio::any_io_executor& fallback, error_code ec);

 private:
  std::vector<ClientMessageSink::OpenHandler> handlers_;
};

}  // namespace scales
