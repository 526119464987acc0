// The test service of the Thrift integration tests: service inheritance (`extends`), oneway,
// void, declared exceptions, structs and large binary payloads; and, for replies crafted by the
// tests, a recursive struct with a required field and a list allocated from std::pmr.
namespace cpp scales.thrifttest
namespace py scales_thrifttest

cpp_include "<memory_resource>"

exception TestError {
  1: string message
  2: i32 code
}

struct Blob {
  1: binary data
  2: i32 checksum
}

// Nests as deep as a reply makes it (up to the reader's recursion limit); a reply can leave out
// the required id.
struct Node {
  1: required i32 id
  2: list<Node> children
}

// Allocated from std::pmr's default resource, which a test can make refuse what it asks.
typedef list<i64> cpp_type "std::pmr::vector<int64_t>" Numbers

service Hello {
  string hi(1: string arg)
  // Only decoded in tests, from replies the tests write; no server implements them.
  list<Blob> blobs(1: i32 n)
  Node tree()
  Numbers numbers()
}

service Base {
  string base_echo(1: string message)
  i32 add(1: i32 a, 2: i32 b)
}

service Derived extends Base {
  void ping()
  oneway void notify(1: string message)
  // The last message given to notify (empty if none), after waiting up to `wait_ms` for one.
  string last_notification(1: i32 wait_ms)
  Blob roundtrip(1: Blob blob)
  void boom(1: i32 code) throws (1: TestError error)
  string slow(1: i32 millis)
}
