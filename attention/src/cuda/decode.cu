// CUDA decode attention (dense and sparse: the same block-table parameters as the CPU path),
// split-KV: kernel 1 gives each (KV head, split) thread block a range of the head's block list and
// writes the online-softmax partial state (m, d, o) of every query head of the group; kernel 2
// merges the splits with MergeState (attention/state.h) and normalises.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "attention/cuda.h"
#include "attention/decode.h"
#include "attention/reference.h"
#include "attention/state.h"

namespace kvm::attn::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float Load(const T* p);
template <>
__device__ __forceinline__ float Load<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float Load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <>
__device__ __forceinline__ float Load<float>(const float* p) {
  return *p;
}

constexpr int kWarps = 4;
constexpr int kMaxG = 8;

// Partial state of (KV head h, split s) over list entries [begin, end) of the head.
template <typename T, int D>
__global__ void DecodePartial(DecodeParams p, float scale, uint32_t per_split, float* ws) {
  constexpr int kPer = D / 32;
  const uint32_t h = blockIdx.x, split = blockIdx.y, g = p.group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t n = p.n_blocks[h];
  const uint32_t begin = split * per_split, end = min(n, begin + per_split);
  float q[kMaxG][kPer], o[kMaxG][kPer], m[kMaxG], d[kMaxG];
  for (uint32_t j = 0; j < g; ++j) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      q[j][i] = p.q[(size_t(h) * g + j) * D + lane + 32 * i] * scale;
      o[j][i] = 0.f;
    }
    m[j] = -INFINITY;
    d[j] = 0.f;
  }
  // Each warp walks whole blocks of the range; within a block, rows in order (online softmax per
  // row).
  for (uint32_t bi = begin + warp; bi < end; bi += kWarps) {
    const size_t e = size_t(h) * p.max_blocks + bi;
    const uint32_t rows = p.rows ? p.rows[e] : p.block_size;
    const T* kb = static_cast<const T*>(p.k_blocks[e]);
    const T* vb = static_cast<const T*>(p.v_blocks[e]);
    for (uint32_t r = 0; r < rows; ++r) {
      if (p.mask && !p.mask[e * p.block_size + r]) continue;
      float kr[kPer], vr[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        kr[i] = Load(kb + size_t(r) * D + lane + 32 * i);
        vr[i] = Load(vb + size_t(r) * D + lane + 32 * i);
      }
      for (uint32_t j = 0; j < g; ++j) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kPer; ++i) s += q[j][i] * kr[i];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const float mn = fmaxf(m[j], s);
        const float a = expf(m[j] - mn), w = expf(s - mn);
        d[j] = d[j] * a + w;
#pragma unroll
        for (int i = 0; i < kPer; ++i) o[j][i] = o[j][i] * a + w * vr[i];
        m[j] = mn;
      }
    }
  }
  // Merge the warps' states through shared memory, then write this split's partial state.
  __shared__ float sm[kWarps][kMaxG][D + 2];
  for (uint32_t j = 0; j < g; ++j) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) sm[warp][j][lane + 32 * i] = o[j][i];
    if (lane == 0) {
      sm[warp][j][D] = m[j];
      sm[warp][j][D + 1] = d[j];
    }
  }
  __syncthreads();
  if (warp == 0) {
    for (uint32_t j = 0; j < g; ++j) {
      float mm = sm[0][j][D], dd = sm[0][j][D + 1];
      float oo[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) oo[i] = sm[0][j][lane + 32 * i];
      for (int w = 1; w < kWarps; ++w) {
        const float m2 = sm[w][j][D], d2 = sm[w][j][D + 1];
        if (d2 == 0.f) continue;
        if (dd == 0.f) {
          mm = m2;
          dd = d2;
#pragma unroll
          for (int i = 0; i < kPer; ++i) oo[i] = sm[w][j][lane + 32 * i];
          continue;
        }
        const float mn = fmaxf(mm, m2), a = expf(mm - mn), b = expf(m2 - mn);
#pragma unroll
        for (int i = 0; i < kPer; ++i) oo[i] = oo[i] * a + sm[w][j][lane + 32 * i] * b;
        dd = dd * a + d2 * b;
        mm = mn;
      }
      float* out = ws + ((size_t(h) * gridDim.y + split) * g + j) * (D + 2);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[lane + 32 * i] = oo[i];
      if (lane == 0) {
        out[D] = mm;
        out[D + 1] = dd;
      }
    }
  }
}

