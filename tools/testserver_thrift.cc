// `scales testserver thrift`: the Echo service (tools/echo.thrift) served by Apache Thrift's own
// C++ server, framed by default, for the demo, the benchmarks and the tests. The default server is
// TThreadedServer (a thread per connection); `--server nonblocking` serves it with
// TNonblockingServer instead (libevent; `--io-threads` event loops, each answering its connections'
// calls in place; framed only, no TLS), the event-driven server the throughput benchmarks use.
//
//   echo(m)   -> m
//   ping()    -> (void)
//   fail(m)   -> throws EchoError(m)
//   sleep(ms) -> sleeps ms milliseconds, answers ms as text
//
// On start it prints exactly one line, `listening 127.0.0.1:<port>` (the real port; --port 0
// lets the kernel choose), and flushes stdout. SIGTERM or SIGINT ends it.
//
// With --tls-cert/--tls-key it serves TLS from the first byte (Apache Thrift's
// TSSLServerSocket); --tls-client-ca also requires a client certificate signed by that CA.
#include <pthread.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>
#include <thrift/server/TNonblockingServer.h>
#include <thrift/server/TThreadedServer.h>
#include <thrift/transport/TNonblockingServerSocket.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TSSLServerSocket.h>
#include <thrift/transport/TSSLSocket.h>
#include <thrift/transport/TServerSocket.h>
#include <thrift/transport/TSocket.h>

#include "Echo.h"
#include "cli_util.h"
#include "commands.h"

namespace scales::tools {
namespace {

// TNonblockingServer starts its I/O threads 1..n-1 after preServe, and closes a connection it hands
// to one that has not yet registered its notify pipe ("notifyIOThread failed on fresh connection").
// It hands connection k to thread k % n, so n pings in a row, each on a new connection, prove that
// every thread serves. Returns false if that did not happen within `limit`.
bool AwaitIoThreads(int port, int io_threads, bool compact, std::chrono::milliseconds limit) {
  using namespace apache::thrift;
  const auto give_up = std::chrono::steady_clock::now() + limit;
  int in_a_row = 0;
  while (in_a_row < io_threads) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    try {
      auto socket = std::make_shared<transport::TSocket>("127.0.0.1", port);
      socket->setRecvTimeout(1000);
      auto framed = std::make_shared<transport::TFramedTransport>(socket);
      std::shared_ptr<protocol::TProtocol> proto;
      if (compact) {
        proto = std::make_shared<protocol::TCompactProtocol>(framed);
      } else {
        proto = std::make_shared<protocol::TBinaryProtocol>(framed);
      }
      framed->open();
      scales::echo::EchoClient(proto).ping();
      framed->close();
      ++in_a_row;
    } catch (const std::exception&) {
      in_a_row = 0;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return true;
}

class EchoHandler final : public scales::echo::EchoIf {
 public:
  void echo(std::string& r, const std::string& message) override { r = message; }
  void ping() override {}
  void fail(std::string&, const std::string& message) override {
    scales::echo::EchoError e;
    e.message = message;
    throw e;
  }
  void sleep(std::string& r, int32_t millis) override {
    if (millis > 0) std::this_thread::sleep_for(std::chrono::milliseconds(millis));
    r = std::to_string(millis);
  }
};

struct ReadyHandler final : apache::thrift::server::TServerEventHandler {
  std::promise<void> ready;
  void preServe() override { ready.set_value(); }
};

int Usage(std::FILE* out) {
  std::fputs(
      "usage: scales testserver thrift [--port P] [--transport framed|buffered]\n"
      "                                [--protocol binary|compact]\n"
      "                                [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]\n"
      "                                [--server threaded|nonblocking [--io-threads N]]\n"
      "  serves the Echo service (tools/echo.thrift) on 127.0.0.1 with Apache Thrift's\n"
      "  TThreadedServer (default) or TNonblockingServer (N libevent loops, default 1; framed\n"
      "  only, no TLS; a sleep() call stalls its loop); prints 'listening 127.0.0.1:<port>' once\n"
      "  ready. With --tls-cert and --tls-key: TLS (TSSLServerSocket); --tls-client-ca: require\n"
      "  client certificates signed by that CA (mutual TLS).\n",
      out);
  return out == stdout ? 0 : 2;
}

}  // namespace

int RunThriftTestServerCommand(int argc, char** argv) {
  // argv[0] == "testserver", argv[1] == "thrift"
  int port = 0;
  bool framed = true;
  bool compact = false;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  bool nonblocking = false;
  int io_threads = 1;
  if (HelpAnywhere(argc, argv)) return Usage(stdout);
  for (int i = 2; i < argc; ++i) {
    std::string_view arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (!arg.starts_with("-")) {
      std::fprintf(stderr, "scales testserver thrift: unexpected argument '%s' (only options)\n", argv[i]);
      return Usage(stderr);
    }
    if (value == nullptr) return Usage(stderr);
    ++i;
    if (arg == "--port") {
      const auto p = ParseIntInRange(value, 0, 65535);
      if (!p) return Usage(stderr);
      port = static_cast<int>(*p);
    } else if (arg == "--transport") {
      if (std::string_view(value) != "framed" && std::string_view(value) != "buffered") return Usage(stderr);
      framed = std::string_view(value) == "framed";
    } else if (arg == "--protocol") {
      if (std::string_view(value) != "binary" && std::string_view(value) != "compact") return Usage(stderr);
      compact = std::string_view(value) == "compact";
    } else if (arg == "--server") {
      if (std::string_view(value) != "threaded" && std::string_view(value) != "nonblocking") return Usage(stderr);
      nonblocking = std::string_view(value) == "nonblocking";
    } else if (arg == "--io-threads") {
      const auto n = ParseIntInRange(value, 1, 64);
      if (!n) return Usage(stderr);
      io_threads = static_cast<int>(*n);
    } else if (arg == "--tls-cert") {
      tls_cert = value;
    } else if (arg == "--tls-key") {
      tls_key = value;
    } else if (arg == "--tls-client-ca") {
      tls_client_ca = value;
    } else {
      std::fprintf(stderr, "scales testserver thrift: unknown option '%s'\n", argv[i - 1]);
      return Usage(stderr);
    }
  }
  // Signals are taken by one thread (sigwait), so no server thread is interrupted by them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  if (tls_cert.empty() != tls_key.empty() || (!tls_client_ca.empty() && tls_cert.empty())) {
    std::fputs("scales testserver thrift: --tls-cert and --tls-key go together (and --tls-client-ca needs them)\n",
               stderr);
    return Usage(stderr);
  }

