// ZooKeeperOptions: parsing from zk:// URIs and validation. Apart from the rest of discovery so
// that what reads only options (the URI fuzzer) need not link the ZooKeeper client.
#include "scales/discovery/zookeeper.h"

#include <algorithm>
#include <charconv>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "scales/core/error.h"

namespace scales {

std::optional<std::chrono::milliseconds> ParseZooKeeperDuration(std::string_view text) {
  int64_t value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr == text.data() || value < 0) return std::nullopt;
  std::string_view unit(ptr, static_cast<size_t>(text.data() + text.size() - ptr));
  const int64_t unit_ms = unit == "ms" ? 1 : unit == "s" ? 1000 : unit == "m" ? 60 * 1000 : 0;
  if (unit_ms == 0) return std::nullopt;
  // At most 24 h whatever the unit (the bound was on the number: 86400001ms was refused and
  // 100000m, 69 days, taken).
  constexpr int64_t kMaxMs = int64_t{24} * 3600 * 1000;
  if (value > kMaxMs / unit_ms) return std::nullopt;
  return std::chrono::milliseconds(value * unit_ms);
}

namespace {

// Why the C client would refuse `chroot` (it checks it as a znode path: zookeeper_init fails with
// EINVAL, which reads as a bad host list), or empty if it is fine.
std::string ChrootProblem(std::string_view chroot) {
  if (!chroot.starts_with('/') || chroot.size() < 2 || chroot.ends_with('/')) {
    return "must start with '/' and not end with '/'";
  }
  for (size_t begin = 1; begin <= chroot.size();) {
    size_t end = std::min(chroot.find('/', begin), chroot.size());
    std::string_view segment = chroot.substr(begin, end - begin);
    if (segment.empty()) return "has an empty segment ('//')";
    if (segment == "." || segment == "..") return fmt::format("has a relative segment '{}'", segment);
    begin = end + 1;
  }
  return {};
}

}  // namespace

ZooKeeperOptions ZooKeeperOptions::FromUri(const ParsedUri& uri, ZooKeeperOptions defaults) {
  auto bad = [&](const std::string& why) {
    return Error(make_error_code(Errc::kBadUri),
                 fmt::format("bad URI '{}': {}", RedactUriSecrets(uri.ToString()), why));
  };
  if (uri.scheme != "zk") throw bad("not a zk:// URI");
  ZooKeeperOptions out = std::move(defaults);
  for (const auto& [key, value] : uri.query) {
    if (key == "session_timeout" || key == "retry_interval" || key == "max_retry_interval") {
      auto d = ParseZooKeeperDuration(value);
      if (!d || d->count() == 0) {
        // Digits and a unit, but over the parser's bound (Validate()'s for session_timeout).
        const std::string_view v(value);
        const size_t digits = v.find_first_not_of("0123456789");
        const std::string_view unit = digits == 0 || digits == v.npos ? std::string_view() : v.substr(digits);
        const bool over = !d && (unit == "ms" || unit == "s" || unit == "m");
        throw bad(over ? fmt::format("{}='{}' is over 24 h", key, value)
                       : fmt::format("{}='{}' is not a positive duration such as 500ms, 10s or 1m", key, value));
      }
      if (key != "session_timeout" && *d < kMinRetryInterval) {
        throw bad(fmt::format("{}='{}' is under the minimum of {}ms", key, value,
                              kMinRetryInterval.count()));
      }
      (key == "session_timeout"  ? out.session_timeout
       : key == "retry_interval" ? out.retry_interval
                                 : out.max_retry_interval) = *d;
    } else if (key == "chroot") {
      if (std::string problem = ChrootProblem(value); !problem.empty()) {
        throw bad(fmt::format("chroot='{}' {}", value, problem));
      }
      out.chroot = value;
    } else if (key == "auth") {
      auto colon = value.find(':');
      if (colon == std::string::npos || colon == 0 || colon + 1 == value.size()) {
        // Not quoting the value: after a ':' it is a secret, hidden in the URI quoted above.
        throw bad("auth must be scheme:credentials, e.g. digest:user:password");
      }
      out.auth = value;
    } else if (key == "tls" || key.starts_with("tls_") || key == "opportunistic_tls") {
      // The client's TLS options (ApplyTlsQuery; opportunistic_tls for ThriftMux), not
      // discovery's: the ZooKeeper connection itself is not encrypted.
    } else {
      throw bad(
          fmt::format("unknown option '{}' (known: session_timeout, chroot, auth, "
                      "retry_interval, max_retry_interval, tls, tls_*, opportunistic_tls)",
                      key));
    }
  }
  return out;
}

ZooKeeperOptions ZooKeeperOptions::FromUri(const ParsedUri& uri) {
  return FromUri(uri, ZooKeeperOptions());
}

void ZooKeeperOptions::Validate() const {
  auto invalid = [](const std::string& why) {
    return Error(make_error_code(Errc::kInvalidArgument), "ZooKeeper options: " + why);
  };
  if (session_timeout <= std::chrono::milliseconds::zero()) {
    throw invalid("session_timeout must be positive");
  }
  if (session_timeout > std::chrono::hours(24)) throw invalid("session_timeout is over 24 h");
  if (retry_interval <= std::chrono::milliseconds::zero()) {
    throw invalid("retry_interval must be positive");
  }
  if (retry_interval < kMinRetryInterval) {
    throw invalid(fmt::format("retry_interval {}ms is under the minimum of {}ms", retry_interval.count(),
                              kMinRetryInterval.count()));
  }
  if (retry_interval > std::chrono::hours(24)) throw invalid("retry_interval is over 24 h");
  if (max_retry_interval < kMinRetryInterval) {
    throw invalid(fmt::format("max_retry_interval {}ms is under the minimum of {}ms",
                              max_retry_interval.count(), kMinRetryInterval.count()));
  }
  if (max_retry_interval > std::chrono::hours(24)) throw invalid("max_retry_interval is over 24 h");
  if (std::string problem = chroot.empty() ? "" : ChrootProblem(chroot); !problem.empty()) {
    throw invalid(fmt::format("chroot '{}' {}", chroot, problem));
  }
  if (!auth.empty()) {
    auto colon = auth.find(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == auth.size()) {
      throw invalid("auth must be scheme:credentials (digest:user:password)");
    }
  }
  if (max_request_bytes < kMinMaxRequestBytes || max_request_bytes > 0x7fffffff) {
    throw invalid(fmt::format("max_request_bytes {} is not in {}..2147483647 (the servers' jute.maxbuffer)",
                              max_request_bytes, kMinMaxRequestBytes));
  }
}

std::string ZooKeeperOptions::ConnectString(const ParsedUri& uri) const {
  std::string out;
  for (size_t i = 0; i < uri.hosts.size(); ++i) {
    if (i) out += ',';
    // The C client splits host and port at the last ':' and resolves the host as written:
    // an IPv6 literal goes in without its URI brackets ("::1:2181"), which getaddrinfo would
    // not take.
    out += fmt::format("{}:{}", uri.hosts[i].host, uri.hosts[i].port);
  }
  return out + chroot;
}

}  // namespace scales
