// Fast decode attention (SIMD and portable CPU paths) against the CPU reference, over head dim ×
// group × dtype × block size × context length (ragged last blocks). Tolerance: |fast − ref| ≤
// 2e-5 + 2e-5·|ref| (fp32 accumulation in another order, FMA contraction on the SIMD path).
#include "attention/decode.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "attention/reference.h"
#include "attention/state.h"
#include "testutil/kv.h"

namespace kvm::attn {
namespace {

struct Layer {  // Hkv heads of one layer, each a RandomKv, with the dense block table
  std::vector<testutil::RandomKv> heads;
  std::vector<const void*> kt, vt;
  std::vector<uint32_t> nb;
  std::vector<uint16_t> rows;
  uint32_t max_blocks = 0;
  Layer(uint32_t hkv, uint64_t T, uint32_t D, uint32_t B, DType dt, uint32_t seed) {
    for (uint32_t h = 0; h < hkv; ++h) heads.emplace_back(T, D, B, dt, seed + h);
    max_blocks = static_cast<uint32_t>((T + B - 1) / B);
    for (uint32_t h = 0; h < hkv; ++h) {
      const HeadKV v = heads[h].view();
      for (uint32_t b = 0; b < max_blocks; ++b) {
        kt.push_back(v.k_blocks[b]);
        vt.push_back(v.v_blocks[b]);
        rows.push_back(static_cast<uint16_t>(std::min<uint64_t>(B, T - uint64_t{b} * B)));
      }
      nb.push_back(max_blocks);
    }
  }
  DecodeParams Params(const float* q, float* out, uint32_t g, uint32_t D, uint32_t B,
                      DType dt) const {
    DecodeParams p;
    p.q = q;
    p.out = out;
    p.kv_heads = static_cast<uint32_t>(heads.size());
    p.group = g;
    p.head_dim = D;
    p.block_size = B;
    p.dtype = dt;
    p.k_blocks = kt.data();
    p.v_blocks = vt.data();
    p.n_blocks = nb.data();
    p.max_blocks = max_blocks;
    p.rows = rows.data();
    return p;
  }
};

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 2e-5f + 2e-5f * std::fabs(want[i])) << what << " at " << i;
}

class DecodeTest
    : public ::testing::TestWithParam<std::tuple<uint32_t, uint32_t, DType, uint32_t, uint64_t>> {};

