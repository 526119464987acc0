#include "support/faulty_http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace scales::test {
namespace {

std::runtime_error SystemError(const std::string& what) {
  return std::runtime_error(fmt::format("FaultyHttpServer: {}: {}", what, std::strerror(errno)));
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool NameIs(std::string_view name, std::string_view expected) {
  return std::equal(name.begin(), name.end(), expected.begin(), expected.end(), [](char a, char b) {
    auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
    return lower(a) == lower(b);
  });
}

// Closes `fd` with an RST instead of a FIN (SO_LINGER with a zero timeout).
void Reset(int fd) {
  linger l{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  ::close(fd);
}

void WriteAll(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the client went away; its call fails on its side
    bytes.remove_prefix(static_cast<size_t>(n));
  }
}

// A request parsed from the front of a connection's buffer.
struct ParsedRequest {
  size_t size = 0;      // bytes it takes in the buffer, body included
  std::string headers;  // "Name: value\n" per header line
  bool close = false;   // the client asked for Connection: close
};

// The first request in `buffer` if it has arrived in full; size 0 if not yet.
ParsedRequest ParseRequest(std::string_view buffer) {
  ParsedRequest req;
  size_t end = buffer.find("\r\n\r\n");
  if (end == std::string_view::npos) return req;
  std::string_view head = buffer.substr(0, end);
  size_t body = 0;
  size_t line_end = head.find("\r\n");  // skips the request line
  while (line_end != std::string_view::npos) {
    size_t start = line_end + 2;
    line_end = head.find("\r\n", start);
    std::string_view line =
        head.substr(start, line_end == std::string_view::npos ? line_end : line_end - start);
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view name = line.substr(0, colon);
    std::string_view value = Trim(line.substr(colon + 1));
    req.headers += fmt::format("{}: {}\n", name, value);
    if (NameIs(name, "content-length")) {
      std::from_chars(value.data(), value.data() + value.size(), body);
    }
    if (NameIs(name, "connection") && NameIs(value, "close")) req.close = true;
  }
  if (buffer.size() < end + 4 + body) return req;  // the body is still coming
  req.size = end + 4 + body;
  return req;
}

}  // namespace

struct FaultyHttpServer::State {
  struct Listener {
    int fd = -1;  // -1 once closed
  };
  struct Conn {
    int fd = -1;  // -1 once closed (removed at the end of the round)
    size_t listener = 0;
    std::string buffer;
  };
  std::vector<Listener> listeners;
  std::vector<Conn> conns;
  bool a_listener_died = false;

  ~State() {
    for (auto& l : listeners) {
      if (l.fd >= 0) ::close(l.fd);
    }
    for (auto& c : conns) {
      if (c.fd >= 0) ::close(c.fd);
    }
  }
};

FaultyHttpServer::FaultyHttpServer(Options options)
    : options_(options), state_(std::make_unique<State>()) {
  if (options_.listeners == 0) throw std::invalid_argument("FaultyHttpServer: no listeners");
  for (size_t i = 0; i < options_.listeners; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw SystemError("socket");
    state_->listeners.push_back({fd});
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) throw SystemError("bind");
    if (::listen(fd, 64) != 0) throw SystemError("listen");
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      throw SystemError("getsockname");
    }
    ports_.push_back(ntohs(addr.sin_port));
  }
  if (::pipe2(wake_, O_CLOEXEC) != 0) throw SystemError("pipe2");
  thread_ = std::thread([this] { Run(); });
}

FaultyHttpServer::~FaultyHttpServer() {
  if (thread_.joinable()) {
    char stop = 0;
    while (::write(wake_[1], &stop, 1) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  for (int fd : wake_) {
    if (fd >= 0) ::close(fd);
  }
}

std::string FaultyHttpServer::endpoint(size_t i) const {
  return fmt::format("127.0.0.1:{}", ports_.at(i));
}

std::string FaultyHttpServer::uri() const {
  std::string uri = "tcp://";
  for (size_t i = 0; i < ports_.size(); ++i) uri += (i > 0 ? "," : "") + endpoint(i);
  return uri;
}

std::vector<std::string> FaultyHttpServer::answered() const {
  std::lock_guard<std::mutex> lock(mu_);
  return answered_;
}

void FaultyHttpServer::Run() {
  State& s = *state_;
  std::vector<pollfd> fds;
  for (;;) {
    // [0] the wake pipe, then the open listeners, then the connections.
    fds.clear();
    fds.push_back({wake_[0], POLLIN, 0});
    std::vector<size_t> listener_of;  // fds index - 1 -> listener index
    for (size_t i = 0; i < s.listeners.size(); ++i) {
      if (s.listeners[i].fd < 0) continue;
      fds.push_back({s.listeners[i].fd, POLLIN, 0});
      listener_of.push_back(i);
    }
    const size_t first_conn = fds.size();
    for (const auto& c : s.conns) fds.push_back({c.fd, POLLIN, 0});
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[0].revents != 0) return;

    for (size_t k = 1; k < first_conn; ++k) {
      if (fds[k].revents == 0) continue;
      int fd = ::accept4(fds[k].fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) s.conns.push_back({fd, listener_of[k - 1], {}});
    }

    const size_t polled_conns = fds.size() - first_conn;  // accepted ones come next round
    for (size_t k = 0; k < polled_conns; ++k) {
      State::Conn& c = s.conns[k];
      if (c.fd < 0 || fds[first_conn + k].revents == 0) continue;  // closed earlier this round
      char buf[16384];
      ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        ::close(c.fd);
        c.fd = -1;
        continue;
      }
      c.buffer.append(buf, static_cast<size_t>(n));
      while (c.fd >= 0) {
        ParsedRequest req = ParseRequest(c.buffer);
        if (req.size == 0) break;
        c.buffer.erase(0, req.size);
        const int number = ++requests_;
        if (options_.reset_from > 0 && number >= options_.reset_from) {
          Reset(c.fd);
          c.fd = -1;
          break;
        }
        const bool dies = options_.first_listener_dies && !s.a_listener_died;
        if (dies) {
          // Gone before the answer leaves: a client that has the answer finds the listener
          // closed (connects refused) and its other connections here reset.
          s.a_listener_died = true;
          State::Listener& l = s.listeners[c.listener];
          ::close(l.fd);
          l.fd = -1;
          for (auto& other : s.conns) {
            if (&other != &c && other.listener == c.listener && other.fd >= 0) {
              Reset(other.fd);
              other.fd = -1;
            }
          }
        }
        const bool close = dies || req.close;
        {
          std::lock_guard<std::mutex> lock(mu_);
          answered_.push_back(req.headers);
        }
        WriteAll(c.fd, fmt::format("HTTP/1.1 200 OK\r\n"
                                   "Content-Type: text/plain\r\n"
                                   "Content-Length: {}\r\n"
                                   "{}"
                                   "\r\n"
                                   "{}",
                                   req.headers.size(), close ? "Connection: close\r\n" : "",
                                   req.headers));
        if (close) {
          ::close(c.fd);
          c.fd = -1;
        }
      }
    }
    std::erase_if(s.conns, [](const State::Conn& c) { return c.fd < 0; });
  }
}

}  // namespace scales::test
