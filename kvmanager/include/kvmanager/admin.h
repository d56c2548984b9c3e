// The admin HTTP endpoint (Boost.Beast) on its own port: GET /metrics (Prometheus text), /healthz
// (the process serves), /readyz (the store is open and the control plane listens), /status (JSON).
// One thread, one request per connection (admin traffic is light). Thread-safe Start/Stop.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "kvmanager/metrics.h"
#include "proto/status.h"

namespace kvm::server {

struct AdminOptions {
  std::string listen = "127.0.0.1:7421";  // HOST:PORT; port 0 picks a free one
  std::function<bool()> ready;            // /readyz: 200 when true
  std::function<std::string()> status;    // /status body (JSON)
  std::function<void()> refresh;          // called before /metrics is served (gauges)
};

class AdminServer {
 public:
  static Result<std::unique_ptr<AdminServer>> Start(const AdminOptions& o, Metrics* metrics);
  ~AdminServer();
  uint16_t port() const;
  void Stop();

 private:
  struct Impl;
  explicit AdminServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::server
