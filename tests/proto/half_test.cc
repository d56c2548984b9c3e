// Exhaustive checks of the fp16/bf16 conversions: float -> half over all 2^32 inputs against the
// F16C hardware conversion (where the CPU has it) and an exact reference; float -> bf16 over all
// 2^32 inputs against an exact reference; half/bf16 -> float over all 65,536 patterns.
// Sanitizer builds check every 97th input (plus all special values) to keep the run short.
#include "proto/half.h"

#include <gtest/gtest.h>
#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>

namespace kvm {
namespace {

#ifdef KVM_SANITIZED
constexpr uint64_t kStride = 97;
#else
constexpr uint64_t kStride = 1;
#endif

bool IsSpecial(uint32_t x) {  // near zero, subnormal boundaries, overflow boundaries, NaN
  const uint32_t a = x & 0x7fffffffu;
  return a < 0x00001000u || (a >= 0x337ff000u && a <= 0x38801000u) ||
         (a >= 0x477fe000u && a <= 0x47800100u) || (a >= 0x7f7ff000u);
}

// Exact reference rounding of a finite float to a format with `mant` mantissa bits, exponent bias
// `bias`, max exponent field `emax_field`, by comparing distances in double (all values exact).
uint16_t ReferenceRound(float f, int mant, int bias, int ebits) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 31) << (mant + ebits));
  if (std::isinf(f)) return static_cast<uint16_t>(sign | (((1 << ebits) - 1) << mant));
  const double a = std::fabs(static_cast<double>(f));
  const int emax = (1 << ebits) - 2 - bias;  // largest normal exponent
  const double min_normal = std::ldexp(1.0, 1 - bias);
  const double ulp =
      a < min_normal ? std::ldexp(1.0, 1 - bias - mant) : std::ldexp(1.0, std::ilogb(a) - mant);
  double lo = std::floor(a / ulp) * ulp;
  double hi = lo + ulp;
  // Encode a magnitude that is a multiple of its ulp (or 2^(emax+1), meaning Inf).
  auto encode = [&](double v) -> uint16_t {
    if (v >= std::ldexp(1.0, emax + 1)) return static_cast<uint16_t>(((1 << ebits) - 1) << mant);
    if (v < min_normal) return static_cast<uint16_t>(v / std::ldexp(1.0, 1 - bias - mant));
    const int e = std::ilogb(v);
    const double m = v / std::ldexp(1.0, e) - 1.0;
    return static_cast<uint16_t>(((e + bias) << mant) | static_cast<int>(std::ldexp(m, mant)));
  };
  const double dl = a - lo, dh = hi - a;
  uint16_t r;
  if (dl < dh)
    r = encode(lo);
  else if (dh < dl)
    r = encode(hi);
  else
    r = (encode(lo) & 1) ? encode(hi) : encode(lo);
  return static_cast<uint16_t>(sign | r);
}

__attribute__((target("f16c"))) uint16_t HardwareHalf(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float HardwareHalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

TEST(HalfTest, FloatToHalfMatchesF16cAndExactReferenceOnAllInputs) {
  const bool hw = __builtin_cpu_supports("f16c");
  if (!hw) std::printf("no F16C on this CPU: comparing with the exact reference only\n");
  uint64_t checked = 0, mismatches = 0;
  for (uint64_t i = 0; i <= 0xffffffffull; ++i) {
    const uint32_t x = static_cast<uint32_t>(i);
    if (kStride > 1 && i % kStride && !IsSpecial(x)) continue;
    const float f = std::bit_cast<float>(x);
    const uint16_t got = FloatToHalf(f);
    ++checked;
    if (hw) {
      if (got != HardwareHalf(f) && ++mismatches < 5)
        ADD_FAILURE() << std::hex << "x=0x" << x << " got 0x" << got << " f16c 0x"
                      << HardwareHalf(f);
    } else if (!std::isnan(f)) {
      const uint16_t want = ReferenceRound(f, 10, 15, 5);
      if (got != want && ++mismatches < 5)
        ADD_FAILURE() << std::hex << "x=0x" << x << " got 0x" << got;
    } else if ((got & 0x7c00u) != 0x7c00u || (got & 0x3ffu) == 0) {
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0u);
  EXPECT_GT(checked, 1000000u);
}

TEST(HalfTest, FloatToHalfMatchesExactReferenceOnSpecialRanges) {
  // The reference is independent of the hardware: run it over every special input even with F16C.
  uint64_t n = 0;
  for (uint64_t i = 0; i <= 0xffffffffull; i += (IsSpecial(static_cast<uint32_t>(i)) ? 1 : 4099)) {
    const float f = std::bit_cast<float>(static_cast<uint32_t>(i));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToHalf(f), ReferenceRound(f, 10, 15, 5)) << std::hex << i;
    ++n;
  }
  EXPECT_GT(n, 100000u);
}

TEST(HalfTest, HalfToFloatOnAllPatterns) {
  const bool hw = __builtin_cpu_supports("f16c");
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f && m) {
      ASSERT_TRUE(std::isnan(f)) << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0);
    } else {
      const double mag =
          e == 0 ? std::ldexp(static_cast<double>(m), -24)
                 : (e == 0x1f ? INFINITY : std::ldexp(1.0 + m / 1024.0, static_cast<int>(e) - 15));
      ASSERT_EQ(static_cast<double>(f), (h & 0x8000) ? -mag : mag) << h;
      ASSERT_EQ(FloatToHalf(f), h) << "round trip " << h;
    }
    if (hw) {
      ASSERT_EQ(std::bit_cast<uint32_t>(f),
                std::bit_cast<uint32_t>(HardwareHalfToFloat(static_cast<uint16_t>(h))))
          << std::hex << h;
    }
  }
}

