#include "bench_html.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>

#include <fmt/format.h>

namespace scales::tools {
namespace {

std::string Escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// Chart geometry (SVG user units).
constexpr double kWidth = 760, kHeight = 280;
constexpr double kLeft = 72, kRight = 20, kTop = 34, kBottom = 44;
constexpr size_t kMaxMarkers = 400;  // points with hover titles per series; beyond, a line only

struct Axis {
  std::string label;
  bool log = false;   // log10 scale (latencies)
  double step = 0;    // tick step for linear axes; 0 = a 1-2-5 step for about 6 ticks
  std::function<std::string(double)> format = [](double v) { return fmt::format("{:g}", v); };
};

struct Series {
  std::string name;
  std::string color;
  std::vector<std::pair<double, double>> points;
  bool dashed = false;
};

double NiceStep(double range) {
  if (range <= 0) return 1;
  double raw = range / 6;
  double mag = std::pow(10, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (raw <= m * mag) return m * mag;
  }
  return 10 * mag;
}

// Maps data values to pixels along one axis.
struct Scale {
  double lo, hi, px_lo, px_hi;
  bool log;
  double operator()(double v) const {
    double a = log ? std::log10(std::max(v, lo)) : v, l = log ? std::log10(lo) : lo, h = log ? std::log10(hi) : hi;
    if (h <= l) return px_lo;
    return px_lo + (std::clamp(a, l, h) - l) / (h - l) * (px_hi - px_lo);
  }
  std::vector<double> Ticks(double step) const {
    std::vector<double> out;
    if (log) {
      for (double v = lo; v <= hi * 1.0001; v *= 10) out.push_back(v);
    } else {
      for (double v = lo; v <= hi + step * 1e-6; v += step) out.push_back(v);
    }
    return out;
  }
};

// The [lo, hi] range of an axis holding `values`.
std::pair<double, double> Range(const std::vector<double>& values, const Axis& axis, double& step) {
  double lo = values.empty() ? 0 : *std::min_element(values.begin(), values.end());
  double hi = values.empty() ? 1 : *std::max_element(values.begin(), values.end());
  if (axis.log) {
    lo = std::pow(10, std::floor(std::log10(std::max(lo, 1.0))));
    hi = std::pow(10, std::ceil(std::log10(std::max(hi, 1.0))));
    if (hi <= lo) hi = lo * 10;
    return {lo, hi};
  }
  lo = std::min(lo, 0.0);
  if (hi <= lo) hi = lo + 1;
  step = axis.step > 0 ? axis.step : NiceStep(hi - lo);
  return {std::floor(lo / step) * step, std::ceil(hi / step) * step};
}

std::string ChartHeader(const std::string& id, const std::string& title) {
  return fmt::format(
      "<svg class=\"chart\" id=\"{0}\" data-title=\"{1}\" viewBox=\"0 0 {2} {3}\" width=\"{2}\" height=\"{3}\" "
      "xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">\n<title>{1}</title>\n"
      "<text x=\"{4}\" y=\"20\" class=\"ct\">{1}</text>\n",
      id, Escape(title), kWidth, kHeight, kLeft);
}

std::string Legend(const std::vector<Series>& series) {
  std::string out;
  double x = kWidth - kRight;
  for (auto it = series.rbegin(); it != series.rend(); ++it) {
    x -= 12 + 7.0 * static_cast<double>(it->name.size()) + 14;
    out += fmt::format("<rect x=\"{:.1f}\" y=\"12\" width=\"10\" height=\"10\" fill=\"{}\"/>"
                       "<text x=\"{:.1f}\" y=\"21\" class=\"lg\">{}</text>\n",
                       x, it->color, x + 13, Escape(it->name));
  }
  return out;
}

std::string LineChart(const std::string& id, const std::string& title, const Axis& xa, const Axis& ya,
                      const std::vector<Series>& series, const std::vector<std::pair<double, std::string>>& events = {}) {
  std::vector<double> xs, ys;
  for (auto& s : series) {
    for (auto& [x, y] : s.points) {
      xs.push_back(x);
      ys.push_back(y);
    }
  }
  double xstep = 1, ystep = 1;
  auto [x0, x1] = Range(xs, xa, xstep);
  auto [y0, y1] = Range(ys, ya, ystep);
  Scale sx{x0, x1, kLeft, kWidth - kRight, xa.log};
  Scale sy{y0, y1, kHeight - kBottom, kTop, ya.log};
  std::string out = ChartHeader(id, title);
  out += Legend(series);
  // Grid and tick labels.
  for (double v : sy.Ticks(ystep)) {
    out += fmt::format("<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" class=\"grid\"/>"
                       "<text x=\"{}\" y=\"{:.1f}\" class=\"yt\">{}</text>\n",
                       kLeft, kWidth - kRight, sy(v), sy(v), kLeft - 6, sy(v) + 4, Escape(ya.format(v)));
  }
  for (double v : sx.Ticks(xstep)) {
    out += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{}\" y2=\"{}\" class=\"tick\"/>"
                       "<text x=\"{:.1f}\" y=\"{}\" class=\"xt\">{}</text>\n",
                       sx(v), sx(v), kHeight - kBottom, kHeight - kBottom + 5, sx(v), kHeight - kBottom + 18,
                       Escape(xa.format(v)));
  }
  out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" class=\"al\">{}</text>\n", (kLeft + kWidth - kRight) / 2,
                     kHeight - 6, Escape(xa.label));
  out += fmt::format("<text x=\"14\" y=\"{:.1f}\" class=\"al\" transform=\"rotate(-90 14 {:.1f})\">{}</text>\n",
                     (kTop + kHeight - kBottom) / 2, (kTop + kHeight - kBottom) / 2, Escape(ya.label));
  for (auto& [t, what] : events) {
    out += fmt::format("<g class=\"event\" data-x=\"{:.3f}\"><line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{}\" y2=\"{}\"/>"
                       "<text x=\"{:.1f}\" y=\"{}\">{}</text></g>\n",
                       t, sx(t), sx(t), kTop, kHeight - kBottom, sx(t) + 3, kTop + 10, Escape(what));
  }
  for (auto& s : series) {
    out += fmt::format("<g class=\"series\" data-series=\"{}\" data-points=\"{}\">\n", Escape(s.name), s.points.size());
    std::string pts;
    for (auto& [x, y] : s.points) pts += fmt::format("{:.1f},{:.1f} ", sx(x), sy(y));
    out += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\"{} points=\"{}\"/>\n", s.color,
                       s.dashed ? " stroke-dasharray=\"6 4\"" : "", pts);
    if (s.points.size() <= kMaxMarkers) {
      for (auto& [x, y] : s.points) {
        out += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2.2\" fill=\"{}\" data-x=\"{}\" data-y=\"{}\">"
                           "<title>{}: {} at {}</title></circle>\n",
                           sx(x), sy(y), s.color, x, y, Escape(s.name), Escape(ya.format(y)), Escape(xa.format(x)));
      }
    }
    out += "</g>\n";
  }
  return out + "</svg>\n";
}

