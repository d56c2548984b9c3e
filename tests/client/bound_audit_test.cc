// The δ bound between anchors (selectors.md §0.4) against the δ the service measures: a test that
// can fail. The real-model checks (`bound_violations == 0` in eval) cannot: there every claim is
// exact. Here a synthetic workload (labelled so) makes PrHS reuse its anchors for many steps —
// keys with salient blocks, queries that drift a little at every step — so the worker claims
// non-trivial bounds (kind bound, well inside (0, 1)), and ServiceKvSource audits every reuse step
// (audit_fraction 1): the service scores the worker's query against its stored keys and the
// resident set it mirrors, and the reply comes back as a claim of kind audit for the same (step,
// layer, query head). Every bound must be ≥ its audited δ (the §0.4 tolerance: 1e-6 + 1e-5 ×
// claim); the audits themselves must agree with the δ that MeasuredKvSource computes on the
// worker's own copy of the keys; and the same comparison must report violations for broken bounds
// (each bound halved; the anchor's exact δ kept as if the set never went stale), so the check has
// teeth.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "client/measure.h"
#include "client/service_source.h"
#include "kvmanager/server.h"
#include "selector/registry.h"
#include "testutil/service.h"

namespace kvm::client {
namespace {

// Synthetic decode workload (labelled synthetic): per (layer, KV head) M unit "topic" directions;
// keys are N(0, 1) per component, and one block in 8 is salient (every key of it carries 4× a
// topic, the topic changing from salient block to salient block); values N(0, 1). Each query head
// follows a topic of its group: its unit direction starts near it and drifts by a random step of
// angle ~eta per decode step; the query is √D × that direction (so a salient key's logit is ~4
// above the background's). Deterministic for a seed; calls come in order (positions ascending, per
// position layers ascending).
class DriftWorkload {
 public:
  static constexpr uint32_t kTopics = 4;
  DriftWorkload(const ModelShape& s, uint32_t block_size, double eta, uint32_t seed)
      : s_(s), B_(block_size), eta_(eta), rng_(seed) {
    const uint32_t D = s.head_dim;
    topics_.resize(size_t{s.layers} * s.kv_heads * kTopics * D);
    for (size_t t = 0; t < topics_.size() / D; ++t) Unit(&topics_[t * D], nullptr);
    u_.resize(size_t{s.layers} * s.q_heads * D);
    for (uint32_t l = 0; l < s.layers; ++l)
      for (uint32_t qh = 0; qh < s.q_heads; ++qh) {
        const float* c = Topic(l, qh / s.group_size(), qh % kTopics);
        float* u = U(l, qh);
        for (uint32_t i = 0; i < D; ++i) u[i] = c[i] + 0.3f * n_(rng_) / std::sqrt(float(D));
        Unit(u, u);
      }
  }
  void KeysValues(uint32_t l, uint64_t pos, float* k, float* v) {
    const uint32_t D = s_.head_dim;
    const uint64_t block = pos / B_;
    const bool salient = block % 8 == 3;
    for (uint32_t h = 0; h < s_.kv_heads; ++h) {
      const float* c = Topic(l, h, (block / 8) % kTopics);
      for (uint32_t i = 0; i < D; ++i) {
        k[size_t{h} * D + i] = n_(rng_) + (salient ? 6.0f * c[i] : 0.f);
        v[size_t{h} * D + i] = n_(rng_);
      }
    }
  }
  void Queries(uint32_t l, float* q) {
    const uint32_t D = s_.head_dim;
    for (uint32_t qh = 0; qh < s_.q_heads; ++qh) {
      float* u = U(l, qh);
      for (uint32_t i = 0; i < D; ++i) u[i] += float(eta_) * n_(rng_) / std::sqrt(float(D));
      Unit(u, u);
      for (uint32_t i = 0; i < D; ++i) q[size_t{qh} * D + i] = std::sqrt(float(D)) * u[i];
    }
  }

