// CUDA kernels of attention/ (built when KVM_WITH_CUDA enables them). This header needs no CUDA
// headers; every function returns a Status: Unimplemented in a build without CUDA, Unavailable
// ("no CUDA device") at run time without a device, never an abort.
//
// Device pointers are plain `void*`/`float*` here; streams are `void*` (a cudaStream_t, or null for
// the default stream). Thread-safe as the CUDA runtime is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "attention/decode.h"
#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::attn::cuda {

// Retrieval scoring of one (layer, KV head): logits of `group` query heads against every key.
struct ScoreParams {
  const void* k =
      nullptr;  // device: K blocks of one (layer, KV head), contiguous
                //   [n_blocks][block_size][head_dim] of dtype, n_blocks = ceil(tokens / B)
  const float* q = nullptr;  // device: [group][head_dim] fp32 queries (post-RoPE)
  float* scores = nullptr;   // device out: [group][tokens] fp32, scale · q·k
  uint64_t tokens = 0;
  uint32_t block_size = 16;
  uint32_t head_dim = 128;  // 32, 64, 128 or 256
  uint32_t group = 1;       // query heads per KV head, 1..64
  DType dtype = DType::kF16;
  float scale = 0.0f;  // 0 → 1/sqrt(head_dim)
};
Status ScoreKeys(const ScoreParams& p, void* stream = nullptr);

// Retrieval of one (layer, KV head): scores (ScoreKeys; p.scores may be null to use the workspace),
// each query head's softmax and the group-aggregated mass of every block on the device, then the
// `count` blocks of highest mass (ascending; ties to the lower index) chosen on the host.
// *block_mass (optional) receives the nb aggregated masses. Workspace: RetrieveWorkspaceBytes.
size_t RetrieveWorkspaceBytes(uint64_t tokens, uint32_t block_size, uint32_t group);
Result<std::vector<uint64_t>> RetrieveTopBlocks(const ScoreParams& p, void* workspace,
                                                size_t workspace_bytes, uint64_t count,
                                                std::vector<float>* block_mass = nullptr,
                                                void* stream = nullptr);

// Decode attention on the GPU with the CPU path's parameters (attention/decode.h); every pointer in
// `p` (q, out, the block table arrays and the blocks themselves, rows, mask) is a device pointer.
// Split-KV: `splits` thread blocks per KV head write partial states into `workspace`
// (DecodeWorkspaceBytes) and a second kernel merges them. A list with no attended token gives NaN
// (the CPU path rejects it; here the table lives on the device and is not inspected).
uint32_t DecodeSplits(uint32_t kv_heads, uint32_t max_blocks);
size_t DecodeWorkspaceBytes(uint32_t kv_heads, uint32_t group, uint32_t head_dim, uint32_t splits);
Status Decode(const attn::DecodeParams& p, uint32_t splits, void* workspace, size_t workspace_bytes,
              void* stream = nullptr);

// Device memory helpers for tests and tools (errors as Status).
Result<void*> Malloc(size_t bytes);
Status Free(void* p);
Status CopyToDevice(void* dst, const void* src, size_t bytes);
Status CopyToHost(void* dst, const void* src, size_t bytes);
Status CopyOnDevice(void* dst, const void* src, size_t bytes);
Status Synchronize();
// The current device: its name and memory (what the GPU tier sizes itself by).
struct DeviceInfo {
  std::string name;
  uint64_t free_bytes = 0, total_bytes = 0;
};
Result<DeviceInfo> GetDeviceInfo();
// Page-locks existing host memory for fast, asynchronous copies (cudaHostRegister); the host tier's
// arena when a device exists. Unregister before unmapping.
Status HostRegister(void* p, size_t bytes);
Status HostUnregister(void* p);

}  // namespace kvm::attn::cuda
