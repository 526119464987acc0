// TLS against real servers on 127.0.0.1, with a throw-away CA made by the test
// (support/test_ca.h): nginx with TLS (HTTPS, mutual TLS), Apache Thrift's TSSLServerSocket
// (`scales testserver thrift --tls-cert ...`), and TcpConnection itself for the exact handshake
// failure reasons. Every call completes exactly once; failures are clear errors, never hangs.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/asio/write.hpp>

#include "Echo.h"
#include "scales/core/runtime.h"
#include "scales/http/client.h"
#include "scales/http/transport.h"
#include "scales/stats/stats.h"
#include "scales/thrift/thrift.h"
#include "scales/transport/tcp.h"
#include "scales/transport/tls.h"
#include "support/fault_proxy.h"
#include "support/fixtures.h"
#include "support/test_ca.h"
#include "support/thrown.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;
using scales::echo::EchoClient;
using test::NginxServer;
using test::NginxTls;
using test::Thrown;
using test::TestThriftServer;
using testing::TestCa;
using testing::TestCertificates;

std::shared_ptr<Runtime> MakeRuntime(size_t threads = 2) {
  RuntimeOptions o;
  o.threads = threads;
  return std::make_shared<Runtime>(o);
}

// HTTP or Thrift client options: a 10 s call timeout, a 2 s connect timeout, `tls`.
template <class Options>
Options ClientOpts(std::shared_ptr<Runtime> rt, TlsOptions tls) {
  Options o;
  o.client.name = "tls-it";
  o.client.runtime = std::move(rt);
  o.client.timeout = 10s;
  o.transport.connect_timeout = 2s;
  o.transport.tls = std::move(tls);
  return o;
}

http::HttpOptions HttpOpts(std::shared_ptr<Runtime> rt, TlsOptions tls) {
  return ClientOpts<http::HttpOptions>(std::move(rt), std::move(tls));
}

thrift::ThriftOptions ThriftOpts(std::shared_ptr<Runtime> rt, TlsOptions tls) {
  return ClientOpts<thrift::ThriftOptions>(std::move(rt), std::move(tls));
}

TlsOptions Trusting(std::string ca_file) {
  TlsOptions t;
  t.enabled = true;
  t.ca_file = std::move(ca_file);
  return t;
}

NginxTls ServerTls(const std::string& cert, const std::string& key, std::string client_ca = {}) {
  return NginxTls{cert, key, std::move(client_ca)};
}

// A connection failure as the caller sees it: `code` itself, or kFailedFast when the client's
// open already failed and the endpoint is marked down (the message then quotes the failure).
void ExpectConnectFailure(const Error& e, Errc code, const std::string& endpoint, const std::string& text) {
  EXPECT_TRUE(e.code() == code || e.code() == Errc::kFailedFast) << e.what();
  EXPECT_THAT(e.what(), HasSubstr(endpoint));
  EXPECT_THAT(e.what(), HasSubstr(text));
}

// One GET that must fail; returns the error (code and message). Fails the test if it succeeds
// or takes longer than `limit`.
Error FailingGet(const http::HttpClient& client, std::chrono::milliseconds limit = 5s) {
  auto start = std::chrono::steady_clock::now();
  try {
    auto r = client.Get("/");
    ADD_FAILURE() << "GET succeeded: " << r.status << " " << r.body;
  } catch (const Error& e) {
    EXPECT_LT(std::chrono::steady_clock::now() - start, limit) << e.what();
    return e;
  }
  return Error(make_error_code(Errc::kOk), "");
}

// ---- HTTPS against nginx ------------------------------------------------------------------

TEST(TlsHttpTest, HttpsGetByIpAndByHostName) {
  const auto& ca = TestCa();
  NginxServer nginx("tls", ServerTls(ca.server_cert, ca.server_key));
  auto rt = MakeRuntime();
  // https:// with the CA given in the options; the IP literal is checked against the IP SAN.
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(ca.ca_file)));
  auto r = client.Get("/");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "nginx tls\n");
  EXPECT_EQ(client.Get("/tls").body, "TLSv1.3");
  client.Close();

  // tcp:// with every TLS setting in the URI; "localhost" goes out as SNI and is checked
  // against the DNS SAN.
  auto by_name = Http::NewClient(
      "tcp://localhost:" + std::to_string(nginx.port()) + "?tls=on&tls_ca_file=" + ca.ca_file, HttpOpts(rt, {}));
  EXPECT_EQ(by_name.Get("/name").body, "tls");
  by_name.Close();
}

// The tests' nginx offers TLS 1.2 and 1.3 (NginxTls::protocols): they run TLS 1.3. A server that
// offers TLS 1.2 only (Debian 12's nginx by default) is called as well.
TEST(TlsHttpTest, ATls12OnlyServerIsCalled) {
  const auto& ca = TestCa();
  NginxTls tls = ServerTls(ca.server_cert, ca.server_key);
  tls.protocols = "TLSv1.2";
  NginxServer nginx("tls12", tls);
  auto rt = MakeRuntime();
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(ca.ca_file)));
  EXPECT_EQ(client.Get("/").body, "nginx tls12\n");
  EXPECT_EQ(client.Get("/tls").body, "TLSv1.2");
  client.Close();
}

// A new connection to an endpoint offers the TLS session the last handshake with it gave (a TLS
// 1.3 ticket, read after the handshake; a TLS 1.2 ticket), and nginx resumes it
// ($ssl_session_reused): no certificate exchange. With resume_sessions off every connection
// does a full handshake. Each GET asks nginx to close its connection, so the next is a new one.
// scales_tls_resumptions counts the resumed handshakes; a client that never resumes has none.
TEST(TlsHttpTest, ANewConnectionResumesTheLastTlsSession) {
  const auto& ca = TestCa();
  EXPECT_TRUE(TlsOptions{}.resume_sessions);  // the default
  for (const char* protocol : {"TLSv1.3", "TLSv1.2"}) {
    NginxTls tls = ServerTls(ca.server_cert, ca.server_key);
    tls.protocols = protocol;
    NginxServer nginx("resume", tls);
    for (const bool resume : {true, false}) {
      SCOPED_TRACE(fmt::format("{}, resume_sessions {}", protocol, resume));
      stats::StatsRegistry stats;  // outlives the client's runtime
      auto rt = MakeRuntime(1);
      TlsOptions client_tls = Trusting(ca.ca_file);
      client_tls.resume_sessions = resume;
      auto options = HttpOpts(rt, client_tls);
      options.client.stats = &stats;
      auto client = Http::NewClient("https://" + nginx.endpoint(), options);
      const std::string full = fmt::format("{} .", protocol);
      const std::string resumed = fmt::format("{} r", protocol);
      EXPECT_EQ(client.Get("/tls-reused", {{"Connection", "close"}}).body, full);
      for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(client.Get("/tls-reused", {{"Connection", "close"}}).body,
                  resume ? resumed : full)
            << i;
      }
      EXPECT_EQ(TlsSessionsKept(SharedTlsContext(client_tls)->native_handle()), resume ? 1u : 0u);
      const stats::Labels labels{{"client", "tls-it"}, {"endpoint", nginx.endpoint()}};
      const stats::Counter* resumptions = stats.FindCounter("scales_tls_resumptions", labels);
      ASSERT_EQ(resumptions != nullptr, resume);
      if (resume) {
        EXPECT_EQ(resumptions->value(), 3);
      }
      client.Close();
    }
  }
}

