// A custom sink (docs/configuration.md, "Example: a custom sink above the load balancer"): it
// adds a header to every HTTP request and measures how long each attempt takes, and is put into
// the client's stack by role with the builder.
//
//   example_custom_sink tcp://127.0.0.1:8080[,127.0.0.1:8081] [/path] [CALLS]
//
// Start a server first, e.g. `scales testserver http --port 8080`; its /headers path echoes the
// request's headers, so the default path shows the added header arriving.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include <scales/core/forwarding_sink.h>
#include <scales/http/client.h>

namespace {

using Clock = std::chrono::steady_clock;

bool HasHeader(const scales::Headers& headers, std::string_view name) {
  return std::ranges::any_of(headers, [name](const auto& header) {
    return scales::http::HeaderNameEquals(header.first, name);
  });
}

// Adds `X-Tag: example` to every request and prints each attempt's duration. It sits above the
// load balancer, so it sees every attempt once, before an endpoint is chosen; the endpoint is
// known when the response comes back. A call can make several attempts: the retry sink above
// sends the same message down again after a retryable failure, with the headers the earlier
// attempt added, and a backup request (hedging) sends a copy of it. So the header is added only
// when the message does not carry it yet.
class TaggingSink final : public scales::ForwardingSink {
 public:
  explicit TaggingSink(scales::SinkPtr next) : ForwardingSink(std::move(next)) {}

  void AsyncProcessRequest(scales::SinkStack& stack, scales::MethodCallMessage& msg,
                           scales::Stream* stream) override {
    if (!HasHeader(msg.properties.headers, "X-Tag")) {
      msg.properties.headers.emplace_back("X-Tag", "example");
    }
    // We want to see the response: push ourselves with the start time as the context. The
    // stack guarantees exactly one response per request, which frees it.
    stack.Push(this, new Clock::time_point(Clock::now()));
    next_->AsyncProcessRequest(stack, msg, stream);
  }

  void AsyncProcessResponse(scales::SinkStack& stack, void* context, scales::Stream* stream,
                            scales::MethodReturnMessage& msg) override {
    std::unique_ptr<Clock::time_point> started(static_cast<Clock::time_point*>(context));
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - *started);
    const scales::MethodCallMessage& call = stack.message();
    std::printf("timing:    %s to %s took %lld us (%s)\n", call.method.c_str(),
                call.properties.endpoint.c_str(), static_cast<long long>(us.count()),
                msg.ok() ? "ok" : msg.detail.c_str());
    stack.AsyncProcessResponse(stream, msg);  // pass it on up, exactly once; touch nothing after
  }

  std::string_view name() const override { return "tagging"; }
};

// Role "tagging", name "tagging-sink": both appear in the client's Describe().
scales::SinkProvider TaggingSinkProvider() {
  return {"tagging", "tagging-sink",
          [](const scales::SinkContext& ctx, scales::SinkFactory next) -> scales::SinkPtr {
            return std::make_shared<TaggingSink>(next(ctx));
          }};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s URI [PATH] [CALLS]\n", argv[0]);
    return 2;
  }
  const std::string path = argc > 2 ? argv[2] : "/headers";
  const int calls = argc > 3 ? std::atoi(argv[3]) : 2;
  try {
    auto client = scales::Http::NewBuilder()
                      .SetUri(argv[1])
                      .SetName("example")
                      .SetTimeout(std::chrono::seconds(5))
                      // = InsertBefore(scales::roles::kLoadBalancer, TaggingSinkProvider())
                      .WithSink(TaggingSinkProvider())
                      .Build();
    std::printf("stack:     %s\n", client.core()->Describe().c_str());

    for (int i = 1; i <= calls; ++i) {
      scales::http::Response r = client.Get(path);
      std::printf("call %d:    %d\n%s", i, r.status, r.body.c_str());
    }
    client.Close();
    return 0;
  } catch (const scales::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
