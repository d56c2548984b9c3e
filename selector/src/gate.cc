#include "selector/gate.h"

#include <algorithm>
#include <cmath>

namespace kvm::sel {

double LogOdds(double log_delta_a) {
  if (log_delta_a == -INFINITY) return -INFINITY;
  if (log_delta_a >= 0) return INFINITY;
  return log_delta_a - std::log(-std::expm1(log_delta_a));  // log δ − log(1 − δ)
}

double OddsBoundLog(double log_delta_a, double lambda) {
  if (log_delta_a == -INFINITY) return 0.0;
  if (log_delta_a >= 0) return 1.0;
  // The log of the odds bound. λ < 0 (form (3) when the drift moves mass into the kept set) gives
  // a bound below δ_a, which is as sound as any other.
  const double x = LogOdds(log_delta_a) + lambda;
  if (x > 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

double DeltaBoundLog(double log_delta_a, double eps) {
  return OddsBoundLog(log_delta_a, 2.0 * eps);
}

double DeltaBound(double delta_a, double eps) {
  return DeltaBoundLog(delta_a > 0 ? std::log(delta_a) : -INFINITY, eps);
}

double LogCosh(double x) {
  x = std::fabs(x);
  return x + std::log1p(std::exp(-2.0 * x)) - std::log(2.0);
}

double DriftEpsilon(const float* q_t, const float* q_a, uint32_t d, float k_max) {
  double ss = 0;
  for (uint32_t i = 0; i < d; ++i) {
    const double diff = double(q_t[i]) - double(q_a[i]);
    ss += diff * diff;
  }
  return std::sqrt(ss) * double(k_max) / std::sqrt(double(d));
}

double Cosine(const float* a, const float* b, uint32_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (uint32_t i = 0; i < n; ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  if (aa == 0 || bb == 0) return 0;
  return ab / std::sqrt(aa * bb);
}

double HeadGate::Bound(const float* q_t, double* norm) const {
  const uint32_t d = static_cast<uint32_t>(q_a.size());
  const double inv_sqrt_d = 1.0 / std::sqrt(double(d));
  double ss = 0, dw = 0, ww = 0;
  const bool split = split_dir.size() == d;
  for (uint32_t i = 0; i < d; ++i) {
    const double diff = (double(q_t[i]) - double(q_a[i])) * inv_sqrt_d;  // Δ
    ss += diff * diff;
    if (split) {
      dw += diff * double(split_dir[i]);
      ww += double(split_dir[i]) * double(split_dir[i]);
    }
  }
  const double dn = std::sqrt(ss);  // ‖Δ‖
  const double lam_norm = 2.0 * dn * double(k_max);
  if (norm) *norm = OddsBoundLog(log_delta_a, lam_norm);
  // Forms (2) and (3) from the float statistics, with their slack; form (1) as before.
  double lam_new = INFINITY;
  const bool centred = key_radius >= 0.f;
  if (centred) lam_new = 2.0 * dn * double(key_radius);
  if (split) lam_new = std::min(lam_new, dw + LogCosh(dn * double(dropped_radius)));
  if (centred || split) {
    const double scale =
        std::sqrt(ww) + double(dropped_radius) + double(key_radius) + double(k_max);
    lam_new += std::ldexp(dn * scale, -18) + 1e-12;
  }
  const double lam = std::min(lam_norm, lam_new);
  return OddsBoundLog(log_delta_a, lam);
}

GateDecision HeadGate::Check(const float* q_t, double tau_cos, double limit) const {
  GateDecision g;
  const uint32_t d = static_cast<uint32_t>(q_a.size());
  g.cosine = Cosine(q_t, q_a.data(), d);
  g.bound = Bound(q_t, &g.bound_norm);
  g.reuse = g.cosine >= tau_cos && g.bound <= limit;
  return g;
}

}  // namespace kvm::sel
