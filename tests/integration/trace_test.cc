// Trace identifiers on the wire: the client gives each call a root trace id, sends it as the
// Mux TraceContext context (decoded by the independent Python reference server) and, when
// b3_headers is set, as B3 headers on HTTP (echoed by `scales testserver http` /headers);
// CallInfo::trace reports the same ids. A caller's own trace is sent unchanged (128-bit trace ids
// whole), but for a span id 0, which gets a new span.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
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

// The options of an HTTP client that sends B3 headers, on one event loop.
http::HttpOptions B3Options() {
  http::HttpOptions o;
  o.client.name = "trace-http";
  o.client.runtime = OneLoop();
  o.transport.b3_headers = true;
  return o;
}

TEST(TraceTest, HttpSendsB3HeadersWhenEnabled) {
  test::TestHttpServer server("trace");
  const http::HttpOptions o = B3Options();
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

// B3 headers the caller put into the request (an upstream request's, forwarded) are replaced by
// the call's, as Finagle's HTTP client does: two X-B3-TraceId values would leave the server to
// pick one, and a stale single `b3` header wins over X-B3-* on servers that read both.
TEST(TraceTest, HttpB3HeadersReplaceTheCallersOwn) {
  test::TestHttpServer server("trace");
  const http::HttpOptions o = B3Options();
  auto client = Http::NewClient("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  opts.trace = TraceContext{0xabc, 0xdef, 0x123, 2 | 4};
  http::Request req{"GET",
                    "/headers",
                    {{"x-b3-traceid", "00000000000000aa"},
                     {"X-B3-SpanId", "00000000000000bb"},
                     {"X-B3-ParentSpanId", "00000000000000cc"},
                     {"X-B3-Sampled", "0"},
                     {"X-B3-Flags", "0"},
                     {"b3", "00000000000000aa-00000000000000bb-0"},
                     {"X-Other", "kept"}},
                    {}};
  http::Response r = client.Send(req, opts);
  auto count = [&](std::string_view needle) {
    size_t n = 0;
    for (size_t at = r.body.find(needle); at != std::string::npos; at = r.body.find(needle, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("X-B3-TraceId: 0000000000000abc\n"), 1u) << r.body;
  EXPECT_EQ(count("X-B3-SpanId: 0000000000000def\n"), 1u) << r.body;
  EXPECT_EQ(count("X-B3-ParentSpanId: 0000000000000123\n"), 1u) << r.body;
  EXPECT_EQ(count("X-B3-Sampled: 1\n"), 1u) << r.body;
  EXPECT_EQ(count("00000000000000"), 0u) << "no caller id is left: " << r.body;
  EXPECT_EQ(count("X-B3-Flags"), 0u) << r.body;
  EXPECT_EQ(count("b3:"), 0u) << r.body;
  EXPECT_EQ(count("X-Other: kept\n"), 1u) << r.body;

  // Without b3_headers the caller's headers are the caller's business: sent unchanged.
  http::HttpOptions plain = o;
  plain.client.runtime = OneLoop();
  plain.transport.b3_headers = false;
  auto untraced = Http::NewClient("tcp://" + server.endpoint(), plain);
  r = untraced.Send(req, opts);
  EXPECT_EQ(count("x-b3-traceid: 00000000000000aa\n"), 1u) << r.body;
  EXPECT_EQ(count("b3: 00000000000000aa-00000000000000bb-0\n"), 1u) << r.body;
}

// A caller forwarding an upstream request's 128-bit trace id (B3: X-B3-TraceId of 32 hex
// digits) passes it on whole: with only the low half, downstream spans joined another trace.
TEST(TraceTest, HttpSendsA128BitTraceIdAs32HexDigits) {
  test::TestHttpServer server("trace");
  const http::HttpOptions o = B3Options();
  auto client = Http::NewClient("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  TraceContext forwarded{0xabc, 0xdef, 0x123, 2 | 4};
  forwarded.trace_id_high = 0x463ac35c9f6413ad;
  opts.trace = forwarded;
  http::Request req{"GET", "/headers", {}, {}};
  http::Response r = client.Send(req, opts);
  EXPECT_NE(r.body.find("X-B3-TraceId: 463ac35c9f6413ad0000000000000abc\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-SpanId: 0000000000000def\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-ParentSpanId: 0000000000000123\n"), std::string::npos) << r.body;
  EXPECT_EQ(info.trace.trace_id_high, 0x463ac35c9f6413adu);

  // A root id the client assigns stays 64-bit.
  opts.trace.reset();
  r = client.Send(req, opts);
  EXPECT_EQ(info.trace.trace_id_high, 0u);
  EXPECT_NE(r.body.find(fmt::format("X-B3-TraceId: {:016x}\n", info.trace.trace_id)), std::string::npos) << r.body;
}

// A caller's trace with a trace id but no span (span_id 0: an upstream trace id, forwarded)
// went out as X-B3-SpanId 0000000000000000, which B3 servers reject. The call gets a new span
// in that trace, drawn as root ids are, under the given parent (as Finagle's Trace.nextId).
TEST(TraceTest, HttpGivesACallersTraceWithoutASpanANewSpan) {
  test::TestHttpServer server("trace");
  const http::HttpOptions o = B3Options();
  auto client = Http::NewClient("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  opts.trace = TraceContext{0xabc, 0, 0x123, 2 | 4};
  http::Request req{"GET", "/headers", {}, {}};
  http::Response r = client.Send(req, opts);
  EXPECT_EQ(r.body.find("X-B3-SpanId: 0000000000000000"), std::string::npos) << r.body;
  ASSERT_NE(info.trace.span_id, 0u);
  EXPECT_EQ(info.trace.trace_id, 0xabcu);
  EXPECT_EQ(info.trace.parent_id, 0x123u);
  EXPECT_NE(r.body.find("X-B3-TraceId: 0000000000000abc\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find(fmt::format("X-B3-SpanId: {:016x}\n", info.trace.span_id)), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("X-B3-ParentSpanId: 0000000000000123\n"), std::string::npos) << r.body;
  const uint64_t first_span = info.trace.span_id;

  // No parent either: the new span is the trace's root span (no X-B3-ParentSpanId).
  opts.trace = TraceContext{0xabc, 0, 0, 0};
  r = client.Send(req, opts);
  ASSERT_NE(info.trace.span_id, 0u);
  EXPECT_NE(info.trace.span_id, first_span) << "each call gets its own span";
  EXPECT_NE(r.body.find(fmt::format("X-B3-SpanId: {:016x}\n", info.trace.span_id)), std::string::npos) << r.body;
  EXPECT_EQ(r.body.find("X-B3-ParentSpanId"), std::string::npos) << r.body;
}

// Trace ids must not repeat across clients: two runtimes (as two processes would) have the same
// default RuntimeOptions::seed, so their loops' Random draw the same sequence; ids drawn from it
// alone made every process's first call trace X, merging unrelated calls into one trace.
TEST(TraceTest, ClientsWithTheSameSeedDrawDifferentTraceIds) {
  test::TestHttpServer server("trace");
  std::vector<uint64_t> ids;
  for (int i = 0; i < 2; ++i) {
    http::HttpOptions o;
    o.client.runtime = OneLoop();  // default seed
    auto client = Http::NewClient("tcp://" + server.endpoint(), o);
    for (int call = 0; call < 3; ++call) {
      CallInfo info;
      CallOptions opts;
      opts.info = &info;
      client.Send(http::Request{"GET", "/", {}, {}}, opts);
      ASSERT_NE(info.trace.trace_id, 0u);
      ids.push_back(info.trace.trace_id);
    }
  }
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::adjacent_find(ids.begin(), ids.end()), ids.end())
      << "a trace id repeats: " << fmt::format("{:016x}", fmt::join(ids, " "));
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

// The options of a ThriftMux client for the trace tests, on one event loop.
thriftmux::ThriftMuxOptions MuxOptions() {
  thriftmux::ThriftMuxOptions o;
  o.client.name = "trace-tmux";
  o.client.runtime = OneLoop();
  return o;
}

TEST(TraceTest, ThriftMuxSendsTraceContext) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  const thriftmux::ThriftMuxOptions o = MuxOptions();
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

// A trace without a parent (parent_id 0, which B3 sends as no X-B3-ParentSpanId) is a root span:
// on Mux, Finagle's TraceId.serialize writes an absent parent as the span id, and reads a 0 as
// a real parent span 0. The caller's TraceContext keeps its 0.
TEST(TraceTest, ThriftMuxSendsAnAbsentParentAsTheSpan) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  const thriftmux::ThriftMuxOptions o = MuxOptions();
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  opts.trace = TraceContext{0xabc, 0xdef, 0, 2};
  std::string r;
  client.WithOptions(opts)->echo(r, "trace");
  EXPECT_EQ(r, "trace=0000000000000abc span=0000000000000def parent=0000000000000def flags=2");
  EXPECT_EQ(info.trace.parent_id, 0u);
}


// A 128-bit trace id goes out as the 40-byte TraceContext (mux-protocol.md 1.6: traceIdHigh:8
// after the 32 bytes); a 64-bit one stays 32 bytes (the peer prints no high half).
TEST(TraceTest, ThriftMuxSendsA128BitTraceIdAs40Bytes) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  const thriftmux::ThriftMuxOptions o = MuxOptions();
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  TraceContext forwarded{0xabc, 0xdef, 0x123, 2};
  forwarded.trace_id_high = 0x463ac35c9f6413ad;
  opts.trace = forwarded;
  std::string r;
  client.WithOptions(opts)->echo(r, "trace");
  EXPECT_EQ(r, "trace=0000000000000abc span=0000000000000def parent=0000000000000123 flags=2 "
               "high=463ac35c9f6413ad");
  EXPECT_EQ(info.trace.trace_id_high, 0x463ac35c9f6413adu);

  opts.trace = TraceContext{0xabc, 0xdef, 0x123, 2};
  client.WithOptions(opts)->echo(r, "trace");
  EXPECT_EQ(r, "trace=0000000000000abc span=0000000000000def parent=0000000000000123 flags=2");
}

// A caller's trace without a span (span_id 0) gets a new span id in that trace: a Mux
// TraceContext with span 0 (and, for no parent, parent 0) named a span that does not exist.
TEST(TraceTest, ThriftMuxGivesACallersTraceWithoutASpanANewSpan) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  thriftmux::ThriftMuxOptions o = MuxOptions();
  o.client.trace_ids = false;  // the caller's trace is completed all the same
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);

  CallInfo info;
  CallOptions opts;
  opts.info = &info;
  opts.trace = TraceContext{0xabc, 0, 0, 1};
  std::string r;
  client.WithOptions(opts)->echo(r, "trace");
  ASSERT_NE(info.trace.span_id, 0u);
  const std::string span = fmt::format("{:016x}", info.trace.span_id);
  EXPECT_EQ(r, fmt::format("trace=0000000000000abc span={} parent={} flags=1", span, span));
  EXPECT_EQ(info.trace.parent_id, 0u);
}

}  // namespace
}  // namespace scales
