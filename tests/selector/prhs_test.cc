// PrHS and the block oracle on structured synthetic keys and queries (fixed seeds).
#include "selector/prhs.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "selector/registry.h"
#include "selector/scoring.h"
#include "selector/worker_gate.h"
#include "testutil/synthetic.h"

namespace kvm::sel {
namespace {

constexpr uint32_t kG = 4, kD = 32;
ModelShape Shape(uint32_t layers = 1) { return ModelShape{layers, kG * 2, 2, kD, DType::kF32, 0}; }

SelectorOptions Budget(uint32_t B, uint64_t budget) {
  SelectorOptions o;
  o.geometry = Geometry{B, 16, 64};
  o.budget_tokens = budget;
  return o;
}

// Independent δ of a block set: softmax over every token by the reference, per head.
std::vector<double> ReferenceDelta(const float* q, const attn::HeadKV& kv,
                                   const std::vector<uint64_t>& blocks) {
  std::vector<double> out;
  std::vector<uint8_t> sel(kv.tokens, 0);
  for (uint64_t b : blocks)
    for (uint64_t t = b * kv.block_size; t < std::min<uint64_t>(kv.tokens, (b + 1) * kv.block_size);
         ++t)
      sel[t] = 1;
  std::vector<float> p(kv.tokens);
  for (uint32_t h = 0; h < kG; ++h) {
    attn::ScoreKeys(q + h * kD, kv, 1.0f / std::sqrt(float(kD)), p.data());
    attn::Softmax(p.data(), p.size(), p.data());
    out.push_back(attn::DroppedMass(p.data(), sel.data(), p.size()));
  }
  return out;
}

bool Violates(double measured, double claimed) {
  return measured > claimed + 1e-6 + 1e-5 * claimed;
}

struct DriveStats {
  uint64_t anchors = 0, reuse = 0, steps = 0, violations = 0;
};

// Drives one selector over `steps` decode steps after a prefill of `context` tokens.
template <typename Check>
DriveStats Drive(Selector& s, testutil::SyntheticGroup& seq, uint64_t context, uint64_t steps,
                 Check check, std::function<void(float*, uint64_t)> perturb = nullptr) {
  DriveStats r;
  seq.Append(context);
  for (uint64_t i = 0; i < steps; ++i) {
    seq.Append(1);
    float* q = const_cast<float*>(seq.NextQueries());
    if (perturb) perturb(q, i);
    const attn::HeadKV kv = seq.view();
    StepInput in{seq.tokens() - 1, 0, 0, q, &kv, &seq.summaries()};
    Selection out;
    EXPECT_TRUE(s.Select(in, &out).ok());
    ++r.steps;
    (out.anchor ? r.anchors : r.reuse) += 1;
    check(in, out, r);
  }
  return r;
}

TEST(PrhsTest, SinksAndWindowAlwaysResidentAndSizeWithinBudgetPlusExtras) {
  for (uint32_t B : {1u, 16u}) {
    const uint64_t budget = 512;
    auto o = Budget(B, budget);
    auto s = PrhsSelector::Make(o, Shape(), 4096);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    testutil::SyntheticGroup seq(kG, kD, B, 1);
    uint64_t anchor_window_first = 0;
    Drive(**s, seq, 2000, 200, [&](const StepInput& in, const Selection& out, DriveStats&) {
      const uint64_t T = in.tokens();
      std::vector<uint64_t> need;
      AddRange(0, o.geometry.SinkBlocks(T), &need);
      AddRange(o.geometry.WindowFirstBlock(T), o.geometry.Blocks(T), &need);
      for (uint64_t b : need)
        ASSERT_TRUE(std::binary_search(out.blocks.begin(), out.blocks.end(), b)) << b;
      ASSERT_TRUE(std::is_sorted(out.blocks.begin(), out.blocks.end()));
      if (out.anchor) anchor_window_first = o.geometry.WindowFirstBlock(T);
      const uint64_t left_window = o.geometry.WindowFirstBlock(T) - anchor_window_first;
      const uint64_t dilation = 2ull * o.DilationRadius() * ((o.budget_blocks() + 2) / 3);
      ASSERT_LE(out.blocks.size(), o.budget_blocks() + dilation + left_window);
      ASSERT_LE(out.blocks.size(), (*s)->HotSetSlots());
    });
  }
}

TEST(PrhsTest, NoReuseWhenCosineBelowThreshold) {
  auto o = Budget(16, 512);
  o.prhs.tau_cos = 0.8;
  o.prhs.max_cluster_steps = UINT32_MAX;
  auto s = PrhsSelector::Make(o, Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 2, /*drift=*/0.06);
  std::vector<std::vector<float>> anchor_q(kG);
  const DriveStats r =
      Drive(**s, seq, 1500, 300, [&](const StepInput& in, const Selection& out, DriveStats&) {
        if (out.anchor) {
          for (uint32_t h = 0; h < kG; ++h) anchor_q[h].assign(in.q + h * kD, in.q + (h + 1) * kD);
          return;
        }
        for (uint32_t h = 0; h < kG; ++h)
          ASSERT_GE(Cosine(in.q + h * kD, anchor_q[h].data(), kD), 0.8);
        ASSERT_EQ(out.retrieved_heads, 0u);
        ASSERT_EQ(out.kind, DeltaKind::kBound);
      });
  EXPECT_GT(r.reuse, 0u);
  EXPECT_GT(r.anchors, 1u);  // the drift forced re-anchors
}

TEST(PrhsTest, AnchorDeltaEqualsIndependentReference) {
  auto o = Budget(16, 384);
  auto s = PrhsSelector::Make(o, Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 3, 0.2);
  const DriveStats r =
      Drive(**s, seq, 1000, 100, [&](const StepInput& in, const Selection& out, DriveStats&) {
        if (!out.anchor) return;
        ASSERT_EQ(out.kind, DeltaKind::kExact);
        ASSERT_EQ(out.retrieved_heads, kG);
        const auto ref = ReferenceDelta(in.q, *in.kv, out.blocks);
        for (uint32_t h = 0; h < kG; ++h) ASSERT_NEAR(out.delta[h], ref[h], 1e-5) << h;
      });
  EXPECT_GT(r.anchors, 0u);
}

// The δ bound is never below the true δ, under every kind of drift the gate may let through. The
// cosine gate is opened fully (τ = −1, no cluster limit) so reuse happens whatever the drift.
// Every form of the bound (gate.h) is checked.
TEST(PrhsTest, DeltaBoundNeverBelowTrueDeltaUnderAdversarialDrift) {
  uint64_t checked = 0, total_violations = 0;
  for (uint32_t seed = 1; seed <= 12; ++seed) {
    auto o = Budget(seed % 2 ? 16 : 4, 384);
    o.prhs.tau_cos = -1.0;
    o.prhs.max_cluster_steps = UINT32_MAX;
    o.prhs.bound = static_cast<BoundForm>(seed % 3);
    auto s = PrhsSelector::Make(o, Shape(), 8192);
    ASSERT_TRUE(s.ok());
    testutil::SyntheticGroup seq(kG, kD, o.geometry.block_size, seed, 0.02);
    std::mt19937 rng(seed);
    auto perturb = [&](float* q, uint64_t i) {
      switch ((i + seed) % 6) {
        case 0:
          for (uint32_t j = 0; j < kG * kD; ++j) q[j] *= 0.1f;
          break;  // scaled down
        case 1:
          for (uint32_t j = 0; j < kG * kD; ++j) q[j] = -q[j];
          break;   // negated
        case 2: {  // rotated
          const uint32_t a = rng() % kD, b = (a + 1 + rng() % (kD - 1)) % kD;
          for (uint32_t h = 0; h < kG; ++h) {
            const float x = q[h * kD + a], y = q[h * kD + b], th = 0.7f;
            q[h * kD + a] = x * std::cos(th) - y * std::sin(th);
            q[h * kD + b] = x * std::sin(th) + y * std::cos(th);
          }
          break;
        }
        case 3: {  // RoPE advanced
          const double pos = double(5 + i % 50);
          for (uint32_t h = 0; h < kG; ++h)
            for (uint32_t d = 0; d < kD; d += 2) {
              const double ang = pos / std::pow(10000.0, double(d) / kD);
              const float x = q[h * kD + d], y = q[h * kD + d + 1];
              q[h * kD + d] = float(x * std::cos(ang) - y * std::sin(ang));
              q[h * kD + d + 1] = float(x * std::sin(ang) + y * std::cos(ang));
            }
          break;
        }
        case 4:
          for (uint32_t j = 0; j < kG * kD; ++j) q[j] *= 3.0f;
          break;  // scaled up
        default:
          break;  // plain drift
      }
    };
    Drive(
        **s, seq, 1200, 240,
        [&](const StepInput& in, const Selection& out, DriveStats& r) {
          if (out.anchor) return;
          const auto ref = ReferenceDelta(in.q, *in.kv, out.blocks);
          for (uint32_t h = 0; h < kG; ++h) {
            ++checked;
            if (Violates(ref[h], out.delta[h])) {
              ++r.violations;
              ++total_violations;
              ADD_FAILURE() << "seed " << seed << " step " << in.step << " head " << h << " true "
                            << ref[h] << " > bound " << out.delta[h];
            }
          }
        },
        perturb);
  }
  EXPECT_EQ(total_violations, 0u);
  EXPECT_GT(checked, 8000u);
}

TEST(PrhsTest, TargetModeMeetsTargetOnEveryHeadAtEveryAnchorOrSaysCapWasHit) {
  for (double target : {0.2, 0.1, 0.05}) {
    SelectorOptions o;
    o.geometry = Geometry{16, 16, 64};
    o.target_delta = target;
    o.max_resident_tokens = 1024;
    auto s = PrhsSelector::Make(o, Shape(), 4096);
    ASSERT_TRUE(s.ok());
    testutil::SyntheticGroup seq(kG, kD, 16, 4, 0.05);
    uint64_t met = 0, anchors = 0;
    bool anchor_met = true;
    Drive(**s, seq, 2500, 120, [&](const StepInput& in, const Selection& out, DriveStats&) {
      const auto ref = ReferenceDelta(in.q, *in.kv, out.blocks);
      bool all = true;
      for (double d : ref) all = all && d <= target;
      if (out.anchor) {
        ++anchors;
        ASSERT_EQ(out.target_met, all);  // says whether the target was met
        if (!all) {
          ASSERT_GE(out.blocks.size(), o.cap_blocks());  // only when the cap was hit
        }
        met += all;
        anchor_met = all;
      } else {
        bool within = true;
        for (uint32_t h = 0; h < kG; ++h) within = within && out.delta[h] <= target;
        ASSERT_EQ(out.target_met, within);  // the claim says whether the bound is within δ*
        // An anchor that met δ* is reused only within δ* (the bound); one that missed it (the cap
        // bound) may be reused beyond it (prhs.h "When the cap binds"), saying so.
        if (anchor_met) ASSERT_TRUE(within);
        ASSERT_EQ(out.kind, DeltaKind::kBound);
        ASSERT_FALSE(Violates(*std::max_element(ref.begin(), ref.end()),
                              *std::max_element(out.delta.begin(), out.delta.end())));
      }
    });
    EXPECT_GT(met, 0u) << target;
    EXPECT_GT(anchors, 0u);
  }
}

// When the cap binds: an anchor that missed δ* is reused under the cosine gate and the cluster cap
// (its claims a sound bound with target_met false), and never with cap_reuse off; an anchor that
// met δ* still only while its bound is ≤ δ*.
TEST(PrhsTest, WhenTheCapBindsTheGroupReusesOnlyIfAllowedAndSaysTheTargetWasMissed) {
  for (bool cap_reuse : {true, false}) {
    SelectorOptions o;
    o.geometry = Geometry{16, 16, 64};
    o.target_delta = 0.01;  // out of reach of a 256-token cap on diffuse keys
    o.max_resident_tokens = 256;
    o.prhs.cap_reuse = cap_reuse;
    o.prhs.tau_cos = -1.0;
    auto s = PrhsSelector::Make(o, Shape(), 4096);
    ASSERT_TRUE(s.ok());
    testutil::SyntheticGroup seq(kG, kD, 16, 9, 0.3);
    uint64_t missed_anchors = 0, cap_reuses = 0;
    bool anchor_met = true;
    Drive(**s, seq, 2000, 150, [&](const StepInput& in, const Selection& out, DriveStats&) {
      if (out.anchor) {
        anchor_met = out.target_met;
        missed_anchors += !out.target_met;
        return;
      }
      ASSERT_FALSE(anchor_met && !out.target_met);  // a met anchor's reuse stays within δ*
      if (!anchor_met) {
        ++cap_reuses;
        ASSERT_FALSE(out.target_met);
        ASSERT_EQ(out.kind, DeltaKind::kBound);
        const auto ref = ReferenceDelta(in.q, *in.kv, out.blocks);
        for (uint32_t h = 0; h < kG; ++h) ASSERT_FALSE(Violates(ref[h], out.delta[h]));
      }
    });
    EXPECT_GT(missed_anchors, 0u);
    if (cap_reuse) {
      EXPECT_GT(cap_reuses, 100u);
    } else {
      EXPECT_EQ(cap_reuses, 0u);
    }
  }
}

// §0.7: the block oracle with the same number of resident blocks and the same forced blocks has a
// group-mean δ no larger than PrHS's, at every step, over many seeds.
TEST(PrhsTest, BlockOracleOfSameSizeNeverWorseThanPrhs) {
  for (uint32_t seed = 10; seed < 22; ++seed) {
    auto o = Budget(seed % 3 == 0 ? 1 : 16, 256 + 32 * (seed % 4));
    auto s = PrhsSelector::Make(o, Shape(), 4096);
    ASSERT_TRUE(s.ok());
    testutil::SyntheticGroup seq(kG, kD, o.geometry.block_size, seed, 0.05);
    Drive(**s, seq, 800, 60, [&](const StepInput& in, const Selection& out, DriveStats&) {
      const GroupScores gs = ScoreGroup(in.q, kG, *in.kv);
      std::vector<uint64_t> forced;
      AddRange(0, o.geometry.SinkBlocks(in.tokens()), &forced);
      AddRange(o.geometry.WindowFirstBlock(in.tokens()), o.geometry.Blocks(in.tokens()), &forced);
      const auto oracle = OracleBlocks(gs, forced, out.blocks.size());
      ASSERT_EQ(oracle.size(), out.blocks.size());
      const auto d_or = DeltaOf(gs, oracle), d_pr = DeltaOf(gs, out.blocks);
      double mo = 0, mp = 0;
      for (uint32_t h = 0; h < kG; ++h) mo += d_or[h] / kG, mp += d_pr[h] / kG;
      ASSERT_LE(mo, mp + 1e-9) << "seed " << seed << " step " << in.step;
    });
  }
}

TEST(PrhsTest, PsawWindowsNeverGrowWithDepthAndCutIsFrozenAtTheAnchor) {
  auto o = Budget(16, 512);
  o.prhs.psaw = true;
  o.prhs.psaw_start_layer = 2;
  o.prhs.psaw_phi = 0.3;
  auto s = PrhsSelector::Make(o, Shape(8), 8192);
  ASSERT_TRUE(s.ok());
  for (uint64_t T : {100ull, 1000ull, 5000ull}) {
    uint64_t prev_window = T;
    for (uint32_t l = 0; l < 8; ++l) {
      const uint64_t window = T - (*s)->PsawCut(l, T);
      EXPECT_LE(window, prev_window) << "layer " << l;
      prev_window = window;
    }
    EXPECT_EQ((*s)->PsawCut(0, T), 0u);
    EXPECT_EQ((*s)->PsawCut(1, T), 0u);
    EXPECT_LT((*s)->PsawCut(7, T), T);
  }
  // A deep layer's selection holds no middle block before the cut frozen at its anchor.
  testutil::SyntheticGroup seq(kG, kD, 16, 5, 0.05);
  seq.Append(3000);
  seq.Append(1);
  const attn::HeadKV kv = seq.view();
  StepInput in{seq.tokens() - 1, 7, 0, seq.NextQueries(), &kv, &seq.summaries()};
  Selection out;
  ASSERT_TRUE((*s)->Select(in, &out).ok());
  const uint64_t cut_block = (*s)->PsawCut(7, in.tokens()) / 16;
  for (uint64_t b : out.blocks)
    EXPECT_TRUE(b < o.geometry.SinkBlocks(in.tokens()) || b >= cut_block) << b;
}

TEST(PrhsTest, LayerSharingPointsOnlyToShallowerLayersAndCopiesTheSourceSet) {
  auto o = Budget(16, 512);
  o.prhs.layer_sharing = true;
  auto s = PrhsSelector::Make(o, Shape(3), 4096);
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE((*s)->gate()->SetLayerMap({0, 2, 2}).IsInvalidArgument());
  EXPECT_TRUE((*s)->gate()->SetLayerMap({0, 0}).IsInvalidArgument());
  ASSERT_TRUE((*s)->gate()->SetLayerMap({0, 1, 0}).ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 6);
  seq.Append(2000);
  const attn::HeadKV kv = seq.view();
  const float* q = seq.NextQueries();
  Selection s0, s2;
  StepInput in0{seq.tokens() - 1, 0, 0, q, &kv, &seq.summaries()};
  StepInput in2 = in0;
  in2.layer = 2;
  EXPECT_TRUE((*s)->Select(in2, &s2).IsFailedPrecondition());  // source not selected yet this step
  ASSERT_TRUE((*s)->Select(in0, &s0).ok());
  ASSERT_TRUE((*s)->Select(in2, &s2).ok());
  EXPECT_EQ(s2.blocks, s0.blocks);
  EXPECT_EQ(s2.kind, DeltaKind::kUnknown);
  EXPECT_EQ(s2.retrieved_heads, 0u);
}

// The worker's gate takes everything it decides with from the Selection it is handed: a second
// gate fed only the fields that travel on the wire (an anchor's blocks, δ as float, log δ, kind,
// k_max, the key statistics, the horizon, retrieved heads) decides every later step exactly as the
// selector's own gate — outcome, set, kind and bound, bit for bit — in budget and target mode.
TEST(PrhsTest, AGateFedOnlyTheTravellingFieldsDecidesAsTheSelectorsOwn) {
  for (double target : {0.0, 0.1}) {
    SelectorOptions o = Budget(16, target > 0 ? 0 : 384);
    o.target_delta = target;
    o.max_resident_tokens = target > 0 ? 512 : 0;
    o.prhs.tau_cos = 0.3;
    o.prhs.reuse_regret = 0.02;  // horizons that vary, so reuse_steps must travel
    auto s = PrhsSelector::Make(o, Shape(), 4096);
    ASSERT_TRUE(s.ok());
    WorkerGate worker(o, Shape(), *FindSelector("prhs").value(), (*s)->HotSetSlots());
    testutil::SyntheticGroup seq(kG, kD, 16, 5, 0.15);
    uint64_t reuse = 0, anchors = 0;
    Drive(**s, seq, 1500, 200, [&](const StepInput& in, const Selection& out, DriveStats&) {
      Selection w;
      auto o2 = worker.Decide(in.step, in.layer, in.kv_head, in.q, /*allow_reuse=*/true, &w);
      ASSERT_TRUE(o2.ok());
      if (out.anchor) {
        ++anchors;
        ASSERT_EQ(*o2, GateOutcome::kRetrieve) << "step " << in.step;
        Selection wire;  // what crosses the wire
        wire.blocks = out.blocks;
        for (double d : out.delta) wire.delta.push_back(float(d));
        wire.log_delta = out.log_delta;
        wire.kind = out.kind;
        wire.k_max = out.k_max;
        wire.anchor = out.anchor;
        wire.retrieved_heads = out.retrieved_heads;
        wire.key_radius = out.key_radius;
        wire.split_dir = out.split_dir;
        wire.dropped_radius = out.dropped_radius;
        wire.reuse_steps = out.reuse_steps;
        worker.Record(in.step, in.layer, in.kv_head, in.q, wire);
        return;
      }
      ++reuse;
      ASSERT_EQ(*o2, GateOutcome::kReuse) << "step " << in.step;
      ASSERT_EQ(w.blocks, out.blocks);
      ASSERT_EQ(w.kind, out.kind);
      ASSERT_EQ(w.target_met, out.target_met);
      ASSERT_EQ(w.delta, out.delta);  // the bound, bit for bit
    });
    EXPECT_GT(reuse, 0u) << target;
    EXPECT_GT(anchors, 1u) << target;
    EXPECT_EQ(worker.counts().bound.checks, (*s)->gate()->counts().bound.checks);
  }
}

TEST(PrhsTest, ShortContextsMakeEverythingResident) {
  auto s = PrhsSelector::Make(Budget(16, 512), Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 7);
  seq.Append(300);
  const attn::HeadKV kv = seq.view();
  StepInput in{seq.tokens() - 1, 0, 0, seq.NextQueries(), &kv, &seq.summaries()};
  Selection out;
  ASSERT_TRUE((*s)->Select(in, &out).ok());
  EXPECT_EQ(out.blocks.size(), 19u);  // ceil(300 / 16)
  EXPECT_EQ(out.kind, DeltaKind::kExact);
  for (double d : out.delta) EXPECT_EQ(d, 0.0);
}

TEST(OracleTest, BudgetAndTargetModes) {
  auto o = Budget(16, 384);
  auto s = OracleSelector::Make(o, Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 8);
  Drive(**s, seq, 1500, 20, [&](const StepInput& in, const Selection& out, DriveStats&) {
    EXPECT_LE(out.blocks.size(), o.budget_blocks());  // the window's widest span is reserved
    EXPECT_GE(out.blocks.size(), o.budget_blocks() - 1);
    EXPECT_EQ(out.retrieved_heads, kG);
    const auto ref = ReferenceDelta(in.q, *in.kv, out.blocks);
    for (uint32_t h = 0; h < kG; ++h) ASSERT_NEAR(out.delta[h], ref[h], 1e-5);
  });
  SelectorOptions t;
  t.geometry = Geometry{16, 16, 64};
  t.target_delta = 0.1;
  t.max_resident_tokens = 2048;
  auto ts = OracleSelector::Make(t, Shape(), 4096);
  ASSERT_TRUE(ts.ok());
  testutil::SyntheticGroup seq2(kG, kD, 16, 9);
  Drive(**ts, seq2, 1500, 20, [&](const StepInput&, const Selection& out, DriveStats&) {
    if (out.target_met) {
      for (double d : out.delta) EXPECT_LE(d, 0.1);
    } else {
      EXPECT_EQ(out.blocks.size(), t.cap_blocks());
    }
  });
}

// The service's GPU tier scores where the keys live and hands the scores in on request
// (StepInput::score): a selector that takes them decides exactly as when it scores the keys itself,
// without reading them, and asks only when it needs them; a wrong or failing score is an error; a
// selector that needs the keys refuses a step without them.
TEST(ScoresInputTest, GivenScoresGiveTheSameSelectionWithoutTheKeysOnlyWhenNeeded) {
  for (const char* name : {"prhs", "oracle"}) {
    auto a = MakeSelector(name, Budget(16, 384), Shape(), 4096);
    auto b = MakeSelector(name, Budget(16, 384), Shape(), 4096);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_TRUE((*b)->TakesScores()) << name;
    testutil::SyntheticGroup seq(kG, kD, 16, 11);
    seq.Append(200);  // 13 blocks: a short context (the budget holds 24)
    int calls = 0;
    const float* q = nullptr;
    attn::HeadKV kv;
    const std::function<Status(GroupScores*)> score = [&](GroupScores* out) {
      ++calls;
      *out = ScoreGroup(q, kG, kv);
      return Status::Ok();
    };
    auto step = [&](Selection* x, Selection* y) {
      seq.Append(1);
      q = seq.NextQueries();
      kv = seq.view();
      StepInput with_keys{seq.tokens() - 1, 0, 0, q, &kv, &seq.summaries()};
      StepInput with_score{seq.tokens() - 1, 0, 0, q, nullptr, &seq.summaries()};
      with_score.score = &score;
      ASSERT_TRUE((*a)->Anchor(with_keys, x).ok());
      ASSERT_TRUE((*b)->Anchor(with_score, y).ok()) << name;
    };
    Selection x, y;
    step(&x, &y);
    EXPECT_EQ(calls, 0) << name << ": a short context needs no scores";
    EXPECT_EQ(x.blocks, y.blocks);
    seq.Append(1300);
    for (int i = 0; i < 12; ++i) {
      step(&x, &y);
      EXPECT_EQ(x.blocks, y.blocks) << name << " step " << i;
      EXPECT_EQ(x.delta, y.delta);
      EXPECT_EQ(x.k_max, y.k_max);
      EXPECT_EQ(x.kind, y.kind);
    }
    EXPECT_EQ(calls, 12) << name;
    // Scores of another length are refused, naming the mismatch; a failing score is the error.
    seq.Append(1);
    q = seq.NextQueries();
    kv = seq.view();
    const std::function<Status(GroupScores*)> short_scores = [&](GroupScores* out) {
      *out = ScoreGroup(q, kG, kv);
      out->tokens -= 1;
      return Status::Ok();
    };
    const std::function<Status(GroupScores*)> failing = [](GroupScores*) {
      return Status::Corruption("checksum");
    };
    StepInput bad{seq.tokens() - 1, 0, 0, q, nullptr, &seq.summaries()};
    Selection z;
    bad.score = &short_scores;
    EXPECT_TRUE((*b)->Anchor(bad, &z).IsInvalidArgument()) << name;
    bad.score = &failing;
    EXPECT_TRUE((*b)->Anchor(bad, &z).IsCorruption()) << name;
  }
  auto quest = MakeSelector("quest", Budget(16, 384), Shape(), 4096);
  ASSERT_TRUE(quest.ok());
  EXPECT_FALSE((*quest)->TakesScores());
  testutil::SyntheticGroup seq(kG, kD, 16, 12);
  seq.Append(1500);
  const attn::HeadKV kv = seq.view();
  const float* q = seq.NextQueries();
  const std::function<Status(GroupScores*)> score = [&](GroupScores* out) {
    *out = ScoreGroup(q, kG, kv);
    return Status::Ok();
  };
  StepInput no_keys{seq.tokens() - 1, 0, 0, q, nullptr, &seq.summaries()};
  no_keys.score = &score;
  Selection z;
  EXPECT_TRUE((*quest)->Select(no_keys, &z).IsInvalidArgument());
}

TEST(SelectorOptionsTest, BadParametersNameTheField) {
  auto expect_field = [](const SelectorOptions& o, const char* field, ModelShape shape = Shape()) {
    auto s = PrhsSelector::Make(o, shape, 4096);
    ASSERT_FALSE(s.ok()) << field;
    EXPECT_TRUE(s.status().IsInvalidArgument());
    EXPECT_NE(s.status().message().find(field), std::string::npos) << s.status().ToString();
  };
  auto o = Budget(16, 512);
  o.budget_tokens = 0;
  expect_field(o, "budget_tokens");
  o = Budget(16, 512);
  o.prhs.tau_cos = 1.5;
  expect_field(o, "tau_cos");
  o = Budget(16, 512);
  o.geometry.block_size = 0;
  expect_field(o, "block_size");
  o = Budget(16, 512);
  o.geometry.window_tokens = 5000;
  expect_field(o, "window_tokens");
  o = Budget(16, 512);
  o.target_delta = 0.1;
  expect_field(o, "max_resident_tokens");
  o = Budget(16, 64);  // no room beyond sinks + window
  expect_field(o, "budget_tokens");
  ModelShape bad = Shape();
  bad.q_heads = 7;
  expect_field(Budget(16, 512), "q_heads", bad);
  EXPECT_TRUE(MakeSelector("nope", Budget(16, 512), Shape(), 4096).status().IsInvalidArgument());
}

}  // namespace
}  // namespace kvm::sel
