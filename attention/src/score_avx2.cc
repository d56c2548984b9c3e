// ScoreKeysGroup with AVX2 + F16C, the float sums of MaxDistanceBound and the double sums of
// AddWeightedRows (this file is compiled
// with -mavx2 -mfma -mf16c -ffp-contract=off: fused multiply-adds only where written; it runs only
// after a runtime CPU check). ScoreKeysGroup: the same bits as the portable loop in reference.cc:
// lane j of one 8-lane accumulator is that loop's partial sum j (a multiply, then an add, in index
// order), the lanes are added in its pairwise order, then scaled. Up to four query heads and two to
// four rows at once (up to eight independent accumulators), each chunk of a key converted from
// fp16/bf16 in registers once for all those heads.
#include <immintrin.h>

#include <algorithm>
#include <span>

#include "attention/reference.h"

namespace kvm::attn::avx2 {
namespace {
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
inline float Sum(__m256 a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));  // (s0 + s2, s1 + s3)
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
template <DType DT>
inline __m256 Load8(const void* base, size_t i) {
  if constexpr (DT == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i x =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (DT == DType::kF16) return _mm256_cvtph_ps(x);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  }
}
// R rows of one block against G query heads: each 8-element chunk of a row is converted once for
// all G heads (G * R independent accumulators, at most 8 of them).
template <DType DT, uint32_t G, uint32_t R>
inline void ScoreRows(const float* q, uint32_t D, const void* blk, uint64_t r, uint64_t T,
                      float scale, float* out) {
  __m256 a[G][R];
  for (uint32_t h = 0; h < G; ++h)
    for (uint32_t j = 0; j < R; ++j) a[h][j] = _mm256_setzero_ps();
  for (uint32_t i = 0; i < D; i += 8) {
    __m256 k[R];
    for (uint32_t j = 0; j < R; ++j) k[j] = Load8<DT>(blk, (r + j) * D + i);
    for (uint32_t h = 0; h < G; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + size_t{h} * D + i);
      for (uint32_t j = 0; j < R; ++j) a[h][j] = _mm256_add_ps(a[h][j], _mm256_mul_ps(qv, k[j]));
    }
  }
  for (uint32_t h = 0; h < G; ++h)
    for (uint32_t j = 0; j < R; ++j) out[size_t{h} * T + r + j] = Sum(a[h][j]) * scale;
}
// Every row of every block against G query heads (scores [G][tokens]); R rows at a time.
template <DType DT, uint32_t G>
void ScoreHeads(const float* q, const HeadKV& kv, float scale, float* scores) {
  constexpr uint32_t R = G <= 2 ? 4 : 2;
  const uint32_t D = kv.head_dim, B = kv.block_size;
  for (uint64_t first = 0; first < kv.tokens; first += B) {
    const uint64_t n = std::min<uint64_t>(B, kv.tokens - first);
    const void* blk = kv.k_blocks[first / B];
    float* out = scores + first;  // row r of the block is token first + r
    uint64_t r = 0;
    for (; r + R <= n; r += R) ScoreRows<DT, G, R>(q, D, blk, r, kv.tokens, scale, out);
    for (; r < n; ++r) ScoreRows<DT, G, 1>(q, D, blk, r, kv.tokens, scale, out);
  }
}
template <DType DT>
void Score(const float* q, uint32_t group, const HeadKV& kv, float scale, float* scores) {
  const uint32_t D = kv.head_dim;
  for (uint32_t h = 0; h < group; h += 4) {  // up to four heads per pass over the keys
    const float* qh = q + size_t{h} * D;
    float* out = scores + size_t{h} * kv.tokens;
    switch (std::min(group - h, 4u)) {
      case 4:
        ScoreHeads<DT, 4>(qh, kv, scale, out);
        break;
      case 3:
        ScoreHeads<DT, 3>(qh, kv, scale, out);
        break;
      case 2:
        ScoreHeads<DT, 2>(qh, kv, scale, out);
        break;
      default:
        ScoreHeads<DT, 1>(qh, kv, scale, out);
        break;
    }
  }
}
}  // namespace

namespace {
// Per center c (up to five: ten accumulators): max over the rows of the float sum of (k − c)²
// (fused multiply-adds in two 8-lane accumulators, then the lanes added), each row read once for
// all of them: MaxDistanceBound's error analysis covers each. c [H][D].
template <uint32_t H>
void MaxSquaredDistancesOf(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                           const float* c, double* out) {
  float best[H] = {};
  for (uint32_t r : rows) {
    const float* k = keys + size_t{r} * D;
    __m256 a[H], b[H];
    for (uint32_t h = 0; h < H; ++h) a[h] = b[h] = _mm256_setzero_ps();
    uint32_t i = 0;
    for (; i + 16 <= D; i += 16) {
      const __m256 k0 = _mm256_loadu_ps(k + i), k1 = _mm256_loadu_ps(k + i + 8);
      for (uint32_t h = 0; h < H; ++h) {
        const __m256 x = _mm256_sub_ps(k0, _mm256_loadu_ps(c + size_t{h} * D + i));
        const __m256 y = _mm256_sub_ps(k1, _mm256_loadu_ps(c + size_t{h} * D + i + 8));
        a[h] = _mm256_fmadd_ps(x, x, a[h]);
        b[h] = _mm256_fmadd_ps(y, y, b[h]);
      }
    }
    if (i < D) {
      const __m256 k0 = _mm256_loadu_ps(k + i);
      for (uint32_t h = 0; h < H; ++h) {
        const __m256 x = _mm256_sub_ps(k0, _mm256_loadu_ps(c + size_t{h} * D + i));
        a[h] = _mm256_fmadd_ps(x, x, a[h]);
      }
    }
    for (uint32_t h = 0; h < H; ++h) best[h] = std::max(best[h], Sum(_mm256_add_ps(a[h], b[h])));
  }
  for (uint32_t h = 0; h < H; ++h) out[h] = best[h];
}
}  // namespace

