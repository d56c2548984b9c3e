// MeasuredKvSource: measures what a sparse KV source really drops. It wraps the source (in-process
// SelectorKvSource or the service's ServiceKvSource) and keeps a full shadow copy of the KV the
// worker appends; at every decode (step, layer, query head) it scores the worker's own query
// against the shadow keys and records the true δ of the blocks the source attended, the δ of the
// block oracle with as many blocks and the same forced ones (selectors.md §0.7), and the source's
// claim. The source's claims are never the measurement: the oracle here is independent of the code
// that chose the blocks. Audits the source receives later are attached to their step's record.
//
// Not thread-safe (one worker).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "client/kv_source.h"
#include "selector/options.h"
#include "selector/registry.h"

namespace kvm::client {

// One (step, layer, query head).
struct HeadRecord {
  uint64_t step;
  uint32_t layer, q_head;
  double delta_true;    // measured on this run's own q and K
  double delta_oracle;  // the block oracle of the same size and forced blocks
  double delta_claim;   // what the source claimed (NaN: unknown)
  DeltaKind kind;       // the claim's kind
  double delta_audit;   // what an audit of this step measured on the service (NaN: not audited)
};

struct MeasureTotals {
  uint64_t attended_tokens = 0;  // Σ over (step, layer, KV head) of attended tokens (≤ T)
  uint64_t context_tokens = 0;   // Σ over (step, layer, KV head) of T
  uint64_t audits = 0;           // audited (step, layer, query head) records
};

class MeasuredKvSource : public KvSource {
 public:
  // `inner` must outlive this. prefill: positions below it are dense (not measured). `forced`: the
  // selector's registry entry's forced policy; `o`: its options (geometry, budget).
  static Result<std::unique_ptr<MeasuredKvSource>> Make(SparseKvSource* inner,
                                                        const ModelShape& shape,
                                                        const sel::SelectorOptions& o,
                                                        uint64_t prefill, sel::ForcedPolicy forced);
  void BeginToken(uint32_t token, uint64_t pos) override { inner_->BeginToken(token, pos); }
  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override;
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override;

  // Takes the claims (audits) that arrived after the last Attend, e.g. at the final Flush.
  void TakeLateClaims();
  const std::vector<HeadRecord>& records() const { return records_; }
  const MeasureTotals& totals() const { return totals_; }
  DenseKvSource& shadow() { return *shadow_; }

 private:
  MeasuredKvSource() = default;
  void TakeClaims(uint32_t layer, uint64_t pos, std::vector<const ClaimRecord*>* now);
  SparseKvSource* inner_ = nullptr;
  std::unique_ptr<DenseKvSource> shadow_;
  ModelShape shape_;
  sel::SelectorOptions opt_;
  uint64_t prefill_ = 0;
  sel::ForcedPolicy forced_ = sel::ForcedPolicy::kGeometry;
  size_t claims_seen_ = 0;
  std::vector<HeadRecord> records_;
  MeasureTotals totals_;
};

}  // namespace kvm::client
