#include "scales/discovery/uri.h"

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scales/core/error.h"
#include "scales/discovery/endpoint.h"

namespace scales {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

Endpoint Ep(std::string host, uint16_t port) { return Endpoint{std::move(host), port}; }

ParsedUri MustParse(std::string_view uri) {
  std::string error;
  std::optional<ParsedUri> parsed = ScalesUriParser::TryParse(uri, error);
  EXPECT_TRUE(parsed.has_value()) << error;
  EXPECT_THAT(error, IsEmpty());
  return parsed.value_or(ParsedUri{});
}

// Returns the error message for a URI that must not parse.
std::string MustFail(std::string_view uri) {
  std::string error;
  std::optional<ParsedUri> parsed = ScalesUriParser::TryParse(uri, error);
  EXPECT_FALSE(parsed.has_value()) << uri << " parsed as " << parsed->ToString();
  EXPECT_THAT(error, HasSubstr("bad URI '" + RedactUriSecrets(uri) + "': "));
  return error;
}

TEST(EndpointTest, ToString) {
  EXPECT_EQ(Ep("localhost", 8080).ToString(), "localhost:8080");
  EXPECT_EQ(Ep("10.0.0.1", 80).ToString(), "10.0.0.1:80");
  EXPECT_EQ(Ep("::1", 8080).ToString(), "[::1]:8080");
  EXPECT_EQ(Ep("fe80::1%eth0", 1).ToString(), "[fe80::1%eth0]:1");
}

// ---- Valid URIs ----

// From the scales original's tests.
TEST(UriTest, TcpTwoHostsInOrder) {
  ParsedUri u = MustParse("tcp://localhost:8080,localhost:8081");
  EXPECT_EQ(u.scheme, "tcp");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("localhost", 8080), Ep("localhost", 8081)));
  EXPECT_THAT(u.path, IsEmpty());
  EXPECT_THAT(u.endpoint_name, IsEmpty());
  EXPECT_THAT(u.query, IsEmpty());
}

// Per-client options (TLS) ride in the query of tcp:// URIs too.
TEST(UriTest, TcpWithQuery) {
  ParsedUri u = MustParse("tcp://a:1,b:2/ignored?tls=on&tls_ca_file=/etc/ca.pem");
  EXPECT_EQ(u.scheme, "tcp");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("a", 1), Ep("b", 2)));
  ASSERT_EQ(u.query.size(), 2u);
  EXPECT_EQ(u.query.at("tls"), "on");
  EXPECT_EQ(u.query.at("tls_ca_file"), "/etc/ca.pem");
  EXPECT_EQ(u.ToString(), "tcp://a:1,b:2?tls=on&tls_ca_file=/etc/ca.pem");
}

// https:// is tcp:// with tls=on; the port defaults to 443.
TEST(UriTest, HttpsIsTcpWithTls) {
  ParsedUri u = MustParse("HTTPS://example.com,10.0.0.1:8443,[::1]");
  EXPECT_EQ(u.scheme, "tcp");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("example.com", 443), Ep("10.0.0.1", 8443), Ep("::1", 443)));
  ASSERT_EQ(u.query.size(), 1u);
  EXPECT_EQ(u.query.at("tls"), "on");
  EXPECT_EQ(u.ToString(), "tcp://example.com:443,10.0.0.1:8443,[::1]:443?tls=on");
  ParsedUri v = MustParse("https://h:1/p?tls_server_name=svc&tls=true");
  EXPECT_EQ(v.query.at("tls"), "on");
  EXPECT_EQ(v.query.at("tls_server_name"), "svc");
  // tcp:// still needs ports.
  EXPECT_THAT(MustFail("tcp://example.com"), HasSubstr("has no port"));
}

TEST(UriTest, ZkHostAndPath) {
  ParsedUri u = MustParse("zk://zk1.zk.com:2181/test/path");
  EXPECT_EQ(u.scheme, "zk");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("zk1.zk.com", 2181)));
  EXPECT_EQ(u.path, "/test/path");
  EXPECT_THAT(u.endpoint_name, IsEmpty());
  EXPECT_THAT(u.query, IsEmpty());
}

