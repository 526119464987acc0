// The stats registry at its edges: what the exports write for names and labels the
// registry accepts (it accepts any), collectors removed while an export runs, and histogram
// sums at the largest values.

#include <cstdint>
#include <future>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <boost/json.hpp>

#include "scales/stats/stats.h"
#include "stats/metric_help.h"
#include "support/prometheus_text.h"

namespace scales::stats {
namespace {

using test::ParsePrometheusText;
using ::testing::HasSubstr;

// True when `s` is well-formed UTF-8 (what Prometheus requires of label values and HELP text,
// and JSON of every string).
bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

// The "# scales: skipped" comment quotes the raw names: a raw name with a newline (the
// registry accepts any name) ended the comment line, and the rest of the name became a sample
// line that Prometheus rejects the whole scrape for.
TEST(StatsEdgeCaseTest, PrometheusSkippedCommentsKeepRawNamesOnOneLine) {
  StatsRegistry r;
  r.GetCounter("a\nb").Increment(1);  // sorts first: kept, as a_b_total
  r.GetCounter("a.b").Increment(2);   // the same series: skipped, quoting "a\nb"
  r.GetCounter("c", {{"k\nx", "1"}, {"k_x", "2"}}).Increment(3);  // two keys exported as k_x
  const std::string text = r.ToPrometheus();
  EXPECT_NO_THROW(ParsePrometheusText(text)) << text;
  EXPECT_EQ(ParsePrometheusText(text).Value("a_b_total"), 1);
  EXPECT_THAT(text, HasSubstr("# scales: skipped counter a.b: series a_b_total is a\\nb's\n"));
  EXPECT_THAT(
      text,
      HasSubstr("# scales: skipped counter c: labels k\\nx and k_x are both exported as k_x\n"));
}

// A collector removed while an export runs is not started by that export once
// RemoveCollector() returned (its owner may be gone by then).
TEST(StatsEdgeCaseTest, ACollectorRemovedDuringAnExportIsNotStartedAfterwards) {
  StatsRegistry r;
  std::promise<void> entered;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  r.AddCollector([&entered, released] {
    entered.set_value();
    released.wait();
  });
  bool second_ran = false;
  const uint64_t second = r.AddCollector([&second_ran] { second_ran = true; });
  std::thread exporter([&r] { r.ToPrometheus(); });
  entered.get_future().wait();  // the export runs the first collector
  r.RemoveCollector(second);
  release.set_value();
  exporter.join();
  EXPECT_FALSE(second_ran) << "the export started a collector removed before its turn";
}

// Histograms hold non-negative values up to INT64_MAX (the last bucket): their sum saturates
// instead of wrapping to a negative number (a negative mean, a negative Prometheus _sum).
TEST(StatsEdgeCaseTest, HistogramSumSaturatesAtTheLargestValue) {
  StatsRegistry r;
  Histogram& h = r.GetHistogram("big");
  h.Record(INT64_MAX);
  h.Record(INT64_MAX);
  h.Record(1);
  const HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 3);
  EXPECT_EQ(s.sum, INT64_MAX);
  EXPECT_GT(s.Mean(), 0.0);
  EXPECT_EQ(s.max, INT64_MAX);
  EXPECT_EQ(s.Percentile(1.0), INT64_MAX);
  EXPECT_EQ(s.Percentile(0.0), 1);
  auto prom = ParsePrometheusText(r.ToPrometheus());
  EXPECT_GE(prom.Value("big_sum").value_or(-1), 0);
}

// Label values, names and help texts are bytes: one that is not UTF-8 (a client name from a
// config file in Latin-1, say) made the JSON export unparseable and the Prometheus one a
// scrape Prometheus rejects ("invalid UTF-8 label value"). The bad bytes become U+FFFD.
TEST(StatsEdgeCaseTest, ExportsAreValidUtf8WhateverTheLabels) {
  StatsRegistry r;
  r.GetCounter("requests", {{"client", "caf\xe9"}}).Increment(1);
  r.GetGauge("g\xff", {{"endpoint", "h\xc3"}}).Set(2);
  r.SetHelp("requests", "Requests of caf\xe9.");
  const std::string json = r.ToJson();
  EXPECT_TRUE(ValidUtf8(json));
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(json, ec);
  ASSERT_FALSE(ec) << ec.message() << ": " << json;
  EXPECT_EQ(v.as_object().at("clnt/caf\xef\xbf\xbd/requests").as_int64(), 1);
  const std::string prom = r.ToPrometheus();
  EXPECT_TRUE(ValidUtf8(prom)) << prom;
  auto parsed = ParsePrometheusText(prom);
  EXPECT_EQ(parsed.Value("requests_total", {{"client", "caf\xef\xbf\xbd"}}), 1);
  // Valid UTF-8 is left alone.
  StatsRegistry ok;
  ok.GetCounter("requests", {{"client", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"}}).Increment(1);
  EXPECT_THAT(ok.ToPrometheus(), HasSubstr("client=\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""));
}

// Every metric scales registers has its built-in HELP text (ToPrometheus() wrote "scales metric
// <name>" for one the table missed). The names registered in src/, at the time of this review.
TEST(StatsEdgeCaseTest, EveryScalesMetricHasBuiltinHelp) {
  for (const char* name : {
           "scales_backup_requests_budget_exhausted",
           "scales_backup_requests_retry_budget_exhausted",
           "scales_backup_requests_sent",
           "scales_backup_requests_won",
           "scales_backup_send_after_us",
           "scales_bytes_received",
           "scales_bytes_sent",
           "scales_connect_errors",
           "scales_connect_latency_us",
           "scales_connections",
           "scales_connects",
           "scales_discovery_malformed_members",
           "scales_discovery_read_retries",
           "scales_discovery_updates",
           "scales_endpoint_failed_fast",
           "scales_endpoint_marked_down",
           "scales_endpoint_reconnect_attempts",
           "scales_failure_accrual_dead",
           "scales_failure_accrual_removals",
           "scales_failure_accrual_revivals",
           "scales_failures",
           "scales_failures_by_error",
           "scales_lb_aperture",
           "scales_lb_aperture_contractions",
           "scales_lb_aperture_expansions",
           "scales_lb_aperture_rotations",
           "scales_lb_avoided",
           "scales_lb_joins",
           "scales_lb_leaves",
           "scales_lb_marked_down",
           "scales_lb_marked_up",
           "scales_lb_no_members",
           "scales_lb_panic",
           "scales_lb_size",
           "scales_mux_discards",
           "scales_mux_drains",
           "scales_mux_nacks",
           "scales_mux_ping_timeouts",
           "scales_mux_pings",
           "scales_mux_protocol_errors",
           "scales_mux_tags_in_use",
           "scales_mux_tls_upgrades",
           "scales_pending",
           "scales_pool_connect_failures",
           "scales_pool_idle",
           "scales_pool_idle_expired",
           "scales_pool_queue_full",
           "scales_pool_size",
           "scales_pool_waiters",
           "scales_rejected",
           "scales_request_latency_us",
           "scales_requests",
           "scales_retries",
           "scales_retry_budget_balance",
           "scales_retry_budget_exhausted",
           "scales_successes",
           "scales_timeouts",
           "scales_zk_connection_losses",
           "scales_zk_session_expirations",
           "scales_zk_sessions",
       }) {
    EXPECT_FALSE(BuiltinHelp(name).empty()) << name;
  }
}

}  // namespace
}  // namespace scales::stats
