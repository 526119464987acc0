#include "scales/transport/tcp.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>

#include "scales/core/runtime.h"

namespace scales {

namespace asio = boost::asio;
using asio::ip::tcp;

TcpConnection::TcpConnection(EventLoop& loop, Endpoint endpoint, Duration connect_timeout,
                             const stats::StatsScope& stats)
    : loop_(loop),
      endpoint_(std::move(endpoint)),
      address_(endpoint_.ToString()),
      connect_timeout_(connect_timeout),
      socket_(loop.executor()),
      resolver_(loop.executor()),
      connects_(stats.GetCounter("scales_connects")),
      connect_errors_(stats.GetCounter("scales_connect_errors")),
      connections_(stats.GetGauge("scales_connections")),
      connect_latency_us_(stats.GetHistogram("scales_connect_latency_us")),
      bytes_sent_(stats.GetCounter("scales_bytes_sent")),
      bytes_received_(stats.GetCounter("scales_bytes_received")) {}

TcpConnection::~TcpConnection() {
  if (connected_) connections_.Add(-1);
}

void TcpConnection::AsyncConnect(std::function<void(error_code)> done) {
  done_ = std::move(done);
  started_ = loop_.Now();
  timed_out_ = false;
  if (connect_timeout_ > Duration::zero()) {
    loop_.timers().Schedule(timer_, started_ + connect_timeout_, &OnTimeout, this);
  }
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(endpoint_.host, ec);
  if (!ec) {
    tcp::endpoint ep(addr, endpoint_.port);
    socket_.async_connect(ep, [this](const boost::system::error_code& e) { Finish(e); });
    return;
  }
  resolver_.async_resolve(endpoint_.host, std::to_string(endpoint_.port),
                          [this](const boost::system::error_code& e, tcp::resolver::results_type results) {
                            if (e) {
                              Finish(e);
                              return;
                            }
                            ConnectTo(results);
                          });
}

void TcpConnection::ConnectTo(const tcp::resolver::results_type& results) {
  asio::async_connect(socket_, results,
                      [this](const boost::system::error_code& e, const tcp::endpoint&) { Finish(e); });
}

void TcpConnection::OnTimeout(void* self) {
  auto* c = static_cast<TcpConnection*>(self);
  c->timed_out_ = true;
  c->resolver_.cancel();
  boost::system::error_code ignored;
  c->socket_.close(ignored);
}

void TcpConnection::Finish(error_code ec) {
  timer_.Cancel();
  if (!done_) return;
  if (timed_out_) ec = make_error_code(Errc::kConnectTimeout);
  if (!ec) {
    boost::system::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    connected_ = true;
    connects_.Increment();
    connections_.Add(1);
    connect_latency_us_.Record(
        std::chrono::duration_cast<std::chrono::microseconds>(loop_.Now() - started_).count());
  } else if (ec != boost::asio::error::operation_aborted) {
    connect_errors_.Increment();  // not counted: connects cut short by Close()
  }
  auto done = std::move(done_);
  done_ = nullptr;
  done(ec);
}

void TcpConnection::Close() {
  timer_.Cancel();
  resolver_.cancel();
  boost::system::error_code ignored;
  if (socket_.is_open()) {
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }
  if (connected_) {
    connected_ = false;
    connections_.Add(-1);
  }
}

}  // namespace scales
