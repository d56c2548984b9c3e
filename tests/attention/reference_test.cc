#include "attention/reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "attention/state.h"
#include "testutil/kv.h"

namespace kvm::attn {
namespace {

using testutil::RandomKv;

TEST(ReferenceTest, ScoresAreScaledDotProducts) {
  RandomKv kv(37, 32, 16, DType::kF32, 1);
  std::vector<float> q(32, 0.f), s(37);
  q[3] = 2.0f;
  ScoreKeys(q.data(), kv.view(), 0.5f, s.data());
  for (int j = 0; j < 37; ++j) EXPECT_FLOAT_EQ(s[j], 0.5f * 2.0f * kv.key(j)[3]);
}

TEST(ReferenceTest, GroupScoresAreThePerHeadScoresForEveryDtype) {
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    RandomKv kv(53, 64, 16, dt, 2);  // a ragged last block
    std::vector<float> q(3 * 64), one(53), group(3 * 53);
    for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(float(i));
    ScoreKeysGroup(q.data(), 3, kv.view(), 0.125f, group.data());
    for (int h = 0; h < 3; ++h) {
      ScoreKeys(&q[h * 64], kv.view(), 0.125f, one.data());
      for (int j = 0; j < 53; ++j) {
        ASSERT_EQ(group[h * 53 + j], one[j]) << DTypeName(dt) << " head " << h << " token " << j;
        double want = 0;  // and close to the exact dot product
        for (int i = 0; i < 64; ++i) want += double(q[h * 64 + i]) * kv.key(j)[i];
        ASSERT_NEAR(one[j], 0.125 * want, 1e-5 * (1 + std::fabs(want)));
      }
    }
  }
}

// The scores in the documented order, written out here: eight partial sums (lane i % 8, a multiply
// then an add, in index order), added pairwise, then scaled — the same bits whichever path
// ScoreKeysGroup takes (AVX2 where the CPU has it, the portable loop elsewhere), for every dtype,
// head size, ragged last block, row count not a multiple of four and group size (the AVX2 path
// takes up to four heads per pass: 6 is a pass of four and one of two).
TEST(ReferenceTest, GroupScoresAreTheDocumentedSumsBitForBit) {
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16})
    for (uint32_t D : {32u, 64u, 128u, 256u})
      for (uint32_t T : {1u, 7u, 53u, 130u})
        for (uint32_t g : {1u, 3u, 4u, 6u}) {
          RandomKv kv(T, D, 16, dt, 3 + D + T);
          std::vector<float> q(size_t{g} * D), got(size_t{g} * T);
          for (size_t i = 0; i < q.size(); ++i) q[i] = std::cos(float(i) * 0.37f) * 1.7f;
          const float scale = 1.0f / std::sqrt(float(D));
          ScoreKeysGroup(q.data(), g, kv.view(), scale, got.data());
          for (uint32_t h = 0; h < g; ++h)
            for (uint32_t j = 0; j < T; ++j) {
              volatile float acc[8] = {};  // volatile: each step rounded to float, as documented
              for (uint32_t i = 0; i < D; i += 8)
                for (uint32_t l = 0; l < 8; ++l) {
                  const float prod = q[h * D + i + l] * kv.key(j)[i + l];
                  acc[l] = acc[l] + prod;
                }
              const float want =
                  ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
              ASSERT_EQ(got[size_t{h} * T + j], want * scale)
                  << DTypeName(dt) << " D " << D << " T " << T << " group " << g << " head " << h
                  << " token " << j;
            }
        }
}

