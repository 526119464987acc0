#pragma once
// TLS settings shared by every transport (HTTP, framed Thrift, Mux): what to verify, which CA
// to trust, which client certificate to present. OpenSSL through boost::asio::ssl.
//
// Verification is on by default: the server's chain must lead to a trusted CA (the system's
// default CAs, or `ca_file`) and its certificate must name the host (`server_name`, else the
// endpoint's host; an IP literal is checked against the certificate's IP SANs and sends no SNI).

#include <map>
#include <memory>
#include <string>
#include <string_view>

#include <boost/asio/ssl/context.hpp>
#include <boost/system/error_code.hpp>

#include "scales/core/provider.h"

namespace scales {

struct TlsOptions {
  // TLS from the first byte of every connection.
  bool enabled = false;
  // PEM file of trusted CA certificates; empty = the system's default CAs.
  std::string ca_file;
  // Verify the server's chain and host name. Turn off only for tests.
  bool verify_peer = true;
  // The name sent as SNI and checked against the certificate; empty = the endpoint's host. A
  // trailing dot (an absolute name) is dropped for both. At most 255 bytes.
  std::string server_name;
  // Client certificate chain (PEM) and its private key (PEM), for mutual TLS. Both or neither.
  std::string cert_file;
  std::string key_file;
  // Resume TLS sessions: a new connection offers the newest session (TLS 1.2 session id or
  // ticket, TLS 1.3 ticket) that a handshake with the same endpoint and name gave on its event
  // loop (else on any loop), so a server that accepts it skips the certificate exchange and its
  // signature. The verification done when the
  // session was made stands (the same options made it). See docs/tls.md.
  bool resume_sessions = true;

