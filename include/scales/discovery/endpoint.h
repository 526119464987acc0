#pragma once

#include <compare>
#include <cstdint>
#include <string>

namespace scales {

// A server address as discovery reports it: a host name or IP literal and a TCP port.
// IPv6 literals are stored without brackets ("::1").
struct Endpoint {
  std::string host;
  uint16_t port = 0;

  // "host:port", or "[v6]:port" for IPv6 literals.
  std::string ToString() const;

  friend bool operator==(const Endpoint&, const Endpoint&) = default;
  friend auto operator<=>(const Endpoint&, const Endpoint&) = default;
};

}  // namespace scales
