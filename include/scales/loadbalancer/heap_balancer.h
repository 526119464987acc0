#pragma once
// Load balancers: LoadBalancerSink (the server-set plumbing shared by every balancer) and
// HeapBalancerSink (least loaded, from a min-heap; the seed's HeapBalancerSink).

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "scales/core/provider.h"
#include "scales/core/sink.h"
#include "scales/core/sink_stack.h"
#include "scales/discovery/server_set.h"
#include "scales/stats/stats.h"

namespace scales {

class EventLoop;

// One endpoint as a balancer sees it.
struct BalancerNode {
  Endpoint endpoint;
  std::string address;  // endpoint.ToString()
  SinkPtr sink;         // the per-endpoint chain (resurrector -> pool -> transport)
  int64_t load = 0;     // outstanding requests
  bool down = false;    // marked down by the balancer (status was Busy or Closed)
  bool removed = false; // left the server set; closed once its load drops to 0
  size_t index = 0;     // balancer-specific (heap position)
};

// Subscribes to the server set, keeps one node per member (created through the factory of
// the sinks below), parks requests until the first members are known, answers
// kNoMembers when the set is empty, and counts load per node. Subclasses choose the node.
//
// Open completes once the server set delivered its first members and, if there are any, one
// node finished opening (successfully or not: a failed node is marked down, not fatal).
//
// Thread safety: one balancer per event loop; all calls on that loop.
class LoadBalancerSink : public ClientMessageSink {
 public:
  LoadBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory);
  ~LoadBalancerSink() override;

  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  void CancelRequest(SinkStack& stack, void* context, const error_code& reason) override;
  bool RequestUnsent(const SinkStack& stack, void* context) const override;
  void Close() override;
  SinkStatus status() const override;

  size_t size() const noexcept { return nodes_.size(); }
  const std::vector<std::unique_ptr<BalancerNode>>& nodes() const noexcept { return nodes_; }
  size_t draining() const noexcept { return draining_.size(); }

 protected:
  void DoOpen(OpenHandler handler) override;

  // A node is usable when its chain is Idle or Open.
  static bool Healthy(const BalancerNode& n);
  // Panic mode (no healthy node): how worth trying a node is. 1 for Busy (it may still answer:
  // failure accrual marks endpoints Busy, not gone), 0 for Closed (known down; fails fast).
  static int PanicRank(const BalancerNode& n);
  // Hooks for the balancing policy.
  virtual void OnNodeAdded(BalancerNode& n) = 0;
  virtual void OnNodeRemoved(BalancerNode& n) = 0;
  // Chooses a node (nodes_ is not empty). Load is incremented by the caller afterwards.
  // May be called more than once for one request (see PickAlternative).
  virtual BalancerNode& PickNode() = 0;
  // For a request that asks to avoid the picked node `avoid` (props.avoid_endpoints names it: a
  // retry or a backup request; there are at least two nodes): a node not in
  // props.avoid_endpoints, or nullptr to keep `avoid` (also when every other node is avoided).
  // Only called when the list is not empty. The default asks PickNode() again a few times
  // (randomised and cycling policies move on) and takes a healthy node not avoided, or a node
  // not avoided and no worse in panic (PanicRank) when `avoid` is unhealthy too; then the least
  // loaded healthy node not avoided, then the least loaded node not avoided and no worse in
  // panic when `avoid` itself is unhealthy (a Busy `avoid` keeps its request from Closed nodes).
  virtual BalancerNode* PickAlternative(BalancerNode& avoid, const CallProperties& props);
  virtual void OnLoadChanged(BalancerNode& n, bool increased) = 0;
  // Called once per server-set update, after its OnNodeAdded/OnNodeRemoved calls, with the
  // nodes that joined; returns the nodes to open now (Open completes once one of them opened,
  // or at once if none). The default opens every node that joined.
  virtual std::vector<BalancerNode*> NodesToOpen(std::vector<BalancerNode*> joined) { return joined; }
  // Closes `n`'s chain (destroyed on a later turn) and gives it a fresh, unopened one from the
  // endpoint factory. Only when n.load == 0 (the old chain must not hold requests).
  void ResetNodeSink(BalancerNode& n);
  // Optional hooks for latency-aware policies: a request was sent to `n` (after its load
  // changed) / its response came back from `n` (before it goes up; also for removed nodes).
  virtual void OnRequestRouted(BalancerNode& /*n*/, SinkStack& /*stack*/) {}
  virtual void OnResponse(BalancerNode& /*n*/, SinkStack& /*stack*/) {}

