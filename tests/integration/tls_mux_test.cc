// ThriftMux over TLS, both ways Finagle does it (issue 8), against the Mux reference server
// (tests/integration/mux_reference/, Python's ssl module, independent of our TLS and Mux code)
// with a throw-away CA (tests/support/test_ca.h):
//   - TLS from the first byte (the handshake comes before the Mux probe);
//   - opportunistic TLS negotiated in Tinit, every row of the outcome table of
//     ../shared/mux-protocol.md §1.7, the server's "tls-info" reply proving whether the bytes
//     were encrypted;
//   - the failures (off against required, required against a server that does not negotiate,
//     wrong CA, wrong host name, expired certificate, missing client certificate): each a
//     TLS failure naming the endpoint, quickly, and a log line with the reason (both TLS
//     levels, OpenSSL's verification result);
//   - mutual TLS, per-URI settings, and 64 concurrent calls on one TLS session.
#include <atomic>
#include <chrono>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "Echo.h"
#include "scales/stats/stats.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/log_capture.h"
#include "support/mux_server_fixture.h"
#include "support/test_ca.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;
using scales::testing::TestCa;
using test::LogCapture;
using test::MuxReferenceServer;
using Clock = std::chrono::steady_clock;

std::shared_ptr<Runtime> MakeRuntime() {
  RuntimeOptions o;
  o.threads = 1;
  return std::make_shared<Runtime>(o);
}

thriftmux::ThriftMuxOptions Options() {
  thriftmux::ThriftMuxOptions o;
  o.client.name = "tls-mux";
  o.client.runtime = MakeRuntime();
  o.client.timeout = 5s;
  o.resurrector.initial_backoff = 50ms;
  o.resurrector.max_backoff = 200ms;
  o.session.tls.ca_file = TestCa().ca_file;
  return o;
}

thriftmux::ThriftMuxOptions Opportunistic(mux::OpportunisticTls level) {
  auto o = Options();
  o.session.opportunistic_tls = level;
  return o;
}

thriftmux::ThriftMuxOptions FirstByte() {
  auto o = Options();
  o.session.tls.enabled = true;
  return o;
}

// A reference server in `mode` (first-byte, off, desired, required) with our CA's server
// certificate (or `cert`/`key`), plus `extra` arguments.
std::vector<std::string> ServerArgs(std::string_view mode, std::vector<std::string> extra = {},
                                    const std::string& cert = TestCa().server_cert,
                                    const std::string& key = TestCa().server_key) {
  std::vector<std::string> args = {"--mode", "finagle"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto tls = MuxReferenceServer::TlsArgs(mode, cert, key);
  args.insert(args.end(), tls.begin(), tls.end());
  return args;
}

std::string Call(const thrift::ThriftClient<EchoClient>& client, const std::string& arg) {
  std::string r;
  client->echo(r, arg);
  return r;
}

struct Failure {
  error_code code;
  std::string what;
  Clock::duration took{};
};

Failure CallFailure(const thrift::ThriftClient<EchoClient>& client, const std::string& arg) {
  const auto start = Clock::now();
  Failure f;
  try {
    std::string r;
    client->echo(r, arg);
    f.what = "the call succeeded: " + r;
  } catch (const Error& e) {
    f.code = e.scales_code();
    f.what = e.what();
  }
  f.took = Clock::now() - start;
  return f;
}

bool Encrypted(const std::string& tls_info) { return tls_info.starts_with("tls=TLSv1."); }

// --- TLS from the first byte ----------------------------------------------------------------------

TEST(TlsMuxTest, FirstByteTlsCarriesTheSession) {
  MuxReferenceServer server(ServerArgs("first-byte"));
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), FirstByte());
  EXPECT_EQ(Call(client, "hello"), "hello");
  const std::string info = Call(client, "tls-info");
  EXPECT_TRUE(Encrypted(info)) << info;
  EXPECT_NE(info.find("peer=none"), std::string::npos) << info;  // no client certificate
  // The Mux handshake ran inside TLS, and needed no upgrade.
  EXPECT_TRUE(server.WaitForLog({"recv Tinit"}));
  EXPECT_TRUE(server.LogLinesWith({"tls-upgraded"}).empty()) << server.Log();
}

