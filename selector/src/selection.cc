#include "selector/selection.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace kvm::sel {

Status Geometry::Validate() const {
  if (block_size == 0 || block_size > kMaxBlockSize)
    return Status::InvalidArgument("block_size must be in 1.." + std::to_string(kMaxBlockSize) +
                                   ", got " + std::to_string(block_size));
  return Status::Ok();
}

void HeadSummaries::Append(uint64_t token, const float* k) {
  const uint64_t b = token / B_;
  if (b >= max_norm_.size()) {
    max_norm_.resize(b + 1, 0.f);
    if (minmax_) {
      min_.resize((b + 1) * D_, std::numeric_limits<float>::infinity());
      max_.resize((b + 1) * D_, -std::numeric_limits<float>::infinity());
    }
  }
  double ss = 0;
  for (uint32_t i = 0; i < D_; ++i) ss += double(k[i]) * k[i];
  const float n = static_cast<float>(std::sqrt(ss));
  max_norm_[b] = std::max(max_norm_[b], n);
  running_max_ = std::max(running_max_, n);
  if (minmax_)
    for (uint32_t i = 0; i < D_; ++i) {
      min_[b * D_ + i] = std::min(min_[b * D_ + i], k[i]);
      max_[b * D_ + i] = std::max(max_[b * D_ + i], k[i]);
    }
  tokens_ = std::max(tokens_, token + 1);
}

void HeadSummaries::Truncate(uint64_t length) {
  if (length >= tokens_) return;
  tokens_ = length;
  const uint64_t nb = (length + B_ - 1) / B_;
  max_norm_.resize(nb);
  if (minmax_) {
    min_.resize(nb * D_);
    max_.resize(nb * D_);
  }
  running_max_ = 0.f;
  for (float m : max_norm_) running_max_ = std::max(running_max_, m);
}

double Selection::LogDelta(uint32_t head) const {
  if (head < log_delta.size()) return log_delta[head];
  return head < delta.size() ? std::log(delta[head]) : std::numeric_limits<double>::quiet_NaN();
}

std::vector<uint64_t> MergeBlocks(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  std::vector<uint64_t> out;
  out.reserve(a.size() + b.size());
  std::set_union(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

void AddRange(uint64_t first, uint64_t last, std::vector<uint64_t>* out) {
  std::vector<uint64_t> r;
  for (uint64_t b = first; b < last; ++b) r.push_back(b);
  *out = MergeBlocks(*out, r);
}

}  // namespace kvm::sel
