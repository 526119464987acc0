// Hostile peers (issue 8): servers that send a 2 GiB length prefix, endless fragments or headers,
// or a slow drip of bytes must cost the client bounded memory and time. Each call fails with an
// error naming the limit that stopped it (frame size, fragment bytes per tag, response size,
// header size, request timeout), and the client keeps working afterwards: the next calls succeed
// on a new connection.
//
// Peers: the Mux reference server's hostile misbehaviours (tests/integration/mux_reference/,
// "huge-frame", "endless-fragments", "drip:MS", "ping-flood"), and for HTTP and framed Thrift a raw TCP server
// in this process (RawServer below) that answers by the request: hostile for some, well-formed
// for the rest.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_future.hpp>
#include <gtest/gtest.h>
#include <openssl/ssl.h>

#include <thrift/Thrift.h>
#include <thrift/protocol/TProtocolException.h>

#include "Echo.h"
#include "scales/http/client.h"
#include "scales/thrift/thrift.h"
#include "scales/thriftmux/thriftmux.h"
#include "support/mux_server_fixture.h"
#include "support/test_ca.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using scales::echo::EchoClient;
using Clock = std::chrono::steady_clock;

std::shared_ptr<Runtime> MakeRuntime() {
  RuntimeOptions o;
  o.threads = 1;
  return std::make_shared<Runtime>(o);
}

#if defined(__SANITIZE_ADDRESS__)
#define SCALES_HOSTILE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCALES_HOSTILE_ASAN 1
#endif
#endif
#ifdef SCALES_HOSTILE_ASAN
// The sanitizer runtime's count of live heap bytes (sanitizer/allocator_interface.h, a header
// GCC does not ship).
extern "C" size_t __sanitizer_get_current_allocated_bytes();
#endif

// Memory the process holds: resident memory, or under ASan (whose quarantine keeps freed blocks
// resident) the heap bytes still allocated.
size_t MemoryInUse() {
#ifdef SCALES_HOSTILE_ASAN
  return __sanitizer_get_current_allocated_bytes();
#else
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
#endif
}

// `call` must fail with `code` and an error naming the limit (`names_limit` is part of the
// message) within `within`, growing memory in use by less than 64 MiB (the hostile peers offer
// gigabytes).
template <class F>
void ExpectBoundedFailure(F&& call, Errc code, std::string_view names_limit, Clock::duration within) {
  const size_t before = MemoryInUse();
  const auto start = Clock::now();
  try {
    call();
    ADD_FAILURE() << "the call succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), code) << e.what();
    EXPECT_NE(std::string_view(e.what()).find(names_limit), std::string_view::npos) << e.what();
  }
  EXPECT_LT(Clock::now() - start, within);
  EXPECT_LT(MemoryInUse(), before + (64u << 20));
}

// --- Mux ---------------------------------------------------------------------------------------

// Options of the hostile-peer clients: one loop, a 10 s timeout, a quick resurrector.
template <class Options>
Options HostileOptions(const char* name) {
  Options o;
  o.client.name = name;
  o.client.runtime = MakeRuntime();
  o.client.timeout = 10s;
  o.resurrector.initial_backoff = 50ms;
  o.resurrector.max_backoff = 200ms;
  return o;
}

thriftmux::ThriftMuxOptions MuxOptions() { return HostileOptions<thriftmux::ThriftMuxOptions>("hostile-mux"); }

std::string Echo(const thrift::ThriftClient<EchoClient>& client, const std::string& s,
                 std::optional<Duration> timeout = std::nullopt) {
  CallOptions options;
  options.timeout = timeout;
  std::string r;
  client.WithOptions(options)->echo(r, s);
  return r;
}

TEST(HostilePeerTest, MuxTwoGibLengthPrefixIsRejectedByTheFrameSizeLimit) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), MuxOptions());
  EXPECT_EQ(Echo(client, "before"), "before");
  ExpectBoundedFailure([&] { Echo(client, "huge-frame"); }, Errc::kProtocolError,
                       "frame size 2147483648 exceeds the largest frame accepted "
                       "(limit session.max_frame_size = 33554432)",
                       5s);
  EXPECT_EQ(Echo(client, "after"), "after");  // a new session
}

TEST(HostilePeerTest, MuxEndlessFragmentsStopAtTheFragmentBytesLimit) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = MuxOptions();
  options.session.max_message_size = 1u << 20;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  EXPECT_EQ(Echo(client, "before"), "before");
  ExpectBoundedFailure([&] { Echo(client, "endless-fragments"); }, Errc::kProtocolError,
                       "buffered fragment bytes exceed the largest message accepted "
                       "(limit session.max_message_size = 1048576)",
                       5s);
  // The client closed the session: the server stops sending well before its 1 GiB.
  EXPECT_TRUE(server.WaitForLog({"endless-fragments tag=", "stopped after"})) << server.Log();
  EXPECT_EQ(Echo(client, "after"), "after");
}

TEST(HostilePeerTest, MuxEndlessFragmentsStopAtTheSessionReassemblyLimit) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = MuxOptions();
  options.session.max_message_size = 1u << 20;
  options.session.max_reassembly_bytes = 512u << 10;  // reached before the per-tag limit
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  EXPECT_EQ(Echo(client, "before"), "before");
  ExpectBoundedFailure([&] { Echo(client, "endless-fragments"); }, Errc::kProtocolError,
                       "exceed the most buffered for reassembly (limit session.max_reassembly_bytes = 524288)",
                       5s);
  EXPECT_TRUE(server.WaitForLog({"endless-fragments tag=", "stopped after"})) << server.Log();
  EXPECT_EQ(Echo(client, "after"), "after");
}

TEST(HostilePeerTest, MuxFragmentsOnTagsNobodyUsesAreNotBuffered) {
  // Each of 96 unused tags gets fragments just under the per-tag limit (90 MiB in all): a
  // session that buffered them would hold them all. Only tags in use may buffer fragments.
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = MuxOptions();
  options.session.max_message_size = 1u << 20;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  EXPECT_EQ(Echo(client, "before"), "before");
  const size_t before = MemoryInUse();
  EXPECT_EQ(Echo(client, "stray-fragments"), "stray-fragments");
  EXPECT_LT(MemoryInUse(), before + (32u << 20));
}

TEST(HostilePeerTest, MuxSlowDripFailsByTheRequestTimeout) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), MuxOptions());
  EXPECT_EQ(Echo(client, "before"), "before");
  // About 40 bytes, one every 50 ms: 2 s for the frame; the call gives up after 300 ms.
  ExpectBoundedFailure([&] { Echo(client, "drip:50", 300ms); }, Errc::kRequestTimeout,
                       "timed out after 300 ms", 1500ms);
  // The session stays usable: the next reply arrives once the dripped frame is complete.
  EXPECT_EQ(Echo(client, "after drip"), "after drip");
  EXPECT_TRUE(server.WaitForLog({"recv Tdiscarded", "which=2"})) << server.Log();
}

TEST(HostilePeerTest, MuxTpingFloodWithoutReadingStopsAtTheControlReplyBound) {
  // The server stops reading and writes Tping as fast as it can: every Rping the client owes
  // queues behind a socket write that never finishes. The bound ends the session.
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = MuxOptions();
  options.session.ping_interval = Duration::zero();  // the bound, not the failure detector
  options.session.max_queued_control_replies = 1000;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  EXPECT_EQ(Echo(client, "before"), "before");
  ExpectBoundedFailure([&] { Echo(client, "ping-flood"); }, Errc::kConnectionClosed,
                       "(limit session.max_queued_control_replies = 1000)", 10s);
  // The client closed the connection: the server's flood ends (its write fails).
  EXPECT_TRUE(server.WaitForLog({"ping-flood stopped after"})) << server.Log().substr(0, 2000);
  EXPECT_EQ(Echo(client, "after"), "after");  // a new session
}

