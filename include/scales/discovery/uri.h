#pragma once
// ScalesUriParser: parses the URIs given to NewClient.
//
//   tcp://host:port[,host:port...][/ignored-path][?query]      static server set
//   https://host[:port][,host[:port]...][/ignored-path][?query]  = tcp:// with tls=on
//   zk://zkhost:port[,zkhost:port...]/path/to/serverset[#endpoint-name][?query]
//
// Hosts are names, IPv4 literals or bracketed IPv6 literals ("[::1]:8080"). Ports are
// decimal, 1..65535, and required except for https:// (default 443). The scheme is matched
// case-insensitively. A `?k=v&k2=v2` query is parsed into `query`: options for discovery
// (zk://: session_timeout, chroot, ...) and for the client (tls, tls_ca_file, ...: see
// docs/tls.md and ApplyTlsQuery in scales/transport/tls.h). Values are percent-decoded
// (`auth=digest:user:p%26ss` is the password "p&ss"; '+' is not a space), keys are taken as
// written; a '%' not followed by two hex digits, or an escaped control character, is an error
// naming the key. An https:// URI parses as scheme "tcp" with query tls=on (tls=off in it is
// an error).

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "scales/discovery/endpoint.h"

namespace scales {

struct ParsedUri {
  std::string scheme;                          // "tcp" (also for https://) or "zk", lower case
  std::vector<Endpoint> hosts;                 // in the order given, duplicates kept
  std::string path;                            // zk: the znode path, starts with '/'
  std::string endpoint_name;                   // zk: the #fragment, empty if none
  std::map<std::string, std::string> query;    // ?k=v options, values decoded (https:// adds tls=on)

  // Re-renders the URI in canonical form (lower-case scheme, bracketed IPv6; query values
  // percent-encoded where needed: '%', '&', '#', '?', space, control characters).
  std::string ToString() const;
};

// `uri` with the secret of its `auth=scheme:secret` query parameter (ZooKeeper credentials)
// replaced by "***", for messages, logs and pages: "zk://h:2181/svc?auth=digest:***" (a value
// without a scheme, "auth=secret", is hidden whole: "auth=***"); so is
// user information before a host ("tcp://***@h:80" for "tcp://user:password@h:80"), which no
// scales URI takes. Anything else is returned as it is, even when it does not parse.
std::string RedactUriSecrets(std::string_view uri);

// Percent-decodes `text`, the value of query parameter `key` starting at byte `offset` of its
// URI, into `value` ("p%26ss" is "p&ss"; '+' stays '+'). Returns an empty string, or the
// problem (a '%' not followed by two hex digits, an escaped control character) naming the key
// and the offset, without the value. ScalesUriParser decodes every query value with it.
std::string DecodeUriQueryValue(std::string_view key, size_t offset, std::string_view text, std::string& value);

class ScalesUriParser {
 public:
  // Parses `uri`; on failure returns nullopt and sets `error` to a message that quotes the
  // URI and names what is wrong and where ("bad URI 'tcp://a:99999': port '99999' of host 1
  // ('a') is out of range 1..65535"). Hosts are numbered from 1; offsets in messages are
  // 0-based byte offsets into `uri`. For zk://, `#endpoint` and `?query` may come in either
  // order; ToString() writes the fragment first.
  static std::optional<ParsedUri> TryParse(std::string_view uri, std::string& error);
  // Parses `uri` or throws scales::Error with code Errc::kBadUri and the message above.
  static ParsedUri Parse(std::string_view uri);
};

}  // namespace scales
