#include "kvmanager/admin.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <thread>

#include "kvmanager/server.h"

namespace kvm::server {
namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;

struct AdminServer::Impl {
  AdminOptions opt;
  Metrics* metrics = nullptr;
  asio::io_context io;
  std::unique_ptr<tcp::acceptor> acceptor;
  std::thread thread;
  std::atomic<bool> stopping{false};

  void Serve(tcp::socket sock) {
    boost::beast::flat_buffer buf;
    http::request<http::string_body> req;
    boost::system::error_code ec;
    http::read(sock, buf, req, ec);
    if (ec) return;
    http::response<http::string_body> res;
    res.version(req.version());
    res.keep_alive(false);
    const std::string target(req.target());
    auto reply = [&](http::status st, const std::string& type, std::string body) {
      res.result(st);
      res.set(http::field::content_type, type);
      res.body() = std::move(body);
    };
    if (req.method() != http::verb::get) {
      reply(http::status::method_not_allowed, "text/plain", "GET only\n");
    } else if (target == "/metrics") {
      if (opt.refresh) opt.refresh();
      reply(http::status::ok, "text/plain; version=0.0.4", metrics->Serialize());
    } else if (target == "/healthz") {
      reply(http::status::ok, "text/plain", "ok\n");
    } else if (target == "/readyz") {
      const bool ready = opt.ready ? opt.ready() : true;
      reply(ready ? http::status::ok : http::status::service_unavailable, "text/plain",
            ready ? "ready\n" : "not ready\n");
    } else if (target == "/status") {
      reply(http::status::ok, "application/json", opt.status ? opt.status() : "{}");
    } else {
      reply(http::status::not_found, "text/plain",
            "not found: /metrics /healthz /readyz /status\n");
    }
    res.prepare_payload();
    http::write(sock, res, ec);
    sock.shutdown(tcp::socket::shutdown_send, ec);
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
  const tcp::endpoint ep(addr, hp.second);
  impl->acceptor->open(ep.protocol(), ec);
  if (!ec) impl->acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor->bind(ep, ec);
  if (!ec) impl->acceptor->listen(16, ec);
  if (ec) return Status::Unavailable("cannot listen on " + o.listen + ": " + ec.message());
  impl->thread = std::thread([p = impl.get()] {
    while (!p->stopping) {
      boost::system::error_code aec;
      tcp::socket sock(p->io);
      p->acceptor->accept(sock, aec);
      if (aec || p->stopping) break;  // closed, or the wake-up connection of Stop
      p->Serve(std::move(sock));
    }
  });
  return std::unique_ptr<AdminServer>(new AdminServer(std::move(impl)));
}

AdminServer::AdminServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdminServer::~AdminServer() { Stop(); }

uint16_t AdminServer::port() const {
  boost::system::error_code ec;
  return impl_->acceptor->local_endpoint(ec).port();
}

void AdminServer::Stop() {
  if (impl_->stopping.exchange(true)) return;
  // A blocking accept does not wake when its socket is closed: wake it with a connection first (the
  // loop then sees `stopping`), join, and only then close the acceptor.
  const uint16_t p = port();
  if (impl_->thread.joinable()) {
    {
      asio::io_context io;
      tcp::socket s(io);
      boost::system::error_code ec;
      s.connect(tcp::endpoint(impl_->acceptor->local_endpoint(ec).address(), p), ec);
    }
    impl_->thread.join();
  }
  boost::system::error_code ec;
  impl_->acceptor->close(ec);
}

}  // namespace kvm::server
