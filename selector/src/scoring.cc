#include "selector/scoring.h"

#include <algorithm>
#include <cmath>

namespace kvm::sel {
namespace {
// log Σ exp(x_t) over tokens t whose block is not marked in `skip_blocks` (all when null), in
// double.
double LogSumExp(const float* x, uint64_t n, const uint8_t* skip_blocks, uint32_t block_size) {
  double m = -INFINITY;
  for (uint64_t t = 0; t < n; ++t)
    if (!skip_blocks || !skip_blocks[t / block_size]) m = std::max(m, double(x[t]));
  if (m == -INFINITY) return -INFINITY;
  double sum = 0;
  for (uint64_t t = 0; t < n; ++t)
    if (!skip_blocks || !skip_blocks[t / block_size]) sum += std::exp(double(x[t]) - m);
  return m + std::log(sum);
}
}  // namespace

GroupScores ScoreGroup(const float* q, uint32_t group, const attn::HeadKV& kv) {
  GroupScores s;
  s.group = group;
  s.tokens = kv.tokens;
  s.block_size = kv.block_size;
  s.logits.resize(size_t{group} * kv.tokens);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kv.head_dim));
  attn::ScoreKeysGroup(q, group, kv, scale, s.logits.data());
  CompleteScores(&s);
  return s;
}

void CompleteScores(GroupScores* s) {
  const uint32_t group = s->group;
  const uint64_t T = s->tokens, nb = s->blocks();
  s->probs.resize(size_t{group} * T);
  s->lse.assign(group, 0.0);
  s->block_mass.assign(size_t{group} * nb, 0.0);
  s->agg.assign(nb, 0.0);
  for (uint32_t h = 0; h < group; ++h) {
    const float* lg = &s->logits[size_t{h} * T];
    float* p = &s->probs[size_t{h} * T];
    attn::Softmax(lg, T, p);
    s->lse[h] = LogSumExp(lg, T, nullptr, 0);
    for (uint64_t t = 0; t < T; ++t) s->block_mass[h * nb + t / s->block_size] += p[t];
  }
  for (uint64_t b = 0; b < nb; ++b)
    for (uint32_t h = 0; h < group; ++h) s->agg[b] += s->block_mass[h * nb + b];
}

std::vector<double> LogDeltaOf(const GroupScores& s, const std::vector<uint64_t>& blocks) {
  std::vector<uint8_t> resident(s.blocks(), 0);
  for (uint64_t b : blocks) resident[b] = 1;
  std::vector<double> out(s.group);
  for (uint32_t h = 0; h < s.group; ++h)
    out[h] = std::min(
        0.0, LogSumExp(&s.logits[size_t{h} * s.tokens], s.tokens, resident.data(), s.block_size) -
                 s.lse[h]);
  return out;
}

std::vector<double> DeltaOf(const GroupScores& s, const std::vector<uint64_t>& blocks) {
  std::vector<double> d = LogDeltaOf(s, blocks);
  for (double& x : d) x = std::exp(x);
  return d;
}

namespace {
float RoundUp(double x) {
  const float f = static_cast<float>(x);
  return double(f) >= x ? f : std::nextafter(f, INFINITY);
}
}  // namespace

