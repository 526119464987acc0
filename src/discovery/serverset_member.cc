#include "scales/discovery/serverset_member.h"

#include <algorithm>

#include <boost/json.hpp>
#include <fmt/format.h>

namespace scales {
namespace {

namespace json = boost::json;

bool ParseEndpoint(const json::value& v, std::string_view where, Endpoint& out,
                   std::string& error) {
  const json::object* obj = v.if_object();
  if (!obj) {
    error = fmt::format("{}: not an object", where);
    return false;
  }
  const json::value* host = obj->if_contains("host");
  if (!host || !host->is_string() || host->as_string().empty()) {
    error = fmt::format("{}.host: missing or not a non-empty string", where);
    return false;
  }
  const json::value* port = obj->if_contains("port");
  int64_t p = 0;
  if (port && port->is_int64()) {
    p = port->as_int64();
  } else if (port && port->is_uint64()) {  // over int64's range, so over 65535
    error = fmt::format("{}.port: {} is out of range 1..65535", where, port->as_uint64());
    return false;
  } else {
    error = fmt::format("{}.port: missing or not an integer", where);
    return false;
  }
  if (p < 1 || p > 65535) {
    error = fmt::format("{}.port: {} is out of range 1..65535", where, p);
    return false;
  }
  out.host = std::string(host->as_string());
  out.port = static_cast<uint16_t>(p);
  return true;
}

json::object EndpointToJson(const Endpoint& ep) {
  json::object o;
  o["host"] = ep.host;
  o["port"] = ep.port;
  return o;
}

}  // namespace

std::optional<ServiceInstance> ParseServiceInstance(std::string_view text, std::string& error,
                                                    std::vector<std::string>* skipped) {
  boost::system::error_code ec;
  json::value doc = json::parse(json::string_view(text.data(), text.size()), ec);
  if (ec) {
    error = fmt::format("not JSON: {}", ec.message());
    return std::nullopt;
  }
  const json::object* root = doc.if_object();
  if (!root) {
    error = "not a JSON object";
    return std::nullopt;
  }
  ServiceInstance out;
  const json::value* se = root->if_contains("serviceEndpoint");
  if (!se) {
    error = "serviceEndpoint: missing";
    return std::nullopt;
  }
  if (!ParseEndpoint(*se, "serviceEndpoint", out.service_endpoint, error)) return std::nullopt;

  const json::value* status = root->if_contains("status");
  if (!status || !status->is_string()) {
    error = "status: missing or not a string";
    return std::nullopt;
  }
  out.status = std::string(status->as_string());

  if (const json::value* ae = root->if_contains("additionalEndpoints"); ae && !ae->is_null()) {
    const json::object* obj = ae->if_object();
    if (!obj) {
      error = "additionalEndpoints: not an object";
      return std::nullopt;
    }
    for (const auto& [name, value] : *obj) {
      // One bad entry drops only itself (as Finagle's parser does): the member still serves
      // its serviceEndpoint and its other endpoints.
      Endpoint ep;
      std::string problem;
      if (!ParseEndpoint(value, fmt::format("additionalEndpoints.{}", std::string_view(name)), ep, problem)) {
        if (skipped) skipped->push_back(std::move(problem));
        continue;
      }
      out.additional_endpoints.emplace(std::string(name), std::move(ep));
    }
  }
  if (const json::value* shard = root->if_contains("shard")) {
    if (shard->is_int64()) out.shard = shard->as_int64();
    // scales ignores an unparsable shard; so do we (it is not used for routing).
  }
  if (const json::value* md = root->if_contains("metadata"); md && md->is_object()) {
    for (const auto& [key, value] : md->as_object()) {
      if (value.is_string()) out.metadata.emplace(std::string(key), std::string(value.as_string()));
    }
  }
  return out;
}

std::string SerializeServiceInstance(const ServiceInstance& instance) {
  // Built by hand to keep Finagle's key order (Boost.JSON objects keep insertion order too,
  // but this makes the order explicit).
  json::object additional;
  for (const auto& [name, ep] : instance.additional_endpoints) additional[name] = EndpointToJson(ep);
  std::string out = "{\"serviceEndpoint\":" + json::serialize(EndpointToJson(instance.service_endpoint));
  out += ",\"additionalEndpoints\":" + json::serialize(additional);
  out += ",\"status\":" + json::serialize(json::value(instance.status));
  if (instance.shard) out += fmt::format(",\"shard\":{}", *instance.shard);
  if (!instance.metadata.empty()) {
    json::object md;
    for (const auto& [k, v] : instance.metadata) md[k] = v;
    out += ",\"metadata\":" + json::serialize(md);
  }
  out += "}";
  return out;
}

std::optional<Endpoint> SelectEndpoint(const ServiceInstance& instance,
                                       std::string_view endpoint_name) {
  if (instance.status != "ALIVE") return std::nullopt;
  if (endpoint_name.empty()) return instance.service_endpoint;
  auto it = instance.additional_endpoints.find(std::string(endpoint_name));
  if (it == instance.additional_endpoints.end()) return std::nullopt;
  return it->second;
}

std::vector<Endpoint> SelectEndpoints(const std::vector<const ServiceInstance*>& instances,
                                      std::string_view endpoint_name) {
  std::vector<Endpoint> out;
  out.reserve(instances.size());
  for (const ServiceInstance* instance : instances) {
    if (auto ep = SelectEndpoint(*instance, endpoint_name)) out.push_back(std::move(*ep));
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace scales