std::string Seconds(double v) { return fmt::format("{:g}s", std::round(v * 100) / 100); }
// Three significant digits: "320us", "1.5ms", "10ms", "2.1s".
std::string Micros(double v) {
  if (v < 1000) return fmt::format("{:.3g}us", v);
  if (v < 1e6) return fmt::format("{:.3g}ms", v / 1e3);
  return fmt::format("{:.3g}s", v / 1e6);
}

std::string LatencyOverTime(const ReportSection& s) {
  const auto& series = s.result.chart_series();
  Series p50{"p50", "#2b7bb9", {}}, p99{"p99", "#e07b00", {}}, max{"max", "#c0392b", {}};
  for (auto& x : series) {
    if (x.completed > 0) {
      p50.points.emplace_back(x.t_s, static_cast<double>(x.p50_us));
      p99.points.emplace_back(x.t_s, static_cast<double>(x.p99_us));
    }
    // A call recorded just before a tick may raise the next interval's maximum instead.
    if (x.max_us > 0) max.points.emplace_back(x.t_s, static_cast<double>(x.max_us));
  }
  const char* from = s.result.open_loop() ? "from the intended send" : "from the send";
  return LineChart("latency-over-time", "Latency over time",
                   {"time since start (completions per interval)", false, 0, Seconds},
                   {fmt::format("latency {} (log)", from), true, 0, Micros}, {max, p99, p50}, s.events);
}

