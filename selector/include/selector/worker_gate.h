// The worker gate: the one place that decides, per (step, layer, KV head), whether a selection can
// be had without scoring any key (DESIGN.md §4 step 2), and that keeps the anchor record it decides
// against. PrhsSelector (in-process), the in-process KV source and the service KV source all call
// it; the service's retrieval engine asks it which layers share a layer's index set.
//
// Outcomes, in the order they are tried:
//   dense_layer    the layer is one of the first SelectorOptions::dense_layers: every block, held
//                  by the worker itself (never trimmed), δ = 0, exact; never a retrieval;
//   short_context  every block of the context fits the cap (options.h IsShortContext, §0.9):
//                  everything resident, δ = 0, exact;
//   shared_layer   PrHS layer sharing (§0.6): the layer uses its source layer's set of the same
//   step
//                  plus its own sinks and window; δ unknown; never a retrieval;
//   reuse          PrHS CIS: the anchor's set + the sinks + every block from the anchor's first
//                  window block on, while the cluster is shorter than max_cluster_steps and than
//                  the anchor's measured horizon (Selection::reuse_steps), the set fits the hot
//                  set, and every query head of the group passes its gate (gate.h: cosine ≥ τ_cos
//                  and, in target mode for a head whose anchor met δ*, the δ bound ≤ δ*; for a
//                  head whose anchor missed δ* because the cap bound, no bound limit — prhs.h
//                  "When the cap binds"); δ is the bound, target_met whether every head's bound
//                  is ≤ δ*;
//   retrieve       none of the above: the caller gets the selection scored (in-process, or by the
//                  service) and hands it back with Record, which makes it the new anchor.
// A selector without a gate (registry caps: has_gate false) gets dense_layer or `retrieve`.
//
// The layer map is built here too, from the last prefill queries (layer_map.h PrefillQueries) and
// the prefill KV, with the constants of LayerMapOptions.
//
// Not thread-safe: one object per sequence.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "proto/model_shape.h"
#include "selector/gate.h"
#include "selector/layer_map.h"
#include "selector/options.h"
#include "selector/registry.h"

namespace kvm::sel {

enum class GateOutcome : uint8_t {
  kReuse = 0,
  kRetrieve = 1,
  kSharedLayer = 2,
  kShortContext = 3,
  kDenseLayer = 4
};
inline constexpr std::array<GateOutcome, 5> kGateOutcomes = {
    GateOutcome::kReuse, GateOutcome::kRetrieve, GateOutcome::kSharedLayer,
    GateOutcome::kShortContext, GateOutcome::kDenseLayer};
// "reuse", "retrieve", "shared_layer", "short_context", "dense_layer" (the `result` label of
// kvm_gate_checks_total).
const char* GateOutcomeName(GateOutcome o);

// What the δ bound did at the query-head checks against a valid anchor (gate.h): how often it
// stayed within its limit, and the same for today's K_max form, for comparisons.
struct BoundStats {
  uint64_t checks = 0;      // query-head checks against a valid anchor
  uint64_t cosine_ok = 0;   // ... whose cosine passed τ_cos
  uint64_t pass = 0;        // ... whose bound was within the head's limit (target mode)
  uint64_t pass_norm = 0;   // ... whose form-(1) bound would have been (today's gate)
  uint64_t cap_checks = 0;  // checks of heads whose anchor missed δ* (the cap bound)
  double sum_bound = 0, sum_bound_norm = 0;  // over `checks`
};

// Decisions per outcome, and per (layer, KV head) the query heads retrieved.
struct GateCounts {
  std::array<uint64_t, kGateOutcomes.size()> n{};
  BoundStats bound;
  // Target mode: (step, layer, KV head) selections, anchors and reuse, whose claim says the target
  // was missed (target_met false).
  uint64_t target_missed = 0;
  std::vector<uint64_t> retrieved;  // [layer][kv_head]: Σ Selection::retrieved_heads recorded
  uint64_t& operator[](GateOutcome o) { return n[static_cast<size_t>(o)]; }
  uint64_t operator[](GateOutcome o) const { return n[static_cast<size_t>(o)]; }
  uint64_t total() const {
    uint64_t t = 0;
    for (uint64_t x : n) t += x;
    return t;
  }
};

// One (layer, KV head)'s anchor as the worker holds it.
struct AnchorRecord {
  bool valid = false;              // false: no anchor yet (or a short-context selection)
  uint64_t step = 0;               // the anchor's step
  std::vector<uint64_t> resident;  // its resident blocks, ascending
  uint32_t reuse_steps = 0;        // its measured horizon (Selection::reuse_steps)
  bool target_met = true;          // target mode: every head's exact δ_a ≤ δ*
};

class WorkerGate {
 public:
  // `entry`: the selector's registry entry (its gate capability, its default dense layers);
  // `hot_set_slots`: the capacity a reused set must fit (the selector's HotSetSlots()).
  WorkerGate(const SelectorOptions& o, const ModelShape& shape, const SelectorEntry& entry,
             uint64_t hot_set_slots);

