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
int RunThriftTestServerCommand(int argc, char** argv);  // scales testserver thrift [--port P] [--transport T] [--protocol P]
int RunThriftCommand(int argc, char** argv);  // scales thrift call URI METHOD [ARG] [--timeout D] [--client-id ID] [--protocol P] [--transport T]
// scales demo [--seconds S]
int RunDemoCommand(int argc, char** argv);
// The Thrift and ThriftMux rounds of the demo.
int RunThriftDemo(double seconds);
// scales testserver thriftmux [--port P] [--threads N] [--framer BYTES] [--ping-interval MS]
int RunThriftMuxTestServerCommand(int argc, char** argv);
// scales serverset URI [--watch] [--timeout 10s]
int RunServerSetCommand(int argc, char** argv);
// The ZooKeeper part of `scales demo` (skipped without Java); tools/demo_zookeeper.cc.
int RunZooKeeperDemo(double seconds);

}  // namespace scales::tools