// A healthy server whose pings arrive in one read (with a reply) is not a flood: the Rpings the
// read batch holds back are written, and a small bound does not close the session.
TEST(HostilePeerTest, MuxTpingBurstInOneReadIsNotAFlood) {
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto options = MuxOptions();
  options.session.ping_interval = Duration::zero();
  options.session.max_queued_control_replies = 2;
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), options);
  EXPECT_EQ(Echo(client, "ping-burst:100"), "ping-burst:100");
  EXPECT_EQ(Echo(client, "after"), "after");
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (server.LogLinesWith({"recv Rping tag=1"}).size() < 100 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(server.LogLinesWith({"recv Rping tag=1"}).size(), 100u) << server.Log().substr(0, 3000);
  EXPECT_TRUE(server.LogLinesWith({"conn=2 "}).empty()) << "the session was closed";

  // The same after a Tdrain in the same read: its Rdrain is written at once (the session may
  // close as soon as its requests are answered), and the pings behind that write are not a
  // flood either; the request in flight is answered.
  EXPECT_EQ(Echo(client, "drain-ping-burst:100"), "drain-ping-burst:100");
  EXPECT_EQ(Echo(client, "after the drain"), "after the drain");  // a new session
}

TEST(HostilePeerTest, MuxDuplicateReplyDoesNotAnswerTheNextRequestOnItsTag) {
  // The server answers a tag twice, both frames in one read. The first answers the call, whose
  // callback (run inline, inside the read) starts the next call: it gets the freed tag, and its
  // Tdispatch is still queued when the duplicate is handled. A reply for a request not yet sent
  // is not its reply: the duplicate is ignored, as one for an unknown tag, and the next call gets
  // its own answer.
  test::MuxReferenceServer server({"--mode", "finagle"});
  auto client = ThriftMux::NewClient<EchoClient>("tcp://" + server.endpoint(), MuxOptions());
  EXPECT_EQ(Echo(client, "before"), "before");
  std::promise<std::string> first, second;
  SCALES_THRIFT_CALL(client, echo, std::string("duplicate-reply"), [&](std::exception_ptr e, std::string r) {
    SCALES_THRIFT_CALL(client, echo, std::string("second"), [&](std::exception_ptr e2, std::string r2) {
      second.set_value(e2 ? "error" : r2);
    });
    first.set_value(e ? "error" : r);
  });
  auto f1 = first.get_future();
  auto f2 = second.get_future();
  ASSERT_EQ(f1.wait_for(5s), std::future_status::ready);
  ASSERT_EQ(f2.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(f1.get(), "duplicate-reply");
  EXPECT_EQ(f2.get(), "second");
  EXPECT_TRUE(server.WaitForLog({"send duplicate-reply"})) << server.Log();
  EXPECT_EQ(Echo(client, "after"), "after");
}

// --- A raw TCP server for HTTP and framed Thrift -------------------------------------------------

// One accepted connection, served on its own thread. Reads and writes give up once the server
// stops or the client goes away.
class RawConn {
 public:
  // With `tls`, the connection is a TLS server session (Handshake() first) over the socket made
  // non-blocking; reads and writes go through OpenSSL, still polling so that a stop is noticed.
  RawConn(int fd, const std::atomic<bool>& stopping, SSL_CTX* tls = nullptr) : fd_(fd), stopping_(stopping) {
    if (tls) {
      ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) | O_NONBLOCK);
      ssl_ = SSL_new(tls);
      SSL_set_fd(ssl_, fd_);
      SSL_set_mode(ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
  }
  ~RawConn() {
    if (ssl_) SSL_free(ssl_);
    ::close(fd_);
  }

  // TLS: completes the server side of the handshake; false if it failed or the server stops.
  bool Handshake() {
    for (;;) {
      const int r = SSL_accept(ssl_);
      if (r == 1) return true;
      if (!WaitFor(SSL_get_error(ssl_, r))) return false;
    }
  }
  // Reads until `delim` has arrived; returns everything read up to and including it.
  std::optional<std::string> ReadUntil(std::string_view delim) {
    while (buffer_.find(delim) == std::string::npos) {
      if (!ReadSome()) return std::nullopt;
    }
    size_t end = buffer_.find(delim) + delim.size();
    std::string out = buffer_.substr(0, end);
    buffer_.erase(0, end);
    return out;
  }
  std::optional<std::string> ReadExactly(size_t n) {
    while (buffer_.size() < n) {
      if (!ReadSome()) return std::nullopt;
    }
    std::string out = buffer_.substr(0, n);
    buffer_.erase(0, n);
    return out;
  }
  // Writes `parts` one after another, `gap` apart (each in a read of its own at the client);
  // false as Write.
  bool WritePaced(std::initializer_list<std::string_view> parts, std::chrono::milliseconds gap) {
    bool first = true;
    for (std::string_view part : parts) {
      if (!first) std::this_thread::sleep_for(gap);
      first = false;
      if (!Write(part)) return false;
    }
    return true;
  }
  // False once the client closed the connection (or the server stops).
  bool Write(std::string_view bytes) {
    while (!bytes.empty() && !stopping_) {
      if (ssl_) {
        const int n = SSL_write(ssl_, bytes.data(), static_cast<int>(bytes.size()));
        if (n <= 0) {
          if (!WaitFor(SSL_get_error(ssl_, n))) return false;
          continue;
        }
        bytes.remove_prefix(static_cast<size_t>(n));
        sent_ += static_cast<size_t>(n);
        continue;
      }
      pollfd p{fd_, POLLOUT, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(n));
      sent_ += static_cast<size_t>(n);
    }
    return !stopping_;
  }
  bool stopping() const { return stopping_; }
  size_t sent() const { return sent_; }
  // Makes the close reset the connection (SO_LINGER 0): the client's next write fails.
  void ResetOnClose() {
    linger l{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }
  // TCP_CORK: while on, the kernel holds partial segments, so the writes made meanwhile leave
  // together when it goes off.
  void Cork(bool on) {
    int v = on ? 1 : 0;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_CORK, &v, sizeof v);
  }

 private:
  // TLS: waits (50 ms at a time, until the server stops) for what OpenSSL's `error` asks for;
  // false for any other error.
  bool WaitFor(int error) {
    short events = 0;
    if (error == SSL_ERROR_WANT_READ) events = POLLIN;
    if (error == SSL_ERROR_WANT_WRITE) events = POLLOUT;
    if (events == 0) return false;
    while (!stopping_) {
      pollfd p{fd_, events, 0};
      if (::poll(&p, 1, 50) > 0) return true;
    }
    return false;
  }

  bool ReadSome() {
    char buf[4096];
    if (ssl_) {
      for (;;) {
        const int n = SSL_read(ssl_, buf, sizeof buf);
        if (n > 0) {
          buffer_.append(buf, static_cast<size_t>(n));
          return true;
        }
        if (!WaitFor(SSL_get_error(ssl_, n))) return false;
      }
    }
    while (!stopping_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return false;
      buffer_.append(buf, static_cast<size_t>(n));
      return true;
    }
    return false;
  }

  int fd_;
  const std::atomic<bool>& stopping_;
  SSL* ssl_ = nullptr;
  std::string buffer_;
  size_t sent_ = 0;
};

class RawServer {
 public:
  using Handler = std::function<void(RawConn&)>;

  // With `tls`, connections are TLS with the test CA's server certificate (tls-it's TestCa):
  // the handler runs after the handshake.
  explicit RawServer(Handler handler, bool tls = false) : handler_(std::move(handler)) {
    if (tls) {
      tls_ = SSL_CTX_new(TLS_server_method());
      const auto& ca = testing::TestCa();
      if (!tls_ || SSL_CTX_use_certificate_chain_file(tls_, ca.server_cert.c_str()) != 1 ||
          SSL_CTX_use_PrivateKey_file(tls_, ca.server_key.c_str(), SSL_FILETYPE_PEM) != 1) {
        throw std::runtime_error("RawServer: cannot load the test CA's server certificate");
      }
    }
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd_, 16) != 0) {
      throw std::runtime_error(std::string("RawServer: ") + std::strerror(errno));
    }
    socklen_t len = sizeof addr;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~RawServer() {
    stopping_ = true;
    acceptor_.join();
    std::lock_guard lock(mu_);
    for (auto& t : connections_) t.join();
    ::close(fd_);
    if (tls_) SSL_CTX_free(tls_);
  }

  std::string uri() const { return "tcp://127.0.0.1:" + std::to_string(port_); }
  // Bytes the hostile handlers wrote, summed over connections (bounded by the client's limits).
  size_t sent() const { return sent_; }
  // Connections accepted so far.
  int accepted() const { return accepted_; }

 private:
  void AcceptLoop() {
    while (!stopping_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      ++accepted_;
      std::lock_guard lock(mu_);
      connections_.emplace_back([this, c] {
        RawConn conn(c, stopping_, tls_);
        if (!tls_ || conn.Handshake()) handler_(conn);
        sent_ += conn.sent();
      });
    }
  }

  Handler handler_;
  SSL_CTX* tls_ = nullptr;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<size_t> sent_{0};
  std::atomic<int> accepted_{0};
  std::mutex mu_;
  std::vector<std::thread> connections_;
  std::thread acceptor_;
};

