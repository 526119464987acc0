#include "scales/discovery/uri.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstddef>
#include <utility>

#include <fmt/format.h>

#include "scales/core/error.h"

namespace scales {
namespace {

// Offsets in error messages are 0-based byte offsets into the URI as given.

constexpr std::string_view kSchemeSeparator = "://";
constexpr int kMaxPort = 65535;
constexpr uint16_t kHttpsPort = 443;
constexpr size_t kMaxHostNameLength = 253;

bool IsAsciiAlnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsHexDigit(char c) { return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
int HexValue(char c) { return IsDigit(c) ? c - '0' : (c | 0x20) - 'a' + 10; }
bool IsHostNameChar(char c) { return IsAsciiAlnum(c) || c == '-' || c == '.' || c == '_'; }
// Characters of IPv6 zone ids ("eth0") and zk endpoint names ("http", "thrift-admin").
bool IsNameChar(char c) { return IsAsciiAlnum(c) || c == '-' || c == '.' || c == '_'; }

std::string AsciiLower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// Whether the last host entry of `hosts` ("a:1,user:pa") ends in a colon and what is not a port
// (no digits, or anything but digits): a password's colon, when an '@' follows. A bracketed IPv6
// address without a port ("[::1]") is not.
bool InPassword(std::string_view hosts) {
  const size_t comma = hosts.rfind(',');
  const std::string_view entry = comma == std::string_view::npos ? hosts : hosts.substr(comma + 1);
  const size_t colon = entry.rfind(':');
  if (colon == std::string_view::npos || entry.ends_with(']')) return false;
  const std::string_view port = entry.substr(colon + 1);
  return port.empty() || !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Where the hosts of a URI that start at `begin` end: at the first '/', '?' or '#'; but a '#'
// or '?' with an '@' after it (before the path, and with no '=' between) is in user information
// ("user:pa#ss@host", "user:pa?ss@host"), which no fragment or query key has, so the hosts go on
// past that '@' (and the password is not quoted as a host or port). An '@' in a query value
// ("#ep?auth=digest:u:p@ss", "?tls_server_name=a@b") is not.
//
// Nor does a '/', '?' or '#' end them right after a host entry whose port is not a number
// ("user:pa/ss@host", "user:p#=w@host"), when an '@' follows with no '&' or "auth=" before it:
// that is a password's colon, and the password goes on to the '@' (a host with such a port fails
// to parse whichever way).
size_t HostsEnd(std::string_view uri, size_t begin) {
  for (size_t pos = begin;;) {
    const size_t end = uri.find_first_of("/?#", pos);
    if (end == std::string_view::npos) return uri.size();
    const size_t at = uri.find('@', end + 1);
    if (at == std::string_view::npos) return end;
    // Not across a query's pairs or an auth value (whose '@' RedactUriSecrets hides, which must
    // find the same hosts in what it returns).
    const std::string_view until_at = uri.substr(end + 1, at - end - 1);
    const bool password = InPassword(uri.substr(pos, end - pos)) && until_at.find('&') == std::string_view::npos &&
                          until_at.find("auth=") == std::string_view::npos;
    if (!password) {
      if (uri[end] == '/') return end;
      if (at >= uri.find('/', end + 1) || uri.find('=', end + 1) < at) return end;
    }
    pos = at + 1;
  }
}

// Whether the '#' at `hash` starts what the parser takes as a zk:// fragment: an endpoint name
// up to a '?' or the end. Any other '#' in an auth value is in the secret ("pa#ss&x=1").
bool StartsFragment(std::string_view uri, size_t hash) {
  const size_t end = std::min(uri.find('?', hash), uri.size());
  if (end == hash + 1) return false;
  return std::all_of(uri.begin() + hash + 1, uri.begin() + end, IsNameChar);
}

// Whether `pair` (between two '&') is a query parameter the parser takes: key=value, both
// non-empty. Any other after an auth value is in the secret ("auth=digest:u:pa&ss").
bool IsQueryPair(std::string_view pair) {
  const size_t eq = pair.find('=');
  return eq != std::string_view::npos && eq != 0 && eq + 1 != pair.size();
}

// Describes a character that is not printable in a message ("'@'" or "0x0a").
std::string DescribeChar(char c) {
  auto u = static_cast<unsigned char>(c);
  if (u < 0x20 || u >= 0x7f) return fmt::format("byte 0x{:02x}", u);
  return fmt::format("'{}'", c);
}

// Parses one URI. Each Parse* step returns an empty string on success and the problem
// (without the "bad URI '...': " prefix) on failure.
class UriParser {
 public:
  explicit UriParser(std::string_view uri) : uri_(uri) {}

  std::string Parse(ParsedUri& out) {
    if (uri_.empty()) return "the URI is empty";
    for (size_t i = 0; i < uri_.size(); ++i) {
      auto u = static_cast<unsigned char>(uri_[i]);
      if (uri_[i] == ' ') return fmt::format("unexpected space at offset {}", i);
      if (u < 0x20 || u == 0x7f) {
        return fmt::format("unexpected control character 0x{:02x} at offset {}", u, i);
      }
    }

    size_t sep = uri_.find(kSchemeSeparator);
    if (sep == std::string_view::npos) {
      return "missing '://' after the scheme (expected tcp://host:port[,host:port...], "
             "https://host[:port][,...] or zk://host:port[,host:port...]/path)";
    }
    if (sep == 0) return "missing scheme before '://' (supported: tcp, https, zk)";
    out.scheme = AsciiLower(uri_.substr(0, sep));
    if (out.scheme != "tcp" && out.scheme != "zk" && out.scheme != "https") {
      return fmt::format("unsupported scheme '{}' (supported: tcp, https, zk)", uri_.substr(0, sep));
    }
    const bool zk = out.scheme == "zk";
    const bool https = out.scheme == "https";
    if (https) default_port_ = kHttpsPort;

    size_t hosts_begin = sep + kSchemeSeparator.size();
    size_t hosts_end = HostsEnd(uri_, hosts_begin);
    if (auto err = ParseHosts(hosts_begin, hosts_end, out.hosts); !err.empty()) return err;

    if (zk) return ParseZkRest(hosts_end, out);
    if (auto err = ParseTcpRest(hosts_end, out); !err.empty()) return err;
    if (https) {
      // https:// is tcp:// with TLS on: the same static server set, so discovery needs
      // nothing new; the transports read `tls` from the query.
      auto [it, inserted] = out.query.emplace("tls", "on");
      if (!inserted && it->second != "on" && it->second != "true" && it->second != "1") {
        return fmt::format("tls={} contradicts the https:// scheme", it->second);
      }
      it->second = "on";
      out.scheme = "tcp";
    }
    return {};
  }

 private:
  std::string ParseHosts(size_t begin, size_t end, std::vector<Endpoint>& hosts) {
    if (begin == end) {
      return fmt::format("no hosts after '://' at offset {} (expected host:port[,host:port...])",
                         begin);
    }
    int n = 1;
    size_t pos = begin;
    while (true) {
      size_t comma = uri_.find(',', pos);
      size_t entry_end = (comma == std::string_view::npos || comma > end) ? end : comma;
      Endpoint ep;
      if (auto err = ParseHostPort(pos, entry_end, n, ep); !err.empty()) return err;
      hosts.push_back(std::move(ep));
      if (entry_end == end) break;
      pos = entry_end + 1;
      ++n;
    }
    return {};
  }

  // Parses uri_[begin, end), the n-th (1-based) "host:port" or "[v6]:port" entry.
  std::string ParseHostPort(size_t begin, size_t end, int n, Endpoint& ep) {
    std::string_view entry = uri_.substr(begin, end - begin);
    if (entry.empty()) return fmt::format("host {} is empty (at offset {})", n, begin);

    std::string_view host_text;  // as written, for messages ("a", "[::1]")
    std::string_view port_text;
    size_t port_offset = 0;
    if (entry.front() == '[') {
      size_t close = entry.find(']');
      if (close == std::string_view::npos) {
        return fmt::format("host {} ('{}') at offset {} has no closing ']'", n, entry, begin);
      }
      host_text = entry.substr(0, close + 1);
      std::string_view literal = entry.substr(1, close - 1);
      if (auto err = ValidateIpv6(literal, n, begin + 1); !err.empty()) return err;
      std::string_view rest = entry.substr(close + 1);
      if (rest.empty() && default_port_ != 0) {
        ep.host = std::string(literal);
        ep.port = default_port_;
        return {};
      }
      if (rest.empty()) {
        return fmt::format("host {} ('{}') has no port (expected [address]:port)", n, entry);
      }
      if (rest.front() != ':') {
        return fmt::format(
            "host {} ('{}') has unexpected {} after ']' at offset {} (expected ':port')", n, entry,
            DescribeChar(rest.front()), begin + close + 1);
      }
      ep.host = std::string(literal);
      port_text = rest.substr(1);
      port_offset = begin + close + 2;
    } else {
      if (size_t at = entry.rfind('@'); at != std::string_view::npos) {
        // user:password@host:port: said as such (with two colons it read as an unbracketed
        // IPv6 address), and without quoting what comes before the '@' (a password).
        return fmt::format(
            "host {} at offset {} has user information before the '@' at offset {} ('***@{}'), "
            "which scales URIs do not take",
            n, begin, begin + at, entry.substr(at + 1));
      }
      size_t colons = std::count(entry.begin(), entry.end(), ':');
      if (colons == 0 && default_port_ != 0) {
        if (auto err = ValidateHostName(entry, n, begin); !err.empty()) return err;
        ep.host = std::string(entry);
        ep.port = default_port_;
        return {};
      }
      if (colons == 0) {
        return fmt::format("host {} ('{}') at offset {} has no port (expected host:port)", n, entry,
                           begin);
      }
      if (colons > 1) {
        return fmt::format(
            "host {} ('{}') at offset {} looks like an unbracketed IPv6 address (write it as "
            "[address]:port)",
            n, entry, begin);
      }
      size_t colon = entry.find(':');
      host_text = entry.substr(0, colon);
      if (host_text.empty()) {
        return fmt::format("host {} ('{}') at offset {} has an empty host name", n, entry, begin);
      }
      if (auto err = ValidateHostName(host_text, n, begin); !err.empty()) return err;
      ep.host = std::string(host_text);
      port_text = entry.substr(colon + 1);
      port_offset = begin + colon + 1;
    }
    return ParsePort(port_text, port_offset, n, host_text, ep.port);
  }

  std::string ParsePort(std::string_view text, size_t offset, int n, std::string_view host,
                        uint16_t& port) {
    if (text.empty()) {
      return fmt::format("host {} ('{}') has an empty port at offset {} (expected host:port)", n,
                         host, offset);
    }
    int value = 0;
    for (size_t i = 0; i < text.size(); ++i) {
      if (!IsDigit(text[i])) {
        return fmt::format("port '{}' of host {} ('{}') is not a decimal number ({} at offset {})",
                           text, n, host, DescribeChar(text[i]), offset + i);
      }
      // Saturate: anything above kMaxPort is reported as out of range below.
      value = std::min(value * 10 + (text[i] - '0'), kMaxPort + 1);
    }
    if (value < 1 || value > kMaxPort) {
      return fmt::format("port '{}' of host {} ('{}') is out of range 1..{}", text, n, host,
                         kMaxPort);
    }
    port = static_cast<uint16_t>(value);
    return {};
  }

  // `literal` is the text between the brackets, starting at `offset` in the URI.
  std::string ValidateIpv6(std::string_view literal, int n, size_t offset) {
    if (literal.empty()) {
      return fmt::format("host {} has an empty IPv6 address '[]' at offset {}", n, offset - 1);
    }
    size_t percent = literal.find('%');
    std::string_view addr = literal.substr(0, percent);
    for (size_t i = 0; i < addr.size(); ++i) {
      if (!IsHexDigit(addr[i]) && addr[i] != ':' && addr[i] != '.') {
        return fmt::format(
            "host {} ('[{}]') has invalid character {} at offset {} (an IPv6 address has hex "
            "digits, ':' and '.')",
            n, literal, DescribeChar(addr[i]), offset + i);
      }
    }
    if (percent != std::string_view::npos) {
      std::string_view zone = literal.substr(percent + 1);
      if (zone.empty()) {
        return fmt::format("host {} ('[{}]') has an empty zone after '%' at offset {}", n, literal,
                           offset + percent);
      }
      for (size_t i = 0; i < zone.size(); ++i) {
        if (!IsNameChar(zone[i])) {
          return fmt::format("host {} ('[{}]') has invalid character {} in its zone at offset {}",
                             n, literal, DescribeChar(zone[i]), offset + percent + 1 + i);
        }
      }
    }
    in6_addr parsed;
    if (inet_pton(AF_INET6, std::string(addr).c_str(), &parsed) != 1) {
      return fmt::format("host {} ('[{}]') at offset {} is not a valid IPv6 address", n, literal,
                         offset - 1);
    }
    return {};
  }

  // Host names (letters, digits, '-', '.', '_'; one trailing '.' allowed) and IPv4 literals.
  std::string ValidateHostName(std::string_view host, int n, size_t offset) {
    for (size_t i = 0; i < host.size(); ++i) {
      if (!IsHostNameChar(host[i])) {
        return fmt::format(
            "host {} ('{}') has invalid character {} at offset {} (host names use letters, "
            "digits, '-', '.' and '_'; IPv6 addresses need brackets)",
            n, host, DescribeChar(host[i]), offset + i);
      }
    }
    if (host.size() > kMaxHostNameLength) {
      return fmt::format("host {} at offset {} is longer than {} characters", n, offset,
                         kMaxHostNameLength);
    }
    bool looks_like_ipv4 =
        std::any_of(host.begin(), host.end(), IsDigit) &&
        std::all_of(host.begin(), host.end(), [](char c) { return IsDigit(c) || c == '.'; });
    if (looks_like_ipv4) {
      in_addr parsed;
      if (inet_pton(AF_INET, std::string(host).c_str(), &parsed) != 1) {
        return fmt::format("host {} ('{}') at offset {} is not a valid IPv4 address", n, host,
                           offset);
      }
      return {};
    }
    std::string_view labels = host;
    if (labels.size() > 1 && labels.back() == '.') labels.remove_suffix(1);  // FQDN "a.b."
    for (size_t i = 0; i < labels.size(); ++i) {
      bool label_start = i == 0 || labels[i - 1] == '.';
      if (labels[i] == '.' && label_start) {
        return fmt::format("host {} ('{}') has an empty label at offset {}", n, host, offset + i);
      }
    }
    if (labels.back() == '.') {
      return fmt::format("host {} ('{}') has an empty label at offset {}", n, host,
                         offset + labels.size());
    }
    return {};
  }

  // The part after the hosts of a tcp:// or https:// URI: an ignored path, then an optional
  // ?query (per-client options such as tls=on). No fragment.
  std::string ParseTcpRest(size_t pos, ParsedUri& out) {
    size_t h = uri_.find('#', pos);
    if (h != std::string_view::npos) {
      return fmt::format("fragment ('#' at offset {}) is only allowed in zk:// URIs", h);
    }
    size_t q = uri_.find('?', pos);
    if (q == std::string_view::npos) return {};
    if (size_t again = uri_.find('?', q + 1); again != std::string_view::npos) {
      return fmt::format("second '?' at offset {}", again);
    }
    if (auto err = ParseQuery(q + 1, uri_.size(), out); !err.empty()) return err;
    // Only the transports' TLS keys (each client checks their names and values): anything else,
    // a mistyped `TLS=on` say, would leave the connection in clear without a word.
    for (const auto& [key, value] : out.query) {
      if (key != "tls" && !key.starts_with("tls_")) {
        return fmt::format(
            "unknown query parameter '{}' (a tcp:// or https:// URI takes only the TLS keys: "
            "tls, tls_ca_file, tls_server_name, tls_cert_file, tls_key_file, tls_verify, "
            "tls_resume_sessions; "
            "ThriftMux also opportunistic_tls)",
            key);
      }
    }
    return {};
  }

  // The part after the hosts of a zk:// URI: /path[#endpoint][?query] (either order of
  // fragment and query is accepted).
  std::string ParseZkRest(size_t pos, ParsedUri& out) {
    if (pos == uri_.size() || uri_[pos] != '/') {
      return fmt::format(
          "a zk:// URI needs a znode path after the hosts at offset {} "
          "(expected zk://host:port/path)",
          pos);
    }
    size_t path_end = uri_.find_first_of("?#", pos);
    if (path_end == std::string_view::npos) path_end = uri_.size();
    if (auto err = ValidateZkPath(pos, path_end); !err.empty()) return err;
    out.path = std::string(uri_.substr(pos, path_end - pos));

    bool have_fragment = false;
    bool have_query = false;
    pos = path_end;
    while (pos < uri_.size()) {
      char c = uri_[pos];
      size_t end = uri_.find(c == '#' ? '?' : '#', pos + 1);
      if (end == std::string_view::npos) end = uri_.size();
      // A second '?' or '#' ends up inside the part; report it where it is.
      size_t again = uri_.find(c, pos + 1);
      if (again != std::string_view::npos && again < end) end = again;
      if (c == '#') {
        if (have_fragment) return fmt::format("second '#' at offset {}", pos);
        have_fragment = true;
        // After "auth=...", a '#' not followed by an endpoint name is in the password: say so
        // without quoting the rest of it (RedactUriSecrets hides it up to the next '&').
        if (const size_t pair = uri_.find_last_of("?&", pos); have_query && pair != std::string_view::npos &&
                                                             uri_.substr(pair + 1, 5) == "auth=" &&
                                                             !StartsFragment(uri_, pos)) {
          return fmt::format("the auth value ends at the '#' at offset {}, and what follows is not an endpoint "
                             "name (write a '#' in a password as %23)",
                             pos);
        }
        if (auto err = ParseFragment(pos + 1, end, out); !err.empty()) return err;
      } else {
        if (have_query) return fmt::format("second '?' at offset {}", pos);
        have_query = true;
        if (auto err = ParseQuery(pos + 1, end, out); !err.empty()) return err;
      }
      pos = end;
    }
    return {};
  }

  std::string ValidateZkPath(size_t begin, size_t end) {
    std::string_view path = uri_.substr(begin, end - begin);
    if (path == "/") {
      return fmt::format(
          "znode path must not be the root '/' at offset {} (expected zk://host:port/path)", begin);
    }
    // Each '/' starts a segment; segments must be non-empty and not relative.
    for (size_t i = 0; i < path.size(); ++i) {
      if (path[i] != '/') continue;
      size_t next = path.find('/', i + 1);
      if (next == std::string_view::npos) next = path.size();
      std::string_view segment = path.substr(i + 1, next - i - 1);
      if (segment.empty()) {
        if (next == path.size()) {
          return fmt::format("znode path '{}' ends with '/' at offset {}", path, begin + i);
        }
        return fmt::format("znode path '{}' has an empty segment ('//') at offset {}", path,
                           begin + i);
      }
      if (segment == "." || segment == "..") {
        return fmt::format("znode path '{}' has a relative segment '{}' at offset {}", path,
                           segment, begin + i + 1);
      }
    }
    return {};
  }

  std::string ParseFragment(size_t begin, size_t end, ParsedUri& out) {
    std::string_view name = uri_.substr(begin, end - begin);
    if (name.empty()) return fmt::format("empty endpoint name after '#' at offset {}", begin - 1);
    for (size_t i = 0; i < name.size(); ++i) {
      if (!IsNameChar(name[i])) {
        return fmt::format(
            "endpoint name '{}' has invalid character {} at offset {} (use letters, digits, "
            "'-', '.' and '_')",
            name, DescribeChar(name[i]), begin + i);
      }
    }
    out.endpoint_name = std::string(name);
    return {};
  }

  std::string ParseQuery(size_t begin, size_t end, ParsedUri& out) {
    if (begin == end) return fmt::format("empty query after '?' at offset {}", begin - 1);
    size_t pos = begin;
    bool after_auth = false;
    while (true) {
      size_t amp = uri_.find('&', pos);
      size_t pair_end = (amp == std::string_view::npos || amp > end) ? end : amp;
      std::string_view pair = uri_.substr(pos, pair_end - pos);
      if (pair.empty()) return fmt::format("empty query parameter at offset {}", pos);
      size_t eq = pair.find('=');
      // After "auth=...", a '&' not followed by key=value is in the password: say so without
      // quoting the rest of it (RedactUriSecrets hides it up to the next key=value).
      if (after_auth && !IsQueryPair(pair)) {
        return fmt::format("the auth value ends at the '&' at offset {}, and what follows is not key=value "
                           "(write a '&' in a password as %26)",
                           pos - 1);
      }
      after_auth = pair.starts_with("auth=");
      if (eq == 0) {
        return fmt::format("query parameter '{}' at offset {} has an empty key", pair, pos);
      }
      if (eq == std::string_view::npos || eq + 1 == pair.size()) {
        return fmt::format("query parameter '{}' at offset {} has no value (expected key=value)",
                           pair.substr(0, eq), pos);
      }
      std::string key(pair.substr(0, eq));
      if (out.query.count(key) != 0) {
        return fmt::format("query parameter '{}' at offset {} is given twice", key, pos);
      }
      std::string value;
      if (auto err = DecodeUriQueryValue(key, pos + eq + 1, pair.substr(eq + 1), value); !err.empty()) return err;
      out.query.emplace(std::move(key), std::move(value));
      if (pair_end == end) break;
      pos = pair_end + 1;
    }
    return {};
  }

  std::string_view uri_;
  uint16_t default_port_ = 0;  // 0: every host needs a port
};

}  // namespace

// The value is not quoted in errors: it may be a secret.
std::string DecodeUriQueryValue(std::string_view key, size_t offset, std::string_view text, std::string& value) {
  value.clear();
  value.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      value += text[i];
      continue;
    }
    if (i + 2 >= text.size() || !IsHexDigit(text[i + 1]) || !IsHexDigit(text[i + 2])) {
      return fmt::format(
          "query parameter '{}' has a malformed percent-escape at offset {} (expected '%' and two "
          "hex digits; write a '%' itself as %25)",
          key, offset + i);
    }
    const auto byte = static_cast<unsigned char>(HexValue(text[i + 1]) * 16 + HexValue(text[i + 2]));
    if (byte < 0x20 || byte == 0x7f) {
      return fmt::format("query parameter '{}' has an escaped control character 0x{:02x} at offset {}", key, byte,
                         offset + i);
    }
    value += static_cast<char>(byte);
    i += 2;
  }
  return {};
}

std::string ParsedUri::ToString() const {
  std::string out = scheme + "://";
  for (size_t i = 0; i < hosts.size(); ++i) {
    if (i > 0) out += ',';
    out += hosts[i].ToString();
  }
  out += path;
  if (!endpoint_name.empty()) {
    out += '#';
    out += endpoint_name;
  }
  char sep = '?';
  for (const auto& [key, value] : query) {
    out += sep;
    out += key;
    out += '=';
    // Percent-encoded where the parser would split or refuse the value ('&', '#', '?', '%',
    // space, control characters), so that the text parses back to the same value.
    for (char c : value) {
      auto u = static_cast<unsigned char>(c);
      if (c == '%' || c == '&' || c == '#' || c == '?' || c == ' ' || u < 0x20 || u == 0x7f) {
        out += fmt::format("%{:02X}", u);
      } else {
        out += c;
      }
    }
    sep = '&';
  }
  return out;
}

namespace {

// One pass of RedactUriSecrets. Hiding a value can hide a character that told the hosts from
// the query ("://?,@&auth=?&x=@": the auth value's '?'), so that a second pass over the result
// finds other hosts and hides more.
std::string RedactUriSecretsOnce(std::string_view uri) {
  std::string out(uri);
  // User information before a host ("user:password@host:port", which no scales URI takes but a
  // user may write): everything before the entry's last '@'.
  if (const size_t scheme_end = out.find("://"); scheme_end < out.find_first_of("?#")) {
    size_t entry = scheme_end + 3;
    size_t hosts_end = HostsEnd(out, entry);
    while (entry < hosts_end) {
      const size_t next = std::min(out.find(',', entry), hosts_end);
      const size_t at = out.find_last_of('@', next - 1);
      if (next > entry && at != std::string::npos && at >= entry) {
        out.replace(entry, at - entry, "***");
        hosts_end = hosts_end - (at - entry) + 3;
        entry = entry + 3 + (next - at) + 1;
      } else {
        entry = next + 1;
      }
    }
  }
  const size_t query = out.find('?');
  if (query == std::string::npos) return out;
  for (size_t at = query; at != std::string::npos && at < out.size(); at = out.find('&', at + 1)) {
    if (out.compare(at + 1, 5, "auth=") != 0) continue;
    const size_t value = at + 6;
    // A '#' ends the value where the parser takes an endpoint name after it (the URI's first
    // '#'); else it is in the secret ("digest:user:pa#ss&x=1"), which ends at the next '&'.
    // A '&' ends it where key=value follows; else it is in the secret ("digest:user:pa&ss").
    size_t amp = out.find('&', value);
    while (amp != std::string::npos &&
           !IsQueryPair(std::string_view(out).substr(amp + 1, out.find_first_of("&#", amp + 1) - amp - 1))) {
      amp = out.find('&', amp + 1);
    }
    // A '#' in the query followed by a name and a '?' is no fragment: that '?' would be a second
    // query ("auth=digest:u:s3c#r3t?x"), and the URI does not parse; the '#' is in the secret.
    const size_t hash = out.find('#', value);
    const size_t end = hash < amp && out.find('#') == hash && StartsFragment(out, hash) &&
                               out.find('?', hash) == std::string::npos
                           ? hash
                           : amp;
    const size_t value_end = end == std::string::npos ? out.size() : end;
    const size_t colon = out.find(':', value);
    if (colon == std::string::npos || colon >= value_end) {
      // No scheme: the whole value may be the secret (a password written without "digest:user:").
      if (value_end > value) out.replace(value, value_end - value, "***");
      continue;
    }
    out.replace(colon + 1, value_end - colon - 1, "***");
  }
  return out;
}

}  // namespace

std::string RedactUriSecrets(std::string_view uri) {
  // Passes until nothing changes, so that what this returns is redacted as it is (messages
  // quote it, and it may be redacted again). Each pass only hides more; a URI that still
  // changes after a few (none known) is hidden whole but for its scheme.
  std::string out = RedactUriSecretsOnce(uri);
  for (int pass = 0; pass < 4; ++pass) {
    std::string again = RedactUriSecretsOnce(out);
    if (again == out) return out;
    out = std::move(again);
  }
  const size_t scheme_end = out.find("://");
  return scheme_end == std::string::npos ? std::string("***") : out.substr(0, scheme_end + 3) + "***";
}

std::optional<ParsedUri> ScalesUriParser::TryParse(std::string_view uri, std::string& error) {
  ParsedUri parsed;
  std::string problem = UriParser(uri).Parse(parsed);
  if (!problem.empty()) {
    error = fmt::format("bad URI '{}': {}", RedactUriSecrets(uri), problem);
    return std::nullopt;
  }
  error.clear();
  return parsed;
}

ParsedUri ScalesUriParser::Parse(std::string_view uri) {
  std::string error;
  std::optional<ParsedUri> parsed = TryParse(uri, error);
  if (!parsed) throw Error(make_error_code(Errc::kBadUri), error);
  return std::move(*parsed);
}

}  // namespace scales
