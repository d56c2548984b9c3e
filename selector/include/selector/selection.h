// Common vocabulary of selector/: the geometry of sinks and the recent window in blocks, the
// per-block key summaries the store maintains on append, one step's input and one step's selection,
// and the Selector interface every selector (PrHS, oracle, baselines) implements.
//
// Granularity (selectors.md §0.1): selection, residency and transfer are per (step, layer, KV
// head), in blocks of B tokens (block b = tokens [bB, (b+1)B)). The budget counts resident tokens =
// resident blocks × B, sinks and window included. Pure data and pure functions; a Selector object
// holds one sequence's state and is not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "attention/reference.h"
#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::sel {

struct GroupScores;  // selector/scoring.h
class WorkerGate;    // selector/worker_gate.h

// Sinks and recent window, in tokens, mapped to blocks.
struct Geometry {
  uint32_t block_size = 16;     // B
  uint32_t sink_tokens = 16;    // the first tokens, always resident
  uint32_t window_tokens = 64;  // the last tokens, always resident (the worker keeps them locally)

  uint64_t Blocks(uint64_t T) const { return (T + block_size - 1) / block_size; }
  uint64_t SinkBlocks(uint64_t T) const {
    const uint64_t s = (uint64_t{sink_tokens} + block_size - 1) / block_size;
    return s < Blocks(T) ? s : Blocks(T);
  }
  // First block of the window [T - window, T); the window runs to the last (maybe partial) block.
  uint64_t WindowFirstBlock(uint64_t T) const {
    return T > window_tokens ? (T - window_tokens) / block_size : 0;
  }
  // The most blocks the window can span as T moves (it is ragged at both ends): reserved in the
  // budget.
  uint64_t MaxWindowBlocks() const {
    return window_tokens == 0 ? 0 : (window_tokens - 1) / block_size + 2;
  }
  uint64_t MaxSinkBlocks() const { return (uint64_t{sink_tokens} + block_size - 1) / block_size; }
  bool IsForced(uint64_t b, uint64_t T) const {
    return b < SinkBlocks(T) || b >= WindowFirstBlock(T);
  }
  Status Validate() const;
};

// Per-block key summaries of one (layer, KV head), maintained incrementally on append:
// the largest key norm of each block (for K_max of the δ bound) and, when asked for, the
// per-channel min and max of each block (Quest's page bound).
class HeadSummaries {
 public:
  HeadSummaries(uint32_t block_size, uint32_t head_dim, bool minmax = false)
      : B_(block_size), D_(head_dim), minmax_(minmax) {}
  // Adds the key of token `token` (== tokens() unless re-appending a known position; fp32
  // [head_dim]).
  void Append(uint64_t token, const float* k);
  uint64_t tokens() const { return tokens_; }
  float block_max_norm(uint64_t b) const { return max_norm_[b]; }
  float max_norm() const { return running_max_; }  // over every token appended so far
  bool has_minmax() const { return minmax_; }
  const float* block_min(uint64_t b) const { return &min_[b * D_]; }  // [head_dim]
  const float* block_max(uint64_t b) const { return &max_[b * D_]; }  // [head_dim]
  // Drops everything from token `length` on (truncate). Block maxima of a cut block are recomputed
  // by the caller re-appending its remaining rows; here they are reset conservatively.
  void Truncate(uint64_t length);
  // A copy without the per-channel min/max (tokens, block and running max norms only): what every
  // reader but a channel-bound one needs, at 1/(2·head_dim + 1) of the size.
  HeadSummaries NormsOnly() const {
    HeadSummaries h(B_, D_, false);
    h.tokens_ = tokens_;
    h.running_max_ = running_max_;
    h.max_norm_ = max_norm_;
    return h;
  }

 private:
  uint32_t B_, D_;
  bool minmax_;
  uint64_t tokens_ = 0;
  float running_max_ = 0.f;
  std::vector<float> max_norm_, min_, max_;
};

// One (step, layer, KV head) to select for.
struct StepInput {
  uint64_t step = 0;  // position of the current token; T = step + 1 tokens exist
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  const float* q = nullptr;          // [group][head_dim] fp32 post-RoPE queries of the group
  const attn::HeadKV* kv = nullptr;  // keys/values of this (layer, KV head), T tokens
  const HeadSummaries* summaries = nullptr;
  // Optional: computes the exact scores of q against every key of this (layer, KV head) where the
  // keys live (the service's GPU tier), called only when the selector needs them (never for a
  // short context). A selector whose TakesScores() is true then does not read kv (which may be
  // null; summaries must then cover every token).
  const std::function<Status(GroupScores*)>* score = nullptr;
  // Optional, with score: the keys of this (layer, KV head), fetched where they live when the
  // selector needs them after scoring (PrHS's anchor statistics for the worker's δ bound). Without
  // kv and keys an anchor carries k_max alone (its bound is then today's form (1)).
  const std::function<Result<const attn::HeadKV*>()>* keys = nullptr;
  uint64_t tokens() const { return step + 1; }
};

