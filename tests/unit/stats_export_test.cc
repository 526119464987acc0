// The export formats of the stats registry (Prometheus text 0.0.4, Finagle-style flat JSON),
// checked on a scripted scenario through a real client stack on a manual clock, and the
// live-client view of the admin endpoints (ClientsJson) on the same stack.

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include "scales/admin/admin_server.h"
#include "scales/core/client.h"
#include "scales/core/timeout_sink.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/pool/watermark_pool.h"
#include "scales/stats/stats.h"
#include "support/fake_sinks.h"
#include "support/log_capture.h"
#include "support/prometheus_text.h"

namespace scales {
namespace {

using stats::Histogram;
using stats::HistogramSnapshot;
using stats::StatsRegistry;
using std::chrono::microseconds;
using std::chrono::milliseconds;
using test::ParsePrometheusText;
using test::PromText;
using ::testing::HasSubstr;
using ::testing::Not;

const Endpoint kA{"10.9.0.1", 80};

// ---- The scripted scenario ----

class ScenarioTest : public ::testing::Test {
 protected:
  ScenarioTest()
      : clock_(std::make_shared<ManualClock>()),
        runtime_(std::make_shared<Runtime>(
            RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock_, .seed = 42})),
        factory_(runtime_->loop(0)),
        calls_(*clock_) {
    ClientOptions options;
    options.name = "obs";
    options.uri = "tcp://10.9.0.1:80";
    options.timeout = milliseconds(100);
    options.runtime = runtime_;
    options.stats = &registry_;
    options.server_set = std::make_shared<StaticServerSet>(ServerSet::Members{kA});
    WatermarkPoolOptions pool;
    pool.low_watermark = 1;
    pool.high_watermark = 1;
    pool.max_waiters = 10;
    SinkStackSpec spec(
        {TimeoutSinkProvider(), HeapBalancerProvider(), ResurrectorProvider(),
         WatermarkPoolProvider(pool),
         SinkProvider{"transport", "fake", [this](const SinkContext& ctx, SinkFactory) -> SinkPtr {
                        return factory_.Create(ctx);
                      }}});
    core_ = std::make_shared<ClientCore>(options, spec);
    core_->AsyncOpen([](error_code) {});
    Run();
  }

  ~ScenarioTest() override {
    if (core_) core_->Close();
    Run();
    EXPECT_TRUE(calls_.AllCompletedOnce());
    core_.reset();
    Run();
    factory_.Clear();
    Run();
  }

  void Run() { runtime_->RunUntilIdle(); }
  void Advance(Duration d) {
    clock_->Advance(d);
    Run();
  }
  // One call answered by the fake connection after `latency`, with `error` or success.
  void Call(Duration latency, error_code error = {}) {
    calls_.StartWith([this](CallBase* c) { core_->Dispatch(c); });
    Run();
    Advance(latency);
    if (error) {
      ASSERT_TRUE(factory_.last().Fail(0, error));
    } else {
      ASSERT_TRUE(factory_.last().Reply(0, 1));
    }
    Run();
  }

  // The script: three successes (1, 2 and 3 ms), a connection closed after 0.5 ms and a call
  // that times out at the client's 100 ms.
  void RunScript() {
    Call(microseconds(1000));
    Call(microseconds(2000));
    Call(microseconds(3000));
    Call(microseconds(500), make_error_code(Errc::kConnectionClosed));
    calls_.StartWith([this](CallBase* c) { core_->Dispatch(c); });
    Run();
    Advance(milliseconds(100));
    ASSERT_EQ(calls_.completed(), 5u);
  }

  const stats::Labels kClient{{"client", "obs"}};

