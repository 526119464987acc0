// The Thrift client against real Thrift servers on 127.0.0.1: Apache Thrift's own C++ servers
// run in-process (TThreadedServer framed, TSimpleServer buffered), Debian's python3-thrift
// server, and `scales testserver thrift` (killed mid-call). Every call completes exactly once.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <memory>
#include <memory_resource>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <gtest/gtest.h>
#include <thrift/TApplicationException.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>
#include <thrift/concurrency/ThreadFactory.h>
#include <thrift/concurrency/ThreadManager.h>
#include <thrift/server/TNonblockingServer.h>
#include <thrift/server/TSimpleServer.h>
#include <thrift/server/TThreadedServer.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TNonblockingServerSocket.h>
#include <thrift/transport/TServerSocket.h>

#include "Base.h"
#include "Derived.h"
#include "Echo.h"
#include "Hello.h"
#include "scales/thrift/thrift.h"
#include "support/fixtures.h"
#include "support/thrown.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using apache::thrift::TApplicationException;
using scales::echo::EchoClient;
using scales::thrifttest::Blob;
using scales::thrifttest::DerivedClient;
using scales::thrifttest::HelloClient;
using scales::thrifttest::TestError;
using thrift::Framing;
using thrift::Protocol;

// --- In-process Apache Thrift servers -------------------------------------------------------

class DerivedHandler : public scales::thrifttest::DerivedIf {
 public:
  void base_echo(std::string& r, const std::string& m) override { r = m; }
  int32_t add(int32_t a, int32_t b) override { return a + b; }
  void ping() override {}
  void notify(const std::string& m) override {
    std::lock_guard<std::mutex> l(mu_);
    last_ = m;
    cv_.notify_all();
  }
  void last_notification(std::string& r, int32_t wait_ms) override {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::milliseconds(wait_ms), [&] { return !last_.empty(); });
    r = last_;
  }
  void roundtrip(Blob& r, const Blob& b) override { r = b; }
  void boom(int32_t code) override {
    TestError e;
    e.message = "boom " + std::to_string(code);
    e.code = code;
    throw e;
  }
  void slow(std::string& r, int32_t millis) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(millis));
    r = std::to_string(millis);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::string last_;
};

class BaseOnlyHandler : public scales::thrifttest::BaseIf {
 public:
  void base_echo(std::string& r, const std::string& m) override { r = m; }
  int32_t add(int32_t a, int32_t b) override { return a + b; }
};

// kNonblocking: TNonblockingServer (libevent, framed only), one I/O thread handing calls to a
// pool of four workers (a handler that waits, last_notification, must not stall the loop that
// reads the notify it waits for). One I/O thread, because the server starts its other I/O threads
// after preServe, and closes a connection handed to one that has not yet registered its notify
// pipe ("notifyIOThread failed on fresh connection"): a test's first call would race the start.
enum class ServerKind { kThreaded, kSimple, kNonblocking };

// An Apache Thrift C++ server on a thread of this process, on a free loopback port.
class InProcessServer {
 public:
  InProcessServer(std::shared_ptr<apache::thrift::TProcessor> processor, ServerKind kind, Framing framing,
                  Protocol protocol) {
    using namespace apache::thrift;
    std::shared_ptr<protocol::TProtocolFactory> pf;
    if (protocol == Protocol::kCompact) {
      pf = std::make_shared<protocol::TCompactProtocolFactory>();
    } else {
      pf = std::make_shared<protocol::TBinaryProtocolFactory>();
    }
    if (kind == ServerKind::kNonblocking) {
      if (framing != Framing::kFramed) throw std::invalid_argument("TNonblockingServer serves framed Thrift only");
      auto workers = concurrency::ThreadManager::newSimpleThreadManager(4);
      workers->threadFactory(std::make_shared<concurrency::ThreadFactory>());
      workers->start();
      auto socket = std::make_shared<transport::TNonblockingServerSocket>("127.0.0.1", 0);
      auto nb = std::make_shared<server::TNonblockingServer>(processor, pf, socket, workers);
      nb->setNumIOThreads(1);
      Start(nb, [nb] { return nb->getListenPort(); });
      return;
    }
    auto socket = std::make_shared<transport::TServerSocket>("127.0.0.1", 0);
    std::shared_ptr<transport::TTransportFactory> tf;
    if (framing == Framing::kFramed) {
      tf = std::make_shared<transport::TFramedTransportFactory>();
    } else {
      tf = std::make_shared<transport::TBufferedTransportFactory>();
    }
    if (kind == ServerKind::kThreaded) {
      Start(std::make_shared<server::TThreadedServer>(processor, socket, tf, pf), [socket] { return socket->getPort(); });
    } else {
      Start(std::make_shared<server::TSimpleServer>(processor, socket, tf, pf), [socket] { return socket->getPort(); });
    }
  }
  ~InProcessServer() {
    server_->stop();
    thread_.join();
  }
  std::string uri() const { return "tcp://127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }

 private:
  struct ReadyHandler : apache::thrift::server::TServerEventHandler {
    std::promise<void> ready;
    void preServe() override { ready.set_value(); }
  };
  void Start(std::shared_ptr<apache::thrift::server::TServer> server, const std::function<int()>& listening_port) {
    server_ = std::move(server);
    auto events = std::make_shared<ReadyHandler>();
    auto ready = events->ready.get_future();
    server_->setServerEventHandler(events);
    thread_ = std::thread([this] { server_->serve(); });
    if (ready.wait_for(10s) != std::future_status::ready) throw std::runtime_error("Thrift server did not start");
    port_ = listening_port();
  }
  std::shared_ptr<apache::thrift::server::TServer> server_;
  std::thread thread_;
  int port_ = 0;
};

std::shared_ptr<Runtime> MakeRuntime(size_t threads = 2) {
  RuntimeOptions o;
  o.threads = threads;
  return std::make_shared<Runtime>(o);
}

thrift::ThriftOptions Options(Framing framing, Protocol protocol, std::shared_ptr<Runtime> rt) {
  thrift::ThriftOptions o;
  o.client.name = "thrift-it";
  o.client.runtime = std::move(rt);
  o.client.timeout = 10s;
  o.protocol = protocol;
  o.transport.framing = framing;
  o.resurrector.initial_backoff = 50ms;
  o.resurrector.max_backoff = 200ms;
  return o;
}

std::string Big(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + 7) & 0xff);
  return s;
}

