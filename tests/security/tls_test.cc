// The control plane over TLS and the token checks, in process (ctest -L security): certificates
// made with the openssl CLI at test time (make_certs.sh); the real Asio server with TlsCredentials
// and the real client library (ConnectOptions tls_ca / tls_cert / tls_key). A TLS client
// round-trips (Hello, create, append, read); a plaintext client on the TLS listener is refused and
// counted and a TLS client is served afterwards; a TLS client on a plaintext server and a server
// signed by another CA are refused; mutual TLS refuses no client certificate and another CA's,
// serves a good one; TLS 1.1 is refused (openssl s_client); a wrong token is Unauthenticated,
// counted, and the next failures from the same address are answered later and later; the admin port
// over HTTPS.
#include "kvmanager/tls.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>

#include "client/client.h"
#include "kvmanager/admin.h"
#include "kvmanager/metrics.h"
#include "kvmanager/server.h"
#include "proto/kvm.pb.h"
#include "testutil/service.h"

namespace kvm {
namespace {
using Clock = std::chrono::steady_clock;
using wire::MessageType;

const ModelShape kShape{2, 4, 2, 32, DType::kF16, 3};

std::string Sh(const std::string& cmd, int* rc = nullptr) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  while (p && fgets(buf, sizeof buf, p)) out += buf;
  const int st = p ? pclose(p) : -1;
  if (rc) *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// A counter's value in the exposition text (-1 when missing).
double Counter(const server::Metrics& m, const std::string& name) {
  std::istringstream in(m.Serialize());
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  return -1;
}

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/kvm_tls_test_XXXXXX";
    dir_ = mkdtemp(tmpl);
    int rc = 0;
    const std::string out = Sh("bash " KVM_SOURCE_DIR "/tests/security/make_certs.sh " + dir_, &rc);
    ASSERT_EQ(rc, 0) << out;
  }
  static void TearDownTestSuite() { std::filesystem::remove_all(dir_); }
  static std::string F(const std::string& name) { return dir_ + "/" + name; }

  // A TLS service (mutual when `client_ca`), tenants dev (loopback only) and "a".
  void StartService(bool mutual, const std::string& cert = "server") {
    server::ServerOptions o;
    o.handler.tenants = {{"dev", "dev", true}, {"a", "tokA", false}};
    o.handler.metrics = &metrics_;
    o.auth_delay_base_ms = 100;
    o.auth_delay_max_ms = 400;
    auto tls = server::TlsCredentials::Load(
        {F(cert + ".crt"), F(cert + ".key"), mutual ? F("ca.crt") : std::string()});
    ASSERT_TRUE(tls.ok()) << tls.status().ToString();
    o.tls = *tls;
    service_ = std::make_unique<testutil::TestService>(o);
  }
  client::ConnectOptions Opts(bool tls = true, const std::string& cert = "") const {
    client::ConnectOptions co;
    co.address = "127.0.0.1:" + std::to_string(service_->server->port());
    co.tenant = "a";
    co.token = "tokA";
    co.deadline_ms = 5000;
    co.heartbeats = false;
    if (tls) co.tls_ca = F("ca.crt");
    if (!cert.empty()) {
      co.tls_cert = F(cert + ".crt");
      co.tls_key = F(cert + ".key");
    }
    return co;
  }
  // Hello (in Connect), create, append 16 tokens, read a block back.
  static void RoundTrip(client::Client* c, uint64_t seq) {
    wire::CreateSequence cs;
    cs.set_sequence_id(seq);
    wire::ToWire(kShape, cs.mutable_shape());
    cs.set_block_size(4);
    cs.set_durability(wire::CACHE);
    ASSERT_TRUE(c->Call(MessageType::kCreateSequence, cs).ok());
    wire::Append a;
    a.set_sequence_id(seq);
    a.set_start_position(0);
    for (uint32_t t = 0; t < 16; ++t) a.add_token_ids(t);
    std::vector<uint8_t> payload(wire::AppendPayloadBytes(kShape, 16));
    for (size_t i = 0; i < payload.size(); ++i) payload[i] = uint8_t(i * 7 + seq);
    auto ar = c->Call(MessageType::kAppend, a, payload);
    ASSERT_TRUE(ar.ok()) << ar.status().ToString();
    wire::AppendReply r;
    ASSERT_TRUE(wire::ParseProto(*ar, &r).ok());
    EXPECT_EQ(r.length(), 16u);
    wire::ReadBlocks rb;
    rb.set_sequence_id(seq);
    rb.add_block_indices(3);
    auto f = c->Call(MessageType::kReadBlocks, rb);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->payload.size(), 4u * 32 * 2);
    EXPECT_TRUE(c->DeleteSequence(seq).ok());
  }

  static std::string dir_;
  server::Metrics metrics_;
  std::unique_ptr<testutil::TestService> service_;
};
std::string TlsTest::dir_;

