// The PrHS gate (selectors.md §0.4): what a worker runs, without the keys, to decide whether a
// layer may reuse the last anchor's block set, and the sound bound on δ it claims when it does.
// Pure functions and plain structs; thread-safe.
//
// ---- The bound ---------------------------------------------------------------------------------
// Per query head the worker keeps the anchor's raw post-RoPE query q_a in fp32 (never rounded on a
// wire), the anchor's exact log δ_a over its candidates C_a (every token of the context at the
// anchor), and these statistics of the anchor's keys, all computed exactly by the selector at the
// anchor and sent with it (Selection):
//   K_max = max_{j∈C_a} ‖k_j‖                               (one number per KV head)
//   μ     = the mean key of C_a,  R_μ = max_{j∈C_a} ‖k_j − μ‖   (R_μ: 1 number per KV head; μ
//                                                              itself cancels and never travels)
//   per query head h, with p_j = A(q_a)_j the anchor's attention, D the dropped and K the kept
//   tokens of C_a (m_D = δ_a, m_K = 1 − δ_a):
//     μ_D = Σ_D p_j k_j / m_D,  μ_K = Σ_K p_j k_j / m_K,  w = μ_D − μ_K,  R_D = max_{j∈D} ‖k_j −
//     μ_D‖
//                                                       (D + 1 numbers per query head)
// For a later query q_t let Δ = (q_t − q_a)/√d and x_j = Δ·k_j (token j's logit moves by x_j).
//
// Claim. While nothing resident at the anchor has been dropped since (tokens appended since are
// resident), with ρ_a = δ_a/(1 − δ_a) the anchor's odds and
//     λ = min( 2‖Δ‖K_max,  2‖Δ‖R_μ,  Δ·w + log cosh(‖Δ‖R_D) ),
// the dropped mass at q_t satisfies  δ_t ≤ ρ_a e^λ / (1 + ρ_a e^λ).
//
// Proof. Let Z_a = Σ_{C_a} exp(q_a·k_j/√d) and S_X = Σ_{j∈X} exp(q_t·k_j/√d) = Z_a Σ_X p_j e^{x_j}.
// The tokens resident at t include K and every token appended since; the dropped ones are a subset
// of D. So δ_t ≤ S_D/(S_D + S_K) = r/(1 + r) with r = S_D/S_K, increasing in r: it suffices to
// bound r ≤ ρ_a e^λ, for each of the three terms of the min (then for the min).
//  (1, today's) |x_j| ≤ ‖Δ‖K_max, so S_D ≤ Z_a m_D e^{‖Δ‖K_max} and S_K ≥ Z_a m_K e^{−‖Δ‖K_max}.
//  (2, μ-centred) x_j = Δ·μ + Δ·(k_j − μ) with |Δ·(k_j − μ)| ≤ ‖Δ‖R_μ (Cauchy–Schwarz). The common
//      shift e^{Δ·μ} multiplies S_D and S_K alike and cancels in r; the rest is (1) with R_μ for
//      K_max. Any fixed μ is sound; the mean key makes R_μ small when keys share a large common
//      component, as they do in trained models.
//  (3, split) Kept side, Jensen (exp is convex, the weights p_j/m_K sum to 1):
//      Σ_K p_j e^{x_j} ≥ m_K exp(Σ_K (p_j/m_K) x_j) = m_K e^{Δ·μ_K}.
//      Dropped side, the chord of exp: every x_j (j∈D) lies in [c − ε, c + ε] with c = Δ·μ_D and
//      ε = ‖Δ‖R_D, where e^x ≤ ((c + ε − x)e^{c−ε} + (x − c + ε)e^{c+ε})/(2ε); averaging with the
//      weights p_j/m_D, whose mean of x_j is exactly c, gives Σ_D p_j e^{x_j} ≤ m_D e^c cosh ε.
//      So r ≤ ρ_a exp(Δ·(μ_D − μ_K)) cosh(‖Δ‖R_D). The first-order term is the drift along the
//      one direction that moves mass between the kept and dropped sets, and the rest is second
//      order (log cosh ε ≈ ε²/2) — where (1) and (2) are first order in ‖Δ‖ in every direction.
// Floating point: the statistics are computed in double and stored as float (what a wire
// carries); radii are rounded up, and λ gets a slack of 2^-18·‖Δ‖(‖w‖ + R_D + R_μ + K_max) + 1e-12,
// far above the rounding of the float statistics and of the worker's own dot products.
// Without the statistics (a selector that scored without the keys) only (1) is used.
//
// ---- The gate -----------------------------------------------------------------------------------
// Reuse passes for a head when cos(q_t, q_a) ≥ τ_cos and its bound is within the limit the caller
// gives: in target mode δ* for a head whose anchor met δ*; 1 (no limit) in budget mode and for a
// head whose anchor missed δ* because the cap bound (worker_gate.h, prhs.h "When the cap binds").
#pragma once

#include <cstdint>
#include <vector>

namespace kvm::sel {

// sigmoid(log ρ_a + λ) from log δ_a (−inf: nothing was dropped → 0), in log domain, so neither a
// tiny δ_a nor a large λ under- or overflows.
double OddsBoundLog(double log_delta_a, double lambda);
// Today's form: λ = 2ε, ε = ‖q_t − q_a‖·K_max/√d (kept for the tests and comparisons).
double DeltaBoundLog(double log_delta_a, double eps);
double DeltaBound(double delta_a, double eps);
// ε = ‖q_t − q_a‖ · K_max / √d.
double DriftEpsilon(const float* q_t, const float* q_a, uint32_t head_dim, float k_max);
double Cosine(const float* a, const float* b, uint32_t n);
// log cosh(x) for x ≥ 0 without overflow.
double LogCosh(double x);
// The anchor's log-odds log(δ_a/(1 − δ_a)) from log δ_a.
double LogOdds(double log_delta_a);

struct GateDecision {
  bool reuse = false;
  double cosine = 0;
  double bound = 1;       // the δ bound of this head at q_t (the min of the forms above)
  double bound_norm = 1;  // form (1) alone, today's bound (for comparisons)
};

// Anchor state of one query head, and the check against it.
struct HeadGate {
  std::vector<float> q_a;  // [head_dim] raw post-RoPE anchor query
  double delta_a = 1.0;
  // log δ_a from the logits (never rounded to −inf unless nothing was dropped)
  double log_delta_a = 0.0;
  float k_max = 0.f;
  // The key statistics: key_radius < 0 = form (2) not available; empty split_dir = form (3) not.
  float key_radius = -1.f;       // R_μ
  std::vector<float> split_dir;  // [head_dim] w = μ_D − μ_K of this head
  float dropped_radius = 0.f;    // R_D of this head

  // The bounds at q_t: form (1) into *norm, the min of every available form returned.
  double Bound(const float* q_t, double* norm = nullptr) const;
  // limit: the most the bound may be (1: the cosine alone decides).
  GateDecision Check(const float* q_t, double tau_cos, double limit) const;
};

}  // namespace kvm::sel
