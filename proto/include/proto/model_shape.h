// The model shape and the block layout: the shared vocabulary of storage, selection and transport.
//
// A block (DESIGN.md §2) is B consecutive tokens of one sequence, ONE layer and ONE KV head. K and
// V are stored separately, each contiguous and row-major:
//     K[block_size][head_dim], V[block_size][head_dim]   (elements of `dtype`)
// Block i of a sequence holds tokens [i*B, (i+1)*B); the last block may be partial (ragged): only
// its first (T - i*B) rows are valid. A block is identified by (layer, kv_head, block index).
//
// GQA: query head h reads KV head h / group_size, group_size = q_heads / kv_heads.
//
// Plain values; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/status.h"

namespace kvm {

// Element type of K and V (and of other tensors where said). Wire values: never renumber.
enum class DType : uint32_t { kF16 = 1, kBF16 = 2, kF32 = 3 };
size_t DTypeSize(DType t);                          // bytes per element; 0 for an unknown value
const char* DTypeName(DType t);                     // "fp16", "bf16", "fp32", "?"
Result<DType> ParseDType(const std::string& name);  // accepts the names above

// What kind of value a reported dropped mass δ is (selectors.md §0.2). Wire values: never renumber.
enum class DeltaKind : uint32_t {
  kExact = 1,    // computed from full scores (at an anchor)
  kBound = 2,    // a guaranteed upper bound (between anchors, selectors.md §0.4)
  kAudit = 3,    // measured later on a sample
  kUnknown = 4,  // not known (e.g. a cross-layer-shared layer that was not audited)
};
const char* DeltaKindName(DeltaKind k);  // "exact", "bound", "audit", "unknown"

inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxHeads = 1024;
inline constexpr uint32_t kMaxBlockSize = 1024;

struct ModelShape {
  uint32_t layers = 0;    // L >= 1
  uint32_t q_heads = 0;   // Hq, a multiple of kv_heads
  uint32_t kv_heads = 0;  // Hkv >= 1
  uint32_t head_dim = 0;  // D in {32, 64, 128, 256}
  DType dtype = DType::kF16;
  uint64_t fingerprint = 0;  // hash of the weights' identity; 0 = unknown (allowed, matches only 0)

  uint32_t group_size() const { return kv_heads ? q_heads / kv_heads : 0; }
  // InvalidArgument naming the first bad field, or OK.
  Status Validate() const;
  bool operator==(const ModelShape&) const = default;
  std::string ToString() const;
};

// Sizes of the block layout for one shape and block size. Construct with Make() (validates).
class BlockLayout {
 public:
  static Result<BlockLayout> Make(const ModelShape& shape, uint32_t block_size);

  const ModelShape& shape() const { return shape_; }
  uint32_t block_size() const { return block_size_; }
  size_t elem_bytes() const { return DTypeSize(shape_.dtype); }
  // Bytes of one K (or V) block: block_size * head_dim * elem_bytes.
  size_t kv_block_bytes() const { return size_t{block_size_} * shape_.head_dim * elem_bytes(); }
  // Bytes of one token's K (or V) row for one (layer, kv head): head_dim * elem_bytes.
  size_t row_bytes() const { return size_t{shape_.head_dim} * elem_bytes(); }
  // Blocks needed for `tokens` tokens (ceil).
  uint64_t BlocksFor(uint64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  // Valid rows of block `index` in a sequence of `tokens` tokens (0 if the block is past the end).
  uint32_t RowsInBlock(uint64_t index, uint64_t tokens) const;
  // K and V bytes of every layer and KV head for `tokens` tokens (the dense-equivalent of a step).
  uint64_t DenseBytes(uint64_t tokens) const {
    return tokens * 2ull * shape_.layers * shape_.kv_heads * row_bytes();
  }

 private:
  BlockLayout(const ModelShape& s, uint32_t b) : shape_(s), block_size_(b) {}
  ModelShape shape_;
  uint32_t block_size_;
};

// Identity of one block within a sequence.
struct BlockId {
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  uint64_t index = 0;
  bool operator==(const BlockId&) const = default;
};

}  // namespace kvm
