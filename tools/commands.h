#pragma once
// Sub-commands of the `scales` command-line tool. Each returns the process exit status.

namespace scales::tools {

// scales http get|post|put|delete|patch|head|options URI PATH [-H 'Name: value']... [--data TEXT]
//             [--timeout 2s] [--include]
int RunHttpCommand(int argc, char** argv);
// scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--json]
//              [--method GET] [--data TEXT] [--timeout 5s] [--threads T] [--stats]
int RunBenchCommand(int argc, char** argv);
// scales testserver http --port P [--name NAME]
int RunTestServerCommand(int argc, char** argv);
// scales demo [--seconds S]
int RunDemoCommand(int argc, char** argv);

}  // namespace scales::tools