// Starts a call with `start(signal)` (binding `signal`'s slot to it) while loop 0 of `rt` is
// held, and cancels it (terminal) before the loop takes it: a stack without a pool or a
// connection to park it on takes it to its transport already cancelled.
template <class Start>
void CancelBeforeTheLoopTakesIt(Runtime& rt, Start&& start) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::promise<void> holding;
  boost::asio::post(rt.loop(0).executor(), [&holding, released] {
    holding.set_value();
    released.wait();
  });
  holding.get_future().wait();
  boost::asio::cancellation_signal signal;
  start(signal);
  signal.emit(boost::asio::cancellation_type::terminal);
  release.set_value();
}

// --- HTTP ----------------------------------------------------------------------------------------

// Serves keep-alive requests: GET /ok answers "ok"; the other paths misbehave.
void HostileHttp(RawConn& c) {
  for (;;) {
    auto head = c.ReadUntil("\r\n\r\n");
    if (!head) return;
    std::string target = head->substr(head->find(' ') + 1);
    target = target.substr(0, target.find(' '));
    if (target == "/ok") {
      if (!c.Write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) return;
    } else if (target == "/huge-length") {
      c.Write("HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n");
      while (c.Write(std::string(16384, 'b'))) {
      }
      return;
    } else if (target == "/endless-headers") {
      c.Write("HTTP/1.1 200 OK\r\n");
      for (int i = 0; c.Write("X-Header-" + std::to_string(i) + ": " + std::string(100, 'h') + "\r\n"); ++i) {
      }
      return;
    } else if (target == "/endless-chunks") {
      c.Write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
      while (c.Write("4000\r\n" + std::string(0x4000, 'c') + "\r\n")) {
      }
      return;
    } else if (target == "/absurd-length") {
      // The largest Content-Length there is, a few bytes of the body, then the end.
      c.Write("HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\npartial");
      return;
    } else if (target == "/endless-chunk-extension") {
      // A chunk-size line whose extension never ends.
      c.Write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=");
      while (c.Write(std::string(16384, 'e'))) {
      }
      return;
    } else if (target == "/endless-trailer") {
      // The last chunk, then a trailer field that never ends.
      c.Write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: ");
      while (c.Write(std::string(16384, 't'))) {
      }
      return;
    } else if (target == "/header-in-two-parts") {
      // 1,500 bytes of complete fields, a pause (the client reads them alone), then 1,500 more
      // and the end of the header: 3,000 bytes in all.
      std::string fields;
      for (int i = 0; fields.size() < 1400; ++i) fields += "X-Part-One-" + std::to_string(i) + ": 1234567890\r\n";
      if (!c.Write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields)) return;
      std::this_thread::sleep_for(200ms);
      fields.clear();
      for (int i = 0; fields.size() < 1500; ++i) fields += "X-Part-Two-" + std::to_string(i) + ": 1234567890\r\n";
      if (!c.Write(fields + "\r\nok")) return;
    } else if (target == "/long-status-line") {
      // In one write: a 1,500-byte reason phrase, then 1,000 bytes of fields and the end of the
      // header (2,540 bytes in all; the status line and the fields each fit 2,048, the block
      // does not).
      std::string fields;
      for (int i = 0; fields.size() < 1000; ++i) fields += "X-Field-" + std::to_string(i) + ": 1234567890\r\n";
      if (!c.Write("HTTP/1.1 200 " + std::string(1500, 'R') + "\r\nContent-Length: 2\r\n" + fields + "\r\nok")) {
        return;
      }
    } else if (target == "/chunked-after-long-header") {
      // A 2,046-byte header block (2 bytes under the tests' 2,048 limit) and a chunked body in
      // one write: the body's first chunk-size line starts just before the limit.
      const std::string head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: " + std::string(1990, 'p') + "\r\n\r\n";
      if (!c.Write(head + "5\r\nhello\r\n0\r\n\r\n")) return;
    } else if (target == "/long-first-field") {
      // The status line and an unfinished 2,030-byte field in one write, then more of it.
      if (!c.Write("HTTP/1.1 200 OK\r\nX: " + std::string(2030, 'a'))) return;
      std::this_thread::sleep_for(100ms);
      while (c.Write(std::string(1024, 'a'))) {
      }
      return;
    } else if (target == "/trailing-record") {
      // A complete response, then stray bytes in a TLS record of their own, both in one TCP
      // segment (corked): the client's TLS layer reads them with the response.
      c.Cork(true);
      c.Write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
      c.Write("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray");
      c.Cork(false);
    } else if (target == "/final-chunk-split") {
      // An empty chunked body whose last chunk comes in three writes: "0\r\n", "\r", "\n".
      // Beast keeps the last chunk's bytes unconsumed until the trailer ends and asserts that
      // it is then given at least five again.
      if (!c.WritePaced({"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "\r", "\n"}, 50ms)) return;
    } else if (target == "/final-chunk-split-trailer") {
      // The same with a trailer field, its first byte alone.
      if (!c.WritePaced({"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "X", "-T: 1\r\n\r\n"}, 50ms)) {
        return;
      }
    } else if (target == "/trailing-bytes") {
      // A complete response, then bytes nobody asked for: the framing of the connection is lost.
      if (!c.Write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")) return;
    } else if (target == "/early-answer") {
      // Answers after the request head without reading the (large) body, then never reads
      // again: the client gets the response while it is still writing.
      c.Write("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n");
      while (!c.stopping()) std::this_thread::sleep_for(20ms);
      return;
    } else if (target == "/reset-mid-upload") {
      // No answer: the connection is reset once the head is in, with the (large) body unread.
      c.ResetOnClose();
      return;
    } else if (target == "/early-answer-and-close") {
      // The same, then the connection is closed with the request's body unread: the kernel
      // resets it, and the client's write fails as the answer arrives.
      c.Write("HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 8\r\n\r\ntoo big\n");
      return;
    } else if (target == "/early-hints") {
      // Two interim responses, each in its own write, then the response: the call gets the
      // response and the connection stays in step.
      if (!c.WritePaced({"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                         "HTTP/1.1 100 Continue\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints"},
                        20ms)) {
        return;
      }
    } else if (target == "/endless-interim") {
      while (c.Write("HTTP/1.1 100 Continue\r\n\r\n")) {
      }
      return;
    } else if (target == "/switch") {
      c.Write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
      while (!c.stopping() && c.Write("\x81\x02hi")) std::this_thread::sleep_for(20ms);
      return;
    } else if (target == "/coding-then-length") {
      // A Transfer-Encoding whose last coding is not chunked (the body ends with the
      // connection), then a Content-Length that frames it otherwise (RFC 9112 6.3: a
      // response-splitting attempt). The server goes on as if the response were the two bytes.
      if (!c.Write("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok")) return;
    } else if (target == "/http10-chunked") {
      // An HTTP/1.0 response with Transfer-Encoding (RFC 9112 6.1: its framing is faulty, and the
      // connection is closed after it), asking for keep-alive; the server goes on.
      if (!c.Write("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "2\r\nok\r\n0\r\n\r\n")) {
        return;
      }
    } else if (target == "/trailer") {
      // A chunked body with a trailer section (RFC 9110 6.5: not to be merged into the header).
      if (!c.Write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: h\r\n\r\n"
                   "2\r\nok\r\n0\r\nX-Trailer: t\r\nSet-Cookie: from=trailer\r\n\r\n")) {
        return;
      }
    } else if (target == "example.com:443") {
      // CONNECT: a 2xx response makes the connection a tunnel right after its header (RFC 9112
      // 6.3), whatever length it declares; the tunnel then stays open.
      c.Write("HTTP/1.1 200 Connection Established\r\nContent-Length: 100\r\n\r\n");
      while (!c.stopping()) std::this_thread::sleep_for(20ms);
      return;
    } else if (target == "/obs-fold" || target == "/long-obs-fold") {
      // A field value folded over three lines (obs-fold, RFC 9112 5.2): 5 bytes unfolded, or
      // 5,004 in a header block far under the limit.
      const std::string folded = target == "/obs-fold" ? "b" : std::string(5000, 'f');
      if (!c.Write("HTTP/1.1 200 OK\r\nX-Fold: a\r\n " + folded + "\r\n\tc\r\nContent-Length: 2\r\n\r\nok")) return;
    } else if (target == "/status-099") {
      // A status under 100 (RFC 9110 15: invalid, to be taken as a 5xx), framed as a response
      // with a body; the server goes on.
      if (!c.Write("HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok")) return;
    } else if (target == "/binary-error") {
      // An error status whose body is binary (a compressed error page, say): a NUL, an escape
      // sequence and a DEL among its first bytes; the server goes on.
      const std::string body("bad\0body\x1b[2J\x7f\r\n", 15);
      if (!c.Write("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 15\r\n\r\n" + body)) return;
    } else if (target == "/drip") {
      // One byte every 50 ms: about 2 s for the whole response.
      for (char b : std::string("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndrip")) {
        if (!c.Write(std::string(1, b))) return;
        std::this_thread::sleep_for(50ms);
      }
    } else {
      return;
    }
  }
}

http::HttpOptions HttpOptions() {
  http::HttpOptions o;
  o.client.name = "hostile-http";
  o.client.runtime = MakeRuntime();
  o.client.timeout = 10s;
  o.transport.max_response_body_bytes = 1u << 20;
  o.resurrector.initial_backoff = 50ms;
  o.resurrector.max_backoff = 200ms;
  return o;
}

TEST(HostilePeerTest, HttpInterimResponsesAreSkippedUpToALimit) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  // 103 and 100 in writes of their own: skipped; the response is the call's, and the next
  // request on the same connection gets its own.
  http::Response r = client.Get("/early-hints");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "hints");
  EXPECT_TRUE(r.Header("Link").empty()) << "the interim response's fields are not the response's";
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1);
  // Endless interim responses stop at the limit; an unasked protocol switch is refused.
  ExpectBoundedFailure([&] { client.Get("/endless-interim"); }, Errc::kProtocolError,
                       "sent more than 8 interim (1xx) responses before the response "
                       "(limit transport.max_interim_responses)",
                       5s);
  ExpectBoundedFailure([&] { client.Get("/switch"); }, Errc::kProtocolError,
                       "switched protocols (101 Switching Protocols), which the request did not ask for", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

// The interim-response limit is transport.max_interim_responses: at 1 the two interim responses
// of /early-hints fail the call; at 2 they are skipped.
TEST(HostilePeerTest, HttpInterimResponseLimitIsConfigurable) {
  RawServer server(HostileHttp);
  auto options = HttpOptions();
  options.transport.max_interim_responses = 1;
  auto strict = Http::NewClient(server.uri(), options);
  ExpectBoundedFailure([&] { strict.Get("/early-hints"); }, Errc::kProtocolError,
                       "sent more than 1 interim (1xx) responses before the response "
                       "(limit transport.max_interim_responses)",
                       5s);
  options.transport.max_interim_responses = 2;
  auto lenient = Http::NewClient(server.uri(), options);
  EXPECT_EQ(lenient.Get("/early-hints").body, "hints");
}

TEST(HostilePeerTest, HttpHugeContentLengthIsRejectedByTheBodyLimit) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  EXPECT_EQ(client.Get("/ok").body, "ok");
  ExpectBoundedFailure([&] { client.Get("/huge-length"); }, Errc::kResponseTooLarge,
                       "max_response_body_bytes (1048576 bytes)", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

// With the body limit set to "no limit", a declared length the process cannot hold must not
// stop the connection from being read: the early end of the body is noticed at once.
TEST(HostilePeerTest, HttpAbsurdContentLengthUnderNoBodyLimitFailsCleanly) {
  RawServer server(HostileHttp);
  auto options = HttpOptions();
  options.transport.max_response_body_bytes = std::numeric_limits<size_t>::max();
  auto client = Http::NewClient(server.uri(), options);
  ExpectBoundedFailure([&] { client.Get("/absurd-length"); }, Errc::kConnectionClosed,
                       "closed by the server while reading the response", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

TEST(HostilePeerTest, HttpEndlessHeadersStopAtTheHeaderLimit) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  ExpectBoundedFailure([&] { client.Get("/endless-headers"); }, Errc::kResponseTooLarge,
                       "max_response_header_bytes (65536 bytes)", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

// Beast bounds neither a chunk-size line nor the trailer section: without a bound of its own
// the client would buffer an unterminated one until memory ran out.
TEST(HostilePeerTest, HttpEndlessChunkSizeLineOrTrailerStopsAtTheHeaderLimit) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  for (const char* target : {"/endless-chunk-extension", "/endless-trailer"}) {
    SCOPED_TRACE(target);
    ExpectBoundedFailure([&] { client.Get(target); }, Errc::kResponseTooLarge,
                         "a chunk-size line or the trailer section exceeds max_response_header_bytes (65536 bytes)",
                         5s);
    EXPECT_EQ(client.Get("/ok").body, "ok");
  }
}

// Beast consumes complete header fields as they come and checks its limit against what it has
// not consumed: a header block read in two parts must still be bounded as a whole.
TEST(HostilePeerTest, HttpHeaderReadInTwoPartsIsBoundedAsAWhole) {
  RawServer server(HostileHttp);
  auto options = HttpOptions();
  options.transport.max_response_header_bytes = 2048;  // each part fits, the two do not
  auto client = Http::NewClient(server.uri(), options);
  ExpectBoundedFailure([&] { client.Get("/header-in-two-parts"); }, Errc::kResponseTooLarge,
                       "max_response_header_bytes (2048 bytes)", 5s);
  // The status line and an unfinished field that reach the limit in the first read.
  ExpectBoundedFailure([&] { client.Get("/long-first-field"); }, Errc::kResponseTooLarge,
                       "max_response_header_bytes (2048 bytes)", 5s);
  // A status line and fields that each fit but together do not, read at once: the block as a
  // whole is held to the limit (Beast applies its header limit to each of the two apart).
  ExpectBoundedFailure([&] { client.Get("/long-status-line"); }, Errc::kResponseTooLarge,
                       "max_response_header_bytes (2048 bytes)", 5s);
  // A header block just under the limit, its body in the same read: the body is parsed from
  // the bytes past the limit too.
  http::Request chunked;
  chunked.target = "/chunked-after-long-header";
  CallOptions bounded;
  bounded.timeout = 5s;
  EXPECT_EQ(client.Send(chunked, bounded).body, "hello");
  options.transport.max_response_header_bytes = 4096;  // the whole block fits
  auto roomy = Http::NewClient(server.uri(), options);
  EXPECT_EQ(roomy.Get("/header-in-two-parts").body, "ok");
  EXPECT_EQ(roomy.Get("/long-status-line").body, "ok");
}

TEST(HostilePeerTest, HttpEndlessChunkedBodyStopsAtTheBodyLimit) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  ExpectBoundedFailure([&] { client.Get("/endless-chunks"); }, Errc::kResponseTooLarge,
                       "max_response_body_bytes (1048576 bytes)", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

TEST(HostilePeerTest, HttpSlowDripFailsByTheRequestTimeout) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  http::Request request;
  request.target = "/drip";
  CallOptions options;
  options.timeout = 300ms;
  ExpectBoundedFailure([&] { client.Send(request, options); }, Errc::kRequestTimeout,
                       "timed out after 300 ms", 1500ms);
  EXPECT_EQ(client.Get("/ok").body, "ok");  // on a new connection: the dripping one was closed
}

// A reply followed by stray bytes is delivered, and the connection is not reused (the stray
// bytes would be read as the next call's reply).
TEST(HostilePeerTest, HttpBytesAfterTheResponseRetireTheConnection) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1) << "keep-alive";
  EXPECT_EQ(client.Get("/trailing-bytes").body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 2) << "the connection with stray bytes was closed";
}

// A request that says `Connection: close` is the last on its connection (RFC 9112 9.6), even
// when the response does not repeat it and the server would go on: the next call opens a new
// connection instead of writing to one the server may be closing.
TEST(HostilePeerTest, HttpRequestWithConnectionCloseIsTheLastOnItsConnection) {
  RawServer server(HostileHttp);  // keeps /ok connections open whatever the request says
  auto client = Http::NewClient(server.uri(), HttpOptions());
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1) << "keep-alive";
  int expected = 1;
  for (const char* value : {"close", "Keep-Alive, CLOSE"}) {
    SCOPED_TRACE(value);
    http::Request last{"GET", "/ok", {{"Connection", value}}, ""};
    EXPECT_EQ(client.Send(last).body, "ok");
    EXPECT_EQ(client.Get("/ok").body, "ok");
    EXPECT_EQ(server.accepted(), ++expected) << "the call after the close went on a new connection";
  }
  // Through the call's own headers (CallOptions), too.
  CallOptions closing;
  closing.headers = {{"connection", "close"}};
  EXPECT_EQ(client.Send(http::Request{"GET", "/ok", {}, ""}, closing).body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), ++expected);
  // A Connection header without the close token keeps the connection.
  http::Request kept{"GET", "/ok", {{"Connection", "keep-alive"}}, ""};
  EXPECT_EQ(client.Send(kept).body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), expected);
}

// An empty chunked body whose last chunk arrives split after "0\r\n" completes normally (it
// tripped an assertion in Beast under the sanitizer builds: basic_parser.ipp, `n >= 5`), and the
// connection stays usable.
TEST(HostilePeerTest, HttpLastChunkSplitAcrossReadsCompletes) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  for (const char* target : {"/final-chunk-split", "/final-chunk-split-trailer"}) {
    SCOPED_TRACE(target);
    http::Response empty = client.Get(target);
    EXPECT_EQ(empty.status, 200);
    EXPECT_EQ(empty.body, "");
    EXPECT_EQ(client.Get("/ok").body, "ok");
  }
  EXPECT_EQ(server.accepted(), 1) << "both kept their connection";
}

// The server answers before it has read the request, and stops reading: the call completes
// once, with the server's answer, while the request is still being written; the half-written
// connection is closed, and the next call works on a new one.
TEST(HostilePeerTest, HttpAnswerBeforeTheRequestIsWrittenCompletesOnce) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  http::Request big{"POST", "/early-answer", {}, std::string(32 << 20, 'p')};  // beyond the socket buffers
  const auto start = Clock::now();
  try {
    client.Send(big);
    ADD_FAILURE() << "the call succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kHttpError) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("HTTP 413 Payload Too Large"), std::string_view::npos) << e.what();
  }
  EXPECT_LT(Clock::now() - start, 5s);  // not the 10 s request timeout: answered while writing
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 2);
}