// MaxDistanceBound: never below the exact distance (long double here), within 3e-5 relative of it
// (plus u·||c|| where the distances are tiny next to c), over keys and centres of many scales, row
// lists in any order, head sizes; keys whose squares overflow a float fall back to double sums.
TEST(ReferenceTest, MaxDistanceBoundIsAnUpperBoundWithinItsErrorTerm) {
  std::mt19937_64 rng(5);
  std::normal_distribution<double> n(0, 1);
  for (uint32_t D : {32u, 64u, 128u, 256u})
    for (int trial = 0; trial < 40; ++trial) {
      const uint32_t T = 1 + uint32_t(trial * 13 % 97);
      const double scale = std::pow(10.0, trial % 9 - 4), offset = trial % 3 == 0 ? 50.0 : 0.0;
      std::vector<float> keys(size_t{T} * D);
      std::vector<double> c(D);
      for (uint32_t i = 0; i < D; ++i)
        c[i] = (offset + n(rng) * (trial % 4 == 1 ? 1e-3 : 1)) * scale;
      for (size_t i = 0; i < keys.size(); ++i) keys[i] = float((offset + n(rng)) * scale);
      std::vector<uint32_t> rows;
      for (uint32_t r = 0; r < T; ++r)
        if (trial % 5 || r % 2) rows.insert(rows.begin() + (r % 2 ? 0 : long(rows.size())), r);
      long double exact = 0, cn = 0;
      for (uint32_t i = 0; i < D; ++i) cn += (long double)c[i] * c[i];
      for (uint32_t r : rows) {
        long double ss = 0;
        for (uint32_t i = 0; i < D; ++i) {
          const long double x = (long double)keys[size_t{r} * D + i] - c[i];
          ss += x * x;
        }
        exact = std::max(exact, std::sqrt(ss));
      }
      const double got = MaxDistanceBound(keys.data(), D, rows, c.data());
      ASSERT_GE((long double)got, exact) << "D " << D << " trial " << trial;
      ASSERT_LE((long double)got, exact * (1 + 3e-5L) + 1e-7L * std::sqrt(cn))
          << "D " << D << " trial " << trial;
    }
  EXPECT_EQ(MaxDistanceBound(nullptr, 64, {}, nullptr), 0.0);
  std::vector<float> huge(64, 3e20f);  // (3e20)² overflows a float: the double sums
  std::vector<double> zero(64, 0.0);
  const std::vector<uint32_t> one = {0};
  EXPECT_DOUBLE_EQ(MaxDistanceBound(huge.data(), 64, one, zero.data()),
                   3e20 * 8.0 * (double(3e20f) / 3e20));
}

// MaxDistanceBounds: each center's bound the bits of MaxDistanceBound alone (the upper bound the
// test above checks), for 1 to 7 centers (five at a time, then the rest), one of them far enough
// away that its float sums overflow (the exact sums for it alone), and no rows (all 0).
TEST(ReferenceTest, MaxDistanceBoundsAreEachCentersBound) {
  std::mt19937_64 rng(9);
  std::normal_distribution<double> n(0, 1);
  for (uint32_t D : {32u, 128u, 36u})
    for (uint32_t centers : {1u, 3u, 5u, 7u}) {
      const uint32_t T = 77;
      std::vector<float> keys(size_t{T} * D);
      for (auto& x : keys) x = float(n(rng));
      std::vector<double> c(size_t{centers} * D);
      for (auto& x : c) x = n(rng) * 0.3;
      if (centers > 2)
        for (uint32_t i = 0; i < D; ++i) c[2 * D + i] = 3e20;
      std::vector<uint32_t> rows;
      for (uint32_t r = 0; r < T; r += 1 + r % 3) rows.push_back(r);
      std::vector<double> got(centers, -1.0);
      MaxDistanceBounds(keys.data(), D, rows, c.data(), centers, got.data());
      for (uint32_t k = 0; k < centers; ++k)
        ASSERT_EQ(got[k], MaxDistanceBound(keys.data(), D, rows, &c[size_t{k} * D]))
            << "D " << D << ", centers " << centers << ", center " << k;
      MaxDistanceBounds(keys.data(), D, {}, c.data(), centers, got.data());
      for (double x : got) EXPECT_EQ(x, 0.0);
    }
}