  if (nonblocking && (!framed || !tls_cert.empty())) {
    std::fputs("scales testserver thrift: --server nonblocking serves framed Thrift without TLS only\n", stderr);
    return Usage(stderr);
  }

  using namespace apache::thrift;
  std::shared_ptr<protocol::TProtocolFactory> pf;
  if (compact) {
    pf = std::make_shared<protocol::TCompactProtocolFactory>();
  } else {
    pf = std::make_shared<protocol::TBinaryProtocolFactory>();
  }
  auto processor = std::make_shared<scales::echo::EchoProcessor>(std::make_shared<EchoHandler>());
  std::shared_ptr<server::TServer> server;
  std::function<int()> listening_port;
  if (nonblocking) {
    auto socket = std::make_shared<transport::TNonblockingServerSocket>("127.0.0.1", port);
    auto nb = std::make_shared<server::TNonblockingServer>(processor, pf, socket);
    nb->setNumIOThreads(static_cast<size_t>(io_threads));
    server = nb;
    listening_port = [nb] { return nb->getListenPort(); };
  } else {
    std::shared_ptr<transport::TServerSocket> socket;
    if (tls_cert.empty()) {
      socket = std::make_shared<transport::TServerSocket>("127.0.0.1", port);
    } else {
      try {
        auto ssl = std::make_shared<transport::TSSLSocketFactory>(transport::SSLTLS);
        ssl->server(true);
        ssl->loadCertificate(tls_cert.c_str());
        ssl->loadPrivateKey(tls_key.c_str());
        if (!tls_client_ca.empty()) ssl->loadTrustedCertificates(tls_client_ca.c_str());
        ssl->authenticate(!tls_client_ca.empty());
        socket = std::make_shared<transport::TSSLServerSocket>("127.0.0.1", port, ssl);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "scales testserver thrift: TLS setup failed: %s\n", e.what());
        return 1;
      }
    }
    std::shared_ptr<transport::TTransportFactory> tf;
    if (framed) {
      tf = std::make_shared<transport::TFramedTransportFactory>();
    } else {
      tf = std::make_shared<transport::TBufferedTransportFactory>();
    }
    server = std::make_shared<server::TThreadedServer>(processor, socket, tf, pf);
    listening_port = [socket] { return socket->getPort(); };
  }
  auto events = std::make_shared<ReadyHandler>();
  auto ready = events->ready.get_future();
  server->setServerEventHandler(events);
  std::thread serving([server] {
    try {
      server->serve();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "scales testserver thrift: %s\n", e.what());
      std::_Exit(1);
    }
  });
  ready.wait();
  if (nonblocking && !AwaitIoThreads(listening_port(), io_threads, compact, std::chrono::seconds(10))) {
    std::fprintf(stderr, "scales testserver thrift: the nonblocking server's %d I/O threads did not all serve within 10 s\n",
                 io_threads);
    std::_Exit(1);
  }
  std::printf("listening 127.0.0.1:%d\n", listening_port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&signals, &sig);
  // Handlers may be sleeping; a test server need not wait for them.
  std::_Exit(0);
}

}  // namespace scales::tools