// The server answers before it has read the request and closes the connection (as servers
// refusing a large upload do): the reset fails the write, but the answer that came before it is
// the call's outcome, not the failed write.
TEST(HostilePeerTest, HttpAnswerBeforeTheRequestIsWrittenThenResetIsDelivered) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  for (int i = 0; i < 3; ++i) {
    http::Request big{"POST", "/early-answer-and-close", {}, std::string(32 << 20, 'p')};  // beyond the socket buffers
    try {
      client.Send(big);
      ADD_FAILURE() << "the call succeeded";
    } catch (const Error& e) {
      EXPECT_EQ(e.scales_code(), Errc::kHttpError) << e.what();
      EXPECT_NE(std::string_view(e.what()).find("HTTP 413 Payload Too Large"), std::string_view::npos) << e.what();
    }
  }
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 4);
}

// The server resets the connection while the request's body is being written, without an
// answer: the call fails with kConnectionClosed (part of the request reached the server), and
// the detail says how much of how much was written. It said only "after N bytes".
TEST(HostilePeerTest, HttpWriteResetPartWayNamesHowMuchOfTheRequestWasWritten) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  const size_t body = 32 << 20;  // beyond the socket buffers
  http::Request big{"POST", "/reset-mid-upload", {}, std::string(body, 'p')};
  try {
    client.Send(big);
    ADD_FAILURE() << "the call succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kConnectionClosed) << e.what();
    const std::string_view what = e.what();
    EXPECT_NE(what.find("writing the request to 127.0.0.1:"), std::string_view::npos) << what;
    // "failed after N of its M bytes", M the whole request: the head and the body.
    const size_t of = what.find(" of its ");
    ASSERT_NE(of, std::string_view::npos) << what;
    const size_t total = std::stoul(std::string(what.substr(of + 8)));
    EXPECT_GT(total, body) << what;
    EXPECT_LT(total, body + 256) << what;
  }
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

