#pragma once
// The envelopes that travel through the sink stack: MethodCallMessage (a request),
// MethodReturnMessage (its outcome) and MethodDiscardMessage (abandon a request).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "scales/core/clock.h"
#include "scales/core/error.h"

namespace scales {

// Application headers, in order; names compare case-insensitively where a protocol says so.
using Headers = std::vector<std::pair<std::string, std::string>>;

// Zipkin/Finagle-style trace identifiers of one call.
struct TraceContext {
  uint64_t trace_id = 0;
  uint64_t span_id = 0;
  uint64_t parent_id = 0;
  uint64_t flags = 0;  // bit 0 debug, bit 1 sampling known, bit 2 sampled
  // The high 64 bits of a 128-bit trace id (B3's 32-digit X-B3-TraceId, Mux's 40-byte
  // TraceContext); 0 = a 64-bit trace id. Root ids the client assigns are 64-bit, as Finagle's.
  uint64_t trace_id_high = 0;
  bool valid() const noexcept { return trace_id != 0; }
};

// Per-call properties, set by the dispatcher and the sinks and read by sinks below.
struct CallProperties {
  // When the call started (the dispatcher's clock).
  TimePoint start{};
  // Absolute deadline for the whole call; nullopt means none. Computed once, from `start`.
  std::optional<TimePoint> deadline;
  // Application headers to send (HTTP headers, Mux request headers).
  Headers headers;
  // The caller's client id (Mux ClientIdContext); empty = none.
  std::string client_id;
  TraceContext trace;
  // Requeue/retry attempt number (0 = first try).
  int retries = 0;
  // The endpoint the balancer chose ("host:port"), for errors and metrics.
  std::string endpoint;
  // CallOptions::idempotent: the retry sink may also retry kConnectionClosed.
  bool idempotent = false;
  // The endpoints ("host:port") earlier attempts of this call went to: the retry sink adds the
  // failed attempt's before a retry, the backup-request sink the first attempt's to a backup's
  // (and, when both attempts failed, the other attempt's to the caller's). Every balancer picks
  // an endpoint not in it when one exists. Empty (no allocation) for a first attempt; at most
  // kMaxAvoidEndpoints entries, the oldest dropped.
  std::vector<std::string> avoid_endpoints;
  static constexpr size_t kMaxAvoidEndpoints = 8;
  bool Avoids(std::string_view endpoint) const noexcept {
    return std::find(avoid_endpoints.begin(), avoid_endpoints.end(), endpoint) !=
           avoid_endpoints.end();
  }
  // Adds `endpoint` to avoid_endpoints unless it is empty or already there.
  void AddAvoidEndpoint(std::string endpoint) {
    if (endpoint.empty() || Avoids(endpoint)) return;
    if (avoid_endpoints.size() >= kMaxAvoidEndpoints) avoid_endpoints.erase(avoid_endpoints.begin());
    avoid_endpoints.push_back(std::move(endpoint));
  }
  // Set by the backup-request sink on a backup (hedged) attempt; ThriftMux sends the
  // com.twitter.finagle.BackupRequest context with it, as Finagle's BackupRequestFilter does.
  bool backup = false;
};

// A request. The payload and the reply slot are typed, non-owning pointers into the call
// object that the typed client allocated; they stay valid until the response reaches the
// dispatcher.
class MethodCallMessage {
 public:
  // Client label ("service"); used in error messages and metrics.
  std::string_view service;
  // Method name: the HTTP verb, or the Thrift method.
  std::string method;
  CallProperties properties;

  template <class T>
  void SetPayload(T* payload) noexcept {
    payload_ = payload;
    payload_type_ = TypeTag<T>();
  }
  // The payload if it has type T, else nullptr.
  template <class T>
  T* payload() const noexcept {
    return payload_type_ == TypeTag<T>() ? static_cast<T*>(payload_) : nullptr;
  }

  template <class T>
  void SetReplySlot(T* slot) noexcept {
    reply_ = slot;
    reply_type_ = TypeTag<T>();
  }
  template <class T>
  T* reply_slot() const noexcept {
    return reply_type_ == TypeTag<T>() ? static_cast<T*>(reply_) : nullptr;
  }

 private:
  template <class T>
  static const void* TypeTag() noexcept {
    static const char tag = 0;
    return &tag;
  }
  void* payload_ = nullptr;
  const void* payload_type_ = nullptr;
  void* reply_ = nullptr;
  const void* reply_type_ = nullptr;
};

// The outcome of a request. On success the reply value has been written into the call's
// reply slot; on failure `error` is set and `detail` explains it (endpoint, step, limit).
struct MethodReturnMessage {
  error_code error;
  std::string detail;
  // Response metadata a protocol carries beside the reply (Mux response headers).
  Headers headers;

  static MethodReturnMessage Ok() { return {}; }
  static MethodReturnMessage Failure(error_code ec, std::string detail) {
    return {ec, std::move(detail), {}};
  }
  bool ok() const noexcept { return !error; }
};

// Abandon a request that was sent (Mux Tdiscarded); `which` identifies it to the transport.
struct MethodDiscardMessage {
  uint32_t which = 0;
  std::string reason;
};

}  // namespace scales
