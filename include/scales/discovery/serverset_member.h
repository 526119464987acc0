#pragma once
// The serverset member format: the JSON that Finagle's (and Twitter commons') announcers write
// into each `member_NNNNNNNNNN` znode of a ZooKeeper server set (a Gson rendering of the Thrift
// struct ServiceInstance):
//
//   {"serviceEndpoint": {"host": "10.1.2.3", "port": 9090},
//    "additionalEndpoints": {"http": {"host": "10.1.2.3", "port": 8080}},
//    "status": "ALIVE", "shard": 4, "metadata": {"zone": "a"}}
//
// Parsing rules (what a reader accepts; see docs/configuration.md, "ZooKeeper"):
//  - the document is an object; `serviceEndpoint` (an object with a non-empty string `host`
//    and an integer `port` in 1..65535) and `status` (a string) are required;
//  - `additionalEndpoints` is optional (Finagle always writes it, possibly `{}`); when present it
//    must be an object; an entry that is not an endpoint object as above is dropped alone (as
//    Finagle does: the member keeps its serviceEndpoint and its other endpoints);
//  - `shard` is optional; a value that is not an integer is ignored (as scales does);
//  - `metadata` is optional; non-string values in it are ignored;
//  - other keys are ignored. Anything else makes the member malformed.
//
// Pure functions, no state: safe from any thread.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "scales/discovery/endpoint.h"

namespace scales {

struct ServiceInstance {
  Endpoint service_endpoint;
  std::map<std::string, Endpoint> additional_endpoints;
  std::string status = "ALIVE";  // DEAD, STARTING, ALIVE, STOPPING, STOPPED, WARNING
  std::optional<int64_t> shard;
  std::map<std::string, std::string> metadata;

  friend bool operator==(const ServiceInstance&, const ServiceInstance&) = default;
};

// Parses member data. On failure returns nullopt and sets `error` to what is wrong
// ("serviceEndpoint.port: 70000 is out of range 1..65535"). Additional endpoints dropped from a
// member that parsed are described in `skipped`, when given ("additionalEndpoints.http.port:
// missing or not an integer").
std::optional<ServiceInstance> ParseServiceInstance(std::string_view json, std::string& error,
                                                    std::vector<std::string>* skipped = nullptr);

// Renders `instance` the way Finagle writes it: serviceEndpoint, additionalEndpoints (always,
// possibly {}), status, then shard and metadata only when set.
std::string SerializeServiceInstance(const ServiceInstance& instance);

// The endpoint of `instance` that receives traffic for a server set URI with fragment
// `endpoint_name` (empty: the serviceEndpoint), or nullopt when the member gets no traffic:
// its status is not ALIVE, or it has no additional endpoint of that name.
std::optional<Endpoint> SelectEndpoint(const ServiceInstance& instance,
                                       std::string_view endpoint_name);

// The traffic-receiving endpoints of `instances`, sorted, duplicates (the same host:port
// announced by several members) collapsed.
std::vector<Endpoint> SelectEndpoints(const std::vector<const ServiceInstance*>& instances,
                                      std::string_view endpoint_name);

}  // namespace scales