  EventLoop& loop_;
  std::string client_name_;
  stats::StatsScope stats_;

 private:
  void OnMembers(const ServerSet::Members& members);
  void Route(SinkStack& stack, MethodCallMessage& msg, Stream* stream);
  void MarkReady();
  SinkPtr MakeNodeSink(const BalancerNode& n);
  void RetireNode(std::unique_ptr<BalancerNode> node);
  void Fail(SinkStack& stack, Errc code, std::string detail);
  // What a parked request waits for, for its error: the first members, or an endpoint's open.
  std::string WaitingFor() const;

  std::shared_ptr<ServerSet> server_set_;
  SinkFactory endpoint_factory_;
  SinkContext endpoint_ctx_;
  uint64_t subscription_ = 0;
  bool subscribed_ = false;
  bool ready_ = false;
  bool closed_ = false;
  OpenWaiters open_waiters_;
  // With the stream to send on. Requests leave it one at a time (MarkReady, Close), so that
  // one cancelled meanwhile (from inside another's response path) is still found here.
  std::deque<std::pair<SinkStack*, Stream*>> parked_;
  // Opens of nodes not finished yet: before the balancer is ready, Open waits for one of them
  // (an update that opens no node, such as the same list again, does not make it ready).
  size_t opening_ = 0;
  // The endpoints the first opens went to (WaitingFor names them: under an aperture, not every
  // member is opened), and how many.
  std::vector<std::string> first_opens_;
  size_t first_opens_total_ = 0;
  std::vector<std::unique_ptr<BalancerNode>> nodes_;
  std::vector<std::unique_ptr<BalancerNode>> draining_;
  bool reports_membership_;
  stats::Gauge& size_gauge_;
  stats::Counter& no_members_;
  stats::Counter& joins_;
  stats::Counter& leaves_;
  stats::Counter& avoided_;
  stats::Counter& panic_;
};

// Least loaded: a binary min-heap on (load, down). A node whose chain is not usable is
// marked down (a large penalty sinks it) and marked up again when its chain recovers; if
// every node is down the least loaded down node is used. A node whose load returns to zero
// swaps places with a random equally loaded node, so idle nodes are used in random order.
class HeapBalancerSink final : public LoadBalancerSink {
 public:
  HeapBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory);
  std::string_view name() const override { return "heap-balancer"; }

  // For tests: the node at the top of the heap (least loaded), or nullptr.
  const BalancerNode* top() const noexcept { return heap_.size() > 1 ? heap_[1] : nullptr; }

 protected:
  void OnNodeAdded(BalancerNode& n) override;
  void OnNodeRemoved(BalancerNode& n) override;
  BalancerNode& PickNode() override;
  BalancerNode* PickAlternative(BalancerNode& avoid, const CallProperties& props) override;
  void OnLoadChanged(BalancerNode& n, bool increased) override;

 private:
  static constexpr int64_t kDownPenalty = int64_t{1} << 40;
  static int64_t Key(const BalancerNode* n) { return n->load + (n->down ? kDownPenalty : 0); }
  void SiftUp(size_t i);
  void SiftDown(size_t i);
  void Swap(size_t i, size_t j);

  std::vector<BalancerNode*> heap_{nullptr};  // 1-based; heap_[0] unused
  std::vector<BalancerNode*> down_;
  stats::Counter& marked_down_;
  stats::Counter& marked_up_;
};

// Provider of the heap balancer (role "loadbalancer").
SinkProvider HeapBalancerProvider();

}  // namespace scales
