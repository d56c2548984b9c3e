#include "selector/plan.h"

#include <algorithm>
#include <string>

namespace kvm::sel {

void HotSetMirror::Reset() {
  std::fill(slot_block_.begin(), slot_block_.end(), kEmptySlot);
  where_.clear();
}

Status HotSetMirror::Plan(const std::vector<uint64_t>& resident, uint64_t T, const Geometry& geo,
                          uint64_t prev_window_first, size_t kv_block_bytes, size_t row_bytes,
                          PlanStep* step, PlanBytes* bytes) {
  *step = PlanStep{};
  const uint64_t wf = geo.WindowFirstBlock(T);
  step->window_first = wf;
  std::vector<uint64_t> need;  // resident, outside the window
  for (uint64_t b : resident)
    if (b < wf) need.push_back(b);
  if (need.size() > slot_block_.size())
    return Status::InvalidArgument("plan: " + std::to_string(need.size()) +
                                   " resident blocks outside the window (" +
                                   std::to_string(need.size() * geo.block_size) +
                                   " tokens of budget) exceed the hot-set capacity of " +
                                   std::to_string(slot_block_.size()) + " slots");
  // Evict what is no longer needed (need is ascending: binary search).
  for (uint32_t s = 0; s < slot_block_.size(); ++s) {
    const uint64_t b = slot_block_[s];
    if (b == kEmptySlot || std::binary_search(need.begin(), need.end(), b)) continue;
    slot_block_[s] = kEmptySlot;
    where_.erase(b);
    step->evicted_slots.push_back(s);
  }
  uint32_t free_scan = 0;
  for (uint64_t b : need) {
    if (where_.count(b)) continue;
    while (slot_block_[free_scan] != kEmptySlot) ++free_scan;
    slot_block_[free_scan] = b;
    where_[b] = free_scan;
    (b >= prev_window_first ? step->local_fills : step->sends).emplace_back(b, free_scan);
  }
  bytes->streamed += 2ull * kv_block_bytes * step->sends.size();
  bytes->local_fill += 2ull * kv_block_bytes * step->local_fills.size();
  bytes->dense_equivalent += 2ull * row_bytes * T;
  bytes->topk_refetch += 2ull * kv_block_bytes * need.size();
  return Status::Ok();
}

Status HotSetMirror::Apply(const PlanStep& step) {
  std::vector<uint64_t> table = slot_block_;
  for (uint32_t s : step.evicted_slots) {
    if (s >= table.size() || table[s] == kEmptySlot)
      return Status::Internal("hot set diverged: the step evicts slot " + std::to_string(s) +
                              (s >= table.size() ? " of " + std::to_string(table.size())
                                                 : std::string(", which is empty here")));
    table[s] = kEmptySlot;
  }
  std::unordered_map<uint64_t, uint32_t> where;
  for (uint32_t s = 0; s < table.size(); ++s)
    if (table[s] != kEmptySlot) where[table[s]] = s;
  for (const auto* list : {&step.sends, &step.local_fills})
    for (const auto& [b, s] : *list) {
      if (s >= table.size() || table[s] != kEmptySlot)
        return Status::Internal(
            "hot set diverged: block " + std::to_string(b) + " goes to slot " + std::to_string(s) +
            (s >= table.size() ? " of " + std::to_string(table.size())
                               : ", which holds block " + std::to_string(table[s]) + " here"));
      if (!where.emplace(b, s).second)
        return Status::Internal("hot set diverged: block " + std::to_string(b) +
                                " is already in slot " + std::to_string(where[b]));
      table[s] = b;
    }
  slot_block_ = std::move(table);
  where_ = std::move(where);
  return Status::Ok();
}

uint64_t HotSetMirror::Digest() const {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint64_t b : slot_block_)
    for (int i = 0; i < 8; ++i) {
      h ^= (b >> (8 * i)) & 0xff;
      h *= 0x100000001b3ull;
    }
  return h;
}

}  // namespace kvm::sel