// --- Opportunistic TLS: the outcome table -----------------------------------------------------

struct OutcomeCase {
  const char* client;
  const char* server;
  bool tls;
};

class TlsMuxOutcomeTest : public ::testing::TestWithParam<OutcomeCase> {};

TEST_P(TlsMuxOutcomeTest, FollowsTheOutcomeTable) {
  const OutcomeCase c = GetParam();
  MuxReferenceServer server(ServerArgs(c.server));
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Opportunistic(*mux::ParseOpportunisticTls(c.client)));
  EXPECT_EQ(Call(client, "hello"), "hello");
  const std::string info = Call(client, "tls-info");
  EXPECT_EQ(Encrypted(info), c.tls) << info;
  if (!c.tls) {
    EXPECT_EQ(info, "tls=none");
  }
  EXPECT_TRUE(server.WaitForLog({"send Rinit", std::string("client-tls=") + c.client,
                                 c.tls ? "outcome=tls" : "outcome=plaintext"}))
      << server.Log();
  EXPECT_EQ(log.Has({"TLS negotiated", server.endpoint()}), c.tls) << log.All();
  EXPECT_EQ(Call(client, "after"), "after");
}

INSTANTIATE_TEST_SUITE_P(Table, TlsMuxOutcomeTest,
                         ::testing::Values(OutcomeCase{"desired", "desired", true},
                                           OutcomeCase{"desired", "required", true},
                                           OutcomeCase{"required", "desired", true},
                                           OutcomeCase{"required", "required", true},
                                           OutcomeCase{"off", "desired", false},
                                           OutcomeCase{"desired", "off", false}),
                         [](const auto& info) {
                           return std::string(info.param.client) + "_" + info.param.server;
                         });

// --- Failures -----------------------------------------------------------------------------------

// The call fails with kTlsFailed, or, when the endpoint was already marked down by the
// client's open (the resurrector fails fast), kFailedFast naming the TLS failure.
void ExpectTlsFailure(const Failure& f, const MuxReferenceServer& server) {
  // With TLS 1.3 a server refusing our (missing) client certificate may reset the connection
  // after the handshake; the reason then names the certificate rather than "TLS".
  const bool names_tls = f.what.find("TLS") != std::string::npos || f.what.find("certificate") != std::string::npos;
  EXPECT_TRUE(f.code == Errc::kTlsFailed || (f.code == Errc::kFailedFast && names_tls))
      << ErrorName(f.code) << ": " << f.what;
  EXPECT_NE(f.what.find(server.endpoint()), std::string::npos) << f.what;
  EXPECT_LT(f.took, 3s) << f.what;  // no hang: well before the 5 s call timeout
}

// A TLS session whose connection ends mid-handshake with no alert, after the server had spoken
// over TLS (it answered the probe), was cut, not refused: it fails as a plain connection closed
// during the handshake does (retryable: no request was sent), not with kTlsFailed, which no
// retry repeats. It was kTlsFailed: "the peer closed the connection (stream truncated; is it
// speaking TLS?)", so a network cut during a handshake failed the call for good.
TEST(TlsMuxTest, AConnectionEndedMidHandshakeAfterTheServerSpokeIsNotATlsFailure) {
  MuxReferenceServer server(ServerArgs("first-byte", {"--hang-up-on-tinit"}));
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), FirstByte());
  const Failure f = CallFailure(client, "hello");
  EXPECT_NE(f.code, Errc::kTlsFailed) << f.what;
  EXPECT_TRUE(server.WaitForLog({"close hang-up-on-tinit"})) << server.Log();
  EXPECT_TRUE(
      log.Has({server.endpoint(), "failed to open",
               "during the Mux handshake: Tinit was still unanswered", "[connection_closed]"}))
      << log.All();
  EXPECT_FALSE(log.Has({"[tls_failed]"})) << log.All();
}

