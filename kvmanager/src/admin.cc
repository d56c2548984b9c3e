#include "kvmanager/admin.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <thread>

#include "proto/wire/frame.h"

namespace kvm::server {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

struct AdminServer::Impl {
  AdminOptions opt;
  Metrics* metrics = nullptr;
  asio::io_context io;
  std::unique_ptr<tcp::acceptor> acceptor;
  std::unique_ptr<asio::steady_timer> retry;  // re-accepts after an accept error (EMFILE, ...)
  uint16_t port = 0;
  std::thread thread;
  std::atomic<bool> stopped{false};

  // One connection: (with TLS: the handshake,) read one request (within the timeout), answer it,
  // close. Stream: beast::tcp_stream, or beast::ssl_stream of one.
  template <typename Stream>
  struct Conn : std::enable_shared_from_this<Conn<Stream>> {
    static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
    Conn(Impl* impl, tcp::socket sock) : impl(impl), stream(std::move(sock)) {}
    Conn(Impl* impl, tcp::socket sock, std::shared_ptr<asio::ssl::context> ctx)
        : impl(impl), ctx(ctx), stream(std::move(sock), *ctx) {}
    void Expire() {
      beast::get_lowest_layer(stream).expires_after(
          std::chrono::milliseconds(impl->opt.request_timeout_ms));
    }
    void Start() {
      Expire();  // the handshake and the request within the timeout
      if constexpr (kTls) {
        stream.async_handshake(asio::ssl::stream_base::server,
                               [self = this->shared_from_this()](beast::error_code ec) {
                                 if (!ec) self->Read();  // else: not TLS, or refused: drop it
                               });
      } else {
        Read();
      }
    }
    void Read() {
      http::async_read(stream, buf, req,
                       [self = this->shared_from_this()](beast::error_code ec, size_t) {
                         if (ec) return;  // timed out, closed or malformed: drop it
                         self->Answer();
                         self->Expire();
                         http::async_write(self->stream, self->res,
                                           [self](beast::error_code, size_t) { self->Done(); });
                       });
    }
    void Done() {
      if constexpr (kTls) {
        stream.async_shutdown([self = this->shared_from_this()](beast::error_code) {});
      } else {
        beast::error_code ec;
        stream.socket().shutdown(tcp::socket::shutdown_send, ec);
      }
    }
    void Answer() {
      res.version(req.version());
      res.keep_alive(false);
      std::string target(req.target());
      if (const size_t q = target.find('?'); q != std::string::npos) target.resize(q);
      const AdminOptions& o = impl->opt;
      auto reply = [&](http::status st, const char* type, std::string body) {
        res.result(st);
        res.set(http::field::content_type, type);
        res.body() = std::move(body);
      };
      if (req.method() != http::verb::get) {
        reply(http::status::method_not_allowed, "text/plain", "GET only\n");
      } else if (target == "/metrics") {
        if (o.refresh) o.refresh();
        reply(http::status::ok, "text/plain; version=0.0.4", impl->metrics->Serialize());
      } else if (target == "/healthz") {
        reply(http::status::ok, "text/plain", "ok\n");
      } else if (target == "/readyz") {
        const std::string why = o.readiness ? o.readiness() : std::string();
        if (why.empty())
          reply(http::status::ok, "text/plain", "ready\n");
        else
          reply(http::status::service_unavailable, "text/plain", "not ready: " + why + "\n");
      } else if (target == "/status") {
        reply(http::status::ok, "application/json", o.status ? o.status() : "{}");
      } else {
        reply(http::status::not_found, "text/plain",
              "not found: /metrics /healthz /readyz /status\n");
      }
      res.prepare_payload();
    }
    Impl* impl;
    std::shared_ptr<asio::ssl::context> ctx;  // with TLS: the context of this connection
    Stream stream;
    beast::flat_buffer buf;
    http::request<http::string_body> req;
    http::response<http::string_body> res;
  };

  void Accept() {
    acceptor->async_accept([this](boost::system::error_code ec, tcp::socket sock) {
      if (ec == asio::error::operation_aborted || !acceptor->is_open()) return;  // Stop
      if (ec) {  // out of descriptors or similar: try again shortly instead of spinning
        retry->expires_after(std::chrono::milliseconds(100));
        retry->async_wait([this](boost::system::error_code tec) {
          if (!tec) Accept();
        });
        return;
      }
      if (opt.tls)
        std::make_shared<Conn<beast::ssl_stream<beast::tcp_stream>>>(this, std::move(sock),
                                                                     opt.tls->Current())
            ->Start();
      else
        std::make_shared<Conn<beast::tcp_stream>>(this, std::move(sock))->Start();
      Accept();
    });
  }
};

Result<std::unique_ptr<AdminServer>> AdminServer::Start(const AdminOptions& o, Metrics* metrics) {
  KVM_ASSIGN_OR_RETURN(auto hp, wire::ParseHostPort(o.listen));
  auto impl = std::make_unique<Impl>();
  impl->opt = o;
  impl->metrics = metrics;
  boost::system::error_code ec;
  const auto addr = asio::ip::make_address(hp.first, ec);
  if (ec) return Status::InvalidArgument("admin address '" + hp.first + "': " + ec.message());
  impl->acceptor = std::make_unique<tcp::acceptor>(impl->io);
  impl->retry = std::make_unique<asio::steady_timer>(impl->io);
  const tcp::endpoint ep(addr, hp.second);
  impl->acceptor->open(ep.protocol(), ec);
  if (!ec) impl->acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor->bind(ep, ec);
  if (!ec) impl->acceptor->listen(64, ec);
  if (ec) return Status::Unavailable("cannot listen on " + o.listen + ": " + ec.message());
  impl->port = impl->acceptor->local_endpoint(ec).port();
  impl->Accept();
  impl->thread = std::thread([p = impl.get()] { p->io.run(); });
  return std::unique_ptr<AdminServer>(new AdminServer(std::move(impl)));
}

AdminServer::AdminServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdminServer::~AdminServer() { Stop(); }

uint16_t AdminServer::port() const { return impl_->port; }

void AdminServer::Stop() {
  if (impl_->stopped.exchange(true)) return;
  impl_->io.stop();  // open connections are dropped with the io_context's pending handlers
  if (impl_->thread.joinable()) impl_->thread.join();
  boost::system::error_code ec;
  impl_->acceptor->close(ec);  // the admin thread is gone: nothing else touches it now
}

}  // namespace kvm::server