TEST_P(DecodeTest, FastMatchesReferenceDenseSparseAndMasked) {
  const auto [D, g, dt, B, T] = GetParam();
  const uint32_t hkv = 2;
  Layer layer(hkv, T, D, B, dt, 17);
  std::mt19937 rng(D * 31 + g * 7 + B + static_cast<uint32_t>(T));
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> q(size_t{hkv} * g * D);
  for (auto& x : q) x = n(rng);
  std::vector<float> want(q.size()), fast(q.size()), port(q.size());
  for (uint32_t h = 0; h < hkv; ++h)
    ASSERT_TRUE(
        Attend(&q[size_t{h} * g * D], g, layer.heads[h].view(), {}, &want[size_t{h} * g * D]).ok());
  DecodeParams p = layer.Params(q.data(), fast.data(), g, D, B, dt);
  ASSERT_TRUE(DecodeCpu(p).ok());
  ExpectClose(fast, want, "dense fast");
  p.out = port.data();
  ASSERT_TRUE(DecodeCpuPortable(p).ok());
  ExpectClose(port, want, "dense portable");
  p.threads = 2;
  std::vector<float> threaded(q.size());
  p.out = threaded.data();
  ASSERT_TRUE(DecodeCpu(p).ok());
  EXPECT_EQ(threaded, fast);

  // Sparse with every token selected equals dense, bit for bit: the full blocks sit in a hot-set
  // buffer in shuffled slots, the slot list names them in block order, the last block is the
  // window.
  const size_t bb = size_t{B} * D * DTypeSize(dt);
  const uint32_t full = static_cast<uint32_t>(T / B), nblk = layer.max_blocks;
  std::vector<uint32_t> perm(full);
  std::iota(perm.begin(), perm.end(), 0u);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<std::vector<uint8_t>> hk(hkv, std::vector<uint8_t>(std::max<size_t>(1, full) * bb)),
      hv = hk;
  std::vector<const void*> sk(size_t{hkv} * nblk), sv(sk.size());
  std::vector<uint16_t> srows(sk.size());
  std::vector<uint32_t> sn(hkv);
  for (uint32_t h = 0; h < hkv; ++h) {
    const HeadKV v = layer.heads[h].view();
    std::vector<uint32_t> slots(full);
    for (uint32_t b = 0; b < full; ++b) {
      std::memcpy(&hk[h][perm[b] * bb], v.k_blocks[b], bb);
      std::memcpy(&hv[h][perm[b] * bb], v.v_blocks[b], bb);
      slots[b] = perm[b];
    }
    std::vector<const void*> wk, wv;
    std::vector<uint16_t> wr;
    for (uint32_t b = full; b < nblk; ++b) {
      wk.push_back(v.k_blocks[b]);
      wv.push_back(v.v_blocks[b]);
      wr.push_back(static_cast<uint16_t>(T - uint64_t{b} * B));
    }
    ASSERT_TRUE(SparseBlockList(slots, std::max(1u, full), hk[h].data(), hv[h].data(), bb, wk, wv,
                                wr, B, &sk[size_t{h} * nblk], &sv[size_t{h} * nblk],
                                &srows[size_t{h} * nblk], &sn[h])
                    .ok());
    ASSERT_EQ(sn[h], nblk);
  }
  std::vector<float> sparse(q.size());
  DecodeParams sp = p;
  sp.threads = 1;
  sp.out = sparse.data();
  sp.k_blocks = sk.data();
  sp.v_blocks = sv.data();
  sp.rows = srows.data();
  sp.n_blocks = sn.data();
  ASSERT_TRUE(DecodeCpu(sp).ok());
  EXPECT_EQ(sparse, fast);

  // A token mask equals the reference over the same tokens.
  std::vector<uint8_t> mask(size_t{hkv} * nblk * B, 0), tok_mask(T);
  for (uint64_t t = 0; t < T; ++t) tok_mask[t] = (rng() % 3 != 0) || t + 1 == T;
  for (uint32_t h = 0; h < hkv; ++h)
    for (uint64_t t = 0; t < T; ++t) mask[(size_t{h} * nblk + t / B) * B + t % B] = tok_mask[t];
  std::vector<float> masked(q.size()), masked_ref(q.size());
  p.threads = 1;
  p.mask = mask.data();
  p.out = masked.data();
  ASSERT_TRUE(DecodeCpu(p).ok());
  for (uint32_t h = 0; h < hkv; ++h)
    ASSERT_TRUE(Attend(&q[size_t{h} * g * D], g, layer.heads[h].view(), tok_mask,
                       &masked_ref[size_t{h} * g * D])
                    .ok());
  ExpectClose(masked, masked_ref, "masked");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DecodeTest,
    ::testing::Combine(::testing::Values(32u, 64u, 128u, 256u), ::testing::Values(1u, 3u, 8u),
                       ::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                       ::testing::Values(1u, 16u, 32u),
                       ::testing::Values(uint64_t{1}, uint64_t{37}, uint64_t{300})));

