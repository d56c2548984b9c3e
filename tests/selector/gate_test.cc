#include "selector/gate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "proto/half.h"
#include "selector/scoring.h"

namespace kvm::sel {
namespace {

TEST(GateTest, BoundIsDeltaAtZeroDriftMonotoneAndAtMostOne) {
  EXPECT_DOUBLE_EQ(DeltaBound(0.05, 0.0), 0.05);
  EXPECT_EQ(DeltaBound(0.0, 5.0), 0.0);
  EXPECT_EQ(DeltaBound(1.0, 0.1), 1.0);
  double prev = 0.05;
  for (double eps = 0.01; eps < 2000; eps *= 1.7) {
    const double b = DeltaBound(0.05, eps);
    EXPECT_GE(b, prev);
    EXPECT_LE(b, 1.0);
    prev = b;
  }
  EXPECT_EQ(DeltaBound(0.05, 1e6), 1.0);  // no overflow
  // A δ_a far below double's range still grows: log δ_a = −800, ε = 450 → e^100 ≫ 1 → bound ≈ 1.
  EXPECT_GT(DeltaBoundLog(-800.0, 450.0), 0.999);
  EXPECT_GT(DeltaBoundLog(-800.0, 395.0), 0.0);
  EXPECT_EQ(DeltaBoundLog(-INFINITY, 1e9), 0.0);
  // Hand value: δ_a = 0.1, ε = 0.5 → 0.1·e / (0.9 + 0.1·e)
  EXPECT_NEAR(DeltaBound(0.1, 0.5), 0.1 * std::exp(1.0) / (0.9 + 0.1 * std::exp(1.0)), 1e-15);
  EXPECT_NEAR(LogCosh(0.0), 0.0, 1e-15);
  EXPECT_NEAR(LogCosh(1.5), std::log(std::cosh(1.5)), 1e-14);
  EXPECT_NEAR(LogCosh(1e4), 1e4 - std::log(2.0), 1e-9);  // no overflow
}

TEST(GateTest, ChecksCosineAndBound) {
  HeadGate g;
  g.q_a = {1.f, 0.f, 0.f, 0.f};
  g.delta_a = 0.02;
  g.log_delta_a = std::log(0.02);
  g.k_max = 2.0f;
  const float same[] = {1.f, 0.f, 0.f, 0.f};
  const float near[] = {1.f, 0.1f, 0.f, 0.f};
  const float far[] = {0.f, 1.f, 0.f, 0.f};
  EXPECT_TRUE(g.Check(same, 0.8, 0.1).reuse);
  EXPECT_TRUE(g.Check(far, -1.0, 1.0).reuse);  // limit 1: the cosine alone decides
  EXPECT_DOUBLE_EQ(g.Check(same, 0.8, 0.1).bound, 0.02);
  EXPECT_FALSE(g.Check(far, 0.8, 1.0).reuse);  // cosine 0
  const auto d = g.Check(near, 0.8, 1.0);      // budget mode: cosine only
  EXPECT_TRUE(d.reuse);
  EXPECT_NEAR(d.bound, DeltaBound(0.02, 0.1 * 2.0 / 2.0), 1e-8);  // ε = ‖Δq‖·K_max/√d, d = 4
  EXPECT_FALSE(g.Check(near, 0.8, 0.021).reuse);  // target mode: the bound exceeds δ*
  EXPECT_NEAR(Cosine(same, far, 4), 0.0, 1e-12);
}

// Keys of one (layer, KV head) as fp32 rows in the block layout.
struct Keys {
  uint32_t B, D;
  std::vector<float> rows;  // [tokens][D]
  std::vector<float> blocks;
  std::vector<const void*> kp;
  uint64_t tokens() const { return rows.size() / D; }
  attn::HeadKV View() {
    const uint64_t T = tokens(), nb = (T + B - 1) / B;
    blocks.assign(nb * B * D, 0.f);
    std::copy(rows.begin(), rows.end(), blocks.begin());
    kp.resize(nb);
    for (uint64_t b = 0; b < nb; ++b) kp[b] = &blocks[b * B * D];
    return attn::HeadKV{kp.data(), kp.data(), static_cast<uint32_t>(nb), T, B, D, DType::kF32};
  }
};

// The sound bound against brute force on adversarial random problems: keys with a large common
// component, outliers among the dropped keys, clusters; kept sets chosen by score or at random;
// queries drifting at random, scaled, negated, and pushed along the directions that move mass into
// the dropped set (w, and towards the largest dropped key); large keys appended after the anchor.
// True δ from the float scores, as the eval measures it; the eval's tolerance.
TEST(GateTest, BoundNeverBelowBruteForceDeltaOnAdversarialProblems) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.f, 1.f);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  uint64_t cases = 0, violations = 0, tighter = 0, split_won = 0, far_below_norm = 0;
  for (int problem = 0; problem < 400; ++problem) {
    const uint32_t D = (problem % 3 == 0) ? 8 : (problem % 3 == 1 ? 32 : 64);
    const uint32_t B = (problem % 4 == 0) ? 1 : (problem % 4 == 1 ? 4 : 16);
    const uint32_t g = 2;
    const uint64_t T = 40 + rng() % 260;
    Keys keys{B, D, {}, {}, {}};
    std::vector<float> common(D);
    const float common_norm = float(problem % 5) * 4.0f;
    for (auto& x : common) x = n(rng);
    {
      double s = 0;
      for (float x : common) s += double(x) * x;
      for (auto& x : common) x = float(x / std::sqrt(s) * common_norm);
    }
    const float sigma = 0.3f + float(problem % 7) * 0.5f;
    for (uint64_t j = 0; j < T; ++j) {
      const bool outlier = u(rng) < 0.02;
      const bool cluster = (j / 5) % 11 == 3;
      for (uint32_t i = 0; i < D; ++i) {
        float x = common[i] + sigma * n(rng);
        if (outlier) x += 4.0f * sigma * n(rng);
        if (cluster) x += 1.5f * common[(i + 1) % D] / std::max(1.0f, common_norm) * sigma * 3.f;
        keys.rows.push_back(x);
      }
    }
    std::vector<float> qa(size_t{g} * D);
    const float qscale = 0.3f + float(u(rng)) * 3.0f;
    for (auto& x : qa) x = n(rng) * qscale;
    attn::HeadKV kv = keys.View();
    const GroupScores s = ScoreGroup(qa.data(), g, kv);
    const uint64_t nb = s.blocks();
    std::vector<uint64_t> kept;
    if (problem % 2 == 0) {  // top blocks by score, plus the first and the last
      kept = OracleBlocks(s, {0, nb - 1}, std::max<uint64_t>(2, nb / (2 + problem % 6)));
    } else {  // at random
      for (uint64_t b = 0; b < nb; ++b)
        if (b == nb - 1 || u(rng) < 0.3) kept.push_back(b);
    }
    Selection sel;
    sel.blocks = kept;
    sel.log_delta = LogDeltaOf(s, kept);
    sel.k_max = 0;
    for (uint64_t j = 0; j < T; ++j) {
      double ss = 0;
      for (uint32_t i = 0; i < D; ++i) ss += double(keys.rows[j * D + i]) * keys.rows[j * D + i];
      sel.k_max = std::max(sel.k_max, float(std::sqrt(ss)) * (1 + 1e-7f));
    }
    AnchorKeyStats(s, kv, kept, &sel);
    // The largest dropped key (the one a drift towards it inflates most).
    uint64_t big = 0;
    double big_norm = -1;
    std::vector<uint8_t> kept_tok(T, 0);
    for (uint64_t b : kept)
      for (uint64_t j = b * B; j < std::min<uint64_t>(T, (b + 1) * B); ++j) kept_tok[j] = 1;
    for (uint64_t j = 0; j < T; ++j) {
      if (kept_tok[j]) continue;
      double ss = 0;
      for (uint32_t i = 0; i < D; ++i) ss += double(keys.rows[j * D + i]) * keys.rows[j * D + i];
      if (ss > big_norm) big_norm = ss, big = j;
    }
    for (uint32_t h = 0; h < g; ++h) {
      HeadGate hg;
      hg.q_a.assign(qa.begin() + h * D, qa.begin() + (h + 1) * D);
      hg.log_delta_a = sel.LogDelta(h);
      hg.delta_a = std::exp(hg.log_delta_a);
      hg.k_max = sel.k_max;
      hg.key_radius = sel.key_radius;
      if (!sel.split_dir.empty()) {
        hg.split_dir.assign(sel.split_dir.begin() + h * D, sel.split_dir.begin() + (h + 1) * D);
        hg.dropped_radius = sel.dropped_radius[h];
      }
      for (int v = 0; v < 25; ++v) {
        std::vector<float> qt = hg.q_a;
        const float mag = float(std::pow(10.0, -3.0 + 3.5 * u(rng)));  // 0.001 .. 3
        switch (v % 6) {
          case 0:  // random drift
            for (auto& x : qt) x += mag * qscale * n(rng);
            break;
          case 1:  // along w: the first-order direction of form (3)
            if (!hg.split_dir.empty())
              for (uint32_t i = 0; i < D; ++i) qt[i] += mag * hg.split_dir[i];
            break;
          case 2:  // towards the largest dropped key
            if (big_norm > 0)
              for (uint32_t i = 0; i < D; ++i) qt[i] += mag * keys.rows[big * D + i];
            break;
          case 3:  // scaled
            for (auto& x : qt) x *= 1.0f + mag;
            break;
          case 4:  // negated
            for (auto& x : qt) x = -x * std::min(1.0f, mag);
            break;
          default:  // small drift along the common component
            for (uint32_t i = 0; i < D; ++i) qt[i] += mag * common[i];
            break;
        }
        // Keys appended since the anchor (resident), some of them large.
        Keys now = keys;
        const uint64_t add = rng() % 20;
        for (uint64_t a = 0; a < add; ++a)
          for (uint32_t i = 0; i < D; ++i)
            now.rows.push_back(common[i] + sigma * n(rng) * (a % 3 == 0 ? 6.f : 1.f));
        attn::HeadKV nkv = now.View();
        const GroupScores ns = ScoreGroup(qt.data(), 1, nkv);  // the new query alone
        std::vector<uint64_t> res = kept;
        for (uint64_t b = T / B; b < ns.blocks(); ++b)
          if (!std::binary_search(res.begin(), res.end(), b)) res.push_back(b);
        std::sort(res.begin(), res.end());
        // A partially filled anchor block is resident at t only if it was kept; the gate's reuse
        // keeps every block from the anchor's window on, and the last block is always kept here.
        const double truth = DeltaOf(ns, res)[0];
        double norm = 0;
        const double bound = hg.Bound(qt.data(), &norm);
        ++cases;
        if (truth > bound + 1e-6 + 1e-5 * bound) {
          ++violations;
          ADD_FAILURE() << "problem " << problem << " head " << h << " variant " << v << " true "
                        << truth << " > bound " << bound << " (norm " << norm << ")";
        }
        EXPECT_LE(bound, norm + 1e-12);
        tighter += bound < norm - 1e-9;
        far_below_norm += bound < 0.5 * norm;
        HeadGate centred = hg;
        centred.split_dir.clear();
        split_won += bound < centred.Bound(qt.data()) - 1e-9;
      }
    }
  }
  std::printf(
      "bound: %llu cases, %llu violations, tighter than form (1) in %llu, below half of it in "
      "%llu, form (3) below (2) in %llu\n",
      (unsigned long long)cases, (unsigned long long)violations, (unsigned long long)tighter,
      (unsigned long long)far_below_norm, (unsigned long long)split_won);
  EXPECT_EQ(violations, 0u);
  EXPECT_GE(cases, 20000u);
  // Not vacuous: the new forms are tighter than today's in most cases, often by more than half.
  EXPECT_GT(tighter, cases / 2) << tighter << " of " << cases;
  EXPECT_GT(far_below_norm, cases / 20) << far_below_norm << " of " << cases;
  EXPECT_GT(split_won, 0u);
}

