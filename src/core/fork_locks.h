// Process-wide mutexes held across fork(), so that a child never inherits one locked.
#pragma once

#include <mutex>

namespace scales::internal {

// The order in which the thread calling fork() takes the registered mutexes: a mutex that is
// held while another is taken comes first (Runtime::Default() builds a runtime under its lock,
// which registers metrics and loops, and may log, and in a child sets the parent's aside;
// ForEachLiveClient calls back under its lock; the TLS context cache loads files and the
// ZooKeeper log routes pass lines on under theirs; the stats registry, the loops' list, the kept
// objects and the log take nothing else while they hold theirs).
enum class ForkLockRank {
  kDefaultRuntime,
  kLiveClients,
  kTlsContexts,
  kTlsSessions,
  kStatsCollectors,
  kStatsMetrics,
  kWrappingLoops,
  kZooKeeperLogRoutes,
  kKeptObjects,
  kLog,
};

// Registers `mu` (until StopHoldingAcrossFork): a pthread_atfork handler locks every registered
// mutex, in rank order, in the thread that calls fork() before it forks, and unlocks them after
// it, in the parent and in the child. Without that, a mutex that another of the parent's threads
// held at that instant (a loop thread logging, a scrape reading a stats registry) would stay
// locked in the child for good, where that thread does not exist, and the child's next use of it
// (its first client, a log line, releasing a parent's client) would wait forever. fork() waits
// instead for the holders to let go (each holds its mutex for a few instructions, or, the live
// clients', for a ForEachLiveClient callback: fork() must not be called from one).
// HoldAcrossFork takes no lock, so it may be called with any mutex held (a registered one's
// owner made under another's lock); StopHoldingAcrossFork waits for a fork in progress, so it
// must not be called with a registered mutex held.
void HoldAcrossFork(std::mutex& mu, ForkLockRank rank) noexcept;
void StopHoldingAcrossFork(std::mutex& mu) noexcept;

}  // namespace scales::internal