  StatsRegistry registry_;
  std::shared_ptr<ManualClock> clock_;
  std::shared_ptr<Runtime> runtime_;
  test::FakeTransportFactory factory_;
  test::CallTracker calls_;
  std::shared_ptr<ClientCore> core_;
};

TEST_F(ScenarioTest, CountersAndHistogramOfTheScript) {
  RunScript();
  auto counter = [&](std::string_view name, stats::Labels labels) {
    const stats::Counter* c = registry_.FindCounter(name, labels);
    return c ? c->value() : -1;
  };
  EXPECT_EQ(counter("scales_requests", kClient), 5);
  EXPECT_EQ(counter("scales_successes", kClient), 3);
  EXPECT_EQ(counter("scales_failures", kClient), 2);
  EXPECT_EQ(
      counter("scales_failures_by_error", {{"client", "obs"}, {"error", "connection_closed"}}), 1);
  EXPECT_EQ(counter("scales_failures_by_error", {{"client", "obs"}, {"error", "request_timeout"}}),
            1);
  EXPECT_EQ(counter("scales_timeouts", kClient), 1);
  EXPECT_EQ(registry_.FindGauge("scales_pending", kClient)->value(), 0);
  EXPECT_EQ(registry_.FindGauge("scales_lb_size", kClient)->value(), 1);

  HistogramSnapshot h = registry_.FindHistogram("scales_request_latency_us", kClient)->Snapshot();
  EXPECT_EQ(h.count, 5);
  EXPECT_EQ(h.sum, 1000 + 2000 + 3000 + 500 + 100000);
  EXPECT_EQ(h.min, 500);
  EXPECT_EQ(h.max, 100000);
  // Sorted: 500, 1000, 2000, 3000, 100000. Nearest rank, reported as the upper bound of the
  // log-linear bucket: 500 is in [496, 511], 1000 in [992, 1023], 2000 in [1984, 2047], 3000
  // in [2944, 3071].
  EXPECT_EQ(h.Percentile(0.0), 511);
  EXPECT_EQ(h.Percentile(0.2), 511);
  EXPECT_EQ(h.Percentile(0.4), 1023);
  EXPECT_EQ(h.Percentile(0.5), 2047);
  EXPECT_EQ(h.Percentile(0.8), 3071);
  EXPECT_EQ(h.Percentile(0.9), 100000);  // [98304, 102399], clamped to max
  EXPECT_EQ(h.Percentile(0.999), 100000);
  // Export buckets (not cumulative): 500 -> le 500, 1000 -> le 1000, 2000 -> le 2500,
  // 3000 -> le 5000, 100000 -> le 100000.
  std::array<int64_t, stats::kExportBucketCount> expected{};
  auto at = [](int64_t bound) {
    return std::find(stats::kExportBucketBounds.begin(), stats::kExportBucketBounds.end(), bound) -
           stats::kExportBucketBounds.begin();
  };
  for (int64_t bound : {500, 1000, 2500, 5000, 100000}) expected[at(bound)] = 1;
  EXPECT_EQ(h.export_buckets, expected);
}

TEST_F(ScenarioTest, PrometheusTextOfTheScript) {
  RunScript();
  std::string text = registry_.ToPrometheus();
  PromText prom = ParsePrometheusText(text);  // throws on any grammar violation

  const test::PromLabels client{{"client", "obs"}};
  EXPECT_EQ(prom.Value("scales_requests_total", client), 5);
  EXPECT_EQ(prom.Value("scales_successes_total", client), 3);
  EXPECT_EQ(prom.Value("scales_failures_total", client), 2);
  EXPECT_EQ(prom.Value("scales_failures_by_error_total",
                       {{"client", "obs"}, {"error", "request_timeout"}}),
            1);
  EXPECT_EQ(prom.Value("scales_pending", client), 0);
  EXPECT_EQ(prom.Value("scales_pool_size", {{"client", "obs"}, {"endpoint", "10.9.0.1:80"}}), 1);

  const test::PromFamily* requests = prom.Family("scales_requests_total");
  ASSERT_NE(requests, nullptr);
  EXPECT_EQ(requests->type, "counter");
  EXPECT_EQ(requests->help, "Calls dispatched.");
  EXPECT_EQ(prom.Family("scales_pending")->type, "gauge");

  const test::PromFamily* latency = prom.Family("scales_request_latency_us");
  ASSERT_NE(latency, nullptr);
  EXPECT_EQ(latency->type, "histogram");
  auto bucket = [&](std::string le) {
    return prom.Value("scales_request_latency_us_bucket", {{"client", "obs"}, {"le", le}});
  };
  EXPECT_EQ(bucket("250"), 0);
  EXPECT_EQ(bucket("500"), 1);
  EXPECT_EQ(bucket("1000"), 2);
  EXPECT_EQ(bucket("2500"), 3);
  EXPECT_EQ(bucket("5000"), 4);
  EXPECT_EQ(bucket("50000"), 4);
  EXPECT_EQ(bucket("100000"), 5);
  EXPECT_EQ(bucket("+Inf"), 5);
  EXPECT_EQ(prom.Value("scales_request_latency_us_count", client), 5);
  EXPECT_EQ(prom.Value("scales_request_latency_us_sum", client), 106500);
  // One bucket line per documented bound plus +Inf, then _sum and _count.
  size_t buckets = 0;
  for (const auto& s : latency->samples) buckets += s.name == "scales_request_latency_us_bucket";
  EXPECT_EQ(buckets, stats::kExportBucketCount);

  const test::PromFamily* quantiles = prom.Family("scales_request_latency_us_quantile");
  ASSERT_NE(quantiles, nullptr);
  EXPECT_EQ(quantiles->type, "gauge");
  auto q = [&](std::string quantile) {
    return prom.Value("scales_request_latency_us_quantile",
                      {{"client", "obs"}, {"quantile", quantile}});
  };
  EXPECT_EQ(q("0.5"), 2047);
  EXPECT_EQ(q("0.9"), 100000);
  EXPECT_EQ(q("0.99"), 100000);
  EXPECT_EQ(q("0.999"), 100000);

  // Without quantiles: the histogram family stays, the gauge family goes.
  StatsRegistry::PrometheusOptions no_quantiles;
  no_quantiles.quantiles = false;
  PromText plain = ParsePrometheusText(registry_.ToPrometheus(no_quantiles));
  EXPECT_NE(plain.Family("scales_request_latency_us"), nullptr);
  EXPECT_EQ(plain.Family("scales_request_latency_us_quantile"), nullptr);
}

TEST_F(ScenarioTest, FlatJsonOfTheScript) {
  RunScript();
  boost::json::value v = boost::json::parse(registry_.ToJson());
  const boost::json::object& o = v.as_object();
  EXPECT_EQ(o.at("clnt/obs/scales_requests").as_int64(), 5);
  EXPECT_EQ(o.at("clnt/obs/scales_successes").as_int64(), 3);
  EXPECT_EQ(o.at("clnt/obs/scales_failures").as_int64(), 2);
  EXPECT_EQ(o.at("clnt/obs/scales_failures_by_error/connection_closed").as_int64(), 1);
  EXPECT_EQ(o.at("clnt/obs/scales_failures_by_error/request_timeout").as_int64(), 1);
  EXPECT_EQ(o.at("clnt/obs/10.9.0.1:80/scales_pool_size").as_int64(), 1);
  const std::string h = "clnt/obs/scales_request_latency_us";
  EXPECT_EQ(o.at(h + ".count").as_int64(), 5);
  EXPECT_EQ(o.at(h + ".sum").as_int64(), 106500);
  EXPECT_DOUBLE_EQ(o.at(h + ".avg").as_double(), 21300.0);
  EXPECT_EQ(o.at(h + ".min").as_int64(), 500);
  EXPECT_EQ(o.at(h + ".max").as_int64(), 100000);
  EXPECT_EQ(o.at(h + ".p50").as_int64(), 2047);
  EXPECT_EQ(o.at(h + ".p90").as_int64(), 100000);
  EXPECT_EQ(o.at(h + ".p95").as_int64(), 100000);
  EXPECT_EQ(o.at(h + ".p99").as_int64(), 100000);
  EXPECT_EQ(o.at(h + ".p9990").as_int64(), 100000);
  EXPECT_EQ(o.at(h + ".p9999").as_int64(), 100000);
  // Connect latency is never recorded by the fake transport: an empty histogram exports only
  // its count, as Finagle does. (The fake stack has no TCP connection metrics at all.)
  EXPECT_FALSE(o.contains("clnt/obs/10.9.0.1:80/scales_connect_latency_us.count"));
}

TEST_F(ScenarioTest, LiveClientsAndTheirMembers) {
  std::vector<std::string> names;
  ClientCore::ForEachLiveClient([&](const ClientCore& c) { names.push_back(c.name()); });
  EXPECT_THAT(names, ::testing::Contains("obs"));

  // Two calls in flight: the member's load is 2 (pool of one connection: one on the wire, one
  // waiting). ClientsJson runs on the client's only loop, so it inspects it inline.
  calls_.StartWith([this](CallBase* c) { core_->Dispatch(c); });
  calls_.StartWith([this](CallBase* c) { core_->Dispatch(c); });
  Run();
  std::string json;
  boost::asio::post(runtime_->loop(0).executor(),
                    [&] { json = admin::ClientsJson(milliseconds(100)); });
  Run();
  boost::json::value v = boost::json::parse(json);
  const boost::json::object* obs = nullptr;
  for (const auto& c : v.at("clients").as_array()) {
    if (c.at("name") == "obs") obs = &c.as_object();
  }
  ASSERT_NE(obs, nullptr) << json;
  EXPECT_EQ(obs->at("uri"), "tcp://10.9.0.1:80");
  EXPECT_EQ(obs->at("options").at("timeout_ms"), 100);
  EXPECT_EQ(obs->at("options").at("event_loops"), 1);
  EXPECT_EQ(obs->at("options").at("stats"), "custom");
  std::vector<std::string> stack;
  for (const auto& s : obs->at("stack").as_array()) {
    stack.push_back(std::string(s.at("role").as_string()) + ":" +
                    std::string(s.at("name").as_string()));
  }
  EXPECT_THAT(stack, ::testing::ElementsAre("timeout:timeout", "loadbalancer:heap-balancer",
                                            "resurrector:resurrector", "pool:watermark-pool",
                                            "transport:fake"));
  const auto& loop = obs->at("loops").at(0).as_object();
  EXPECT_EQ(loop.at("pending"), 2);
  EXPECT_EQ(loop.at("balancer"), "heap-balancer");
  EXPECT_EQ(loop.at("sinks").at(0).at("name"), "timeout");
  const auto& member = loop.at("members").at(0).as_object();
  EXPECT_EQ(member.at("endpoint"), "10.9.0.1:80");
  EXPECT_EQ(member.at("load"), 2);
  EXPECT_EQ(member.at("state"), "open");
  const auto& total = obs->at("members").at(0).as_object();
  EXPECT_EQ(total.at("endpoint"), "10.9.0.1:80");
  EXPECT_EQ(total.at("load"), 2);
  EXPECT_EQ(total.at("states").at("open"), 1);

  ASSERT_TRUE(factory_.last().Reply(0, 1));
  Run();
  ASSERT_TRUE(factory_.last().Reply(0, 1));
  Run();
  core_->Close();
  names.clear();
  ClientCore::ForEachLiveClient([&](const ClientCore& c) { names.push_back(c.name()); });
  EXPECT_THAT(names, Not(::testing::Contains("obs")));  // closed clients are not listed
}

// ---- Export details ----

TEST(StatsExportTest, ExportBucketsCountEveryBoundInclusively) {
  Histogram h;
  for (int64_t v :
       std::initializer_list<int64_t>{-5, 0, 10, 11, 25, 26, 100000000, 100000001, INT64_MAX}) {
    h.Record(v);
  }
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.export_buckets[0], 3);  // -5 (as 0), 0, 10 -> le 10
  EXPECT_EQ(s.export_buckets[1], 2);  // 11, 25 -> le 25
  EXPECT_EQ(s.export_buckets[2], 1);  // 26 -> le 50
  EXPECT_EQ(s.export_buckets[stats::kExportBucketBounds.size() - 1], 1);  // 100 s exactly
  EXPECT_EQ(s.export_buckets[stats::kExportBucketBounds.size()], 2);      // +Inf
  EXPECT_EQ(Histogram::ExportBucketIndex(1000), 6u);
  EXPECT_EQ(Histogram::ExportBucketIndex(1001), 7u);
}

