// The control-plane server over real TCP on loopback: lifecycle, pipelining, 16 concurrent clients,
// malformed streams answered or closed while another client keeps working, Stop drains.
#include "kvmanager/server.h"

#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "proto/kvm.pb.h"
#include "selector/wire_options.h"
#include "testutil/service.h"

namespace kvm::server {
namespace {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using wire::MessageType;

const ModelShape kShape{2, 4, 2, 32, DType::kF16, 3};

class Client {
 public:
  explicit Client(uint16_t port) : sock_(io_) {
    sock_.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  }
  void SendRaw(std::span<const uint8_t> bytes) {
    asio::write(sock_, asio::buffer(bytes.data(), bytes.size()));
  }
  void Send(MessageType t, uint64_t id, const google::protobuf::MessageLite& m,
            std::span<const uint8_t> payload = {}) {
    SendRaw(wire::EncodeFrame(static_cast<uint16_t>(t), id, m, payload));
  }
  // The next reply frame; false when the server closed the connection.
  bool Recv(wire::Frame* f) {
    for (;;) {
      if (dec_.Next(f)) return true;
      uint8_t buf[65536];
      boost::system::error_code ec;
      const size_t n = sock_.read_some(asio::buffer(buf), ec);
      if (ec) return false;
      if (!dec_.Feed({buf, n}).ok()) return false;
    }
  }
  Status Call(MessageType t, const google::protobuf::MessageLite& m, wire::Frame* out = nullptr,
              std::span<const uint8_t> payload = {}) {
    Send(t, ++id_, m, payload);
    wire::Frame f;
    if (!Recv(&f)) return Status::Unavailable("connection closed");
    EXPECT_EQ(f.header.request_id, id_);
    if (f.header.type == static_cast<uint16_t>(MessageType::kError)) {
      wire::Error e;
      EXPECT_TRUE(wire::ParseProto(f, &e).ok());
      return wire::StatusFromWire(e.code(), e.message());
    }
    if (out) *out = std::move(f);
    return Status::Ok();
  }
  Status Hello(const std::string& tenant, const std::string& token) {
    wire::Hello h;
    h.set_protocol_version(wire::kProtocolVersion);
    h.set_tenant(tenant);
    h.set_auth_token(token);
    return Call(MessageType::kHello, h);
  }

 private:
  asio::io_context io_;
  tcp::socket sock_;
  wire::FrameDecoder dec_;
  uint64_t id_ = 0;
};

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions o;
    o.handler.tenants = {{"dev", "dev", true}, {"a", "tokA", false}};
    o.handler.limits.max_frame_bytes = 1 << 20;
    service_ = std::make_unique<testutil::TestService>(o, 8 << 20);
    store_ = service_->store.get();
    server_ = service_->server.get();
  }
  void TearDown() override { service_.reset(); }
  static wire::CreateSequence Create(uint64_t id) {
    wire::CreateSequence c;
    c.set_sequence_id(id);
    wire::ToWire(kShape, c.mutable_shape());
    c.set_block_size(4);
    c.set_durability(wire::DURABLE);
    return c;
  }
  static std::vector<uint8_t> Payload(uint64_t seed, uint64_t n) {
    std::vector<uint8_t> p(wire::AppendPayloadBytes(kShape, n));
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<uint8_t>(seed * 31 + i * 7);
    return p;
  }
  std::unique_ptr<testutil::TestService> service_;
  store::BlockStore* store_ = nullptr;
  Server* server_ = nullptr;
};

TEST_F(ServerTest, LifecycleOverTcpWithPipelining) {
  Client c(server_->port());
  ASSERT_TRUE(c.Hello("dev", "dev").ok());  // loopback-only development tenant, from loopback
  ASSERT_TRUE(c.Call(MessageType::kCreateSequence, Create(1)).ok());
  // Pipelined: three appends sent back to back, answered in order.
  for (uint64_t i = 0; i < 3; ++i) {
    wire::Append a;
    a.set_sequence_id(1);
    a.set_start_position(i * 5);
    for (int t = 0; t < 5; ++t) a.add_token_ids(static_cast<uint32_t>(i * 5 + t));
    c.Send(MessageType::kAppend, 100 + i, a, Payload(i, 5));
  }
  for (uint64_t i = 0; i < 3; ++i) {
    wire::Frame f;
    ASSERT_TRUE(c.Recv(&f));
    EXPECT_EQ(f.header.request_id, 100 + i);
    wire::AppendReply r;
    ASSERT_TRUE(wire::ParseProto(f, &r).ok());
    EXPECT_EQ(r.length(), (i + 1) * 5);
  }
  wire::ReadBlocks rb;
  rb.set_sequence_id(1);
  rb.add_block_indices(3);
  wire::Frame f;
  ASSERT_TRUE(c.Call(MessageType::kReadBlocks, rb, &f).ok());
  EXPECT_EQ(f.payload.size(), 4u * 32 * 2);
  wire::DeleteSequence d;
  d.set_sequence_id(1);
  EXPECT_TRUE(c.Call(MessageType::kDeleteSequence, d).ok());
  EXPECT_TRUE(c.Call(MessageType::kDeleteSequence, d).IsNotFound());
}

