#include "test_ca.h"

#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

namespace scales::testing {
namespace {

[[noreturn]] void Fail(const std::string& step) {
  char buf[256] = "no OpenSSL error";
  if (unsigned long e = ERR_get_error(); e != 0) ERR_error_string_n(e, buf, sizeof buf);
  throw std::runtime_error("test CA: " + step + " failed: " + buf);
}

struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct CertFree {
  void operator()(X509* x) const { X509_free(x); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;

Key NewKey() {
  Key k(EVP_EC_gen("P-256"));
  if (!k) Fail("EVP_EC_gen(P-256)");
  return k;
}

struct CertSpec {
  std::string common_name;
  long not_before_s = -24 * 3600;       // relative to now
  long not_after_s = 365L * 24 * 3600;  // relative to now
  std::vector<std::pair<int, std::string>> extensions;  // NID, OpenSSL config value
};

// Makes a certificate for `key`, signed by `issuer`/`issuer_key` (self-signed when null).
Cert MakeCert(const CertSpec& spec, EVP_PKEY* key, X509* issuer, EVP_PKEY* issuer_key) {
  static long serial = 1;
  Cert x(X509_new());
  if (!x) Fail("X509_new");
  X509_set_version(x.get(), 2);  // v3
  ASN1_INTEGER_set(X509_get_serialNumber(x.get()), serial++);
  X509_gmtime_adj(X509_getm_notBefore(x.get()), spec.not_before_s);
  X509_gmtime_adj(X509_getm_notAfter(x.get()), spec.not_after_s);
  if (X509_set_pubkey(x.get(), key) != 1) Fail("X509_set_pubkey");
  X509_NAME* name = X509_get_subject_name(x.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("scales tests"), -1,
                             -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(spec.common_name.c_str()), -1, -1, 0);
  X509_set_issuer_name(x.get(), issuer != nullptr ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer != nullptr ? issuer : x.get(), x.get(), nullptr, nullptr, 0);
  for (const auto& [nid, value] : spec.extensions) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    if (ext == nullptr) Fail("extension " + value);
    X509_add_ext(x.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  if (X509_sign(x.get(), issuer_key != nullptr ? issuer_key : key, EVP_sha256()) == 0) Fail("X509_sign");
  return x;
}

void WriteCert(const std::string& path, X509* x) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw std::runtime_error("test CA: cannot write " + path);
  const bool ok = PEM_write_X509(f, x) == 1;
  std::fclose(f);
  if (!ok) Fail("PEM_write_X509 " + path);
}

void WriteKey(const std::string& path, EVP_PKEY* k) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw std::runtime_error("test CA: cannot write " + path);
  const bool ok = PEM_write_PrivateKey(f, k, nullptr, nullptr, 0, nullptr, nullptr) == 1;
  std::fclose(f);
  if (!ok) Fail("PEM_write_PrivateKey " + path);
}

CertSpec CaSpec(std::string cn) {
  return CertSpec{std::move(cn),
                  -24 * 3600,
                  10L * 365 * 24 * 3600,
                  {{NID_basic_constraints, "critical,CA:TRUE"},
                   {NID_key_usage, "critical,keyCertSign,cRLSign"},
                   {NID_subject_key_identifier, "hash"}}};
}

CertSpec LeafSpec(std::string cn, std::string san, const char* usage) {
  return CertSpec{std::move(cn),
                  -24 * 3600,
                  365L * 24 * 3600,
                  {{NID_basic_constraints, "critical,CA:FALSE"},
                   {NID_key_usage, "critical,digitalSignature,keyEncipherment"},
                   {NID_ext_key_usage, usage},
                   {NID_subject_key_identifier, "hash"},
                   {NID_authority_key_identifier, "keyid:always"},
                   {NID_subject_alt_name, std::move(san)}}};
}

void Make(TestCertificates& c);

// Owns the directory; removes it at exit.
struct Holder {
  TestCertificates certs;
  Holder() { Make(certs); }
  Holder(const Holder&) = delete;
  Holder& operator=(const Holder&) = delete;
  ~Holder() {
    std::error_code ignored;
    if (!certs.dir.empty()) std::filesystem::remove_all(certs.dir, ignored);
  }
};

void Make(TestCertificates& c) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "scales-test-ca-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("test CA: mkdtemp failed");
  c.dir = tmpl;
  auto path = [&](const char* file) { return c.dir + "/" + file; };

  Key ca_key = NewKey();
  Cert ca = MakeCert(CaSpec("scales test CA"), ca_key.get(), nullptr, nullptr);
  c.ca_file = path("ca.pem");
  WriteCert(c.ca_file, ca.get());

  Key other_key = NewKey();
  Cert other = MakeCert(CaSpec("unrelated test CA"), other_key.get(), nullptr, nullptr);
  c.other_ca_file = path("other-ca.pem");
  WriteCert(c.other_ca_file, other.get());

  auto leaf = [&](CertSpec spec, const char* cert_name, const char* key_name, std::string& cert_path,
                  std::string& key_path) {
    Key key = NewKey();
    Cert cert = MakeCert(spec, key.get(), ca.get(), ca_key.get());
    cert_path = path(cert_name);
    key_path = path(key_name);
    WriteCert(cert_path, cert.get());
    WriteKey(key_path, key.get());
  };
  leaf(LeafSpec("localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth"), "server.pem", "server.key",
       c.server_cert, c.server_key);
  CertSpec expired = LeafSpec("localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth");
  expired.not_before_s = -30L * 24 * 3600;
  expired.not_after_s = -24 * 3600;
  leaf(expired, "expired.pem", "expired.key", c.expired_cert, c.expired_key);
  leaf(LeafSpec("wrong.example", "DNS:wrong.example", "serverAuth"), "wrong-host.pem", "wrong-host.key",
       c.wrong_host_cert, c.wrong_host_key);
  leaf(LeafSpec("scales-test-client", "DNS:scales-test-client", "clientAuth"), "client.pem", "client.key",
       c.client_cert, c.client_key);
}

}  // namespace

const TestCertificates& TestCa() {
  static Holder holder;
  return holder.certs;
}

}  // namespace scales::testing
