// Serverset member JSON parsing, endpoint selection and zk:// options: no sockets.
#include <set>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "discovery/zk_connection.h"
#include "scales/core/error.h"
#include "scales/discovery/serverset_member.h"
#include "scales/discovery/uri.h"
#include "scales/discovery/zookeeper.h"

namespace scales {
namespace {

using std::chrono::milliseconds;
using namespace std::chrono_literals;

constexpr const char* kFinagleExample =
    R"({"serviceEndpoint":{"host":"10.1.2.3","port":9090},
        "additionalEndpoints":{"http":{"host":"10.1.2.3","port":8080},
                               "admin":{"host":"10.1.2.3","port":9990}},
        "status":"ALIVE","shard":4,"metadata":{"zone":"a"}})";

ServiceInstance MustParse(std::string_view json) {
  std::string error;
  auto instance = ParseServiceInstance(json, error);
  EXPECT_TRUE(instance) << error;
  if (!instance) return ServiceInstance{};
  return std::move(*instance);
}

std::string ParseError(std::string_view json) {
  std::string error;
  auto instance = ParseServiceInstance(json, error);
  EXPECT_FALSE(instance) << json;
  return error;
}

TEST(ServerSetMemberTest, ParsesFinagleExample) {
  ServiceInstance m = MustParse(kFinagleExample);
  EXPECT_EQ(m.service_endpoint, (Endpoint{"10.1.2.3", 9090}));
  ASSERT_EQ(m.additional_endpoints.size(), 2u);
  EXPECT_EQ(m.additional_endpoints.at("http"), (Endpoint{"10.1.2.3", 8080}));
  EXPECT_EQ(m.additional_endpoints.at("admin"), (Endpoint{"10.1.2.3", 9990}));
  EXPECT_EQ(m.status, "ALIVE");
  EXPECT_EQ(m.shard, 4);
  EXPECT_EQ(m.metadata.at("zone"), "a");
}

TEST(ServerSetMemberTest, OptionalFieldsMayBeAbsent) {
  ServiceInstance m = MustParse(R"({"serviceEndpoint":{"host":"h","port":1},"status":"DEAD"})");
  EXPECT_TRUE(m.additional_endpoints.empty());
  EXPECT_FALSE(m.shard);
  EXPECT_TRUE(m.metadata.empty());
  EXPECT_EQ(m.status, "DEAD");
  // An unparsable shard is ignored (as scales does), unknown keys too.
  ServiceInstance n = MustParse(
      R"({"serviceEndpoint":{"host":"h","port":1},"additionalEndpoints":{},"status":"ALIVE",
          "shard":"x","extra":[1,2],"metadata":{"a":"b","n":3}})");
  EXPECT_FALSE(n.shard);
  EXPECT_EQ(n.metadata.size(), 1u);
}

TEST(ServerSetMemberTest, MalformedMembersNameTheProblem) {
  EXPECT_NE(ParseError("").find("not JSON"), std::string::npos);
  EXPECT_NE(ParseError("{\"serviceEndpoint\":").find("not JSON"), std::string::npos);
  EXPECT_EQ(ParseError("[1]"), "not a JSON object");
  EXPECT_EQ(ParseError(R"({"status":"ALIVE"})"), "serviceEndpoint: missing");
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"host":"h","port":1}})"),
            "status: missing or not a string");
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"port":1},"status":"ALIVE"})"),
            "serviceEndpoint.host: missing or not a non-empty string");
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"host":"h","port":"80"},"status":"ALIVE"})"),
            "serviceEndpoint.port: missing or not an integer");
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"host":"h","port":70000},"status":"ALIVE"})"),
            "serviceEndpoint.port: 70000 is out of range 1..65535");
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"host":"h","port":0},"status":"ALIVE"})"),
            "serviceEndpoint.port: 0 is out of range 1..65535");
  // A port over int64's range (a uint64 in the JSON) was reported as "65536".
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"host":"h","port":18446744073709551615},"status":"ALIVE"})"),
            "serviceEndpoint.port: 18446744073709551615 is out of range 1..65535");
  EXPECT_EQ(ParseError(R"({"serviceEndpoint":{"host":"h","port":1},"status":"ALIVE",
                           "additionalEndpoints":[]})"),
            "additionalEndpoints: not an object");
}

