// `scales testserver http`: a small HTTP/1.1 server for the demo and the integration tests.
//
// It behaves like a well-mannered keep-alive server on ordinary paths and misbehaves on purpose
// on a few special ones (/close-mid-response, /garbage, /close), so that client behaviour on
// broken peers can be tested against a real socket. Every response names the server
// (`X-Server`) and the ordinal of the TCP connection that carried it (`X-Connection`), which
// lets tests observe load balancing and connection reuse from the outside.
//
// On start it prints exactly one line, `listening <host>:<port>`, with the real bound port, and
// flushes stdout: fixtures start it with --port 0 and read the port from that line.
#include <atomic>
#include <charconv>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "cli_util.h"
#include "commands.h"
#include "scales/discovery/zookeeper.h"

namespace scales::tools {
namespace {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

// Request bodies are echoed, so allow bodies large enough for transfer tests.
constexpr std::uint64_t kMaxRequestBody = 64ull * 1024 * 1024;
constexpr std::uint64_t kMaxBigBody = 256ull * 1024 * 1024;
constexpr std::uint64_t kMaxChunks = 1'000'000;
constexpr std::uint64_t kMaxDelayMs = 10ull * 60 * 1000;

struct Options {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string name;
  int threads = 1;
  std::string announce;  // zk:// URI to register in (empty: none)
};

// Shared by all connections; the counter is the only mutable part.
struct ServerState {
  std::string name;
  std::atomic<std::uint64_t> accepted{0};
};

// What a session needs to build a response.
struct ConnectionContext {
  ServerState* state;
  std::uint64_t ordinal;
};

void PrintUsage(std::FILE* out) {
  std::fputs(
      "usage: scales testserver http [--port P] [--host H] [--name NAME] [--threads N]\n"
      "  --port P     port to listen on; 0 (default) picks a free port\n"
      "  --host H     address to listen on (default 127.0.0.1)\n"
      "  --name NAME  server name in bodies and X-Server (default server-<port>)\n"
      "  --threads N  I/O threads (default 1)\n"
      "  --announce zk://HOST:PORT/PATH  register in a ZooKeeper server set while running\n"
      "prints 'listening <host>:<port>' once bound. Paths: /delay/MS, /status/N,\n"
      "/close-mid-response, /garbage, /big/N, /chunked/N, /close, /headers, /connections.\n",
      out);
}

std::optional<std::uint64_t> ParseUnsigned(std::string_view text) {
  std::uint64_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return value;
}

// Returns false (after printing why) when the command line is unusable.
bool ParseOptions(int argc, char** argv, Options& options, bool& help) {
  help = HelpAnywhere(argc, argv);  // wins over an error earlier on the line
  if (help) return true;
  if (argc < 2) {
    std::fputs("scales testserver: missing protocol (http, thrift or thriftmux)\n", stderr);
    return false;
  }
  if (std::string_view(argv[1]) != "http") {
    std::fprintf(stderr, "scales testserver: unsupported protocol '%s' (only 'http')\n", argv[1]);
    return false;
  }
  for (int i = 2; i < argc; ++i) {
    std::string_view arg = argv[i];
    std::string_view key = arg;
    std::optional<std::string_view> value;
    if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      key = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[i + 1];
    }
    if (!arg.starts_with("-")) {
      std::fprintf(stderr, "scales testserver: unexpected argument '%s' (only options)\n", argv[i]);
      return false;
    }
    if (key != "--port" && key != "--host" && key != "--name" && key != "--threads" &&
        key != "--announce") {
      std::fprintf(stderr, "scales testserver: unknown option '%s'\n", argv[i]);
      return false;
    }
    if (!value) {
      std::fprintf(stderr, "scales testserver: option %s needs a value\n", argv[i]);
      return false;
    }
    if (key == arg) ++i;  // The value was the next argument.
    if (key == "--host") {
      options.host = std::string(*value);
    } else if (key == "--name") {
      options.name = std::string(*value);
    } else if (key == "--announce") {
      options.announce = std::string(*value);
    } else {
      auto number = ParseUnsigned(*value);
      std::uint64_t max = key == "--port" ? 65535 : 1024;
      std::uint64_t min = key == "--port" ? 0 : 1;
      if (!number || *number < min || *number > max) {
        std::fprintf(stderr, "scales testserver: bad value '%.*s' for %.*s\n",
                     static_cast<int>(value->size()), value->data(), static_cast<int>(key.size()),
                     key.data());
        return false;
      }
      (key == "--port" ? options.port : options.threads) = static_cast<int>(*number);
    }
  }
  return true;
}

std::string FormatEndpoint(const tcp::endpoint& endpoint) {
  auto address = endpoint.address();
  if (address.is_v6()) return fmt::format("[{}]:{}", address.to_string(), endpoint.port());
  return fmt::format("{}:{}", address.to_string(), endpoint.port());
}

// Status codes that must not carry a body (RFC 9110 6.4.1).
bool StatusForbidsBody(unsigned status) { return status < 200 || status == 204 || status == 304; }

void SetCommonHeaders(http::fields& fields, const ConnectionContext& ctx) {
  fields.set(http::field::server, "scales-testserver");
  fields.set("X-Server", ctx.state->name);
  fields.set("X-Connection", std::to_string(ctx.ordinal));
}

Response MakeResponse(const Request& req, unsigned status, std::string body,
                      const ConnectionContext& ctx) {
  Response res;
  res.version(req.version());
  res.result(status);
  SetCommonHeaders(res, ctx);
  res.set(http::field::content_type, "text/plain");
  res.keep_alive(req.keep_alive());
  if (!StatusForbidsBody(status)) res.body() = std::move(body);
  res.prepare_payload();
  if (StatusForbidsBody(status)) res.erase(http::field::content_length);
  // A response to HEAD announces the length of the GET body but sends none.
  if (req.method() == http::verb::head) res.body().clear();
  return res;
}

// The answer for a path without special behaviour, chosen by method.
Response DefaultResponse(Request& req, const ConnectionContext& ctx) {
  const std::string& name = ctx.state->name;
  switch (req.method()) {
    case http::verb::get:
    case http::verb::head:
      return MakeResponse(req, 200, fmt::format("hello from {}\n", name), ctx);
    case http::verb::post:
    case http::verb::put:
    case http::verb::patch: {
      std::string content_type(req[http::field::content_type]);
      Response res = MakeResponse(req, 200, std::move(req.body()), ctx);
      if (!content_type.empty()) res.set(http::field::content_type, content_type);
      return res;
    }
    case http::verb::delete_:
      return MakeResponse(req, 200, fmt::format("deleted by {}\n", name), ctx);
    case http::verb::options: {
      Response res = MakeResponse(req, 200, fmt::format("options from {}\n", name), ctx);
      res.set(http::field::allow, "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");
      return res;
    }
    default: {
      Response res = MakeResponse(req, 405, "method not allowed\n", ctx);
      res.set(http::field::allow, "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");
      return res;
    }
  }
}

// If `path` is `prefix` followed by a decimal number, returns the number.
std::optional<std::uint64_t> NumberAfter(std::string_view path, std::string_view prefix) {
  if (!path.starts_with(prefix)) return std::nullopt;
  return ParseUnsigned(path.substr(prefix.size()));
}

using Token = asio::as_tuple_t<asio::use_awaitable_t<>>;
constexpr Token kToken{};

// Writes `bytes` as they are and closes the connection: for peers that break the protocol.
asio::awaitable<void> WriteRawAndClose(tcp::socket& socket, std::string bytes) {
  co_await asio::async_write(socket, asio::buffer(bytes), kToken);
  boost::system::error_code ignored;
  socket.shutdown(tcp::socket::shutdown_both, ignored);
  socket.close(ignored);
}

// Writes `res`; returns whether the connection may carry another request.
asio::awaitable<bool> WriteResponse(tcp::socket& socket, Response& res) {
  auto [ec, written] = co_await http::async_write(socket, res, kToken);
  co_return !ec && res.keep_alive();
}

asio::awaitable<bool> WriteChunked(tcp::socket& socket, const Request& req, std::uint64_t chunks,
                                   const ConnectionContext& ctx) {
  std::vector<std::string> pieces;
  pieces.reserve(chunks);
  for (std::uint64_t i = 0; i < chunks; ++i) pieces.push_back(fmt::format("chunk-{}\n", i));
  if (req.version() < 11) {
    // HTTP/1.0 has no chunked coding: send the same bytes with a length.
    std::string body;
    for (const auto& piece : pieces) body += piece;
    Response res = MakeResponse(req, 200, std::move(body), ctx);
    co_return co_await WriteResponse(socket, res);
  }
  http::response<http::empty_body> res{http::status::ok, req.version()};
  SetCommonHeaders(res, ctx);
  res.set(http::field::content_type, "text/plain");
  res.keep_alive(req.keep_alive());
  res.chunked(true);
  http::response_serializer<http::empty_body> serializer{res};
  auto [ec, n] = co_await http::async_write_header(socket, serializer, kToken);
  if (ec) co_return false;
  if (req.method() != http::verb::head) {
    for (const auto& piece : pieces) {
      auto [chunk_ec, chunk_n] =
          co_await asio::async_write(socket, http::make_chunk(asio::buffer(piece)), kToken);
      if (chunk_ec) co_return false;
    }
    auto [last_ec, last_n] = co_await asio::async_write(socket, http::make_chunk_last(), kToken);
    if (last_ec) co_return false;
  }
  co_return res.keep_alive();
}

// Answers one request; returns whether the connection may carry another one.
asio::awaitable<bool> HandleRequest(tcp::socket& socket, Request& req,
                                    const ConnectionContext& ctx) {
  std::string_view target = req.target();
  std::string_view path = target.substr(0, target.find('?'));
  const std::string& name = ctx.state->name;

  if (path.starts_with("/delay/")) {
    auto ms = NumberAfter(path, "/delay/");
    if (!ms || *ms > kMaxDelayMs) {
      Response res = MakeResponse(req, 400, "bad delay\n", ctx);
      co_return co_await WriteResponse(socket, res);
    }
    asio::steady_timer timer{socket.get_executor(), std::chrono::milliseconds(*ms)};
    co_await timer.async_wait(kToken);
    Response res = DefaultResponse(req, ctx);
    co_return co_await WriteResponse(socket, res);
  }
  if (path.starts_with("/status/")) {
    auto status = NumberAfter(path, "/status/");
    Response res = status && *status >= 100 && *status <= 999
                       ? MakeResponse(req, static_cast<unsigned>(*status),
                                      fmt::format("status {}\n", *status), ctx)
                       : MakeResponse(req, 400, "bad status\n", ctx);
    co_return co_await WriteResponse(socket, res);
  }
  if (path == "/close-mid-response") {
    co_await WriteRawAndClose(socket, fmt::format("HTTP/1.1 200 OK\r\n"
                                                  "Content-Type: text/plain\r\n"
                                                  "Content-Length: 100\r\n"
                                                  "X-Server: {}\r\n"
                                                  "X-Connection: {}\r\n"
                                                  "\r\n"
                                                  "0123456789",
                                                  name, ctx.ordinal));
    co_return false;
  }
  if (path == "/garbage") {
    co_await WriteRawAndClose(socket, "this is not http\r\n\r\n");
    co_return false;
  }
  if (path.starts_with("/big/")) {
    auto size = NumberAfter(path, "/big/");
    Response res = size && *size <= kMaxBigBody
                       ? MakeResponse(req, 200, std::string(*size, 'x'), ctx)
                       : MakeResponse(req, 400, "bad size\n", ctx);
    co_return co_await WriteResponse(socket, res);
  }
  if (path.starts_with("/chunked/")) {
    auto chunks = NumberAfter(path, "/chunked/");
    if (!chunks || *chunks > kMaxChunks) {
      Response res = MakeResponse(req, 400, "bad chunk count\n", ctx);
      co_return co_await WriteResponse(socket, res);
    }
    co_return co_await WriteChunked(socket, req, *chunks, ctx);
  }
  if (path == "/close") {
    Response res = MakeResponse(req, 200, fmt::format("closing from {}\n", name), ctx);
    res.keep_alive(false);
    co_await WriteResponse(socket, res);
    co_return false;
  }
  if (path == "/headers") {
    std::string body;
    for (const auto& field : req)
      body += fmt::format("{}: {}\n", field.name_string(), field.value());
    Response res = MakeResponse(req, 200, std::move(body), ctx);
    co_return co_await WriteResponse(socket, res);
  }
  if (path == "/connections") {
    Response res = MakeResponse(req, 200, std::to_string(ctx.state->accepted.load()), ctx);
    co_return co_await WriteResponse(socket, res);
  }
  Response res = DefaultResponse(req, ctx);
  co_return co_await WriteResponse(socket, res);
}

asio::awaitable<void> Session(tcp::socket socket, ConnectionContext ctx) {
  boost::beast::flat_buffer buffer;
  boost::system::error_code ignored;
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(kMaxRequestBody);
    auto [ec, n] = co_await http::async_read(socket, buffer, parser, kToken);
    if (ec == http::error::end_of_stream) break;
    if (ec) {
      // A malformed request gets a 400; a broken socket gets nothing.
      if (ec.category() == http::make_error_code(http::error::bad_target).category() &&
          ec != http::error::partial_message) {
        Request dummy;
        dummy.version(11);
        dummy.keep_alive(false);
        Response res =
            MakeResponse(dummy, 400, fmt::format("bad request: {}\n", ec.message()), ctx);
        co_await WriteResponse(socket, res);
      }
      break;
    }
    Request req = parser.release();
    if (!co_await HandleRequest(socket, req, ctx)) break;
  }
  if (socket.is_open()) {
    socket.shutdown(tcp::socket::shutdown_send, ignored);
    socket.close(ignored);
  }
}

