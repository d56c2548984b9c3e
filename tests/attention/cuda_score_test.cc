// CUDA retrieval scoring vs the CPU reference. Exits 77 (ctest: Skipped) without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "attention/cuda.h"
#include "attention/decode.h"
#include "attention/reference.h"
#include "testutil/kv.h"

namespace kvm::attn {
namespace {

class CudaScoreTest : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t>> {};

TEST_P(CudaScoreTest, MatchesReference) {
  const auto [dtype, D, group] = GetParam();
  const uint64_t T = 1000;  // ragged last block
  const uint32_t B = 16;
  testutil::RandomKv kv(T, D, B, dtype, 3);
  const HeadKV v = kv.view();
  const size_t es = DTypeSize(dtype), kbytes = size_t{v.n_blocks} * B * D * es;
  std::vector<uint8_t> kcontig(kbytes);
  for (uint32_t b = 0; b < v.n_blocks; ++b)
    std::memcpy(&kcontig[size_t{b} * B * D * es], v.k_blocks[b], B * D * es);
  std::vector<float> q(group * D), want(group * T), got(group * T);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 37) % 17) / 8.0f - 1.0f;
  for (uint32_t h = 0; h < group; ++h)
    ScoreKeys(&q[h * D], v, 1.0f / std::sqrt(float(D)), &want[h * T]);

  auto dk = cuda::Malloc(kbytes);
  auto dq = cuda::Malloc(q.size() * 4);
  auto ds = cuda::Malloc(got.size() * 4);
  ASSERT_TRUE(dk.ok() && dq.ok() && ds.ok());
  ASSERT_TRUE(cuda::CopyToDevice(*dk, kcontig.data(), kbytes).ok());
  ASSERT_TRUE(cuda::CopyToDevice(*dq, q.data(), q.size() * 4).ok());
  cuda::ScoreParams p;
  p.k = *dk;
  p.q = static_cast<const float*>(*dq);
  p.scores = static_cast<float*>(*ds);
  p.tokens = T;
  p.block_size = B;
  p.head_dim = D;
  p.group = group;
  p.dtype = dtype;
  ASSERT_TRUE(cuda::ScoreKeys(p).ok());
  ASSERT_TRUE(cuda::Synchronize().ok());
  ASSERT_TRUE(cuda::CopyToHost(got.data(), *ds, got.size() * 4).ok());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 1e-4f * (1.0f + std::fabs(want[i]))) << i;
  p.head_dim = 48;
  EXPECT_TRUE(cuda::ScoreKeys(p).IsInvalidArgument());
  (void)cuda::Free(*dk);
  (void)cuda::Free(*dq);
  (void)cuda::Free(*ds);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaScoreTest,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                       ::testing::Values(32u, 64u, 128u, 256u), ::testing::Values(1u, 4u)));

// GPU retrieval: the top blocks by group-aggregated mass equal the CPU oracle's choice.
TEST(CudaRetrieveTest, TopBlocksMatchCpuAggregation) {
  const uint32_t D = 128, B = 16, g = 4;
  const uint64_t T = 3000;
  testutil::RandomKv kv(T, D, B, DType::kF16, 9);
  const HeadKV v = kv.view();
  const size_t bb = size_t{B} * D * 2;
  std::vector<uint8_t> kc(size_t{v.n_blocks} * bb);
  for (uint32_t b = 0; b < v.n_blocks; ++b) std::memcpy(&kc[b * bb], v.k_blocks[b], bb);
  std::vector<float> q(g * D);
  for (size_t i = 0; i < q.size(); ++i) q[i] = float((i * 13) % 11) / 4.0f - 1.0f;
  // CPU: per-head softmax, block aggregation, top 20.
  std::vector<double> agg(v.n_blocks, 0.0);
  std::vector<float> s(T);
  for (uint32_t h = 0; h < g; ++h) {
    ScoreKeys(&q[h * D], v, 1.0f / std::sqrt(float(D)), s.data());
    Softmax(s.data(), T, s.data());
    for (uint64_t t = 0; t < T; ++t) agg[t / B] += s[t];
  }
  std::vector<float> aggf(agg.begin(), agg.end());
  auto want32 = TopK(aggf.data(), aggf.size(), 20);
  std::vector<uint64_t> want(want32.begin(), want32.end());
  std::sort(want.begin(), want.end());
  void* dk = *cuda::Malloc(kc.size());
  void* dq = *cuda::Malloc(q.size() * 4);
  ASSERT_TRUE(cuda::CopyToDevice(dk, kc.data(), kc.size()).ok());
  ASSERT_TRUE(cuda::CopyToDevice(dq, q.data(), q.size() * 4).ok());
  const size_t wsb = cuda::RetrieveWorkspaceBytes(T, B, g);
  void* ws = *cuda::Malloc(wsb);
  cuda::ScoreParams p;
  p.k = dk;
  p.q = static_cast<const float*>(dq);
  p.tokens = T;
  p.block_size = B;
  p.head_dim = D;
  p.group = g;
  std::vector<float> mass;
  auto got = cuda::RetrieveTopBlocks(p, ws, wsb, 20, &mass);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(*got, want);
  for (size_t b = 0; b < mass.size(); ++b) ASSERT_NEAR(mass[b], agg[b], 1e-4) << b;
  (void)cuda::Free(dk);
  (void)cuda::Free(dq);
  (void)cuda::Free(ws);
}

