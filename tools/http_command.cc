// scales http get|post|put|delete|patch|head|options URI PATH [-H 'Name: value']...
//             [--data TEXT] [--timeout 2s] [--include]
#include <cstdio>
#include <iostream>
#include <set>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "cli_util.h"
#include "commands.h"
#include "scales/http/client.h"
#include "scales/http/transport.h"

namespace scales::tools {
namespace {

// The usage, after `problem`: on stderr, exit status 2; on stdout (--help), 0.
int Usage(const std::string& problem, std::FILE* out = stderr) {
  if (!problem.empty()) std::fprintf(stderr, "scales http: %s\n", problem.c_str());
  std::fputs(
      "usage: scales http get|post|put|delete|patch|head|options URI PATH\n"
      "                   [-H 'Name: value']... [--data TEXT] [--timeout 2s] [--include]\n",
      out);
  return out == stdout ? 0 : 2;
}

}  // namespace

int RunHttpCommand(int argc, char** argv) {
  // argv[0] == "http"
  // The method, URI and PATH come first: an option in their place means one is missing (it was
  // taken as the PATH, its value reported as an unknown option).
  static constexpr const char* kPositional[] = {"", "method", "URI", "PATH"};
  if (HelpAnywhere(argc, argv, {"--data", "-d", "-H", "--header"})) return Usage("", stdout);
  for (int i = 1; i < 4; ++i) {
    if (i >= argc) return Usage(fmt::format("missing {}", kPositional[i]));
    if (argv[i][0] == '-') return Usage(fmt::format("missing {} before option '{}'", kPositional[i], argv[i]));
  }
  std::string method(argv[1]);
  for (char& c : method) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static constexpr std::string_view kMethods[] = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"};
  bool known = false;
  for (auto m : kMethods) known = known || m == method;
  if (!known) return Usage(fmt::format("unknown method '{}'", argv[1]));

  http::Request request;
  request.method = method;
  std::string uri = argv[2];
  request.target = argv[3];
  // A relative path gets its '/'; "*" and an absolute-form target go as given, as the client's
  // verbs send them ("OPTIONS /*" would be another resource). (Not insert(0, "/"): g++ 12 warns
  // about it with -Warray-bounds, wrongly.)
  if (request.target.empty() || (request.target.front() != '/' && request.target != "*" &&
                                 !http::internal::IsAbsoluteFormTarget(request.target))) {
    request.target = "/" + request.target;
  }
  bool include = false;
  Duration timeout = std::chrono::seconds(10);
  std::set<std::string_view> given;  // each option but -H once: a second value would silently win
  for (int i = 4; i < argc; ++i) {
    std::string_view arg = argv[i];
    const std::string_view option = arg == "-d" ? "--data" : arg == "-i" ? "--include" : arg;
    if (option.starts_with("--") && option != "--header" && !given.insert(option).second) {
      return Usage(fmt::format("{} given twice", option));
    }
    auto value = [&](std::string_view name) -> const char* {
      if (i + 1 >= argc) return nullptr;
      (void)name;
      return argv[++i];
    };
    if (arg == "-H" || arg == "--header") {
      const char* v = value(arg);
      if (!v) return Usage("-H needs 'Name: value'");
      std::string_view h = v;
      auto colon = h.find(':');
      if (colon == std::string_view::npos || colon == 0) return Usage(fmt::format("bad header '{}': want 'Name: value'", h));
      std::string_view val = h.substr(colon + 1);
      while (!val.empty() && val.front() == ' ') val.remove_prefix(1);
      request.headers.emplace_back(std::string(h.substr(0, colon)), std::string(val));
    } else if (arg == "--data" || arg == "-d") {
      const char* v = value(arg);
      if (!v) return Usage("--data needs a value");
      request.body = v;
    } else if (arg == "--timeout") {
      const char* v = value(arg);
      std::string why;
      auto d = v ? ParseDuration(v, &why) : std::nullopt;
      if (!d || *d <= Duration::zero()) return Usage(fmt::format("--timeout needs a duration such as 300ms or 2s{}", why));
      timeout = *d;
    } else if (arg == "--include" || arg == "-i") {
      include = true;
    } else if (!arg.starts_with("-")) {
      return Usage(fmt::format("unexpected argument '{}' (after the method, URI and PATH)", arg));
    } else {
      return Usage(fmt::format("unknown option '{}'", arg));
    }
  }

  try {
    http::HttpOptions options;
    options.client.name = "scales-cli";
    options.client.timeout = timeout;
    options.client.open_timeout = timeout;
    RuntimeOptions runtime_options;
    runtime_options.threads = 1;
    options.client.runtime = std::make_shared<Runtime>(runtime_options);
    options.transport.raise_on_http_error = false;  // the exit status reports it instead
    http::Response response;
    {
      http::HttpClient client = Http::NewClient(uri, options);
      response = client.Send(std::move(request));
    }
    if (include) {
      std::cout << "HTTP/1.1 " << response.status << ' ' << response.reason << "\r\n";
      for (const auto& [k, v] : response.headers) std::cout << k << ": " << v << "\r\n";
      std::cout << "\r\n";
    }
    std::cout << response.body;
    std::cout.flush();
    return response.status < 400 ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "scales: %s [%s]\n", e.what(), ErrorName(e.scales_code()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scales: %s\n", e.what());
    return 2;
  }
}

}  // namespace scales::tools