TEST(Bf16Test, FloatToBf16MatchesExactReferenceOnAllInputs) {
  uint64_t mismatches = 0;
  for (uint64_t i = 0; i <= 0xffffffffull; ++i) {
    const uint32_t x = static_cast<uint32_t>(i);
    if (kStride > 1 && i % kStride && !IsSpecial(x)) continue;
    const float f = std::bit_cast<float>(x);
    const uint16_t got = FloatToBf16(f);
    if (std::isnan(f)) {  // NaN stays NaN with its sign (a naive rounding makes some of these Inf)
      if ((got & 0x7f80u) != 0x7f80u || (got & 0x7fu) == 0 || (got >> 15) != (x >> 31))
        ++mismatches;
      continue;
    }
    const uint16_t want = ReferenceRound(f, 7, 127, 8);
    if (got != want && ++mismatches < 5)
      ADD_FAILURE() << std::hex << "x=0x" << x << " got 0x" << got << " want 0x" << want;
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(Bf16Test, Bf16ToFloatOnAllPatternsAndSpotValues) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    if (((b >> 7) & 0xff) == 0xff && (b & 0x7f)) {
      ASSERT_TRUE(std::isnan(f));
    } else {
      ASSERT_EQ(std::bit_cast<uint32_t>(f), b << 16);
      ASSERT_EQ(FloatToBf16(f), b);
    }
  }
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x7f800001u)) & 0x7fffu, 0x7fc0u);  // NaN, not Inf
  EXPECT_EQ(FloatToBf16(3.0e38f * 10.0f), 0x7f80u);
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bffu);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00u);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000u);  // tie to even (zero)
  EXPECT_EQ(FloatToHalf(std::ldexp(1.5f, -25)), 0x0001u);
}

TEST(HalfTest, BulkConversionsMatchScalar) {
  float src[7] = {0.f, -1.5f, 65504.f, 1e-6f, -0.f, 3.14159f, 1e9f};
  uint16_t h[7], b[7];
  float back[7];
  FloatToHalfN(src, h, 7);
  FloatToBf16N(src, b, 7);
  HalfToFloatN(h, back, 7);
  for (int i = 0; i < 7; ++i) {
    EXPECT_EQ(h[i], FloatToHalf(src[i]));
    EXPECT_EQ(b[i], FloatToBf16(src[i]));
    EXPECT_EQ(back[i], HalfToFloat(h[i]));
  }
  Bf16ToFloatN(b, back, 7);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(back[i], Bf16ToFloat(b[i]));
  // Every fp16 pattern through the bulk path (F16C where the CPU has it, 8 at a time, then a tail
  // of 3) is bit-identical to the scalar conversion, NaN payloads included.
  std::vector<uint16_t> all(65536 + 3);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i * 40503u);
  std::vector<float> f(all.size());
  HalfToFloatN(all.data(), f.data(), all.size());
  // The dtype-generic row conversions are these, per dtype.
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32}) {
    std::vector<uint8_t> enc(7 * DTypeSize(dt));
    EncodeRow(src, 7, dt, enc.data());
    float dec[7];
    DecodeRow(enc.data(), 7, dt, dec);
    for (int i = 0; i < 7; ++i) {
      const float want = dt == DType::kF16    ? HalfToFloat(FloatToHalf(src[i]))
                         : dt == DType::kBF16 ? Bf16ToFloat(FloatToBf16(src[i]))
                                              : src[i];
      EXPECT_EQ(std::bit_cast<uint32_t>(dec[i]), std::bit_cast<uint32_t>(want)) << i;
    }
  }
  for (size_t i = 0; i < all.size(); ++i)
    ASSERT_EQ(std::bit_cast<uint32_t>(f[i]), std::bit_cast<uint32_t>(HalfToFloat(all[i])))
        << std::hex << all[i];
}

}  // namespace
}  // namespace kvm
