// The control plane's request handler, driven with frames and no sockets.
#include "kvmanager/handler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>

#include "attention/reference.h"
#include "kvmanager/metrics.h"
#include "prom_text.h"
#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "selector/delta_histogram.h"
#include "selector/plan.h"
#include "selector/prhs.h"
#include "selector/scoring.h"
#include "selector/wire_options.h"
#include "testutil/host_device.h"
#include "testutil/kv.h"
#include "testutil/service.h"
#include "transport/transport.h"

namespace kvm::server {
namespace {

using wire::MessageType;

// Encodes one request frame, feeds it to `handler` and returns the bytes it answered with.
std::vector<uint8_t> HandleFrame(RequestHandler& handler, SessionState& s, uint64_t id,
                                 MessageType t, const google::protobuf::MessageLite& m,
                                 std::span<const uint8_t> payload) {
  const auto bytes = wire::EncodeFrame(static_cast<uint16_t>(t), id, m, payload);
  wire::FrameDecoder dec;
  wire::Frame in;
  EXPECT_TRUE(dec.Feed(bytes).ok());
  EXPECT_TRUE(dec.Next(&in));
  return handler.Handle(s, in);
}

struct Reply {
  uint16_t type = 0;
  wire::Frame frame;
  Status error;  // decoded from an Error frame
};

class HandlerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::function<Result<std::unique_ptr<store::Device>>()> gpu;
    if (gpu_double_)
      gpu = []() -> Result<std::unique_ptr<store::Device>> {
        return std::unique_ptr<store::Device>(new testutil::HostDevice());
      };
    tmp_ = std::make_unique<testutil::TempStore>(1 << 20, gpu);
    store_ = tmp_->store.get();
    HandlerOptions h;
    h.tenants = {{"dev", "devtok", true}, {"a", "tokA", false}, {"b", "tokB", false}};
    h.metrics = metrics_.get();
    handler_ = std::make_unique<RequestHandler>(store_, h);
  }
  void TearDown() override {
    handler_.reset();
    tmp_.reset();
  }
  Reply Call(SessionState& s, MessageType t, const google::protobuf::MessageLite& m,
             std::span<const uint8_t> payload = {}) {
    return Decode(HandleFrame(*handler_, s, ++id_, t, m, payload));
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
               uint32_t version = wire::kProtocolVersion) {
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
  bool gpu_double_ = false;           // a GPU tier on the host-memory device double
  std::unique_ptr<Metrics> metrics_;  // set before SetUp: the handler reports into it
  std::unique_ptr<testutil::TempStore> tmp_;
  store::BlockStore* store_ = nullptr;
  std::unique_ptr<RequestHandler> handler_;
  uint64_t id_ = 0;
};

TEST_F(HandlerTest, HelloGatesEverythingWrongTokenOrVersionIsRefused) {
  SessionState s;
  EXPECT_TRUE(
      Call(s, MessageType::kListSequences, wire::ListSequences()).error.IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "a", "wrong").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "", "").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "a", "tokA", 3).IsFailedPrecondition());
  // Version 1 (replies in arrival order, no K once, blocks before a reply frame) is refused with
  // the reason, not misread.
  const Status v1 = Hello(s, "a", "tokA", 1);
  EXPECT_TRUE(v1.IsFailedPrecondition()) << v1.ToString();
  EXPECT_NE(v1.message().find("request id"), std::string::npos) << v1.ToString();
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
  wire::RetrieveLayer rl;  // a sequence created without selector params: storage only
  rl.set_sequence_id(1);
  rl.add_kv_heads(0);
  std::vector<uint8_t> q(2ull * 32 * 4);
  Reply no_sel = Call(s, MessageType::kRetrieveLayer, rl, q);
  EXPECT_TRUE(no_sel.error.IsFailedPrecondition());
  EXPECT_NE(no_sel.error.message().find("selector"), std::string::npos);
  wire::Frame reply_from_client;  // a reply type sent as a request
  reply_from_client.header.type = wire::ReplyType(MessageType::kStats);
  reply_from_client.header.request_id = ++id_;
  EXPECT_TRUE(Decode(handler_->Handle(s, reply_from_client)).error.IsInvalidArgument());
  EXPECT_TRUE(Call(s, MessageType::kStats, wire::Stats()).error.ok());  // the session still works
}

// ---- The retrieval engine through the handler vs the in-process selector on the same data ----
class RetrieveTest : public HandlerTest {
 protected:
  static constexpr uint32_t L = 2, Hq = 4, Hkv = 2, D = 32, B = 4;
  static constexpr uint64_t kT = 240;
  const ModelShape shape{L, Hq, Hkv, D, DType::kF16, 7};
  void SetUp() override {
    HandlerTest::SetUp();
    for (uint32_t i = 0; i < L * Hkv; ++i) kv_.emplace_back(kT, D, B, DType::kF16, 100 + i);
    opt_.geometry = {B, 4, 8};
    opt_.budget_tokens = 48;
    opt_.prhs.max_cluster_steps = 8;
    ASSERT_TRUE(Hello(s_, "a", "tokA").ok());
  }
  wire::CreateSequence CreateWith(uint64_t id, uint32_t slots) {
    wire::CreateSequence c;
    c.set_sequence_id(id);
    wire::ToWire(shape, c.mutable_shape());
    c.set_block_size(B);
    c.set_durability(wire::CACHE);
    sel::ToWire({"prhs", opt_}, c.mutable_selector());
    c.set_hot_set_slots(slots);
    return c;
  }
  // Appends tokens [from, to) of the random KV.
  void AppendTokens(uint64_t id, uint64_t from, uint64_t to) {
    wire::Append a;
    a.set_sequence_id(id);
    a.set_start_position(from);
    const size_t row = D * 2, n = to - from;
    std::vector<uint8_t> payload(size_t{L} * Hkv * 2 * n * row);
    uint8_t* p = payload.data();
    for (uint32_t i = 0; i < L * Hkv; ++i)
      for (int v = 0; v < 2; ++v)
        for (uint64_t t = from; t < to; ++t, p += row) std::memcpy(p, Row(i, t, v), row);
    for (uint64_t t = from; t < to; ++t) a.add_token_ids(uint32_t(t % 1000));
    ASSERT_TRUE(Call(s_, MessageType::kAppend, a, payload).error.ok());
  }
  const uint8_t* Row(uint32_t i, uint64_t t, int values) {
    const attn::HeadKV kv = kv_[i].view();
    const void* const* blocks = values ? kv.v_blocks : kv.k_blocks;
    return static_cast<const uint8_t*>(blocks[t / B]) + (t % B) * D * 2;
  }
  // Queries of one group (random, seeded by step/layer/head) and the payload with pending rows.
  std::vector<float> Queries(uint64_t step, uint32_t layer, uint32_t h) {
    std::mt19937 rng(uint32_t(step * 31 + layer * 7 + h));
    std::normal_distribution<float> n(0.f, 1.f);
    std::vector<float> q(Hq / Hkv * D);
    for (auto& x : q) x = 2.f * n(rng);
    return q;
  }
  std::vector<uint8_t> QueryPayload(uint64_t step, uint32_t layer, std::vector<uint32_t> heads,
                                    uint32_t pending) {
    std::vector<uint8_t> out;
    for (uint32_t h : heads) {
      const auto q = Queries(step, layer, h);
      const auto* b = reinterpret_cast<const uint8_t*>(q.data());
      out.insert(out.end(), b, b + q.size() * 4);
    }
    for (uint32_t h : heads)
      for (uint64_t t = step + 1 - pending; t <= step; ++t) {
        const uint8_t* r = Row(layer * Hkv + h, t, 0);
        out.insert(out.end(), r, r + D * 2);
      }
    return out;
  }
  Reply Retrieve(uint64_t id, uint64_t step, uint32_t layer, std::vector<uint32_t> heads,
                 uint32_t pending, uint64_t generation = 0) {
    wire::RetrieveLayer m;
    m.set_sequence_id(id);
    m.set_step(step);
    m.set_layer(layer);
    for (uint32_t h : heads) m.add_kv_heads(h);
    m.set_pending_tokens(pending);
    m.set_hot_set_generation(generation);
    return Call(s_, MessageType::kRetrieveLayer, m, QueryPayload(step, layer, heads, pending));
  }
  // Six decode steps' retrievals, repeats, a new generation and an audit, each checked against
  // the in-process selector, mirror and exact δ on the same keys.
  void CheckRetrievalsMatchTheInProcessSelector();
  std::vector<testutil::RandomKv> kv_;  // [layer][kv_head]
  sel::SelectorOptions opt_;
  SessionState s_;
};

TEST_F(RetrieveTest, RetrieveLayerMatchesTheInProcessSelectorAndSendsTheStoredBytes) {
  CheckRetrievalsMatchTheInProcessSelector();
  EXPECT_EQ(store_->Stats().gpu_tier.rfind("absent", 0), 0u) << store_->Stats().gpu_tier;
}

