// See loopback.h.

#include "loopback.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace scales::fuzz {

void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what);
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

bool Harness::RunUntil(const std::function<bool()>& done) {
  for (int round = 0; round < 2000; ++round) {
    if (done()) return true;
    runtime_.RunUntilIdle();
  }
  return done();
}

int Harness::Accept() {
  int fd = ::accept(listen_fd_, nullptr, nullptr);
  Check(fd >= 0, "accept()");
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

Peer::~Peer() { ::close(fd_); }

size_t Peer::Send(std::string_view bytes) {
  ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  if (n >= 0) return static_cast<size_t>(n);
  return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : bytes.size();
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

void Peer::SendAndClose(std::string_view bytes, bool split) {
  if (split) {
    SendAll(bytes.substr(0, bytes.size() / 2));
    Harness::Get().Settle();
    bytes.remove_prefix(bytes.size() / 2);
  }
  SendAll(bytes);
  ShutdownWrite();
}

void Peer::Drain() {
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n <= 0) return;
    received_.append(buf, static_cast<size_t>(n));
  }
}

void Peer::ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }

class Call::Catcher final : public ClientMessageSink {
 public:
  void AsyncProcessRequest(SinkStack&, MethodCallMessage&, Stream*) override {}
  void AsyncProcessResponse(SinkStack&, void*, Stream*, MethodReturnMessage& msg) override {
    ++completions;
    result = msg;
  }
  void Close() override {}
  SinkStatus status() const override { return SinkStatus::kOpen; }
  std::string_view name() const override { return "fuzz-catcher"; }
  int completions = 0;
  MethodReturnMessage result;

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

}  // namespace scales::fuzz