TEST(UriTest, TcpSingleHost) {
  ParsedUri u = MustParse("tcp://127.0.0.1:9090");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("127.0.0.1", 9090)));
  EXPECT_EQ(u.ToString(), "tcp://127.0.0.1:9090");
}

TEST(UriTest, TcpPathIsIgnored) {
  ParsedUri u = MustParse("tcp://a:1,b:2/whatever/you/like");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("a", 1), Ep("b", 2)));
  EXPECT_THAT(u.path, IsEmpty());
  EXPECT_EQ(u.ToString(), "tcp://a:1,b:2");
  EXPECT_THAT(MustParse("tcp://a:1/").hosts, ElementsAre(Ep("a", 1)));
}

TEST(UriTest, DuplicateHostsAreKept) {
  ParsedUri u = MustParse("tcp://a:1,a:1,b:2,a:1");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("a", 1), Ep("a", 1), Ep("b", 2), Ep("a", 1)));
}

TEST(UriTest, SchemeIsCaseInsensitive) {
  ParsedUri zk = MustParse("ZK://zk1:2181/svc");
  EXPECT_EQ(zk.scheme, "zk");
  EXPECT_EQ(zk.path, "/svc");
  EXPECT_EQ(zk.ToString(), "zk://zk1:2181/svc");
  EXPECT_EQ(MustParse("Tcp://a:1").scheme, "tcp");
  EXPECT_EQ(MustParse("TCP://a:1").scheme, "tcp");
}

TEST(UriTest, ZkWithEndpointName) {
  ParsedUri u = MustParse("zk://a:1,b:2/svc/x#http");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("a", 1), Ep("b", 2)));
  EXPECT_EQ(u.path, "/svc/x");
  EXPECT_EQ(u.endpoint_name, "http");
  EXPECT_THAT(u.query, IsEmpty());
  EXPECT_EQ(u.ToString(), "zk://a:1,b:2/svc/x#http");
}

TEST(UriTest, ZkIpv6WithQuery) {
  ParsedUri u = MustParse("zk://[::1]:2181/p?session_timeout=10s");
  EXPECT_THAT(u.hosts, ElementsAre(Ep("::1", 2181)));
  EXPECT_EQ(u.path, "/p");
  EXPECT_THAT(u.endpoint_name, IsEmpty());
  ASSERT_EQ(u.query.size(), 1u);
  EXPECT_EQ(u.query.at("session_timeout"), "10s");
  EXPECT_EQ(u.ToString(), "zk://[::1]:2181/p?session_timeout=10s");
}

TEST(UriTest, ZkFragmentAndQueryInEitherOrder) {
  ParsedUri a = MustParse("zk://a:1/svc#thrift?session_timeout=10s&retries=3");
  ParsedUri b = MustParse("zk://a:1/svc?session_timeout=10s&retries=3#thrift");
  for (const ParsedUri* u : {&a, &b}) {
    EXPECT_EQ(u->path, "/svc");
    EXPECT_EQ(u->endpoint_name, "thrift");
    ASSERT_EQ(u->query.size(), 2u);
    EXPECT_EQ(u->query.at("session_timeout"), "10s");
    EXPECT_EQ(u->query.at("retries"), "3");
    // Canonical form: fragment first, query keys sorted.
    EXPECT_EQ(u->ToString(), "zk://a:1/svc#thrift?retries=3&session_timeout=10s");
  }
}

TEST(UriTest, QueryValueMayContainEquals) {
  ParsedUri u = MustParse("zk://a:1/svc?k=a=b");
  EXPECT_EQ(u.query.at("k"), "a=b");
}

