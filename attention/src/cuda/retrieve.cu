// Retrieval on the GPU: scores of a GQA group (ScoreKeys) → per-head softmax → block-aggregated
// mass (selectors.md §0.1) on the device; the top blocks are then chosen on the host from the nb
// block masses (small next to the T·D scoring pass).
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "attention/cuda.h"
#include "attention/reference.h"

namespace kvm::attn::cuda {
namespace {

// One thread block per query head: max and Σexp of its row of logits.
__global__ void RowStats(const float* scores, uint64_t tokens, float* row_max, float* row_sum) {
  const float* s = scores + uint64_t(blockIdx.x) * tokens;
  __shared__ float red[256];
  float m = -INFINITY;
  for (uint64_t t = threadIdx.x; t < tokens; t += blockDim.x) m = fmaxf(m, s[t]);
  red[threadIdx.x] = m;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + o]);
    __syncthreads();
  }
  m = red[0];
  __syncthreads();
  float sum = 0.f;
  for (uint64_t t = threadIdx.x; t < tokens; t += blockDim.x) sum += expf(s[t] - m);
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_max[blockIdx.x] = m;
    row_sum[blockIdx.x] = red[0];
  }
}

// One thread per block of tokens: Σ over the group's heads of that head's softmax mass of the
// block.
__global__ void BlockMass(const float* scores, uint64_t tokens, uint32_t group, uint32_t block_size,
                          const float* row_max, const float* row_sum, float* agg, uint64_t blocks) {
  const uint64_t b = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  const uint64_t t0 = b * block_size, t1 = min(tokens, t0 + block_size);
  float a = 0.f;
  for (uint32_t h = 0; h < group; ++h) {
    const float* s = scores + uint64_t(h) * tokens;
    float part = 0.f;
    for (uint64_t t = t0; t < t1; ++t) part += expf(s[t] - row_max[h]);
    a += part / row_sum[h];
  }
  agg[b] = a;
}

}  // namespace

Result<std::vector<uint64_t>> RetrieveTopBlocks(const ScoreParams& p, void* workspace,
                                                size_t workspace_bytes, uint64_t count,
                                                std::vector<float>* block_mass, void* stream) {
  const uint64_t blocks = (p.tokens + p.block_size - 1) / p.block_size;
  if (workspace_bytes < RetrieveWorkspaceBytes(p.tokens, p.block_size, p.group))
    return Status::InvalidArgument("retrieve: workspace too small");
  ScoreParams sp = p;
  float* ws = static_cast<float*>(workspace);
  if (!sp.scores) sp.scores = ws;  // [group][tokens]
  float* row_max = ws + uint64_t(p.group) * p.tokens;
  float* row_sum = row_max + p.group;
  float* agg = row_sum + p.group;
  KVM_RETURN_IF_ERROR(ScoreKeys(sp, stream));
  auto st = static_cast<cudaStream_t>(stream);
  RowStats<<<p.group, 256, 0, st>>>(sp.scores, p.tokens, row_max, row_sum);
  BlockMass<<<static_cast<unsigned>((blocks + 255) / 256), 256, 0, st>>>(
      sp.scores, p.tokens, p.group, p.block_size, row_max, row_sum, agg, blocks);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
    return Status::Internal(std::string("retrieve launch: ") + cudaGetErrorString(e));
  std::vector<float> mass(blocks);
  if (cudaError_t e =
          cudaMemcpyAsync(mass.data(), agg, blocks * sizeof(float), cudaMemcpyDeviceToHost, st);
      e != cudaSuccess)
    return Status::Internal(std::string("retrieve copy: ") + cudaGetErrorString(e));
  if (cudaError_t e = cudaStreamSynchronize(st); e != cudaSuccess)
    return Status::Internal(std::string("retrieve sync: ") + cudaGetErrorString(e));
  std::vector<uint32_t> top = TopK(mass.data(), blocks, count);  // ties to the lower index
  std::vector<uint64_t> out(top.begin(), top.end());
  std::sort(out.begin(), out.end());
  if (block_mass) *block_mass = std::move(mass);
  return out;
}

size_t RetrieveWorkspaceBytes(uint64_t tokens, uint32_t block_size, uint32_t group) {
  return (size_t(group) * tokens + 2 * size_t(group) + (tokens + block_size - 1) / block_size) *
         sizeof(float);
}

}  // namespace kvm::attn::cuda
