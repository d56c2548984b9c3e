// Exact scoring of one GQA group against every key of its KV head, and δ of a block set.
// This is the full scoring pass that selectors.md §0.3 counts as one retrieval per query head.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "attention/reference.h"
#include "selector/selection.h"

namespace kvm::sel {

struct GroupScores {
  uint32_t group = 0;
  uint64_t tokens = 0;
  uint32_t block_size = 0;
  std::vector<float> logits;       // [group][tokens] scale · q·k
  std::vector<double> lse;         // [group] log Σ exp(logits) (double)
  std::vector<float> probs;        // [group][tokens] softmax of each query head over all tokens
  std::vector<double> block_mass;  // [group][blocks] Σ probs of the block's tokens, per head
  std::vector<double> agg;         // [blocks] aggregated mass: Σ over the group (§0.1)

  uint64_t blocks() const { return (tokens + block_size - 1) / block_size; }
  double mass(uint32_t head, uint64_t block) const { return block_mass[head * blocks() + block]; }
};

// Scores q[group][head_dim] against every key of kv (scale 1/sqrt(head_dim)): the logits, then
// CompleteScores.
GroupScores ScoreGroup(const float* q, uint32_t group, const attn::HeadKV& kv);
// Everything else from the logits (group, tokens, block_size and logits set; e.g. computed on a
// GPU): the softmax, lse, per-head block mass and aggregated mass.
void CompleteScores(GroupScores* s);

// log δ per query head of a resident block set: log Σ_{dropped} exp(logit) − log Σ_all exp(logit),
// in double from the logits, so a tiny δ is never rounded to 0 (−inf only when nothing is dropped).
// The δ bound needs this: e^{2ε} · δ_a must not start from a rounded-down δ_a.
std::vector<double> LogDeltaOf(const GroupScores& s, const std::vector<uint64_t>& blocks);
// δ per query head: exp(LogDeltaOf).
std::vector<double> DeltaOf(const GroupScores& s, const std::vector<uint64_t>& blocks);

// The key statistics of an anchor's δ bound (gate.h, forms (2) and (3)) into out->key_radius,
// split_dir and dropped_radius: R_μ over every key of kv (μ their mean), and per query head of
// s's group w = μ_D − μ_K and R_D for the resident `blocks` (ascending), with the anchor's
// attention from s's logits. Means in double; the radii upper bounds (attn::MaxDistanceBound: at
// most ~1e-5 relative above the exact ones), rounded up to float. s must score kv's tokens. Also
// out->log_delta, the bits of LogDeltaOf(s, blocks) (its dropped sums are the weights here).
void AnchorKeyStats(const GroupScores& s, const attn::HeadKV& kv,
                    const std::vector<uint64_t>& blocks, Selection* out);

// The block oracle (§0.1, §0.7): the forced blocks plus the `count` − |forced| other blocks of
// highest aggregated mass (ties to the lower index). Maximises the group's summed retained mass
// among sets of `count` blocks containing `forced`. Returns ascending blocks.
std::vector<uint64_t> OracleBlocks(const GroupScores& s, const std::vector<uint64_t>& forced,
                                   uint64_t count);

// Target mode: forced blocks, then eligible blocks in order of aggregated mass until every head's
// retained mass ≥ 1 − goal, at most `cap` blocks in all. eligible(b) says which blocks may be
// added. *met tells whether the goal was reached.
template <typename Eligible>
std::vector<uint64_t> FillToTarget(const GroupScores& s, std::vector<uint64_t> forced, double goal,
                                   uint64_t cap, Eligible eligible, bool* met);

}  // namespace kvm::sel

#include "selector/scoring_inl.h"
