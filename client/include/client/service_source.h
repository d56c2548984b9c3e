// ServiceKvSource: the reference worker's third KV source — the service (DESIGN.md §4).
//
// Prefill runs densely on the worker (it holds the prompt's KV while it computes it) and appends
// every token to the service. From the first decode position on the worker keeps only a local tail
// per (layer, KV head) — every block from the window start of its last retrieval on — and the hot
// set (hot_set.h). Per decode step and layer:
//   1. append (batched: one Append per step, sent asynchronously after the step's last layer's K
//      and V exist; acknowledgements are checked later);
//   2. the worker gate (selector/worker_gate.h, the same rules as the in-process selector) decides
//      per KV head: a short context the hot set already holds, a shared layer, or a reuse of the
//      last anchor need no message at all;
//   3. otherwise one RetrieveLayer for the KV heads that need it (the K rows the service has not
//      stored yet travel with the queries); each selection in the reply is a plan step the hot set
//      applies (evictions, local fills from the tail, sent blocks), checked against the digest of
//      the service's mirror; the selections of layers that share this one's index set come in the
//      same reply, ahead of their queries;
//   4. attention over the hot set + the tail through the fast kernel (attn::DecodeCpu), blocks in
//      ascending order — as SelectorKvSource does, so the same selections give bit-identical
//      outputs;
//   5. audits: a sampled fraction of reuse steps send their queries (Audit) and record the measured
//      δ (kind audit) when the reply arrives.
// With PrHS layer sharing the worker builds the layer map at the first decode step (the gate's
// BuildLayerMap over its last prefill queries) and sends it (SetLayerMap).
//
// Errors: a call retries at most once — after the connection was lost (Unavailable: reconnect,
// re-attach, new hot-set generation) or after the hot set diverged from the service's mirror (a
// digest mismatch or a step that does not fit: new generation) — then the error reaches the caller.
// Every retry, divergence and failed call is counted. Any other failure resets the hot set before
// the next call (a reply may have been applied in part).
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
#include "selector/options.h"
#include "selector/worker_gate.h"

namespace kvm::client {

class HotSet;  // hot_set.h

struct ServiceSourceOptions {
  uint64_t sequence_id = 1;
  std::string selector = "prhs";  // a selector the registry marks served
  sel::SelectorOptions options;
  uint64_t prefill = 0;         // positions below it attend densely on the worker
  double audit_fraction = 0.0;  // of reuse steps (per layer and group), sampled deterministically
  bool durable = false;         // durability mode of the sequence (default: cache)
  bool attach = false;          // attach to an existing sequence instead of creating it
  // Exact correction (kv_source.h): a Correct request per decode (step, layer) that needs it (every
  // one with kAlways; those that retrieved with kAnchors), the service attending the blocks the
  // worker does not hold. Default: off.
  Correction correction = Correction::kOff;
};

struct ServiceTotals {
  uint64_t steps = 0;           // decode steps (per layer 0)
  uint64_t retrievals = 0;      // query heads the service scored (selectors.md §0.3)
  uint64_t round_trips = 0;     // RetrieveLayer and Correct requests (on the critical path)
  uint64_t audits = 0;          // query heads audited
  uint64_t streamed_bytes = 0;  // block payload bytes received (K and V)
  uint64_t local_fill_bytes = 0;
  uint64_t dense_equivalent = 0;   // DESIGN.md §8, over the decode steps
  uint64_t topk_refetch = 0;       // re-sending every resident non-window block every step
  uint64_t shared_prefetches = 0;  // (layer, KV head) selections that came in a source's batch
  sel::GateCounts gate;            // the worker gate's decisions, per (step, layer, KV head)
  uint64_t reconnects = 0;         // retries after a lost connection (reconnect + reset)
  uint64_t divergences = 0;        // hot-set divergences detected, each resolved by a reset
  uint64_t failed_calls = 0;       // Attend calls that failed after the retry policy
  double retrieve_seconds = 0;     // wall time waiting for retrieval replies
  double attention_seconds = 0;    // decode attention (the fast kernel), wall time
  uint64_t attention_layers = 0;   // decode (step, layer) attentions timed
  // Exact correction: (step, layer, KV head)s corrected, Correct requests, the bytes of their
  // frames both ways, the wall time they took, and the blocks the service attended for them.
  uint64_t corrected = 0;
  uint64_t corrections = 0;
  uint64_t correction_bytes = 0;
  double correction_seconds = 0;
  double correction_service_seconds = 0;  // of it, the service's compute (its replies say)
  uint64_t correction_blocks = 0;
};

class ServiceKvSource : public SparseKvSource {
 public:
  // Creates (or attaches to) the sequence on the service with the selector params; the hot set
  // is sized for the selector (InvalidArgument from the service when it is too small, or for a
  // selector the registry keeps in-process).
  static Result<std::unique_ptr<ServiceKvSource>> Make(Client* client, const ModelShape& shape,
                                                       const ServiceSourceOptions& o);
  ~ServiceKvSource() override;
  void BeginToken(uint32_t token, uint64_t pos) override;
  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override;
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override;
  const std::vector<std::vector<uint64_t>>& attended() const override;
  const std::vector<ClaimRecord>& claims() const override;
  // Waits for outstanding appends and audits.
  Status Flush();
  // Deletes the sequence on the service; the message carries the worker's counts not reported yet
  // (gate outcomes, the δ claims it made alone) for the service's metrics.
  Status Delete();
  // Sends the pending appends, and the counts not reported yet on a heartbeat (none when there are
  // none). A long-lived worker calls it now and then; Append messages carry the counts anyway.
  Status ReportStats();
  // The worker lost its hot set (or the connection): drop it, reconnect when needed, re-attach,
  // and bump the hot-set generation so the service forgets its mirror.
  Status ResetHotSet();

  const ServiceTotals& totals() const;
  uint32_t hot_set_slots() const;
  uint64_t hot_set_generation() const;
  // The last error a retry resolved or a failed call returned ("" when none).
  const std::string& last_error() const;
  // The hot set itself, for tests that make it diverge from the service's mirror.
  // The worker's hot set: its slot table and slot buffer (a caller whose own kernel attends reads
  // the resident blocks there: HotSet::SlotOf, SlotData, LocalBlock).
  const HotSet& hot_set() const;
  HotSet& hot_set_for_testing();

  struct Impl;

 private:
  explicit ServiceKvSource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::client