// Query values are percent-decoded, so that a password holding '&', '#', '%' or a space can be
// written in a zk:// URI (it could not: "p&ss" split the query, and "p%26ss" was taken as is).
// '+' is not a space (that is HTML forms, not URIs); keys are taken as written. ToString()
// encodes what the parser would split on, so the canonical form parses back to the same values.
TEST(UriTest, QueryValuesArePercentDecoded) {
  ParsedUri u = MustParse("zk://a:1/svc?auth=digest:user:p%26ss%23%25%20x%3f&chroot=/p%2fq&k=a+b");
  EXPECT_EQ(u.query.at("auth"), "digest:user:p&ss#% x?");
  EXPECT_EQ(u.query.at("chroot"), "/p/q");
  EXPECT_EQ(u.query.at("k"), "a+b");
  EXPECT_EQ(u.ToString(), "zk://a:1/svc?auth=digest:user:p%26ss%23%25%20x%3F&chroot=/p/q&k=a+b");
  EXPECT_EQ(MustParse(u.ToString()).query, u.query);
  EXPECT_EQ(RedactUriSecrets(u.ToString()), "zk://a:1/svc?auth=digest:***&chroot=/p/q&k=a+b");
  // tcp:// too (the TLS keys' file names), and bytes beyond ASCII.
  EXPECT_EQ(MustParse("tcp://a:1?tls_ca_file=/etc/my%20ca%C3%A9.pem").query.at("tls_ca_file"), "/etc/my ca\xC3\xA9.pem");
  EXPECT_EQ(MustParse("https://a?tls=%6fn").query.at("tls"), "on");
}

TEST(UriTest, Ipv6Forms) {
  EXPECT_THAT(MustParse("tcp://[::1]:80").hosts, ElementsAre(Ep("::1", 80)));
  EXPECT_THAT(MustParse("tcp://[2001:db8::a:B]:443,[::ffff:10.0.0.1]:8080").hosts,
              ElementsAre(Ep("2001:db8::a:B", 443), Ep("::ffff:10.0.0.1", 8080)));
  EXPECT_THAT(MustParse("tcp://[fe80::1%eth0]:80").hosts, ElementsAre(Ep("fe80::1%eth0", 80)));
  EXPECT_EQ(MustParse("tcp://[::1]:80,b:2").ToString(), "tcp://[::1]:80,b:2");
}

TEST(UriTest, HostNameCharacters) {
  EXPECT_THAT(MustParse("tcp://my-host_1.example.com:1").hosts,
              ElementsAre(Ep("my-host_1.example.com", 1)));
  EXPECT_THAT(MustParse("tcp://fqdn.example.com.:1").hosts,
              ElementsAre(Ep("fqdn.example.com.", 1)));
}

TEST(UriTest, PortLimits) {
  EXPECT_THAT(MustParse("tcp://a:1,b:65535,c:080").hosts,
              ElementsAre(Ep("a", 1), Ep("b", 65535), Ep("c", 80)));
}

TEST(UriTest, ParseThrowsScalesErrorWithBadUriCode) {
  EXPECT_THAT(ScalesUriParser::Parse("tcp://a:1").hosts, ElementsAre(Ep("a", 1)));
  try {
    ScalesUriParser::Parse("tcp://a:99999");
    FAIL() << "no exception";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), make_error_code(Errc::kBadUri));
    EXPECT_EQ(e.code(), std::error_code(make_error_code(Errc::kBadUri)));
    EXPECT_THAT(e.what(), HasSubstr("bad URI 'tcp://a:99999': port '99999' of host 1 ('a') is "
                                    "out of range 1..65535"));
  }
}

TEST(UriTest, TryParseClearsErrorOnSuccess) {
  std::string error = "stale";
  EXPECT_TRUE(ScalesUriParser::TryParse("tcp://a:1", error).has_value());
  EXPECT_THAT(error, IsEmpty());
}

// ---- Malformed URIs ----

TEST(UriErrorTest, ExactMessageForPortOutOfRange) {
  std::string error;
  EXPECT_FALSE(ScalesUriParser::TryParse("tcp://a:99999", error));
  EXPECT_EQ(error,
            "bad URI 'tcp://a:99999': port '99999' of host 1 ('a') is out of range 1..65535");
}

TEST(UriErrorTest, Empty) { EXPECT_THAT(MustFail(""), HasSubstr("empty")); }

