// SinkStackSpec (roles, editing, validation, Build) and the builder's recorded edits.

#include "scales/core/provider.h"

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/fake_sinks.h"
#include "scales/core/builder.h"
#include "scales/core/forwarding_sink.h"
#include "scales/core/timeout_sink.h"
#include "scales/loadbalancer/heap_balancer.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/pool/singleton_pool.h"
#include "scales/pool/watermark_pool.h"

namespace scales {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// A provider that builds nothing useful; only its role and name matter.
SinkProvider Named(std::string role, std::string name) {
  return SinkProvider{std::move(role), std::move(name),
                      [](const SinkContext&, SinkFactory) -> SinkPtr { return nullptr; }};
}

SinkStackSpec DefaultSpec() {
  return SinkStackSpec({TimeoutSinkProvider(), HeapBalancerProvider(), WatermarkPoolProvider(),
                        Named("transport", "fake-transport")});
}

// Expects `fn` to throw scales::Error(kInvalidArgument) whose message contains `text`.
template <class Fn>
void ExpectInvalid(Fn fn, const std::string& text) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one containing: " << text;
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr(text));
  }
}

TEST(SinkStackSpecTest, DescribeListsRolesAndNamesTopToBottom) {
  SinkStackSpec spec = DefaultSpec();
  EXPECT_EQ(spec.Describe(),
            "timeout(timeout) -> loadbalancer(heap-balancer) -> pool(watermark-pool) -> "
            "transport(fake-transport)");
  EXPECT_TRUE(spec.HasRole("pool"));
  EXPECT_FALSE(spec.HasRole("retry"));
  EXPECT_EQ(SinkStackSpec().Describe(), "(empty stack)");
  EXPECT_NO_THROW(spec.Validate());
}

TEST(SinkStackSpecTest, ReplaceRole) {
  SinkStackSpec spec = DefaultSpec();
  spec.ReplaceRole(roles::kPool, SingletonPoolProvider());
  EXPECT_EQ(spec.Describe(),
            "timeout(timeout) -> loadbalancer(heap-balancer) -> pool(singleton-pool) -> "
            "transport(fake-transport)");
  // The replacement may even carry another role name.
  spec.ReplaceRole("timeout", Named("deadline", "my-deadline"));
  EXPECT_THAT(spec.Describe(), StartsWith("deadline(my-deadline) -> "));
  EXPECT_FALSE(spec.HasRole("timeout"));
}

TEST(SinkStackSpecTest, InsertBeforeAndAfter) {
  SinkStackSpec spec = DefaultSpec();
  spec.InsertBefore(roles::kPool, ResurrectorProvider());
  spec.InsertAfter(roles::kTimeout, Named("retry", "retry"));
  EXPECT_EQ(spec.Describe(),
            "timeout(timeout) -> retry(retry) -> loadbalancer(heap-balancer) -> "
            "resurrector(resurrector) -> pool(watermark-pool) -> transport(fake-transport)");
  spec.InsertAfter(roles::kTransport, Named("tap", "tap"));  // after the bottom: allowed here...
  ExpectInvalid([&] { spec.Validate(); }, "the bottom of the stack must be a transport");  // ...not valid
}

TEST(SinkStackSpecTest, WithSinkAndInsertSink) {
  SinkStackSpec spec;
  spec.WithSink(Named("a", "a")).WithSink(Named("transport", "t"));
  spec.InsertSink(0, Named("top", "top"));
  spec.InsertSink(3, Named("z", "z"));  // at the end
  EXPECT_EQ(spec.Describe(), "top(top) -> a(a) -> transport(t) -> z(z)");
  ExpectInvalid([&] { spec.InsertSink(9, Named("x", "x")); },
                "InsertSink: index 9 is past the end of a stack of 4 sinks");
}

TEST(SinkStackSpecTest, RemoveRole) {
  SinkStackSpec spec = DefaultSpec();
  spec.RemoveRole(roles::kTimeout);
  EXPECT_EQ(spec.Describe(), "loadbalancer(heap-balancer) -> pool(watermark-pool) -> transport(fake-transport)");
  EXPECT_FALSE(spec.HasRole(roles::kTimeout));
  EXPECT_EQ(spec.providers().size(), 3u);
}

