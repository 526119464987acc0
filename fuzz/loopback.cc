// See loopback.h.

#include "loopback.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace scales::fuzz {

void Check(bool ok, const char* what) {
  if (ok) return;
  const int error = errno;  // a failed system call's, else whatever was left there
  std::fprintf(stderr, "fuzz invariant broken: %s (errno %d: %s)\n", what, error, std::strerror(error));
  std::abort();
}

Harness& Harness::Get() {
  static Harness* h = new Harness();  // never destroyed: libFuzzer exits without unwinding
  return *h;
}

Harness::Harness()
    : clock_(std::make_shared<ManualClock>()),
      runtime_(RuntimeOptions{.threads = 1, .start_threads = false, .clock = clock_, .seed = 42}),
      scope_(&registry_, {{"client", "fuzz"}}) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  Check(listen_fd_ >= 0, "socket()");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  Check(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0, "bind()");
  Check(::listen(listen_fd_, 64) == 0, "listen()");
  socklen_t len = sizeof addr;
  Check(::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0, "getsockname()");
  port_ = ntohs(addr.sin_port);
}

SinkContext Harness::Context() {
  SinkContext ctx;
  ctx.loop = &loop();
  ctx.client_name = "fuzz";
  ctx.stats = scope_;
  ctx.endpoint = Endpoint{"127.0.0.1", port_};
  return ctx;
}

bool Harness::RunUntil(const std::function<bool()>& done, std::chrono::milliseconds patience) {
  for (int round = 0; round < 2000; ++round) {
    if (done()) return true;
    runtime_.RunUntilIdle();
  }
  // Still not there: the kernel may not have delivered the bytes yet (loopback delivery runs in
  // softirq context, which a loaded machine defers). Wait for the loop's events in real time
  // before calling it a hang.
  const auto give_up = std::chrono::steady_clock::now() + patience;
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    auto& ioc = loop().io_context();
    if (ioc.stopped()) ioc.restart();
    if (ioc.run_one_for(std::chrono::milliseconds(1)) == 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
    runtime_.RunUntilIdle();
  }
  return true;
}

