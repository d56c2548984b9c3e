// The baselines (selectors.md §4 with the decisions of §0): Quest, HShare, StreamingLLM and H2O, on
// the Selector interface, at block granularity (B = 1 is token granularity), budget mode only.
//  * quest: per block (= page) the channel-wise min/max of the keys (HeadSummaries with minmax);
//  the
//    page upper bound U = scale · Σ_c max(q_c M_c, q_c m_c) per query head; the group score of a
//    page is the sum over the group of each head's softmax over pages of U (§0.8); the top pages
//    fill the budget; layers below dense_layers (by default Quest's 2) are dense. One retrieval per
//    query head per (sparse) step. δ unknown.
//  * hshare: label-channel scores q[ch]·k[ch]/sqrt(|ch|) (channels calibrated per model); the
//  budget
//    split sink : heavy : local = 8 : 88 : 32; a full retrieval every hshare_query_share steps;
//    KV-head and layer sharing maps built greedily at prefill (SetShareMaps); in-process only. δ
//    unknown.
//  * streaming: sinks + the most recent blocks filling the budget; no retrieval. δ unknown.
//  * h2o: accumulated attention per block, as H2O's hh_score: the caller reports with Observe the
//    attention of every prefill query over every block of its causal range, then each decode
//    step's attention over the kept blocks; keeps the recent blocks and the top blocks by
//    accumulated score (so the first eviction, right after prefill, keeps the prefill's heavy
//    hitters); an evicted block never comes back. One retrieval per query head per step (§0.3).
//    δ unknown.
// Not thread-safe (one object per sequence).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "selector/options.h"
#include "selector/selection.h"

namespace kvm::sel {

class QuestSelector : public Selector {
 public:
  static Result<std::unique_ptr<QuestSelector>> Make(const SelectorOptions& o,
                                                     const ModelShape& shape, uint64_t max_context);
  const char* name() const override { return "quest"; }
  Status Select(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override { return opt_.budget_blocks(); }
  // Page upper bound of block b for one query (scale · Σ_c max(q_c M_c, q_c m_c)).
  static float PageBound(const float* q, const HeadSummaries& s, uint64_t b, uint32_t head_dim,
                         float scale);

 private:
  QuestSelector(const SelectorOptions& o, const ModelShape& s);
  SelectorOptions opt_;
  ModelShape shape_;
  uint32_t dense_layers_;  // registry.h DenseLayers: o.dense_layers, by default Quest's 2
};

class StreamingSelector : public Selector {
 public:
  static Result<std::unique_ptr<StreamingSelector>> Make(const SelectorOptions& o,
                                                         const ModelShape& shape,
                                                         uint64_t max_context);
  const char* name() const override { return "streaming"; }
  Status Select(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override { return opt_.budget_blocks(); }

 private:
  StreamingSelector(const SelectorOptions& o, const ModelShape& s) : opt_(o), shape_(s) {}
  SelectorOptions opt_;
  ModelShape shape_;
};

class H2oSelector : public Selector {
 public:
  static Result<std::unique_ptr<H2oSelector>> Make(const SelectorOptions& o,
                                                   const ModelShape& shape, uint64_t max_context);
  const char* name() const override { return "h2o"; }
  Status Select(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override { return opt_.budget_blocks(); }
  // The attention of this step over the kept blocks: mass[i] = Σ over the group's query heads of
  // the attention that blocks[i] received (blocks = the last selection of (layer, kv_head)).
  Status Observe(uint32_t layer, uint32_t kv_head, const std::vector<uint64_t>& blocks,
                 const std::vector<double>& mass) override;
  // True when block b of (layer, kv_head) was evicted (it will never be selected again).
  bool Evicted(uint32_t layer, uint32_t kv_head, uint64_t b) const;

 private:
  struct State {
    std::vector<uint64_t> kept;    // ascending
    std::vector<double> score;     // accumulated, per block index
    std::vector<uint8_t> evicted;  // per block index
    uint64_t seen_blocks = 0;
  };
  H2oSelector(const SelectorOptions& o, const ModelShape& s)
      : opt_(o), shape_(s), state_(size_t{s.layers} * s.kv_heads) {}
  SelectorOptions opt_;
  ModelShape shape_;
  std::vector<State> state_;
};

class HShareSelector : public Selector {
 public:
  static Result<std::unique_ptr<HShareSelector>> Make(const SelectorOptions& o,
                                                      const ModelShape& shape,
                                                      uint64_t max_context);
  const char* name() const override { return "hshare"; }
  Status Select(const StepInput& in, Selection* out) override;
  uint64_t HotSetSlots() const override {
    return opt_.budget_blocks() + opt_.geometry.MaxWindowBlocks();
  }
  // head_map[layer][kv_head] = source KV head (itself or another of the same layer); layer_map[l] ≤
  // l.
  Status SetShareMaps(const std::vector<std::vector<uint32_t>>& head_map,
                      const std::vector<uint32_t>& layer_map);
  // The budget split 8 : 88 : 32 in blocks for a budget of `blocks` blocks: {sink, heavy, local}.
  static void Split(uint64_t blocks, uint64_t* sink, uint64_t* heavy, uint64_t* local);

 private:
  struct Cache {
    std::vector<uint64_t> heavy;      // the last retrieval's heavy blocks
    uint64_t step = UINT64_MAX;       // step of the last retrieval
    uint64_t last_step = UINT64_MAX;  // step of `last`
    std::vector<uint64_t> last;       // last selection (for sharing)
  };
  HShareSelector(const SelectorOptions& o, const ModelShape& s);
  SelectorOptions opt_;
  ModelShape shape_;
  std::vector<Cache> cache_;  // [layer][kv_head]
  std::vector<std::vector<uint32_t>> head_map_;
  std::vector<uint32_t> layer_map_;
};

// Channel statistics for HShare calibration: accumulate per (layer, query head) mean |q_c · k_c|
// over calibration tokens, then pick the top channels (DoubleSparse's outlier channels).
class HShareCalibrator {
 public:
  HShareCalibrator(const ModelShape& shape);
  // q: [q_heads][D], k: [kv_heads][D] of one token at one layer.
  void Add(uint32_t layer, const float* q, const float* k);
  // [layers * q_heads] lists of `count` channels (count 0 = max(4, D/8)), best first.
  std::vector<std::vector<uint32_t>> Channels(uint32_t count = 0) const;

 private:
  ModelShape shape_;
  std::vector<double> acc_;  // [layer][q_head][D]
};

}  // namespace kvm::sel

namespace kvm::sel {
// The HShare calibration file: one line per (layer, query head): "layer head c1 c2 ...". Lines
// starting with '#' are comments. InvalidArgument naming the line for anything malformed or
// missing.
std::string FormatHShareChannels(const std::vector<std::vector<uint32_t>>& channels,
                                 uint32_t q_heads);
Result<std::vector<std::vector<uint32_t>>> ParseHShareChannels(const std::string& text,
                                                               const ModelShape& shape);

// HShare's maps from prefill keep masks (layer_map.h KeepMask, one [q_heads][W][T] mask per layer):
// per layer, the greedy KV-head map over the group-concatenated masks; across layers, the greedy
// layer map over the whole masks. shared_kv_heads / shared_layers pairs (−1 = half).
Status BuildHShareMaps(const std::vector<std::vector<uint8_t>>& keep, const ModelShape& shape,
                       int32_t shared_kv_heads, int32_t shared_layers,
                       std::vector<std::vector<uint32_t>>* head_map,
                       std::vector<uint32_t>* layer_map);
}  // namespace kvm::sel