// The checks every server passes, through the Derived service (which extends Base).
void ExerciseDerived(thrift::ThriftClient<DerivedClient>& client, bool concurrent) {
  // Blocking: inherited methods, i32, void.
  std::string r;
  client->base_echo(r, "hello");
  EXPECT_EQ(r, "hello");
  EXPECT_EQ(client->add(40, 2), 42);
  client->ping();

  // A declared exception arrives as itself, blocking and async.
  try {
    client->boom(7);
    ADD_FAILURE() << "boom did not throw";
  } catch (const TestError& e) {
    EXPECT_EQ(e.message, "boom 7");
    EXPECT_EQ(e.code, 7);
  }
  auto f = SCALES_THRIFT_CALL(client, boom, 9, boost::asio::use_future);
  try {
    f.get();
    ADD_FAILURE() << "async boom did not throw";
  } catch (const TestError& e) {
    EXPECT_EQ(e.code, 9);
  }

  // Oneway: no reply; the server sees it.
  SCALES_THRIFT_ONEWAY(client, notify, "one-way message", boost::asio::use_future).get();
  client->last_notification(r, 5000);
  EXPECT_EQ(r, "one-way message");

  // Large payloads (1 MiB each way), blocking and async.
  Blob big;
  big.data = Big(1 << 20);
  big.checksum = 12345;
  Blob back;
  client->roundtrip(back, big);
  EXPECT_EQ(back.data, big.data);
  EXPECT_EQ(back.checksum, 12345);
  Blob back2 = SCALES_THRIFT_CALL(client, roundtrip, big, boost::asio::use_future).get();
  EXPECT_EQ(back2.data.size(), big.data.size());

  // Many calls at once (several connections when the server serves them concurrently).
  const int n = concurrent ? 64 : 16;
  std::atomic<int> completions{0}, ok{0};
  std::promise<void> all;
  for (int i = 0; i < n; ++i) {
    client.Async(&DerivedClient::send_add, &DerivedClient::recv_add, i, 1000,
                 // n by value: the last completion wakes the test, whose frame then ends while
                 // earlier handlers may still be comparing with n.
                 [&ok, &completions, &all, n, i](std::exception_ptr e, int32_t sum) {
                   if (!e && sum == i + 1000) ok.fetch_add(1);
                   if (completions.fetch_add(1) + 1 == n) all.set_value();
                 });
  }
  ASSERT_EQ(all.get_future().wait_for(30s), std::future_status::ready);
  EXPECT_EQ(ok.load(), n);
  EXPECT_EQ(completions.load(), n);
}

struct ServerCase {
  ServerKind kind;
  Framing framing;
  Protocol protocol;
};

std::string CaseName(const ::testing::TestParamInfo<ServerCase>& info) {
  return std::string(info.param.kind == ServerKind::kThreaded      ? "Threaded"
                     : info.param.kind == ServerKind::kNonblocking ? "Nonblocking"
                                                                   : "Simple") +
         (info.param.framing == Framing::kFramed ? "Framed" : "Buffered") +
         (info.param.protocol == Protocol::kBinary ? "Binary" : "Compact");
}

class ThriftCppServerTest : public ::testing::TestWithParam<ServerCase> {};

TEST_P(ThriftCppServerTest, EchoVoidExceptionsOnewayLargeAndConcurrentCalls) {
  const ServerCase c = GetParam();
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         c.kind, c.framing, c.protocol);
  auto rt = MakeRuntime();
  thrift::ThriftOptions o = Options(c.framing, c.protocol, rt);
  if (c.kind == ServerKind::kSimple) {
    // TSimpleServer serves one connection at a time.
    o.pool.high_watermark = 1;
    rt = MakeRuntime(1);
    o.client.runtime = rt;
  }
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), o);
  ExerciseDerived(client, c.kind != ServerKind::kSimple);
  client.Close();
}

INSTANTIATE_TEST_SUITE_P(
    Servers, ThriftCppServerTest,
    ::testing::Values(ServerCase{ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary},
                      ServerCase{ServerKind::kThreaded, Framing::kFramed, Protocol::kCompact},
                      ServerCase{ServerKind::kThreaded, Framing::kBuffered, Protocol::kBinary},
                      ServerCase{ServerKind::kNonblocking, Framing::kFramed, Protocol::kBinary},
                      ServerCase{ServerKind::kNonblocking, Framing::kFramed, Protocol::kCompact},
                      ServerCase{ServerKind::kSimple, Framing::kBuffered, Protocol::kBinary},
                      ServerCase{ServerKind::kSimple, Framing::kBuffered, Protocol::kCompact}),
    CaseName);

// A buffered client calling a framed server: Apache's server reads the message header as a
// frame length ("Frame size has negative value") and closes the connection without a reply.
// The error names the framing as a likely cause. (The other way round, a buffered server reads the frame
// length as the start of a message and waits for more: the call times out.)
TEST(ThriftClientTest, AFramingMismatchIsNamedAsTheLikelyCause) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  auto rt = MakeRuntime();
  auto o = Options(Framing::kBuffered, Protocol::kBinary, rt);
  o.retry.reset();
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), o);
  Error e = test::Thrown([&] { client->add(1, 2); });
  EXPECT_EQ(e.code(), Errc::kConnectionClosed) << e.what();
  EXPECT_NE(std::string(e.what()).find("closed by the server while reading the reply for add (after 0 bytes): end of "
                                       "stream (no reply came on this connection: a server whose framing or "
                                       "protocol differs from the client's closes it so; this client's framing "
                                       "is buffered)"),
            std::string::npos)
      << e.what();
  client.Close();
}

TEST(ThriftClientTest, UnknownMethodIsATApplicationException) {
  // A server of the base service does not know the derived service's methods.
  InProcessServer server(std::make_shared<scales::thrifttest::BaseProcessor>(std::make_shared<BaseOnlyHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  auto rt = MakeRuntime();
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), Options(Framing::kFramed, Protocol::kBinary, rt));
  EXPECT_EQ(client->add(1, 2), 3);
  try {
    std::string r;
    client->slow(r, 1);
    ADD_FAILURE() << "no exception";
  } catch (const TApplicationException& e) {
    EXPECT_EQ(e.getType(), TApplicationException::UNKNOWN_METHOD);
  }
  auto f = SCALES_THRIFT_CALL(client, slow, 1, boost::asio::use_future);
  EXPECT_THROW(f.get(), TApplicationException);
  // The connection is still fine afterwards.
  EXPECT_EQ(client->add(2, 2), 4);
  client.Close();
}

