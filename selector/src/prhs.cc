#include "selector/prhs.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common.h"
#include "selector/baselines.h"
#include "selector/registry.h"

namespace kvm::sel {
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
  if (opt_.IsShortContext(T)) {
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
  out->log_delta = LogDeltaOf(s, out->blocks);
  for (double ld : out->log_delta) out->delta.push_back(std::exp(ld));
  out->kind = DeltaKind::kExact;
  out->retrieved_heads = g;
  out->anchor = true;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
PrhsSelector::PrhsSelector(const SelectorOptions& o, const ModelShape& s)
    : opt_(o),
      shape_(s),
      gate_(o, s, *FindSelector("prhs").value(), HotSetSlots()),
      horizon_(size_t{s.layers} * s.kv_heads, std::min(kMinHorizon, o.MaxClusterSteps())) {}

uint32_t PrhsSelector::MaxHorizon() const { return opt_.MaxClusterSteps(); }

void PrhsSelector::UpdateHorizon(const StepInput& in, const GroupScores& s, Selection* out) {
  const uint32_t hmax = MaxHorizon();
  if (!(opt_.prhs.reuse_regret > 0)) {  // the cluster cap alone
    out->reuse_steps = hmax;
    return;
  }
  uint32_t& h = horizon_[size_t{in.layer} * shape_.kv_heads + in.kv_head];
  const AnchorRecord& prev = gate_.anchor(in.layer, in.kv_head);
  if (prev.valid && prev.step < in.step) {
    // The set a reuse of the previous anchor would have had at this step (worker_gate.h), scored
    // exactly against this step's queries: what re-anchoring bought.
    const Geometry& geo = opt_.geometry;
    const uint64_t T = in.tokens(), nb = geo.Blocks(T);
    std::vector<uint64_t> old = prev.resident;
    AddRange(0, geo.SinkBlocks(T), &old);
    AddRange(std::min(geo.WindowFirstBlock(prev.step + 1), nb), nb, &old);
    const std::vector<double> old_ld = LogDeltaOf(s, old);
    bool paid = false;
    if (opt_.target_delta > 0) {  // a head this anchor brings within δ* that the reuse left out
      for (uint32_t j = 0; j < s.group; ++j)
        paid =
            paid || (out->delta[j] <= opt_.target_delta && std::exp(old_ld[j]) > opt_.target_delta);
    } else {  // more mass than reuse_regret (group mean)
      double regret = 0;
      for (uint32_t j = 0; j < s.group; ++j)
        regret += (std::exp(old_ld[j]) - out->delta[j]) / double(s.group);
      paid = regret > opt_.prhs.reuse_regret;
    }
    const uint32_t hmin = std::min(kMinHorizon, hmax);
    h = paid ? std::max(h / 2, hmin) : std::min(2 * h, hmax);
  }
  out->reuse_steps = h;
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
  // Blocks that leave the window during a cluster stay resident (the bound needs them): a cluster
  // of n steps adds at most ceil(n/B) + 1; clusters past 64 steps end when the hot set is full.
  const uint64_t slide = (std::min<uint64_t>(opt_.MaxClusterSteps(), 64) + B - 1) / B + 1;
  return cap + dil + slide;
}

uint64_t PrhsSelector::PsawCut(uint32_t l, uint64_t T) const {
  const PrhsOptions& p = opt_.prhs;
  if (!p.psaw) return 0;
  const uint32_t N = shape_.layers, ls = p.psaw_start_layer ? p.psaw_start_layer : N / 2;
  if (l < ls || N <= ls + 1) return 0;
  const double keep = std::pow(p.psaw_phi, p.psaw_alpha * double(l - ls) / double(N - 1 - ls));
  return static_cast<uint64_t>(std::floor((1.0 - keep) * double(T)));
}

Status PrhsSelector::Select(const StepInput& in, Selection* out) {
  return SelectImpl(in, /*allow_reuse=*/true, out);
}

Status PrhsSelector::Anchor(const StepInput& in, Selection* out) {
  return SelectImpl(in, /*allow_reuse=*/false, out);
}

Status PrhsSelector::SelectImpl(const StepInput& in, bool allow_reuse, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry, /*takes_scores=*/true));
  KVM_ASSIGN_OR_RETURN(const GateOutcome o,
                       gate_.Decide(in.step, in.layer, in.kv_head, in.q, allow_reuse, out));
  if (o != GateOutcome::kRetrieve) return Status::Ok();
  KVM_RETURN_IF_ERROR(AnchorStep(in, out));
  gate_.Record(in.step, in.layer, in.kv_head, in.q, *out);
  return Status::Ok();
}

Status PrhsSelector::AnchorStep(const StepInput& in, Selection* out) {
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
  out->kind = DeltaKind::kExact;
  out->retrieved_heads = g;
  out->anchor = true;
  out->k_max = MaxKeyNorm(in);
  // The key statistics of the worker's bound; without the keys an anchor carries k_max alone.
  const attn::HeadKV* kv = in.kv;
  if (!kv && in.keys) {
    auto k = (*in.keys)();
    if (!k.ok()) return k.status();
    kv = *k;
  }
  if (kv) {
    if (kv->tokens != T || kv->block_size != B || kv->head_dim != shape_.head_dim)
      return Status::InvalidArgument("select: the keys given do not match the step");
    AnchorKeyStats(s, *kv, out->blocks, out);  // log δ too, from its weights
  } else {
    out->log_delta = LogDeltaOf(s, out->blocks);
  }
  out->delta.resize(g);
  for (uint32_t h = 0; h < g; ++h) out->delta[h] = std::exp(out->log_delta[h]);
  UpdateHorizon(in, s, out);
  if (opt_.target_delta > 0) {
    out->target_met = true;
    for (double d : out->delta) out->target_met = out->target_met && d <= opt_.target_delta;
  }
  return Status::Ok();
}

}  // namespace kvm::sel