TEST(UriErrorTest, MissingSchemeSeparator) {
  EXPECT_THAT(MustFail("localhost:8080"), HasSubstr("missing '://'"));
  EXPECT_THAT(MustFail("tcp:/a:1"), HasSubstr("missing '://'"));
  EXPECT_THAT(MustFail("tcp"), HasSubstr("missing '://'"));
}

TEST(UriErrorTest, MissingScheme) { EXPECT_THAT(MustFail("://a:1"), HasSubstr("missing scheme")); }

TEST(UriErrorTest, UnsupportedScheme) {
  std::string error = MustFail("http://a:1");
  EXPECT_THAT(error, HasSubstr("unsupported scheme 'http'"));
  EXPECT_THAT(error, HasSubstr("supported: tcp, https, zk"));
  EXPECT_THAT(MustFail("Zookeeper://a:1/p"), HasSubstr("unsupported scheme 'Zookeeper'"));
}

TEST(UriErrorTest, EmptyHostList) {
  EXPECT_THAT(MustFail("tcp://"), HasSubstr("no hosts"));
  EXPECT_THAT(MustFail("tcp:///path"), HasSubstr("no hosts"));
  EXPECT_THAT(MustFail("zk:///svc"), HasSubstr("no hosts after '://' at offset 5"));
}

TEST(UriErrorTest, EmptyHostEntry) {
  EXPECT_THAT(MustFail("tcp://a:1,,b:2"), HasSubstr("host 2 is empty (at offset 10)"));
  EXPECT_THAT(MustFail("tcp://,a:1"), HasSubstr("host 1 is empty"));
  EXPECT_THAT(MustFail("tcp://a:1,"), HasSubstr("host 2 is empty"));
  EXPECT_THAT(MustFail("zk://a:1,/svc"), HasSubstr("host 2 is empty"));
}

TEST(UriErrorTest, MissingPort) {
  EXPECT_THAT(MustFail("tcp://localhost"),
              HasSubstr("host 1 ('localhost') at offset 6 has no port"));
  EXPECT_THAT(MustFail("tcp://a:1,b"), HasSubstr("host 2 ('b') at offset 10 has no port"));
  EXPECT_THAT(MustFail("zk://zk1/svc"), HasSubstr("host 1 ('zk1') at offset 5 has no port"));
  EXPECT_THAT(MustFail("tcp://[::1]"), HasSubstr("host 1 ('[::1]') has no port"));
}

TEST(UriErrorTest, EmptyPort) {
  EXPECT_THAT(MustFail("tcp://host:"), HasSubstr("host 1 ('host') has an empty port at offset 11"));
  EXPECT_THAT(MustFail("tcp://[::1]:"), HasSubstr("host 1 ('[::1]') has an empty port"));
}

TEST(UriErrorTest, EmptyHostName) {
  EXPECT_THAT(MustFail("tcp://:80"),
              HasSubstr("host 1 (':80') at offset 6 has an empty host name"));
}

TEST(UriErrorTest, NonNumericPort) {
  EXPECT_THAT(MustFail("tcp://a:http"),
              HasSubstr("port 'http' of host 1 ('a') is not a decimal number ('h' at offset 8)"));
  EXPECT_THAT(MustFail("tcp://a:1,b:8x"),
              HasSubstr("port '8x' of host 2 ('b') is not a decimal number ('x' at offset 13)"));
  EXPECT_THAT(MustFail("tcp://a:-1"), HasSubstr("port '-1' of host 1 ('a') is not a decimal"));
  EXPECT_THAT(MustFail("tcp://a:+1"), HasSubstr("is not a decimal number"));
}

TEST(UriErrorTest, PortOutOfRange) {
  EXPECT_THAT(MustFail("tcp://a:0"),
              HasSubstr("port '0' of host 1 ('a') is out of range 1..65535"));
  EXPECT_THAT(MustFail("tcp://a:65536"), HasSubstr("port '65536' of host 1 ('a') is out of range"));
  EXPECT_THAT(MustFail("tcp://a:1,b:99999999999999999999999"),
              HasSubstr("port '99999999999999999999999' of host 2 ('b') is out of range"));
  EXPECT_THAT(MustFail("tcp://[::1]:70000"), HasSubstr("port '70000' of host 1 ('[::1]')"));
}

