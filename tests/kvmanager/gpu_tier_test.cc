// The GPU tier's bookkeeping (lazy uploads of appended keys, pending rows, truncate, eviction,
// refusal when full, fetch errors) on two devices: a host-memory double whose "kernel" is the CPU
// reference scoring (runs everywhere), and the CUDA device (skipped without one). Both must give
// the reference logits of the stored keys + pending rows.
#include "kvmanager/gpu_tier.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "attention/reference.h"
#include "proto/half.h"
#include "testutil/host_device.h"

namespace kvm::store {
namespace {

constexpr uint32_t kB = 16, kD = 64, kG = 4;
const KeyLayout kLayout{kB, kD, DType::kF16};

// The stored keys of one (sequence, layer, KV head) as fp16 rows, and the tier's Fetch over them.
struct Keys {
  std::vector<uint16_t> rows;  // [tokens][kD]
  uint64_t fetched_blocks = 0;
  Status fail = Status::Ok();
  uint64_t tokens() const { return rows.size() / kD; }
  void Append(uint64_t n, std::mt19937& rng) {
    std::normal_distribution<float> d(0.f, 1.f);
    for (uint64_t i = 0; i < n * kD; ++i) rows.push_back(FloatToHalf(d(rng)));
  }
  GpuTier::Fetch fetch() {
    return [this](uint64_t first, uint64_t n, std::span<uint8_t> out) -> Status {
      if (!fail.ok()) return fail;
      EXPECT_EQ(out.size(), n * kLayout.block_bytes());
      std::memset(out.data(), 0, out.size());
      const uint64_t t0 = first * kB, t1 = std::min(tokens(), (first + n) * kB);
      if (t1 > t0) std::memcpy(out.data(), &rows[t0 * kD], (t1 - t0) * kD * 2);
      fetched_blocks += n;
      return Status::Ok();
    };
  }
};

std::vector<float> Queries(std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> q(kG * kD);
  for (float& x : q) x = d(rng);
  return q;
}

// Reference logits over rows[0, stored) + pending.
std::vector<float> Reference(const Keys& k, uint64_t stored, const std::vector<uint16_t>& pending,
                             const std::vector<float>& q) {
  std::vector<uint16_t> all(k.rows.begin(), k.rows.begin() + stored * kD);
  all.insert(all.end(), pending.begin(), pending.end());
  const uint64_t T = all.size() / kD, nb = (T + kB - 1) / kB;
  all.resize(nb * kB * kD, 0);
  std::vector<const void*> ptr(nb);
  for (uint64_t b = 0; b < nb; ++b) ptr[b] = &all[b * kB * kD];
  const attn::HeadKV kv{ptr.data(), ptr.data(), static_cast<uint32_t>(nb), T, kB, kD, DType::kF16};
  std::vector<float> out(kG * T);
  attn::ScoreKeysGroup(q.data(), kG, kv, 1.0f / std::sqrt(float(kD)), out.data());
  return out;
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 1e-4f * (1.0f + std::fabs(want[i]))) << i;
}

class GpuTierTest : public ::testing::TestWithParam<bool> {  // true: CUDA
 protected:
  // The tier in *out. Only the CUDA case may be skipped (no device); the host double must open,
  // or the test fails.
  void Open(uint64_t capacity, std::unique_ptr<GpuTier>* out) {
    std::unique_ptr<Device> dev;
    if (!GetParam()) dev = std::make_unique<testutil::HostDevice>();
    auto t = GpuTier::Open(GpuTierOptions{capacity}, std::move(dev));
    if (t.ok()) {
      *out = std::move(*t);
      return;
    }
    if (GetParam() && !attn::CudaAvailable().ok()) GTEST_SKIP() << "no CUDA device";
    FAIL() << "the GPU tier did not open: " << t.status().ToString();
  }
  // Scores and returns the logits (empty on error, *st set).
  std::vector<float> Score(GpuTier& t, uint64_t seq, Keys& k, uint64_t stored,
                           const std::vector<uint16_t>& pending, const std::vector<float>& q,
                           Status* st = nullptr) {
    const uint64_t T = stored + pending.size() / kD;
    std::vector<float> out(kG * T);
    const Status s = t.Score(seq, 1, 2, kLayout, stored,
                             {reinterpret_cast<const uint8_t*>(pending.data()), pending.size() * 2},
                             q.data(), kG, out.data(), k.fetch());
    if (st) *st = s;
    if (!s.ok()) return {};
    return out;
  }
};

TEST_P(GpuTierTest, UploadsOnlyWhatWasAppendedAndScoresLikeTheReference) {
  std::unique_ptr<GpuTier> tier;
  Open(64 << 20, &tier);
  if (!tier) return;  // skipped (CUDA without a device) or failed
  std::mt19937 rng(1);
  Keys k;
  k.Append(1000, rng);  // ragged last block
  auto q = Queries(rng);
  ExpectNear(Score(*tier, 7, k, 1000, {}, q), Reference(k, 1000, {}, q));
  EXPECT_EQ(k.fetched_blocks, 63u);
  // Three rows appended: only the partial block is fetched again.
  k.Append(3, rng);
  q = Queries(rng);
  ExpectNear(Score(*tier, 7, k, 1003, {}, q), Reference(k, 1003, {}, q));
  EXPECT_EQ(k.fetched_blocks, 64u);
  // Nothing new: no fetch.
  ExpectNear(Score(*tier, 7, k, 1003, {}, q), Reference(k, 1003, {}, q));
  EXPECT_EQ(k.fetched_blocks, 64u);
  // Pending rows (not stored yet) are scored after the stored ones, for this call only.
  Keys extra;
  extra.Append(20, rng);
  ExpectNear(Score(*tier, 7, k, 1003, extra.rows, q), Reference(k, 1003, extra.rows, q));
  k.Append(5, rng);  // the stored rows differ from the pending ones: they must be re-fetched
  ExpectNear(Score(*tier, 7, k, 1008, {}, q), Reference(k, 1008, {}, q));
  // Pending rows over positions the device already holds stored rows of: those come back after.
  Keys other;
  other.Append(8, rng);
  ExpectNear(Score(*tier, 7, k, 1000, other.rows, q), Reference(k, 1000, other.rows, q));
  ExpectNear(Score(*tier, 7, k, 1008, {}, q), Reference(k, 1008, {}, q));
  const GpuTierStats s = tier->Stats();
  EXPECT_EQ(s.scored, 7u);
  EXPECT_EQ(s.buffers, 1u);
  EXPECT_EQ(s.refused, 0u);
}

TEST_P(GpuTierTest, TruncateMakesTheRewrittenRowsComeBack) {
  std::unique_ptr<GpuTier> tier;
  Open(64 << 20, &tier);
  if (!tier) return;  // skipped (CUDA without a device) or failed
  std::mt19937 rng(2);
  Keys k;
  k.Append(500, rng);
  auto q = Queries(rng);
  ExpectNear(Score(*tier, 3, k, 500, {}, q), Reference(k, 500, {}, q));
  k.rows.resize(200 * kD);  // the store rolls back to 200 tokens, then other rows are appended
  tier->Truncate(3, 200);
  k.Append(300, rng);
  ExpectNear(Score(*tier, 3, k, 500, {}, q), Reference(k, 500, {}, q));
}

TEST_P(GpuTierTest, FullTierEvictsTheLeastRecentlyScoredAndRefusesWhatCannotFit) {
  const uint64_t per_seq = 64 * kLayout.block_bytes();  // 1024 tokens
  const uint64_t scratch = (kG * kD + kG * 1024) * sizeof(float);
  std::unique_ptr<GpuTier> tier;
  Open(per_seq + per_seq / 2 + scratch, &tier);
  if (!tier) return;  // skipped (CUDA without a device) or failed
  std::mt19937 rng(3);
  Keys a, b;
  a.Append(1024, rng);
  b.Append(1024, rng);
  auto q = Queries(rng);
  ExpectNear(Score(*tier, 1, a, 1024, {}, q), Reference(a, 1024, {}, q));
  ExpectNear(Score(*tier, 2, b, 1024, {}, q), Reference(b, 1024, {}, q));  // evicts a
  EXPECT_EQ(tier->Stats().evictions, 1u);
  EXPECT_EQ(tier->Stats().buffers, 1u);
  ExpectNear(Score(*tier, 1, a, 1024, {}, q), Reference(a, 1024, {}, q));  // back, evicts b
  EXPECT_EQ(a.fetched_blocks, 128u);
  // A sequence larger than the whole tier is refused (the caller scores on the CPU).
  Keys big;
  big.Append(2048, rng);
  Status st;
  EXPECT_TRUE(Score(*tier, 9, big, 2048, {}, q, &st).empty());
  EXPECT_TRUE(st.IsUnavailable()) << st.ToString();
  EXPECT_EQ(tier->Stats().refused, 1u);
  EXPECT_EQ(tier->Stats().evictions, 2u);  // nothing evicted for what could never fit
  EXPECT_EQ(tier->Stats().buffers, 1u);
  EXPECT_LE(tier->Stats().used_bytes, tier->Stats().capacity_bytes);
  // Dropping frees the buffers; only the scratch stays.
  tier->Drop(1);
  tier->Drop(2);
  EXPECT_EQ(tier->Stats().buffers, 0u);
  EXPECT_EQ(tier->Stats().used_bytes, scratch);
}

TEST_P(GpuTierTest, AFailingFetchIsReportedAndTheNextCallRecovers) {
  std::unique_ptr<GpuTier> tier;
  Open(64 << 20, &tier);
  if (!tier) return;  // skipped (CUDA without a device) or failed
  std::mt19937 rng(4);
  Keys k;
  k.Append(300, rng);
  auto q = Queries(rng);
  k.fail = Status::Corruption("checksum mismatch");
  Status st;
  EXPECT_TRUE(Score(*tier, 5, k, 300, {}, q, &st).empty());
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(tier->Stats().last_error.find("checksum"), std::string::npos);
  k.fail = Status::Ok();
  ExpectNear(Score(*tier, 5, k, 300, {}, q), Reference(k, 300, {}, q));
}

INSTANTIATE_TEST_SUITE_P(Devices, GpuTierTest, ::testing::Values(false, true),
                         [](const auto& i) { return i.param ? "Cuda" : "HostDouble"; });

TEST(GpuTierOpenTest, WithoutADeviceTheTierIsAbsentAndSaysWhy) {
  auto t = GpuTier::Open(GpuTierOptions{});
  if (t.ok()) GTEST_SKIP() << "a CUDA device is present";
  EXPECT_TRUE(t.status().IsUnavailable() || t.status().IsUnimplemented()) << t.status().ToString();
  EXPECT_NE(t.status().message().find("CUDA"), std::string::npos) << t.status().ToString();
}

}  // namespace
}  // namespace kvm::store