// The partial states of two disjoint block lists (one of them empty for a head) merge into the
// dense output: the exact-correction path (a worker's sparse attention merged with the service's
// over the blocks it did not hold).
TEST(DecodeStateTest, PartialStatesOverASplitMergeIntoDenseAttention) {
  const uint32_t Hkv = 2, g = 3, D = 64, B = 16;
  const uint64_t T = 300;  // ragged last block
  for (DType dt : {DType::kF16, DType::kF32}) {
    const Layer l(Hkv, T, D, B, dt, 11);
    std::mt19937 rng(5);
    std::normal_distribution<float> n(0.f, 1.f);
    std::vector<float> q(Hkv * g * D);
    for (auto& x : q) x = 2.f * n(rng);
    std::vector<float> dense(q.size());
    ASSERT_TRUE(DecodeCpu(l.Params(q.data(), dense.data(), g, D, B, dt)).ok());
    // Split: head 0 even blocks vs odd blocks; head 1 everything vs nothing.
    std::vector<const void*> ka, va, kb, vb;
    std::vector<uint16_t> ra, rb;
    std::vector<uint32_t> na(Hkv), nb(Hkv);
    const uint32_t M = l.max_blocks;
    ka.resize(Hkv * M), va.resize(Hkv * M), kb.resize(Hkv * M), vb.resize(Hkv * M);
    ra.resize(Hkv * M), rb.resize(Hkv * M);
    for (uint32_t h = 0; h < Hkv; ++h)
      for (uint32_t b = 0; b < M; ++b) {
        const bool to_a = h == 1 || b % 2 == 0;
        auto& k = to_a ? ka : kb;
        auto& v = to_a ? va : vb;
        auto& r = to_a ? ra : rb;
        auto& cnt = to_a ? na : nb;
        const size_t src = size_t{h} * M + b, dst = size_t{h} * M + cnt[h]++;
        k[dst] = l.kt[src], v[dst] = l.vt[src], r[dst] = l.rows[src];
      }
    std::vector<float> oa(q.size()), ob(q.size()), sa(Hkv * g * 2), sb(Hkv * g * 2);
    auto run = [&](auto& k, auto& v, auto& r, auto& cnt, float* out, float* st) {
      DecodeParams p = l.Params(q.data(), out, g, D, B, dt);
      p.k_blocks = k.data(), p.v_blocks = v.data(), p.rows = r.data(), p.n_blocks = cnt.data();
      p.state = st;
      return DecodeCpu(p);
    };
    ASSERT_TRUE(run(ka, va, ra, na, oa.data(), sa.data()).ok());
    ASSERT_TRUE(run(kb, vb, rb, nb, ob.data(), sb.data()).ok());
    EXPECT_EQ(sb[(1 * g) * 2 + 1], 0.f) << "head 1 lists nothing in b: an empty state";
    EXPECT_EQ(ob[1 * g * D], 0.f);
    // Without a state, a head that lists nothing is still refused.
    EXPECT_TRUE(run(kb, vb, rb, nb, ob.data(), nullptr).IsInvalidArgument());
    ASSERT_TRUE(run(kb, vb, rb, nb, ob.data(), sb.data()).ok());
    for (uint32_t i = 0; i < Hkv * g; ++i) {
      float m = sa[2 * i], d = sa[2 * i + 1];
      std::vector<float> o(D), o2(D);
      for (uint32_t x = 0; x < D; ++x)
        o[x] = oa[i * D + x] * d, o2[x] = ob[i * D + x] * sb[2 * i + 1];
      MergeState(m, d, o.data(), sb[2 * i], sb[2 * i + 1], o2.data(), D);
      for (uint32_t x = 0; x < D; ++x)
        ASSERT_NEAR(o[x] / d, dense[i * D + x], 2e-5f + 2e-5f * std::fabs(dense[i * D + x]))
            << "query head " << i << " dim " << x;
    }
  }
}

TEST(DecodeValidationTest, BadShapesAndIndicesAreInvalidArgument) {
  Layer layer(1, 40, 64, 16, DType::kF16, 1);
  std::vector<float> q(64 * 2), out(64 * 2);
  DecodeParams p = layer.Params(q.data(), out.data(), 2, 64, 16, DType::kF16);
  ASSERT_TRUE(DecodeCpu(p).ok());
  DecodeParams b = p;
  b.head_dim = 48;
  EXPECT_TRUE(DecodeCpu(b).IsInvalidArgument());
  b = p;
  b.group = 9;
  EXPECT_TRUE(DecodeCpu(b).IsInvalidArgument());
  b = p;
  std::vector<uint16_t> rows = layer.rows;
  rows[1] = 17;  // more rows than the block holds
  b.rows = rows.data();
  EXPECT_TRUE(DecodeCpu(b).IsInvalidArgument());
  b = p;
  uint32_t too_many = 4;
  b.n_blocks = &too_many;
  EXPECT_TRUE(DecodeCpu(b).IsInvalidArgument());
  b = p;
  std::vector<uint8_t> none(3 * 16, 0);
  b.mask = none.data();
  EXPECT_TRUE(DecodeCpu(b).IsInvalidArgument());  // attends no token
  // A slot index past the hot set's capacity.
  std::vector<uint8_t> buf(4 * 16 * 64 * 2);
  const void* k[8];
  const void* v[8];
  uint16_t r[8];
  uint32_t n = 0;
  const uint32_t slots[] = {0, 4};
  Status s =
      SparseBlockList(slots, 4, buf.data(), buf.data(), 16 * 64 * 2, {}, {}, {}, 16, k, v, r, &n);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("slot 4 out of range"), std::string::npos);
  std::printf("CPU decode path: %s\n", CpuDecodePath());
}

}  // namespace
}  // namespace kvm::attn
