#pragma once
// The scales ThriftMux client (the seed's ThriftMux.NewClient), for Finagle ThriftMux servers:
//
//   auto client = scales::ThriftMux::NewClient<scales::echo::EchoClient>("tcp://127.0.0.1:9090");
//   std::string r;
//   client->echo(r, "hi");                                             // blocking
//   SCALES_THRIFT_CALL(client, echo, std::string("hi"), token);        // any completion token
//
// The calls are the same as the Thrift client's (scales/thrift/client.h): the code Apache
// Thrift generates serialises them; declared exceptions reach the caller as themselves. The
// stack differs: every endpoint has one multiplexed Mux session (a SingletonPool over a
// MuxSessionSink), the payloads are strict binary Thrift with sequence id 0 and no framing,
// and the call's deadline, client id, retry count and headers travel as Mux contexts.
// One-way calls are refused (kInvalidArgument), as Finagle's ThriftMux client does.
//
// Default stack: dispatcher -> timeout -> retry -> thriftmux serializer -> aperture balancer ->
// failure accrual -> resurrector -> singleton pool -> Mux session.
//
// TLS, both ways Finagle does it (options.session, or per URI):
//   tcp://host:9090?tls=on&tls_ca_file=/etc/ca.pem              TLS from the first byte
//   tcp://host:9090?opportunistic_tls=required&tls_ca_file=...    negotiated in Tinit
// The URI keys are those of ApplyTlsQuery (scales/transport/tls.h: tls, tls_ca_file,
// tls_server_name, tls_cert_file, tls_key_file, tls_verify, tls_resume_sessions) and
// opportunistic_tls=off|desired|required; they override the options and are removed from the
// URI before discovery sees it.
//
// Thread safety: the client is a cheap handle; calls are safe from any thread.

#include <memory>
#include <string>

#include "scales/core/builder.h"
#include "scales/core/client.h"
#include "scales/core/forwarding_sink.h"
#include "scales/loadbalancer/balancers.h"
#include "scales/loadbalancer/resurrector.h"
#include "scales/resilience/default_stack.h"
#include "scales/mux/session.h"
#include "scales/pool/singleton_pool.h"
#include "scales/thrift/client.h"

namespace scales {

namespace thriftmux {

// Balancer, resurrector, retry and failure accrual: ResilienceOptions
// (scales/resilience/default_stack.h).
struct ThriftMuxOptions : ResilienceOptions {
  // Name, URI, timeout (default 10 s, as scales' ThriftMux), open timeout, runtime, stats.
  ClientOptions client = [] {
    ClientOptions o;
    o.timeout = std::chrono::seconds(10);
    return o;
  }();
  // The Mux session: connect timeout, handshake, frame/fragment limits, pings, deadline
  // propagation, TLS (first byte or opportunistic), the queued control replies bound.
  mux::SessionOptions session;
  // The session pool: how many requests may wait while a session connects.
  SingletonPoolOptions pool;
  // Sent as the ClientIdContext of every call; empty = none.
  std::string client_id;
};

// Throws scales::Error(kInvalidArgument) naming the first unusable field.
void Validate(const ThriftMuxOptions& o);

// Moves the per-URI session settings of o.client.uri's query into o.session (the TLS keys of
// ApplyTlsQuery into o.session.tls, opportunistic_tls into o.session.opportunistic_tls) and
// removes them from the URI, leaving the rest (discovery's keys) in place. An https:// URI turns
// o.session.tls on (TLS from the first byte). Throws scales::Error(kBadUri) naming the key and
// value (also for https://...?tls=off). The builder calls it; call it yourself
// before DefaultThriftMuxStack when building a core by hand.
void ApplyUriOptions(ThriftMuxOptions& o);

// The ThriftMux formatter (role "formatter"): checks that the payload is a strict binary
// Thrift CALL (one-way calls are refused), names the call's method after it, and checks that
// the reply names the same method with the same sequence id.
// Thread safety: one per client per event loop.
class ThriftMuxSerializerSink final : public ForwardingSink {
 public:
  explicit ThriftMuxSerializerSink(SinkPtr next) : ForwardingSink(std::move(next)) {}
  void AsyncProcessRequest(SinkStack& stack, MethodCallMessage& msg, Stream* stream) override;
  void AsyncProcessResponse(SinkStack& stack, void* context, Stream* stream,
                            MethodReturnMessage& msg) override;
  std::string_view name() const override { return "thriftmux-serializer"; }
};

SinkProvider ThriftMuxSerializerProvider();

// The default stack for `options`.
SinkStackSpec DefaultThriftMuxStack(const ThriftMuxOptions& options);

// Validates, builds the core over `spec` and opens it. Throws scales::Error.
std::shared_ptr<ClientCore> BuildThriftMuxCore(const ThriftMuxOptions& options, SinkStackSpec spec);

template <class G>
class ThriftMuxClientBuilder : public ClientBuilderBase<ThriftMuxClientBuilder<G>> {
 public:
  explicit ThriftMuxClientBuilder(ThriftMuxOptions options = {}) : options_(std::move(options)) {}

  ThriftMuxClientBuilder& SetClientId(std::string id) { options_.client_id = std::move(id); return *this; }
  ThriftMuxClientBuilder& SetSession(mux::SessionOptions s) { options_.session = s; return *this; }
  // TLS from the first byte (tls.enabled), and the CA/verification/client certificate that
  // opportunistic TLS uses.
  ThriftMuxClientBuilder& SetTls(TlsOptions tls) { options_.session.tls = std::move(tls); return *this; }
  ThriftMuxClientBuilder& SetOpportunisticTls(mux::OpportunisticTls level) {
    options_.session.opportunistic_tls = level;
    return *this;
  }
  ThriftMuxClientBuilder& SetResurrector(ResurrectorOptions r) { options_.resurrector = r; return *this; }
  ThriftMuxOptions& options() noexcept { return options_; }
  ClientOptions& client_options() noexcept { return options_.client; }

  thrift::ThriftClient<G> Build() {
    return this->NamingTheClient([&] {
      ThriftMuxOptions effective = options_;
      ApplyUriOptions(effective);
      Validate(effective);
      auto core = BuildThriftMuxCore(effective, this->ApplyEdits(DefaultThriftMuxStack(effective)));
      return thrift::ThriftClient<G>(std::move(core), thrift::Protocol::kBinary, effective.client_id);
    });
  }

 private:
  ThriftMuxOptions options_;
};

}  // namespace thriftmux

class ThriftMux {
 public:
  template <class G>
  static thrift::ThriftClient<G> NewClient(std::string uri, thriftmux::ThriftMuxOptions options = {}) {
    options.client.uri = std::move(uri);
    return thriftmux::ThriftMuxClientBuilder<G>(std::move(options)).Build();
  }
  template <class G>
  static thriftmux::ThriftMuxClientBuilder<G> NewBuilder(thriftmux::ThriftMuxOptions options = {}) {
    return thriftmux::ThriftMuxClientBuilder<G>(std::move(options));
  }
};

}  // namespace scales
