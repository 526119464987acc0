// Calls through empty (default-constructed) client handles: each completes once with
// kClientClosed and its detail, never inside the initiating function, on the handler's own
// executor, which it keeps working until then (Asio's rule); and a handler that throws is
// reported and dropped like any other call's, not let out on a thread of the system executor
// (which would end the process).

#include <stdexcept>
#include <string>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include "Echo.h"
#include "support/log_capture.h"
#include "scales/core/clock.h"
#include "scales/core/log.h"
#include "scales/http/client.h"
#include "scales/thrift/client.h"

namespace scales {
namespace {

TEST(EmptyClientTest, HttpCallCompletesOnItsHandlersExecutorWithTheDetail) {
  http::HttpClient empty;
  boost::asio::io_context ioc;
  CallInfo info;
  CallOptions options;
  options.info = &info;
  int completions = 0;
  bool initiated = false;
  error_code got;
  empty.AsyncSend(http::Request{"GET", "/", {}, {}}, options,
                  boost::asio::bind_executor(ioc, [&](error_code ec, http::Response) {
                    EXPECT_TRUE(initiated) << "completed inside the initiating function";
                    ++completions;
                    got = ec;
                  }));
  initiated = true;
  ioc.run();  // returns once the handler ran: the call keeps work on its executor until then
  EXPECT_EQ(completions, 1);
  EXPECT_EQ(got, Errc::kClientClosed);
  EXPECT_EQ(info.error, Errc::kClientClosed);
  EXPECT_EQ(info.detail, "HttpClient is empty (default-constructed)");
}

TEST(EmptyClientTest, ThriftCallCompletesWithTheDetail) {
  thrift::ThriftClient<echo::EchoClient> empty;
  boost::asio::io_context ioc;
  int completions = 0;
  std::string what;
  SCALES_THRIFT_CALL(empty, echo, std::string("x"),
                     boost::asio::bind_executor(ioc, [&](std::exception_ptr e, std::string) {
                       ++completions;
                       try {
                         if (e) std::rethrow_exception(e);
                       } catch (const Error& err) {
                         EXPECT_EQ(err.scales_code(), Errc::kClientClosed);
                         what = err.what();
                       }
                     }));
  ioc.run();
  EXPECT_EQ(completions, 1);
  EXPECT_NE(what.find("ThriftClient is empty (default-constructed)"), std::string::npos) << what;
}

TEST(EmptyClientTest, AThrowingHandlerIsReportedAndDropped) {
  test::LogCapture log(LogLevel::kError);
  // The report is rate limited per call site, shared with the other tests of the process: a log
  // clock moved on gives this one a window of its own.
  auto log_clock = std::make_shared<ManualClock>();
  auto previous_log_clock = SetLogClock(log_clock);
  log_clock->Advance(std::chrono::seconds(2));
  http::HttpClient empty;
  boost::asio::io_context ioc;
  int ran = 0;
  empty.AsyncGet("/", boost::asio::bind_executor(ioc, [&](error_code, http::Response) {
                   ++ran;
                   throw std::runtime_error("the empty client's handler broke");
                 }));
  EXPECT_NO_THROW(ioc.run());
  EXPECT_EQ(ran, 1);
  EXPECT_TRUE(log.Has({"a handler on an event loop threw", "the empty client's handler broke"})) << log.All();
  SetLogClock(previous_log_clock);
}

}  // namespace
}  // namespace scales