// AddWeightedRows: the bits of the plain loop written out here (row after row in list order, each
// product rounded to double, then added), for head sizes the AVX2 path takes (multiples of 8: 128,
// 40) and does not (36, 6), rows listed out of order and repeated (more than one tile of 32),
// starting sums not zero, 1 to 7 heads (five at a time on AVX2, then the rest), in one call and
// in two.
TEST(ReferenceTest, AddWeightedRowsAreThePlainSumsBitForBit) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> n(0.f, 3.f);
  for (uint32_t D : {128u, 40u, 36u, 6u}) {
    for (uint32_t heads : {1u, 2u, 3u, 4u, 5u, 6u, 7u}) {
      const uint32_t T = 301;
      std::vector<float> keys(size_t{T} * D);
      for (auto& x : keys) x = n(rng);
      std::vector<uint32_t> rows;
      for (uint32_t j = 0; j < 700; ++j) rows.push_back(uint32_t(rng() % T));
      std::vector<double> w(heads * rows.size()), m(size_t{heads} * D), want;
      for (auto& x : w) x = std::exp(double(n(rng)));
      for (auto& x : m) x = double(n(rng)) * 1e3;
      want = m;
      for (size_t r = 0; r < rows.size(); ++r)
        for (uint32_t h = 0; h < heads; ++h)
          for (uint32_t i = 0; i < D; ++i) {
            const double p = w[r * heads + h] * double(keys[size_t{rows[r]} * D + i]);
            want[h * D + i] = want[h * D + i] + p;
          }
      std::vector<double> pieces = m;  // the same rows added in two calls
      AddWeightedRows(keys.data(), D, rows, heads, w.data(), m.data());
      ASSERT_EQ(m, want) << "D " << D << ", heads " << heads;
      const std::span<const uint32_t> all(rows);
      AddWeightedRows(keys.data(), D, all.first(333), heads, w.data(), pieces.data());
      AddWeightedRows(keys.data(), D, all.subspan(333), heads, w.data() + 333 * heads,
                      pieces.data());
      ASSERT_EQ(pieces, want) << "D " << D << ", heads " << heads << ", in two pieces";
    }
  }
}

TEST(ReferenceTest, SoftmaxIsStableAndSumsToOne) {
  std::vector<float> s = {1000.f, 1000.f, -1000.f, 999.f};
  std::vector<float> p(4);
  Softmax(s.data(), 4, p.data());
  EXPECT_NEAR(p[0] + p[1] + p[2] + p[3], 1.0f, 1e-6);
  EXPECT_FLOAT_EQ(p[0], p[1]);
  EXPECT_EQ(p[2], 0.0f);
  EXPECT_NEAR(p[3] / p[0], std::exp(-1.0f), 1e-6);
}

TEST(ReferenceTest, TopKOrdersByValueThenIndex) {
  std::vector<float> s = {0.1f, 0.9f, 0.5f, 0.9f, 0.2f};
  EXPECT_EQ(TopK(s.data(), 5, 3), (std::vector<uint32_t>{1, 3, 2}));
  EXPECT_EQ(TopK(s.data(), 5, 9).size(), 5u);
}

TEST(ReferenceTest, DroppedMassIsOneMinusSelectedMass) {
  std::vector<float> p = {0.5f, 0.25f, 0.25f};
  std::vector<uint8_t> sel = {1, 0, 1};
  EXPECT_NEAR(DroppedMass(p.data(), sel.data(), 3), 0.25, 1e-12);
}

class AttendTest
    : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t, uint64_t>> {};

