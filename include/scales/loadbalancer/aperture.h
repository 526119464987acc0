#pragma once
// The aperture balancer: least loaded (power of two choices) within the smallest subset of
// the server set — the aperture — that keeps the load average inside a band.
//
//   load average = EMA(total outstanding requests) / aperture size
//
// The EMA is time-weighted on the loop's clock with the configured smoothing window w: when
// the outstanding count changes, and on a periodic tick, ema = sample * (1 - e^(-dt/w)) +
// ema * e^(-dt/w), where sample is the outstanding count that held during the dt since the
// previous update (a step function, so a burst that lasts 100 ms moves a 5 s average by
// about 2 %). It starts at 0.
//
// - The aperture starts with min_size random members; only aperture members are opened
//   (eagerly, as they enter). Nodes outside the aperture keep an unopened endpoint chain.
// - load average >= high_load and a node outside: grow by one random outside node.
// - load average <= low_load and more than min_size healthy members: shrink by one, the least
//   loaded healthy member (ties at random). Its chain is closed once its last request
//   completes and replaced by a fresh unopened one, so it can come back later.
// - A tick every min(1 s, window / 5) re-samples the EMA while there is anything to decide
//   (requests outstanding or the aperture above min_size), so an idle client contracts; an
//   idle client at min_size has no tick armed.
// - Rotation (rotate = true): every UniformDuration(rotate_min, rotate_max) one random
//   outside node is added; once its open completes, if it is healthy one random other healthy
//   member is removed (else the new node is removed again; a new node that leaves the server
//   set before it opened is not replaced). The load band does not shrink the aperture while a
//   rotation waits for its node to open. Cancelled by Close().
// - A member that leaves the server set is replaced by a random outside node. A member whose
//   chain is not usable (Busy or Closed) is marked down and triggers an expansion by one; it
//   stays in the aperture (it receives no traffic while a healthy member exists) until it
//   recovers or leaves.
// - Picking: two distinct members at random (P2C); a healthy one beats a down one, else the
//   lower load wins (a tie goes to the first pick). With one or two members that is exactly
//   least loaded. If both picks are down, up to kMaxEffort pairs are tried, then the least
//   loaded healthy member is searched for, and if every member is down the least loaded
//   member is used.
//
// Metrics (every loop's balancer reports, as deltas: with several loops the gauge is the sum
// of the per-loop apertures and the counters count every loop's changes):
// scales_lb_aperture (gauge), scales_lb_aperture_expansions, scales_lb_aperture_contractions,
// scales_lb_aperture_rotations (counters).
//
// Thread safety: one balancer per event loop; all calls on that loop.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "scales/core/clock.h"
#include "scales/core/timer_queue.h"
#include "scales/loadbalancer/heap_balancer.h"

namespace scales {

struct ApertureOptions {
  // The aperture never shrinks below this (nor below the server set's size). >= 1.
  size_t min_size = 1;
  // Load band on (EMA of outstanding requests) / aperture size. 0 <= low_load < high_load.
  double low_load = 0.5;
  double high_load = 2.0;
  // EMA window. > 0.
  Duration smoothing_window = std::chrono::seconds(5);
  // Periodic rotation of one member, every UniformDuration(rotate_min, rotate_max).
  bool rotate = true;
  Duration rotate_min = std::chrono::seconds(120);
  Duration rotate_max = std::chrono::seconds(240);
};

// Throws scales::Error(kInvalidArgument) when min_size < 1, low_load < 0,
// low_load >= high_load, smoothing_window <= 0, or (rotate) rotate_min <= 0 or
// rotate_min > rotate_max.
void Validate(const ApertureOptions& o);

class ApertureBalancerSink final : public LoadBalancerSink {
 public:
  static constexpr int kMaxEffort = 4;

  // Validates `options` (throws as Validate does).
  ApertureBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory,
                       ApertureOptions options = {});
  ~ApertureBalancerSink() override;

  std::string_view name() const override { return "aperture-balancer"; }
  void Close() override;

  // --- observations (tests) --------------------------------------------------------------
  size_t aperture_size() const noexcept { return aperture_.size(); }
  // The aperture's members, in no particular order.
  const std::vector<BalancerNode*>& aperture() const noexcept { return aperture_; }
  bool InAperture(const BalancerNode& n) const;
  // Outstanding requests over every node (members and draining former members).
  int64_t total_load() const noexcept { return total_load_; }
  // The EMA as of the last update, and the load average it gives.
  double ema() const noexcept { return ema_; }
  double load_average() const noexcept {
    return aperture_.empty() ? 0.0 : ema_ / static_cast<double>(aperture_.size());
  }
  bool tick_armed() const noexcept { return tick_.scheduled(); }
  bool rotation_armed() const noexcept { return rotation_timer_.scheduled(); }
  const ApertureOptions& options() const noexcept { return options_; }

