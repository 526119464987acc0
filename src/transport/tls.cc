#include "scales/transport/tls.h"

#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/proverr.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <boost/asio/ssl/error.hpp>

#include "core/fork_locks.h"
#include "scales/core/error.h"
#include "scales/discovery/uri.h"

namespace scales {

namespace ssl = boost::asio::ssl;

namespace {

[[noreturn]] void Invalid(const std::string& what) {
  throw Error(make_error_code(Errc::kInvalidArgument), what);
}

// Fails with the OS's reason when `path` cannot be opened; OpenSSL's own message for a missing
// file ("system lib") says less.
void CheckReadable(const char* option, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    Invalid(fmt::format("tls.{} '{}' cannot be read: {}", option, path, std::strerror(errno)));
  }
  std::fclose(f);
}

// What tells one version of a file from the next: inode, size and modification time (empty
// for no file; "?" when it cannot be read, which BuildContext then reports).
std::string FileStamp(const std::string& path) {
  if (path.empty()) return {};
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "?";
  return fmt::format("{}:{}:{}:{}.{}", st.st_dev, st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
}

std::string OpenSslReason(const boost::system::error_code& ec) {
  if (ec.category() == boost::asio::error::get_ssl_category()) {
    const char* reason = ERR_reason_error_string(static_cast<unsigned long>(ec.value()));
    if (reason != nullptr) return reason;
  }
  return ec.message();
}

// SSL ex_data slot: set when the server requested a client certificate we do not have.
int CertificateRequestedIndex() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

// Called by OpenSSL when the server sends a CertificateRequest and no certificate is set.
int OnClientCertificateRequested(SSL* ssl, X509**, EVP_PKEY**) {
  SSL_set_ex_data(ssl, CertificateRequestedIndex(), reinterpret_cast<void*>(1));
  return 0;  // none: continue without a certificate
}

// Context ids and session generations: one sequence, never reused.
uint64_t NextSessionNumber() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

// Client sessions kept for resumption, per context (SSL_CTX ex_data, freed with the context)
// and key (the endpoint and the name checked: a session is never offered to another). The
// newest per key, kept serialized (DER) for every loop, not as the SSL_SESSION: no SSL_SESSION
// is shared between loops. A shared one is read by one loop's handshake while another's frees it
// (its last reference dropped), ordered only by OpenSSL's atomic reference count, which the
// thread sanitizer cannot see; and OpenSSL 3.0 fills a certificate's lazy caches (the session's
// peer certificate) on first use, which races between loops (openssl/openssl#25202). Parsing a
// copy is dear, though (OpenSSL 3.0 decodes the peer certificate's key through its provider
// decoders: a third of a resumed connection's client CPU in bench_tls_resume), so each thread
// also keeps, as objects of its own (LocalSessions), the newest session of each key it received
// or parsed, offers that one, and parses the serialized copy only when it has none (its first
// connection to the endpoint, or one after the key's sessions were forgotten). One mutex for all
// contexts: a few instructions per handshake and per ticket.
struct TlsSessions {
  struct Kept {
    std::string der;
    uint64_t generation = 0;  // the newest session's
    // The first generation kept since the key was last forgotten (ForgetTlsSession): a loop's
    // own session of an older one is not offered.
    uint64_t since = 0;
  };
  // Tells these sessions from those of a later context at the same address.
  const uint64_t id = NextSessionNumber();
  std::unordered_map<std::string, Kept> by_key;  // guarded by SessionsMutex()
};

std::mutex& SessionsMutex() {
  static std::mutex& mu = []() -> std::mutex& {
    auto* m = new std::mutex();  // never destroyed: held across fork() for good
    internal::HoldAcrossFork(*m, internal::ForkLockRank::kTlsSessions);
    return *m;
  }();
  return mu;
}

// The newest session of each key that one thread (a loop) received or parsed, as objects only it
// uses, frees and hands to its connections' SSL_set_session. At most kMaxLocal, the least
// recently kept dropped first; one of a context that is gone stays until it is dropped so, or the
// thread ends.
class LocalSessions {
 public:
  static constexpr size_t kMaxLocal = 64;

  LocalSessions() = default;
  LocalSessions(const LocalSessions&) = delete;
  LocalSessions& operator=(const LocalSessions&) = delete;
  ~LocalSessions() {
    for (Entry& e : entries_) SSL_SESSION_free(e.session);
  }

  // The session kept for (context, key) if it is of generation `since` or later, resumable and
  // not expired, else nullptr. Not a reference of the caller's. (A connection that offered it and
  // then sent a fatal alert or was freed before its close_notify had OpenSSL mark it not
  // resumable, which its serialized copy is not: TLS 1.1 and later let such a session be
  // resumed. An expired one would not be offered: another loop's may be newer.)
  SSL_SESSION* Find(uint64_t context, const std::string& key, uint64_t since, int64_t now) const {
    const Entry* e = Lookup(context, key);
    if (e == nullptr || e->generation < since || SSL_SESSION_is_resumable(e->session) != 1) {
      return nullptr;
    }
    const int64_t expires = static_cast<int64_t>(SSL_SESSION_get_time(e->session)) +
                            SSL_SESSION_get_timeout(e->session);
    return now < expires ? e->session : nullptr;
  }

  // Keeps `session` (adopting one reference) as (context, key)'s `generation`.
  void Keep(uint64_t context, const std::string& key, uint64_t generation, SSL_SESSION* session) {
    Drop(context, key);
    if (entries_.size() >= kMaxLocal) {
      SSL_SESSION_free(entries_.front().session);
      entries_.erase(entries_.begin());
    }
    entries_.push_back(Entry{context, key, generation, session});
  }

  void Drop(uint64_t context, const std::string& key) {
    if (const Entry* e = Lookup(context, key)) {
      SSL_SESSION_free(e->session);
      entries_.erase(entries_.begin() + (e - entries_.data()));
    }
  }

 private:
  struct Entry {
    uint64_t context;
    std::string key;
    uint64_t generation;
    SSL_SESSION* session;
  };
  const Entry* Lookup(uint64_t context, const std::string& key) const {
    for (const Entry& e : entries_) {
      if (e.context == context && e.key == key) return &e;
    }
    return nullptr;
  }
  std::vector<Entry> entries_;  // oldest first
};

LocalSessions& ThisThreadsSessions() {
  thread_local LocalSessions sessions;
  return sessions;
}

int SessionsIndex() {
  static const int index = SSL_CTX_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* sessions, CRYPTO_EX_DATA*, int, long, void*) {
        std::lock_guard lock(SessionsMutex());
        delete static_cast<TlsSessions*>(sessions);
      });
  return index;
}