// CUDA decode (dense block table, ragged last block, optional mask) against the CPU decode path.
class CudaDecodeTest
    : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t, uint32_t>> {};

TEST_P(CudaDecodeTest, MatchesCpu) {
  const auto [dtype, D, g, B] = GetParam();
  const uint32_t hkv = 2;
  const uint64_t T = 1000;
  std::vector<testutil::RandomKv> heads;
  for (uint32_t h = 0; h < hkv; ++h) heads.emplace_back(T, D, B, dtype, 5 + h);
  const uint32_t nb = static_cast<uint32_t>((T + B - 1) / B);
  const size_t bb = size_t{B} * D * DTypeSize(dtype);
  std::vector<float> q(size_t{hkv} * g * D), want(q.size()), got(q.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = float((i * 37) % 17) / 8.0f - 1.0f;
  // Host tables (CPU reference run) and device copies of every block.
  std::vector<const void*> hk, hv, dk, dv;
  std::vector<uint16_t> rows;
  std::vector<uint32_t> n(hkv, nb);
  std::vector<void*> allocs;
  auto dev = [&](const void* src, size_t bytes) {
    void* d = *cuda::Malloc(bytes);
    EXPECT_TRUE(cuda::CopyToDevice(d, src, bytes).ok());
    allocs.push_back(d);
    return d;
  };
  for (uint32_t h = 0; h < hkv; ++h) {
    const HeadKV v = heads[h].view();
    for (uint32_t b = 0; b < nb; ++b) {
      hk.push_back(v.k_blocks[b]);
      hv.push_back(v.v_blocks[b]);
      dk.push_back(dev(v.k_blocks[b], bb));
      dv.push_back(dev(v.v_blocks[b], bb));
      rows.push_back(static_cast<uint16_t>(std::min<uint64_t>(B, T - uint64_t{b} * B)));
    }
  }
  std::vector<uint8_t> mask(size_t{hkv} * nb * B);
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = (i % 5) != 1;
  for (int masked = 0; masked < 2; ++masked) {
    DecodeParams p;
    p.q = q.data();
    p.out = want.data();
    p.kv_heads = hkv;
    p.group = g;
    p.head_dim = D;
    p.block_size = B;
    p.dtype = dtype;
    p.k_blocks = hk.data();
    p.v_blocks = hv.data();
    p.n_blocks = n.data();
    p.max_blocks = nb;
    p.rows = rows.data();
    p.mask = masked ? mask.data() : nullptr;
    ASSERT_TRUE(DecodeCpu(p).ok());
    DecodeParams d = p;
    d.q = static_cast<const float*>(dev(q.data(), q.size() * 4));
    d.out = static_cast<float*>(dev(got.data(), got.size() * 4));
    d.k_blocks = static_cast<const void* const*>(dev(dk.data(), dk.size() * sizeof(void*)));
    d.v_blocks = static_cast<const void* const*>(dev(dv.data(), dv.size() * sizeof(void*)));
    d.n_blocks = static_cast<const uint32_t*>(dev(n.data(), n.size() * 4));
    d.rows = static_cast<const uint16_t*>(dev(rows.data(), rows.size() * 2));
    d.mask = masked ? static_cast<const uint8_t*>(dev(mask.data(), mask.size())) : nullptr;
    const uint32_t splits = cuda::DecodeSplits(hkv, nb);
    const size_t wsb = cuda::DecodeWorkspaceBytes(hkv, g, D, splits);
    void* ws = dev(std::vector<uint8_t>(wsb).data(), wsb);
    ASSERT_TRUE(cuda::Decode(d, splits, ws, wsb).ok());
    ASSERT_TRUE(cuda::Synchronize().ok());
    ASSERT_TRUE(cuda::CopyToHost(got.data(), d.out, got.size() * 4).ok());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-4f + 1e-4f * std::fabs(want[i])) << i;
  }
  for (void* a : allocs) (void)cuda::Free(a);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaDecodeTest,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                       ::testing::Values(32u, 64u, 128u, 256u), ::testing::Values(1u, 4u, 8u),
                       ::testing::Values(1u, 16u, 32u)));

}  // namespace
}  // namespace kvm::attn

int main(int argc, char** argv) {
  kvm::Status s = kvm::attn::CudaAvailable();
  if (!s.ok()) {
    std::printf("skipped: %s\n", s.ToString().c_str());
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
