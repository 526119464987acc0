#include "scales/stats/stats.h"

#include <array>
#include <atomic>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <boost/json.hpp>

namespace scales::stats {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Pair;

// ---- Bucket layout ----

TEST(HistogramBucketTest, SmallValuesHaveExactBuckets) {
  for (int v = 0; v < 16; ++v) {
    EXPECT_EQ(Histogram::BucketIndex(v), v);
    EXPECT_EQ(Histogram::BucketUpperBound(v), v);
  }
}

TEST(HistogramBucketTest, DocumentedLayout) {
  // e = 4: 16..31 one value per bucket.
  EXPECT_EQ(Histogram::BucketIndex(16), 16);
  EXPECT_EQ(Histogram::BucketIndex(31), 31);
  // e = 5: width 2.
  EXPECT_EQ(Histogram::BucketIndex(32), 32);
  EXPECT_EQ(Histogram::BucketIndex(33), 32);
  EXPECT_EQ(Histogram::BucketIndex(34), 33);
  EXPECT_EQ(Histogram::BucketUpperBound(32), 33);
  // e = 9: 1000 -> sub = (1000 >> 5) & 15 = 15 -> 16 + 5 * 16 + 15, bucket 992..1023.
  EXPECT_EQ(Histogram::BucketIndex(1000), 16 + 5 * 16 + 15);
  EXPECT_EQ(Histogram::BucketUpperBound(16 + 5 * 16 + 15), 1023);
  EXPECT_EQ(Histogram::BucketUpperBound(16 + 5 * 16 + 14), 991);
}

TEST(HistogramBucketTest, RoundTripUpTo100000) {
  int previous_index = 0;
  for (int64_t v = 0; v <= 100000; ++v) {
    int index = Histogram::BucketIndex(v);
    ASSERT_GE(index, 0);
    ASSERT_LT(index, Histogram::kBucketCount);
    ASSERT_GE(index, previous_index) << v;
    previous_index = index;
    int64_t upper = Histogram::BucketUpperBound(index);
    ASSERT_GE(upper, v) << v;
    if (index > 0) {
      int64_t lower = Histogram::BucketUpperBound(index - 1) + 1;
      ASSERT_LE(lower, v) << v;
      if (v >= 16) {
        // Width relative to the bucket's values is at most 1/16.
        ASSERT_LE(static_cast<double>(upper - lower + 1), static_cast<double>(v) / 16.0) << v;
      }
    }
  }
}

TEST(HistogramBucketTest, EveryBucketBoundaryRoundTrips) {
  for (int i = 0; i + 1 < Histogram::kBucketCount; ++i) {
    int64_t upper = Histogram::BucketUpperBound(i);
    ASSERT_EQ(Histogram::BucketIndex(upper), i) << i;
    ASSERT_EQ(Histogram::BucketIndex(upper + 1), i + 1) << i;
  }
}

TEST(HistogramBucketTest, LargeAndNegativeValuesClamp) {
  const int last = Histogram::kBucketCount - 1;
  const int64_t two_41 = int64_t{1} << (Histogram::kMaxExponent + 1);
  EXPECT_EQ(Histogram::BucketIndex(two_41 - 1), last);
  EXPECT_EQ(Histogram::BucketIndex(two_41), last);
  EXPECT_EQ(Histogram::BucketIndex(INT64_MAX), last);
  EXPECT_EQ(Histogram::BucketIndex(int64_t{1} << 40), last - 15);
  EXPECT_EQ(Histogram::BucketUpperBound(last), INT64_MAX);
  EXPECT_EQ(Histogram::BucketUpperBound(last - 1), (int64_t{31} << 36) - 1);
  EXPECT_EQ(Histogram::BucketIndex(-1), 0);
  EXPECT_EQ(Histogram::BucketIndex(INT64_MIN), 0);
}

// ---- Recording and percentiles ----

TEST(HistogramTest, EmptySnapshot) {
  Histogram h;
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 0);
  EXPECT_EQ(s.sum, 0);
  EXPECT_EQ(s.min, 0);
  EXPECT_EQ(s.max, 0);
  EXPECT_THAT(s.buckets, IsEmpty());
  EXPECT_EQ(s.Percentile(0.5), 0);
  EXPECT_EQ(s.Mean(), 0.0);
}

