// attention/cuda.h in a build without CUDA: every call says so.
#include "attention/cuda.h"
#include "attention/reference.h"

namespace kvm::attn {
Status CudaAvailable() { return Status::Unimplemented("built without CUDA (KVM_WITH_CUDA=OFF or no nvcc)"); }
}  // namespace kvm::attn

namespace kvm::attn::cuda {
Status ScoreKeys(const ScoreParams&, void*) { return CudaAvailable(); }
Result<void*> Malloc(size_t) { return CudaAvailable(); }
Status Free(void*) { return CudaAvailable(); }
Status CopyToDevice(void*, const void*, size_t) { return CudaAvailable(); }
Status CopyToHost(void*, const void*, size_t) { return CudaAvailable(); }
Status Synchronize() { return CudaAvailable(); }
}  // namespace kvm::attn::cuda