// SSL ex_data slot: the connection's key (a const std::string*).
int SessionKeyIndex() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

TlsSessions* SessionsOf(SSL_CTX* ctx) {
  return static_cast<TlsSessions*>(SSL_CTX_get_ex_data(ctx, SessionsIndex()));
}

// OpenSSL's new-session callback: during the handshake (TLS 1.2) or a read after it (a TLS 1.3
// ticket), on the connection's loop. Keeps a serialized copy for every loop and the object for
// this one; returns 0: OpenSSL keeps its own reference (the connection's session).
int OnNewSession(SSL* ssl, SSL_SESSION* session) {
  const auto* key = static_cast<const std::string*>(SSL_get_ex_data(ssl, SessionKeyIndex()));
  TlsSessions* sessions = SessionsOf(SSL_get_SSL_CTX(ssl));
  if (key == nullptr || sessions == nullptr || SSL_SESSION_is_resumable(session) != 1) return 0;
  const int size = i2d_SSL_SESSION(session, nullptr);
  if (size <= 0) return 0;
  std::string der(static_cast<size_t>(size), '\0');
  auto* out = reinterpret_cast<unsigned char*>(der.data());
  if (i2d_SSL_SESSION(session, &out) != size) return 0;
  const uint64_t generation = NextSessionNumber();
  {
    std::lock_guard lock(SessionsMutex());
    auto [it, inserted] = sessions->by_key.try_emplace(*key);
    it->second.der.swap(der);  // the replaced copy is freed after the unlock, with `der`
    it->second.generation = generation;
    if (inserted) it->second.since = generation;
    if (inserted && sessions->by_key.size() > kMaxTlsSessionsPerContext) {
      auto victim = sessions->by_key.begin();
      if (victim == it) ++victim;
      sessions->by_key.erase(victim);
    }
  }
  // A copy, not the connection's own: OpenSSL marks a connection's session not resumable when
  // the connection sends a fatal alert or is freed before its close_notify (SSL_free), which the
  // serialized copy ignores too.
  if (SSL_SESSION* copy = SSL_SESSION_dup(session)) {
    ThisThreadsSessions().Keep(sessions->id, *key, generation, copy);
  }
  return 0;
}

