#pragma once
// The stats registry: counters, gauges and latency histograms that sinks report into.
//
// Metrics are identified by a name ("scales_requests") plus labels
// ({client="users", endpoint="10.0.0.1:80"}). Lookup (Get*) takes a mutex and is meant for
// construction time: sinks resolve their metrics once and keep the references, which stay
// valid for the registry's lifetime. Updates are lock-free (relaxed atomics) and safe from any
// thread.

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace scales::stats {

// Label set, kept sorted by key (the registry sorts what it is given).
using Labels = std::vector<std::pair<std::string, std::string>>;

// A monotonically increasing count. Thread safe.
class Counter {
 public:
  void Increment(int64_t n = 1) noexcept { value_.fetch_add(n, std::memory_order_relaxed); }
  int64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_{0};
};

// A value that goes up and down. Add() makes it safe to share between event loops, each
// adding its own part (pool sizes, pending requests). Thread safe.
class Gauge {
 public:
  void Set(int64_t v) noexcept { value_.store(v, std::memory_order_relaxed); }
  // A zero delta (a sink reporting an unchanged value) costs no atomic operation.
  void Add(int64_t delta) noexcept {
    if (delta != 0) value_.fetch_add(delta, std::memory_order_relaxed);
  }
  int64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_{0};
};

// Bounds of the buckets a histogram exports in the Prometheus format (`le`, inclusive), in the
// histogram's unit (microseconds for every scales latency): 1-2.5-5 steps from 10 us to 100 s,
// then +Inf. Histogram::Record counts them exactly (see Histogram), so every `le` count is exact.
inline constexpr std::array<int64_t, 22> kExportBucketBounds = {
    10,      25,      50,       100,      250,      500,      1000,   2500,
    5000,    10000,   25000,    50000,    100000,   250000,   500000, 1000000,
    2500000, 5000000, 10000000, 25000000, 50000000, 100000000};
inline constexpr size_t kExportBucketCount = kExportBucketBounds.size() + 1;  // with +Inf

// Read-only copy of a histogram.
struct HistogramSnapshot {
  int64_t count = 0;
  int64_t sum = 0;  // saturates at INT64_MAX
  int64_t min = 0;
  int64_t max = 0;
  // Upper bound (inclusive) and count of every non-empty bucket, in increasing order.
  std::vector<std::pair<int64_t, int64_t>> buckets;
  // Samples per export bucket (not cumulative): [i] counts samples in
  // (kExportBucketBounds[i-1], kExportBucketBounds[i]], the last entry those above the last
  // bound. Sums to `count` (both are derived from the same reading of the fine buckets).
  std::array<int64_t, kExportBucketCount> export_buckets{};
  // Value at quantile q in [0, 1]: the upper bound of the bucket holding that rank, clamped
  // to [min, max]. 0 when empty.
  int64_t Percentile(double q) const noexcept;
  double Mean() const noexcept { return count ? static_cast<double>(sum) / count : 0.0; }
};

// Histogram of non-negative integer samples (scales records latencies in microseconds).
// Buckets are log-linear: values 0..15 have exact buckets; above, every power of two is
// split into 16 linear sub-buckets, so a bucket's width is at most 1/16 (6.25 %) of its
// values. Bucket index of v: v for v < 16; otherwise, with e = floor(log2(v)),
// 16 + (e - 4) * 16 + ((v >> (e - 4)) & 15). Exponents go up to kMaxExponent, so values of
// 2^(kMaxExponent+1) and above go into the last bucket (whose upper bound is INT64_MAX);
// negative values are recorded as 0. The coarse export buckets (kExportBucketBounds) are exact
// too: most fine buckets lie inside one export bucket; the few that an export bound splits
// (100 falls inside [100, 103], say) keep their samples above that bound in a counter of their
// own. Every sample is counted in exactly one counter, so a snapshot taken during Record() never
// places it in the wrong export bucket, and no exported `le` count steps back between scrapes.
// Record() costs two atomic adds (its counter and the sum) and two relaxed loads (min, max).
// Thread safe; Record() is lock-free.
class Histogram {
 public:
  static constexpr int kSubBucketBits = 4;
  static constexpr int kMaxExponent = 40;
  // 16 exact buckets, then 16 sub-buckets for each exponent 4..kMaxExponent.
  static constexpr int kBucketCount =
      (1 << kSubBucketBits) + (kMaxExponent - kSubBucketBits + 1) * (1 << kSubBucketBits);

  void Record(int64_t value) noexcept;
  HistogramSnapshot Snapshot() const;
  // The sum of the counters: Record() keeps no separate count, one atomic add fewer per sample
  // (it runs on every call).
  int64_t count() const noexcept;

  // Bucket index for a value and the inclusive upper bound of a bucket (documented layout).
  static int BucketIndex(int64_t value) noexcept;
  static constexpr int64_t BucketUpperBound(int index) noexcept {
    constexpr int kSub = 1 << kSubBucketBits;
    if (index < 0) return 0;
    if (index < kSub) return index;
    // The last bucket also holds every clamped value above 2^(kMaxExponent+1).
    if (index >= kBucketCount - 1) return INT64_MAX;
    const int e = (index - kSub) / kSub + kSubBucketBits;
    const int64_t sub = (index - kSub) % kSub;
    // Bucket (e, sub) holds [(16 + sub) << (e - 4), (17 + sub) << (e - 4)).
    return ((kSub + sub + 1) << (e - kSubBucketBits)) - 1;
  }
  // Index of the export bucket holding `value`: the first bound >= value, or
  // kExportBucketBounds.size() (+Inf).
  static size_t ExportBucketIndex(int64_t value) noexcept;

 private:
  std::atomic<int64_t> sum_{0};
  std::atomic<int64_t> min_{INT64_MAX};
  std::atomic<int64_t> max_{0};
  // Samples per fine bucket; for a bucket that an export bound splits, only those at or below it.
  std::atomic<int64_t> buckets_[kBucketCount] = {};
  // [i]: samples above kExportBucketBounds[i] in the fine bucket that bound splits (if any); the
  // fine bucket's count is buckets_ + above_split_.
  std::atomic<int64_t> above_split_[kExportBucketBounds.size()] = {};
};

enum class MetricType { kCounter, kGauge, kHistogram };

struct MetricSnapshot {
  std::string name;
  Labels labels;
  MetricType type = MetricType::kCounter;
  int64_t value = 0;            // counters and gauges
  HistogramSnapshot histogram;  // histograms
};

// Owns every metric. Thread safe. Metrics are never removed: references stay valid for the
// registry's lifetime.
class StatsRegistry {
 public:
  // Its locks are held across fork() (a child made by fork() finds them free: see fork() in
  // docs/configuration.md).
  StatsRegistry();
  ~StatsRegistry();
  StatsRegistry(const StatsRegistry&) = delete;
  StatsRegistry& operator=(const StatsRegistry&) = delete;

  // Each throws std::logic_error ("stats: metric NAME{labels} is a gauge, not a counter") when
  // the name and labels are registered with another type; MetricErrorReason gives its text
  // without the "stats: " prefix, for an error of the caller's own.
  Counter& GetCounter(std::string_view name, Labels labels = {});
  Gauge& GetGauge(std::string_view name, Labels labels = {});
  Histogram& GetHistogram(std::string_view name, Labels labels = {});
  static std::string_view MetricErrorReason(const std::logic_error& e) noexcept {
    std::string_view what = e.what();
    if (what.starts_with("stats: ")) what.remove_prefix(7);
    return what;
  }

  // Every metric, sorted by name then labels.
  std::vector<MetricSnapshot> Snapshot() const;
  // Finds one metric; nullptr when absent. For tests and tools.
  const Counter* FindCounter(std::string_view name, const Labels& labels) const;
  const Gauge* FindGauge(std::string_view name, const Labels& labels) const;
  const Histogram* FindHistogram(std::string_view name, const Labels& labels) const;

  // Human-readable dump, one metric per line: `name{k="v",...} value` (no braces without
  // labels) and, for histograms, `name{...} count=.. mean=.. p50=.. p90=.. p99=.. p999=.. max=..`.
  std::string ToText() const;
  // Finagle-style flat JSON object (twitter-server's /admin/metrics.json). Keys are '/'-joined:
  // "clnt/<client>" when the metric has a `client` label, then the `endpoint` label's value,
  // then the name, then the values of the other labels in key order:
  // {"clnt/users/10.0.0.1:80/scales_connects": 2,
  //  "clnt/users/scales_failures_by_error/request_timeout": 1}. Counters and gauges are
  // integers. Histograms contribute "<key>.count" and, when not empty, ".sum", ".avg", ".min",
  // ".max", ".p50", ".p90", ".p95", ".p99", ".p9990" and ".p9999". A key is written once: a
  // metric whose key (a histogram's: any of those eleven, even while empty) an earlier one in
  // Snapshot() order took (equal label values under other keys, a counter "h.count" beside a
  // histogram "h") is skipped whole and logged at kWarning, as ToPrometheus() skips a clash.
  std::string ToJson() const;
  // The Prometheus text exposition format, version 0.0.4 (serve it as kPrometheusContentType).
  // One family per metric name, with "# HELP" (SetHelp(), the built-in text of scales' own
  // metrics, or the name) and "# TYPE". Counters are exported as "<name>_total" (unless the name
  // already ends in "_total"); gauges under their name; histograms as Prometheus histograms
  // "<name>_bucket{...,le="..."}" over kExportBucketBounds and +Inf, "<name>_sum" and
  // "<name>_count", plus (options.quantiles) a gauge family "<name>_quantile" with
  // quantile="0.5", "0.9", "0.99" and "0.999" over the histogram's whole lifetime. Characters
  // not allowed in metric or label names become '_', and a label name starting with "__"
  // (reserved by Prometheus) is exported as "exported___..."; label values escape \\, \" and
  // newline. A metric that would break the scrape (a clashing series, a family named after a
  // histogram's samples) is skipped and reported in a "# scales: skipped" comment line (a
  // histogram with its quantile gauges).
  struct PrometheusOptions {
    bool quantiles = true;
  };
  std::string ToPrometheus() const { return ToPrometheus(PrometheusOptions{}); }
  std::string ToPrometheus(const PrometheusOptions& options) const;
  static constexpr std::string_view kPrometheusContentType =
      "text/plain; version=0.0.4; charset=utf-8";

  // Sets the HELP text of a metric name (all its label sets), shown by ToPrometheus(). Names
  // scales registers itself have a built-in text; this overrides it.
  void SetHelp(std::string_view name, std::string_view help);

  // The process-wide registry used when a client is not given one.
  static StatsRegistry& Default();

  // Collectors copy values kept elsewhere into this registry's metrics when they are read
  // (a ZooKeeper server set's session counts, say): every Snapshot() -- and so every export --
  // first runs each collector, on the exporting thread, without the registry's lock held; `fn`
  // must be thread safe. Returns an id for RemoveCollector, after which `fn` is not started
  // again (a run already started may still finish).
  uint64_t AddCollector(std::function<void()> fn);
  void RemoveCollector(uint64_t id);

 private:
  struct Key {
    std::string name;
    Labels labels;
    bool operator<(const Key& o) const {
      return std::tie(name, labels) < std::tie(o.name, o.labels);
    }
  };
  struct Entry {
    MetricType type = MetricType::kCounter;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  Entry& GetEntry(std::string_view name, Labels labels, MetricType type);
  const Entry* Find(std::string_view name, const Labels& labels) const;

  mutable std::mutex mu_;
  std::map<Key, Entry> metrics_;
  mutable std::mutex collectors_mu_;
  std::map<uint64_t, std::function<void()>> collectors_;
  uint64_t next_collector_ = 1;
  std::map<std::string, std::string, std::less<>> help_;
};

// A registry plus a fixed label set (client, endpoint, ...). Cheap to copy.
class StatsScope {
 public:
  StatsScope() = default;
  StatsScope(StatsRegistry* registry, Labels labels)
      : registry_(registry), labels_(std::move(labels)) {}

  // A scope with one more label (replacing a label of the same key).
  StatsScope WithLabel(std::string_view key, std::string_view value) const;

  Counter& GetCounter(std::string_view name) const { return registry_->GetCounter(name, labels_); }
  Gauge& GetGauge(std::string_view name) const { return registry_->GetGauge(name, labels_); }
  Histogram& GetHistogram(std::string_view name) const {
    return registry_->GetHistogram(name, labels_);
  }

  StatsRegistry* registry() const noexcept { return registry_; }
  const Labels& labels() const noexcept { return labels_; }

 private:
  StatsRegistry* registry_ = &StatsRegistry::Default();
  Labels labels_;
};

}  // namespace scales::stats
