#pragma once
// Small helpers shared by the tool's commands: argument parsing and durations with units.

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace scales::tools {

// The longest duration ParseDuration accepts: 365 days.
inline constexpr double kMaxDurationNs = 365.0 * 24 * 3600 * 1e9;

// Parses "300ms", "2s", "1.5s", "1m", "250us", "100ns". A bare number is seconds.
// Returns nullopt for anything else (negative, unknown unit, garbage, over 365 days).
std::optional<std::chrono::nanoseconds> ParseDuration(std::string_view text);

// Parses a positive decimal integer; nullopt if not one.
std::optional<long long> ParsePositiveInt(std::string_view text);

// Parses a whole decimal integer in [min, max]; nullopt for anything else ("9090x", "", "abc").
std::optional<long long> ParseIntInRange(std::string_view text, long long min, long long max);

// Parses a whole finite decimal number ("5", "2.5"); nullopt for anything else ("5x", "").
std::optional<double> ParseNumber(std::string_view text);

// Escapes a string for inclusion in JSON.
std::string JsonEscape(std::string_view s);

}  // namespace scales::tools
