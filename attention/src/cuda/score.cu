// CUDA retrieval scoring: one thread block per (query head, tile of 128 tokens); each warp handles
// one token at a time with the head dimension spread over the lanes (coalesced 2/4-byte loads).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "attention/cuda.h"
#include "attention/reference.h"

namespace kvm::attn::cuda {
namespace {

Status FromCuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
    return Status::Unavailable(std::string("no CUDA device (") + what + ": " +
                               cudaGetErrorString(e) + ")");
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename T>
__device__ __forceinline__ float ToF(T x);
template <>
__device__ __forceinline__ float ToF<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float ToF<float>(float x) {
  return x;
}

constexpr int kTile = 128;  // tokens per thread block
constexpr int kWarps = 4;

template <typename T, int D>
__global__ void ScoreKernel(const T* __restrict__ k, const float* __restrict__ q,
                            float* __restrict__ scores, uint64_t tokens, float scale) {
  // K is [tokens padded to blocks][D] contiguous: the block layout of one (layer, KV head).
  constexpr int kPerLane = D / 32;
  const int head = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float qr[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) qr[i] = q[head * D + lane + 32 * i];
  const uint64_t base = uint64_t(blockIdx.x) * kTile;
  for (int t = warp; t < kTile; t += kWarps) {
    const uint64_t tok = base + t;
    if (tok >= tokens) break;
    const T* row = k + tok * D;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc += qr[i] * ToF<T>(row[lane + 32 * i]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) scores[uint64_t(head) * tokens + tok] = acc * scale;
  }
}

template <typename T>
Status Launch(const ScoreParams& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.tokens + kTile - 1) / kTile), p.group);
  const float scale = p.scale != 0.f ? p.scale : 1.0f / sqrtf(static_cast<float>(p.head_dim));
  const T* k = static_cast<const T*>(p.k);
  switch (p.head_dim) {  // DISPATCH_HEAD_DIM
    case 32:
      ScoreKernel<T, 32><<<grid, 32 * kWarps, 0, s>>>(k, p.q, p.scores, p.tokens, scale);
      break;
    case 64:
      ScoreKernel<T, 64><<<grid, 32 * kWarps, 0, s>>>(k, p.q, p.scores, p.tokens, scale);
      break;
    case 128:
      ScoreKernel<T, 128><<<grid, 32 * kWarps, 0, s>>>(k, p.q, p.scores, p.tokens, scale);
      break;
    case 256:
      ScoreKernel<T, 256><<<grid, 32 * kWarps, 0, s>>>(k, p.q, p.scores, p.tokens, scale);
      break;
    default:
      return Status::InvalidArgument("head_dim must be 32, 64, 128 or 256, got " +
                                     std::to_string(p.head_dim));
  }
  return FromCuda(cudaGetLastError(), "ScoreKernel launch");
}

}  // namespace

Status ScoreKeys(const ScoreParams& p, void* stream) {
  if (p.tokens == 0) return Status::Ok();
  if (!p.k || !p.q || !p.scores) return Status::InvalidArgument("ScoreKeys: null device pointer");
  if (p.group == 0 || p.group > 64)
    return Status::InvalidArgument("ScoreKeys: group must be in 1..64");
  if (p.block_size == 0) return Status::InvalidArgument("ScoreKeys: block_size must be > 0");
  if ((p.tokens + kTile - 1) / kTile > 0x7fffffffu)
    return Status::InvalidArgument("ScoreKeys: too many tokens");
  KVM_RETURN_IF_ERROR(CudaAvailable());
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kF16:
      return Launch<__half>(p, s);
    case DType::kBF16:
      return Launch<__nv_bfloat16>(p, s);
    case DType::kF32:
      return Launch<float>(p, s);
  }
  return Status::InvalidArgument("ScoreKeys: unknown dtype");
}

Result<void*> Malloc(size_t bytes) {
  KVM_RETURN_IF_ERROR(CudaAvailable());
  void* p = nullptr;
  KVM_RETURN_IF_ERROR(FromCuda(cudaMalloc(&p, bytes), "cudaMalloc"));
  return p;
}
Status Free(void* p) { return FromCuda(cudaFree(p), "cudaFree"); }
Status HostRegister(void* p, size_t bytes) {
  KVM_RETURN_IF_ERROR(CudaAvailable());
  return FromCuda(cudaHostRegister(p, bytes, cudaHostRegisterDefault), "cudaHostRegister");
}
Status HostUnregister(void* p) { return FromCuda(cudaHostUnregister(p), "cudaHostUnregister"); }
Status CopyToDevice(void* dst, const void* src, size_t n) {
  return FromCuda(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
}
Status CopyToHost(void* dst, const void* src, size_t n) {
  return FromCuda(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
}
Status CopyOnDevice(void* dst, const void* src, size_t n) {
  return FromCuda(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToDevice), "cudaMemcpy D2D");
}
Status Synchronize() { return FromCuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
Result<DeviceInfo> GetDeviceInfo() {
  KVM_RETURN_IF_ERROR(CudaAvailable());
  int dev = 0;
  KVM_RETURN_IF_ERROR(FromCuda(cudaGetDevice(&dev), "cudaGetDevice"));
  cudaDeviceProp prop{};
  KVM_RETURN_IF_ERROR(FromCuda(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties"));
  size_t free_b = 0, total_b = 0;
  KVM_RETURN_IF_ERROR(FromCuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo"));
  return DeviceInfo{prop.name, free_b, total_b};
}

}  // namespace kvm::attn::cuda

namespace kvm::attn {
Status CudaAvailable() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    return Status::Unavailable(std::string("no CUDA device: ") + cudaGetErrorString(e));
  }
  if (n == 0) return Status::Unavailable("no CUDA device");
  return Status::Ok();
}
}  // namespace kvm::attn