TEST(StatsExportTest, PrometheusNamesLabelsAndEscapes) {
  StatsRegistry r;
  r.GetCounter("my.app-requests", {{"client", "a\"b\\c\nd"}, {"bad-key", "x"}}).Increment(2);
  r.GetCounter("already_total").Increment();
  r.GetGauge("9lives").Set(-3);
  r.GetHistogram("h_us", {{"le", "user"}}).Record(7);
  r.SetHelp("my.app-requests", "Requests\nof my \\ app.");
  PromText prom = ParsePrometheusText(r.ToPrometheus());
  EXPECT_EQ(prom.Value("my_app_requests_total", {{"client", "a\"b\\c\nd"}, {"bad_key", "x"}}), 2);
  EXPECT_EQ(prom.Family("my_app_requests_total")->help, "Requests\nof my \\ app.");
  EXPECT_EQ(prom.Value("already_total"), 1);  // no second _total
  EXPECT_EQ(prom.Value("_9lives"), -3);
  EXPECT_EQ(prom.Family("_9lives")->help, "scales metric 9lives");
  // A user label named le is renamed, as Prometheus does on conflicts.
  EXPECT_EQ(prom.Value("h_us_bucket", {{"exported_le", "user"}, {"le", "10"}}), 1);
  EXPECT_EQ(prom.Value("h_us_count", {{"exported_le", "user"}}), 1);
  EXPECT_EQ(prom.Value("h_us_quantile", {{"exported_le", "user"}, {"quantile", "0.5"}}), 7);
}

