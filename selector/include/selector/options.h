// The options of a sequence's selector: the part every selector shares (geometry, budget, target)
// and one struct per selector family. The wire converter (wire_options.h), kvmctl's flags and the
// registry (registry.h) map one-to-one onto these structs. Plain data; thread-safe to copy.
#pragma once

#include <cstdint>
#include <vector>

#include "proto/status.h"
#include "selector/selection.h"

namespace kvm::sel {

// How the worker builds the cross-layer sharing map at the end of prefill (selectors.md §0.6).
struct LayerMapOptions {
  // The last prefill queries whose exact top-k sets are compared across layers. Cost O(W · T) per
  // head at the end of prefill. Default: 64 (§0.6).
  uint32_t window_queries = 64;
  // The top-k fraction of each query's causal range kept in its mask when there is no budget
  // (target mode); in budget mode the fraction is budget / context. Default: 1/8.
  double keep_frac = 0.125;
  // Layer pairs that share (at most layers − 1); −1 = half the layers, as HShare. Default: −1.
  int32_t shared_layers = -1;
};

// Which forms of the δ bound the gate may use (gate.h): each is sound, the gate takes the least.
enum class BoundForm : uint8_t {
  kNorm = 0,     // (1) ε = ‖Δq‖·K_max/√d: the bound of selectors.md §0.4
  kCentred = 1,  // (1) and (2), the μ-centred radius
  kSplit = 2,    // (1), (2) and (3), the dropped/kept split
};

// PrHS (CIS + PSAW + cross-layer sharing), prhs.h.
struct PrhsOptions {
  // Cosine gate threshold in [−1, 1]: re-anchor when a head's query turns further than this from
  // its anchor's. −1 = off. Trade-off: higher re-anchors more often for a fresher set. Default: −1
  // (prhs.h: on real models the paper's 0.8 fails at most steps and buys little δ per retrieval).
  double tau_cos = -1.0;
  bool use_bound_gate = true;  // target mode: also re-anchor when the δ bound exceeds δ*.
  // The bound's forms. Trade-off: none for the worker (its gate is O(D) per head either way); the
  // service computes the statistics at an anchor in O(g·T·D), as its scoring pass, and sends
  // g·D + g + 1 numbers with it (the worker reads them whatever the form). Default: kSplit.
  BoundForm bound = BoundForm::kSplit;
  int32_t dilation = -1;  // ±r blocks around the top third; −1 = auto (1 below B 8, else 0).
  // Forced re-anchor after this many steps; 0 = auto: a third of the cap in tokens (budget, or
  // max_resident_tokens in target mode), at least 1 and at most 32. Trade-off: a longer cluster
  // retrieves less, holds the set longer (staler) and keeps more blocks that left the window (the
  // bound needs them resident; they count in the attended fraction): the auto value keeps those at
  // about 1/6 of the cap on average. UINT32_MAX = never. Default: 0 (auto).
  uint32_t max_cluster_steps = 0;
  // The measured reuse horizon (prhs.h), > 0 turns it on: at each anchor the previous anchor's set
  // is scored exactly against the new queries; when re-anchoring bought little — budget mode: at
  // most this much mass (group mean of δ_old − δ_new); target mode: no head brought within δ* that
  // the old set left out — the next anchor may be reused twice as long, else half as long
  // (8 .. MaxClusterSteps() steps). 0 = off: every anchor may be reused for MaxClusterSteps().
  // Trade-off: smaller spends more retrievals for a lower δ. Default: 0 (off; prhs.h says why).
  double reuse_regret = 0;
  // Target mode, when the cap binds (prhs.h): a head whose anchor missed δ* is reused under the
  // cosine gate and the horizon, without a bound limit (true), or its group re-anchors at every
  // step (false). Trade-off: far fewer retrievals for a few points of within-target. Default: true.
  bool cap_reuse = true;
  // Reuse an anchor's set for as long as it fits the hot set, with no cosine, bound, horizon or
  // cluster limit (δ unknown): for exact correction at every step (client/ Correction::kAlways),
  // where the selection no longer decides the output, only how much the service attends, so
  // re-anchoring only costs round trips and streamed blocks. Refused without that correction.
  // Default: false.
  bool reuse_while_fits = false;
  bool psaw = false;  // PSAW truncation. Default: off (with exact anchors it only trades δ for
                      // nothing at a fixed budget).
  uint32_t psaw_start_layer = 0;  // l_s; 0 = N/2.
  double psaw_phi = 0.5;          // φ ∈ (0, 1): the deepest layer keeps φ^α of the context.
  double psaw_alpha = 1.0;        // α ≥ 0.
  bool layer_sharing = false;     // use the layer map (the gate builds it). Default: off (§0.5).
  LayerMapOptions layer_map;
};

// HShare (selectors.md §4.1, §0.8; in-process only).
struct HShareOptions {
  uint32_t query_share = 2;      // a full retrieval every this many steps. Default: 2.
  int32_t shared_kv_heads = -1;  // KV heads that share another's set per layer; −1 = Hkv/2.
  int32_t shared_layers = -1;    // layers that share a shallower layer's set; −1 = L/2.
  // Label channels per (layer, query head), [layers * q_heads] lists of D/8 (≥ 4) channels, from
  // the calibration file (`kvmctl hshare-calibrate`). Required.
  std::vector<std::vector<uint32_t>> channels;
};

// H2O (selectors.md §4.4; in-process only).
struct H2oOptions {
  double recent_frac = 0.5;  // the recent share of the budget (heavy/recent 50/50). Default: 0.5.
};

struct SelectorOptions {
  // ---- shared by every selector ----
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
  // Layers [0, N) keep every block on the worker: no selection, no retrieval, no streaming; they
  // count in full as attended and in the worker's memory. −1 = the selector's own default
  // (registry.h: Quest 2, as Quest keeps layers 0 and 1 dense; every other selector 0).
  int32_t dense_layers = -1;
  // ---- per selector family ----
  PrhsOptions prhs;
  HShareOptions hshare;
  H2oOptions h2o;

  // InvalidArgument naming the field. `layers`: the model's layer count; `max_context`: its length.
  Status Validate(uint32_t layers, uint64_t max_context) const;
  uint64_t budget_blocks() const { return budget_tokens / geometry.block_size; }
  uint64_t cap_blocks() const;  // the most resident blocks a selection may have before extras
  int32_t DilationRadius() const;
  // PrhsOptions::max_cluster_steps resolved (auto, never = UINT32_MAX).
  uint32_t MaxClusterSteps() const;
  // A short context (selectors.md §0.9): every block of T tokens fits the cap, so everything is
  // resident (δ = 0, exact). The one statement of the rule.
  bool IsShortContext(uint64_t T) const { return geometry.Blocks(T) <= cap_blocks(); }
};

}  // namespace kvm::sel
