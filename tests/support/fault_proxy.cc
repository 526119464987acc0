#include "support/fault_proxy.h"

#include <algorithm>
#include <array>
#include <future>
#include <optional>
#include <string_view>
#include <utility>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/socket_base.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

namespace scales::test {

// One accepted connection and its upstream one. Everything on the proxy's thread.
struct FaultProxy::Conn : std::enable_shared_from_this<Conn> {
  // One way of the relay: reads from `from`, writes to `to`.
  struct Way {
    Way(tcp::socket& f, tcp::socket& t, uint64_t seed)
        : from(f), to(t), random(seed), timer(f.get_executor()) {}
    tcp::socket& from;
    tcp::socket& to;
    std::mt19937_64 random;
    boost::asio::steady_timer timer;
    std::array<char, 16384> buf{};
    std::string_view pending;      // read, not yet written on
    std::string_view held;         // read past cut_at: written on only if Calm() comes first
    size_t forwarded = 0;          // bytes written on so far
    std::optional<size_t> cut_at;  // cut (or stall) once this many bytes went this way
    bool cut_after_pending = false;
    bool stalled = false;  // reached cut_at with a stall planned: waits for Calm()
    bool split = false;    // the pending chunk goes in pieces
    bool ended = false;    // read its end of stream, passed it on
    int chunks = 0;        // chunks read so far
  };

  Conn(FaultProxy& o, tcp::socket c, const Faults& f, uint64_t seed)
      : owner(o),
        faults(f),
        client(std::move(c)),
        server(client.get_executor()),
        up(client, server, seed),
        down(server, client, seed ^ 0x9e3779b97f4a7c15ULL) {}

  FaultProxy& owner;
  Faults faults;
  tcp::socket client;
  tcp::socket server;
  Way up;    // client -> server
  Way down;  // server -> client
  bool reset = false;
  bool stall = false;  // the planned cut is a stall
  bool closed = false;

  void Plan(std::mt19937_64& random) {
    std::uniform_real_distribution<double> chance(0.0, 1.0);
    if (chance(random) < faults.cut) {
      Way& way = chance(random) < 0.5 ? up : down;
      way.cut_at = std::uniform_int_distribution<size_t>(
          0, std::max<size_t>(faults.cut_within, 1) - 1)(random);
      reset = chance(random) < faults.reset;
      stall = chance(random) < faults.stall;
    }
  }

  void Start(int upstream_port) {
    auto self = shared_from_this();
    server.async_connect(
        {boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(upstream_port)},
        [self](boost::system::error_code ec) {
          if (self->closed) return;
          if (ec) return self->Close();
          self->Pump(self->up);
          self->Pump(self->down);
        });
  }

  void Pump(Way& w) {
    auto self = shared_from_this();
    w.from.async_read_some(
        boost::asio::buffer(w.buf), [self, &w](boost::system::error_code ec, size_t n) {
          if (self->closed) return;
          if (ec == boost::asio::error::eof && !w.cut_at) {
            // Passes the half-close on; the connection ends when both ways did.
            w.ended = true;
            boost::system::error_code ignored;
            w.to.shutdown(tcp::socket::shutdown_send, ignored);
            Way& other = &w == &self->up ? self->down : self->up;
            if (other.ended || other.stalled) self->Close();
            return;
          }
          if (ec) return self->Close();
          size_t take = n;
          w.cut_after_pending = false;
          if (w.cut_at && w.forwarded + n >= *w.cut_at) {
            take = *w.cut_at - w.forwarded;
            w.cut_after_pending = true;
          }
          std::uniform_real_distribution<double> chance(0.0, 1.0);
          const auto alter = [&](size_t at) {
            w.buf[at] =
                static_cast<char>(w.buf[at] ^ std::uniform_int_distribution<int>(1, 255)(w.random));
            self->owner.corruptions_.fetch_add(1);
          };
          const double corrupt =
              &w == &self->down ? self->faults.corrupt : self->faults.corrupt_requests;
          if (take > 0 && corrupt > 0 && chance(w.random) < corrupt) {
            alter(std::uniform_int_distribution<size_t>(0, take - 1)(w.random));
          }
          const auto& at = self->faults.corrupt_server_byte;
          if (&w == &self->down && at && *at >= w.forwarded && *at < w.forwarded + take) {
            alter(*at - w.forwarded);
          }
          if (&w == &self->up && ++w.chunks == self->faults.corrupt_client_chunk_end && take > 0) {
            alter(take - 1);
          }
          w.pending = std::string_view(w.buf.data(), take);
          w.held = std::string_view(w.buf.data() + take, n - take);
          w.split = chance(w.random) < self->faults.split;
          self->WritePiece(w);
        });
  }

