// TLS credentials of the control plane and the admin port (Boost.Asio SSL over OpenSSL): a server
// certificate chain and key, and optionally the CA that signs client certificates (mutual TLS:
// a client without a certificate signed by it is refused in the handshake). TLS 1.2 or newer only.
//
// The Asio SSL context is built from the files once at Load and again at Reload (a new context; the
// sessions already open keep theirs, so a reload drops nobody). A failed Reload keeps the current
// context and returns why.
//
// Thread-safe.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "proto/status.h"

namespace boost::asio::ssl {
class context;
}

namespace kvm::server {

struct TlsFiles {
  std::string cert;       // PEM certificate chain (the server's first)
  std::string key;        // PEM private key
  std::string client_ca;  // PEM CA bundle; non-empty: clients must present a certificate it signed
};

class TlsCredentials {
 public:
  // InvalidArgument naming the file when one cannot be read or the key does not match the cert.
  static Result<std::shared_ptr<TlsCredentials>> Load(const TlsFiles& files);
  // The context new connections use.
  std::shared_ptr<boost::asio::ssl::context> Current() const;
  // Re-reads the files into a new context (open sessions keep the old one).
  Status Reload();
  const TlsFiles& files() const { return files_; }
  bool mutual() const { return !files_.client_ca.empty(); }

 private:
  explicit TlsCredentials(TlsFiles f) : files_(std::move(f)) {}
  TlsFiles files_;
  mutable std::mutex mu_;
  std::shared_ptr<boost::asio::ssl::context> ctx_;  // GUARDED_BY(mu_)
};

// An OpenSSL error queue drained into one line ("" when empty).
std::string OpenSslErrors();

}  // namespace kvm::server
