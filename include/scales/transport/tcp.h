#pragma once
// TcpConnection: a TCP socket plus the connect step every transport needs: name resolution
// (skipped for IP literals), connect with a timeout on the loop's timer queue, TCP_NODELAY.

#include <chrono>
#include <functional>
#include <string>

#include <boost/asio/ip/tcp.hpp>

#include "scales/core/error.h"
#include "scales/core/timer_queue.h"
#include "scales/discovery/endpoint.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

// Thread safety: used on one event loop. The owner keeps itself alive (shared_ptr captured
// in `done`) until the connect completes.
class TcpConnection {
 public:
  TcpConnection(EventLoop& loop, Endpoint endpoint, Duration connect_timeout, const stats::StatsScope& stats);
  ~TcpConnection();
  TcpConnection(const TcpConnection&) = delete;
  TcpConnection& operator=(const TcpConnection&) = delete;

  // Resolves and connects. `done` runs on the loop, never inline, with: success, a
  // kConnectTimeout error, or the system error of the resolve/connect (connection refused,
  // host not found, ...); or operation_aborted if Close() was called meanwhile.
  void AsyncConnect(std::function<void(error_code)> done);
  void Close();

  boost::asio::ip::tcp::socket& socket() noexcept { return socket_; }
  const Endpoint& endpoint() const noexcept { return endpoint_; }
  const std::string& address() const noexcept { return address_; }
  bool connected() const noexcept { return connected_; }

  stats::Counter& bytes_sent() noexcept { return bytes_sent_; }
  stats::Counter& bytes_received() noexcept { return bytes_received_; }

 private:
  void ConnectTo(const boost::asio::ip::tcp::resolver::results_type& results);
  void Finish(error_code ec);
  static void OnTimeout(void* self);

  EventLoop& loop_;
  Endpoint endpoint_;
  std::string address_;
  Duration connect_timeout_;
  boost::asio::ip::tcp::socket socket_;
  boost::asio::ip::tcp::resolver resolver_;
  TimerEntry timer_;
  std::function<void(error_code)> done_;
  TimePoint started_{};
  bool timed_out_ = false;
  bool connected_ = false;
  stats::Counter& connects_;
  stats::Counter& connect_errors_;
  stats::Gauge& connections_;
  stats::Histogram& connect_latency_us_;
  stats::Counter& bytes_sent_;
  stats::Counter& bytes_received_;
};

}  // namespace scales
