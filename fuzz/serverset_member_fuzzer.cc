// Fuzz target: the serverset member JSON parser (include/scales/discovery/serverset_member.h),
// which reads whatever a ZooKeeper member znode holds. Any input either fails with a reason, or
// parses into an instance that serialises and parses back to the same instance.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "scales/discovery/serverset_member.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view json(reinterpret_cast<const char*>(data), size);
  std::string error;
  auto member = scales::ParseServiceInstance(json, error);
  if (!member) {
    if (error.empty()) std::abort();
    return 0;
  }
  (void)scales::SelectEndpoint(*member, "");
  for (const auto& [name, ep] : member->additional_endpoints) (void)scales::SelectEndpoint(*member, name);
  std::string text = scales::SerializeServiceInstance(*member);
  std::string error2;
  auto again = scales::ParseServiceInstance(text, error2);
  if (!again || !(*again == *member)) std::abort();
  return 0;
}