// Over TLS, stray bytes after a response in a TLS record of their own, read from the socket
// together with the response's record, sit in OpenSSL where the idle watch (a wait on the
// socket) cannot see them: the connection must be retired all the same, or the next request
// reads them as its response.
TEST(HostilePeerTest, HttpsBytesAfterTheResponseInTheirOwnRecordRetireTheConnection) {
  RawServer server(HostileHttp, /*tls=*/true);
  auto options = HttpOptions();
  options.transport.tls.enabled = true;
  options.transport.tls.ca_file = testing::TestCa().ca_file;
  auto client = Http::NewClient(server.uri(), options);
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1) << "keep-alive";
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(client.Get("/trailing-record").body, "ok");
    http::Response next = client.Get("/ok");
    EXPECT_EQ(next.body, "ok") << "the stray bytes were read as the next response";
  }
  EXPECT_EQ(server.accepted(), 4) << "each connection with stray bytes was closed";
}

// The same over TLS: the reply is read while the request is still being written (it used to be
// read only once the write ended, so the call waited for its deadline).
TEST(HostilePeerTest, HttpsAnswerBeforeTheRequestIsWrittenCompletesOnce) {
  RawServer server(HostileHttp, /*tls=*/true);
  auto options = HttpOptions();
  options.transport.tls.enabled = true;
  options.transport.tls.ca_file = testing::TestCa().ca_file;
  options.transport.raise_on_http_error = false;  // the 413 response itself is delivered
  auto client = Http::NewClient(server.uri(), options);
  EXPECT_EQ(client.Get("/ok").body, "ok");
  http::Request big{"POST", "/early-answer", {}, std::string(32 << 20, 'p')};  // beyond the socket buffers
  const auto start = Clock::now();
  std::atomic<int> completions{0};
  std::promise<std::pair<error_code, http::Response>> done;
  client.AsyncSend(std::move(big), [&](error_code ec, http::Response r) {
    if (++completions == 1) done.set_value({ec, std::move(r)});
  });
  auto result = done.get_future();
  ASSERT_EQ(result.wait_for(20s), std::future_status::ready);
  auto [ec, response] = result.get();
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(response.status, 413);
  EXPECT_EQ(response.body, "too big\n");
  EXPECT_LT(Clock::now() - start, 5s);  // not the 10 s request timeout: answered while writing
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 2) << "the half-written connection was retired";
  client.Close();
  EXPECT_EQ(completions, 1);
}