// A bad additional endpoint drops only itself, as Finagle's parser does: the member keeps its
// serviceEndpoint and its other endpoints (one bad entry used to make the whole member malformed,
// taking its serviceEndpoint out of every server set that did not even use the bad name).
TEST(ServerSetMemberTest, ABadAdditionalEndpointIsDroppedAlone) {
  std::string error;
  std::vector<std::string> skipped;
  auto m = ParseServiceInstance(R"({"serviceEndpoint":{"host":"h","port":1},"status":"ALIVE",
                                    "additionalEndpoints":{"http":{"host":"h"},"admin":{"host":"h","port":2},
                                                           "thrift":7}})",
                                error, &skipped);
  ASSERT_TRUE(m) << error;
  EXPECT_EQ(m->service_endpoint, (Endpoint{"h", 1}));
  EXPECT_EQ(m->additional_endpoints.size(), 1u);
  EXPECT_EQ(SelectEndpoint(*m, "admin"), (Endpoint{"h", 2}));
  EXPECT_EQ(SelectEndpoint(*m, "http"), std::nullopt);
  EXPECT_EQ(SelectEndpoint(*m, ""), (Endpoint{"h", 1}));
  EXPECT_THAT(skipped, ::testing::ElementsAre("additionalEndpoints.http.port: missing or not an integer",
                                              "additionalEndpoints.thrift: not an object"));
  // Without `skipped` the same member parses the same.
  EXPECT_TRUE(ParseServiceInstance(R"({"serviceEndpoint":{"host":"h","port":1},"status":"ALIVE",
                                       "additionalEndpoints":{"http":{"host":"h"}}})",
                                   error));
}

TEST(ServerSetMemberTest, SerializeRoundTripsInFinagleOrder) {
  ServiceInstance m;
  m.service_endpoint = {"127.0.0.1", 8080};
  EXPECT_EQ(SerializeServiceInstance(m),
            R"({"serviceEndpoint":{"host":"127.0.0.1","port":8080},"additionalEndpoints":{},)"
            R"("status":"ALIVE"})");
  m.additional_endpoints["http"] = {"127.0.0.1", 8081};
  m.shard = 2;
  m.metadata["zone"] = "b";
  ServiceInstance back = MustParse(SerializeServiceInstance(m));
  EXPECT_EQ(back, m);
}

TEST(ServerSetMemberTest, SelectsAliveMembersAndNamedEndpoints) {
  ServiceInstance m = MustParse(kFinagleExample);
  EXPECT_EQ(SelectEndpoint(m, ""), (Endpoint{"10.1.2.3", 9090}));
  EXPECT_EQ(SelectEndpoint(m, "http"), (Endpoint{"10.1.2.3", 8080}));
  EXPECT_FALSE(SelectEndpoint(m, "thrift"));  // no such name: skipped
  for (const char* status : {"DEAD", "STARTING", "STOPPING", "STOPPED", "WARNING", "alive"}) {
    ServiceInstance s = m;
    s.status = status;
    EXPECT_FALSE(SelectEndpoint(s, "")) << status;
  }
}

TEST(ServerSetMemberTest, SelectEndpointsSortsAndCollapsesDuplicates) {
  ServiceInstance a, b, c, d;
  a.service_endpoint = {"10.0.0.2", 80};
  b.service_endpoint = {"10.0.0.1", 80};
  c.service_endpoint = {"10.0.0.2", 80};  // same endpoint announced twice
  d.service_endpoint = {"10.0.0.3", 80};
  d.status = "STOPPING";
  auto eps = SelectEndpoints({&a, &b, &c, &d}, "");
  EXPECT_EQ(eps, (std::vector<Endpoint>{{"10.0.0.1", 80}, {"10.0.0.2", 80}}));
  EXPECT_TRUE(SelectEndpoints({&a, &b}, "http").empty());
}