  // Decides for (step, layer, kv_head); q: the group's post-RoPE queries [group][head_dim] (may be
  // null for a shared layer). On every outcome but kRetrieve, *out is the selection (and it becomes
  // this (layer, KV head)'s last set). allow_reuse false: the caller re-anchors on request (the
  // service), so only short contexts and shared layers are decided. FailedPrecondition when a
  // shared layer's source has not selected at this step.
  Result<GateOutcome> Decide(uint64_t step, uint32_t layer, uint32_t kv_head, const float* q,
                             bool allow_reuse, Selection* out);
  // Takes the selection a retrieval returned for (step, layer, kv_head). An anchor (s.anchor)
  // becomes the anchor record: its set, its horizon (s.reuse_steps), whether it met δ* (from
  // s.LogDelta), and per query head q (the group's queries, the ones the worker sent, kept in
  // fp32), log δ (s.LogDelta), K_max and the key statistics of the bound (s.key_radius,
  // split_dir, dropped_radius: gate.h). Everything the gate decides with comes from s, so a
  // selection that crossed a wire with these fields decides exactly as in-process. Anything else
  // only becomes the last set.
  void Record(uint64_t step, uint32_t layer, uint32_t kv_head, const float* q, const Selection& s);
  // Forgets every anchor and last set (a new hot set); keeps the layer map.
  void Reset();

  // ---- cross-layer sharing (§0.6) ----
  // source[l] = l (no sharing) or a shallower layer. InvalidArgument for a wrong size or a layer
  // pointing to itself-or-deeper other than l.
  Status SetLayerMap(const std::vector<uint32_t>& source);
  // The layer map from the last prefill queries over the prefill KV (`views(layer)`: one HeadKV per
  // KV head holding the first `context` tokens), with LayerMapOptions; then SetLayerMap.
  Status BuildLayerMap(const PrefillQueries& queries, uint64_t context,
                       const std::function<std::vector<attn::HeadKV>(uint32_t layer)>& views);
  const std::vector<uint32_t>& layer_map() const { return layer_map_; }
  bool layer_sharing() const { return opt_.prhs.layer_sharing && has_gate_; }
  // Whether `layer` is one of the dense layers (every block, held by the worker).
  bool DenseLayer(uint32_t layer) const { return layer < dense_layers_; }
  // Whether `layer` takes its set from another layer.
  bool SharesLayer(uint32_t layer) const;
  // The deeper layers that take `layer`'s set (their blocks travel in its batch, ahead of their
  // queries), ascending.
  std::vector<uint32_t> SharingLayers(uint32_t layer) const;
  // A sharing layer's selection at T tokens from its source's set: the source's blocks + the sinks
  // + the window (δ unknown). The one statement of the sharing rule.
  Selection SharedSelection(const std::vector<uint64_t>& source_blocks, uint64_t T) const;

  // The gate state of (layer, query head) after its last anchor (what a worker holds).
  const HeadGate& head_gate(uint32_t layer, uint32_t q_head) const {
    return gates_[size_t{layer} * shape_.q_heads + q_head];
  }
  const AnchorRecord& anchor(uint32_t layer, uint32_t kv_head) const {
    return heads_[size_t{layer} * shape_.kv_heads + kv_head].anchor;
  }
  const GateCounts& counts() const { return counts_; }
  // A caller that retries a step decides it again: it puts back the counts it had before the
  // failed attempt, so every (step, layer, KV head) counts once.
  void RestoreCounts(const GateCounts& c) { counts_ = c; }
  const SelectorOptions& options() const { return opt_; }

 private:
  struct Head {
    AnchorRecord anchor;
    std::vector<uint64_t> last;       // the resident set of the last decided step
    uint64_t last_step = UINT64_MAX;  // the step `last` belongs to
  };
  Head& head(uint32_t l, uint32_t kvh) { return heads_[size_t{l} * shape_.kv_heads + kvh]; }
  bool Reuse(const Head& hd, uint32_t layer, uint32_t kv_head, const float* q, uint64_t step,
             Selection* out);

  SelectorOptions opt_;
  ModelShape shape_;
  bool has_gate_;
  uint32_t dense_layers_;
  uint64_t slots_;
  std::vector<Head> heads_;      // [layer][kv_head]
  std::vector<HeadGate> gates_;  // [layer][q_head]
  std::vector<uint32_t> layer_map_;
  GateCounts counts_;
};

}  // namespace kvm::sel
