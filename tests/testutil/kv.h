// Test helper: random keys and values of one (layer, KV head) in the block layout.
#pragma once

#include <cstring>
#include <random>
#include <vector>

#include "attention/reference.h"
#include "proto/half.h"

namespace kvm::testutil {

class RandomKv {
 public:
  // T tokens of head_dim D in blocks of B, stored as dtype; values ~ N(0, 1), seeded.
  RandomKv(uint64_t T, uint32_t D, uint32_t B, DType dtype, uint32_t seed)
      : T_(T), D_(D), B_(B), dtype_(dtype) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.f, 1.f);
    kf_.resize(T * D);
    vf_.resize(T * D);
    for (auto& x : kf_) x = Round(n(rng));
    for (auto& x : vf_) x = Round(n(rng));
    Build();
  }
  RandomKv(const RandomKv&) = delete;  // the block pointers point into this object's buffers
  RandomKv(RandomKv&&) = default;      // vector moves keep their buffers
  // A copy holding only the given tokens (in order), same block size and dtype.
  RandomKv Subset(const std::vector<uint64_t>& tokens) const {
    RandomKv r(*this, tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::memcpy(&r.kf_[i * D_], &kf_[tokens[i] * D_], D_ * sizeof(float));
      std::memcpy(&r.vf_[i * D_], &vf_[tokens[i] * D_], D_ * sizeof(float));
    }
    r.Build();
    return r;
  }
  attn::HeadKV view() const {
    return attn::HeadKV{kp_.data(), vp_.data(), static_cast<uint32_t>(kp_.size()), T_, B_,
                        D_,         dtype_};
  }
  const float* key(uint64_t j) const { return &kf_[j * D_]; }  // the exact stored value as float
  const float* value(uint64_t j) const { return &vf_[j * D_]; }
  std::vector<float>& keys() { return kf_; }
  // Re-encodes after keys()/values were changed.
  void Rebuild() { Build(); }

 private:
  RandomKv(const RandomKv& o, uint64_t T)
      : T_(T), D_(o.D_), B_(o.B_), dtype_(o.dtype_), kf_(T * o.D_), vf_(T * o.D_) {}
  float Round(float x) const {
    if (dtype_ == DType::kF16) return HalfToFloat(FloatToHalf(x));
    if (dtype_ == DType::kBF16) return Bf16ToFloat(FloatToBf16(x));
    return x;
  }
  void Build() {
    const uint64_t nb = (T_ + B_ - 1) / B_;
    const size_t es = DTypeSize(dtype_);
    kb_.assign(nb * B_ * D_ * es, 0);
    vb_.assign(nb * B_ * D_ * es, 0);
    for (uint64_t j = 0; j < T_ * D_; ++j) {
      Store(kb_.data(), j, kf_[j]);
      Store(vb_.data(), j, vf_[j]);
    }
    kp_.clear();
    vp_.clear();
    for (uint64_t b = 0; b < nb; ++b) {
      kp_.push_back(kb_.data() + b * B_ * D_ * es);
      vp_.push_back(vb_.data() + b * B_ * D_ * es);
    }
  }
  void Store(uint8_t* base, uint64_t i, float x) const {
    if (dtype_ == DType::kF32) {
      std::memcpy(base + i * 4, &x, 4);
    } else {
      const uint16_t h = dtype_ == DType::kF16 ? FloatToHalf(x) : FloatToBf16(x);
      std::memcpy(base + i * 2, &h, 2);
    }
  }
  uint64_t T_;
  uint32_t D_, B_;
  DType dtype_;
  std::vector<float> kf_, vf_;
  std::vector<uint8_t> kb_, vb_;
  std::vector<const void*> kp_, vp_;
};

}  // namespace kvm::testutil
