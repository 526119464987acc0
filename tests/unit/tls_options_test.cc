// TlsOptions: per-URI keys, validation, and the SSL context (files loaded once, shared); how
// TLS errors are told apart.
#include "scales/transport/tls.h"

#include <map>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/proverr.h>
#include <openssl/ssl.h>
#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>

#include "scales/core/error.h"
#include "support/test_ca.h"
#include "support/thrown.h"

namespace scales {
namespace {

using ::testing::HasSubstr;

using test::Thrown;

TEST(TlsQueryTest, EveryKey) {
  TlsOptions o;
  ApplyTlsQuery({{"tls", "on"},
                 {"tls_ca_file", "/ca.pem"},
                 {"tls_server_name", "svc.example"},
                 {"tls_cert_file", "/c.pem"},
                 {"tls_key_file", "/k.pem"},
                 {"tls_verify", "off"},
                 {"tls_resume_sessions", "off"},
                 {"session_timeout", "10s"}},  // not ours: left for discovery
                o);
  EXPECT_TRUE(o.enabled);
  EXPECT_EQ(o.ca_file, "/ca.pem");
  EXPECT_EQ(o.server_name, "svc.example");
  EXPECT_EQ(o.cert_file, "/c.pem");
  EXPECT_EQ(o.key_file, "/k.pem");
  EXPECT_FALSE(o.verify_peer);
  EXPECT_FALSE(o.resume_sessions);
  for (const char* v : {"off", "false", "0"}) {
    ApplyTlsQuery({{"tls", v}}, o);
    EXPECT_FALSE(o.enabled) << v;
  }
  for (const char* v : {"on", "true", "1"}) {
    ApplyTlsQuery({{"tls", v}, {"tls_verify", v}, {"tls_resume_sessions", v}}, o);
    EXPECT_TRUE(o.enabled) << v;
    EXPECT_TRUE(o.verify_peer) << v;
    EXPECT_TRUE(o.resume_sessions) << v;
  }
}

TEST(TlsQueryTest, BadValuesAndUnknownKeys) {
  TlsOptions o;
  Error e = Thrown([&] { ApplyTlsQuery({{"tls", "yes"}}, o); });
  EXPECT_EQ(e.code(), Errc::kBadUri);
  EXPECT_THAT(e.what(), HasSubstr("tls='yes' is invalid"));
  e = Thrown([&] { ApplyTlsQuery({{"tls_verify", "maybe"}}, o); });
  EXPECT_THAT(e.what(), HasSubstr("tls_verify='maybe'"));
  e = Thrown([&] { ApplyTlsQuery({{"tls_cafile", "/x"}}, o); });
  EXPECT_EQ(e.code(), Errc::kBadUri);
  EXPECT_THAT(e.what(), HasSubstr("unknown URI option tls_cafile='/x'"));
}

TEST(TlsQueryTest, FromUri) {
  TlsOptions base;
  base.ca_file = "/default.pem";
  TlsOptions o = TlsOptionsForUri("https://h", base);
  EXPECT_TRUE(o.enabled);
  EXPECT_EQ(o.ca_file, "/default.pem");
  o = TlsOptionsForUri("tcp://h:1?tls=off&tls_ca_file=/other.pem", base);
  EXPECT_FALSE(o.enabled);
  EXPECT_EQ(o.ca_file, "/other.pem");
  TlsOptions on = base;
  on.enabled = true;  // TLS turned on in code, the URI adds to it
  o = TlsOptionsForUri("tcp://h:1?tls_verify=off", on);
  EXPECT_TRUE(o.enabled);
  EXPECT_FALSE(o.verify_peer);
  EXPECT_EQ(TlsOptionsForUri("", base), base);
  EXPECT_EQ(TlsOptionsForUri("not a uri", base), base);  // the client reports it
}

// A tls_* key with TLS off would be ignored and the client would talk in clear text: refused,
// unless the URI turns TLS off itself.
TEST(TlsQueryTest, TlsKeysWithTlsOffAreRefused) {
  TlsOptions base;
  for (const char* uri : {"tcp://h:1?tls_ca_file=/ca.pem", "tcp://h:1?tls_verify=off",
                          "zk://127.0.0.1:2181/svc?tls_server_name=svc.example"}) {
    Error e = Thrown([&] { TlsOptionsForUri(uri, base); });
    EXPECT_EQ(e.code(), Errc::kBadUri) << uri;
    EXPECT_THAT(e.what(), HasSubstr("has no effect: TLS is off (add tls=on or use https://)")) << uri;
  }
  Error e = Thrown([&] { TlsOptionsForUri("tcp://h:1?tls_ca_file=/ca.pem", base); });
  EXPECT_THAT(e.what(), HasSubstr("URI option tls_ca_file='/ca.pem'"));
}

TEST(TlsValidateTest, CertificateAndKeyGoTogether) {
  TlsOptions o;
  o.enabled = true;
  o.cert_file = "/c.pem";
  Error e = Thrown([&] { Validate(o); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("tls.cert_file '/c.pem' is set but tls.key_file is empty"));
  o.cert_file.clear();
  o.key_file = "/k.pem";
  EXPECT_THAT(Thrown([&] { Validate(o); }).what(), HasSubstr("tls.key_file '/k.pem' is set"));
  o.key_file.clear();
  o.server_name = "a b";
  EXPECT_THAT(Thrown([&] { Validate(o); }).what(), HasSubstr("tls.server_name 'a b' is not a host name"));
  o.enabled = false;  // off: nothing is checked
  EXPECT_NO_THROW(Validate(o));
}

// A server_name longer than SNI's 255 bytes: OpenSSL refused it as the SNI without a word
// (SSL_set_tlsext_host_name's result was ignored) and the handshake went without one.
TEST(TlsValidateTest, AServerNameLongerThanTheSniLimitIsRefused) {
  TlsOptions o;
  o.enabled = true;
  o.server_name = std::string(255, 'a');
  EXPECT_NO_THROW(Validate(o));
  o.server_name += 'a';
  Error e = Thrown([&] { Validate(o); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("tls.server_name is 256 bytes long (at most 255"));
}

// A path with a NUL byte (possible from code; a URI refuses escaped control characters) was cut
// there by fopen and OpenSSL: another file was loaded, silently.
TEST(TlsValidateTest, AFilePathWithANulByteIsRefused) {
  const auto& ca = testing::TestCa();
  TlsOptions o;
  o.enabled = true;
  o.ca_file = ca.ca_file + std::string(1, '\0') + ".bak";
  Error e = Thrown([&] { MakeTlsContext(o); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("tls.ca_file '" + ca.ca_file + "\\0.bak' contains a NUL byte"));
  o.ca_file = ca.ca_file;
  o.cert_file = ca.client_cert;
  o.key_file = ca.client_key + std::string(1, '\0');
  e = Thrown([&] { Validate(o); });
  EXPECT_THAT(e.what(), HasSubstr("tls.key_file '" + ca.client_key + "\\0' contains a NUL byte"));
}

TEST(TlsContextTest, SharedWhileInUseAndFileErrorsNameTheFile) {
  const auto& ca = testing::TestCa();
  TlsOptions o;
  o.enabled = true;
  o.ca_file = ca.ca_file;
  auto a = MakeTlsContext(o);
  auto b = MakeTlsContext(o);
  EXPECT_EQ(a, b);
  o.cert_file = ca.client_cert;
  o.key_file = ca.client_key;
  auto c = MakeTlsContext(o);
  EXPECT_NE(a, c);

  o.key_file = ca.server_key;
  Error e = Thrown([&] { MakeTlsContext(o); });
  EXPECT_EQ(e.code(), Errc::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("does not match the certificate in tls.cert_file '" + ca.client_cert + "'"));
  o.cert_file = ca.dir + "/missing.pem";
  e = Thrown([&] { MakeTlsContext(o); });
  EXPECT_THAT(e.what(), HasSubstr("tls.cert_file '" + ca.dir + "/missing.pem' cannot be read: No such file"));
  TlsOptions bad_ca;
  bad_ca.enabled = true;
  bad_ca.ca_file = ca.client_key;  // a key, not certificates
  e = Thrown([&] { MakeTlsContext(bad_ca); });
  EXPECT_THAT(e.what(), HasSubstr("tls.ca_file '" + ca.client_key + "' cannot be loaded: "));
}

// An OpenSSL error as Asio's TLS stream reports it.
boost::system::error_code ssl(int lib, int reason) {
  return boost::system::error_code(static_cast<int>(ERR_PACK(lib, 0, reason)),
                                   boost::asio::error::get_ssl_category());
}

// How a read error after the handshake is told apart: the stream's end, an alert the peer sent
// (TLS's verdict, e.g. a client certificate refused), or a record OpenSSL itself rejected (a
// broken connection: bytes altered on the way). OpenSSL reports a received alert as
// SSL_AD_REASON_OFFSET + its description.
TEST(TlsErrorTest, ARecordOpenSslRejectedIsNeitherAnAlertNorTheStreamsEnd) {
  const auto bad_mac = ssl(ERR_LIB_SSL, SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC);
  EXPECT_TRUE(IsTlsRecordFailure(bad_mac));
  EXPECT_FALSE(IsTlsConnectionEnd(bad_mac));
  EXPECT_TRUE(IsTlsRecordFailure(ssl(ERR_LIB_PROV, PROV_R_CIPHER_OPERATION_FAILED)));
  EXPECT_TRUE(IsTlsRecordFailure(ssl(ERR_LIB_SSL, SSL_R_WRONG_VERSION_NUMBER)));

  // The peer's alert that a record of ours failed its check: altered on the way too.
  EXPECT_TRUE(IsTlsRecordFailure(ssl(ERR_LIB_SSL, SSL_R_SSLV3_ALERT_BAD_RECORD_MAC)));
  EXPECT_TRUE(IsTlsRecordFailure(ssl(ERR_LIB_SSL, SSL_R_TLSV1_ALERT_DECRYPTION_FAILED)));

  EXPECT_FALSE(IsTlsRecordFailure(ssl(ERR_LIB_SSL, SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED)));
  EXPECT_FALSE(IsTlsRecordFailure(ssl(ERR_LIB_SSL, SSL_R_TLSV1_ALERT_UNKNOWN_CA)));
  EXPECT_FALSE(IsTlsRecordFailure(ssl(ERR_LIB_SSL, SSL_R_UNEXPECTED_EOF_WHILE_READING)));
  EXPECT_FALSE(IsTlsRecordFailure(boost::asio::ssl::error::stream_truncated));
  EXPECT_FALSE(IsTlsRecordFailure(boost::asio::error::eof));
  EXPECT_FALSE(IsTlsRecordFailure(boost::asio::error::connection_reset));
}

// A record that failed its integrity check, here or at the peer, is told apart from everything a
// wrong TLS set-up causes: in a handshake it is a broken connection (kConnectFailed).
TEST(TlsErrorTest, OnlyARecordFailingItsIntegrityCheckIsCorruption) {
  EXPECT_TRUE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC)));
  EXPECT_TRUE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_DECRYPTION_FAILED)));
  EXPECT_TRUE(IsTlsRecordCorrupted(ssl(ERR_LIB_PROV, PROV_R_CIPHER_OPERATION_FAILED)));
  EXPECT_TRUE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_SSLV3_ALERT_BAD_RECORD_MAC)));
  EXPECT_TRUE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_TLSV1_ALERT_DECRYPTION_FAILED)));

  EXPECT_FALSE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_CERTIFICATE_VERIFY_FAILED)));
  EXPECT_FALSE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_WRONG_VERSION_NUMBER)));
  EXPECT_FALSE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_BAD_SIGNATURE)));
  EXPECT_FALSE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED)));
  EXPECT_FALSE(IsTlsRecordCorrupted(ssl(ERR_LIB_SSL, SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE)));
  EXPECT_FALSE(IsTlsRecordCorrupted(boost::asio::ssl::error::stream_truncated));
  EXPECT_FALSE(IsTlsRecordCorrupted(boost::asio::error::eof));
  EXPECT_FALSE(IsTlsRecordCorrupted(boost::system::error_code(
      SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC, boost::system::generic_category())));
}

}  // namespace
}  // namespace scales