// OpenSSL 3.0 caches a certificate's extensions (key identifiers, purposes) on its first use,
// and two threads that use it first at the same time race: the later one rewrites what the other
// reads (openssl/openssl#25202; seen by TSan as two loops' first handshakes verified against the
// CA of ca_file). The certificates of a context are shared by every loop's handshakes: cache
// theirs now, on the thread that builds the context. (The system's CA directory is read lazily,
// certificate by certificate, so its certificates cannot be done here.)
void CacheCertificateExtensions(SSL_CTX* ctx) {
  STACK_OF(X509_OBJECT)* objects = X509_STORE_get0_objects(SSL_CTX_get_cert_store(ctx));
  for (int i = 0; i < sk_X509_OBJECT_num(objects); ++i) {
    if (X509* cert = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objects, i)))
      X509_check_purpose(cert, -1, 0);
  }
  if (X509* own = SSL_CTX_get0_certificate(ctx)) X509_check_purpose(own, -1, 0);
  STACK_OF(X509)* chain = nullptr;
  if (SSL_CTX_get0_chain_certs(ctx, &chain) == 1 && chain != nullptr) {
    for (int i = 0; i < sk_X509_num(chain); ++i) X509_check_purpose(sk_X509_value(chain, i), -1, 0);
  }
}

std::shared_ptr<ssl::context> BuildContext(const TlsOptions& o) {
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
  ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                   ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
  boost::system::error_code ec;
  if (o.verify_peer) {
    if (o.ca_file.empty()) {
      ctx->set_default_verify_paths(ec);
      if (ec) Invalid(fmt::format("tls: cannot load the system's default CAs: {}", OpenSslReason(ec)));
    } else {
      CheckReadable("ca_file", o.ca_file);
      ctx->load_verify_file(o.ca_file, ec);
      if (ec) Invalid(fmt::format("tls.ca_file '{}' cannot be loaded: {}", o.ca_file, OpenSslReason(ec)));
    }
    ctx->set_verify_mode(ssl::verify_peer);
  } else {
    ctx->set_verify_mode(ssl::verify_none);
  }
  if (o.resume_sessions) {
    SSL_CTX* native = ctx->native_handle();
    SSL_CTX_set_session_cache_mode(native,
                                   SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(native, &OnNewSession);
    SSL_CTX_set_ex_data(native, SessionsIndex(), new TlsSessions());
  }
  if (o.cert_file.empty()) {
    SSL_CTX_set_client_cert_cb(ctx->native_handle(), &OnClientCertificateRequested);
  } else {
    CheckReadable("cert_file", o.cert_file);
    ctx->use_certificate_chain_file(o.cert_file, ec);
    if (ec) Invalid(fmt::format("tls.cert_file '{}' cannot be loaded: {}", o.cert_file, OpenSslReason(ec)));
    CheckReadable("key_file", o.key_file);
    // An encrypted key would make OpenSSL's default callback ask for its passphrase on the
    // terminal, blocking the thread that builds the client: answer with none, and say why.
    bool encrypted = false;
    SSL_CTX_set_default_passwd_cb_userdata(ctx->native_handle(), &encrypted);
    SSL_CTX_set_default_passwd_cb(ctx->native_handle(), [](char*, int, int, void* asked) {
      *static_cast<bool*>(asked) = true;
      return 0;  // no passphrase
    });
    ctx->use_private_key_file(o.key_file, ssl::context::pem, ec);
    SSL_CTX_set_default_passwd_cb(ctx->native_handle(), nullptr);
    SSL_CTX_set_default_passwd_cb_userdata(ctx->native_handle(), nullptr);
    const bool mismatch = ec && ec.category() == boost::asio::error::get_ssl_category() &&
                          ERR_GET_REASON(static_cast<unsigned long>(ec.value())) == X509_R_KEY_VALUES_MISMATCH;
    if (ec && encrypted) {
      ERR_clear_error();
      Invalid(fmt::format("tls.key_file '{}' is encrypted: scales reads unencrypted PEM keys only", o.key_file));
    }
    if (ec && !mismatch) {
      Invalid(fmt::format("tls.key_file '{}' cannot be loaded: {}", o.key_file, OpenSslReason(ec)));
    }
    if (mismatch || SSL_CTX_check_private_key(ctx->native_handle()) != 1) {
      ERR_clear_error();
      Invalid(fmt::format("tls.key_file '{}' does not match the certificate in tls.cert_file '{}'", o.key_file,
                          o.cert_file));
    }
  }
  CacheCertificateExtensions(ctx->native_handle());
  return ctx;
}

bool ParseBool(const std::string& v, bool& out) {
  if (v == "on" || v == "true" || v == "1") {
    out = true;
    return true;
  }
  if (v == "off" || v == "false" || v == "0") {
    out = false;
    return true;
  }
  return false;
}

void ValidateFields(const TlsOptions& o) {
  if (!o.cert_file.empty() && o.key_file.empty()) {
    Invalid(fmt::format("tls.cert_file '{}' is set but tls.key_file is empty (mutual TLS needs both)", o.cert_file));
  }
  if (o.cert_file.empty() && !o.key_file.empty()) {
    Invalid(fmt::format("tls.key_file '{}' is set but tls.cert_file is empty (mutual TLS needs both)", o.key_file));
  }
  for (char c : o.server_name) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == '/' || c == 0x7f) {
      Invalid(fmt::format("tls.server_name '{}' is not a host name", o.server_name));
    }
  }
  // OpenSSL refuses a longer SNI (the handshake would go without one).
  constexpr size_t kMaxServerName = 255;
  if (o.server_name.size() > kMaxServerName) {
    Invalid(fmt::format("tls.server_name is {} bytes long (at most {}, the TLS server_name limit)",
                        o.server_name.size(), kMaxServerName));
  }
  // fopen and OpenSSL stop at a NUL byte: another file would be loaded.
  for (auto [option, path] : {std::pair{"ca_file", &o.ca_file}, std::pair{"cert_file", &o.cert_file},
                              std::pair{"key_file", &o.key_file}}) {
    if (const size_t nul = path->find('\0'); nul != std::string::npos) {
      std::string shown = *path;
      shown.replace(nul, 1, "\\0");
      Invalid(fmt::format("tls.{} '{}' contains a NUL byte (at offset {})", option, shown, nul));
    }
  }
}

}  // namespace