 protected:
  void OnNodeAdded(BalancerNode& n) override;
  void OnNodeRemoved(BalancerNode& n) override;
  std::vector<BalancerNode*> NodesToOpen(std::vector<BalancerNode*> joined) override;
  BalancerNode& PickNode() override;
  // For a request avoiding `avoid` (a retry, a backup): another member not in
  // props.avoid_endpoints, never a node outside the aperture; nullptr (stay on `avoid`) when
  // no such member is healthy.
  BalancerNode* PickAlternative(BalancerNode& avoid, const CallProperties& props) override;
  void OnLoadChanged(BalancerNode& n, bool increased) override;

 private:
  struct Slot {
    bool member = false;
    size_t pos = 0;  // index in aperture_ or outside_
  };

  // Moves a random outside node into the aperture and, if `open`, opens it (now, or at the
  // end of the server-set update in progress). Returns it, or nullptr when there is none.
  BalancerNode* Expand(bool open);
  // Moves member `n` out of the aperture; its chain is reset once it has no load.
  void Contract(BalancerNode& n);
  // The least loaded healthy member (ties at random), skipping `except` and the endpoints
  // `avoid` names (when not null); nullptr if none.
  BalancerNode* LeastLoadedHealthy(const BalancerNode* except,
                                   const CallProperties* avoid = nullptr) const;
  // Fills the aperture up to min(min_size, #nodes).
  void TopUp();
  // Adds the time since the last update at the current outstanding count.
  void SampleEma();
  // Compares the load average with the band and grows or shrinks by one.
  void Evaluate();
  // Marks members whose chain became unusable down (expanding for each) or up again.
  bool CheckHealth(BalancerNode& n);
  void ScanHealth();
  // Gives back the slots of members that went down and recovered (on a tick): one member
  // fewer each, unless that would put the load at the high mark; while a rotation waits for its
  // node the slots stay owed.
  void GiveBack();
  size_t HealthyMembers() const;
  void ArmTick();
  void ArmRotation();
  void OnTick();
  void OnRotation();
  void FinishRotation(uint64_t generation);
  void UpdateGauge();
  void Remove(std::vector<BalancerNode*>& v, BalancerNode& n);

  static void TickThunk(void* self) { static_cast<ApertureBalancerSink*>(self)->OnTick(); }
  static void RotationThunk(void* self) { static_cast<ApertureBalancerSink*>(self)->OnRotation(); }

  ApertureOptions options_;
  Duration tick_period_;
  std::vector<BalancerNode*> aperture_;
  std::vector<BalancerNode*> outside_;
  std::unordered_map<const BalancerNode*, Slot> slots_;
  // Former members still carrying requests: their chain is reset when their load is 0.
  std::unordered_set<BalancerNode*> resetting_;
  // Nodes that entered the aperture during a server-set update (opened by the base).
  std::vector<BalancerNode*> to_open_;
  bool in_update_ = false;
  size_t owed_replacements_ = 0;  // members that left during the update in progress
  size_t down_expansions_ = 0;    // expansions for members that went down, not given back yet
  // Members that went down when no node was outside to widen the aperture with: the expansion
  // is made when a node joins. Down members = down_expansions_ + unpaid_expansions_.
  size_t unpaid_expansions_ = 0;
  size_t owed_give_backs_ = 0;    // of those, the ones whose member recovered (GiveBack)
  bool closed_ = false;
  int64_t total_load_ = 0;
  double ema_ = 0;
  TimePoint ema_stamp_{};
  bool ema_started_ = false;
  // Rotation in progress: the node added, and a generation to ignore stale open callbacks.
  BalancerNode* rotating_ = nullptr;
  uint64_t rotation_generation_ = 0;
  int64_t reported_size_ = 0;
  TimerEntry tick_;
  TimerEntry rotation_timer_;
  stats::Gauge& aperture_gauge_;
  stats::Counter& expansions_;
  stats::Counter& contractions_;
  stats::Counter& rotations_;
};

// Provider of the aperture balancer (role "loadbalancer") with explicit options.
SinkProvider ApertureBalancerProvider(ApertureOptions options = {});

}  // namespace scales
