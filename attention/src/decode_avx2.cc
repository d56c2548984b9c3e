// The AVX2 + FMA + F16C CPU decode path (this file is compiled with -mavx2 -mfma -mf16c
// -ffp-contract=fast; it runs only after a runtime CPU check).
#include <immintrin.h>

#include <cstring>

#include "proto/model_shape.h"

#define KVM_DECODE_NS avx2
namespace kvm::attn::avx2 {
template <DType DT, uint32_t D>
inline void ConvertRows(const void* src, uint32_t rows, float* dst) {
  const size_t n = size_t{rows} * D;  // D is a multiple of 32: whole 8-lane vectors
  if constexpr (DT == DType::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (DT == DType::kF16) {
    const __m128i* s = static_cast<const __m128i*>(src);
    for (size_t i = 0; i < n / 8; ++i)
      _mm256_storeu_ps(dst + 8 * i, _mm256_cvtph_ps(_mm_loadu_si128(s + i)));
  } else {
    const __m128i* s = static_cast<const __m128i*>(src);
    for (size_t i = 0; i < n / 8; ++i) {
      const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(s + i));
      _mm256_storeu_ps(dst + 8 * i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    }
  }
}
}  // namespace kvm::attn::avx2
#include "decode_impl.h"

namespace kvm::attn::avx2 {
void DecodeOne(const DecodeParams& p, uint32_t h) { DecodeOneHead(p, h); }
}  // namespace kvm::attn::avx2
