#include "attention/decode.h"

#include <cpuid.h>

#include <string>
#include <thread>
#include <vector>

#include "cpu.h"

#if defined(__SANITIZE_THREAD__)
#define KVM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVM_TSAN 1
#endif
#endif
#ifdef KVM_TSAN
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#endif

namespace kvm::attn {
namespace portable {
void DecodeOne(const DecodeParams& p, uint32_t h);
}
namespace avx2 {
void DecodeOne(const DecodeParams& p, uint32_t h);
}

namespace {
using HeadFn = void (*)(const DecodeParams&, uint32_t);

#ifdef KVM_TSAN
// Under TSan the kernels (decode_portable.cc, decode_avx2.cc) are built uninstrumented
// (attention/CMakeLists.txt: per-element checks made the model-heavy tests ~50x slower); what a
// head reads and writes is declared here instead, a range per block, so a write racing with the
// kernel's read of a K/V block (or its output) is still reported.
void DeclareAccesses(const DecodeParams& p, uint32_t h) {
  auto read = [](const void* a, size_t n) { __tsan_read_range(const_cast<void*>(a), n); };
  const size_t qd = size_t{p.group} * p.head_dim;
  read(p.q + h * qd, qd * sizeof(float));
  const size_t row = size_t{p.head_dim} * DTypeSize(p.dtype);
  for (uint32_t b = 0; b < p.n_blocks[h]; ++b) {
    const size_t i = size_t{h} * p.max_blocks + b;
    const size_t rows = p.rows ? p.rows[i] : p.block_size;
    read(p.k_blocks[i], rows * row);
    read(p.v_blocks[i], rows * row);
  }
  __tsan_write_range(p.out + h * qd, qd * sizeof(float));
  if (p.state) __tsan_write_range(p.state + size_t{h} * p.group * 2, size_t{p.group} * 2 * 4);
}
#else
void DeclareAccesses(const DecodeParams&, uint32_t) {}
#endif

bool HaveF16c() {  // CPUID.1:ECX (clang 14's __builtin_cpu_supports does not know "f16c")
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

Status Run(const DecodeParams& p, HeadFn fn) {
  KVM_RETURN_IF_ERROR(p.Validate());
  const uint32_t threads = std::min(std::max(p.threads, 1u), p.kv_heads);
  auto head = [&](uint32_t h) {
    DeclareAccesses(p, h);
    fn(p, h);
  };
  if (threads == 1) {
    for (uint32_t h = 0; h < p.kv_heads; ++h) head(h);
    return Status::Ok();
  }
  std::vector<std::thread> pool;
  for (uint32_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (uint32_t h = t; h < p.kv_heads; h += threads) head(h);
    });
  for (auto& th : pool) th.join();
  return Status::Ok();
}
}  // namespace

bool HaveAvx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && HaveF16c();
  return ok;
}

Status DecodeParams::Validate() const {
  if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256)
    return Status::InvalidArgument("decode: head_dim must be 32, 64, 128 or 256, got " +
                                   std::to_string(head_dim));
  if (group == 0 || group > 8)
    return Status::InvalidArgument("decode: group must be in 1..8, got " + std::to_string(group));
  if (block_size == 0 || block_size > 1024)
    return Status::InvalidArgument("decode: block_size must be in 1..1024, got " +
                                   std::to_string(block_size));
  if (DTypeSize(dtype) == 0) return Status::InvalidArgument("decode: unknown dtype");
  if (kv_heads == 0) return Status::InvalidArgument("decode: kv_heads must be > 0");
  if (!q || !out || !k_blocks || !v_blocks || !n_blocks)
    return Status::InvalidArgument("decode: missing pointer");
  for (uint32_t h = 0; h < kv_heads; ++h) {
    if (n_blocks[h] > max_blocks)
      return Status::InvalidArgument("decode: KV head " + std::to_string(h) + " lists " +
                                     std::to_string(n_blocks[h]) +
                                     " blocks, more than max_blocks " + std::to_string(max_blocks));
    bool any = false;
    for (uint32_t b = 0; b < n_blocks[h]; ++b) {
      const size_t i = size_t{h} * max_blocks + b;
      const uint32_t r = rows ? rows[i] : block_size;
      if (r == 0 || r > block_size)
        return Status::InvalidArgument("decode: block " + std::to_string(b) + " of KV head " +
                                       std::to_string(h) + " has " + std::to_string(r) +
                                       " rows (block size " + std::to_string(block_size) + ")");
      if (!k_blocks[i] || !v_blocks[i])
        return Status::InvalidArgument("decode: null block pointer");
      for (uint32_t x = 0; x < r && !any; ++x) any = !mask || mask[i * block_size + x];
    }
    if (!any && !state)
      return Status::InvalidArgument("decode: KV head " + std::to_string(h) + " attends no token");
  }
  return Status::Ok();
}

Status DecodeCpu(const DecodeParams& p) {
  return Run(p, HaveAvx2() ? avx2::DecodeOne : portable::DecodeOne);
}
Status DecodeCpuPortable(const DecodeParams& p) { return Run(p, portable::DecodeOne); }
const char* CpuDecodePath() { return HaveAvx2() ? "avx2+fma+f16c" : "portable"; }

Status DecodeCpuBatch(std::span<const DecodeParams> batch) {
  for (size_t i = 0; i < batch.size(); ++i) {
    Status s = DecodeCpu(batch[i]);
    if (!s.ok()) return s.WithContext("sequence " + std::to_string(i));
  }
  return Status::Ok();
}

Status SparseBlockList(std::span<const uint32_t> slots, uint32_t capacity, const void* slot_k,
                       const void* slot_v, size_t block_bytes,
                       std::span<const void* const> window_k, std::span<const void* const> window_v,
                       std::span<const uint16_t> window_rows, uint32_t block_size,
                       const void** k_out, const void** v_out, uint16_t* rows_out,
                       uint32_t* n_out) {
  if (window_k.size() != window_v.size() || window_k.size() != window_rows.size())
    return Status::InvalidArgument("sparse list: window K, V and rows differ in length");
  uint32_t n = 0;
  for (uint32_t s : slots) {
    if (s >= capacity)
      return Status::InvalidArgument("sparse list: slot " + std::to_string(s) +
                                     " out of range (capacity " + std::to_string(capacity) + ")");
    k_out[n] = static_cast<const uint8_t*>(slot_k) + size_t{s} * block_bytes;
    v_out[n] = static_cast<const uint8_t*>(slot_v) + size_t{s} * block_bytes;
    rows_out[n++] = static_cast<uint16_t>(block_size);
  }
  for (size_t i = 0; i < window_k.size(); ++i) {
    if (window_rows[i] == 0 || window_rows[i] > block_size)
      return Status::InvalidArgument("sparse list: window block " + std::to_string(i) + " has " +
                                     std::to_string(window_rows[i]) + " rows");
    k_out[n] = window_k[i];
    v_out[n] = window_v[i];
    rows_out[n++] = window_rows[i];
  }
  *n_out = n;
  return Status::Ok();
}

}  // namespace kvm::attn
