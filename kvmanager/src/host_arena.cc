#include "kvmanager/host_arena.h"

#include <sys/mman.h>

#include <fstream>
#include <string>

#include "attention/cuda.h"
#include "kvmanager/memory_limits.h"

namespace kvm::store {

size_t DefaultHostCapacity(double fraction, size_t cap) {
  // The node's MemAvailable, or the container's cgroup v2 memory.max when that is lower.
  const MemoryLimits m = ReadMemoryLimits();
  return static_cast<size_t>(DefaultHostCapacity(m.mem_available, m.cgroup_max, fraction, cap));
}

Result<std::unique_ptr<HostArena>> HostArena::Make(size_t capacity_bytes, size_t slot_bytes) {
  if (slot_bytes == 0) return Status::InvalidArgument("host arena: slot size must be > 0");
  const size_t n = capacity_bytes / slot_bytes;
  if (n == 0)
    return Status::InvalidArgument("host arena: capacity " + std::to_string(capacity_bytes) +
                                   " is smaller than one slot of " + std::to_string(slot_bytes));
  if (n > UINT32_MAX) return Status::InvalidArgument("host arena: too many slots");
  const size_t bytes = n * slot_bytes;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    return Status::NoSpace("host arena: cannot map " + std::to_string(bytes) + " bytes");
  auto arena = std::unique_ptr<HostArena>(
      new HostArena(static_cast<uint8_t*>(p), bytes, slot_bytes, static_cast<uint32_t>(n)));
  // Page-locked when a CUDA device exists (fast asynchronous copies to the GPU); otherwise the
  // arena stays pageable and says why.
  const Status pin = attn::cuda::HostRegister(p, bytes);
  arena->pinned_ = pin.ok();
  arena->pinning_ = pin.ok() ? "pinned (cudaHostRegister)" : "not pinned: " + pin.message();
  return arena;
}

HostArena::HostArena(uint8_t* base, size_t bytes, size_t slot_bytes, uint32_t capacity)
    : base_(base), bytes_(bytes), slot_bytes_(slot_bytes), capacity_(capacity) {
  free_.reserve(capacity);
  refs_.assign(capacity, 0);
  for (uint32_t s = capacity; s > 0; --s) free_.push_back(s - 1);  // lowest slots first
}

HostArena::~HostArena() {
  if (pinned_) (void)attn::cuda::HostUnregister(base_);
  munmap(base_, bytes_);
}

Result<uint32_t> HostArena::Allocate() {
  std::lock_guard<std::mutex> l(mu_);
  if (free_.empty())
    return Status::NoSpace("host tier full (" + std::to_string(capacity_) + " slots)");
  const uint32_t s = free_.back();
  free_.pop_back();
  refs_[s] = 1;
  return s;
}

void HostArena::Share(uint32_t slot) {
  std::lock_guard<std::mutex> l(mu_);
  ++refs_[slot];
}

void HostArena::Free(uint32_t slot) {
  std::lock_guard<std::mutex> l(mu_);
  if (refs_[slot] > 0 && --refs_[slot] == 0) free_.push_back(slot);
}

uint32_t HostArena::refs(uint32_t slot) const {
  std::lock_guard<std::mutex> l(mu_);
  return refs_[slot];
}

uint32_t HostArena::used() const {
  std::lock_guard<std::mutex> l(mu_);
  return capacity_ - static_cast<uint32_t>(free_.size());
}

}  // namespace kvm::store
