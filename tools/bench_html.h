#pragma once
// The HTML report of `scales bench --report FILE.html` and of the demo: one self-contained page
// (inline CSS and SVG, no scripts to fetch) with, per run, the settings, the summary table and
// four charts: latency over time (p50/p99/max per interval), the latency distribution
// (percentile spectrum), throughput over time, and the spread over endpoints.
//
// The charts are machine-readable too: each is an <svg class="chart" id="..."> whose <title>
// names it; each data series is a <g class="series" data-series="NAME" data-points="N"> whose
// points carry data-x/data-y in the data's units (seconds, microseconds, requests/s), and each
// endpoint bar is a <g class="bar" data-endpoint=".." data-requests=".." data-failed="..">.

#include <string>
#include <utility>
#include <vector>

#include "bench_report.h"

namespace scales::tools {

struct ReportSection {
  std::string title;
  std::vector<std::pair<std::string, std::string>> settings;  // shown as given, in order
  BenchResult result;
  // Moments marked on the time charts, in seconds since the run's start ("beta killed").
  std::vector<std::pair<double, std::string>> events;
};

std::string RenderHtmlReport(const std::string& title, const std::vector<ReportSection>& sections);

// Writes `text` to `path`; on failure returns false and sets `error` (path and reason).
bool WriteTextFile(const std::string& path, const std::string& text, std::string& error);
// Whether `path` can be written, checked before a run so that it fails early: the file is
// created if missing, and an existing one is left as it is (a run that fails before its report
// is written keeps the previous report). Sets `error` as WriteTextFile does.
bool CheckWritable(const std::string& path, std::string& error);

}  // namespace scales::tools