// The same with the scoring on the store's GPU tier (keys uploaded once as they are appended,
// pending rows scored after them): on the device double, whose logits are the CPU's, everything
// must be identical — and every scoring pass ran there.
class RetrieveOnGpuTierTest : public RetrieveTest {
 protected:
  RetrieveOnGpuTierTest() { gpu_double_ = true; }
};

TEST_F(RetrieveOnGpuTierTest, RetrieveLayerMatchesTheInProcessSelectorAndSendsTheStoredBytes) {
  CheckRetrievalsMatchTheInProcessSelector();
  const store::StoreStats st = store_->Stats();
  EXPECT_EQ(st.gpu_tier.rfind("host double", 0), 0u) << st.gpu_tier;
  // 4 steps × 2 layers × 2 heads (steps 20 and 21 are short contexts: nothing to score), 2 more
  // retrievals (the stale one is refused first), two audits (of steps 150 and 239; step 20's is
  // refused before scoring).
  EXPECT_EQ(st.gpu.scored, 4u * 2 * 2 + 2 + 2);
  EXPECT_EQ(st.gpu.refused, 0u);
  EXPECT_EQ(st.gpu.buffers, 4u);  // one per (layer, KV head)
  // Each stored key block went up once, plus the re-sent partial blocks as appends filled them.
  EXPECT_GE(st.gpu.uploaded_bytes, uint64_t{L} * Hkv * (239 / B) * B * D * 2);
  EXPECT_LE(st.gpu.uploaded_bytes, uint64_t{L} * Hkv * (239 / B + 6) * B * D * 2);
  EXPECT_EQ(st.gpu.uploaded_blocks * B * D * 2, st.gpu.uploaded_bytes);  // whole key blocks
}

void RetrieveTest::CheckRetrievalsMatchTheInProcessSelector() {
  auto ref = std::move(sel::PrhsSelector::Make(opt_, shape, kT)).value();
  const uint32_t slots = uint32_t(ref->HotSetSlots());
  ASSERT_TRUE(Call(s_, MessageType::kCreateSequence, CreateWith(1, slots)).error.ok());
  std::vector<sel::HotSetMirror> mirrors(L * Hkv, sel::HotSetMirror(slots));
  std::vector<uint64_t> local_first(L * Hkv, UINT64_MAX);
  std::vector<sel::HeadSummaries> sums;
  for (uint32_t i = 0; i < L * Hkv; ++i) {
    sums.emplace_back(B, D);
    for (uint64_t t = 0; t < kT; ++t) sums[i].Append(t, kv_[i].key(t));
  }
  const sel::Geometry& geo = opt_.geometry;
  uint64_t appended = 0;
  size_t sent_total = 0, anchors = 0;
  // Layer 0, KV head 0: the mirror's slot table and the window's first block a step left.
  std::pair<std::vector<uint64_t>, uint64_t> left_by_150, left_by_239;
  for (uint64_t step : {20ull, 21ull, 100ull, 101ull, 150ull, 239ull}) {
    AppendTokens(1, appended, step);  // the step's own token is pending (decode order)
    appended = step;
    for (uint32_t l = 0; l < L; ++l) {
      Reply r = Retrieve(1, step, l, {1, 0}, 1);
      ASSERT_TRUE(r.error.ok()) << r.error.ToString();
      wire::RetrieveLayerReply rep;
      ASSERT_TRUE(wire::ParseProto(r.frame, &rep).ok());
      ASSERT_EQ(rep.heads_size(), 2);
      size_t at = 0;  // payload offset
      for (int k = 0; k < 2; ++k) {
        const wire::HeadSelection& hs = rep.heads(k);
        const uint32_t h = hs.kv_head(), i = l * Hkv + h;
        EXPECT_EQ(h, k == 0 ? 1u : 0u);
        // The in-process selector on the same keys (a prefix view of the random KV).
        const auto q = Queries(step, l, h);
        auto prefix = kv_[i].view();
        prefix.tokens = step + 1;
        prefix.n_blocks = uint32_t(geo.Blocks(step + 1));
        sel::HeadSummaries hsum(B, D);
        for (uint64_t t = 0; t <= step; ++t) hsum.Append(t, kv_[i].key(t));
        sel::Selection want;
        ASSERT_TRUE(ref->Anchor({step, l, h, q.data(), &prefix, &hsum}, &want).ok());
        const std::vector<uint64_t> got(hs.resident_blocks().begin(), hs.resident_blocks().end());
        EXPECT_EQ(got, want.blocks) << "step " << step << " layer " << l << " head " << h;
        ASSERT_EQ(hs.delta_size(), 2);
        for (int j = 0; j < 2; ++j) {
          EXPECT_EQ(hs.delta(j), float(want.delta[j]));
          if (want.anchor) {
            EXPECT_EQ(hs.log_delta(j), ref->gate()->head_gate(l, h * 2 + j).log_delta_a);
          }
        }
        EXPECT_EQ(hs.delta_kind(), static_cast<wire::DeltaKind>(want.kind));
        EXPECT_EQ(hs.anchor(), want.anchor);
        EXPECT_EQ(hs.k_max(), want.k_max);
        anchors += want.anchor;
        // The same plan as a mirror run here, and the sent blocks are the stored bytes.
        sel::PlanStep plan;
        sel::PlanBytes bytes;
        const uint64_t prev =
            local_first[i] == UINT64_MAX ? geo.WindowFirstBlock(step + 1) : local_first[i];
        ASSERT_TRUE(mirrors[i]
                        .Plan(want.blocks, step + 1, geo, prev, B * D * 2, D * 2, &plan, &bytes)
                        .ok());
        local_first[i] = geo.WindowFirstBlock(step + 1);
        if (i == 0 && (step == 150 || step == 239))  // the worker's hot set and window now
          (step == 150 ? left_by_150 : left_by_239) = {mirrors[i].slot_table(), local_first[i]};
        ASSERT_EQ(size_t(hs.block_indices_size()), plan.sends.size());
        ASSERT_EQ(size_t(hs.local_fill_blocks_size()), plan.local_fills.size());
        EXPECT_EQ(std::vector<uint32_t>(hs.evicted_slots().begin(), hs.evicted_slots().end()),
                  plan.evicted_slots);
        for (int j = 0; j < hs.block_indices_size(); ++j) {
          EXPECT_EQ(hs.block_indices(j), plan.sends[j].first);
          EXPECT_EQ(hs.slots(j), plan.sends[j].second);
          const uint64_t b = hs.block_indices(j);
          for (int v = 0; v < 2; ++v, at += B * D * 2) {
            ASSERT_LE(at + B * D * 2, r.frame.payload.size());
            const attn::HeadKV ref = kv_[i].view();
            const void* const* ref_blocks = v ? ref.v_blocks : ref.k_blocks;
            const void* blk = ref_blocks[b];
            EXPECT_EQ(std::memcmp(r.frame.payload.data() + at, blk, B * D * 2), 0)
                << "block " << b << (v ? " V" : " K");
          }
        }
        sent_total += plan.sends.size();
      }
      EXPECT_EQ(at, r.frame.payload.size());
    }
  }
  EXPECT_GT(anchors, 0u);
  EXPECT_GT(sent_total, 0u);

  // An audit overtaken by later retrievals (Audit and RetrieveLayer may run in either order):
  // the audit of step 150 measures the set the worker attended then, not the one step 239 left.
  auto audit = [&](uint64_t step) {
    wire::Audit m;
    m.set_sequence_id(1);
    m.set_step(step);
    m.set_layer(0);
    m.add_kv_heads(0);
    m.set_pending_tokens(0);
    return Call(s_, MessageType::kAudit, m, QueryPayload(step, 0, {0}, 0));
  };
  {
    Reply ar = audit(150);
    ASSERT_TRUE(ar.error.ok()) << ar.error.ToString();
    wire::AuditReply arep;
    ASSERT_TRUE(wire::ParseProto(ar.frame, &arep).ok());
    ASSERT_EQ(arep.delta_size(), 2);
    auto prefix = kv_[0].view();
    prefix.tokens = 151;
    prefix.n_blocks = uint32_t(geo.Blocks(151));
    const auto q = Queries(150, 0, 0);
    // The worker's resident set at step 150 as `left` describes it: hot set + sinks + window.
    auto resident = [&](const std::pair<std::vector<uint64_t>, uint64_t>& left) {
      const uint64_t nb = geo.Blocks(151);
      std::vector<uint64_t> r;
      for (uint64_t b : left.first)
        if (b != sel::kEmptySlot && b < nb) r.push_back(b);
      std::sort(r.begin(), r.end());
      sel::AddRange(0, geo.SinkBlocks(151), &r);
      sel::AddRange(std::min(left.second, nb), nb, &r);
      return r;
    };
    const sel::GroupScores gs = sel::ScoreGroup(q.data(), 2, prefix);
    const auto d = sel::DeltaOf(gs, resident(left_by_150));
    const auto now = sel::DeltaOf(gs, resident(left_by_239));
    for (int j = 0; j < 2; ++j) {
      EXPECT_FLOAT_EQ(arep.delta(j), float(d[j]));
      EXPECT_NE(float(d[j]), float(now[j])) << "the two sets must differ for the test to tell";
    }
  }
  // Step 20's set was replaced by 4 retrievals since (21, 100, 101, 150, 239): no longer known.
  Reply gone = audit(20);
  EXPECT_TRUE(gone.error.IsFailedPrecondition()) << gone.error.ToString();

  // The same retrieval again sends nothing (the mirror holds it); a new generation sends again.
  Reply again = Retrieve(1, 239, 0, {0}, 1);
  ASSERT_TRUE(again.error.ok());
  EXPECT_TRUE(again.frame.payload.empty());
  Reply fresh = Retrieve(1, 239, 0, {0}, 1, /*generation=*/1);
  ASSERT_TRUE(fresh.error.ok());
  EXPECT_FALSE(fresh.frame.payload.empty());
  EXPECT_TRUE(Retrieve(1, 239, 0, {0}, 1, /*generation=*/0).error.IsFailedPrecondition());

  // Audit: the δ of the worker's resident set (mirror + sinks + local blocks), measured exactly.
  wire::Audit au;
  au.set_sequence_id(1);
  au.set_step(239);
  au.set_layer(0);
  au.add_kv_heads(0);
  au.set_pending_tokens(1);
  Reply ar = Call(s_, MessageType::kAudit, au, QueryPayload(239, 0, {0}, 1));
  ASSERT_TRUE(ar.error.ok()) << ar.error.ToString();
  wire::AuditReply arep;
  ASSERT_TRUE(wire::ParseProto(ar.frame, &arep).ok());
  ASSERT_EQ(arep.delta_size(), 2);
  wire::HeadSelection last;
  wire::RetrieveLayerReply frep;
  ASSERT_TRUE(wire::ParseProto(fresh.frame, &frep).ok());
  const std::vector<uint64_t> resident(frep.heads(0).resident_blocks().begin(),
                                       frep.heads(0).resident_blocks().end());
  const auto q = Queries(239, 0, 0);
  const sel::GroupScores gs = sel::ScoreGroup(q.data(), 2, kv_[0].view());
  const auto d = sel::DeltaOf(gs, resident);
  for (int j = 0; j < 2; ++j) EXPECT_FLOAT_EQ(arep.delta(j), float(d[j]));
}