// A field value folded over several lines (obs-fold) is unfolded with spaces. Beast holds an
// unfolded value to 4,096 bytes: a longer one fails with an error that says so, not with one
// blaming the header limit the block is far under.
TEST(HostilePeerTest, HttpFoldedFieldIsUnfoldedOrFailsNamingItsOwnLimit) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  EXPECT_EQ(client.Get("/obs-fold").Header("X-Fold"), "a b c");
  ExpectBoundedFailure([&] { client.Get("/long-obs-fold"); }, Errc::kResponseTooLarge,
                       "a header field folded over several lines (obs-fold) exceeds 4096 bytes", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
}

// A status under 100 is not an interim response (100-199) to skip, waiting for another that
// never comes: it is invalid, and taken as a server error (RFC 9110 15).
TEST(HostilePeerTest, HttpStatusUnder100IsAServerErrorNotAnInterimResponse) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  ExpectBoundedFailure([&] { client.Get("/status-099"); }, Errc::kHttpError, "HTTP 99 Odd from 127.0.0.1:", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1);
}

// The body excerpt of an HTTP error names what the server said without ending or garbling the
// message: a NUL in it used to end what() there (the rest of the error lost), and an escape
// sequence went as is to the terminal or log the message is written to.
TEST(HostilePeerTest, HttpErrorWithABinaryBodyKeepsItsMessageWhole) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  try {
    client.Get("/binary-error");
    ADD_FAILURE() << "the call succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kHttpError) << e.what();
    const std::string what = e.what();
    EXPECT_NE(what.find("HTTP 500 Internal Server Error from 127.0.0.1:"), std::string::npos) << what;
    EXPECT_NE(what.find("for GET /binary-error: bad\\x00body\\x1b[2J\\x7f  "), std::string::npos) << what;
  }
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1);
}

// A Transfer-Encoding and a Content-Length in one response (RFC 9112 6.3): the message is
// an error whichever comes first, not framed by the Content-Length when the Transfer-Encoding
// (here not ending with chunked) comes first; the connection is closed.
TEST(HostilePeerTest, HttpTransferEncodingThenContentLengthIsRejected) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  EXPECT_EQ(client.Get("/ok").body, "ok");
  ExpectBoundedFailure([&] { client.Get("/coding-then-length"); }, Errc::kProtocolError,
                       "malformed HTTP response from 127.0.0.1:", 5s);
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 2) << "the connection with the faulty framing was closed";
}

// An HTTP/1.0 response with Transfer-Encoding is delivered, but its connection is not reused,
// even with `Connection: keep-alive` (RFC 9112 6.1).
TEST(HostilePeerTest, HttpOneZeroResponseWithTransferEncodingClosesItsConnection) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  EXPECT_EQ(client.Get("/http10-chunked").body, "ok");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 2);
}

// The fields of a trailer section are not merged into the response's header fields (RFC 9110
// 6.5.2).
TEST(HostilePeerTest, HttpTrailerFieldsAreNotHeaderFields) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  http::Response r = client.Get("/trailer");
  EXPECT_EQ(r.body, "ok");
  EXPECT_EQ(r.Header("X-Head"), "h");
  EXPECT_FALSE(r.HasHeader("X-Trailer"));
  EXPECT_FALSE(r.HasHeader("Set-Cookie"));
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 1);
}

// A 2xx response to CONNECT ends with its header: the connection is a tunnel from there on
// (RFC 9112 6.3), so the call completes at once, with no body whatever length the header
// declares, instead of waiting for the tunnel to close; the connection is not reused.
TEST(HostilePeerTest, HttpConnectResponseEndsWithItsHeader) {
  RawServer server(HostileHttp);
  auto client = Http::NewClient(server.uri(), HttpOptions());
  CallOptions bounded;
  bounded.timeout = 3s;
  http::Response r = client.Send(http::Request{"CONNECT", "example.com:443", {}, ""}, bounded);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "");
  EXPECT_EQ(client.Get("/ok").body, "ok");
  EXPECT_EQ(server.accepted(), 2);
}

// --- Framed Thrift -------------------------------------------------------------------------------

// Answers echo(s) calls (strict binary, framed): "huge-frame" with a 2 GiB frame length, every
// other argument with the argument; "huge-string" declares a 2 GiB string it does not send;
// "truncated-reply" declares an 8-byte string and ends after 2 of them; "duplicate-reply" is
// answered twice, the second time 100 ms later; "bad-header" is answered with a whole frame whose
// message header does not parse (protocol version 0x8002), then 100 ms later with its reply;
// "cut-reply" gets the frame length of its reply and half of the reply, then the connection closes.
// A call cancelled before its loop took it, in a stack without a pool: the transport answers
// it, naming the endpoint. It said only "cancelled before it was sent".
TEST(HostilePeerTest, HttpCallCancelledBeforeItWasSentNamesTheEndpoint) {
  RawServer server(HostileHttp);
  http::HttpOptions o = HttpOptions();
  o.retry = std::nullopt;  // the failure itself is what is checked
  auto rt = o.client.runtime;
  auto client = Http::NewBuilder(o)
                    .SetUri(server.uri())
                    .RemoveRole(roles::kPool)
                    .RemoveRole(roles::kResurrector)
                    .RemoveRole(roles::kFailureAccrual)
                    .Build();
  EXPECT_EQ(client.Get("/ok").status, 200);
  CallInfo info;
  CallOptions options;
  options.info = &info;
  std::promise<error_code> got;
  CancelBeforeTheLoopTakesIt(*rt, [&](boost::asio::cancellation_signal& signal) {
    client.AsyncSend(http::Request{"GET", "/ok", {}, {}}, options,
                     boost::asio::bind_cancellation_slot(
                         signal.slot(), [&](error_code ec, http::Response) { got.set_value(ec); }));
  });
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(f.get(), Errc::kCancelled) << info.detail;
  EXPECT_NE(info.detail.find("client hostile-http: cancelled before the request was sent to 127.0.0.1:"),
            std::string::npos)
      << info.detail;
  EXPECT_EQ(client.Get("/ok").status, 200);
}

// "slow-reply" (HostileThrift): set once the server has the request, which it then holds until
// the test sets the release (at most 10 s).
std::atomic<bool> g_slow_reply_received{false};
std::atomic<bool> g_slow_reply_release{false};

// Waits until `pred` holds, at most 10 s.
template <class Pred>
bool WaitUntil(Pred pred) {
  for (auto until = std::chrono::steady_clock::now() + 10s; !pred(); std::this_thread::sleep_for(5ms)) {
    if (std::chrono::steady_clock::now() > until) return false;
  }
  return true;
}

