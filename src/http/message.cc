#include "scales/http/message.h"

namespace scales::http {

bool HeaderNameEquals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    // ASCII only (header names are tokens), without std::tolower's locale lookup.
    auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::string_view Response::Header(std::string_view name) const noexcept {
  for (const auto& [k, v] : headers) {
    if (HeaderNameEquals(k, name)) return v;
  }
  return {};
}

bool Response::HasHeader(std::string_view name) const noexcept {
  for (const auto& [k, v] : headers) {
    if (HeaderNameEquals(k, name)) return true;
  }
  return false;
}

}  // namespace scales::http
