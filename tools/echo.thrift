namespace cpp scales.echo
namespace py scales_echo
exception EchoError { 1: string message }
service Echo {
  string echo(1: string message)
  void ping()
  string fail(1: string message) throws (1: EchoError error)
  string sleep(1: i32 millis)
}