int Harness::Accept() {
  int fd;
  do {
    fd = ::accept(listen_fd_, nullptr, nullptr);
  } while (fd < 0 && errno == EINTR);  // a signal, as in Connect()
  Check(fd >= 0, "accept()");
  // The server's small writes go out at once (no Nagle delay waiting for the client's delayed
  // ACK), so that each one reaches the client while the loop runs after it.
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

std::unique_ptr<Peer> Harness::Open(ClientMessageSink& sink, OpenResult& result) {
  sink.AsyncOpen([&result](error_code ec) {
    result.done = true;
    result.error = ec;
  });
  return std::make_unique<Peer>(Accept());
}

Harness::Connection Harness::Connect() {
  Connection c;
  c.client = ::socket(AF_INET, SOCK_STREAM, 0);
  Check(c.client >= 0, "socket()");
  // From 127.0.0.2..127.0.0.251 in turn: every connection that closes gracefully leaves a
  // TIME_WAIT holding its address pair for a minute, and from one source address to the one
  // listening port there are only as many pairs as ephemeral ports (28,232 by default), which a
  // fuzzer running at 500 inputs a second uses up in under a minute (connect() then fails with
  // EADDRNOTAVAIL). The port is still chosen by connect() (IP_BIND_ADDRESS_NO_PORT).
  static uint32_t next_source = 0;
  const int one = 1;
  ::setsockopt(c.client, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  sockaddr_in source{};
  source.sin_family = AF_INET;
  source.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + (next_source++ % 250));
  Check(::bind(c.client, reinterpret_cast<sockaddr*>(&source), sizeof source) == 0, "bind()");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port_);
  // Completes in the kernel (the listen backlog takes it) before the accept. A signal may cut
  // the wait short (libFuzzer's SIGALRM for -timeout, every few seconds, has no SA_RESTART) when
  // a loaded machine defers the loopback handshake to ksoftirqd: the connect goes on in the
  // kernel, and EINTR says only that the wait was interrupted. Then wait for it here.
  int rc = ::connect(c.client, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  if (rc != 0 && errno == EINTR) {
    pollfd p{c.client, POLLOUT, 0};
    int ready;
    do {
      ready = ::poll(&p, 1, 10'000);
    } while (ready < 0 && errno == EINTR);
    int error = ready == 1 ? 0 : ETIMEDOUT;
    socklen_t len = sizeof error;
    if (ready == 1 && ::getsockopt(c.client, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    rc = error == 0 ? 0 : -1;
    errno = error;
  }
  Check(rc == 0, "connect()");
  ::setsockopt(c.client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::fcntl(c.client, F_SETFL, ::fcntl(c.client, F_GETFL) | O_NONBLOCK);
  c.server = Accept();
  return c;
}

namespace {

// The local (or, with `peer`, the remote) port of a TCP/IPv4 socket; 0 if `fd` is not one.
uint16_t Port(int fd, bool peer = false) {
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  const int rc = peer ? ::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len)
                      : ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  if (rc != 0 || addr.sin_family != AF_INET) return 0;
  return ntohs(addr.sin_port);
}

uint16_t LocalPort(int fd) { return Port(fd); }

}  // namespace

Peer::Peer(int fd) : fd_(fd) {
  // The other end of the connection is a socket of this process: find it (usually the
  // descriptor just below or above this one), to see how much of what we sent it has read.
  // Both ports must match: the listening socket has the accepted end's local port too.
  client_port_ = Port(fd_, /*peer=*/true);
  const uint16_t own_port = LocalPort(fd_);
  if (client_port_ == 0) return;
  auto other_end = [&](int d) { return LocalPort(d) == client_port_ && Port(d, /*peer=*/true) == own_port; };
  for (int d = fd_ - 1; d >= 0 && d > fd_ - 64; --d) {
    if (other_end(d)) {
      client_fd_ = d;
      return;
    }
  }
  for (int d = fd_ + 1; d < fd_ + 64; ++d) {
    if (other_end(d)) {
      client_fd_ = d;
      return;
    }
  }
}

Peer::~Peer() { ::close(fd_); }

size_t Peer::Send(std::string_view bytes) {
  ssize_t n;
  do {
    n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) {
    sent_ += static_cast<uint64_t>(n);
    return static_cast<size_t>(n);
  }
  return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : bytes.size();
}

bool Peer::Delivered() const {
  // A client socket closed (or its descriptor reused) reads nothing more.
  if (client_fd_ < 0 || LocalPort(client_fd_) != client_port_) return true;
  // The kernel's struct tcp_info goes on past glibc's (which ends at tcpi_total_retrans):
  // tcpi_pacing_rate, tcpi_max_pacing_rate and tcpi_bytes_acked (u64 each), then
  // tcpi_bytes_received (Linux 4.1).
  constexpr size_t kBytesReceivedAt = offsetof(tcp_info, tcpi_total_retrans) + 4 + 3 * 8;
  unsigned char info[256] = {};
  socklen_t len = sizeof info;
  if (::getsockopt(client_fd_, IPPROTO_TCP, TCP_INFO, info, &len) != 0) return true;
  uint64_t received = 0;
  if (len < kBytesReceivedAt + sizeof received) return true;  // an old kernel: cannot tell
  std::memcpy(&received, info + kBytesReceivedAt, sizeof received);
  int unread = 0;
  if (::ioctl(client_fd_, FIONREAD, &unread) != 0) return true;
  return received >= sent_ && unread == 0;
}

void Peer::WaitDelivered() {
  auto& h = Harness::Get();
  h.Settle();
  for (int round = 0; round < 200 && !Delivered(); ++round) h.Settle();
  if (!Delivered()) {
    // Not read (yet): a client that stopped reading, or a kernel slow to deliver; bounded.
    (void)h.RunUntil([this] { return Delivered(); }, std::chrono::milliseconds(200));
  }
}

void Peer::SendAll(std::string_view bytes) {
  auto& h = Harness::Get();
  while (!bytes.empty()) {
    size_t n = Send(bytes);
    bytes.remove_prefix(n);
    if (n == 0) {
      Drain();
      h.Settle();
    }
  }
}

void Peer::SendChunks(std::string_view bytes, size_t chunk) {
  if (chunk == 0) chunk = bytes.size();
  while (!bytes.empty()) {
    const size_t n = std::min(chunk, bytes.size());
    SendAll(bytes.substr(0, n));
    bytes.remove_prefix(n);
    Drain();
    WaitDelivered();
  }
}

void Peer::Drain() {
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) closed_ = true;
    if (n <= 0) return;
    received_.append(buf, static_cast<size_t>(n));
  }
}

void Peer::ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }

class Call::Catcher final : public ClientMessageSink {
 public:
  void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
  void AsyncProcessResponse(SinkStack&, void*, Stream* stream, MethodReturnMessage& msg) override {
    ++completions;
    result = msg;
    if (stream != nullptr) reply = stream->data;
    if (on_complete) on_complete();
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "fuzz-catcher"; }
  int completions = 0;
  MethodReturnMessage result;
  std::string reply;
  std::function<void()> on_complete;

 protected:
  void DoOpen(OpenHandler) override {}
};

Call::Call() : stack_(message_), catcher_(std::make_shared<Catcher>()) {
  message_.SetPayload(&request_);
  message_.SetReplySlot(&reply_);
  stack_.Push(catcher_.get());
}

Call::~Call() = default;

int Call::completions() const { return catcher_->completions; }
const MethodReturnMessage& Call::result() const { return catcher_->result; }
const std::string& Call::reply_at_completion() const { return catcher_->reply; }
void Call::OnComplete(std::function<void()> f) { catcher_->on_complete = std::move(f); }

}  // namespace scales::fuzz
