#pragma once
// HELP texts of the metrics scales registers itself (shown by StatsRegistry::ToPrometheus).
// Kept in one table next to docs/metrics.md, which has the long descriptions.

#include <string_view>

namespace scales::stats {

// The built-in help of a scales metric name, or an empty view for names scales does not own.
std::string_view BuiltinHelp(std::string_view name) noexcept;

}  // namespace scales::stats
