#include "scales/stats/stats.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <stdexcept>

#include <fmt/format.h>
#include <boost/json.hpp>

namespace scales::stats {
namespace {

constexpr int kSubBuckets = 1 << Histogram::kSubBucketBits;

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "metric";
}

void SortLabels(Labels& labels) {
  // Sorting whole pairs orders by key and keeps the result deterministic even if a caller
  // passes the same key twice.
  if (!std::is_sorted(labels.begin(), labels.end())) std::sort(labels.begin(), labels.end());
}

// Escapes a label value for the text format (Prometheus-style: \\, \" and \n).
std::string EscapeLabelValue(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// name{k="v",k2="v2"}, or just name without labels.
std::string TextKey(std::string_view name, const Labels& labels) {
  std::string out(name);
  if (labels.empty()) return out;
  out += '{';
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ',';
    out += labels[i].first;
    out += "=\"";
    out += EscapeLabelValue(labels[i].second);
    out += '"';
  }
  out += '}';
  return out;
}

// v1/v2/name: label values in key order, then the name.
std::string JsonKey(std::string_view name, const Labels& labels) {
  std::string out;
  for (const auto& [key, value] : labels) {
    out += value;
    out += '/';
  }
  out += name;
  return out;
}

}  // namespace

// ---- Histogram ----

int Histogram::BucketIndex(int64_t value) noexcept {
  if (value < kSubBuckets) return value < 0 ? 0 : static_cast<int>(value);
  int e = std::bit_width(static_cast<uint64_t>(value)) - 1;
  if (e > kMaxExponent) return kBucketCount - 1;
  int sub = static_cast<int>((value >> (e - kSubBucketBits)) & (kSubBuckets - 1));
  return kSubBuckets + (e - kSubBucketBits) * kSubBuckets + sub;
}

int64_t Histogram::BucketUpperBound(int index) noexcept {
  if (index < 0) return 0;
  if (index < kSubBuckets) return index;
  // The last bucket also holds every clamped value above 2^(kMaxExponent+1).
  if (index >= kBucketCount - 1) return INT64_MAX;
  int e = (index - kSubBuckets) / kSubBuckets + kSubBucketBits;
  int64_t sub = (index - kSubBuckets) % kSubBuckets;
  // Bucket (e, sub) holds [(16 + sub) << (e - 4), (17 + sub) << (e - 4)).
  return ((kSubBuckets + sub + 1) << (e - kSubBucketBits)) - 1;
}

