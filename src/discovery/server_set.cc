#include "scales/discovery/server_set.h"

#include <fmt/format.h>

#include <atomic>

#include <boost/asio/post.hpp>

#include "scales/core/error.h"
#include "scales/discovery/zookeeper.h"

namespace scales {

struct ServerSetSubscribers::Subscriber {
  boost::asio::any_io_executor executor;
  Listener listener;
  std::recursive_mutex mu;  // serialises deliveries with Unsubscribe (which a listener may call)
  bool active = true;
  std::atomic<uint64_t> posted{0};  // the number of the newest list posted (written under mu_)
};

ServerSetSubscribers::~ServerSetSubscribers() { DeactivateAll(); }

uint64_t ServerSetSubscribers::Subscribe(boost::asio::any_io_executor executor, Listener listener) {
  auto sub = std::make_shared<Subscriber>();
  sub->executor = std::move(executor);
  sub->listener = std::move(listener);
  // Posted under the lock, as Publish's are: lists reach each subscriber in the order they were
  // published (posted after the lock, a Publish running in between could post its newer list
  // first). A post never runs the listener.
  std::lock_guard lock(mu_);
  const uint64_t id = ++next_id_;
  subscribers_[id] = sub;
  if (current_) Deliver(sub, *current_);
  return id;
}

void ServerSetSubscribers::Unsubscribe(uint64_t id) {
  std::shared_ptr<Subscriber> sub;
  {
    std::lock_guard lock(mu_);
    auto it = subscribers_.find(id);
    if (it == subscribers_.end()) return;
    sub = it->second;
    subscribers_.erase(it);
  }
  // Outside mu_: a listener running under sub->mu may publish (and take mu_).
  std::lock_guard sub_lock(sub->mu);
  sub->active = false;
}

void ServerSetSubscribers::Publish(Members members) {
  std::lock_guard lock(mu_);
  for (auto& [id, sub] : subscribers_) Deliver(sub, members);
  current_ = std::move(members);
}

void ServerSetSubscribers::DeactivateAll() {
  std::map<uint64_t, std::shared_ptr<Subscriber>> subs;
  {
    std::lock_guard lock(mu_);
    subs.swap(subscribers_);
  }
  for (auto& [id, sub] : subs) {
    std::lock_guard sub_lock(sub->mu);
    sub->active = false;
  }
}

std::optional<ServerSetSubscribers::Members> ServerSetSubscribers::current() const {
  std::lock_guard lock(mu_);
  return current_;
}

// Under mu_. Only the newest list posted is delivered: an older one finds `posted` past its
// number (the newer list's delivery is queued behind it, or ran already on another thread of
// the executor) and is dropped, so the subscriber never ends on a stale list, and a loop that
// fell behind a fast-changing set applies one list, not each one in between.
void ServerSetSubscribers::Deliver(const std::shared_ptr<Subscriber>& sub, Members members) {
  const uint64_t number = sub->posted.load(std::memory_order_relaxed) + 1;
  sub->posted.store(number, std::memory_order_release);
  boost::asio::post(sub->executor, [sub, number, members = std::move(members)] {
    std::lock_guard lock(sub->mu);
    if (!sub->active || number != sub->posted.load(std::memory_order_acquire)) return;
    sub->listener(members);
  });
}

StaticServerSet::StaticServerSet(Members members) { subscribers_.Publish(std::move(members)); }

// ~ServerSetSubscribers: no listener is called after the set is gone.
StaticServerSet::~StaticServerSet() = default;

uint64_t StaticServerSet::Subscribe(boost::asio::any_io_executor executor, Listener listener) {
  return subscribers_.Subscribe(std::move(executor), std::move(listener));
}

void StaticServerSet::Unsubscribe(uint64_t id) { subscribers_.Unsubscribe(id); }

void StaticServerSet::Update(Members members) { subscribers_.Publish(std::move(members)); }

ServerSet::Members StaticServerSet::members() const { return *subscribers_.current(); }

std::string StaticServerSet::Describe() const {
  const Members members = *subscribers_.current();
  std::string s = "static [";
  for (size_t i = 0; i < members.size(); ++i) {
    if (i) s += ", ";
    s += members[i].ToString();
  }
  return s + "]";
}

std::shared_ptr<ServerSet> CreateServerSet(const ParsedUri& uri) {
  if (uri.scheme == "tcp") return std::make_shared<StaticServerSet>(uri.hosts);
  if (uri.scheme == "zk") return std::make_shared<ZooKeeperServerSet>(uri, ZooKeeperOptions());
  throw Error(make_error_code(Errc::kDiscoveryFailed),
              fmt::format("cannot resolve '{}': {}:// server sets are not supported",
                          uri.ToString(), uri.scheme));
}

}  // namespace scales