TEST(UriErrorTest, UnbracketedIpv6) {
  EXPECT_THAT(MustFail("tcp://::1:80"), HasSubstr("host 1 ('::1:80') at offset 6 looks like an "
                                                  "unbracketed IPv6 address"));
  EXPECT_THAT(MustFail("tcp://a:1,fe80::1:80"), HasSubstr("host 2"));
  EXPECT_THAT(MustFail("tcp://a:1,fe80::1:80"), HasSubstr("[address]:port"));
}

TEST(UriErrorTest, BadBracketedIpv6) {
  EXPECT_THAT(MustFail("tcp://[::1:80"),
              HasSubstr("host 1 ('[::1:80') at offset 6 has no closing ']'"));
  EXPECT_THAT(MustFail("tcp://[]:80"), HasSubstr("empty IPv6 address"));
  EXPECT_THAT(MustFail("tcp://[::g]:80"),
              HasSubstr("host 1 ('[::g]') has invalid character 'g' at offset 9"));
  EXPECT_THAT(MustFail("tcp://[localhost]:80"), HasSubstr("invalid character 'l'"));
  EXPECT_THAT(MustFail("tcp://[1.2.3.4]:80"), HasSubstr("is not a valid IPv6 address"));
  EXPECT_THAT(MustFail("tcp://[1::2::3]:80"), HasSubstr("is not a valid IPv6 address"));
  EXPECT_THAT(MustFail("tcp://[::1]80"), HasSubstr("unexpected '8' after ']' at offset 11"));
  EXPECT_THAT(MustFail("tcp://[fe80::1%]:80"), HasSubstr("empty zone after '%'"));
  EXPECT_THAT(MustFail("tcp://[fe80::1%e!0]:80"),
              HasSubstr("host 1 ('[fe80::1%e!0]') has invalid character '!' in its zone at "
                        "offset 16"));
  // A '/' ends the host list, so the bracket is reported as unclosed.
  EXPECT_THAT(MustFail("tcp://[fe80::1%e/0]:80"), HasSubstr("has no closing ']'"));
}

TEST(UriErrorTest, InvalidHostNameCharacters) {
  EXPECT_THAT(MustFail("tcp://a:1,h!st:2"), HasSubstr("host 2 ('h!st') has invalid character '!'"));
  EXPECT_THAT(MustFail("tcp://a]:1"), HasSubstr("invalid character ']'"));
}

// user[:password]@ before a host is user information, which no scales URI takes: said as such,
// not as an '@' in a host name or (with a password's colon) an unbracketed IPv6 address, and
// without repeating what came before the '@'.
TEST(UriErrorTest, UserInformationIsRefusedWithoutQuotingIt) {
  EXPECT_THAT(MustFail("tcp://user@host:80"),
              HasSubstr("host 1 at offset 6 has user information before the '@' at offset 10 ('***@host:80'), "
                        "which scales URIs do not take"));
  const std::string with_password = MustFail("tcp://a:1,user:s3cret@127.0.0.1:1");
  EXPECT_THAT(with_password, HasSubstr("host 2 at offset 10 has user information before the '@' at offset 21 "
                                       "('***@127.0.0.1:1')"));
  EXPECT_THAT(with_password, HasSubstr("bad URI 'tcp://a:1,***@127.0.0.1:1': "));
  EXPECT_THAT(with_password, Not(HasSubstr("s3cret")));
  EXPECT_THAT(with_password, Not(HasSubstr("IPv6")));
  EXPECT_THAT(MustFail("zk://u:p@127.0.0.1:2181/path"), HasSubstr("has user information"));
}

