#pragma once
// HandlerQueue: an executor that only queues what is posted to it (from any thread); the test
// then runs the handlers in the order it chooses, as the threads of a pool may (two handlers
// taken by two threads: the later one can run first).
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include <boost/asio/execution.hpp>
#include <boost/asio/io_context.hpp>

namespace scales::test {

class HandlerQueue {
 public:
  struct Executor {
    HandlerQueue* queue;

    boost::asio::execution_context& query(boost::asio::execution::context_t) const noexcept { return queue->ctx_; }
    static constexpr boost::asio::execution::blocking_t query(boost::asio::execution::blocking_t) noexcept {
      return boost::asio::execution::blocking.never;
    }
    Executor require(boost::asio::execution::blocking_t::never_t) const noexcept { return *this; }
    template <class F>
    void execute(F f) const {
      std::lock_guard lock(queue->mu_);
      queue->handlers_.push_back([f = std::make_shared<F>(std::move(f))] { (*f)(); });
    }
    friend bool operator==(const Executor& a, const Executor& b) noexcept { return a.queue == b.queue; }
    friend bool operator!=(const Executor& a, const Executor& b) noexcept { return !(a == b); }
  };

  Executor executor() noexcept { return Executor{this}; }
  size_t size() const {
    std::lock_guard lock(mu_);
    return handlers_.size();
  }
  // The handlers queued so far, in the order they were posted; the queue is left empty.
  std::vector<std::function<void()>> Take() {
    std::lock_guard lock(mu_);
    return std::exchange(handlers_, {});
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::function<void()>> handlers_;
  boost::asio::io_context ctx_;  // the executor's context, never run
};

}  // namespace scales::test
