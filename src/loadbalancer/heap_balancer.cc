#include "scales/loadbalancer/heap_balancer.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>

#include <boost/asio/post.hpp>

#include "scales/core/log.h"
#include "scales/core/runtime.h"

namespace scales {

namespace {
// How many endpoints a parked request's detail names (WaitingFor).
constexpr size_t kWaitingForNamed = 3;
}  // namespace

LoadBalancerSink::LoadBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory)
    : loop_(*ctx.loop),
      client_name_(ctx.client_name),
      stats_(ctx.stats),
      server_set_(ctx.server_set),
      endpoint_factory_(std::move(endpoint_factory)),
      endpoint_ctx_(ctx),
      // Membership is the same on every loop: only the first loop's balancer reports it.
      reports_membership_(ctx.loop->index() == 0),
      size_gauge_(ctx.stats.GetGauge("scales_lb_size")),
      no_members_(ctx.stats.GetCounter("scales_lb_no_members")),
      joins_(ctx.stats.GetCounter("scales_lb_joins")),
      leaves_(ctx.stats.GetCounter("scales_lb_leaves")),
      avoided_(ctx.stats.GetCounter("scales_lb_avoided")),
      panic_(ctx.stats.GetCounter("scales_lb_panic")) {}

LoadBalancerSink::~LoadBalancerSink() {
  if (subscribed_) server_set_->Unsubscribe(subscription_);
  if (reports_membership_) size_gauge_.Add(-static_cast<int64_t>(nodes_.size()));
}

bool LoadBalancerSink::Healthy(const BalancerNode& n) {
  SinkStatus s = n.sink->status();
  return s == SinkStatus::kOpen || s == SinkStatus::kIdle;
}

int LoadBalancerSink::PanicRank(const BalancerNode& n) {
  return n.sink->status() == SinkStatus::kBusy ? 1 : 0;
}

void LoadBalancerSink::DoOpen(OpenHandler handler) {
  if (closed_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), make_error_code(Errc::kClientClosed));
    return;
  }
  if (ready_) {
    PostOpenCompletion(std::move(handler), loop_.executor(), {});
    return;
  }
  open_waiters_.Add(std::move(handler));
  if (!subscribed_) {
    subscribed_ = true;
    std::weak_ptr<ClientMessageSink> weak = weak_from_this();
    subscription_ = server_set_->Subscribe(loop_.executor(), [weak, this](const ServerSet::Members& m) {
      if (auto self = weak.lock()) OnMembers(m);
    });
  }
}

void LoadBalancerSink::OnMembers(const ServerSet::Members& members) {
  if (closed_) return;
  std::set<Endpoint> wanted(members.begin(), members.end());
  // One log line per change, written by the loop that reports membership (not once per loop).
  const bool log_changes = reports_membership_ && LogEnabled(LogLevel::kInfo);
  std::string left_names, joined_names;
  // Leaves.
  for (size_t i = 0; i < nodes_.size();) {
    if (wanted.count(nodes_[i]->endpoint) == 0) {
      std::unique_ptr<BalancerNode> node = std::move(nodes_[i]);
      nodes_.erase(nodes_.begin() + static_cast<ptrdiff_t>(i));
      OnNodeRemoved(*node);
      if (log_changes) left_names += (left_names.empty() ? "" : ", ") + node->address;
      if (reports_membership_) {
        leaves_.Increment();
        size_gauge_.Add(-1);
      }
      RetireNode(std::move(node));
    } else {
      wanted.erase(nodes_[i]->endpoint);
      ++i;
    }
  }
  // Joins (in the order the server set gave them, duplicates collapsed).
  std::vector<BalancerNode*> joined;
  for (const Endpoint& ep : members) {
    if (wanted.erase(ep) == 0) continue;
    auto node = std::make_unique<BalancerNode>();
    node->endpoint = ep;
    node->address = ep.ToString();
    node->sink = MakeNodeSink(*node);
    joined.push_back(node.get());
    nodes_.push_back(std::move(node));
    OnNodeAdded(*nodes_.back());
    if (log_changes) joined_names += (joined_names.empty() ? "" : ", ") + nodes_.back()->address;
    if (reports_membership_) {
      joins_.Increment();
      size_gauge_.Add(1);
    }
  }
  if (!joined_names.empty() || !left_names.empty()) {
    SCALES_LOG(kInfo, "client {}: {}: joined [{}], left [{}]; {} members now", client_name_, name(), joined_names,
               left_names, nodes_.size());
  }
  if (!ready_ && nodes_.empty()) {
    MarkReady();
    return;
  }
  std::vector<BalancerNode*> to_open = NodesToOpen(std::move(joined));
  if (!ready_ && to_open.empty() && opening_ == 0) {
    MarkReady();
    return;
  }
  std::weak_ptr<ClientMessageSink> weak = weak_from_this();
  opening_ += to_open.size();
  for (BalancerNode* n : to_open) {
    if (!ready_) {
      if (first_opens_.size() < kWaitingForNamed) first_opens_.push_back(n->address);
      ++first_opens_total_;
    }
    n->sink->AsyncOpen([weak, this](error_code) {
      // A failed open is not fatal: the node's chain reports itself down and recovers.
      if (auto self = weak.lock()) {
        --opening_;
        if (!ready_ && !closed_) MarkReady();
      }
    });
  }
}

