#include "support/zookeeper_fixture.h"

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

namespace scales::test {
namespace {

constexpr const char* kJava = "/usr/bin/java";
constexpr const char* kPython = "/usr/bin/python3";
constexpr auto kStartTimeout = std::chrono::seconds(30);

std::string ClassPath() {
  const char* jars[] = {"zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", "slf4j-nop.jar",
                        "metrics-core.jar", "snappy-java.jar", "commons-cli.jar",
                        "netty-handler.jar", "netty-common.jar", "netty-buffer.jar",
                        "netty-transport.jar", "netty-codec.jar", "netty-resolver.jar",
                        "netty-transport-native-epoll.jar",
                        "netty-transport-native-unix-common.jar"};
  std::string cp;
  for (const char* jar : jars) {
    if (!cp.empty()) cp += ':';
    cp += std::string("/usr/share/java/") + jar;
  }
  return cp;
}

std::filesystem::path MakeTempDir(const char* prefix) {
  std::string pattern =
      (std::filesystem::temp_directory_path() / fmt::format("{}-XXXXXX", prefix)).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error(fmt::format("mkdtemp: {}", std::strerror(errno)));
  }
  return pattern;
}

std::string BaseConfig(const std::filesystem::path& data, int client_port) {
  return fmt::format(
      "tickTime=500\n"
      "initLimit=20\n"
      "syncLimit=10\n"
      "dataDir={}\n"
      "clientPort={}\n"
      "clientPortAddress=127.0.0.1\n"
      "admin.enableServer=false\n"
      "4lw.commands.whitelist=ruok\n"
      "maxClientCnxns=0\n",
      data.string(), client_port);
}

}  // namespace

bool ZooKeeperAvailable() {
  return ::access(kJava, X_OK) == 0 && std::filesystem::exists("/usr/share/java/zookeeper.jar");
}

ZooKeeperServer::ZooKeeperServer(int port, bool start)
    : dir_(MakeTempDir("scales-zk")), owns_dir_(true) {
  std::filesystem::create_directories(dir_ / "data");
  // A free port may be taken by another process before the JVM binds it (the JVM then exits):
  // a port chosen here is chosen again.
  for (int attempt = 0;; ++attempt) {
    client_port_ = port ? port : FreeTcpPort();
    config_ = BaseConfig(dir_ / "data", client_port_);
    if (!start) {
      hold_ = PortHold(client_port_);
      return;
    }
    try {
      Start();
      return;
    } catch (const std::exception&) {
      // Only a JVM that exited (its bind failed) calls for another port; one that did not
      // answer in time would not do better on another.
      if (port != 0 || attempt == 2 || !start_exited_) {
        std::error_code ec;
        std::filesystem::remove_all(dir_, ec);
        throw;
      }
    }
  }
}

ZooKeeperServer::ZooKeeperServer(std::filesystem::path dir, int client_port, std::string config)
    : dir_(std::move(dir)), client_port_(client_port), config_(std::move(config)) {}

