#include "support/zk_frame_relay.h"

#include <array>

#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

namespace scales::test {

struct ZkFrameRelay::Pipe : std::enable_shared_from_this<Pipe> {
  Pipe(ZkFrameRelay& o, tcp::socket c) : owner(o), client(std::move(c)), server(client.get_executor()) {}
  ZkFrameRelay& owner;
  tcp::socket client;
  tcp::socket server;

  void Close() {
    boost::system::error_code ignored;
    client.close(ignored);
    server.close(ignored);
  }
  // Reads from `from`, passes whole frames to `to`; `requests`: the client's side.
  void Relay(tcp::socket& from, tcp::socket& to, bool requests) {
    struct State {
      std::string pending;
      bool handshake_seen = false;
      std::array<char, 65536> buf;
    };
    auto state = std::make_shared<State>();
    auto self = shared_from_this();
    auto loop = std::make_shared<std::function<void()>>();
    *loop = [self, &from, &to, requests, state, loop] {
      from.async_read_some(boost::asio::buffer(state->buf), [self, &to, requests, state, loop](auto ec, size_t n) {
        if (ec) {
          self->Close();
          *loop = nullptr;  // breaks the cycle
          return;
        }
        std::string& pending = state->pending;
        pending.append(state->buf.data(), n);
        std::string out;
        while (pending.size() >= 4) {
          const auto len = static_cast<uint32_t>(Be32(pending, 0));
          if (pending.size() < 4 + len) break;
          std::string frame = pending.substr(0, 4 + len);
          pending.erase(0, 4 + len);
          const bool handshake = !state->handshake_seen;
          state->handshake_seen = true;
          if (!handshake && self->owner.inspector_(frame, requests) == Verdict::kCut) {
            boost::asio::write(to, boost::asio::buffer(out), ec);
            self->Close();
            *loop = nullptr;
            return;
          }
          out += frame;
        }
        boost::asio::write(to, boost::asio::buffer(out), ec);
        (*loop)();
      });
    };
    (*loop)();
  }
};

ZkFrameRelay::ZkFrameRelay(int server_port, Inspector inspector)
    : server_port_(server_port),
      inspector_(std::move(inspector)),
      acceptor_(ioc_, {boost::asio::ip::make_address("127.0.0.1"), 0}) {
  port_ = acceptor_.local_endpoint().port();
  Accept();
  thread_ = std::thread([this] { ioc_.run(); });
}

ZkFrameRelay::~ZkFrameRelay() {
  boost::asio::post(ioc_, [this] {
    acceptor_.close();
    for (auto& weak : pipes_) {
      if (auto p = weak.lock()) p->Close();
    }
  });
  thread_.join();
}

void ZkFrameRelay::SetRefusing(bool refusing) {
  boost::asio::post(ioc_, [this, refusing] {
    refusing_ = refusing;
    if (!refusing) return;
    for (auto& weak : pipes_) {
      if (auto p = weak.lock()) p->Close();
    }
    pipes_.clear();
  });
}

void ZkFrameRelay::Accept() {
  acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket client) {
    if (ec) return;
    if (refusing_) {
      client.close(ec);
      refused_.fetch_add(1);
      Accept();
      return;
    }
    auto pipe = std::make_shared<Pipe>(*this, std::move(client));
    pipe->server.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(server_port_)}, ec);
    if (!ec) {
      std::erase_if(pipes_, [](const auto& weak) { return weak.expired(); });
      pipes_.push_back(pipe);
      pipe->Relay(pipe->client, pipe->server, true);
      pipe->Relay(pipe->server, pipe->client, false);
    }
    Accept();
  });
}

int32_t ZkFrameRelay::Be32(std::string_view f, size_t at) {
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint8_t>(f[at])) << 24 |
                              static_cast<uint32_t>(static_cast<uint8_t>(f[at + 1])) << 16 |
                              static_cast<uint32_t>(static_cast<uint8_t>(f[at + 2])) << 8 |
                              static_cast<uint32_t>(static_cast<uint8_t>(f[at + 3])));
}

void ZkFrameRelay::Put32(std::string& f, size_t at, int32_t value) {
  const auto u = static_cast<uint32_t>(value);
  f[at] = static_cast<char>(u >> 24);
  f[at + 1] = static_cast<char>(u >> 16);
  f[at + 2] = static_cast<char>(u >> 8);
  f[at + 3] = static_cast<char>(u);
}

std::string_view ZkFrameRelay::Path(std::string_view frame) {
  if (frame.size() < 16) return {};
  const int32_t len = Be32(frame, 12);
  if (len <= 0 || frame.size() < 16 + static_cast<size_t>(len)) return {};
  return frame.substr(16, static_cast<size_t>(len));
}

void ZkFrameRelay::MakeError(std::string& reply, int32_t error) {
  if (reply.size() < 20) return;
  reply.resize(20);  // length, xid, zxid (8), err
  Put32(reply, 0, 16);
  Put32(reply, 16, error);
}

}  // namespace scales::test