// K once: a RetrieveLayer carries token t's K row before t is appended; the Append of t may then
// leave that row out (k_from_retrieval) and the service stores the carried bytes. A later retrieval
// of the same layer may overtake the Append (the rows it needs were carried). Leaving out a row no
// retrieval carried is refused and stores nothing.
TEST_F(RetrieveTest, AnAppendTakesTheKRowsItsStepsRetrievalCarried) {
  const uint32_t need =
      uint32_t(std::move(sel::PrhsSelector::Make(opt_, shape, kT)).value()->HotSetSlots());
  ASSERT_TRUE(Call(s_, MessageType::kCreateSequence, CreateWith(9, need)).error.ok());
  AppendTokens(9, 0, 100);
  // Step 100 (token 100 not appended): layer 0 retrieves heads 0 and 1 carrying its K rows.
  ASSERT_TRUE(Retrieve(9, 100, 0, {0, 1}, 1).error.ok());
  // Step 101 overtakes the Append of 100: it needs token 100's row (carried before) and 101's.
  ASSERT_TRUE(Retrieve(9, 101, 0, {0, 1}, 1).error.ok());
  EXPECT_TRUE(Retrieve(9, 101, 1, {0}, 1).error.IsFailedPrecondition())  // layer 1: never carried
      << "a K row neither stored nor carried";
  // The Append of 100 without layer 0's K rows (0 * Hkv + 0 and 0 * Hkv + 1).
  wire::Append a;
  a.set_sequence_id(9);
  a.set_start_position(100);
  a.add_token_ids(100);
  a.add_k_from_retrieval(0);
  a.add_k_from_retrieval(1);
  const size_t row = D * 2;
  std::vector<uint8_t> payload;
  for (uint32_t i = 0; i < L * Hkv; ++i)
    for (int v = 0; v < 2; ++v) {
      if (v == 0 && i < 2) continue;  // carried by the retrieval
      const uint8_t* r = Row(i, 100, v);
      payload.insert(payload.end(), r, r + row);
    }
  ASSERT_EQ(payload.size(), wire::AppendPayloadBytes(shape, 1, 2));
  Reply ok = Call(s_, MessageType::kAppend, a, payload);
  ASSERT_TRUE(ok.error.ok()) << ok.error.ToString();
  // The stored K rows of token 100 are the carried ones, byte for byte (block 25 holds 100..103:
  // the partial block lives in memory; read it through ReadBlocks).
  for (uint32_t h = 0; h < 2; ++h) {
    wire::ReadBlocks rb;
    rb.set_sequence_id(9);
    rb.set_layer(0);
    rb.set_kv_head(h);
    rb.add_block_indices(100 / B);
    Reply got = Call(s_, MessageType::kReadBlocks, rb);
    ASSERT_TRUE(got.error.ok()) << got.error.ToString();
    ASSERT_EQ(std::memcmp(got.frame.payload.data(), Row(h, 100, 0), row), 0) << "head " << h;
  }
  // Token 101 leaves out a row no retrieval carried (layer 1, KV head 1): refused, nothing stored.
  wire::Append bad = a;
  bad.set_start_position(101);
  bad.set_token_ids(0, 101);
  bad.clear_k_from_retrieval();
  bad.add_k_from_retrieval(3);
  std::vector<uint8_t> short_payload(wire::AppendPayloadBytes(shape, 1, 1), 0);
  Reply refused = Call(s_, MessageType::kAppend, bad, short_payload);
  EXPECT_TRUE(refused.error.IsFailedPrecondition()) << refused.error.ToString();
  EXPECT_NE(refused.error.message().find("no RetrieveLayer"), std::string::npos);
  EXPECT_EQ(*store_->Length({"a", 9}), 101u);
}

