// The portable CPU decode path: plain C++ conversions.
#include <cstring>

#include "proto/half.h"
#include "proto/model_shape.h"

#define KVM_DECODE_NS portable
namespace kvm::attn::portable {
template <DType DT, uint32_t D>
inline void ConvertRows(const void* src, uint32_t rows, float* dst) {
  const size_t n = size_t{rows} * D;
  if constexpr (DT == DType::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (DT == DType::kF16) {
    HalfToFloatN(static_cast<const uint16_t*>(src), dst, n);
  } else {
    Bf16ToFloatN(static_cast<const uint16_t*>(src), dst, n);
  }
}
}  // namespace kvm::attn::portable
#include "decode_impl.h"

namespace kvm::attn::portable {
void DecodeOne(const DecodeParams& p, uint32_t h) { DecodeOneHead(p, h); }
}  // namespace kvm::attn::portable
