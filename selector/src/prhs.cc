#include "selector/prhs.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common.h"
#include "selector/baselines.h"

namespace kvm::sel {
namespace {
Status Bad(const std::string& field, const std::string& why) {
  return Status::InvalidArgument(field + ": " + why);
}
}  // namespace

Status SelectorOptions::Validate(uint32_t layers, uint64_t max_context) const {
  KVM_RETURN_IF_ERROR(geometry.Validate());
  const uint32_t B = geometry.block_size;
  if (geometry.window_tokens > max_context)
    return Bad("window_tokens", std::to_string(geometry.window_tokens) +
                                    " is larger than the maximum context " +
                                    std::to_string(max_context));
  if (geometry.sink_tokens > max_context)
    return Bad("sink_tokens", "larger than the maximum context");
  if (!(tau_cos >= -1.0 && tau_cos <= 1.0)) return Bad("tau_cos", "must be in [-1, 1]");
  if (!(target_delta >= 0.0 && target_delta < 1.0)) return Bad("target_delta", "must be in [0, 1)");
  if (!(margin >= 0.0 && margin < 1.0)) return Bad("margin", "must be in [0, 1)");
  if (target_delta > 0 && max_resident_tokens == 0)
    return Bad("max_resident_tokens", "is required in target-delta mode (> 0)");
  if (target_delta == 0 && budget_tokens == 0)
    return Bad("budget_tokens", "must be > 0 in budget mode (or set target_delta)");
  const uint64_t forced = geometry.MaxSinkBlocks() + geometry.MaxWindowBlocks();
  if (budget_tokens > 0 && budget_blocks() <= forced)
    return Bad("budget_tokens",
               std::to_string(budget_tokens) + " leaves no room beyond the sinks and window (" +
                   std::to_string(forced * B) + " tokens at block size " + std::to_string(B) + ")");
  if (max_resident_tokens > 0 && max_resident_tokens / B <= forced)
    return Bad("max_resident_tokens",
               std::to_string(max_resident_tokens) + " leaves no room beyond the sinks and window");
  if (dilation < -1 || dilation > 64) return Bad("dilation", "must be -1 (auto) or 0..64");
  if (psaw && !(psaw_phi > 0.0 && psaw_phi < 1.0)) return Bad("psaw_phi", "must be in (0, 1)");
  if (psaw && !(psaw_alpha >= 0.0)) return Bad("psaw_alpha", "must be >= 0");
  if (psaw && psaw_start_layer >= layers)
    return Bad("psaw_start_layer", "must be < the number of layers");
  return Status::Ok();
}

uint64_t SelectorOptions::cap_blocks() const {
  uint64_t cap = target_delta > 0 ? max_resident_tokens / geometry.block_size : budget_blocks();
  if (target_delta > 0 && budget_tokens > 0) cap = std::min(cap, budget_blocks());
  return cap;
}

int32_t SelectorOptions::DilationRadius() const {
  if (dilation >= 0) return dilation;
  return geometry.block_size >= 8 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------
Result<std::unique_ptr<OracleSelector>> OracleSelector::Make(const SelectorOptions& o,
                                                             const ModelShape& shape,
                                                             uint64_t max_context) {
  KVM_RETURN_IF_ERROR(shape.Validate());
  KVM_RETURN_IF_ERROR(o.Validate(shape.layers, max_context));
  return std::unique_ptr<OracleSelector>(new OracleSelector(o, shape));
}

Status OracleSelector::Select(const StepInput& in, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry, /*takes_scores=*/true));
  const uint64_t T = in.tokens(), nb = opt_.geometry.Blocks(T);
  const uint32_t g = shape_.group_size();
  *out = Selection{};
  if (nb <= opt_.cap_blocks()) {
    ShortContext(nb, g, out);
    return Status::Ok();
  }
  GroupScores s;
  KVM_RETURN_IF_ERROR(ScoresOf(in, g, opt_.geometry.block_size, &s));
  const auto forced = ForcedBlocks(opt_.geometry, T);
  if (opt_.target_delta > 0) {
    out->blocks = FillToTarget(
        s, forced, opt_.target_delta, opt_.cap_blocks(), [](uint64_t) { return true; },
        &out->target_met);
  } else {
    out->blocks = OracleBlocks(s, forced, forced.size() + HeavyBlocks(opt_));
  }
  out->delta = DeltaOf(s, out->blocks);
  out->kind = DeltaKind::kExact;
  out->retrieved_heads = g;
  out->anchor = true;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
PrhsSelector::PrhsSelector(const SelectorOptions& o, const ModelShape& s)
    : opt_(o),
      shape_(s),
      heads_(size_t{s.layers} * s.kv_heads),
      gates_(size_t{s.layers} * s.q_heads),
      layer_map_(s.layers) {
  for (uint32_t l = 0; l < s.layers; ++l) layer_map_[l] = l;
}

Result<std::unique_ptr<PrhsSelector>> PrhsSelector::Make(const SelectorOptions& o,
                                                         const ModelShape& shape,
                                                         uint64_t max_context) {
  KVM_RETURN_IF_ERROR(shape.Validate());
  KVM_RETURN_IF_ERROR(o.Validate(shape.layers, max_context));
  return std::unique_ptr<PrhsSelector>(new PrhsSelector(o, shape));
}

uint64_t PrhsSelector::HotSetSlots() const {
  const uint64_t cap = opt_.cap_blocks(), B = opt_.geometry.block_size;
  const uint64_t dil = 2ull * opt_.DilationRadius() * ((cap + 2) / 3);
  const uint64_t slide = (std::max<uint64_t>(opt_.max_cluster_steps, 64) + B - 1) / B + 1;
  return cap + dil + slide;
}

const HeadGate& PrhsSelector::gate(uint32_t layer, uint32_t q_head) const {
  return gates_[size_t{layer} * shape_.q_heads + q_head];
}

Status PrhsSelector::SetLayerMap(const std::vector<uint32_t>& source) {
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

uint64_t PrhsSelector::PsawCut(uint32_t l, uint64_t T) const {
  if (!opt_.psaw) return 0;
  const uint32_t N = shape_.layers, ls = opt_.psaw_start_layer ? opt_.psaw_start_layer : N / 2;
  if (l < ls || N <= ls + 1) return 0;
  const double keep =
      std::pow(opt_.psaw_phi, opt_.psaw_alpha * double(l - ls) / double(N - 1 - ls));
  return static_cast<uint64_t>(std::floor((1.0 - keep) * double(T)));
}

bool PrhsReuse(const SelectorOptions& o, uint64_t hot_set_slots, const AnchorRecord& a,
               const HeadGate* gates, uint32_t group, uint32_t head_dim, const float* q,
               uint64_t step, Selection* out) {
  if (!a.valid || step < a.step) return false;
  if (o.max_cluster_steps != 0 && step - a.step >= o.max_cluster_steps) return false;
  const Geometry& geo = o.geometry;
  const uint64_t T = step + 1, nb = geo.Blocks(T);
  // Everything from the anchor's first window block on stays resident (blocks that left the window
  // since the anchor: the worker still holds them); re-anchor before that outgrows the hot set.
  std::vector<uint64_t> blocks = a.resident;
  AddRange(0, geo.SinkBlocks(T), &blocks);
  AddRange(std::min(geo.WindowFirstBlock(a.step + 1), nb), nb, &blocks);
  if (blocks.size() > hot_set_slots) return false;
  std::vector<double> bounds(group);
  const double target = o.use_bound_gate ? o.target_delta : 0.0;
  for (uint32_t h = 0; h < group; ++h) {
    const GateDecision d = gates[h].Check(q + size_t{h} * head_dim, o.tau_cos, target);
    if (!d.reuse) return false;
    bounds[h] = d.bound;
  }
  *out = Selection{};
  out->blocks = std::move(blocks);
  out->delta = bounds;
  out->kind = DeltaKind::kBound;
  out->extra_blocks = out->blocks.size() > o.cap_blocks() ? out->blocks.size() - o.cap_blocks() : 0;
  if (o.target_delta > 0)
    for (double b : bounds) out->target_met = out->target_met && b <= o.target_delta;
  return true;
}

Status PrhsSelector::Select(const StepInput& in, Selection* out) {
  return SelectImpl(in, /*allow_reuse=*/true, out);
}

Status PrhsSelector::Anchor(const StepInput& in, Selection* out) {
  return SelectImpl(in, /*allow_reuse=*/false, out);
}

Status PrhsSelector::SelectImpl(const StepInput& in, bool allow_reuse, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry, /*takes_scores=*/true));
  const Geometry& geo = opt_.geometry;
  const uint64_t T = in.tokens(), nb = geo.Blocks(T);
  const uint32_t g = shape_.group_size();
  HeadState& a = state(in.layer, in.kv_head);
  *out = Selection{};
  if (nb <= opt_.cap_blocks()) {
    ShortContext(nb, g, out);
    a.anchor.valid = false;
    a.last = out->blocks;
    a.last_step = in.step;
    return Status::Ok();
  }
  const uint32_t src = layer_map_[in.layer];
  if (opt_.layer_sharing && src != in.layer) {
    const HeadState& s = state(src, in.kv_head);
    if (s.last_step != in.step)
      return Status::FailedPrecondition("layer " + std::to_string(in.layer) + " shares layer " +
                                        std::to_string(src) + ", which has not selected yet");
    out->blocks = MergeBlocks(s.last, ForcedBlocks(geo, T));
    out->delta.assign(g, std::numeric_limits<double>::quiet_NaN());
    out->kind = DeltaKind::kUnknown;
    a.last = out->blocks;
    a.last_step = in.step;
    return Status::Ok();
  }
  if (allow_reuse && PrhsReuse(opt_, HotSetSlots(), a.anchor, &gate(in.layer, in.kv_head * g), g,
                               shape_.head_dim, in.q, in.step, out)) {
    a.last = out->blocks;
    a.last_step = in.step;
    return Status::Ok();
  }
  return AnchorStep(in, a, out);
}

