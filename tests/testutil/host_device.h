// Test double of the GPU tier's device (kvmanager/gpu_tier.h): "device memory" in host memory and
// the CPU reference scoring as the kernel, so the tier's bookkeeping and the service's GPU scoring
// path run (and give the CPU's exact logits) on machines without a GPU.
#pragma once

#include <cmath>
#include <cstring>
#include <vector>

#include "attention/reference.h"
#include "kvmanager/gpu_tier.h"

namespace kvm::testutil {

class HostDevice : public store::Device {
 public:
  std::string Describe() const override { return "host double"; }
  uint64_t free_bytes() const override { return 1ull << 30; }
  Result<void*> Malloc(size_t bytes) override { return static_cast<void*>(new uint8_t[bytes]); }
  void Free(void* p) override { delete[] static_cast<uint8_t*>(p); }
  Status ToDevice(void* d, const void* s, size_t n) override {
    std::memcpy(d, s, n);
    return Status::Ok();
  }
  Status ToHost(void* d, const void* s, size_t n) override { return ToDevice(d, s, n); }
  Status OnDevice(void* d, const void* s, size_t n) override { return ToDevice(d, s, n); }
  Status Score(const attn::cuda::ScoreParams& p) override {
    const size_t bb = size_t{p.block_size} * p.head_dim * DTypeSize(p.dtype);
    const uint64_t nb = (p.tokens + p.block_size - 1) / p.block_size;
    std::vector<const void*> ptr(nb);
    for (uint64_t b = 0; b < nb; ++b) ptr[b] = static_cast<const uint8_t*>(p.k) + b * bb;
    const attn::HeadKV kv{ptr.data(), ptr.data(), static_cast<uint32_t>(nb), p.tokens, p.block_size,
                          p.head_dim, p.dtype};
    attn::ScoreKeysGroup(p.q, p.group, kv, 1.0f / std::sqrt(float(p.head_dim)), p.scores);
    return Status::Ok();
  }
};

}  // namespace kvm::testutil