// What a selector decided for one (step, layer, KV head).
struct Selection {
  std::vector<uint64_t> blocks;  // resident blocks, ascending (sinks and window included)
  uint32_t retrieved_heads = 0;  // query heads that got a full scoring pass this step (§0.3)
  std::vector<double> delta;     // per query head of the group
  // log δ per query head where it is known more precisely than log(delta) (anchors: from the
  // logits, so a tiny δ is never rounded to 0; the gate's bound needs it). Empty: log(delta).
  std::vector<double> log_delta;
  DeltaKind kind = DeltaKind::kUnknown;
  bool target_met = true;  // target-δ mode: every head's δ ≤ δ* (false: the cap was hit)
  bool anchor = false;     // this step re-anchored
  float k_max = 0.f;       // anchors: max key norm over the scored candidates
  // Anchors: the key statistics of the δ bound (gate.h, forms (2) and (3)), computed exactly from
  // the candidate keys and the anchor's attention; present iff split_dir has group × head_dim
  // numbers (empty when the selector scored without the keys: the worker's bound then uses k_max
  // alone). Like k_max and log_delta they travel to the worker with the anchor, and its gate takes
  // them from here (WorkerGate::Record). The mean key μ itself is not needed: its shift cancels.
  float key_radius = 0.f;        // R_μ = max over the candidates of ‖k_j − μ‖ (rounded up)
  std::vector<float> split_dir;  // [group][head_dim] per query head w = μ_D − μ_K
  std::vector<float> dropped_radius;  // [group] per query head R_D (rounded up)
  // Anchors: the steps the worker may reuse this set for (steps before step + reuse_steps), the
  // measured horizon of prhs.h; 0 = up to max_cluster_steps. Travels with the anchor.
  uint32_t reuse_steps = 0;
  uint64_t extra_blocks = 0;  // blocks beyond the budget (dilation, blocks that left the window)

  uint64_t resident_tokens(uint32_t B) const { return blocks.size() * uint64_t{B}; }
  double LogDelta(uint32_t head) const;  // log_delta[head] when given, else log(delta[head])
};

class Selector {
 public:
  virtual ~Selector() = default;
  virtual const char* name() const = 0;
  // Selects for one (step, layer, KV head). Steps come in order; within a step, layers ascend.
  virtual Status Select(const StepInput& in, Selection* out) = 0;
  // A selection without reusing an earlier anchor: what the service runs when a worker's own gate
  // failed (DESIGN.md §4 step 3). Default: Select (selectors without a gate select every step).
  virtual Status Anchor(const StepInput& in, Selection* out) { return Select(in, out); }
  // Hot-set slots per (layer, KV head) this selector may need: budget/B + documented extras.
  virtual uint64_t HotSetSlots() const = 0;
  // Whether StepInput::score may replace kv (selectors whose only use of the keys is the exact
  // scoring pass and the summaries: PrHS and the oracle). The registry states the same capability.
  virtual bool TakesScores() const { return false; }
  // The pre-hoc gate this selector decides reuse with (worker_gate.h), or null when it has none.
  virtual WorkerGate* gate() { return nullptr; }
  // The attention a query of (layer, KV head) gave `blocks`: mass[i] = Σ over the group's query
  // heads of the attention of blocks[i] — at decode, this step's selection and the attention it
  // received; at prefill, every block of the causal range and each prefill query's attention (H2O
  // accumulates both). Only selectors whose registry entry says observes_attention use it (H2O);
  // the default ignores it.
  virtual Status Observe(uint32_t layer, uint32_t kv_head, const std::vector<uint64_t>& blocks,
                         const std::vector<double>& mass) {
    (void)layer, (void)kv_head, (void)blocks, (void)mass;
    return Status::Ok();
  }
};

// ---- Shared helpers ----
// Sorted union of two ascending block lists.
std::vector<uint64_t> MergeBlocks(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b);
// Blocks [first, last) appended to an ascending list `out` (deduplicated).
void AddRange(uint64_t first, uint64_t last, std::vector<uint64_t>* out);

}  // namespace kvm::sel
