#include "scales/core/clock.h"

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>

#include "core/duration_text.h"

namespace scales {
namespace {

class SteadyAlarm final : public Alarm {
 public:
  SteadyAlarm(boost::asio::any_io_executor executor, std::function<void()> on_fire)
      : timer_(std::move(executor)), on_fire_(std::move(on_fire)) {}

  void Set(TimePoint when) override {
    timer_.expires_at(when);
    timer_.async_wait([this](const boost::system::error_code& ec) {
      // An aborted wait means Set() or Cancel() replaced it, or the alarm is being destroyed:
      // `this` must not be touched then.
      if (ec) return;
      on_fire_();
    });
  }
  void Cancel() override { timer_.cancel(); }

 private:
  boost::asio::steady_timer timer_;
  std::function<void()> on_fire_;
};

// The thread's ClockTurn state: plain data (usable at any point of the thread's life).
struct TurnCache {
  unsigned depth;  // live ClockTurns on this thread
  bool have_now;
  bool have_wall;
  TimePoint now;
  TimePoint wall_steady;  // the steady reading `wall` was paired with
  WallTime wall;
};
thread_local TurnCache t_turn{};

}  // namespace

ClockTurn::ClockTurn() noexcept { ++t_turn.depth; }

ClockTurn::~ClockTurn() {
  TurnCache& t = t_turn;
  if (--t.depth == 0) t.have_now = t.have_wall = false;
}

void ClockTurn::Refresh() noexcept { t_turn.have_now = false; }

TimePoint SteadyClock::Now() const noexcept {
  TurnCache& t = t_turn;
  if (t.depth == 0) return std::chrono::steady_clock::now();
  if (!t.have_now) {
    t.now = std::chrono::steady_clock::now();
    t.have_now = true;
  }
  return t.now;
}

WallTime SteadyClock::WallNow() const noexcept {
  TurnCache& t = t_turn;
  if (t.depth == 0) return std::chrono::system_clock::now();
  const TimePoint now = Now();
  if (!t.have_wall) {
    t.wall = std::chrono::system_clock::now();
    t.wall_steady = now;
    t.have_wall = true;
  }
  return t.wall + std::chrono::duration_cast<WallTime::duration>(now - t.wall_steady);
}

std::unique_ptr<Alarm> SteadyClock::CreateAlarm(boost::asio::any_io_executor executor,
                                                std::function<void()> on_fire) {
  return std::make_unique<SteadyAlarm>(std::move(executor), std::move(on_fire));
}

std::shared_ptr<SteadyClock> SteadyClock::Instance() {
  static auto instance = std::make_shared<SteadyClock>();
  return instance;
}

// The posted callback holds `state` so that an alarm destroyed before its callback runs is
// detected instead of touched.
class ManualClock::ManualAlarm final : public Alarm {
 public:
  struct State {
    std::function<void()> on_fire;
    bool alive = true;
  };

  ManualAlarm(ManualClock& clock, boost::asio::any_io_executor executor,
              std::function<void()> on_fire)
      : clock_(clock), executor_(std::move(executor)), state_(std::make_shared<State>()) {
    state_->on_fire = std::move(on_fire);
  }
  ~ManualAlarm() override {
    Cancel();
    state_->alive = false;
  }

  void Set(TimePoint when) override {
    std::lock_guard lock(clock_.mu_);
    when_ = when;
    clock_.alarms_.insert(this);
    if (when_ <= clock_.now_) FireLocked();
  }
  void Cancel() override {
    std::lock_guard lock(clock_.mu_);
    clock_.alarms_.erase(this);
  }

  TimePoint when() const { return when_; }
  // Called with the clock's mutex held.
  void FireLocked() {
    clock_.alarms_.erase(this);
    boost::asio::post(executor_, [state = state_] {
      if (state->alive) state->on_fire();
    });
  }

 private:
  ManualClock& clock_;
  boost::asio::any_io_executor executor_;
  std::shared_ptr<State> state_;
  TimePoint when_{};
};

ManualClock::ManualClock(TimePoint start, WallTime wall_start) : now_(start), wall_now_(wall_start) {}

TimePoint ManualClock::Now() const noexcept {
  std::lock_guard lock(mu_);
  return now_;
}

WallTime ManualClock::WallNow() const noexcept {
  std::lock_guard lock(mu_);
  return wall_now_;
}

std::unique_ptr<Alarm> ManualClock::CreateAlarm(boost::asio::any_io_executor executor,
                                                std::function<void()> on_fire) {
  return std::make_unique<ManualAlarm>(*this, std::move(executor), std::move(on_fire));
}

void ManualClock::Advance(Duration d) {
  std::lock_guard lock(mu_);
  now_ += d;
  wall_now_ += std::chrono::duration_cast<WallTime::duration>(d);
  std::vector<ManualAlarm*> due;
  for (ManualAlarm* a : alarms_) {
    if (a->when() <= now_) due.push_back(a);
  }
  for (ManualAlarm* a : due) a->FireLocked();
}

size_t ManualClock::armed_alarms() const {
  std::lock_guard lock(mu_);
  return alarms_.size();
}

std::string DurationText(Duration d) {
  using std::chrono::milliseconds;
  if (d < Duration::zero()) {
    // -Duration::min() would overflow: one nanosecond more is the same text for any reader.
    return "-" + DurationText(d == Duration::min() ? Duration::max() : -d);
  }
  const int64_t ns = std::chrono::nanoseconds(d).count();
  if (ns % 1'000'000 == 0) return fmt::format("{} ms", ns / 1'000'000);
  if (d < milliseconds(1)) {
    return ns % 1000 == 0 ? fmt::format("{} us", ns / 1000) : fmt::format("{} ns", ns);
  }
  // Milliseconds with up to six decimals, trailing zeros dropped: "1.5 ms", "2.000001 ms".
  std::string frac = fmt::format("{:06}", ns % 1'000'000);
  while (frac.back() == '0') frac.pop_back();
  return fmt::format("{}.{} ms", ns / 1'000'000, frac);
}

std::string ApproxDurationText(Duration d) {
  if (d < Duration::zero())
    return "-" + ApproxDurationText(d == Duration::min() ? Duration::max() : -d);
  const int64_t ns = std::chrono::nanoseconds(d).count();
  // One decimal, dropped when it is 0: "7.5", "8".
  auto tenths = [](int64_t value, int64_t unit) {
    const int64_t t = value / (unit / 10) + (value % (unit / 10) >= unit / 20 ? 1 : 0);
    return t % 10 == 0 ? fmt::format("{}", t / 10) : fmt::format("{}.{}", t / 10, t % 10);
  };
  auto rounded = [](int64_t value, int64_t unit) {
    return value / unit + (value % unit >= unit / 2 ? 1 : 0);
  };
  if (ns < 1'000) return fmt::format("{} ns", ns);
  if (ns < 999'500) return fmt::format("{} us", rounded(ns, 1'000));
  if (ns < 9'950'000) return fmt::format("{} ms", tenths(ns, 1'000'000));
  if (ns < 9'999'500'000) return fmt::format("{} ms", rounded(ns, 1'000'000));
  return fmt::format("{} s", tenths(ns, 1'000'000'000));
}

}  // namespace scales