// Exact correction on the service: the partial attention over the blocks a worker does not attend
// equals the reference attention over exactly those tokens (attn::Attend with a token mask, and
// attn::PartialState for the state), for a gap pattern with a ragged last block; malformed
// requests are clear errors, and another tenant cannot use it.
TEST_F(RetrieveTest, CorrectAttendsTheBlocksTheWorkerDoesNotHold) {
  const uint32_t need =
      uint32_t(std::move(sel::PrhsSelector::Make(opt_, shape, kT)).value()->HotSetSlots());
  ASSERT_TRUE(Call(s_, MessageType::kCreateSequence, CreateWith(11, need)).error.ok());
  AppendTokens(11, 0, 102);
  const uint64_t step = 101, T = step + 1, nb = (T + B - 1) / B;  // block 25 holds 100, 101
  const uint32_t g = Hq / Hkv;
  auto correct = [&](SessionState& ss, uint64_t st, uint32_t layer,
                     std::vector<std::pair<uint32_t, std::vector<uint32_t>>> heads,
                     std::vector<uint8_t> payload = {}) {
    wire::Correct m;
    m.set_sequence_id(11);
    m.set_step(st);
    m.set_layer(layer);
    std::vector<uint32_t> hs;
    for (auto& [h, att] : heads) {
      wire::CorrectHead* ch = m.add_heads();
      ch->set_kv_head(h);
      for (uint32_t b : att) ch->add_attended(b);
      hs.push_back(h);
    }
    if (payload.empty()) {
      const auto qp = QueryPayload(st, layer, hs, 0);
      payload.assign(qp.begin(), qp.end());
    }
    return Call(ss, MessageType::kCorrect, m, payload);
  };
  // Head 1 attends the sinks, two middle blocks and the window; head 0 everything but block 3.
  std::vector<uint32_t> att1 = {0, 7, 8, 20, 23, 24, 25}, att0;
  for (uint32_t b = 0; b < nb; ++b)
    if (b != 3) att0.push_back(b);
  Reply r = correct(s_, step, 1, {{1, att1}, {0, att0}});
  ASSERT_TRUE(r.error.ok()) << r.error.ToString();
  wire::CorrectReply rep;
  ASSERT_TRUE(wire::ParseProto(r.frame, &rep).ok());
  EXPECT_EQ(rep.blocks(), (nb - att1.size()) + 1);
  ASSERT_EQ(r.frame.payload.size(), 2u * g * (2 + D) * 4);
  const float* got = reinterpret_cast<const float*>(r.frame.payload.data());
  size_t at = 0;
  for (auto [h, att] :
       std::vector<std::pair<uint32_t, std::vector<uint32_t>>>{{1, att1}, {0, att0}}) {
    const attn::HeadKV kv = kv_[1 * Hkv + h].view();
    attn::HeadKV view = kv;
    view.tokens = T;
    std::vector<uint8_t> mask(T, 1);
    for (uint32_t b : att)
      for (uint64_t t = uint64_t{b} * B; t < std::min<uint64_t>(T, uint64_t{b + 1} * B); ++t)
        mask[t] = 0;
    const auto q = Queries(step, 1, h);
    std::vector<float> want(size_t{g} * D);
    ASSERT_TRUE(attn::Attend(q.data(), g, view, mask, want.data()).ok());
    for (uint32_t j = 0; j < g; ++j, ++at) {
      const float* st = got + at * (2 + D);
      float m = 0, d = 0;
      std::vector<float> o(D);
      attn::PartialState(q.data() + j * D, view, mask, 0, T, &m, &d, o.data());
      EXPECT_NEAR(st[0], m, 1e-4f + 1e-5f * std::fabs(m)) << "head " << h << " query " << j;
      EXPECT_NEAR(st[1], d, 1e-4f * d) << "head " << h << " query " << j;
      for (uint32_t x = 0; x < D; ++x)
        ASSERT_NEAR(st[2 + x], want[j * D + x], 2e-5f + 2e-5f * std::fabs(want[j * D + x]))
            << "head " << h << " query " << j << " dim " << x;
    }
  }
  // Nothing left out: an empty state (d 0), out 0.
  std::vector<uint32_t> all;
  for (uint32_t b = 0; b < nb; ++b) all.push_back(b);
  Reply none = correct(s_, step, 0, {{0, all}});
  ASSERT_TRUE(none.error.ok()) << none.error.ToString();
  EXPECT_EQ(reinterpret_cast<const float*>(none.frame.payload.data())[1], 0.f);
  // Malformed: unsorted or out-of-range lists, a payload of the wrong size, a step far past the
  // stored tokens, a left-out block not stored yet, a layer out of range.
  EXPECT_TRUE(correct(s_, step, 0, {{0, {5, 3}}}).error.IsInvalidArgument());
  EXPECT_TRUE(correct(s_, step, 0, {{0, {0, 26}}}).error.IsInvalidArgument());
  EXPECT_TRUE(
      correct(s_, step, 0, {{0, {0}}}, std::vector<uint8_t>(12, 0)).error.IsInvalidArgument());
  EXPECT_TRUE(correct(s_, 1ull << 40, 0, {{0, {0}}}).error.IsInvalidArgument());
  EXPECT_TRUE(correct(s_, 110, 0, {{0, {0, 1}}}).error.IsFailedPrecondition());
  EXPECT_TRUE(correct(s_, step, 2, {{0, {0}}}).error.IsInvalidArgument());
  // Another tenant's request for this sequence id is NotFound.
  SessionState b;
  ASSERT_TRUE(Hello(b, "b", "tokB").ok());
  EXPECT_TRUE(correct(b, step, 0, {{0, {0}}}).error.IsNotFound());
}

