#include "proto/model_shape.h"

#include <string>

namespace kvm {

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF16:
      return 2;
    case DType::kBF16:
      return 2;
    case DType::kF32:
      return 4;
  }
  return 0;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF16:
      return "fp16";
    case DType::kBF16:
      return "bf16";
    case DType::kF32:
      return "fp32";
  }
  return "?";
}

Result<DType> ParseDType(const std::string& name) {
  if (name == "fp16" || name == "f16" || name == "half") return DType::kF16;
  if (name == "bf16") return DType::kBF16;
  if (name == "fp32" || name == "f32" || name == "float") return DType::kF32;
  return Status::InvalidArgument("dtype: '" + name + "' is not one of fp16, bf16, fp32");
}

const char* DeltaKindName(DeltaKind k) {
  switch (k) {
    case DeltaKind::kExact:
      return "exact";
    case DeltaKind::kBound:
      return "bound";
    case DeltaKind::kAudit:
      return "audit";
    case DeltaKind::kUnknown:
      return "unknown";
  }
  return "?";
}

Status ModelShape::Validate() const {
  auto bad = [](const std::string& field, const std::string& why) {
    return Status::InvalidArgument("model shape: " + field + " " + why);
  };
  if (layers == 0 || layers > kMaxLayers)
    return bad("layers",
               "must be in 1.." + std::to_string(kMaxLayers) + ", got " + std::to_string(layers));
  if (kv_heads == 0 || kv_heads > kMaxHeads)
    return bad("kv_heads",
               "must be in 1.." + std::to_string(kMaxHeads) + ", got " + std::to_string(kv_heads));
  if (q_heads == 0 || q_heads > kMaxHeads)
    return bad("q_heads",
               "must be in 1.." + std::to_string(kMaxHeads) + ", got " + std::to_string(q_heads));
  if (q_heads % kv_heads != 0)
    return bad("q_heads", "(" + std::to_string(q_heads) + ") must be a multiple of kv_heads (" +
                              std::to_string(kv_heads) + ")");
  if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256)
    return bad("head_dim", "must be 32, 64, 128 or 256, got " + std::to_string(head_dim));
  if (DTypeSize(dtype) == 0)
    return bad("dtype", "unknown value " + std::to_string(static_cast<uint32_t>(dtype)));
  return Status::Ok();
}

std::string ModelShape::ToString() const {
  return "L" + std::to_string(layers) + " Hq" + std::to_string(q_heads) + " Hkv" +
         std::to_string(kv_heads) + " D" + std::to_string(head_dim) + " " + DTypeName(dtype);
}

Result<BlockLayout> BlockLayout::Make(const ModelShape& shape, uint32_t block_size) {
  KVM_RETURN_IF_ERROR(shape.Validate());
  if (block_size == 0 || block_size > kMaxBlockSize)
    return Status::InvalidArgument("block_size must be in 1.." + std::to_string(kMaxBlockSize) +
                                   ", got " + std::to_string(block_size));
  return BlockLayout(shape, block_size);
}

uint32_t BlockLayout::RowsInBlock(uint64_t index, uint64_t tokens) const {
  const uint64_t begin = index * block_size_;
  if (begin >= tokens) return 0;
  const uint64_t left = tokens - begin;
  return static_cast<uint32_t>(left < block_size_ ? left : block_size_);
}

}  // namespace kvm
