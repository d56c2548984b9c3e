// Exact correction (kv_source.h Correction): a sparse source that merges the attention over the
// blocks it did not attend — computed over its local cache in-process, or by the service through
// Correct requests — gives dense attention. Driven by the reference model on held-out text, at
// every decode step, layer and query head the corrected output is compared with dense attention on
// the same query (relative error ≤ 1e-5), the logits of a run whose attention goes through it stay
// within 1e-3 of the dense run's with the same top-1, and the exact δ it claims equals the δ that
// MeasuredKvSource measures independently on the same query and keys.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <memory>

#include "client/llama.h"
#include "client/measure.h"
#include "client/selector_source.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "kvmanager/server.h"
#include "selector/registry.h"
#include "testutil/service.h"

namespace kvm::client {
namespace {

std::string ModelDir() { return std::string(KVM_SOURCE_DIR) + "/models/austen"; }

uint32_t Argmax(const std::vector<float>& v) {
  return uint32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

// Attends through `sparse` and through a dense cache on the same query; returns the dense output
// (so the run follows the dense trajectory) and keeps the worst relative error of `sparse`'s.
struct Tee : KvSource {
  DenseKvSource* dense;
  KvSource* sparse;
  uint64_t prefill;
  uint32_t q_heads, D;
  double worst = 0;
  uint64_t compared = 0;
  void BeginToken(uint32_t t, uint64_t p) override { sparse->BeginToken(t, p); }
  Status Append(uint32_t l, uint64_t p, const float* k, const float* v) override {
    KVM_RETURN_IF_ERROR(dense->Append(l, p, k, v));
    return sparse->Append(l, p, k, v);
  }
  Status Attend(uint32_t l, uint64_t p, const float* q, float* out) override {
    KVM_RETURN_IF_ERROR(dense->Attend(l, p, q, out));
    std::vector<float> got(size_t{q_heads} * D);
    KVM_RETURN_IF_ERROR(sparse->Attend(l, p, q, got.data()));
    if (p < prefill) return Status::Ok();
    for (uint32_t h = 0; h < q_heads; ++h) {
      double err = 0, norm = 0;
      for (uint32_t i = 0; i < D; ++i) {
        const double a = got[h * D + i], b = out[h * D + i];
        err += (a - b) * (a - b);
        norm += b * b;
      }
      worst = std::max(worst, std::sqrt(err / std::max(norm, 1e-30)));
      ++compared;
    }
    return Status::Ok();
  }
};

struct Case {
  std::string name;
  std::string path;  // "inprocess", or the service over "tcp", "inproc", "ucx"
  Correction mode;
  bool reuse_while_fits = false;  // sel::PrhsOptions: no re-anchoring while the set fits
};

std::unique_ptr<transport::Transport> MakeTransport(const std::string& kind, bool service) {
  if (kind == "inproc") return transport::MakeInProcess();
  if (kind != "ucx") return nullptr;
  setenv("UCX_TLS", "sm,tcp", 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  auto t = transport::MakeUcx({.progress_thread = service});
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(*t) : nullptr;
}

class CorrectionTest : public ::testing::TestWithParam<Case> {};

TEST_P(CorrectionTest, TheCorrectedOutputIsDenseAttentionAndItsDeltaIsExact) {
  const Case& c = GetParam();
  auto model = LlamaModel::Load(ModelDir() + "/model.bin");
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto ids = ReadTokenFile(ModelDir() + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  const uint64_t context = 512, steps = 24;
  const ModelShape shape = (*model)->Shape(DType::kF16);
  const uint32_t seq_len = (*model)->config().seq_len;
  sel::SelectorOptions o;  // budget 1/8 at block size 16: most of the context is not attended
  o.geometry = {16, 4, 16};
  o.budget_tokens = context / 8;
  o.prhs.reuse_while_fits = c.reuse_while_fits;

  std::unique_ptr<SelectorKvSource> local;
  std::unique_ptr<transport::Transport> service_dp, worker_dp;
  std::unique_ptr<testutil::TestService> service;
  std::unique_ptr<Client> conn;
  std::unique_ptr<ServiceKvSource> remote;
  SparseKvSource* sparse = nullptr;
  if (c.path == "inprocess") {
    auto sel = sel::MakeSelector("prhs", o, shape, seq_len);
    ASSERT_TRUE(sel.ok());
    local =
        std::move(SelectorKvSource::Make(shape, 16, std::move(*sel), o, context, seq_len)).value();
    local->set_correction(c.mode);
    sparse = local.get();
  } else {
    service_dp = MakeTransport(c.path, true);
    worker_dp = MakeTransport(c.path, false);
    server::ServerOptions so;
    so.handler.data_plane = service_dp.get();
    service = std::make_unique<testutil::TestService>(so);
    auto cn =
        Client::Connect({.address = service->server->address(), .data_plane = worker_dp.get()});
    ASSERT_TRUE(cn.ok()) << cn.status().ToString();
    conn = std::move(*cn);
    ServiceSourceOptions sso;
    sso.sequence_id = 7;
    sso.selector = "prhs";
    sso.options = o;
    sso.prefill = context;
    sso.correction = c.mode;
    auto r = ServiceKvSource::Make(conn.get(), shape, sso);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    remote = std::move(*r);
    sparse = remote.get();
  }
  auto measured = MeasuredKvSource::Make(sparse, shape, o, context, sel::ForcedPolicy::kGeometry);
  ASSERT_TRUE(measured.ok());
  auto dense_a = DenseKvSource::Make(shape, 16), dense_b = DenseKvSource::Make(shape, 16);
  ASSERT_TRUE(dense_a.ok() && dense_b.ok());
  Tee tee;
  tee.dense = dense_a->get();
  tee.sparse = measured->get();
  tee.prefill = context;
  tee.q_heads = shape.q_heads;
  tee.D = shape.head_dim;
  // Worker 1 runs on the tee (the dense trajectory, every output compared); worker 2 is dense.
  ReferenceWorker wt(**model, &tee), wd(**model, dense_b->get());
  std::vector<float> lt((*model)->config().vocab_size), ld(lt.size());
  for (uint64_t p = 0; p < context; ++p) {
    ASSERT_TRUE(wt.Forward((*ids)[p], p, nullptr).ok());
    ASSERT_TRUE(wd.Forward((*ids)[p], p, nullptr).ok());
  }
  for (uint64_t i = 0; i < steps; ++i) {
    const uint64_t p = context + i;
    Status s = wt.Forward((*ids)[p], p, lt.data());
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(wd.Forward((*ids)[p], p, ld.data()).ok());
  }
  ASSERT_EQ(tee.compared, steps * shape.layers * shape.q_heads);
  const std::vector<HeadRecord>& recs = (*measured)->records();
  ASSERT_EQ(recs.size(), steps * shape.layers * shape.q_heads);
  size_t exact = 0, dropped = 0;
  for (const HeadRecord& r : recs) {
    dropped += r.delta_true > 1e-3;
    if (c.mode != Correction::kAlways) continue;
    ASSERT_EQ(r.kind, DeltaKind::kExact) << "step " << r.step << " layer " << r.layer;
    ASSERT_NEAR(r.delta_claim, r.delta_true, 2e-6 + 2e-5 * r.delta_true)
        << "step " << r.step << " layer " << r.layer << " head " << r.q_head;
    ++exact;
  }
  EXPECT_GT(dropped, recs.size() / 2) << "the selection drops little: the case tests little";
  if (c.mode == Correction::kAlways) {
    EXPECT_LE(tee.worst, 1e-5) << "the corrected attention is not dense attention";
  } else {  // anchors: reuse steps stay sparse
    EXPECT_GT(tee.worst, 1e-3) << "anchors mode corrected everything";
  }
  if (remote) {
    ASSERT_TRUE(remote->Flush().ok());
    const ServiceTotals& t = remote->totals();
    EXPECT_GT(t.corrections, 0u);
    EXPECT_GT(t.correction_bytes, 0u);
    EXPECT_EQ(t.failed_calls, 0u);
    if (c.mode == Correction::kAlways)
      EXPECT_EQ(t.corrected, steps * shape.layers * shape.kv_heads);
    else
      EXPECT_LT(t.corrected, steps * shape.layers * shape.kv_heads);
    std::printf("%s: %llu retrievals, %llu reuse, %llu streamed bytes\n", c.name.c_str(),
                (unsigned long long)t.retrievals,
                (unsigned long long)t.gate[sel::GateOutcome::kReuse],
                (unsigned long long)t.streamed_bytes);
    if (c.reuse_while_fits)  // one anchor per (layer, KV head) and then only reuse: it fits
      EXPECT_EQ(t.gate[sel::GateOutcome::kRetrieve], uint64_t{shape.layers} * shape.kv_heads);
  } else {
    EXPECT_GT(local->totals().corrected, 0u);
  }
}

// reuse_while_fits drops the δ bound from reuse: it is refused unless every step is corrected.
TEST(CorrectionOptionsTest, ReuseWhileFitsNeedsCorrectionAlways) {
  sel::SelectorOptions o;
  o.prhs.reuse_while_fits = true;
  EXPECT_TRUE(CheckCorrection(o, Correction::kOff).IsInvalidArgument());
  EXPECT_TRUE(CheckCorrection(o, Correction::kAnchors).IsInvalidArgument());
  EXPECT_TRUE(CheckCorrection(o, Correction::kAlways).ok());
  testutil::TestService service{server::ServerOptions{}};
  auto conn = Client::Connect({.address = service.server->address()});
  ASSERT_TRUE(conn.ok());
  ServiceSourceOptions sso;
  sso.selector = "prhs";
  sso.options = o;
  const ModelShape shape{2, 4, 2, 32, DType::kF16, 1};
  Status st = ServiceKvSource::Make(conn->get(), shape, sso).status();
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find("reuse_while_fits"), std::string::npos);
}

// The logits of a run whose every attention is corrected follow the dense run's: max |Δlogit| ≤
// 1e-3 and the same greedy token at every step (on its own trajectory, not teacher-forced).
TEST(CorrectionLogitsTest, GenerationWithCorrectionAlwaysMatchesDense) {
  auto model = LlamaModel::Load(ModelDir() + "/model.bin");
  ASSERT_TRUE(model.ok());
  auto ids = ReadTokenFile(ModelDir() + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  const uint64_t context = 512, steps = 32;
  const ModelShape shape = (*model)->Shape(DType::kF16);
  sel::SelectorOptions o;
  o.geometry = {16, 4, 16};
  o.budget_tokens = context / 8;
  auto sel = sel::MakeSelector("prhs", o, shape, (*model)->config().seq_len);
  ASSERT_TRUE(sel.ok());
  auto local =
      SelectorKvSource::Make(shape, 16, std::move(*sel), o, context, (*model)->config().seq_len);
  ASSERT_TRUE(local.ok());
  (*local)->set_correction(Correction::kAlways);
  auto dense = DenseKvSource::Make(shape, 16);
  ASSERT_TRUE(dense.ok());
  ReferenceWorker ws(**model, local->get()), wd(**model, dense->get());
  std::vector<float> ls((*model)->config().vocab_size), ld(ls.size());
  for (uint64_t p = 0; p < context; ++p) {
    ASSERT_TRUE(ws.Forward((*ids)[p], p, nullptr).ok());
    ASSERT_TRUE(wd.Forward((*ids)[p], p, nullptr).ok());
  }
  uint32_t next = (*ids)[context];
  double worst = 0;
  for (uint64_t i = 0; i < steps; ++i) {
    const uint64_t p = context + i;
    ASSERT_TRUE(ws.Forward(next, p, ls.data()).ok());
    ASSERT_TRUE(wd.Forward(next, p, ld.data()).ok());
    for (size_t v = 0; v < ls.size(); ++v)
      worst = std::max(worst, double(std::fabs(ls[v] - ld[v])));
    ASSERT_EQ(Argmax(ls), Argmax(ld)) << "step " << i;
    next = Argmax(ld);
  }
  EXPECT_LE(worst, 1e-3);
  EXPECT_GT((*local)->totals().correction_bytes, 0u);
}

std::vector<Case> Cases() {
  std::vector<Case> v = {{"inprocess_always", "inprocess", Correction::kAlways},
                         {"inprocess_anchors", "inprocess", Correction::kAnchors},
                         {"tcp_always", "tcp", Correction::kAlways},
                         {"tcp_anchors", "tcp", Correction::kAnchors},
                         {"inproc_always", "inproc", Correction::kAlways},
                         {"tcp_always_reuse_while_fits", "tcp", Correction::kAlways, true}};
  if (!std::getenv("KVM_TEST_ONE_TRANSPORT"))
    v.push_back({"ucx_always", "ucx", Correction::kAlways});
  return v;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

INSTANTIATE_TEST_SUITE_P(Modes, CorrectionTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace kvm::client
