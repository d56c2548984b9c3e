// PrHS (pre-hoc sparsity) and the block oracle, per sequence, in budget or target-δ mode.
//
// PrHS = CIS + PSAW + cross-layer index sharing (selectors.md §0, §2), each switchable:
//  * CIS: at an anchor, exact q·K of every query head of the KV-head group over every key; the top
//    middle blocks by aggregated mass fill the budget (target mode: added in score order until
//    every head keeps ≥ 1 − δ*(1 − margin), up to max_resident_tokens); the top third of them are
//    dilated by ±r blocks. δ_a is exact. Later steps reuse the anchor's set while the gate (gate.h)
//    passes for every head of the group and the cluster is shorter than max_cluster_steps; a
//    failing head re-anchors the whole group. On reuse steps everything from the anchor's first
//    window block on stays resident (blocks that left the window since the anchor), so the bound
//    holds; δ is `bound`.
//  * PSAW: layer l ≥ l_s may select middle blocks only after the cut-off
//    P_l(t) = floor((1 − φ^(α(l − l_s)/(N − l_s))) · t), frozen at the anchor. In target mode the
//    cut moves back until the mass it drops is ≤ half of the allowance δ*(1 − margin).
//  * Layer sharing (§0.6): a layer with map[l] = s < l uses layer s's block set of the same step
//  and
//    KV head (its blocks can be streamed before its query exists); no retrieval; δ is `unknown`.
// Short contexts (§0.9): when all blocks fit the budget everything is resident, δ = 0 (exact).
//
// Not thread-safe (one object per sequence).
#pragma once

#include <memory>
#include <vector>

#include "selector/gate.h"
#include "selector/scoring.h"
#include "selector/selection.h"

namespace kvm::sel {

struct SelectorOptions {
  // ---- behaviour ----
  Geometry geometry;  // block size, sinks, window. Default: B 16, 16 sinks, 64 window.
  // Resident tokens per (layer, KV head), sinks and window included; 0 = no budget (target mode
  // only). Trade-off: fewer tokens stream less and attend less, at a higher δ. Default: 0.
  uint64_t budget_tokens = 0;
  // Target dropped mass δ*; 0 = budget mode. Default: 0.
  double target_delta = 0;
  // Target mode cap on resident tokens (required when target_delta > 0). Default: 0.
  uint64_t max_resident_tokens = 0;
  // Target mode: anchors aim at δ ≤ δ*(1 − margin), leaving room for drift. Default: 0.5.
  double margin = 0.5;
  // ---- PrHS only ----
  double tau_cos = 0.8;  // cosine gate threshold in [−1, 1]. Default: 0.8 (paper).
  bool use_bound_gate =
      true;  // target mode: also re-anchor when the δ bound exceeds δ*. Default: on.
  int32_t dilation =
      -1;  // ±r blocks around the top third; −1 = auto (1 at B = 1, 0 at B ≥ 8, else 1).
  uint32_t max_cluster_steps =
      32;             // forced re-anchor after this many steps (0 = never). Default: 32.
  bool psaw = false;  // PSAW truncation. Default: off (with exact anchors it only trades δ for
                      // nothing at a fixed budget).
  uint32_t psaw_start_layer = 0;  // l_s; 0 = N/2.
  double psaw_phi = 0.5;          // φ ∈ (0, 1): deepest layer keeps φ^α of the context.
  double psaw_alpha = 1.0;        // α ≥ 0.
  bool layer_sharing = false;     // use the layer map (set with SetLayerMap). Default: off (§0.5).
  // ---- baselines (selectors.md §4, §0.8; budget mode only) ----
  uint32_t quest_dense_layers =
      2;  // Quest: layers below this are dense. Default: 2 (Quest's 0 and 1).
  uint32_t hshare_query_share = 2;  // HShare: a full retrieval every this many steps. Default: 2.
  int32_t hshare_shared_kv_heads =
      -1;  // HShare: KV heads that share another's set per layer; −1 = Hkv/2.
  int32_t hshare_shared_layers =
      -1;  // HShare: layers that share a shallower layer's set; −1 = L/2.
  // HShare label channels per (layer, query head), [layers * q_heads] lists of D/8 (≥ 4) channels,
  // from the calibration file (`kvmctl hshare-calibrate`). Required by hshare.
  std::vector<std::vector<uint32_t>> hshare_channels;
  double h2o_recent_frac =
      0.5;  // H2O: the recent share of the budget (heavy/recent 50/50). Default: 0.5.

