// The GPU tier (DESIGN.md §5): the keys of (sequence, layer, KV head) kept in device memory, where
// the retrieval's exact scoring pass (q·K of every query head of a group over every key) runs.
//
// Each (sequence, layer, KV head) holds one contiguous device buffer of K blocks [blocks][B][D]
// (the layout attention/cuda.h's ScoreKeys reads). Keys are uploaded lazily and once: a scoring
// call uploads the blocks appended since the last one (from the host or disk tier, through
// `Fetch`), so appends never touch the device. Stored rows are immutable until a truncate (Truncate
// rolls the synced length back). Rows a query carries that are not stored yet ("pending") are
// written after the stored ones for that call only.
//
// Capacity: buffers grow by doubling; when the tier is full the least recently scored buffers of
// other (sequence, layer, KV head)s are evicted; if it is still too small the call answers
// Unavailable and the caller scores on the CPU (never an out-of-memory). Device memory is reached
// through `Device`: the CUDA one by default, a host-memory double in tests.
//
// Thread-safe (one mutex). The block store calls Score outside its own lock, with the blocks the
// upload may need pinned beforehand (Synced says which), and Truncate, Drop and Stats under it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <tuple>

#include "attention/cuda.h"
#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::store {

// Device memory, copies and the scoring kernel.
class Device {
 public:
  virtual ~Device() = default;
  virtual std::string Describe() const = 0;
  virtual uint64_t free_bytes() const = 0;  // at open
  virtual Result<void*> Malloc(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  virtual Status ToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual Status ToHost(void* dst, const void* src, size_t bytes) = 0;  // after earlier work
  virtual Status OnDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual Status Score(const attn::cuda::ScoreParams& p) = 0;
};

// The CUDA device (attention/cuda.h): Unimplemented in a build without CUDA, Unavailable without a
// device.
Result<std::unique_ptr<Device>> OpenCudaDevice();

struct GpuTierOptions {
  // Device memory the tier may use; 0 = 40% of the device's free memory at open.
  uint64_t capacity_bytes = 0;
};

struct KeyLayout {
  uint32_t block_size = 16;
  uint32_t head_dim = 128;
  DType dtype = DType::kF16;
  size_t row_bytes() const { return size_t{head_dim} * DTypeSize(dtype); }
  size_t block_bytes() const { return row_bytes() * block_size; }
};

struct GpuTierStats {
  std::string device;
  uint64_t capacity_bytes = 0, used_bytes = 0;  // used: key buffers + scoring scratch
  uint64_t buffers = 0;                         // (sequence, layer, KV head) buffers
  uint64_t uploaded_bytes = 0;                  // host/disk → device
  uint64_t uploaded_blocks = 0;  // key blocks uploaded (a partial block again when re-sent)
  uint64_t evictions = 0;        // buffers evicted to make room
  uint64_t scored = 0;           // scoring calls that ran on the device
  uint64_t refused = 0;          // calls answered "full" or failed (caller: CPU)
  std::string last_error;
};

class GpuTier {
 public:
  // `device`: null = OpenCudaDevice(). The error says why the tier is absent.
  static Result<std::unique_ptr<GpuTier>> Open(const GpuTierOptions& o,
                                               std::unique_ptr<Device> device = nullptr);
  ~GpuTier();

  // Writes `blocks` whole K blocks from `first` on (rows past the stored length zero) into `out`.
  using Fetch = std::function<Status(uint64_t first, uint64_t blocks, std::span<uint8_t> out)>;
  // logits[group][T] = q·k / sqrt(head_dim) for the group's queries q[group][head_dim] over the
  // keys [0, stored) of (seq, layer, kv_head), kept on the device (fetch supplies what is missing),
  // then the `pending` rows ([n][head_dim] of dtype): T = stored + n. Unavailable when the tier
  // cannot hold the keys; the error of a failing device or fetch otherwise.
  Status Score(uint64_t seq, uint32_t layer, uint32_t kv_head, const KeyLayout& layout,
               uint64_t stored, std::span<const uint8_t> pending, const float* q, uint32_t group,
               float* logits, const Fetch& fetch);
  // How many stored rows of (seq, layer, kv_head) the device holds now (0: none): a Score of
  // `stored` rows fetches the blocks from Synced / block_size on — unless another call changes it
  // meanwhile (an eviction of the buffer: then from 0).
  uint64_t Synced(uint64_t seq, uint32_t layer, uint32_t kv_head) const;
  // Keys of `seq` from `length` on are no longer valid (truncate).
  void Truncate(uint64_t seq, uint64_t length);
  // Frees every buffer of `seq` (delete).
  void Drop(uint64_t seq);
  GpuTierStats Stats() const;

 private:
  struct Buffer {
    void* ptr = nullptr;
    uint64_t cap_blocks = 0;
    size_t block_bytes = 0;
    uint64_t synced = 0;  // rows [0, synced) on the device equal the stored keys
    uint64_t last_used = 0;
  };
  using Key = std::tuple<uint64_t, uint32_t, uint32_t>;
  GpuTier(uint64_t capacity, std::unique_ptr<Device> dev);
  Status ScoreLocked(const Key& key, const KeyLayout& layout, uint64_t stored,
                     std::span<const uint8_t> pending, const float* q, uint32_t group,
                     float* logits, const Fetch& fetch);
  // Frees least recently used buffers other than `keep` until `bytes` more fit.
  bool MakeRoom(uint64_t bytes, const Key& keep);
  void Release(std::map<Key, Buffer>::iterator it);

  mutable std::mutex mu_;
  std::unique_ptr<Device> dev_;
  uint64_t capacity_ = 0, used_ = 0, tick_ = 0;
  std::map<Key, Buffer> buffers_;
  void* scratch_ = nullptr;  // queries + logits of one call
  size_t scratch_bytes_ = 0;
  GpuTierStats stats_;
};

}  // namespace kvm::store