  friend bool operator==(const TlsOptions&, const TlsOptions&) = default;
};

// Throws scales::Error(kInvalidArgument) naming the field when `o` is unusable: a certificate
// without a key or the reverse, a server_name that is not a host name or is longer than 255
// bytes, a file path with a NUL byte. Settings given while TLS is off are allowed (and
// ignored). Does not read the files (MakeTlsContext does).
void Validate(const TlsOptions& o);

// The SSL client context for `o`, for a client being built: the cached one (shared while in use
// by clients with equal options) if its files are unchanged; else the files are read again (a
// rotated certificate: replaced or rewritten) and the new context replaces the cached one.
// Loads the CA file, client certificate and key (unencrypted); throws
// scales::Error(kInvalidArgument) naming the option, the file and OpenSSL's reason when one
// cannot be loaded (the cached context then stays). Immutable once returned.
std::shared_ptr<boost::asio::ssl::context> MakeTlsContext(const TlsOptions& o);

// The cached context for `o`, for a connection: the newest one still in use (no file is looked
// at while one is, so a file missing or half rotated does not fail the connections of built
// clients, also after a client built from the rotated files is gone); built as by
// MakeTlsContext when none is.
std::shared_ptr<boost::asio::ssl::context> SharedTlsContext(const TlsOptions& o);

// Session resumption for one client connection (TcpConnection), before its handshake: offers
// the session kept for `key` (the endpoint and the name checked) in `ssl`'s context, if any (the
// calling thread's own newest, else the context's), and keeps the sessions the server gives on
// this connection under `key`, which must outlive `ssl`. Contexts made with resume_sessions off
// keep none. At most kMaxTlsSessionsPerContext keys per context. Called on the thread that runs
// the connection (its loop: the offered session object is that thread's, and so are those the
// connection receives).
inline constexpr size_t kMaxTlsSessionsPerContext = 1024;
void PrepareTlsResumption(SSL* ssl, const std::string* key);
// After a failed handshake: drops the session kept for `key` in `ctx` (offering it again might
// fail again).
void ForgetTlsSession(SSL_CTX* ctx, const std::string& key);
// Sessions kept in `ctx` (tests).
size_t TlsSessionsKept(SSL_CTX* ctx);

// Applies the per-URI TLS keys of a parsed URI's query (ParsedUri::query) to `o`:
//   tls=on|off|true|false|1|0, tls_ca_file=PATH, tls_server_name=NAME, tls_cert_file=PATH,
//   tls_key_file=PATH, tls_verify=on|off, tls_resume_sessions=on|off (both also true|false|1|0).
// Other keys are left alone (they belong to discovery). An unknown tls_* key or a bad value
// throws scales::Error(kBadUri) naming the key and the value.
void ApplyTlsQuery(const std::map<std::string, std::string>& query, TlsOptions& o);

// Appends what a transport provider using TLS reports to /admin/clients (ProviderSettings):
// tls_ca_file, tls_verify, tls_server_name and tls_cert_file (never the key).
void AppendTlsFileSettings(const TlsOptions& o, ProviderSettings& settings);

// Throws scales::Error(kBadUri) when `query` gives a tls_* key but TLS is off in `o` (the
// options after the query was applied) and the query does not say tls=off itself: the key
// would be ignored and the client would talk in clear text. `how_to_enable` ends the message
// ("add tls=on or use https://").
void RefuseIneffectiveTlsKeys(const std::map<std::string, std::string>& query, const TlsOptions& o,
                              std::string_view how_to_enable);

// `defaults` with the TLS keys of client URI `uri` applied (ApplyTlsQuery; https:// turns TLS
// on). An empty URI or one that does not parse leaves `defaults` as they are (the client
// reports a bad URI itself). tls_* keys that TLS left off would ignore throw kBadUri
// (RefuseIneffectiveTlsKeys), and so does opportunistic_tls (ThriftMux's own key: for the
// clients this serves, HTTP and Thrift, it would be ignored).
TlsOptions TlsOptionsForUri(std::string_view uri, TlsOptions defaults);

// True for errors of OpenSSL and of Asio's TLS stream (a handshake or record failure, a
// truncated TLS stream), as opposed to plain socket errors.
bool IsTlsError(const boost::system::error_code& ec) noexcept;

// True when `ec` says the connection ended under the TLS stream (end of stream, a truncated
// TLS stream, a reset or a broken pipe) rather than that TLS failed: no alert, no bad record.
bool IsTlsConnectionEnd(const boost::system::error_code& ec) noexcept;

// For an error after the handshake: true when OpenSSL itself rejected what the peer sent (a
// record that fails its integrity check because bytes were altered on the way; a malformed or
// misplaced record), or the peer's alert says a record of ours failed its check
// (IsTlsRecordCorrupted), as opposed to any other alert the peer sent (a certificate refused,
// ...) or the stream's end. That breaks the connection, not the endpoint's TLS set-up: a new
// connection may well work. (In a handshake OpenSSL's own checks, certificate verification
// included, fail the same way: not for use there; see IsTlsRecordCorrupted.)
bool IsTlsRecordFailure(const boost::system::error_code& ec) noexcept;

// True when a TLS record failed its integrity check (its MAC or AEAD tag), here ("decryption
// failed or bad record mac", OpenSSL 3's provider "cipher operation failed") or at the peer (its
// bad_record_mac or decryption_failed alert): bytes were altered on the way. No TLS set-up
// causes it (a wrong certificate, key or protocol fails otherwise), so in the handshake too it
// says that this connection broke, not that the endpoint's TLS is wrong.
bool IsTlsRecordCorrupted(const boost::system::error_code& ec) noexcept;

// OpenSSL's reason for `ec` ("certificate verify failed (certificate has expired)",
// "wrong version number"), with the certificate verification result of `ssl` when the
// handshake failed verification (`ssl` may be null).
std::string DescribeTlsError(const boost::system::error_code& ec, SSL* ssl = nullptr);

// True when the server asked `ssl` for a client certificate and the context has none (recorded
// by the client-certificate callback MakeTlsContext installs).
bool TlsClientCertificateMissing(SSL* ssl) noexcept;

}  // namespace scales