TEST(ZooKeeperOptionsTest, Durations) {
  EXPECT_EQ(ParseZooKeeperDuration("500ms"), milliseconds(500));
  EXPECT_EQ(ParseZooKeeperDuration("10s"), milliseconds(10000));
  EXPECT_EQ(ParseZooKeeperDuration("2m"), milliseconds(120000));
  EXPECT_FALSE(ParseZooKeeperDuration("10"));
  EXPECT_FALSE(ParseZooKeeperDuration("s"));
  EXPECT_FALSE(ParseZooKeeperDuration("-1s"));
  EXPECT_FALSE(ParseZooKeeperDuration("1h"));
  // At most 24 h in every unit (the bound was on the number: 86400001ms refused, 100000m taken).
  EXPECT_EQ(ParseZooKeeperDuration("86400000ms"), milliseconds(86400000));
  EXPECT_EQ(ParseZooKeeperDuration("86400s"), milliseconds(86400000));
  EXPECT_EQ(ParseZooKeeperDuration("1440m"), milliseconds(86400000));
  for (const char* over : {"86400001ms", "86401s", "1441m", "100000m", "99999999999999999999m"}) {
    EXPECT_FALSE(ParseZooKeeperDuration(over)) << over;
  }
}

TEST(ZooKeeperOptionsTest, DurationsOver24HoursAreBadUrisNamingTheParameter) {
  for (const char* query : {"retry_interval=100000m", "retry_interval=86400001ms", "session_timeout=86401s"}) {
    const std::string uri = std::string("zk://a:1/svc?") + query;
    const std::string key(query, std::string_view(query).find('='));
    try {
      ZooKeeperOptions::FromUri(ScalesUriParser::Parse(uri));
      ADD_FAILURE() << uri << " was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
      EXPECT_THAT(e.what(), ::testing::HasSubstr(key + "='" + std::string(query + key.size() + 1) + "' is over 24 h"));
    }
  }
  try {
    ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?retry_interval=5x"));
    ADD_FAILURE() << "5x was taken";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("retry_interval='5x' is not a positive duration"));
  }
  EXPECT_EQ(ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?retry_interval=1440m")).retry_interval,
            std::chrono::hours(24));
}

TEST(ZooKeeperOptionsTest, FromUriQuery) {
  ParsedUri uri = ScalesUriParser::Parse(
      "zk://a:1,b:2/svc/x#http?session_timeout=3s&chroot=/prod&auth=digest:u:p:q");
  ZooKeeperOptions o = ZooKeeperOptions::FromUri(uri);
  EXPECT_EQ(o.session_timeout, milliseconds(3000));
  EXPECT_EQ(o.chroot, "/prod");
  EXPECT_EQ(o.auth, "digest:u:p:q");  // the password may contain ':'
  EXPECT_EQ(o.ConnectString(uri), "a:1,b:2/prod");
  EXPECT_NO_THROW(o.Validate());

  ZooKeeperOptions defaults;
  defaults.session_timeout = milliseconds(1234);
  ZooKeeperOptions d = ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc"), defaults);
  EXPECT_EQ(d.session_timeout, milliseconds(1234));
  // IPv6 literals as libzookeeper reads them: no brackets, the port after the last ':'.
  EXPECT_EQ(d.ConnectString(ScalesUriParser::Parse("zk://[::1]:1/svc")), "::1:1");
  EXPECT_EQ(d.ConnectString(ScalesUriParser::Parse("zk://[::ffff:127.0.0.1]:2181,b:2/svc")),
            "::ffff:127.0.0.1:2181,b:2");
}

// The C client's error lines (one log callback for every handle) go to the connections they
// name. Two ensembles on the same port used to take each other's errors.
TEST(ZooKeeperLogTest, ALogLineGoesToTheConnectionItNames) {
  const std::string refused =
      "2026-12-05 01:00:00,000:7(0x7f00):ZOO_ERROR@handle_socket_error_msg@1290: Socket [10.0.0.2:2181] zk "
      "retcode=-4, errno=111(Connection refused): server refused to accept the client";
  zk_internal::ZkConnection a("10.0.0.1:2181,10.0.0.3:2182/chroot", {});
  zk_internal::ZkConnection b("10.0.0.2:2181", {});
  zk_internal::ZkConnection named("zk.example:2181", {});
  zk_internal::ZkConnection other_port("zk.example:2182", {});
  zk_internal::ZkConnection longer("10.0.0.22:2181", {});
  EXPECT_FALSE(a.Mentions(refused));
  EXPECT_TRUE(b.Mentions(refused));
  EXPECT_TRUE(named.Mentions(refused)) << "a host name: the line has its address, so by port";
  EXPECT_FALSE(other_port.Mentions(refused));
  EXPECT_FALSE(longer.Mentions(refused));
  EXPECT_FALSE(zk_internal::ZkConnection("0.0.0.2:2181", {}).Mentions(refused)) << "inside 10.0.0.2";
  EXPECT_FALSE(b.Mentions("... Socket [10.0.0.2:21810] zk retcode=-4 ...")) << "another port";
}

