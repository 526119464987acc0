// Fuzz target: the URI parser (include/scales/discovery/uri.h) and what reads a parsed URI's
// options (ZooKeeperOptions::FromUri, Validate, ConnectString and ParseZooKeeperDuration in
// include/scales/discovery/zookeeper.h; RedactUriSecrets). Checked:
// - a URI either fails with a message that quotes it (secrets redacted: "bad URI '<uri>': ..."),
//   or parses into a URI whose canonical form parses back to the same canonical form;
// - FromUri on a parsed URI either throws scales::Error kBadUri quoting the canonical URI
//   (redacted), or returns options that Validate() accepts, that carry the query's values, and
//   that come back the same from their canonical query (durations in their largest exact unit);
//   ConnectString is the hosts as the C client reads them, then the chroot;
// - nothing FromUri says depends on the secret of auth=scheme:secret (the same URI with another
//   secret gives the same message), and RedactUriSecrets is idempotent;
// - the input read as a duration ("10s") is nothing, or a duration that its canonical text
//   gives back.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "scales/core/error.h"
#include "scales/discovery/uri.h"
#include "scales/discovery/zookeeper.h"

namespace {

using namespace scales;
using std::chrono::milliseconds;

void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what);
  std::abort();
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

// The canonical text of a duration: its largest exact unit.
std::string DurationText(milliseconds d) {
  if (d.count() % 60000 == 0) return fmt::format("{}m", d.count() / 60000);
  if (d.count() % 1000 == 0) return fmt::format("{}s", d.count() / 1000);
  return fmt::format("{}ms", d.count());
}

void CheckDuration(std::string_view text) {
  const auto d = ParseZooKeeperDuration(text);
  if (!d) return;
  Check(d->count() >= 0, "a negative duration");
  Check(ParseZooKeeperDuration(DurationText(*d)) == d,
        "a duration that its canonical text does not give back");
}

// FromUri's options, or the message of the kBadUri it threw (nullopt options).
struct FromUriResult {
  std::optional<ZooKeeperOptions> options;
  std::string error;
};

FromUriResult FromUri(const ParsedUri& uri) {
  FromUriResult r;
  try {
    r.options = ZooKeeperOptions::FromUri(uri);
  } catch (const Error& e) {
    Check(e.code() == make_error_code(Errc::kBadUri), "FromUri threw another error than kBadUri");
    r.error = e.what();
    Check(StartsWith(r.error, fmt::format("bad URI '{}': ", RedactUriSecrets(uri.ToString()))),
          "a FromUri error that does not quote the URI");
  }
  return r;
}

// `uri` with another secret in its auth=scheme:secret: each byte of the secret but ':' replaced.
ParsedUri OtherSecret(ParsedUri uri) {
  auto it = uri.query.find("auth");
  if (it == uri.query.end()) return uri;
  std::string& value = it->second;
  const size_t colon = value.find(':');
  if (colon == std::string::npos) return uri;
  for (size_t i = colon + 1; i < value.size(); ++i) {
    if (value[i] != ':') value[i] = value[i] == 'x' ? 'y' : 'x';
  }
  return uri;
}

void CheckOptions(const ParsedUri& uri) {
  const FromUriResult r = FromUri(uri);
  const FromUriResult other = FromUri(OtherSecret(uri));
  Check(r.options.has_value() == other.options.has_value() && r.error == other.error,
        "what FromUri says depends on the auth secret");
  if (uri.scheme != "zk") {
    Check(!r.options, "FromUri took a URI that is not zk://");
    return;
  }
  if (!r.options) return;
  const ZooKeeperOptions& o = *r.options;
  try {
    o.Validate();
  } catch (const Error& e) {
    Check(false, "FromUri returned options that Validate() refuses");
  }
  const ZooKeeperOptions defaults;
  auto value = [&](const char* key) -> std::optional<std::string> {
    auto it = uri.query.find(key);
    return it == uri.query.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
  Check(o.session_timeout == (value("session_timeout")
                                  ? ParseZooKeeperDuration(*value("session_timeout"))
                                  : defaults.session_timeout),
        "session_timeout is not the query's");
  Check(o.retry_interval == (value("retry_interval")
                                 ? ParseZooKeeperDuration(*value("retry_interval"))
                                 : defaults.retry_interval),
        "retry_interval is not the query's");
  Check(o.chroot == value("chroot").value_or(defaults.chroot) &&
            o.auth == value("auth").value_or(defaults.auth),
        "chroot or auth is not the query's");

  // The canonical query of the options gives them back.
  ParsedUri canonical = uri;
  canonical.query = {{"session_timeout", DurationText(o.session_timeout)},
                     {"retry_interval", DurationText(o.retry_interval)}};
  if (!o.chroot.empty()) canonical.query["chroot"] = o.chroot;
  if (!o.auth.empty()) canonical.query["auth"] = o.auth;
  const FromUriResult again = FromUri(canonical);
  Check(again.options && again.options->session_timeout == o.session_timeout &&
            again.options->retry_interval == o.retry_interval &&
            again.options->chroot == o.chroot && again.options->auth == o.auth,
        "the options' canonical query does not give them back");

  std::string hosts;
  for (const Endpoint& ep : uri.hosts)
    hosts += fmt::format("{}{}:{}", hosts.empty() ? "" : ",", ep.host, ep.port);
  Check(o.ConnectString(uri) == hosts + o.chroot, "ConnectString is not the hosts then the chroot");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view uri(reinterpret_cast<const char*>(data), size);
  CheckDuration(uri);
  const std::string redacted = RedactUriSecrets(uri);
  Check(RedactUriSecrets(redacted) == redacted, "RedactUriSecrets is not idempotent");
  std::string error;
  auto parsed = ScalesUriParser::TryParse(uri, error);
  if (!parsed) {
    Check(StartsWith(error, fmt::format("bad URI '{}': ", redacted)),
          "a parse error that does not quote the URI");
    return 0;
  }
  Check(!parsed->hosts.empty(), "a parsed URI without hosts");
  for (const auto& ep : parsed->hosts)
    Check(ep.port != 0 && !ep.host.empty(), "a host without a name or port");
  std::string canonical = parsed->ToString();
  std::string error2;
  auto again = ScalesUriParser::TryParse(canonical, error2);
  Check(again && again->ToString() == canonical,
        "the canonical form does not parse back to itself");
  CheckOptions(*parsed);
  return 0;
}