  void WritePiece(Way& w) {
    if (w.pending.empty()) {
      if (w.cut_after_pending && stall) {
        owner.stalls_.fetch_add(1);
        w.stalled = true;  // reads nothing more until Calm()
        return;
      }
      if (w.cut_after_pending) {
        owner.cuts_.fetch_add(1);
        return Close();
      }
      if (!w.held.empty()) {
        // Calm() came before the cut: the rest of the chunk goes on, so no byte is skipped.
        w.pending = std::exchange(w.held, {});
        return WritePiece(w);
      }
      return Pump(w);
    }
    const size_t piece =
        w.split ? std::min(w.pending.size(), std::uniform_int_distribution<size_t>(1, 64)(w.random))
                : w.pending.size();
    auto self = shared_from_this();
    boost::asio::async_write(w.to, boost::asio::buffer(w.pending.data(), piece),
                             [self, &w, piece](boost::system::error_code ec, size_t) {
                               if (self->closed) return;
                               if (ec) return self->Close();
                               w.forwarded += piece;
                               w.pending.remove_prefix(piece);
                               const auto pause = self->faults.pause.count();
                               if (!w.split || w.pending.empty() || pause <= 0)
                                 return self->WritePiece(w);
                               w.timer.expires_after(std::chrono::microseconds(
                                   std::uniform_int_distribution<int64_t>(0, pause)(w.random)));
                               w.timer.async_wait([self, &w](boost::system::error_code) {
                                 if (!self->closed) self->WritePiece(w);
                               });
                             });
  }

  // Relays faithfully from now on.
  void Calm() {
    faults = Faults{};
    for (Way* w : {&up, &down}) {
      w->cut_at.reset();
      w->cut_after_pending = false;
      w->split = false;
      if (w->stalled && !closed) {
        w->stalled = false;
        WritePiece(*w);  // what it held back, then on reading
      }
    }
  }

  void Close() {
    if (closed) return;
    closed = true;
    boost::system::error_code ignored;
    if (reset) {
      client.set_option(boost::asio::socket_base::linger(true, 0), ignored);
      server.set_option(boost::asio::socket_base::linger(true, 0), ignored);
    }
    client.close(ignored);
    server.close(ignored);
    up.timer.cancel();
    down.timer.cancel();
  }
};

FaultProxy::FaultProxy(int upstream_port, uint64_t seed)
    : upstream_port_(upstream_port),
      acceptor_(ioc_, {boost::asio::ip::make_address("127.0.0.1"), 0}),
      random_(seed) {
  port_ = acceptor_.local_endpoint().port();
  Accept();
  thread_ = std::thread([this] { ioc_.run(); });
}

FaultProxy::~FaultProxy() {
  boost::asio::post(ioc_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    for (auto& weak : conns_) {
      if (auto c = weak.lock()) c->Close();
    }
  });
  thread_.join();
}

void FaultProxy::SetFaults(const Faults& faults) {
  std::lock_guard lock(mu_);
  faults_ = faults;
}

void FaultProxy::Calm() {
  SetFaults(Faults{});
  std::promise<void> calmed;
  boost::asio::post(ioc_, [this, &calmed] {
    for (auto& weak : conns_) {
      if (auto c = weak.lock()) c->Calm();
    }
    calmed.set_value();
  });
  calmed.get_future().wait();
}

void FaultProxy::Accept() {
  acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket client) {
    if (ec == boost::asio::error::operation_aborted || !acceptor_.is_open()) return;
    if (!ec) {
      Faults faults;
      {
        std::lock_guard lock(mu_);
        faults = faults_;
      }
      connections_.fetch_add(1);
      auto conn = std::make_shared<Conn>(*this, std::move(client), faults, random_());
      conn->Plan(random_);
      std::erase_if(conns_, [](const auto& weak) { return weak.expired(); });
      conns_.push_back(conn);
      conn->Start(upstream_port_);
    }
    Accept();
  });
}

}  // namespace scales::test
