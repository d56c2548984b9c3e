// The dropped-mass histogram both sides of the service fill with the same boundaries: the service's
// kvm_dropped_mass{selector, kind} (DESIGN.md §8), and the worker's counts of the claims only it
// makes (bounds on reuse steps, exact δ of the selections it took alone), sent to the service as
// bucket deltas on messages it sends anyway — never one message per claim. Plain data; not
// thread-safe.
#pragma once

#include <cstdint>
#include <vector>

namespace kvm::sel {

class DeltaHistogram {
 public:
  // The upper bounds of the buckets: 1e-4 to 1 on a log scale, three per decade (13 bounds); a last
  // bucket (+Inf) follows them.
  static const std::vector<double>& Bounds();

  DeltaHistogram() : counts_(Bounds().size() + 1, 0) {}
  // One value (NaN values are not counted); `target` > 0 also counts it over the target.
  void Add(double delta, double target = 0);
  // Counts per bucket (not cumulative), the last one for values above every bound.
  const std::vector<uint64_t>& counts() const { return counts_; }
  double sum() const { return sum_; }
  uint64_t count() const { return count_; }
  uint64_t over_target() const { return over_; }
  bool empty() const { return count_ == 0; }
  void Clear();

 private:
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0, over_ = 0;
};

}  // namespace kvm::sel
