#include "selector/delta_histogram.h"

#include <algorithm>
#include <cmath>

namespace kvm::sel {

const std::vector<double>& DeltaHistogram::Bounds() {
  static const std::vector<double> b = [] {
    std::vector<double> v;
    for (int i = 0; i <= 12; ++i) v.push_back(1e-4 * std::pow(10.0, double(i) / 3));
    return v;
  }();
  return b;
}

void DeltaHistogram::Add(double delta, double target) {
  if (std::isnan(delta)) return;
  const auto& b = Bounds();
  // Prometheus buckets are upper-inclusive (le): the first bound ≥ the value.
  counts_[size_t(std::lower_bound(b.begin(), b.end(), delta) - b.begin())]++;
  sum_ += delta;
  ++count_;
  if (target > 0 && delta > target) ++over_;
}

void DeltaHistogram::Clear() {
  std::fill(counts_.begin(), counts_.end(), 0);
  sum_ = 0;
  count_ = over_ = 0;
}

}  // namespace kvm::sel
