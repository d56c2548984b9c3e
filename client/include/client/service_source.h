// ServiceKvSource: the reference worker's third KV source — the service (DESIGN.md §4).
//
// Prefill runs densely on the worker (it holds the prompt's KV while it computes it) and appends
// every token to the service. From the first decode position on the worker keeps only a local tail
// per (layer, KV head): every block from the window start of its last retrieval on. Per decode
// step and layer:
//   1. append (batched: one Append per step, sent asynchronously after the step's last layer's K
//      and V exist; acknowledgements are checked later);
//   2. gate, per KV-head group: PrHS reuses its last anchor when the gate passes (the same rule as
//      the in-process selector, sel::PrhsReuse), with no message at all; a short context (every
//      block fits the budget) needs none either once the hot set holds it;
//   3. otherwise one RetrieveLayer for the failing groups of the layer (the K rows the service has
//      not stored yet travel with the queries); the reply's slot table changes are applied to the
//      hot-set buffer: evictions, local fills from the tail, and the sent blocks;
//   4. attention over the hot set + the tail (attn::Attend with the selection's token mask, the
//   same
//      arithmetic and order as SelectorKvSource: the same selections give bit-identical outputs);
//   5. audits: a sampled fraction of reuse steps send their queries (Audit) and record the measured
//      δ (kind audit) when the reply arrives.
// PrHS with layer sharing (selectors.md §0.6): at the first decode step the worker builds the layer
// map from its last 64 prefill queries (as the in-process eval does) and sends it (SetLayerMap); a
// sharing layer never retrieves: its blocks come in its source layer's batch, ahead of its query.
// Selectors other than PrHS have no gate: they retrieve every step.
//
// Blocks arrive on the client's data plane (UCX or in-process active messages, straight into the
// registered hot-set slots) when the session has one, else in the reply frame (TCP). One source
// per data plane (it installs the receiver). Not thread-safe: one worker drives one source.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "client/client.h"
#include "client/kv_source.h"
#include "selector/prhs.h"

namespace kvm::client {

struct ServiceSourceOptions {
  uint64_t sequence_id = 1;
  std::string selector = "prhs";  // prhs, oracle, quest, streaming, h2o
  sel::SelectorOptions options;
  uint64_t prefill = 0;         // positions below it attend densely on the worker
  double audit_fraction = 0.0;  // of reuse steps (per layer and group), sampled deterministically
  bool durable = false;         // durability mode of the sequence (default: cache)
  bool attach = false;          // attach to an existing sequence instead of creating it
};

// One (step, layer, query head) as the worker knows it.
struct ServiceRecord {
  uint64_t step;
  uint32_t layer, q_head;
  double delta;  // exact at anchors and short contexts, the bound on reuse, measured by audits
  DeltaKind kind;
};

struct ServiceTotals {
  uint64_t steps = 0;           // decode steps (per layer 0)
  uint64_t retrievals = 0;      // query heads the service scored (selectors.md §0.3)
  uint64_t round_trips = 0;     // RetrieveLayer requests
  uint64_t gate_checks = 0;     // (step, layer, group) decisions taken locally
  uint64_t reuses = 0;          // ... of which reused the anchor (no message)
  uint64_t audits = 0;          // query heads audited
  uint64_t streamed_bytes = 0;  // block payload bytes received (K and V)
  uint64_t local_fill_bytes = 0;
  uint64_t dense_equivalent = 0;   // DESIGN.md §8, over the decode steps
  uint64_t topk_refetch = 0;       // re-sending every resident non-window block every step
  uint64_t shared_prefetches = 0;  // (layer, KV head) selections that came in a source's batch
  double retrieve_seconds = 0;     // wall time waiting for retrieval replies
};

class ServiceKvSource : public KvSource {
 public:
  // Creates (or attaches to) the sequence on the service with the selector params; the hot set
  // is sized for the selector (InvalidArgument from the service when it is too small).
  static Result<std::unique_ptr<ServiceKvSource>> Make(Client* client, const ModelShape& shape,
                                                       const ServiceSourceOptions& o);
  ~ServiceKvSource() override;
  void BeginToken(uint32_t token, uint64_t pos) override;
  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override;
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override;
  // Waits for outstanding appends and audits.
  Status Flush();
  // Deletes the sequence on the service.
  Status Delete();
  // The worker lost its hot set (or the connection): drop it, reconnect when needed, re-attach,
  // and bump the hot-set generation so the service forgets its mirror.
  Status ResetHotSet();

  const std::vector<ServiceRecord>& records() const;
  const ServiceTotals& totals() const;
  uint32_t hot_set_slots() const;
  uint64_t hot_set_generation() const;

  struct Impl;

 private:
  explicit ServiceKvSource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::client