TEST(ThriftClientTest, TimeoutClosesTheConnectionAndTheClientRecovers) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  auto rt = MakeRuntime();
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), Options(Framing::kFramed, Protocol::kBinary, rt));
  CallOptions short_timeout;
  short_timeout.timeout = 100ms;
  CallInfo info;
  short_timeout.info = &info;
  try {
    std::string r;
    client.WithOptions(short_timeout)->slow(r, 1000);
    ADD_FAILURE() << "no timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), make_error_code(Errc::kRequestTimeout));
    EXPECT_NE(std::string(e.what()).find("thrift-it"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(server.port())), std::string::npos) << e.what();
  }
  EXPECT_EQ(info.error, make_error_code(Errc::kRequestTimeout));
  // Async timeout: scales::Error in the exception_ptr.
  auto f = client.WithOptions(short_timeout).Async(&DerivedClient::send_slow, &DerivedClient::recv_slow, 1000,
                                                    boost::asio::use_future);
  try {
    f.get();
    ADD_FAILURE() << "no timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kRequestTimeout);
  }
  // The late replies must not reach the next calls: they were on closed connections.
  for (int i = 0; i < 5; ++i) {
    std::string r;
    client->slow(r, 1);
    EXPECT_EQ(r, "1");
  }
  client.Close();
}

class ThriftFramingTest : public ::testing::TestWithParam<Framing> {};

TEST_P(ThriftFramingTest, OversizeRepliesAndRequestsFailAndTheClientRecovers) {
  const Framing framing = GetParam();
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, framing, Protocol::kBinary);
  auto rt = MakeRuntime();
  auto big = Thrift::NewClient<DerivedClient>(server.uri(), Options(framing, Protocol::kBinary, rt));
  big->notify(std::string(4096, 'n'));
  thrift::ThriftOptions o = Options(framing, Protocol::kBinary, rt);
  o.transport.max_frame_bytes = 1024;
  auto small = Thrift::NewClient<DerivedClient>(server.uri(), o);
  std::string r;
  try {
    small->last_notification(r, 5000);  // a 4 KiB reply
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kResponseTooLarge) << e.what();
    EXPECT_NE(std::string(e.what()).find("max_frame_bytes"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(" for last_notification "), std::string::npos) << e.what();
  }
  try {
    small->base_echo(r, std::string(2048, 'x'));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kRequestTooLarge) << e.what();
  }
  small->base_echo(r, "fits");
  EXPECT_EQ(r, "fits");
  small.Close();
  big.Close();
}

// By default the client sends no frame that a default Apache server refuses: libthrift closes
// the connection on a frame over 16,384,000 bytes (TConfiguration::DEFAULT_MAX_FRAME_SIZE), so
// the client's default max_frame_bytes is that, and a request just over it fails before it is
// sent, not as a closed connection. One just under it goes through.
TEST(ThriftClientTest, TheDefaultFrameLimitIsADefaultApacheServers) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  auto client = Thrift::NewClient<DerivedClient>(
      server.uri(), Options(Framing::kFramed, Protocol::kBinary, MakeRuntime()));
  scales::thrifttest::Blob blob;
  blob.data = std::string(16384000 - 100, 'b');  // the frame: the blob plus 40 bytes of message
  scales::thrifttest::Blob back;
  client->roundtrip(back, blob);
  EXPECT_EQ(back.data.size(), blob.data.size());
  blob.data.resize(16384000 + 1000);
  try {
    client->roundtrip(back, blob);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kRequestTooLarge) << e.what();
    EXPECT_NE(std::string(e.what()).find("above max_frame_bytes (16384000 bytes)"), std::string::npos) << e.what();
  }
  blob.data = "small";
  client->roundtrip(back, blob);
  EXPECT_EQ(back.data, "small");
}

// A client allowed larger frames than the server: Apache's server reads the frame's length,
// refuses it ("Received an oversized frame") and closes the connection, which cuts the
// client's write of the rest. The server cannot have received the call whole, so the call fails
// as not sent (retryable); it used to fail as a closed connection, which a call that is not
// idempotent may not retry.
TEST(ThriftClientTest, ARequestCutMidWriteFailsAsNotSent) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  auto o = Options(Framing::kFramed, Protocol::kBinary, MakeRuntime());
  o.transport.max_frame_bytes = 64u << 20;
  o.retry.reset();
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), o);
  scales::thrifttest::Blob blob;
  blob.data = std::string(40u << 20, 'b');  // far more than the socket buffers hold
  scales::thrifttest::Blob back;
  Error e = test::Thrown([&] { client->roundtrip(back, blob); });
  // The write fails (a reset), or the read sees the server's end of stream first (the write
  // still blocked): either way the call is not sent.
  EXPECT_EQ(e.code(), Errc::kNotSent) << e.what();
  EXPECT_NE(std::string(e.what()).find("the server cannot have received it whole, so it was not sent"),
            std::string::npos)
      << e.what();
  // Named as a read error names it ("reading the reply for echo"): "writing the request for
  // roundtrip to X failed ..." or "... while the request for roundtrip (N bytes) was still being
  // written"; it said "the request" alone.
  EXPECT_NE(std::string(e.what()).find("the request for roundtrip "), std::string::npos) << e.what();
  blob.data = "small";
  client->roundtrip(back, blob);  // a new connection
  EXPECT_EQ(back.data, "small");
}

