// PrHS (pre-hoc sparsity) and the block oracle, per sequence, in budget or target-δ mode.
//
// PrHS = CIS + PSAW + cross-layer index sharing (selectors.md §0, §2), each switchable:
//  * CIS: at an anchor, exact q·K of every query head of the KV-head group over every key; the top
//    middle blocks by aggregated mass fill the budget (target mode: added in score order until
//    every head keeps ≥ 1 − δ*(1 − margin), up to max_resident_tokens); the top third of them are
//    dilated by ±r blocks. δ_a is exact, and so are the key statistics of the worker's δ bound
//    (gate.h). Later steps reuse the anchor's set while the worker gate (worker_gate.h: the one
//    statement of the reuse, short-context and sharing rules) passes; a failing head re-anchors the
//    whole group.
//  * PSAW: layer l ≥ l_s may select middle blocks only after the cut-off
//    P_l(t) = floor((1 − φ^(α(l − l_s)/(N − l_s))) · t), frozen at the anchor. In target mode the
//    cut moves back until the mass it drops is ≤ half of the allowance δ*(1 − margin).
//  * Layer sharing (§0.6): a layer with map[l] = s < l uses layer s's block set of the same step
//    and KV head (its blocks can be streamed before its query exists); no retrieval; δ unknown.
//
// ---- How long an anchor is reused --------------------------------------------------------------
// A cluster ends at the first of: a head's cosine with its anchor query below τ_cos; its δ bound
// above the limit (target mode, an anchor that met δ*); the set outgrowing the hot set; the
// anchor's horizon, Selection::reuse_steps, which travels with it. The horizon is
// SelectorOptions::MaxClusterSteps() (auto: a third of the cap in tokens, 1..32), or with
// reuse_regret > 0 the measured horizon: at each anchor the previous anchor's reuse set is scored
// exactly against the new queries (the scores are there anyway); if re-anchoring paid (budget mode:
// more than reuse_regret of mass, group mean δ_old − δ_new; target mode: a head brought within δ*
// that the old set left out) the next horizon halves, else it doubles (from kMinHorizon = 8,
// within 8..MaxClusterSteps(): never more than HShare's one retrieval per 8 steps). The service
// and an in-process selector see the same anchors, so both compute the same horizons
// (reuse_regret must travel in SelectorParams).
//
// ---- When the cap binds (target mode) ----------------------------------------------------------
// An anchor whose fill reached max_resident_tokens before every head kept 1 − δ*(1 − margin) may
// leave some head's exact δ_a above δ* (target_met false). Re-anchoring that head at the next step
// meets the same cap, so no set within the cap is known to bring it within δ*. The rule, per query
// head of the group (PrhsOptions::cap_reuse, on by default):
//   * a head whose anchor met δ* (δ_a ≤ δ*) is reused only while its bound stays ≤ δ*, as always,
//     so reuse never takes a head out of target that its anchor had in it;
//   * a head whose anchor missed δ* is reused while it passes the cosine gate, with no bound limit;
//   * the group is reused while every head is, within the anchor's horizon and the hot set.
// Every reuse claim is the sound bound (kind bound, never below the measured δ) and says
// target_met false when some head's bound exceeds δ*. cap_reuse off re-anchors a group at every
// step while its anchor missed δ* (the behaviour before issue 23). Measured against always
// re-anchoring in bench/RESULTS.md ("Fidelity: the frontier"): far fewer retrievals for a few
// points of within-target.
//
// ---- Defaults, and why (bench/RESULTS.md "Fidelity: the frontier", two models, two budgets) -----
//  * τ_cos −1 (off). On both committed models a head's post-RoPE query has cosine 0.43–0.46 with
//    the previous step's on average; the paper's 0.8 re-anchors at 0.87–0.95 of (step, layer,
//    query head) for a δ within 1.01× of the oracle's, while a set reused for 32 steps loses only
//    0.01–0.02 of mass at 1/8 (exact anchors): the cosine buys little δ per retrieval.
//  * max_cluster_steps auto (a third of the cap, ≤ 32): blocks that leave the window during a
//    cluster stay resident (the bound needs them), so the attended fraction grows (measured: 1.09×
//    HShare's at 1/8 and 1/16 on both models; at most by a third of the cap at a cluster's end),
//    within the 1.25× that matched cost allows; 32 steps at most, so a large budget does not hold
//    a set for hundreds of steps.
//  * reuse_regret 0 (off): with its floor of 8 steps the measured horizon (ρ 0.05) moved δ by
//    −0.009 to +0.006 for 1.1–1.6× the retrievals of the fixed cap (without the floor it reached a
//    lower δ, at up to 0.12 retrievals per step: no longer safely below HShare's on every model).
//  * layer sharing, PSAW, dense layers off: sharing halves retrievals at a δ worse by 0.002–0.018;
//    PSAW changes δ by ≤ 0.001 with exact anchors; a dense layer attends its whole context (1/L of
//    the model's attention: 2.5–5.5× HShare's attended fraction here), far past matched cost.
//  * the split bound (gate.h): sound, and the least of its three forms — but on the real models a
//    one-step drift moves the dropped tokens' logits by about ±4.5 (median, measured per token on
//    models/austen) and a bound that never sees those keys must allow ±14 (‖Δ‖·R_D), so no such
//    bound is small there: it rarely lets a met anchor be reused in target mode.
//  * margin 0.5: with reuse this rare it mostly buys accuracy (top-1 0.99 against 0.96 at margin
//    0 on models/austen) at an attended fraction 1.15× the target-mode oracle's.
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
  // The measured horizon of (in.layer, in.kv_head) updated from what this anchor bought over the
  // previous one, into out->reuse_steps.
  void UpdateHorizon(const StepInput& in, const GroupScores& s, Selection* out);
  uint32_t MaxHorizon() const;

  // The measured horizon's floor (and start): at most one retrieval per 8 steps, HShare's own rate
  // (1/2 query × 1/2 KV-head × 1/2 layer sharing), unless MaxClusterSteps() is smaller.
  static constexpr uint32_t kMinHorizon = 8;

  SelectorOptions opt_;
  ModelShape shape_;
  WorkerGate gate_;
  std::vector<uint32_t> horizon_;  // [layer][kv_head]: steps the next anchor may be reused for
};

}  // namespace kvm::sel
