// Template implementation of FillToTarget (included by scoring.h).
#pragma once

#include <algorithm>
#include <numeric>

namespace kvm::sel {

template <typename Eligible>
std::vector<uint64_t> FillToTarget(const GroupScores& s, std::vector<uint64_t> forced, double goal,
                                   uint64_t cap, Eligible eligible, bool* met) {
  const uint64_t nb = s.blocks();
  std::vector<uint8_t> in(nb, 0);
  std::vector<double> kept(s.group, 0.0);
  for (uint64_t b : forced) {
    in[b] = 1;
    for (uint32_t h = 0; h < s.group; ++h) kept[h] += s.mass(h, b);
  }
  auto done = [&] {
    for (double k : kept)
      if (k < 1.0 - goal) return false;
    return true;
  };
  std::vector<uint64_t> order;
  for (uint64_t b = 0; b < nb; ++b)
    if (!in[b] && eligible(b)) order.push_back(b);
  std::sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) {
    return s.agg[a] > s.agg[b] || (s.agg[a] == s.agg[b] && a < b);
  });
  uint64_t count = forced.size();
  for (uint64_t b : order) {
    if (done() || count >= cap) break;
    in[b] = 1;
    ++count;
    for (uint32_t h = 0; h < s.group; ++h) kept[h] += s.mass(h, b);
  }
  *met = done();
  std::vector<uint64_t> out;
  for (uint64_t b = 0; b < nb; ++b)
    if (in[b]) out.push_back(b);
  return out;
}

}  // namespace kvm::sel
