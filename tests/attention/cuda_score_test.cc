// CUDA retrieval scoring vs the CPU reference. Exits 77 (ctest: Skipped) without a device.
#include <gtest/gtest.h>

#include <cstdio>
#include <vector>

#include "attention/cuda.h"
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
  for (uint32_t b = 0; b < v.n_blocks; ++b) std::memcpy(&kcontig[size_t{b} * B * D * es], v.k_blocks[b], B * D * es);
  std::vector<float> q(group * D), want(group * T), got(group * T);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 37) % 17) / 8.0f - 1.0f;
  for (uint32_t h = 0; h < group; ++h) ScoreKeys(&q[h * D], v, 1.0f / std::sqrt(float(D)), &want[h * T]);

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
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-4f * (1.0f + std::fabs(want[i]))) << i;
  p.head_dim = 48;
  EXPECT_TRUE(cuda::ScoreKeys(p).IsInvalidArgument());
  (void)cuda::Free(*dk);
  (void)cuda::Free(*dq);
  (void)cuda::Free(*ds);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaScoreTest,
                         ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                                            ::testing::Values(32u, 64u, 128u, 256u), ::testing::Values(1u, 4u)));

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
