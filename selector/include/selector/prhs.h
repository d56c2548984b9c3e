// PrHS (pre-hoc sparsity) and the block oracle, per sequence, in budget or target-δ mode.
//
// PrHS = CIS + PSAW + cross-layer index sharing (selectors.md §0, §2), each switchable:
//  * CIS: at an anchor, exact q·K of every query head of the KV-head group over every key; the top
//    middle blocks by aggregated mass fill the budget (target mode: added in score order until
//    every head keeps ≥ 1 − δ*(1 − margin), up to max_resident_tokens); the top third of them are
//    dilated by ±r blocks. δ_a is exact. Later steps reuse the anchor's set while the worker gate
//    (worker_gate.h: the one statement of the reuse, short-context and sharing rules) passes; a
//    failing head re-anchors the whole group.
//  * PSAW: layer l ≥ l_s may select middle blocks only after the cut-off
//    P_l(t) = floor((1 − φ^(α(l − l_s)/(N − l_s))) · t), frozen at the anchor. In target mode the
//    cut moves back until the mass it drops is ≤ half of the allowance δ*(1 − margin).
//  * Layer sharing (§0.6): a layer with map[l] = s < l uses layer s's block set of the same step
//    and KV head (its blocks can be streamed before its query exists); no retrieval; δ unknown.
//
// Not thread-safe (one object per sequence).
#pragma once

#include <memory>
#include <vector>

#include "selector/options.h"
#include "selector/scoring.h"
#include "selector/selection.h"
#include "selector/worker_gate.h"

namespace kvm::sel {

// The block oracle per KV head by aggregated mass (§0.1, §0.7), scored every step.
class OracleSelector : public Selector {
 public:
  static Result<std::unique_ptr<OracleSelector>> Make(const SelectorOptions& o,
                                                      const ModelShape& shape,
                                                      uint64_t max_context);
  const char* name() const override { return "oracle"; }
  Status Select(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override { return opt_.cap_blocks(); }
  bool TakesScores() const override { return true; }

 private:
  OracleSelector(const SelectorOptions& o, const ModelShape& s) : opt_(o), shape_(s) {}
  SelectorOptions opt_;
  ModelShape shape_;
};

class PrhsSelector : public Selector {
 public:
  static Result<std::unique_ptr<PrhsSelector>> Make(const SelectorOptions& o,
                                                    const ModelShape& shape, uint64_t max_context);
  const char* name() const override { return "prhs"; }
  Status Select(const StepInput& in, Selection* out) override;
  Status Anchor(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override;
  bool TakesScores() const override { return true; }
  // The gate it decides reuse, short contexts and shared layers with; the layer map lives there.
  WorkerGate* gate() override { return &gate_; }
  // PSAW cut-off (tokens before it are not eligible, sinks excepted) for layer l at T tokens.
  uint64_t PsawCut(uint32_t layer, uint64_t T) const;

 private:
  PrhsSelector(const SelectorOptions& o, const ModelShape& s);
  Status SelectImpl(const StepInput& in, bool allow_reuse, Selection* out);
  Status AnchorStep(const StepInput& in, Selection* out);

  SelectorOptions opt_;
  ModelShape shape_;
  WorkerGate gate_;
};

}  // namespace kvm::sel