Status PrhsSelector::AnchorStep(const StepInput& in, HeadState& a, Selection* out) {
  const Geometry& geo = opt_.geometry;
  const uint64_t T = in.tokens(), nb = geo.Blocks(T), B = geo.block_size;
  const uint32_t g = shape_.group_size();
  GroupScores s;
  KVM_RETURN_IF_ERROR(ScoresOf(in, g, opt_.geometry.block_size, &s));
  const auto forced = ForcedBlocks(geo, T);
  const uint64_t sink_blocks = geo.SinkBlocks(T), win_first = geo.WindowFirstBlock(T);

  // PSAW cut-off in blocks (blocks before it are not eligible); limited in target mode.
  uint64_t cut = PsawCut(in.layer, T) / B;
  if (opt_.target_delta > 0 && cut > sink_blocks) {
    const double allowance = 0.5 * opt_.target_delta * (1.0 - opt_.margin);
    std::vector<double> prefix(g, 0.0);
    uint64_t ok = sink_blocks;
    for (uint64_t b = sink_blocks; b < cut && b < win_first; ++b) {
      double worst = 0;
      for (uint32_t h = 0; h < g; ++h) worst = std::max(worst, prefix[h] += s.mass(h, b));
      if (worst > allowance) break;
      ok = b + 1;
    }
    cut = std::min(cut, ok);
  }
  auto eligible = [&](uint64_t b) { return !geo.IsForced(b, T) && b >= cut; };

  std::vector<uint64_t> chosen;  // non-forced blocks
  if (opt_.target_delta > 0) {
    const auto all = FillToTarget(s, forced, opt_.target_delta * (1.0 - opt_.margin),
                                  opt_.cap_blocks(), eligible, &out->target_met);
    std::set_difference(all.begin(), all.end(), forced.begin(), forced.end(),
                        std::back_inserter(chosen));
  } else {
    std::vector<uint64_t> cand;
    for (uint64_t b = 0; b < nb; ++b)
      if (eligible(b)) cand.push_back(b);
    const uint64_t heavy = std::min<uint64_t>(cand.size(), HeavyBlocks(opt_));
    std::partial_sort(cand.begin(), cand.begin() + static_cast<ptrdiff_t>(heavy), cand.end(),
                      [&](uint64_t x, uint64_t y) {
                        return s.agg[x] > s.agg[y] || (s.agg[x] == s.agg[y] && x < y);
                      });
    cand.resize(heavy);
    chosen = cand;  // by score, descending
  }
  // Dilation: ±r blocks around the top third of the chosen blocks (by aggregated mass).
  const int32_t r = opt_.DilationRadius();
  std::vector<uint64_t> by_score = chosen;
  std::sort(by_score.begin(), by_score.end(), [&](uint64_t x, uint64_t y) {
    return s.agg[x] > s.agg[y] || (s.agg[x] == s.agg[y] && x < y);
  });
  std::sort(chosen.begin(), chosen.end());
  std::vector<uint64_t> dil;
  const size_t m = (by_score.size() + 2) / 3;
  for (size_t i = 0; i < m && r > 0; ++i)
    for (int32_t j = -r; j <= r; ++j) {
      const int64_t b = int64_t(by_score[i]) + j;
      if (j == 0 || b < 0 || uint64_t(b) >= nb || !eligible(uint64_t(b))) continue;
      dil.push_back(uint64_t(b));
    }
  std::sort(dil.begin(), dil.end());
  dil.erase(std::unique(dil.begin(), dil.end()), dil.end());
  const size_t before = chosen.size();
  chosen = MergeBlocks(chosen, dil);
  out->extra_blocks = chosen.size() - before;

  out->blocks = MergeBlocks(forced, chosen);
  const std::vector<double> log_delta = LogDeltaOf(s, out->blocks);
  out->delta.resize(g);
  for (uint32_t h = 0; h < g; ++h) out->delta[h] = std::exp(log_delta[h]);
  out->kind = DeltaKind::kExact;
  out->retrieved_heads = g;
  out->anchor = true;
  out->k_max = MaxKeyNorm(in);
  if (opt_.target_delta > 0) {
    out->target_met = true;
    for (double d : out->delta) out->target_met = out->target_met && d <= opt_.target_delta;
  }
  for (uint32_t h = 0; h < g; ++h) {
    HeadGate& hg = gate_mut(in.layer, in.kv_head * g + h);
    hg.q_a.assign(in.q + size_t{h} * shape_.head_dim, in.q + size_t{h + 1} * shape_.head_dim);
    hg.delta_a = out->delta[h];
    hg.log_delta_a = log_delta[h];
    hg.k_max = out->k_max;
  }
  a.anchor.valid = true;
  a.anchor.step = in.step;
  a.anchor.resident = out->blocks;
  a.last = out->blocks;
  a.last_step = in.step;
  return Status::Ok();
}

