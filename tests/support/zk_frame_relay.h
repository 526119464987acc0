#pragma once
// ZkFrameRelay: a TCP relay between ZooKeeper clients and one server that sees whole frames, for
// tests that lose, rewrite or refuse what goes through. Frames are ZooKeeper's: a 4-byte
// big-endian length, then for a request xid, type (1 create, 4 getData, 15 create2, ...) and,
// for the operations on one node, its path (a 4-byte length and the bytes); for a reply xid,
// zxid (8 bytes), err. The first frame of each direction (the session handshake) is passed on
// untouched. One thread of its own; the inspector runs on it.
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace scales::test {

class ZkFrameRelay {
 public:
  enum class Verdict { kPass, kCut };
  // Sees every frame after the handshakes (`request`: from the client), may rewrite it, and
  // says whether to pass it on or to cut that connection here (the frames before it in the same
  // read are passed on).
  using Inspector = std::function<Verdict(std::string& frame, bool request)>;

  ZkFrameRelay(int server_port, Inspector inspector);
  ~ZkFrameRelay();
  ZkFrameRelay(const ZkFrameRelay&) = delete;
  ZkFrameRelay& operator=(const ZkFrameRelay&) = delete;

  int port() const { return port_; }
  // true: cuts every connection, and closes new ones at once until called with false (the
  // client sees connection losses and keeps trying). Any thread.
  void SetRefusing(bool refusing);
  // Connections closed at once while refusing.
  uint64_t refused() const { return refused_; }

  static int32_t Be32(std::string_view frame, size_t at);
  static void Put32(std::string& frame, size_t at, int32_t value);
  // A request's xid and type (0 when the frame is too short).
  static int32_t Xid(std::string_view frame) { return frame.size() >= 12 ? Be32(frame, 4) : 0; }
  static int32_t Type(std::string_view frame) { return frame.size() >= 12 ? Be32(frame, 8) : 0; }
  // The path of a request on one node (create, getData, exists, ...); empty if it has none.
  static std::string_view Path(std::string_view frame);
  // Turns a reply into the error reply `error` to the same request (the header only, as the
  // server sends for a failed operation).
  static void MakeError(std::string& reply, int32_t error);

 private:
  using tcp = boost::asio::ip::tcp;
  struct Pipe;
  void Accept();

  const int server_port_;
  Inspector inspector_;
  boost::asio::io_context ioc_;
  tcp::acceptor acceptor_;
  int port_ = 0;
  bool refusing_ = false;  // relay thread
  std::atomic<uint64_t> refused_{0};
  std::vector<std::weak_ptr<Pipe>> pipes_;  // relay thread
  std::thread thread_;
};

}  // namespace scales::test
