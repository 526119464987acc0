#include "scales/stats/stats.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <optional>
#include <stdexcept>

#include <fmt/format.h>
#include <boost/json.hpp>

#include "core/fork_locks.h"
#include "scales/core/log.h"
#include "stats/metric_help.h"

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

// The length of the well-formed UTF-8 sequence at the start of `s` (as Unicode defines it: no
// overlong forms, surrogates or code points above U+10FFFF), or 0.
size_t Utf8SequenceLength(std::string_view s) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char c = byte(0);
  if (c < 0x80) return 1;
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the range of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (s.size() < n || byte(1) < lo || byte(1) > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if ((byte(i) & 0xc0) != 0x80) return 0;
  }
  return n;
}

// `s` with every byte that is not part of well-formed UTF-8 replaced by U+FFFD. Names and label
// values are bytes, but Prometheus rejects a scrape with a label value or HELP text that is not
// UTF-8, and JSON must be UTF-8 (Boost.JSON writes the bytes as they are).
std::string ValidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  while (!s.empty()) {
    const size_t n = Utf8SequenceLength(s);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      s.remove_prefix(1);
    } else {
      out += s.substr(0, n);
      s.remove_prefix(n);
    }
  }
  return out;
}

// Escapes a label value for the text format (Prometheus-style: \\, \" and \n; not UTF-8 as
// ValidUtf8).
std::string EscapeLabelValue(std::string_view raw) {
  const std::string value = ValidUtf8(raw);
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

// A metric name or label key as ToText() writes it: a newline (or carriage return) would split
// its line in two, so they are written as \n and \r (names come from code, a user's sink's too).
std::string TextName(std::string_view raw) {
  std::string out;
  out.reserve(raw.size());
  for (char c : raw) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else {
      out += c;
    }
  }
  return out;
}

// name{k="v",k2="v2"}, or just name without labels.
std::string TextKey(std::string_view name, const Labels& labels) {
  std::string out = TextName(name);
  if (labels.empty()) return out;
  out += '{';
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ',';
    out += TextName(labels[i].first);
    out += "=\"";
    out += EscapeLabelValue(labels[i].second);
    out += '"';
  }
  out += '}';
  return out;
}

// Finagle-style key: clnt/<client>/<endpoint>/name/<other label values...>.
std::string JsonKey(std::string_view name, const Labels& labels) {
  std::string out;
  auto label = [&](std::string_view key) -> const std::string* {
    for (const auto& [k, v] : labels) {
      if (k == key) return &v;
    }
    return nullptr;
  };
  if (const std::string* client = label("client")) {
    out += "clnt/";
    out += *client;
    out += '/';
  }
  if (const std::string* endpoint = label("endpoint")) {
    out += *endpoint;
    out += '/';
  }
  out += name;
  for (const auto& [key, value] : labels) {
    if (key == "client" || key == "endpoint") continue;
    out += '/';
    out += value;
  }
  return out;
}

// Prometheus metric names are [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]*:
// anything else becomes '_', and a leading digit gets a '_' in front.
std::string PrometheusName(std::string_view name, bool allow_colon) {
  std::string out;
  out.reserve(name.size() + 1);
  if (name.empty() || (name[0] >= '0' && name[0] <= '9')) out += '_';
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || (allow_colon && c == ':');
    out += ok ? c : '_';
  }
  return out;
}