TEST_F(RetrieveTest, BadRetrievalsAreClearErrors) {
  auto ref = std::move(sel::PrhsSelector::Make(opt_, shape, kT)).value();
  const uint32_t need = uint32_t(ref->HotSetSlots());
  // A hot set too small for the budget: InvalidArgument at create, and nothing is left behind.
  Reply small = Call(s_, MessageType::kCreateSequence, CreateWith(5, need - 1));
  EXPECT_TRUE(small.error.IsInvalidArgument());
  EXPECT_NE(small.error.message().find("hot_set_slots"), std::string::npos);
  // A hot set whose slot tables would take gigabytes is refused before anything is allocated (the
  // handler fuzzer's out-of-memory input asked for 136,314,879 slots: 1 GB per table).
  Reply huge = Call(s_, MessageType::kCreateSequence, CreateWith(5, 4'000'000'000u));
  EXPECT_TRUE(huge.error.IsInvalidArgument());
  EXPECT_NE(huge.error.message().find("slot-table entries"), std::string::npos)
      << huge.error.ToString();
  EXPECT_TRUE(Call(s_, MessageType::kCreateSequence,
                   CreateWith(5, uint32_t((uint64_t{1} << 23) / (L * Hkv) + 1)))
                  .error.IsInvalidArgument());
  wire::ListSequencesReply lr;
  Reply list = Call(s_, MessageType::kListSequences, wire::ListSequences());
  ASSERT_TRUE(wire::ParseProto(list.frame, &lr).ok());
  EXPECT_EQ(lr.sequences_size(), 0);
  // Bad selector params name the field.
  wire::CreateSequence bad = CreateWith(5, need);
  bad.mutable_selector()->set_tau_cos(3);
  Reply br = Call(s_, MessageType::kCreateSequence, bad);
  EXPECT_TRUE(br.error.IsInvalidArgument());
  EXPECT_NE(br.error.message().find("tau_cos"), std::string::npos);
  bad.mutable_selector()->set_name("nope");
  EXPECT_TRUE(Call(s_, MessageType::kCreateSequence, bad).error.IsInvalidArgument());

  ASSERT_TRUE(Call(s_, MessageType::kCreateSequence, CreateWith(5, need)).error.ok());
  AppendTokens(5, 0, 50);
  EXPECT_TRUE(Retrieve(5, 60, 0, {0}, 1).error.IsFailedPrecondition());  // not appended yet
  EXPECT_TRUE(Retrieve(5, 49, 2, {0}, 0).error.IsInvalidArgument());     // layer out of range
  EXPECT_TRUE(Retrieve(5, 49, 0, {0, 0}, 0).error.IsInvalidArgument());  // repeated head
  EXPECT_TRUE(Retrieve(5, 49, 0, {0}, 0).error.ok());
  // Another tenant cannot retrieve from (or learn of) this sequence.
  SessionState b;
  ASSERT_TRUE(Hello(b, "b", "tokB").ok());
  wire::RetrieveLayer m;
  m.set_sequence_id(5);
  m.set_step(49);
  m.add_kv_heads(0);
  EXPECT_TRUE(
      Call(b, MessageType::kRetrieveLayer, m, QueryPayload(49, 0, {0}, 0)).error.IsNotFound());
  // Layer map: PrHS accepts a valid one, refuses one pointing deeper.
  wire::SetLayerMap lm;
  lm.set_sequence_id(5);
  lm.add_source_layer(0);
  lm.add_source_layer(0);
  EXPECT_TRUE(Call(s_, MessageType::kSetLayerMap, lm).error.ok());
  lm.set_source_layer(0, 1);
  EXPECT_TRUE(Call(s_, MessageType::kSetLayerMap, lm).error.IsInvalidArgument());
  // Attach to the existing sequence (a reconnect) keeps its data; a shape mismatch is refused.
  wire::CreateSequence at = CreateWith(5, need);
  at.set_attach(true);
  Reply ar = Call(s_, MessageType::kCreateSequence, at);
  ASSERT_TRUE(ar.error.ok());
  wire::CreateSequenceReply crep;
  ASSERT_TRUE(wire::ParseProto(ar.frame, &crep).ok());
  EXPECT_EQ(crep.length(), 50u);
  at.mutable_shape()->set_head_dim(64);
  EXPECT_TRUE(Call(s_, MessageType::kCreateSequence, at).error.IsFailedPrecondition());
}

// ---- Isolation (issue 20): a tenant reaches nothing of another's, and learns nothing of it ----

// Every operation that names a sequence, sent by tenant b with the id of tenant a's sequence, is
// NotFound (never "exists but forbidden"), and a's sequence is byte-identical afterwards: every K
// and V block of every layer and KV head, its length, its retrievals.
TEST_F(RetrieveTest, AnotherTenantsSequenceIdIsNotFoundForEveryOperationAndChangesNothing) {
  const uint32_t need =
      uint32_t(std::move(sel::PrhsSelector::Make(opt_, shape, kT)).value()->HotSetSlots());
  const uint64_t id = 21, T = 50, nb = (T + B - 1) / B;
  ASSERT_TRUE(Call(s_, MessageType::kCreateSequence, CreateWith(id, need)).error.ok());
  AppendTokens(id, 0, T);
  ASSERT_TRUE(Retrieve(id, T - 1, 0, {0, 1}, 0).error.ok());
  // Everything a holds: the payload of ReadBlocks for every (layer, KV head, K|V), and its length.
  auto snapshot = [&](SessionState& s) {
    std::vector<std::vector<uint8_t>> out;
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < Hkv; ++h)
        for (bool values : {false, true}) {
          wire::ReadBlocks rb;
          rb.set_sequence_id(id);
          rb.set_layer(l);
          rb.set_kv_head(h);
          rb.set_values(values);
          for (uint64_t b = 0; b < nb; ++b) rb.add_block_indices(b);
          Reply r = Call(s, MessageType::kReadBlocks, rb);
          EXPECT_TRUE(r.error.ok()) << r.error.ToString();
          out.push_back(r.frame.payload);
        }
    wire::ListSequencesReply lr;
    Reply list = Call(s, MessageType::kListSequences, wire::ListSequences());
    EXPECT_TRUE(wire::ParseProto(list.frame, &lr).ok());
    std::vector<uint8_t> lengths;
    for (const auto& si : lr.sequences()) {
      lengths.push_back(uint8_t(si.sequence_id()));
      lengths.push_back(uint8_t(si.length()));
    }
    out.push_back(lengths);
    return out;
  };
  const auto before = snapshot(s_);
  ASSERT_EQ(before.back(), (std::vector<uint8_t>{uint8_t(id), uint8_t(T)}));
  for (size_t i = 0; i + 1 < before.size(); ++i) ASSERT_EQ(before[i].size(), nb * B * D * 2);

  SessionState b;
  ASSERT_TRUE(Hello(b, "b", "tokB").ok());
  std::vector<std::pair<std::string, Status>> got;
  auto expect = [&](const char* what, const Reply& r) { got.emplace_back(what, r.error); };
  {  // Append: the next step, and an overwrite of the first tokens
    for (uint64_t start : {T, uint64_t{0}}) {
      wire::Append a;
      a.set_sequence_id(id);
      a.set_start_position(start);
      a.add_token_ids(1);
      std::vector<uint8_t> payload(wire::AppendPayloadBytes(shape, 1), 0x5a);
      expect(start ? "Append" : "Append at 0", Call(b, MessageType::kAppend, a, payload));
    }
  }
  {
    wire::ReadBlocks rb;
    rb.set_sequence_id(id);
    rb.add_block_indices(0);
    expect("ReadBlocks", Call(b, MessageType::kReadBlocks, rb));
  }
  {
    wire::Truncate t;
    t.set_sequence_id(id);
    t.set_length(4);
    expect("Truncate", Call(b, MessageType::kTruncate, t));
  }
  {
    wire::RetrieveLayer m;
    m.set_sequence_id(id);
    m.set_step(T - 1);
    m.add_kv_heads(0);
    expect("RetrieveLayer",
           Call(b, MessageType::kRetrieveLayer, m, QueryPayload(T - 1, 0, {0}, 0)));
  }
  {
    wire::SetLayerMap lm;
    lm.set_sequence_id(id);
    lm.add_source_layer(0);
    lm.add_source_layer(0);
    expect("SetLayerMap", Call(b, MessageType::kSetLayerMap, lm));
  }
  {
    wire::Audit au;
    au.set_sequence_id(id);
    au.set_step(T - 1);
    au.add_kv_heads(0);
    expect("Audit", Call(b, MessageType::kAudit, au, QueryPayload(T - 1, 0, {0}, 0)));
  }
  {
    wire::Correct m;
    m.set_sequence_id(id);
    m.set_step(T - 1);
    m.add_heads()->set_kv_head(0);
    m.mutable_heads(0)->add_attended(0);
    expect("Correct", Call(b, MessageType::kCorrect, m, QueryPayload(T - 1, 0, {0}, 0)));
  }
  {
    wire::CreateSequence at = CreateWith(id, need);
    at.set_attach(true);
    expect("CreateSequence attach", Call(b, MessageType::kCreateSequence, at));
  }
  {
    wire::DeleteSequence del;
    del.set_sequence_id(id);
    expect("DeleteSequence", Call(b, MessageType::kDeleteSequence, del));
  }
  ASSERT_EQ(got.size(), 10u);
  for (const auto& [what, st] : got) EXPECT_TRUE(st.IsNotFound()) << what << ": " << st.ToString();
  // b's own ListSequences is empty; a's sequence is byte-identical and still serves a.
  wire::ListSequencesReply lb;
  ASSERT_TRUE(
      wire::ParseProto(Call(b, MessageType::kListSequences, wire::ListSequences()).frame, &lb)
          .ok());
  EXPECT_EQ(lb.sequences_size(), 0);
  EXPECT_EQ(snapshot(s_), before);
  EXPECT_TRUE(Retrieve(id, T - 1, 1, {0, 1}, 0).error.ok());
  // The same id in b's own namespace is b's own sequence: creating and deleting it leaves a's.
  ASSERT_TRUE(Call(b, MessageType::kCreateSequence, CreateWith(id, need)).error.ok());
  wire::DeleteSequence del;
  del.set_sequence_id(id);
  ASSERT_TRUE(Call(b, MessageType::kDeleteSequence, del).error.ok());
  EXPECT_EQ(snapshot(s_), before);
}

// Content addresses are seeded with the server-verified tenant: b's lookup of a's stored prefix
// matches nothing, and the same tokens stored by b are b's own (a's lookup is unchanged).
TEST_F(HandlerTest, PrefixLookupNeverMatchesAnotherTenantsBlocks) {
  SessionState a, b;
  ASSERT_TRUE(Hello(a, "a", "tokA").ok());
  ASSERT_TRUE(Hello(b, "b", "tokB").ok());
  const ModelShape shape{2, 4, 2, 32, DType::kF16, 1};
  const uint32_t n = 12;  // three full blocks of 4
  auto store_tokens = [&](SessionState& s, uint64_t seq) {
    ASSERT_TRUE(Call(s, MessageType::kCreateSequence, Create(seq)).error.ok());
    wire::Append ap;
    ap.set_sequence_id(seq);
    for (uint32_t t = 0; t < n; ++t) ap.add_token_ids(500 + t);
    std::vector<uint8_t> payload(wire::AppendPayloadBytes(shape, n), uint8_t(seq));
    ASSERT_TRUE(Call(s, MessageType::kAppend, ap, payload).error.ok());
  };
  auto lookup = [&](SessionState& s) -> uint64_t {
    wire::PrefixLookup m;
    wire::ToWire(shape, m.mutable_shape());
    m.set_block_size(4);
    for (uint32_t t = 0; t < n; ++t) m.add_token_ids(500 + t);
    Reply r = Call(s, MessageType::kPrefixLookup, m);
    EXPECT_TRUE(r.error.ok()) << r.error.ToString();
    wire::PrefixLookupReply rep;
    EXPECT_TRUE(wire::ParseProto(r.frame, &rep).ok());
    return rep.matched_tokens();
  };
  store_tokens(a, 1);
  EXPECT_EQ(lookup(a), n);  // the oracle: a's own blocks are found
  EXPECT_EQ(lookup(b), 0u);
  store_tokens(b, 2);
  EXPECT_EQ(lookup(b), n);
  // Neither shares the other's blocks: each reads back its own bytes.
  wire::ReadBlocks rb;
  rb.set_sequence_id(1);
  rb.add_block_indices(0);
  Reply ra = Call(a, MessageType::kReadBlocks, rb);
  ASSERT_TRUE(ra.error.ok());
  EXPECT_EQ(ra.frame.payload, std::vector<uint8_t>(ra.frame.payload.size(), 1));
  rb.set_sequence_id(2);
  Reply rbb = Call(b, MessageType::kReadBlocks, rb);
  ASSERT_TRUE(rbb.error.ok());
  EXPECT_EQ(rbb.frame.payload, std::vector<uint8_t>(rbb.frame.payload.size(), 2));
  wire::DeleteSequence del;
  del.set_sequence_id(2);
  ASSERT_TRUE(Call(b, MessageType::kDeleteSequence, del).error.ok());
  EXPECT_EQ(lookup(a), n);
  EXPECT_EQ(lookup(b), 0u);
}

// A client cannot choose its tenant without that tenant's token: another tenant's token (or an
// unknown tenant's name) is refused, and a refused Hello leaves the session as it was.
TEST_F(HandlerTest, HelloWithAnotherTenantsTokenIsRefused) {
  SessionState s;
  EXPECT_TRUE(Hello(s, "a", "tokB").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "b", "tokA").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "c", "tokA").IsUnauthenticated());
  EXPECT_TRUE(Hello(s, "a", "tokA\n").IsUnauthenticated());  // a near miss is a miss
  EXPECT_TRUE(Hello(s, "a", "tok").IsUnauthenticated());
  EXPECT_FALSE(s.authenticated);
  EXPECT_TRUE(Call(s, MessageType::kCreateSequence, Create(3)).error.IsUnauthenticated());
  // Authenticated as b, a Hello naming a with b's token does not make the session a's.
  ASSERT_TRUE(Hello(s, "b", "tokB").ok());
  ASSERT_TRUE(Call(s, MessageType::kCreateSequence, Create(3)).error.ok());
  EXPECT_TRUE(Hello(s, "a", "tokB").IsUnauthenticated());
  EXPECT_EQ(s.tenant, "b");
  SessionState a;
  ASSERT_TRUE(Hello(a, "a", "tokA").ok());
  wire::ListSequencesReply la;
  ASSERT_TRUE(
      wire::ParseProto(Call(a, MessageType::kListSequences, wire::ListSequences()).frame, &la)
          .ok());
  EXPECT_EQ(la.sequences_size(), 0);  // b's sequence 3 is b's
}