TEST(ZooKeeperOptionsTest, BadQueryIsABadUri) {
  for (const char* uri :
       {"zk://a:1/svc?session_timeout=10", "zk://a:1/svc?session_timeout=0s",
        "zk://a:1/svc?chroot=prod", "zk://a:1/svc?chroot=/prod/", "zk://a:1/svc?auth=digest",
        "zk://a:1/svc?bogus=1", "tcp://a:1"}) {
    try {
      ZooKeeperOptions::FromUri(ScalesUriParser::Parse(uri));
      ADD_FAILURE() << uri;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri)) << uri;
    }
  }
  ZooKeeperOptions o;
  o.session_timeout = milliseconds(0);
  EXPECT_THROW(o.Validate(), Error);
}

// ZooKeeper credentials in a URI never appear in what scales says about it: parse errors,
// option errors, descriptions (the admin server's /admin/clients uses RedactUriSecrets too).
TEST(ZooKeeperOptionsTest, CredentialsAreNeverQuoted) {
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3cr:et&session_timeout=3s"),
            "zk://a:1/svc?auth=digest:***&session_timeout=3s");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?session_timeout=3s&auth=digest:user:s3cret#http"),
            "zk://a:1/svc?session_timeout=3s&auth=digest:***#http");
  // A value without ':' may be a password written without its scheme: hidden whole.
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc#http?xauth=a:b&auth=digest"), "zk://a:1/svc#http?xauth=a:b&auth=***");
  EXPECT_EQ(RedactUriSecrets("tcp://a:1,b:2"), "tcp://a:1,b:2");
  // User information before a host (refused by the parser, whose message quotes the URI).
  EXPECT_EQ(RedactUriSecrets("tcp://u:s3cret@a:1,b:2,v@w@c:3/p@q?x=y@z"), "tcp://***@a:1,b:2,***@c:3/p@q?x=y@z");
  EXPECT_EQ(RedactUriSecrets("zk://@a:1/svc"), "zk://***@a:1/svc");
  auto what = [](const char* uri) {
    try {
      ZooKeeperServerSet set(ScalesUriParser::Parse(uri));
      ADD_FAILURE() << uri;
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  for (const std::string& message :
       {what("zk://a:1/svc?auth=digest:user:s3cret&bogus=1"),           // an option error
        what("zk://a:1/?auth=digest:user:s3cret"),                      // no path
        what("zk://a:1/svc?auth=digest:user:s3cret&session_timeout=1h")}) {
    EXPECT_EQ(message.find("s3cret"), std::string::npos) << message;
    EXPECT_NE(message.find("auth=digest:***"), std::string::npos) << message;
  }
  std::string error;
  EXPECT_FALSE(ScalesUriParser::TryParse("zk://a:99999/svc?auth=digest:user:s3cret", error));  // a parse error
  EXPECT_EQ(error.find("s3cret"), std::string::npos) << error;
  EXPECT_NE(error.find("auth=digest:***"), std::string::npos) << error;
}

// A '#' in a password ended the redaction early: "zk://user:s3c#r3t@h:1/svc" was quoted whole
// (and its "port 's3c'" named), "auth=digest:user:s3c#r3t&x=1" as "auth=digest:***#r3t&x=1".
// The secret is hidden up to its real end: the '@', or the next '&' when what follows the '#' is
// not an endpoint name (a '#' followed by one is the URI's fragment, as the parser takes it).
TEST(ZooKeeperOptionsTest, AHashInAPasswordIsRedactedToItsEnd) {
  EXPECT_EQ(RedactUriSecrets("zk://user:s3c#r3t@h:1/svc"), "zk://***@h:1/svc");
  EXPECT_EQ(RedactUriSecrets("zk://h1:1,user:s3c#r3t@h:1/svc"), "zk://h1:1,***@h:1/svc");
  EXPECT_EQ(RedactUriSecrets("tcp://user:s3c#r3t@h:1"), "tcp://***@h:1");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3c#r3t&session_timeout=3s"),
            "zk://a:1/svc?auth=digest:***&session_timeout=3s");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3c#r3t!"), "zk://a:1/svc?auth=digest:***");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=s3c#r3t#x"), "zk://a:1/svc?auth=***");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc#http?auth=digest:user:s3c#r3t"), "zk://a:1/svc#http?auth=digest:***");
  // What stays: a fragment after the query, and a '#' after the path. A "fragment" followed by a
  // '?' (a second query: the URI does not parse) is in the secret, whose rest it may be
  // ("auth=digest:u:s3c#r3t?x" showed '#r3t?x').
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3cret#http"), "zk://a:1/svc?auth=digest:***#http");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3cret#http?x=1"), "zk://a:1/svc?auth=digest:***");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc#ep@x"), "zk://a:1/svc#ep@x");
  for (const char* uri : {"zk://user:s3c#r3t@h:1/svc", "zk://h1:1,user:s3c#r3t@h:1/svc", "tcp://user:s3c#r3t@h:1",
                          "zk://a:1/svc?auth=digest:user:s3c#r3t&session_timeout=3s",
                          "zk://a:1/svc?session_timeout=3s&auth=digest:user:s3c#r3t&x=1",
                          "zk://a:1/svc?auth=digest:user:s3c#r3t!", "zk://a:1/svc?auth=digest:user:s3c#r3t#x",
                          "zk://a:1/svc#http?auth=digest:user:s3c#r3t"}) {
    std::string error;
    EXPECT_FALSE(ScalesUriParser::TryParse(uri, error)) << uri;
    EXPECT_EQ(error.find("s3c"), std::string::npos) << uri << "\n" << error;
    EXPECT_EQ(error.find("r3t"), std::string::npos) << uri << "\n" << error;
  }
  std::string error;
  EXPECT_FALSE(ScalesUriParser::TryParse("zk://user:s3c#r3t@h:1/svc", error));
  EXPECT_NE(error.find("has user information before the '@'"), std::string::npos) << error;
  EXPECT_FALSE(ScalesUriParser::TryParse("zk://a:1/svc?auth=digest:user:s3c#r3t&session_timeout=3s", error));
  EXPECT_NE(error.find("the auth value ends at the '#' at offset 33, and what follows is not an endpoint name "
                       "(write a '#' in a password as %23)"),
            std::string::npos)
      << error;
  // Written as %23, the '#' is in the password.
  const ParsedUri encoded = ScalesUriParser::Parse("zk://a:1/svc?auth=digest:user:s3c%23r3t&session_timeout=3s");
  EXPECT_EQ(encoded.query.at("auth"), "digest:user:s3c#r3t");
  EXPECT_EQ(RedactUriSecrets(encoded.ToString()).find("s3c"), std::string::npos);
}