// Label names starting with "__" are reserved for Prometheus' own use: a user label __name__
// (the registry takes any key) made Go's expfmt parser reject the whole scrape ("label name
// "__name__" is reserved") and gave the series a second metric name in Prometheus. They are
// exported as exported_<name>, as Prometheus renames a label on a conflict.
TEST(StatsExportTest, PrometheusRenamesReservedLabelNames) {
  StatsRegistry r;
  r.GetCounter("c", {{"__name__", "x"}, {"client", "a"}}).Increment(1);
  r.GetGauge("g", {{"__meta", "y"}}).Set(2);
  const std::string text = r.ToPrometheus();
  EXPECT_THAT(text, Not(HasSubstr("{__"))) << text;
  PromText prom = ParsePrometheusText(text);
  EXPECT_EQ(prom.Value("c_total", {{"exported___name__", "x"}, {"client", "a"}}), 1);
  EXPECT_EQ(prom.Value("g", {{"exported___meta", "y"}}), 2);
}

TEST(StatsExportTest, PrometheusSkipsAFamilyOfAnotherType) {
  StatsRegistry r;
  r.GetCounter("x").Increment(1);
  r.GetGauge("x_total").Set(5);  // would be the same family as the counter
  std::string text = r.ToPrometheus();
  PromText prom = ParsePrometheusText(text);
  EXPECT_EQ(prom.Family("x_total")->type, "counter");
  EXPECT_EQ(prom.Value("x_total"), 1);
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge x_total: family x_total is a counter\n"));
}