void Validate(const TlsOptions& o) {
  if (o.enabled) ValidateFields(o);
}

namespace {

// Contexts are shared while in use (one per client is typical; every connection of a client
// uses it): a weak cache keyed by the options, each entry with the identity (inode, size,
// modification time) of the files it was loaded from. A key keeps every context still in use,
// newest first: a client built after its files were rotated gets a new one, and the clients
// built before keep theirs, which their connections find (the newest in use) even once the new
// one is gone; only when none is in use are the files read again.
struct CachedContext {
  std::weak_ptr<ssl::context> context;
  std::string stamps;
};

std::shared_ptr<ssl::context> CachedTlsContext(const TlsOptions& o, bool reread_changed_files) {
  ValidateFields(o);  // also when `enabled` is off: opportunistic TLS (Mux) upgrades with these
  static std::mutex& mu = []() -> std::mutex& {
    auto* m = new std::mutex();  // never destroyed: held across fork() for good
    internal::HoldAcrossFork(*m, internal::ForkLockRank::kTlsContexts);
    return *m;
  }();
  static std::map<std::string, std::vector<CachedContext>> cache;
  std::string key = fmt::format("{}\n{}\n{}\n{}\n{}\n{}", o.verify_peer, o.ca_file, o.cert_file,
                                o.key_file, o.server_name, o.resume_sessions);
  std::string stamps;
  if (reread_changed_files) {
    stamps = fmt::format("{}\n{}\n{}", FileStamp(o.ca_file), FileStamp(o.cert_file), FileStamp(o.key_file));
  }
  std::lock_guard lock(mu);
  for (auto it = cache.begin(); it != cache.end();) {
    std::erase_if(it->second, [](const CachedContext& c) { return c.context.expired(); });
    it = it->second.empty() ? cache.erase(it) : std::next(it);
  }
  std::vector<CachedContext>& generations = cache[key];
  for (const CachedContext& c : generations) {  // newest first
    if (auto ctx = c.context.lock(); ctx && (!reread_changed_files || c.stamps == stamps)) return ctx;
  }
  if (!reread_changed_files) {
    stamps = fmt::format("{}\n{}\n{}", FileStamp(o.ca_file), FileStamp(o.cert_file), FileStamp(o.key_file));
  }
  std::shared_ptr<ssl::context> ctx;
  try {
    ctx = BuildContext(o);  // throws before an entry is added: a bad file harms no one
  } catch (...) {
    if (generations.empty()) cache.erase(key);
    throw;
  }
  generations.insert(generations.begin(), CachedContext{ctx, std::move(stamps)});
  return ctx;
}

}  // namespace

