#include "support/prometheus_text.h"

#include <cmath>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <utility>

namespace scales::test {
namespace {

bool NameStart(char c, bool colon) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}
bool NameChar(char c, bool colon) { return NameStart(c, colon) || (c >= '0' && c <= '9'); }

class LineParser {
 public:
  LineParser(std::string_view line, size_t number) : line_(line), number_(number) {}

  [[noreturn]] void Fail(const std::string& what) const {
    throw std::runtime_error("line " + std::to_string(number_) + ": " + what + ": " +
                             std::string(line_));
  }
  bool AtEnd() const { return pos_ >= line_.size(); }
  char Peek() const { return AtEnd() ? '\0' : line_[pos_]; }
  void Expect(char c) {
    if (Peek() != c) Fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  void SkipBlanks() {
    while (!AtEnd() && (line_[pos_] == ' ' || line_[pos_] == '\t')) ++pos_;
  }
  std::string Name(bool colon) {
    size_t start = pos_;
    if (!NameStart(Peek(), colon)) Fail("bad name");
    while (!AtEnd() && NameChar(line_[pos_], colon)) ++pos_;
    return std::string(line_.substr(start, pos_ - start));
  }
  std::string Word() {
    size_t start = pos_;
    while (!AtEnd() && line_[pos_] != ' ' && line_[pos_] != '\t') ++pos_;
    return std::string(line_.substr(start, pos_ - start));
  }
  std::string Rest() {
    std::string_view rest = line_.substr(pos_);
    pos_ = line_.size();
    return std::string(rest);
  }
  std::string QuotedValue() {
    Expect('"');
    std::string out;
    while (true) {
      if (AtEnd()) Fail("unterminated label value");
      char c = line_[pos_++];
      if (c == '"') return out;
      if (c == '\n') Fail("raw newline in label value");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (AtEnd()) Fail("dangling backslash");
      char e = line_[pos_++];
      if (e == '\\')
        out += '\\';
      else if (e == '"')
        out += '"';
      else if (e == 'n')
        out += '\n';
      else
        Fail(std::string("bad escape \\") + e);
    }
  }
  double Number() {
    std::string w = Word();
    if (w == "+Inf" || w == "Inf") return INFINITY;
    if (w == "-Inf") return -INFINITY;
    if (w == "NaN") return NAN;
    if (w.empty()) Fail("missing value");
    char* end = nullptr;
    double v = std::strtod(w.c_str(), &end);
    if (end != w.c_str() + w.size()) Fail("bad number '" + w + "'");
    return v;
  }

 private:
  std::string_view line_;
  size_t number_;
  size_t pos_ = 0;
};

std::string Unescape(const LineParser& p, std::string_view help) {
  std::string out;
  for (size_t i = 0; i < help.size(); ++i) {
    if (help[i] != '\\') {
      out += help[i];
      continue;
    }
    if (++i == help.size()) p.Fail("dangling backslash in HELP");
    if (help[i] == '\\')
      out += '\\';
    else if (help[i] == 'n')
      out += '\n';
    else
      p.Fail("bad escape in HELP");
  }
  return out;
}

bool BelongsTo(const PromFamily& f, const std::string& sample) {
  if (sample == f.name) return f.type != "histogram";
  if (f.type == "histogram") {
    return sample == f.name + "_bucket" || sample == f.name + "_sum" || sample == f.name + "_count";
  }
  if (f.type == "summary") return sample == f.name + "_sum" || sample == f.name + "_count";
  return false;
}

void CheckHistogram(const PromFamily& f) {
  // Group buckets by their labels without le.
  std::map<PromLabels, std::vector<std::pair<double, double>>> buckets;
  std::map<PromLabels, double> counts;
  for (const PromSample& s : f.samples) {
    if (s.name == f.name + "_bucket") {
      auto it = s.labels.find("le");
      if (it == s.labels.end()) throw std::runtime_error(f.name + ": bucket without le");
      PromLabels rest = s.labels;
      rest.erase("le");
      double le = it->second == "+Inf" ? INFINITY : std::stod(it->second);
      buckets[rest].emplace_back(le, s.value);
    } else if (s.name == f.name + "_count") {
      counts[s.labels] = s.value;
    }
  }
  for (const auto& [labels, list] : buckets) {
    for (size_t i = 1; i < list.size(); ++i) {
      if (!(list[i].first > list[i - 1].first))
        throw std::runtime_error(f.name + ": le not increasing");
      if (list[i].second < list[i - 1].second)
        throw std::runtime_error(f.name + ": bucket counts decrease");
    }
    if (list.empty() || !std::isinf(list.back().first))
      throw std::runtime_error(f.name + ": no +Inf bucket");
    auto c = counts.find(labels);
    if (c == counts.end()) throw std::runtime_error(f.name + ": series without _count");
    if (c->second != list.back().second)
      throw std::runtime_error(f.name + ": +Inf bucket != _count");
  }
  if (buckets.size() != counts.size())
    throw std::runtime_error(f.name + ": _count without buckets");
}

}  // namespace

const PromFamily* PromText::Family(std::string_view name) const {
  for (const PromFamily& f : families) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

std::optional<double> PromText::Value(std::string_view name, const PromLabels& labels) const {
  for (const PromFamily& f : families) {
    for (const PromSample& s : f.samples) {
      if (s.name == name && s.labels == labels) return s.value;
    }
  }
  return std::nullopt;
}

PromText ParsePrometheusText(std::string_view text) {
  PromText out;
  std::set<std::string> family_names;
  std::set<std::pair<std::string, PromLabels>> series;
  PromFamily* current = nullptr;
  auto family = [&](const std::string& name, const LineParser& p) -> PromFamily& {
    if (current && current->name == name) return *current;
    if (!family_names.insert(name).second) p.Fail("family " + name + " appears twice");
    out.families.push_back(PromFamily{name, "untyped", std::nullopt, {}});
    current = &out.families.back();
    return *current;
  };
  size_t number = 0;
  size_t start = 0;
  if (!text.empty() && text.back() != '\n')
    throw std::runtime_error("text does not end with a newline");
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    std::string_view line = text.substr(start, end - start);
    start = end + 1;
    ++number;
    LineParser p(line, number);
    p.SkipBlanks();
    if (p.AtEnd()) continue;
    if (p.Peek() == '#') {
      p.Expect('#');
      p.SkipBlanks();
      std::string keyword = p.Word();
      if (keyword != "HELP" && keyword != "TYPE") continue;  // a plain comment
      p.SkipBlanks();
      std::string name = p.Name(/*colon=*/true);
      PromFamily& f = family(name, p);
      if (keyword == "HELP") {
        if (f.help) p.Fail("second HELP");
        p.Expect(' ');
        f.help = Unescape(p, p.Rest());
      } else {
        p.SkipBlanks();
        std::string type = p.Word();
        if (type != "counter" && type != "gauge" && type != "histogram" && type != "summary" &&
            type != "untyped") {
          p.Fail("unknown type " + type);
        }
        if (f.type != "untyped" || !f.samples.empty()) p.Fail("TYPE after samples or twice");
        f.type = type;
        p.SkipBlanks();
        if (!p.AtEnd()) p.Fail("text after TYPE");
      }
      continue;
    }
    PromSample s;
    s.name = p.Name(/*colon=*/true);
    if (p.Peek() == '{') {
      p.Expect('{');
      while (p.Peek() != '}') {
        std::string label = p.Name(/*colon=*/false);
        p.Expect('=');
        std::string value = p.QuotedValue();
        if (!s.labels.emplace(label, value).second) p.Fail("label " + label + " twice");
        if (p.Peek() == ',')
          p.Expect(',');
        else if (p.Peek() != '}')
          p.Fail("expected ',' or '}'");
      }
      p.Expect('}');
    }
    p.Expect(' ');
    p.SkipBlanks();
    s.value = p.Number();
    p.SkipBlanks();
    if (!p.AtEnd()) {
      std::string ts = p.Word();
      if (ts.empty() || ts.find_first_not_of("-0123456789") != std::string::npos)
        p.Fail("bad timestamp");
      p.SkipBlanks();
      if (!p.AtEnd()) p.Fail("text after the value");
    }
    if (!current || !BelongsTo(*current, s.name)) {
      // An untyped sample starts its own family.
      if (current && current->name == s.name) p.Fail("sample does not belong to its family");
      family(s.name, p);
      if (!BelongsTo(*current, s.name)) p.Fail("sample outside its family");
    }
    if (!series.emplace(s.name, s.labels).second) p.Fail("duplicate series");
    current->samples.push_back(std::move(s));
  }
  for (const PromFamily& f : out.families) {
    if (f.type == "histogram") CheckHistogram(f);
  }
  return out;
}

}  // namespace scales::test
