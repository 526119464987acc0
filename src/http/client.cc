#include "scales/http/client.h"

#include <fmt/format.h>

#include "scales/core/timeout_sink.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/heap_balancer.h"

namespace scales {
namespace http {

namespace {

// The HTTP call: the request and response live in the call object for its whole life.
class HttpCall final : public TypedCall<Response> {
 public:
  // The request is moved in whole: a default Request and a move-assignment would build its
  // "GET" and "/" only to replace them.
  HttpCall(Handler h, Request&& r) : TypedCall<Response>(std::move(h)), request(std::move(r)) {
    message.SetPayload(&request);
  }
  Request request;
};

}  // namespace

Request HttpClient::Make(std::string_view method, std::string_view target, std::string body, Headers headers) {
  Request r;
  r.method = std::string(method);
  r.target = target.empty() ? std::string("/") : std::string(target);
  // A relative path gets its '/'; "*" and an absolute-form target ("http://host/path") go as
  // given, as Send() sends them ("/http://host/path" would be another resource).
  if (r.target.front() != '/' && r.target != "*" && !internal::IsAbsoluteFormTarget(r.target)) {
    r.target.insert(r.target.begin(), '/');
  }
  r.body = std::move(body);
  r.headers = std::move(headers);
  return r;
}

void HttpClient::Start(const std::shared_ptr<ClientCore>& core, const std::shared_ptr<const Headers>& defaults,
                       Request&& request, CallOptions&& options, TypedCall<Response>::Handler handler) {
  auto* call = new HttpCall(std::move(handler), std::move(request));
  if (!core) {
    // A default-constructed client: complete with an error, never inline. Completed as a
    // call, so the handler's executor keeps work and a throwing handler is reported.
    FailEmptyClient(call, options.info, "HttpClient is empty (default-constructed)");
    return;
  }
  call->message.method = call->request.method;
  if (defaults) {
    // The request's own headers and the call's (CallOptions::headers) replace a default one of
    // the same name; a name the defaults repeat goes out each time.
    auto& headers = call->request.headers;
    const size_t own = headers.size();
    auto has = [](const Headers& list, size_t count, std::string_view name) {
      for (size_t i = 0; i < count; ++i) {
        if (HeaderNameEquals(list[i].first, name)) return true;
      }
      return false;
    };
    for (const auto& h : *defaults) {
      if (!has(headers, own, h.first) && !has(options.headers, options.headers.size(), h.first)) {
        headers.push_back(h);
      }
    }
  }
  call->message.properties.headers = std::move(options.headers);
  if (options.trace) call->message.properties.trace = *options.trace;
  call->message.properties.idempotent = options.idempotent;
  call->timeout = options.timeout;
  call->info = options.info;
  core->Dispatch(call);
}

Response HttpClient::Send(Request request, const CallOptions& options) const {
  if (!core_) throw Error(make_error_code(Errc::kClientClosed), "HttpClient is empty (default-constructed)");
  if (core_->IsLoopThread()) {
    throw Error(make_error_code(Errc::kBlockingCallOnEventLoop),
                fmt::format("client {}: blocking {} {} called on one of the client's event loops; "
                            "use an Async call there",
                            core_->name(), request.method, request.target));
  }
  struct Result {
    std::promise<void> done;
    error_code ec;
    Response response;
    CallInfo info;
  };
  auto result = std::make_shared<Result>();
  CallOptions opts = options;
  CallInfo* user_info = options.info;
  opts.info = &result->info;
  auto fut = result->done.get_future();
  AsyncSend(std::move(request), std::move(opts), [result](error_code ec, Response r) {
    result->ec = ec;
    result->response = std::move(r);
    result->done.set_value();
  });
  fut.wait();
  if (user_info != nullptr) *user_info = result->info;
  if (result->ec) {
    // The dispatcher's detail already names the client, endpoint and step.
    throw Error(result->ec, result->info.detail.empty() ? result->ec.message() : result->info.detail);
  }
  return std::move(result->response);
}

Response HttpClient::Get(std::string_view target, Headers headers) const {
  return Send(Make("GET", target, {}, std::move(headers)));
}
Response HttpClient::Head(std::string_view target, Headers headers) const {
  return Send(Make("HEAD", target, {}, std::move(headers)));
}
Response HttpClient::Delete(std::string_view target, Headers headers) const {
  return Send(Make("DELETE", target, {}, std::move(headers)));
}
Response HttpClient::Options(std::string_view target, Headers headers) const {
  return Send(Make("OPTIONS", target, {}, std::move(headers)));
}
Response HttpClient::Post(std::string_view target, std::string body, Headers headers) const {
  return Send(Make("POST", target, std::move(body), std::move(headers)));
}
Response HttpClient::Put(std::string_view target, std::string body, Headers headers) const {
  return Send(Make("PUT", target, std::move(body), std::move(headers)));
}
Response HttpClient::Patch(std::string_view target, std::string body, Headers headers) const {
  return Send(Make("PATCH", target, std::move(body), std::move(headers)));
}

void HttpClient::Close() const {
  if (core_) core_->Close();
}

HttpClientBuilder::HttpClientBuilder(HttpOptions options) : options_(std::move(options)) {}

SinkStackSpec HttpClientBuilder::DefaultStack(const HttpOptions& options) {
  SinkStackSpec spec = ResilientStack<Response>(options, std::nullopt);
  // The URI's TLS keys (https://, ?tls_ca_file=...) override the options.
  TransportOptions transport = options.transport;
  transport.tls = TlsOptionsForUri(options.client.uri, transport.tls);
  spec.WithSink(WatermarkPoolProvider(options.pool))
      .WithSink(HttpTransportProvider(std::move(transport)));
  return spec;
}

HttpClient HttpClientBuilder::Build() {
  return NamingTheClient([&] {
    Validate(options_.transport);
    // A default header that could never be sent fails every call: refused here, as an option.
    for (size_t i = 0; i < options_.default_headers.size(); ++i) {
      const auto& [name, value] = options_.default_headers[i];
      if (std::string problem = internal::HeaderProblem(name, value); !problem.empty()) {
        throw Error(make_error_code(Errc::kInvalidArgument),
                    fmt::format("default_headers[{}]: {}", i, problem));
      }
    }
    Validate(options_.pool);
    Validate(static_cast<const ResilienceOptions&>(options_));
    SinkStackSpec spec = ApplyEdits(DefaultStack(options_));
    auto core = std::make_shared<ClientCore>(options_.client, std::move(spec));
    core->OpenAndWait();
    // No default headers: no pointer, so that a call neither copies it nor walks an empty list.
    auto defaults = options_.default_headers.empty()
                        ? nullptr
                        : std::make_shared<const Headers>(options_.default_headers);
    return HttpClient(std::move(core), std::move(defaults));
  });
}

}  // namespace http

http::HttpClient Http::NewClient(std::string uri, http::HttpOptions options) {
  options.client.uri = std::move(uri);
  return http::HttpClientBuilder(std::move(options)).Build();
}

http::HttpClientBuilder Http::NewBuilder(http::HttpOptions options) {
  return http::HttpClientBuilder(std::move(options));
}

}  // namespace scales
