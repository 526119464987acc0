#pragma once
// Thrown(f): the scales::Error that f() throws; a test failure (and an empty kOk error) when it
// throws none. For the many "this must fail with ..." checks:
//   Error e = Thrown([&] { Http::NewClient("tcp://x?tls=yes", options); });
//   EXPECT_EQ(e.code(), Errc::kBadUri);
#include <gtest/gtest.h>

#include "scales/core/error.h"

namespace scales::test {

inline Error Thrown(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no scales::Error thrown";
  return Error(make_error_code(Errc::kOk), "");
}

}  // namespace scales::test