TEST(HistogramTest, MinMaxMeanSum) {
  Histogram h;
  for (int64_t v : {3, 3, 3, 10}) h.Record(v);
  EXPECT_EQ(h.count(), 4);
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 4);
  EXPECT_EQ(s.sum, 19);
  EXPECT_EQ(s.min, 3);
  EXPECT_EQ(s.max, 10);
  EXPECT_DOUBLE_EQ(s.Mean(), 4.75);
  EXPECT_THAT(s.buckets, ElementsAre(Pair(3, 3), Pair(10, 1)));
  EXPECT_EQ(s.Percentile(0.5), 3);
  EXPECT_EQ(s.Percentile(0.75), 3);
  EXPECT_EQ(s.Percentile(0.76), 10);
  EXPECT_EQ(s.Percentile(1.0), 10);
  EXPECT_EQ(s.Percentile(0.0), 3);
}

TEST(HistogramTest, NegativeValuesRecordAsZero) {
  Histogram h;
  h.Record(-5);
  h.Record(4);
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.min, 0);
  EXPECT_EQ(s.max, 4);
  EXPECT_EQ(s.sum, 4);
  EXPECT_THAT(s.buckets, ElementsAre(Pair(0, 1), Pair(4, 1)));
}

TEST(HistogramTest, PercentilesOfOneToHundred) {
  Histogram h;
  for (int v = 1; v <= 100; ++v) h.Record(v);
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 100);
  EXPECT_EQ(s.min, 1);
  EXPECT_EQ(s.max, 100);
  EXPECT_DOUBLE_EQ(s.Mean(), 50.5);
  // Within bucket resolution (1/16) above the exact value.
  EXPECT_GE(s.Percentile(0.5), 50);
  EXPECT_LE(s.Percentile(0.5), 50 + 50 / 16);
  EXPECT_GE(s.Percentile(0.9), 90);
  EXPECT_LE(s.Percentile(0.9), 90 + 90 / 16);
  EXPECT_EQ(s.Percentile(0.99), 99);
  EXPECT_EQ(s.Percentile(1.0), 100);  // bucket 100..103, clamped to max
  EXPECT_EQ(s.Percentile(0.0), 1);
  EXPECT_EQ(s.Percentile(0.01), 1);
  EXPECT_EQ(s.Percentile(0.07), 7);  // 0.07 * 100 is 7.000000000000001 in doubles
  EXPECT_EQ(s.Percentile(0.15), 15);
  // Out-of-range quantiles are clamped.
  EXPECT_EQ(s.Percentile(2.0), 100);
  EXPECT_EQ(s.Percentile(-1.0), 1);
}

TEST(HistogramTest, SmallValuesAreExact) {
  Histogram h;
  for (int v = 0; v < 16; ++v) h.Record(v);
  HistogramSnapshot s = h.Snapshot();
  for (int rank = 1; rank <= 16; ++rank) {
    EXPECT_EQ(s.Percentile(rank / 16.0), rank - 1) << rank;
  }
}

TEST(HistogramTest, PercentileClampedToMinAndMax) {
  Histogram h;
  h.Record(1000);  // bucket 992..1023
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.Percentile(0.0), 1000);
  EXPECT_EQ(s.Percentile(0.5), 1000);
  EXPECT_EQ(s.Percentile(1.0), 1000);

  Histogram big;
  const int64_t huge = int64_t{1} << 50;  // beyond the last exponent
  big.Record(huge);
  big.Record(huge + 7);
  HistogramSnapshot b = big.Snapshot();
  EXPECT_EQ(b.Percentile(0.5), huge + 7);  // last bucket's bound clamped to max
  EXPECT_EQ(b.min, huge);
  EXPECT_EQ(b.max, huge + 7);
}

// ---- Counters, gauges ----

TEST(CounterGaugeTest, Basics) {
  StatsRegistry r;
  Counter& c = r.GetCounter("requests");
  c.Increment();
  c.Increment(4);
  EXPECT_EQ(c.value(), 5);
  Gauge& g = r.GetGauge("pending");
  g.Set(10);
  g.Add(-3);
  g.Add(1);
  EXPECT_EQ(g.value(), 8);
  EXPECT_EQ(r.FindCounter("requests", {}), &c);
  EXPECT_EQ(r.FindGauge("pending", {}), &g);
  EXPECT_EQ(r.FindCounter("missing", {}), nullptr);
}

// ---- Registry ----

