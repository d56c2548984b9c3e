// fp16 (IEEE binary16) and bf16 (bfloat16) conversions, bit-exact and branch-light.
//
// float -> half/bf16 rounds to nearest, ties to even; values past the largest finite overflow to
// +-Inf; subnormals are produced and read exactly; a NaN stays a NaN (quiet, sign and top payload
// bits kept, as the F16C instructions do: a naive bf16 rounding turns some NaNs into Inf).
// half/bf16 -> float is exact (NaN payloads kept, signalling NaNs quietened as F16C does).
//
// Pure functions; thread-safe.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

#include "proto/model_shape.h"

namespace kvm {

inline uint16_t FloatToHalf(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // Inf or NaN
    if (a == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // quiet NaN, payload kept
  }
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to Inf
  if (a < 0x38800000u) {  // below 2^-14: half subnormal or zero. Adding 0.5f aligns the mantissa so
                          // the FPU's round-to-nearest-even does the rounding.
    const float r = std::bit_cast<float>(a) + 0.5f;
    return static_cast<uint16_t>(sign | (std::bit_cast<uint32_t>(r) - 0x3f000000u));
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (a >> 13));
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1f)
    return std::bit_cast<float>(sign | 0x7f800000u | (m ? (0x400000u | (m << 13)) : 0u));
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(v));
  }
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t FloatToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float Bf16ToFloat(uint16_t b) {
  uint32_t x = static_cast<uint32_t>(b) << 16;
  if ((x & 0x7fffffffu) > 0x7f800000u) x |= 0x400000u;  // quieten, as for half
  return std::bit_cast<float>(x);
}

// Bulk conversions (n elements; src and dst must not overlap).
// n elements of any KV dtype: to fp32 (exact) and from fp32 (round to nearest even).
void DecodeRow(const void* src, uint32_t n, DType dtype, float* out);
void EncodeRow(const float* src, uint32_t n, DType dtype, void* dst);
void HalfToFloatN(const uint16_t* src, float* dst, size_t n);
void FloatToHalfN(const float* src, uint16_t* dst, size_t n);
void Bf16ToFloatN(const uint16_t* src, float* dst, size_t n);
void FloatToBf16N(const float* src, uint16_t* dst, size_t n);

}  // namespace kvm
