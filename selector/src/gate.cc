#include "selector/gate.h"

#include <cmath>

namespace kvm::sel {

double DeltaBoundLog(double log_delta_a, double eps) {
  if (log_delta_a == -INFINITY) return 0.0;
  if (log_delta_a >= 0) return 1.0;
  const double x = log_delta_a + 2.0 * eps;      // log(δ_a e^{2ε})
  const double keep = -std::expm1(log_delta_a);  // 1 − δ_a
  if (x > 0) return 1.0 / (1.0 + keep * std::exp(-x));
  const double e = std::exp(x);
  return e / (keep + e);
}

double DeltaBound(double delta_a, double eps) {
  return DeltaBoundLog(delta_a > 0 ? std::log(delta_a) : -INFINITY, eps);
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

GateDecision HeadGate::Check(const float* q_t, double tau_cos, double target_delta) const {
  GateDecision g;
  const uint32_t d = static_cast<uint32_t>(q_a.size());
  g.cosine = Cosine(q_t, q_a.data(), d);
  g.bound = DeltaBoundLog(log_delta_a, DriftEpsilon(q_t, q_a.data(), d, k_max));
  g.reuse = g.cosine >= tau_cos && (target_delta <= 0 || g.bound <= target_delta);
  return g;
}

}  // namespace kvm::sel
