// The online-softmax state (m, d, o) of one query head over a set of keys, and its merge.
//
// For logits s_j and values v_j seen so far:  m = max_j s_j,  d = Σ_j exp(s_j − m),
// o = Σ_j exp(s_j − m) · v_j (unnormalised, head_dim floats). The attention output is o / d.
// Merging two states over disjoint key sets gives the state over their union; this is the one
// definition used by the CPU reference, the SIMD CPU path, CUDA split-KV and partial attention.
// An empty state has m = −inf, d = 0, o = 0.
//
// Header-only, host and device; pure functions.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KVM_HD __host__ __device__ __forceinline__
#else
#define KVM_HD inline
#endif

namespace kvm::attn {

// Merges (m2, d2, o2) into (m, d, o); o and o2 have `dim` entries. Empty states merge as
// identities.
KVM_HD void MergeState(float& m, float& d, float* o, float m2, float d2, const float* o2,
                       uint32_t dim) {
  if (d2 == 0.0f) return;
  if (d == 0.0f) {
    m = m2;
    d = d2;
    for (uint32_t i = 0; i < dim; ++i) o[i] = o2[i];
    return;
  }
  const float mn = m > m2 ? m : m2;
  const float a = expf(m - mn), b = expf(m2 - mn);
  for (uint32_t i = 0; i < dim; ++i) o[i] = o[i] * a + o2[i] * b;
  d = d * a + d2 * b;
  m = mn;
}

}  // namespace kvm::attn
