#pragma once
// Parts of `scales demo` (tools/demo_command.cc tells the story).

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "Echo.h"
#include "child_process.h"
#include "scales/discovery/zookeeper.h"
#include "scales/thrift/thrift.h"

namespace scales::tools {

// A local ZooKeeper server (Debian's zookeeper package run with Java) in a private temporary
// directory, and the members the demo announces in it. Not thread-safe.
class LocalZooKeeper {
 public:
  LocalZooKeeper() = default;
  ~LocalZooKeeper();  // withdraws the members, stops the server, removes the directory
  LocalZooKeeper(const LocalZooKeeper&) = delete;
  LocalZooKeeper& operator=(const LocalZooKeeper&) = delete;

  // Starts the server and waits (30 s at most) until it accepts connections. Returns false,
  // with the reason in `why`, when Java or the zookeeper package is missing or it did not start.
  bool Start(std::string& why);
  // "127.0.0.1:PORT".
  std::string address() const;
  // Registers `host:port` as a member of the server set at `zk_uri` (a session of its own, as a
  // server would hold) and waits (10 s at most) until the member exists. Returns false, with the
  // reason in `why`, when it could not.
  bool Announce(const std::string& zk_uri, const std::string& endpoint, std::string& why);

 private:
  static void RemoveStaleDirectories();

  std::filesystem::path dir_;
  int port_ = 0;
  ChildProcess java_;
  std::vector<std::unique_ptr<Announcer>> members_;
};

// The Echo calls of the demo's Thrift and ThriftMux rounds, printed: a blocking call, a
// future, a declared exception arriving as itself, a timeout (tools/demo_thrift.cc).
void ShowThriftCalls(const thrift::ThriftClient<echo::EchoClient>& client);

}  // namespace scales::tools