TEST(StatsRegistryTest, LabelsAreSortedAndOrderDoesNotMatter) {
  StatsRegistry r;
  Counter& a = r.GetCounter("requests", {{"endpoint", "10.0.0.1:80"}, {"client", "users"}});
  Counter& b = r.GetCounter("requests", {{"client", "users"}, {"endpoint", "10.0.0.1:80"}});
  EXPECT_EQ(&a, &b);
  Counter& other = r.GetCounter("requests", {{"client", "users"}, {"endpoint", "10.0.0.2:80"}});
  EXPECT_NE(&a, &other);
  Counter& unlabelled = r.GetCounter("requests");
  EXPECT_NE(&a, &unlabelled);
  EXPECT_EQ(r.FindCounter("requests", {{"endpoint", "10.0.0.1:80"}, {"client", "users"}}), &a);

  std::vector<MetricSnapshot> snap = r.Snapshot();
  ASSERT_EQ(snap.size(), 3u);
  EXPECT_THAT(snap[0].labels, IsEmpty());
  EXPECT_THAT(snap[1].labels,
              ElementsAre(Pair("client", "users"), Pair("endpoint", "10.0.0.1:80")));
  EXPECT_THAT(snap[2].labels,
              ElementsAre(Pair("client", "users"), Pair("endpoint", "10.0.0.2:80")));
}

TEST(StatsRegistryTest, TypeClashThrows) {
  StatsRegistry r;
  r.GetCounter("x", {{"k", "v"}});
  EXPECT_THROW(r.GetGauge("x", {{"k", "v"}}), std::logic_error);
  EXPECT_THROW(r.GetHistogram("x", {{"k", "v"}}), std::logic_error);
  try {
    r.GetGauge("x", {{"k", "v"}});
  } catch (const std::logic_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("x{k=\"v\"} is a counter, not a gauge"));
  }
  // Same name, other labels: a separate metric, any type.
  EXPECT_NO_THROW(r.GetGauge("x", {{"k", "w"}}));
  // Find with the wrong type finds nothing.
  EXPECT_EQ(r.FindGauge("x", {{"k", "v"}}), nullptr);
  EXPECT_EQ(r.FindHistogram("x", {{"k", "v"}}), nullptr);
  EXPECT_NE(r.FindCounter("x", {{"k", "v"}}), nullptr);
}

// A registration that throws for the type leaves the registry as it was: no entry of the other
// type, the first one's value and reference kept, every export unchanged (an event loop that
// logs the exception and carries on exports the same metrics afterwards).
TEST(StatsRegistryTest, ATypeClashLeavesTheRegistryUnchanged) {
  StatsRegistry r;
  Counter& c = r.GetCounter("x", {{"k", "v"}});
  c.Increment(3);
  r.GetHistogram("h").Record(5);
  const std::string text = r.ToText(), json = r.ToJson(), prom = r.ToPrometheus();
  EXPECT_THROW(r.GetGauge("x", {{"k", "v"}}), std::logic_error);
  EXPECT_THROW(r.GetHistogram("x", {{"k", "v"}}), std::logic_error);
  EXPECT_THROW(r.GetCounter("h"), std::logic_error);
  EXPECT_EQ(r.Snapshot().size(), 2u);
  EXPECT_EQ(&r.GetCounter("x", {{"k", "v"}}), &c);
  EXPECT_EQ(r.ToText(), text);
  EXPECT_EQ(r.ToJson(), json);
  EXPECT_EQ(r.ToPrometheus(), prom);
}

TEST(StatsRegistryTest, SnapshotSortedByNameThenLabels) {
  StatsRegistry r;
  r.GetGauge("b");
  r.GetCounter("a", {{"k", "2"}}).Increment(2);
  r.GetCounter("a", {{"k", "1"}}).Increment(1);
  r.GetHistogram("c").Record(7);
  std::vector<MetricSnapshot> snap = r.Snapshot();
  ASSERT_EQ(snap.size(), 4u);
  EXPECT_EQ(snap[0].name, "a");
  EXPECT_EQ(snap[0].value, 1);
  EXPECT_EQ(snap[1].name, "a");
  EXPECT_EQ(snap[1].value, 2);
  EXPECT_EQ(snap[2].name, "b");
  EXPECT_EQ(snap[2].type, MetricType::kGauge);
  EXPECT_EQ(snap[3].name, "c");
  EXPECT_EQ(snap[3].type, MetricType::kHistogram);
  EXPECT_EQ(snap[3].histogram.count, 1);
  EXPECT_EQ(snap[3].histogram.max, 7);
}

