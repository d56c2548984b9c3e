// The retrieval's exact scoring pass of one (layer, KV head) — q·K of a GQA group over every key,
// then the softmax and block masses the selector uses — on the CPU (what the service does without a
// GPU tier) and on the GPU tier (keys resident on the device: queries up, logits down), side by
// side in one run. Also the first call on the device, which uploads the keys. fp16, D 128, B 16.
//   kvm_gpu_score_bench [--group 4] [--iters 20]
// Prints the CPU side and exits 77 when the GPU tier is absent.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention/reference.h"
#include "kvmanager/gpu_tier.h"
#include "proto/half.h"

using namespace kvm;
using Clock = std::chrono::steady_clock;

namespace {
double Since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  uint32_t group = 4;
  int iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--group")) group = static_cast<uint32_t>(std::atoi(argv[i + 1]));
    if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
  }
  if (group == 0 || group > 64 || iters <= 0)
    return std::fprintf(stderr, "usage: kvm_gpu_score_bench [--group 1..64] [--iters N]\n"), 2;
  const uint32_t D = 128, B = 16;
  const store::KeyLayout layout{B, D, DType::kF16};
  auto tier = store::GpuTier::Open(store::GpuTierOptions{});
  std::printf("GPU tier: %s\n", tier.ok() ? (*tier)->Stats().device.c_str()
                                          : ("absent: " + tier.status().ToString()).c_str());
  std::printf(
      "| T | CPU q·K (ms) | GPU q·K, keys resident (ms) | q·K speed-up | first GPU call, with "
      "upload (ms) | softmax of the logits, host (ms) |\n|---|---|---|---|---|---|\n");
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  uint64_t seq = 0;
  for (uint64_t T : {4096ull, 32768ull, 131072ull}) {
    const uint64_t nb = T / B;
    std::vector<uint16_t> k(T * D);
    for (auto& x : k) x = FloatToHalf(nd(rng));
    std::vector<float> q(size_t{group} * D), logits(size_t{group} * T);
    for (auto& x : q) x = nd(rng);
    std::vector<const void*> ptr(nb);
    for (uint64_t b = 0; b < nb; ++b) ptr[b] = &k[b * B * D];
    const attn::HeadKV kv{ptr.data(), ptr.data(), uint32_t(nb), T, B, D, DType::kF16};
    const float scale = 1.0f / std::sqrt(float(D));
    auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) attn::ScoreKeysGroup(q.data(), group, kv, scale, logits.data());
    const double cpu_ms = Since(t0) / iters;
    // Part of the host work both paths share (selector/scoring.h CompleteScores): the softmax.
    std::vector<float> p(T);
    t0 = Clock::now();
    for (int i = 0; i < iters; ++i)
      for (uint32_t h = 0; h < group; ++h) attn::Softmax(&logits[size_t{h} * T], T, p.data());
    const double host_ms = Since(t0) / iters;
    double gpu_ms = 0, first_ms = 0;
    if (tier.ok()) {
      auto fetch = [&](uint64_t first, uint64_t n, std::span<uint8_t> out) {
        std::memcpy(out.data(), &k[first * B * D], n * layout.block_bytes());
        return Status::Ok();
      };
      ++seq;
      t0 = Clock::now();
      Status s = (*tier)->Score(seq, 0, 0, layout, T, {}, q.data(), group, logits.data(), fetch);
      first_ms = Since(t0);
      if (!s.ok()) return std::fprintf(stderr, "GPU tier: %s\n", s.ToString().c_str()), 1;
      t0 = Clock::now();
      for (int i = 0; i < iters; ++i)
        s = (*tier)->Score(seq, 0, 0, layout, T, {}, q.data(), group, logits.data(), fetch);
      gpu_ms = Since(t0) / iters;
      if (!s.ok()) return std::fprintf(stderr, "GPU tier: %s\n", s.ToString().c_str()), 1;
    }
    if (tier.ok())
      std::printf("| %llu | %.3f | %.3f | %.1fx | %.3f | %.3f |\n", (unsigned long long)T, cpu_ms,
                  gpu_ms, cpu_ms / gpu_ms, first_ms, host_ms);
    else
      std::printf("| %llu | %.3f | - | - | - | %.3f |\n", (unsigned long long)T, cpu_ms, host_ms);
  }
  return tier.ok() ? 0 : 77;
}