// One thread block per query head: merges the splits (MergeState) and writes o / d.
__global__ void DecodeMerge(float* out, const float* ws, uint32_t splits, uint32_t g, uint32_t D) {
  const uint32_t qh = blockIdx.x, h = qh / g, j = qh % g;
  __shared__ float mm, dd;
  extern __shared__ float o[];
  if (threadIdx.x == 0) {
    mm = -INFINITY;
    dd = 0.f;
  }
  for (uint32_t i = threadIdx.x; i < D; i += blockDim.x) o[i] = 0.f;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (uint32_t s = 0; s < splits; ++s) {
      const float* part = ws + ((size_t(h) * splits + s) * g + j) * (D + 2);
      MergeState(mm, dd, o, part[D], part[D + 1], part, D);
    }
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < D; i += blockDim.x) out[size_t(qh) * D + i] = o[i] / dd;
}

template <typename T>
Status Launch(const DecodeParams& p, uint32_t splits, uint32_t per_split, float* ws,
              cudaStream_t st) {
  const float scale = p.scale != 0.f ? p.scale : 1.0f / sqrtf(float(p.head_dim));
  const dim3 grid(p.kv_heads, splits);
  switch (p.head_dim) {
    case 32:
      DecodePartial<T, 32><<<grid, 32 * kWarps, 0, st>>>(p, scale, per_split, ws);
      break;
    case 64:
      DecodePartial<T, 64><<<grid, 32 * kWarps, 0, st>>>(p, scale, per_split, ws);
      break;
    case 128:
      DecodePartial<T, 128><<<grid, 32 * kWarps, 0, st>>>(p, scale, per_split, ws);
      break;
    case 256:
      DecodePartial<T, 256><<<grid, 32 * kWarps, 0, st>>>(p, scale, per_split, ws);
      break;
    default:
      return Status::InvalidArgument("decode: head_dim must be 32, 64, 128 or 256");
  }
  DecodeMerge<<<p.kv_heads * p.group, 128, p.head_dim * sizeof(float), st>>>(p.out, ws, splits,
                                                                             p.group, p.head_dim);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return Status::Internal(std::string("decode launch: ") + cudaGetErrorString(e));
  return Status::Ok();
}

}  // namespace

uint32_t DecodeSplits(uint32_t kv_heads, uint32_t max_blocks) {
  const uint32_t want = (264 + kv_heads - 1) / kv_heads;  // ~2 thread blocks per SM on an H100/H200
  return std::max(1u, std::min(want, (max_blocks + 3) / 4));
}

size_t DecodeWorkspaceBytes(uint32_t kv_heads, uint32_t group, uint32_t head_dim, uint32_t splits) {
  return size_t(kv_heads) * splits * group * (head_dim + 2) * sizeof(float);
}

Status Decode(const DecodeParams& p, uint32_t splits, void* workspace, size_t workspace_bytes,
              void* stream) {
  // The CPU-side checks that need no device memory (pointers here are device pointers).
  if (p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
    return Status::InvalidArgument("decode: head_dim must be 32, 64, 128 or 256");
  if (p.group == 0 || p.group > kMaxG)
    return Status::InvalidArgument("decode: group must be in 1..8");
  if (p.kv_heads == 0 || !p.q || !p.out || !p.k_blocks || !p.v_blocks || !p.n_blocks || splits == 0)
    return Status::InvalidArgument("decode: missing pointer or zero size");
  if (workspace_bytes < DecodeWorkspaceBytes(p.kv_heads, p.group, p.head_dim, splits))
    return Status::InvalidArgument("decode: workspace too small");
  KVM_RETURN_IF_ERROR(CudaAvailable());
  const uint32_t per_split = (p.max_blocks + splits - 1) / splits;
  float* ws = static_cast<float*>(workspace);
  auto st = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kF16:
      return Launch<__half>(p, splits, per_split, ws, st);
    case DType::kBF16:
      return Launch<__nv_bfloat16>(p, splits, per_split, ws, st);
    case DType::kF32:
      return Launch<float>(p, splits, per_split, ws, st);
  }
  return Status::InvalidArgument("decode: unknown dtype");
}

}  // namespace kvm::attn::cuda