// Form (3) is second order in the drift: for a small drift orthogonal to w the bound's log-odds
// grow like ε², where forms (1) and (2) grow like ε.
TEST(GateTest, SplitFormIsSecondOrderInDriftOrthogonalToW) {
  HeadGate hg;
  const uint32_t D = 4;
  hg.q_a = {1.f, 0.f, 0.f, 0.f};
  hg.log_delta_a = std::log(0.1);
  hg.delta_a = 0.1;
  hg.k_max = 10.f;
  hg.key_radius = 10.f;
  hg.split_dir = {1.f, 0.f, 0.f, 0.f};
  hg.dropped_radius = 1.f;
  const double lo = LogOdds(std::log(0.1));
  for (double e : {1e-3, 1e-2, 1e-1}) {
    const float qt[D] = {1.f, float(e * 2.0), 0.f, 0.f};  // ‖Δ‖ = e (√d = 2), Δ·w = 0
    double norm = 0;
    const double b = hg.Bound(qt, &norm);
    const double lam = std::log(b / (1 - b)) - lo;
    EXPECT_NEAR(lam, LogCosh(e), 1e-5 + 1e-3 * e * e) << e;
    EXPECT_NEAR(std::log(norm / (1 - norm)) - lo, 2 * e * 10, 1e-6);
  }
}

