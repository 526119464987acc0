#pragma once

#include <string>
#include <utility>

#include <fmt/format.h>

#include "scales/core/error.h"

namespace scales {

// Maps the error a connection's open reported to the code and message a request gets:
// scales codes (kConnectTimeout, ...) stay, except kConnectionClosed (a Mux server closing or
// resetting the connection during the handshake), which says the request may have been
// processed: nothing was sent on a connection that never opened, so it becomes the retryable
// kConnectFailed; system errors become kConnectFailed too.
// `detail`: the sink's own account of the failure (ClientMessageSink::open_failure_detail()),
// used as the message when not empty.
inline std::pair<error_code, std::string> ConnectFailure(const std::string& address, error_code ec,
                                                         std::string detail = {}) {
  if (ec == Errc::kConnectionClosed) ec = make_error_code(Errc::kConnectFailed);
  if (!detail.empty()) {
    return {ec.category() == error_category() ? ec : make_error_code(Errc::kConnectFailed), std::move(detail)};
  }
  if (ec.category() == error_category()) {
    if (ec == Errc::kConnectTimeout) return {ec, fmt::format("connect to {} timed out", address)};
    return {ec, fmt::format("connect to {} failed: {}", address, ec.message())};
  }
  return {make_error_code(Errc::kConnectFailed), fmt::format("connect to {} failed: {}", address, ec.message())};
}

}  // namespace scales
