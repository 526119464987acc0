#include "scales/discovery/server_set.h"

#include <fmt/format.h>

#include <boost/asio/post.hpp>

#include "scales/core/error.h"
#include "scales/discovery/zookeeper.h"

namespace scales {

struct StaticServerSet::Subscriber {
  boost::asio::any_io_executor executor;
  Listener listener;
  std::recursive_mutex mu;  // serialises deliveries with Unsubscribe (which a listener may call)
  bool active = true;
  uint64_t posted = 0;     // lists posted (under the set's mu_)
  uint64_t delivered = 0;  // the number of the last list delivered (under mu)
};

StaticServerSet::StaticServerSet(Members members) : members_(std::move(members)) {}

StaticServerSet::~StaticServerSet() {
  std::lock_guard lock(mu_);
  for (auto& [id, sub] : subscribers_) {
    std::lock_guard sub_lock(sub->mu);
    sub->active = false;
  }
}

uint64_t StaticServerSet::Subscribe(boost::asio::any_io_executor executor, Listener listener) {
  auto sub = std::make_shared<Subscriber>();
  sub->executor = std::move(executor);
  sub->listener = std::move(listener);
  // Posted under the lock, as Update's are: lists reach each subscriber in the order the set
  // took them (posted after the lock, an Update running in between could post its newer list
  // first, and the subscriber would end on the older one). A post never runs the listener.
  std::lock_guard lock(mu_);
  const uint64_t id = ++next_id_;
  subscribers_[id] = sub;
  Deliver(sub, members_);
  return id;
}

void StaticServerSet::Unsubscribe(uint64_t id) {
  std::shared_ptr<Subscriber> sub;
  {
    std::lock_guard lock(mu_);
    auto it = subscribers_.find(id);
    if (it == subscribers_.end()) return;
    sub = it->second;
    subscribers_.erase(it);
  }
  std::lock_guard sub_lock(sub->mu);
  sub->active = false;
}

// Under mu_. The threads of an executor may run two deliveries in either order: a list older
// than one delivered already is dropped, so the subscriber never ends on a stale list.
void StaticServerSet::Deliver(const std::shared_ptr<Subscriber>& sub, Members members) {
  boost::asio::post(sub->executor, [sub, number = ++sub->posted, members = std::move(members)] {
    std::lock_guard lock(sub->mu);
    if (!sub->active || number < sub->delivered) return;
    sub->delivered = number;
    sub->listener(members);
  });
}

std::string StaticServerSet::Describe() const {
  std::lock_guard lock(mu_);
  std::string s = "static [";
  for (size_t i = 0; i < members_.size(); ++i) {
    if (i) s += ", ";
    s += members_[i].ToString();
  }
  return s + "]";
}

void StaticServerSet::Update(Members members) {
  std::lock_guard lock(mu_);  // posts under the lock: see Subscribe
  members_ = std::move(members);
  for (auto& [id, sub] : subscribers_) Deliver(sub, members_);
}

ServerSet::Members StaticServerSet::members() const {
  std::lock_guard lock(mu_);
  return members_;
}

std::shared_ptr<ServerSet> CreateServerSet(const ParsedUri& uri) {
  if (uri.scheme == "tcp") return std::make_shared<StaticServerSet>(uri.hosts);
  if (uri.scheme == "zk") return std::make_shared<ZooKeeperServerSet>(uri, ZooKeeperOptions());
  throw Error(make_error_code(Errc::kDiscoveryFailed),
              fmt::format("cannot resolve '{}': {}:// server sets are not supported",
                          uri.ToString(), uri.scheme));
}

}  // namespace scales
