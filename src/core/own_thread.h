// Completions that no event loop can run: on a thread of their own.
#pragma once

#include <exception>
#include <thread>

namespace scales::internal {

// Runs `fn` (copyable) on a detached thread, or here when no thread can be had, rather than
// never. A failed std::thread constructor drops its own copy, so `fn` is still whole here: a
// move-only state goes into `fn` behind a shared_ptr.
template <class Fn>
void RunOnAThreadOfItsOwn(Fn fn) {
  try {
    std::thread(fn).detach();
  } catch (const std::exception&) {
    fn();
  }
}

}  // namespace scales::internal
