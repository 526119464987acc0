// The Thrift and ThriftMux calls of `scales demo`, through the client class Apache Thrift
// generates for tools/echo.thrift: a blocking call, a future, a declared exception arriving as
// itself, and a timeout.
#include <chrono>
#include <cstdio>
#include <string>

#include <boost/asio/use_future.hpp>

#include "demo.h"

namespace scales::tools {

void ShowThriftCalls(const thrift::ThriftClient<echo::EchoClient>& client) {
  using namespace std::chrono_literals;
  std::string r;
  client->echo(r, "hi");
  std::printf("   blocking   client->echo(r, \"hi\")                                   -> \"%s\"\n", r.c_str());
  auto f = SCALES_THRIFT_CALL(client, echo, std::string("async hi"), boost::asio::use_future);
  std::printf("   future     SCALES_THRIFT_CALL(client, echo, \"async hi\", use_future) -> \"%s\"\n", f.get().c_str());
  try {
    client->fail(r, "no such user");
  } catch (const echo::EchoError& e) {
    std::printf("   declared   client->fail(r, \"no such user\") threw EchoError(\"%s\")\n", e.message.c_str());
  }
  CallOptions quick;
  quick.timeout = 100ms;
  try {
    client.WithOptions(quick)->sleep(r, 1000);
  } catch (const Error& e) {
    std::printf("   timeout    sleep(1000) with a 100 ms timeout -> %s\n              %s\n",
                ErrorName(e.scales_code()).c_str(), e.what());
  }
}

}  // namespace scales::tools
