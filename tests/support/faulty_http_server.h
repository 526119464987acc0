#pragma once
// FaultyHttpServer: a minimal HTTP/1.1 server on a thread of the test process, on 127.0.0.1,
// that fails on cue: from the Nth request on, or by going away after its first answer. For tests
// that run a client in another process (the examples) and need its calls to fail at a given
// point; `scales testserver http` only misbehaves per path, and a client that runs the same
// path throughout cannot be told to fail on its third call. Each listener is a server of its
// own (its own port); a request is counted over all of them.
//
// Every request that is answered gets `200 OK` with the request's header lines echoed in the
// body, one `Name: value\n` each, in the order received (as `scales testserver http` does for
// /headers), on a keep-alive connection unless the answer says `Connection: close`. Requests may
// carry a Content-Length body (read and ignored); chunked request bodies are not supported.
//
// Thread safety: the public functions are safe from any thread.
#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace scales::test {

class FaultyHttpServer {
 public:
  struct Options {
    // Listening sockets, each on a kernel-chosen port of 127.0.0.1. At least 1.
    size_t listeners = 1;
    // Requests from this one on (1-based, counted over every listener) are read in full and
    // then answered by resetting their connection (RST): the client sees its connection closed
    // with the request on it. 0 = never.
    int reset_from = 0;
    // The listener that receives the first request goes away while answering it: before it
    // writes the answer (with `Connection: close`) it closes its listening socket, so later
    // connects to it are refused, and resets its other connections. The other listeners serve
    // on. Whichever listener a client picks first is the one that goes.
    bool first_listener_dies = false;
  };

  // Binds and starts serving; throws std::runtime_error when a socket cannot be set up.
  explicit FaultyHttpServer(Options options);
  // Stops the thread and closes every socket.
  ~FaultyHttpServer();
  FaultyHttpServer(const FaultyHttpServer&) = delete;
  FaultyHttpServer& operator=(const FaultyHttpServer&) = delete;

  // "127.0.0.1:<port>" of listener `i`.
  std::string endpoint(size_t i = 0) const;
  // "tcp://" and every listener's endpoint, comma-separated, in listener order.
  std::string uri() const;
  // Requests received so far (answered or reset).
  int requests() const { return requests_.load(); }
  // The header lines (as echoed) of each answered request, in the order they were answered.
  std::vector<std::string> answered() const;

 private:
  struct State;
  void Run();

  Options options_;
  std::vector<int> ports_;
  std::unique_ptr<State> state_;  // sockets; touched only by the serving thread once it runs
  int wake_[2] = {-1, -1};        // a pipe: writing to it stops the thread
  std::atomic<int> requests_{0};
  mutable std::mutex mu_;
  std::vector<std::string> answered_;  // guarded by mu_
  std::thread thread_;
};

}  // namespace scales::test
