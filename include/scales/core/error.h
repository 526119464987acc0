#pragma once
// Error codes, conditions and the exception type of scales.
//
// Errors are values on the request path: every asynchronous call completes with a
// boost::system::error_code (which converts implicitly to std::error_code) whose
// category is scales::error_category(). Codes are grouped by conditions
// (Condition::kTimeout, kRetryable, kUnavailable) so callers can write
//   if (ec == scales::Condition::kTimeout) ...
// The blocking API throws scales::Error, whose what() names the client, the
// endpoint, the step and the budget that was exceeded.

#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>

#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

namespace scales {

using error_code = boost::system::error_code;

// Every code scales produces. Values are stable (they appear in metrics and logs).
enum class Errc {
  kOk = 0,
  kConnectTimeout = 1,        // TCP connect did not finish within connect_timeout
  kConnectFailed = 2,         // TCP connect failed (refused, unreachable, DNS failure)
  kRequestTimeout = 3,        // the call's deadline passed before a reply arrived
  kNoMembers = 4,             // the server set is empty
  kFailedFast = 5,            // the endpoint is marked down; the request was not sent
  kPoolQueueFull = 6,         // the pool is at its high watermark and its queue is full
  kRetryBudgetExhausted = 7,  // a retry was wanted but the retry budget is empty
  kConnectionClosed = 8,      // the connection closed or failed while the request was on it
  kProtocolError = 9,         // the peer sent bytes that do not parse
  kServerError = 10,          // the server answered with an error (Mux Rerr / Rdispatch Error)
  kNack = 11,                 // the server refused the request without processing it
  kCancelled = 12,            // the caller (or a sink above) cancelled the request
  kDiscoveryFailed = 13,      // service discovery could not produce a server set
  kBadUri = 14,               // the client URI does not parse
  kClientClosed = 15,         // the client was closed before or while the call ran
  kResponseTooLarge = 16,     // a response exceeded a configured size limit
  kHttpError = 17,            // HTTP status >= 400 and raise_on_http_error is set
  kBlockingCallOnEventLoop = 18,  // a blocking call was made from the client's event loop
  kInvalidArgument = 19,      // a request or option is invalid
  kOpenTimeout = 20,          // the client did not finish opening within open_timeout
  kTooManyPending = 21,       // max pending requests of the client reached
  kRequestTooLarge = 22,      // a request exceeded a configured size limit
  kTlsFailed = 23,            // TLS failed: the handshake (verification, protocol, a peer not
                              // speaking TLS), an alert, or the Mux TLS levels
  kNotSent = 24,              // the connection closed or failed before the request was written whole
                              // (not a byte of it for HTTP, whose servers may act on part of one)
  kNonRetryableNack = 25,     // the server refused the request unprocessed and asked that it not be retried
};

// Groups of codes.
enum class Condition {
  kTimeout = 1,      // kConnectTimeout, kRequestTimeout, kOpenTimeout
  kRetryable = 2,    // failures known not to have been processed by a server
  kUnavailable = 3,  // no usable server: no members, endpoint down, connect failed, ...
};

const boost::system::error_category& error_category() noexcept;
const boost::system::error_category& condition_category() noexcept;

inline error_code make_error_code(Errc e) noexcept {
  return error_code(static_cast<int>(e), error_category());
}
inline boost::system::error_condition make_error_condition(Condition c) noexcept {
  return boost::system::error_condition(static_cast<int>(c), condition_category());
}

// Name of a code as used in metrics and reports ("request_timeout", ...).
// For codes of other categories: "<category>:<value>".
std::string ErrorName(const error_code& ec);

// The exception thrown by blocking calls. Derives from std::system_error so that
// code() returns a std::error_code equal to the scales code.
class Error : public std::system_error {
 public:
  Error(const error_code& ec, const std::string& message)
      : std::system_error(std::error_code(ec), message), scales_code_(ec), message_(message) {}
  const error_code& scales_code() const noexcept { return scales_code_; }
  // The message alone (std::system_error would append the code's generic text).
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  error_code scales_code_;
  std::string message_;
};

}  // namespace scales

namespace boost::system {
template <>
struct is_error_code_enum<scales::Errc> : std::true_type {};
template <>
struct is_error_condition_enum<scales::Condition> : std::true_type {};
}  // namespace boost::system

// Also usable with std::error_code: `std_ec == scales::Errc::kRequestTimeout` and
// `std_ec == scales::Condition::kTimeout` work (Boost.System maps its categories to std ones).
namespace std {
template <>
struct is_error_code_enum<scales::Errc> : true_type {};
template <>
struct is_error_condition_enum<scales::Condition> : true_type {};
}  // namespace std
