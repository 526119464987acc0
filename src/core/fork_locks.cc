#include "core/fork_locks.h"

#include <pthread.h>

#include <algorithm>
#include <exception>
#include <utility>
#include <vector>

namespace scales::internal {
namespace {

struct ForkLocks {
  std::mutex mu;  // taken first, released last: no mutex joins or leaves during a fork
  std::vector<std::pair<ForkLockRank, std::mutex*>> held;  // by rank; guarded by mu
};

ForkLocks& TheForkLocks() {
  static ForkLocks* const locks = new ForkLocks();  // never destroyed: fork() may come at exit
  return *locks;
}

void LockAll() {
  ForkLocks& locks = TheForkLocks();
  locks.mu.lock();
  for (auto& [rank, mu] : locks.held) mu->lock();
}

void UnlockAll() {
  ForkLocks& locks = TheForkLocks();
  for (auto it = locks.held.rbegin(); it != locks.held.rend(); ++it) it->second->unlock();
  locks.mu.unlock();
}

// Installed while the library is loaded, before any fork() that could matter.
[[maybe_unused]] const int fork_locks_installed =
    ::pthread_atfork(&LockAll, &UnlockAll, &UnlockAll);

}  // namespace

void HoldAcrossFork(std::mutex& mu, ForkLockRank rank) noexcept {
  ForkLocks& locks = TheForkLocks();
  std::lock_guard lock(locks.mu);
  // After the last of its rank: mutexes of one rank are never nested, any order does.
  auto at = std::upper_bound(locks.held.begin(), locks.held.end(), rank,
                             [](ForkLockRank r, const auto& entry) { return r < entry.first; });
  try {
    locks.held.emplace(at, rank, &mu);
  } catch (...) {
    std::terminate();  // no memory to note it: a child could inherit it locked
  }
}

void StopHoldingAcrossFork(std::mutex& mu) noexcept {
  ForkLocks& locks = TheForkLocks();
  std::lock_guard lock(locks.mu);
  std::erase_if(locks.held, [&](const auto& entry) { return entry.second == &mu; });
}

}  // namespace scales::internal
