#include "kvmanager/gpu_tier.h"

#include <algorithm>
#include <vector>

namespace kvm::store {
namespace {

class CudaDevice : public Device {
 public:
  explicit CudaDevice(attn::cuda::DeviceInfo info) : info_(std::move(info)) {}
  std::string Describe() const override {
    return info_.name + " (" + std::to_string(info_.total_bytes >> 20) + " MiB)";
  }
  uint64_t free_bytes() const override { return info_.free_bytes; }
  Result<void*> Malloc(size_t bytes) override { return attn::cuda::Malloc(bytes); }
  void Free(void* p) override { (void)attn::cuda::Free(p); }
  Status ToDevice(void* dst, const void* src, size_t n) override {
    return attn::cuda::CopyToDevice(dst, src, n);
  }
  Status ToHost(void* dst, const void* src, size_t n) override {
    return attn::cuda::CopyToHost(dst, src, n);  // cudaMemcpy: after the kernel on stream 0
  }
  Status OnDevice(void* dst, const void* src, size_t n) override {
    return attn::cuda::CopyOnDevice(dst, src, n);
  }
  Status Score(const attn::cuda::ScoreParams& p) override { return attn::cuda::ScoreKeys(p); }

 private:
  attn::cuda::DeviceInfo info_;
};

}  // namespace

Result<std::unique_ptr<Device>> OpenCudaDevice() {
  KVM_ASSIGN_OR_RETURN(attn::cuda::DeviceInfo info, attn::cuda::GetDeviceInfo());
  return std::unique_ptr<Device>(new CudaDevice(std::move(info)));
}

GpuTier::GpuTier(uint64_t capacity, std::unique_ptr<Device> dev)
    : dev_(std::move(dev)), capacity_(capacity) {
  stats_.device = dev_->Describe();
  stats_.capacity_bytes = capacity;
}

GpuTier::~GpuTier() {
  for (auto& [k, b] : buffers_) dev_->Free(b.ptr);
  if (scratch_) dev_->Free(scratch_);
}

Result<std::unique_ptr<GpuTier>> GpuTier::Open(const GpuTierOptions& o,
                                               std::unique_ptr<Device> device) {
  if (!device) {
    KVM_ASSIGN_OR_RETURN(device, OpenCudaDevice());
  }
  const uint64_t cap = o.capacity_bytes ? o.capacity_bytes : device->free_bytes() / 5 * 2;
  if (cap == 0) return Status::Unavailable("GPU tier: the device has no free memory");
  return std::unique_ptr<GpuTier>(new GpuTier(cap, std::move(device)));
}

void GpuTier::Release(std::map<Key, Buffer>::iterator it) {
  dev_->Free(it->second.ptr);
  used_ -= it->second.cap_blocks * it->second.block_bytes;
  buffers_.erase(it);
}

bool GpuTier::MakeRoom(uint64_t bytes, const Key& keep) {
  while (used_ + bytes > capacity_) {
    auto victim = buffers_.end();
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it)
      if (it->first != keep &&
          (victim == buffers_.end() || it->second.last_used < victim->second.last_used))
        victim = it;
    if (victim == buffers_.end()) return false;
    Release(victim);
    ++stats_.evictions;
  }
  return true;
}

Status GpuTier::Score(uint64_t seq, uint32_t layer, uint32_t kv_head, const KeyLayout& layout,
                      uint64_t stored, std::span<const uint8_t> pending, const float* q,
                      uint32_t group, float* logits, const Fetch& fetch) {
  std::lock_guard<std::mutex> l(mu_);
  Status st = ScoreLocked({seq, layer, kv_head}, layout, stored, pending, q, group, logits, fetch);
  if (st.ok()) {
    ++stats_.scored;
  } else {
    ++stats_.refused;
    stats_.last_error = st.ToString();
  }
  return st;
}

