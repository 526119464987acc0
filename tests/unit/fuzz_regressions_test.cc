// Hostile inputs for the decoders that read network and ZooKeeper bytes, as plain tests in the
// normal suite: inputs the fuzz targets of fuzz/ (scripts/fuzz.sh) found or that pin the limits
// those targets rely on. A reproducer saved by scripts/fuzz.sh that shows a real bug becomes a
// test here, with its bytes inline and a note on what went wrong.

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scales/core/error.h"
#include "scales/discovery/serverset_member.h"
#include "scales/discovery/uri.h"
#include "scales/discovery/zookeeper.h"
#include "scales/mux/codec.h"
#include "scales/thrift/message.h"

namespace scales {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string Raw(std::string_view s) { return std::string(s); }

// A Mux frame header: size field, type, tag (with the fragment bit when `fragment`).
std::string Header(uint32_t size, uint8_t type, uint32_t tag, bool fragment = false) {
  if (fragment) tag |= mux::kFragmentBit;
  return {static_cast<char>(size >> 24), static_cast<char>(size >> 16), static_cast<char>(size >> 8),
          static_cast<char>(size),       static_cast<char>(type),       static_cast<char>(tag >> 16),
          static_cast<char>(tag >> 8),   static_cast<char>(tag)};
}

TEST(FuzzRegressionsTest, MuxTwoGibLengthPrefixFailsAsSoonAsItsHeaderIsIn) {
  mux::FrameDecoder decoder;  // default limit 32 MiB
  std::string bytes = Header(0x80000000u, mux::wire::kRdispatch, 2) + std::string(100, 'x');
  for (size_t i = 0; i < mux::kHeaderSize; ++i) {  // a byte at a time, as a slow peer sends them
    decoder.Feed(&bytes[i], 1);
    auto next = decoder.Next();
    if (i + 1 < mux::kHeaderSize) {
      ASSERT_TRUE(next);
      EXPECT_FALSE(next->has_value());
      continue;
    }
    ASSERT_FALSE(next);
    EXPECT_THAT(next.error().detail, HasSubstr("frame size 2147483648 exceeds the limit of 33554432 bytes"));
    EXPECT_THAT(next.error().detail, HasSubstr("stream offset 0"));
  }
  decoder.Feed(bytes.substr(mux::kHeaderSize));
  EXPECT_FALSE(decoder.Next());  // stays failed
}

TEST(FuzzRegressionsTest, MuxFrameJustOverTheLimitIsRejectedAndOneAtItIsNot) {
  mux::FrameDecoder decoder(64);
  decoder.Feed(Header(64, mux::wire::kRdispatch, 2) + std::string(60, '\0'));
  auto ok = decoder.Next();
  ASSERT_TRUE(ok);
  ASSERT_TRUE(ok->has_value());
  EXPECT_EQ((**ok).body.size(), 60u);
  decoder.Feed(Header(65, mux::wire::kRdispatch, 2));
  auto bad = decoder.Next();
  ASSERT_FALSE(bad);
  EXPECT_THAT(bad.error().detail, HasSubstr("frame size 65 exceeds the limit of 64 bytes"));
  EXPECT_THAT(bad.error().detail, HasSubstr("stream offset 68"));
}

TEST(FuzzRegressionsTest, MuxEndlessFragmentsStopAtThePerTagLimitAndFreeTheTag) {
  mux::Reassembler reassembler(1000);
  int accepted = 0;
  for (;; ++accepted) {
    auto r = reassembler.Add(mux::Frame{mux::wire::kRdispatch, 5, true, std::string(300, 'f')});
    if (!r) {
      EXPECT_THAT(r.error().detail, HasSubstr("Rdispatch tag 5: 1200 buffered fragment bytes exceed the limit of 1000"));
      break;
    }
    ASSERT_FALSE(r->has_value());
    ASSERT_LT(accepted, 10);
  }
  EXPECT_EQ(accepted, 3);
  EXPECT_EQ(reassembler.pending_tags(), 0u);  // what it held is released
  EXPECT_EQ(reassembler.buffered_bytes(5), 0u);
}

TEST(FuzzRegressionsTest, MuxContextCountBeyondTheBodyIsATruncationNotAnAllocation) {
  // Rdispatch Ok claiming 65535 contexts in a 3-byte body.
  auto m = mux::DecodeMessage(mux::wire::kRdispatch, 2, Raw(std::string_view("\x00\xff\xff", 3)));
  ASSERT_FALSE(m);
  EXPECT_THAT(m.error().detail, HasSubstr("truncated context key"));
}

TEST(FuzzRegressionsTest, ThriftHugeContainerCountsNeedMoreBytesInsteadOfAllocating) {
  // REPLY "m" whose struct has field 0: a list of 2^31-1 i64 (binary), 21 bytes in all.
  std::string binary = Raw(std::string_view("\x80\x01\x00\x02\x00\x00\x00\x01m\x00\x00\x00\x01"
                                            "\x0f\x00\x00\x0a\x7f\xff\xff\xff",
                                            21));
  EXPECT_EQ(thrift::ScanMessage(binary).status, thrift::MessageScan::Status::kNeedMore);
  // Compact: a map of 2^32-1 entries.
  std::string compact = Raw(std::string_view("\x82\x41\x01\x01m\x1b\xff\xff\xff\xff\x0f\x66", 12));
  EXPECT_EQ(thrift::ScanMessage(compact).status, thrift::MessageScan::Status::kNeedMore);
  // A negative binary list size is malformed.
  binary[17] = '\x80';
  auto scan = thrift::ScanMessage(binary);
  EXPECT_EQ(scan.status, thrift::MessageScan::Status::kMalformed);
  EXPECT_THAT(scan.error, HasSubstr("negative list size"));
}

TEST(FuzzRegressionsTest, ThriftDeepNestingIsMalformedNotAStackOverflow) {
  // REPLY "m" whose struct nests 10000 structs in field 1 (binary: 0c 00 01 repeated).
  std::string bytes = Raw(std::string_view("\x80\x01\x00\x02\x00\x00\x00\x01m\x00\x00\x00\x01", 13));
  for (int i = 0; i < 10000; ++i) bytes += Raw(std::string_view("\x0c\x00\x01", 3));
  auto scan = thrift::ScanMessage(bytes);
  EXPECT_EQ(scan.status, thrift::MessageScan::Status::kMalformed);
  EXPECT_THAT(scan.error, HasSubstr("nesting deeper than 64"));
}

TEST(FuzzRegressionsTest, ServersetMemberDeepJsonIsAnErrorNotAStackOverflow) {
  std::string json = "{\"serviceEndpoint\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  std::string error;
  EXPECT_FALSE(ParseServiceInstance(json, error));
  EXPECT_FALSE(error.empty());
}

TEST(FuzzRegressionsTest, UriWithAHugePortOrManyHostsFailsOrParsesCleanly) {
  std::string error;
  EXPECT_FALSE(ScalesUriParser::TryParse("tcp://a:" + std::string(400, '9'), error));
  EXPECT_THAT(error, HasSubstr("out of range"));
  std::string many = "tcp://a:1";
  for (int i = 0; i < 5000; ++i) many += ",h" + std::to_string(i) + ":1";
  auto parsed = ScalesUriParser::TryParse(many, error);
  ASSERT_TRUE(parsed) << error;
  EXPECT_EQ(parsed->hosts.size(), 5001u);
}

// uri_fuzzer: an auth value without a scheme (":secret") is refused, and the refusal quoted the
// value, secret and all, next to the URI that hides it ("auth=:***").
TEST(FuzzRegressionsTest, ZooKeeperAuthWithoutASchemeIsRefusedWithoutQuotingItsSecret) {
  try {
    ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?auth=:s3cret"));
    ADD_FAILURE() << "an auth without a scheme was taken";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
    EXPECT_THAT(e.what(), HasSubstr("'zk://a:1/svc?auth=:***'"));
    EXPECT_THAT(e.what(), HasSubstr("auth must be scheme:credentials"));
    EXPECT_THAT(e.what(), Not(HasSubstr("s3cret")));
  }
}

// An auth value with no ':' at all is most likely a password written without "digest:user:":
// the refusal quoted it in the URI (only what follows a scheme's ':' was hidden).
TEST(FuzzRegressionsTest, ZooKeeperAuthWithNoColonIsRefusedWithoutQuotingIt) {
  try {
    ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?auth=s3cret&chroot=/p"));
    ADD_FAILURE() << "an auth without a scheme was taken";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
    EXPECT_THAT(e.what(), HasSubstr("'zk://a:1/svc?auth=***&chroot=/p'"));
    EXPECT_THAT(e.what(), Not(HasSubstr("s3cret")));
  }
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?auth=&x=1"), "zk://a:1/svc?auth=&x=1");
  EXPECT_EQ(RedactUriSecrets("zk://a:1/svc?x=1&auth=pw"), "zk://a:1/svc?x=1&auth=***");
}

// uri_fuzzer: a session_timeout over 24 h in other units than ms ("1500m") passed FromUri and
// failed only in Validate(), as kInvalidArgument without the URI or the parameter's value.
TEST(FuzzRegressionsTest, ZooKeeperSessionTimeoutOver24HoursIsABadUri) {
  const ParsedUri uri = ScalesUriParser::Parse("zk://a:1/svc?session_timeout=1500m");
  try {
    ZooKeeperOptions::FromUri(uri);
    ADD_FAILURE() << "a session timeout over 24 h was taken";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kBadUri));
    EXPECT_THAT(e.what(), HasSubstr("bad URI 'zk://a:1/svc?session_timeout=1500m': session_timeout='1500m' is over 24 h"));
  }
  const ZooKeeperOptions at_limit = ZooKeeperOptions::FromUri(ScalesUriParser::Parse("zk://a:1/svc?session_timeout=1440m"));
  EXPECT_EQ(at_limit.session_timeout, std::chrono::hours(24));
  EXPECT_NO_THROW(at_limit.Validate());
}

}  // namespace
}  // namespace scales