void AnchorKeyStats(const GroupScores& s, const attn::HeadKV& kv,
                    const std::vector<uint64_t>& blocks, Selection* out) {
  const uint32_t D = kv.head_dim, g = s.group;
  const uint64_t T = kv.tokens, B = kv.block_size;
  std::vector<float> keys(size_t(T) * D);
  for (uint64_t j = 0; j < T; ++j) attn::LoadRow(kv, j, false, &keys[j * D]);
  std::vector<uint8_t> kept(T, 0);
  for (uint64_t b : blocks)
    for (uint64_t j = b * B; j < std::min<uint64_t>(T, (b + 1) * B); ++j) kept[j] = 1;
  // μ and R_μ (any fixed μ is sound, and μ itself never leaves: only R_μ does).
  std::vector<double> mu(D, 0.0);
  for (uint64_t j = 0; j < T; ++j)
    for (uint32_t i = 0; i < D; ++i) mu[i] += keys[j * D + i];
  for (uint32_t i = 0; i < D; ++i) mu[i] /= double(T);
  double r2 = 0;
  for (uint64_t j = 0; j < T; ++j) {
    double ss = 0;
    for (uint32_t i = 0; i < D; ++i) {
      const double x = double(keys[j * D + i]) - mu[i];
      ss += x * x;
    }
    r2 = std::max(r2, ss);
  }
  out->key_radius = RoundUp(std::sqrt(r2));
  // Per head: the attention-weighted means of the dropped and kept keys, and R_D.
  out->split_dir.assign(size_t{g} * D, 0.f);
  out->dropped_radius.assign(g, 0.f);
  std::vector<double> md(D), mk(D);
  for (uint32_t h = 0; h < g; ++h) {
    const float* lg = &s.logits[size_t{h} * T];
    // Weights relative to each set's largest logit: the normalised weights p_j/m_D and p_j/m_K
    // without underflow, however small δ_a is.
    double top_d = -INFINITY, top_k = -INFINITY;
    for (uint64_t j = 0; j < T; ++j) {
      double& top = kept[j] ? top_k : top_d;
      top = std::max(top, double(lg[j]));
    }
    if (top_d == -INFINITY) continue;  // nothing dropped: the bound is 0
    if (top_k == -INFINITY) {          // nothing kept: no split form
      out->split_dir.clear();
      out->dropped_radius.clear();
      return;
    }
    double wd = 0, wk = 0;
    std::fill(md.begin(), md.end(), 0.0);
    std::fill(mk.begin(), mk.end(), 0.0);
    for (uint64_t j = 0; j < T; ++j) {
      const double w = std::exp(double(lg[j]) - (kept[j] ? top_k : top_d));
      std::vector<double>& m = kept[j] ? mk : md;
      (kept[j] ? wk : wd) += w;
      for (uint32_t i = 0; i < D; ++i) m[i] += w * keys[j * D + i];
    }
    for (uint32_t i = 0; i < D; ++i) {
      md[i] /= wd;
      mk[i] /= wk;
      out->split_dir[size_t{h} * D + i] = static_cast<float>(md[i] - mk[i]);
    }
    double rd = 0;
    for (uint64_t j = 0; j < T; ++j) {
      if (kept[j]) continue;
      double ss = 0;
      for (uint32_t i = 0; i < D; ++i) {
        const double x = double(keys[j * D + i]) - md[i];
        ss += x * x;
      }
      rd = std::max(rd, ss);
    }
    out->dropped_radius[h] = RoundUp(std::sqrt(rd));
  }
}

std::vector<uint64_t> OracleBlocks(const GroupScores& s, const std::vector<uint64_t>& forced,
                                   uint64_t count) {
  const uint64_t nb = s.blocks();
  std::vector<uint8_t> in(nb, 0);
  for (uint64_t b : forced) in[b] = 1;
  std::vector<uint64_t> rest;
  for (uint64_t b = 0; b < nb; ++b)
    if (!in[b]) rest.push_back(b);
  const uint64_t extra =
      count > forced.size() ? std::min<uint64_t>(count - forced.size(), rest.size()) : 0;
  std::partial_sort(rest.begin(), rest.begin() + static_cast<ptrdiff_t>(extra), rest.end(),
                    [&](uint64_t a, uint64_t b) {
                      return s.agg[a] > s.agg[b] || (s.agg[a] == s.agg[b] && a < b);
                    });
  for (uint64_t i = 0; i < extra; ++i) in[rest[i]] = 1;
  std::vector<uint64_t> out;
  for (uint64_t b = 0; b < nb; ++b)
    if (in[b]) out.push_back(b);
  return out;
}

}  // namespace kvm::sel
