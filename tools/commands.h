#pragma once
// Sub-commands of the `scales` command-line tool. Each returns the process exit status.

namespace scales::tools {

// scales http get|post|put|delete|patch|head|options URI PATH [-H 'Name: value']... [--data TEXT]
//             [--timeout 2s] [--include]
int RunHttpCommand(int argc, char** argv);
// scales bench http|thrift|thriftmux URI ... (--requests N | --duration 10s) [--rate R] [--json]
//              [--report FILE.html] [--progress]: tools/bench_command.cc
int RunBenchCommand(int argc, char** argv);
// scales testserver http --port P [--name NAME]
int RunTestServerCommand(int argc, char** argv);
int RunThriftTestServerCommand(int argc, char** argv);  // scales testserver thrift [--port P] [--transport T] [--protocol P]
int RunThriftCommand(int argc, char** argv);  // scales thrift call URI METHOD [ARG] [--timeout D] [--client-id ID] [--protocol P] [--transport T]
// scales demo [--seconds S] [--rate R] [--report FILE.html]: tools/demo_command.cc
int RunDemoCommand(int argc, char** argv);
// scales testserver thriftmux [--port P] [--threads N] [--framer BYTES] [--ping-interval MS]
int RunThriftMuxTestServerCommand(int argc, char** argv);
// scales serverset URI [--watch] [--timeout 10s]
int RunServerSetCommand(int argc, char** argv);

}  // namespace scales::tools