// A '?' in a password, as a '#': "zk://user:s3c?r3t@h:1/svc" was quoted whole and its "port 's3c'"
// named. And an '@' in a query value after a '#' is not user information: "zk://h:1#ep?auth=
// digest:u:s3cret@x" was said to have user information, not to miss its path.
TEST(ZooKeeperOptionsTest, AQuestionMarkInAPasswordIsRedactedToItsEnd) {
  EXPECT_EQ(RedactUriSecrets("zk://user:s3c?r3t@h:1/svc"), "zk://***@h:1/svc");
  EXPECT_EQ(RedactUriSecrets("zk://h1:1,user:s3c?r3t@h:1/svc"), "zk://h1:1,***@h:1/svc");
  EXPECT_EQ(RedactUriSecrets("zk://user:s3c#r?3t@h:1/svc"), "zk://***@h:1/svc");
  for (const char* uri : {"zk://user:s3c?r3t@h:1/svc", "zk://h1:1,user:s3c?r3t@[::1]:1/svc", "tcp://user:s3c?r3t@h:1"}) {
    std::string error;
    EXPECT_FALSE(ScalesUriParser::TryParse(uri, error)) << uri;
    EXPECT_NE(error.find("has user information before the '@'"), std::string::npos) << uri << "\n" << error;
    EXPECT_EQ(error.find("s3c"), std::string::npos) << uri << "\n" << error;
    EXPECT_EQ(error.find("r3t"), std::string::npos) << uri << "\n" << error;
  }
  std::string error;
  EXPECT_FALSE(ScalesUriParser::TryParse("zk://h:1#ep?auth=digest:u:s3cret@x", error));
  EXPECT_NE(error.find("a zk:// URI needs a znode path after the hosts at offset 8"), std::string::npos) << error;
  EXPECT_EQ(error.find("user information"), std::string::npos) << error;
  // What stays: an '@' in a query value right after the hosts.
  EXPECT_EQ(ScalesUriParser::Parse("tcp://h:80?tls_server_name=a@b").query.at("tls_server_name"), "a@b");
  EXPECT_EQ(RedactUriSecrets("tcp://h:80?tls_server_name=a@b"), "tcp://h:80?tls_server_name=a@b");
}

