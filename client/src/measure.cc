#include "client/measure.h"

#include <cmath>
#include <limits>
#include <string>

#include "selector/baselines.h"
#include "selector/scoring.h"

namespace kvm::client {
namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
}

Result<std::unique_ptr<MeasuredKvSource>> MeasuredKvSource::Make(SparseKvSource* inner,
                                                                 const ModelShape& shape,
                                                                 const sel::SelectorOptions& o,
                                                                 uint64_t prefill,
                                                                 sel::ForcedPolicy forced) {
  if (!inner) return Status::InvalidArgument("measure: no source");
  auto m = std::unique_ptr<MeasuredKvSource>(new MeasuredKvSource());
  KVM_ASSIGN_OR_RETURN(m->shadow_, DenseKvSource::Make(shape, o.geometry.block_size));
  m->inner_ = inner;
  m->shape_ = shape;
  m->opt_ = o;
  m->prefill_ = prefill;
  m->forced_ = forced;
  return m;
}

Status MeasuredKvSource::Append(uint32_t layer, uint64_t pos, const float* k, const float* v) {
  KVM_RETURN_IF_ERROR(inner_->Append(layer, pos, k, v));
  return shadow_->Append(layer, pos, k, v);
}

// The claims the source made since the last call: those of (pos, layer) by query head into *now,
// audits attached to the record of their step.
void MeasuredKvSource::TakeClaims(uint32_t layer, uint64_t pos,
                                  std::vector<const ClaimRecord*>* now) {
  const auto& all = inner_->claims();
  now->assign(shape_.q_heads, nullptr);
  for (; claims_seen_ < all.size(); ++claims_seen_) {
    const ClaimRecord& c = all[claims_seen_];
    if (c.q_head >= shape_.q_heads) continue;
    if (c.kind != DeltaKind::kAudit) {
      if (c.step == pos && c.layer == layer) (*now)[c.q_head] = &c;
      continue;
    }
    // Records are in (step, layer, q_head) order: find the audited one from the end.
    for (size_t i = records_.size(); i-- > 0;) {
      HeadRecord& r = records_[i];
      if (r.step < c.step) break;
      if (r.step == c.step && r.layer == c.layer && r.q_head == c.q_head) {
        r.delta_audit = c.delta;
        ++totals_.audits;
        break;
      }
    }
  }
}

void MeasuredKvSource::TakeLateClaims() {
  std::vector<const ClaimRecord*> unused;
  TakeClaims(UINT32_MAX, UINT64_MAX, &unused);
}

Status MeasuredKvSource::Attend(uint32_t layer, uint64_t pos, const float* q, float* out) {
  KVM_RETURN_IF_ERROR(inner_->Attend(layer, pos, q, out));
  if (pos < prefill_) return Status::Ok();
  const uint32_t g = shape_.group_size(), D = shape_.head_dim;
  const uint64_t T = pos + 1;
  const sel::Geometry& geo = opt_.geometry;
  std::vector<const ClaimRecord*> now;
  TakeClaims(layer, pos, &now);
  const auto& attended = inner_->attended();
  if (attended.size() != shape_.kv_heads)
    return Status::Internal("measure: the source listed " + std::to_string(attended.size()) +
                            " KV heads");
  for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
    const std::vector<uint64_t>& blocks = attended[h];
    const sel::GroupScores gs =
        sel::ScoreGroup(q + size_t{h} * g * D, g, shadow_->View(layer, h, T));
    const uint64_t nb = gs.blocks();
    std::vector<uint64_t> forced;
    if (forced_ == sel::ForcedPolicy::kGeometry) {
      sel::AddRange(0, geo.SinkBlocks(T), &forced);
      sel::AddRange(geo.WindowFirstBlock(T), nb, &forced);
    } else if (forced_ == sel::ForcedPolicy::kHShare && nb > opt_.budget_blocks()) {
      uint64_t sink, heavy, local;
      sel::HShareSelector::Split(opt_.budget_blocks(), &sink, &heavy, &local);
      sel::AddRange(0, sink, &forced);
      sel::AddRange(nb - local, nb, &forced);
    } else if (forced_ == sel::ForcedPolicy::kAll) {
      forced = blocks;
    }
    const auto d_true = sel::DeltaOf(gs, blocks);
    const auto d_oracle = sel::DeltaOf(gs, sel::OracleBlocks(gs, forced, blocks.size()));
    for (uint32_t j = 0; j < g; ++j) {
      const ClaimRecord* c = now[h * g + j];
      records_.push_back({pos, layer, h * g + j, d_true[j], d_oracle[j], c ? c->delta : kNaN,
                          c ? c->kind : DeltaKind::kUnknown, kNaN});
    }
    uint64_t attended_tokens = 0;
    for (uint64_t b : blocks)
      attended_tokens += std::min<uint64_t>(T, (b + 1) * geo.block_size) - b * geo.block_size;
    totals_.attended_tokens += attended_tokens;
    totals_.context_tokens += T;
  }
  return Status::Ok();
}

}  // namespace kvm::client