TEST_P(AttendTest, DenseEqualsBruteForceAndMaskedMatchesSubset) {
  const auto [dtype, D, B, T] = GetParam();
  const uint32_t g = 4;
  RandomKv kv(T, D, B, dtype, 7);
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> q(g * D), out(g * D);
  for (auto& x : q) x = n(rng);
  ASSERT_TRUE(Attend(q.data(), g, kv.view(), {}, out.data()).ok());
  // Brute force in double from the converted rows.
  for (uint32_t h = 0; h < g; ++h) {
    std::vector<double> s(T), o(D, 0.0);
    double mx = -1e300, sum = 0;
    for (uint64_t j = 0; j < T; ++j) {
      double d = 0;
      for (uint32_t i = 0; i < D; ++i) d += double(q[h * D + i]) * kv.key(j)[i];
      s[j] = d / std::sqrt(double(D));
      mx = std::max(mx, s[j]);
    }
    for (uint64_t j = 0; j < T; ++j) {
      const double w = std::exp(s[j] - mx);
      sum += w;
      for (uint32_t i = 0; i < D; ++i) o[i] += w * kv.value(j)[i];
    }
    for (uint32_t i = 0; i < D; ++i) ASSERT_NEAR(out[h * D + i], o[i] / sum, 2e-5) << h << "," << i;
  }
  // Masked attention equals dense attention over a copy holding only the selected tokens.
  std::vector<uint8_t> mask(T);
  for (auto& m : mask) m = rng() % 3 == 0;
  mask[T - 1] = 1;
  std::vector<uint64_t> kept;
  for (uint64_t j = 0; j < T; ++j)
    if (mask[j]) kept.push_back(j);
  RandomKv sub = kv.Subset(kept);
  std::vector<float> a(g * D), b(g * D);
  ASSERT_TRUE(Attend(q.data(), g, kv.view(), mask, a.data()).ok());
  ASSERT_TRUE(Attend(q.data(), g, sub.view(), {}, b.data()).ok());
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(a[i], b[i]) << i;  // same tokens, same order: bit-identical
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttendTest,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                       ::testing::Values(32u, 128u), ::testing::Values(1u, 16u),
                       ::testing::Values(uint64_t{1}, uint64_t{45})));

TEST(MergeStateTest, HalvesMergeIntoTheWhole) {
  RandomKv kv(100, 64, 16, DType::kF16, 11);
  std::vector<float> q(64);
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.f, 2.f);
  for (auto& x : q) x = n(rng);
  std::vector<float> o1(64), o2(64), ow(64);
  float m1, d1, m2, d2, mw, dw;
  PartialState(q.data(), kv.view(), {}, 0, 37, &m1, &d1, o1.data());
  PartialState(q.data(), kv.view(), {}, 37, 100, &m2, &d2, o2.data());
  PartialState(q.data(), kv.view(), {}, 0, 100, &mw, &dw, ow.data());
  MergeState(m1, d1, o1.data(), m2, d2, o2.data(), 64);
  EXPECT_EQ(m1, mw);
  EXPECT_NEAR(d1, dw, 1e-5 * dw);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(o1[i] / d1, ow[i] / dw, 1e-5);
  // An empty state is the identity on both sides.
  float me = -INFINITY, de = 0;
  std::vector<float> oe(64, 0.f);
  MergeState(me, de, oe.data(), mw, dw, ow.data(), 64);
  EXPECT_EQ(me, mw);
  EXPECT_EQ(de, dw);
  MergeState(mw, dw, ow.data(), -INFINITY, 0.f, oe.data(), 64);
  EXPECT_EQ(de, dw);
}

TEST(ReferenceTest, BadInputsAreInvalidArgument) {
  RandomKv kv(10, 32, 4, DType::kF16, 1);
  std::vector<float> q(32, 1.f), out(32);
  std::vector<uint8_t> none(10, 0);
  EXPECT_TRUE(Attend(q.data(), 1, kv.view(), none, out.data()).IsInvalidArgument());
  std::vector<uint8_t> short_mask(9, 1);
  EXPECT_TRUE(Attend(q.data(), 1, kv.view(), short_mask, out.data()).IsInvalidArgument());
  HeadKV v = kv.view();
  v.n_blocks = 2;  // 2 x 4 < 10 tokens
  EXPECT_TRUE(Attend(q.data(), 1, v, {}, out.data()).IsInvalidArgument());
  v = kv.view();
  v.head_dim = 48;
  EXPECT_TRUE(Attend(q.data(), 1, v, {}, out.data()).IsInvalidArgument());
  EXPECT_TRUE(Attend(q.data(), 0, kv.view(), {}, out.data()).IsInvalidArgument());
}

}  // namespace
}  // namespace kvm::attn