// HELP text escaping: backslash and newline (not UTF-8 as ValidUtf8). Also for the raw names
// quoted in comment lines, which a newline would end.
std::string EscapeHelp(std::string_view raw) {
  const std::string help = ValidUtf8(raw);
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// The name a label key is exported under: sanitised; and in a histogram's families, which use
// the labels le and quantile themselves, a user label of that name is renamed exported_<name>,
// as Prometheus does on a scrape conflict. So is a name starting with "__", which Prometheus
// reserves (a label __name__ fails the scrape).
std::string PrometheusLabelName(std::string_view key, bool histogram) {
  std::string name = PrometheusName(key, /*allow_colon=*/false);
  if ((histogram && (name == "le" || name == "quantile")) || name.starts_with("__")) {
    name = "exported_" + name;
  }
  return name;
}

// Two raw label keys of `labels` that export as one label name (a-b and a_b, le and
// exported_le on a histogram, or a key given twice: SortLabels keeps both), which would repeat
// that label in the series: Prometheus rejects the whole scrape for it. The first such pair in
// exported-name order and that name, or nothing.
struct LabelClash {
  std::string first, second, name;
};
std::optional<LabelClash> FindLabelClash(const Labels& labels, bool histogram) {
  std::vector<std::pair<std::string, std::string_view>> names;  // exported, raw
  names.reserve(labels.size());
  for (const auto& [key, value] : labels)
    names.emplace_back(PrometheusLabelName(key, histogram), key);
  std::sort(names.begin(), names.end());
  for (size_t i = 1; i < names.size(); ++i) {
    if (names[i].first == names[i - 1].first) {
      return LabelClash{std::string(names[i - 1].second), std::string(names[i].second),
                        names[i].first};
    }
  }
  return std::nullopt;
}

// {k="v",...,extra_key="extra_value"} with the exported label names; empty without labels.
std::string PrometheusLabels(const Labels& labels, bool histogram, std::string_view extra_key = {},
                             std::string_view extra_value = {}) {
  if (labels.empty() && extra_key.empty()) return {};
  std::string out = "{";
  bool first = true;
  auto add = [&](std::string_view name, std::string_view escaped_value) {
    if (!first) out += ',';
    first = false;
    out += name;
    out += "=\"";
    out += escaped_value;
    out += '"';
  };
  for (const auto& [key, value] : labels)
    add(PrometheusLabelName(key, histogram), EscapeLabelValue(value));
  if (!extra_key.empty()) add(extra_key, extra_value);
  out += '}';
  return out;
}

// Per fine bucket: the export bucket of its smallest value, and the export bound inside it
// (values above it belong to the next export bucket), or -1. Export bounds are at least twice
// apart and a fine bucket spans at most 1/16 of its values, so at most one bound falls inside.
struct ExportMap {
  std::array<uint8_t, Histogram::kBucketCount> first{};
  std::array<int8_t, Histogram::kBucketCount> split{};
};

constexpr ExportMap MakeExportMap() {
  ExportMap m;
  for (int b = 0; b < Histogram::kBucketCount; ++b) {
    const int64_t lo = b == 0 ? 0 : Histogram::BucketUpperBound(b - 1) + 1;
    const int64_t hi = Histogram::BucketUpperBound(b);
    size_t e = 0;
    while (e < kExportBucketBounds.size() && kExportBucketBounds[e] < lo) ++e;
    m.first[static_cast<size_t>(b)] = static_cast<uint8_t>(e);
    m.split[static_cast<size_t>(b)] =
        e < kExportBucketBounds.size() && kExportBucketBounds[e] < hi ? static_cast<int8_t>(e) : int8_t{-1};
  }
  return m;
}

constexpr ExportMap kExportMap = MakeExportMap();

}  // namespace

// ---- Histogram ----

int Histogram::BucketIndex(int64_t value) noexcept {
  if (value < kSubBuckets) return value < 0 ? 0 : static_cast<int>(value);
  int e = std::bit_width(static_cast<uint64_t>(value)) - 1;
  if (e > kMaxExponent) return kBucketCount - 1;
  int sub = static_cast<int>((value >> (e - kSubBucketBits)) & (kSubBuckets - 1));
  return kSubBuckets + (e - kSubBucketBits) * kSubBuckets + sub;
}

size_t Histogram::ExportBucketIndex(int64_t value) noexcept {
  return static_cast<size_t>(
      std::lower_bound(kExportBucketBounds.begin(), kExportBucketBounds.end(), value) -
      kExportBucketBounds.begin());
}

