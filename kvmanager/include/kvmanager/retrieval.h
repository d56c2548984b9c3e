// The retrieval engine (DESIGN.md §4 steps 3, 4 and 6): what the service does when a worker's gate
// failed. Per sequence it holds the selector the worker asked for at create (selector/), one
// hot-set mirror per (layer, KV head) (selector/plan.h), and the worker's hot-set generation.
//
// RetrieveLayer: the selector re-anchors (Selector::Anchor: exact q·K of every query head of the
// group over every key of (layer, KV head), δ exact). It asks for the scores when it needs them
// (not for a short context): they are computed on the store's GPU tier when it has one (the keys
// stay on the device), else on the CPU from the keys read out of the store; the K rows the worker
// has not appended yet travel with the query; a selector that reads the keys itself gets the
// keys. The selection is marked in the store (eviction order), the plan diffs it against the
// mirror, the blocks to send are promoted and pinned where they lie (ReplyBlocks: no copy); the
// reply carries per KV head the slot table changes (sends, local fills, evictions), the resident
// set, δ, log δ, kind and K_max, and the sent blocks' K and V as payload.
//
// K once (protocol 2): the K rows a RetrieveLayer carries for tokens the store does not hold yet
// are kept per (layer, KV head) until the store holds them; a decode Append that leaves those rows
// out (Append.k_from_retrieval) takes them from here (TakeKRows), and a later retrieval of the same
// layer uses them when its Append has not run yet (a RetrieveLayer may overtake an Append).
//
// The worker keeps every block from the window start of its last retrieval on locally, so the
// mirror's "previous window" is the window at the last retrieval of that (layer, KV head), not the
// previous step: reuse steps never reach the service. Selector state is soft: a restarted service
// (or a worker that re-attaches) starts without anchors and re-anchors at the next retrieval.
//
// Thread-safe: one mutex per sequence orders its requests (across sessions); different sequences
// run in parallel.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvmanager/block_store.h"

namespace kvm::wire {
class SelectorParams;
class RetrieveLayer;
class RetrieveLayerReply;
class Audit;
class AuditReply;
class Correct;
class CorrectReply;
class WorkerStats;
}  // namespace kvm::wire

namespace kvm::server {

class Metrics;

struct RetrievalOptions {
  uint64_t max_reply_bytes = 64ull << 20;  // payload of one reply (the frame limit)
  uint32_t max_pending_tokens = 4096;      // K rows a query may carry (not appended yet)
};

// A retrieval's blocks to send, where they lie: K then V of each block (`half_bytes` each), in the
// reply's order, held in place (store::PinnedBlocks: eviction, truncate and delete wait for them)
// until this goes — the sender gathers from them or copies them out. Move-only.
struct ReplyBlocks {
  std::vector<store::PinnedBlocks> pins;
  std::vector<const void*> halves;  // K of block 0, V of block 0, K of block 1, ...
  size_t half_bytes = 0;            // one block's K (or V)
  size_t blocks() const { return halves.size() / 2; }
  size_t bytes() const { return halves.size() * half_bytes; }
  // Blocks [first, first + n) into out (n * 2 * half_bytes bytes), K then V of each.
  void CopyTo(size_t first, size_t n, uint8_t* out) const;
};

class RetrievalEngine {
 public:
  RetrievalEngine(store::BlockStore* store, RetrievalOptions opt, Metrics* metrics = nullptr);
  ~RetrievalEngine();

  // Sets up (or replaces: attach) the selector state of a stored sequence. InvalidArgument for bad
  // selector params (naming the field) or a hot set smaller than the selector needs.
  Status Configure(const store::SeqRef& s, const wire::SelectorParams& p, uint32_t hot_set_slots);
  Status Retrieve(const store::SeqRef& s, const wire::RetrieveLayer& m,
                  std::span<const uint8_t> payload, wire::RetrieveLayerReply* reply,
                  ReplyBlocks* blocks);
  // The cross-layer sharing map (selectors.md §0.6); PrHS only.
  Status SetLayerMap(const store::SeqRef& s, const std::vector<uint32_t>& source);
  // δ of the worker's current resident set for the given queries (kind audit).
  Status Audit(const store::SeqRef& s, const wire::Audit& m, std::span<const uint8_t> payload,
               wire::AuditReply* reply);
  // Exact correction: the partial attention (softmax state and output) of each listed KV head's
  // query group over the blocks of [0, step + 1) its `attended` list leaves out, read from the
  // store, into `out` as fp32 [heads][group][2 + head_dim] (wire::Correct). Needs no selector
  // state. InvalidArgument for a malformed request (naming what), FailedPrecondition when a block
  // left out is not stored yet.
  Status Correct(const store::SeqRef& s, const wire::Correct& m, std::span<const uint8_t> payload,
                 wire::CorrectReply* reply, std::vector<uint8_t>* out);
  // The K rows of token `pos` that RetrieveLayers carried for the (layer * kv_heads + kv_head)
  // entries `which`, into rows[i * row_bytes]. FailedPrecondition naming the first one it lacks.
  Status TakeKRows(const store::SeqRef& s, uint64_t pos, std::span<const uint32_t> which,
                   uint8_t* rows);
  // What the worker saw and reported (its gate's decisions, the claims it made alone) into the
  // metrics, under the sequence's selector. InvalidArgument for malformed counts.
  Status ReportWorkerStats(const store::SeqRef& s, const wire::WorkerStats& w);
  // Drops a sequence's state (delete).
  void Forget(const store::SeqRef& s);
  // Forgets anchors and mirrors, keeps the params (truncate; the worker drops its hot set too).
  void Reset(const store::SeqRef& s);

 private:
  struct Seq;
  Result<std::shared_ptr<Seq>> Find(const store::SeqRef& s);
  store::BlockStore* store_;
  RetrievalOptions opt_;
  Metrics* metrics_;
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<Seq>> seqs_;
};

}  // namespace kvm::server
