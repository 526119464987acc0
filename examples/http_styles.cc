// The same HTTP call in the four completion styles scales supports.
//
//   example_http_styles tcp://127.0.0.1:8080[,127.0.0.1:8081] [/path]
//
// Start a server first, e.g. `scales testserver http --port 8080`. The first call that fails
// ends the program: exit code 1, the error on stderr.
#include <chrono>
#include <cstdio>
#include <exception>
#include <future>
#include <string>

#include <boost/asio/co_spawn.hpp>
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

    // 2. Callback: runs on one of the client's event loops, with the error or the response.
    std::promise<scales::error_code> done;
    client.AsyncGet(path, [&](scales::error_code ec, scales::http::Response resp) {
      if (!ec) std::printf("callback:  %d %s", resp.status, resp.body.c_str());
      done.set_value(ec);
    });
    if (scales::error_code ec = done.get_future().get()) {
      std::fflush(stdout);
      std::fprintf(stderr, "error: callback: %s\n", ec.message().c_str());
      return 1;
    }

    // 3. Future: get() returns the response or throws boost::system::system_error.
    std::future<scales::http::Response> f = client.AsyncGet(path, boost::asio::use_future);
    r = f.get();
    std::printf("future:    %d %s", r.status, r.body.c_str());

    // 4. Coroutine, on the program's own io_context; co_await throws
    //    boost::system::system_error. An exception escaping the coroutine is kept by the
    //    completion handler (boost::asio::detached would drop it) and rethrown once ioc.run()
    //    returned: not thrown out of run(), whose io_context would then be destroyed while a
    //    scales loop may still hold work on it (Asio's rule: no io_context goes before its work).
    boost::asio::io_context ioc;
    std::exception_ptr failed;
    boost::asio::co_spawn(
        ioc,
        [&]() -> boost::asio::awaitable<void> {
          scales::http::Response resp = co_await client.AsyncGet(path, boost::asio::use_awaitable);
          std::printf("coroutine: %d %s", resp.status, resp.body.c_str());
        },
        [&failed](std::exception_ptr error) { failed = error; });
    ioc.run();  // returns once nothing is left to run on `ioc`, scales' work on it included
    if (failed) std::rethrow_exception(failed);
    return 0;
  } catch (const std::exception& e) {
    // scales::Error from the blocking call (what() names the client, endpoint and step);
    // boost::system::system_error from the future and the coroutine.
    std::fflush(stdout);  // what the styles before the failure printed comes first
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