TEST_F(ServerTest, SixteenConcurrentClients) {
  std::vector<std::thread> ts;
  std::atomic<int> ok{0};
  for (int k = 0; k < 16; ++k)
    ts.emplace_back([&, k] {
      Client c(server_->port());
      if (!c.Hello("a", "tokA").ok()) return;
      if (!c.Call(MessageType::kCreateSequence, Create(100 + k)).ok()) return;
      for (uint64_t step = 0; step < 20; ++step) {
        wire::Append a;
        a.set_sequence_id(100 + k);
        a.set_start_position(step);
        a.add_token_ids(static_cast<uint32_t>(step));
        if (!c.Call(MessageType::kAppend, a, nullptr, Payload(k, 1)).ok()) return;
      }
      wire::ListSequences l;
      if (c.Call(MessageType::kListSequences, l).ok()) ++ok;
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(ok.load(), 16);
  EXPECT_EQ(store_->List("a").size(), 16u);
  for (const auto& info : store_->List("a")) EXPECT_EQ(info.length, 20u);
}

TEST_F(ServerTest, MalformedStreamsAreAnsweredOrClosedAndOthersKeepWorking) {
  Client good(server_->port());
  ASSERT_TRUE(good.Hello("a", "tokA").ok());
  ASSERT_TRUE(good.Call(MessageType::kCreateSequence, Create(9)).ok());
  std::mt19937 rng(7);
  auto still_good = [&] {
    wire::Heartbeat hb;
    return good.Call(MessageType::kHeartbeat, hb).ok();
  };
  {  // bad magic: an Error frame, then the connection closes
    Client c(server_->port());
    std::vector<uint8_t> junk(64, 0x41);
    c.SendRaw(junk);
    wire::Frame f;
    ASSERT_TRUE(c.Recv(&f));
    EXPECT_EQ(f.header.type, static_cast<uint16_t>(MessageType::kError));
    EXPECT_FALSE(c.Recv(&f));
  }
  EXPECT_TRUE(still_good());
  {  // a length over the limit: refused before allocation
    Client c(server_->port());
    uint8_t hdr[wire::kFrameHeaderBytes];
    wire::EncodeFrameHeader({static_cast<uint16_t>(MessageType::kAppend), 0, 1, 0, 1ull << 40},
                            hdr);
    c.SendRaw(hdr);
    wire::Frame f;
    ASSERT_TRUE(c.Recv(&f));
    wire::Error e;
    ASSERT_TRUE(wire::ParseProto(f, &e).ok());
    EXPECT_EQ(e.code(), wire::ERR_OUT_OF_RANGE);
  }
  for (int k = 0; k < 10; ++k) {  // random bytes
    Client c(server_->port());
    std::vector<uint8_t> junk(1 + rng() % 300);
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    c.SendRaw(junk);
  }
  {  // a slow sender: half a frame, then nothing; the server keeps serving others meanwhile
    Client c(server_->port());
    wire::Heartbeat hb;
    auto bytes = wire::EncodeFrame(static_cast<uint16_t>(MessageType::kHeartbeat), 1, hb);
    c.SendRaw({bytes.data(), bytes.size() / 2});
    EXPECT_TRUE(still_good());
  }
  {  // wrong dims: an append whose payload does not match the shape
    wire::Append a;
    a.set_sequence_id(9);
    a.add_token_ids(1);
    std::vector<uint8_t> wrong(100);
    EXPECT_TRUE(good.Call(MessageType::kAppend, a, nullptr, wrong).IsInvalidArgument());
  }
  EXPECT_TRUE(still_good());
}

TEST_F(ServerTest, StopDrainsRequestsInFlight) {
  Client c(server_->port());
  ASSERT_TRUE(c.Hello("a", "tokA").ok());
  ASSERT_TRUE(c.Call(MessageType::kCreateSequence, Create(5)).ok());
  for (uint64_t i = 0; i < 50; ++i) {  // queue many, then stop: every one is answered
    wire::Append a;
    a.set_sequence_id(5);
    a.set_start_position(i);
    a.add_token_ids(static_cast<uint32_t>(i));
    c.Send(MessageType::kAppend, 1000 + i, a, Payload(i, 1));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::thread stopper([&] { server_->Stop(5000); });
  // Every queued request gets a reply: executed (an AppendReply), or refused as draining. The
  // executed ones come first, in order, and exactly they are stored.
  uint64_t executed = 0, draining = 0;
  wire::Frame f;
  while (executed + draining < 50 && c.Recv(&f)) {
    EXPECT_EQ(f.header.request_id, 1000 + executed + draining);
    if (f.header.type == static_cast<uint16_t>(MessageType::kError)) {
      wire::Error e;
      ASSERT_TRUE(wire::ParseProto(f, &e).ok());
      EXPECT_EQ(e.code(), wire::ERR_UNAVAILABLE) << e.message();
      EXPECT_NE(e.message().find("draining"), std::string::npos) << e.message();
      ++draining;
    } else {
      EXPECT_EQ(draining, 0u) << "an executed request after a refused one";
      ++executed;
    }
  }
  stopper.join();
  EXPECT_EQ(executed + draining, 50u);
  EXPECT_EQ(*store_->Length({"a", 5}), executed);
}

}  // namespace
}  // namespace kvm::server

namespace kvm::server {
namespace {

TEST_F(ServerTest, SilentSessionsAreClosedHeartbeatsKeepThemAlive) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.handler.tenants = {{"a", "tokA", false}};
  o.session_timeout_ms = 1000;
  auto s = Server::Start(o, store_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  Client silent((*s)->port()), beating((*s)->port());
  ASSERT_TRUE(silent.Hello("a", "tokA").ok());
  ASSERT_TRUE(beating.Hello("a", "tokA").ok());
  for (int i = 0; i < 30; ++i) {  // 3 s: three timeouts' worth, a beat every 0.1 s
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ASSERT_TRUE(beating.Call(MessageType::kHeartbeat, wire::Heartbeat()).ok()) << "beat " << i;
  }
  wire::Frame f;
  EXPECT_FALSE(silent.Recv(&f));  // the server closed it
  EXPECT_TRUE(beating.Call(MessageType::kStats, wire::Stats()).ok());
}

}  // namespace
}  // namespace kvm::server

namespace kvm::server {
namespace {

TEST_F(ServerTest, RequestsQueuedPastTheDeadlineAreTimedOutEachAnsweredOnce) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.handler.tenants = {{"a", "tokA", false}};
  o.request_deadline_ms = 1;
  o.worker_threads = 1;
  o.max_session_queued = 4000;  // all 3000 queue: the deadline answers them, not the queue limit
  auto s = Server::Start(o, store_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  Client c((*s)->port());
  Status hello = Status::TimedOut("");
  for (int i = 0; i < 100 && hello.IsTimedOut(); ++i)  // 1 ms is short on a loaded machine
    hello = c.Hello("a", "tokA");
  ASSERT_TRUE(hello.ok()) << hello.ToString();
  // 3000 pipelined requests: the later ones wait in the queue for longer than 1 ms.
  std::vector<uint8_t> all;
  for (uint64_t id = 100; id < 3100; ++id) {
    const auto f =
        wire::EncodeFrame(static_cast<uint16_t>(MessageType::kHeartbeat), id, wire::Heartbeat());
    all.insert(all.end(), f.begin(), f.end());
  }
  c.SendRaw(all);
  int ok = 0, timed_out = 0;
  std::set<uint64_t> answered;  // replies are matched by request id: every one, exactly once
  for (uint64_t n = 0; n < 3000; ++n) {
    wire::Frame f;
    ASSERT_TRUE(c.Recv(&f));
    ASSERT_TRUE(f.header.request_id >= 100 && f.header.request_id < 3100) << f.header.request_id;
    ASSERT_TRUE(answered.insert(f.header.request_id).second) << "twice: " << f.header.request_id;
    if (f.header.type == static_cast<uint16_t>(MessageType::kError)) {
      wire::Error e;
      ASSERT_TRUE(wire::ParseProto(f, &e).ok());
      ASSERT_EQ(e.code(), wire::ERR_TIMED_OUT) << e.message();
      ++timed_out;
    } else {
      ++ok;
    }
  }
  EXPECT_GT(timed_out, 0);
  EXPECT_EQ(ok + timed_out, 3000);
  const Status after = c.Call(MessageType::kStats, wire::Stats());  // the session goes on
  EXPECT_TRUE(after.ok() || after.IsTimedOut()) << after.ToString();
}

}  // namespace
}  // namespace kvm::server

namespace kvm::server {
namespace {

// Appends add no round trip to the critical path (protocol 2): while an Append's WAL write is held
// on a latch, a RetrieveLayer of the same sequence (carrying the K row of the token being appended)
// is answered, and the replies come back by request id, the retrieval's first.
TEST(ServerOrderingTest, ARetrievalOvertakesAnAppendWhoseWalWriteIsHeld) {
  std::mutex mu;
  std::condition_variable cv;
  bool armed = false, entered = false, released = false;
  auto latch = [&](store::StoreOptions& so) {
    so.test_before_write = [&] {
      std::unique_lock<std::mutex> l(mu);
      if (!armed) return;
      entered = true;
      cv.notify_all();
      cv.wait(l, [&] { return released; });
    };
  };
  ServerOptions o;
  o.handler.tenants = {{"a", "tokA", false}};
  testutil::TestService svc(o, 8 << 20, latch);
  Client c(svc.server->port());
  ASSERT_TRUE(c.Hello("a", "tokA").ok());
  const ModelShape shape{2, 4, 2, 32, DType::kF16, 3};
  sel::SelectorOptions so;
  so.geometry = {4, 4, 8};
  so.budget_tokens = 32;
  wire::CreateSequence cs;
  cs.set_sequence_id(5);
  wire::ToWire(shape, cs.mutable_shape());
  cs.set_block_size(4);
  cs.set_durability(wire::DURABLE);
  sel::ToWire({"oracle", so}, cs.mutable_selector());
  cs.set_hot_set_slots(64);
  ASSERT_TRUE(c.Call(MessageType::kCreateSequence, cs).ok());
  auto payload = [&](uint64_t n, uint8_t seed) {
    std::vector<uint8_t> p(wire::AppendPayloadBytes(shape, n));
    for (size_t i = 0; i < p.size(); i += 2) p[i] = uint8_t(seed + i), p[i + 1] = 0x38;  // fp16
    return p;
  };
  wire::Append a;
  a.set_sequence_id(5);
  for (uint32_t i = 0; i < 64; ++i) a.add_token_ids(i);
  ASSERT_TRUE(c.Call(MessageType::kAppend, a, nullptr, payload(64, 1)).ok());
  {
    std::lock_guard<std::mutex> l(mu);
    armed = true;
  }
  wire::Append next;  // token 64: its WAL write will wait on the latch
  next.set_sequence_id(5);
  next.set_start_position(64);
  next.add_token_ids(64);
  c.Send(MessageType::kAppend, 100, next, payload(1, 2));
  {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(10), [&] { return entered; }));
  }
  wire::RetrieveLayer r;  // step 64: token 64's K rows travel with the queries
  r.set_sequence_id(5);
  r.set_step(64);
  r.set_layer(0);
  r.add_kv_heads(0);
  r.add_kv_heads(1);
  r.set_pending_tokens(1);
  std::vector<uint8_t> q(2 * 2 * 32 * 4 + 2 * 32 * 2, 0);
  for (size_t i = 0; i < 2 * 2 * 32; ++i) reinterpret_cast<float*>(q.data())[i] = 0.01f * i;
  c.Send(MessageType::kRetrieveLayer, 101, r, q);
  wire::Frame f;
  ASSERT_TRUE(c.Recv(&f));  // the retrieval's reply, while the Append still waits
  EXPECT_EQ(f.header.request_id, 101u);
  EXPECT_EQ(f.header.type, wire::ReplyType(MessageType::kRetrieveLayer));
  {
    std::lock_guard<std::mutex> l(mu);
    EXPECT_FALSE(released);
    released = true;
  }
  cv.notify_all();
  ASSERT_TRUE(c.Recv(&f));
  EXPECT_EQ(f.header.request_id, 100u);
  EXPECT_EQ(f.header.type, wire::ReplyType(MessageType::kAppend));
  EXPECT_EQ(*svc.store->Length({"a", 5}), 65u);
}

}  // namespace
}  // namespace kvm::server
