#pragma once
// The seed's client builder: set the URI, name and timeouts, and edit the sink stack by role.
// Protocol builders (Http::NewBuilder(), ...) derive from ClientBuilderBase and add their own
// options and Build(). Stack edits are recorded and applied, in order, to the protocol's
// default stack when Build() runs, so options set later still reach the default sinks.

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "scales/core/client.h"
#include "scales/core/error.h"
#include "scales/core/provider.h"

namespace scales {

// Thread safety: a plain value; not synchronised. Setters return *this for chaining.
// Derived must provide `ClientOptions& client_options()`.
template <class Derived>
class ClientBuilderBase {
 public:
  Derived& SetUri(std::string uri) { co().uri = std::move(uri); return self(); }
  Derived& SetName(std::string name) { co().name = std::move(name); return self(); }
  Derived& SetTimeout(Duration timeout) { co().timeout = timeout; return self(); }
  Derived& SetOpenTimeout(Duration timeout) { co().open_timeout = timeout; return self(); }
  Derived& SetRuntime(std::shared_ptr<Runtime> runtime) { co().runtime = std::move(runtime); return self(); }
  Derived& SetStats(stats::StatsRegistry* stats) { co().stats = stats; return self(); }
  Derived& SetServerSet(std::shared_ptr<ServerSet> set) { co().server_set = std::move(set); return self(); }

  // Stack editing (the seed's WithSink / InsertSink / ReplaceRole, plus removal).
  //
  // WithSink adds a client-level sink: just above the load balancer (below the timeout, the
  // retry sink, any formatter and the backup-request sink), where a sink sees every attempt,
  // before an endpoint is chosen: a call that is retried passes it once per attempt, with the
  // same MethodCallMessage (and whatever the sink changed in it on the earlier attempts), and
  // a backup request passes it with a copy. On a stack without a load balancer it goes just
  // above the transport. Use InsertSink / InsertBefore / InsertAfter for any other position.
  Derived& WithSink(SinkProvider p) {
    return Edit([p = std::move(p)](SinkStackSpec& s) {
      if (s.HasRole(roles::kLoadBalancer)) {
        s.InsertBefore(roles::kLoadBalancer, p);
      } else if (s.HasRole(roles::kTransport)) {
        s.InsertBefore(roles::kTransport, p);
      } else {
        s.WithSink(p);
      }
    });
  }
  Derived& InsertSink(size_t index, SinkProvider p) {
    return Edit([index, p = std::move(p)](SinkStackSpec& s) { s.InsertSink(index, p); });
  }
  Derived& InsertBefore(std::string_view role, SinkProvider p) {
    return Edit([role = std::string(role), p = std::move(p)](SinkStackSpec& s) { s.InsertBefore(role, p); });
  }
  Derived& InsertAfter(std::string_view role, SinkProvider p) {
    return Edit([role = std::string(role), p = std::move(p)](SinkStackSpec& s) { s.InsertAfter(role, p); });
  }
  Derived& ReplaceRole(std::string_view role, SinkProvider p) {
    return Edit([role = std::string(role), p = std::move(p)](SinkStackSpec& s) { s.ReplaceRole(role, p); });
  }
  Derived& RemoveRole(std::string_view role) {
    return Edit([role = std::string(role)](SinkStackSpec& s) { s.RemoveRole(role); });
  }

 protected:
  ClientBuilderBase() = default;
  Derived& self() { return static_cast<Derived&>(*this); }
  ClientOptions& co() { return self().client_options(); }
  Derived& Edit(std::function<void(SinkStackSpec&)> edit) {
    edits_.push_back(std::move(edit));
    return self();
  }
  // Runs `build` (a protocol builder's Build()). A scales::Error it throws that does not name
  // the client yet gets "client NAME: " in front, as every error a client reports does: a bad
  // URI, an option out of range, a TLS file that cannot be read.
  template <class F>
  auto NamingTheClient(F&& build) -> decltype(build()) {
    try {
      return build();
    } catch (const Error& e) {
      const std::string prefix = "client " + co().name;
      const std::string_view what = e.what();
      if (co().name.empty() || what.starts_with(prefix + ":") || what.starts_with(prefix + " ")) throw;
      throw Error(e.scales_code(), prefix + ": " + std::string(what));
    }
  }
  // The default stack with the recorded edits applied.
  SinkStackSpec ApplyEdits(SinkStackSpec spec) const {
    for (const auto& e : edits_) e(spec);
    spec.Validate();
    return spec;
  }

 private:
  std::vector<std::function<void(SinkStackSpec&)>> edits_;
};

}  // namespace scales
