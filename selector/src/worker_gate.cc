#include "selector/worker_gate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common.h"

namespace kvm::sel {

const char* GateOutcomeName(GateOutcome o) {
  switch (o) {
    case GateOutcome::kReuse:
      return "reuse";
    case GateOutcome::kRetrieve:
      return "retrieve";
    case GateOutcome::kSharedLayer:
      return "shared_layer";
    case GateOutcome::kShortContext:
      return "short_context";
    case GateOutcome::kDenseLayer:
      return "dense_layer";
  }
  return "retrieve";
}

WorkerGate::WorkerGate(const SelectorOptions& o, const ModelShape& shape,
                       const SelectorEntry& entry, uint64_t hot_set_slots)
    : opt_(o),
      shape_(shape),
      has_gate_(entry.caps.has_gate),
      dense_layers_(DenseLayers(o, entry)),
      slots_(hot_set_slots),
      heads_(size_t{shape.layers} * shape.kv_heads),
      gates_(size_t{shape.layers} * shape.q_heads),
      layer_map_(shape.layers) {
  counts_.retrieved.assign(size_t{shape.layers} * shape.kv_heads, 0);
  for (uint32_t l = 0; l < shape.layers; ++l) layer_map_[l] = l;
}

bool WorkerGate::SharesLayer(uint32_t layer) const {
  return layer_sharing() && layer < layer_map_.size() && layer_map_[layer] != layer;
}

std::vector<uint32_t> WorkerGate::SharingLayers(uint32_t layer) const {
  std::vector<uint32_t> out;
  if (!layer_sharing()) return out;
  for (uint32_t l = layer + 1; l < layer_map_.size(); ++l)
    if (layer_map_[l] == layer) out.push_back(l);
  return out;
}

Selection WorkerGate::SharedSelection(const std::vector<uint64_t>& source_blocks,
                                      uint64_t T) const {
  Selection s;
  s.blocks = MergeBlocks(source_blocks, ForcedBlocks(opt_.geometry, T));
  s.delta.assign(shape_.group_size(), std::numeric_limits<double>::quiet_NaN());
  s.kind = DeltaKind::kUnknown;
  return s;
}

bool WorkerGate::Reuse(const Head& hd, uint32_t layer, uint32_t kv_head, const float* q,
                       uint64_t step, Selection* out) {
  const AnchorRecord& a = hd.anchor;
  if (!q || !a.valid || step < a.step) return false;
  const PrhsOptions& p = opt_.prhs;
  if (p.reuse_while_fits) {  // exact correction: the set stays while it fits, δ not bounded
    std::vector<uint64_t> blocks = a.resident;
    const uint64_t nb = opt_.geometry.Blocks(step + 1);
    AddRange(0, opt_.geometry.SinkBlocks(step + 1), &blocks);
    AddRange(std::min(opt_.geometry.WindowFirstBlock(a.step + 1), nb), nb, &blocks);
    if (blocks.size() > slots_) return false;
    *out = Selection{};
    out->blocks = std::move(blocks);
    out->delta.assign(shape_.group_size(), std::numeric_limits<double>::quiet_NaN());
    out->kind = DeltaKind::kUnknown;
    out->target_met = opt_.target_delta <= 0;
    return true;
  }
  if (step - a.step >= opt_.MaxClusterSteps()) return false;
  if (a.reuse_steps != 0 && step - a.step >= a.reuse_steps) return false;  // measured horizon
  // Target mode: a head whose anchor met δ* is reused while its bound stays ≤ δ*; a head whose
  // anchor missed δ* (the cap bound) under the cosine gate and the horizon alone — or, with
  // cap_reuse off, its group re-anchors at every step.
  const double target = opt_.target_delta;
  const bool cap_bound = target > 0 && !a.target_met;
  if (cap_bound && !p.cap_reuse) return false;
  const Geometry& geo = opt_.geometry;
  const uint64_t T = step + 1, nb = geo.Blocks(T);
  const uint32_t g = shape_.group_size(), D = shape_.head_dim;
  // Everything from the anchor's first window block on stays resident (blocks that left the window
  // since the anchor: the worker still holds them), so the bound holds; re-anchor before that
  // outgrows the hot set.
  std::vector<uint64_t> blocks = a.resident;
  AddRange(0, geo.SinkBlocks(T), &blocks);
  AddRange(std::min(geo.WindowFirstBlock(a.step + 1), nb), nb, &blocks);
  if (blocks.size() > slots_) return false;
  std::vector<double> bounds(g);
  // Every head is checked (the statistics count each), then reuse needs all of them to pass.
  bool all = true;
  BoundStats& bs = counts_.bound;
  for (uint32_t h = 0; h < g; ++h) {
    const HeadGate& hg = head_gate(layer, kv_head * g + h);
    const bool head_met = hg.delta_a <= target;
    const double limit = target > 0 && head_met && p.use_bound_gate ? target : 1.0;
    const GateDecision d = hg.Check(q + size_t{h} * D, p.tau_cos, limit);
    ++bs.checks;
    bs.cosine_ok += d.cosine >= p.tau_cos;
    bs.pass += target > 0 && d.bound <= target;
    bs.pass_norm += target > 0 && d.bound_norm <= target;
    bs.cap_checks += target > 0 && !head_met;
    bs.sum_bound += d.bound;
    bs.sum_bound_norm += d.bound_norm;
    all = all && d.reuse;
    bounds[h] = d.bound;
  }
  if (!all) return false;
  *out = Selection{};
  out->blocks = std::move(blocks);
  out->delta = bounds;
  out->kind = DeltaKind::kBound;
  const uint64_t cap = opt_.cap_blocks();
  out->extra_blocks = out->blocks.size() > cap ? out->blocks.size() - cap : 0;
  if (opt_.target_delta > 0)
    for (double b : bounds) out->target_met = out->target_met && b <= opt_.target_delta;
  return true;
}

Result<GateOutcome> WorkerGate::Decide(uint64_t step, uint32_t layer, uint32_t kv_head,
                                       const float* q, bool allow_reuse, Selection* out) {
  if (layer >= shape_.layers || kv_head >= shape_.kv_heads)
    return Status::InvalidArgument("gate: layer/kv_head out of range");
  const uint64_t T = step + 1;
  Head& hd = head(layer, kv_head);
  *out = Selection{};
  GateOutcome o;
  if (DenseLayer(layer)) {
    ShortContext(opt_.geometry.Blocks(T), shape_.group_size(), out);
    hd.anchor.valid = false;
    o = GateOutcome::kDenseLayer;
  } else if (has_gate_ && opt_.IsShortContext(T)) {
    ShortContext(opt_.geometry.Blocks(T), shape_.group_size(), out);
    hd.anchor.valid = false;
    o = GateOutcome::kShortContext;
  } else if (SharesLayer(layer)) {
    const Head& src = head(layer_map_[layer], kv_head);
    if (src.last_step != step)
      return Status::FailedPrecondition("layer " + std::to_string(layer) + " shares layer " +
                                        std::to_string(layer_map_[layer]) +
                                        ", which has not selected yet");
    *out = SharedSelection(src.last, T);
    o = GateOutcome::kSharedLayer;
  } else if (allow_reuse && has_gate_ && Reuse(hd, layer, kv_head, q, step, out)) {
    o = GateOutcome::kReuse;
    if (opt_.target_delta > 0 && !out->target_met) ++counts_.target_missed;
  } else {
    ++counts_[GateOutcome::kRetrieve];
    return GateOutcome::kRetrieve;
  }
  hd.last = out->blocks;
  hd.last_step = step;
  ++counts_[o];
  return o;
}

void WorkerGate::Record(uint64_t step, uint32_t layer, uint32_t kv_head, const float* q,
                        const Selection& s) {
  if (layer >= shape_.layers || kv_head >= shape_.kv_heads) return;
  Head& hd = head(layer, kv_head);
  hd.last = s.blocks;
  hd.last_step = step;
  counts_.retrieved[size_t{layer} * shape_.kv_heads + kv_head] += s.retrieved_heads;
  bool met = true;  // from the exact δ (target_met need not travel on a wire)
  if (opt_.target_delta > 0 && s.anchor) {
    met = s.kind != DeltaKind::kUnknown;
    for (uint32_t j = 0; j < s.delta.size(); ++j)
      met = met && std::exp(s.LogDelta(j)) <= opt_.target_delta;
    counts_.target_missed += !met;
  }
  if (!s.anchor || !has_gate_ || !q) {
    hd.anchor.valid = false;
    return;
  }
  hd.anchor.valid = true;
  hd.anchor.step = step;
  hd.anchor.resident = s.blocks;
  hd.anchor.reuse_steps = s.reuse_steps;
  hd.anchor.target_met = met;
  const uint32_t g = shape_.group_size(), D = shape_.head_dim;
  const BoundForm form = opt_.prhs.bound;
  const bool stats = s.split_dir.size() == size_t{g} * D && s.dropped_radius.size() == g;
  const bool centred = form >= BoundForm::kCentred && stats;
  const bool split = form >= BoundForm::kSplit && stats;
  for (uint32_t j = 0; j < g; ++j) {
    HeadGate& hg = gates_[size_t{layer} * shape_.q_heads + kv_head * g + j];
    hg.q_a.assign(q + size_t{j} * D, q + size_t{j + 1} * D);
    hg.log_delta_a = s.LogDelta(j);
    hg.delta_a = std::exp(hg.log_delta_a);
    hg.k_max = s.k_max;
    hg.key_radius = centred ? s.key_radius : -1.f;
    if (split) {
      hg.split_dir.assign(s.split_dir.begin() + size_t{j} * D,
                          s.split_dir.begin() + size_t{j + 1} * D);
      hg.dropped_radius = s.dropped_radius[j];
    } else {
      hg.split_dir.clear();
      hg.dropped_radius = 0.f;
    }
  }
}

void WorkerGate::Reset() {
  for (Head& hd : heads_) hd = Head{};
  for (HeadGate& g : gates_) g = HeadGate{};
}

Status WorkerGate::SetLayerMap(const std::vector<uint32_t>& source) {
  if (source.size() != shape_.layers)
    return Status::InvalidArgument("layer map has " + std::to_string(source.size()) +
                                   " entries for " + std::to_string(shape_.layers) + " layers");
  for (uint32_t l = 0; l < source.size(); ++l)
    if (source[l] > l)
      return Status::InvalidArgument("layer map: layer " + std::to_string(l) +
                                     " points to deeper layer " + std::to_string(source[l]) +
                                     " (sharing only points to shallower layers)");
  layer_map_ = source;
  return Status::Ok();
}

Status WorkerGate::BuildLayerMap(
    const PrefillQueries& queries, uint64_t context,
    const std::function<std::vector<attn::HeadKV>(uint32_t layer)>& views) {
  const auto keep = PrefillKeepMasks(queries, shape_.layers, KeepFraction(opt_, context), views);
  const int32_t n = opt_.prhs.layer_map.shared_layers;
  KVM_ASSIGN_OR_RETURN(auto map, sel::BuildLayerMap(keep, n < 0 ? shape_.layers / 2 : uint32_t(n)));
  return SetLayerMap(map);
}

}  // namespace kvm::sel