// A '&' in a password likewise: "auth=digest:user:s3c&r3t" was redacted as "auth=digest:***&r3t"
// and the parser's message named "query parameter 'r3t'". The secret is hidden up to the next
// key=value (a '&' followed by one is the next parameter, as the parser takes it).
TEST(ZooKeeperOptionsTest, AnAmpersandInAPasswordIsRedactedToItsEnd) {
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3c&r3t"), "zk://a:1/svc?auth=digest:***");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3c&r3t&session_timeout=3s"),
            "zk://a:1/svc?auth=digest:***&session_timeout=3s");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3c&r3t#http"), "zk://a:1/svc?auth=digest:***#http");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?x=1&auth=s3c&=r3t"), "zk://a:1/svc?x=1&auth=***");
  // What stays: a key=value after the auth value.
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=digest:user:s3cret&session_timeout=3s#http"),
            "zk://a:1/svc?auth=digest:***&session_timeout=3s#http");
  EXPECT_EQ(ScalesUriParser::Parse("zk://a:1/svc?auth=digest:user:s3cret&session_timeout=3s").query.at("auth"),
            "digest:user:s3cret");
  for (const char* uri : {"zk://a:1/svc?auth=digest:user:s3c&r3t", "zk://a:1/svc?auth=digest:user:s3c&r3t&session_timeout=3s",
                          "zk://a:1/svc?auth=digest:user:s3c&r3t#http", "zk://a:1/svc?x=1&auth=s3c&=r3t",
                          "zk://a:1/svc?auth=digest:user:s3c&r3t="}) {
    std::string error;
    EXPECT_FALSE(ScalesUriParser::TryParse(uri, error)) << uri;
    EXPECT_NE(error.find("the auth value ends at the '&' at offset "), std::string::npos) << uri << "\n" << error;
    EXPECT_NE(error.find("(write a '&' in a password as %26)"), std::string::npos) << uri << "\n" << error;
    EXPECT_EQ(error.find("s3c"), std::string::npos) << uri << "\n" << error;
    EXPECT_EQ(error.find("r3t"), std::string::npos) << uri << "\n" << error;
  }
}

TEST(ZooKeeperOptionsTest, CreateServerSetRejectsBadOptionsWithoutConnecting) {
  try {
    CreateServerSet(ScalesUriParser::Parse("zk://127.0.0.1:1/svc?unknown=1"));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
    EXPECT_NE(std::string(e.what()).find("unknown"), std::string::npos);
  }
}

// A chroot the C client refuses ("/a//b", "/a/./b", "/a/.."): zookeeper_init2 fails with EINVAL,
// which discovery reported as "the host list is not valid" and retried forever. The URI and the
// struct must refuse it up front, naming the chroot, as they refuse one that ends with '/'.
TEST(ZooKeeperOptionsTest, AChrootTheClientRefusesIsABadUri) {
  for (const char* chroot : {"/a//b", "/a/./b", "/a/..", "/.", "/a/../b"}) {
    const ParsedUri uri = ScalesUriParser::Parse(std::string("zk://127.0.0.1:2181/svc?chroot=") + chroot);
    try {
      ZooKeeperOptions::FromUri(uri);
      ADD_FAILURE() << chroot << " was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri)) << e.what();
      EXPECT_NE(std::string(e.what()).find(std::string("chroot='") + chroot + "'"), std::string::npos)
          << e.what();
    }
    ZooKeeperOptions options;
    options.chroot = chroot;
    try {
      options.Validate();
      ADD_FAILURE() << chroot << " was valid";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
      EXPECT_NE(std::string(e.what()).find(chroot), std::string::npos) << e.what();
    }
  }
  // Still taken: dots inside a segment, a deep chroot.
  for (const char* chroot : {"/a.b/c", "/..a", "/a/b/c"}) {
    const ParsedUri uri = ScalesUriParser::Parse(std::string("zk://127.0.0.1:2181/svc?chroot=") + chroot);
    EXPECT_EQ(ZooKeeperOptions::FromUri(uri).chroot, chroot);
  }
}

