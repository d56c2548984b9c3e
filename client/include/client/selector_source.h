// SelectorKvSource: the reference worker's second KV source — the local cache + a selector + the
// plan. At decode steps (positions ≥ the prefill length) each (layer, KV head) gets a selection
// from the selector, the plan diffs it against a hot-set mirror (byte accounting), and attention
// runs over the selected blocks only, through the fast kernel in ascending block order (the same
// kernel and order as the dense and the service source: selecting everything is bit-identical to
// dense, and the same selections through the service give bit-identical outputs). Prefill is dense;
// a selector that observes attention (registry: H2O) is handed the attention of every prefill query
// over every block, and at decode the attention its selection received.
//
// What it attended and what the selector claimed are kept (SparseKvSource); MeasuredKvSource
// (measure.h) measures the true δ against a shadow copy. Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "client/kv_source.h"
#include "selector/options.h"
#include "selector/plan.h"
#include "selector/selection.h"
#include "selector/worker_gate.h"

namespace kvm::client {

struct SourceTotals {
  uint64_t steps = 0;                     // decode steps seen (per layer 0)
  uint64_t retrievals = 0;                // query heads scored (§0.3)
  uint64_t anchors = 0;                   // (step, layer, KV head) selections that re-anchored
  std::vector<uint64_t> head_retrievals;  // [layer][kv_head]: query heads scored there
  uint64_t target_missed = 0;             // target mode: selections whose claim says δ* was missed
  sel::PlanBytes bytes;                   // streamed, local fill, dense-equivalent, top-k refetch
  // Exact correction: (step, layer, KV head)s corrected, the bytes the same correction would move
  // through the service (queries unless the head re-anchored, its attended list, the states), and
  // the time the complement's attention took.
  uint64_t corrected = 0;
  uint64_t correction_bytes = 0;
  double correction_seconds = 0;
};

class SelectorKvSource : public SparseKvSource {
 public:
  // prefill: positions below it are attended densely. max_context sizes the plan's mirror.
  static Result<std::unique_ptr<SelectorKvSource>> Make(const ModelShape& shape,
                                                        uint32_t block_size,
                                                        std::unique_ptr<sel::Selector> selector,
                                                        const sel::SelectorOptions& opt,
                                                        uint64_t prefill, uint64_t max_context);
  ~SelectorKvSource() override;
  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override;
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override;
  const std::vector<std::vector<uint64_t>>& attended() const override { return attended_; }
  const std::vector<ClaimRecord>& claims() const override { return claims_; }

  // Exact correction (kv_source.h): the output becomes dense attention over the local cache and
  // the corrected heads' claims the exact δ of their selection. Default: off.
  void set_correction(Correction c) { correction_ = c; }
  const SourceTotals& totals() const { return totals_; }
  // The selector's gate outcomes (all zero for a selector without a gate).
  sel::GateCounts gate_counts() const;
  DenseKvSource& dense() { return *dense_; }
  sel::Selector& selector() { return *selector_; }

 private:
  SelectorKvSource() = default;
  // Prefill position `pos` of `layer`: the attention of its queries over every block, handed to a
  // selector that observes attention (H2O).
  Status ObservePrefill(uint32_t layer, uint64_t pos, const float* q);
  std::unique_ptr<DenseKvSource> dense_;
  std::unique_ptr<sel::Selector> selector_;
  bool observes_ = false;      // the registry says the selector wants the attention it got (H2O)
  uint32_t dense_layers_ = 0;  // registry.h DenseLayers
  sel::SelectorOptions opt_;
  ModelShape shape_;
  uint64_t prefill_ = 0;
  std::vector<sel::HeadSummaries> summaries_;  // [layer][kv_head]
  std::vector<sel::HotSetMirror> mirrors_;     // [layer][kv_head]
  std::vector<std::vector<uint64_t>> attended_;
  std::vector<ClaimRecord> claims_;
  SourceTotals totals_;
  std::unique_ptr<LayerAttention> att_, rest_;  // the selection; the complement (correction)
  Correction correction_ = Correction::kOff;
};

}  // namespace kvm::client
