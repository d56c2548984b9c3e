#include "client/selector_source.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "layer_attention.h"
#include "selector/registry.h"
#include "selector/scoring.h"

namespace kvm::client {

Result<std::unique_ptr<SelectorKvSource>> SelectorKvSource::Make(
    const ModelShape& shape, uint32_t block_size, std::unique_ptr<sel::Selector> selector,
    const sel::SelectorOptions& opt, uint64_t prefill, uint64_t max_context) {
  if (!selector) return Status::InvalidArgument("selector source: no selector");
  KVM_ASSIGN_OR_RETURN(const sel::SelectorEntry* entry, sel::FindSelector(selector->name()));
  auto s = std::unique_ptr<SelectorKvSource>(new SelectorKvSource());
  KVM_ASSIGN_OR_RETURN(s->dense_, DenseKvSource::Make(shape, block_size));
  s->selector_ = std::move(selector);
  s->observes_ = entry->caps.observes_attention;
  s->dense_layers_ = sel::DenseLayers(opt, *entry);
  s->opt_ = opt;
  s->shape_ = shape;
  s->prefill_ = prefill;
  s->attended_.resize(shape.kv_heads);
  s->totals_.head_retrievals.assign(size_t{shape.layers} * shape.kv_heads, 0);
  s->att_ = std::make_unique<LayerAttention>();
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

SelectorKvSource::~SelectorKvSource() = default;

sel::GateCounts SelectorKvSource::gate_counts() const {
  const sel::WorkerGate* g = selector_->gate();
  return g ? g->counts() : sel::GateCounts{};
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

Status SelectorKvSource::ObservePrefill(uint32_t layer, uint64_t pos, const float* q) {
  const uint32_t g = shape_.group_size(), D = shape_.head_dim;
  const uint64_t T = pos + 1, nb = opt_.geometry.Blocks(T);
  std::vector<uint64_t> all(nb);
  for (uint64_t b = 0; b < nb; ++b) all[b] = b;
  for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
    const sel::GroupScores gs =
        sel::ScoreGroup(q + size_t{h} * g * D, g, dense_->View(layer, h, T));
    KVM_RETURN_IF_ERROR(selector_->Observe(layer, h, all, gs.agg));
  }
  return Status::Ok();
}

Status SelectorKvSource::Attend(uint32_t layer, uint64_t pos, const float* q, float* out) {
  if (pos < prefill_) {
    // H2O accumulates the attention of every query, the prefill's included (its hh_score), so its
    // first eviction already knows the heavy hitters.
    if (observes_ && layer >= dense_layers_) KVM_RETURN_IF_ERROR(ObservePrefill(layer, pos, q));
    return dense_->Attend(layer, pos, q, out);
  }
  const uint32_t g = shape_.group_size(), D = shape_.head_dim, B = opt_.geometry.block_size;
  const uint64_t T = pos + 1, nb = opt_.geometry.Blocks(T);
  const size_t kvb = dense_->layout().kv_block_bytes();
  if (layer == 0) ++totals_.steps;
  att_->Prepare(shape_, B, nb);
  for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
    const size_t idx = size_t{layer} * shape_.kv_heads + h;
    const attn::HeadKV kv = dense_->View(layer, h, T);
    const float* qg = q + size_t{h} * g * D;
    sel::StepInput in{pos, layer, h, qg, &kv, &summaries_[idx]};
    sel::Selection s;
    if (layer < dense_layers_ && !selector_->gate()) {
      // A dense layer of a selector without a gate (PrHS's gate decides its own): every block,
      // held by the worker, δ = 0 exact, no retrieval — as the service path's worker gate does.
      for (uint64_t b = 0; b < nb; ++b) s.blocks.push_back(b);
      s.delta.assign(g, 0.0);
      s.kind = DeltaKind::kExact;
    } else {
      KVM_RETURN_IF_ERROR(selector_->Select(in, &s).WithContext("layer " + std::to_string(layer)));
    }
    totals_.retrievals += s.retrieved_heads;
    totals_.head_retrievals[idx] += s.retrieved_heads;
    totals_.anchors += s.anchor ? 1 : 0;
    totals_.target_missed += opt_.target_delta > 0 && !s.target_met;
    sel::PlanStep ps;
    KVM_RETURN_IF_ERROR(mirrors_[idx].Plan(s.blocks, T, opt_.geometry,
                                           opt_.geometry.WindowFirstBlock(pos), kvb,
                                           dense_->layout().row_bytes(), &ps, &totals_.bytes));
    for (uint32_t j = 0; j < g; ++j)
      claims_.push_back({pos, layer, h * g + j, s.delta.empty() ? NAN : s.delta[j], s.kind});
    if (observes_ &&
        layer >= dense_layers_) {  // H2O's posterior: the attention the kept blocks got
      const sel::GroupScores gs = sel::ScoreGroup(qg, g, kv);
      std::vector<double> mass;
      double kept = 0;
      for (uint64_t b : s.blocks) kept += gs.agg[b];
      for (uint64_t b : s.blocks) mass.push_back(kept > 0 ? gs.agg[b] / kept * g : 0.0);
      KVM_RETURN_IF_ERROR(selector_->Observe(layer, h, s.blocks, mass));
    }
    // Attend over the selected blocks only (ascending; the context's last block is ragged).
    for (size_t i = 0; i < s.blocks.size(); ++i) {
      const uint64_t b = s.blocks[i];
      if (b >= nb) return Status::Internal("selected block past the end");
      att_->k(h)[i] = kv.k_blocks[b];
      att_->v(h)[i] = kv.v_blocks[b];
      att_->rows(h)[i] = static_cast<uint16_t>(b + 1 == nb && T % B ? T % B : B);
    }
    att_->set_count(h, static_cast<uint32_t>(s.blocks.size()));
    attended_[h] = std::move(s.blocks);
  }
  return att_->Run(q, out);
}

}  // namespace kvm::client
