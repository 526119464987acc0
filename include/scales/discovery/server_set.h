#pragma once
// ServerSet: the members of a service, as discovery sees them. Subscribers receive the full
// member list once it is known and again after every change (join, leave), on the executor
// they subscribed with.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>

#include "scales/discovery/endpoint.h"
#include "scales/discovery/uri.h"

namespace scales {

// Thread safety: all functions safe from any thread.
class ServerSet {
 public:
  using Members = std::vector<Endpoint>;
  using Listener = std::function<void(const Members&)>;

  virtual ~ServerSet() = default;

  // Delivers snapshots to `listener` on `executor`: the current members as soon as they are
  // known, then after each change. Snapshots are delivered in order. Returns an id.
  virtual uint64_t Subscribe(boost::asio::any_io_executor executor, Listener listener) = 0;
  // After Unsubscribe returns, the listener is not called again (a delivery already running
  // on another thread may finish).
  virtual void Unsubscribe(uint64_t id) = 0;
  // "static [a:1, b:2]", "zk://..." — for describe output and errors.
  virtual std::string Describe() const = 0;
};

// The delivery half of a ServerSet, for implementations (StaticServerSet and ZooKeeperServerSet
// use it): keeps the subscribers and the current list, and posts each list published to every
// subscriber's executor. A listener sees lists in the order they were published and always ends
// on the newest; a list that a newer one replaced before its delivery ran is skipped, so a loop
// that falls behind a fast-changing set applies only the newest list, not every one in between.
// Thread safety: all functions safe from any thread; no listener runs under its lock, and a
// listener may call any of them.
class ServerSetSubscribers {
 public:
  using Members = std::vector<Endpoint>;
  using Listener = std::function<void(const Members&)>;

  ServerSetSubscribers() = default;
  ~ServerSetSubscribers();  // DeactivateAll()
  ServerSetSubscribers(const ServerSetSubscribers&) = delete;
  ServerSetSubscribers& operator=(const ServerSetSubscribers&) = delete;

  // Adds a listener and posts it the current list, if one was published. Returns its id.
  uint64_t Subscribe(boost::asio::any_io_executor executor, Listener listener);
  // After it returns, the listener is not called again (a delivery already running on another
  // thread may finish). An unknown id is ignored.
  void Unsubscribe(uint64_t id);
  // Makes `members` the current list and posts it to every subscriber.
  void Publish(Members members);
  // After it returns, no listener is called again (deliveries already running may finish).
  void DeactivateAll();
  // The current list, if one was published.
  std::optional<Members> current() const;

 private:
  struct Subscriber;
  void Deliver(const std::shared_ptr<Subscriber>& sub, Members members);  // under mu_

  mutable std::mutex mu_;
  std::optional<Members> current_;
  std::map<uint64_t, std::shared_ptr<Subscriber>> subscribers_;
  uint64_t next_id_ = 0;
};

// A fixed list of endpoints (tcp:// URIs). Update() replaces the list and notifies every
// subscriber, which makes it usable as a programmatic dynamic server set too.
class StaticServerSet final : public ServerSet {
 public:
  explicit StaticServerSet(Members members);
  ~StaticServerSet() override;

  uint64_t Subscribe(boost::asio::any_io_executor executor, Listener listener) override;
  void Unsubscribe(uint64_t id) override;
  std::string Describe() const override;

  void Update(Members members);
  Members members() const;

 private:
  ServerSetSubscribers subscribers_;
};

// The server set a URI names: tcp:// gives a StaticServerSet, zk:// a ZooKeeperServerSet
// (scales/discovery/zookeeper.h; options from the URI's query). Throws scales::Error (kBadUri
// for bad zk:// options, kDiscoveryFailed for other schemes).
std::shared_ptr<ServerSet> CreateServerSet(const ParsedUri& uri);

}  // namespace scales
