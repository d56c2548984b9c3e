// The synthetic decode workload of kvmctl (DESIGN.md §9: structured, labelled synthetic), shared by
// `kvmctl bench decode --synthetic` and `kvmctl loadgen`, and by the tests that check what
// loadgen stored. Every number is a pure function of (seed, layer, position, head, component):
// nothing is stored, and a reader can recompute what a writer sent.
//
// Per (layer, KV head) the keys share a common component and carry clusters of salient tokens (C
// centroids, a cluster of 16 tokens every ~256 positions) and strong sinks (the first 4 tokens);
// values are Gaussian. The queries of a head drift like a real model's: an AR(1) walk u_t = ρ_l
// u_{t-1} + sqrt(1 - ρ_l²) ξ_t over unit directions, biased toward one centroid that changes every
// 64 steps, with ρ_l rising from 0.1 in layer 0 to 0.8 in the last layer — the cosine of
// consecutive post-RoPE queries measured on the committed models is 0.03–0.19 in layers 0–1 and
// 0.6–0.8 in the deepest, 0.43–0.46 on average (issue 23, `kvmctl attn-stats`).
//
// The seed picks one sequence's text: seed 0 is bench decode's workload; other seeds draw other
// keys, values and query noise around the same centroids (the same "model"). Queries carry state
// (the walk): one Synthetic per sequence, its steps in order per layer. Not thread-safe.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "proto/model_shape.h"

namespace kvm::tools {

// splitmix64: a counter-based generator, so a run draws the same numbers without storing them.
inline uint64_t SyntheticMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
// N(0, 1) from two uniforms (Box-Muller).
inline float SyntheticGauss(uint64_t key) {
  const double u1 = (double(SyntheticMix(key) >> 11) + 0.5) / 9007199254740992.0;
  const double u2 = double(SyntheticMix(key ^ 0x5bd1e995ull) >> 11) / 9007199254740992.0;
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

class Synthetic {
 public:
  explicit Synthetic(const ModelShape& s, uint64_t seed = 0)
      : s_(s),
        salt_(seed ? SyntheticMix(seed ^ 0x6c6f616467656e21ull) : 0),
        u_(size_t{s.layers} * s.q_heads * s.head_dim, 0.f) {}
  static constexpr uint32_t kCentroids = 32;
  float Rho(uint32_t l) const {
    return s_.layers > 1 ? 0.1f + 0.7f * float(l) / float(s_.layers - 1) : 0.5f;
  }
  // K and V of token `pos` at layer l: [kv_heads][head_dim] each (a pure function of its
  // arguments and the seed).
  void KeysValues(uint32_t l, uint64_t pos, float* k, float* v) const {
    const uint32_t D = s_.head_dim;
    const uint64_t cluster =
        pos % 256 < 16 ? SyntheticMix((pos / 256) ^ salt_) % kCentroids : UINT64_MAX;
    for (uint32_t h = 0; h < s_.kv_heads; ++h)
      for (uint32_t i = 0; i < D; ++i) {
        const uint64_t base = (((uint64_t{l} * 131 + h) * 1000003 + pos) * 4099 + i) ^ salt_;
        float x =
            0.35f * Centroid(l, h, 1000, i) + SyntheticGauss(base * 3 + 1) / std::sqrt(float(D));
        if (cluster != UINT64_MAX) x += 2.5f * Centroid(l, h, cluster, i);
        if (pos < 4) x += 4.0f * Centroid(l, h, 2000, i);
        k[size_t{h} * D + i] = x;
        v[size_t{h} * D + i] = SyntheticGauss(base * 3 + 2);
      }
  }
  // The queries of step `pos` at layer l, [q_heads][head_dim]; steps come in order per layer.
  void Queries(uint32_t l, uint64_t pos, float* q) {
    const uint32_t D = s_.head_dim, g = s_.group_size();
    const float rho = Rho(l), fresh = std::sqrt(1.f - rho * rho);
    const uint64_t topic = SyntheticMix((pos / 64 + 77) ^ salt_) % kCentroids;
    for (uint32_t qh = 0; qh < s_.q_heads; ++qh) {
      float* u = &u_[(size_t{l} * s_.q_heads + qh) * D];
      double n2 = 0;
      for (uint32_t i = 0; i < D; ++i) {
        const uint64_t key = (((uint64_t{l} * 257 + qh) * 1000003 + pos) * 4099 + i) ^ salt_;
        u[i] = rho * u[i] + fresh * (SyntheticGauss(key * 5 + 3) / std::sqrt(float(D)) +
                                     0.5f * Centroid(l, qh / g, topic, i));
        n2 += double(u[i]) * u[i];
      }
      const float inv = n2 > 0 ? float(1.0 / std::sqrt(n2)) : 0.f;
      for (uint32_t i = 0; i < D; ++i)
        q[size_t{qh} * D + i] = 6.0f * u[i] * inv + 1.5f * Centroid(l, qh / g, 2000, i);
    }
  }
  // A token id for `pos` (the service keys prefixes by tokens): seed 0 gives pos % 4096, as bench
  // decode has always sent; other seeds a hash of (seed, pos) below 32000.
  uint32_t Token(uint64_t pos) const {
    return salt_ ? uint32_t(SyntheticMix(pos ^ salt_) % 32000) : uint32_t(pos % 4096);
  }

 private:
  // Unit-ish centroid c of (layer, KV head): component i (the same for every seed).
  float Centroid(uint32_t l, uint32_t h, uint64_t c, uint32_t i) const {
    return SyntheticGauss(((uint64_t{l} * 65537 + h) * 1000 + c) * 4099 + i + (1ull << 40)) /
           std::sqrt(float(s_.head_dim));
  }
  ModelShape s_;
  uint64_t salt_;         // 0 for seed 0: bench decode's numbers, unchanged
  std::vector<float> u_;  // [layer][q_head][D]: the drifting directions
};

}  // namespace kvm::tools