TEST(SinkStackSpecTest, EditsOfAnUnknownRoleThrowNamingTheRoleAndTheStack) {
  SinkStackSpec spec = DefaultSpec();
  const std::string stack = spec.Describe();
  ExpectInvalid([&] { spec.ReplaceRole("nope", Named("x", "x")); },
                "ReplaceRole: no sink has role 'nope' in " + stack);
  ExpectInvalid([&] { spec.InsertBefore("nope", Named("x", "x")); }, "InsertBefore: no sink has role 'nope'");
  ExpectInvalid([&] { spec.InsertAfter("nope", Named("x", "x")); }, "InsertAfter: no sink has role 'nope'");
  ExpectInvalid([&] { spec.RemoveRole("nope"); }, "RemoveRole: no sink has role 'nope'");
  EXPECT_EQ(spec.Describe(), stack);  // unchanged
}

TEST(SinkStackSpecTest, ValidateErrors) {
  ExpectInvalid([] { SinkStackSpec().Validate(); }, "the sink stack is empty");
  ExpectInvalid([] { SinkStackSpec({TimeoutSinkProvider(), WatermarkPoolProvider()}).Validate(); },
                "the bottom of the stack must be a transport: timeout(timeout) -> pool(watermark-pool)");
  ExpectInvalid(
      [] {
        SinkStackSpec({WatermarkPoolProvider(), SingletonPoolProvider(), Named("transport", "t")}).Validate();
      },
      "role 'pool' appears twice");
  ExpectInvalid([] { SinkStackSpec({SinkProvider{"transport", "t", nullptr}}).Validate(); },
                "sink provider 'transport' (t) has no create function");
  // Build validates too.
  ExpectInvalid([] { SinkStackSpec().Build(); }, "the sink stack is empty");
}

// Build() composes the providers top to bottom; each creates its sink with the factory of the
// rest of the stack.
TEST(SinkStackSpecTest, BuildComposesProvidersInOrder) {
  std::vector<std::string> created;
  auto passthrough = [&created](std::string role) {
    return SinkProvider{role, role, [&created, role](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                          created.push_back(role + "@" + ctx.client_name);
                          SinkPtr below = next(ctx);
                          return std::make_shared<TimeoutSink>(*ctx.loop, below, ctx.stats);
                        }};
  };
  test::ManualEnv env;
  test::FakeTransportFactory factory(env.loop());
  SinkStackSpec spec({passthrough("a"), passthrough("b"),
                      SinkProvider{"transport", "fake",
                                   [&](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                                     created.push_back("transport@" + ctx.client_name);
                                     // The bottom's `next` must not be used.
                                     try {
                                       next(ctx);
                                       ADD_FAILURE() << "the transport's next factory returned";
                                     } catch (const Error& e) {
                                       EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument);
                                       EXPECT_THAT(e.what(), HasSubstr("no next sink"));
                                     }
                                     return factory.Create(ctx);
                                   }}});
  SinkFactory top = spec.Build();
  EXPECT_TRUE(created.empty());  // nothing is created until the factory runs
  SinkPtr head = top(test::MakeContext(env.loop(), env.scope));
  EXPECT_THAT(created, ElementsAre("a@test", "b@test", "transport@test"));
  ASSERT_EQ(factory.count(), 1u);
  // head is a's sink, whose next is b's, whose next is the fake transport.
  auto* a = dynamic_cast<ForwardingSink*>(head.get());
  ASSERT_NE(a, nullptr);
  auto* b = dynamic_cast<ForwardingSink*>(a->next().get());
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->next().get(), &factory.at(0));
  // A second instantiation (another loop, another endpoint) builds a fresh chain.
  top(test::MakeContext(env.loop(), env.scope));
  EXPECT_EQ(factory.count(), 2u);
}