Result<std::unique_ptr<Selector>> MakeSelector(const std::string& name, const SelectorOptions& o,
                                               const ModelShape& shape, uint64_t max_context) {
  if (name == "oracle") {
    KVM_ASSIGN_OR_RETURN(auto s, OracleSelector::Make(o, shape, max_context));
    return std::unique_ptr<Selector>(std::move(s));
  }
  if (name == "prhs") {
    KVM_ASSIGN_OR_RETURN(auto s, PrhsSelector::Make(o, shape, max_context));
    return std::unique_ptr<Selector>(std::move(s));
  }
  if (name == "quest") {
    KVM_ASSIGN_OR_RETURN(auto s, QuestSelector::Make(o, shape, max_context));
    return std::unique_ptr<Selector>(std::move(s));
  }
  if (name == "streaming") {
    KVM_ASSIGN_OR_RETURN(auto s, StreamingSelector::Make(o, shape, max_context));
    return std::unique_ptr<Selector>(std::move(s));
  }
  if (name == "h2o") {
    KVM_ASSIGN_OR_RETURN(auto s, H2oSelector::Make(o, shape, max_context));
    return std::unique_ptr<Selector>(std::move(s));
  }
  if (name == "hshare") {
    KVM_ASSIGN_OR_RETURN(auto s, HShareSelector::Make(o, shape, max_context));
    return std::unique_ptr<Selector>(std::move(s));
  }
  return Status::InvalidArgument("selector: unknown name '" + name +
                                 "' (oracle, prhs, quest, hshare, streaming, h2o)");
}

}  // namespace kvm::sel
