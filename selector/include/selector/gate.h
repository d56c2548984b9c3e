// The PrHS gate (selectors.md §0.4): what a worker runs, without the keys, to decide whether a
// layer may reuse the last anchor's block set. Per query head it keeps the anchor's raw post-RoPE
// query q_a in fp32 (never rounded on a wire), the anchor's exact δ_a and K_max (max key norm over
// the scored candidates). For a later query q_t, with ε = ‖q_t − q_a‖ · K_max / √d:
//
//     δ_t ≤ δ_a · e^{2ε} / (1 − δ_a + δ_a · e^{2ε})
//
// (every logit of the candidates moves by at most ε; tokens appended since are resident). It holds
// while nothing resident at the anchor has been dropped. Reuse passes when cos(q_t, q_a) ≥ τ_cos
// and, in target mode, the bound ≤ δ*. Pure functions and a plain struct; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

namespace kvm::sel {

// The bound above from log δ_a (−inf: nothing was dropped → 0). Computed in log domain, so neither
// a tiny δ_a nor a large ε under- or overflows.
double DeltaBoundLog(double log_delta_a, double eps);
// The same from δ_a.
double DeltaBound(double delta_a, double eps);
// ε = ‖q_t − q_a‖ · K_max / √d.
double DriftEpsilon(const float* q_t, const float* q_a, uint32_t head_dim, float k_max);
double Cosine(const float* a, const float* b, uint32_t n);

struct GateDecision {
  bool reuse = false;
  double cosine = 0;
  double bound = 1;  // the δ bound of this head at q_t
};

// Anchor state of one query head, and the check against it.
struct HeadGate {
  std::vector<float> q_a;  // [head_dim] raw post-RoPE anchor query
  double delta_a = 1.0;
  double log_delta_a =
      0.0;  // log δ_a from the logits (never rounded to −inf unless nothing was dropped)
  float k_max = 0.f;
  // target_delta ≤ 0: budget mode (cosine only).
  GateDecision Check(const float* q_t, double tau_cos, double target_delta) const;
};

}  // namespace kvm::sel
