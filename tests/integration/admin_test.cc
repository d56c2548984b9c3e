// The admin HTTP endpoint: /metrics (checked with promtool, every DESIGN.md §8 family present with
// zeros before any observation), /healthz, /readyz, /status, 404.
#include "kvmanager/admin.h"

#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace kvm::server {
namespace {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;

// A minimal HTTP GET: returns "status line\n...body".
std::string Get(uint16_t port, const std::string& path) {
  asio::io_context io;
  tcp::socket s(io);
  s.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  const std::string req =
      "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  asio::write(s, asio::buffer(req));
  std::string out;
  boost::system::error_code ec;
  char buf[4096];
  for (;;) {
    const size_t n = s.read_some(asio::buffer(buf), ec);
    out.append(buf, n);
    if (ec) break;
  }
  return out;
}

std::string Body(const std::string& resp) {
  const size_t p = resp.find("\r\n\r\n");
  return p == std::string::npos ? "" : resp.substr(p + 4);
}

TEST(AdminTest, MetricsPassPromtoolAndEndpointsAnswer) {
  Metrics m;
  bool ready = false;
  AdminOptions o;
  o.listen = "127.0.0.1:0";
  o.ready = [&] { return ready; };
  o.status = [] { return std::string("{\"sequences\": 0}"); };
  auto a = AdminServer::Start(o, &m);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  const uint16_t port = (*a)->port();
  std::string r = Get(port, "/metrics");
  ASSERT_EQ(r.rfind("HTTP/1.1 200", 0), 0u) << r.substr(0, 80);
  const std::string body = Body(r);
  for (const char* name :
       {"kvm_dropped_mass_bucket{kind=\"exact\",selector=\"prhs\"",
        "kvm_dropped_mass_over_target_total", "kvm_stream_bytes_total",
        "kvm_dense_equivalent_bytes_total", "kvm_retrievals_total", "kvm_gate_checks_total",
        "kvm_tier_bytes{tier=\"host\"}", "kvm_tier_capacity_bytes",
        "kvm_evictions_total{from=\"host\",to=\"disk\"}", "kvm_promotions_total",
        "kvm_request_duration_seconds_bucket", "kvm_sequences",
        "kvm_errors_total{code=\"NoSpace\"}"})
    EXPECT_NE(body.find(name), std::string::npos) << name;
  // promtool (Debian `prometheus`) lints the exposition: rc 0 = clean.
  const std::string file = "/tmp/kvm_metrics_" + std::to_string(::getpid()) + ".txt";
  std::ofstream(file) << body;
  const int rc =
      std::system(("promtool check metrics < " + file + " > " + file + ".out 2>&1").c_str());
  std::stringstream lint;
  lint << std::ifstream(file + ".out").rdbuf();
  EXPECT_EQ(rc, 0) << lint.str();
  std::remove(file.c_str());
  std::remove((file + ".out").c_str());
  // Observations show up.
  m.ObserveDelta("prhs", "bound", 0.05, 0.01);
  m.CountError(StatusCode::kBusy);
  const std::string after = Body(Get(port, "/metrics"));
  EXPECT_NE(after.find("kvm_dropped_mass_over_target_total{kind=\"bound\"} 1"), std::string::npos);
  EXPECT_NE(after.find("kvm_errors_total{code=\"Busy\"} 1"), std::string::npos);
  EXPECT_EQ(Get(port, "/healthz").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(Get(port, "/readyz").rfind("HTTP/1.1 503", 0), 0u);
  ready = true;
  EXPECT_EQ(Get(port, "/readyz").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(Body(Get(port, "/status")), "{\"sequences\": 0}");
  EXPECT_EQ(Get(port, "/nope").rfind("HTTP/1.1 404", 0), 0u);
  (*a)->Stop();
}

}  // namespace
}  // namespace kvm::server