// retry_interval is documented "must be > 0 and at most 24 h"; the URI enforced the bound, the
// struct did not (a huge interval overflows the timer's expiry: the retries then spin).
TEST(ZooKeeperOptionsTest, ARetryIntervalOver24HoursIsRefused) {
  ZooKeeperOptions options;
  options.retry_interval = 25h;
  try {
    options.Validate();
    ADD_FAILURE() << "25 h was valid";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
    EXPECT_NE(std::string(e.what()).find("retry_interval"), std::string::npos) << e.what();
  }
  options.retry_interval = std::chrono::milliseconds::max();
  EXPECT_THROW(options.Validate(), Error);
  options.retry_interval = 24h;
  EXPECT_NO_THROW(options.Validate());
}

// retry_interval had no lower bound: retry_interval=1ms made a new session 1,000 times a second
// against an ensemble that rejects it. Under 10 ms is refused, in the URI and in the struct,
// naming the option and the limit.
TEST(ZooKeeperOptionsTest, ARetryIntervalUnder10MsIsRefused) {
  for (const char* value : {"1ms", "9ms"}) {
    const std::string uri = std::string("zk://a:1/svc?retry_interval=") + value;
    try {
      ZooKeeperOptions::FromUri(ScalesUriParser::Parse(uri));
      ADD_FAILURE() << uri << " was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
      EXPECT_THAT(e.what(), ::testing::HasSubstr("bad URI '" + uri + "': retry_interval='" + value +
                                                 "' is under the minimum of 10ms"));
    }
  }
  EXPECT_EQ(ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?retry_interval=10ms")).retry_interval,
            10ms);
  ZooKeeperOptions options;
  options.retry_interval = 9ms;
  try {
    options.Validate();
    ADD_FAILURE() << "9 ms was valid";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
    EXPECT_THAT(e.what(), ::testing::HasSubstr("ZooKeeper options: retry_interval 9ms is under the minimum of 10ms"));
  }
  options.retry_interval = ZooKeeperOptions::kMinRetryInterval;
  EXPECT_NO_THROW(options.Validate());
}

TEST(ZooKeeperOptionsTest, MaxRequestBytesIsBounded) {
  ZooKeeperOptions options;
  EXPECT_EQ(options.max_request_bytes, 0xfffffu);  // ZooKeeper's default jute.maxbuffer
  for (size_t bad : {size_t{0}, ZooKeeperOptions::kMinMaxRequestBytes - 1, size_t{0x80000000}}) {
    options.max_request_bytes = bad;
    try {
      options.Validate();
      ADD_FAILURE() << bad << " was valid";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
      EXPECT_THAT(e.what(), ::testing::HasSubstr(fmt::format(
                                "ZooKeeper options: max_request_bytes {} is not in 4096..2147483647", bad)));
    }
  }
  for (size_t good : {ZooKeeperOptions::kMinMaxRequestBytes, size_t{0x7fffffff}}) {
    options.max_request_bytes = good;
    EXPECT_NO_THROW(options.Validate());
  }
}