void AppendTlsFileSettings(const TlsOptions& o, ProviderSettings& settings) {
  settings.emplace_back("tls_ca_file", o.ca_file.empty() ? "(system CAs)" : o.ca_file);
  settings.emplace_back("tls_verify", SettingText(o.verify_peer));
  settings.emplace_back("tls_server_name", o.server_name);
  settings.emplace_back("tls_cert_file", o.cert_file);
  settings.emplace_back("tls_resume_sessions", SettingText(o.resume_sessions));
}

void PrepareTlsResumption(SSL* ssl, const std::string* key) {
  TlsSessions* sessions = SessionsOf(SSL_get_SSL_CTX(ssl));
  if (sessions == nullptr) return;
  SSL_set_ex_data(ssl, SessionKeyIndex(), const_cast<std::string*>(key));
  LocalSessions& local = ThisThreadsSessions();
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  uint64_t generation = 0;
  SSL_SESSION* session = nullptr;
  std::string der;
  {
    std::lock_guard lock(SessionsMutex());
    auto it = sessions->by_key.find(*key);
    if (it != sessions->by_key.end()) {
      generation = it->second.generation;
      session = local.Find(sessions->id, *key, it->second.since, now);
      if (session == nullptr) der = it->second.der;
    }
  }
  if (generation == 0) {  // none kept (or forgotten): nor is this thread's own offered
    local.Drop(sessions->id, *key);
    return;
  }
  if (session == nullptr) {
    const auto* in = reinterpret_cast<const unsigned char*>(der.data());
    session = d2i_SSL_SESSION(nullptr, &in, static_cast<long>(der.size()));
    if (session == nullptr) {
      ERR_clear_error();  // not this connection's error: it goes on without an offer
      return;
    }
    local.Keep(sessions->id, *key, generation, session);
  }
  SSL_set_session(ssl, session);  // takes its own reference
}

void ForgetTlsSession(SSL_CTX* ctx, const std::string& key) {
  TlsSessions* sessions = SessionsOf(ctx);
  if (sessions == nullptr) return;
  std::lock_guard lock(SessionsMutex());
  sessions->by_key.erase(key);
}

size_t TlsSessionsKept(SSL_CTX* ctx) {
  TlsSessions* sessions = SessionsOf(ctx);
  if (sessions == nullptr) return 0;
  std::lock_guard lock(SessionsMutex());
  return sessions->by_key.size();
}

std::shared_ptr<ssl::context> MakeTlsContext(const TlsOptions& o) { return CachedTlsContext(o, true); }

std::shared_ptr<ssl::context> SharedTlsContext(const TlsOptions& o) { return CachedTlsContext(o, false); }

void ApplyTlsQuery(const std::map<std::string, std::string>& query, TlsOptions& o) {
  auto bad = [](const std::string& key, const std::string& value, const char* expected) {
    throw Error(make_error_code(Errc::kBadUri),
                fmt::format("URI option {}='{}' is invalid (expected {})", key, value, expected));
  };
  for (const auto& [key, value] : query) {
    if (key == "tls") {
      if (!ParseBool(value, o.enabled)) bad(key, value, "on, off, true, false, 1 or 0");
    } else if (key == "tls_verify") {
      if (!ParseBool(value, o.verify_peer)) bad(key, value, "on, off, true, false, 1 or 0");
    } else if (key == "tls_resume_sessions") {
      if (!ParseBool(value, o.resume_sessions)) bad(key, value, "on, off, true, false, 1 or 0");
    } else if (key == "tls_ca_file") {
      o.ca_file = value;
    } else if (key == "tls_server_name") {
      o.server_name = value;
    } else if (key == "tls_cert_file") {
      o.cert_file = value;
    } else if (key == "tls_key_file") {
      o.key_file = value;
    } else if (key.starts_with("tls_")) {
      throw Error(
          make_error_code(Errc::kBadUri),
          fmt::format("unknown URI option {}='{}' (known: tls, tls_ca_file, tls_server_name, "
                      "tls_cert_file, tls_key_file, tls_verify, tls_resume_sessions)",
                      key, value));
    }
  }
}

void RefuseIneffectiveTlsKeys(const std::map<std::string, std::string>& query, const TlsOptions& o,
                              std::string_view how_to_enable) {
  if (o.enabled || query.contains("tls")) return;  // on, or turned off on purpose
  for (const auto& [key, value] : query) {
    if (key.starts_with("tls_")) {
      throw Error(make_error_code(Errc::kBadUri),
                  fmt::format("URI option {}='{}' has no effect: TLS is off ({})", key, value,
                              how_to_enable));
    }
  }
}

