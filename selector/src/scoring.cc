#include "selector/scoring.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <span>

#include "proto/half.h"

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
  std::vector<uint8_t> kept(T, 0);
  for (uint64_t b : blocks)
    for (uint64_t j = b * B; j < std::min<uint64_t>(T, (b + 1) * B); ++j) kept[j] = 1;
  std::vector<uint32_t> dropped, kept_rows;
  for (uint64_t j = 0; j < T; ++j)
    (kept[j] ? kept_rows : dropped).push_back(static_cast<uint32_t>(j));
  // Weights relative to each set's largest logit: the normalised weights p_j/m_D and p_j/m_K
  // without underflow, however small δ_a is.
  std::vector<double> top_d(g, -INFINITY), top_k(g, -INFINITY);
  for (uint32_t h = 0; h < g; ++h) {
    const float* lg = &s.logits[size_t{h} * T];
    for (uint64_t j = 0; j < T; ++j) {
      double& top = kept[j] ? top_k[h] : top_d[h];
      top = std::max(top, double(lg[j]));
    }
  }
  std::vector<uint32_t> heads;  // the heads with something dropped
  bool split = true;            // false: some head kept nothing, no split form
  for (uint32_t h = 0; h < g; ++h) {
    if (top_d[h] == -INFINITY) continue;  // nothing dropped: the bound is 0
    split = split && top_k[h] != -INFINITY;
    heads.push_back(h);
  }
  if (!split) heads.clear();
  // Each head's weights of either set ([rows of the set][heads + 1]) and their sums, in token
  // order; the last column is 1 (its sums: the set's plain key sum, for μ).
  const size_t nh = heads.size(), nw = nh + 1, nd = dropped.size(), nk = kept_rows.size();
  std::vector<double> w_d(nd * nw, 1.0), w_k(nk * nw, 1.0), wd(nh, 0.0), wk(nh, 0.0);
  for (size_t a = 0; a < nh; ++a) {
    const float* lg = &s.logits[size_t{heads[a]} * T];
    for (size_t r = 0; r < nd; ++r) {
      w_d[r * nw + a] = std::exp(double(lg[dropped[r]]) - top_d[heads[a]]);
      wd[a] += w_d[r * nw + a];
    }
    for (size_t r = 0; r < nk; ++r) {
      w_k[r * nw + a] = std::exp(double(lg[kept_rows[r]]) - top_k[heads[a]]);
      wk[a] += w_k[r * nw + a];
    }
  }
  // One pass over the keys, a block at a time while it is in cache: converted to float, then added
  // to each head's weighted sums of the dropped and of the kept keys and to both sets' plain sums
  // (row nh of md and mk) — each sum in token order in double (the bits of one head, one row and
  // one sum at a time). μ is the two plain sums' total over T (any fixed μ is sound: only R_μ
  // leaves).
  const std::unique_ptr<float[]> keys(new float[size_t(T) * D]);  // every element written
  std::vector<double> mu(D), md(nw * D, 0.0), mk(nw * D, 0.0);
  const std::span<const uint32_t> dropped_s(dropped), kept_s(kept_rows);
  const auto w32 = static_cast<uint32_t>(nw);
  size_t at_d = 0, at_k = 0;
  for (uint64_t first = 0; first < T; first += B) {
    const uint64_t n = std::min<uint64_t>(B, T - first);
    DecodeRow(kv.k_blocks[first / B], static_cast<uint32_t>(n * D), kv.dtype, &keys[first * D]);
    size_t n_d = 0;
    for (uint64_t j = first; j < first + n; ++j) n_d += !kept[j];
    if (n_d)
      attn::AddWeightedRows(keys.get(), D, dropped_s.subspan(at_d, n_d), w32, &w_d[at_d * nw],
                            md.data());
    if (n_d < n)
      attn::AddWeightedRows(keys.get(), D, kept_s.subspan(at_k, n - n_d), w32, &w_k[at_k * nw],
                            mk.data());
    at_d += n_d;
    at_k += n - n_d;
  }
  for (uint32_t i = 0; i < D; ++i) mu[i] = (md[nh * D + i] + mk[nh * D + i]) / double(T);
  if (split) {
    // log δ: the dropped weights' sum is LogDeltaOf's (same maximum, same terms, same order); the
    // attention-weighted mean of the dropped keys μ_D (in md) and w = μ_D − μ_K.
    out->log_delta.assign(g, -INFINITY);  // nothing dropped
    out->split_dir.assign(size_t{g} * D, 0.f);
    for (size_t a = 0; a < nh; ++a) {
      const uint32_t h = heads[a];
      out->log_delta[h] = std::min(0.0, top_d[h] + std::log(wd[a]) - s.lse[h]);
      for (uint32_t i = 0; i < D; ++i) {
        md[a * D + i] /= wd[a];
        out->split_dir[size_t{h} * D + i] =
            static_cast<float>(md[a * D + i] - mk[a * D + i] / wk[a]);
      }
    }
  } else {  // nh = 0: no head's sums were taken
    out->log_delta = LogDeltaOf(s, blocks);
    out->split_dir.clear();
  }
  // The radii in one pass over the dropped keys (every head's R_D, and R_μ's share of them) and
  // one over the kept (the rest of R_μ): the largest distance over both lists is over every key.
  std::copy(mu.begin(), mu.end(), md.begin() + ptrdiff_t(nh * D));  // the centers: μ_D, then μ
  std::vector<double> rd(nh + 1);
  attn::MaxDistanceBounds(keys.get(), D, dropped, md.data(), static_cast<uint32_t>(nh + 1),
                          rd.data());
  out->key_radius =
      RoundUp(std::max(rd[nh], attn::MaxDistanceBound(keys.get(), D, kept_rows, mu.data())));
  out->dropped_radius.assign(split ? g : 0, 0.f);
  for (size_t a = 0; a < nh; ++a) out->dropped_radius[heads[a]] = RoundUp(rd[a]);
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
