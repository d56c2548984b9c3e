#include "attention/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>

#include "attention/state.h"
#include "cpu.h"
#include "proto/half.h"

namespace kvm::attn {

Status HeadKV::Validate() const {
  if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256)
    return Status::InvalidArgument("head_dim must be 32, 64, 128 or 256, got " +
                                   std::to_string(head_dim));
  if (block_size == 0) return Status::InvalidArgument("block_size must be > 0");
  if (DTypeSize(dtype) == 0) return Status::InvalidArgument("unknown dtype");
  if (uint64_t{n_blocks} * block_size < tokens)
    return Status::InvalidArgument(std::to_string(n_blocks) + " blocks of " +
                                   std::to_string(block_size) + " do not hold " +
                                   std::to_string(tokens) + " tokens");
  if (tokens > 0 && (k_blocks == nullptr || v_blocks == nullptr))
    return Status::InvalidArgument("missing K or V block pointers");
  return Status::Ok();
}

float LoadElem(const void* base, size_t i, DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kF32:
      return static_cast<const float*>(base)[i];
  }
  return std::numeric_limits<float>::quiet_NaN();
}

void LoadRow(const HeadKV& kv, uint64_t token, bool values, float* out) {
  const uint64_t b = token / kv.block_size;
  const size_t row = static_cast<size_t>(token % kv.block_size) * kv.head_dim;
  const auto* base = static_cast<const uint8_t*>(values ? kv.v_blocks[b] : kv.k_blocks[b]);
  DecodeRow(base + row * DTypeSize(kv.dtype), kv.head_dim, kv.dtype, out);
}

void ScoreKeys(const float* q, const HeadKV& kv, float scale, float* scores) {
  ScoreKeysGroup(q, 1, kv, scale, scores);
}

namespace avx2 {
void ScoreKeysGroup(const float* q, uint32_t group, const HeadKV& kv, float scale, float* scores);
void MaxSquaredDistances(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                         const float* c, uint32_t n, double* out);
void AddWeightedRows(const float* keys, uint32_t D, std::span<const uint32_t> rows, uint32_t heads,
                     const double* w, double* m);
}  // namespace avx2

namespace {
// max Σ_i (k_r[i] − c[i])² in double, each row's sum in index order; four rows at once (four
// independent chains of additions: one chain per row made the pass latency-bound).
double MaxSquaredDistanceExact(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                               const double* c) {
  double best = 0;
  size_t n = 0;
  for (; n + 4 <= rows.size(); n += 4) {
    const float* a = keys + size_t{rows[n]} * D;
    const float* b = keys + size_t{rows[n + 1]} * D;
    const float* d = keys + size_t{rows[n + 2]} * D;
    const float* e = keys + size_t{rows[n + 3]} * D;
    double sa = 0, sb = 0, sd = 0, se = 0;
    for (uint32_t i = 0; i < D; ++i) {
      const double xa = double(a[i]) - c[i], xb = double(b[i]) - c[i];
      const double xd = double(d[i]) - c[i], xe = double(e[i]) - c[i];
      sa += xa * xa;
      sb += xb * xb;
      sd += xd * xd;
      se += xe * xe;
    }
    best = std::max({best, sa, sb, sd, se});
  }
  for (; n < rows.size(); ++n) {
    const float* a = keys + size_t{rows[n]} * D;
    double sa = 0;
    for (uint32_t i = 0; i < D; ++i) {
      const double x = double(a[i]) - c[i];
      sa += x * x;
    }
    best = std::max(best, sa);
  }
  return best;
}
}  // namespace

void MaxDistanceBounds(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                       const double* centers, uint32_t n, double* out) {
  if (rows.empty()) {
    std::fill(out, out + n, 0.0);
    return;
  }
  std::vector<uint8_t> done(n, 0);
  if (D % 8 == 0 && HaveAvx2()) {
    // With c_f = float(c) (|c − c_f| ≤ u|c| per element, u = 2^-24) and x = fl(k − c_f)
    // (|x − (k − c_f)| ≤ u|k − c_f|), the float sum s of the D squares x² (fused multiply-adds in
    // two 8-lane accumulators, then the lane sums: at most D + 3 roundings in sequence) is within
    // γ = (D + 3)u / (1 − (D + 3)u) of Σx². So ||k − c|| ≤ ||k − c_f|| + ||c − c_f||
    //   ≤ sqrt(s / (1 − γ)) / (1 − u) + u·||c||.
    std::vector<float> cf(size_t{n} * D);
    std::vector<double> cn(n, 0.0), s(n);
    for (size_t i = 0; i < cf.size(); ++i) {
      cf[i] = static_cast<float>(centers[i]);
      cn[i / D] += centers[i] * centers[i];
    }
    avx2::MaxSquaredDistances(keys, D, rows, cf.data(), n, s.data());
    constexpr double u = 0x1p-24;
    const double gamma = (D + 3) * u / (1 - (D + 3) * u);
    for (uint32_t c = 0; c < n; ++c)
      if (std::isfinite(s[c])) {
        out[c] = (std::sqrt(s[c] / (1 - gamma)) / (1 - u) + u * std::sqrt(cn[c])) * (1 + 0x1p-40);
        done[c] = 1;
      }
  }
  for (uint32_t c = 0; c < n; ++c)  // no AVX2, or a float sum overflowed: exact, in double
    if (!done[c])
      out[c] = std::sqrt(MaxSquaredDistanceExact(keys, D, rows, centers + size_t{c} * D));
}

