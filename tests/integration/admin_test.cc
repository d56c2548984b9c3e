// The admin HTTP endpoint: /metrics (checked with promtool, every DESIGN.md §8 family present with
// zeros before any observation, kvm_ready / kvm_degraded moving), /healthz, /readyz with its
// reason, /status, 404; a stuck client does not block the probes and is dropped after the request
// timeout. And the control plane adopting a socket bound before the store opened: a client that
// connected before Server::Start is served after it.
#include "kvmanager/admin.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "kvmanager/server.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"
#include "testutil/service.h"

namespace kvm::server {
namespace {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

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

bool Has(const std::string& body, const std::string& line) {
  return body.find("\n" + line + "\n") != std::string::npos;
}

TEST(AdminTest, MetricsPassPromtoolAndEndpointsAnswer) {
  Metrics m;
  std::string not_ready = "opening the store";
  AdminOptions o;
  o.listen = "127.0.0.1:0";
  o.readiness = [&] { return not_ready; };
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
  ASSERT_TRUE(m.ObserveDelta("prhs", DeltaKind::kBound, 0.05, 0.01).ok());
  m.CountError(StatusCode::kBusy);
  const std::string after = Body(Get(port, "/metrics"));
  EXPECT_NE(after.find("kvm_dropped_mass_over_target_total{kind=\"bound\"} 1"), std::string::npos);
  EXPECT_NE(after.find("kvm_errors_total{code=\"Busy\"} 1"), std::string::npos);
  EXPECT_EQ(Get(port, "/healthz").rfind("HTTP/1.1 200", 0), 0u);
  r = Get(port, "/readyz");
  EXPECT_EQ(r.rfind("HTTP/1.1 503", 0), 0u) << r;
  EXPECT_EQ(Body(r), "not ready: opening the store\n");
  not_ready = "draining";
  EXPECT_EQ(Body(Get(port, "/readyz")), "not ready: draining\n");
  not_ready.clear();
  r = Get(port, "/readyz");
  EXPECT_EQ(r.rfind("HTTP/1.1 200", 0), 0u) << r;
  EXPECT_EQ(Body(r), "ready\n");
  EXPECT_EQ(Body(Get(port, "/status")), "{\"sequences\": 0}");
  EXPECT_EQ(Get(port, "/status?pretty=1").rfind("HTTP/1.1 200", 0), 0u);  // a query is ignored
  EXPECT_EQ(Get(port, "/nope").rfind("HTTP/1.1 404", 0), 0u);
  (*a)->Stop();
  (*a)->Stop();  // idempotent
}

TEST(AdminTest, ReadyAndDegradedGaugesMove) {
  Metrics m;
  AdminOptions o;
  o.listen = "127.0.0.1:0";
  bool ready = false, degraded = false;
  o.refresh = [&] {  // what the executable does before each scrape
    m.SetReady(ready);
    m.SetDegraded(degraded);
  };
  auto a = AdminServer::Start(o, &m);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  std::string b = Body(Get((*a)->port(), "/metrics"));
  EXPECT_TRUE(Has(b, "# TYPE kvm_ready gauge")) << b.substr(0, 200);
  EXPECT_TRUE(Has(b, "kvm_ready 0"));
  EXPECT_TRUE(Has(b, "# TYPE kvm_degraded gauge"));
  EXPECT_TRUE(Has(b, "kvm_degraded 0"));
  ready = true;
  b = Body(Get((*a)->port(), "/metrics"));
  EXPECT_TRUE(Has(b, "kvm_ready 1"));
  EXPECT_TRUE(Has(b, "kvm_degraded 0"));
  degraded = true;
  b = Body(Get((*a)->port(), "/metrics"));
  EXPECT_TRUE(Has(b, "kvm_ready 1"));
  EXPECT_TRUE(Has(b, "kvm_degraded 1"));
  ready = degraded = false;
  b = Body(Get((*a)->port(), "/metrics"));
  EXPECT_TRUE(Has(b, "kvm_ready 0"));
  EXPECT_TRUE(Has(b, "kvm_degraded 0"));
}

// A raw client socket connected to 127.0.0.1:port with a receive timeout.
int RawConnect(uint16_t port, int recv_timeout_ms) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{recv_timeout_ms / 1000, (recv_timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

TEST(AdminTest, AStuckClientBlocksNoProbeAndIsDroppedAfterTheTimeout) {
  Metrics m;
  AdminOptions o;
  o.listen = "127.0.0.1:0";
  o.request_timeout_ms = 300;
  auto a = AdminServer::Start(o, &m);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  const int stuck = RawConnect((*a)->port(), 3000);  // connects, sends half a request, waits
  ASSERT_GE(stuck, 0);
  ASSERT_EQ(send(stuck, "GET /hea", 8, 0), 8);
  const auto t0 = Clock::now();
  EXPECT_EQ(Get((*a)->port(), "/healthz").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(250));  // not after the stuck one
  char c;
  const ssize_t n = recv(stuck, &c, 1, 0);  // the server closes it: EOF, not the 3 s timeout
  EXPECT_EQ(n, 0);
  const auto waited = Clock::now() - t0;
  EXPECT_GE(waited, std::chrono::milliseconds(150));
  EXPECT_LT(waited, std::chrono::milliseconds(2000));
  close(stuck);
}

// A socket bound and listening on a free loopback port, as the executable binds the control port.
int BindListening(uint16_t* port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(fd, 16) != 0) return -1;
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}

TEST(AdminTest, ControlPlaneAdoptsASocketAndServesAClientThatConnectedBeforeStart) {
  uint16_t port = 0;
  const int lfd = BindListening(&port);
  ASSERT_GE(lfd, 0);
  // The client connects and says Hello while nothing accepts yet (the store would be opening).
  const int c = RawConnect(port, 5000);
  ASSERT_GE(c, 0);
  wire::Hello h;
  h.set_protocol_version(wire::kProtocolVersion);
  h.set_tenant("dev");
  h.set_auth_token("dev");
  const auto frame = wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kHello), 7, h);
  ASSERT_EQ(send(c, frame.data(), frame.size(), 0), ssize_t(frame.size()));
  char b;
  EXPECT_LT(recv(c, &b, 1, MSG_DONTWAIT), 0);  // no answer yet: nobody serves
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  testutil::TempStore ts;
  ServerOptions o;
  o.listen = "not used when listen_fd is given";
  o.listen_fd = lfd;
  o.handler.tenants = {{"dev", "dev", true}};
  auto srv = Server::Start(o, ts.store.get());
  ASSERT_TRUE(srv.ok()) << srv.status().ToString();
  EXPECT_EQ((*srv)->port(), port);
  wire::FrameDecoder dec;
  wire::Frame reply;
  char buf[4096];
  bool got = false;
  while (!got) {
    const ssize_t n = recv(c, buf, sizeof buf, 0);
    ASSERT_GT(n, 0) << "no reply to the Hello sent before Start";
    ASSERT_TRUE(dec.Feed({reinterpret_cast<uint8_t*>(buf), size_t(n)}).ok());
    got = dec.Next(&reply);
  }
  EXPECT_EQ(reply.header.type, wire::ReplyType(wire::MessageType::kHello));
  EXPECT_EQ(reply.header.request_id, 7u);
  close(c);
  (*srv)->Stop(1000);
  srv->reset();
  // The server owned the socket: the port is free again.
  const int again = RawConnect(port, 100);
  EXPECT_LT(again, 0);
  if (again >= 0) close(again);
}

TEST(AdminTest, ControlPlaneRefusesAListenFdThatIsNotATcpSocket) {
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  testutil::TempStore ts;
  ServerOptions o;
  o.listen_fd = p[0];  // taken over (and closed) by the failed Start
  auto srv = Server::Start(o, ts.store.get());
  EXPECT_TRUE(srv.status().IsInvalidArgument()) << srv.status().ToString();
  close(p[1]);
}

}  // namespace
}  // namespace kvm::server