// A password holding a '/', or a '#' or '?' with a '=' after it, ended the hosts there: the error
// quoted it as a port ("port 'pa' of host 1 ('u')") and the URI went into the message as it was.
// A '#' in an auth secret followed by a name and a '?' was taken as a fragment: the rest of the
// secret was shown.
TEST(UriErrorTest, PasswordsWithSlashesHashesAndQuestionMarksAreNotQuoted) {
  for (const std::string uri : {"zk://u:pa/ss@127.0.0.1:2181/svc", "tcp://u:pa/s/s@h:80", "tcp://u:p#=w@h:80",
                                "tcp://u:p?=w@h:80", "tcp://a:1,u:/pw@h:80", "zk://u:pa/ss@h:2181/svc@x"}) {
    const std::string e = MustFail(uri);
    EXPECT_THAT(e, HasSubstr("has user information before the '@'")) << uri;
    EXPECT_THAT(e, Not(HasSubstr("pa/s"))) << uri;
    EXPECT_THAT(e, Not(HasSubstr("=w"))) << uri;
    EXPECT_THAT(e, Not(HasSubstr("/pw"))) << uri;
  }
  EXPECT_EQ(RedactUriSecrets("zk://u:pa/ss@h:2181/svc"), "zk://***@h:2181/svc");
  EXPECT_EQ(RedactUriSecrets("tcp://u:p#=w@h:80"), "tcp://***@h:80");
  const std::string e = MustFail("zk://h:2181/svc?auth=digest:u:s3c#r3t?x");
  EXPECT_THAT(e, HasSubstr("bad URI 'zk://h:2181/svc?auth=digest:***': "));
  EXPECT_THAT(e, Not(HasSubstr("r3t")));
  // What is not a password stays as it was: a port, a bracketed IPv6 address, an '@' in a path.
  EXPECT_EQ(MustParse("zk://h:2181/svc@x").path, "/svc@x");
  EXPECT_EQ(RedactUriSecrets("zk://h:2181/svc@x"), "zk://h:2181/svc@x");
  EXPECT_EQ(MustParse("zk://[::1]:2181/svc@x").path, "/svc@x");
  EXPECT_EQ(MustParse("zk://a:1,[::1]:2/svc@x").path, "/svc@x");
  EXPECT_EQ(RedactUriSecrets("zk://h:2181/svc?auth=digest:u:p#http"), "zk://h:2181/svc?auth=digest:***#http");
  // An '@' in an auth value is no end of a password: redacting again changes nothing (uri_fuzzer
  // found a first version of this change that redacted "tcp://:?auth=,@?&h=@" a second time).
  // Nor one whose auth value holds the '?' that ended the hosts (found by uri_fuzzer, older
  // than that change).
  for (const std::string uri : {"tcp://:?auth=,@?&h=@", "tcp://u:p?auth=x@y", "tcp://u:p/&x@y", "://:?auth=,@?&h=@",
                                "://?,@&auth=?&x=@", "tcp://a:1?,@&auth=?&x=@"}) {
    const std::string once = RedactUriSecrets(uri);
    EXPECT_EQ(RedactUriSecrets(once), once) << uri;
  }
}

TEST(UriErrorTest, BadHostNameShape) {
  EXPECT_THAT(MustFail("tcp://a..b:1"),
              HasSubstr("host 1 ('a..b') has an empty label at offset 8"));
  EXPECT_THAT(MustFail("tcp://.a:1"), HasSubstr("empty label"));
  EXPECT_THAT(MustFail("tcp://.:1"), HasSubstr("empty label"));
  EXPECT_THAT(MustFail("tcp://a..:1"), HasSubstr("host 1 ('a..') has an empty label at offset 8"));
  EXPECT_THAT(MustFail("tcp://1.2.3.256:1"), HasSubstr("host 1 ('1.2.3.256') at offset 6 is not a "
                                                       "valid IPv4 address"));
  EXPECT_THAT(MustFail("tcp://1.2.3:1"), HasSubstr("not a valid IPv4 address"));
  EXPECT_THAT(MustFail("tcp://" + std::string(254, 'a') + ":1"), HasSubstr("longer than 253"));
}

TEST(UriErrorTest, Whitespace) {
  EXPECT_THAT(MustFail("tcp://a:1, b:2"), HasSubstr("unexpected space at offset 10"));
  EXPECT_THAT(MustFail(" tcp://a:1"), HasSubstr("unexpected space at offset 0"));
  EXPECT_THAT(MustFail("tcp://a:1 "), HasSubstr("unexpected space at offset 9"));
  EXPECT_THAT(MustFail("zk://a:1/my svc"), HasSubstr("unexpected space at offset 11"));
  EXPECT_THAT(MustFail("tcp://a:1\n"), HasSubstr("control character 0x0a at offset 9"));
  EXPECT_THAT(MustFail("tcp://a:1\t,b:2"), HasSubstr("control character 0x09"));
}

