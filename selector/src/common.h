// Internal helpers shared by the selectors of selector/src (not a public header).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "selector/options.h"
#include "selector/scoring.h"

namespace kvm::sel {

inline std::vector<uint64_t> ForcedBlocks(const Geometry& g, uint64_t T) {
  std::vector<uint64_t> f;
  AddRange(0, g.SinkBlocks(T), &f);
  AddRange(g.WindowFirstBlock(T), g.Blocks(T), &f);
  return f;
}

inline std::vector<uint64_t> AllBlocks(uint64_t nb) {
  std::vector<uint64_t> all;
  AddRange(0, nb, &all);
  return all;
}

inline void ShortContext(uint64_t nb, uint32_t group, Selection* out) {
  out->blocks = AllBlocks(nb);
  out->delta.assign(group, 0.0);
  out->kind = DeltaKind::kExact;
  out->retrieved_heads = 0;
  out->target_met = true;
  out->anchor = false;
}

// Middle blocks a budget-mode selection may hold: the cap less the sinks and the window at its
// widest, so the resident count never exceeds the cap as the window's raggedness changes between
// steps.
inline uint64_t HeavyBlocks(const SelectorOptions& o) {
  const uint64_t forced = o.geometry.MaxSinkBlocks() + o.geometry.MaxWindowBlocks();
  return o.cap_blocks() > forced ? o.cap_blocks() - forced : 0;
}

inline float MaxKeyNorm(const StepInput& in) {
  if (in.summaries && in.summaries->tokens() >= in.tokens()) return in.summaries->max_norm();
  std::vector<float> k(in.kv->head_dim);
  double mx = 0;
  for (uint64_t j = 0; j < in.kv->tokens; ++j) {
    attn::LoadRow(*in.kv, j, false, k.data());
    double ss = 0;
    for (float x : k) ss += double(x) * x;
    mx = std::max(mx, ss);
  }
  return static_cast<float>(std::sqrt(mx));
}

// Checks one step's input. `takes_scores`: the selector accepts StepInput::score instead of kv.
inline Status CheckInput(const StepInput& in, const ModelShape& s, const Geometry& g,
                         bool takes_scores = false) {
  const bool scored = takes_scores && in.score;
  if (!in.q || (!in.kv && !scored))
    return Status::InvalidArgument("select: missing queries or keys");
  if (in.layer >= s.layers || in.kv_head >= s.kv_heads)
    return Status::InvalidArgument("select: layer/kv_head out of range");
  if (scored && !in.kv && (!in.summaries || in.summaries->tokens() < in.tokens()))
    return Status::InvalidArgument("select: scores without keys need summaries of " +
                                   std::to_string(in.tokens()) + " tokens");
  if (!in.kv) return Status::Ok();
  if (in.kv->tokens != in.tokens())
    return Status::InvalidArgument("select: keys hold " + std::to_string(in.kv->tokens) +
                                   " tokens, step " + std::to_string(in.step) + " needs " +
                                   std::to_string(in.tokens()));
  if (in.kv->block_size != g.block_size || in.kv->head_dim != s.head_dim)
    return Status::InvalidArgument("select: keys' block size/head dim do not match the options");
  return Status::Ok();
}

// The exact scores of the step's group into *out: from StepInput::score when given (checked
// against the step), else scored here from the keys.
inline Status ScoresOf(const StepInput& in, uint32_t group, uint32_t block_size, GroupScores* out) {
  if (!in.score) {
    *out = ScoreGroup(in.q, group, *in.kv);
    return Status::Ok();
  }
  KVM_RETURN_IF_ERROR((*in.score)(out));
  if (out->tokens != in.tokens() || out->group != group || out->block_size != block_size ||
      out->logits.size() != size_t{group} * out->tokens || out->agg.size() != out->blocks())
    return Status::InvalidArgument(
        "select: the given scores do not match the step (tokens, group or block size)");
  return Status::Ok();
}

}  // namespace kvm::sel