// Close() with a call in flight answers it naming its method, as the connection's other errors
// do: "connection to X closed by the client while the request for slow was in flight" (it said
// "the request" alone).
TEST(ThriftClientTest, CloseWithACallInFlightNamesItsMethod) {
  // Says when slow() has started: the request is then written and its reply awaited.
  struct StartedHandler final : DerivedHandler {
    std::promise<void> started;
    void slow(std::string& r, int32_t millis) override {
      started.set_value();
      DerivedHandler::slow(r, millis);
    }
  };
  auto handler = std::make_shared<StartedHandler>();
  auto started = handler->started.get_future();
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(handler), ServerKind::kThreaded,
                         Framing::kFramed, Protocol::kBinary);
  auto rt = MakeRuntime();
  auto o = Options(Framing::kFramed, Protocol::kBinary, rt);
  o.retry.reset();
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), o);
  auto f = SCALES_THRIFT_CALL(client, slow, 1000, boost::asio::use_future);
  ASSERT_EQ(started.wait_for(5s), std::future_status::ready);
  client.Close();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  try {
    f.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kClientClosed) << e.what();
    EXPECT_NE(std::string(e.what()).find("closed by the client while the request for slow was in flight"),
              std::string::npos)
        << e.what();
  }
}

// Hello's tree() answers a Node `levels` deep; the other methods are unused.
class TreeHandler final : public scales::thrifttest::HelloIf {
 public:
  explicit TreeHandler(int levels) : levels_(levels) {}
  void hi(std::string& r, const std::string& arg) override { r = arg; }
  void blobs(std::vector<scales::thrifttest::Blob>&, int32_t) override {}
  void tree(scales::thrifttest::Node& r) override {
    r = scales::thrifttest::Node();
    r.id = levels_;
    for (int level = levels_ - 1; level >= 1; --level) {
      scales::thrifttest::Node parent;
      parent.id = level;
      parent.children.push_back(std::move(r));
      parent.__isset.children = true;
      r = std::move(parent);
    }
  }
  void numbers(scales::thrifttest::Numbers&) override {}

 private:
  const int levels_;
};

// A Node 40 levels deep (41 structs with the result, a list between each two; Apache decodes up
// to 64 structs) comes back over either framing: the buffered transport's scan for the reply's
// end counted the lists too and refused it ("nesting deeper than 64").
TEST_P(ThriftFramingTest, ADeepReplyTheGeneratedCodeDecodesPassesEitherFraming) {
  const Framing framing = GetParam();
  InProcessServer server(std::make_shared<scales::thrifttest::HelloProcessor>(std::make_shared<TreeHandler>(40)),
                         ServerKind::kThreaded, framing, Protocol::kBinary);
  auto client = Thrift::NewClient<HelloClient>(server.uri(), Options(framing, Protocol::kBinary, MakeRuntime()));
  try {
    scales::thrifttest::Node node;
    client->tree(node);
    EXPECT_EQ(node.id, 1);
    EXPECT_EQ(SCALES_THRIFT_CALL(client, tree, boost::asio::use_future).get().id, 1);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  client.Close();
}

INSTANTIATE_TEST_SUITE_P(Framings, ThriftFramingTest, ::testing::Values(Framing::kFramed, Framing::kBuffered),
                         [](const auto& info) { return std::string(thrift::ToString(info.param)); });

// Asio's rule: until the call completes, its handler's executor has outstanding work, so an
// io_context that only runs the handler does not return from run() before the reply came.
TEST(ThriftClientTest, HandlerBoundToAnIoContextKeepsItRunning) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  boost::asio::io_context ioc;  // outlives the client: a loop thread may still be in the post
  auto client = Thrift::NewBuilder<DerivedClient>(Options(Framing::kFramed, Protocol::kBinary, MakeRuntime()))
                    .SetUri(server.uri())
                    .SetTimeout(5s)
                    .Build();
  std::string reply;
  std::thread::id ran_on;
  client.Async(&DerivedClient::send_base_echo, &DerivedClient::recv_base_echo, std::string("bound"),
               boost::asio::bind_executor(ioc, [&](std::exception_ptr e, std::string r) {
                 reply = e ? "error" : r;
                 ran_on = std::this_thread::get_id();
               }));
  ioc.run();  // returns once the handler ran
  EXPECT_EQ(reply, "bound");
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  client.Close();
}

// The same for a call that fails inside its own initiation on the client's loop (here one with
// a negative timeout, started from another call's handler): its handler is posted to the loop
// first, and the work on the handler's io_context must last until the handler reached it. It
// used to be released before, so that io_context ran out of work and run() returned without
// the handler ever running.
TEST(ThriftClientTest, HandlerBoundToAnIoContextRunsWhenTheCallFailsInItsInitiation) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  boost::asio::io_context ioc;  // outlives the client: a loop thread may still be in the post
  thrift::ThriftOptions o = Options(Framing::kFramed, Protocol::kBinary, MakeRuntime(1));
  o.client.timeout = 5s;
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), o);
  // Keeps ioc's run() from returning before the second call was made; dropped right after it.
  auto guard = std::make_shared<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>(
      ioc.get_executor());
  std::atomic<int> bound_ran{0};
  error_code bound_code;
  CallOptions invalid;
  invalid.timeout = -1ms;
  client.Async(&DerivedClient::send_base_echo, &DerivedClient::recv_base_echo, std::string("first"),
               [&, guard](std::exception_ptr, std::string) {
                 // On the client's loop (no executor of its own): this call fails at once.
                 client.WithOptions(invalid).Async(
                     &DerivedClient::send_base_echo, &DerivedClient::recv_base_echo, std::string("second"),
                     boost::asio::bind_executor(ioc, [&](std::exception_ptr e, std::string) {
                       try {
                         if (e) std::rethrow_exception(e);
                       } catch (const Error& err) {
                         bound_code = err.scales_code();
                       } catch (...) {
                       }
                       ++bound_ran;
                     }));
                 guard->reset();
               });
  ioc.run();  // returns once nothing is left for it: the bound handler included
  EXPECT_EQ(bound_ran, 1) << "run() returned before the handler reached its io_context";
  EXPECT_EQ(bound_code, Errc::kInvalidArgument) << bound_code.message();
  client.Close();
}

