// The baselines on structured synthetic keys (fixed seeds).
#include "selector/baselines.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "selector/layer_map.h"
#include "selector/registry.h"
#include "selector/scoring.h"
#include "testutil/synthetic.h"

namespace kvm::sel {
namespace {

constexpr uint32_t kG = 4, kD = 32;
ModelShape Shape(uint32_t layers = 4) { return ModelShape{layers, kG * 2, 2, kD, DType::kF32, 0}; }

SelectorOptions Opts(uint32_t B = 16, uint64_t budget = 384, uint32_t layers = 4) {
  SelectorOptions o;
  o.geometry = Geometry{B, 16, 64};
  o.budget_tokens = budget;
  o.hshare.channels.assign(size_t{layers} * kG * 2, {0, 1, 2, 3});
  return o;
}

// Mean δ over the group of a block set.
double GroupMeanDelta(const GroupScores& s, const std::vector<uint64_t>& blocks) {
  const auto d = DeltaOf(s, blocks);
  double m = 0;
  for (double x : d) m += x / d.size();
  return m;
}

TEST(QuestTest, PageBoundIsAtLeastEveryDotInThePage) {
  testutil::SyntheticGroup seq(kG, kD, 16, 1);
  seq.Append(500);
  const attn::HeadKV kv = seq.view();
  const float* q = seq.NextQueries();
  std::vector<float> k(kD);
  const float scale = 1.0f / std::sqrt(float(kD));
  for (uint64_t t = 0; t < kv.tokens; ++t) {
    attn::LoadRow(kv, t, false, k.data());
    for (uint32_t h = 0; h < kG; ++h) {
      float dot = 0;
      for (uint32_t c = 0; c < kD; ++c) dot += q[h * kD + c] * k[c];
      ASSERT_GE(QuestSelector::PageBound(q + h * kD, seq.summaries(), t / 16, kD, scale) + 1e-5f,
                dot * scale)
          << t;
    }
  }
}

TEST(QuestTest, DenseLayersAndOneRetrievalPerHeadPerStep) {
  auto s = QuestSelector::Make(Opts(), Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 2);
  seq.Append(1500);
  const attn::HeadKV kv = seq.view();
  const float* q = seq.NextQueries();
  for (uint32_t layer : {0u, 1u, 2u}) {
    StepInput in{seq.tokens() - 1, layer, 0, q, &kv, &seq.summaries()};
    Selection out;
    ASSERT_TRUE((*s)->Select(in, &out).ok());
    if (layer < 2) {
      EXPECT_EQ(out.blocks.size(), (kv.tokens + 15) / 16);
      EXPECT_EQ(out.retrieved_heads, 0u);
    } else {
      EXPECT_EQ(out.blocks.size(), 24u);
      EXPECT_EQ(out.retrieved_heads, kG);
      EXPECT_EQ(out.kind, DeltaKind::kUnknown);
    }
  }
}

TEST(StreamingTest, KeepsExactlySinksAndWindow) {
  auto s = StreamingSelector::Make(Opts(16, 384), Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 16, 3);
  seq.Append(1000);
  for (int i = 0; i < 40; ++i) {
    seq.Append(1);
    const attn::HeadKV kv = seq.view();
    StepInput in{seq.tokens() - 1, 2, 1, seq.NextQueries(), &kv, &seq.summaries()};
    Selection out;
    ASSERT_TRUE((*s)->Select(in, &out).ok());
    const uint64_t nb = (seq.tokens() + 15) / 16;
    std::vector<uint64_t> want = {0};
    for (uint64_t b = nb - 23; b < nb; ++b) want.push_back(b);
    ASSERT_EQ(out.blocks, want);
    ASSERT_EQ(out.retrieved_heads, 0u);
  }
}

TEST(H2oTest, NeverReadmitsAnEvictedBlockAndKeepsTheRecentOnes) {
  auto s = H2oSelector::Make(Opts(4, 128), Shape(), 4096);
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 4, 4);
  seq.Append(100);
  std::vector<uint8_t> ever_evicted(4096, 0);
  uint64_t evictions = 0;
  for (int i = 0; i < 300; ++i) {
    seq.Append(1);
    const attn::HeadKV kv = seq.view();
    const float* q = seq.NextQueries();
    StepInput in{seq.tokens() - 1, 0, 0, q, &kv, &seq.summaries()};
    Selection out;
    ASSERT_TRUE((*s)->Select(in, &out).ok());
    ASSERT_LE(out.blocks.size(), 32u);
    for (uint64_t b : out.blocks) ASSERT_FALSE(ever_evicted[b]) << "block " << b << " came back";
    const uint64_t nb = (seq.tokens() + 3) / 4;
    if (nb > 32) {
      for (uint64_t b = nb - 16; b < nb; ++b)
        ASSERT_TRUE(std::binary_search(out.blocks.begin(), out.blocks.end(), b));
    }
    for (uint64_t b = 0; b < nb; ++b)
      if ((*s)->Evicted(0, 0, b) && !ever_evicted[b]) ever_evicted[b] = 1, ++evictions;
    // The attention over the kept blocks, as a worker would report it.
    const GroupScores gs = ScoreGroup(q, kG, kv);
    std::vector<double> mass;
    double kept = 0;
    for (uint64_t b : out.blocks) kept += gs.agg[b];
    for (uint64_t b : out.blocks) mass.push_back(gs.agg[b] / kept);
    ASSERT_TRUE((*s)->Observe(0, 0, out.blocks, mass).ok());
  }
  EXPECT_GT(evictions, 50u);
  EXPECT_TRUE((*s)->Observe(0, 0, {1, 2}, {0.5}).IsInvalidArgument());
}

// H2O accumulates the attention of every query, the prefill's included (selectors.md §4.4, its
// hh_score): the first eviction right after a prefill keeps the blocks the prefill attended most
// (the heavy hitters), not the earliest ones, and later steps never bring an evicted one back.
TEST(H2oTest, PrefillHeavyHittersSurviveTheFirstEviction) {
  auto s = H2oSelector::Make(Opts(4, 128), Shape(), 4096);  // 32 blocks: 16 recent, 16 heavy
  ASSERT_TRUE(s.ok());
  testutil::SyntheticGroup seq(kG, kD, 4, 11);
  const uint64_t prefill = 400;
  std::vector<double> acc;  // the accumulated attention per block, computed here
  for (uint64_t p = 0; p < prefill; ++p) {
    seq.Append(1);
    const float* q = seq.NextQueries();
    const attn::HeadKV kv = seq.view();
    const GroupScores gs = ScoreGroup(q, kG, kv);
    std::vector<uint64_t> all(gs.blocks());
    for (uint64_t b = 0; b < all.size(); ++b) all[b] = b;
    ASSERT_TRUE((*s)->Observe(0, 0, all, gs.agg).ok());
    acc.resize(all.size(), 0.0);
    for (uint64_t b = 0; b < all.size(); ++b) acc[b] += gs.agg[b];
  }
  seq.Append(1);
  const attn::HeadKV kv = seq.view();
  StepInput in{seq.tokens() - 1, 0, 0, seq.NextQueries(), &kv, &seq.summaries()};
  Selection out;
  ASSERT_TRUE((*s)->Select(in, &out).ok());
  const uint64_t nb = (seq.tokens() + 3) / 4;
  ASSERT_EQ(out.blocks.size(), 32u);
  // The 16 older blocks of highest accumulated attention, ties to the lower index.
  std::vector<uint64_t> old;
  for (uint64_t b = 0; b + 16 < nb; ++b) old.push_back(b);
  std::stable_sort(old.begin(), old.end(), [&](uint64_t a, uint64_t b) { return acc[a] > acc[b]; });
  old.resize(16);
  std::sort(old.begin(), old.end());
  std::vector<uint64_t> earliest(16);
  for (uint64_t b = 0; b < 16; ++b) earliest[b] = b;
  ASSERT_NE(old, earliest);  // the heavy hitters are not simply the first blocks
  for (uint64_t b : old) {
    EXPECT_TRUE(std::binary_search(out.blocks.begin(), out.blocks.end(), b)) << "heavy block " << b;
    EXPECT_FALSE((*s)->Evicted(0, 0, b));
  }
  for (uint64_t b = nb - 16; b < nb; ++b)
    EXPECT_TRUE(std::binary_search(out.blocks.begin(), out.blocks.end(), b)) << "recent " << b;
  // An evicted block is gone for good: attention reported on it is refused.
  uint64_t evicted = 0;
  while (evicted < nb && !(*s)->Evicted(0, 0, evicted)) ++evicted;
  ASSERT_LT(evicted, nb);
  EXPECT_TRUE((*s)->Observe(0, 0, {evicted}, {1.0}).IsInvalidArgument());
}

TEST(HShareTest, SplitAndMapsReproduceAHandComputedExample) {
  uint64_t sink, heavy, local;
  HShareSelector::Split(128, &sink, &heavy, &local);
  EXPECT_EQ(sink, 8u);
  EXPECT_EQ(heavy, 88u);
  EXPECT_EQ(local, 32u);
  // 2 layers, 2 KV heads of 1 query head each (shape Hq 2 Hkv 2), masks of 4 entries per head.
  //   layer 0: head0 = 1100, head1 = 1100 → head 1 follows head 0 (overlap 1)
  //   layer 1: head0 = 1100, head1 = 0011 → head 1 follows head 0 (the only pair, overlap 0)
  //   layers: layer 1 = 11000011 vs layer 0 = 11001100 → overlap 2/4; with 1 shared layer 1 → 0.
  const ModelShape shape{2, 2, 2, 32, DType::kF32, 0};
  std::vector<std::vector<uint8_t>> keep = {{1, 1, 0, 0, 1, 1, 0, 0}, {1, 1, 0, 0, 0, 0, 1, 1}};
  std::vector<std::vector<uint32_t>> heads;
  std::vector<uint32_t> layers;
  ASSERT_TRUE(BuildHShareMaps(keep, shape, 1, 1, &heads, &layers).ok());
  EXPECT_EQ(heads, (std::vector<std::vector<uint32_t>>{{0, 0}, {0, 0}}));
  EXPECT_EQ(layers, (std::vector<uint32_t>{0, 0}));
  ASSERT_TRUE(BuildHShareMaps(keep, shape, 0, 0, &heads, &layers).ok());
  EXPECT_EQ(heads, (std::vector<std::vector<uint32_t>>{{0, 1}, {0, 1}}));
  EXPECT_EQ(layers, (std::vector<uint32_t>{0, 1}));
}

TEST(HShareTest, SharingHappensExactlyAsConfigured) {
  auto o = Opts(16, 512, 2);
  auto s = HShareSelector::Make(o, Shape(2), 4096);
  ASSERT_TRUE(s.ok());
  // Layer 1 shares layer 0; in layer 0, KV head 1 shares KV head 0.
  ASSERT_TRUE((*s)->SetShareMaps({{0, 0}, {0, 1}}, {0, 0}).ok());
  EXPECT_TRUE((*s)->SetShareMaps({{0, 1}, {1, 1}}, {0, 0}).IsInvalidArgument());
  testutil::SyntheticGroup g0(kG, kD, 16, 5), g1(kG, kD, 16, 6);
  g0.Append(2000);
  g1.Append(2000);
  uint64_t retrievals = 0;
  for (int i = 0; i < 8; ++i) {
    g0.Append(1);
    g1.Append(1);
    const attn::HeadKV k0 = g0.view(), k1 = g1.view();
    const float* q0 = g0.NextQueries();
    const float* q1 = g1.NextQueries();
    const uint64_t step = g0.tokens() - 1;
    Selection a, b, c, d;
    ASSERT_TRUE((*s)->Select({step, 0, 0, q0, &k0, &g0.summaries()}, &a).ok());
    ASSERT_TRUE((*s)->Select({step, 0, 1, q1, &k1, &g1.summaries()}, &b).ok());
    ASSERT_TRUE((*s)->Select({step, 1, 0, q0, &k0, &g0.summaries()}, &c).ok());
    ASSERT_TRUE((*s)->Select({step, 1, 1, q1, &k1, &g1.summaries()}, &d).ok());
    EXPECT_EQ(a.retrieved_heads, step % 2 == 0 ? kG : 0u) << step;  // query sharing every 2 steps
    EXPECT_EQ(b.retrieved_heads + c.retrieved_heads + d.retrieved_heads,
              0u);                  // shared: no retrieval
    EXPECT_EQ(b.blocks, a.blocks);  // head 1 uses head 0's set
    EXPECT_EQ(c.blocks, a.blocks);  // layer 1 uses layer 0's
    EXPECT_EQ(d.blocks, a.blocks);
    EXPECT_EQ(a.blocks.size(), 32u);
    retrievals += a.retrieved_heads;
  }
  EXPECT_EQ(retrievals, 4u * kG);
}

// §0.7: for every baseline, the block oracle with the same number of resident blocks and the same
// forced blocks (none for Quest and H2O; sinks + window for StreamingLLM; sink + local for HShare)
// has a group-mean δ no larger than the baseline's.
TEST(BaselinesTest, BlockOracleOfSameSizeNeverWorse) {
  for (const char* name : {"quest", "hshare", "streaming", "h2o"}) {
    for (uint32_t seed = 30; seed < 36; ++seed) {
      auto o = Opts(seed % 2 ? 16 : 8, 320);
      auto s = MakeSelector(name, o, Shape(), 4096);
      ASSERT_TRUE(s.ok()) << name << s.status().ToString();
      testutil::SyntheticGroup seq(kG, kD, o.geometry.block_size, seed, 0.05);
      seq.Append(900);
      for (int i = 0; i < 12; ++i) {
        seq.Append(1);
        const attn::HeadKV kv = seq.view();
        const float* q = seq.NextQueries();
        StepInput in{seq.tokens() - 1, 2, 0, q, &kv, &seq.summaries()};
        Selection out;
        ASSERT_TRUE((*s)->Select(in, &out).ok()) << name;
        const GroupScores gs = ScoreGroup(q, kG, kv);
        std::vector<uint64_t> forced;
        const uint64_t nb = gs.blocks();
        if (std::string(name) == "streaming") forced = out.blocks;
        if (std::string(name) == "hshare") {
          uint64_t sink, heavy, local;
          HShareSelector::Split(o.budget_blocks(), &sink, &heavy, &local);
          AddRange(0, sink, &forced);
          AddRange(nb - local, nb, &forced);
        }
        const auto oracle = OracleBlocks(gs, forced, out.blocks.size());
        ASSERT_LE(GroupMeanDelta(gs, oracle), GroupMeanDelta(gs, out.blocks) + 1e-9)
            << name << " seed " << seed;
        if (std::string(name) == "h2o") {
          std::vector<double> mass;
          for (uint64_t b : out.blocks) mass.push_back(gs.agg[b]);
          ASSERT_TRUE(static_cast<H2oSelector*>(s->get())->Observe(2, 0, out.blocks, mass).ok());
        }
      }
    }
  }
}

TEST(BaselinesTest, BadParametersNameTheField) {
  auto o = Opts();
  o.target_delta = 0.1;
  o.max_resident_tokens = 512;
  auto q = QuestSelector::Make(o, Shape(), 4096);
  ASSERT_FALSE(q.ok());
  EXPECT_NE(q.status().message().find("target_delta"), std::string::npos);
  o = Opts();
  o.hshare.channels.clear();
  auto h = HShareSelector::Make(o, Shape(), 4096);
  EXPECT_NE(h.status().message().find("hshare_channels"), std::string::npos);
  o = Opts();
  o.h2o.recent_frac = 1.5;
  EXPECT_NE(H2oSelector::Make(o, Shape(), 4096).status().message().find("h2o_recent_frac"),
            std::string::npos);
  o = Opts();
  o.hshare.query_share = 0;
  EXPECT_NE(HShareSelector::Make(o, Shape(), 4096).status().message().find("hshare_query_share"),
            std::string::npos);
  o = Opts();
  o.budget_tokens = 0;
  EXPECT_NE(StreamingSelector::Make(o, Shape(), 4096).status().message().find("budget_tokens"),
            std::string::npos);
}

}  // namespace
}  // namespace kvm::sel

