// The default sink stacks of the three protocols, role by role: aperture balancer, retries and
// failure accrual on by default, each removable through its options, backup requests added
// when asked for (below the formatter, above the balancer).

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scales/http/client.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales {
namespace {

std::vector<std::string> Roles(const SinkStackSpec& spec) {
  std::vector<std::string> roles;
  for (const auto& p : spec.providers()) roles.push_back(p.role);
  return roles;
}
std::vector<std::string> Names(const SinkStackSpec& spec) {
  std::vector<std::string> names;
  for (const auto& p : spec.providers()) names.push_back(p.name);
  return names;
}

using V = std::vector<std::string>;
using ::testing::HasSubstr;

TEST(DefaultStackTest, HttpDefaults) {
  http::HttpOptions o;
  EXPECT_EQ(Roles(http::HttpClientBuilder::DefaultStack(o)),
            (V{"timeout", "retry", "loadbalancer", "failureaccrual", "resurrector", "pool", "transport"}));
  EXPECT_EQ(Names(http::HttpClientBuilder::DefaultStack(o))[2], "aperture-balancer");
  o.retry.reset();
  o.failure_accrual.reset();
  o.backup = BackupRequestOptions{};
  o.balancer.kind = BalancerKind::kP2CPeakEwma;
  auto spec = http::HttpClientBuilder::DefaultStack(o);
  EXPECT_EQ(Roles(spec), (V{"timeout", "backup", "loadbalancer", "resurrector", "pool", "transport"}));
  EXPECT_EQ(Names(spec)[2], "p2c-ewma-balancer");
}

TEST(DefaultStackTest, ThriftDefaults) {
  thrift::ThriftOptions o;
  EXPECT_EQ(Roles(thrift::DefaultThriftStack(o)), (V{"timeout", "retry", "formatter", "loadbalancer", "failureaccrual",
                                                     "resurrector", "pool", "transport"}));
  o.backup = BackupRequestOptions{};
  EXPECT_EQ(Roles(thrift::DefaultThriftStack(o)), (V{"timeout", "retry", "formatter", "backup", "loadbalancer",
                                                     "failureaccrual", "resurrector", "pool", "transport"}));
}

TEST(DefaultStackTest, ThriftMuxDefaults) {
  thriftmux::ThriftMuxOptions o;
  EXPECT_EQ(Roles(thriftmux::DefaultThriftMuxStack(o)), (V{"timeout", "retry", "formatter", "loadbalancer",
                                                           "failureaccrual", "resurrector", "pool", "transport"}));
  o.failure_accrual.reset();
  o.backup = BackupRequestOptions{};
  EXPECT_EQ(Roles(thriftmux::DefaultThriftMuxStack(o)),
            (V{"timeout", "retry", "formatter", "backup", "loadbalancer", "resurrector", "pool", "transport"}));
}

// What /admin/clients shows for a provider (SinkProvider::settings): the options it was built with.
std::string Setting(const SinkStackSpec& spec, std::string_view role, std::string_view key) {
  for (const auto& p : spec.providers()) {
    if (p.role != role) continue;
    for (const auto& [k, v] : p.settings)
      if (k == key) return v;
    return "(" + p.name + " reports no " + std::string(key) + ")";
  }
  return "(no " + std::string(role) + ")";
}

TEST(DefaultStackTest, BalancersAndTransportsReportTheOptionsTheyUse) {
  http::HttpOptions h;
  h.balancer.kind = BalancerKind::kP2C;
  h.balancer.max_effort = 7;
  h.transport.max_response_body_bytes = 12345;
  h.transport.connect_timeout = std::chrono::milliseconds(1500);
  auto spec = http::HttpClientBuilder::DefaultStack(h);
  EXPECT_EQ(Setting(spec, roles::kLoadBalancer, "max_effort"), "7");
  EXPECT_EQ(Setting(spec, roles::kTransport, "max_response_body_bytes"), "12345");
  EXPECT_EQ(Setting(spec, roles::kTransport, "connect_timeout"), "1500ms");
  EXPECT_EQ(Setting(spec, roles::kTransport, "tls"), "false");

  thrift::ThriftOptions t;
  t.transport.max_frame_bytes = 4096;
  t.transport.tls.enabled = true;
  t.transport.tls.server_name = "svc.example";
  spec = thrift::DefaultThriftStack(t);
  EXPECT_EQ(Setting(spec, roles::kTransport, "max_frame_bytes"), "4096");
  EXPECT_EQ(Setting(spec, roles::kTransport, "tls"), "true");
  EXPECT_EQ(Setting(spec, roles::kTransport, "tls_ca_file"), "(system CAs)");
  EXPECT_EQ(Setting(spec, roles::kTransport, "tls_server_name"), "svc.example");
  EXPECT_EQ(Setting(spec, roles::kTransport, "tls_resume_sessions"), "true");
}

TEST(DefaultStackTest, ValidateNamesTheBadResilienceField) {
  ResilienceOptions o;
  o.retry->max_retries = -1;
  try {
    Validate(o);
    FAIL() << "expected kInvalidArgument";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("max_retries"), std::string::npos) << e.what();
  }
  // A nested field is named by its path in the options, with the value given.
  auto message = [](const ResilienceOptions& bad) -> std::string {
    try {
      Validate(bad);
    } catch (const Error& e) {
      return e.what();
    }
    return "(accepted)";
  };
  o.retry->max_retries = 2;
  o.retry->budget.ttl = std::chrono::milliseconds(500);
  EXPECT_THAT(message(o), HasSubstr("retry.budget.ttl must be in [1 s, 60 s] (got 500 ms)"));
  o.retry->budget.ttl = std::chrono::seconds(10);
  o.retry->backoff_min = std::chrono::milliseconds(30);
  o.retry->backoff_max = std::chrono::milliseconds(20);
  EXPECT_THAT(message(o), HasSubstr("retry.backoff_max must be >= backoff_min (got 20 ms < 30 ms)"));
  o.retry.reset();  // retries off: nothing left to validate there
  EXPECT_NO_THROW(Validate(o));
  o.backup = BackupRequestOptions{};
  o.backup->window = std::chrono::milliseconds(-5);
  EXPECT_THAT(message(o), HasSubstr("backup.window must be > 0 (got -5 ms)"));
  // Failure accrual's durations say the value given too.
  o.backup.reset();
  o.failure_accrual->window = std::chrono::milliseconds(-5);
  EXPECT_THAT(message(o), HasSubstr("failure_accrual.window must be > 0 (got -5 ms)"));
  o.failure_accrual->window = std::chrono::seconds(30);
  o.failure_accrual->min_backoff = Duration::zero();
  EXPECT_THAT(message(o), HasSubstr("failure_accrual.min_backoff must be > 0 (got 0 ms)"));
  o.failure_accrual->min_backoff = std::chrono::seconds(5);
  o.failure_accrual->max_backoff = std::chrono::seconds(1);
  EXPECT_THAT(message(o), HasSubstr("failure_accrual.max_backoff must be >= min_backoff (got 1000 ms < 5000 ms)"));
}

}  // namespace
}  // namespace scales
