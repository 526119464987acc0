// The `scales` command-line tool.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string_view>

#include "commands.h"

namespace {

void PrintUsage(std::FILE* out) {
  std::fputs(
      "usage: scales <command> [args]\n"
      "\n"
      "calls (through the full scales stack):\n"
      "  http get|post|put|delete|patch|head|options URI PATH [-H 'Name: value']...\n"
      "       [--data TEXT] [--timeout 2s] [--include]\n"
      "      prints the body; exit 0 for status < 400, 1 for >= 400, 2 when the call failed.\n"
      "  thrift call URI echo|ping|fail|sleep [ARG] [--timeout D] [--client-id ID]\n"
      "       [--protocol binary|compact] [--transport framed|buffered]\n"
      "  thriftmux call URI echo|ping|fail|sleep [ARG] [--timeout D] [--client-id ID]\n"
      "      one call of the Echo service (tools/echo.thrift); exit 0 ok, 1 declared\n"
      "      exception (EchoError), 2 failed call.\n"
      "\n"
      "load:\n"
      "  bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--rate R]\n"
      "       [--method GET] [--data TEXT] [--timeout 5s] [--threads T] [--stats]\n"
      "       [--json] [--report FILE.html] [--progress] [--admin-port P]\n"
      "  bench thrift|thriftmux URI --method echo|ping [--payload-size N] --concurrency N\n"
      "       (--requests N | --duration 10s) [--rate R] [--json] [--report FILE.html] ...\n"
      "      load with a report: requests, failures by error, throughput, latency percentiles,\n"
      "      requests per endpoint; closed loop, or open loop at R requests/s with --rate\n"
      "      (latency from the intended send time); --report: an HTML page with charts.\n"
      "\n"
      "servers and tools:\n"
      "  testserver http --port P [--name NAME] [--announce zk://...]\n"
      "  testserver thrift [--port P] [--transport framed|buffered] [--protocol binary|compact]\n"
      "  testserver thriftmux [--port P] [--threads N] [--framer BYTES] [--ping-interval MS]\n"
      "      local servers for demos, tests and benchmarks; print 'listening HOST:PORT'.\n"
      "  serverset URI [--watch] [--timeout 10s]\n"
      "      the members that would receive traffic, host:port, sorted; --watch: +/- changes.\n"
      "  demo [--seconds S] [--rate R] [--report FILE.html]\n"
      "      HTTP, Thrift and ThriftMux servers found through a local ZooKeeper, load with a\n"
      "      server killed and restarted, a summary table and an HTML report.\n"
      "\n"
      "URI: tcp://host:port[,host:port...]   (IPv6 as [::1]:port)\n"
      "     zk://zkhost:port[,...]/path[#endpoint][?session_timeout=10s&chroot=/x&auth=digest:u:p]\n",
      out);
}

}  // namespace

namespace {

int Run(int argc, char** argv) {
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
  if (cmd == "thrift" || cmd == "thriftmux") return scales::tools::RunThriftCommand(argc - 1, argv + 1);
  if (cmd == "testserver" && argc > 2 && std::string_view(argv[2]) == "thrift") return scales::tools::RunThriftTestServerCommand(argc - 1, argv + 1);
  if (cmd == "testserver" && argc > 2 && std::string_view(argv[2]) == "thriftmux") return scales::tools::RunThriftMuxTestServerCommand(argc - 1, argv + 1);
  if (cmd == "testserver") return scales::tools::RunTestServerCommand(argc - 1, argv + 1);
  if (cmd == "demo") return scales::tools::RunDemoCommand(argc - 1, argv + 1);
  if (cmd == "serverset") return scales::tools::RunServerSetCommand(argc - 1, argv + 1);
  std::fprintf(stderr, "scales: unknown command '%s'\n\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // Each command reports its own failures, naming the step; this is the net under them, so that
  // an exception a command did not expect is a message and exit status 2, not std::terminate.
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scales %s: %s\n", argc > 1 ? argv[1] : "", e.what());
    return 2;
  }
}
