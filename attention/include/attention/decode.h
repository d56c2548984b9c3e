// Fast decode attention: one new token per sequence, GQA, over blocks of the layout of DESIGN.md
// §2.
//
// One parameter struct serves the CPU (SIMD and portable) and CUDA paths. Per KV head, a block list
// says which blocks are attended and how many of each block's rows are valid; an optional token
// mask hides rows inside a block. Dense attention = the sequence's blocks in order (last one
// ragged); sparse attention = the hot-set slots from the plan's slot table plus the local window
// blocks. Accumulation is fp32 whatever the KV dtype; blocks are processed in list order with the
// online softmax state (attention/state.h) merged per block.
//
// Pure functions on caller memory; thread-safe for distinct outputs.
#pragma once

#include <cstdint>
#include <span>

#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::attn {

struct DecodeParams {
  const float* q =
      nullptr;  // [kv_heads][group][head_dim] fp32 post-RoPE queries (query head h = kvh*group + j)
  float* out = nullptr;  // [kv_heads][group][head_dim] fp32 outputs
  uint32_t kv_heads = 0;
  uint32_t group = 1;        // query heads per KV head, 1..8 (a runtime loop)
  uint32_t head_dim = 128;   // 32, 64, 128, 256 (templated)
  uint32_t block_size = 16;  // B, 1..1024
  DType dtype = DType::kF16;
  // Block table: for KV head h, entries [h * max_blocks, h * max_blocks + n_blocks[h]).
  const void* const* k_blocks = nullptr;  // → K[block_size][head_dim] of dtype
  const void* const* v_blocks = nullptr;  // → V[block_size][head_dim] of dtype
  const uint32_t* n_blocks = nullptr;     // [kv_heads]
  uint32_t max_blocks = 0;
  const uint16_t* rows =
      nullptr;  // [kv_heads * max_blocks] valid rows of each listed block (1..B); null = all B
  const uint8_t* mask =
      nullptr;         // [kv_heads * max_blocks][block_size] 0/1 per row; null = all valid rows
  float scale = 0.0f;  // 0 → 1/sqrt(head_dim)
  // Optional (CPU paths): [kv_heads][group][2], each query head's softmax state (m, d) over the
  // listed keys (attention/state.h, m in scaled-logit units), so that a caller can merge this
  // partial attention with another over disjoint keys (o = out · d). With it a KV head may list no
  // key at all: its out is 0 and its state empty (m = −inf, d = 0).
  float* state = nullptr;
  uint32_t threads = 1;  // CPU: threads over KV heads (1 = the calling thread)

  // InvalidArgument for unsupported sizes, missing pointers, a row count out of range, or a KV head
  // whose list attends no token.
  Status Validate() const;
};

// CPU decode with the best available SIMD path (AVX2+FMA+F16C when the CPU has them).
Status DecodeCpu(const DecodeParams& p);
// The same forced onto the portable path (tests compare the two).
Status DecodeCpuPortable(const DecodeParams& p);
// Decodes several sequences (each its own params).
Status DecodeCpuBatch(std::span<const DecodeParams> batch);
// "avx2+fma+f16c" or "portable".
const char* CpuDecodePath();

// Builds the block table of a sparse (hot-set) layout for one KV head:
//   slots: the slot indices to attend (from the plan's slot table), each < capacity
//   slot_k/slot_v: bases of the hot-set buffers, capacity blocks of [B][D] each
//   window_k/window_v + window_rows: the local window blocks (the last one ragged)
// Writes n entries into k_out/v_out/rows_out (size ≥ slots.size() + window blocks).
// InvalidArgument for a slot index ≥ capacity or a row count out of range.
Status SparseBlockList(std::span<const uint32_t> slots, uint32_t capacity, const void* slot_k,
                       const void* slot_v, size_t block_bytes,
                       std::span<const void* const> window_k, std::span<const void* const> window_v,
                       std::span<const uint16_t> window_rows, uint32_t block_size,
                       const void** k_out, const void** v_out, uint16_t* rows_out, uint32_t* n_out);

}  // namespace kvm::attn