TEST(TokenEquals, ConstantTimeComparison) {
  EXPECT_TRUE(server::TokenEquals("secret", "secret"));
  EXPECT_FALSE(server::TokenEquals("secret", "secreT"));
  EXPECT_FALSE(server::TokenEquals("secret", "secret2"));
  EXPECT_FALSE(server::TokenEquals("secret", "secre"));
  EXPECT_FALSE(server::TokenEquals("secret", ""));
  EXPECT_FALSE(server::TokenEquals("", "x"));
  EXPECT_TRUE(server::TokenEquals("", ""));
  EXPECT_FALSE(server::TokenEquals(std::string("a\0b", 3), std::string("a\0c", 3)));
}

TEST_F(TlsTest, RoundTripAndPlaintextClientRefused) {
  StartService(false);
  {
    auto c = client::Client::Connect(Opts());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    RoundTrip(c->get(), 1);
  }
  // The name in the address is checked too (DNS SAN localhost).
  {
    auto o = Opts();
    o.address = "localhost:" + std::to_string(service_->server->port());
    auto c = client::Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
  }
  EXPECT_EQ(Counter(metrics_, "kvm_tls_handshake_failures_total"), 0);
  // A plaintext client: refused (its Hello never answered), counted.
  auto plain = client::Client::Connect(Opts(false));
  EXPECT_FALSE(plain.ok());
  for (int i = 0; i < 100 && Counter(metrics_, "kvm_tls_handshake_failures_total") < 1; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(Counter(metrics_, "kvm_tls_handshake_failures_total"), 1);
  // ... and the server serves TLS clients on.
  auto c = client::Client::Connect(Opts());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  RoundTrip(c->get(), 2);
}

TEST_F(TlsTest, ClientVerifiesTheServer) {
  StartService(false, "other-server");  // signed by a CA the client does not trust
  auto c = client::Client::Connect(Opts());
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.status().IsUnavailable()) << c.status().ToString();
  EXPECT_NE(c.status().message().find("certificate"), std::string::npos) << c.status().ToString();
}

TEST_F(TlsTest, TlsClientOnPlaintextServer) {
  server::ServerOptions o;
  o.handler.tenants = {{"a", "tokA", false}};
  service_ = std::make_unique<testutil::TestService>(o);
  auto c = client::Client::Connect(Opts());
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("TLS handshake"), std::string::npos) << c.status().ToString();
  auto plain = client::Client::Connect(Opts(false));  // the server is unharmed
  EXPECT_TRUE(plain.ok()) << plain.status().ToString();
}

