// Trace identifiers on the wire: the client gives each call a root trace id, sends it as the
// Mux TraceContext context (decoded by the independent Python reference server) and, when
// b3_headers is set, as B3 headers on HTTP (echoed by `scales testserver http` /headers);
// CallInfo::trace reports the same ids. A caller's own trace is sent unchanged.

#include <chrono>
#include <memory>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "Echo.h"
#include "scales/http/client.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/fixtures.h"
#include "support/mux_server_fixture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;

std::shared_ptr<Runtime> OneLoop() {
  RuntimeOptions o;
  o.threads = 1;
  return std::make_shared<Runtime>(o);
}

TEST(TraceTest, HttpSendsB3HeadersWhenEnabled) {
  test::TestHttpServer server("trace");
  http::HttpOptions o;
  o.client.name = "trace-http";
  o.client.runtime = OneLoop();
  o.transport.b3_headers = true;
  auto client = Http::NewClient("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  http::Request req{"GET", "/headers", {}, {}};
  http::Response r = client.Send(req, opts);
  ASSERT_NE(info.trace.trace_id, 0u);
  const std::string id = fmt::format("{:016x}", info.trace.trace_id);
  EXPECT_NE(r.body.find("X-B3-TraceId: " + id), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-SpanId: " + id), std::string::npos) << r.body;
  EXPECT_EQ(r.body.find("X-B3-ParentSpanId"), std::string::npos) << "a root span has no parent header";

  // The caller's own trace: a child span with a sampling decision.
  opts.trace = TraceContext{0xabc, 0xdef, 0x123, 2 | 4};
  r = client.Send(req, opts);
  EXPECT_NE(r.body.find("X-B3-TraceId: 0000000000000abc"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-SpanId: 0000000000000def"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-ParentSpanId: 0000000000000123"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-Sampled: 1"), std::string::npos) << r.body;
  EXPECT_EQ(info.trace.trace_id, 0xabcu);
}

TEST(TraceTest, HttpSendsNoB3HeadersByDefault) {
  test::TestHttpServer server("trace");
  http::HttpOptions o;
  o.client.runtime = OneLoop();
  auto client = Http::NewClient("tcp://" + server.endpoint(), o);
  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  http::Response r = client.Send(http::Request{"GET", "/headers", {}, {}}, opts);
  EXPECT_EQ(r.body.find("X-B3-"), std::string::npos) << r.body;
  EXPECT_NE(info.trace.trace_id, 0u) << "the call still has a trace id";
}

TEST(TraceTest, ThriftMuxSendsTraceContext) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  thriftmux::ThriftMuxOptions o;
  o.client.name = "trace-tmux";
  o.client.runtime = OneLoop();
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  std::string r;
  client.WithOptions(opts)->echo(r, "trace");
  ASSERT_NE(info.trace.trace_id, 0u);
  const std::string id = fmt::format("{:016x}", info.trace.trace_id);
  EXPECT_EQ(r, fmt::format("trace={} span={} parent={} flags=0", id, id, id));

  std::string r2;
  client.WithOptions(opts)->echo(r2, "trace");
  EXPECT_NE(r2, r) << "each call gets its own trace id";

  opts.trace = TraceContext{0xabc, 0xdef, 0x123, 1};
  client.WithOptions(opts)->echo(r, "trace");
  EXPECT_EQ(r, "trace=0000000000000abc span=0000000000000def parent=0000000000000123 flags=1");

  thriftmux::ThriftMuxOptions off = o;
  off.client.trace_ids = false;
  off.client.runtime = OneLoop();
  auto untraced = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), off);
  untraced->echo(r, "trace");
  EXPECT_EQ(r, "no trace");
}

}  // namespace
}  // namespace scales