 private:
  float* Topic(uint32_t l, uint32_t h, uint32_t t) {
    return &topics_[((size_t{l} * s_.kv_heads + h) * kTopics + t) * s_.head_dim];
  }
  float* U(uint32_t l, uint32_t qh) { return &u_[(size_t{l} * s_.q_heads + qh) * s_.head_dim]; }
  // x ← x / ‖x‖ (a fresh Gaussian direction when `from` is null).
  void Unit(float* x, const float* from) {
    double n2 = 0;
    for (uint32_t i = 0; i < s_.head_dim; ++i) {
      if (!from) x[i] = n_(rng_);
      n2 += double(x[i]) * x[i];
    }
    const float inv = float(1.0 / std::sqrt(n2));
    for (uint32_t i = 0; i < s_.head_dim; ++i) x[i] *= inv;
  }
  ModelShape s_;
  uint32_t B_;
  double eta_;
  std::mt19937 rng_;
  std::normal_distribution<float> n_{0.f, 1.f};
  std::vector<float> topics_, u_;
};

// selectors.md §0.4: a claim counts as violated only when the measured δ exceeds it by more than
// floating-point noise.
bool Violated(double claim, double measured) { return measured > claim + 1e-6 + 1e-5 * claim; }

using Key = std::tuple<uint64_t, uint32_t, uint32_t>;  // (step, layer, query head)

TEST(BoundAuditTest, EveryBoundHoldsAgainstTheServicesAuditAndBrokenBoundsAreCaught) {
  const ModelShape shape{2, 8, 2, 64, DType::kF16, 0xb0d};  // g = 4 query heads per KV head
  const uint64_t context = 1024, steps = 96;
  sel::SelectorOptions o;  // PrHS, budget mode: 1/8 of the context, anchors reused (auto horizon)
  o.geometry = {16, 4, 16};
  o.budget_tokens = context / 8;
  testutil::TestService service;
  auto conn = Client::Connect({.address = service.server->address()});
  ASSERT_TRUE(conn.ok()) << conn.status().ToString();
  ServiceSourceOptions so;
  so.sequence_id = 21;
  so.selector = "prhs";
  so.options = o;
  so.prefill = context;
  so.audit_fraction = 1.0;  // every reuse step of every (layer, KV head)
  auto src = ServiceKvSource::Make(conn->get(), shape, so);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  auto measured =
      MeasuredKvSource::Make(src->get(), shape, o, context, sel::ForcedPolicy::kGeometry);
  ASSERT_TRUE(measured.ok()) << measured.status().ToString();

  DriftWorkload w(shape, o.geometry.block_size, /*eta=*/0.02, /*seed=*/7);
  const size_t rows = size_t{shape.kv_heads} * shape.head_dim;
  std::vector<float> k(rows), v(rows), q(size_t{shape.q_heads} * shape.head_dim), out(q.size());
  for (uint64_t p = 0; p < context + steps; ++p) {
    (*measured)->BeginToken(uint32_t(p % 30000), p);
    for (uint32_t l = 0; l < shape.layers; ++l) {
      w.KeysValues(l, p, k.data(), v.data());
      Status s = (*measured)->Append(l, p, k.data(), v.data());
      ASSERT_TRUE(s.ok()) << "append " << p << ": " << s.ToString();
      if (p < context) continue;  // prefill: attended densely on the worker, not measured
      w.Queries(l, q.data());
      s = (*measured)->Attend(l, p, q.data(), out.data());
      ASSERT_TRUE(s.ok()) << "attend " << p << " layer " << l << ": " << s.ToString();
    }
  }
  ASSERT_TRUE((*src)->Flush().ok());  // the audits still in flight
  (*measured)->TakeLateClaims();
  const ServiceTotals& t = (*src)->totals();
  EXPECT_EQ(t.failed_calls + t.divergences + t.reconnects, 0u);
  EXPECT_GT(t.gate[sel::GateOutcome::kReuse], 0u);

  // The claims the worker made, by kind, and the audits the service sent back.
  std::map<Key, double> bound, audit;
  std::map<std::pair<uint32_t, uint32_t>, std::map<uint64_t, double>> exact;  // (layer, qh) → step
  for (const ClaimRecord& c : (*src)->claims()) {
    const Key key{c.step, c.layer, c.q_head};
    if (c.kind == DeltaKind::kBound) {
      EXPECT_TRUE(bound.emplace(key, c.delta).second) << "two bound claims for one head-step";
    } else if (c.kind == DeltaKind::kAudit) {
      EXPECT_TRUE(audit.emplace(key, c.delta).second) << "two audits of one head-step";
    } else if (c.kind == DeltaKind::kExact) {
      exact[{c.layer, c.q_head}][c.step] = c.delta;
    }
  }
  // The worker's own measurement of each head-step's attended blocks (shadow keys, its queries).
  std::map<Key, double> truth;
  for (const HeadRecord& r : (*measured)->records())
    truth[{r.step, r.layer, r.q_head}] = r.delta_true;
  ASSERT_EQ(truth.size(), steps * shape.layers * shape.q_heads);

  size_t pairs = 0, nontrivial = 0, violations = 0, halved = 0, stale = 0, stale_pairs = 0;
  double max_gap = 0, sum_gap = 0, max_audit_err = 0, sum_bound = 0, sum_audit = 0;
  double min_bound = 1, max_bound = 0;
  for (const auto& [key, b] : bound) {
    const auto [step, layer, qh] = key;
    auto a = audit.find(key);
    ASSERT_NE(a, audit.end()) << "no audit for the bound of step " << step << " layer " << layer
                              << " head " << qh << " (every reuse step is audited)";
    const double d = a->second;
    ++pairs;
    nontrivial += b > 1e-3 && b < 0.999;
    sum_bound += b;
    min_bound = std::min(min_bound, b);
    max_bound = std::max(max_bound, b);
    sum_audit += d;
    max_gap = std::max(max_gap, b - d);
    sum_gap += b - d;
    // The audit is the service's measurement of what the worker attended: it equals the worker's
    // own (fp16 keys on both sides; the audit travels as a float).
    max_audit_err = std::max(max_audit_err, std::fabs(d - truth.at(key)));
    EXPECT_NEAR(d, truth.at(key), 1e-5 + 1e-4 * d)
        << "step " << step << " layer " << layer << " head " << qh;
    if (Violated(b, d)) {
      ++violations;
      ADD_FAILURE() << "bound " << b << " < audited δ " << d << " at step " << step << " layer "
                    << layer << " head " << qh;
    }
    // Negative controls, the same comparison on broken bounds.
    halved += Violated(0.5 * b, d);
    const auto& anchors = exact[{layer, qh}];
    auto it = anchors.lower_bound(step);  // the last anchor before this step
    if (it != anchors.begin()) {
      ++stale_pairs;
      stale += Violated(std::prev(it)->second, d);
    }
  }
  std::printf(
      "[bound_audit] synthetic: %zu bound/audit pairs, %zu non-trivial (%.1f%%), bounds %.4f..%.4f "
      "mean %.4f, mean audited δ %.4f, bound − δ max %.4f mean %.4f, |audit − worker's δ| max "
      "%.2e; "
      "violations %zu; controls: halved bounds %zu violations, stale anchor δ %zu of %zu\n",
      pairs, nontrivial, 100.0 * double(nontrivial) / double(std::max<size_t>(pairs, 1)), min_bound,
      max_bound, sum_bound / double(std::max<size_t>(pairs, 1)),
      sum_audit / double(std::max<size_t>(pairs, 1)), max_gap,
      sum_gap / double(std::max<size_t>(pairs, 1)), max_audit_err, violations, halved, stale,
      stale_pairs);
  EXPECT_GE(pairs, 1000u) << "too few bound claims were audited: the test tests little";
  EXPECT_EQ(audit.size(), pairs) << "an audit of a step that claimed no bound";
  EXPECT_GE(double(nontrivial), 0.8 * double(pairs)) << "the bounds are mostly trivial (0 or 1)";
  EXPECT_EQ(violations, 0u);
  // The comparison catches broken bounds: halving them, or claiming the anchor's δ for the whole
  // cluster as if the set never went stale.
  EXPECT_GE(double(halved), 0.25 * double(pairs)) << "halved bounds pass: the check is weak";
  EXPECT_GT(stale, 0u) << "the anchor's δ is never exceeded: the queries do not drift enough";
}

}  // namespace
}  // namespace kvm::client
