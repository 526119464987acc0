#pragma once
// FaultProxy: a TCP proxy on 127.0.0.1 in front of a real server that breaks connections on
// purpose, for tests that check every call completes exactly once, with its own reply, when
// connections fail at any byte. Each connection it accepts gets a plan drawn from a seeded
// generator: relay faithfully, or cut the connection once a chosen number of bytes went one way
// (either way, at any offset below Faults::cut_within: mid-handshake, mid-frame, between two
// messages), with a FIN or a reset, or stall that way there (a connection that stays open and
// carries nothing, as across a network partition); and, for any chunk read, whether to deliver it
// in small pieces with pauses between them (so the client's parsers see every split). Bytes are
// not altered (what arrives is a prefix of what was sent) unless Faults::corrupt,
// corrupt_requests, corrupt_server_byte or corrupt_client_chunk_end asks for it.
// One thread of its own (Asio).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace scales::test {

class FaultProxy {
 public:
  struct Faults {
    // Chance that a new connection is cut, after a number of bytes below `cut_within` has gone
    // one way (the way chosen at random).
    double cut = 0;
    size_t cut_within = 4096;
    // Chance that a cut resets the connection (RST both ways) rather than closing it (FIN).
    double reset = 0.5;
    // Chance that a planned cut is a stall instead: that way stops relaying at the chosen byte
    // (the connection stays open, the bytes wait in the socket) until Calm().
    double stall = 0;
    // Chance that a chunk read from either side is written on in pieces of 1 to 64 bytes, with
    // a pause of up to `pause` between two pieces.
    double split = 0;
    std::chrono::microseconds pause{0};
    // Chance that a chunk read from the server has one byte altered (XORed with a random
    // non-zero value) before it goes on to the client: a peer or a middlebox that sends garbage
    // mid-stream.
    double corrupt = 0;
    // The same for a chunk read from the client, before it goes on to the server: requests
    // altered on the way (the server answers what it got, or refuses it).
    double corrupt_requests = 0;
    // On every connection, the byte at this offset of the server's stream is altered: one place
    // that is the same on each connection (with TLS, inside the server's first flight).
    std::optional<uint64_t> corrupt_server_byte;
    // On every connection, the last byte of the n-th chunk (from 1; 0: none) read from the
    // client is altered: the end of one of its writes when the server answers each before the
    // next (with TLS, the tag of the last record of a handshake flight).
    int corrupt_client_chunk_end = 0;
  };

  // Relays to 127.0.0.1:upstream_port; the plans come from `seed`.
  FaultProxy(int upstream_port, uint64_t seed);
  ~FaultProxy();
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  int port() const { return port_; }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }
  // For the connections accepted from now on (those open keep their plans). Any thread.
  void SetFaults(const Faults& faults);
  // No more faults, on new connections nor on those open (their plans are dropped, stalled
  // ways relay again); returns once that holds. Any thread but the proxy's.
  void Calm();
  // Connections accepted, and connections cut or stalled as planned (it happened), so far.
  int64_t connections() const { return connections_.load(); }
  int64_t cuts() const { return cuts_.load(); }
  int64_t stalls() const { return stalls_.load(); }
  // Bytes altered so far (Faults::corrupt, corrupt_requests, corrupt_server_byte,
  // corrupt_client_chunk_end).
  int64_t corruptions() const { return corruptions_.load(); }

 private:
  using tcp = boost::asio::ip::tcp;
  struct Conn;
  void Accept();

  const int upstream_port_;
  boost::asio::io_context ioc_;
  tcp::acceptor acceptor_;
  int port_ = 0;
  std::mt19937_64 random_;  // proxy thread
  mutable std::mutex mu_;
  Faults faults_;                           // guarded by mu_
  std::vector<std::weak_ptr<Conn>> conns_;  // proxy thread
  std::atomic<int64_t> connections_{0};
  std::atomic<int64_t> cuts_{0};
  std::atomic<int64_t> stalls_{0};
  std::atomic<int64_t> corruptions_{0};
  std::thread thread_;
};

}  // namespace scales::test
