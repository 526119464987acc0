#pragma once
// Small helpers shared by the tool's commands: argument parsing and durations with units.

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace scales::tools {

// Parses "300ms", "2s", "1.5s", "1m", "250us", "100ns". A bare number is seconds.
// Returns nullopt for anything else (negative, unknown unit, garbage).
std::optional<std::chrono::nanoseconds> ParseDuration(std::string_view text);

// Parses a positive decimal integer; nullopt if not one.
std::optional<long long> ParsePositiveInt(std::string_view text);

// Escapes a string for inclusion in JSON.
std::string JsonEscape(std::string_view s);

}  // namespace scales::tools
