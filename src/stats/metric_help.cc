#include "stats/metric_help.h"

#include <algorithm>
#include <array>
#include <utility>

namespace scales::stats {
namespace {

using Entry = std::pair<std::string_view, std::string_view>;

// Sorted by name (checked at compile time below) for the binary search.
constexpr std::array kHelp = {
    Entry{"scales_backup_requests_budget_exhausted",
          "Backup requests a budget refused (the backup budget or the retry budget)."},
    Entry{"scales_backup_requests_retry_budget_exhausted",
          "Backup requests the retry budget refused (counted in budget_exhausted too)."},
    Entry{"scales_backup_requests_sent", "Backup requests sent."},
    Entry{"scales_backup_requests_won", "Calls whose reply came from a successful backup request."},
    Entry{"scales_backup_send_after_us",
          "Delay after which a backup request is sent, in microseconds."},
    Entry{"scales_bytes_received", "Bytes read from the endpoint's connections."},
    Entry{"scales_bytes_sent", "Bytes written to the endpoint's connections."},
    Entry{"scales_connect_errors", "TCP connects that failed."},
    Entry{"scales_connect_latency_us", "Time of each successful TCP connect, in microseconds."},
    Entry{"scales_connections", "TCP connections open."},
    Entry{"scales_connects", "TCP connects that succeeded."},
    Entry{"scales_discovery_malformed_members",
          "ZooKeeper member reads whose data did not parse (the member was skipped)."},
    Entry{"scales_discovery_read_retries",
          "ZooKeeper reads scheduled again after a refusal (no read permission, throttled)."},
    Entry{"scales_discovery_updates",
          "Member lists the ZooKeeper server set published (the first, then one per change)."},
    Entry{"scales_endpoint_failed_fast",
          "Requests refused with failed_fast while the endpoint was down."},
    Entry{"scales_endpoint_marked_down",
          "Times the endpoint was marked down after a failed connect."},
    Entry{"scales_endpoint_reconnect_attempts",
          "Background reconnect attempts while the endpoint was down."},
    Entry{"scales_failure_accrual_dead",
          "1 per endpoint and event loop while failure accrual holds it dead."},
    Entry{"scales_failure_accrual_removals", "Times failure accrual marked the endpoint dead."},
    Entry{"scales_failure_accrual_revivals", "Times a successful probe revived the endpoint."},
    Entry{"scales_failures", "Calls completed with an error."},
    Entry{"scales_failures_by_error", "Calls completed with an error, by error name."},
    Entry{"scales_lb_aperture", "Aperture size, summed over event loops."},
    Entry{"scales_lb_aperture_contractions", "Times the aperture shrank."},
    Entry{"scales_lb_aperture_expansions", "Times the aperture grew."},
    Entry{"scales_lb_aperture_rotations", "Jittered rotations of one aperture member."},
    Entry{"scales_lb_avoided",
          "Picks moved off the endpoint a retry or backup request asked to avoid."},
    Entry{"scales_lb_joins", "Endpoints added from server-set updates."},
    Entry{"scales_lb_leaves", "Endpoints removed from server-set updates."},
    Entry{"scales_lb_marked_down",
          "Times the heap balancer marked its least loaded endpoint down."},
    Entry{"scales_lb_marked_up", "Times a marked-down endpoint was usable again."},
    Entry{"scales_lb_no_members", "Requests failed with no_members (empty server set)."},
    Entry{"scales_lb_panic", "Requests sent to an unhealthy endpoint: no healthy one was found."},
    Entry{"scales_lb_size", "Endpoints in the load balancer."},
    Entry{"scales_mux_discards", "Mux Tdiscarded messages sent."},
    Entry{"scales_mux_drains", "Mux Tdrain messages received."},
    Entry{"scales_mux_nacks", "Mux replies with status Nack."},
    Entry{"scales_mux_ping_timeouts", "Mux sessions closed because no Rping came in time."},
    Entry{"scales_mux_pings", "Mux Tping messages sent."},
    Entry{"scales_mux_protocol_errors", "Mux sessions closed for a protocol error."},
    Entry{"scales_mux_tags_in_use", "Mux tags held on the endpoint's sessions."},
    Entry{"scales_mux_tls_upgrades", "Mux sessions upgraded to TLS by opportunistic negotiation."},
    Entry{"scales_pending", "Calls dispatched and not yet completed."},
    Entry{"scales_pool_connect_failures", "Pool connections whose open failed."},
    Entry{"scales_pool_idle", "Pool connections waiting for a request."},
    Entry{"scales_pool_idle_expired", "Idle pool connections closed after idle_timeout."},
    Entry{"scales_pool_queue_full", "Requests refused with pool_queue_full."},
    Entry{"scales_pool_size", "Connections in the pool, including connecting ones."},
    Entry{"scales_pool_waiters", "Requests queued for a pool connection."},
    Entry{"scales_rejected", "Calls rejected before dispatch, by reason (max_pending)."},
    Entry{"scales_request_latency_us",
          "Latency of completed calls, success or failure, in microseconds."},
    Entry{"scales_requests", "Calls dispatched."},
    Entry{"scales_retries", "Requests sent again after a retryable failure."},
    Entry{"scales_retry_budget_balance",
          "Retries the retry budget would allow now, summed over event loops."},
    Entry{"scales_retry_budget_exhausted", "Retries refused by the retry budget."},
    Entry{"scales_successes", "Calls completed without error."},
    Entry{"scales_timeouts", "Calls that failed with request_timeout."},
    Entry{"scales_tls_resumptions", "TLS handshakes that resumed a kept session."},
    Entry{"scales_zk_connection_losses",
          "Disconnects of an established ZooKeeper connection (the session may survive them)."},
    Entry{"scales_zk_session_expirations", "ZooKeeper sessions the ensemble expired."},
    Entry{"scales_zk_sessions", "ZooKeeper sessions established (1, plus one per new session)."},
};

static_assert(std::is_sorted(kHelp.begin(), kHelp.end(),
                             [](const Entry& a, const Entry& b) { return a.first < b.first; }));

}  // namespace

std::string_view BuiltinHelp(std::string_view name) noexcept {
  auto it = std::lower_bound(kHelp.begin(), kHelp.end(), name,
                             [](const Entry& e, std::string_view n) { return e.first < n; });
  return it != kHelp.end() && it->first == name ? it->second : std::string_view();
}

}  // namespace scales::stats
