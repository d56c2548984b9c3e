// The worker's hot set (DESIGN.md §2, §4 steps 4–5): per (layer, KV head) a fixed number of block
// slots filled by the service, the slot table saying which block each slot holds, and the local
// tail — the worker's own copy of its most recent blocks (the recent window never comes back from
// the service).
//
// The slot table changes only by applying a plan step (selector/plan.h PlanStep: evictions, sends,
// local fills) — the same step the service's mirror of this table produced — so both sides run one
// state machine, and Digest checks that they agree. The slot buffer is one allocation,
//   [layer][kv_head][slot][K, V][block_size][head_dim] of the layout's dtype,
// so a data plane can register it once and land blocks straight in their slots.
//
// Not thread-safe: one worker drives one hot set.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "proto/model_shape.h"
#include "proto/status.h"
#include "selector/plan.h"

namespace kvm::client {

class HotSet {
 public:
  HotSet(const BlockLayout& layout, uint32_t slots);

  uint32_t slots() const { return slots_; }
  const BlockLayout& layout() const { return layout_; }
  // The slot buffer (for data-plane registration) and one slot's K block (its V block follows).
  uint8_t* data() { return buf_.data(); }
  size_t size() const { return buf_.size(); }
  uint8_t* Slot(uint32_t layer, uint32_t kv_head, uint32_t slot) {
    return buf_.data() + (Index(layer, kv_head) * slots_ + slot) * 2 * bb_;
  }

  // ---- the local tail ----
  // Writes token `pos` of (layer, kv_head): k and v are fp32 [head_dim], stored in the layout's
  // dtype.
  void AppendRow(uint32_t layer, uint32_t kv_head, uint64_t pos, const float* k, const float* v);
  // The stored row of token `pos` (K, or V with values), or null when the tail does not hold it.
  const uint8_t* LocalRow(uint32_t layer, uint32_t kv_head, uint64_t pos, bool values) const;
  // Blocks at or after this are in the tail (as far as they were appended).
  uint64_t local_first(uint32_t layer, uint32_t kv_head) const {
    return heads_[Index(layer, kv_head)].local_first;
  }
  // Drops the tail's blocks below `first` (never moves local_first back).
  void Trim(uint32_t layer, uint32_t kv_head, uint64_t first);
  // The tail's K or V block b (null when not held).
  const uint8_t* LocalBlock(uint32_t layer, uint32_t kv_head, uint64_t b, bool values) const;

  // ---- the slot table ----
  // Applies one plan step of (layer, kv_head). Sent blocks take their bytes from `payload` (K then
  // V of each send, in order: the TCP path) or are already in their slots (empty payload: the data
  // plane landed them); local fills are copied from the tail. Internal naming slot and block when
  // the step does not fit (the copies diverged) or a local fill is not in the tail; the table is
  // then unchanged.
  Status Apply(uint32_t layer, uint32_t kv_head, const sel::PlanStep& step,
               std::span<const uint8_t> payload);
  uint64_t Digest(uint32_t layer, uint32_t kv_head) const {
    return tables_[Index(layer, kv_head)].Digest();
  }
  bool Holds(uint32_t layer, uint32_t kv_head, uint64_t block) const {
    return tables_[Index(layer, kv_head)].Contains(block);
  }
  // The slot holding `block` of (layer, kv_head); false when no slot does.
  bool FindSlot(uint32_t layer, uint32_t kv_head, uint64_t block, uint32_t* slot) const {
    return tables_[Index(layer, kv_head)].Find(block, slot);
  }
  // One slot's K block (its V block follows), read-only.
  const uint8_t* SlotData(uint32_t layer, uint32_t kv_head, uint32_t slot) const {
    return SlotOf(layer, kv_head, slot);
  }
  // A resident set from the slot table: its blocks (the plan keeps exactly the resident blocks
  // before the window in slots) + those of `window` at or after window_first and below nb,
  // ascending.
  std::vector<uint64_t> Resident(uint32_t layer, uint32_t kv_head, uint64_t window_first,
                                 uint64_t nb, std::span<const uint64_t> window) const;
  // Empties every slot (a new hot-set generation); the tail stays.
  void Reset();

  // The attention block list of a selection of (layer, kv_head) at T tokens, in the selection's
  // (ascending) order: each block from the tail when it holds it, else from its slot; rows[i] = B
  // except for the context's last block. Internal naming the block when neither holds it.
  Status BlockList(uint32_t layer, uint32_t kv_head, std::span<const uint64_t> blocks, uint64_t T,
                   const void** k, const void** v, uint16_t* rows) const;

 private:
  struct Head {
    std::vector<std::vector<uint8_t>> k, v;  // the tail by block index (empty: not held)
    uint64_t local_first = 0;
  };
  size_t Index(uint32_t layer, uint32_t kv_head) const {
    return size_t{layer} * layout_.shape().kv_heads + kv_head;
  }
  const uint8_t* SlotOf(uint32_t layer, uint32_t kv_head, uint32_t slot) const {
    return buf_.data() + (Index(layer, kv_head) * slots_ + slot) * 2 * bb_;
  }

  BlockLayout layout_;
  uint32_t slots_;
  size_t bb_, row_;
  std::vector<uint8_t> buf_;
  std::vector<sel::HotSetMirror> tables_;  // [layer][kv_head]
  std::vector<Head> heads_;                // [layer][kv_head]
};

}  // namespace kvm::client
