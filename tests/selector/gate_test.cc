#include "selector/gate.h"

#include <gtest/gtest.h>

#include <cmath>

namespace kvm::sel {
namespace {

TEST(GateTest, BoundIsDeltaAtZeroDriftMonotoneAndAtMostOne) {
  EXPECT_DOUBLE_EQ(DeltaBound(0.05, 0.0), 0.05);
  EXPECT_EQ(DeltaBound(0.0, 5.0), 0.0);
  EXPECT_EQ(DeltaBound(1.0, 0.1), 1.0);
  double prev = 0.05;
  for (double eps = 0.01; eps < 2000; eps *= 1.7) {
    const double b = DeltaBound(0.05, eps);
    EXPECT_GE(b, prev);
    EXPECT_LE(b, 1.0);
    prev = b;
  }
  EXPECT_EQ(DeltaBound(0.05, 1e6), 1.0);  // no overflow
  // A δ_a far below double's range still grows: log δ_a = −800, ε = 450 → e^100 ≫ 1 → bound ≈ 1.
  EXPECT_GT(DeltaBoundLog(-800.0, 450.0), 0.999);
  EXPECT_GT(DeltaBoundLog(-800.0, 395.0), 0.0);
  EXPECT_EQ(DeltaBoundLog(-INFINITY, 1e9), 0.0);
  // Hand value: δ_a = 0.1, ε = 0.5 → 0.1·e / (0.9 + 0.1·e)
  EXPECT_NEAR(DeltaBound(0.1, 0.5), 0.1 * std::exp(1.0) / (0.9 + 0.1 * std::exp(1.0)), 1e-15);
}

TEST(GateTest, ChecksCosineAndBound) {
  HeadGate g;
  g.q_a = {1.f, 0.f, 0.f, 0.f};
  g.delta_a = 0.02;
  g.log_delta_a = std::log(0.02);
  g.k_max = 2.0f;
  const float same[] = {1.f, 0.f, 0.f, 0.f};
  const float near[] = {1.f, 0.1f, 0.f, 0.f};
  const float far[] = {0.f, 1.f, 0.f, 0.f};
  EXPECT_TRUE(g.Check(same, 0.8, 0.1).reuse);
  EXPECT_DOUBLE_EQ(g.Check(same, 0.8, 0.1).bound, 0.02);
  EXPECT_FALSE(g.Check(far, 0.8, 0.0).reuse);  // cosine 0
  const auto d = g.Check(near, 0.8, 0.0);      // budget mode: cosine only
  EXPECT_TRUE(d.reuse);
  EXPECT_NEAR(d.bound, DeltaBound(0.02, 0.1 * 2.0 / 2.0), 1e-8);  // ε = ‖Δq‖·K_max/√d, d = 4
  EXPECT_FALSE(g.Check(near, 0.8, 0.021).reuse);  // target mode: the bound exceeds δ*
  EXPECT_NEAR(Cosine(same, far, 4), 0.0, 1e-12);
}

}  // namespace
}  // namespace kvm::sel