TlsOptions TlsOptionsForUri(std::string_view uri, TlsOptions defaults) {
  if (uri.empty()) return defaults;
  std::string error;
  if (auto parsed = ScalesUriParser::TryParse(uri, error)) {
    // A zk:// query lets ThriftMux's opportunistic_tls through (tcp:// refuses it): here, for
    // HTTP and Thrift, it would be ignored and the connection left in clear text.
    if (auto it = parsed->query.find("opportunistic_tls"); it != parsed->query.end()) {
      throw Error(make_error_code(Errc::kBadUri),
                  fmt::format("URI option opportunistic_tls='{}' is a ThriftMux option (a Mux session negotiates "
                              "TLS); HTTP and Thrift use TLS from the first byte: tls=on or https://",
                              it->second));
    }
    ApplyTlsQuery(parsed->query, defaults);
    RefuseIneffectiveTlsKeys(parsed->query, defaults, "add tls=on or use https://");
  }
  return defaults;
}

bool TlsClientCertificateMissing(SSL* ssl) noexcept {
  return ssl != nullptr && SSL_get_ex_data(ssl, CertificateRequestedIndex()) != nullptr;
}

bool IsTlsError(const boost::system::error_code& ec) noexcept {
  return ec.category() == boost::asio::error::get_ssl_category() ||
         ec.category() == ssl::error::get_stream_category();
}

bool IsTlsConnectionEnd(const boost::system::error_code& ec) noexcept {
  return ec == ssl::error::stream_truncated || ec == boost::asio::error::eof ||
         ec == boost::asio::error::connection_reset || ec == boost::asio::error::broken_pipe ||
         (ec.category() == boost::asio::error::get_ssl_category() &&
          ERR_GET_REASON(static_cast<unsigned long>(ec.value())) ==
              SSL_R_UNEXPECTED_EOF_WHILE_READING);
}

bool IsTlsRecordFailure(const boost::system::error_code& ec) noexcept {
  if (ec.category() != boost::asio::error::get_ssl_category() || IsTlsConnectionEnd(ec))
    return false;
  const auto code = static_cast<unsigned long>(ec.value());
  // An alert the peer sent is reported as SSL_AD_REASON_OFFSET + its description.
  const bool alert =
      ERR_GET_LIB(code) == ERR_LIB_SSL && ERR_GET_REASON(code) >= SSL_AD_REASON_OFFSET;
  return !alert || IsTlsRecordCorrupted(ec);
}

bool IsTlsRecordCorrupted(const boost::system::error_code& ec) noexcept {
  if (ec.category() != boost::asio::error::get_ssl_category()) return false;
  const auto code = static_cast<unsigned long>(ec.value());
  switch (ERR_GET_LIB(code)) {
    case ERR_LIB_SSL:
      switch (ERR_GET_REASON(code)) {
        case SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC:
        case SSL_R_DECRYPTION_FAILED:
        case SSL_R_SSLV3_ALERT_BAD_RECORD_MAC:     // the peer's alert
        case SSL_R_TLSV1_ALERT_DECRYPTION_FAILED:  // the peer's alert
          return true;
        default:
          return false;
      }
    case ERR_LIB_PROV:
      return ERR_GET_REASON(code) == PROV_R_CIPHER_OPERATION_FAILED;
    default:
      return false;
  }
}

std::string DescribeTlsError(const boost::system::error_code& ec, SSL* ssl) {
  if (ec == ssl::error::stream_truncated || ec == boost::asio::error::eof ||
      ec == boost::asio::error::connection_reset) {
    return fmt::format("the peer closed the connection ({}; is it speaking TLS?)", ec.message());
  }
  if (ec.category() != boost::asio::error::get_ssl_category()) return ec.message();
  const auto code = static_cast<unsigned long>(ec.value());
  std::string reason = OpenSslReason(ec);
  if (ERR_GET_REASON(code) == SSL_R_CERTIFICATE_VERIFY_FAILED && ssl != nullptr) {
    long result = SSL_get_verify_result(ssl);
    if (result != X509_V_OK) reason += fmt::format(" ({})", X509_verify_cert_error_string(result));
  }
  switch (ERR_GET_REASON(code)) {
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
    case SSL_R_RECORD_LENGTH_MISMATCH:
    case SSL_R_UNEXPECTED_EOF_WHILE_READING:
      reason += " (is the server speaking TLS?)";
      break;
    default:
      break;
  }
  return reason;
}

}  // namespace scales
