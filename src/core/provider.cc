#include "scales/core/provider.h"

#include <set>

#include <fmt/format.h>

#include "scales/core/error.h"
#include "scales/core/runtime.h"
#include "scales/core/sink_stack.h"

namespace scales {
namespace {
[[noreturn]] void Invalid(const std::string& what) {
  throw Error(make_error_code(Errc::kInvalidArgument), what);
}

// Stands in for a sink a provider could not create below the load balancer: that happens on
// an event loop (an endpoint joins, a pool connects), where an exception would only be dropped
// by the loop and leave the balancer or pool half-way. Its open fails, raising a fault with the
// reason (the resurrector marks the endpoint down and later calls fail fast quoting it), and
// every request that still reaches it is answered with the reason.
class FailedSink final : public ClientMessageSink {
 public:
  FailedSink(EventLoop& loop, error_code ec, std::string detail)
      : loop_(loop), error_(ec), detail_(std::move(detail)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage&, Stream* stream) override {
    auto m = MethodReturnMessage::Failure(error_, detail_);
    stack.AsyncProcessResponse(stream, m);
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kClosed; }
  std::string open_failure_detail() const override { return detail_; }
  std::string_view name() const override { return "failed-sink"; }

 protected:
  void DoOpen(OpenHandler handler) override {
    on_faulted_.Set(Fault{error_, detail_});
    PostOpenCompletion(std::move(handler), loop_.executor(), error_);
  }

 private:
  EventLoop& loop_;
  error_code error_;
  std::string detail_;
};

// Runs a provider's create. Above the balancer (no endpoint: the client is being built) a
// failure is thrown as scales::Error naming the client and the provider; below it the sink is
// replaced by a FailedSink carrying that error.
SinkPtr CreateSink(const SinkProvider& p, const SinkContext& ctx, const SinkFactory& below) {
  auto where = [&ctx] {
    return ctx.endpoint ? fmt::format("client {}: endpoint {}: ", ctx.client_name, ctx.endpoint->ToString())
                        : fmt::format("client {}: ", ctx.client_name);
  };
  // The pool, the resurrector and failure accrual work on one endpoint, which a balancer above
  // gives them: without one they would connect to nothing.
  if (!ctx.endpoint &&
      (p.role == roles::kPool || p.role == roles::kResurrector || p.role == roles::kFailureAccrual)) {
    throw Error(make_error_code(Errc::kInvalidArgument),
                fmt::format("{}sink provider '{}' ({}) works per endpoint: put it below a load balancer "
                            "(role '{}'), which gives it one; it has none here",
                            where(), p.role, p.name, roles::kLoadBalancer));
  }
  error_code ec;
  std::string detail;
  try {
    if (SinkPtr sink = p.create(ctx, below)) return sink;
    ec = make_error_code(Errc::kInvalidArgument);
    detail = fmt::format("{}sink provider '{}' ({}) returned no sink", where(), p.role, p.name);
  } catch (const Error& e) {
    if (!ctx.endpoint) throw;  // names its step already (a provider's own, or one below)
    ec = e.scales_code();
    detail = fmt::format("{}sink provider '{}' ({}) failed: {}", where(), p.role, p.name, e.what());
  } catch (const std::exception& e) {
    ec = make_error_code(Errc::kInvalidArgument);
    detail = fmt::format("{}sink provider '{}' ({}) failed: {}", where(), p.role, p.name, e.what());
  }
  if (!ctx.endpoint || ctx.loop == nullptr) throw Error(ec, detail);
  return std::make_shared<FailedSink>(*ctx.loop, ec, std::move(detail));
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
    next = [p = *it, below = std::move(next)](const SinkContext& ctx) { return CreateSink(p, ctx, below); };
  }
  return next;
}

}  // namespace scales