SinkPtr LoadBalancerSink::MakeNodeSink(const BalancerNode& n) {
  SinkContext ctx = endpoint_ctx_;
  ctx.endpoint = n.endpoint;
  ctx.stats = stats_.WithLabel("endpoint", n.address);
  return endpoint_factory_(ctx);
}

void LoadBalancerSink::ResetNodeSink(BalancerNode& n) {
  SinkPtr old = std::move(n.sink);
  n.sink = MakeNodeSink(n);
  old->Close();
  // Destroy on a later turn: we may be inside the old chain's own response path.
  boost::asio::post(loop_.executor(), [old = std::move(old)] {});
}

void LoadBalancerSink::MarkReady() {
  ready_ = true;
  open_waiters_.CompleteAll(loop_.executor(), {});
  // One at a time: a request's response path may cancel a later one (a backup request's
  // loser), which CancelRequest must still find parked and answer; or close the balancer,
  // which answers the rest.
  while (!parked_.empty()) {
    auto [stack, stream] = parked_.front();
    parked_.pop_front();
    stack->ClearCancelHandler();
    Route(*stack, stack->message(), stream);
  }
}

void LoadBalancerSink::RetireNode(std::unique_ptr<BalancerNode> node) {
  node->removed = true;
  if (node->load > 0) {
    draining_.push_back(std::move(node));  // closed when its last request completes
    return;
  }
  node->sink->Close();
  // Destroy on a later turn: we may be inside this node's own response path.
  boost::asio::post(loop_.executor(), [n = std::move(node)] {});
}

void LoadBalancerSink::Fail(SinkStack& stack, Errc code, std::string detail) {
  auto m = MethodReturnMessage::Failure(make_error_code(code), std::move(detail));
  stack.AsyncProcessResponse(nullptr, m);
}

void LoadBalancerSink::AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  if (closed_) {
    Fail(stack, Errc::kClientClosed, "the client is closed");
    return;
  }
  if (!ready_) {
    if (stack.cancelled()) {
      auto m = MethodReturnMessage::Failure(stack.cancel_reason(),
                                            "cancelled while waiting for the server set");
      stack.AsyncProcessResponse(nullptr, m);
      return;
    }
    parked_.emplace_back(&stack, stream);
    stack.SetCancelHandler(this, nullptr);
    if (!subscribed_) DoOpen(OpenHandler([](error_code) {}));
    return;
  }
  Route(stack, msg, stream);
}

void LoadBalancerSink::Route(SinkStack& stack, MethodCallMessage& msg, Stream* stream) {
  if (nodes_.empty()) {
    no_members_.Increment();
    Fail(stack, Errc::kNoMembers,
         fmt::format("no members in server set {}", server_set_->Describe()));
    return;
  }
  BalancerNode* picked = &PickNode();
  // Only a retry or a backup has endpoints to avoid: a first attempt pays one empty() check.
  const CallProperties& props = msg.properties;
  if (!props.avoid_endpoints.empty() && nodes_.size() > 1 && props.Avoids(picked->address)) {
    if (BalancerNode* other = PickAlternative(*picked, props)) {
      picked = other;
      avoided_.Increment();
    }
  }
  BalancerNode& n = *picked;
  // Counted here, once per request, for the node it goes to: PickNode may have panicked on
  // picks PickAlternative then replaced with a healthy node.
  if (!Healthy(n)) panic_.Increment();
  ++n.load;
  OnLoadChanged(n, true);
  msg.properties.endpoint = n.address;
  stack.Push(this, &n);
  OnRequestRouted(n, stack);
  n.sink->AsyncProcessRequest(stack, msg, stream);
}