void Histogram::Record(int64_t value) noexcept {
  if (value < 0) value = 0;
  buckets_[BucketIndex(value)].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
  int64_t cur = min_.load(std::memory_order_relaxed);
  while (value < cur && !min_.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
  cur = max_.load(std::memory_order_relaxed);
  while (value > cur && !max_.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
  count_.fetch_add(1, std::memory_order_relaxed);
}

HistogramSnapshot Histogram::Snapshot() const {
  HistogramSnapshot s;
  // The count is taken from the buckets so that Percentile() always finds its rank, even
  // when Record() runs concurrently; sum, min and max may then be a sample or two apart.
  for (int i = 0; i < kBucketCount; ++i) {
    int64_t c = buckets_[i].load(std::memory_order_relaxed);
    if (c == 0) continue;
    s.buckets.emplace_back(BucketUpperBound(i), c);
    s.count += c;
  }
  if (s.count == 0) return s;
  s.sum = sum_.load(std::memory_order_relaxed);
  s.min = min_.load(std::memory_order_relaxed);
  s.max = max_.load(std::memory_order_relaxed);
  if (s.min > s.max) s.min = s.max;  // a concurrent first Record() has not set min yet
  return s;
}

int64_t HistogramSnapshot::Percentile(double q) const noexcept {
  if (count <= 0 || buckets.empty()) return 0;
  if (!(q >= 0.0)) q = 0.0;  // also catches NaN
  if (q > 1.0) q = 1.0;
  // The epsilon keeps products such as 0.07 * 100 = 7.000000000000001 at rank 7.
  auto rank = static_cast<int64_t>(std::ceil(q * static_cast<double>(count) - 1e-9));
  rank = std::clamp<int64_t>(rank, 1, count);
  int64_t bound = max;
  int64_t cumulative = 0;
  for (const auto& [upper, n] : buckets) {
    cumulative += n;
    if (cumulative >= rank) {
      bound = upper;
      break;
    }
  }
  return std::clamp(bound, std::min(min, max), max);
}

// ---- StatsRegistry ----

Counter& StatsRegistry::GetCounter(std::string_view name, Labels labels) {
  return *GetEntry(name, std::move(labels), MetricType::kCounter).counter;
}

Gauge& StatsRegistry::GetGauge(std::string_view name, Labels labels) {
  return *GetEntry(name, std::move(labels), MetricType::kGauge).gauge;
}

Histogram& StatsRegistry::GetHistogram(std::string_view name, Labels labels) {
  return *GetEntry(name, std::move(labels), MetricType::kHistogram).histogram;
}

StatsRegistry::Entry& StatsRegistry::GetEntry(std::string_view name, Labels labels,
                                              MetricType type) {
  SortLabels(labels);
  Key key{std::string(name), std::move(labels)};
  std::lock_guard lock(mu_);
  auto it = metrics_.find(key);
  if (it != metrics_.end()) {
    if (it->second.type != type) {
      throw std::logic_error(fmt::format("stats: metric {} is a {}, not a {}",
                                         TextKey(key.name, key.labels), TypeName(it->second.type),
                                         TypeName(type)));
    }
    return it->second;
  }
  Entry entry;
  entry.type = type;
  switch (type) {
    case MetricType::kCounter:
      entry.counter = std::make_unique<Counter>();
      break;
    case MetricType::kGauge:
      entry.gauge = std::make_unique<Gauge>();
      break;
    case MetricType::kHistogram:
      entry.histogram = std::make_unique<Histogram>();
      break;
  }
  return metrics_.emplace(std::move(key), std::move(entry)).first->second;
}

const StatsRegistry::Entry* StatsRegistry::Find(std::string_view name, const Labels& labels) const {
  Key key{std::string(name), labels};
  SortLabels(key.labels);
  std::lock_guard lock(mu_);
  auto it = metrics_.find(key);
  return it == metrics_.end() ? nullptr : &it->second;
}

const Counter* StatsRegistry::FindCounter(std::string_view name, const Labels& labels) const {
  const Entry* e = Find(name, labels);
  return e ? e->counter.get() : nullptr;
}

const Gauge* StatsRegistry::FindGauge(std::string_view name, const Labels& labels) const {
  const Entry* e = Find(name, labels);
  return e ? e->gauge.get() : nullptr;
}

const Histogram* StatsRegistry::FindHistogram(std::string_view name, const Labels& labels) const {
  const Entry* e = Find(name, labels);
  return e ? e->histogram.get() : nullptr;
}

std::vector<MetricSnapshot> StatsRegistry::Snapshot() const {
  std::vector<MetricSnapshot> out;
  std::lock_guard lock(mu_);
  out.reserve(metrics_.size());
  // The map is ordered by (name, labels), which is the documented order.
  for (const auto& [key, entry] : metrics_) {
    MetricSnapshot m;
    m.name = key.name;
    m.labels = key.labels;
    m.type = entry.type;
    switch (entry.type) {
      case MetricType::kCounter:
        m.value = entry.counter->value();
        break;
      case MetricType::kGauge:
        m.value = entry.gauge->value();
        break;
      case MetricType::kHistogram:
        m.histogram = entry.histogram->Snapshot();
        break;
    }
    out.push_back(std::move(m));
  }
  return out;
}

std::string StatsRegistry::ToText() const {
  std::string out;
  for (const MetricSnapshot& m : Snapshot()) {
    out += TextKey(m.name, m.labels);
    if (m.type == MetricType::kHistogram) {
      const HistogramSnapshot& h = m.histogram;
      out += fmt::format(" count={} mean={:.1f} p50={} p90={} p99={} p999={} max={}\n", h.count,
                         h.Mean(), h.Percentile(0.5), h.Percentile(0.9), h.Percentile(0.99),
                         h.Percentile(0.999), h.max);
    } else {
      out += fmt::format(" {}\n", m.value);
    }
  }
  return out;
}

std::string StatsRegistry::ToJson() const {
  boost::json::object obj;
  for (const MetricSnapshot& m : Snapshot()) {
    std::string key = JsonKey(m.name, m.labels);
    if (m.type != MetricType::kHistogram) {
      obj[key] = m.value;
      continue;
    }
    const HistogramSnapshot& h = m.histogram;
    obj[key + ".count"] = h.count;
    obj[key + ".sum"] = h.sum;
    obj[key + ".avg"] = h.Mean();
    obj[key + ".min"] = h.min;
    obj[key + ".max"] = h.max;
    obj[key + ".p50"] = h.Percentile(0.5);
    obj[key + ".p90"] = h.Percentile(0.9);
    obj[key + ".p99"] = h.Percentile(0.99);
    obj[key + ".p9990"] = h.Percentile(0.999);
  }
  return boost::json::serialize(obj);
}

StatsRegistry& StatsRegistry::Default() {
  // Never destroyed, so metrics stay usable from other static destructors and detached
  // threads at exit.
  static StatsRegistry* const registry = new StatsRegistry();
  return *registry;
}

// ---- StatsScope ----

StatsScope StatsScope::WithLabel(std::string_view key, std::string_view value) const {
  Labels labels = labels_;
  auto it = std::find_if(labels.begin(), labels.end(),
                         [&](const auto& label) { return label.first == key; });
  if (it != labels.end()) {
    it->second = std::string(value);
  } else {
    labels.emplace_back(std::string(key), std::string(value));
  }
  SortLabels(labels);
  return StatsScope(registry_, std::move(labels));
}

}  // namespace scales::stats
