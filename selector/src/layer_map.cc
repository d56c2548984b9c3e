#include "selector/layer_map.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace kvm::sel {

std::vector<uint8_t> KeepMask(const float* q, uint32_t W, uint32_t q_heads,
                              const std::vector<attn::HeadKV>& kv, double frac) {
  const uint64_t T = kv.empty() ? 0 : kv[0].tokens;
  const uint32_t D = kv.empty() ? 0 : kv[0].head_dim;
  const uint32_t g = kv.empty() ? 1 : q_heads / static_cast<uint32_t>(kv.size());
  std::vector<uint8_t> keep(size_t{q_heads} * W * T, 0);
  std::vector<float> s(T);
  const float scale = 1.0f / std::sqrt(float(D));
  for (uint32_t w = 0; w < W && T >= W; ++w) {
    const uint64_t p = T - W + w, n = p + 1;
    for (uint32_t h = 0; h < q_heads; ++h) {
      attn::HeadKV view = kv[h / g];
      view.tokens = n;  // causal range
      attn::ScoreKeys(q + (size_t{w} * q_heads + h) * D, view, scale, s.data());
      const uint64_t k = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(frac * n)));
      for (uint32_t t : attn::TopK(s.data(), n, k)) keep[(size_t{h} * W + w) * T + t] = 1;
    }
  }
  return keep;
}

Result<std::vector<uint32_t>> BuildLayerMap(const std::vector<std::vector<uint8_t>>& keep,
                                            uint32_t shared_layers) {
  const size_t L = keep.size();
  if (L == 0) return Status::InvalidArgument("layer map: no layers");
  for (const auto& k : keep)
    if (k.size() != keep[0].size() || k.empty())
      return Status::InvalidArgument("layer map: keep masks must be non-empty and of equal size");
  std::vector<std::vector<double>> ov(L, std::vector<double>(L, -1.0));
  for (size_t i = 1; i < L; ++i) {
    double ni = 0;
    for (uint8_t x : keep[i]) ni += x;
    for (size_t j = 0; j < i; ++j) {
      double both = 0;
      for (size_t t = 0; t < keep[i].size(); ++t) both += keep[i][t] & keep[j][t];
      ov[i][j] = ni > 0 ? both / ni : 0.0;
    }
  }
  std::vector<uint32_t> src(L);
  for (size_t l = 0; l < L; ++l) src[l] = static_cast<uint32_t>(l);
  std::vector<uint8_t> mapped(L, 0);
  for (uint32_t n = 0; n < std::min<size_t>(shared_layers, L - 1); ++n) {
    double best = -1;
    size_t bi = 0, bj = 0;
    for (size_t i = 1; i < L; ++i) {
      if (mapped[i]) continue;
      for (size_t j = 0; j < i; ++j)
        if (ov[i][j] > best) best = ov[i][j], bi = i, bj = j;
    }
    if (best < 0) break;
    src[bi] = static_cast<uint32_t>(bj);
    mapped[bi] = 1;
    for (size_t k = bi + 1; k < L; ++k) ov[k][bi] = -1.0;  // i cannot become a source
  }
  // A source may itself have been mapped later: re-point chains to their root (src[l] < l, so an
  // ascending pass sees every source resolved).
  for (size_t l = 0; l < L; ++l) src[l] = src[src[l]];
  return src;
}

}  // namespace kvm::sel

namespace kvm::sel {

PrefillQueries::PrefillQueries(uint32_t layers, uint32_t q_heads, uint32_t head_dim,
                               uint32_t window, uint64_t prefill)
    : W_(static_cast<uint32_t>(std::min<uint64_t>(window, prefill))),
      Hq_(q_heads),
      D_(head_dim),
      prefill_(prefill),
      q_(layers, std::vector<float>(size_t{W_} * q_heads * head_dim)) {}

void PrefillQueries::Observe(uint32_t layer, uint64_t pos, const float* q) {
  if (layer >= q_.size() || pos >= prefill_ || pos + W_ < prefill_) return;
  std::copy(q, q + size_t{Hq_} * D_, &q_[layer][(pos + W_ - prefill_) * Hq_ * D_]);
}

double KeepFraction(const SelectorOptions& o, uint64_t context) {
  return o.budget_tokens ? double(o.budget_tokens) / double(context) : o.prhs.layer_map.keep_frac;
}

std::vector<std::vector<uint8_t>> PrefillKeepMasks(
    const PrefillQueries& q, uint32_t layers, double frac,
    const std::function<std::vector<attn::HeadKV>(uint32_t layer)>& views) {
  std::vector<std::vector<uint8_t>> keep;
  for (uint32_t l = 0; l < layers; ++l)
    keep.push_back(KeepMask(q.layer(l), q.window(), q.q_heads(), views(l), frac));
  return keep;
}

}  // namespace kvm::sel