// Two names (or label names) that export as one series would make Prometheus reject the whole
// scrape ("duplicate sample"): the first in the registry's order is kept, the other reported.
TEST(StatsExportTest, PrometheusWritesASeriesOnceWhenTwoNamesExportAsIt) {
  StatsRegistry r;
  r.GetCounter("x", {{"client", "c"}}).Increment(1);
  r.GetCounter("x_total", {{"client", "c"}}).Increment(2);
  r.GetCounter("x_total", {{"client", "d"}}).Increment(3);  // another series: kept
  r.GetGauge("my.app").Set(4);
  r.GetGauge("my_app").Set(5);
  r.GetHistogram("h.us", {{"bad-key", "v"}}).Record(7);
  r.GetHistogram("h_us", {{"bad_key", "v"}}).Record(9);
  std::string text = r.ToPrometheus();
  PromText prom = ParsePrometheusText(text);  // fails on a repeated series
  EXPECT_EQ(prom.Value("x_total", {{"client", "c"}}), 1);
  EXPECT_EQ(prom.Value("x_total", {{"client", "d"}}), 3);
  EXPECT_EQ(prom.Value("my_app"), 4);
  EXPECT_EQ(prom.Value("h_us_count", {{"bad_key", "v"}}), 1);
  EXPECT_EQ(prom.Value("h_us_quantile", {{"bad_key", "v"}, {"quantile", "0.5"}}), 7);
  EXPECT_THAT(text, HasSubstr("# scales: skipped counter x_total: series x_total{client=\"c\"} is x's\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge my_app: series my_app is my.app's\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped histogram h_us: series h_us_bucket{bad_key=\"v\"} is h.us's\n"));
  // Its quantile gauges go with it, reported once (PrometheusSkipsASkippedHistogramsQuantilesToo).
  EXPECT_THAT(text, Not(HasSubstr("# scales: skipped gauge h_us:")));
}

// The same series however the raw labels sort ("http.status" sorts before "http_method", but
// sanitises to http_status, after it), and a histogram's _sum, _count and _bucket samples are its
// own: a gauge h_sum with the histogram's labels is another name for one of them (and with other
// labels, a family expfmt takes for h's: PrometheusWritesNoFamilyNamedAfterAHistogramsSamples).
TEST(StatsExportTest, PrometheusSeriesClashesAcrossLabelOrderAndHistogramSuffixes) {
  StatsRegistry r;
  r.GetGauge("g", {{"http.status", "200"}, {"http_method", "GET"}}).Set(1);
  r.GetGauge("g", {{"http_status", "200"}, {"http_method", "GET"}}).Set(2);
  r.GetHistogram("h", {{"client", "c"}}).Record(5);
  r.GetGauge("h_sum", {{"client", "c"}}).Set(3);
  r.GetGauge("h_sum", {{"client", "d"}}).Set(4);  // not the histogram's series, but its family
  std::string text = r.ToPrometheus();
  PromText prom = ParsePrometheusText(text);  // fails on a repeated series
  EXPECT_EQ(prom.Value("g", {{"http_method", "GET"}, {"http_status", "200"}}), 1);
  EXPECT_EQ(prom.Value("h_sum", {{"client", "c"}}), 5);
  EXPECT_EQ(prom.Value("h_sum", {{"client", "d"}}), std::nullopt);
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge g: series g{http_method=\"GET\",http_status=\"200\"} is g's\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge h_sum: series h_sum{client=\"c\"} is h's\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge h_sum: family h_sum would hold histogram h's "
                              "samples\n"));
}

