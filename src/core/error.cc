#include "scales/core/error.h"

#include <fmt/format.h>

namespace scales {
namespace {

class ErrorCategory final : public boost::system::error_category {
 public:
  // A fixed id keeps codes comparable across shared-library boundaries.
  ErrorCategory() noexcept : boost::system::error_category(0x5ca1e5e770000001ULL) {}
  const char* name() const noexcept override { return "scales"; }
  std::string message(int ev) const override {
    switch (static_cast<Errc>(ev)) {
      case Errc::kOk: return "success";
      case Errc::kConnectTimeout: return "connect timed out";
      case Errc::kConnectFailed: return "connect failed";
      case Errc::kRequestTimeout: return "request timed out (deadline exceeded)";
      case Errc::kNoMembers: return "no members in the server set";
      case Errc::kFailedFast: return "endpoint is down (failed fast)";
      case Errc::kPoolQueueFull: return "pool queue full";
      case Errc::kRetryBudgetExhausted: return "retry budget exhausted";
      case Errc::kConnectionClosed: return "connection closed";
      case Errc::kProtocolError: return "protocol error";
      case Errc::kServerError: return "server error";
      case Errc::kNack: return "request refused by the server (nack)";
      case Errc::kCancelled: return "request cancelled";
      case Errc::kDiscoveryFailed: return "service discovery failed";
      case Errc::kBadUri: return "bad URI";
      case Errc::kClientClosed: return "client closed";
      case Errc::kResponseTooLarge: return "response too large";
      case Errc::kHttpError: return "HTTP error status";
      case Errc::kBlockingCallOnEventLoop: return "blocking call made on the client's event loop";
      case Errc::kInvalidArgument: return "invalid argument";
      case Errc::kOpenTimeout: return "client open timed out";
      case Errc::kTooManyPending: return "too many pending requests";
      case Errc::kRequestTooLarge: return "request too large";
      case Errc::kTlsFailed: return "TLS failed (handshake, alert or negotiation)";
      case Errc::kNotSent: return "connection closed before the request was sent";
      case Errc::kNonRetryableNack: return "request refused by the server, not to be retried (non-retryable nack)";
    }
    return fmt::format("unknown scales error {}", ev);
  }
  bool equivalent(int code, const boost::system::error_condition& cond) const noexcept override {
    if (cond.category() != condition_category()) {
      return default_error_condition(code) == cond;
    }
    auto e = static_cast<Errc>(code);
    switch (static_cast<Condition>(cond.value())) {
      case Condition::kTimeout:
        return e == Errc::kConnectTimeout || e == Errc::kRequestTimeout || e == Errc::kOpenTimeout;
      case Condition::kRetryable:
        // Failures where the request certainly did not reach a server's application.
        return e == Errc::kConnectTimeout || e == Errc::kConnectFailed || e == Errc::kNack ||
               e == Errc::kFailedFast || e == Errc::kPoolQueueFull || e == Errc::kNotSent;
      case Condition::kUnavailable:
        return e == Errc::kNoMembers || e == Errc::kFailedFast || e == Errc::kConnectFailed ||
               e == Errc::kConnectTimeout || e == Errc::kDiscoveryFailed ||
               e == Errc::kClientClosed || e == Errc::kTlsFailed;
    }
    return false;
  }
};

class ConditionCategory final : public boost::system::error_category {
 public:
  ConditionCategory() noexcept : boost::system::error_category(0x5ca1e5e770000002ULL) {}
  const char* name() const noexcept override { return "scales.condition"; }
  std::string message(int ev) const override {
    switch (static_cast<Condition>(ev)) {
      case Condition::kTimeout: return "timeout";
      case Condition::kRetryable: return "retryable";
      case Condition::kUnavailable: return "unavailable";
    }
    return fmt::format("unknown scales condition {}", ev);
  }
};

}  // namespace

const boost::system::error_category& error_category() noexcept {
  static const ErrorCategory kCategory;
  return kCategory;
}

const boost::system::error_category& condition_category() noexcept {
  static const ConditionCategory kCategory;
  return kCategory;
}

std::string ErrorName(const error_code& ec) {
  if (ec.category() == error_category()) {
    switch (static_cast<Errc>(ec.value())) {
      case Errc::kOk: return "ok";
      case Errc::kConnectTimeout: return "connect_timeout";
      case Errc::kConnectFailed: return "connect_failed";
      case Errc::kRequestTimeout: return "request_timeout";
      case Errc::kNoMembers: return "no_members";
      case Errc::kFailedFast: return "failed_fast";
      case Errc::kPoolQueueFull: return "pool_queue_full";
      case Errc::kRetryBudgetExhausted: return "retry_budget_exhausted";
      case Errc::kConnectionClosed: return "connection_closed";
      case Errc::kProtocolError: return "protocol_error";
      case Errc::kServerError: return "server_error";
      case Errc::kNack: return "nack";
      case Errc::kCancelled: return "cancelled";
      case Errc::kDiscoveryFailed: return "discovery_failed";
      case Errc::kBadUri: return "bad_uri";
      case Errc::kClientClosed: return "client_closed";
      case Errc::kResponseTooLarge: return "response_too_large";
      case Errc::kHttpError: return "http_error";
      case Errc::kBlockingCallOnEventLoop: return "blocking_call_on_event_loop";
      case Errc::kInvalidArgument: return "invalid_argument";
      case Errc::kOpenTimeout: return "open_timeout";
      case Errc::kTooManyPending: return "too_many_pending";
      case Errc::kRequestTooLarge: return "request_too_large";
      case Errc::kTlsFailed: return "tls_failed";
      case Errc::kNotSent: return "not_sent";
      case Errc::kNonRetryableNack: return "non_retryable_nack";
    }
  }
  return fmt::format("{}:{}", ec.category().name(), ec.value());
}

}  // namespace scales