TEST(ThriftClientTest, CallStylesAndBlockingOnTheLoopFailsFast) {
  InProcessServer server(std::make_shared<scales::thrifttest::DerivedProcessor>(std::make_shared<DerivedHandler>()),
                         ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary);
  // The coroutine's io_context outlives the client and its runtime: a loop thread may still be
  // inside the post that completed the coroutine's call when run() returns.
  boost::asio::io_context ioc;
  auto rt = MakeRuntime();
  auto client = Thrift::NewBuilder<DerivedClient>(Options(Framing::kFramed, Protocol::kBinary, rt))
                    .SetUri(server.uri())
                    .SetTimeout(5s)
                    .Build();
  // Callback: runs on a loop thread, where a blocking call must fail at once.
  std::promise<std::string> p;
  client.Async(&DerivedClient::send_base_echo, &DerivedClient::recv_base_echo, std::string("cb"),
               [&](std::exception_ptr e, std::string r) {
                 try {
                   client->ping();
                   p.set_value("blocking call did not fail");
                 } catch (const Error& err) {
                   p.set_value(e ? "error" : r + ":" + std::to_string(err.scales_code().value()));
                 }
               });
  EXPECT_EQ(p.get_future().get(),
            "cb:" + std::to_string(static_cast<int>(Errc::kBlockingCallOnEventLoop)));
  // Void async.
  std::promise<bool> v;
  SCALES_THRIFT_CALL(client, ping, [&](std::exception_ptr e) { v.set_value(e == nullptr); });
  EXPECT_TRUE(v.get_future().get());
  // Coroutine.
  std::string from_coroutine;
  boost::asio::co_spawn(
      ioc,
      [&]() -> boost::asio::awaitable<void> {
        from_coroutine = co_await SCALES_THRIFT_CALL(client, base_echo, "co", boost::asio::use_awaitable);
        try {
          co_await SCALES_THRIFT_CALL(client, boom, 3, boost::asio::use_awaitable);
        } catch (const TestError& e) {
          from_coroutine += ":" + e.message;
        }
      },
      boost::asio::detached);
  ioc.run();
  EXPECT_EQ(from_coroutine, "co:boom 3");
  // A deferred call made through a temporary handle (with its own options) runs after that
  // handle is gone: the operation keeps its own copies of the core, options and client id.
  CallInfo info;
  auto deferred_call = [&] {
    CallOptions o;
    o.info = &info;
    o.timeout = 5s;
    return SCALES_THRIFT_CALL(client.WithOptions(std::move(o)), base_echo, "deferred", boost::asio::deferred);
  }();
  std::promise<std::string> d;
  std::move(deferred_call)([&](std::exception_ptr e, std::string r) { d.set_value(e ? "error" : r); });
  EXPECT_EQ(d.get_future().get(), "deferred");
  EXPECT_EQ(info.endpoint, server.uri().substr(std::string("tcp://").size()));
  // A closed client fails calls with kClientClosed.
  client.Close();
  EXPECT_THROW(client->ping(), Error);
}

TEST(ThriftClientTest, NoServerFailsWithAnErrorNotAHang) {
  const int port = test::FreeTcpPort();
  auto rt = MakeRuntime();
  thrift::ThriftOptions o = Options(Framing::kFramed, Protocol::kBinary, rt);
  o.client.open_timeout = 0s;
  o.client.timeout = 2s;
  auto client = Thrift::NewClient<EchoClient>("tcp://127.0.0.1:" + std::to_string(port), o);
  std::string r;
  EXPECT_THROW(client->echo(r, "x"), Error);
  client.Close();
}

// --- Replies crafted per the Thrift spec, from an Apache Thrift server ------------------------

// Thrift, written byte by byte per the spec (not by libthrift or scales); strict binary unless
// said otherwise.
std::string Be(uint64_t v, int bytes) {
  std::string s;
  for (int i = bytes - 1; i >= 0; --i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return s;
}
// Compact's unsigned varint.
std::string Varint(uint32_t v) {
  std::string s;
  for (; v > 0x7f; v >>= 7) s.push_back(static_cast<char>((v & 0x7f) | 0x80));
  s.push_back(static_cast<char>(v));
  return s;
}
// A field header: type, i16 id.
std::string Field(int type, int id) { return Be(type, 1) + Be(id, 2); }
constexpr int kI32 = 8, kI64 = 10, kString = 11, kStruct = 12, kList = 15;
const std::string kStop(1, '\0');

// A Node `levels` deep (each level the only child of the one above), its ids 1, 2, ...; the
// innermost one without its required id when `id_missing`.
std::string NodeStruct(int levels, bool id_missing = false) {
  std::string node = (id_missing ? std::string() : Field(kI32, 1) + Be(levels, 4)) + kStop;
  for (int level = levels - 1; level >= 1; --level) {
    node = Field(kI32, 1) + Be(level, 4) + Field(kList, 2) + Be(kStruct, 1) + Be(1, 4) + node + kStop;
  }
  return node;
}

// An Apache Thrift server's processor that answers every call with the result struct fields the
// test sets, in a REPLY under the call's name and sequence id (strict binary or compact, as the
// server's protocol).
class CraftedReplies final : public apache::thrift::TProcessor {
 public:
  explicit CraftedReplies(Protocol protocol = Protocol::kBinary) : protocol_(protocol) {}
  void Answer(std::string result_fields) {
    std::lock_guard<std::mutex> l(mu_);
    fields_ = std::move(result_fields);
  }
  // Replies carry the call's sequence id plus `delta` (0: the call's own).
  void ShiftSeqid(int32_t delta) { seqid_delta_ = delta; }
  bool process(std::shared_ptr<apache::thrift::protocol::TProtocol> in,
               std::shared_ptr<apache::thrift::protocol::TProtocol> out, void*) override {
    std::string name;
    apache::thrift::protocol::TMessageType type;
    int32_t seqid = 0;
    in->readMessageBegin(name, type, seqid);
    in->skip(apache::thrift::protocol::T_STRUCT);
    in->readMessageEnd();
    in->getTransport()->readEnd();
    seqid += seqid_delta_.load();
    std::string reply = protocol_ == Protocol::kCompact
                            ? Be(0x8241, 2) + Varint(static_cast<uint32_t>(seqid)) + Varint(name.size()) + name
                            : Be(0x80010002u, 4) + Be(name.size(), 4) + name + Be(static_cast<uint32_t>(seqid), 4);
    {
      std::lock_guard<std::mutex> l(mu_);
      reply += fields_ + kStop;
    }
    out->getTransport()->write(reinterpret_cast<const uint8_t*>(reply.data()), static_cast<uint32_t>(reply.size()));
    out->getTransport()->writeEnd();
    out->getTransport()->flush();
    return true;
  }

 private:
  const Protocol protocol_;
  std::mutex mu_;
  std::string fields_;
  std::atomic<int32_t> seqid_delta_{0};
};

// A threaded, framed Apache Thrift server answering with CraftedReplies, and a Hello client of it
// whose calls report to `info` (one call at a time).
struct CraftedServer {
  explicit CraftedServer(Protocol protocol = Protocol::kBinary, size_t threads = 2)
      : replies(std::make_shared<CraftedReplies>(protocol)),
        server(replies, ServerKind::kThreaded, Framing::kFramed, protocol),
        plain(Thrift::NewClient<HelloClient>(server.uri(), Options(Framing::kFramed, protocol, MakeRuntime(threads)))),
        client(plain.WithOptions([this] {
          CallOptions o;
          o.info = &info;
          return o;
        }())) {}
  ~CraftedServer() { plain.Close(); }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(server.port()); }

  std::shared_ptr<CraftedReplies> replies;
  InProcessServer server;
  CallInfo info;
  thrift::ThriftClient<HelloClient> plain;
  thrift::ThriftClient<HelloClient> client;
};