// AnchorKeyStats against the straightforward computation (one row, one head, one sum at a time, in
// double: the formulas of gate.h written out): the same bits for split_dir; radii never below the
// exact ones and at most 1e-4 relative above (float sums with their error added, where the CPU has
// AVX2); fp16 and fp32 keys, partial last blocks, token counts not a multiple of 4, kept sets of
// every kind (all kept: zero bounds; none kept: no split form); log δ the bits of LogDeltaOf.
struct Stats {
  float key_radius = 0;
  std::vector<float> split_dir, dropped_radius;
};
Stats NaiveAnchorKeyStats(const GroupScores& s, const std::vector<float>& keys, uint32_t D,
                          uint32_t B, const std::vector<uint64_t>& blocks) {
  const uint32_t g = s.group;
  const uint64_t T = keys.size() / D;
  auto up = [](double x) {
    const float f = static_cast<float>(x);
    return double(f) >= x ? f : std::nextafter(f, INFINITY);
  };
  std::vector<uint8_t> kept(T, 0);
  for (uint64_t b : blocks)
    for (uint64_t j = b * B; j < std::min<uint64_t>(T, (b + 1) * B); ++j) kept[j] = 1;
  Stats out;
  std::vector<double> mu(D, 0.0);
  for (uint64_t j = 0; j < T; ++j)
    for (uint32_t i = 0; i < D; ++i) mu[i] += keys[j * D + i];
  for (uint32_t i = 0; i < D; ++i) mu[i] /= double(T);
  double r2 = 0;
  for (uint64_t j = 0; j < T; ++j) {
    double ss = 0;
    for (uint32_t i = 0; i < D; ++i)
      ss += (double(keys[j * D + i]) - mu[i]) * (double(keys[j * D + i]) - mu[i]);
    r2 = std::max(r2, ss);
  }
  out.key_radius = up(std::sqrt(r2));
  out.split_dir.assign(size_t{g} * D, 0.f);
  out.dropped_radius.assign(g, 0.f);
  for (uint32_t h = 0; h < g; ++h) {
    const float* lg = &s.logits[size_t{h} * T];
    double top_d = -INFINITY, top_k = -INFINITY;
    for (uint64_t j = 0; j < T; ++j)
      (kept[j] ? top_k : top_d) = std::max(kept[j] ? top_k : top_d, double(lg[j]));
    if (top_d == -INFINITY) continue;
    if (top_k == -INFINITY) return {out.key_radius, {}, {}};
    std::vector<double> md(D, 0.0), mk(D, 0.0);
    double wd = 0, wk = 0;
    for (uint64_t j = 0; j < T; ++j) {
      const double w = std::exp(double(lg[j]) - (kept[j] ? top_k : top_d));
      (kept[j] ? wk : wd) += w;
      for (uint32_t i = 0; i < D; ++i) (kept[j] ? mk : md)[i] += w * keys[j * D + i];
    }
    for (uint32_t i = 0; i < D; ++i)
      out.split_dir[size_t{h} * D + i] = static_cast<float>(md[i] / wd - mk[i] / wk);
    double rd = 0;
    for (uint64_t j = 0; j < T; ++j) {
      if (kept[j]) continue;
      double ss = 0;
      for (uint32_t i = 0; i < D; ++i)
        ss += (double(keys[j * D + i]) - md[i] / wd) * (double(keys[j * D + i]) - md[i] / wd);
      rd = std::max(rd, ss);
    }
    out.dropped_radius[h] = up(std::sqrt(rd));
  }
  return out;
}