// A tenant's max_connections: the Hello past it is Busy naming the limit and the count; a second
// Hello of a session takes no second place; Close gives the place back (once).
TEST_F(HandlerTest, HelloPastATenantsMaxConnectionsIsBusyNamingTheLimit) {
  HandlerOptions o;
  TenantConfig c{"c", "tokC", false};
  c.max_connections = 2;
  o.tenants = {c, {"d", "tokD", false}};
  RequestHandler h(store_, o);
  auto hello = [&](SessionState& s, const std::string& tenant, const std::string& token) {
    wire::Hello m;
    m.set_protocol_version(wire::kProtocolVersion);
    m.set_tenant(tenant);
    m.set_auth_token(token);
    ++id_;
    return Decode(HandleFrame(h, s, id_, MessageType::kHello, m, {})).error;
  };
  SessionState s1, s2, s3, s4;
  ASSERT_TRUE(hello(s1, "c", "tokC").ok());
  ASSERT_TRUE(hello(s2, "c", "tokC").ok());
  ASSERT_TRUE(hello(s1, "c", "tokC").ok());  // the same session again: still two places
  const Status busy = hello(s3, "c", "tokC");
  EXPECT_TRUE(busy.IsBusy()) << busy.ToString();
  EXPECT_NE(busy.message().find("max_connections 2"), std::string::npos) << busy.ToString();
  EXPECT_NE(busy.message().find("2 sessions open"), std::string::npos) << busy.ToString();
  EXPECT_FALSE(s3.authenticated);
  EXPECT_TRUE(hello(s3, "d", "tokD").ok());  // another tenant has no such limit
  h.Close(s1);
  h.Close(s1);  // idempotent: gives back one place only
  SessionState s5;
  EXPECT_TRUE(hello(s4, "c", "tokC").ok());
  EXPECT_TRUE(hello(s5, "c", "tokC").IsBusy());
  // A session that moves to another tenant gives its place back.
  EXPECT_TRUE(hello(s2, "d", "tokD").ok());
  EXPECT_TRUE(hello(s5, "c", "tokC").ok());
}

}  // namespace
}  // namespace kvm::server