// The same on an open session (no handshake: it opens with TLS) that had read nothing over TLS
// when the server hung up on a request: the request fails as on a plain connection closed under
// it (kConnectionClosed; an idempotent call would be retried), and the detail asks whether the
// server refused our certificate. It was kTlsFailed, for every request on the session.
TEST(TlsMuxTest, AConnectionEndedBeforeTheServerSpokeOverTlsIsAClosedConnection) {
  MuxReferenceServer server(ServerArgs("first-byte"));
  auto o = FirstByte();
  o.session.handshake = false;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
  const Failure f = CallFailure(client, "hang-up");
  EXPECT_EQ(f.code, Errc::kConnectionClosed) << ErrorName(f.code) << ": " << f.what;
  EXPECT_NE(f.what.find("before it sent anything over TLS (did it refuse our certificate?)"),
            std::string::npos)
      << f.what;
  EXPECT_TRUE(server.WaitForLog({"close hang-up"})) << server.Log();
}

TEST(TlsMuxTest, RequiredAgainstOffFails) {
  MuxReferenceServer server(ServerArgs("off"));
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Opportunistic(mux::OpportunisticTls::kRequired));
  ExpectTlsFailure(CallFailure(client, "hello"), server);
  EXPECT_TRUE(log.Has({server.endpoint(), "opportunistic_tls=required", "the server tls=off"})) << log.All();
}

TEST(TlsMuxTest, OffAgainstRequiredFails) {
  MuxReferenceServer server(ServerArgs("required"));
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), Options());  // off
  ExpectTlsFailure(CallFailure(client, "hello"), server);
  EXPECT_TRUE(log.Has({server.endpoint(), "opportunistic_tls=off", "the server tls=required"})) << log.All();
  // The server answered with its level and closed: nothing was dispatched.
  EXPECT_TRUE(server.WaitForLog({"outcome=incompatible"})) << server.Log();
  EXPECT_TRUE(server.LogLinesWith({"recv Tdispatch"}).empty()) << server.Log();
}

TEST(TlsMuxTest, RequiredAgainstAServerThatDoesNotNegotiateFails) {
  MuxReferenceServer server({"--mode", "old"});  // answers the probe with Rerr: no Tinit, no TLS
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Opportunistic(mux::OpportunisticTls::kRequired));
  ExpectTlsFailure(CallFailure(client, "hello"), server);
  EXPECT_TRUE(log.Has({server.endpoint(), "did not echo the handshake probe", "opportunistic_tls=required"}))
      << log.All();
  EXPECT_TRUE(server.LogLinesWith({"recv Tdispatch"}).empty()) << server.Log();
}

TEST(TlsMuxTest, DesiredAgainstAServerThatDoesNotNegotiateIsPlaintext) {
  MuxReferenceServer server({"--mode", "old"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Opportunistic(mux::OpportunisticTls::kDesired));
  EXPECT_EQ(Call(client, "tls-info"), "tls=none");
}

TEST(TlsMuxTest, WrongCaFailsVerification) {
  {
    MuxReferenceServer server(ServerArgs("first-byte"));
    LogCapture log;
    auto o = FirstByte();
    o.session.tls.ca_file = TestCa().other_ca_file;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    ExpectTlsFailure(CallFailure(client, "hello"), server);
    EXPECT_TRUE(log.Has({server.endpoint(), "certificate verify failed"})) << log.All();
  }
  {
    MuxReferenceServer server(ServerArgs("desired"));
    LogCapture log;
    auto o = Opportunistic(mux::OpportunisticTls::kDesired);
    o.session.tls.ca_file = TestCa().other_ca_file;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    ExpectTlsFailure(CallFailure(client, "hello"), server);
    EXPECT_TRUE(log.Has({server.endpoint(), "certificate verify failed", "this client desired, the server desired"}))
        << log.All();
  }
}

TEST(TlsMuxTest, WrongHostNameFailsVerification) {
  MuxReferenceServer server(ServerArgs("desired", {}, TestCa().wrong_host_cert, TestCa().wrong_host_key));
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Opportunistic(mux::OpportunisticTls::kRequired));
  ExpectTlsFailure(CallFailure(client, "hello"), server);
  EXPECT_TRUE(log.Has({server.endpoint(), "certificate verify failed"})) << log.All();
  // The same certificate is fine for a client that expects that name.
  auto o = Opportunistic(mux::OpportunisticTls::kRequired);
  o.session.tls.server_name = "wrong.example";
  auto named = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
  EXPECT_TRUE(Encrypted(Call(named, "tls-info")));
}

