#include "core/fork_locks.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <new>
#include <vector>

namespace scales::internal {
namespace {

struct Registration {
  ForkLockRank rank;
  std::mutex* mu;
  Registration* next;  // in `pending`
};

// Registering takes no lock: a mutex may be registered (its owner made) while its maker holds
// another registered mutex (a first rate-limited log line under the live clients' lock, say),
// and waiting there for `mu`, which a fork() in progress holds while it waits for that other
// mutex, would deadlock. Registrations wait in `pending` until the next fork or unregistering
// moves them to `held`.
struct ForkLocks {
  std::atomic<Registration*> pending{nullptr};
  std::mutex mu;                    // taken first, released last by a fork
  std::vector<Registration*> held;  // by rank; guarded by mu
};

ForkLocks& TheForkLocks() {
  static ForkLocks* const locks = new ForkLocks();  // never destroyed: fork() may come at exit
  return *locks;
}

// Under locks.mu: moves the pending registrations to `held`, in rank order (after the last of
// their rank: mutexes of one rank are never nested, so any order does among them).
void TakePending(ForkLocks& locks) {
  Registration* r = locks.pending.exchange(nullptr, std::memory_order_acquire);
  std::vector<Registration*> arrived;
  for (; r != nullptr; r = r->next) arrived.push_back(r);
  for (auto it = arrived.rbegin(); it != arrived.rend(); ++it) {  // in the order they came
    auto at =
        std::upper_bound(locks.held.begin(), locks.held.end(), (*it)->rank,
                         [](ForkLockRank rank, const Registration* e) { return rank < e->rank; });
    locks.held.insert(at, *it);
  }
}

void LockAll() {
  ForkLocks& locks = TheForkLocks();
  locks.mu.lock();
  try {
    TakePending(locks);
  } catch (...) {
    std::terminate();  // no memory to note them: a child could inherit them locked
  }
  for (Registration* r : locks.held) r->mu->lock();
}

void UnlockAll() {
  ForkLocks& locks = TheForkLocks();
  for (auto it = locks.held.rbegin(); it != locks.held.rend(); ++it) (*it)->mu->unlock();
  locks.mu.unlock();
}

// Installed while the library is loaded, before any fork() that could matter.
[[maybe_unused]] const int fork_locks_installed =
    ::pthread_atfork(&LockAll, &UnlockAll, &UnlockAll);

}  // namespace

void HoldAcrossFork(std::mutex& mu, ForkLockRank rank) noexcept {
  ForkLocks& locks = TheForkLocks();
  auto* r = new (std::nothrow) Registration{rank, &mu, nullptr};
  if (r == nullptr) std::terminate();  // no memory to note it: a child could inherit it locked
  r->next = locks.pending.load(std::memory_order_relaxed);
  while (!locks.pending.compare_exchange_weak(r->next, r, std::memory_order_release,
                                              std::memory_order_relaxed)) {
  }
}

void StopHoldingAcrossFork(std::mutex& mu) noexcept {
  ForkLocks& locks = TheForkLocks();
  std::lock_guard lock(locks.mu);
  try {
    TakePending(locks);
  } catch (...) {
    std::terminate();
  }
  auto it = std::find_if(locks.held.begin(), locks.held.end(),
                         [&](const Registration* r) { return r->mu == &mu; });
  if (it == locks.held.end()) return;
  delete *it;
  locks.held.erase(it);
}

}  // namespace scales::internal
