// Internal to client/: one layer's decode attention through attn::DecodeCpu (the fast CPU path),
// over one block list per KV head, all query heads of each group in one call. Every KV source
// attends through it, so two sources that list the same blocks in the same (ascending) order give
// bit-identical outputs. The lists are reused across calls (no allocation once warm).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "attention/decode.h"
#include "attention/state.h"
#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::client {

class LayerAttention {
 public:
  // Room for `max_blocks` blocks per KV head of `shape` (grows when asked for more).
  void Prepare(const ModelShape& shape, uint32_t block_size, uint64_t max_blocks) {
    shape_ = shape;
    B_ = block_size;
    if (max_blocks > max_) max_ = static_cast<uint32_t>(max_blocks);
    const size_t n = size_t{shape.kv_heads} * max_;
    if (k_.size() < n) {
      k_.resize(n);
      v_.resize(n);
      rows_.resize(n);
    }
    count_.assign(shape.kv_heads, 0);
  }
  // The list of KV head h: fill k(h)[i], v(h)[i], rows(h)[i] for i < n, then set_count(h, n).
  const void** k(uint32_t h) { return k_.data() + size_t{h} * max_; }
  const void** v(uint32_t h) { return v_.data() + size_t{h} * max_; }
  uint16_t* rows(uint32_t h) { return rows_.data() + size_t{h} * max_; }
  void set_count(uint32_t h, uint32_t n) { count_[h] = n; }
  // q, out: [q_heads][head_dim] fp32. `state` (optional): [q_heads][2], each query head's softmax
  // state (m, d) over its list; with it a KV head may list no block.
  Status Run(const float* q, float* out, float* state = nullptr) const {
    attn::DecodeParams p;
    p.q = q;
    p.out = out;
    p.kv_heads = shape_.kv_heads;
    p.group = shape_.group_size();
    p.head_dim = shape_.head_dim;
    p.block_size = B_;
    p.dtype = shape_.dtype;
    p.k_blocks = k_.data();
    p.v_blocks = v_.data();
    p.n_blocks = count_.data();
    p.max_blocks = max_;
    p.rows = rows_.data();
    p.state = state;
    return attn::DecodeCpu(p);
  }

 private:
  ModelShape shape_;
  uint32_t B_ = 16, max_ = 0;
  std::vector<const void*> k_, v_;
  std::vector<uint16_t> rows_;
  std::vector<uint32_t> count_;
};

// Exact correction of one query head: merges the partial attention over the blocks it did not
// attend — state (m2, d2) and normalised output out2, d2 = 0 when there were none — into its sparse
// output `out` (state m, d) in place (attn::MergeState). Returns the dropped mass of the sparse
// selection: the share of the merged normaliser that came from out2's blocks (exact).
inline double MergeCorrection(float m, float d, float* out, float m2, float d2, const float* out2,
                              uint32_t D) {
  if (d2 == 0.f) return 0.0;
  std::vector<float> o(D), o2(D);
  for (uint32_t i = 0; i < D; ++i) o[i] = out[i] * d, o2[i] = out2[i] * d2;
  float M = m, N = d;
  attn::MergeState(M, N, o.data(), m2, d2, o2.data(), D);
  for (uint32_t i = 0; i < D; ++i) out[i] = o[i] / N;
  return double(d2) * std::exp(double(m2) - double(M)) / double(N);
}

}  // namespace kvm::client
