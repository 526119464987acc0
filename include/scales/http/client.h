#pragma once
// The scales HTTP client (the seed's Http.NewClient):
//
//   auto client = scales::Http::NewClient("tcp://127.0.0.1:8080,127.0.0.1:8081");
//   scales::http::Response r = client.Get("/");                                   // blocking
//   client.AsyncGet("/", [](scales::error_code ec, scales::http::Response r) {});  // callback
//   auto f = client.AsyncGet("/", boost::asio::use_future);                        // future
//   auto r2 = co_await client.AsyncGet("/", boost::asio::use_awaitable);           // coroutine
//
// Default stack: dispatcher -> timeout -> retry -> aperture balancer -> failure accrual ->
// resurrector -> watermark pool -> HTTP/1.1 transport (keep-alive).
//
// Completion signature of every Async call: void(scales::error_code, http::Response). The
// handler runs on its associated executor, or else on one of the client's event loops; it
// never runs inside the Async call itself. Blocking calls throw scales::Error (what() names
// the client, endpoint, step and limit) and must not be made on the client's event loops
// (they fail with kBlockingCallOnEventLoop).
//
// Thread safety: HttpClient is a cheap handle (shared ownership); all calls are safe from
// any thread. The client closes when its last handle goes away (or on Close()).

#include <future>
#include <memory>
#include <string>
#include <string_view>

#include <boost/asio/async_result.hpp>

#include "scales/core/builder.h"
#include "scales/core/client.h"
#include "scales/core/dispatcher.h"
#include "scales/http/message.h"
#include "scales/http/transport.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/pool/watermark_pool.h"
#include "scales/resilience/default_stack.h"

namespace scales {

namespace http {

// Everything an HTTP client can be configured with. The balancer, resurrector, retry and
// failure-accrual settings come from ResilienceOptions (scales/resilience/default_stack.h).
struct HttpOptions : ResilienceOptions {
  ClientOptions client = [] {
    ClientOptions o;
    o.timeout = std::chrono::seconds(60);  // scales' HTTP default
    return o;
  }();
  TransportOptions transport;
  WatermarkPoolOptions pool;
  // Headers added to every request (after the request's own). A default header is left out
  // when the request or the call (CallOptions::headers) has one of that name.
  Headers default_headers;
};

class HttpClient {
 public:
  using Signature = void(error_code, Response);

  HttpClient() = default;

  // Blocking calls. Throw scales::Error on failure. The verbs put a '/' in front of a target
  // without one ("users" -> "/users"), but not in front of "*" or an absolute-form target
  // ("http://host/path"); Send() sends the request's target as given.
  Response Send(Request request, const CallOptions& options = {}) const;
  Response Get(std::string_view target, Headers headers = {}) const;
  Response Head(std::string_view target, Headers headers = {}) const;
  Response Delete(std::string_view target, Headers headers = {}) const;
  Response Options(std::string_view target, Headers headers = {}) const;
  Response Post(std::string_view target, std::string body, Headers headers = {}) const;
  Response Put(std::string_view target, std::string body, Headers headers = {}) const;
  Response Patch(std::string_view target, std::string body, Headers headers = {}) const;

  // Asynchronous calls; any Asio completion token.
  template <class Token>
  auto AsyncSend(Request request, CallOptions options, Token&& token) const {
    return boost::asio::async_initiate<Token, Signature>(
        // The request and options are the initiation's own (moved in by async_initiate, or
        // stored by a deferring token and given once): moved on, not copied. The core and the
        // default headers are arguments too: by reference for a token that initiates at once,
        // decay-copied by one that defers (use_awaitable, deferred).
        [](auto handler, auto&& req, auto&& opts, const std::shared_ptr<ClientCore>& core,
           const std::shared_ptr<const Headers>& defaults) {
          Start(core, defaults, std::move(req), std::move(opts),
                TypedCall<Response>::Handler(std::move(handler)));
        },
        token, std::move(request), std::move(options), core_, default_headers_);
  }
  template <class Token>
  auto AsyncSend(Request request, Token&& token) const {
    return AsyncSend(std::move(request), CallOptions{}, std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncGet(std::string_view target, Token&& token) const {
    return AsyncSend(Make("GET", target, {}, {}), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncGet(std::string_view target, Headers headers, Token&& token) const {
    return AsyncSend(Make("GET", target, {}, std::move(headers)), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncHead(std::string_view target, Token&& token) const {
    return AsyncSend(Make("HEAD", target, {}, {}), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncDelete(std::string_view target, Token&& token) const {
    return AsyncSend(Make("DELETE", target, {}, {}), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncOptions(std::string_view target, Token&& token) const {
    return AsyncSend(Make("OPTIONS", target, {}, {}), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncPost(std::string_view target, std::string body, Token&& token) const {
    return AsyncSend(Make("POST", target, std::move(body), {}), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncPost(std::string_view target, std::string body, Headers headers, Token&& token) const {
    return AsyncSend(Make("POST", target, std::move(body), std::move(headers)), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncPut(std::string_view target, std::string body, Token&& token) const {
    return AsyncSend(Make("PUT", target, std::move(body), {}), std::forward<Token>(token));
  }
  template <class Token>
  auto AsyncPatch(std::string_view target, std::string body, Token&& token) const {
    return AsyncSend(Make("PATCH", target, std::move(body), {}), std::forward<Token>(token));
  }

  // Closes the client: pending calls fail, later calls fail with kClientClosed.
  void Close() const;
  // The client's core (name, options, runtime, server set, Describe()).
  const std::shared_ptr<ClientCore>& core() const noexcept { return core_; }
  explicit operator bool() const noexcept { return core_ != nullptr; }

 private:
  friend class HttpClientBuilder;
  HttpClient(std::shared_ptr<ClientCore> core, std::shared_ptr<const Headers> default_headers)
      : core_(std::move(core)), default_headers_(std::move(default_headers)) {}

  static Request Make(std::string_view method, std::string_view target, std::string body, Headers headers);
  static void Start(const std::shared_ptr<ClientCore>& core, const std::shared_ptr<const Headers>& defaults,
                    Request&& request, CallOptions&& options, TypedCall<Response>::Handler handler);

  std::shared_ptr<ClientCore> core_;
  std::shared_ptr<const Headers> default_headers_;
};

// Builder with the seed's API: Http::NewBuilder().SetUri(...).SetTimeout(...).Build().
class HttpClientBuilder : public ClientBuilderBase<HttpClientBuilder> {
 public:
  explicit HttpClientBuilder(HttpOptions options = {});

  HttpClientBuilder& SetConnectTimeout(Duration d) { options_.transport.connect_timeout = d; return *this; }
  HttpClientBuilder& SetRaiseOnHttpError(bool raise) { options_.transport.raise_on_http_error = raise; return *this; }
  HttpOptions& options() noexcept { return options_; }
  ClientOptions& client_options() noexcept { return options_.client; }

  // Builds and opens the client (waits up to the open timeout). Throws scales::Error.
  HttpClient Build();

  // The default stack for `options`.
  static SinkStackSpec DefaultStack(const HttpOptions& options);

 private:
  HttpOptions options_;
};

}  // namespace http

// Entry points named as in the seed.
class Http {
 public:
  // A client for `uri` with default options (timeout 60 s).
  static http::HttpClient NewClient(std::string uri, http::HttpOptions options = {});
  static http::HttpClientBuilder NewBuilder(http::HttpOptions options = {});
};

}  // namespace scales