// A gauge h_bucket with the histogram's labels plus an le label is one of h's bucket series
// (h_bucket{client="c",le="10"} twice rejects the scrape), whichever of the two comes first.
TEST(StatsExportTest, PrometheusGaugeWithAnLeLabelCannotRepeatAHistogramBucket) {
  StatsRegistry r;
  r.GetHistogram("h", {{"client", "c"}}).Record(5);
  r.GetGauge("h_bucket", {{"client", "c"}, {"le", "10"}}).Set(7);
  r.GetGauge("h_bucket", {{"client", "d"}, {"le", "10"}}).Set(8);  // h's family: skipped too
  // "a-b_bucket" sorts before "a.b": the gauge is written first, the histogram is skipped.
  r.GetGauge("a-b_bucket", {{"le", "10"}}).Set(9);
  r.GetHistogram("a.b").Record(5);
  std::string text = r.ToPrometheus();
  PromText prom = ParsePrometheusText(text);  // fails on a repeated series
  EXPECT_EQ(prom.Value("h_bucket", {{"client", "c"}, {"le", "10"}}), 1);
  EXPECT_EQ(prom.Value("h_bucket", {{"client", "d"}, {"le", "10"}}), std::nullopt);
  EXPECT_EQ(prom.Value("a_b_bucket", {{"le", "10"}}), 9);
  EXPECT_EQ(prom.Value("a_b_count"), std::nullopt);
  EXPECT_THAT(text,
              HasSubstr("# scales: skipped gauge h_bucket: series h_bucket{client=\"c\"} is h's\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge h_bucket: family h_bucket would hold "
                              "histogram h's samples\n"));
  EXPECT_THAT(text,
              HasSubstr("# scales: skipped histogram a.b: series a_b_bucket is a-b_bucket's\n"));
}

// The first "# TYPE" line of `text` that Go's expfmt parser (promtool, the Pushgateway, client_golang's
// own checks) takes for a histogram's second TYPE line: it reads a name h_bucket, h_sum or h_count
// as histogram h's samples, whatever the labels, so "# TYPE h_sum gauge" after "# TYPE h
// histogram" fails the whole text. "" when there is none.
std::string TypeLineExpfmtRejects(std::string_view text) {
  std::set<std::string> histograms;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t end = std::min(text.find('\n', pos), text.size());
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (!line.starts_with("# TYPE ")) continue;
    const std::string_view rest = line.substr(7);
    const std::string name(rest.substr(0, rest.find(' ')));
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      if (name.ends_with(suffix) &&
          histograms.contains(name.substr(0, name.size() - std::strlen(suffix)))) {
        return std::string(line);
      }
    }
    if (rest.ends_with(" histogram")) histograms.insert(name);
  }
  return "";
}

// A family named h_sum, h_count or h_bucket beside a histogram h, with any labels, is h's samples
// to Go's expfmt parser: its TYPE line fails the whole scrape. Such a metric is skipped and
// reported (whichever comes first in the registry's order is kept), and a metric skipped for a
// series clash leaves no family behind (an empty "# TYPE h_sum gauge" failed it too).
TEST(StatsExportTest, PrometheusWritesNoFamilyNamedAfterAHistogramsSamples) {
  StatsRegistry r;
  r.GetHistogram("h", {{"client", "c"}}).Record(5);
  r.GetGauge("h_sum", {{"client", "c"}}).Set(3);    // one of h's series
  r.GetGauge("h_count", {{"client", "d"}}).Set(4);  // another series, but h's family
  r.GetHistogram("h_bucket").Record(6);
  // "a-b_sum" sorts before "a.b": the gauge is kept, the histogram is skipped.
  r.GetGauge("a-b_sum").Set(9);
  r.GetHistogram("a.b", {{"client", "c"}}).Record(5);
  const std::string text = r.ToPrometheus({.quantiles = false});
  EXPECT_EQ(TypeLineExpfmtRejects(text), "") << text;
  PromText prom = ParsePrometheusText(text);
  EXPECT_EQ(prom.Value("h_count", {{"client", "c"}}), 1);
  EXPECT_EQ(prom.Family("h_sum"), nullptr);
  EXPECT_EQ(prom.Family("h_count"), nullptr);
  EXPECT_EQ(prom.Family("h_bucket"), nullptr);
  EXPECT_EQ(prom.Value("a_b_sum"), 9);
  EXPECT_EQ(prom.Family("a_b"), nullptr);
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge h_sum: series h_sum{client=\"c\"} is h's\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped gauge h_count: family h_count would hold "
                              "histogram h's samples\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped histogram h_bucket: family h_bucket would hold "
                              "histogram h's samples\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped histogram a.b: family a_b_sum would hold its "
                              "samples\n"));
}

