#include "client/selector_source.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "selector/baselines.h"
#include "selector/scoring.h"

namespace kvm::client {

Result<std::unique_ptr<SelectorKvSource>> SelectorKvSource::Make(
    const ModelShape& shape, uint32_t block_size, std::unique_ptr<sel::Selector> selector,
    const sel::SelectorOptions& opt, uint64_t prefill, const std::string& forced_policy,
    uint64_t max_context) {
  if (forced_policy != "geometry" && forced_policy != "none" && forced_policy != "hshare" &&
      forced_policy != "all")
    return Status::InvalidArgument("forced policy must be geometry, none, hshare or all");
  auto s = std::unique_ptr<SelectorKvSource>(new SelectorKvSource());
  KVM_ASSIGN_OR_RETURN(s->dense_, DenseKvSource::Make(shape, block_size));
  s->selector_ = std::move(selector);
  s->opt_ = opt;
  s->shape_ = shape;
  s->prefill_ = prefill;
  s->forced_ = forced_policy;
  const size_t n = size_t{shape.layers} * shape.kv_heads;
  for (size_t i = 0; i < n; ++i) {
    s->summaries_.emplace_back(block_size, shape.head_dim, /*minmax=*/true);
    // The eval's mirror holds everything a selector may keep (dense layers of Quest, short
    // contexts); the byte accounting is the diff either way.
    s->mirrors_.emplace_back(static_cast<uint32_t>(std::max<uint64_t>(
        s->selector_->HotSetSlots(), (max_context + block_size - 1) / block_size)));
  }
  return s;
}

Status SelectorKvSource::Append(uint32_t layer, uint64_t pos, const float* k, const float* v) {
  KVM_RETURN_IF_ERROR(dense_->Append(layer, pos, k, v));
  // Summaries of the keys as stored (in the KV dtype), as the service keeps them.
  std::vector<float> row(shape_.head_dim);
  for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
    dense_->Row(layer, h, pos, /*values=*/false, row.data());
    summaries_[size_t{layer} * shape_.kv_heads + h].Append(pos, row.data());
  }
  return Status::Ok();
}

Status SelectorKvSource::Attend(uint32_t layer, uint64_t pos, const float* q, float* out) {
  if (pos < prefill_) return dense_->Attend(layer, pos, q, out);
  const uint32_t g = shape_.group_size(), D = shape_.head_dim, B = opt_.geometry.block_size;
  const uint64_t T = pos + 1;
  if (layer == 0) ++totals_.steps;
  for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
    const size_t idx = size_t{layer} * shape_.kv_heads + h;
    const attn::HeadKV kv = dense_->View(layer, h, T);
    const float* qg = q + size_t{h} * g * D;
    sel::StepInput in{pos, layer, h, qg, &kv, &summaries_[idx]};
    sel::Selection s;
    KVM_RETURN_IF_ERROR(selector_->Select(in, &s).WithContext("layer " + std::to_string(layer)));
    totals_.retrievals += s.retrieved_heads;
    totals_.anchors += s.anchor ? 1 : 0;
    totals_.attended_tokens += std::min<uint64_t>(T, s.blocks.size() * uint64_t{B});
    totals_.context_tokens += T;
    sel::PlanStep ps;
    KVM_RETURN_IF_ERROR(mirrors_[idx].Plan(
        s.blocks, T, opt_.geometry, opt_.geometry.WindowFirstBlock(pos),
        dense_->layout().kv_block_bytes(), dense_->layout().row_bytes(), &ps, &totals_.bytes));
    // Measure: the true δ of this selection and the same-size block oracle, on this run's q and K.
    const sel::GroupScores gs = sel::ScoreGroup(qg, g, kv);
    const auto d_true = sel::DeltaOf(gs, s.blocks);
    std::vector<uint64_t> forced;
    const uint64_t nb = gs.blocks();
    if (forced_ == "geometry") {
      sel::AddRange(0, opt_.geometry.SinkBlocks(T), &forced);
      sel::AddRange(opt_.geometry.WindowFirstBlock(T), nb, &forced);
    } else if (forced_ == "hshare" && nb > opt_.budget_blocks()) {
      uint64_t sink, heavy, local;
      sel::HShareSelector::Split(opt_.budget_blocks(), &sink, &heavy, &local);
      sel::AddRange(0, sink, &forced);
      sel::AddRange(nb - local, nb, &forced);
    } else if (forced_ == "all") {
      forced = s.blocks;
    }
    const auto d_oracle = sel::DeltaOf(gs, sel::OracleBlocks(gs, forced, s.blocks.size()));
    for (uint32_t j = 0; j < g; ++j)
      records_.push_back({pos, layer, h * g + j, d_true[j], d_oracle[j],
                          s.delta.empty() ? NAN : s.delta[j], s.kind});
    if (auto* h2o = dynamic_cast<sel::H2oSelector*>(
            selector_.get())) {  // H2O's posterior: attention over kept blocks
      std::vector<double> mass;
      double kept = 0;
      for (uint64_t b : s.blocks) kept += gs.agg[b];
      for (uint64_t b : s.blocks) mass.push_back(kept > 0 ? gs.agg[b] / kept * g : 0.0);
      KVM_RETURN_IF_ERROR(h2o->Observe(layer, h, s.blocks, mass));
    }
    // Attend over the selected blocks only (token order, reference arithmetic).
    std::vector<uint8_t> mask(T, 0);
    for (uint64_t b : s.blocks)
      for (uint64_t t = b * B; t < std::min<uint64_t>(T, (b + 1) * B); ++t) mask[t] = 1;
    KVM_RETURN_IF_ERROR(attn::Attend(qg, g, kv, mask, out + size_t{h} * g * D));
  }
  return Status::Ok();
}

}  // namespace kvm::client
