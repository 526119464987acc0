#include "support/mux_server_fixture.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#ifndef SCALES_SOURCE_DIR
#error "SCALES_SOURCE_DIR must be defined (tests/CMakeLists.txt)"
#endif
#ifndef SCALES_THRIFT_COMPILER
#define SCALES_THRIFT_COMPILER "/usr/bin/thrift"
#endif

namespace scales::test {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr milliseconds kStartTimeout(15000);  // the server runs `thrift --gen py` first
constexpr milliseconds kBindRetry(5000);
constexpr const char* kPython = "/usr/bin/python3";

std::filesystem::path MakeTempDir() {
  std::string templ =
      (std::filesystem::temp_directory_path() / "scales-mux-server-XXXXXX").string();
  if (mkdtemp(templ.data()) == nullptr) {
    throw std::runtime_error("MuxReferenceServer: cannot create a temporary directory");
  }
  return templ;
}

}  // namespace

std::string MuxReferenceServer::ScriptPath() {
  return std::string(SCALES_SOURCE_DIR) + "/tests/integration/mux_reference/mux_server.py";
}

std::vector<std::string> MuxReferenceServer::TlsArgs(std::string_view mode, const std::string& cert,
                                                     const std::string& key, const std::string& client_ca) {
  std::vector<std::string> args = {"--tls-mode", std::string(mode), "--tls-cert", cert, "--tls-key", key};
  if (!client_ca.empty()) {
    args.push_back("--tls-client-ca");
    args.push_back(client_ca);
  }
  return args;
}

MuxReferenceServer::MuxReferenceServer(std::vector<std::string> extra_args)
    : extra_args_(std::move(extra_args)), dir_(MakeTempDir()), log_path_(dir_ / "mux.log") {
  try {
    Start(0, milliseconds(0));
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    throw;
  }
}

MuxReferenceServer::~MuxReferenceServer() {
  Stop();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::string MuxReferenceServer::endpoint() const { return fmt::format("127.0.0.1:{}", port_); }

void MuxReferenceServer::Stop() {
  if (process_) process_->Stop();
  process_.reset();
  hold_ = PortHold(port_);
}

void MuxReferenceServer::Restart() {
  Stop();
  Start(port_, kBindRetry);
}

void MuxReferenceServer::Restart(std::vector<std::string> extra_args) {
  extra_args_ = std::move(extra_args);
  Restart();
}

void MuxReferenceServer::Start(int port, milliseconds bind_retry) {
  hold_.Release();
  auto retry_until = Clock::now() + bind_retry;
  for (;;) {
    std::vector<std::string> argv = {
        kPython,    ScriptPath(),
        "--port",   std::to_string(port),
        "--log",    log_path_.string(),
        // The generated code goes into the fixture's directory, which the fixture removes
        // even when the server was killed before it could clean up after itself.
        "--work-dir", (dir_ / "gen").string(),
        "--thrift", SCALES_THRIFT_COMPILER,
        "--idl",    std::string(SCALES_SOURCE_DIR) + "/tools/echo.thrift"};
    argv.insert(argv.end(), extra_args_.begin(), extra_args_.end());
    auto process = std::make_unique<ChildProcess>(std::move(argv));
    std::optional<std::string> line = process->ReadLine(kStartTimeout);
    constexpr std::string_view kPrefix = "listening ";
    if (line && line->starts_with(kPrefix)) {
      auto colon = line->rfind(':');
      int bound = colon == std::string::npos ? 0 : std::atoi(line->c_str() + colon + 1);
      if (bound <= 0) {
        throw std::runtime_error(fmt::format("mux_server.py printed a malformed line '{}'; {}",
                                             *line, process->CommandLine()));
      }
      port_ = bound;
      process_ = std::move(process);
      return;
    }
    std::string command = process->CommandLine();
    process->Stop();
    if (Clock::now() >= retry_until) {
      throw std::runtime_error(
          fmt::format("mux_server.py did not start (no 'listening' line{}); command: {}",
                      line ? ", got '" + *line + "'" : std::string(), command));
    }
    std::this_thread::sleep_for(milliseconds(100));
  }
}

std::string MuxReferenceServer::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> MuxReferenceServer::LogLines() const {
  std::vector<std::string> lines;
  std::istringstream in(Log());
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::vector<std::string> MuxReferenceServer::LogLinesWith(
    std::vector<std::string_view> needles) const {
  std::vector<std::string> out;
  for (auto& line : LogLines()) {
    bool all = true;
    for (auto n : needles) all = all && line.find(n) != std::string::npos;
    if (all) out.push_back(std::move(line));
  }
  return out;
}

bool MuxReferenceServer::WaitForLog(std::vector<std::string_view> needles,
                                    milliseconds timeout) const {
  auto until = Clock::now() + timeout;
  for (;;) {
    if (!LogLinesWith(needles).empty()) return true;
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(milliseconds(10));
  }
}

}  // namespace scales::test
