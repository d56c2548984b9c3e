// attention/cuda.h in a build without CUDA: every call says so.
#include "attention/cuda.h"
#include "attention/reference.h"

namespace kvm::attn {
Status CudaAvailable() {
  return Status::Unimplemented("built without CUDA (KVM_WITH_CUDA=OFF or no nvcc)");
}
}  // namespace kvm::attn

namespace kvm::attn::cuda {
Status ScoreKeys(const ScoreParams&, void*) { return CudaAvailable(); }
Result<void*> Malloc(size_t) { return CudaAvailable(); }
Status Free(void*) { return CudaAvailable(); }
Status CopyToDevice(void*, const void*, size_t) { return CudaAvailable(); }
Status CopyToHost(void*, const void*, size_t) { return CudaAvailable(); }
Status CopyOnDevice(void*, const void*, size_t) { return CudaAvailable(); }
Status Synchronize() { return CudaAvailable(); }
Result<DeviceInfo> GetDeviceInfo() { return CudaAvailable(); }
Status HostRegister(void*, size_t) { return CudaAvailable(); }
Status HostUnregister(void*) { return CudaAvailable(); }
uint32_t DecodeSplits(uint32_t, uint32_t) { return 1; }
size_t DecodeWorkspaceBytes(uint32_t kv_heads, uint32_t group, uint32_t head_dim, uint32_t splits) {
  return size_t(kv_heads) * splits * group * (head_dim + 2) * sizeof(float);
}
Status Decode(const attn::DecodeParams&, uint32_t, void*, size_t, void*) { return CudaAvailable(); }
size_t RetrieveWorkspaceBytes(uint64_t tokens, uint32_t block_size, uint32_t group) {
  return (size_t(group) * tokens + 2 * size_t(group) + (tokens + block_size - 1) / block_size) *
         sizeof(float);
}
Result<std::vector<uint64_t>> RetrieveTopBlocks(const ScoreParams&, void*, size_t, uint64_t,
                                                std::vector<float>*, void*) {
  return CudaAvailable();
}
}  // namespace kvm::attn::cuda
