// `scales testserver thriftmux`: the Echo service (tools/echo.thrift) over Mux, for the demo
// and the benchmarks: a fast local ThriftMux server. (The integration tests use the Python
// reference server, written independently of our codec; this one reuses the codec.)
//
//   echo(m)   -> m; echo("drain") also sends Tdrain after the reply and closes once drained
//   ping()    -> (void)
//   fail(m)   -> throws EchoError(m)
//   sleep(ms) -> answers ms as text after ms milliseconds (without blocking other calls)
//
// Handles the "tinit check" probe and Tinit/Rinit (advertising --framer as mux-framer and
// fragmenting its replies to the client's mux-framer), Tping, Tdiscarded (answered with
// Rdiscarded), and pings the client every --ping-interval ms when asked to. Prints
// `listening 127.0.0.1:<port>` once ready; SIGTERM or SIGINT ends it.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/transport/TBufferTransports.h>

#include "Echo.h"
#include "cli_util.h"
#include "commands.h"
#include "scales/mux/codec.h"

namespace scales::tools {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using apache::thrift::protocol::TBinaryProtocol;
using apache::thrift::transport::TMemoryBuffer;

class EchoHandler final : public scales::echo::EchoIf {
 public:
  void echo(std::string& r, const std::string& message) override { r = message; }
  void ping() override {}
  void fail(std::string&, const std::string& message) override {
    scales::echo::EchoError e;
    e.message = message;
    throw e;
  }
  void sleep(std::string& r, int32_t millis) override { r = std::to_string(millis); }  // async: see below
};

struct ServerConfig {
  uint32_t framer = mux::kUnlimitedFragmentSize;
  int ping_interval_ms = 0;
};

// Runs the generated processor over the payload; returns the reply (empty for oneway).
std::string Process(const std::string& payload) {
  static thread_local auto handler = std::make_shared<EchoHandler>();
  static thread_local scales::echo::EchoProcessor processor(handler);
  auto in = std::make_shared<TMemoryBuffer>(reinterpret_cast<uint8_t*>(const_cast<char*>(payload.data())),
                                            static_cast<uint32_t>(payload.size()));
  auto out = std::make_shared<TMemoryBuffer>();
  auto iprot = std::make_shared<TBinaryProtocol>(in);
  auto oprot = std::make_shared<TBinaryProtocol>(out);
  processor.process(iprot, oprot, nullptr);
  return out->getBufferAsString();
}

// The sleep(ms) argument, if `payload` is a sleep call.
std::optional<int32_t> SleepMillis(const std::string& payload) {
  auto in = std::make_shared<TMemoryBuffer>(reinterpret_cast<uint8_t*>(const_cast<char*>(payload.data())),
                                            static_cast<uint32_t>(payload.size()));
  TBinaryProtocol prot(in);
  std::string name;
  apache::thrift::protocol::TMessageType type;
  int32_t seqid;
  try {
    prot.readMessageBegin(name, type, seqid);
    if (name != "sleep") return std::nullopt;
    scales::echo::Echo_sleep_args args;
    args.read(&prot);
    return args.millis;
  } catch (...) {
    return std::nullopt;
  }
}

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, const ServerConfig& config)
      : socket_(std::move(socket)), config_(config), ping_timer_(socket_.get_executor()) {}

  void Start() {
    boost::system::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    Read();
    if (config_.ping_interval_ms > 0) SchedulePing();
  }

 private:
  void Read() {
    socket_.async_read_some(asio::buffer(buf_), [self = shared_from_this()](boost::system::error_code ec, size_t n) {
      if (ec) return self->Shutdown();
      self->decoder_.Feed(self->buf_.data(), n);
      for (;;) {
        auto next = self->decoder_.Next();
        if (!next || !next->has_value()) {
          if (!next) return self->Shutdown();
          break;
        }
        self->OnFrame(std::move(**next));
        if (self->closed_) return;
      }
      self->Read();
    });
  }

  void OnFrame(mux::Frame frame) {
    if (first_frame_) {
      first_frame_ = false;
      if (frame.tag == mux::kControlTag && !frame.fragment &&
          (frame.type == mux::wire::kRerr || frame.type == mux::wire::kRerrLegacy) && frame.body == mux::kProbeText) {
        Send(mux::ProbeMessage());  // echo the probe: we negotiate
        return;
      }
    }
    auto whole = reassembler_.Add(std::move(frame));
    if (!whole) return Shutdown();
    if (!whole->has_value()) return;
    auto msg = mux::DecodeMessage(**whole);
    if (!msg) return Shutdown();
    std::visit([this](auto& m) { Handle(m); }, *msg);
  }

  void Handle(mux::Tinit& t) {
    if (const std::string* f = mux::FindInitHeader(t.headers, mux::kMuxFramerHeader)) {
      if (auto v = mux::DecodeMuxFramer(*f); v && *v > 0) peer_framer_ = static_cast<uint32_t>(*v);
    }
    mux::Rinit r;
    r.headers.emplace_back(std::string(mux::kMuxFramerHeader), mux::EncodeMuxFramer(static_cast<int32_t>(config_.framer)));
    r.headers.emplace_back(std::string(mux::kTlsHeader), "off");
    Send(r);
  }
  void Handle(mux::Tping& t) { Send(mux::Rping{t.tag}); }
  void Handle(mux::Tdiscarded& d) {
    if (pending_.erase(d.which) > 0) Send(mux::Rdiscarded{d.which});
  }
  void Handle(mux::Rdrain&) {
    drained_ack_ = true;
    MaybeClose();
  }
  void Handle(mux::Tdispatch& d) {
    pending_[d.tag] = true;
    if (auto ms = SleepMillis(d.payload); ms && *ms > 0) {
      auto timer = std::make_shared<asio::steady_timer>(socket_.get_executor(), std::chrono::milliseconds(*ms));
      timer->async_wait([self = shared_from_this(), timer, tag = d.tag, payload = std::move(d.payload)](boost::system::error_code) {
        self->Reply(tag, payload);
      });
      return;
    }
    Reply(d.tag, d.payload);
  }
  template <class M>
  void Handle(M&) {}  // Rping and the rest: nothing to do

  void Reply(uint32_t tag, const std::string& payload) {
    auto it = pending_.find(tag);
    if (it == pending_.end()) return;  // discarded meanwhile
    pending_.erase(it);
    std::string reply = Process(payload);
    mux::Rdispatch r;
    r.tag = tag;
    r.body = std::move(reply);
    std::string out;
    (void)mux::EncodeFragmented(r, peer_framer_, &out);
    Write(std::move(out));
    if (!drain_sent_ && payload.find("drain") != std::string::npos && payload.find("echo") != std::string::npos) {
      drain_sent_ = true;
      Send(mux::Tdrain{mux::kControlTag});
    }
    MaybeClose();
  }

  void MaybeClose() {
    if (drain_sent_ && drained_ack_ && pending_.empty()) {
      closing_ = true;
      if (queue_.empty() && !writing_) Shutdown();
    }
  }

  void SchedulePing() {
    ping_timer_.expires_after(std::chrono::milliseconds(config_.ping_interval_ms));
    ping_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec || self->closed_) return;
      self->Send(mux::Tping{mux::kControlTag});
      self->SchedulePing();
    });
  }

  void Send(const mux::Message& m) {
    std::string out;
    (void)mux::EncodeMessage(m, &out);
    Write(std::move(out));
  }
  void Write(std::string bytes) {
    queue_.push_back(std::move(bytes));
    if (!writing_) WriteNext();
  }
  void WriteNext() {
    if (queue_.empty()) {
      if (closing_) Shutdown();
      return;
    }
    writing_ = true;
    current_.clear();
    while (!queue_.empty()) {  // batch everything queued into one write
      current_ += queue_.front();
      queue_.pop_front();
    }
    asio::async_write(socket_, asio::buffer(current_), [self = shared_from_this()](boost::system::error_code ec, size_t) {
      self->writing_ = false;
      if (ec) return self->Shutdown();
      self->WriteNext();
    });
  }
  void Shutdown() {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    ping_timer_.cancel();
    socket_.close(ignored);
  }

  tcp::socket socket_;
  const ServerConfig& config_;
  asio::steady_timer ping_timer_;
  std::array<char, 64 * 1024> buf_{};
  mux::FrameDecoder decoder_;
  mux::Reassembler reassembler_;
  std::unordered_map<uint32_t, bool> pending_;
  std::deque<std::string> queue_;
  std::string current_;
  uint32_t peer_framer_ = mux::kUnlimitedFragmentSize;
  bool first_frame_ = true;
  bool writing_ = false;
  bool closed_ = false;
  bool closing_ = false;
  bool drain_sent_ = false;
  bool drained_ack_ = false;
};

