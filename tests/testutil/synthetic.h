// A structured synthetic sequence for one layer and KV-head group (labelled synthetic wherever
// used): attention sinks (keys aligned with the query direction), clusters of salient tokens,
// background noise keys, and slowly drifting queries. Deterministic for a seed. Keys are kept as
// fp32 in the block layout so selectors can read them through attn::HeadKV.
#pragma once

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "attention/reference.h"
#include "selector/selection.h"

namespace kvm::testutil {

class SyntheticGroup {
 public:
  SyntheticGroup(uint32_t group, uint32_t head_dim, uint32_t block_size, uint32_t seed,
                 double drift = 0.05)
      : g_(group),
        D_(head_dim),
        B_(block_size),
        rng_(seed),
        drift_(drift),
        summaries_(block_size, head_dim, true) {
    dir_.resize(size_t{g_} * D_);
    for (auto& x : dir_) x = n_(rng_);
    for (uint32_t h = 0; h < g_; ++h) Normalize(&dir_[size_t{h} * D_]);
    q_.assign(size_t{g_} * D_, 0.f);
  }
  // Appends `n` tokens of keys (and values).
  void Append(uint64_t n) {
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t t = T_++;
      std::vector<float> k(D_);
      const bool sink = t < 4;
      const bool salient = (t / 7) % 23 == 5;  // clusters of 7 adjacent tokens
      for (uint32_t d = 0; d < D_; ++d) k[d] = n_(rng_) * 0.6f;
      if (sink || salient) {
        const uint32_t h = static_cast<uint32_t>(t % g_);
        const float w = sink ? 3.0f : 4.0f + 2.0f * float(u_(rng_));
        for (uint32_t d = 0; d < D_; ++d)
          k[d] += w * dir_[size_t{h} * D_ + d] * std::sqrt(float(D_)) / 2.5f;
      }
      keys_.insert(keys_.end(), k.begin(), k.end());
      for (uint32_t d = 0; d < D_; ++d) values_.push_back(n_(rng_));
      summaries_.Append(t, k.data());
    }
    Rebuild();
  }
  // The group's queries for the current step: the drifting directions, scaled.
  const float* NextQueries() {
    for (uint32_t h = 0; h < g_; ++h) {
      float* d = &dir_[size_t{h} * D_];
      for (uint32_t i = 0; i < D_; ++i) d[i] += float(drift_) * n_(rng_);
      Normalize(d);
      for (uint32_t i = 0; i < D_; ++i) q_[size_t{h} * D_ + i] = d[i] * 4.0f;
    }
    return q_.data();
  }
  float* queries() { return q_.data(); }
  attn::HeadKV view() const {
    return attn::HeadKV{kp_.data(), vp_.data(), static_cast<uint32_t>(kp_.size()), T_, B_,
                        D_,         DType::kF32};
  }
  const sel::HeadSummaries& summaries() const { return summaries_; }
  uint64_t tokens() const { return T_; }
  std::mt19937& rng() { return rng_; }

 private:
  void Normalize(float* v) {
    double s = 0;
    for (uint32_t i = 0; i < D_; ++i) s += double(v[i]) * v[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(s));
    for (uint32_t i = 0; i < D_; ++i) v[i] *= inv;
  }
  void Rebuild() {
    const uint64_t nb = (T_ + B_ - 1) / B_;
    kblocks_.assign(nb * B_ * D_, 0.f);
    vblocks_.assign(nb * B_ * D_, 0.f);
    std::memcpy(kblocks_.data(), keys_.data(), keys_.size() * 4);
    std::memcpy(vblocks_.data(), values_.data(), values_.size() * 4);
    kp_.resize(nb);
    vp_.resize(nb);
    for (uint64_t b = 0; b < nb; ++b) {
      kp_[b] = &kblocks_[b * B_ * D_];
      vp_[b] = &vblocks_[b * B_ * D_];
    }
  }
  uint32_t g_, D_, B_;
  std::mt19937 rng_;
  std::normal_distribution<float> n_{0.f, 1.f};
  std::uniform_real_distribution<double> u_{0.0, 1.0};
  double drift_;
  uint64_t T_ = 0;
  std::vector<float> dir_, q_, keys_, values_, kblocks_, vblocks_;
  std::vector<const void*> kp_, vp_;
  sel::HeadSummaries summaries_;
};

}  // namespace kvm::testutil
