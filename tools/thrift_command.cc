// scales thrift call URI echo|ping|fail|sleep [ARG] [--timeout D] [--client-id ID]
//                   [--protocol binary|compact] [--transport framed|buffered]
//
// One call of the Echo service (tools/echo.thrift) through the full scales Thrift stack. Prints
// the result on stdout. Exit status: 0 success, 1 declared exception (EchoError; its message on
// stderr), 2 failed call (transport, timeout, TApplicationException) or bad usage.
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>

#include <fmt/format.h>
#include <thrift/TApplicationException.h>

#include "Echo.h"
#include "cli_util.h"
#include "commands.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"

namespace scales::tools {
namespace {

// The usage, after `problem`: on stderr, exit status 2; on stdout (--help), 0.
int Usage(const std::string& problem, std::FILE* out = stderr) {
  if (!problem.empty()) std::fprintf(stderr, "scales thrift: %s\n", problem.c_str());
  std::fputs(
      "usage: scales thrift call URI echo|ping|fail|sleep [ARG] [--timeout 2s] [--client-id ID]\n"
      "                          [--protocol binary|compact] [--transport framed|buffered]\n"
      "       scales thriftmux call URI echo|ping|fail|sleep [ARG] [--timeout 2s] [--client-id ID]\n",
      out);
  return out == stdout ? 0 : 2;
}

}  // namespace

int RunThriftCommand(int argc, char** argv) {
  // argv[0] == "thrift" or "thriftmux" (the same Echo calls over a ThriftMux stack)
  const bool mux = std::string_view(argv[0]) == "thriftmux";
  // "call", the URI and the method come first: an option in their place means one is missing.
  static constexpr const char* kPositional[] = {"", "sub-command (call)", "URI", "method (echo, ping, fail, sleep)"};
  if (HelpAnywhere(argc, argv, {"--client-id"})) return Usage("", stdout);
  for (int i = 1; i < 4; ++i) {
    if (i >= argc) return Usage(fmt::format("missing {}", kPositional[i]));
    if (argv[i][0] == '-') return Usage(fmt::format("missing {} before option '{}'", kPositional[i], argv[i]));
  }
  if (std::string_view(argv[1]) != "call") return Usage(fmt::format("unknown sub-command '{}'", argv[1]));
  const std::string uri = argv[2];
  const std::string method = argv[3];
  std::optional<std::string> arg;
  thrift::ThriftOptions options;
  options.client.name = "scales-thrift";
  options.client.timeout = std::chrono::seconds(10);
  std::set<std::string_view> given;  // each option once: a second value would silently win
  for (int i = 4; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a.starts_with("--") && !given.insert(a).second) return Usage(fmt::format("{} given twice", a));
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--timeout") {
      const char* v = next();
      std::string why;
      auto d = v ? ParseDuration(v, &why) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage(fmt::format("--timeout needs a duration such as 500ms{}", why));
      options.client.timeout = *d;
      options.client.open_timeout = *d;  // the whole command, as `scales http`: zk:// may not answer
    } else if (a == "--client-id") {
      const char* v = next();
      if (MissingValue(v)) return Usage(fmt::format("--client-id needs a value{}", v ? fmt::format(" (got option '{}')", v) : ""));
      options.client_id = v;
    } else if ((a == "--protocol" || a == "--transport") && mux) {
      return Usage("ThriftMux always carries binary Thrift in Mux frames: --protocol and --transport do not apply");
    } else if (a == "--protocol") {
      const char* v = next();
      if (v && std::string_view(v) == "binary") {
        options.protocol = thrift::Protocol::kBinary;
      } else if (v && std::string_view(v) == "compact") {
        options.protocol = thrift::Protocol::kCompact;
      } else {
        return Usage("--protocol is binary or compact");
      }
    } else if (a == "--transport") {
      const char* v = next();
      if (v && std::string_view(v) == "framed") {
        options.transport.framing = thrift::Framing::kFramed;
      } else if (v && std::string_view(v) == "buffered") {
        options.transport.framing = thrift::Framing::kBuffered;
      } else {
        return Usage("--transport is framed or buffered");
      }
    } else if (a.starts_with("--")) {
      return Usage(fmt::format("unknown option '{}'", a));
    } else if (!arg) {
      arg = std::string(a);
    } else {
      return Usage(fmt::format("unexpected argument '{}'", a));
    }
  }
  if (method != "echo" && method != "ping" && method != "fail" && method != "sleep") {
    return Usage(fmt::format("unknown method '{}' (echo, ping, fail, sleep)", method));
  }
  if (method == "ping" && arg) return Usage(fmt::format("ping takes no argument (got '{}')", *arg));
  int32_t millis = 0;
  if (method == "sleep") {
    auto v = arg ? ParseIntInRange(*arg, 0, INT32_MAX) : std::nullopt;
    if (!v) return Usage("sleep needs a number of milliseconds");
    millis = static_cast<int32_t>(*v);
  }
  try {
    // A step of its own, as in `scales http` and `scales bench`: without a thread for an event
    // loop, the failure said only "scales: Resource temporarily unavailable".
    options.client.runtime = Runtime::Default();
  } catch (const std::system_error& e) {
    std::fprintf(stderr, "scales %s: cannot start the client's event loops: %s\n", argv[0], e.what());
    return 2;
  }
  try {
    auto client = [&] {
      if (!mux) return Thrift::NewClient<echo::EchoClient>(uri, options);
      thriftmux::ThriftMuxOptions mux_options;
      mux_options.client = options.client;
      mux_options.client.name = "scales-thriftmux";
      mux_options.client_id = options.client_id;
      return ThriftMux::NewClient<echo::EchoClient>(uri, mux_options);
    }();
    std::string result;
    if (method == "echo") {
      client->echo(result, arg.value_or(""));
    } else if (method == "ping") {
      client->ping();
      result = "pong";
    } else if (method == "fail") {
      client->fail(result, arg.value_or("fail"));
    } else {
      client->sleep(result, millis);
    }
    std::printf("%s\n", result.c_str());
    client.Close();
    return 0;
  } catch (const echo::EchoError& e) {
    std::fprintf(stderr, "EchoError: %s\n", e.message.c_str());
    return 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "scales: %s [%s]\n", e.what(), ErrorName(e.scales_code()).c_str());
    return 2;
  } catch (const apache::thrift::TApplicationException& e) {
    std::fprintf(stderr, "TApplicationException: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scales: %s\n", e.what());
    return 2;
  }
}

}  // namespace scales::tools