TEST(TlsMuxTest, ExpiredCertificateFailsVerification) {
  MuxReferenceServer server(ServerArgs("first-byte", {}, TestCa().expired_cert, TestCa().expired_key));
  LogCapture log;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), FirstByte());
  ExpectTlsFailure(CallFailure(client, "hello"), server);
  EXPECT_TRUE(log.Has({server.endpoint(), "expired"})) << log.All();
}

// --- Mutual TLS ---------------------------------------------------------------------------------

TEST(TlsMuxTest, MutualTlsPresentsTheClientCertificate) {
  for (const char* mode : {"first-byte", "required"}) {
    SCOPED_TRACE(mode);
    auto args = ServerArgs(mode);
    args.push_back("--tls-client-ca");
    args.push_back(TestCa().ca_file);
    MuxReferenceServer server(args);
    auto o = std::string_view(mode) == "first-byte" ? FirstByte() : Opportunistic(mux::OpportunisticTls::kRequired);
    o.session.tls.cert_file = TestCa().client_cert;
    o.session.tls.key_file = TestCa().client_key;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    const std::string info = Call(client, "tls-info");
    EXPECT_TRUE(Encrypted(info)) << info;
    EXPECT_NE(info.find("peer=scales-test-client"), std::string::npos) << info;
    // Without a client certificate the server refuses the handshake.
    auto anonymous = ThriftMux::NewClient<EchoClient>(
        "tcp://" + server.endpoint(),
        std::string_view(mode) == "first-byte" ? FirstByte() : Opportunistic(mux::OpportunisticTls::kRequired));
    ExpectTlsFailure(CallFailure(anonymous, "hello"), server);
  }
}

// --- One session, many calls ------------------------------------------------------------------

TEST(TlsMuxTest, SixtyFourConcurrentCallsOnOneTlsSessionCompleteOnce) {
  MuxReferenceServer server(ServerArgs("desired"));
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(),
                                                 Opportunistic(mux::OpportunisticTls::kDesired));
  ASSERT_TRUE(Encrypted(Call(client, "tls-info")));
  constexpr int kCalls = 64;
  std::vector<std::atomic<int>> completions(kCalls);
  std::vector<std::string> replies(kCalls);
  std::atomic<int> done{0};
  for (int i = 0; i < kCalls; ++i) {
    // Every other call waits a little so replies come back out of order.
    std::string arg = i % 2 ? "m" + std::to_string(i) : std::string("tls-info");
    SCALES_THRIFT_CALL(client, echo, arg, [&, i](std::exception_ptr e, std::string r) {
      replies[i] = e ? std::string("error") : std::move(r);
      completions[i].fetch_add(1);
      done.fetch_add(1);
    });
  }
  const auto until = Clock::now() + 10s;
  while (done.load() < kCalls && Clock::now() < until) std::this_thread::sleep_for(5ms);
  std::this_thread::sleep_for(50ms);  // a second completion would show up by now
  for (int i = 0; i < kCalls; ++i) {
    EXPECT_EQ(completions[i].load(), 1) << i;
    if (i % 2) {
      EXPECT_EQ(replies[i], "m" + std::to_string(i));
    } else {
      EXPECT_TRUE(Encrypted(replies[i])) << replies[i];
    }
  }
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty()) << "one session carried every call";
  EXPECT_EQ(server.LogLinesWith({"tls-upgraded"}).size(), 1u) << server.Log();
}

// --- Drain over TLS --------------------------------------------------------------------------------
// Over TLS the session's writes go through OpenSSL and its close sends close_notify and discards
// what is unread: the Rdrain must still reach the server before the connection ends, both for TLS
// from the first byte and for TLS upgraded after Rinit.