std::string LatencyDistribution(const ReportSection& s) {
  // The percentile spectrum: x = -log10(1 - q), so 90 %, 99 %, 99.9 % ... are evenly spaced.
  const auto& h = s.result.latency_us;
  Series spectrum{"latency", "#2b7bb9", {}};
  int64_t cumulative = 0;
  const double last_x = h.count > 1 ? std::log10(static_cast<double>(h.count)) : 1;
  for (auto& [bound, n] : h.buckets) {
    if (spectrum.points.empty()) spectrum.points.emplace_back(0, static_cast<double>(std::max(h.min, int64_t{1})));
    cumulative += n;
    double q = static_cast<double>(cumulative) / static_cast<double>(h.count);
    double x = q >= 1 ? last_x : std::min(last_x, -std::log10(1 - q));
    spectrum.points.emplace_back(x, static_cast<double>(std::min(bound, h.max)));
  }
  auto percentile = [](double x) {
    if (x <= 0) return std::string("0%");
    int digits = static_cast<int>(std::lround(x));
    if (std::abs(x - digits) > 1e-6) return fmt::format("{:g}", x);
    // 1 -> 90%, 2 -> 99%, 3 -> 99.9%, ...
    return fmt::format("{:.{}f}%", 100 * (1 - std::pow(10.0, -digits)), std::max(0, digits - 2));
  };
  return LineChart("latency-distribution", "Latency distribution", {"percentile", false, 1, percentile},
                   {"latency (log)", true, 0, Micros}, {spectrum});
}

std::string ThroughputOverTime(const ReportSection& s) {
  const auto& r = s.result;
  Series ok{"succeeded/s", "#27ae60", {}}, failed{"failed/s", "#c0392b", {}}, offered{"offered/s", "#7f8c8d", {}, true};
  for (auto& x : r.chart_series()) {
    if (x.interval_s <= 0) continue;
    ok.points.emplace_back(x.t_s, static_cast<double>(x.completed - x.failed) / x.interval_s);
    failed.points.emplace_back(x.t_s, static_cast<double>(x.failed) / x.interval_s);
  }
  std::vector<Series> all = {ok, failed};
  if (r.open_loop() && !ok.points.empty()) {
    // Calls were due from the start until the last one; the backlog may drain after that.
    const double offered_until = static_cast<double>(r.total()) / *r.limits.rate;
    offered.points = {{0, *r.limits.rate}, {offered_until, *r.limits.rate}};
    all.push_back(offered);
  }
  return LineChart("throughput-over-time", "Throughput over time", {"time since start", false, 0, Seconds},
                   {"requests/s", false, 0, [](double v) { return fmt::format("{:g}", v); }}, all, s.events);
}

std::string EndpointSpread(const ReportSection& s) {
  const auto& r = s.result;
  const double row = 26;
  const double height = kTop + 16 + row * static_cast<double>(std::max<size_t>(1, r.endpoints.size()));
  int64_t most = 1;
  for (auto& [ep, n] : r.endpoints) most = std::max(most, n);
  std::string out = fmt::format(
      "<svg class=\"chart\" id=\"endpoint-spread\" data-title=\"Requests per endpoint\" viewBox=\"0 0 {0} {1}\" "
      "width=\"{0}\" height=\"{1}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">\n"
      "<title>Requests per endpoint</title>\n<text x=\"{2}\" y=\"20\" class=\"ct\">Requests per endpoint</text>\n",
      kWidth, height, kLeft);
  out += Legend({{"succeeded", "#27ae60", {}}, {"failed", "#c0392b", {}}});
  const double x0 = 190, x1 = kWidth - 120;
  double y = kTop + 8;
  for (auto& [ep, n] : r.endpoints) {
    auto e = r.endpoint_errors.find(ep);
    const int64_t failed = e == r.endpoint_errors.end() ? 0 : e->second;
    const double w_all = (x1 - x0) * static_cast<double>(n) / static_cast<double>(most);
    const double w_failed = (x1 - x0) * static_cast<double>(failed) / static_cast<double>(most);
    out += fmt::format(
        "<g class=\"bar\" data-endpoint=\"{0}\" data-requests=\"{1}\" data-failed=\"{2}\">"
        "<title>{0}: {1} requests, {2} failed</title>"
        "<text x=\"{3}\" y=\"{4:.1f}\" class=\"yt\">{0}</text>"
        "<rect x=\"{5}\" y=\"{6:.1f}\" width=\"{7:.1f}\" height=\"18\" fill=\"#27ae60\"/>"
        "<rect x=\"{8:.1f}\" y=\"{6:.1f}\" width=\"{9:.1f}\" height=\"18\" fill=\"#c0392b\"/>"
        "<text x=\"{10:.1f}\" y=\"{4:.1f}\" class=\"lg\">{1}{11}</text></g>\n",
        Escape(ep), n, failed, x0 - 8, y + 13, x0, y, w_all - w_failed, x0 + w_all - w_failed, w_failed,
        x0 + w_all + 6, failed ? fmt::format(" ({} failed)", failed) : std::string());
    y += row;
  }
  return out + "</svg>\n";
}

