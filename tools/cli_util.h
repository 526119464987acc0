#pragma once
// Small helpers shared by the tool's commands: argument parsing and durations with units.

#include <algorithm>
#include <chrono>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

namespace scales::tools {

// The longest duration ParseDuration accepts: 365 days.
inline constexpr double kMaxDurationNs = 365.0 * 24 * 3600 * 1e9;

// Parses "300ms", "2s", "1.5s", "1m", "250us", "100ns". A bare number is seconds.
// Returns nullopt for anything else (negative, unknown unit, garbage, over 365 days, not a whole
// number of nanoseconds: "0.5ns" was silently 1 ns); for the last, `why` (if given) says so,
// for the usage message: " ('0.5ns' is not a whole number of nanoseconds, the finest unit)".
std::optional<std::chrono::nanoseconds> ParseDuration(std::string_view text, std::string* why = nullptr);

// Parses a positive decimal integer; nullopt if not one.
std::optional<long long> ParsePositiveInt(std::string_view text);

// Parses a whole decimal integer in [min, max]; nullopt for anything else ("9090x", "", "abc",
// "+5", " 5"; a '-' only when min < 0).
std::optional<long long> ParseIntInRange(std::string_view text, long long min, long long max);

// Parses a finite decimal number ("5", "2.5", ".5", "1e6"); nullopt for anything else ("5x", "",
// " 5", "+5", "0x10", "inf", "nan", "1e999").
std::optional<double> ParseNumber(std::string_view text);

// Whether `arg` asks for a command's usage: "-h" or "--help" (printed on stdout, exit 0).
inline bool IsHelp(std::string_view arg) { return arg == "-h" || arg == "--help"; }

// Whether any of argv[1..argc) asks for the usage: help anywhere on the line wins over an error
// earlier on it ("http get --timeout 1s --help" said "missing URI"). But not the value of one of
// `text_options`, whose value is any text: `http post URI / --data -h` posts "-h" (it printed the
// usage and sent nothing).
inline bool HelpAnywhere(int argc, char** argv, std::initializer_list<std::string_view> text_options = {}) {
  for (int i = 1; i < argc; ++i) {
    if (IsHelp(argv[i])) return true;
    if (std::find(text_options.begin(), text_options.end(), std::string_view(argv[i])) != text_options.end()) ++i;
  }
  return false;
}

// Whether an option's value is missing: none left, or another option in its place ("--report
// --json" would write the report to a file named --json, and print text).
inline bool MissingValue(const char* value) { return value == nullptr || std::string_view(value).starts_with("--"); }

// Escapes a string for inclusion in JSON.
std::string JsonEscape(std::string_view s);

}  // namespace scales::tools
