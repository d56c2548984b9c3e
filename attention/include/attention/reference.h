// CPU reference attention primitives: plain and obviously correct. Every faster implementation
// (SIMD CPU, CUDA) is tested against these. fp16/bf16/fp32 K and V, fp32 accumulation.
//
// Keys and values of one (layer, KV head) are given in the block layout of DESIGN.md §2 through
// HeadKV. Logits are s_j = scale · q·k_j with scale = 1/sqrt(head_dim) unless said otherwise.
// Attention always accumulates in increasing token order, so every KV source that attends the same
// tokens gives bit-identical results.
//
// Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::attn {

// Keys and values of one (layer, KV head) of one sequence.
struct HeadKV {
  const void* const* k_blocks =
      nullptr;  // [n_blocks] pointers, each K[block_size][head_dim] of dtype
  const void* const* v_blocks =
      nullptr;  // [n_blocks] pointers, each V[block_size][head_dim] of dtype
  uint32_t n_blocks = 0;
  uint64_t tokens = 0;  // valid tokens; block i holds [i*B, min((i+1)*B, tokens))
  uint32_t block_size = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kF32;

  // InvalidArgument when pointers are missing, head_dim unsupported, or n_blocks does not cover
  // tokens.
  Status Validate() const;
};

// One element of K or V as float.
float LoadElem(const void* base, size_t index, DType dtype);
// Row `token` of K (values = false) or V (values = true), converted to fp32 into out[head_dim].
void LoadRow(const HeadKV& kv, uint64_t token, bool values, float* out);

// q·k_j · scale for every token j < kv.tokens. q: [head_dim] fp32; scores: [kv.tokens].
void ScoreKeys(const float* q, const HeadKV& kv, float scale, float* scores);
// The same for the `group` query heads q [group][head_dim] into scores [group][kv.tokens] (each key
// block converted once; every score computed exactly as ScoreKeys does).
void ScoreKeysGroup(const float* q, uint32_t group, const HeadKV& kv, float scale, float* scores);

// An upper bound on max over the listed rows r of ||k_r − c||₂ (keys [rows][D] fp32, c [D]): where
// the CPU has AVX2 + FMA, float sums with their rounding error bounded and added (the bound is at
// most ~1e-5 relative above the exact value); elsewhere, or when a float sum would overflow, the
// exact distances in double (each row's sum in index order). 0 when `rows` is empty.
double MaxDistanceBound(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                        const double* c);
// The same for n centers at once ([n][D] → out[n]), the rows read once for up to five of them.
void MaxDistanceBounds(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                       const double* centers, uint32_t n, double* out);

// m[h][i] += w[r][h] · k[i] for every listed row k = keys[rows[r]], in list order, and every head
// h < heads: each product rounded to double, then added, never fused — the bits of the plain loop
// (with w = 1 a plain sum in double). keys [*][D] fp32; w [rows.size()][heads]; m [heads][D]. A
// run of rows may be added in pieces (the same bits). Four doubles per instruction where the CPU
// has AVX2 and D % 8 == 0.
void AddWeightedRows(const float* keys, uint32_t D, std::span<const uint32_t> rows, uint32_t heads,
                     const double* w, double* m);

// Numerically stable softmax of n logits into p (may alias s). Max subtracted, fp32 sum in order.
void Softmax(const float* s, size_t n, float* p);

// Indices of the k largest of s[0..n), by value descending, ties to the lower index. k > n → n.
std::vector<uint32_t> TopK(const float* s, size_t n, size_t k);

// δ = 1 − Σ_{j selected} p_j, clamped at 0; selected: [n] of 0/1.
double DroppedMass(const float* p, const uint8_t* selected, size_t n);

// Attention of `group` query heads (one GQA group) over the tokens of one KV head.
//   q:    [group][head_dim] fp32, post-RoPE
//   mask: [kv.tokens] 0/1, or empty for all tokens (dense)
//   out:  [group][head_dim] fp32
// Two passes in token order: logits, max, Σexp and Σexp·v. An empty selection → InvalidArgument.
Status Attend(const float* q, uint32_t group, const HeadKV& kv, std::span<const uint8_t> mask,
              float* out);

// The online-softmax state of one query over the tokens [begin, end) of kv (mask as above):
// m, d and o[head_dim]. Used to test MergeState: states of halves merge into the whole.
void PartialState(const float* q, const HeadKV& kv, std::span<const uint8_t> mask, uint64_t begin,
                  uint64_t end, float* m, float* d, float* o);

// "no CUDA device" (Unavailable) or "built without CUDA" (Unimplemented), or OK when a device
// exists.
Status CudaAvailable();

}  // namespace kvm::attn