namespace kvm::sel {
namespace {
TEST(HShareTest, CalibrationFileRoundTripsAndBadLinesAreNamed) {
  const ModelShape shape{2, 2, 1, 32, DType::kF32, 0};
  HShareCalibrator cal(shape);
  std::vector<float> q(2 * 32, 0.f), k(32, 0.f);
  q[5] = 3.f, q[32 + 7] = 2.f, k[5] = 1.f, k[7] = 1.f, k[9] = 0.5f, q[9] = 1.f;
  cal.Add(0, q.data(), k.data());
  cal.Add(1, q.data(), k.data());
  const auto ch = cal.Channels();
  ASSERT_EQ(ch.size(), 4u);
  EXPECT_EQ(ch[0].size(), 4u);  // max(4, 32/8)
  EXPECT_EQ(ch[0][0], 5u);
  EXPECT_EQ(ch[1][0], 7u);
  const std::string text = FormatHShareChannels(ch, 2);
  auto back = ParseHShareChannels(text, shape);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, ch);
  EXPECT_NE(
      ParseHShareChannels("0 0 1 2\n", shape).status().message().find("no line for layer 0 head 1"),
      std::string::npos);
  EXPECT_NE(ParseHShareChannels("0 0 99\n", shape).status().message().find("line 1"),
            std::string::npos);
  EXPECT_TRUE(ParseHShareChannels("0 x\n", shape).status().IsInvalidArgument());
}
}  // namespace
}  // namespace kvm::sel
