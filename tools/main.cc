// The `scales` command-line tool.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "commands.h"

namespace {

void PrintUsage(std::FILE* out) {
  std::fputs(
      "usage: scales <command> [args]\n"
      "\n"
      "commands:\n"
      "  http get|post|put|delete|patch|head|options URI PATH [-H 'Name: value']...\n"
      "       [--data TEXT] [--timeout 2s] [--include]\n"
      "      one HTTP call through the full scales stack; prints the body.\n"
      "      exit status: 0 for status < 400, 1 for >= 400, 2 when the call failed.\n"
      "  bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--json]\n"
      "       [--method GET] [--data TEXT] [--timeout 5s] [--threads T] [--stats]\n"
      "      closed-loop load through the full stack, with a latency report.\n"
      "  testserver http --port P [--name NAME]\n"
      "      a small HTTP server for demos and tests.\n"
      "  demo [--seconds S]\n"
      "      starts three test servers and shows the client at work.\n"
      "\n"
      "URI: tcp://host:port[,host:port...]   (IPv6 as [::1]:port)\n",
      out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return 2;
  }
  std::string_view cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    PrintUsage(stdout);
    return 0;
  }
  if (cmd == "http") return scales::tools::RunHttpCommand(argc - 1, argv + 1);
  if (cmd == "bench") return scales::tools::RunBenchCommand(argc - 1, argv + 1);
  if (cmd == "testserver") return scales::tools::RunTestServerCommand(argc - 1, argv + 1);
  if (cmd == "demo") return scales::tools::RunDemoCommand(argc - 1, argv + 1);
  std::fprintf(stderr, "scales: unknown command '%s'\n\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}
