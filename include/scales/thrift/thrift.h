#pragma once
// The scales Thrift client (the seed's Thrift.NewClient / Scales.NewBuilder):
//
//   auto client = scales::Thrift::NewClient<scales::echo::EchoClient>("tcp://127.0.0.1:9090");
//   std::string r;
//   client->echo(r, "hi");                                        // blocking
//   auto f = SCALES_THRIFT_CALL(client, echo, "hi", boost::asio::use_future);
//
//   auto c2 = scales::Thrift::NewBuilder<EchoClient>()
//                 .SetUri("tcp://h1:9090,h2:9090")
//                 .SetTimeout(std::chrono::seconds(2))
//                 .SetProtocol(scales::thrift::Protocol::kCompact)
//                 .SetFraming(scales::thrift::Framing::kBuffered)
//                 .Build();
//
// Default stack: dispatcher -> timeout -> retry -> thrift serializer (formatter) -> aperture
// balancer -> failure accrual -> resurrector -> watermark pool -> framed Thrift transport.
// Call styles, errors and threading: scales/thrift/client.h.

#include <chrono>
#include <memory>
#include <string>

#include "scales/core/builder.h"
#include "scales/core/client.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/resilience/default_stack.h"
#include "scales/pool/watermark_pool.h"
#include "scales/thrift/client.h"
#include "scales/thrift/message.h"
#include "scales/thrift/serializer.h"
#include "scales/thrift/transport.h"

namespace scales {

namespace thrift {

// Everything a Thrift client can be configured with. Validated by Build().
// Balancer, resurrector, retry and failure accrual: ResilienceOptions
// (scales/resilience/default_stack.h).
struct ThriftOptions : ResilienceOptions {
  // Name, URI, timeout (default 60 s, as scales), open timeout, runtime, stats, server set.
  ClientOptions client = [] {
    ClientOptions o;
    o.timeout = std::chrono::seconds(60);
    return o;
  }();
  // Wire protocol: binary (default) or compact. Must match the server's.
  Protocol protocol = Protocol::kBinary;
  // Framing (framed by default), connect timeout, largest frame.
  TransportOptions transport;
  // Connections per endpoint (per event loop): one request at a time on each.
  WatermarkPoolOptions pool;
  // Client id given to every call (CallProperties::client_id). Plain Thrift has no place for
  // it on the wire; ThriftMux sends it as the ClientId context.
  std::string client_id;
};

// Throws scales::Error(kInvalidArgument) naming the first unusable field.
void Validate(const ThriftOptions& o);

// The default stack for `options`: timeout -> retry -> serializer -> aperture balancer ->
// failure accrual -> resurrector -> watermark pool -> Thrift transport.
SinkStackSpec DefaultThriftStack(const ThriftOptions& options);

// Validates `options`, builds the client core over `spec` and opens it (waiting up to the open
// timeout). Throws scales::Error.
std::shared_ptr<ClientCore> BuildThriftCore(const ThriftOptions& options, SinkStackSpec spec);

// Builder with the seed's API. Thread safety: a plain value.
template <class G>
class ThriftClientBuilder : public ClientBuilderBase<ThriftClientBuilder<G>> {
 public:
  explicit ThriftClientBuilder(ThriftOptions options = {}) : options_(std::move(options)) {}

  ThriftClientBuilder& SetProtocol(Protocol p) { options_.protocol = p; return *this; }
  ThriftClientBuilder& SetFraming(Framing f) { options_.transport.framing = f; return *this; }
  ThriftClientBuilder& SetMaxFrameBytes(size_t n) { options_.transport.max_frame_bytes = n; return *this; }
  ThriftClientBuilder& SetConnectTimeout(Duration d) { options_.transport.connect_timeout = d; return *this; }
  ThriftClientBuilder& SetPool(WatermarkPoolOptions p) { options_.pool = p; return *this; }
  ThriftClientBuilder& SetResurrector(ResurrectorOptions r) { options_.resurrector = r; return *this; }
  ThriftClientBuilder& SetClientId(std::string id) { options_.client_id = std::move(id); return *this; }
  ThriftOptions& options() noexcept { return options_; }
  ClientOptions& client_options() noexcept { return options_.client; }

  // Builds and opens the client. Throws scales::Error.
  ThriftClient<G> Build() {
    return this->NamingTheClient([&] {
      Validate(options_);
      auto core = BuildThriftCore(options_, this->ApplyEdits(DefaultThriftStack(options_)));
      return ThriftClient<G>(std::move(core), options_.protocol, options_.client_id);
    });
  }

 private:
  ThriftOptions options_;
};

}  // namespace thrift

// Entry points named as in the seed.
class Thrift {
 public:
  // A client of service `G` (the generated FooClient) at `uri`, with `options`.
  template <class G>
  static thrift::ThriftClient<G> NewClient(std::string uri, thrift::ThriftOptions options = {}) {
    options.client.uri = std::move(uri);
    return thrift::ThriftClientBuilder<G>(std::move(options)).Build();
  }
  template <class G>
  static thrift::ThriftClientBuilder<G> NewBuilder(thrift::ThriftOptions options = {}) {
    return thrift::ThriftClientBuilder<G>(std::move(options));
  }
};

}  // namespace scales