// A provider that returns no sink, or throws something other than a scales::Error, fails the
// instantiation with a scales::Error naming the client and the provider (not a null sink that
// crashes the first call, nor an exception the builder cannot name).
TEST(SinkStackSpecTest, BuildNamesAProviderThatReturnsNoSinkOrThrows) {
  test::ManualEnv env;
  SinkStackSpec none({Named("tap", "my-tap"), Named("transport", "t")});
  ExpectInvalid([&] { none.Build()(test::MakeContext(env.loop(), env.scope)); },
                "client test: sink provider 'tap' (my-tap) returned no sink");
  SinkStackSpec throws({SinkProvider{"transport", "t", [](const SinkContext&, SinkFactory) -> SinkPtr {
                                       throw std::runtime_error("boom");
                                     }}});
  ExpectInvalid([&] { throws.Build()(test::MakeContext(env.loop(), env.scope)); },
                "client test: sink provider 'transport' (t) failed: boom");
}

// --- The builder records edits and applies them when the client is built -------------------

class TestBuilder : public ClientBuilderBase<TestBuilder> {
 public:
  ClientOptions& client_options() { return options_; }
  SinkStackSpec Spec() const { return ApplyEdits(DefaultSpec()); }

 private:
  ClientOptions options_;
};

TEST(ClientBuilderTest, SettersFillClientOptions) {
  TestBuilder b;
  auto set = std::make_shared<StaticServerSet>(ServerSet::Members{{"h", 1}});
  stats::StatsRegistry registry;
  b.SetUri("tcp://a:1,b:2").SetName("users").SetTimeout(std::chrono::milliseconds(500))
      .SetOpenTimeout(std::chrono::seconds(2)).SetStats(&registry).SetServerSet(set);
  EXPECT_EQ(b.client_options().uri, "tcp://a:1,b:2");
  EXPECT_EQ(b.client_options().name, "users");
  EXPECT_EQ(b.client_options().timeout, std::chrono::milliseconds(500));
  EXPECT_EQ(b.client_options().open_timeout, std::chrono::seconds(2));
  EXPECT_EQ(b.client_options().stats, &registry);
  EXPECT_EQ(b.client_options().server_set, set);
}

TEST(ClientBuilderTest, EditsApplyInOrderToTheDefaultStack) {
  TestBuilder b;
  b.ReplaceRole("pool", SingletonPoolProvider())
      .InsertBefore("pool", ResurrectorProvider())
      .InsertAfter("timeout", Named("retry", "retry"))
      .RemoveRole("retry")
      .InsertSink(0, Named("trace", "trace"));
  EXPECT_EQ(b.Spec().Describe(),
            "trace(trace) -> timeout(timeout) -> loadbalancer(heap-balancer) -> "
            "resurrector(resurrector) -> pool(singleton-pool) -> transport(fake-transport)");
}

TEST(ClientBuilderTest, BadEditsFailWhenBuilt) {
  TestBuilder b;
  b.RemoveRole("pool");  // fine so far: edits are only recorded
  b.ReplaceRole("nope", Named("x", "x"));
  ExpectInvalid([&] { b.Spec(); }, "ReplaceRole: no sink has role 'nope'");
  TestBuilder c;
  c.RemoveRole("transport");
  ExpectInvalid([&] { c.Spec(); }, "the bottom of the stack must be a transport");
}

TEST(ClientBuilderTest, WithSinkAddsAClientLevelSinkAboveTheBalancer) {
  TestBuilder d;
  d.WithSink(Named("tap", "tap"));
  EXPECT_EQ(d.Spec().Describe(),
            "timeout(timeout) -> tap(tap) -> loadbalancer(heap-balancer) -> pool(watermark-pool) -> "
            "transport(fake-transport)");
  TestBuilder e;
  e.RemoveRole("loadbalancer").RemoveRole("pool").WithSink(Named("tap", "tap"));
  EXPECT_EQ(e.Spec().Describe(), "timeout(timeout) -> tap(tap) -> transport(fake-transport)");
}

}  // namespace
}  // namespace scales
