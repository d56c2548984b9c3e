// The plan (one implementation, used by eval, service and client alike): a resident block set →
// the diff against a mirror of the worker's hot set → evictions, sends with their target slots, and
// the slot table the attention reads; with the byte accounting of DESIGN.md §8.
//
// The worker keeps the recent window locally, so window blocks never enter the hot set and never
// travel. A block that just left the window (it was in the previous step's window) is filled from
// the worker's own copy ("local fill"), not sent. Everything else that enters the hot set is sent.
//
// HotSetMirror is the slot table of one (layer, KV head): the service plans against it (Plan) and
// the worker's hot set applies the same steps to its own copy (Apply), so the two are one state
// machine; Digest lets either side check that they agree. Not thread-safe.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "proto/model_shape.h"
#include "proto/status.h"
#include "selector/selection.h"

namespace kvm::sel {

inline constexpr uint64_t kEmptySlot = UINT64_MAX;

struct PlanStep {
  std::vector<uint32_t> evicted_slots;               // freed this step
  std::vector<std::pair<uint64_t, uint32_t>> sends;  // (block, slot): streamed over the network
  std::vector<std::pair<uint64_t, uint32_t>>
      local_fills;            // (block, slot): copied from the worker's window
  uint64_t window_first = 0;  // blocks ≥ this are attended from the local window
};

// Cumulative byte counts (K and V together).
struct PlanBytes {
  uint64_t streamed = 0;          // sends × 2 × block bytes
  uint64_t local_fill = 0;        // local fills × 2 × block bytes (no network)
  uint64_t dense_equivalent = 0;  // T × 2 × row bytes per (step, layer, KV head): a dense offload
  uint64_t topk_refetch = 0;      // every step re-sending every resident non-window block
  void Add(const PlanBytes& o) {
    streamed += o.streamed;
    local_fill += o.local_fill;
    dense_equivalent += o.dense_equivalent;
    topk_refetch += o.topk_refetch;
  }
};

class HotSetMirror {
 public:
  explicit HotSetMirror(uint32_t slots = 0) : slot_block_(slots, kEmptySlot) {}
  uint32_t capacity() const { return static_cast<uint32_t>(slot_block_.size()); }
  // slot → block (kEmptySlot when free): the slot table.
  const std::vector<uint64_t>& slot_table() const { return slot_block_; }
  bool Contains(uint64_t block) const { return where_.count(block) > 0; }
  // The slot holding `block`, or false.
  bool Find(uint64_t block, uint32_t* slot) const {
    auto it = where_.find(block);
    if (it == where_.end()) return false;
    *slot = it->second;
    return true;
  }
  // Forgets everything (the worker lost its buffer: a new hot-set generation).
  void Reset();

  // Plans one step: `resident` (ascending) at T tokens with geometry `geo`; `prev_window_first` is
  // the first window block of the previous step (blocks at or after it are in the worker's window
  // copy). InvalidArgument naming budget and capacity when the non-window resident blocks exceed
  // capacity.
  Status Plan(const std::vector<uint64_t>& resident, uint64_t T, const Geometry& geo,
              uint64_t prev_window_first, size_t kv_block_bytes, size_t row_bytes, PlanStep* step,
              PlanBytes* bytes);
  // Applies a step Plan produced on another copy of this table: frees the evicted slots, then puts
  // every sent and locally filled block in its slot. Internal naming the slot and block when the
  // step does not fit this table (an evicted slot already free, a target slot taken, a block held
  // twice): the two copies diverged. On error the table is unchanged.
  Status Apply(const PlanStep& step);
  // A short digest of the slot table (FNV-1a 64 of every slot's block): equal tables, equal
  // digests.
  uint64_t Digest() const;

 private:
  std::vector<uint64_t> slot_block_;
  std::unordered_map<uint64_t, uint32_t> where_;
};

}  // namespace kvm::sel
