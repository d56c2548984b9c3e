#include "client/selector_source.h"

#include <algorithm>
#include <chrono>
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
  s->rest_ = std::make_unique<LayerAttention>();
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
  std::vector<uint8_t> anchored(shape_.kv_heads, 0);
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
    anchored[h] = s.anchor || s.retrieved_heads > 0;
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
  if (correction_ == Correction::kOff) return att_->Run(q, out);
  // Exact correction: the complement of each corrected head's selection, attended over the local
  // cache, merged into the sparse output.
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<float> state(size_t{shape_.q_heads} * 2), rest(size_t{shape_.q_heads} * D),
      rest_state(size_t{shape_.q_heads} * 2);
  KVM_RETURN_IF_ERROR(att_->Run(q, out, state.data()));
  rest_->Prepare(shape_, B, nb);
  std::vector<uint8_t> corrected(shape_.kv_heads, 0);
  for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
    uint32_t n = 0;
    if ((correction_ == Correction::kAlways || anchored[h]) && attended_[h].size() < nb) {
      corrected[h] = 1;
      const attn::HeadKV kv = dense_->View(layer, h, T);
      const std::vector<uint64_t>& sel = attended_[h];
      size_t i = 0;
      for (uint64_t b = 0; b < nb; ++b) {
        if (i < sel.size() && sel[i] == b) {
          ++i;
          continue;
        }
        rest_->k(h)[n] = kv.k_blocks[b];
        rest_->v(h)[n] = kv.v_blocks[b];
        rest_->rows(h)[n++] = static_cast<uint16_t>(b + 1 == nb && T % B ? T % B : B);
      }
      ++totals_.corrected;
      totals_.correction_bytes +=
          (anchored[h] ? 0 : size_t{g} * D * 4) + sel.size() * 4 + size_t{g} * (2 + D) * 4;
    }
    rest_->set_count(h, n);
  }
  KVM_RETURN_IF_ERROR(rest_->Run(q, rest.data(), rest_state.data()));
  const size_t first = claims_.size() - size_t{shape_.q_heads};  // this layer's claims, in order
  for (uint32_t i = 0; i < shape_.q_heads; ++i) {
    if (!corrected[i / g]) continue;
    const double delta =
        MergeCorrection(state[2 * i], state[2 * i + 1], out + size_t{i} * D, rest_state[2 * i],
                        rest_state[2 * i + 1], rest.data() + size_t{i} * D, D);
    claims_[first + i].delta = delta;  // the selection's δ, exact (the output is not affected)
    claims_[first + i].kind = DeltaKind::kExact;
  }
  totals_.correction_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return Status::Ok();
}

}  // namespace kvm::client
