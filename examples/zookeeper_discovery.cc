// ZooKeeper discovery end to end: announce a server in a server set with scales::Announcer (the
// Finagle serverset JSON, an ephemeral `member_` znode), find it through a zk:// URI with an
// HTTP client, call it, then withdraw it and watch the member list empty.
//
//   example_zookeeper_discovery zk://127.0.0.1:2181/services/web 127.0.0.1:8080 [/path]
//
// Start ZooKeeper and an HTTP server first, e.g. `scales testserver http --port 8080`. (A
// server can also announce itself: `scales testserver http --announce zk://...`.)
#include <chrono>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <thread>

#include <scales/discovery/uri.h>
#include <scales/discovery/zookeeper.h>
#include <scales/http/client.h>

namespace {

// The members the ZooKeeper server set last published, as "[a:1 b:2]", or "(not known yet)".
std::string Show(const scales::ZooKeeperServerSet& set) {
  std::optional<scales::ServerSet::Members> members = set.members();
  if (!members) return "(not known yet)";
  std::string out = "[";
  for (const scales::Endpoint& e : *members) out += (out.size() > 1 ? " " : "") + e.ToString();
  return out + "]";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s zk://ZKHOST:PORT/PATH HOST:PORT [PATH]\n", argv[0]);
    return 2;
  }
  const std::string zk_uri = argv[1];
  const std::string path = argc > 3 ? argv[3] : "/";
  try {
    // 1. Announce HOST:PORT. The member is written in the background; wait until it exists so
    //    that the client below finds it in its first member list.
    scales::ServiceInstance instance;
    instance.service_endpoint =
        scales::ScalesUriParser::Parse("tcp://" + std::string(argv[2])).hosts.at(0);
    scales::Announcer announcer(scales::ScalesUriParser::Parse(zk_uri), instance);
    if (!announcer.WaitAnnounced(std::chrono::seconds(10))) {
      std::fprintf(stderr, "error: not announced: %s\n", announcer.Describe().c_str());
      return 1;
    }
    std::printf("announced: %s\n", announcer.node_path().c_str());

    // 2. A client through the zk:// URI. Opening waits for the server set's first member list.
    scales::http::HttpOptions options;
    options.client.name = "example";
    options.client.timeout = std::chrono::seconds(5);
    auto client = scales::Http::NewClient(zk_uri, options);
    // A zk:// client's server set is a ZooKeeperServerSet; it can be asked for its members.
    const auto& set = dynamic_cast<const scales::ZooKeeperServerSet&>(*client.core()->server_set());
    std::printf("members:   %s\n", Show(set).c_str());

    // 3. A call goes to a member.
    scales::http::Response r = client.Get(path);
    std::printf("call:      %d %s", r.status, r.body.c_str());

    // 4. Withdraw the member: the server set's watch sees the znode go (within a second or so).
    announcer.Shutdown();
    for (int i = 0; i < 100 && set.members() && !set.members()->empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    std::printf("withdrawn: %s\n", Show(set).c_str());
    client.Close();
    return 0;
  } catch (const std::exception& e) {
    // scales::Error: kBadUri from the Announcer for a URI that is not zk:// (so the client is
    // always a zk:// one and the dynamic_cast above cannot fail), ZooKeeper and call failures.
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
