// The control plane's request handler, driven with frames and no sockets.
#include "kvmanager/handler.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "proto/kvm.pb.h"

namespace kvm::server {
namespace {

using wire::MessageType;

struct Reply {
  uint16_t type = 0;
  wire::Frame frame;
  Status error;  // decoded from an Error frame
};

class HandlerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvm_handler_XXXXXX";
    dir_ = mkdtemp(tmpl);
    store::StoreOptions o;
    o.dir = dir_;
    o.host_capacity_bytes = 1 << 20;
    store_ = std::move(store::BlockStore::Open(o)).value();
    HandlerOptions h;
    h.tenants = {{"dev", "devtok", true}, {"a", "tokA", false}, {"b", "tokB", false}};
    handler_ = std::make_unique<RequestHandler>(store_.get(), h);
  }
  void TearDown() override {
    handler_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  Reply Call(SessionState& s, MessageType t, const google::protobuf::MessageLite& m,
             std::span<const uint8_t> payload = {}) {
    const auto bytes = wire::EncodeFrame(static_cast<uint16_t>(t), ++id_, m, payload);
    wire::FrameDecoder dec;
    wire::Frame in;
    EXPECT_TRUE(dec.Feed(bytes).ok());
    EXPECT_TRUE(dec.Next(&in));
    return Decode(handler_->Handle(s, in));
  }
  Reply Decode(const std::vector<uint8_t>& bytes) {
    wire::FrameDecoder dec;
    Reply r;
    EXPECT_TRUE(dec.Feed(bytes).ok());
    EXPECT_TRUE(dec.Next(&r.frame));
    r.type = r.frame.header.type;
    EXPECT_EQ(r.frame.header.request_id, id_);
    if (r.type == static_cast<uint16_t>(MessageType::kError)) {
      wire::Error e;
      EXPECT_TRUE(wire::ParseProto(r.frame, &e).ok());
      r.error = wire::StatusFromWire(e.code(), e.message());
    }
    return r;
  }
  Status Hello(SessionState& s, const std::string& tenant, const std::string& token,
               uint32_t version = 1) {
    wire::Hello h;
    h.set_protocol_version(version);
    h.set_tenant(tenant);
    h.set_auth_token(token);
    return Call(s, MessageType::kHello, h).error;
  }
  wire::CreateSequence Create(uint64_t id) {
    wire::CreateSequence c;
    c.set_sequence_id(id);
    wire::ToWire(ModelShape{2, 4, 2, 32, DType::kF16, 1}, c.mutable_shape());
    c.set_block_size(4);
    c.set_durability(wire::DURABLE);
    return c;
  }
  std::string dir_;
  std::unique_ptr<store::BlockStore> store_;
  std::unique_ptr<RequestHandler> handler_;
  uint64_t id_ = 0;
};

TEST_F(HandlerTest, HelloGatesEverythingWrongTokenOrVersionIsRefused) {
  SessionState s;
  EXPECT_TRUE(
      Call(s, MessageType::kListSequences, wire::ListSequences()).error.IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "a", "wrong").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "", "").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "a", "tokA", 2).IsFailedPrecondition());
  EXPECT_TRUE(Hello(s, "dev", "devtok").IsPermissionDenied());  // loopback-only tenant, remote peer
  SessionState local;
  local.loopback = true;
  EXPECT_TRUE(Hello(local, "dev", "devtok").ok());
  EXPECT_TRUE(Hello(s, "a", "tokA").ok());
  const Reply r = Call(s, MessageType::kHeartbeat, wire::Heartbeat());
  EXPECT_EQ(r.type, wire::ReplyType(MessageType::kHeartbeat));
}