namespace kvm::server {
namespace {

// On a data plane a retrieval's active messages are its reply: no reply frame; the parts' headers
// each fit the transport's limit, a KV head whose selection alone does not fit travels in
// fragments, the parts join back into the selections, and the blocks land byte-identical in the
// worker's slots, sent either way (gathered from the store's host tier, or copied out first); once
// the reply is done they are no longer pinned (deleting the sequence gives every host slot back).
// Two shapes: many heads (Hq 32, Hkv 8, D 128: 4,096 blocks in all) and one head of 4,096 blocks
// (over the limit on its own).
struct BigCase {
  ModelShape shape;
  uint32_t tokens;
  ReplySends sends;
};
class HandlerDataPlaneTest : public ::testing::TestWithParam<BigCase> {};

TEST_P(HandlerDataPlaneTest, BigRepliesAreSplitAndLandByteIdentical) {
  const ModelShape shape = GetParam().shape;
  const uint32_t B = 16, T = GetParam().tokens, Hkv = shape.kv_heads, D = shape.head_dim;
  testutil::TempStore tmp(uint64_t{T} * Hkv * D * 2 * 2 + (64 << 20));
  auto& store = tmp.store;
  auto service_dp = transport::MakeInProcess();
  auto worker_dp = transport::MakeInProcess();
  HandlerOptions ho;
  ho.tenants = {{"a", "tokA", false}};
  ho.data_plane = service_dp.get();
  ho.reply_sends = GetParam().sends;
  RequestHandler handler(store.get(), ho);
  uint64_t rid = 0;
  auto handle = [&](SessionState& s, MessageType t, const google::protobuf::MessageLite& m,
                    std::span<const uint8_t> payload = {}) {
    return HandleFrame(handler, s, ++rid, t, m, payload);
  };
  auto call = [&](SessionState& s, MessageType t, const google::protobuf::MessageLite& m,
                  std::span<const uint8_t> payload = {}) {
    wire::FrameDecoder rd;
    wire::Frame out;
    EXPECT_TRUE(rd.Feed(handle(s, t, m, payload)).ok());
    EXPECT_TRUE(rd.Next(&out));
    return out;
  };
  SessionState s;
  wire::Hello h;
  h.set_protocol_version(wire::kProtocolVersion);
  h.set_tenant("a");
  h.set_auth_token("tokA");
  const auto addr = worker_dp->address();
  h.set_ucx_worker_address(std::string(addr.begin(), addr.end()));
  wire::HelloReply hr;
  ASSERT_TRUE(wire::ParseProto(call(s, MessageType::kHello, h), &hr).ok());
  EXPECT_FALSE(hr.ucx_worker_address().empty());  // the service offers its data plane

  sel::SelectorOptions opt;
  opt.geometry = {B, 16, 64};
  opt.budget_tokens = T / 2;
  const uint32_t slots =
      uint32_t(std::move(sel::PrhsSelector::Make(opt, shape, T)).value()->HotSetSlots());
  wire::CreateSequence c;
  c.set_sequence_id(1);
  wire::ToWire(shape, c.mutable_shape());
  c.set_block_size(B);
  c.set_durability(wire::CACHE);
  sel::ToWire({"prhs", opt}, c.mutable_selector());
  c.set_hot_set_slots(slots);
  ASSERT_EQ(call(s, MessageType::kCreateSequence, c).header.type,
            wire::ReplyType(MessageType::kCreateSequence));
  std::mt19937 rng(4);
  for (uint32_t t = 0; t < T; t += 256) {
    wire::Append a;
    a.set_sequence_id(1);
    a.set_start_position(t);
    for (uint32_t i = 0; i < 256; ++i) a.add_token_ids(t + i);
    std::vector<uint8_t> p(wire::AppendPayloadBytes(shape, 256));
    for (size_t i = 0; i < p.size(); i += 2) {  // finite fp16 values
      const uint16_t v = FloatToHalf(float(int(rng() % 2001) - 1000) / 500.f);
      std::memcpy(&p[i], &v, 2);
    }
    ASSERT_EQ(call(s, MessageType::kAppend, a, p).header.type,
              wire::ReplyType(MessageType::kAppend));
  }
  // The worker's hot set (layer 0): [kv_head][slot][K, V].
  const size_t bb = size_t{B} * D * 2;
  std::vector<uint8_t> hot(size_t{Hkv} * slots * 2 * bb);
  std::vector<wire::DataPart> parts;
  size_t max_header = 0;
  Status landed;
  worker_dp->SetReceiver(
      [&](std::span<const uint8_t> hd, size_t len) -> Result<std::vector<transport::Segment>> {
        max_header = std::max(max_header, hd.size());
        wire::DataPart p;
        if (!p.ParseFromArray(hd.data(), int(hd.size()))) return Status::InvalidArgument("bad");
        const auto blocks = wire::PartBlocks(p);
        if (len != 2 * bb * blocks.size()) return Status::InvalidArgument("bad length");
        std::vector<transport::Segment> segs;
        for (const wire::PartBlock& b : blocks) {
          if (b.layer != 0 || b.kv_head >= Hkv || b.slot >= slots)
            return Status::InvalidArgument("bad slot");
          segs.push_back({hot.data() + (size_t{b.kv_head} * slots + b.slot) * 2 * bb, 2 * bb});
        }
        return segs;
      },
      [&](std::span<const uint8_t> hd, const Status& st) {
        if (!st.ok()) landed = st;
        wire::DataPart p;
        EXPECT_TRUE(p.ParseFromArray(hd.data(), int(hd.size())));
        parts.push_back(std::move(p));
      });
  wire::RetrieveLayer r;
  r.set_sequence_id(1);
  r.set_step(T - 1);
  for (uint32_t kvh = 0; kvh < Hkv; ++kvh) r.add_kv_heads(kvh);
  std::vector<float> q(size_t{shape.q_heads} * D);
  std::normal_distribution<float> n01(0.f, 1.f);
  for (auto& x : q) x = 3.f * n01(rng);
  // The reply comes once the parts are sent, which takes the worker's side receiving them: ask
  // asynchronously, then receive.
  const auto req = wire::EncodeFrame(static_cast<uint16_t>(MessageType::kRetrieveLayer), ++rid, r,
                                     {reinterpret_cast<const uint8_t*>(q.data()), q.size() * 4});
  wire::FrameDecoder dec;
  wire::Frame in;
  ASSERT_TRUE(dec.Feed(req).ok());
  ASSERT_TRUE(dec.Next(&in));
  std::atomic<bool> replied{false};
  std::vector<uint8_t> reply;
  handler.Handle(s, in, [&](std::vector<uint8_t> f) {
    reply = std::move(f);
    replied = true;
  });
  ASSERT_TRUE(
      worker_dp
          ->WaitFor([&] { return replied && !parts.empty() && parts.size() == parts[0].parts(); },
                    10000)
          .ok());
  EXPECT_TRUE(reply.empty()) << "a data-plane retrieval has no reply frame";
  ASSERT_TRUE(landed.ok()) << landed.ToString();
  EXPECT_GT(parts.size(), 1u);  // split: the blocks' placements do not fit one header
  EXPECT_LE(max_header, service_dp->max_header_bytes());
  bool fragmented = false;
  for (const auto& p : parts)
    for (const auto& hs : p.reply().heads()) fragmented = fragmented || hs.fragments() > 1;
  if (Hkv == 1) {
    EXPECT_TRUE(fragmented) << "one head over the limit travels in fragments";
  }
  auto rep = wire::JoinParts(parts);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  ASSERT_EQ(rep->heads_size(), int(Hkv));
  size_t sent = 0;
  std::vector<uint8_t> want(bb);
  for (const auto& hs : rep->heads()) {
    EXPECT_NE(hs.slot_digest(), 0u);  // the completion record came whole
    EXPECT_EQ(hs.delta_size(), int(shape.group_size()));
    for (int i = 0; i < hs.block_indices_size(); ++i, ++sent) {
      const uint8_t* slot = hot.data() + (size_t{hs.kv_head()} * slots + hs.slots(i)) * 2 * bb;
      for (int v = 0; v < 2; ++v) {
        ASSERT_TRUE(
            store->ReadBlock({"a", 1}, {0, hs.kv_head(), hs.block_indices(i)}, v, want).ok());
        ASSERT_EQ(std::memcmp(slot + v * bb, want.data(), bb), 0)
            << "block " << hs.block_indices(i);
      }
    }
  }
  EXPECT_GT(sent, 4000u);
  // Nothing of the reply holds a block any more: the delete frees every host slot.
  EXPECT_GT(store->Stats().host_slots_used, 0u);
  wire::DeleteSequence del;
  del.set_sequence_id(1);
  ASSERT_EQ(call(s, MessageType::kDeleteSequence, del).header.type,
            wire::ReplyType(MessageType::kDeleteSequence));
  EXPECT_EQ(store->Stats().host_slots_used, 0u) << "a block of the reply is still pinned";
  handler.Close(s);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, HandlerDataPlaneTest,
    ::testing::Values(BigCase{{1, 32, 8, 128, DType::kF16, 5}, 16384, ReplySends::kCopy},
                      BigCase{{1, 32, 8, 128, DType::kF16, 5}, 16384, ReplySends::kGather},
                      BigCase{{1, 4, 1, 32, DType::kF16, 5}, 131072, ReplySends::kAuto}));

// A block send that fails reaches the worker at once: the retrieval's reply is an Error frame (not
// a deadline), and the session goes on.
TEST(HandlerDataPlaneFailureTest, AFailedBlockSendIsAnErrorReplyAtOnce) {
  testutil::TempStore tmp;
  auto service_dp = transport::MakeInProcess();
  auto worker_dp =
      std::make_unique<std::unique_ptr<transport::Transport>>(transport::MakeInProcess());
  HandlerOptions ho;
  ho.tenants = {{"a", "tokA", false}};
  ho.data_plane = service_dp.get();
  RequestHandler handler(tmp.store.get(), ho);
  uint64_t rid = 0;
  auto handle = [&](SessionState& s, MessageType t, const google::protobuf::MessageLite& m,
                    std::span<const uint8_t> payload = {}) {
    return HandleFrame(handler, s, ++rid, t, m, payload);
  };
  SessionState s;
  wire::Hello h;
  h.set_protocol_version(wire::kProtocolVersion);
  h.set_tenant("a");
  h.set_auth_token("tokA");
  const auto addr = (*worker_dp)->address();
  h.set_ucx_worker_address(std::string(addr.begin(), addr.end()));
  ASSERT_FALSE(handle(s, MessageType::kHello, h).empty());
  const ModelShape shape{1, 4, 1, 32, DType::kF16, 5};
  sel::SelectorOptions opt;
  opt.geometry = {16, 16, 64};
  opt.budget_tokens = 256;
  wire::CreateSequence c;
  c.set_sequence_id(1);
  wire::ToWire(shape, c.mutable_shape());
  c.set_block_size(16);
  sel::ToWire({"oracle", opt}, c.mutable_selector());
  c.set_hot_set_slots(16);
  ASSERT_FALSE(handle(s, MessageType::kCreateSequence, c).empty());
  wire::Append a;
  a.set_sequence_id(1);
  for (uint32_t i = 0; i < 1024; ++i) a.add_token_ids(i);
  std::vector<uint8_t> p(wire::AppendPayloadBytes(shape, 1024), 0x3c);
  ASSERT_FALSE(handle(s, MessageType::kAppend, a, p).empty());
  worker_dp->reset();  // the worker's data plane is gone: the in-process send fails
  wire::RetrieveLayer r;
  r.set_sequence_id(1);
  r.set_step(1023);
  r.add_kv_heads(0);
  std::vector<float> q(4 * 32, 0.5f);
  const auto t0 = std::chrono::steady_clock::now();
  const auto reply = handle(s, MessageType::kRetrieveLayer, r,
                            {reinterpret_cast<const uint8_t*>(q.data()), q.size() * 4});
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  wire::FrameDecoder rd;
  wire::Frame f;
  ASSERT_TRUE(rd.Feed(reply).ok());
  ASSERT_TRUE(rd.Next(&f));
  ASSERT_EQ(f.header.type, static_cast<uint16_t>(MessageType::kError));
  wire::Error e;
  ASSERT_TRUE(wire::ParseProto(f, &e).ok());
  EXPECT_EQ(e.code(), wire::ERR_UNAVAILABLE) << e.message();
  EXPECT_NE(e.message().find("data plane send"), std::string::npos) << e.message();
  handler.Close(s);
}

// Every family moves when its event happens, by the value the workload implies — computed here from
// the messages the test sent and the replies it got, not from the metrics code.
class MetricsTest : public RetrieveTest {
 protected:
  MetricsTest() { metrics_ = std::make_unique<Metrics>(); }
  double Value(const std::string& name, const std::map<std::string, std::string>& match = {}) {
    std::vector<tools::prom::Sample> samples;
    std::string error;
    EXPECT_TRUE(tools::prom::Parse(metrics_->Serialize(), &samples, &error)) << error;
    return tools::prom::Sum(samples, name, match);
  }
  wire::Append DecodeAppend(uint64_t id, uint64_t pos, std::vector<uint8_t>* payload) {
    wire::Append a;
    a.set_sequence_id(id);
    a.set_start_position(pos);
    a.add_token_ids(uint32_t(pos));
    a.set_decode(true);
    payload->clear();
    for (uint32_t i = 0; i < L * Hkv; ++i)
      for (int v = 0; v < 2; ++v)
        payload->insert(payload->end(), Row(i, pos, v), Row(i, pos, v) + D * 2);
    return a;
  }
};

TEST_F(MetricsTest, EveryFamilyHasTheValueTheWorkloadImplies) {
  const size_t row = D * 2;  // f16
  const uint32_t g = Hq / Hkv;
  const uint32_t slots =
      uint32_t(std::move(sel::PrhsSelector::Make(opt_, shape, kT)).value()->HotSetSlots());
  ASSERT_TRUE(Call(s_, MessageType::kCreateSequence, CreateWith(9, slots)).error.ok());
  AppendTokens(9, 0, 100);  // prefill: no dense-equivalent bytes
  double from_worker = double(L) * Hkv * 2 * 100 * row, dense = 0, to_worker = 0;
  EXPECT_EQ(Value("kvm_stream_bytes_total", {{"direction", "from_worker"}, {"transport", "tcp"}}),
            from_worker);
  EXPECT_EQ(Value("kvm_dense_equivalent_bytes_total"), 0);
  // Decode: step 100 retrieves both layers (its own K row carried as a pending row), then appends.
  double retrievals = 0, exact = 0;
  for (uint64_t step : {100ull, 101ull}) {
    for (uint32_t l = 0; l < L; ++l) {
      Reply r = Retrieve(9, step, l, {0, 1}, 1);
      ASSERT_TRUE(r.error.ok()) << r.error.ToString();
      wire::RetrieveLayerReply rep;
      ASSERT_TRUE(wire::ParseProto(r.frame, &rep).ok());
      to_worker += double(r.frame.payload.size());
      from_worker += 2.0 * 1 * row;  // two heads' pending K row
      for (const auto& hs : rep.heads()) {
        retrievals += hs.retrieved_heads();
        if (hs.delta_kind() == wire::EXACT) exact += hs.delta_size();
      }
    }
    std::vector<uint8_t> payload;
    wire::Append a = DecodeAppend(9, step, &payload);
    ASSERT_TRUE(Call(s_, MessageType::kAppend, a, payload).error.ok());
    from_worker += double(payload.size());
    dense += double(step + 1) * L * Hkv * 2 * row;  // all T = step + 1 tokens, every layer and head
  }
  ASSERT_GT(to_worker, 0);
  ASSERT_GT(exact, 0);
  EXPECT_EQ(Value("kvm_stream_bytes_total", {{"direction", "to_worker"}, {"transport", "tcp"}}),
            to_worker);
  EXPECT_EQ(Value("kvm_stream_bytes_total", {{"direction", "to_worker"}, {"transport", "ucx"}}), 0);
  EXPECT_EQ(Value("kvm_stream_bytes_total", {{"direction", "from_worker"}}), from_worker);
  EXPECT_EQ(Value("kvm_dense_equivalent_bytes_total"), dense);
  EXPECT_EQ(Value("kvm_retrievals_total"), retrievals);
  EXPECT_EQ(Value("kvm_dropped_mass_count", {{"selector", "prhs"}, {"kind", "exact"}}), exact);
  // The same Append again (a retry) adds no dense-equivalent bytes: those steps were counted.
  {
    std::vector<uint8_t> payload;
    wire::Append a = DecodeAppend(9, 101, &payload);
    ASSERT_TRUE(Call(s_, MessageType::kAppend, a, payload).error.ok());
    from_worker += double(payload.size());
    EXPECT_EQ(Value("kvm_dense_equivalent_bytes_total"), dense);
  }
  // What only the worker sees, on an Append, a Heartbeat and the Delete.
  const size_t nb = sel::DeltaHistogram::Bounds().size() + 1;
  auto stats = [&](std::vector<uint64_t> gate, std::vector<uint64_t> bound_buckets, double sum,
                   uint64_t over) {
    wire::WorkerStats w;
    w.set_sequence_id(9);
    for (uint64_t c : gate) w.add_gate_checks(c);
    if (!bound_buckets.empty()) {
      wire::DeltaCounts* d = w.add_delta();
      d->set_kind(wire::BOUND);
      for (uint64_t c : bound_buckets) d->add_buckets(c);
      d->set_sum(sum);
      d->set_over_target(over);
    }
    return w;
  };
  std::vector<uint64_t> buckets(nb, 0);
  buckets[0] = 2;       // two claims ≤ 1e-4
  buckets[nb - 1] = 1;  // one above every bound (+Inf)
  {
    std::vector<uint8_t> payload;
    wire::Append a = DecodeAppend(9, 102, &payload);
    *a.mutable_stats() = stats({3, 1, 0, 2, 0}, buckets, 1.5, 1);
    ASSERT_TRUE(Call(s_, MessageType::kAppend, a, payload).error.ok());
  }
  wire::Heartbeat hb;
  *hb.add_stats() = stats({1, 0, 4}, {}, 0, 0);
  ASSERT_TRUE(Call(s_, MessageType::kHeartbeat, hb).error.ok());
  EXPECT_EQ(Value("kvm_gate_checks_total", {{"result", "reuse"}}), 4);
  EXPECT_EQ(Value("kvm_gate_checks_total", {{"result", "retrieve"}}), 1);
  EXPECT_EQ(Value("kvm_gate_checks_total", {{"result", "shared_layer"}}), 4);
  EXPECT_EQ(Value("kvm_gate_checks_total", {{"result", "short_context"}}), 2);
  EXPECT_EQ(Value("kvm_gate_checks_total", {{"result", "dense_layer"}}), 0);
  EXPECT_EQ(Value("kvm_dropped_mass_count", {{"selector", "prhs"}, {"kind", "bound"}}), 3);
  EXPECT_EQ(Value("kvm_dropped_mass_sum", {{"selector", "prhs"}, {"kind", "bound"}}), 1.5);
  EXPECT_EQ(
      Value("kvm_dropped_mass_bucket", {{"selector", "prhs"}, {"kind", "bound"}, {"le", "0.0001"}}),
      2);
  EXPECT_EQ(
      Value("kvm_dropped_mass_bucket", {{"selector", "prhs"}, {"kind", "bound"}, {"le", "1"}}), 2);
  EXPECT_EQ(
      Value("kvm_dropped_mass_bucket", {{"selector", "prhs"}, {"kind", "bound"}, {"le", "+Inf"}}),
      3);
  EXPECT_EQ(Value("kvm_dropped_mass_over_target_total", {{"kind", "bound"}}), 1);
  // A malformed report (too few buckets) is counted as an error; the Append still lands.
  const double invalid = Value("kvm_errors_total", {{"code", "InvalidArgument"}});
  {
    std::vector<uint8_t> payload;
    wire::Append a = DecodeAppend(9, 103, &payload);
    *a.mutable_stats() = stats({}, {1, 2, 3}, 0.1, 0);
    Reply r = Call(s_, MessageType::kAppend, a, payload);
    ASSERT_TRUE(r.error.ok()) << r.error.ToString();
  }
  EXPECT_EQ(*store_->Length({"a", 9}), 104u);
  EXPECT_EQ(Value("kvm_errors_total", {{"code", "InvalidArgument"}}), invalid + 1);
  EXPECT_EQ(Value("kvm_dropped_mass_count", {{"selector", "prhs"}, {"kind", "bound"}}), 3);
  // The Delete carries the last report.
  wire::DeleteSequence del;
  del.set_sequence_id(9);
  *del.mutable_stats() = stats({0, 0, 0, 0, 5}, {}, 0, 0);
  ASSERT_TRUE(Call(s_, MessageType::kDeleteSequence, del).error.ok());
  EXPECT_EQ(Value("kvm_gate_checks_total", {{"result", "dense_layer"}}), 5);
  // Errors by code and request durations by op.
  const double not_found = Value("kvm_errors_total", {{"code", "NotFound"}});
  EXPECT_TRUE(Retrieve(9, 104, 0, {0}, 1).error.IsNotFound());
  EXPECT_EQ(Value("kvm_errors_total", {{"code", "NotFound"}}), not_found + 1);
  EXPECT_EQ(Value("kvm_request_duration_seconds_count", {{"op", "append"}}), 1 + 2 + 1 + 1 + 1);
  EXPECT_EQ(Value("kvm_request_duration_seconds_count", {{"op", "retrieve_layer"}}), 2 * L + 1);
  EXPECT_EQ(Value("kvm_request_duration_seconds_count", {{"op", "heartbeat"}}), 1);
  EXPECT_EQ(Value("kvm_request_duration_seconds_count", {{"op", "delete"}}), 1);
  EXPECT_EQ(Value("kvm_request_duration_seconds_count", {{"op", "create"}}), 1);
  (void)g;
}

TEST(MetricsLabelsTest, AnUnknownLabelValueIsAnErrorNeverASilentDrop) {
  Metrics m;
  EXPECT_TRUE(m.ObserveRequest("append", 0.001).ok());
  EXPECT_TRUE(m.ObserveRequest("apend", 0.001).IsInvalidArgument());
  EXPECT_TRUE(m.ObserveDelta("prhs", DeltaKind::kExact, 0.01, 0).ok());
  EXPECT_TRUE(m.ObserveDelta("no-such-selector", DeltaKind::kExact, 0.01, 0).IsInvalidArgument());
  EXPECT_TRUE(m.ObserveDelta("prhs", DeltaKind::kUnknown, 0.01, 0).IsInvalidArgument());
  const std::vector<uint64_t> ok(sel::DeltaHistogram::Bounds().size() + 1, 1);
  EXPECT_TRUE(m.AddDeltaCounts("quest", DeltaKind::kExact, ok, 0.5, 0).ok());
  EXPECT_TRUE(m.AddDeltaCounts("quest", DeltaKind::kExact, std::vector<uint64_t>(3, 1), 0.5, 0)
                  .IsInvalidArgument());
  EXPECT_TRUE(m.AddDeltaCounts("quest", DeltaKind::kExact, ok, -1, 0).IsInvalidArgument());
  EXPECT_TRUE(LinkFromName("ucx").ok());
  EXPECT_TRUE(LinkFromName("inproc").ok());
  EXPECT_TRUE(LinkFromName("rdma").status().IsInvalidArgument());
  // Nothing of the refused calls reached the exposition.
  const std::string text = m.Serialize();
  EXPECT_EQ(text.find("apend"), std::string::npos);
  EXPECT_EQ(text.find("no-such-selector"), std::string::npos);
}

}  // namespace
}  // namespace kvm::server