// The two ways a session gets TLS, with the server and the client options for each.
struct TlsWay {
  const char* server_mode;
  thriftmux::ThriftMuxOptions (*options)();
};
const TlsWay kTlsWays[] = {{"first-byte", [] { return FirstByte(); }},
                           {"desired", [] { return Opportunistic(mux::OpportunisticTls::kDesired); }}};

int64_t CounterSum(const stats::StatsRegistry& registry, std::string_view name) {
  int64_t sum = 0;
  for (const auto& m : registry.Snapshot()) {
    if (m.name == name) sum += m.value;
  }
  return sum;
}

// The server got the Rdrain on connection `conn` ("conn=1") before the connection ended as `how`
// says ("close drained": the server closed it, "close eof": the client's clean close): not a
// reset, a TLS error or an end before the Rdrain.
void ExpectDrainedCleanly(const MuxReferenceServer& server, const std::string& conn,
                          const std::string& how = "close drained") {
  EXPECT_TRUE(server.WaitForLog({conn + " close"})) << server.Log();
  const auto lines = server.LogLines();
  int rdrain = -1;
  int close = -1;
  for (int i = 0; i < static_cast<int>(lines.size()); ++i) {
    if (!lines[i].starts_with(conn + " ")) continue;
    if (rdrain < 0 && lines[i].find(" recv Rdrain") != std::string::npos) rdrain = i;
    if (close < 0 && lines[i].find(" close ") != std::string::npos) close = i;
  }
  ASSERT_GE(close, 0) << server.Log();
  EXPECT_NE(lines[close].find(how), std::string::npos) << lines[close] << "\n" << server.Log();
  EXPECT_TRUE(rdrain >= 0 && rdrain < close) << "no Rdrain before the close\n" << server.Log();
  EXPECT_TRUE(server.LogLinesWith({conn + " ", "tls-error"}).empty()) << server.Log();
}

TEST(TlsMuxTest, ADrainOverTlsDeliversTheRdrainAndTheNextCallOpensANewResumedTlsSession) {
  for (const TlsWay& way : kTlsWays) {
    SCOPED_TRACE(way.server_mode);
    MuxReferenceServer server(ServerArgs(way.server_mode));
    stats::StatsRegistry registry;  // outlives the client's runtime
    auto o = way.options();
    o.client.stats = &registry;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    const std::string first = Call(client, "tls-info");
    ASSERT_TRUE(Encrypted(first)) << first;
    EXPECT_NE(first.find("reused=no"), std::string::npos) << first;
    EXPECT_EQ(Call(client, "drain"), "drain");
    ExpectDrainedCleanly(server, "conn=1");
    // The next call goes over a new session, encrypted too; its handshake resumed the TLS
    // session the first one got (a TLS 1.3 ticket), as the server and the client both see.
    const std::string info = Call(client, "tls-info");
    EXPECT_TRUE(Encrypted(info)) << info;
    EXPECT_NE(info.find("reused=yes"), std::string::npos) << info;
    EXPECT_EQ(server.LogLinesWith({"conn=2 recv Tdispatch", "arg=tls-info"}).size(), 1u) << server.Log();
    EXPECT_EQ(CounterSum(registry, "scales_mux_drains"), 1);
    EXPECT_EQ(CounterSum(registry, "scales_tls_resumptions"), 1);
  }
}

