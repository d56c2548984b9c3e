// The admin HTTP endpoint (Boost.Beast) on its own port:
//   GET /metrics  the Prometheus text exposition (refresh() first, for the gauges it sets)
//   GET /healthz  200 "ok" whenever the process answers. The executable starts this server only
//                 after the control port is bound and listening, so 200 also means that port
//                 takes connections (they wait in its backlog while the store opens).
//   GET /readyz   200 "ready", or 503 "not ready: <reason>" while readiness() gives a reason (the
//                 store opening or recovering, draining after SIGTERM).
//   GET /status   the JSON object status() returns.
// Anything else is 404 (405 for a method other than GET). One I/O thread serves every connection
// asynchronously, one request per connection; a connection whose request has not arrived within
// request_timeout_ms is dropped, so a stuck client never blocks the probes.
//
// Thread-safe: Start/Stop/port from any thread. The callbacks run on the admin thread, concurrently
// with everything else the process does, and must be thread-safe themselves.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "kvmanager/metrics.h"
#include "kvmanager/tls.h"
#include "proto/status.h"

namespace kvm::server {

struct AdminOptions {
  std::string listen = "127.0.0.1:7421";  // HOST:PORT; port 0 picks a free one (see port())
  // /readyz: "" = ready (200); otherwise why not (503 with that reason). nullptr: always ready.
  std::function<std::string()> readiness;
  std::function<std::string()> status;  // /status body (JSON); nullptr: "{}"
  std::function<void()> refresh;        // called before /metrics is served (gauges); may be null
  // Time a connection has to deliver its request and read the reply. Default: 5000 ms.
  uint32_t request_timeout_ms = 5000;
  // HTTPS (the executable's --admin-tls: the control plane's certificate, no client certificate
  // asked for, so that probes and scrapers need only the CA). Default: null = plain HTTP.
  std::shared_ptr<TlsCredentials> tls;
};

class AdminServer {
 public:
  // Binds o.listen and starts the admin thread. InvalidArgument for a bad address, Unavailable
  // when the port is taken. `metrics` must outlive the server.
  static Result<std::unique_ptr<AdminServer>> Start(const AdminOptions& o, Metrics* metrics);
  ~AdminServer();
  uint16_t port() const;
  // Stops accepting, drops open connections and joins the thread. Idempotent.
  void Stop();

 private:
  struct Impl;
  explicit AdminServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::server
