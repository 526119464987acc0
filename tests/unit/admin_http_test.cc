// The admin server's path normalisation (src/admin/admin_http.h): RFC 3986 5.2.4
// remove_dot_segments, with the RFC's examples.

#include <string>
#include <string_view>
#include <utility>

#include <gtest/gtest.h>

#include "admin/admin_http.h"

namespace scales::admin::internal {
namespace {

// RFC 3986 5.2.4's own examples, and the edges of its rules.
TEST(RemoveDotSegmentsTest, TheRfcsExamplesAndEdges) {
  const std::pair<std::string_view, std::string_view> cases[] = {
      {"/a/b/c/./../../g", "/a/g"},
      {"mid/content=5/../6", "mid/6"},
      {"", ""},
      {"/", "/"},
      {".", ""},
      {"..", ""},
      {"../a", "a"},
      {"./a", "a"},
      {"/.", "/"},
      {"/..", "/"},
      {"/../x", "/x"},  // above the root: stays at it
      {"/a/..", "/"},
      {"/a/.", "/a/"},
      {"/a//../b", "/a/b"},  // an empty segment is a segment
      {"/.//a", "//a"},
      {"/a/...", "/a/..."},  // "..." is no dot-segment
      {"/stats/../metrics", "/metrics"},
  };
  for (const auto& [in, out] : cases) EXPECT_EQ(RemoveDotSegments(in), out) << in;
}

// RFC 3986 5.4's examples, base "http://a/b/c/d;p?q", for the references with a path: the path
// of the target is remove_dot_segments of the merged path, "/b/c/" and the reference (5.2.3), or
// of the reference itself when it starts with '/'.
TEST(RemoveDotSegmentsTest, TheRfcsReferenceResolutionExamples) {
  const std::pair<std::string_view, std::string_view> cases[] = {
      // 5.4.1 Normal Examples
      {"g", "/b/c/g"},
      {"./g", "/b/c/g"},
      {"g/", "/b/c/g/"},
      {"/g", "/g"},
      {";x", "/b/c/;x"},
      {"g;x", "/b/c/g;x"},
      {".", "/b/c/"},
      {"./", "/b/c/"},
      {"..", "/b/"},
      {"../", "/b/"},
      {"../g", "/b/g"},
      {"../..", "/"},
      {"../../", "/"},
      {"../../g", "/g"},
      // 5.4.2 Abnormal Examples
      {"../../../g", "/g"},
      {"../../../../g", "/g"},
      {"/./g", "/g"},
      {"/../g", "/g"},
      {"g.", "/b/c/g."},
      {".g", "/b/c/.g"},
      {"g..", "/b/c/g.."},
      {"..g", "/b/c/..g"},
      {"./../g", "/b/g"},
      {"./g/.", "/b/c/g/"},
      {"g/./h", "/b/c/g/h"},
      {"g/../h", "/b/c/h"},
      {"g;x=1/./y", "/b/c/g;x=1/y"},
      {"g;x=1/../y", "/b/c/y"},
  };
  for (const auto& [reference, path] : cases) {
    const std::string merged =
        reference.starts_with('/') ? std::string(reference) : "/b/c/" + std::string(reference);
    EXPECT_EQ(RemoveDotSegments(merged), path) << reference;
  }
}

}  // namespace
}  // namespace scales::admin::internal
