#include "cli_util.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include <fmt/format.h>

namespace scales::tools {

std::optional<std::chrono::nanoseconds> ParseDuration(std::string_view text, std::string* why) {
  // Exact decimal arithmetic, not strtod: "0.5ns" rounded to 1 ns (and "0.4ns" to 0) silently.
  size_t i = 0;
  auto digits = [&] {
    const size_t begin = i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    return text.substr(begin, i - begin);
  };
  std::string_view whole = digits();
  std::string_view fraction;
  if (i < text.size() && text[i] == '.') {
    ++i;
    fraction = digits();
  }
  if (whole.empty() && fraction.empty()) return std::nullopt;
  std::string_view unit = text.substr(i);
  long long ns_per_unit;
  if (unit.empty() || unit == "s") {
    ns_per_unit = 1'000'000'000;
  } else if (unit == "ms") {
    ns_per_unit = 1'000'000;
  } else if (unit == "us") {
    ns_per_unit = 1'000;
  } else if (unit == "ns") {
    ns_per_unit = 1;
  } else if (unit == "m" || unit == "min") {
    ns_per_unit = 60'000'000'000;
  } else if (unit == "h") {
    ns_per_unit = 3'600'000'000'000;
  } else {
    return std::nullopt;
  }
  while (!whole.empty() && whole.front() == '0') whole.remove_prefix(1);
  while (!fraction.empty() && fraction.back() == '0') fraction.remove_suffix(1);
  // More than 18 digits: over 365 days in any unit; fewer cannot overflow below.
  if (whole.size() > 18) return std::nullopt;
  auto value = [](std::string_view d) {
    __int128 v = 0;
    for (char c : d) v = v * 10 + (c - '0');
    return v;
  };
  __int128 ns = value(whole) * ns_per_unit;
  if (!fraction.empty()) {
    // More than 18 digits after the point (the last one not 0) is never whole nanoseconds: an
    // hour is 3.6e12 ns.
    __int128 scale = 1;
    for (size_t k = 0; k < fraction.size() && k <= 18; ++k) scale *= 10;
    const __int128 part = fraction.size() > 18 ? 1 : value(fraction) * ns_per_unit;
    if (part % scale != 0) {
      if (why) *why = fmt::format(" ('{}' is not a whole number of nanoseconds, the finest unit)", text);
      return std::nullopt;
    }
    ns += part / scale;
  }
  if (ns > static_cast<__int128>(kMaxDurationNs)) return std::nullopt;
  return std::chrono::nanoseconds(static_cast<long long>(ns));
}

std::optional<long long> ParseIntInRange(std::string_view text, long long min, long long max) {
  std::string s(text);
  // Plain decimal digits, with a '-' only where negatives are allowed: strtoll also takes
  // leading spaces, a '+' and "-0".
  const size_t digits = min < 0 && s.starts_with('-') ? 1 : 0;
  if (s.size() == digits) return std::nullopt;
  for (size_t i = digits; i < s.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(s[i]))) return std::nullopt;
  }
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end != s.c_str() + s.size() || v < min || v > max) return std::nullopt;
  return v;
}

std::optional<double> ParseNumber(std::string_view text) {
  std::string s(text);
  // Plain decimal (digits, a '.', an exponent: "5", "0.5", ".5", "1e6"): strtod also takes
  // leading spaces, a sign, hex ("0x10"), "inf" and "nan".
  size_t i = 0, mantissa_digits = 0;
  auto digits = [&] {
    size_t n = 0;
    for (; i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])); ++i) ++n;
    return n;
  };
  mantissa_digits += digits();
  if (i < s.size() && s[i] == '.') {
    ++i;
    mantissa_digits += digits();
  }
  if (mantissa_digits == 0) return std::nullopt;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    if (digits() == 0) return std::nullopt;
  }
  if (i != s.size()) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::optional<long long> ParsePositiveInt(std::string_view text) {
  if (text.empty() || text.size() > 18) return std::nullopt;
  long long v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + (c - '0');
  }
  if (v <= 0) return std::nullopt;
  return v;
}

std::string JsonEscape(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<int>(c));
        } else {
          out += c;
        }
    }
  }
  return out;
}

}  // namespace scales::tools