// The TCP connections open from this process's clients to `endpoint` ("127.0.0.1:P"), from the
// scales_connections gauges of the default registry.
int64_t OpenConnectionsTo(const std::string& endpoint) {
  int64_t open = 0;
  for (const auto& m : stats::StatsRegistry::Default().Snapshot()) {
    if (m.name != "scales_connections") continue;
    for (const auto& [key, value] : m.labels) {
      if (key == "endpoint" && value == endpoint) open += m.value;
    }
  }
  return open;
}

void HostileThrift(RawConn& c) {
  for (;;) {
    auto len = c.ReadExactly(4);
    if (!len) return;
    uint32_t n = (uint32_t{uint8_t((*len)[0])} << 24) | (uint32_t{uint8_t((*len)[1])} << 16) |
                 (uint32_t{uint8_t((*len)[2])} << 8) | uint8_t((*len)[3]);
    auto call = c.ReadExactly(n);
    if (!call) return;
    // 80 01 00 01, name (i32 length + "echo"), seqid, field 1 string: i32 length + bytes.
    std::string seqid = call->substr(12, 4);
    std::string arg = call->substr(12 + 4 + 3 + 4);
    arg.resize(arg.size() - 1);  // the struct's stop byte
    if (arg == "huge-frame") {
      c.Write(std::string("\x80\x00\x00\x00", 4) + std::string(4096, 'x'));
      while (c.Write(std::string(16384, 'x'))) {
      }
      return;
    }
    auto be32 = [](size_t v) {
      return std::string{char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
    };
    std::string reply = std::string("\x80\x01\x00\x02", 4) + be32(4) + "echo" + seqid +
                        std::string("\x0b\x00\x00", 3) + be32(arg.size()) + arg + std::string(1, '\0');
    if (arg == "huge-string") {
      // A 24-byte reply whose result string declares 2 GiB - 16 bytes, none of which follow.
      reply = std::string("\x80\x01\x00\x02", 4) + be32(4) + "echo" + seqid + std::string("\x0b\x00\x00", 3) +
              be32(0x7FFFFFF0);
    }
    if (arg == "truncated-reply") {
      reply = std::string("\x80\x01\x00\x02", 4) + be32(4) + "echo" + seqid + std::string("\x0b\x00\x00", 3) +
              be32(8) + "tr";
    }
    if (arg == "cut-reply") {
      c.Write(be32(reply.size()) + reply.substr(0, reply.size() / 2));
      return;
    }
    if (arg == "bad-header") {
      const std::string bad = std::string("\x80\x02\x00\x02", 4) + reply.substr(4);
      if (!c.Write(be32(bad.size()) + bad)) return;
      std::this_thread::sleep_for(100ms);
    }
    if (arg == "slow-reply") {
      g_slow_reply_received = true;
      WaitUntil([] { return g_slow_reply_release.load(); });
    }
    if (!c.Write(be32(reply.size()) + reply)) return;
    if (arg == "close-after-reply") return;  // the connection closes while idle
    if (arg == "duplicate-reply") {
      // Again, a moment later: after the client sent its next request on the connection.
      std::this_thread::sleep_for(100ms);
      if (!c.Write(be32(reply.size()) + reply)) return;
    }
  }
}

thrift::ThriftOptions ThriftOptions() { return HostileOptions<thrift::ThriftOptions>("hostile-thrift"); }

// Peak resident memory of the process since the last ResetPeakMemory().
size_t PeakMemory() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoul(line.substr(6)) * 1024;  // kB
  }
  return 0;
}
void ResetPeakMemory() { std::ofstream("/proc/self/clear_refs") << "5"; }

// A malformed echo reply fails the call, blocking or async alike, with scales::Error
// (kProtocolError) naming the endpoint and the method.
// Also checks that the error names the client, and that the call's CallInfo says the same
// (the stack itself saw a whole reply).
void ExpectMalformedReply(const thrift::ThriftClient<EchoClient>& plain, const std::string& arg) {
  CallInfo info;
  CallOptions options;
  options.info = &info;
  auto client = plain.WithOptions(options);
  auto check = [&](const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kProtocolError) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("client hostile-thrift: malformed Thrift reply from 127.0.0.1:"),
              std::string_view::npos)
        << e.what();
    EXPECT_NE(std::string_view(e.what()).find(" for echo: "), std::string_view::npos) << e.what();
    EXPECT_EQ(info.error, Errc::kProtocolError);
    EXPECT_EQ(info.detail, e.what());
    info = CallInfo();
  };
  try {
    std::string r;
    client->echo(r, arg);  // blocking: the generated recv_echo reads the reply
    ADD_FAILURE() << "the blocking call succeeded";
  } catch (const Error& e) {
    check(e);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the blocking call threw something else than scales::Error: " << e.what();
  }
  auto f = SCALES_THRIFT_CALL(client, echo, arg, boost::asio::use_future);
  try {
    f.get();
    ADD_FAILURE() << "the async call succeeded";
  } catch (const Error& e) {
    check(e);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the async call threw something else than scales::Error: " << e.what();
  }
}

TEST(HostilePeerTest, ThriftReplyDeclaringAHugeStringFailsWithoutAllocatingIt) {
  // Apache's reader sizes a string from its declared length before reading it: a 24-byte reply
  // declaring a 2 GiB string must fail as malformed, without the process ever holding 2 GiB.
  RawServer server(HostileThrift);
  auto client = Thrift::NewClient<EchoClient>(server.uri(), ThriftOptions());
  EXPECT_EQ(Echo(client, "before"), "before");
  ResetPeakMemory();
  const size_t before = PeakMemory();
  ExpectMalformedReply(client, "huge-string");
  EXPECT_LT(PeakMemory(), before + (64u << 20)) << "peak resident memory grew by "
                                                << (PeakMemory() - before) / (1 << 20) << " MiB";
  EXPECT_EQ(Echo(client, "after"), "after");
}

TEST(HostilePeerTest, ThriftTruncatedReplyBodyIsAProtocolError) {
  // The frame is whole but the message in it ends inside its string: Apache's reader runs out
  // of bytes (TTransportException inside recv_echo), which the caller sees as kProtocolError.
  RawServer server(HostileThrift);
  auto client = Thrift::NewClient<EchoClient>(server.uri(), ThriftOptions());
  ExpectMalformedReply(client, "truncated-reply");
  EXPECT_EQ(Echo(client, "after"), "after");
}

TEST(HostilePeerTest, ThriftDuplicateReplyRetiresTheConnection) {
  // The server answers one call twice, the second time while the next call is on the
  // connection. That call reads the duplicate: it fails (its own reply is still to come), and
  // the connection, one reply behind, is closed rather than reused; every later call gets its
  // own reply.
  RawServer server(HostileThrift);
  thrift::ThriftOptions o = ThriftOptions();
  o.retry = std::nullopt;  // the failure itself is what is checked
  auto client = Thrift::NewClient<EchoClient>(server.uri(), o);
  EXPECT_EQ(Echo(client, "duplicate-reply"), "duplicate-reply");
  try {
    Echo(client, "next");
    ADD_FAILURE() << "the call after the duplicate got a reply";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kProtocolError) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("(a stray or duplicate reply); connection closed"),
              std::string_view::npos)
        << e.what();
  }
  for (const char* s : {"one", "two", "three"}) EXPECT_EQ(Echo(client, s), s);
  EXPECT_EQ(server.accepted(), 2);
}

TEST(HostilePeerTest, ThriftUndecodableReplyHeaderRetiresTheConnection) {
  // A whole frame whose message header does not parse may be anything but this call's reply,
  // which may still come: the call fails, and the connection, possibly one reply behind, is
  // closed rather than reused (as after a duplicate reply); every later call gets its own reply.
  RawServer server(HostileThrift);
  thrift::ThriftOptions o = ThriftOptions();
  o.retry = std::nullopt;  // the failure itself is what is checked
  auto client = Thrift::NewClient<EchoClient>(server.uri(), o);
  try {
    Echo(client, "bad-header");
    ADD_FAILURE() << "the call with an undecodable reply header succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kProtocolError) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("for echo: undecodable reply header: unsupported binary protocol "
                                              "version"),
              std::string_view::npos)
        << e.what();
  }
  for (const char* s : {"one", "two", "three"}) EXPECT_EQ(Echo(client, s), s);
  EXPECT_EQ(server.accepted(), 2);
}