// "drain-stalled": the server stops reading, replies and sends Tdrain 300 ms later and reads again
// at 900 ms, so the calls written meanwhile and the Rdrain wait in the socket (the server Nacks
// those calls: they are retried on a new session). "drain-ping-burst": Tdrain, 64 Tping and the
// reply in one write. Every call completes once, and each drained connection closes cleanly.
TEST(TlsMuxTest, StalledAndPingBurstDrainsOverTlsCompleteEveryCallOnce) {
  for (const TlsWay& way : kTlsWays) {
    SCOPED_TRACE(way.server_mode);
    MuxReferenceServer server(ServerArgs(way.server_mode));
    // Before the client: a call still out when a check fails completes (kClientClosed) into them
    // when the client goes.
    constexpr int kCalls = 5;  // [0]: the stall; [1..4] written while the server does not read
    std::vector<std::atomic<int>> completions(kCalls);
    std::vector<std::string> replies(kCalls);
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), way.options());
    ASSERT_TRUE(Encrypted(Call(client, "tls-info")));
    const std::string stall = "drain-stalled:300:900";
    auto call = [&](int i, const std::string& arg) {
      SCALES_THRIFT_CALL(client, echo, arg, [&, i](std::exception_ptr e, std::string r) {
        replies[i] = e ? std::string("error") : std::move(r);
        completions[i].fetch_add(1);
      });
    };
    call(0, stall);
    ASSERT_TRUE(server.WaitForLog({"conn=1 stall tag="})) << server.Log();
    for (int i = 1; i < kCalls; ++i) call(i, "s" + std::to_string(i));
    auto all_done = [&] {
      for (auto& c : completions) {
        if (c.load() == 0) return false;
      }
      return true;
    };
    const auto until = Clock::now() + 5s;
    while (!all_done() && Clock::now() < until) std::this_thread::sleep_for(5ms);
    ExpectDrainedCleanly(server, "conn=1");
    EXPECT_EQ(Call(client, "drain-ping-burst:64"), "drain-ping-burst:64");
    const auto burst = server.LogLinesWith({"recv Tdispatch", "arg=drain-ping-burst:64"});
    ASSERT_EQ(burst.size(), 1u) << server.Log();
    const std::string conn = burst[0].substr(0, burst[0].find(' '));  // "conn=N"
    EXPECT_NE(conn, "conn=1") << "the drained session took a new call\n" << server.Log();
    // This server does not close on the Rdrain of a ping burst: the client closes once it has
    // the reply and its Rpings are written.
    ExpectDrainedCleanly(server, conn, "close eof");
    EXPECT_EQ(server.LogLinesWith({conn + " recv Rping"}).size(), 64u) << server.Log();
    std::this_thread::sleep_for(50ms);  // a second completion would show up by now
    for (int i = 0; i < kCalls; ++i) {
      EXPECT_EQ(completions[i].load(), 1) << i;
      EXPECT_EQ(replies[i], i == 0 ? stall : "s" + std::to_string(i)) << i;
    }
  }
}

// 16 concurrent calls on one TLS session, one of them "drain": the Tdrain comes while the others
// (sleep calls answered over 300 ms) are in flight. The session finishes them before it closes;
// any sent after the Tdrain came go to a new session. Each completes once, with its reply.
TEST(TlsMuxTest, CallsInFlightWhenTheTdrainComesOverTlsAllCompleteOnce) {
  for (const TlsWay& way : kTlsWays) {
    SCOPED_TRACE(way.server_mode);
    MuxReferenceServer server(ServerArgs(way.server_mode));
    stats::StatsRegistry registry;  // outlives the client's runtime
    // Before the client: a call still out when a check fails completes (kClientClosed) into them
    // when the client goes.
    constexpr int kCalls = 16;
    constexpr int kDrain = 8;
    std::vector<std::atomic<int>> completions(kCalls);
    std::vector<std::string> replies(kCalls);
    std::vector<std::string> expected(kCalls);
    std::atomic<int> done{0};
    auto o = way.options();
    o.client.stats = &registry;
    auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
    ASSERT_TRUE(Encrypted(Call(client, "tls-info")));
    for (int i = 0; i < kCalls; ++i) {
      auto handler = [&, i](std::exception_ptr e, std::string r) {
        replies[i] = e ? std::string("error") : std::move(r);
        completions[i].fetch_add(1);
        done.fetch_add(1);
      };
      if (i == kDrain) {
        expected[i] = "drain";
        SCALES_THRIFT_CALL(client, echo, std::string("drain"), handler);
      } else {
        const int ms = 100 + 20 * i;
        expected[i] = std::to_string(ms);
        SCALES_THRIFT_CALL(client, sleep, ms, handler);
      }
    }
    const auto until = Clock::now() + 5s;
    while (done.load() < kCalls && Clock::now() < until) std::this_thread::sleep_for(5ms);
    std::this_thread::sleep_for(50ms);  // a second completion would show up by now
    for (int i = 0; i < kCalls; ++i) {
      EXPECT_EQ(completions[i].load(), 1) << i;
      EXPECT_EQ(replies[i], expected[i]) << i;
    }
    ExpectDrainedCleanly(server, "conn=1");
    // The calls in flight at the Tdrain were answered on the drained session, not retried.
    EXPECT_GE(server.LogLinesWith({"conn=1 send Rdispatch"}).size(), static_cast<size_t>(kDrain + 2)) << server.Log();
    EXPECT_EQ(CounterSum(registry, "scales_mux_drains"), 1);
  }
}

