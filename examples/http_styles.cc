// The same HTTP call in the four completion styles scales supports.
//
//   example_http_styles tcp://127.0.0.1:8080[,127.0.0.1:8081] [/path]
//
// Start a server first, e.g. `scales testserver http --port 8080`.
#include <chrono>
#include <cstdio>
#include <future>
#include <string>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <scales/http/client.h>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s URI [PATH]\n", argv[0]);
    return 2;
  }
  const std::string uri = argv[1];
  const std::string path = argc > 2 ? argv[2] : "/";
  try {
    scales::http::HttpOptions options;
    options.client.name = "example";
    options.client.timeout = std::chrono::seconds(5);
    auto client = scales::Http::NewClient(uri, options);

    // 1. Blocking: returns the response or throws scales::Error.
    scales::http::Response r = client.Get(path);
    std::printf("blocking:  %d %s", r.status, r.body.c_str());

    // 2. Callback: runs on one of the client's event loops.
    std::promise<void> done;
    client.AsyncGet(path, [&](scales::error_code ec, scales::http::Response resp) {
      if (ec) {
        std::printf("callback:  error %s\n", ec.message().c_str());
      } else {
        std::printf("callback:  %d %s", resp.status, resp.body.c_str());
      }
      done.set_value();
    });
    done.get_future().wait();

    // 3. Future: get() returns the response or throws boost::system::system_error.
    std::future<scales::http::Response> f = client.AsyncGet(path, boost::asio::use_future);
    r = f.get();
    std::printf("future:    %d %s", r.status, r.body.c_str());

    // 4. Coroutine, on the program's own io_context.
    boost::asio::io_context ioc;
    boost::asio::co_spawn(
        ioc,
        [&]() -> boost::asio::awaitable<void> {
          scales::http::Response resp = co_await client.AsyncGet(path, boost::asio::use_awaitable);
          std::printf("coroutine: %d %s", resp.status, resp.body.c_str());
        },
        boost::asio::detached);
    ioc.run();
    return 0;
  } catch (const scales::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
