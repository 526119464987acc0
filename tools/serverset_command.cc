// scales serverset URI [--watch] [--timeout 10s]
//
// Prints the members of a server set that would receive traffic, one `host:port` per line,
// sorted (for zk:// URIs: the ALIVE members' serviceEndpoint, or additionalEndpoints[name]
// with #name). With --watch it keeps running (until SIGINT/SIGTERM) and prints every change as
// it happens: `+ host:port` for a member that joined, `- host:port` for one that left, the
// initial members as `+` lines; each batch ends with a line `# N members` and is flushed.
//
// A zk:// path that does not exist is not a server set: without --watch it is an error (exit 1,
// naming the path and the ensemble); with --watch it says so on stderr, prints `# 0 members`
// and waits for the path to be created (and says so again if the path is deleted later).
//
// Exit status: 0 once printed (a known but empty set prints nothing and says so on stderr);
// 1 when the members are not known within --timeout (the reason, from the server set's
// Describe(), goes to stderr) or the zk:// path does not exist; 2 for usage errors; 128 + the
// signal when SIGINT or SIGTERM ends it (without --watch) before the members were known. With
// --watch, those end it with 0.
#include <csignal>
#include <cstdio>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>

#include "cli_util.h"
#include "commands.h"
#include "scales/core/error.h"
#include "scales/discovery/server_set.h"
#include "scales/discovery/uri.h"
#include "scales/discovery/zookeeper.h"

namespace scales::tools {
namespace {

// Whether the server set's path is missing (ZooKeeperServerSet::path_missing()): an empty
// snapshot cannot tell a path without members from a path that is not there. zk:// only.
bool PathMissing(const ServerSet& set) {
  const auto* zk = dynamic_cast<const ZooKeeperServerSet*>(&set);
  return zk != nullptr && zk->path_missing();
}

// "path /svc does not exist in ZooKeeper 127.0.0.1:2181,127.0.0.1:2182 (zk://...)".
std::string MissingPathText(const ParsedUri& uri, const std::string& uri_text) {
  std::string hosts;
  for (const Endpoint& host : uri.hosts) hosts += (hosts.empty() ? "" : ",") + host.ToString();
  auto chroot = uri.query.find("chroot");
  return fmt::format("path {}{} does not exist in ZooKeeper {} ({})", uri.path,
                     chroot == uri.query.end() ? "" : " below chroot " + chroot->second, hosts,
                     RedactUriSecrets(uri_text));
}

// The usage, after `problem`: on stderr, exit status 2; on stdout (--help), 0.
int Usage(const std::string& problem, std::FILE* out = stderr) {
  if (!problem.empty()) std::fprintf(stderr, "scales serverset: %s\n", problem.c_str());
  std::fputs("usage: scales serverset URI [--watch] [--timeout 10s]\n", out);
  return out == stdout ? 0 : 2;
}

}  // namespace

int RunServerSetCommand(int argc, char** argv) {
  // argv[0] == "serverset"
  std::string uri_text;
  bool watch = false;
  std::chrono::nanoseconds timeout = std::chrono::seconds(10);
  std::set<std::string_view> given;  // each option once: a second value would silently win
  if (HelpAnywhere(argc, argv)) return Usage("", stdout);
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg.starts_with("--") && !given.insert(arg).second) return Usage(fmt::format("{} given twice", arg));
    if (arg == "--watch") {
      watch = true;
    } else if (arg == "--timeout") {
      std::string why;
      auto d = i + 1 < argc ? ParseDuration(argv[++i], &why) : std::nullopt;
      if (!d || d->count() <= 0) return Usage(fmt::format("--timeout needs a positive duration (e.g. 5s){}", why));
      timeout = *d;
    } else if (arg.starts_with("--") || !uri_text.empty()) {
      return Usage(fmt::format("unexpected argument '{}'", arg));
    } else {
      uri_text = arg;
    }
  }
  if (uri_text.empty()) return Usage("missing URI");

  std::shared_ptr<ServerSet> set;
  ParsedUri uri;
  try {
    uri = ScalesUriParser::Parse(uri_text);
    set = CreateServerSet(uri);
  } catch (const Error& e) {
    std::fprintf(stderr, "scales serverset: %s\n", e.what());
    return 2;
  } catch (const std::system_error& e) {
    // A zk:// server set runs its ZooKeeper session on threads of its own.
    std::fprintf(stderr, "scales serverset: cannot start the server set's discovery thread: %s\n",
                 e.what());
    return 2;
  }

  boost::asio::io_context ioc{1};
  std::optional<std::set<Endpoint>> current;
  int status = 0;
  boost::asio::steady_timer timer{ioc};
  boost::asio::signal_set signals{ioc, SIGINT, SIGTERM};
  signals.async_wait([&](const boost::system::error_code& ec, int signal) {
    if (ec) return;
    if (!watch) {
      // Not a success: nothing was printed (without --watch, the first snapshot ends the run).
      std::fprintf(stderr, "scales serverset: interrupted by signal %d before the members were known: %s\n", signal,
                   set->Describe().c_str());
      status = 128 + signal;
    }
    ioc.stop();
  });
  // Snapshots arrive on this io_context, in order.
  uint64_t id = set->Subscribe(ioc.get_executor(), [&](const ServerSet::Members& members) {
    std::set<Endpoint> next(members.begin(), members.end());
    const bool missing = next.empty() && PathMissing(*set);
    if (!watch) {
      if (missing) {
        std::fprintf(stderr, "scales serverset: %s\n", MissingPathText(uri, uri_text).c_str());
        status = 1;
      }
      for (const Endpoint& ep : next) std::printf("%s\n", ep.ToString().c_str());
      if (next.empty() && !missing) std::fprintf(stderr, "scales serverset: no members (%s)\n", set->Describe().c_str());
      std::fflush(stdout);
      timer.cancel();
      ioc.stop();
      return;
    }
    if (missing) {
      std::fprintf(stderr, "scales serverset: %s; waiting for it to be created\n", MissingPathText(uri, uri_text).c_str());
      std::fflush(stderr);
    }
    std::set<Endpoint> before = current.value_or(std::set<Endpoint>{});
    bool first = !current;
    for (const Endpoint& ep : before) {
      if (!next.contains(ep)) std::printf("- %s\n", ep.ToString().c_str());
    }
    for (const Endpoint& ep : next) {
      if (!before.contains(ep)) std::printf("+ %s\n", ep.ToString().c_str());
    }
    if (first || before != next) std::printf("# %zu members\n", next.size());
    std::fflush(stdout);
    current = std::move(next);
    timer.cancel();
  });
  timer.expires_after(timeout);
  timer.async_wait([&](const boost::system::error_code& ec) {
    if (ec || current) return;
    std::fprintf(stderr, "scales serverset: members not known within %lld ms: %s\n",
                 static_cast<long long>(
                     std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()),
                 set->Describe().c_str());
    status = 1;
    ioc.stop();
  });
  // Without --watch, the first snapshot stops the loop (and marks `current` unused).
  ioc.run();
  set->Unsubscribe(id);
  return status;
}

}  // namespace scales::tools
