// The CPU decode kernel, written once; compiled by decode_portable.cc (plain C++) and
// decode_avx2.cc
// (-mavx2 -mfma -mf16c, which vectorises the 8-lane loops and converts fp16 with F16C). Each
// includer defines KVM_DECODE_NS and ConvertRow before including this file.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/decode.h"
#include "attention/state.h"

namespace kvm::attn::KVM_DECODE_NS {

template <uint32_t D>
inline float Dot(const float* a, const float* b) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint32_t d = 0; d < D; d += 8)
    for (uint32_t i = 0; i < 8; ++i) acc[i] += a[d + i] * b[d + i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One KV head: every query head of its group over the listed blocks.
template <uint32_t D, DType DT>
void DecodeHead(const DecodeParams& p, uint32_t h) {
  constexpr uint32_t kMaxG = 8;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const uint32_t B = p.block_size, g = p.group;
  const float scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(float(D));
  // Scratch on the heap (thread-local vectors: static TLS arrays this large would eat thread
  // stacks).
  static thread_local std::vector<float> kscratch, wscratch;
  if (kscratch.size() < size_t{B} * D) kscratch.resize(size_t{B} * D);
  if (wscratch.size() < size_t{kMaxG} * B) wscratch.resize(size_t{kMaxG} * B);
  float* kbuf = kscratch.data();  // one block of K or V as fp32
  auto w = [&](uint32_t j) { return wscratch.data() + size_t{j} * B; };  // logits, then weights
  alignas(64) float qs[kMaxG][D], o[kMaxG][D], acc[D];
  float m[kMaxG], dsum[kMaxG], bmax[kMaxG], bsum[kMaxG];
  for (uint32_t j = 0; j < g; ++j) {
    const float* qj = p.q + (size_t{h} * g + j) * D;
    for (uint32_t d = 0; d < D; ++d) qs[j][d] = qj[d] * scale;
    std::fill(o[j], o[j] + D, 0.f);
    m[j] = kNegInf;
    dsum[j] = 0.f;
  }
  const size_t base = size_t{h} * p.max_blocks;
  for (uint32_t bi = 0; bi < p.n_blocks[h]; ++bi) {
    const uint32_t rows = p.rows ? p.rows[base + bi] : B;
    const uint8_t* mask = p.mask ? p.mask + (base + bi) * B : nullptr;
    // K: convert the block once, score every head of the group, block-local softmax state.
    ConvertRows<DT, D>(p.k_blocks[base + bi], rows, kbuf);
    for (uint32_t j = 0; j < g; ++j) {
      float mx = kNegInf;
      for (uint32_t r = 0; r < rows; ++r) {
        w(j)[r] = (mask && !mask[r]) ? kNegInf : Dot<D>(qs[j], kbuf + size_t{r} * D);
        mx = std::max(mx, w(j)[r]);
      }
      float sum = 0.f;
      for (uint32_t r = 0; r < rows; ++r) {
        w(j)[r] = w(j)[r] == kNegInf ? 0.f : std::exp(w(j)[r] - mx);
        sum += w(j)[r];
      }
      bmax[j] = mx;
      bsum[j] = sum;
    }
    // V: convert once; each head's weighted sum is its block state, merged into the running state.
    ConvertRows<DT, D>(p.v_blocks[base + bi], rows, kbuf);
    for (uint32_t j = 0; j < g; ++j) {
      if (bsum[j] == 0.f) continue;  // every row of the block masked out
      std::fill(acc, acc + D, 0.f);
      for (uint32_t r = 0; r < rows; ++r) {
        const float wr = w(j)[r];
        const float* v = kbuf + size_t{r} * D;
        for (uint32_t d = 0; d < D; ++d) acc[d] += wr * v[d];
      }
      MergeState(m[j], dsum[j], o[j], bmax[j], bsum[j], acc, D);
    }
  }
  for (uint32_t j = 0; j < g; ++j) {
    float* out = p.out + (size_t{h} * g + j) * D;
    const float inv = 1.0f / dsum[j];
    for (uint32_t d = 0; d < D; ++d) out[d] = o[j][d] * inv;
  }
}

template <uint32_t D>
void DecodeHeadDt(const DecodeParams& p, uint32_t h) {
  switch (p.dtype) {
    case DType::kF16:
      return DecodeHead<D, DType::kF16>(p, h);
    case DType::kBF16:
      return DecodeHead<D, DType::kBF16>(p, h);
    case DType::kF32:
      return DecodeHead<D, DType::kF32>(p, h);
  }
}

// REQUIRES: p.Validate() is OK.
inline void DecodeOneHead(const DecodeParams& p, uint32_t h) {
  switch (p.head_dim) {  // DISPATCH_HEAD_DIM
    case 32:
      return DecodeHeadDt<32>(p, h);
    case 64:
      return DecodeHeadDt<64>(p, h);
    case 128:
      return DecodeHeadDt<128>(p, h);
    case 256:
      return DecodeHeadDt<256>(p, h);
  }
}

}  // namespace kvm::attn::KVM_DECODE_NS
