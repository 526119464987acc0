// Fuzz target: the URI parser (include/scales/discovery/uri.h). Any input either fails with a
// message that quotes the URI, or parses into a URI whose canonical form parses back to the
// same canonical form.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "scales/discovery/uri.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view uri(reinterpret_cast<const char*>(data), size);
  std::string error;
  auto parsed = scales::ScalesUriParser::TryParse(uri, error);
  if (!parsed) {
    if (error.empty()) std::abort();
    return 0;
  }
  if (parsed->hosts.empty()) std::abort();
  for (const auto& ep : parsed->hosts) {
    if (ep.port == 0 || ep.host.empty()) std::abort();
  }
  std::string canonical = parsed->ToString();
  std::string error2;
  auto again = scales::ScalesUriParser::TryParse(canonical, error2);
  if (!again || again->ToString() != canonical) std::abort();
  return 0;
}