ZooKeeperServer::~ZooKeeperServer() {
  Stop();
  if (owns_dir_) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

std::string ZooKeeperServer::connect_string() const {
  return fmt::format("127.0.0.1:{}", client_port_);
}

std::string ZooKeeperServer::Uri(const std::string& path) const {
  return fmt::format("zk://{}{}", connect_string(), path);
}

void ZooKeeperServer::WriteConfig() const {
  std::ofstream out(dir_ / "zoo.cfg");
  out << config_;
}

void ZooKeeperServer::Start() {
  if (process_) return;
  hold_.Release();
  WriteConfig();
  std::vector<std::string> command{kJava, "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                                   "-Dzookeeper.admin.enableServer=false"};
  command.insert(command.end(), jvm_flags_.begin(), jvm_flags_.end());
  command.insert(command.end(), {"-cp", ClassPath(),
                                 owns_dir_ ? "org.apache.zookeeper.server.ZooKeeperServerMain"
                                           : "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                                 (dir_ / "zoo.cfg").string()});
  process_ = std::make_unique<ChildProcess>(std::move(command));
  auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  // "imok" to "ruok", not only an accepted connection: another process may hold the port.
  while (!ZooKeeperAnswersRuok(client_port_, std::chrono::milliseconds(500))) {
    bool exited = !process_->Running();
    start_exited_ = exited;
    if (exited || std::chrono::steady_clock::now() > deadline) {
      std::string command = process_->CommandLine();
      process_->Stop();
      process_.reset();
      throw std::runtime_error(fmt::format("ZooKeeper {} without answering on 127.0.0.1:{}: {}",
                                           exited ? "exited" : "did not start in 30 s",
                                           client_port_, command));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void ZooKeeperServer::Stop() {
  if (!process_) return;
  process_->Stop(std::chrono::seconds(10));
  process_.reset();
  hold_ = PortHold(client_port_);
}

void ZooKeeperServer::Kill() {
  if (!process_) return;
  process_->Kill();
  process_.reset();
  hold_ = PortHold(client_port_);
}

ZooKeeperEnsemble::ZooKeeperEnsemble() : dir_(MakeTempDir("scales-zk-ensemble")) {
  struct Ports {
    int client, quorum, election;
  };
  std::vector<Ports> ports;
  auto free_ports = FreeTcpPorts(9);  // distinct
  for (size_t i = 0; i < 3; ++i) {
    ports.push_back({free_ports[3 * i], free_ports[3 * i + 1], free_ports[3 * i + 2]});
  }
  std::string peers;
  for (int i = 0; i < 3; ++i) {
    peers += fmt::format("server.{}=127.0.0.1:{}:{}\n", i + 1, ports[i].quorum, ports[i].election);
  }
  for (int i = 0; i < 3; ++i) {
    auto dir = dir_ / fmt::format("s{}", i + 1);
    std::filesystem::create_directories(dir / "data");
    std::ofstream(dir / "data" / "myid") << (i + 1) << "\n";
    std::string config = BaseConfig(dir / "data", ports[i].client) + peers;
    servers_.push_back(std::unique_ptr<ZooKeeperServer>(
        new ZooKeeperServer(dir, ports[i].client, std::move(config))));
  }
  for (auto& s : servers_) s->Start();
  // The client ports open before a leader is elected: wait for a working session.
  auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  for (;;) {
    try {
      RunKazoo(connect_string(), "zk.ensure_path('/ready')", std::chrono::seconds(15));
      break;
    } catch (const std::exception&) {
      if (std::chrono::steady_clock::now() > deadline) throw;
    }
  }
}

ZooKeeperEnsemble::~ZooKeeperEnsemble() {
  for (auto& s : servers_) s->Stop();
  servers_.clear();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::string ZooKeeperEnsemble::connect_string() const {
  std::string out;
  for (const auto& s : servers_) {
    if (!out.empty()) out += ',';
    out += s->connect_string();
  }
  return out;
}

std::string ZooKeeperEnsemble::Uri(const std::string& path) const {
  return fmt::format("zk://{}{}", connect_string(), path);
}

std::string RunKazoo(const std::string& hosts, const std::string& body,
                     std::chrono::milliseconds timeout) {
  std::string indented;
  size_t start = 0;
  while (start < body.size()) {
    size_t nl = body.find('\n', start);
    std::string line = body.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
    indented += "    " + line + "\n";
    if (nl == std::string::npos) break;
    start = nl + 1;
  }
  std::string script = fmt::format(
      "import json, logging, sys\n"
      "logging.basicConfig(level=logging.CRITICAL)\n"
      "from kazoo.client import KazooClient\n"
      "zk = KazooClient(hosts={}, timeout=10)\n"
      "zk.start(timeout=20)\n"
      "try:\n"
      "{}"
      "finally:\n"
      "    zk.stop()\n"
      "    zk.close()\n",
      "'" + hosts + "'", indented.empty() ? "    pass\n" : indented);
  ChildProcess process({kPython, "-c", script});
  std::string output;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    auto line = process.ReadLine(left);
    if (!line) break;
    output += *line + "\n";
  }
  auto status = process.WaitForExit(std::chrono::milliseconds(
      std::max<int64_t>(100, std::chrono::duration_cast<std::chrono::milliseconds>(
                                 deadline - std::chrono::steady_clock::now())
                                 .count())));
  if (!status || !WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
    process.Kill();
    throw std::runtime_error(fmt::format("kazoo script failed ({}):\n{}\noutput:\n{}",
                                         status ? "exit status" : "timeout", script, output));
  }
  return output;
}

std::string FinagleMemberPython(const std::string& host, int port,
                                const std::map<std::string, int>& additional,
                                const std::string& status) {
  std::string extra;
  for (const auto& [name, p] : additional) {
    if (!extra.empty()) extra += ", ";
    extra += fmt::format("'{}': {{'host': '{}', 'port': {}}}", name, host, p);
  }
  return fmt::format(
      "json.dumps({{'serviceEndpoint': {{'host': '{}', 'port': {}}}, "
      "'additionalEndpoints': {{{}}}, 'status': '{}'}}).encode()",
      host, port, extra, status);
}

}  // namespace scales::test
