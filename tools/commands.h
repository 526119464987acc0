#pragma once
// Sub-commands of the `scales` command-line tool. Each returns the process exit status.

namespace scales::tools {

// scales http get|post|put|delete|head URI PATH [-H 'Name: value']... [--data TEXT]
//             [--timeout 2s] [--include]
int RunHttpCommand(int argc, char** argv);
// scales bench http URI --path PATH --concurrency N (--requests N | --duration 10s) [--json]
int RunBenchCommand(int argc, char** argv);
// scales testserver http --port P [--name NAME]
int RunTestServerCommand(int argc, char** argv);
// scales demo [--seconds S]
int RunDemoCommand(int argc, char** argv);

}  // namespace scales::tools
