// The demo's ZooKeeper: Debian's zookeeper package run with Java on a free local port, in a
// private temporary directory; the demo registers its servers in it as members of
// Finagle-style server sets (Announcer), which the clients then find through zk:// URIs.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "demo.h"
#include "scales/discovery/uri.h"
#include "zk_probe.h"

namespace scales::tools {
namespace {

using namespace std::chrono_literals;

constexpr const char* kJars = "/usr/share/java";

// The last lines (up to 3, 300 bytes) of the file at `path`, joined with " | ", without the
// frames of a Java stack trace (indented) which would hide its message; "" if none.
std::string Tail(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> lines;
  size_t end = text.size();
  while (lines.size() < 3 && end > 0) {
    const size_t begin = text.rfind('\n', end - 1);
    std::string line = text.substr(begin == std::string::npos ? 0 : begin + 1,
                                   end - (begin == std::string::npos ? 0 : begin + 1));
    if (!line.empty() && line[0] != ' ' && line[0] != '\t' && line.find_first_not_of(" \t\r") != std::string::npos) {
      lines.insert(lines.begin(), line);
    }
    if (begin == std::string::npos) break;
    end = begin;
  }
  std::string out;
  for (const auto& line : lines) out += (out.empty() ? "" : " | ") + line;
  if (out.size() > 300) out = "..." + out.substr(out.size() - 300);
  return out;
}

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

}  // namespace

LocalZooKeeper::~LocalZooKeeper() {
  members_.clear();  // each deletes its member while the server still runs
  java_.Stop();
  if (!dir_.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
}

// A demo stopped by a signal stops its ZooKeeper but cannot remove the data directory (not from
// a signal handler): the next demo removes those whose process is gone.
void LocalZooKeeper::RemoveStaleDirectories() {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(std::filesystem::temp_directory_path(), ec)) {
    const std::string name = entry.path().filename().string();
    constexpr std::string_view kPrefix = "scales-demo-zk-";
    if (!name.starts_with(kPrefix)) continue;
    const std::string digits = name.substr(kPrefix.size());
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(digits));
    if (pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH)) {
      std::error_code ignored;
      std::filesystem::remove_all(entry.path(), ignored);
    }
  }
}

bool LocalZooKeeper::Start(std::string& why) {
  if (access("/usr/bin/java", X_OK) != 0) {
    why = "Java (/usr/bin/java) is not installed";
    return false;
  }
  if (!std::filesystem::exists(std::string(kJars) + "/zookeeper.jar")) {
    why = "Debian's zookeeper package (/usr/share/java/zookeeper.jar) is not installed";
    return false;
  }
  RemoveStaleDirectories();
  dir_ = std::filesystem::temp_directory_path() / fmt::format("scales-demo-zk-{}", getpid());
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);  // a killed earlier demo that had this pid
  std::filesystem::create_directories(dir_ / "data");
  port_ = FreePort();
  std::ofstream(dir_ / "zoo.cfg") << fmt::format(
      "tickTime=500\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n"
      "admin.enableServer=false\n4lw.commands.whitelist=ruok\n",
      (dir_ / "data").string(), port_);
  std::string cp;
  for (const char* jar : {"zookeeper", "zookeeper-jute", "slf4j-api", "slf4j-nop", "metrics-core",
                          "snappy-java", "commons-cli", "netty-handler", "netty-common",
                          "netty-buffer", "netty-transport", "netty-codec", "netty-resolver",
                          "netty-transport-native-epoll", "netty-transport-native-unix-common"}) {
    cp += fmt::format("{}{}/{}.jar", cp.empty() ? "" : ":", kJars, jar);
  }
  // Its output goes to a file in the directory: the end of it says why it did not start.
  const std::filesystem::path output = dir_ / "zookeeper.out";
  if (!java_.Start("/usr/bin/java",
                   {"java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", cp,
                    "org.apache.zookeeper.server.ZooKeeperServerMain", (dir_ / "zoo.cfg").string()},
                   nullptr, output.string())) {
    why = java_.error();
    return false;
  }
  auto with_output = [&] {
    const std::string tail = Tail(output);
    return tail.empty() ? std::string(" (it printed nothing)") : fmt::format(" (its output ended: {})", tail);
  };
  auto until = std::chrono::steady_clock::now() + 30s;
  // Ready when it answers "imok": an accepted connection could be another process's that took
  // the free port first (ZooKeeper, unable to bind, then exits).
  while (!ZooKeeperAnswersRuok(port_, 500ms)) {
    if (auto status = java_.Exited()) {
      why = fmt::format("java exited ({}) before ZooKeeper answered on {}{}", *status, address(), with_output());
      return false;
    }
    if (std::chrono::steady_clock::now() > until) {
      java_.Stop();
      why = fmt::format("ZooKeeper did not answer \"ruok\" on {} within 30 s{}", address(), with_output());
      return false;
    }
    std::this_thread::sleep_for(50ms);
  }
  return true;
}

std::string LocalZooKeeper::address() const { return fmt::format("127.0.0.1:{}", port_); }

bool LocalZooKeeper::Announce(const std::string& zk_uri, const std::string& endpoint, std::string& why) {
  ServiceInstance instance;
  const auto colon = endpoint.rfind(':');
  std::unique_ptr<Announcer> member;
  try {
    instance.service_endpoint = {endpoint.substr(0, colon),
                                 static_cast<uint16_t>(std::stoi(endpoint.substr(colon + 1)))};
    member = std::make_unique<Announcer>(ScalesUriParser::Parse(zk_uri), instance);
  } catch (const std::exception& e) {  // scales::Error, or std::system_error: no thread for its session
    why = fmt::format("cannot announce: {}", e.what());
    return false;
  }
  if (!member->WaitAnnounced(10s)) {
    why = fmt::format("not announced within 10 s: {}", member->Describe());
    return false;
  }
  members_.push_back(std::move(member));
  return true;
}

}  // namespace scales::tools