// What one async call (send, recv, args; `R` what recv returns, put in `value` if given)
// completes with, checking that it completes once.
template <class R, class Send, class Recv, class... Args>
std::exception_ptr AsyncOutcome(const thrift::ThriftClient<HelloClient>& client, R* value, Send send, Recv recv,
                                const Args&... args) {
  struct State {
    std::atomic<int> completions{0};
    std::promise<std::exception_ptr> done;
  };
  auto state = std::make_shared<State>();  // a second completion would find it
  auto f = state->done.get_future();
  client.Async(send, recv, args..., [state, value](std::exception_ptr e, R r) {
    if (state->completions.fetch_add(1) > 0) return;
    if (value != nullptr) *value = std::move(r);
    state->done.set_value(e);
  });
  EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
  std::exception_ptr e = f.get();
  EXPECT_EQ(state->completions.load(), 1);
  return e;
}

// What `outcome` holds (or throws): a scales::Error with `code` whose what() and the call's
// CallInfo detail contain `parts`.
template <class Outcome>
void ExpectScalesError(Outcome outcome, const CallInfo& info, Errc code, const std::vector<std::string>& parts) {
  try {
    outcome();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), code) << e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(std::string_view(e.what()).find(part), std::string::npos) << e.what();
    }
    EXPECT_EQ(info.error, code);
    EXPECT_EQ(info.detail, e.what());
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a scales::Error: " << e.what();
  }
}

// A hi() call, blocking and then async, fails with the scales::Error `code` naming `parts`.
void ExpectHiFails(const thrift::ThriftClient<HelloClient>& client, CallInfo& info, Errc code,
                   const std::vector<std::string>& parts) {
  for (bool blocking : {true, false}) {
    ExpectScalesError(
        [&] {
          if (blocking) {
            std::string r;
            client->hi(r, "x");
          } else if (auto e = AsyncOutcome<std::string>(client, nullptr, &HelloClient::send_hi, &HelloClient::recv_hi,
                                                        std::string("x"))) {
            std::rethrow_exception(e);
          }
        },
        info, code, parts);
    info = CallInfo();
  }
}

// Replies that do not decode fail blocking and async calls alike, with the scales::Error naming
// the client, the endpoint and the method: structs nested deeper than the recursion limit
// (Apache's check runs in the generated code, outside the protocol's reads, so a blocking caller
// got its TProtocolException) and a string longer than the bytes left. The one thing a blocking
// call cannot translate: a required field missing, which the generated code checks after its last
// read, in the caller's frame.
TEST(ThriftClientTest, RepliesThatDoNotDecodeAreTheSameScalesErrorBlockingAndAsync) {
  CraftedServer crafted;
  CraftedReplies& replies = *crafted.replies;
  const thrift::ThriftClient<HelloClient>& client = crafted.client;
  CallInfo& info = crafted.info;
  const std::string endpoint = crafted.endpoint();
  auto blocking_tree = [&] {
    scales::thrifttest::Node node;
    client->tree(node);
  };
  auto async_tree = [&] {
    using Node = scales::thrifttest::Node;
    if (auto e = AsyncOutcome<Node>(client, nullptr, &HelloClient::send_tree, &HelloClient::recv_tree)) {
      std::rethrow_exception(e);
    }
  };

  // The result struct is a level too: 63 Nodes are 64 levels, the deepest that decodes.
  replies.Answer(Field(kStruct, 0) + NodeStruct(63));
  scales::thrifttest::Node node;
  client->tree(node);
  EXPECT_EQ(node.id, 1);
  EXPECT_EQ(AsyncOutcome<scales::thrifttest::Node>(client, &node, &HelloClient::send_tree, &HelloClient::recv_tree),
            nullptr);
  EXPECT_EQ(node.children.size(), 1u);

  replies.Answer(Field(kStruct, 0) + NodeStruct(64));
  const std::vector<std::string> too_deep = {"client thrift-it: malformed Thrift reply from " + endpoint + " for tree: ",
                                             "structs nest deeper than 64 levels"};
  for (const auto& call : {std::function<void()>(blocking_tree), std::function<void()>(async_tree)}) {
    ExpectScalesError(call, info, Errc::kProtocolError, too_deep);
    info = CallInfo();
  }

  replies.Answer(Field(kString, 0) + Be(10, 4) + "abc");  // then the STOP: 4 bytes left
  ExpectHiFails(client, info, Errc::kProtocolError,
                {"client thrift-it: malformed Thrift reply from " + endpoint + " for hi: ",
                 "a string declares 10 bytes with 4 bytes of the reply left (the reply is "});

  replies.Answer(Field(kStruct, 0) + NodeStruct(2, /*id_missing=*/true));
  ExpectScalesError(async_tree, info, Errc::kProtocolError,
                    {"client thrift-it: malformed Thrift reply from " + endpoint + " for tree: "});
  try {
    blocking_tree();
    ADD_FAILURE() << "no error";
  } catch (const apache::thrift::protocol::TProtocolException& e) {
    EXPECT_EQ(e.getType(), apache::thrift::protocol::TProtocolException::INVALID_DATA) << e.what();
  }
  // What docs/errors.md tells a blocking caller who wants the scales::Error: wait on the async call.
  info = CallInfo();
  ExpectScalesError([&] { SCALES_THRIFT_CALL(client, tree, boost::asio::use_future).get(); }, info,
                    Errc::kProtocolError,
                    {"client thrift-it: malformed Thrift reply from " + endpoint + " for tree: "});
}