void Accept(tcp::acceptor& acceptor, const ServerConfig& config) {
  acceptor.async_accept(asio::make_strand(acceptor.get_executor()), [&acceptor, &config](boost::system::error_code ec, tcp::socket s) {
    if (ec) return;
    std::make_shared<Connection>(std::move(s), config)->Start();
    Accept(acceptor, config);
  });
}

int Usage(std::FILE* out) {
  std::fputs(
      "usage: scales testserver thriftmux [--port P] [--threads N] [--framer BYTES] [--ping-interval MS]\n"
      "  serves the Echo service (tools/echo.thrift) over Mux on 127.0.0.1; prints\n"
      "  'listening 127.0.0.1:<port>' once ready. echo(\"drain\") makes it drain the session.\n",
      out);
  return out == stdout ? 0 : 2;
}

}  // namespace

int RunThriftMuxTestServerCommand(int argc, char** argv) {
  // argv[0] == "testserver", argv[1] == "thriftmux"
  int port = 0;
  int threads = 1;
  ServerConfig config;
  if (HelpAnywhere(argc, argv)) return Usage(stdout);
  for (int i = 2; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (!arg.starts_with("-")) {
      std::fprintf(stderr, "scales testserver thriftmux: unexpected argument '%s' (only options)\n", argv[i]);
      return Usage(stderr);
    }
    if (i + 1 >= argc) return Usage(stderr);
    const std::string_view value = argv[++i];
    if (auto v = ParseIntInRange(value, 0, 65535); arg == "--port" && v) {
      port = static_cast<int>(*v);
    } else if (auto t = ParseIntInRange(value, 1, 64); arg == "--threads" && t) {
      threads = static_cast<int>(*t);
    } else if (auto f = ParseIntInRange(value, 1, INT64_MAX); arg == "--framer" && f) {
      config.framer = static_cast<uint32_t>(std::min<long long>(*f, mux::kUnlimitedFragmentSize));
    } else if (auto p = ParseIntInRange(value, 0, INT32_MAX); arg == "--ping-interval" && p) {
      config.ping_interval_ms = static_cast<int>(*p);
    } else {
      return Usage(stderr);
    }
  }
  try {
    asio::io_context ioc(threads);
    tcp::acceptor acceptor(ioc);
    tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port));
    acceptor.open(ep.protocol());
    acceptor.set_option(tcp::acceptor::reuse_address(true));
    acceptor.bind(ep);
    acceptor.listen();
    asio::signal_set signals(ioc, SIGINT, SIGTERM);
    signals.async_wait([&](boost::system::error_code, int) { ioc.stop(); });
    Accept(acceptor, config);
    std::printf("listening 127.0.0.1:%d\n", acceptor.local_endpoint().port());
    std::fflush(stdout);
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) pool.emplace_back([&] { ioc.run(); });
    ioc.run();
    for (auto& t : pool) t.join();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scales testserver thriftmux: %s\n", e.what());
    return 2;
  }
}

}  // namespace scales::tools
