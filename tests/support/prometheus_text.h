#pragma once
// A strict parser of the Prometheus text exposition format 0.0.4, written from the format's
// grammar, for tests of StatsRegistry::ToPrometheus() and the admin server's /metrics.
//
// Lines: empty; "# HELP name text"; "# TYPE name counter|gauge|histogram|summary|untyped";
// other "#" comments; samples "name[{label="value",...}] value [timestamp]". Checked: metric
// and label name characters, label value escapes (\\, \", \n only), numbers (incl. +Inf, -Inf,
// NaN), one HELP and one TYPE per family, TYPE before the family's samples, a family's samples
// contiguous and named after it (histograms: name_bucket, name_sum, name_count), no duplicate
// series, and for histograms: every series has an le bucket list in increasing order ending with
// +Inf, cumulative counts that never decrease, and +Inf equal to name_count.

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace scales::test {

using PromLabels = std::map<std::string, std::string>;

struct PromSample {
  std::string name;
  PromLabels labels;
  double value = 0;
};

struct PromFamily {
  std::string name;
  std::string type;                 // "untyped" when no TYPE line
  std::optional<std::string> help;  // unescaped
  std::vector<PromSample> samples;
};

struct PromText {
  std::vector<PromFamily> families;

  const PromFamily* Family(std::string_view name) const;
  // The value of one series (exact name and label set).
  std::optional<double> Value(std::string_view name, const PromLabels& labels = {}) const;
};

// Throws std::runtime_error("line N: ...: <line>") on the first violation.
PromText ParsePrometheusText(std::string_view text);

}  // namespace scales::test