// `auth=digest:` (no credentials) is a bad URI; the same value in the struct was taken, and the
// session then failed authentication every retry_interval for good.
TEST(ZooKeeperOptionsTest, AuthWithoutCredentialsIsRefusedInTheStructToo) {
  EXPECT_THROW(ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://127.0.0.1:2181/svc?auth=digest:")), Error);
  ZooKeeperOptions options;
  options.auth = "digest:";
  try {
    options.Validate();
    ADD_FAILURE() << "digest: was valid";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
    EXPECT_NE(std::string(e.what()).find("auth"), std::string::npos) << e.what();
  }
  options.auth = "digest:user:password";
  EXPECT_NO_THROW(options.Validate());
}

// max_retry_interval: parsed from the URI and checked like retry_interval; a value under
// retry_interval is accepted (every retry then waits retry_interval).
TEST(ZooKeeperOptionsTest, MaxRetryIntervalIsParsedAndBounded) {
  EXPECT_EQ(ZooKeeperOptions().max_retry_interval, 60s);
  const ZooKeeperOptions o =
      ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?retry_interval=2s&max_retry_interval=1m"));
  EXPECT_EQ(o.retry_interval, 2s);
  EXPECT_EQ(o.max_retry_interval, 60s);
  EXPECT_NO_THROW(o.Validate());
  for (const char* value : {"5ms", "1441m", "x"}) {
    const std::string uri = std::string("zk://a:1/svc?max_retry_interval=") + value;
    try {
      ZooKeeperOptions::FromUri(ScalesUriParser::Parse(uri));
      ADD_FAILURE() << uri << " was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
      EXPECT_THAT(e.what(), ::testing::HasSubstr(std::string("max_retry_interval='") + value + "' is"));
    }
  }
  ZooKeeperOptions options;
  options.max_retry_interval = 9ms;
  try {
    options.Validate();
    ADD_FAILURE() << "9 ms was valid";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("ZooKeeper options: max_retry_interval 9ms is under the minimum of 10ms"));
  }
  options.max_retry_interval = 25h;
  EXPECT_THROW(options.Validate(), Error);
  options.max_retry_interval = options.retry_interval / 2;  // under retry_interval: no backoff
  EXPECT_NO_THROW(options.Validate());
}

// The waits between retries of a persisting failure: retry_interval, then each in the upper
// half of twice the one before, until max_retry_interval; Reset() starts again.
TEST(ZooKeeperRetryBackoffTest, DoublesWithJitterUpToTheMaximumAndResets) {
  ZooKeeperOptions options;
  options.retry_interval = 100ms;
  options.max_retry_interval = 1000ms;
  zk_internal::RetryBackoff backoff(options, /*seed=*/42);
  EXPECT_EQ(backoff.Next(), 100ms);
  const std::pair<std::chrono::milliseconds, std::chrono::milliseconds> bounds[] = {
      {100ms, 200ms}, {200ms, 400ms}, {400ms, 800ms}};
  for (const auto& [lo, hi] : bounds) {
    const std::chrono::milliseconds wait = backoff.Next();
    EXPECT_GE(wait, lo);
    EXPECT_LE(wait, hi);
  }
  for (int i = 0; i < 100; ++i) EXPECT_EQ(backoff.Next(), 1000ms) << i;  // 1600 ms capped, and no overflow
  EXPECT_EQ(backoff.retries(), 64);
  backoff.Reset();
  EXPECT_EQ(backoff.retries(), 0);
  EXPECT_EQ(backoff.Next(), 100ms);

  // The draws spread: two seeds give different waits somewhere in the jittered steps, and one
  // seed gives the same sequence again.
  auto sequence = [&](uint64_t seed) {
    zk_internal::RetryBackoff b(options, seed);
    std::vector<int64_t> out;
    for (int i = 0; i < 4; ++i) out.push_back(b.Next().count());
    return out;
  };
  EXPECT_EQ(sequence(7), sequence(7));
  std::set<std::vector<int64_t>> seen;
  for (uint64_t seed = 1; seed <= 8; ++seed) seen.insert(sequence(seed));
  EXPECT_GT(seen.size(), 1u);
}

TEST(ZooKeeperRetryBackoffTest, AMaximumNotAboveTheIntervalKeepsTheInterval) {
  ZooKeeperOptions options;
  options.retry_interval = 500ms;
  for (auto max : {500ms, 100ms}) {
    options.max_retry_interval = max;
    zk_internal::RetryBackoff backoff(options, 1);
    for (int i = 0; i < 10; ++i) EXPECT_EQ(backoff.Next(), 500ms) << i;
  }
  // The largest values: 24 h both, no overflow.
  options.retry_interval = 24h;
  options.max_retry_interval = 24h;
  zk_internal::RetryBackoff backoff(options, 1);
  for (int i = 0; i < 70; ++i) EXPECT_EQ(backoff.Next(), 24h) << i;
}

}  // namespace
}  // namespace scales