// TCompactProtocol refuses a type nibble it does not know with a plain TException, neither a
// TProtocolException nor a TTransportException, whose message ends with the type as a raw byte: a
// malformed reply all the same, blocking and async, naming the type as a number, not an exception
// of Apache's reaching the caller.
TEST(ThriftClientTest, AnUnknownCompactTypeIsAProtocolErrorBlockingAndAsync) {
  CraftedServer crafted(Protocol::kCompact);
  crafted.replies->Answer(Be(0x08, 1) + Be(0x00, 1) + Varint(3) + "abc");  // field 0: BINARY (long form: type, id 0)
  std::string r;
  crafted.client->hi(r, "x");
  EXPECT_EQ(r, "abc");
  crafted.replies->Answer(Be(0x1d, 1) + Be(0, 1));  // field 1 of type 13 (short form: id delta, type)
  ExpectHiFails(crafted.client, crafted.info, Errc::kProtocolError,
                {"client thrift-it: malformed Thrift reply from " + crafted.endpoint() +
                 " for hi: unknown compact type 13"});
}

// `levels` lists, each the only element of the one above, the innermost an empty list of i32.
std::string NestedLists(int levels) {
  std::string lists = Be(kI32, 1) + Be(0, 4);
  for (int level = 1; level < levels; ++level) lists = Be(kList, 1) + Be(1, 4) + lists;
  return lists;
}

// A field hi's result does not have (5), which the generated code skips, is read through the same
// checked reads as a known one, blocking and async: a string in it longer than the bytes left, or
// lists in it nesting deeper than 64 levels (the result struct is one), fail the call as a
// malformed reply saying so, where Apache's skip read past those checks (its bare 'Exceeded size
// limit'; 64 levels let through). One that fits is skipped.
TEST(ThriftClientTest, AnUnknownFieldIsSkippedThroughTheCheckedReadsBlockingAndAsync) {
  CraftedServer crafted;
  const std::string malformed = "client thrift-it: malformed Thrift reply from " + crafted.endpoint() + " for hi: ";
  crafted.replies->Answer(Field(kList, 5) + NestedLists(63) + Field(kString, 0) + Be(3, 4) + "abc");
  std::string r;
  crafted.client->hi(r, "x");
  EXPECT_EQ(r, "abc");
  r.clear();
  EXPECT_EQ(AsyncOutcome<std::string>(crafted.client, &r, &HelloClient::send_hi, &HelloClient::recv_hi,
                                      std::string("x")),
            nullptr);
  EXPECT_EQ(r, "abc");

  crafted.replies->Answer(Field(kList, 5) + NestedLists(64));
  ExpectHiFails(crafted.client, crafted.info, Errc::kProtocolError,
                {malformed + "structs, lists, sets and maps nest deeper than 64 levels"});

  crafted.replies->Answer(Field(kString, 5) + Be(0x7fffffff, 4) + "xyz");  // then the STOP: 4 bytes left
  ExpectHiFails(crafted.client, crafted.info, Errc::kProtocolError,
                {malformed + "a string declares 2147483647 bytes with 4 bytes of the reply left (the reply is "});
}

// A reply with another sequence id than the request on the connection (a stray or duplicate
// reply) fails the call, blocking and async, naming the client, the endpoint and the method, and
// retires the connection: the next call gets its own reply on a new one.
TEST(ThriftClientTest, AReplyWithAnotherSeqidNamesTheMethodAndRetiresTheConnection) {
  CraftedServer crafted;
  crafted.replies->Answer(Field(kString, 0) + Be(2, 4) + "ok");
  crafted.replies->ShiftSeqid(1);
  ExpectHiFails(crafted.client, crafted.info, Errc::kProtocolError,
                {"client thrift-it: Thrift reply from " + crafted.endpoint() + " for hi has seqid ",
                 "(a stray or duplicate reply); connection closed"});
  crafted.replies->ShiftSeqid(0);
  std::string r;
  crafted.client->hi(r, "x");
  EXPECT_EQ(r, "ok");
}

// A memory resource that refuses (std::bad_alloc) any allocation over `cap` bytes, as an allocator
// refuses what the process cannot hold.
class CappedMemory final : public std::pmr::memory_resource {
 public:
  explicit CappedMemory(size_t cap) : cap_(cap) {}

 private:
  void* do_allocate(size_t bytes, size_t alignment) override {
    if (bytes > cap_) throw std::bad_alloc();
    return std::pmr::new_delete_resource()->allocate(bytes, alignment);
  }
  void do_deallocate(void* p, size_t bytes, size_t alignment) override {
    std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  size_t cap_;
};

// Installs `resource` as std::pmr's default while it lives.
class DefaultMemoryResource {
 public:
  explicit DefaultMemoryResource(std::pmr::memory_resource* resource)
      : before_(std::pmr::set_default_resource(resource)) {}
  ~DefaultMemoryResource() { std::pmr::set_default_resource(before_); }
  DefaultMemoryResource(const DefaultMemoryResource&) = delete;
  DefaultMemoryResource& operator=(const DefaultMemoryResource&) = delete;

