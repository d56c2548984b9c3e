#include "proto/half.h"

#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
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
// CPUID leaf 1: F16C (ECX 29), AVX (28), OSXSAVE (27); and the OS saves YMM state (XCR0 bits 1-2).
// (clang 14's __builtin_cpu_supports does not know "f16c".)
bool HaveF16c() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  if (!(c & (1u << 29)) || !(c & (1u << 28)) || !(c & (1u << 27))) return false;
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 6u) == 6u;
}
const bool kHaveF16c = HaveF16c();
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

void DecodeRow(const void* src, uint32_t n, DType dtype, float* out) {
  switch (dtype) {
    case DType::kF16:
      return HalfToFloatN(static_cast<const uint16_t*>(src), out, n);
    case DType::kBF16:
      return Bf16ToFloatN(static_cast<const uint16_t*>(src), out, n);
    case DType::kF32:
      std::memcpy(out, src, size_t{n} * sizeof(float));
      return;
  }
}

void EncodeRow(const float* src, uint32_t n, DType dtype, void* dst) {
  switch (dtype) {
    case DType::kF16:
      return FloatToHalfN(src, static_cast<uint16_t*>(dst), n);
    case DType::kBF16:
      return FloatToBf16N(src, static_cast<uint16_t*>(dst), n);
    case DType::kF32:
      std::memcpy(dst, src, size_t{n} * sizeof(float));
      return;
  }
}

}  // namespace kvm