TEST_F(HandlerTest, SequencesRoundTripAndAnotherTenantsSequenceIsNotFound) {
  SessionState a, b;
  ASSERT_TRUE(Hello(a, "a", "tokA").ok());
  ASSERT_TRUE(Hello(b, "b", "tokB").ok());
  ASSERT_TRUE(Call(a, MessageType::kCreateSequence, Create(7)).error.ok());
  EXPECT_TRUE(Call(a, MessageType::kCreateSequence, Create(7)).error.IsAlreadyExists());
  wire::Append ap;
  ap.set_sequence_id(7);
  for (uint32_t t = 0; t < 6; ++t) ap.add_token_ids(100 + t);
  std::vector<uint8_t> payload(wire::AppendPayloadBytes({2, 4, 2, 32, DType::kF16, 1}, 6));
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 13);
  Reply r = Call(a, MessageType::kAppend, ap, payload);
  ASSERT_TRUE(r.error.ok()) << r.error.ToString();
  wire::AppendReply ar;
  ASSERT_TRUE(wire::ParseProto(r.frame, &ar).ok());
  EXPECT_EQ(ar.length(), 6u);
  // K of layer 1, KV head 0, blocks 0 and 1 (the second ragged): rows of the payload.
  wire::ReadBlocks rb;
  rb.set_sequence_id(7);
  rb.set_layer(1);
  rb.set_kv_head(0);
  rb.add_block_indices(0);
  rb.add_block_indices(1);
  r = Call(a, MessageType::kReadBlocks, rb);
  ASSERT_TRUE(r.error.ok()) << r.error.ToString();
  ASSERT_EQ(r.frame.payload.size(), 2u * 4 * 32 * 2);
  const size_t row = 64, k_base = ((1 * 2 + 0) * 2 + 0) * 6 * row;  // [layer][kv_head][K,V][n][D]
  for (size_t t = 0; t < 6; ++t)
    for (size_t i = 0; i < row; ++i)
      ASSERT_EQ(r.frame.payload[t * row + i], payload[k_base + t * row + i]) << t;
  for (size_t i = 6 * row; i < 8 * row; ++i) ASSERT_EQ(r.frame.payload[i], 0);  // past the end
  // Tenant b sees nothing of a's: NotFound, never "exists but forbidden".
  EXPECT_TRUE(Call(b, MessageType::kReadBlocks, rb).error.IsNotFound());
  EXPECT_TRUE(Call(b, MessageType::kAppend, ap, payload).error.IsNotFound());
  wire::DeleteSequence del;
  del.set_sequence_id(7);
  EXPECT_TRUE(Call(b, MessageType::kDeleteSequence, del).error.IsNotFound());
  r = Call(b, MessageType::kListSequences, wire::ListSequences());
  wire::ListSequencesReply lr;
  ASSERT_TRUE(wire::ParseProto(r.frame, &lr).ok());
  EXPECT_EQ(lr.sequences_size(), 0);
  r = Call(a, MessageType::kListSequences, wire::ListSequences());
  ASSERT_TRUE(wire::ParseProto(r.frame, &lr).ok());
  ASSERT_EQ(lr.sequences_size(), 1);
  EXPECT_EQ(lr.sequences(0).length(), 6u);
  EXPECT_TRUE(Call(a, MessageType::kDeleteSequence, del).error.ok());
}

TEST_F(HandlerTest, MalformedRequestsAreErrorsNotCrashes) {
  SessionState s;
  ASSERT_TRUE(Hello(s, "a", "tokA").ok());
  ASSERT_TRUE(Call(s, MessageType::kCreateSequence, Create(1)).error.ok());
  wire::Frame bad;  // a protobuf header that does not parse
  bad.header.type = static_cast<uint16_t>(MessageType::kAppend);
  bad.header.request_id = ++id_;
  bad.proto = {0xff, 0xff, 0xff};
  EXPECT_TRUE(Decode(handler_->Handle(s, bad)).error.IsInvalidArgument());
  wire::Append ap;  // payload of the wrong size
  ap.set_sequence_id(1);
  ap.add_token_ids(5);
  std::vector<uint8_t> short_payload(10);
  EXPECT_TRUE(Call(s, MessageType::kAppend, ap, short_payload).error.IsInvalidArgument());
  wire::CreateSequence c = Create(2);  // a bad shape
  c.mutable_shape()->set_head_dim(48);
  EXPECT_TRUE(Call(s, MessageType::kCreateSequence, c).error.IsInvalidArgument());
  wire::RetrieveLayer rl;
  EXPECT_TRUE(Call(s, MessageType::kRetrieveLayer, rl).error.IsUnimplemented());
  wire::Frame reply_from_client;  // a reply type sent as a request
  reply_from_client.header.type = wire::ReplyType(MessageType::kStats);
  reply_from_client.header.request_id = ++id_;
  EXPECT_TRUE(Decode(handler_->Handle(s, reply_from_client)).error.IsInvalidArgument());
  EXPECT_TRUE(Call(s, MessageType::kStats, wire::Stats()).error.ok());  // the session still works
}

}  // namespace
}  // namespace kvm::server