 private:
  std::pmr::memory_resource* before_;
};

// A reply declaring more than can be allocated (a list of 200,000 i64 is 1.6 MB, the allocator
// gives at most 1 MiB) completes an async call with scales::Error(kResponseTooLarge) naming the
// client, the endpoint, the step and the reply's size — not the std::bad_alloc itself. A blocking
// call gets the std::bad_alloc: the generated code sizes the list in the caller's frame, outside
// the protocol's reads. The same reply decodes once the memory is there, on the same loop thread.
TEST(ThriftClientTest, AReplyDeclaringMoreThanCanBeAllocatedIsResponseTooLarge) {
  CraftedServer crafted(Protocol::kBinary, 1);
  const thrift::ThriftClient<HelloClient>& client = crafted.client;
  constexpr uint32_t kCount = 200000;
  std::string list = Field(kList, 0) + Be(kI64, 1) + Be(kCount, 4);
  for (uint32_t i = 0; i < kCount; ++i) list += Be(i, 8);
  crafted.replies->Answer(list);
  const std::string reply_size = std::to_string(4 + 4 + 7 + 4 + list.size() + 1);  // header "numbers", fields, STOP
  // Static: a value made with it may be destroyed on the loop thread after the scope below
  // (use_future's handler destroys its arguments, a pmr list, after it set the promise this
  // thread waits on), and its allocator still refers to the resource then.
  static CappedMemory capped(1 << 20);
  {
    DefaultMemoryResource installed(&capped);
    ExpectScalesError(
        [&] {
          if (auto e = AsyncOutcome<scales::thrifttest::Numbers>(client, nullptr, &HelloClient::send_numbers,
                                                                 &HelloClient::recv_numbers)) {
            std::rethrow_exception(e);
          }
        },
        crafted.info, Errc::kResponseTooLarge,
        {"client thrift-it: decoding reply of numbers from " + crafted.endpoint() + " (" + reply_size +
         " bytes) failed: std::bad_alloc"});
    scales::thrifttest::Numbers numbers;
    EXPECT_THROW(client->numbers(numbers), std::bad_alloc);
    // What docs/errors.md tells a blocking caller who wants the scales::Error: wait on the async call.
    crafted.info = CallInfo();
    ExpectScalesError([&] { SCALES_THRIFT_CALL(client, numbers, boost::asio::use_future).get(); }, crafted.info,
                      Errc::kResponseTooLarge, {"client thrift-it: decoding reply of numbers from "});
  }
  scales::thrifttest::Numbers numbers;
  EXPECT_EQ(AsyncOutcome<scales::thrifttest::Numbers>(client, &numbers, &HelloClient::send_numbers,
                                                      &HelloClient::recv_numbers),
            nullptr);
  ASSERT_EQ(numbers.size(), kCount);
  EXPECT_EQ(numbers.back(), kCount - 1);
}

// --- `scales testserver thrift`, killed mid-call ---------------------------------------------

TEST(ThriftClientTest, ServerKilledMidCallIsAnErrorNotAHang) {
  test::ChildProcess server({test::ToolPath(), "testserver", "thrift", "--port", "0"});
  auto line = server.ReadLine(10s);
  ASSERT_TRUE(line && line->starts_with("listening ")) << (line ? *line : "no output");
  const std::string endpoint = line->substr(std::string("listening ").size());
  auto rt = MakeRuntime();
  auto client = Thrift::NewClient<EchoClient>("tcp://" + endpoint, Options(Framing::kFramed, Protocol::kBinary, rt));
  std::string r;
  client->echo(r, "before");
  EXPECT_EQ(r, "before");
  auto f = SCALES_THRIFT_CALL(client, sleep, 5000, boost::asio::use_future);
  std::this_thread::sleep_for(200ms);  // let the call reach the server
  server.Kill();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  try {
    f.get();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kConnectionClosed) << e.what();
  }
  client.Close();
}

// --- Debian's python3-thrift server -------------------------------------------------------------

#if defined(SCALES_THRIFT_PY_GEN) && defined(SCALES_THRIFT_PY_SERVER)
class PythonServer {
 public:
  PythonServer(const std::string& service, Framing framing, Protocol protocol)
      : process_({"/usr/bin/python3", SCALES_THRIFT_PY_SERVER, SCALES_THRIFT_PY_GEN, "--service", service,
                  "--transport", framing == Framing::kFramed ? "framed" : "buffered", "--protocol",
                  protocol == Protocol::kBinary ? "binary" : "compact"}) {
    auto line = process_.ReadLine(20s);
    if (!line || !line->starts_with("listening ")) throw std::runtime_error("python3 Thrift server did not start");
    endpoint_ = line->substr(std::string("listening ").size());
  }
  std::string uri() const { return "tcp://" + endpoint_; }

 private:
  test::ChildProcess process_;
  std::string endpoint_;
};

class ThriftPythonServerTest : public ::testing::TestWithParam<ServerCase> {};

TEST_P(ThriftPythonServerTest, EchoVoidExceptionsOnewayLargeAndConcurrentCalls) {
  const ServerCase c = GetParam();
  PythonServer server("derived", c.framing, c.protocol);
  auto rt = MakeRuntime();
  auto client = Thrift::NewClient<DerivedClient>(server.uri(), Options(c.framing, c.protocol, rt));
  ExerciseDerived(client, true);
  client.Close();
}

TEST_P(ThriftPythonServerTest, EchoServiceAndUnknownMethod) {
  const ServerCase c = GetParam();
  PythonServer server("echo", c.framing, c.protocol);
  auto rt = MakeRuntime();
  auto echo = Thrift::NewClient<EchoClient>(server.uri(), Options(c.framing, c.protocol, rt));
  std::string r;
  echo->echo(r, "from python");
  EXPECT_EQ(r, "from python");
  try {
    echo->fail(r, "declared");
    ADD_FAILURE() << "no exception";
  } catch (const scales::echo::EchoError& e) {
    EXPECT_EQ(e.message, "declared");
  }
  auto derived = Thrift::NewClient<DerivedClient>(server.uri(), Options(c.framing, c.protocol, rt));
  EXPECT_THROW(derived->add(1, 2), TApplicationException);
  echo.Close();
  derived.Close();
}

INSTANTIATE_TEST_SUITE_P(Servers, ThriftPythonServerTest,
                         ::testing::Values(ServerCase{ServerKind::kThreaded, Framing::kFramed, Protocol::kBinary},
                                           ServerCase{ServerKind::kThreaded, Framing::kFramed, Protocol::kCompact},
                                           ServerCase{ServerKind::kThreaded, Framing::kBuffered, Protocol::kBinary},
                                           ServerCase{ServerKind::kThreaded, Framing::kBuffered, Protocol::kCompact}),
                         [](const auto& info) {
                           return std::string(info.param.framing == Framing::kFramed ? "Framed" : "Buffered") +
                                  (info.param.protocol == Protocol::kBinary ? "Binary" : "Compact");
                         });
#endif

}  // namespace
}  // namespace scales