StatsRegistry& FillSample(StatsRegistry& r) {
  r.GetCounter("scales_requests", {{"endpoint", "127.0.0.1:80"}, {"client", "users"}})
      .Increment(42);
  r.GetGauge("scales_pending").Set(3);
  Histogram& h = r.GetHistogram("scales_latency_us", {{"client", "users"}});
  for (int v = 1; v <= 100; ++v) h.Record(v);
  return r;
}

TEST(StatsRegistryTest, ToText) {
  StatsRegistry r;
  FillSample(r);
  EXPECT_EQ(r.ToText(),
            "scales_latency_us{client=\"users\"} count=100 mean=50.5 p50=51 p90=91 p99=99 "
            "p999=100 max=100\n"
            "scales_pending 3\n"
            "scales_requests{client=\"users\",endpoint=\"127.0.0.1:80\"} 42\n");
}

TEST(StatsRegistryTest, ToTextEscapesLabelValues) {
  StatsRegistry r;
  r.GetCounter("c", {{"k", "a\"b\\c\nd"}}).Increment();
  EXPECT_EQ(r.ToText(), "c{k=\"a\\\"b\\\\c\\nd\"} 1\n");
}

// A newline in a metric name or a label key (names come from code, a custom sink's too) would
// split its line: written as \n.
TEST(StatsRegistryTest, ToTextKeepsOneLinePerMetric) {
  StatsRegistry r;
  r.GetCounter("odd\nname", {{"k\ney", "v"}}).Increment();
  EXPECT_EQ(r.ToText(), "odd\\nname{k\\ney=\"v\"} 1\n");
}

TEST(StatsRegistryTest, ToJson) {
  StatsRegistry r;
  FillSample(r);
  boost::json::value v = boost::json::parse(r.ToJson());
  ASSERT_TRUE(v.is_object());
  const boost::json::object& o = v.as_object();
  EXPECT_EQ(o.at("clnt/users/127.0.0.1:80/scales_requests").as_int64(), 42);
  EXPECT_EQ(o.at("scales_pending").as_int64(), 3);
  const std::string h = "clnt/users/scales_latency_us";
  EXPECT_EQ(o.at(h + ".count").as_int64(), 100);
  EXPECT_EQ(o.at(h + ".sum").as_int64(), 5050);
  EXPECT_DOUBLE_EQ(o.at(h + ".avg").as_double(), 50.5);
  EXPECT_EQ(o.at(h + ".min").as_int64(), 1);
  EXPECT_EQ(o.at(h + ".max").as_int64(), 100);
  EXPECT_EQ(o.at(h + ".p50").as_int64(), 51);
  EXPECT_EQ(o.at(h + ".p90").as_int64(), 91);
  EXPECT_EQ(o.at(h + ".p95").as_int64(), 95);
  EXPECT_EQ(o.at(h + ".p99").as_int64(), 99);
  EXPECT_EQ(o.at(h + ".p9990").as_int64(), 100);
  EXPECT_EQ(o.at(h + ".p9999").as_int64(), 100);
  EXPECT_EQ(o.size(), 2u + 11u);
}

TEST(StatsRegistryTest, EmptyRegistry) {
  StatsRegistry r;
  EXPECT_THAT(r.Snapshot(), IsEmpty());
  EXPECT_EQ(r.ToText(), "");
  EXPECT_EQ(r.ToJson(), "{}");
}

TEST(StatsRegistryTest, DefaultIsOneInstance) {
  EXPECT_EQ(&StatsRegistry::Default(), &StatsRegistry::Default());
  EXPECT_EQ(StatsScope().registry(), &StatsRegistry::Default());
}

// ---- Scopes ----

TEST(StatsScopeTest, WithLabelAddsAndReplacesKeepingOrder) {
  StatsRegistry r;
  StatsScope base(&r, {{"client", "users"}});
  StatsScope scoped = base.WithLabel("endpoint", "10.0.0.1:80").WithLabel("a_first", "x");
  EXPECT_THAT(scoped.labels(), ElementsAre(Pair("a_first", "x"), Pair("client", "users"),
                                           Pair("endpoint", "10.0.0.1:80")));
  StatsScope replaced = scoped.WithLabel("client", "orders");
  EXPECT_THAT(replaced.labels(), ElementsAre(Pair("a_first", "x"), Pair("client", "orders"),
                                             Pair("endpoint", "10.0.0.1:80")));
  // The original scopes are unchanged.
  EXPECT_THAT(base.labels(), ElementsAre(Pair("client", "users")));
  EXPECT_EQ(scoped.registry(), &r);

  Counter& c = scoped.GetCounter("requests");
  EXPECT_EQ(&c,
            &r.GetCounter("requests",
                          {{"endpoint", "10.0.0.1:80"}, {"client", "users"}, {"a_first", "x"}}));
  scoped.GetGauge("pending").Set(2);
  scoped.GetHistogram("latency").Record(5);
  EXPECT_EQ(r.FindGauge("pending", scoped.labels())->value(), 2);
  EXPECT_EQ(r.FindHistogram("latency", scoped.labels())->count(), 1);
}