// Connections opened side by side on one loop and on two: once a session is kept, every new
// connection resumes one (only the client's open, one connection per loop, is full). A loop offers
// the sessions it received or parsed as its own objects; OpenSSL marks such an object not resumable
// when a connection that offered it ends in certain ways (concurrent TLS 1.3 connections ending
// with "Connection: close" do), which must not stop the next offer (the serialized copy is offered
// instead). The loop that did not receive the newest session parses it.
TEST(TlsHttpTest, ConcurrentNewConnectionsOnOneOrTwoLoopsAllResume) {
  const auto& ca = TestCa();
  for (const char* protocol : {"TLSv1.3", "TLSv1.2"}) {
    NginxTls tls = ServerTls(ca.server_cert, ca.server_key);
    tls.protocols = protocol;
    NginxServer nginx("resume-many", tls);
    for (const size_t loops : {1u, 2u}) {
      SCOPED_TRACE(fmt::format("{}, {} loop(s)", protocol, loops));
      stats::StatsRegistry stats;  // outlives the client's runtime
      auto rt = MakeRuntime(loops);
      auto options = HttpOpts(rt, Trusting(ca.ca_file));
      options.client.stats = &stats;
      auto client = Http::NewClient("https://" + nginx.endpoint(), options);
      // The client's open connects on each loop at once, before any session is kept; a TLS 1.3
      // ticket comes before the first reply.
      EXPECT_EQ(client.Get("/tls-reused", {{"Connection", "close"}}).body,
                fmt::format("{} .", protocol));
      constexpr int kCallers = 4;
      constexpr int kCallsEach = 40;
      std::atomic<int> resumed{0};
      std::atomic<int> completions{0};
      std::vector<std::thread> callers;
      for (int c = 0; c < kCallers; ++c) {
        callers.emplace_back([&] {
          for (int i = 0; i < kCallsEach; ++i) {
            try {
              const auto r = client.Get("/tls-reused", {{"Connection", "close"}});
              if (r.body == fmt::format("{} r", protocol)) resumed.fetch_add(1);
            } catch (const std::exception& e) {
              ADD_FAILURE() << e.what();
            }
            completions.fetch_add(1);
          }
        });
      }
      for (auto& t : callers) t.join();
      EXPECT_EQ(completions.load(), kCallers * kCallsEach);
      // Only a connection of the open on another loop may have been full (and used by a call).
      EXPECT_GE(resumed.load(), kCallers * kCallsEach - static_cast<int>(loops - 1));
      const stats::Labels labels{{"client", "tls-it"}, {"endpoint", nginx.endpoint()}};
      const stats::Counter* resumptions = stats.FindCounter("scales_tls_resumptions", labels);
      const stats::Counter* connects = stats.FindCounter("scales_connects", labels);
      ASSERT_NE(resumptions, nullptr);
      ASSERT_NE(connects, nullptr);
      EXPECT_GE(connects->value(), 1 + kCallers * kCallsEach);
      EXPECT_LE(connects->value() - resumptions->value(), static_cast<int64_t>(loops));
      client.Close();
    }
  }
}

TEST(TlsHttpTest, ManyConcurrentCallsEachCompleteOnce) {
  const auto& ca = TestCa();
  NginxServer nginx("many", ServerTls(ca.server_cert, ca.server_key));
  auto rt = MakeRuntime();
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(ca.ca_file)));
  constexpr int kCalls = 300;
  std::atomic<int> ok{0};
  std::atomic<int> completions{0};
  std::promise<void> all_done;
  for (int i = 0; i < kCalls; ++i) {
    client.AsyncGet("/name", [&](error_code ec, http::Response r) {
      if (!ec && r.status == 200 && r.body == "many") ok.fetch_add(1);
      if (completions.fetch_add(1) + 1 == kCalls) all_done.set_value();
    });
  }
  ASSERT_EQ(all_done.get_future().wait_for(30s), std::future_status::ready);
  EXPECT_EQ(ok.load(), kCalls);
  client.Close();
  EXPECT_EQ(completions.load(), kCalls);
}

// TLS 1.3 servers send session tickets after the handshake: the idle watch must not take them
// for a closed connection, so sequential calls share one connection.
TEST(TlsHttpTest, IdleConnectionIsReusedAndAServerCloseIsNoticed) {
  const auto& ca = TestCa();
  NginxServer nginx("idle", ServerTls(ca.server_cert, ca.server_key));
  auto rt = MakeRuntime(1);  // one loop: one connection
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(ca.ca_file)));
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(client.Get("/").status, 200);
    std::this_thread::sleep_for(50ms);  // idle: tickets (if any) arrive now
  }
  ASSERT_TRUE(nginx.WaitForAccessLogRequests(5));
  EXPECT_EQ(nginx.AccessLogConnectionCount(), 1) << nginx.AccessLog();

  // nginx restarts: the idle connection is closed by the server; the next call must not be
  // sent on it.
  nginx.Restart();
  std::this_thread::sleep_for(200ms);
  auto r = client.Get("/");
  EXPECT_EQ(r.status, 200);
  client.Close();
}

TEST(TlsHttpTest, MutualTls) {
  const auto& ca = TestCa();
  NginxServer nginx("mtls", ServerTls(ca.server_cert, ca.server_key, ca.ca_file));
  auto rt = MakeRuntime();
  TlsOptions with_cert = Trusting(ca.ca_file);
  with_cert.cert_file = ca.client_cert;
  with_cert.key_file = ca.client_key;
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, with_cert));
  auto r = client.Get("/client");
  EXPECT_EQ(r.status, 200);
  EXPECT_THAT(r.body, HasSubstr("CN=scales-test-client"));
  client.Close();

  // Without a client certificate nginx completes the handshake and answers 400.
  auto without = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(ca.ca_file)));
  Error e = FailingGet(without);
  EXPECT_EQ(e.code(), Errc::kHttpError) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("No required SSL certificate was sent"));
  EXPECT_THAT(e.what(), HasSubstr(nginx.endpoint()));
  without.Close();
}

struct BadCertCase {
  const char* name;
  std::string TestCertificates::*cert;
  std::string TestCertificates::*key;
  std::string TestCertificates::*trusted;
  const char* reason;  // OpenSSL's words, which reach the caller's error message
};

class TlsVerificationTest : public ::testing::TestWithParam<BadCertCase> {};

