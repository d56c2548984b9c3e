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