// The quantile gauges are no summary (the export writes none: no _sum or _count of theirs to
// clash) but part of their histogram: a histogram skipped for a clash of its own families is
// skipped whole, its "<name>_quantile" family too, or the comment would name a histogram whose
// quantiles are still exported.
TEST(StatsExportTest, PrometheusSkipsASkippedHistogramsQuantilesToo) {
  StatsRegistry r;
  // "a-b_sum" sorts before "a.b": the gauge is kept, the histogram is skipped.
  r.GetGauge("a-b_sum").Set(9);
  r.GetHistogram("a.b", {{"client", "c"}}).Record(5);
  // "c-d" sorts before "c.d": family c_d is a gauge, the histogram is skipped.
  r.GetGauge("c-d").Set(8);
  r.GetHistogram("c.d").Record(5);
  const std::string text = r.ToPrometheus();
  EXPECT_THAT(text, Not(HasSubstr(" summary\n")));
  PromText prom = ParsePrometheusText(text);
  EXPECT_EQ(prom.Value("a_b_sum"), 9);
  EXPECT_EQ(prom.Value("c_d"), 8);
  EXPECT_EQ(prom.Family("a_b_quantile"), nullptr) << text;
  EXPECT_EQ(prom.Family("c_d_quantile"), nullptr) << text;
  EXPECT_THAT(text, HasSubstr("# scales: skipped histogram a.b: family a_b_sum would hold its "
                              "samples\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped histogram c.d: family c_d is a gauge\n"));
}

// Two label keys of one metric that export as one label name would repeat that label in the
// series (`a_b="1",a_b="2"`), which Prometheus rejects the whole scrape for, as it does a
// repeated series: the metric is skipped and reported, the others are written.
TEST(StatsExportTest, PrometheusSkipsAMetricTwoOfWhoseLabelKeysExportAlike) {
  StatsRegistry r;
  r.GetCounter("c", {{"a-b", "1"}, {"a_b", "2"}}).Increment(1);
  r.GetCounter("c", {{"a-b", "3"}}).Increment(2);                      // one label: kept
  r.GetGauge("g", {{"k", "1"}, {"k", "2"}}).Set(3);                    // a key given twice
  r.GetHistogram("h", {{"le", "1"}, {"exported_le", "2"}}).Record(4);  // le is renamed exported_le
  const std::string text = r.ToPrometheus();
  PromText prom = ParsePrometheusText(text);  // fails on a label given twice
  EXPECT_EQ(prom.Value("c_total", {{"a_b", "3"}}), 2);
  EXPECT_EQ(prom.Value("c_total", {{"a_b", "1"}}), std::nullopt);
  EXPECT_EQ(prom.Value("g", {{"k", "1"}}), std::nullopt);
  EXPECT_EQ(prom.Family("h"), nullptr);
  EXPECT_EQ(prom.Family("h_quantile"), nullptr);
  EXPECT_THAT(
      text,
      HasSubstr("# scales: skipped counter c: labels a-b and a_b are both exported as a_b\n"));
  EXPECT_THAT(text,
              HasSubstr("# scales: skipped gauge g: labels k and k are both exported as k\n"));
  EXPECT_THAT(text, HasSubstr("# scales: skipped histogram h: labels exported_le and le are both "
                              "exported as exported_le\n"));
  EXPECT_THAT(text, Not(HasSubstr("# scales: skipped gauge h:")));  // its quantiles: with it
}

TEST(StatsExportTest, EmptyHistogramAndEmptyRegistry) {
  StatsRegistry empty;
  EXPECT_EQ(empty.ToPrometheus(), "");
  StatsRegistry r;
  r.GetHistogram("idle_us", {{"client", "c"}});
  PromText prom = ParsePrometheusText(r.ToPrometheus());
  EXPECT_EQ(prom.Value("idle_us_bucket", {{"client", "c"}, {"le", "+Inf"}}), 0);
  EXPECT_EQ(prom.Value("idle_us_count", {{"client", "c"}}), 0);
  EXPECT_EQ(prom.Value("idle_us_quantile", {{"client", "c"}, {"quantile", "0.5"}}), 0);
  boost::json::object o = boost::json::parse(r.ToJson()).as_object();
  EXPECT_EQ(o.at("clnt/c/idle_us.count").as_int64(), 0);
  EXPECT_EQ(o.size(), 1u);
}

