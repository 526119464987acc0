#include "scales/loadbalancer/aperture.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>

#include "scales/core/error.h"
#include "scales/core/runtime.h"
#include "scales/loadbalancer/balancers.h"

namespace scales {

using std::chrono::duration;
using std::chrono::milliseconds;
using std::chrono::seconds;

void Validate(const ApertureOptions& o) {
  auto fail = [](const std::string& what) {
    throw Error(make_error_code(Errc::kInvalidArgument), "aperture balancer: " + what);
  };
  if (o.min_size < 1) fail("min_size must be at least 1");
  if (!(o.low_load >= 0)) fail("low_load must be >= 0");
  if (!(o.low_load < o.high_load)) fail("low_load must be below high_load");
  if (o.smoothing_window <= Duration::zero()) fail("smoothing_window must be positive");
  if (o.rotate) {
    if (o.rotate_min <= Duration::zero()) fail("rotate_min must be positive");
    if (o.rotate_min > o.rotate_max) fail("rotate_min must not exceed rotate_max");
  }
}

namespace {

ApertureOptions Validated(ApertureOptions o) {
  Validate(o);
  return o;
}

}  // namespace

ApertureBalancerSink::ApertureBalancerSink(const SinkContext& ctx, SinkFactory endpoint_factory,
                                           ApertureOptions options)
    : LoadBalancerSink(ctx, std::move(endpoint_factory)),
      options_(Validated(options)),
      tick_period_(std::max<Duration>(milliseconds(1),
                                      std::min<Duration>(seconds(1), options_.smoothing_window / 5))),
      ema_stamp_(loop_.Now()),
      aperture_gauge_(ctx.stats.GetGauge("scales_lb_aperture")),
      expansions_(ctx.stats.GetCounter("scales_lb_aperture_expansions")),
      contractions_(ctx.stats.GetCounter("scales_lb_aperture_contractions")),
      rotations_(ctx.stats.GetCounter("scales_lb_aperture_rotations")) {}

ApertureBalancerSink::~ApertureBalancerSink() {
  tick_.Cancel();
  rotation_timer_.Cancel();
  aperture_gauge_.Add(-reported_size_);
}

void ApertureBalancerSink::Close() {
  if (closed_) return;
  closed_ = true;
  tick_.Cancel();
  rotation_timer_.Cancel();
  rotating_ = nullptr;
  // A closed balancer serves no endpoint: its aperture leaves the gauge now (it no longer
  // changes; the destructor does not count it out again).
  aperture_gauge_.Add(-reported_size_);
  reported_size_ = 0;
  LoadBalancerSink::Close();
}

bool ApertureBalancerSink::InAperture(const BalancerNode& n) const {
  auto it = slots_.find(&n);
  return it != slots_.end() && it->second.member;
}

void ApertureBalancerSink::Remove(std::vector<BalancerNode*>& v, BalancerNode& n) {
  Slot& slot = slots_.at(&n);
  size_t pos = slot.pos;
  if (pos + 1 != v.size()) {
    v[pos] = v.back();
    slots_.at(v[pos]).pos = pos;
  }
  v.pop_back();
}

void ApertureBalancerSink::UpdateGauge() {
  if (closed_) return;  // counted out by Close()
  auto size = static_cast<int64_t>(aperture_.size());
  if (size != reported_size_) {
    aperture_gauge_.Add(size - reported_size_);
    reported_size_ = size;
  }
}

// --- membership ------------------------------------------------------------------------------

void ApertureBalancerSink::OnNodeAdded(BalancerNode& n) {
  in_update_ = true;
  n.down = false;
  slots_[&n] = Slot{false, outside_.size()};
  outside_.push_back(&n);
}

void ApertureBalancerSink::OnNodeRemoved(BalancerNode& n) {
  in_update_ = true;
  // Its outstanding requests complete through the base class without OnLoadChanged. The load
  // that held until now is sampled first, as OnLoadChanged does.
  SampleEma();
  total_load_ -= n.load;
  resetting_.erase(&n);
  std::erase(to_open_, &n);
  const bool rotating = rotating_ == &n;
  if (rotating) rotating_ = nullptr;
  auto it = slots_.find(&n);
  if (it == slots_.end()) return;
  if (it->second.member) {
    Remove(aperture_, n);
    if (rotating) {
      // The node a rotation added, before the rotation finished: the rotation is abandoned (as
      // when its open fails) and the member it would have replaced stays, so no replacement is
      // owed; an expansion its going down caused is given back, as Contract does.
      if (n.down && unpaid_expansions_ > 0) {
        --unpaid_expansions_;
      } else if (n.down && down_expansions_ > 0) {
        --down_expansions_;
        ++owed_give_backs_;
      }
    } else if (n.down && unpaid_expansions_ > 0) {
      // A down member whose expansion is still owed: that expansion is no longer owed, and the
      // member is replaced like any other.
      --unpaid_expansions_;
      ++owed_replacements_;
    } else if (n.down && down_expansions_ > 0) {
      // A member that went down already got its replacement (the expansion): none is owed,
      // and that expansion is no longer one to give back when it recovers.
      --down_expansions_;
    } else {
      ++owed_replacements_;
    }
  } else {
    Remove(outside_, n);
  }
  slots_.erase(&n);
}

std::vector<BalancerNode*> ApertureBalancerSink::NodesToOpen(std::vector<BalancerNode*> /*joined*/) {
  // Members that left are replaced (from the nodes outside, joiners included); then the
  // aperture is filled up to min_size.
  for (; owed_replacements_ > 0 && !outside_.empty(); --owed_replacements_) Expand(true);
  owed_replacements_ = 0;
  // Members that went down while no node was outside get their expansion from the joiners:
  // otherwise a lone down member would keep every request while a healthy node waits outside.
  for (; unpaid_expansions_ > 0 && !outside_.empty(); --unpaid_expansions_) {
    Expand(true);
    expansions_.Increment();
    ++down_expansions_;
  }
  TopUp();
  in_update_ = false;
  std::vector<BalancerNode*> result = std::move(to_open_);
  to_open_.clear();
  UpdateGauge();
  ArmTick();
  ArmRotation();
  return result;
}

void ApertureBalancerSink::TopUp() {
  while (aperture_.size() < options_.min_size && !outside_.empty()) Expand(true);
}

BalancerNode* ApertureBalancerSink::Expand(bool open) {
  if (outside_.empty() || closed_) return nullptr;
  BalancerNode* n = outside_[static_cast<size_t>(loop_.random().Uniform(outside_.size()))];
  Remove(outside_, *n);
  slots_[n] = Slot{true, aperture_.size()};
  aperture_.push_back(n);
  n->down = false;
  // A former member whose old chain still drains keeps it (it is open); otherwise its chain
  // is fresh and is opened now.
  resetting_.erase(n);
  if (open) {
    if (in_update_) {
      to_open_.push_back(n);
    } else {
      n->sink->AsyncOpen([](error_code) {});
    }
  }
  UpdateGauge();
  return n;
}

void ApertureBalancerSink::Contract(BalancerNode& n) {
  Remove(aperture_, n);
  // A down member leaving the aperture takes the expansion it caused (or was owed) with it.
  if (n.down && unpaid_expansions_ > 0) {
    --unpaid_expansions_;
  } else if (n.down && down_expansions_ > 0) {
    // The expansion its going down caused stays a member: give that slot back (GiveBack, on a
    // tick), or a rotation whose node failed would leave the aperture one wider for good.
    --down_expansions_;
    ++owed_give_backs_;
  }
  slots_[&n] = Slot{false, outside_.size()};
  outside_.push_back(&n);
  n.down = false;
  std::erase(to_open_, &n);
  if (n.load == 0) {
    ResetNodeSink(n);
  } else {
    resetting_.insert(&n);
  }
  UpdateGauge();
  ArmTick();
}

// --- health ----------------------------------------------------------------------------------

bool ApertureBalancerSink::CheckHealth(BalancerNode& n) {
  bool healthy = Healthy(n);
  if (!healthy && !n.down) {
    n.down = true;
    // A member went down: widen the aperture by one (the down node stays a member), or, with
    // no node outside, as soon as one joins (NodesToOpen).
    if (Expand(true) != nullptr) {
      expansions_.Increment();
      ++down_expansions_;
    } else {
      ++unpaid_expansions_;
    }
    ArmTick();
  } else if (healthy && n.down) {
    n.down = false;
    if (unpaid_expansions_ > 0) {
      // The expansions made still cover the members still down: nothing to give back.
      --unpaid_expansions_;
      return healthy;
    }
    // Recovered: the slot its going down added is given back on the next tick (GiveBack; not
    // here, inside a pick). Otherwise a member that keeps going down and up (failure
    // accrual's probes, the resurrector's reconnects) would widen the aperture by one each
    // time, and a load inside the band never shrinks it.
    if (down_expansions_ > 0) {
      --down_expansions_;
      ++owed_give_backs_;
      ArmTick();
    }
  }
  return healthy;
}

void ApertureBalancerSink::GiveBack() {
  // Not while a rotation waits for its node: the slots stay owed until a tick after it ended
  // (dropped here, they would leave the aperture wider for good under a load inside the band).
  if (rotating_ != nullptr) return;
  for (; owed_give_backs_ > 0; --owed_give_backs_) {
    // Unless the load needs the slot: one member less must stay below the high mark.
    const size_t size = aperture_.size();
    if (size <= options_.min_size || ema_ / static_cast<double>(size - 1) >= options_.high_load) {
      continue;
    }
    if (BalancerNode* victim = LeastLoadedHealthy(nullptr)) {
      Contract(*victim);
      contractions_.Increment();
    }
  }
}

void ApertureBalancerSink::ScanHealth() {
  // CheckHealth may append to aperture_: iterate by index over the members present now.
  const size_t size = aperture_.size();
  for (size_t i = 0; i < size && i < aperture_.size(); ++i) CheckHealth(*aperture_[i]);
}

size_t ApertureBalancerSink::HealthyMembers() const {
  size_t healthy = 0;
  for (const BalancerNode* n : aperture_) {
    if (!n->down && Healthy(*n)) ++healthy;
  }
  return healthy;
}

BalancerNode* ApertureBalancerSink::LeastLoadedHealthy(const BalancerNode* except,
                                                       const CallProperties* avoid) const {
  BalancerNode* best = nullptr;
  uint64_t ties = 0;
  for (BalancerNode* n : aperture_) {
    if (n == except || n->down || !Healthy(*n)) continue;
    if (avoid != nullptr && avoid->Avoids(n->address)) continue;
    if (best == nullptr || n->load < best->load) {
      best = n;
      ties = 1;
    } else if (n->load == best->load) {
      // Reservoir sampling: each of the equally loaded nodes with probability 1/ties.
      ++ties;
      if (loop_.random().Uniform(ties) == 0) best = n;
    }
  }
  return best;
}

// --- picking ---------------------------------------------------------------------------------

BalancerNode* ApertureBalancerSink::PickAlternative(BalancerNode& avoid,
                                                    const CallProperties& props) {
  // Another healthy member the request does not avoid (least loaded, ties at random), or none:
  // the request stays on `avoid`. Never a node outside the aperture: its chain would open a
  // connection that only a member leaving the aperture gets reset, so it would stay open for
  // good. (An unhealthy member already made the aperture expand, so another member is usually
  // there.)
  return LeastLoadedHealthy(&avoid, &props);
}

BalancerNode& ApertureBalancerSink::PickNode() {
  if (aperture_.empty()) TopUp();
  if (aperture_.empty()) return *nodes().front();  // not reached: nodes exist, min_size >= 1
  if (aperture_.size() == 1) {
    BalancerNode* only = aperture_[0];
    if (CheckHealth(*only) || aperture_.size() == 1) return *only;  // healthy, or no other
  }
  for (int effort = 0; effort < kMaxEffort; ++effort) {
    const auto size = static_cast<uint64_t>(aperture_.size());
    auto i = static_cast<size_t>(loop_.random().Uniform(size));
    auto j = static_cast<size_t>(loop_.random().Uniform(size - 1));
    if (j >= i) ++j;
    BalancerNode* a = aperture_[i];
    BalancerNode* b = aperture_[j];
    bool ha = CheckHealth(*a);
    bool hb = CheckHealth(*b);
    if (ha && hb) return b->load < a->load ? *b : *a;
    if (ha) return *a;
    if (hb) return *b;
  }
  ScanHealth();
  if (BalancerNode* n = LeastLoadedHealthy(nullptr)) return *n;
  // Every member is down (panic): the least loaded of those that may still answer (Busy),
  // else the least loaded.
  BalancerNode* best = aperture_[0];
  for (BalancerNode* n : aperture_) {
    const int rank = PanicRank(*n);
    const int best_rank = PanicRank(*best);
    if (rank > best_rank || (rank == best_rank && n->load < best->load)) best = n;
  }
  return *best;
}

void ApertureBalancerSink::OnLoadChanged(BalancerNode& n, bool increased) {
  SampleEma();
  total_load_ += increased ? 1 : -1;
  if (!increased && n.load == 0 && !resetting_.empty() && resetting_.erase(&n) > 0 && !closed_) {
    ResetNodeSink(n);
  }
  Evaluate();
  if (increased) ArmTick();
}

// --- load band -------------------------------------------------------------------------------

void ApertureBalancerSink::SampleEma() {
  TimePoint now = loop_.Now();
  if (now <= ema_stamp_) return;
  double dt = duration<double>(now - ema_stamp_).count();
  double w = duration<double>(options_.smoothing_window).count();
  const double x = dt / w;
  // Loads change every few microseconds against a window of seconds: for such steps the
  // series 1 - x + x^2/2 is e^-x to within x^3/6 (< 2e-10), and much cheaper than exp().
  double decay = x < 1e-3 ? 1.0 - x + 0.5 * x * x : std::exp(-x);
  // The outstanding count held constant since the last update.
  ema_ = static_cast<double>(total_load_) * (1.0 - decay) + ema_ * decay;
  ema_stamp_ = now;
}

void ApertureBalancerSink::Evaluate() {
  if (closed_ || aperture_.empty() || in_update_) return;
  // Nothing to add and nothing above the minimum to drop (every endpoint already a member of a
  // minimal aperture, the common case for small server sets): no decision to make.
  if (outside_.empty() && aperture_.size() <= options_.min_size) return;
  double avg = load_average();
  if (avg >= options_.high_load) {
    if (Expand(true) != nullptr) expansions_.Increment();
  } else if (avg <= options_.low_load && rotating_ == nullptr && aperture_.size() > options_.min_size &&
             HealthyMembers() > options_.min_size) {
    if (BalancerNode* victim = LeastLoadedHealthy(nullptr)) {
      Contract(*victim);
      contractions_.Increment();
    }
  }
}

void ApertureBalancerSink::ArmTick() {
  if (closed_ || tick_.scheduled()) return;
  if (total_load_ == 0 && aperture_.size() <= options_.min_size) return;
  loop_.timers().Schedule(tick_, DeadlineAfter(loop_.Now(), tick_period_), &TickThunk, this);
}

void ApertureBalancerSink::OnTick() {
  if (closed_) return;
  SampleEma();
  ScanHealth();
  GiveBack();
  Evaluate();
  ArmTick();
}

// --- rotation --------------------------------------------------------------------------------

void ApertureBalancerSink::ArmRotation() {
  if (closed_ || !options_.rotate || rotation_timer_.scheduled()) return;
  Duration delay = loop_.random().UniformDuration(options_.rotate_min, options_.rotate_max);
  loop_.timers().Schedule(rotation_timer_, DeadlineAfter(loop_.Now(), delay), &RotationThunk, this);
}

void ApertureBalancerSink::OnRotation() {
  if (closed_) return;
  if (rotating_ == nullptr && !outside_.empty()) {
    BalancerNode* n = Expand(false);
    rotating_ = n;
    uint64_t generation = ++rotation_generation_;
    std::weak_ptr<ClientMessageSink> weak = weak_from_this();
    n->sink->AsyncOpen([weak, this, generation](error_code) {
      if (auto self = weak.lock()) FinishRotation(generation);
    });
  }
  ArmRotation();
}

void ApertureBalancerSink::FinishRotation(uint64_t generation) {
  if (closed_ || generation != rotation_generation_ || rotating_ == nullptr) return;
  BalancerNode* added = rotating_;
  rotating_ = nullptr;
  if (!InAperture(*added)) return;  // contracted meanwhile
  if (!Healthy(*added)) {
    Contract(*added);  // its open failed: the rotation is abandoned
    return;
  }
  // Remove one random healthy member other than the new one.
  BalancerNode* victim = nullptr;
  uint64_t seen = 0;
  for (BalancerNode* n : aperture_) {
    if (n == added || n->down || !Healthy(*n)) continue;
    ++seen;
    if (loop_.random().Uniform(seen) == 0) victim = n;
  }
  if (victim != nullptr) {
    Contract(*victim);
    rotations_.Increment();
  }
}

// --- providers -------------------------------------------------------------------------------

SinkProvider ApertureBalancerProvider(ApertureOptions options) {
  Validate(options);
  SinkProvider p{std::string(roles::kLoadBalancer), "aperture-balancer",
                 [options](const SinkContext& ctx, SinkFactory next) -> SinkPtr {
                   return std::make_shared<ApertureBalancerSink>(ctx, std::move(next), options);
                 }};
  p.settings = {{"min_size", SettingText(options.min_size)},
                {"low_load", SettingText(options.low_load)},
                {"high_load", SettingText(options.high_load)},
                {"smoothing_window", SettingText(options.smoothing_window)},
                {"rotate", SettingText(options.rotate)},
                {"rotate_min", SettingText(options.rotate_min)},
                {"rotate_max", SettingText(options.rotate_max)}};
  return p;
}

SinkProvider ApertureProvider(const BalancerOptions& o) { return ApertureBalancerProvider(o.aperture); }

}  // namespace scales