BalancerNode* LoadBalancerSink::PickAlternative(BalancerNode& avoid,
                                                const CallProperties& props) {
  // A repeated pick may be a panic pick of a node known down (P2C samples random pairs): taken
  // only when `avoid` is no better (a Busy `avoid` may still answer; a Closed node fails fast).
  const bool avoid_healthy = Healthy(avoid);
  const int avoid_rank = PanicRank(avoid);
  auto no_worse = [&](const BalancerNode& n) {
    return Healthy(n) || (!avoid_healthy && PanicRank(n) >= avoid_rank);
  };
  for (int attempt = 0; attempt < 3; ++attempt) {
    BalancerNode& n = PickNode();
    if (&n != &avoid && !props.Avoids(n.address) && no_worse(n)) return &n;
  }
  BalancerNode* best = nullptr;
  BalancerNode* best_any = nullptr;
  for (const auto& p : nodes_) {
    BalancerNode* n = p.get();
    if (n == &avoid || props.Avoids(n->address)) continue;
    if (no_worse(*n) && (best_any == nullptr || n->load < best_any->load)) best_any = n;
    if (Healthy(*n) && (best == nullptr || n->load < best->load)) best = n;
  }
  if (best != nullptr) return best;
  return avoid_healthy ? nullptr : best_any;
}

void LoadBalancerSink::AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                                            MethodReturnMessage& msg) {
  auto* n = static_cast<BalancerNode*>(context);
  --n->load;
  OnResponse(*n, stack);
  if (n->removed) {
    if (n->load == 0) {
      auto it = std::find_if(draining_.begin(), draining_.end(),
                             [n](const auto& p) { return p.get() == n; });
      if (it != draining_.end()) {
        std::unique_ptr<BalancerNode> node = std::move(*it);
        draining_.erase(it);
        node->sink->Close();
        boost::asio::post(loop_.executor(), [node = std::move(node)] {});
      }
    }
  } else {
    OnLoadChanged(*n, false);
  }
  stack.AsyncProcessResponse(stream, msg);
}

void LoadBalancerSink::CancelRequest(SinkStack& stack, void*, const error_code& reason) {
  auto it = std::find_if(parked_.begin(), parked_.end(), [&](const auto& p) { return p.first == &stack; });
  if (it == parked_.end()) return;
  parked_.erase(it);
  auto m = MethodReturnMessage::Failure(reason, "while waiting for " + WaitingFor());
  stack.AsyncProcessResponse(nullptr, m);
}

bool LoadBalancerSink::RequestUnsent(const SinkStack&, void*) const {
  return true;  // Parked (the only time it holds a request): not routed to any endpoint yet
}

std::string LoadBalancerSink::WaitingFor() const {
  if (nodes_.empty()) return "the server set's first members";
  // The members are known: the balancer waits for the first of the endpoints it opened (all
  // members, or under an aperture its first members) to open.
  std::string names;
  size_t total = first_opens_total_;
  if (total > 0) {
    for (size_t i = 0; i < first_opens_.size(); ++i) names += (i == 0 ? "" : ", ") + first_opens_[i];
  } else {
    total = nodes_.size();
    for (size_t i = 0; i < nodes_.size() && i < kWaitingForNamed; ++i) {
      names += (i == 0 ? "" : ", ") + nodes_[i]->address;
    }
  }
  if (total > kWaitingForNamed) names += fmt::format(" and {} more", total - kWaitingForNamed);
  return fmt::format("the first of the server set's endpoints to open ({})", names);
}

void LoadBalancerSink::Close() {
  if (closed_) return;
  closed_ = true;
  if (subscribed_) {
    server_set_->Unsubscribe(subscription_);
    subscribed_ = false;
  }
  // A closed balancer serves no endpoint: its members leave the size gauge now (membership
  // changes are no longer followed; the destructor does not count them out again).
  if (reports_membership_) {
    size_gauge_.Add(-static_cast<int64_t>(nodes_.size()));
    reports_membership_ = false;
  }
  open_waiters_.CompleteAll(loop_.executor(), make_error_code(Errc::kClientClosed));
  while (!parked_.empty()) {
    auto [stack, stream] = parked_.front();
    parked_.pop_front();
    stack->ClearCancelHandler();
    Fail(*stack, Errc::kClientClosed, "the client was closed while the request waited for " + WaitingFor());
  }
  // Closing a node answers its requests; their responses come back through us, and a
  // draining node whose last request completes leaves draining_ there: close a snapshot.
  std::vector<SinkPtr> sinks;
  for (auto& n : nodes_) sinks.push_back(n->sink);
  for (auto& n : draining_) sinks.push_back(n->sink);
  for (auto& s : sinks) s->Close();
}

SinkStatus LoadBalancerSink::status() const {
  if (closed_) return SinkStatus::kClosed;
  if (!ready_) return SinkStatus::kIdle;
  // Open if any node is usable: one bad node must not make the whole client look closed.
  bool any = false;
  for (auto& n : nodes_) {
    if (Healthy(*n)) return SinkStatus::kOpen;
    any = true;
  }
  return any ? SinkStatus::kBusy : SinkStatus::kOpen;
}