TEST(StatsExportTest, JsonKeysPutClientEndpointAndOtherLabelsInPlace) {
  StatsRegistry r;
  r.GetCounter("n", {{"zone", "z1"}, {"client", "c"}, {"endpoint", "h:1"}, {"error", "e"}})
      .Increment(4);
  r.GetCounter("bare").Increment(1);
  r.GetGauge("g", {{"other", "o"}}).Set(2);
  boost::json::object o = boost::json::parse(r.ToJson()).as_object();
  EXPECT_EQ(o.at("clnt/c/h:1/n/e/z1").as_int64(), 4);  // other labels in key order: error, zone
  EXPECT_EQ(o.at("bare").as_int64(), 1);
  EXPECT_EQ(o.at("g/o").as_int64(), 2);
}

// A key of the flat JSON is written once, as ToPrometheus() writes a series once: a metric whose
// key (for a histogram, any of its keys, written or not while it is empty) an earlier metric in
// Snapshot() order has taken is skipped whole and logged (JSON has no comment line). The later
// one won before: a counter "h.count" replaced histogram h's count.
TEST(StatsExportTest, JsonWritesAKeyOnceAndLogsTheMetricItSkips) {
  test::LogCapture log(LogLevel::kWarning);
  StatsRegistry r;
  r.GetHistogram("h").Record(5);
  r.GetCounter("h.count").Increment(7);  // one of h's keys
  r.GetHistogram("e");                   // empty: writes only e.count, but owns e.p50 too
  r.GetGauge("e.p50").Set(8);
  // "clnt/c/x.sum" sorts before "x": the gauge comes first, the histogram is skipped whole.
  r.GetGauge("clnt/c/x.sum").Set(9);
  r.GetHistogram("x", {{"client", "c"}}).Record(6);
  // Equal values under other label keys: one key.
  r.GetGauge("g", {{"a", "1"}}).Set(1);
  r.GetGauge("g", {{"b", "1"}}).Set(2);
  const boost::json::object o = boost::json::parse(r.ToJson()).as_object();
  EXPECT_EQ(o.at("h.count").as_int64(), 1);
  EXPECT_EQ(o.at("h.max").as_int64(), 5);
  EXPECT_EQ(o.at("e.count").as_int64(), 0);
  EXPECT_FALSE(o.contains("e.p50"));
  EXPECT_EQ(o.at("clnt/c/x.sum").as_int64(), 9);
  EXPECT_FALSE(o.contains("clnt/c/x.count"));
  EXPECT_EQ(o.at("g/1").as_int64(), 1);
  EXPECT_EQ(o.size(), 11u + 1u + 1u + 1u);  // h, e.count, clnt/c/x.sum, g/1
  EXPECT_TRUE(log.Has({"stats: ToJson() skipped counter h.count: key h.count is h's"})) << log.All();
  EXPECT_TRUE(log.Has({"skipped gauge e.p50: key e.p50 is e's"})) << log.All();
  EXPECT_TRUE(log.Has({"skipped histogram x{client=\"c\"}: key clnt/c/x.sum is clnt/c/x.sum's"}))
      << log.All();
  EXPECT_TRUE(log.Has({"skipped gauge g{b=\"1\"}: key g/1 is g{a=\"1\"}'s"})) << log.All();
}

TEST(StatsExportTest, ParserRejectsBrokenText) {
  EXPECT_THROW(ParsePrometheusText("a 1"), std::runtime_error);               // no newline
  EXPECT_THROW(ParsePrometheusText("a{b=\"x} 1\n"), std::runtime_error);      // unterminated
  EXPECT_THROW(ParsePrometheusText("a{b=\"\\t\"} 1\n"), std::runtime_error);  // bad escape
  EXPECT_THROW(ParsePrometheusText("a 1\nb 1\na 2\n"), std::runtime_error);   // split family
  EXPECT_THROW(ParsePrometheusText("a one\n"), std::runtime_error);           // bad number
  EXPECT_THROW(
      ParsePrometheusText("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                          "h_count 1\n"),
      std::runtime_error);  // decreasing
  EXPECT_THROW(ParsePrometheusText("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 2\n"),
               std::runtime_error);  // count mismatch
  EXPECT_NO_THROW(ParsePrometheusText("# a comment\n\nx_total{a=\"1\",} 3 1700000000000\n"));
}

}  // namespace
}  // namespace scales
