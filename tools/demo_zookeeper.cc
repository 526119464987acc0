// The ZooKeeper part of `scales demo`: a local ZooKeeper server (Debian's package, started
// here when Java is present), HTTP test servers that register themselves in it
// (`scales testserver http --announce zk://...`), and a client that finds them through a zk://
// URI. A server joins and another leaves during a short load run; the membership changes are
// printed as the server set reports them.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/thread_pool.hpp>
#include <fmt/format.h>

#include "child_process.h"
#include "commands.h"
#include "scales/discovery/zookeeper.h"
#include "scales/http/client.h"

namespace scales::tools {
namespace {

using namespace std::chrono_literals;

using Child = ChildProcess;

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

bool Accepts(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  return ok;
}

// A `scales testserver http --announce URI` child; returns its endpoint or "".
std::string StartAnnounced(Child& child, const std::string& name, const std::string& uri) {
  std::string line;
  if (!child.Start("/proc/self/exe",
                   {"scales", "testserver", "http", "--name", name, "--announce", uri}, &line) ||
      !line.starts_with("listening ")) {
    return "";
  }
  return line.substr(std::string("listening ").size());
}

}  // namespace

int RunZooKeeperDemo(double seconds) {
  std::printf("\n11. service discovery through ZooKeeper\n");
  const char* jars = "/usr/share/java";
  if (access("/usr/bin/java", X_OK) != 0 ||
      !std::filesystem::exists(std::string(jars) + "/zookeeper.jar")) {
    std::printf("   skipped: Java or Debian's zookeeper package is not installed\n");
    return 0;
  }
  auto dir = std::filesystem::temp_directory_path() / fmt::format("scales-demo-zk-{}", getpid());
  std::filesystem::create_directories(dir / "data");
  int port = FreePort();
  std::ofstream(dir / "zoo.cfg") << fmt::format(
      "tickTime=500\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n"
      "admin.enableServer=false\n4lw.commands.whitelist=\n",
      (dir / "data").string(), port);
  std::string cp;
  for (const char* jar : {"zookeeper", "zookeeper-jute", "slf4j-api", "slf4j-nop", "metrics-core",
                          "snappy-java", "commons-cli", "netty-handler", "netty-common",
                          "netty-buffer", "netty-transport", "netty-codec", "netty-resolver",
                          "netty-transport-native-epoll", "netty-transport-native-unix-common"}) {
    cp += fmt::format("{}{}/{}.jar", cp.empty() ? "" : ":", jars, jar);
  }
  int status = 0;
  {
    Child zk;
    zk.Start("/usr/bin/java",
             {"java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", cp,
              "org.apache.zookeeper.server.ZooKeeperServerMain", (dir / "zoo.cfg").string()},
             nullptr);
    auto until = std::chrono::steady_clock::now() + 30s;
    while (!Accepts(port) && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(50ms);
    const std::string uri = fmt::format("zk://127.0.0.1:{}/scales/demo", port);
    std::printf("   started ZooKeeper on 127.0.0.1:%d\n", port);

    std::map<std::string, std::unique_ptr<Child>> servers;
    std::map<std::string, std::string> name_of;
    auto start = [&](const std::string& name) {
      auto child = std::make_unique<Child>();
      std::string ep = StartAnnounced(*child, name, uri);
      if (ep.empty()) return false;
      name_of[ep] = name;
      servers[name] = std::move(child);
      std::printf("   started %-7s on %s with --announce %s\n", name.c_str(), ep.c_str(), uri.c_str());
      return true;
    };
    if (!start("delta") || !start("epsilon")) {
      std::fprintf(stderr, "demo: could not start announced test servers\n");
      std::filesystem::remove_all(dir);
      return 2;
    }

    // Print the membership changes as the server set reports them.
    ZooKeeperServerSet watch(ScalesUriParser::Parse(uri));
    boost::asio::thread_pool printer(1);
    std::mutex mu;
    std::vector<Endpoint> shown;
    uint64_t id = watch.Subscribe(printer.get_executor(), [&](const ServerSet::Members& m) {
      std::lock_guard lock(mu);
      for (auto& e : shown) {
        if (std::find(m.begin(), m.end(), e) == m.end()) {
          std::printf("   [server set] - %s (%s left)\n", e.ToString().c_str(), name_of[e.ToString()].c_str());
        }
      }
      for (auto& e : m) {
        if (std::find(shown.begin(), shown.end(), e) == shown.end()) {
          std::printf("   [server set] + %s (%s joined)\n", e.ToString().c_str(), name_of[e.ToString()].c_str());
        }
      }
      std::fflush(stdout);
      shown = m;
    });

    try {
      http::HttpOptions options;
      options.client.name = "demo-zk";
      options.client.timeout = 2s;
      auto client = Http::NewClient(uri, options);
      std::printf("   client = scales::Http::NewClient(\"%s\")\n", uri.c_str());
      std::atomic<bool> stop{false};
      std::atomic<int> active{8};
      std::promise<void> drained;
      std::mutex count_mu;
      std::map<std::string, int64_t> counts;
      int64_t failed = 0;
      std::function<void()> next = [&] {
        if (stop) {
          if (--active == 0) drained.set_value();
          return;
        }
        client.AsyncGet("/", [&](error_code ec, http::Response r) {
          {
            std::lock_guard lock(count_mu);
            if (ec) {
              ++failed;
            } else {
              ++counts[std::string(r.Header("X-Server"))];
            }
          }
          next();
        });
      };
      for (int i = 0; i < 8; ++i) next();
      const int ticks = std::max(6, static_cast<int>(seconds * 2));
      const auto t0 = std::chrono::steady_clock::now();
      for (int t = 1; t <= ticks; ++t) {
        std::this_thread::sleep_until(t0 + t * 500ms);
        if (t == ticks / 3) start("zeta");
        if (t == 2 * ticks / 3) {
          std::printf("   stopping delta (its member is removed on the way out)\n");
          servers["delta"]->Stop();
        }
        std::lock_guard lock(count_mu);
        std::string line = fmt::format("   t={:4.1f}s ", t * 0.5);
        for (const char* n : {"delta", "epsilon", "zeta"}) line += fmt::format(" {} {:5d}", n, counts[n]);
        std::printf("%s   failed %lld\n", line.c_str(), static_cast<long long>(failed));
        std::fflush(stdout);
        counts.clear();
        failed = 0;
      }
      stop = true;
      drained.get_future().wait();
      std::printf("   every request completed; the few failures were on delta's connections when it"
                  " stopped.\n");
      client.Close();
    } catch (const Error& e) {
      std::fprintf(stderr, "demo: %s\n", e.what());
      status = 2;
    }
    watch.Unsubscribe(id);
    printer.join();
    servers.clear();
  }
  std::filesystem::remove_all(dir);
  return status;
}

}  // namespace scales::tools
