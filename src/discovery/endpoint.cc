#include "scales/discovery/endpoint.h"

#include <fmt/format.h>

namespace scales {

std::string Endpoint::ToString() const {
  // A ':' can only appear in an IPv6 literal; brackets keep the port separable.
  if (host.find(':') != std::string::npos) {
    return fmt::format("[{}]:{}", host, port);
  }
  return fmt::format("{}:{}", host, port);
}

}  // namespace scales