// ---- Concurrency (also run under ThreadSanitizer) ----

// Export buckets are derived from the fine buckets plus a count of the samples above each
// export bound that falls inside a fine bucket: around every bound, and on a seeded spread of
// values, they must equal a direct count with ExportBucketIndex.
TEST(HistogramTest, ExportBucketsExactAroundEveryBound) {
  Histogram h;
  std::array<int64_t, kExportBucketCount> want{};
  auto record = [&](int64_t v) {
    h.Record(v);
    ++want[Histogram::ExportBucketIndex(v < 0 ? 0 : v)];
  };
  for (int64_t bound : kExportBucketBounds) {
    for (int64_t d = -5; d <= 5; ++d) record(bound + d);
  }
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200000; ++i) record(static_cast<int64_t>(rng() >> (rng() % 64)));
  record(-7);
  record(INT64_MAX);
  const HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.export_buckets, want);
  int64_t total = 0;
  for (int64_t n : s.export_buckets) total += n;
  EXPECT_EQ(total, s.count);
  EXPECT_EQ(h.count(), s.count);
}

TEST(CounterGaugeTest, GaugeAddOfZeroChangesNothing) {
  Gauge g;
  g.Add(5);
  g.Add(0);
  g.Add(-2);
  g.Add(0);
  EXPECT_EQ(g.value(), 3);
}

TEST(ConcurrencyStats, CounterAndHistogramFromFourThreads) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 100000;
  StatsRegistry r;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&r] {
      // Lookups race with each other too; all must resolve to the same metrics.
      Counter& c = r.GetCounter("ops", {{"t", "shared"}});
      Histogram& h = r.GetHistogram("lat", {{"t", "shared"}});
      for (int i = 0; i < kPerThread; ++i) {
        c.Increment();
        h.Record(i % 1000);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(r.FindCounter("ops", {{"t", "shared"}})->value(), int64_t{kThreads} * kPerThread);
  const Histogram* h = r.FindHistogram("lat", {{"t", "shared"}});
  ASSERT_NE(h, nullptr);
  HistogramSnapshot s = h->Snapshot();
  EXPECT_EQ(h->count(), int64_t{kThreads} * kPerThread);
  EXPECT_EQ(s.count, int64_t{kThreads} * kPerThread);
  EXPECT_EQ(s.sum, int64_t{kThreads} * (kPerThread / 1000) * (999 * 1000 / 2));
  EXPECT_EQ(s.min, 0);
  EXPECT_EQ(s.max, 999);
  int64_t bucket_total = 0;
  for (const auto& [upper, n] : s.buckets) bucket_total += n;
  EXPECT_EQ(bucket_total, s.count);
}

// Collectors run before every snapshot (and so before every export) and stop once removed.
TEST(StatsRegistryTest, CollectorsRefreshGaugesWhenRead) {
  StatsRegistry registry;
  int64_t outside = 7;
  int runs = 0;
  Gauge& gauge = registry.GetGauge("copied", {{"client", "c"}});
  const uint64_t id = registry.AddCollector([&] {
    ++runs;
    gauge.Set(outside);
  });
  EXPECT_EQ(gauge.value(), 0) << "nothing runs before a read";
  EXPECT_THAT(registry.ToPrometheus(), ::testing::HasSubstr("copied{client=\"c\"} 7"));
  outside = 9;
  EXPECT_EQ(registry.Snapshot().at(0).value, 9);
  EXPECT_EQ(runs, 2);
  registry.RemoveCollector(id);
  outside = 11;
  EXPECT_EQ(registry.Snapshot().at(0).value, 9) << "a removed collector does not run";
  EXPECT_EQ(runs, 2);
}

// Every sample is counted in exactly one counter, so no snapshot taken while Record() runs can
// count a sample in the export bucket below the one it belongs to (and so no `le` count can step
// back between two scrapes). 101 lies in the fine bucket [100, 103] that the export bound 100
// splits: only samples above 100 are recorded, so the le="100" bucket must stay empty.
TEST(ConcurrencyStats, ASnapshotDuringRecordNeverCountsASampleBelowItsExportBound) {
  Histogram h;
  const size_t at_100 = Histogram::ExportBucketIndex(100);
  ASSERT_EQ(kExportBucketBounds[at_100], 100);
  ASSERT_EQ(Histogram::BucketIndex(100), Histogram::BucketIndex(101));
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < 2000000; ++i) h.Record(101);
    done.store(true);
  });
  int64_t misplaced = 0;
  int64_t snapshots = 0;
  int64_t previous_le_250 = 0;
  int64_t stepped_back = 0;
  while (!done.load()) {
    const HistogramSnapshot s = h.Snapshot();
    ++snapshots;
    misplaced += s.export_buckets[at_100];
    const int64_t le_250 = s.export_buckets[at_100] + s.export_buckets[at_100 + 1];
    if (le_250 < previous_le_250) ++stepped_back;
    previous_le_250 = le_250;
  }
  writer.join();
  EXPECT_EQ(misplaced, 0) << "in " << snapshots << " snapshots";
  EXPECT_EQ(stepped_back, 0);
  const HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 2000000);
  EXPECT_EQ(s.export_buckets[at_100 + 1], 2000000);
}