TEST(UriErrorTest, FragmentOnlyForZk) {
  EXPECT_THAT(MustFail("tcp://a:1#http"),
              HasSubstr("fragment ('#' at offset 9) is only allowed in zk:// URIs"));
  EXPECT_THAT(MustFail("tcp://a:1/p#http"), HasSubstr("fragment ('#' at offset 11)"));
  EXPECT_THAT(MustFail("tcp://a:1?tls=on#http"), HasSubstr("fragment ('#' at offset 16)"));
  EXPECT_THAT(MustFail("https://a#x"), HasSubstr("fragment ('#' at offset 9) is only allowed in zk://"));
}

TEST(UriErrorTest, TcpQueryErrors) {
  EXPECT_THAT(MustFail("tcp://a:1?"), HasSubstr("empty query after '?' at offset 9"));
  EXPECT_THAT(MustFail("tcp://a:1?tls"), HasSubstr("query parameter 'tls' at offset 10 has no value"));
  EXPECT_THAT(MustFail("tcp://a:1?tls=on&tls=off"), HasSubstr("query parameter 'tls' at offset 17 is given twice"));
  EXPECT_THAT(MustFail("tcp://a:1?a=1?b=2"), HasSubstr("second '?' at offset 13"));
  // Only TLS keys: a mistyped one would leave the connection in clear without a word.
  EXPECT_THAT(MustFail("tcp://a:1?TLS=on"), HasSubstr("unknown query parameter 'TLS'"));
  EXPECT_THAT(MustFail("https://a?tls_verify=on&ssl=on"), HasSubstr("unknown query parameter 'ssl'"));
  EXPECT_THAT(MustFail("tcp://a:1?opportunistic_tls=required"),
              HasSubstr("unknown query parameter 'opportunistic_tls' (a tcp:// or https:// URI takes only"));
}

TEST(UriErrorTest, HttpsContradictingTls) {
  EXPECT_THAT(MustFail("https://a:1?tls=off"), HasSubstr("tls=off contradicts the https:// scheme"));
  EXPECT_THAT(MustFail("https://a:x"), HasSubstr("port 'x' of host 1 ('a') is not a decimal number"));
  EXPECT_THAT(MustFail("https://[::1]x"), HasSubstr("unexpected 'x' after ']'"));
}

TEST(UriErrorTest, ZkPathRequired) {
  EXPECT_THAT(MustFail("zk://a:1"), HasSubstr("needs a znode path after the hosts at offset 8"));
  EXPECT_THAT(MustFail("zk://a:1,b:2"), HasSubstr("needs a znode path"));
  EXPECT_THAT(MustFail("zk://a:1?session_timeout=1s"), HasSubstr("needs a znode path"));
  EXPECT_THAT(MustFail("zk://a:1#http"), HasSubstr("needs a znode path"));
}

TEST(UriErrorTest, ZkRootPath) {
  EXPECT_THAT(MustFail("zk://a:1/"), HasSubstr("must not be the root '/' at offset 8"));
  EXPECT_THAT(MustFail("zk://a:1/#http"), HasSubstr("must not be the root"));
}

TEST(UriErrorTest, ZkPathShape) {
  EXPECT_THAT(MustFail("zk://a:1/svc/"),
              HasSubstr("znode path '/svc/' ends with '/' at offset 12"));
  EXPECT_THAT(MustFail("zk://a:1/svc//x"),
              HasSubstr("znode path '/svc//x' has an empty segment ('//') at offset 12"));
  EXPECT_THAT(MustFail("zk://a:1//svc"), HasSubstr("empty segment"));
  EXPECT_THAT(MustFail("zk://a:1/svc/../x"),
              HasSubstr("znode path '/svc/../x' has a relative segment '..' at offset 13"));
  EXPECT_THAT(MustFail("zk://a:1/./x"), HasSubstr("relative segment '.'"));
}