asio::awaitable<void> Listen(tcp::acceptor& acceptor, ServerState& state) {
  auto executor = co_await asio::this_coro::executor;
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(kToken);
    if (ec == asio::error::operation_aborted) co_return;
    if (ec) {
      // E.g. out of file descriptors: back off rather than spin.
      std::fprintf(stderr, "scales testserver: accept failed: %s\n", ec.message().c_str());
      asio::steady_timer timer{executor, std::chrono::milliseconds(10)};
      co_await timer.async_wait(kToken);
      continue;
    }
    boost::system::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    ConnectionContext ctx{&state, ++state.accepted};
    asio::co_spawn(executor, Session(std::move(socket), ctx), asio::detached);
  }
}

}  // namespace

int RunTestServerCommand(int argc, char** argv) {
  Options options;
  bool help = false;
  if (!ParseOptions(argc, argv, options, help)) {
    PrintUsage(stderr);
    return 2;
  }
  if (help) {
    PrintUsage(stdout);
    return 0;
  }
  std::signal(SIGPIPE, SIG_IGN);

  // Declared before the io_context: sessions refer to it until the context is destroyed.
  ServerState state;
  asio::io_context ioc{options.threads};
  tcp::acceptor acceptor{ioc};
  try {
    tcp::resolver resolver{ioc};
    auto results = resolver.resolve(options.host, std::to_string(options.port),
                                    tcp::resolver::numeric_service | tcp::resolver::passive);
    tcp::endpoint endpoint = results.begin()->endpoint();
    acceptor.open(endpoint.protocol());
    // Lets a restarted server bind the same port while old connections are in TIME_WAIT.
    acceptor.set_option(tcp::acceptor::reuse_address(true));
    acceptor.bind(endpoint);
    acceptor.listen(asio::socket_base::max_listen_connections);
  } catch (const boost::system::system_error& e) {
    std::fprintf(stderr, "scales testserver: cannot listen on %s port %d: %s\n",
                 options.host.c_str(), options.port, e.code().message().c_str());
    return 1;
  }
  tcp::endpoint bound = acceptor.local_endpoint();
  state.name = options.name.empty() ? fmt::format("server-{}", bound.port()) : options.name;

  asio::signal_set signals{ioc, SIGINT, SIGTERM};
  signals.async_wait([&ioc](const boost::system::error_code&, int) { ioc.stop(); });
  asio::co_spawn(ioc, Listen(acceptor, state), asio::detached);

  // Registered before `listening` is printed (waiting 5 s at most), so that a client started
  // after that line finds this server; removed when the server exits.
  std::unique_ptr<Announcer> announcer;
  if (!options.announce.empty()) {
    try {
      ServiceInstance instance;
      instance.service_endpoint = {bound.address().to_string(), bound.port()};
      announcer = std::make_unique<Announcer>(ScalesUriParser::Parse(options.announce), instance);
      if (!announcer->WaitAnnounced(std::chrono::seconds(5))) {
        std::fprintf(stderr, "scales testserver: not announced yet, retrying: %s\n",
                     announcer->Describe().c_str());
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "scales testserver: --announce: %s\n", e.what());
      return 2;
    }
  }
  std::printf("listening %s\n", FormatEndpoint(bound).c_str());
  std::fflush(stdout);

  std::vector<std::thread> threads;
  for (int i = 1; i < options.threads; ++i) threads.emplace_back([&ioc] { ioc.run(); });
  ioc.run();
  for (auto& thread : threads) thread.join();
  return 0;
}

}  // namespace scales::tools