// --- HeapBalancerSink -----------------------------------------------------------------------

HeapBalancerSink::HeapBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory)
    : LoadBalancerSink(ctx, std::move(endpoint_factory)),
      marked_down_(ctx.stats.GetCounter("scales_lb_marked_down")),
      marked_up_(ctx.stats.GetCounter("scales_lb_marked_up")) {}

void HeapBalancerSink::Swap(size_t i, size_t j) {
  std::swap(heap_[i], heap_[j]);
  heap_[i]->index = i;
  heap_[j]->index = j;
}

void HeapBalancerSink::SiftUp(size_t i) {
  while (i > 1 && Key(heap_[i]) < Key(heap_[i / 2])) {
    Swap(i, i / 2);
    i /= 2;
  }
}

void HeapBalancerSink::SiftDown(size_t i) {
  const size_t n = heap_.size() - 1;
  for (;;) {
    size_t smallest = i;
    size_t l = 2 * i;
    if (l <= n && Key(heap_[l]) < Key(heap_[smallest])) smallest = l;
    if (l + 1 <= n && Key(heap_[l + 1]) < Key(heap_[smallest])) smallest = l + 1;
    if (smallest == i) return;
    Swap(i, smallest);
    i = smallest;
  }
}

void HeapBalancerSink::OnNodeAdded(BalancerNode& n) {
  n.index = heap_.size();
  heap_.push_back(&n);
  SiftUp(n.index);
}

void HeapBalancerSink::OnNodeRemoved(BalancerNode& n) {
  size_t i = n.index;
  size_t last = heap_.size() - 1;
  if (i != last) {
    Swap(i, last);
    heap_.pop_back();
    SiftDown(i);
    SiftUp(i);
  } else {
    heap_.pop_back();
  }
  n.index = 0;
  std::erase(down_, &n);
}

BalancerNode* HeapBalancerSink::PickAlternative(BalancerNode& avoid,
                                                const CallProperties& props) {
  // `avoid` is at the top (PickNode returned it): the next least loaded is one of its children,
  // unless the request avoids them too (then the scan of the default).
  BalancerNode* best = nullptr;
  for (size_t i : {size_t{2}, size_t{3}}) {
    if (i < heap_.size() && heap_[i] != &avoid && !heap_[i]->down && Healthy(*heap_[i]) &&
        !props.Avoids(heap_[i]->address) && (best == nullptr || Key(heap_[i]) < Key(best))) {
      best = heap_[i];
    }
  }
  return best != nullptr ? best : LoadBalancerSink::PickAlternative(avoid, props);
}

BalancerNode& HeapBalancerSink::PickNode() {
  // Nodes marked down come back as soon as their chain is usable again.
  for (size_t i = 0; i < down_.size();) {
    BalancerNode* n = down_[i];
    if (Healthy(*n)) {
      n->down = false;
      SiftUp(n->index);
      marked_up_.Increment();
      down_[i] = down_.back();
      down_.pop_back();
    } else {
      ++i;
    }
  }
  for (;;) {
    BalancerNode* top = heap_[1];
    if (top->down) {
      // Every node is down (panic): the least loaded of those that may still answer (Busy),
      // else the least loaded of them all.
      BalancerNode* best = top;
      for (BalancerNode* n : down_) {
        const int rank = PanicRank(*n);
        const int best_rank = PanicRank(*best);
        if (rank > best_rank || (rank == best_rank && n->load < best->load)) best = n;
      }
      return *best;
    }
    if (Healthy(*top)) return *top;
    top->down = true;
    marked_down_.Increment();
    down_.push_back(top);
    SiftDown(1);
  }
}

void HeapBalancerSink::OnLoadChanged(BalancerNode& n, bool increased) {
  if (increased) {
    SiftDown(n.index);
    return;
  }
  SiftUp(n.index);
  const size_t size = heap_.size() - 1;
  if (size > 1) {
    // Break ties at random: swapping two equal keys keeps the heap valid.
    size_t j = 1 + static_cast<size_t>(loop_.random().Uniform(size));
    if (j != n.index && Key(heap_[j]) == Key(&n)) Swap(n.index, j);
  }
}

SinkProvider HeapBalancerProvider() {
  return SinkProvider{std::string(roles::kLoadBalancer), "heap-balancer",
                      [](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                        return std::make_shared<HeapBalancerSink>(ctx, std::move(next));
                      }};
}

}  // namespace scales