// --- Per-URI settings and validation ------------------------------------------------------------

TEST(TlsMuxTest, UriQuerySetsTls) {
  MuxReferenceServer opportunistic(ServerArgs("required"));
  auto plain = Options();
  plain.session.tls.ca_file.clear();  // the URI gives it
  auto client = ThriftMux::NewClient<EchoClient>(
      "tcp://" + opportunistic.endpoint() + "?opportunistic_tls=desired&tls_ca_file=" + TestCa().ca_file, plain);
  EXPECT_TRUE(Encrypted(Call(client, "tls-info")));

  MuxReferenceServer first_byte(ServerArgs("first-byte"));
  auto direct = ThriftMux::NewClient<EchoClient>(
      "tcp://" + first_byte.endpoint() + "?tls=on&tls_ca_file=" + TestCa().ca_file, plain);
  EXPECT_TRUE(Encrypted(Call(direct, "tls-info")));

  try {
    ThriftMux::NewClient<EchoClient>("tcp://" + opportunistic.endpoint() + "?opportunistic_tls=maybe", plain);
    ADD_FAILURE() << "a bad opportunistic_tls was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kBadUri) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("opportunistic_tls='maybe'"), std::string_view::npos) << e.what();
  }
}

// https:// means TLS from the first byte for ThriftMux too, as for the HTTP and Thrift clients:
// against a plaintext server the call fails as a TLS failure instead of going out in clear.
TEST(TlsMuxTest, AnHttpsUriIsTlsFromTheFirstByte) {
  auto plain = Options();
  plain.session.tls.ca_file.clear();  // the URI gives it
  MuxReferenceServer first_byte(ServerArgs("first-byte"));
  auto direct = ThriftMux::NewClient<EchoClient>(
      "HTTPS://" + first_byte.endpoint() + "?tls_ca_file=" + TestCa().ca_file, plain);
  EXPECT_TRUE(Encrypted(Call(direct, "tls-info")));

  // A plaintext Mux server takes the ClientHello for the start of a frame and waits for the rest.
  MuxReferenceServer off(ServerArgs("off"));
  plain.session.connect_timeout = 300ms;
  auto client = ThriftMux::NewClient<EchoClient>("https://" + off.endpoint() + "?tls_ca_file=" + TestCa().ca_file, plain);
  Failure f = CallFailure(client, "hello");
  EXPECT_NE(f.what.find("TLS handshake with " + off.endpoint() + " did not finish"), std::string::npos) << f.what;
  EXPECT_TRUE(off.LogLinesWith({"recv Tinit"}).empty()) << off.Log();

  try {
    ThriftMux::NewClient<EchoClient>("https://" + off.endpoint() + "?tls=off", plain);
    ADD_FAILURE() << "https:// with tls=off was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kBadUri) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("tls=off contradicts the https:// scheme"), std::string_view::npos)
        << e.what();
  }
}

