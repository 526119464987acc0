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
  Members snapshot;
  uint64_t id;
  {
    std::lock_guard lock(mu_);
    id = ++next_id_;
    subscribers_[id] = sub;
    snapshot = members_;
  }
  Deliver(sub, std::move(snapshot));
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

void StaticServerSet::Deliver(const std::shared_ptr<Subscriber>& sub, Members members) {
  boost::asio::post(sub->executor, [sub, members = std::move(members)] {
    std::lock_guard lock(sub->mu);
    if (sub->active) sub->listener(members);
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
  std::vector<std::shared_ptr<Subscriber>> subs;
  {
    std::lock_guard lock(mu_);
    members_ = members;
    for (auto& [id, sub] : subscribers_) subs.push_back(sub);
  }
  for (auto& sub : subs) Deliver(sub, members);
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