TEST(GateTest, AnchorKeyStatsAreTheStraightforwardSums) {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> n(0.f, 1.f);
  std::uniform_real_distribution<double> u(0, 1);
  int cases = 0, split_cases = 0;
  for (int problem = 0; problem < 48; ++problem) {
    const uint32_t B = problem % 3 == 0 ? 16 : 8, D = problem % 2 ? 64 : 32;
    const uint32_t g = problem % 4 == 0 ? 1 : 4;
    const uint64_t T = 2 + problem * 37 % 301;
    const DType dt = problem % 5 == 0 ? DType::kF32 : DType::kF16;
    const uint64_t nb = (T + B - 1) / B;
    // The keys as stored (blocks of dtype) and as floats (what they decode to).
    std::vector<uint16_t> half(nb * B * D, 0);
    std::vector<float> full(nb * B * D, 0.f), keys(T * D);
    for (uint64_t j = 0; j < T; ++j)
      for (uint32_t i = 0; i < D; ++i) {
        // An outlier at the end in a third of the problems: the largest radius in the last row.
        const float big = problem % 3 == 1 && j == T - 1 ? 8.f : 1.f;
        const float x = big * (n(rng) * (1.f + float(problem % 7)) + (i % 5 == 0 ? 3.f : 0.f));
        half[j * D + i] = FloatToHalf(x);
        keys[j * D + i] = dt == DType::kF16 ? HalfToFloat(half[j * D + i]) : x;
        full[j * D + i] = keys[j * D + i];
      }
    std::vector<const void*> kp(nb);
    for (uint64_t b = 0; b < nb; ++b)
      kp[b] = dt == DType::kF16 ? static_cast<const void*>(&half[b * B * D])
                                : static_cast<const void*>(&full[b * B * D]);
    const attn::HeadKV kv{kp.data(), kp.data(), static_cast<uint32_t>(nb), T, B, D, dt};
    std::vector<float> q(size_t{g} * D);
    for (auto& x : q) x = n(rng) * 0.5f;
    const GroupScores s = ScoreGroup(q.data(), g, kv);
    std::vector<uint64_t> kept;
    const int kind = problem % 6;
    for (uint64_t b = 0; b < nb; ++b)
      if (kind == 0 || (kind != 1 && (b == nb - 1 || u(rng) < 0.4))) kept.push_back(b);
    Selection sel;
    AnchorKeyStats(s, kv, kept, &sel);
    const Stats want = NaiveAnchorKeyStats(s, keys, D, B, kept);
    auto bounds = [&](float got, float exact, const char* what) {
      ASSERT_GE(got, exact) << what << ", problem " << problem;
      ASSERT_LE(got, exact * (1 + 1e-4f)) << what << ", problem " << problem;
    };
    bounds(sel.key_radius, want.key_radius, "R_mu");
    ASSERT_EQ(sel.split_dir, want.split_dir) << "problem " << problem;
    ASSERT_EQ(sel.log_delta, LogDeltaOf(s, kept)) << "problem " << problem;
    ASSERT_EQ(sel.dropped_radius.size(), want.dropped_radius.size()) << "problem " << problem;
    for (size_t h = 0; h < want.dropped_radius.size(); ++h)
      bounds(sel.dropped_radius[h], want.dropped_radius[h], "R_D");
    EXPECT_GT(sel.key_radius, 0.f);
    ++cases;
    if (!sel.dropped_radius.empty() &&
        *std::max_element(sel.dropped_radius.begin(), sel.dropped_radius.end()) > 0)
      ++split_cases;
  }
  EXPECT_EQ(cases, 48);
  EXPECT_GE(split_cases, 24) << "most problems drop something and keep something";
}

}  // namespace
}  // namespace kvm::sel