std::string Row(const std::string& k, const std::string& v) {
  return fmt::format("<tr><th>{}</th><td>{}</td></tr>\n", Escape(k), Escape(v));
}

std::string SummaryTable(const BenchResult& r) {
  const auto& h = r.latency_us;
  std::string out = "<table class=\"summary\">\n";
  out += Row("requests", std::to_string(r.total()));
  out += Row("succeeded", std::to_string(r.succeeded));
  out += Row("failed", std::to_string(r.failed));
  for (auto& [k, v] : r.errors) out += Row("  " + k, std::to_string(v));
  if (!r.last_error.empty()) out += Row("last error", r.last_error);
  out += Row("elapsed", fmt::format("{:.3f} s", r.elapsed_s));
  if (r.open_loop()) {
    out += Row("mode", "open loop (latency from each call's intended send time)");
    out += Row("offered rate", fmt::format("{} req/s", *r.limits.rate));  // as given, as the text and JSON
    out += Row("achieved rate", fmt::format("{:.1f} req/s", r.achieved_rps()));
    out += Row("queued", fmt::format("{} (max backlog {})", r.queued, r.max_backlog));
  } else {
    out += Row("mode", fmt::format("closed loop ({} callers)", r.limits.concurrency));
    out += Row("throughput", fmt::format("{:.1f} req/s", r.achieved_rps()));
  }
  out += Row("latency", fmt::format("p50 {}  p90 {}  p99 {}  p99.9 {}  max {}", FormatMicros(h.Percentile(0.5)),
                                    FormatMicros(h.Percentile(0.9)), FormatMicros(h.Percentile(0.99)),
                                    FormatMicros(h.Percentile(0.999)), FormatMicros(h.max)));
  out += Row("client cpu", fmt::format("user {:.3f} s, sys {:.3f} s, {:.2f} us/call", r.cpu_user_s, r.cpu_sys_s,
                                       r.cpu_us_per_call()));
  return out + "</table>\n";
}

constexpr const char* kStyle = R"(<style>
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:800px}
h1{font-size:22px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0 16px}th,td{text-align:left;padding:2px 14px 2px 0;font-size:13px;vertical-align:top}
th{font-weight:600;color:#555;white-space:pre}td{font-family:ui-monospace,Menlo,Consolas,monospace}
svg.chart{display:block;margin:12px 0;background:#fcfcfc;border:1px solid #eee}
.ct{font-size:14px;font-weight:600}.lg{font-size:11px}.yt{font-size:10px;text-anchor:end}
.xt{font-size:10px;text-anchor:middle}.al{font-size:11px;text-anchor:middle;fill:#555}
.grid{stroke:#e6e6e6}.tick{stroke:#999}.event line{stroke:#8e44ad;stroke-dasharray:3 3}.event text{font-size:10px;fill:#8e44ad}
</style>
)";

}  // namespace

std::string RenderHtmlReport(const std::string& title, const std::vector<ReportSection>& sections) {
  std::time_t now = std::time(nullptr);
  char when[64];
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S %Z", std::localtime(&now));
  std::string out = fmt::format("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>{}</title>\n{}"
                                "</head><body>\n<h1>{}</h1>\n<p>written {} by the scales tool</p>\n",
                                Escape(title), kStyle, Escape(title), when);
  for (const auto& s : sections) {
    out += fmt::format("<section class=\"run\">\n<h2>{}</h2>\n<table class=\"settings\">\n", Escape(s.title));
    for (auto& [k, v] : s.settings) out += Row(k, v);
    out += "</table>\n" + SummaryTable(s.result);
    out += LatencyOverTime(s) + LatencyDistribution(s) + ThroughputOverTime(s) + EndpointSpread(s);
    out += "</section>\n";
  }
  return out + "</body></html>\n";
}

bool WriteTextFile(const std::string& path, const std::string& text, std::string& error) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (f) f << text;
  if (f) f.close();
  if (!f) {
    error = fmt::format("cannot write {}: {}", path, std::strerror(errno));
    return false;
  }
  return true;
}

bool CheckWritable(const std::string& path, std::string& error) {
  std::ofstream f(path, std::ios::binary | std::ios::app);
  if (f) f.close();
  if (!f) {
    error = fmt::format("cannot write {}: {}", path, std::strerror(errno));
    return false;
  }
  return true;
}

}  // namespace scales::tools
