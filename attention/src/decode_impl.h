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

#ifndef KVM_DECODE_PREFETCH
#define KVM_DECODE_PREFETCH 1
#endif

namespace kvm::attn::KVM_DECODE_NS {

template <uint32_t D>
inline float Dot(const float* a, const float* b) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint32_t d = 0; d < D; d += 8)
    for (uint32_t i = 0; i < 8; ++i) acc[i] += a[d + i] * b[d + i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One KV head: every query head of its group over the listed blocks. Consecutive list entries are
// gathered into chunks of up to 32 rows (token-granular lists are 1-row entries), each chunk
// (one block when B >= 16) is converted once, scored for every head of the group, turned into a
// chunk-local softmax state and merged (MergeState); the next chunk's K and V are prefetched while
// the current one is computed.
template <uint32_t D, DType DT>
void DecodeHead(const DecodeParams& p, uint32_t h) {
  constexpr uint32_t kMaxG = 8;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr size_t kElem = DT == DType::kF32 ? 4 : 2;
  constexpr bool kPrefetch = KVM_DECODE_PREFETCH;
  const uint32_t B = p.block_size, g = p.group;
  const uint32_t cap =
      B >= 16 ? B : 32;  // rows per chunk: one block, or 32 gathered rows of small entries
  const float scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(float(D));
  // Scratch on the heap (thread-local vectors: static TLS arrays this large would eat thread
  // stacks).
  static thread_local std::vector<float> kscratch, wscratch;
  static thread_local std::vector<uint8_t> valid;
  if (kscratch.size() < size_t{cap} * D) kscratch.resize(size_t{cap} * D);
  if (wscratch.size() < size_t{kMaxG} * cap) wscratch.resize(size_t{kMaxG} * cap);
  if (valid.size() < cap) valid.resize(cap);
  float* kbuf = kscratch.data();  // one chunk of K or V rows as fp32
  auto w = [&](uint32_t j) { return wscratch.data() + size_t{j} * cap; };  // logits, then weights
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
  const uint32_t n = p.n_blocks[h];
  auto rows_of = [&](uint32_t e) -> uint32_t { return p.rows ? p.rows[base + e] : B; };
  // The entries [first, last) of the chunk starting at `first`.
  auto chunk_end = [&](uint32_t first) {
    uint32_t last = first, r = 0;
    while (last < n && (last == first || r + rows_of(last) <= cap)) r += rows_of(last++);
    return last;
  };
  auto prefetch = [&](uint32_t first, uint32_t last) {
    for (uint32_t e = first; e < last; ++e) {
      const size_t bytes = size_t{rows_of(e)} * D * kElem;
      const char* k = static_cast<const char*>(p.k_blocks[base + e]);
      const char* v = static_cast<const char*>(p.v_blocks[base + e]);
      for (size_t off = 0; off < bytes; off += 64) {
        __builtin_prefetch(k + off);
        __builtin_prefetch(v + off);
      }
    }
  };
  uint32_t first = 0, last = chunk_end(0);
  while (first < n) {
    const uint32_t next_last = chunk_end(last);
    if (kPrefetch) prefetch(last, next_last);
    // K: gather and convert the chunk's rows, score every head, chunk-local softmax state.
    uint32_t rows = 0;
    for (uint32_t e = first; e < last; ++e) {
      const uint32_t r = rows_of(e);
      ConvertRows<DT, D>(p.k_blocks[base + e], r, kbuf + size_t{rows} * D);
      const uint8_t* mk = p.mask ? p.mask + (base + e) * B : nullptr;
      for (uint32_t x = 0; x < r; ++x) valid[rows + x] = mk ? mk[x] : 1;
      rows += r;
    }
    for (uint32_t j = 0; j < g; ++j) {
      float mx = kNegInf;
      float* wj = w(j);
      for (uint32_t r = 0; r < rows; ++r) {
        wj[r] = valid[r] ? Dot<D>(qs[j], kbuf + size_t{r} * D) : kNegInf;
        mx = std::max(mx, wj[r]);
      }
      float sum = 0.f;
      for (uint32_t r = 0; r < rows; ++r) {
        wj[r] = wj[r] == kNegInf ? 0.f : std::exp(wj[r] - mx);
        sum += wj[r];
      }
      bmax[j] = mx;
      bsum[j] = sum;
    }
    // V: gather and convert once; each head's weighted sum is its chunk state, merged into the
    // running state.
    rows = 0;
    for (uint32_t e = first; e < last; ++e) {
      ConvertRows<DT, D>(p.v_blocks[base + e], rows_of(e), kbuf + size_t{rows} * D);
      rows += rows_of(e);
    }
    for (uint32_t j = 0; j < g; ++j) {
      if (bsum[j] == 0.f) continue;  // every row of the chunk masked out
      std::fill(acc, acc + D, 0.f);
      const float* wj = w(j);
      for (uint32_t r = 0; r < rows; ++r) {
        const float wr = wj[r];
        const float* v = kbuf + size_t{r} * D;
        for (uint32_t d = 0; d < D; ++d) acc[d] += wr * v[d];
      }
      MergeState(m[j], dsum[j], o[j], bmax[j], bsum[j], acc, D);
    }
    first = last;
    last = next_last;
  }
  for (uint32_t j = 0; j < g; ++j) {
    float* out = p.out + (size_t{h} * g + j) * D;
    const float inv = dsum[j] > 0.f ? 1.0f / dsum[j] : 0.f;  // no key (state mode): out 0
    for (uint32_t d = 0; d < D; ++d) out[d] = o[j][d] * inv;
    if (p.state) {
      p.state[(size_t{h} * g + j) * 2] = m[j];
      p.state[(size_t{h} * g + j) * 2 + 1] = dsum[j];
    }
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
