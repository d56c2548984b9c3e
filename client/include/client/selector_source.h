// SelectorKvSource: the reference worker's second KV source — the local cache + a selector + the
// plan. At decode steps (positions ≥ the prefill length) each (layer, KV head) gets a selection
// from the selector, the plan diffs it against a hot-set mirror (byte accounting), and attention
// runs over the selected blocks only (attn::Attend with a token mask: the same arithmetic and token
// order as the dense source, so selecting everything is bit-identical to dense). Prefill is dense.
//
// Every (step, layer, query head) is also scored densely to measure the true δ of the selection and
// the block oracle's δ at the same size with the same forced blocks (selectors.md §0.7), whatever
// the selector claims. Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "client/kv_source.h"
#include "selector/plan.h"
#include "selector/prhs.h"

namespace kvm::client {

// One (step, layer, query head).
struct HeadRecord {
  uint64_t step;
  uint32_t layer, q_head;
  double delta_true;    // measured on this run's own q and K
  double delta_oracle;  // the block oracle of the same size and forced blocks
  double delta_claim;   // what the selector reported (NaN: unknown)
  DeltaKind kind;
};

struct SourceTotals {
  uint64_t steps = 0;            // decode steps seen (per layer 0)
  uint64_t retrievals = 0;       // query heads scored (§0.3)
  uint64_t attended_tokens = 0;  // Σ over (step, layer, KV head) of resident tokens (≤ T)
  uint64_t context_tokens = 0;   // Σ over (step, layer, KV head) of T
  uint64_t anchors = 0;          // (step, layer, KV head) selections that re-anchored
  sel::PlanBytes bytes;          // streamed, local fill, dense-equivalent, top-k refetch
};

class SelectorKvSource : public KvSource {
 public:
  // prefill: positions below it are attended densely. Forced blocks for the oracle comparison are
  // those the selector forces: `forced_policy` "geometry" (sinks + window), "none", "hshare" or
  // "all".
  static Result<std::unique_ptr<SelectorKvSource>> Make(
      const ModelShape& shape, uint32_t block_size, std::unique_ptr<sel::Selector> selector,
      const sel::SelectorOptions& opt, uint64_t prefill, const std::string& forced_policy,
      uint64_t max_context);
  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override;
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override;

  const std::vector<HeadRecord>& records() const { return records_; }
  const SourceTotals& totals() const { return totals_; }
  DenseKvSource& dense() { return *dense_; }
  sel::Selector& selector() { return *selector_; }

 private:
  SelectorKvSource() = default;
  std::unique_ptr<DenseKvSource> dense_;
  std::unique_ptr<sel::Selector> selector_;
  sel::SelectorOptions opt_;
  ModelShape shape_;
  uint64_t prefill_ = 0;
  std::string forced_;
  std::vector<sel::HeadSummaries> summaries_;  // [layer][kv_head]
  std::vector<sel::HotSetMirror> mirrors_;     // [layer][kv_head]
  std::vector<HeadRecord> records_;
  SourceTotals totals_;
};

}  // namespace kvm::client
