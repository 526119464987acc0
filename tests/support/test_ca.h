#pragma once
// A throw-away certificate authority for TLS tests, made with the OpenSSL C API (no openssl
// CLI): PEM files in a fresh temporary directory, created once per process on first use and
// removed at exit. Keys are EC P-256 (fast to make; nginx, Apache Thrift and Python accept them).

#include <string>

namespace scales::testing {

struct TestCertificates {
  std::string dir;            // the temporary directory holding every file below
  std::string ca_file;        // our CA (trust this one)
  std::string other_ca_file;  // an unrelated CA (trusting it must fail verification)
  // CN=localhost, SAN DNS:localhost and IP:127.0.0.1, signed by our CA, valid now.
  std::string server_cert, server_key;
  // Same names, signed by our CA, validity ended yesterday.
  std::string expired_cert, expired_key;
  // SAN DNS:wrong.example only (CN=wrong.example), signed by our CA.
  std::string wrong_host_cert, wrong_host_key;
  // CN=scales-test-client, extendedKeyUsage clientAuth, signed by our CA (mutual TLS).
  std::string client_cert, client_key;
};

// Thread-safe; throws std::runtime_error with OpenSSL's reason if the files cannot be made.
const TestCertificates& TestCa();

}  // namespace scales::testing
