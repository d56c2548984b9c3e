// HostArena: the host tier's memory — one large anonymous mapping, carved into fixed-size block
// slots by a slab allocator, so that UCX can register it once; page-locked with cudaHostRegister
// when a CUDA device exists. A slot may be shared (a block that several sequences hold by content
// address): each holder frees it once, and it returns to the free list with the last. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "proto/status.h"

namespace kvm::store {

// min(fraction of MemAvailable, cap): the default host-tier size.
size_t DefaultHostCapacity(double fraction = 0.25, size_t cap = size_t{16} << 30);

class HostArena {
 public:
  // InvalidArgument for a zero slot size or a capacity smaller than one slot; NoSpace when the
  // mapping fails (never aborts).
  static Result<std::unique_ptr<HostArena>> Make(size_t capacity_bytes, size_t slot_bytes);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // A free slot (one holder), or NoSpace when every slot is in use.
  Result<uint32_t> Allocate();
  // One more holder of an allocated slot.
  void Share(uint32_t slot);
  // One holder fewer; the slot is free when none is left.
  void Free(uint32_t slot);
  uint32_t refs(uint32_t slot) const;
  uint8_t* slot(uint32_t s) const { return base_ + size_t{s} * slot_bytes_; }
  void* base() const { return base_; }
  size_t bytes() const { return bytes_; }
  size_t slot_bytes() const { return slot_bytes_; }
  uint32_t capacity() const { return capacity_; }
  uint32_t used() const;
  // Whether the arena is page-locked for CUDA, and in words why (not).
  bool pinned() const { return pinned_; }
  const std::string& pinning() const { return pinning_; }

 private:
  HostArena(uint8_t* base, size_t bytes, size_t slot_bytes, uint32_t capacity);
  uint8_t* base_;
  size_t bytes_, slot_bytes_;
  uint32_t capacity_;
  bool pinned_ = false;
  std::string pinning_;
  mutable std::mutex mu_;
  std::vector<uint32_t> free_;  // guarded by mu_
  std::vector<uint32_t> refs_;  // holders per slot; guarded by mu_
};

}  // namespace kvm::store
