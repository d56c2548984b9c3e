#include "client/hot_set.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "proto/half.h"

namespace kvm::client {

HotSet::HotSet(const BlockLayout& layout, uint32_t slots)
    : layout_(layout),
      slots_(slots),
      bb_(layout.kv_block_bytes()),
      row_(layout.row_bytes()),
      buf_(size_t{layout.shape().layers} * layout.shape().kv_heads * slots * 2 * bb_),
      tables_(size_t{layout.shape().layers} * layout.shape().kv_heads, sel::HotSetMirror(slots)),
      heads_(tables_.size()) {}

void HotSet::AppendRow(uint32_t layer, uint32_t kv_head, uint64_t pos, const float* k,
                       const float* v) {
  Head& hd = heads_[Index(layer, kv_head)];
  const uint64_t b = pos / layout_.block_size();
  if (hd.k.size() <= b) {
    hd.k.resize(b + 1);
    hd.v.resize(b + 1);
  }
  if (hd.k[b].empty()) {
    hd.k[b].assign(bb_, 0);
    hd.v[b].assign(bb_, 0);
  }
  const uint32_t D = layout_.shape().head_dim;
  const DType dt = layout_.shape().dtype;
  EncodeRow(k, D, dt, hd.k[b].data() + (pos % layout_.block_size()) * row_);
  EncodeRow(v, D, dt, hd.v[b].data() + (pos % layout_.block_size()) * row_);
}

const uint8_t* HotSet::LocalBlock(uint32_t layer, uint32_t kv_head, uint64_t b, bool values) const {
  const Head& hd = heads_[Index(layer, kv_head)];
  if (b < hd.local_first || b >= hd.k.size() || hd.k[b].empty()) return nullptr;
  return (values ? hd.v[b] : hd.k[b]).data();
}

const uint8_t* HotSet::LocalRow(uint32_t layer, uint32_t kv_head, uint64_t pos, bool values) const {
  const uint8_t* blk = LocalBlock(layer, kv_head, pos / layout_.block_size(), values);
  return blk ? blk + (pos % layout_.block_size()) * row_ : nullptr;
}

void HotSet::Trim(uint32_t layer, uint32_t kv_head, uint64_t first) {
  Head& hd = heads_[Index(layer, kv_head)];
  for (uint64_t b = hd.local_first; b < first && b < hd.k.size(); ++b) {
    std::vector<uint8_t>().swap(hd.k[b]);
    std::vector<uint8_t>().swap(hd.v[b]);
  }
  hd.local_first = std::max(hd.local_first, first);
}

Status HotSet::Apply(uint32_t layer, uint32_t kv_head, const sel::PlanStep& step,
                     std::span<const uint8_t> payload) {
  if (!payload.empty() && payload.size() != step.sends.size() * 2 * bb_)
    return Status::Internal("hot set: " + std::to_string(payload.size()) + " payload bytes for " +
                            std::to_string(step.sends.size()) + " sent blocks of " +
                            std::to_string(2 * bb_) + " bytes");
  for (const auto& [b, slot] : step.local_fills)
    if (!LocalBlock(layer, kv_head, b, false))
      return Status::Internal("hot set: the service fills slot " + std::to_string(slot) +
                              " with block " + std::to_string(b) +
                              " from the worker's copy, which does not hold it");
  KVM_RETURN_IF_ERROR(tables_[Index(layer, kv_head)].Apply(step));
  for (size_t i = 0; i < step.sends.size() && !payload.empty(); ++i)
    std::memcpy(Slot(layer, kv_head, step.sends[i].second), payload.data() + i * 2 * bb_, 2 * bb_);
  for (const auto& [b, slot] : step.local_fills) {
    std::memcpy(Slot(layer, kv_head, slot), LocalBlock(layer, kv_head, b, false), bb_);
    std::memcpy(Slot(layer, kv_head, slot) + bb_, LocalBlock(layer, kv_head, b, true), bb_);
  }
  return Status::Ok();
}

std::vector<uint64_t> HotSet::Resident(uint32_t layer, uint32_t kv_head, uint64_t window_first,
                                       uint64_t nb, std::span<const uint64_t> window) const {
  std::vector<uint64_t> out;
  for (uint64_t b : tables_[Index(layer, kv_head)].slot_table())
    if (b != sel::kEmptySlot) out.push_back(b);
  for (uint64_t b : window)
    if (b >= window_first && b < nb) out.push_back(b);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void HotSet::Reset() {
  for (auto& t : tables_) t.Reset();
}

Status HotSet::BlockList(uint32_t layer, uint32_t kv_head, std::span<const uint64_t> blocks,
                         uint64_t T, const void** k, const void** v, uint16_t* rows) const {
  const uint32_t B = layout_.block_size();
  const uint64_t nb = (T + B - 1) / B;
  const sel::HotSetMirror& table = tables_[Index(layer, kv_head)];
  for (size_t i = 0; i < blocks.size(); ++i) {
    const uint64_t b = blocks[i];
    if (b >= nb)
      return Status::Internal("block " + std::to_string(b) + " is past the context of " +
                              std::to_string(T) + " tokens");
    uint32_t slot = 0;
    if (const uint8_t* lk = LocalBlock(layer, kv_head, b, false)) {
      k[i] = lk;
      v[i] = LocalBlock(layer, kv_head, b, true);
    } else if (table.Find(b, &slot)) {
      k[i] = SlotOf(layer, kv_head, slot);
      v[i] = SlotOf(layer, kv_head, slot) + bb_;
    } else {
      return Status::Internal("block " + std::to_string(b) + " of layer " + std::to_string(layer) +
                              " KV head " + std::to_string(kv_head) +
                              " is neither in the worker's copy nor in the hot set");
    }
    rows[i] = static_cast<uint16_t>(b + 1 == nb && T % B ? T % B : B);
  }
  return Status::Ok();
}

}  // namespace kvm::client
