#include "kvmanager/tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <boost/asio/ssl.hpp>

namespace kvm::server {
namespace ssl = boost::asio::ssl;

std::string OpenSslErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += (out.empty() ? "" : "; ") + std::string(buf);
  }
  return out;
}

namespace {
Result<std::shared_ptr<ssl::context>> Build(const TlsFiles& f) {
  if (f.cert.empty() || f.key.empty())
    return Status::InvalidArgument("TLS needs both a certificate and a key file");
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_server);
  SSL_CTX* c = ctx->native_handle();
  SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
  ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                   ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1 |
                   ssl::context::single_dh_use);
  SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
  boost::system::error_code ec;
  ERR_clear_error();
  ctx->use_certificate_chain_file(f.cert, ec);
  if (ec)
    return Status::InvalidArgument("TLS certificate '" + f.cert + "': " + ec.message() + " " +
                                   OpenSslErrors());
  ctx->use_private_key_file(f.key, ssl::context::pem, ec);
  if (ec)
    return Status::InvalidArgument("TLS key '" + f.key + "': " + ec.message() + " " +
                                   OpenSslErrors());
  if (SSL_CTX_check_private_key(c) != 1)
    return Status::InvalidArgument("TLS key '" + f.key + "' does not match the certificate '" +
                                   f.cert + "'");
  if (!f.client_ca.empty()) {
    ctx->load_verify_file(f.client_ca, ec);
    if (ec)
      return Status::InvalidArgument("TLS client CA '" + f.client_ca + "': " + ec.message() + " " +
                                     OpenSslErrors());
    if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(f.client_ca.c_str()))
      SSL_CTX_set_client_CA_list(c, names);  // takes ownership
    ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
  } else {
    ctx->set_verify_mode(ssl::verify_none);
  }
  return ctx;
}
}  // namespace

Result<std::shared_ptr<TlsCredentials>> TlsCredentials::Load(const TlsFiles& files) {
  std::shared_ptr<TlsCredentials> t(new TlsCredentials(files));
  KVM_RETURN_IF_ERROR(t->Reload());
  return t;
}

std::shared_ptr<ssl::context> TlsCredentials::Current() const {
  std::lock_guard<std::mutex> l(mu_);
  return ctx_;
}

Status TlsCredentials::Reload() {
  KVM_ASSIGN_OR_RETURN(auto ctx, Build(files_));
  std::lock_guard<std::mutex> l(mu_);
  ctx_ = std::move(ctx);
  return Status::Ok();
}

}  // namespace kvm::server
