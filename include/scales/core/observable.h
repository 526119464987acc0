#pragma once
// Observable: a value that notifies subscribers when it is set (the seed's on_faulted).

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace scales {

// Subscribers are called synchronously, in subscription order, by Set(). A subscriber may
// unsubscribe itself or others during notification. Thread safety: use from one event loop.
template <class T>
class Observable {
 public:
  using Callback = std::function<void(const T&)>;

  // Returns an id for Unsubscribe().
  uint64_t Subscribe(Callback cb) {
    uint64_t id = ++next_id_;
    subscribers_.push_back({id, std::move(cb)});
    return id;
  }
  void Unsubscribe(uint64_t id) {
    for (auto& s : subscribers_) {
      if (s.id == id) s.id = 0;
    }
  }
  void Set(const T& value) {
    value_ = value;
    // Index loop: subscribers may be added while notifying (they are not called this time).
    const size_t n = subscribers_.size();
    ++notifying_;
    for (size_t i = 0; i < n && i < subscribers_.size(); ++i) {
      if (subscribers_[i].id != 0) {
        Callback cb = subscribers_[i].cb;  // copy: the subscriber may unsubscribe itself
        cb(value);
      }
    }
    // Only the outermost Set() compacts: a Set() from inside a callback would move the entries
    // under the outer one's index (one subscriber skipped, another called twice).
    if (--notifying_ == 0) std::erase_if(subscribers_, [](const Sub& s) { return s.id == 0; });
  }
  const std::optional<T>& value() const noexcept { return value_; }
  void Reset() { value_.reset(); }
  size_t subscriber_count() const {
    size_t n = 0;
    for (auto& s : subscribers_) n += s.id != 0;
    return n;
  }

 private:
  struct Sub {
    uint64_t id;
    Callback cb;
  };
  std::vector<Sub> subscribers_;
  std::optional<T> value_;
  uint64_t next_id_ = 0;
  int notifying_ = 0;  // Set() calls on the stack
};

}  // namespace scales