TEST(HostilePeerTest, ThriftReplyCutByTheServersCloseNamesTheMethod) {
  // The server closes the connection inside a reply frame: the call fails as a closed
  // connection, naming the client, the endpoint, the method and how far the reply came.
  RawServer server(HostileThrift);
  thrift::ThriftOptions o = ThriftOptions();
  o.retry = std::nullopt;
  auto client = Thrift::NewClient<EchoClient>(server.uri(), o);
  try {
    Echo(client, "cut-reply");
    ADD_FAILURE() << "the call whose reply was cut succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kConnectionClosed) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("client hostile-thrift: connection to 127.0.0.1:"),
              std::string_view::npos)
        << e.what();
    EXPECT_NE(std::string_view(e.what()).find(" closed by the server while reading the reply for echo (after 20 "
                                              "bytes): end of stream"),
              std::string_view::npos)
        << e.what();
  }
  EXPECT_EQ(Echo(client, "after"), "after");
}

// A Thrift client to `server` with neither pool, resurrector nor failure accrual, and no
// retry: its calls meet the connection sink itself, and its failures are the caller's.
thrift::ThriftClient<EchoClient> BareThriftClient(const RawServer& server,
                                                  thrift::ThriftOptions o = ThriftOptions()) {
  o.retry = std::nullopt;
  return Thrift::NewBuilder<EchoClient>(o)
      .SetUri(server.uri())
      .RemoveRole(roles::kPool)
      .RemoveRole(roles::kResurrector)
      .RemoveRole(roles::kFailureAccrual)
      .Build();
}

// Expects echo("next") on `client` to fail with `code`, its message containing each of `parts`.
void ExpectEchoFails(const thrift::ThriftClient<EchoClient>& client, Errc code,
                     std::initializer_list<std::string_view> parts) {
  try {
    Echo(client, "next");
    ADD_FAILURE() << "the call succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), code) << e.what();
    for (std::string_view part : parts) EXPECT_NE(std::string_view(e.what()).find(part), std::string_view::npos) << e.what();
  }
}

// A connection the server closed while idle, given a request (no pool nor resurrector in the
// stack to retire it first): the request fails unsent, naming the endpoint and the method, as
// every other transport failure of a Thrift call does. It named no method: "connection to X
// was closed before the request was sent".
TEST(HostilePeerTest, ThriftRequestOnAConnectionTheServerClosedNamesTheMethod) {
  RawServer server(HostileThrift);
  auto client = BareThriftClient(server);
  EXPECT_EQ(Echo(client, "close-after-reply"), "close-after-reply");
  // The client notices the close (its idle connection reads the end of stream).
  ASSERT_TRUE(WaitUntil([&] { return OpenConnectionsTo(server.uri().substr(6)) == 0; }));
  ExpectEchoFails(client, Errc::kNotSent,
                  {"client hostile-thrift: connection to 127.0.0.1:", " was closed before the request for echo was sent"});
}

// Without a pool a second call reaches the connection while the first is on it: it fails
// at once, unsent (kNotSent: nothing of it was written, so a retry is safe), naming the endpoint
// and the method. It named no method ("connection to X is not usable (busy with another
// request)") and was kConnectionClosed, which says the server may have had the request.
TEST(HostilePeerTest, ThriftRequestOnABusyConnectionNamesTheMethod) {
  RawServer server(HostileThrift);
  auto client = BareThriftClient(server);
  g_slow_reply_received = false;
  g_slow_reply_release = false;
  auto slow = SCALES_THRIFT_CALL(client, echo, "slow-reply", boost::asio::use_future);
  ASSERT_TRUE(WaitUntil([] { return g_slow_reply_received.load(); }));  // the slow call is on the connection
  ExpectEchoFails(client, Errc::kNotSent,
                  {"client hostile-thrift: connection to 127.0.0.1:",
                   " is not usable for the request for echo (busy with another request)"});
  g_slow_reply_release = true;
  ASSERT_EQ(slow.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(slow.get(), "slow-reply");
}

// The caller cancels a Thrift call whose request is on the wire: the transport closes the
// connection and the detail names the method, as a timeout's does (the timeout sink adds it
// there; nothing above the transport does for a cancellation). It read only "while waiting for
// the reply from X".
TEST(HostilePeerTest, ThriftCallCancelledInFlightNamesTheMethod) {
  RawServer server(HostileThrift);
  // Before the client: its handler writes them.
  boost::asio::cancellation_signal signal;
  std::promise<std::exception_ptr> got;
  CallInfo info;
  CallOptions options;
  options.info = &info;
  auto client = Thrift::NewClient<EchoClient>(server.uri(), ThriftOptions());
  g_slow_reply_received = false;
  g_slow_reply_release = false;
  SCALES_THRIFT_CALL(client.WithOptions(options), echo, std::string("slow-reply"),
                     boost::asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, std::string) {
                       got.set_value(e);
                     }));
  ASSERT_TRUE(WaitUntil([] { return g_slow_reply_received.load(); }));  // the request is on the wire
  signal.emit(boost::asio::cancellation_type::terminal);
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  g_slow_reply_release = true;
  EXPECT_NE(f.get(), nullptr);
  EXPECT_EQ(info.error, Errc::kCancelled) << info.detail;
  EXPECT_TRUE(info.detail.starts_with("client hostile-thrift: while waiting for the reply for echo from 127.0.0.1:"))
      << info.detail;
  EXPECT_EQ(Echo(client, "after"), "after");
}

// A call cancelled before its loop took it, in a stack without a pool: the transport answers
// it, naming the endpoint and the method. It said only "cancelled before it was sent".
TEST(HostilePeerTest, ThriftCallCancelledBeforeItWasSentNamesTheEndpointAndTheMethod) {
  RawServer server(HostileThrift);
  thrift::ThriftOptions o = ThriftOptions();
  auto rt = o.client.runtime;
  auto client = BareThriftClient(server, o);
  EXPECT_EQ(Echo(client, "before"), "before");
  std::promise<std::exception_ptr> got;
  CancelBeforeTheLoopTakesIt(*rt, [&](boost::asio::cancellation_signal& signal) {
    SCALES_THRIFT_CALL(client, echo, std::string("cancelled"),
                       boost::asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, std::string) {
                         got.set_value(e);
                       }));
  });
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  try {
    std::rethrow_exception(f.get());
  } catch (const Error& e) {
    EXPECT_EQ(e.scales_code(), Errc::kCancelled) << e.what();
    EXPECT_NE(std::string_view(e.what()).find("client hostile-thrift: cancelled before the request for echo was sent "
                                              "to 127.0.0.1:"),
              std::string_view::npos)
        << e.what();
  } catch (...) {
    ADD_FAILURE() << "the cancelled call did not fail with scales::Error";
  }
  EXPECT_EQ(Echo(client, "after"), "after");
}

TEST(HostilePeerTest, ThriftTwoGibFrameLengthIsRejectedByMaxFrameBytes) {
  RawServer server(HostileThrift);
  auto client = Thrift::NewClient<EchoClient>(server.uri(), ThriftOptions());
  EXPECT_EQ(Echo(client, "before"), "before");
  ExpectBoundedFailure([&] { Echo(client, "huge-frame"); }, Errc::kResponseTooLarge,
                       "2147483648 bytes, above max_frame_bytes (16384000 bytes)", 5s);
  EXPECT_EQ(Echo(client, "after"), "after");
}

}  // namespace
}  // namespace scales
