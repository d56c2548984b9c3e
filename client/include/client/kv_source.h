// KvSource: where the reference worker's attention gets its keys and values from.
//
// The worker calls, for every layer of every token in order: Append(layer, pos, k, v) with the new
// token's post-RoPE keys and values, then Attend(layer, pos, q, out) for the attention of that
// token over positions [0, pos]. Implementations: the local dense cache (DenseKvSource, here), a
// local selector (selector_source.h) and the service (service_source.h). All attend through the
// fast CPU kernel (attn::DecodeCpu) over their blocks in ascending block order, so two sources that
// attend the same blocks give bit-identical outputs; the reference arithmetic (attn::Attend) is the
// oracle the tests compare the kernel with.
//
// Not thread-safe: one worker drives one source.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention/reference.h"
#include "proto/model_shape.h"
#include "proto/status.h"
#include "selector/options.h"

namespace kvm::client {

class LayerAttention;  // client/src/layer_attention.h

// Exact correction (README "Exact correction"): the attention over the blocks a sparse source did
// not attend is computed where they are (the local cache in-process, the service through it) and
// merged with the source's own (attention/state.h), so the output is dense attention and the
// selection's dropped mass δ is known exactly. kOff: none; kAnchors: for the (layer, KV head)s
// that re-anchored at the step (their queries travel anyway); kAlways: every decode step and layer
// (through the service, one round trip per layer).
enum class Correction : uint32_t { kOff = 0, kAnchors = 1, kAlways = 2 };
const char* CorrectionName(Correction c);  // "off", "anchors", "always"
// InvalidArgument naming the choices.
Result<Correction> ParseCorrection(const std::string& name);
// InvalidArgument for selector options that need another correction mode (reuse_while_fits, whose
// reuse has no δ bound, needs kAlways).
Status CheckCorrection(const sel::SelectorOptions& o, Correction c);

class KvSource {
 public:
  virtual ~KvSource() = default;
  // The token id at `pos`, before its layers' Append calls (the service keys prefixes by tokens).
  virtual void BeginToken(uint32_t token, uint64_t pos) {
    (void)token;
    (void)pos;
  }
  // k, v: [kv_heads][head_dim] fp32 (k post-RoPE). REQUIRES: pos == current length of `layer`
  // (or < it: a re-append of a known position must carry the same data and is a no-op).
  virtual Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) = 0;
  // q: [q_heads][head_dim] post-RoPE queries of the token at `pos`; out: [q_heads][head_dim].
  virtual Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) = 0;
};

// What a sparse source decided at one (step, layer, query head): the δ it claims for its selection
// (exact at anchors and short contexts, a bound on reuse steps, measured by an audit, NaN when
// unknown) and the claim's kind.
struct ClaimRecord {
  uint64_t step;
  uint32_t layer, q_head;
  double delta;
  DeltaKind kind;
};

// A KV source that attends a selection at decode steps and says which: what MeasuredKvSource
// (measure.h) measures the true δ of.
class SparseKvSource : public KvSource {
 public:
  // The blocks (ascending) each KV head attended at the last decode Attend, [kv_heads].
  virtual const std::vector<std::vector<uint64_t>>& attended() const = 0;
  // Every claim so far, in order (audits arrive later than their step).
  virtual const std::vector<ClaimRecord>& claims() const = 0;
};

// The local dense cache: K and V of every layer and KV head in the block layout, stored in `dtype`,
// attended densely (every block in order) with the fast kernel.
class DenseKvSource : public KvSource {
 public:
  // InvalidArgument for a bad shape or block size.
  static Result<std::unique_ptr<DenseKvSource>> Make(const ModelShape& shape, uint32_t block_size);
  ~DenseKvSource() override;

  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override;
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override;

  uint64_t length(uint32_t layer) const { return len_[layer]; }
  const BlockLayout& layout() const { return layout_; }
  // View of (layer, kv_head) over its first `tokens` tokens (valid until the next Append).
  attn::HeadKV View(uint32_t layer, uint32_t kv_head, uint64_t tokens) const;
  // Row of K or V as fp32.
  void Row(uint32_t layer, uint32_t kv_head, uint64_t token, bool values, float* out) const;

 private:
  explicit DenseKvSource(const BlockLayout& l);
  struct Head {
    std::vector<uint8_t> k, v;  // [blocks][B][D] of dtype, grown a block at a time
    mutable std::vector<const void*> kp, vp;
  };
  Head& head(uint32_t layer, uint32_t kvh) {
    return heads_[size_t{layer} * layout_.shape().kv_heads + kvh];
  }
  const Head& head(uint32_t layer, uint32_t kvh) const {
    return heads_[size_t{layer} * layout_.shape().kv_heads + kvh];
  }
  BlockLayout layout_;
  std::vector<Head> heads_;
  std::vector<uint64_t> len_;
  std::unique_ptr<LayerAttention> att_;
};

}  // namespace kvm::client
