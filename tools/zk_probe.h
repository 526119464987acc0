#pragma once
// Whether a local port is ZooKeeper's: shared by the demo's ZooKeeper and the tests' fixture.
#include <chrono>

namespace scales::tools {

// Whether a ZooKeeper server answers "imok" to the "ruok" four-letter command on
// 127.0.0.1:port within `timeout` (the server's 4lw.commands.whitelist must list ruok). Proves
// the port is ZooKeeper's and that it serves, where an accepted connection would not: another
// process may hold the port, and ZooKeeper accepts before it is ready.
bool ZooKeeperAnswersRuok(int port, std::chrono::milliseconds timeout);

}  // namespace scales::tools
