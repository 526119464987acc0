// The test service of the Thrift integration tests: service inheritance (`extends`), oneway,
// void, declared exceptions, structs and large binary payloads.
namespace cpp scales.thrifttest
namespace py scales_thrifttest

exception TestError {
  1: string message
  2: i32 code
}

struct Blob {
  1: binary data
  2: i32 checksum
}

service Hello {
  string hi(1: string arg)
  // Only decoded in tests (a container in a reply); no server implements it.
  list<Blob> blobs(1: i32 n)
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