double MaxDistanceBound(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                        const double* c) {
  double out = 0;
  MaxDistanceBounds(keys, D, rows, c, 1, &out);
  return out;
}

void AddWeightedRows(const float* keys, uint32_t D, std::span<const uint32_t> rows, uint32_t heads,
                     const double* w, double* m) {
  if (D % 8 == 0 && HaveAvx2()) return avx2::AddWeightedRows(keys, D, rows, heads, w, m);
  const size_t n = rows.size();
  for (size_t r = 0; r < n; ++r) {
    const float* k = keys + size_t{rows[r]} * D;
    for (uint32_t h = 0; h < heads; ++h) {
      const double wh = w[r * heads + h];
      double* mh = m + size_t{h} * D;
      for (uint32_t i = 0; i < D; ++i) mh[i] += wh * double(k[i]);
    }
  }
}

void ScoreKeysGroup(const float* q, uint32_t group, const HeadKV& kv, float scale, float* scores) {
  const uint32_t D = kv.head_dim, B = kv.block_size;
  if (D % 8 == 0 && HaveAvx2()) return avx2::ScoreKeysGroup(q, group, kv, scale, scores);
  std::vector<float> k(size_t{B} * D);  // one block at a time, converted once for the group
  for (uint64_t first = 0; first < kv.tokens; first += B) {
    const uint64_t n = std::min<uint64_t>(B, kv.tokens - first);
    DecodeRow(kv.k_blocks[first / B], static_cast<uint32_t>(n * D), kv.dtype, k.data());
    for (uint32_t h = 0; h < group; ++h) {
      const float* qh = q + size_t{h} * D;
      for (uint64_t r = 0; r < n; ++r) {
        const float* kr = &k[r * D];
        // Eight partial sums (lane i % 8), added pairwise at the end: a fixed order that
        // vectorizes. head_dim is a multiple of 32.
        float acc[8] = {};
        for (uint32_t i = 0; i < D; i += 8)
          for (uint32_t j = 0; j < 8; ++j) acc[j] += qh[i + j] * kr[i + j];
        const float s =
            ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        scores[size_t{h} * kv.tokens + first + r] = s * scale;
      }
    }
  }
}

void Softmax(const float* s, size_t n, float* p) {
  if (n == 0) return;
  float m = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  float sum = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    p[i] = std::exp(s[i] - m);
    sum += p[i];
  }
  const float inv = 1.0f / sum;
  for (size_t i = 0; i < n; ++i) p[i] *= inv;
}

std::vector<uint32_t> TopK(const float* s, size_t n, size_t k) {
  std::vector<uint32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0u);
  k = std::min(k, n);
  auto better = [s](uint32_t a, uint32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + static_cast<ptrdiff_t>(k), idx.end(), better);
  idx.resize(k);
  return idx;
}

double DroppedMass(const float* p, const uint8_t* selected, size_t n) {
  double kept = 0.0;
  for (size_t i = 0; i < n; ++i)
    if (selected[i]) kept += p[i];
  return std::max(0.0, 1.0 - kept);
}

void PartialState(const float* q, const HeadKV& kv, std::span<const uint8_t> mask, uint64_t begin,
                  uint64_t end, float* m_out, float* d_out, float* o) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(kv.head_dim));
  std::vector<float> k(kv.head_dim), v(kv.head_dim), s;
  std::vector<uint64_t> toks;
  for (uint64_t j = begin; j < end; ++j) {
    if (!mask.empty() && !mask[j]) continue;
    LoadRow(kv, j, false, k.data());
    float dot = 0.0f;
    for (uint32_t i = 0; i < kv.head_dim; ++i) dot += q[i] * k[i];
    s.push_back(dot * scale);
    toks.push_back(j);
  }
  float m = -std::numeric_limits<float>::infinity(), d = 0.0f;
  std::fill(o, o + kv.head_dim, 0.0f);
  for (float x : s) m = std::max(m, x);
  for (size_t t = 0; t < toks.size(); ++t) {
    const float w = std::exp(s[t] - m);
    d += w;
    LoadRow(kv, toks[t], true, v.data());
    for (uint32_t i = 0; i < kv.head_dim; ++i) o[i] += w * v[i];
  }
  *m_out = m;
  *d_out = d;
}

Status Attend(const float* q, uint32_t group, const HeadKV& kv, std::span<const uint8_t> mask,
              float* out) {
  KVM_RETURN_IF_ERROR(kv.Validate());
  if (group == 0) return Status::InvalidArgument("group size must be > 0");
  if (!mask.empty() && mask.size() != kv.tokens)
    return Status::InvalidArgument("mask has " + std::to_string(mask.size()) + " entries for " +
                                   std::to_string(kv.tokens) + " tokens");
  bool any = false;
  for (uint64_t j = 0; j < kv.tokens && !any; ++j) any = mask.empty() || mask[j];
  if (!any) return Status::InvalidArgument("attention over an empty selection");
  const uint32_t D = kv.head_dim;
  for (uint32_t h = 0; h < group; ++h) {
    float m, d;
    PartialState(q + size_t{h} * D, kv, mask, 0, kv.tokens, &m, &d, out + size_t{h} * D);
    const float inv = 1.0f / d;
    for (uint32_t i = 0; i < D; ++i) out[size_t{h} * D + i] *= inv;
  }
  return Status::Ok();
}

}  // namespace kvm::attn