TEST(TlsMuxTest, ApplyUriOptionsKeepsDiscoveryKeys) {
  thriftmux::ThriftMuxOptions o;
  o.client.uri = "zk://127.0.0.1:2181/svc?chroot=/x&opportunistic_tls=required&tls_server_name=svc.example#ep";
  thriftmux::ApplyUriOptions(o);
  EXPECT_EQ(o.client.uri, "zk://127.0.0.1:2181/svc?chroot=/x#ep");
  EXPECT_EQ(o.session.opportunistic_tls, mux::OpportunisticTls::kRequired);
  EXPECT_EQ(o.session.tls.server_name, "svc.example");
  o.client.uri = "tcp://127.0.0.1:1?tls_verify=off";
  thriftmux::ApplyUriOptions(o);
  EXPECT_EQ(o.client.uri, "tcp://127.0.0.1:1");
  EXPECT_FALSE(o.session.tls.verify_peer);
  // With neither TLS nor opportunistic TLS on, a tls_* key would be ignored (clear text).
  thriftmux::ThriftMuxOptions plain;
  plain.client.uri = "tcp://127.0.0.1:1?tls_ca_file=/ca.pem";
  try {
    thriftmux::ApplyUriOptions(plain);
    ADD_FAILURE() << "tls_ca_file with TLS off was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kBadUri);
    EXPECT_NE(std::string(e.what()).find("tls_ca_file='/ca.pem' has no effect: TLS is off (add tls=on, "
                                         "opportunistic_tls=desired|required, or use https://)"),
              std::string::npos)
        << e.what();
  }
  plain.client.uri = "tcp://127.0.0.1:1?tls=off&tls_ca_file=/ca.pem";
  thriftmux::ApplyUriOptions(plain);
  EXPECT_EQ(plain.session.tls.ca_file, "/ca.pem");
  // Values are percent-decoded, as the URI parser decodes the other clients' (uri.h).
  plain.client.uri = "tcp://127.0.0.1:1?tls=on&tls_ca_file=/ca%20dir/c%26a.pem&tls_server_name=svc.example";
  thriftmux::ApplyUriOptions(plain);
  EXPECT_EQ(plain.session.tls.ca_file, "/ca dir/c&a.pem");
  plain.client.uri = "tcp://127.0.0.1:1?tls=on&tls_ca_file=/ca%G1.pem";
  try {
    thriftmux::ApplyUriOptions(plain);
    ADD_FAILURE() << "a malformed percent-escape was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kBadUri);
    EXPECT_NE(std::string(e.what()).find("query parameter 'tls_ca_file' has a malformed percent-escape"),
              std::string::npos)
        << e.what();
  }
}

// The TLS files are loaded when the client is built, as for HTTP and Thrift: a file that cannot
// be read fails the build naming the option, for first-byte and opportunistic TLS alike (it used
// to fail each call later, as an endpoint marked down).
TEST(TlsMuxTest, AnUnreadableTlsFileFailsTheBuild) {
  MuxReferenceServer server(ServerArgs("first-byte"));
  for (auto o : {FirstByte(), Opportunistic(mux::OpportunisticTls::kRequired)}) {
    o.session.tls.ca_file = "/nonexistent/ca.pem";
    try {
      ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), o);
      ADD_FAILURE() << "built";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
      EXPECT_NE(std::string_view(e.what()).find("tls.ca_file '/nonexistent/ca.pem' cannot be read"),
                std::string_view::npos)
          << e.what();
    }
  }
}

TEST(TlsMuxTest, InconsistentOptionsAreRejected) {
  auto expect_invalid = [](thriftmux::ThriftMuxOptions o, std::string_view names) {
    try {
      thriftmux::Validate(o);
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kInvalidArgument) << e.what();
      EXPECT_NE(std::string_view(e.what()).find(names), std::string_view::npos) << e.what();
    }
  };
  auto o = Opportunistic(mux::OpportunisticTls::kDesired);
  o.session.handshake = false;
  expect_invalid(o, "needs session.handshake");
  o = Opportunistic(mux::OpportunisticTls::kRequired);
  o.session.tls.enabled = true;
  expect_invalid(o, "exclude each other");
  o = Options();
  o.session.max_queued_control_replies = 0;
  expect_invalid(o, "session.max_queued_control_replies");
  o = Options();
  o.session.write_splits = 0;
  expect_invalid(o, "session.write_splits");
}

}  // namespace
}  // namespace scales
