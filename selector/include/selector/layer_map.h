// The cross-layer sharing map (selectors.md §0.6): built by the worker at the end of prefill from
// the exact scores of its last W prefill queries, greedily as HShare builds its layer map, and sent
// to the service ("set layer map"). source[l] == l: layer l selects itself; source[l] < l: it
// reuses layer source[l]'s block set. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "attention/reference.h"
#include "proto/status.h"
#include "selector/options.h"

namespace kvm::sel {

// Keep mask of one layer: for each query head h and each of the W queries (positions T−W .. T−1),
// which tokens are in that query's exact top-k (k = ceil(frac · (p+1)), over its causal range [0,
// p]).
//   q:  [W][q_heads][head_dim] post-RoPE queries, oldest first
//   kv: one HeadKV per KV head holding the layer's T prefill tokens
// Returns [q_heads][W][T] of 0/1. Cost O(W · T) per head.
std::vector<uint8_t> KeepMask(const float* q, uint32_t W, uint32_t q_heads,
                              const std::vector<attn::HeadKV>& kv, double frac);

// Greedy map: overlap(i, j) = |keep_i ∧ keep_j| / |keep_i| for j < i; repeatedly the pair with the
// highest overlap makes layer i share layer j (re-pointed to j's own source), then i can neither be
// re-mapped nor become a source. `shared_layers` pairs (at most layers − 1). Layer 0 never shares.
// InvalidArgument when the masks differ in size or are empty.
Result<std::vector<uint32_t>> BuildLayerMap(const std::vector<std::vector<uint8_t>>& keep,
                                            uint32_t shared_layers);

// The last W queries of every layer's prefill ([layer][W][q_heads][head_dim] fp32), collected as
// the prefill runs: what the keep masks above are built from (PrHS's layer map, HShare's maps).
class PrefillQueries {
 public:
  // W = min(window, prefill); prefill: the prompt length (positions [prefill − W, prefill) are
  // kept).
  PrefillQueries(uint32_t layers, uint32_t q_heads, uint32_t head_dim, uint32_t window,
                 uint64_t prefill);
  // q: [q_heads][head_dim] of the token at `pos` in `layer`; kept when pos is among the last W.
  void Observe(uint32_t layer, uint64_t pos, const float* q);
  uint32_t window() const { return W_; }
  uint32_t q_heads() const { return Hq_; }
  const float* layer(uint32_t l) const { return q_[l].data(); }  // [W][q_heads][head_dim]

 private:
  uint32_t W_, Hq_, D_;
  uint64_t prefill_;
  std::vector<std::vector<float>> q_;
};

// The top-k fraction of the keep masks: budget / context in budget mode, else
// LayerMapOptions::keep_frac.
double KeepFraction(const SelectorOptions& o, uint64_t context);
// One keep mask per layer (KeepMask) from the collected queries over the prefill KV: views(layer)
// gives one HeadKV per KV head holding the first `context` tokens.
std::vector<std::vector<uint8_t>> PrefillKeepMasks(
    const PrefillQueries& q, uint32_t layers, double frac,
    const std::function<std::vector<attn::HeadKV>(uint32_t layer)>& views);

}  // namespace kvm::sel
