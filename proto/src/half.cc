#include "proto/half.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvm {

#if defined(__x86_64__)
namespace {
// F16C's conversion is exact (fp16 ⊂ fp32), so it gives the same floats as HalfToFloat.
__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const uint16_t* src, float* dst,
                                                         size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}
const bool kHaveF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}  // namespace
#endif

void HalfToFloatN(const uint16_t* src, float* dst, size_t n) {
#if defined(__x86_64__)
  if (kHaveF16c) return HalfToFloatF16c(src, dst, n);
#endif
  for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}
void FloatToHalfN(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToHalf(src[i]);
}
void Bf16ToFloatN(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}
void FloatToBf16N(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

}  // namespace kvm
