#include "scales/core/provider.h"

#include <set>

#include <fmt/format.h>

#include "scales/core/error.h"

namespace scales {
namespace {
[[noreturn]] void Invalid(const std::string& what) {
  throw Error(make_error_code(Errc::kInvalidArgument), what);
}
}  // namespace

std::string SettingText(Duration d) {
  return fmt::format("{}ms", std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

std::string SettingText(double v) { return fmt::format("{}", v); }

size_t SinkStackSpec::IndexOf(std::string_view role) const {
  for (size_t i = 0; i < providers_.size(); ++i) {
    if (providers_[i].role == role) return i;
  }
  return std::string::npos;
}

SinkStackSpec& SinkStackSpec::WithSink(SinkProvider p) {
  providers_.push_back(std::move(p));
  return *this;
}

SinkStackSpec& SinkStackSpec::InsertSink(size_t index, SinkProvider p) {
  if (index > providers_.size()) {
    Invalid(fmt::format("InsertSink: index {} is past the end of a stack of {} sinks", index,
                        providers_.size()));
  }
  providers_.insert(providers_.begin() + static_cast<ptrdiff_t>(index), std::move(p));
  return *this;
}

SinkStackSpec& SinkStackSpec::InsertBefore(std::string_view role, SinkProvider p) {
  size_t i = IndexOf(role);
  if (i == std::string::npos) Invalid(fmt::format("InsertBefore: no sink has role '{}' in {}", role, Describe()));
  return InsertSink(i, std::move(p));
}

SinkStackSpec& SinkStackSpec::InsertAfter(std::string_view role, SinkProvider p) {
  size_t i = IndexOf(role);
  if (i == std::string::npos) Invalid(fmt::format("InsertAfter: no sink has role '{}' in {}", role, Describe()));
  return InsertSink(i + 1, std::move(p));
}

SinkStackSpec& SinkStackSpec::ReplaceRole(std::string_view role, SinkProvider p) {
  size_t i = IndexOf(role);
  if (i == std::string::npos) Invalid(fmt::format("ReplaceRole: no sink has role '{}' in {}", role, Describe()));
  providers_[i] = std::move(p);
  return *this;
}

SinkStackSpec& SinkStackSpec::RemoveRole(std::string_view role) {
  size_t i = IndexOf(role);
  if (i == std::string::npos) Invalid(fmt::format("RemoveRole: no sink has role '{}' in {}", role, Describe()));
  providers_.erase(providers_.begin() + static_cast<ptrdiff_t>(i));
  return *this;
}

bool SinkStackSpec::HasRole(std::string_view role) const { return IndexOf(role) != std::string::npos; }

std::string SinkStackSpec::Describe() const {
  std::string s;
  for (size_t i = 0; i < providers_.size(); ++i) {
    if (i) s += " -> ";
    s += fmt::format("{}({})", providers_[i].role, providers_[i].name);
  }
  return s.empty() ? "(empty stack)" : s;
}

void SinkStackSpec::Validate() const {
  if (providers_.empty()) Invalid("the sink stack is empty");
  std::set<std::string> seen;
  for (auto& p : providers_) {
    if (!p.create) Invalid(fmt::format("sink provider '{}' ({}) has no create function", p.role, p.name));
    if (!seen.insert(p.role).second) {
      Invalid(fmt::format("role '{}' appears twice in {}", p.role, Describe()));
    }
  }
  if (providers_.back().role != roles::kTransport) {
    Invalid(fmt::format("the bottom of the stack must be a transport: {}", Describe()));
  }
}

SinkFactory SinkStackSpec::Build() const {
  Validate();
  // Compose bottom-up: the factory of provider i calls provider i's create with the factory
  // of provider i + 1. The bottom provider (a transport) gets a factory that must not be used.
  SinkFactory next = [](const SinkContext&) -> SinkPtr {
    throw Error(make_error_code(Errc::kInvalidArgument), "a transport sink has no next sink");
  };
  for (auto it = providers_.rbegin(); it != providers_.rend(); ++it) {
    next = [create = it->create, below = std::move(next)](const SinkContext& ctx) {
      return create(ctx, below);
    };
  }
  return next;
}

}  // namespace scales