TEST_P(TlsVerificationTest, HttpsFailsWithTlsFailedNamingTheEndpoint) {
  const auto& ca = TestCa();
  const BadCertCase& c = GetParam();
  NginxServer nginx(c.name, ServerTls(ca.*c.cert, ca.*c.key));
  auto rt = MakeRuntime();
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(ca.*c.trusted)));
  Error e = FailingGet(client);
  ExpectConnectFailure(e, Errc::kTlsFailed, nginx.endpoint(), "TLS handshake");
  EXPECT_THAT(e.what(), HasSubstr(c.reason));
  client.Close();
}

INSTANTIATE_TEST_SUITE_P(
    BadCertificates, TlsVerificationTest,
    ::testing::Values(BadCertCase{"wrong_ca", &TestCertificates::server_cert, &TestCertificates::server_key,
                                  &TestCertificates::other_ca_file, "local issuer certificate"},
                      BadCertCase{"wrong_host", &TestCertificates::wrong_host_cert, &TestCertificates::wrong_host_key,
                                  &TestCertificates::ca_file, "IP address mismatch"},
                      BadCertCase{"expired", &TestCertificates::expired_cert, &TestCertificates::expired_key,
                                  &TestCertificates::ca_file, "certificate has expired"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(TlsHttpTest, VerifyOffOrTheRightServerNameAcceptTheWrongHostCertificate) {
  const auto& ca = TestCa();
  NginxServer nginx("wronghost", ServerTls(ca.wrong_host_cert, ca.wrong_host_key));
  auto rt = MakeRuntime();
  TlsOptions off;
  off.enabled = true;
  off.verify_peer = false;
  auto unverified = Http::NewClient("tcp://" + nginx.endpoint() + "?tls=on", HttpOpts(rt, off));
  EXPECT_EQ(unverified.Get("/").status, 200);
  unverified.Close();

  // tls_server_name: the name checked (and sent as SNI and Host) instead of the IP.
  auto named = Http::NewClient("https://" + nginx.endpoint() + "?tls_server_name=wrong.example",
                               HttpOpts(rt, Trusting(ca.ca_file)));
  EXPECT_EQ(named.Get("/").status, 200);
  named.Close();
}

// The URI's TLS keys reach the default transport only: a transport put in with ReplaceRole
// takes them through TlsOptionsForUri (docs/tls.md), and without them talks in clear text.
TEST(TlsHttpTest, AReplacedTransportTakesTheUrisTlsKeysThroughTlsOptionsForUri) {
  const auto& ca = TestCa();
  NginxServer nginx("replaced", ServerTls(ca.server_cert, ca.server_key));
  auto rt = MakeRuntime();
  const std::string uri = "https://" + nginx.endpoint() + "?tls_ca_file=" + ca.ca_file;
  http::TransportOptions transport;
  transport.tls = TlsOptionsForUri(uri, transport.tls);
  auto client = Http::NewBuilder(HttpOpts(rt, {}))
                    .SetUri(uri)
                    .ReplaceRole(roles::kTransport, http::HttpTransportProvider(transport))
                    .Build();
  EXPECT_EQ(client.Get("/").body, "nginx replaced\n");
  client.Close();
  auto clear = Http::NewBuilder(HttpOpts(rt, {}))
                   .SetUri(uri)
                   .ReplaceRole(roles::kTransport, http::HttpTransportProvider(http::TransportOptions{}))
                   .Build();
  EXPECT_THAT(FailingGet(clear).what(), HasSubstr("plain HTTP request was sent to HTTPS port"));
  clear.Close();
}

TEST(TlsHttpTest, PlainClientAgainstTlsServerFailsCleanly) {
  const auto& ca = TestCa();
  NginxServer nginx("plainclient", ServerTls(ca.server_cert, ca.server_key));
  auto rt = MakeRuntime();
  auto client = Http::NewClient("tcp://" + nginx.endpoint(), HttpOpts(rt, {}));
  Error e = FailingGet(client);
  // nginx answers a plain request on its TLS port with a plain 400.
  EXPECT_EQ(e.code(), Errc::kHttpError) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("plain HTTP request was sent to HTTPS port"));
  client.Close();
}

TEST(TlsHttpTest, TlsClientAgainstPlainServerFailsCleanly) {
  NginxServer nginx("plainserver");
  auto rt = MakeRuntime();
  auto client = Http::NewClient("https://" + nginx.endpoint(), HttpOpts(rt, Trusting(TestCa().ca_file)));
  Error e = FailingGet(client, 2s);
  ExpectConnectFailure(e, Errc::kTlsFailed, nginx.endpoint(), "TLS handshake");
  client.Close();
}

// A server that accepts TCP but never answers the ClientHello: the handshake is bounded by
// connect_timeout.
TEST(TlsHttpTest, SilentServerTimesOutWithinTheConnectTimeout) {
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::acceptor silent(ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  const auto port = silent.local_endpoint().port();  // listens, never accepts
  auto rt = MakeRuntime();
  auto opts = HttpOpts(rt, Trusting(TestCa().ca_file));
  opts.transport.connect_timeout = 300ms;
  auto client = Http::NewClient("https://127.0.0.1:" + std::to_string(port), opts);
  Error e = FailingGet(client, 3s);
  ExpectConnectFailure(e, Errc::kConnectTimeout, "127.0.0.1:" + std::to_string(port), "did not finish within connect_timeout (300 ms)");
  client.Close();
}

// The same bound on a plain TCP connect the server never completes (its accept queue is full,
// so the kernel drops the SYN): kConnectTimeout, naming the endpoint and the option to raise.
// Its detail used to say only "timed out after 300 ms", as a request deadline's does.
TEST(TcpConnectionTest, UnansweredConnectTimesOutNamingConnectTimeout) {
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::acceptor full(ioc);
  full.open(boost::asio::ip::tcp::v4());
  full.bind({boost::asio::ip::make_address("127.0.0.1"), 0});
  full.listen(0);  // a queue of one, never accepted from
  boost::asio::ip::tcp::socket filler(ioc);
  filler.connect(full.local_endpoint());
  const auto port = full.local_endpoint().port();
  auto rt = MakeRuntime();
  auto opts = HttpOpts(rt, {});
  opts.transport.connect_timeout = 300ms;
  auto client = Http::NewClient("tcp://127.0.0.1:" + std::to_string(port), opts);
  Error e = FailingGet(client, 3s);
  const std::string endpoint = "127.0.0.1:" + std::to_string(port);
  ExpectConnectFailure(e, Errc::kConnectTimeout, endpoint,
                       "connect to " + endpoint + " did not finish within connect_timeout (300 ms)");
  client.Close();
}

// ---- Options checked at client creation ----------------------------------------------------

TEST(TlsOptionsTest, BadFilesAndKeysFailAtClientCreation) {
  const auto& ca = TestCa();
  auto rt = MakeRuntime();
  const std::string missing = ca.dir + "/no-such-ca.pem";
  Error e = Thrown([&] { Http::NewClient("https://127.0.0.1:1", HttpOpts(rt, Trusting(missing))); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("tls.ca_file '" + missing + "' cannot be read"));
  // Like every error of a client, it names the client.
  EXPECT_THAT(e.what(), StartsWith("client tls-it: tls.ca_file")) << e.what();
  e = Thrown([&] { Http::NewClient("tcp://127.0.0.1:1?tls=on&tls_ca_file=" + ca.server_key, HttpOpts(rt, {})); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("tls.ca_file '" + ca.server_key + "' cannot be loaded"));
  e = Thrown([&] { Thrift::NewClient<EchoClient>("tcp://127.0.0.1:1?tls=yes", ThriftOpts(rt, {})); });
  EXPECT_EQ(e.code(), Errc::kBadUri) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("tls='yes'"));
  EXPECT_THAT(e.what(), StartsWith("client tls-it: ")) << e.what();
  e = Thrown([&] { Http::NewClient("tcp://127.0.0.1:1?tls_ca=x", HttpOpts(rt, {})); });
  EXPECT_EQ(e.code(), Errc::kBadUri) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("unknown URI option tls_ca='x'"));
  // TLS keys with TLS off would be ignored: the client would talk in clear text.
  e = Thrown([&] { Http::NewClient("tcp://127.0.0.1:1?tls_ca_file=" + ca.ca_file, HttpOpts(rt, {})); });
  EXPECT_EQ(e.code(), Errc::kBadUri) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("tls_ca_file='" + ca.ca_file + "' has no effect: TLS is off"));
  e = Thrown([&] { Thrift::NewClient<EchoClient>("tcp://127.0.0.1:1?tls_verify=off", ThriftOpts(rt, {})); });
  EXPECT_EQ(e.code(), Errc::kBadUri) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("tls_verify='off' has no effect: TLS is off"));
  // opportunistic_tls is ThriftMux's: a zk:// URI lets it through to the client (a tcp:// one
  // refuses it in the parser), where HTTP and Thrift ignored it and talked in clear text.
  for (const char* value : {"required", "desired"}) {
    const std::string uri = std::string("zk://127.0.0.1:1/svc?opportunistic_tls=") + value;
    e = Thrown([&] { Http::NewClient(uri, HttpOpts(rt, {})); });
    EXPECT_EQ(e.code(), Errc::kBadUri) << e.what();
    EXPECT_THAT(e.what(), HasSubstr("opportunistic_tls='" + std::string(value) + "' is a ThriftMux option"));
    e = Thrown([&] { Thrift::NewClient<EchoClient>(uri, ThriftOpts(rt, {})); });
    EXPECT_EQ(e.code(), Errc::kBadUri) << e.what();
    EXPECT_THAT(e.what(), HasSubstr("opportunistic_tls='" + std::string(value) + "' is a ThriftMux option"));
  }
  TlsOptions half = Trusting(ca.ca_file);
  half.cert_file = ca.client_cert;
  EXPECT_THROW(Http::NewClient("https://127.0.0.1:1", HttpOpts(rt, half)), Error);
  {
    // The client key, encrypted with a passphrase: OpenSSL's default would ask for it on the
    // terminal (blocking the build when there is one); scales refuses it and says why.
    const std::string encrypted = ca.dir + "/client-encrypted.key";
    std::FILE* in = std::fopen(ca.client_key.c_str(), "rb");
    ASSERT_NE(in, nullptr);
    EVP_PKEY* key = PEM_read_PrivateKey(in, nullptr, nullptr, nullptr);
    std::fclose(in);
    ASSERT_NE(key, nullptr);
    std::FILE* out = std::fopen(encrypted.c_str(), "wb");
    ASSERT_NE(out, nullptr);
    char pass[] = "secret";
    EXPECT_EQ(PEM_write_PrivateKey(out, key, EVP_aes_128_cbc(), reinterpret_cast<unsigned char*>(pass), 6, nullptr,
                                   nullptr),
              1);
    std::fclose(out);
    EVP_PKEY_free(key);
    TlsOptions locked = half;
    locked.key_file = encrypted;
    e = Thrown([&] { Http::NewClient("https://127.0.0.1:1", HttpOpts(rt, locked)); });
    EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
    EXPECT_THAT(e.what(), HasSubstr("tls.key_file '" + encrypted + "' is encrypted"));
  }
  half.key_file = ca.server_key;  // not the certificate's key
  e = Thrown([&] { Http::NewClient("https://127.0.0.1:1", HttpOpts(rt, half)); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
  EXPECT_THAT(e.what(), HasSubstr("does not match the certificate"));
}

// A rotated certificate (a new file renamed over the old, as cert-manager and certbot do) is
// read by the next client built; connections never look at the files, so one missing (mid
// rotation) fails none of them.
TEST(TlsOptionsTest, ARotatedCertificateIsReadByTheNextClient) {
  const auto& ca = TestCa();
  namespace fs = std::filesystem;
  const std::string cert = ca.dir + "/rotating.pem";
  const std::string key = ca.dir + "/rotating.key";
  auto install = [&](const std::string& from_cert, const std::string& from_key) {
    fs::copy_file(from_cert, cert + ".new", fs::copy_options::overwrite_existing);
    fs::copy_file(from_key, key + ".new", fs::copy_options::overwrite_existing);
    fs::rename(cert + ".new", cert);
    fs::rename(key + ".new", key);
  };
  auto subject = [](const std::shared_ptr<boost::asio::ssl::context>& ctx) {
    X509* leaf = SSL_CTX_get0_certificate(ctx->native_handle());
    char name[256] = {};
    X509_NAME_oneline(X509_get_subject_name(leaf), name, sizeof name);
    return std::string(name);
  };
  TlsOptions o = Trusting(ca.ca_file);
  o.cert_file = cert;
  o.key_file = key;
  install(ca.client_cert, ca.client_key);
  auto before = MakeTlsContext(o);
  EXPECT_EQ(MakeTlsContext(o), before) << "unchanged files share the context";
  EXPECT_EQ(SharedTlsContext(o), before) << "a connection's";
  install(ca.server_cert, ca.server_key);
  auto after = MakeTlsContext(o);
  EXPECT_NE(after, before);
  EXPECT_NE(subject(after), subject(before)) << subject(after);
  EXPECT_EQ(SharedTlsContext(o), after) << "connections use the latest one loaded";
  // Mid rotation: the key is gone. A new client fails; connections still get the context.
  std::filesystem::remove(key);
  EXPECT_THROW(MakeTlsContext(o), Error);
  EXPECT_EQ(SharedTlsContext(o), after);
  // The client built from the rotated files goes away while the one built before lives on: its
  // connections find its context again, and read no file (the key is still missing).
  after.reset();
  try {
    EXPECT_EQ(SharedTlsContext(o), before) << "a connection of the client built first";
  } catch (const Error& e) {
    ADD_FAILURE() << "a connection of a built client read the files: " << e.what();
  }
}

// ---- TcpConnection: the handshake failure reasons -------------------------------------------

// Connects once with `tls` to 127.0.0.1:port on a loop of its own; returns the error and
// failure_detail().
std::pair<error_code, std::string> Connect(int port, TlsOptions tls, Duration timeout = 2s) {
  boost::asio::io_context ioc;
  Runtime rt(ioc);
  stats::StatsRegistry registry;
  TcpConnection conn(rt.loop(0), Endpoint{"127.0.0.1", static_cast<uint16_t>(port)}, timeout,
                     stats::StatsScope(&registry, {}), std::move(tls));
  int completions = 0;
  error_code result;
  conn.AsyncConnect([&](error_code ec) {
    ++completions;
    result = ec;
  });
  ioc.run_for(5s);
  EXPECT_EQ(completions, 1);
  std::string detail = conn.failure_detail();
  if (!result) {
    EXPECT_TRUE(conn.tls_active() && conn.connected());
  }
  conn.Close();
  return {result, detail};
}

// Close() while the host name resolves: Asio cannot stop a getaddrinfo already running, and
// its result must not be connected to (a stray connection to a server just dropped; with TLS a
// handshake no timer bounds). The loop is the test's io_context: the resolution finishes on
// Asio's resolver thread while the test sleeps, its handler waits in the queue, Close() runs,
// then the handler.
TEST(TcpConnectionTest, CloseWhileResolvingDoesNotConnect) {
  boost::asio::io_context listener_ioc;
  boost::asio::ip::tcp::acceptor listener(listener_ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  listener.non_blocking(true);
  const auto port = listener.local_endpoint().port();
  boost::asio::io_context ioc;
  Runtime rt(ioc);
  stats::StatsRegistry registry;
  TcpConnection conn(rt.loop(0), Endpoint{"localhost", port}, 2s, stats::StatsScope(&registry, {}));
  int completions = 0;
  error_code result;
  conn.AsyncConnect([&](error_code ec) {
    ++completions;
    result = ec;
  });
  std::this_thread::sleep_for(300ms);  // /etc/hosts: far less (if not, the cancel stops it: still a pass)
  conn.Close();
  ioc.run_for(1s);
  EXPECT_EQ(completions, 1);
  EXPECT_TRUE(result) << "the connect succeeded after Close()";
  EXPECT_FALSE(conn.connected());
  boost::system::error_code ec;
  boost::asio::ip::tcp::socket accepted(listener_ioc);
  listener.accept(accepted, ec);
  EXPECT_EQ(ec, boost::asio::error::would_block) << "a connection reached the server after Close()";
}

// A TLS connect whose setup failed (the CA file went missing between the client's build and
// this connection) completes on a later turn; Close() before that turn makes it a connect cut
// short by Close(): operation_aborted, as tcp.h promises, and no connect error counted. It
// completed with kTlsFailed and counted a connect error, as if the endpoint had failed.
TEST(TcpConnectionTest, CloseBeforeAFailedTlsSetupCompletesAbortsTheConnect) {
  boost::asio::io_context listener_ioc;
  boost::asio::ip::tcp::acceptor listener(listener_ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  boost::asio::io_context ioc;
  Runtime rt(ioc);
  stats::StatsRegistry registry;
  TlsOptions tls;
  tls.enabled = true;
  tls.ca_file = "/nonexistent/scales-test-ca.pem";
  TcpConnection conn(rt.loop(0), Endpoint{"127.0.0.1", listener.local_endpoint().port()}, 2s,
                     stats::StatsScope(&registry, {}), tls);
  int completions = 0;
  error_code result;
  conn.AsyncConnect([&](error_code ec) {
    ++completions;
    result = ec;
  });
  EXPECT_EQ(completions, 0) << "never inline";
  conn.Close();
  ioc.run_for(1s);
  EXPECT_EQ(completions, 1);
  EXPECT_EQ(result, boost::asio::error::operation_aborted) << result.message() << ": " << conn.failure_detail();
  EXPECT_EQ(registry.FindCounter("scales_connect_errors", {})->value(), 0);
  EXPECT_FALSE(conn.connected());
}

// A connection that ends under the handshake (the network cuts it, or a server hangs up on the
// ClientHello: a FIN or a reset, no alert) failed to open: kConnectFailed, which a retry may
// repeat elsewhere, not kTlsFailed (TLS's verdict: an alert, a certificate refused). It was
// kTlsFailed, so an idempotent call whose attempt met a handshake cut short failed for good.
TEST(TlsConnectionTest, AHandshakeTheConnectionEndsUnderIsAConnectFailure) {
  const auto& ca = TestCa();
  NginxServer nginx("cut", ServerTls(ca.server_cert, ca.server_key));
  for (double reset : {0.0, 1.0}) {
    SCOPED_TRACE(reset > 0 ? "reset" : "FIN");
    test::FaultProxy proxy(nginx.port(), 7);
    test::FaultProxy::Faults faults;
    faults.cut = 1;
    faults.cut_within = 1;  // at the first byte, either way: the ClientHello or the server's answer
    faults.reset = reset;
    proxy.SetFaults(faults);
    auto [ec, detail] = Connect(proxy.port(), Trusting(ca.ca_file));
    EXPECT_EQ(ec, Errc::kConnectFailed) << ec.message() << ": " << detail;
    EXPECT_THAT(detail, HasSubstr("TLS handshake with " + proxy.endpoint() +
                                  " failed: the peer closed the connection ("));
    EXPECT_EQ(proxy.cuts(), 1);
  }
}

// A TLS record that fails its integrity check (a byte altered on the way) broke its connection,
// in the handshake too: a byte of the server's encrypted handshake records altered (byte 400,
// past the ServerHello and ChangeCipherSpec, in the certificate's record) fails our check
// (OpenSSL says "decryption failed or bad record mac", or its provider "cipher operation
// failed"), so the connect fails with kConnectFailed (retryable; the detail asks whether bytes
// were altered), not kTlsFailed, which says the endpoint's TLS set-up is wrong (an idempotent
// call failed for good). Our last handshake flight altered in its last byte (its last record's
// tag), the server refuses it with a bad_record_mac alert, which comes as the reply is read: a
// closed connection, as a record we rejected would be (it was kTlsFailed); or, when it comes
// before the request is written, a connection that broke unused (kNotSent). Once the bytes are
// clean, calls succeed.
TEST(TlsConnectionTest, AHandshakeRecordAlteredOnTheWayIsABrokenConnection) {
  const auto& ca = TestCa();
  NginxServer nginx("altered", ServerTls(ca.server_cert, ca.server_key));
  {
    test::FaultProxy proxy(nginx.port(), 7);
    test::FaultProxy::Faults faults;
    faults.corrupt_server_byte = 400;
    proxy.SetFaults(faults);
    auto [ec, detail] = Connect(proxy.port(), Trusting(ca.ca_file));
    EXPECT_EQ(ec, Errc::kConnectFailed) << ec.message() << ": " << detail;
    EXPECT_THAT(detail, ::testing::MatchesRegex(
                            "TLS handshake with " + proxy.endpoint() +
                            " failed: (decryption failed or bad record mac|cipher "
                            "operation failed) \\(were bytes altered on the way\\?\\)"));
    EXPECT_EQ(proxy.corruptions(), 1);
  }
  struct Way {
    const char* name;
    test::FaultProxy::Faults faults;
    Errc code;
    const char* text;
  };
  test::FaultProxy::Faults server_byte;
  server_byte.corrupt_server_byte = 400;
  test::FaultProxy::Faults client_flight;
  client_flight.corrupt_client_chunk_end = 2;  // after the ClientHello
  for (const Way& way :
       {Way{"server's flight", server_byte, Errc::kConnectFailed, "(were bytes altered"},
        Way{"client's flight", client_flight, Errc::kConnectionClosed,
            "alert bad record mac (were bytes altered"}}) {
    SCOPED_TRACE(way.name);
    test::FaultProxy proxy(nginx.port(), 7);
    proxy.SetFaults(way.faults);
    auto rt = MakeRuntime(1);
    auto o = HttpOpts(rt, Trusting(ca.ca_file));
    o.resurrector.initial_backoff = 50ms;
    o.resurrector.max_backoff = 100ms;
    auto client = Http::NewClient("https://" + proxy.endpoint(), o);
    Error e = FailingGet(client);
    if (way.code == Errc::kConnectionClosed && e.code() == Errc::kNotSent) {
      // The alert came before the request was written (a slower client: the sanitizer builds):
      // the connection broke before it was used, and the request was not sent.
      EXPECT_THAT(e.what(), HasSubstr("closed before the request was sent"));
    } else {
      ExpectConnectFailure(e, way.code, proxy.endpoint(), way.text);
    }
    EXPECT_NE(e.code(), Errc::kTlsFailed) << e.what();
    EXPECT_GE(proxy.corruptions(), 1);
    proxy.Calm();
    const auto give_up = std::chrono::steady_clock::now() + 5s;
    std::string last;
    for (;;) {
      try {
        EXPECT_EQ(client.Get("/").status, 200);
        break;
      } catch (const Error& again) {
        last = again.what();  // failing fast until the endpoint's next reconnect
      }
      ASSERT_LT(std::chrono::steady_clock::now(), give_up) << last;
      std::this_thread::sleep_for(20ms);
    }
    client.Close();
  }
}

TEST(TlsConnectionTest, HandshakeFailuresSayWhy) {
  const auto& ca = TestCa();
  NginxServer good("good", ServerTls(ca.server_cert, ca.server_key));
  NginxServer expired("expired", ServerTls(ca.expired_cert, ca.expired_key));
  NginxServer wrong("wrong", ServerTls(ca.wrong_host_cert, ca.wrong_host_key));
  NginxServer plain("plain");

  auto [ok, ok_detail] = Connect(good.port(), Trusting(ca.ca_file));
  EXPECT_FALSE(ok) << ok_detail;
  EXPECT_EQ(ok_detail, "");

  auto [e1, d1] = Connect(good.port(), Trusting(ca.other_ca_file));
  EXPECT_EQ(e1, Errc::kTlsFailed);
  EXPECT_THAT(d1, HasSubstr("TLS handshake with " + good.endpoint() + " failed: certificate verify failed ("));
  EXPECT_THAT(d1, HasSubstr("local issuer certificate"));

  auto [e2, d2] = Connect(expired.port(), Trusting(ca.ca_file));
  EXPECT_EQ(e2, Errc::kTlsFailed);
  EXPECT_THAT(d2, HasSubstr("TLS handshake with " + expired.endpoint() +
                            " failed: certificate verify failed (certificate has expired)"));

  auto [e3, d3] = Connect(wrong.port(), Trusting(ca.ca_file));
  EXPECT_EQ(e3, Errc::kTlsFailed);
  EXPECT_THAT(d3, HasSubstr("certificate verify failed (IP address mismatch)")) << d3;

  TlsOptions named = Trusting(ca.ca_file);
  named.server_name = "localhost";
  auto [e4, d4] = Connect(wrong.port(), named);
  EXPECT_EQ(e4, Errc::kTlsFailed);
  EXPECT_THAT(d4, HasSubstr("certificate verify failed (hostname mismatch)")) << d4;

  // An IPv6 literal with a zone is checked without it (OpenSSL refuses the zone, and took the
  // check away with it: the wrong host's certificate was accepted).
  TlsOptions zoned = Trusting(ca.ca_file);
  zoned.server_name = "::ffff:127.0.0.1%lo";
  auto [e6, d6] = Connect(wrong.port(), zoned);
  EXPECT_EQ(e6, Errc::kTlsFailed) << d6;
  EXPECT_THAT(d6, HasSubstr("certificate verify failed (IP address mismatch)")) << d6;

  auto [e5, d5] = Connect(plain.port(), Trusting(ca.ca_file));
  EXPECT_EQ(e5, Errc::kTlsFailed);
  EXPECT_THAT(d5, HasSubstr("TLS handshake with " + plain.endpoint() + " failed: "));
  EXPECT_THAT(d5, HasSubstr("is the server speaking TLS?")) << d5;
}

// An absolute host name ("localhost.", as a resolver search path or a Kubernetes FQDN writes
// it) names the same host: it verifies against the certificate's DNS:localhost. OpenSSL's
// host check compares it with the dot, so it failed with "hostname mismatch" (and the dot went
// into the SNI, where RFC 6066 has none).
TEST(TlsConnectionTest, AnAbsoluteHostNameWithItsTrailingDotVerifies) {
  const auto& ca = TestCa();
  NginxServer good("good", ServerTls(ca.server_cert, ca.server_key));
  NginxServer wrong("wrong", ServerTls(ca.wrong_host_cert, ca.wrong_host_key));
  TlsOptions named = Trusting(ca.ca_file);
  named.server_name = "localhost.";
  auto [ok, detail] = Connect(good.port(), named);
  EXPECT_FALSE(ok) << detail;
  // Still checked: the dot does not turn the check off.
  auto [e, d] = Connect(wrong.port(), named);
  EXPECT_EQ(e, Errc::kTlsFailed) << d;
  EXPECT_THAT(d, HasSubstr("certificate verify failed (hostname mismatch)")) << d;
}

// A TLS 1.2 server for one connection on a thread of the test, through memory BIOs: it sends
// its last handshake flight and the records `after` writes (application data nobody asked for,
// an alert) in one write, which the client reads together with the handshake; then it waits
// until the client closes, or with `hang_up` closes the TCP connection itself without a
// close_notify (as many servers end an idle keep-alive connection).
class OneFlightTlsServer {
 public:
  explicit OneFlightTlsServer(std::function<void(SSL*)> after, bool hang_up = false)
      : listener_(ioc_, {boost::asio::ip::make_address("127.0.0.1"), 0}),
        hang_up_(hang_up),
        thread_([this, after = std::move(after)] { Serve(after); }) {}
  ~OneFlightTlsServer() { thread_.join(); }
  uint16_t port() const { return listener_.local_endpoint().port(); }

 private:
  void Serve(const std::function<void(SSL*)>& after) {
    const auto& ca = TestCa();
    boost::asio::ip::tcp::socket s(ioc_);
    boost::system::error_code ec;
    listener_.accept(s, ec);
    if (ec) return;
    SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_use_certificate_chain_file(ctx, ca.server_cert.c_str());
    SSL_CTX_use_PrivateKey_file(ctx, ca.server_key.c_str(), SSL_FILETYPE_PEM);
    SSL* ssl = SSL_new(ctx);
    BIO* in = BIO_new(BIO_s_mem());
    BIO* out = BIO_new(BIO_s_mem());
    SSL_set_bio(ssl, in, out);
    SSL_set_accept_state(ssl);
    char buf[16384];
    auto flush = [&] {
      std::string pending;
      for (int n; (n = BIO_read(out, buf, sizeof buf)) > 0;) pending.append(buf, static_cast<size_t>(n));
      boost::asio::write(s, boost::asio::buffer(pending), ec);
    };
    while (!ec && SSL_do_handshake(ssl) != 1) {
      flush();
      const size_t n = s.read_some(boost::asio::buffer(buf), ec);
      BIO_write(in, buf, static_cast<int>(n));
    }
    if (!ec) {
      after(ssl);
      flush();  // the Finished and what `after` wrote: one write
      if (hang_up_) s.close(ec);  // a FIN with no close_notify before it
      while (!ec) s.read_some(boost::asio::buffer(buf), ec);
    }
    SSL_free(ssl);
    SSL_CTX_free(ctx);
  }

  boost::asio::io_context ioc_;
  boost::asio::ip::tcp::acceptor listener_;
  const bool hang_up_;
  std::thread thread_;
};

// Records that come with the server's last handshake flight are read from the socket with it
// and held by OpenSSL, where the idle watch (a wait on the socket) never sees them: bytes nobody
// asked for went unnoticed, and the first request would read them as (the start of) its reply.
TEST(TlsConnectionTest, TheIdleWatchSeesRecordsReadWithTheHandshake) {
  const auto& ca = TestCa();
  OneFlightTlsServer server([](SSL* ssl) { SSL_write(ssl, "HTTP/1.1 200 OK\r\n", 17); });
  boost::asio::io_context ioc;
  Runtime rt(ioc);
  stats::StatsRegistry registry;
  TcpConnection conn(rt.loop(0), Endpoint{"127.0.0.1", server.port()}, 2s, stats::StatsScope(&registry, {}),
                     Trusting(ca.ca_file));
  error_code connected = make_error_code(Errc::kConnectFailed);
  int watch_completions = 0;
  error_code watched;
  conn.AsyncConnect([&](error_code ec) {
    connected = ec;
    if (!ec) {
      conn.AsyncWatchIdle([&](error_code e) {
        ++watch_completions;
        watched = e;
      });
    }
  });
  for (int i = 0; i < 100 && watch_completions == 0; ++i) ioc.run_for(20ms);
  EXPECT_FALSE(connected) << conn.failure_detail();
  EXPECT_EQ(watch_completions, 1) << "the idle watch missed the bytes OpenSSL holds";
  EXPECT_EQ(watched, Errc::kProtocolError) << watched.message();
  conn.Close();
  ioc.run_for(100ms);
}

// A server that ends an idle TLS connection with a TCP FIN and no close_notify (nginx on its
// keep-alive timeout, many others) closed the connection: the idle watch must say so
// (kConnectionClosed), as a read of a reply does, not report a TLS failure. It reported
// kTlsFailed, "TLS error on the idle connection to ...: the peer closed the connection (stream
// truncated; is it speaking TLS?)", as the connection's fault and to any request that found it.
TEST(TlsConnectionTest, AnIdleConnectionClosedWithoutCloseNotifyIsAPlainClose) {
  const auto& ca = TestCa();
  OneFlightTlsServer server([](SSL*) {}, /*hang_up=*/true);
  boost::asio::io_context ioc;
  Runtime rt(ioc);
  stats::StatsRegistry registry;
  SinkContext ctx;
  ctx.loop = &rt.loop(0);
  ctx.client_name = "tls-it";
  ctx.endpoint = Endpoint{"127.0.0.1", server.port()};
  ctx.stats = stats::StatsScope(&registry, {});
  http::TransportOptions options;
  options.tls = Trusting(ca.ca_file);
  auto sink = std::make_shared<http::HttpTransportSink>(ctx, options);
  std::vector<Fault> faults;
  sink->on_faulted().Subscribe([&](const Fault& f) { faults.push_back(f); });
  int opens = 0;
  error_code opened;
  sink->AsyncOpen([&](error_code ec) {
    ++opens;
    opened = ec;
  });
  for (int i = 0; i < 100 && faults.empty(); ++i) ioc.run_for(20ms);
  EXPECT_EQ(opens, 1);
  EXPECT_FALSE(opened) << sink->open_failure_detail();
  EXPECT_EQ(sink->status(), SinkStatus::kClosed);
  ASSERT_EQ(faults.size(), 1u) << "the server's close went unnoticed";
  EXPECT_EQ(faults[0].error, Errc::kConnectionClosed) << faults[0].detail;
  EXPECT_THAT(faults[0].detail, Not(HasSubstr("TLS")));
  EXPECT_THAT(faults[0].detail, HasSubstr("127.0.0.1:" + std::to_string(server.port())));
  sink->Close();
  ioc.run_for(100ms);
}

// ---- Framed Thrift over TLS (Apache Thrift's TSSLServerSocket) ------------------------------

TEST(TlsThriftTest, EchoOverTlsAndConcurrentCalls) {
  const auto& ca = TestCa();
  TestThriftServer server({"--tls-cert", ca.server_cert, "--tls-key", ca.server_key});
  auto rt = MakeRuntime();
  auto client = Thrift::NewClient<EchoClient>("tcp://" + server.endpoint() + "?tls=on&tls_ca_file=" + ca.ca_file,
                                              ThriftOpts(rt, {}));
  std::string r;
  client->echo(r, "over tls");
  EXPECT_EQ(r, "over tls");
  constexpr int kCalls = 100;
  std::vector<std::future<std::string>> calls;
  for (int i = 0; i < kCalls; ++i) {
    calls.push_back(SCALES_THRIFT_CALL(client, echo, "m" + std::to_string(i), boost::asio::use_future));
  }
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_EQ(calls[i].wait_for(20s), std::future_status::ready);
    EXPECT_EQ(calls[i].get(), "m" + std::to_string(i));
  }
  client.Close();
}

// Descriptors process `pid` has open (/proc/PID/fd), or -1.
int OpenDescriptors(pid_t pid) {
  std::error_code ec;
  int n = 0;
  for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end;
       it.increment(ec)) {
    ++n;
  }
  return ec ? -1 : n;
}

// A client that closes its TLS connections sends close_notify first. Without it Apache Thrift's
// TSSLSocket sees a truncated stream and logs "TConnectedClient died: SSL_read: unexpected eof
// while reading" for every connection.
TEST(TlsThriftTest, ClosingTheClientSendsCloseNotify) {
  const auto& ca = TestCa();
  TestThriftServer server({"--tls-cert", ca.server_cert, "--tls-key", ca.server_key}, /*capture_stderr=*/true);
  const int idle_fds = OpenDescriptors(server.pid());
  ASSERT_GT(idle_fds, 0);
  auto rt = MakeRuntime(1);
  auto client = Thrift::NewClient<EchoClient>("tcp://" + server.endpoint() + "?tls=on&tls_ca_file=" + ca.ca_file,
                                              ThriftOpts(rt, {}));
  // Concurrent calls, so that the pool holds several connections.
  std::vector<std::future<std::string>> calls;
  for (int i = 0; i < 8; ++i) {
    calls.push_back(SCALES_THRIFT_CALL(client, echo, "c" + std::to_string(i), boost::asio::use_future));
  }
  for (int i = 0; i < 8; ++i) {
    ASSERT_EQ(calls[i].wait_for(20s), std::future_status::ready);
    EXPECT_EQ(calls[i].get(), "c" + std::to_string(i));
  }
  ASSERT_GT(OpenDescriptors(server.pid()), idle_fds);
  client.Close();
  // The server closes each connection once it has read to its end; when its descriptors are
  // back to what they were, whatever it logged about those connections is in its stderr.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (OpenDescriptors(server.pid()) > idle_fds && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  ASSERT_EQ(OpenDescriptors(server.pid()), idle_fds) << "the server still holds the client's connections";
  const std::string log = server.Stderr();
  EXPECT_THAT(log, Not(HasSubstr("unexpected eof"))) << log;
  EXPECT_THAT(log, Not(HasSubstr("TConnectedClient died"))) << log;
}

// A request timeout closes the TLS connection with the call on it (close_notify, then the socket,
// with the receive of the reply still pending): the call completes once, with the timeout, and
// the client goes on with a new connection.
TEST(TlsThriftTest, TimeoutMidCallCompletesOnceAndTheClientRecovers) {
  const auto& ca = TestCa();
  TestThriftServer server({"--tls-cert", ca.server_cert, "--tls-key", ca.server_key});
  auto rt = MakeRuntime(1);
  auto opts = ThriftOpts(rt, {});
  opts.client.timeout = 200ms;
  auto client =
      Thrift::NewClient<EchoClient>("tcp://" + server.endpoint() + "?tls=on&tls_ca_file=" + ca.ca_file, opts);
  std::string r;
  client->echo(r, "warm");  // the connection is up and TLS active before the slow call
  ASSERT_EQ(r, "warm");
  std::atomic<int> completions{0};
  std::promise<std::exception_ptr> first;
  SCALES_THRIFT_CALL(client, sleep, 2000, [&](std::exception_ptr e, std::string) {
    if (completions.fetch_add(1) == 0) first.set_value(e);
  });
  auto done = first.get_future();
  ASSERT_EQ(done.wait_for(10s), std::future_status::ready);
  std::exception_ptr e = done.get();
  ASSERT_TRUE(e);
  try {
    std::rethrow_exception(e);
  } catch (const Error& err) {
    EXPECT_EQ(err.scales_code(), Errc::kRequestTimeout) << err.what();
  }
  client->echo(r, "after");
  EXPECT_EQ(r, "after");
  // Past the server's reply to the slow call (written to the closed connection): still one.
  std::this_thread::sleep_for(2200ms);
  EXPECT_EQ(completions.load(), 1);
  client.Close();
}

TEST(TlsThriftTest, MutualTls) {
  const auto& ca = TestCa();
  TestThriftServer server(
      {"--tls-cert", ca.server_cert, "--tls-key", ca.server_key, "--tls-client-ca", ca.ca_file});
  auto rt = MakeRuntime();
  TlsOptions with_cert = Trusting(ca.ca_file);
  with_cert.cert_file = ca.client_cert;
  with_cert.key_file = ca.client_key;
  auto client = Thrift::NewClient<EchoClient>("tcp://" + server.endpoint(), ThriftOpts(rt, with_cert));
  std::string r;
  client->echo(r, "mutual");
  EXPECT_EQ(r, "mutual");
  client.Close();

  // Without a certificate the server refuses (with TLS 1.3, by an alert after the handshake).
  auto without = Thrift::NewClient<EchoClient>("tcp://" + server.endpoint(), ThriftOpts(rt, Trusting(ca.ca_file)));
  auto start = std::chrono::steady_clock::now();
  try {
    without->echo(r, "x");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kTlsFailed) << e.what();
    EXPECT_THAT(e.what(), HasSubstr(server.endpoint()));
    // The alert ("tlsv13 alert certificate required") or, when the server hung up before our
    // request got through, the missing certificate.
    EXPECT_THAT(e.what(), ::testing::AnyOf(HasSubstr("certificate required"),
                                           HasSubstr("the server asked for a client certificate")));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  without.Close();
}

TEST(TlsThriftTest, PlainAndTlsMismatchFailCleanly) {
  const auto& ca = TestCa();
  TestThriftServer tls_server({"--tls-cert", ca.server_cert, "--tls-key", ca.server_key});
  TestThriftServer plain_server;
  auto rt = MakeRuntime();
  std::string r;

  auto plain_client = Thrift::NewClient<EchoClient>("tcp://" + tls_server.endpoint(), ThriftOpts(rt, {}));
  auto start = std::chrono::steady_clock::now();
  try {
    plain_client->echo(r, "x");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kConnectionClosed) << e.what();
    EXPECT_THAT(e.what(), HasSubstr(tls_server.endpoint()));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  plain_client.Close();

  auto tls_client = Thrift::NewClient<EchoClient>("tcp://" + plain_server.endpoint(), ThriftOpts(rt, Trusting(ca.ca_file)));
  start = std::chrono::steady_clock::now();
  try {
    tls_client->echo(r, "x");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    ExpectConnectFailure(e, Errc::kTlsFailed, plain_server.endpoint(), "TLS handshake");
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);  // connect_timeout is 2 s
  tls_client.Close();
}

}  // namespace
}  // namespace scales