TEST_F(TlsTest, MutualTls) {
  StartService(true);
  auto none = client::Client::Connect(Opts(true, ""));
  EXPECT_FALSE(none.ok());
  auto other = client::Client::Connect(Opts(true, "other-client"));
  EXPECT_FALSE(other.ok());
  for (int i = 0; i < 100 && Counter(metrics_, "kvm_tls_handshake_failures_total") < 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(Counter(metrics_, "kvm_tls_handshake_failures_total"), 2);
  auto good = client::Client::Connect(Opts(true, "client"));
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  RoundTrip(good->get(), 3);
  EXPECT_EQ(Counter(metrics_, "kvm_tls_handshake_failures_total"), 2);
  // A bad client key file is the caller's error, named.
  auto o = Opts(true, "client");
  o.tls_key = F("other-client.key");
  auto bad = client::Client::Connect(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(bad.status().IsInvalidArgument()) << bad.status().ToString();
}

TEST_F(TlsTest, OldProtocolVersionsRefused) {
  StartService(false);
  const std::string at = "127.0.0.1:" + std::to_string(service_->server->port());
  int rc = 0;
  const std::string ok12 = Sh("openssl s_client -connect " + at + " -tls1_2 -CAfile " +
                                  F("ca.crt") + " -verify_return_error < /dev/null",
                              &rc);
  EXPECT_EQ(rc, 0) << ok12;
  EXPECT_NE(ok12.find("Protocol  : TLSv1.2"), std::string::npos) << ok12;
  const double before = Counter(metrics_, "kvm_tls_handshake_failures_total");
  // The client is allowed TLS 1.1 (security level 0), the server refuses it.
  const std::string v11 =
      Sh("openssl s_client -connect " + at + " -tls1_1 -cipher 'DEFAULT:@SECLEVEL=0' < /dev/null",
         &rc);
  EXPECT_NE(rc, 0) << v11;
  for (int i = 0; i < 100 && Counter(metrics_, "kvm_tls_handshake_failures_total") <= before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(Counter(metrics_, "kvm_tls_handshake_failures_total"), before + 1) << v11;
}

TEST_F(TlsTest, WrongTokenCountedAndSlowedDown) {
  StartService(false);
  EXPECT_EQ(Counter(metrics_, "kvm_auth_failures_total"), 0);
  std::vector<double> ms;
  for (int i = 0; i < 4; ++i) {
    auto o = Opts();
    o.token = "wrong";
    const auto t0 = Clock::now();
    auto c = client::Client::Connect(o);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), StatusCode::kUnauthenticated) << c.status().ToString();
  }
  EXPECT_EQ(Counter(metrics_, "kvm_auth_failures_total"), 4);
  // 100, 200, 400, 400 ms (the maximum) after the handshake.
  EXPECT_GE(ms[0], 90);
  EXPECT_GE(ms[1], 190);
  EXPECT_GE(ms[2], 390);
  EXPECT_GE(ms[3], 390);
  EXPECT_LT(ms[3], 2000);
  // An unknown tenant is the same refusal.
  auto o = Opts();
  o.tenant = "nobody";
  auto c = client::Client::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnauthenticated);
  EXPECT_EQ(Counter(metrics_, "kvm_auth_failures_total"), 5);
  // The right token is served (after its TLS handshake, at once).
  auto good = client::Client::Connect(Opts());
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  EXPECT_EQ(Counter(metrics_, "kvm_auth_failures_total"), 5);
}

TEST_F(TlsTest, RotatedTokensApplyToNewHellosOnly) {
  StartService(false);
  auto open = client::Client::Connect(Opts());
  ASSERT_TRUE(open.ok()) << open.status().ToString();
  service_->server->SetTenants({{"a", "tokB", false}});
  auto old_token = client::Client::Connect(Opts());
  ASSERT_FALSE(old_token.ok());
  EXPECT_EQ(old_token.status().code(), StatusCode::kUnauthenticated);
  auto o = Opts();
  o.token = "tokB";
  auto rotated = client::Client::Connect(o);
  ASSERT_TRUE(rotated.ok()) << rotated.status().ToString();
  RoundTrip(rotated->get(), 4);
  RoundTrip(open->get(), 5);  // the session authenticated before the rotation stays
}

TEST_F(TlsTest, AdminOverHttps) {
  server::AdminOptions ao;
  ao.listen = "127.0.0.1:0";
  auto tls = server::TlsCredentials::Load({F("server.crt"), F("server.key"), ""});
  ASSERT_TRUE(tls.ok()) << tls.status().ToString();
  ao.tls = *tls;
  auto admin = server::AdminServer::Start(ao, &metrics_);
  ASSERT_TRUE(admin.ok()) << admin.status().ToString();
  const std::string url = "https://127.0.0.1:" + std::to_string((*admin)->port());
  int rc = 0;
  const std::string m =
      Sh("curl -sS --max-time 10 --cacert " + F("ca.crt") + " " + url + "/metrics", &rc);
  EXPECT_EQ(rc, 0) << m;
  EXPECT_NE(m.find("kvm_tls_handshake_failures_total 0"), std::string::npos) << m;
  EXPECT_NE(m.find("kvm_auth_failures_total 0"), std::string::npos) << m;
  const std::string h =
      Sh("curl -sS --max-time 10 --cacert " + F("ca.crt") + " " + url + "/healthz", &rc);
  EXPECT_EQ(rc, 0) << h;
  EXPECT_EQ(h, "ok\n");
  // Plain HTTP on the HTTPS port gets nothing; the server answers HTTPS on.
  Sh("curl -sS --max-time 5 http://127.0.0.1:" + std::to_string((*admin)->port()) + "/healthz",
     &rc);
  EXPECT_NE(rc, 0);
  EXPECT_EQ(Sh("curl -sS --max-time 10 --cacert " + F("ca.crt") + " " + url + "/healthz", &rc),
            "ok\n");
}

}  // namespace
}  // namespace kvm