// D % 8 == 0; centers [n][D].
void MaxSquaredDistances(const float* keys, uint32_t D, std::span<const uint32_t> rows,
                         const float* c, uint32_t n, double* out) {
  for (uint32_t h = 0; h < n; h += 5) {
    const float* ch = c + size_t{h} * D;
    switch (std::min(n - h, 5u)) {
      case 5:
        MaxSquaredDistancesOf<5>(keys, D, rows, ch, out + h);
        break;
      case 4:
        MaxSquaredDistancesOf<4>(keys, D, rows, ch, out + h);
        break;
      case 3:
        MaxSquaredDistancesOf<3>(keys, D, rows, ch, out + h);
        break;
      case 2:
        MaxSquaredDistancesOf<2>(keys, D, rows, ch, out + h);
        break;
      default:
        MaxSquaredDistancesOf<1>(keys, D, rows, ch, out + h);
        break;
    }
  }
}

void ScoreKeysGroup(const float* q, uint32_t group, const HeadKV& kv, float scale, float* scores) {
  switch (kv.dtype) {
    case DType::kF16:
      return Score<DType::kF16>(q, group, kv, scale, scores);
    case DType::kBF16:
      return Score<DType::kBF16>(q, group, kv, scale, scores);
    case DType::kF32:
      return Score<DType::kF32>(q, group, kv, scale, scores);
  }
}
// The plain loop's bits: element i of head h gets w·k[i] (a double multiply, then an add) row after
// row in list order. Rows in tiles of 32 (their floats stay in L1); up to five heads at a time (ten
// accumulators), so that each 8-element chunk of a row is converted to double once for all of
// them, their sums in registers across the tile.
template <uint32_t H>
void AddWeightedHeads(const float* keys, uint32_t D, std::span<const uint32_t> rows, size_t t0,
                      size_t t1, const double* w, size_t stride, double* m) {
  for (uint32_t i = 0; i < D; i += 8) {
    __m256d a[H][2];
    for (uint32_t h = 0; h < H; ++h) {
      a[h][0] = _mm256_loadu_pd(m + size_t{h} * D + i);
      a[h][1] = _mm256_loadu_pd(m + size_t{h} * D + i + 4);
    }
    for (size_t r = t0; r < t1; ++r) {
      const float* k = keys + size_t{rows[r]} * D + i;
      const __m256d k0 = _mm256_cvtps_pd(_mm_loadu_ps(k)),
                    k1 = _mm256_cvtps_pd(_mm_loadu_ps(k + 4));
      for (uint32_t h = 0; h < H; ++h) {
        const __m256d x = _mm256_broadcast_sd(w + r * stride + h);
        a[h][0] = _mm256_add_pd(a[h][0], _mm256_mul_pd(x, k0));
        a[h][1] = _mm256_add_pd(a[h][1], _mm256_mul_pd(x, k1));
      }
    }
    for (uint32_t h = 0; h < H; ++h) {
      _mm256_storeu_pd(m + size_t{h} * D + i, a[h][0]);
      _mm256_storeu_pd(m + size_t{h} * D + i + 4, a[h][1]);
    }
  }
}

// D % 8 == 0.
void AddWeightedRows(const float* keys, uint32_t D, std::span<const uint32_t> rows, uint32_t heads,
                     const double* w, double* m) {
  constexpr size_t kTile = 32;
  const size_t n = rows.size();
  for (size_t t0 = 0; t0 < n; t0 += kTile) {
    const size_t t1 = std::min(n, t0 + kTile);
    for (uint32_t h = 0; h < heads; h += 5) {
      const double* wh = w + h;  // [rows][heads]
      double* mh = m + size_t{h} * D;
      switch (std::min(heads - h, 5u)) {
        case 5:
          AddWeightedHeads<5>(keys, D, rows, t0, t1, wh, heads, mh);
          break;
        case 4:
          AddWeightedHeads<4>(keys, D, rows, t0, t1, wh, heads, mh);
          break;
        case 3:
          AddWeightedHeads<3>(keys, D, rows, t0, t1, wh, heads, mh);
          break;
        case 2:
          AddWeightedHeads<2>(keys, D, rows, t0, t1, wh, heads, mh);
          break;
        default:
          AddWeightedHeads<1>(keys, D, rows, t0, t1, wh, heads, mh);
          break;
      }
    }
  }
}

}  // namespace kvm::attn::avx2