// Snapshot() reads the entries after releasing the registry's lock (registration must not wait
// for a scrape's copy). Metrics registered from two threads while a third snapshots in a loop:
// every snapshot is in (name, labels) order without a repeat, holds a metric whole (its value
// is 0 or 1, a histogram's count its samples), never loses one it held before, and the last
// holds them all. Under TSan this also checks that reading an entry outside the lock races with
// nothing a registration writes.
TEST(ConcurrencyStats, MetricsRegisteredDuringSnapshotsAreSeenWholeAndInOrder) {
  StatsRegistry registry;
  constexpr int kPerThread = 1500;
  std::atomic<int> writers_done{0};
  std::atomic<bool> go{false};  // the writers start once snapshots are being taken
  auto writer = [&](int id) {
    while (!go.load()) std::this_thread::yield();
    for (int i = 0; i < kPerThread; ++i) {
      const Labels labels{{"endpoint", "10.0." + std::to_string(id) + "." + std::to_string(i % 50)},
                          {"client", "c" + std::to_string(i % 7)}};
      const std::string name = "m" + std::to_string((i * 7919 + id) % 997);
      if (i % 5 == 0) {
        registry.GetHistogram(name + "_us", labels).Record(i);
      } else {
        registry.GetCounter(name, labels).Increment();
      }
    }
    writers_done.fetch_add(1);
  };
  std::thread a(writer, 1);
  std::thread b(writer, 2);
  size_t previous = 0;
  int snapshots = 0;
  std::string problem;
  while (writers_done.load() < 2 && problem.empty()) {
    const std::vector<MetricSnapshot> snap = registry.Snapshot();
    ++snapshots;
    go.store(true);
    if (snap.size() < previous) problem = "a snapshot lost metrics";
    previous = snap.size();
    for (size_t i = 0; i < snap.size() && problem.empty(); ++i) {
      const MetricSnapshot& m = snap[i];
      if (i > 0 && !(std::tie(snap[i - 1].name, snap[i - 1].labels) < std::tie(m.name, m.labels))) {
        problem = "out of order or repeated: " + m.name;
      } else if (m.type == MetricType::kCounter && m.value != 0 && m.value != 1) {
        problem = "counter " + m.name + " = " + std::to_string(m.value);
      } else if (m.type == MetricType::kHistogram && (m.histogram.count < 0 || m.histogram.count > 1)) {
        problem = "histogram " + m.name + " count " + std::to_string(m.histogram.count);
      }
    }
  }
  a.join();
  b.join();
  EXPECT_EQ(problem, "") << "after " << snapshots << " snapshots";
  const std::vector<MetricSnapshot> last = registry.Snapshot();
  size_t values = 0;
  for (const MetricSnapshot& m : last) values += m.type == MetricType::kCounter ? m.value : m.histogram.count;
  EXPECT_EQ(values, 2u * kPerThread);
}

}  // namespace
}  // namespace scales::stats