  // InvalidArgument naming the field. `layers`: the model's layer count; `max_context`: its length.
  Status Validate(uint32_t layers, uint64_t max_context) const;
  uint64_t budget_blocks() const { return budget_tokens / geometry.block_size; }
  uint64_t cap_blocks() const;  // the most resident blocks a selection may have before extras
  int32_t DilationRadius() const;
};

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

// One (layer, KV head)'s anchor as a worker sees it in a retrieval reply: enough to decide reuse
// without the keys (DESIGN.md §4 step 2).
struct AnchorRecord {
  bool valid = false;              // false: no anchor yet (or a short-context selection)
  uint64_t step = 0;               // the anchor's step
  std::vector<uint64_t> resident;  // its resident blocks, ascending
};

// PrHS's reuse rule, one implementation for PrhsSelector and for a worker gating against the
// service's anchors. At `step` the reused set is the anchor's set + the sinks + every block from
// the anchor's first window block on; it is reused when the cluster is shorter than
// max_cluster_steps, the set fits `hot_set_slots`, and every head of the group passes its gate
// (`gates`: the group's heads, `q`: [group][head_dim]). Returns true and fills `out` (kind bound)
// on reuse.
bool PrhsReuse(const SelectorOptions& o, uint64_t hot_set_slots, const AnchorRecord& a,
               const HeadGate* gates, uint32_t group, uint32_t head_dim, const float* q,
               uint64_t step, Selection* out);

class PrhsSelector : public Selector {
 public:
  static Result<std::unique_ptr<PrhsSelector>> Make(const SelectorOptions& o,
                                                    const ModelShape& shape, uint64_t max_context);
  const char* name() const override { return "prhs"; }
  Status Select(const StepInput& in, Selection* out) override;
  Status Anchor(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override;
  bool TakesScores() const override { return true; }
  // The cross-layer sharing map: source[l] = l (no sharing) or a shallower layer. InvalidArgument
  // when a layer points to itself-or-deeper other than l, or the size is wrong.
  Status SetLayerMap(const std::vector<uint32_t>& source);
  // PSAW cut-off (tokens before it are not eligible, sinks excepted) for layer l at T tokens.
  uint64_t PsawCut(uint32_t layer, uint64_t T) const;
  // The layer map in use (identity until SetLayerMap) and whether layer sharing is on.
  const std::vector<uint32_t>& layer_map() const { return layer_map_; }
  bool layer_sharing() const { return opt_.layer_sharing; }
  // The gate state of (layer, query head) after its last anchor (what a worker would hold).
  const HeadGate& gate(uint32_t layer, uint32_t q_head) const;

 private:
  struct HeadState {
    AnchorRecord anchor;
    std::vector<uint64_t> last;       // the resident set of the last step (for sharing layers)
    uint64_t last_step = UINT64_MAX;  // the step `last` belongs to
  };
  PrhsSelector(const SelectorOptions& o, const ModelShape& s);
  HeadState& state(uint32_t l, uint32_t kvh) { return heads_[size_t{l} * shape_.kv_heads + kvh]; }
  HeadGate& gate_mut(uint32_t l, uint32_t qh) { return gates_[size_t{l} * shape_.q_heads + qh]; }
  Status SelectImpl(const StepInput& in, bool allow_reuse, Selection* out);
  Status AnchorStep(const StepInput& in, HeadState& a, Selection* out);

  SelectorOptions opt_;
  ModelShape shape_;
  std::vector<HeadState> heads_;  // [layer][kv_head]
  std::vector<HeadGate> gates_;   // [layer][q_head]
  std::vector<uint32_t> layer_map_;
};

// Selector factory by name: "oracle", "prhs", "quest", "hshare", "streaming", "h2o".
Result<std::unique_ptr<Selector>> MakeSelector(const std::string& name, const SelectorOptions& o,
                                               const ModelShape& shape, uint64_t max_context);

}  // namespace kvm::sel