void Histogram::Record(int64_t value) noexcept {
  if (value < 0) value = 0;
  const int b = BucketIndex(value);
  // Each sample goes into exactly one counter, so a concurrent Snapshot() can never see it in
  // two places (or in the export bucket below its own).
  if (const int split = kExportMap.split[static_cast<size_t>(b)];
      split >= 0 && value > kExportBucketBounds[static_cast<size_t>(split)]) {
    above_split_[split].fetch_add(1, std::memory_order_relaxed);
  } else {
    buckets_[b].fetch_add(1, std::memory_order_relaxed);
  }
  // The sum saturates at INT64_MAX instead of wrapping (samples are never negative).
  if (sum_.fetch_add(value, std::memory_order_relaxed) > INT64_MAX - value) {
    sum_.store(INT64_MAX, std::memory_order_relaxed);
  }
  int64_t cur = min_.load(std::memory_order_relaxed);
  while (value < cur && !min_.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
  cur = max_.load(std::memory_order_relaxed);
  while (value > cur && !max_.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
}

int64_t Histogram::count() const noexcept {
  int64_t n = 0;
  for (const auto& b : buckets_) n += b.load(std::memory_order_relaxed);
  for (const auto& a : above_split_) n += a.load(std::memory_order_relaxed);
  return n;
}

HistogramSnapshot Histogram::Snapshot() const {
  HistogramSnapshot s;
  // The count is taken from the buckets so that Percentile() always finds its rank, even
  // when Record() runs concurrently; sum, min and max may then be a sample or two apart.
  for (int i = 0; i < kBucketCount; ++i) {
    // A fine bucket that an export bound splits keeps its samples above the bound apart.
    const int64_t below = buckets_[i].load(std::memory_order_relaxed);
    const int split = kExportMap.split[static_cast<size_t>(i)];
    const int64_t above = split >= 0 ? above_split_[split].load(std::memory_order_relaxed) : 0;
    const int64_t c = below + above;
    if (c == 0) continue;
    s.buckets.emplace_back(BucketUpperBound(i), c);
    s.count += c;
    const size_t first = kExportMap.first[static_cast<size_t>(i)];
    s.export_buckets[first] += below;
    if (above > 0) s.export_buckets[first + 1] += above;
  }
  if (s.count == 0) return s;
  s.sum = sum_.load(std::memory_order_relaxed);
  // Negative: a concurrent Record() wrapped it and has not saturated it yet.
  if (s.sum < 0) s.sum = INT64_MAX;
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

StatsRegistry::StatsRegistry() {
  internal::HoldAcrossFork(collectors_mu_, internal::ForkLockRank::kStatsCollectors);
  internal::HoldAcrossFork(mu_, internal::ForkLockRank::kStatsMetrics);
}

StatsRegistry::~StatsRegistry() {
  internal::StopHoldingAcrossFork(mu_);
  internal::StopHoldingAcrossFork(collectors_mu_);
}

uint64_t StatsRegistry::AddCollector(std::function<void()> fn) {
  std::lock_guard lock(collectors_mu_);
  const uint64_t id = next_collector_++;
  collectors_.emplace(id, std::move(fn));
  return id;
}

void StatsRegistry::RemoveCollector(uint64_t id) {
  std::lock_guard lock(collectors_mu_);
  collectors_.erase(id);
}

std::vector<MetricSnapshot> StatsRegistry::Snapshot() const {
  std::vector<std::pair<uint64_t, std::function<void()>>> collectors;
  {
    std::lock_guard lock(collectors_mu_);
    for (const auto& [id, fn] : collectors_) collectors.emplace_back(id, fn);
  }
  for (const auto& [id, fn] : collectors) {
    {
      // Removed while an earlier one ran: not started (its owner may be gone).
      std::lock_guard lock(collectors_mu_);
      if (!collectors_.contains(id)) continue;
    }
    fn();  // they take the registry's lock themselves, if at all
  }
  // Under the lock only the entries' addresses are taken: a map node is never erased, and its
  // key and entry never change once made (the metrics are read through atomics), so they are
  // read after it. A scrape of many metrics then does not hold up the clients registering
  // theirs (an open) while it copies names, labels and histograms.
  std::vector<const std::pair<const Key, Entry>*> entries;
  {
    std::lock_guard lock(mu_);
    entries.reserve(metrics_.size());
    // The map is ordered by (name, labels), which is the documented order.
    for (const auto& kv : metrics_) entries.push_back(&kv);
  }
  std::vector<MetricSnapshot> out;
  out.reserve(entries.size());
  for (const auto* kv : entries) {
    const auto& [key, entry] = *kv;
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
  // Every key a histogram may write, claimed even while it is empty (when it writes only
  // ".count"), so that which metric a key shows does not change with a first sample.
  static constexpr std::array<std::string_view, 11> kHistogramKeys = {
      ".count", ".sum", ".avg", ".min", ".max", ".p50", ".p90", ".p95", ".p99", ".p9990", ".p9999"};
  boost::json::object obj;
  // Key -> the metric that wrote it. A key is written once, as ToPrometheus() writes a series
  // once: a later metric (in Snapshot() order) that would overwrite one is skipped whole and
  // logged, the JSON having no comment line to report it in.
  std::map<std::string, std::string, std::less<>> owners;
  for (const MetricSnapshot& m : Snapshot()) {
    std::string key = ValidUtf8(JsonKey(m.name, m.labels));
    std::vector<std::string> keys;
    if (m.type == MetricType::kHistogram) {
      for (std::string_view suffix : kHistogramKeys) keys.push_back(key + std::string(suffix));
    } else {
      keys.push_back(key);
    }
    std::string owner = TextKey(m.name, m.labels);
    auto taken = std::find_if(keys.begin(), keys.end(),
                              [&](const std::string& k) { return owners.contains(k); });
    if (taken != keys.end()) {
      SCALES_LOG_RATE_LIMITED(kWarning, 5, "stats: ToJson() skipped {} {}: key {} is {}'s",
                              TypeName(m.type), owner, *taken, owners.find(*taken)->second);
      continue;
    }
    for (std::string& k : keys) owners.emplace(std::move(k), owner);
    if (m.type != MetricType::kHistogram) {
      obj[key] = m.value;
      continue;
    }
    const HistogramSnapshot& h = m.histogram;
    obj[key + ".count"] = h.count;
    if (h.count == 0) continue;  // as Finagle: an empty histogram exports only its count
    obj[key + ".sum"] = h.sum;
    obj[key + ".avg"] = h.Mean();
    obj[key + ".min"] = h.min;
    obj[key + ".max"] = h.max;
    obj[key + ".p50"] = h.Percentile(0.5);
    obj[key + ".p90"] = h.Percentile(0.9);
    obj[key + ".p95"] = h.Percentile(0.95);
    obj[key + ".p99"] = h.Percentile(0.99);
    obj[key + ".p9990"] = h.Percentile(0.999);
    obj[key + ".p9999"] = h.Percentile(0.9999);
  }
  return boost::json::serialize(obj);
}

void StatsRegistry::SetHelp(std::string_view name, std::string_view help) {
  std::lock_guard lock(mu_);
  help_.insert_or_assign(std::string(name), std::string(help));
}

std::string StatsRegistry::ToPrometheus(const PrometheusOptions& options) const {
  // Families keyed by exported name. Snapshot() keeps a name's label sets together, but two
  // raw names may sanitise to one family (or a counter "x" and a gauge "x_total"), so the
  // lines are collected per family and written in family-name order.
  // Two raw names (or label names) may also sanitise to one series, which Prometheus rejects
  // the whole scrape for; each family remembers the label sets it has written. A metric two of
  // whose label keys sanitise alike is skipped likewise (FindLabelClash).
  struct Family {
    MetricType type;
    std::string raw_name;  // for HELP
    bool quantiles;        // the <histogram>_quantile gauges
    std::string lines;
  };
  std::map<std::string, Family> families;
  // Every series written, as "<sample name>{labels}" with the sanitised labels in order (two label
  // sets that sanitise alike may sort apart as raw names) -> the metric that wrote it. A histogram
  // claims its _bucket, _sum and _count samples, so a gauge "h_sum" cannot repeat them.
  std::map<std::string, std::string, std::less<>> series;
  // A gauge "h_bucket" with an le label is one of histogram h's buckets when its other labels are
  // h's: its "h_bucket{other labels}" -> the gauge, checked against h's claim (and h's against it).
  std::map<std::string, std::string, std::less<>> bucket_gauges;
  std::string skipped;
  auto series_key = [](std::string_view sample, const Labels& labels, bool histogram) {
    Labels sorted;
    sorted.reserve(labels.size());
    for (const auto& [key, value] : labels)
      sorted.emplace_back(PrometheusLabelName(key, histogram), value);
    std::sort(sorted.begin(), sorted.end());
    return std::string(sample) + PrometheusLabels(sorted, false);
  };
  auto family = [&](const std::string& name, const MetricSnapshot& m, MetricType type,
                    bool quantiles = false) -> Family* {
    const std::string kind(TypeName(type));
    const bool histogram = m.type == MetricType::kHistogram;
    if (std::optional<LabelClash> clash = FindLabelClash(m.labels, histogram)) {
      skipped += fmt::format("# scales: skipped {} {}: labels {} and {} are both exported as {}\n",
                             kind, EscapeHelp(m.name), EscapeHelp(clash->first),
                             EscapeHelp(clash->second), clash->name);
      return nullptr;
    }
    auto [it, inserted] = families.try_emplace(name, Family{type, m.name, quantiles, {}});
    Family& f = it->second;
    // A family this metric created is removed again when it is skipped: its HELP and TYPE alone
    // would still claim the name.
    auto skip = [&, it = it, inserted = inserted]() -> Family* {
      if (inserted) families.erase(it);
      return nullptr;
    };
    if (f.type != type || f.quantiles != quantiles) {
      skipped += fmt::format("# scales: skipped {} {}: family {} is a {}\n", kind,
                             EscapeHelp(m.name), name, TypeName(f.type));
      return nullptr;
    }
    std::vector<std::string> keys;
    std::string bucket_key;  // the histogram bucket series this metric is or repeats, if any
    if (histogram && !quantiles) {
      for (const char* suffix : {"_bucket", "_sum", "_count"}) keys.push_back(series_key(name + suffix, m.labels, true));
      bucket_key = keys.front();
    } else {
      keys.push_back(series_key(name, m.labels, histogram));
      if (!histogram && name.ends_with("_bucket")) {
        Labels rest;
        for (const auto& label : m.labels) {
          if (PrometheusLabelName(label.first, false) != "le") rest.push_back(label);
        }
        if (rest.size() < m.labels.size()) bucket_key = series_key(name, rest, false);
      }
    }
    auto clash = [&](const std::map<std::string, std::string, std::less<>>& claims,
                     const std::string& key) {
      auto taken = claims.find(key);
      if (taken == claims.end()) return false;
      skipped += fmt::format("# scales: skipped {} {}: series {} is {}'s\n", kind,
                             EscapeHelp(m.name), key, EscapeHelp(taken->second));
      return true;
    };
    for (const std::string& key : keys) {
      if (clash(series, key)) return skip();
    }
    if (!bucket_key.empty() && clash(histogram ? bucket_gauges : series, bucket_key)) return skip();
    // A family h_bucket, h_sum or h_count beside a histogram family h, whatever its labels: Go's
    // expfmt parser (promtool, the Pushgateway) reads its TYPE line as h's second and rejects the
    // whole text, and client_golang refuses such a pair.
    if (inserted) {
      for (const std::string_view suffix : {"_bucket", "_sum", "_count"}) {
        if (type == MetricType::kHistogram && !quantiles &&
            families.contains(name + std::string(suffix))) {
          skipped += fmt::format("# scales: skipped {} {}: family {}{} would hold its samples\n",
                                 kind, EscapeHelp(m.name), name, suffix);
          return skip();
        }
        if (name.ends_with(suffix)) {
          const std::string base = name.substr(0, name.size() - suffix.size());
          auto h = families.find(base);
          if (h != families.end() && h->second.type == MetricType::kHistogram &&
              !h->second.quantiles) {
            skipped += fmt::format(
                "# scales: skipped {} {}: family {} would hold histogram {}'s samples\n", kind,
                EscapeHelp(m.name), name, EscapeHelp(h->second.raw_name));
            return skip();
          }
        }
      }
    }
    if (!histogram && !bucket_key.empty()) bucket_gauges.emplace(std::move(bucket_key), m.name);
    for (std::string& key : keys) series.emplace(std::move(key), m.name);
    return &f;
  };
  static constexpr std::array<std::pair<double, std::string_view>, 4> kQuantiles = {
      {{0.5, "0.5"}, {0.9, "0.9"}, {0.99, "0.99"}, {0.999, "0.999"}}};
  std::map<std::string, std::string, std::less<>> help;
  {
    std::lock_guard lock(mu_);
    help.insert(help_.begin(), help_.end());
  }

  for (const MetricSnapshot& m : Snapshot()) {
    std::string name = PrometheusName(m.name, /*allow_colon=*/true);
    switch (m.type) {
      case MetricType::kCounter: {
        if (!name.ends_with("_total")) name += "_total";
        if (Family* f = family(name, m, m.type)) {
          f->lines += fmt::format("{}{} {}\n", name, PrometheusLabels(m.labels, false), m.value);
        }
        break;
      }
      case MetricType::kGauge:
        if (Family* f = family(name, m, m.type)) {
          f->lines += fmt::format("{}{} {}\n", name, PrometheusLabels(m.labels, false), m.value);
        }
        break;
      case MetricType::kHistogram: {
        const HistogramSnapshot& h = m.histogram;
        Family* f = family(name, m, m.type);
        if (f) {
          int64_t cumulative = 0;
          for (size_t i = 0; i < kExportBucketCount; ++i) {
            cumulative += h.export_buckets[i];
            std::string le =
                i < kExportBucketBounds.size() ? std::to_string(kExportBucketBounds[i]) : "+Inf";
            f->lines += fmt::format("{}_bucket{} {}\n", name,
                                    PrometheusLabels(m.labels, true, "le", le), cumulative);
          }
          // _count equals the +Inf bucket, as the format requires, even mid-Record().
          std::string labels = PrometheusLabels(m.labels, true);
          f->lines += fmt::format("{}_sum{} {}\n{}_count{} {}\n", name, labels, h.sum, name, labels,
                                  cumulative);
        }
        // The quantile gauges belong to the histogram: skipped with it (the comment names it).
        if (!options.quantiles || !f) break;
        if (Family* q = family(name + "_quantile", m, MetricType::kGauge, /*quantiles=*/true)) {
          for (const auto& [quantile, text] : kQuantiles) {
            q->lines += fmt::format("{}_quantile{} {}\n", name,
                                    PrometheusLabels(m.labels, true, "quantile", text),
                                    h.Percentile(quantile));
          }
        }
        break;
      }
    }
  }

  std::string out;
  for (const auto& [name, f] : families) {
    std::string text;
    if (auto it = help.find(f.raw_name); it != help.end()) {
      text = it->second;
    } else if (std::string_view builtin = BuiltinHelp(f.raw_name); !builtin.empty()) {
      text = std::string(builtin);
    } else {
      text = "scales metric " + f.raw_name;
    }
    if (f.quantiles)
      text += " Quantiles over the process lifetime (nearest rank, at most 6.25 % high).";
    out +=
        fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, EscapeHelp(text), name, TypeName(f.type));
    out += f.lines;
  }
  out += skipped;
  return out;
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