Status GpuTier::ScoreLocked(const Key& key, const KeyLayout& layout, uint64_t stored,
                            std::span<const uint8_t> pending, const float* q, uint32_t group,
                            float* logits, const Fetch& fetch) {
  const size_t rb = layout.row_bytes(), bb = layout.block_bytes();
  const uint32_t B = layout.block_size;
  if (rb == 0 || pending.size() % rb)
    return Status::InvalidArgument("GPU tier: pending rows are not whole rows");
  const uint64_t T = stored + pending.size() / rb, nb = (T + B - 1) / B;
  if (T == 0) return Status::InvalidArgument("GPU tier: nothing to score");
  const size_t scratch = (size_t{group} * layout.head_dim + size_t{group} * T) * sizeof(float);
  auto it = buffers_.try_emplace(key).first;
  if (it->second.block_bytes != bb &&
      it->second.ptr) {  // a different layout under the same key: start over
    Release(it);
    it = buffers_.try_emplace(key).first;
  }
  it->second.block_bytes = bb;
  it->second.last_used = ++tick_;
  // Room: the key buffer grows by doubling, the scratch to this call's size.
  const uint64_t want_blocks = it->second.cap_blocks >= nb
                                   ? it->second.cap_blocks
                                   : std::max<uint64_t>(nb, 2 * it->second.cap_blocks);
  const uint64_t grow = (want_blocks - it->second.cap_blocks) * bb;
  const uint64_t grow_scratch = scratch > scratch_bytes_ ? scratch - scratch_bytes_ : 0;
  // Never evict others for what cannot fit even alone.
  const bool never = want_blocks * bb + std::max(scratch, scratch_bytes_) > capacity_;
  if (never || !MakeRoom(grow + grow_scratch, key)) {
    if (!it->second.ptr) buffers_.erase(it);
    return Status::Unavailable("GPU tier full: " + std::to_string((grow + grow_scratch) >> 10) +
                               " KiB more do not fit in " + std::to_string(capacity_ >> 20) +
                               " MiB");
  }
  Buffer& buf = it->second;
  if (grow) {
    auto p = dev_->Malloc(want_blocks * bb);
    if (!p.ok()) {
      if (!buf.ptr) buffers_.erase(it);
      return Status::Unavailable("GPU tier: " + p.status().ToString());
    }
    if (buf.ptr) {
      const Status c = dev_->OnDevice(*p, buf.ptr, buf.cap_blocks * bb);
      dev_->Free(buf.ptr);
      used_ -= buf.cap_blocks * bb;
      buf.ptr = *p;
      buf.cap_blocks = want_blocks;
      used_ += want_blocks * bb;
      if (!c.ok()) buf.synced = 0;
      KVM_RETURN_IF_ERROR(c);
    } else {
      buf.ptr = *p;
      buf.cap_blocks = want_blocks;
      used_ += want_blocks * bb;
    }
  }
  if (grow_scratch) {
    if (scratch_) dev_->Free(scratch_);
    used_ -= scratch_bytes_;
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    auto p = dev_->Malloc(scratch);
    if (!p.ok()) return Status::Unavailable("GPU tier: " + p.status().ToString());
    scratch_ = *p;
    scratch_bytes_ = scratch;
    used_ += scratch;
  }
  // Upload the stored blocks the device does not have yet (whole blocks from the synced one on).
  uint8_t* dk = static_cast<uint8_t*>(buf.ptr);
  if (buf.synced < stored) {
    const uint64_t first = buf.synced / B, n = (stored + B - 1) / B - first;
    std::vector<uint8_t> host(n * bb);
    KVM_RETURN_IF_ERROR(fetch(first, n, host));
    KVM_RETURN_IF_ERROR(dev_->ToDevice(dk + first * bb, host.data(), host.size()));
    buf.synced = stored;
    stats_.uploaded_bytes += host.size();
    stats_.uploaded_blocks += n;
  }
  if (!pending.empty()) {  // overwrites rows past `stored`: they are re-uploaded next time
    buf.synced = std::min(buf.synced, stored);
    KVM_RETURN_IF_ERROR(dev_->ToDevice(dk + stored * rb, pending.data(), pending.size()));
  }
  float* dq = static_cast<float*>(scratch_);
  float* dscores = dq + size_t{group} * layout.head_dim;
  KVM_RETURN_IF_ERROR(dev_->ToDevice(dq, q, size_t{group} * layout.head_dim * sizeof(float)));
  attn::cuda::ScoreParams p;
  p.k = buf.ptr;
  p.q = dq;
  p.scores = dscores;
  p.tokens = T;
  p.block_size = B;
  p.head_dim = layout.head_dim;
  p.group = group;
  p.dtype = layout.dtype;
  KVM_RETURN_IF_ERROR(dev_->Score(p));
  return dev_->ToHost(logits, dscores, size_t{group} * T * sizeof(float));
}

uint64_t GpuTier::Synced(uint64_t seq, uint32_t layer, uint32_t kv_head) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = buffers_.find({seq, layer, kv_head});
  return it == buffers_.end() ? 0 : it->second.synced;
}

void GpuTier::Truncate(uint64_t seq, uint64_t length) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto it = buffers_.lower_bound({seq, 0, 0});
       it != buffers_.end() && std::get<0>(it->first) == seq; ++it)
    it->second.synced = std::min(it->second.synced, length);
}

void GpuTier::Drop(uint64_t seq) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = buffers_.lower_bound({seq, 0, 0});
  while (it != buffers_.end() && std::get<0>(it->first) == seq) Release(it++);
}

GpuTierStats GpuTier::Stats() const {
  std::lock_guard<std::mutex> l(mu_);
  GpuTierStats s = stats_;
  s.used_bytes = used_;
  s.buffers = buffers_.size();
  return s;
}

}  // namespace kvm::store