TEST(UriErrorTest, ZkFragment) {
  EXPECT_THAT(MustFail("zk://a:1/svc#"), HasSubstr("empty endpoint name after '#' at offset 12"));
  EXPECT_THAT(MustFail("zk://a:1/svc#?k=v"), HasSubstr("empty endpoint name"));
  EXPECT_THAT(MustFail("zk://a:1/svc#ht/tp"),
              HasSubstr("endpoint name 'ht/tp' has invalid character '/' at offset 15"));
  EXPECT_THAT(MustFail("zk://a:1/svc#a#b"), HasSubstr("second '#' at offset 14"));
  EXPECT_THAT(MustFail("zk://a:1/svc#a?k=v#b"), HasSubstr("second '#' at offset 18"));
}

TEST(UriErrorTest, ZkQuery) {
  EXPECT_THAT(MustFail("zk://a:1/svc?"), HasSubstr("empty query after '?' at offset 12"));
  EXPECT_THAT(MustFail("zk://a:1/svc?a=1&&b=2"), HasSubstr("empty query parameter at offset 17"));
  EXPECT_THAT(MustFail("zk://a:1/svc?a=1&"), HasSubstr("empty query parameter at offset 17"));
  EXPECT_THAT(MustFail("zk://a:1/svc?flag"),
              HasSubstr("query parameter 'flag' at offset 13 has no value (expected key=value)"));
  EXPECT_THAT(MustFail("zk://a:1/svc?k="),
              HasSubstr("query parameter 'k' at offset 13 has no value"));
  EXPECT_THAT(MustFail("zk://a:1/svc?=v"),
              HasSubstr("query parameter '=v' at offset 13 has an empty key"));
  EXPECT_THAT(MustFail("zk://a:1/svc?k=1&k=2"),
              HasSubstr("query parameter 'k' at offset 17 is given twice"));
  EXPECT_THAT(MustFail("zk://a:1/svc?a=1?b=2"), HasSubstr("second '?' at offset 16"));
}

// A '%' not followed by two hex digits, or an escaped control character (a NUL would cut a
// C string short), is refused naming the key and the offset, without quoting the value (the
// auth secret).
TEST(UriErrorTest, MalformedPercentEscapesInQueryValues) {
  std::string e = MustFail("zk://a:1/svc?auth=digest:u:p%G1ss");
  EXPECT_THAT(e, HasSubstr("bad URI 'zk://a:1/svc?auth=digest:***': query parameter 'auth' has a malformed "
                           "percent-escape at offset 28 (expected '%' and two hex digits; write a '%' itself as %25)"));
  EXPECT_THAT(e, ::testing::Not(HasSubstr("G1ss")));
  EXPECT_THAT(MustFail("zk://a:1/svc?k=%"), HasSubstr("query parameter 'k' has a malformed percent-escape at offset 15"));
  EXPECT_THAT(MustFail("zk://a:1/svc?k=a%4#x"), HasSubstr("query parameter 'k' has a malformed percent-escape at offset 16"));
  EXPECT_THAT(MustFail("tcp://a:1?tls_ca_file=/etc/100%.pem"),
              HasSubstr("query parameter 'tls_ca_file' has a malformed percent-escape at offset 30"));
  EXPECT_THAT(MustFail("zk://a:1/svc?auth=digest:u:p%00"),
              HasSubstr("query parameter 'auth' has an escaped control character 0x00 at offset 28"));
  EXPECT_THAT(MustFail("zk://a:1/svc?k=%7F"), HasSubstr("escaped control character 0x7f at offset 15"));
}

TEST(UriErrorTest, ZkHostErrorsAreReportedLikeTcp) {
  EXPECT_THAT(MustFail("zk://a:1,b:0/svc"), HasSubstr("port '0' of host 2 ('b') is out of range"));
  EXPECT_THAT(MustFail("zk://::1:2181/svc"), HasSubstr("unbracketed IPv6"));
}

}  // namespace
}  // namespace scales
