#pragma once
// Sink providers and roles: a client's stack is an ordered list of providers, top to bottom,
// each with a role. Users insert, replace or remove providers by role (the seed's
// WithSink / InsertSink / ReplaceRole).
//
// Providers above the load balancer are instantiated once per event loop; the balancer
// instantiates the providers below it once per endpoint (per loop), through the SinkFactory
// it is given, with SinkContext::endpoint set. Pools call their factory once per connection.

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "scales/core/clock.h"
#include "scales/core/sink.h"
#include "scales/discovery/endpoint.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;
class RetryBudget;
class ServerSet;

namespace roles {
inline constexpr std::string_view kTimeout = "timeout";
inline constexpr std::string_view kRetry = "retry";
inline constexpr std::string_view kFormatter = "formatter";
inline constexpr std::string_view kLoadBalancer = "loadbalancer";
inline constexpr std::string_view kFailureAccrual = "failureaccrual";  // scales/resilience/failure_accrual.h
inline constexpr std::string_view kResurrector = "resurrector";
inline constexpr std::string_view kPool = "pool";
inline constexpr std::string_view kTransport = "transport";
}  // namespace roles

// What a provider knows when it creates a sink.
struct SinkContext {
  EventLoop* loop = nullptr;
  std::string client_name;
  // Set for sinks below the load balancer.
  std::optional<Endpoint> endpoint;
  // Labels: client (and endpoint below the balancer).
  stats::StatsScope stats;
  // The client's server set (the load balancer subscribes to it).
  std::shared_ptr<ServerSet> server_set;
  // Set by the retry sink's provider for the providers below it: that sink's RetryBudget (one
  // per client per event loop), which the backup-request sink also withdraws from (as Finagle's
  // BackupRequestFilter draws on Retries.Budget). Null when no retry sink is above.
  std::shared_ptr<RetryBudget> retry_budget;
};

// Creates the rest of the stack below a provider.
using SinkFactory = std::function<SinkPtr(const SinkContext&)>;

// A provider's own settings as (name, value) text pairs, in declaration order; shown by the
// admin server's /admin/clients. Durations are written in milliseconds ("1500ms").
using ProviderSettings = std::vector<std::pair<std::string, std::string>>;

struct SinkProvider {
  std::string role;  // one of roles::k*, or a user's own role name
  std::string name;  // what it builds ("heap-balancer", "watermark-pool", ...)
  std::function<SinkPtr(const SinkContext& ctx, SinkFactory next)> create;
  ProviderSettings settings = {};  // optional: the options the provider was built with
};

// Formats one settings value: durations as "<ms>ms", doubles shortest round-trip, integers
// and booleans as written in C++.
std::string SettingText(Duration d);
std::string SettingText(double v);
inline std::string SettingText(bool v) { return v ? "true" : "false"; }
template <class Int>
  requires std::is_integral_v<Int>
std::string SettingText(Int v) {
  return std::to_string(v);
}

// An ordered list of providers, top (after the dispatcher) to bottom (the transport).
// Thread safety: a plain value; not synchronised.
class SinkStackSpec {
 public:
  SinkStackSpec() = default;
  explicit SinkStackSpec(std::vector<SinkProvider> providers) : providers_(std::move(providers)) {}

  // Appends at the bottom (the seed's WithSink).
  SinkStackSpec& WithSink(SinkProvider p);
  // Inserts at position `index` (0 = top; the seed's InsertSink).
  SinkStackSpec& InsertSink(size_t index, SinkProvider p);
  SinkStackSpec& InsertBefore(std::string_view role, SinkProvider p);
  SinkStackSpec& InsertAfter(std::string_view role, SinkProvider p);
  // Replaces the provider with `role` (the seed's ReplaceRole). Throws scales::Error
  // (kInvalidArgument) if no provider has that role.
  SinkStackSpec& ReplaceRole(std::string_view role, SinkProvider p);
  SinkStackSpec& RemoveRole(std::string_view role);

  bool HasRole(std::string_view role) const;
  const std::vector<SinkProvider>& providers() const noexcept { return providers_; }
  // "timeout(timeout) -> loadbalancer(heap-balancer) -> ..."
  std::string Describe() const;
  // Checks that the stack is usable (non-empty, ends with a transport, roles unique) and
  // throws scales::Error(kInvalidArgument) naming the problem otherwise.
  void Validate() const;
  // The factory of the whole stack.
  SinkFactory Build() const;

 private:
  size_t IndexOf(std::string_view role) const;  // npos if absent
  std::vector<SinkProvider> providers_;
};

}  // namespace scales
