// BlockStore: the service's storage of KV blocks (DESIGN.md §2, §5) over three tiers: the GPU tier
// (GpuTier: the keys on the device, where the retrieval's scoring runs; present when built with
// CUDA and a device exists, Stats says why not otherwise), the host arena (HostArena) and RocksDB
// on local disk.
//
// A block is one layer and one KV head: K and V each [block_size][head_dim] of the sequence's
// dtype, keyed by (tenant, sequence, layer, kv_head, block index, K|V). Appends are idempotent by
// position. Durable sequences write every append through RocksDB's WAL before acknowledging it
// (sync: fsync too): a decode append is a small "tail" record; when a block fills, its K/V block
// records replace the tail records in the same atomic batch (no rewrite of a whole block per
// token). Cache sequences keep their blocks in the host tier and use RocksDB only to spill (no
// WAL); they do not survive a restart. Every stored value carries a checksum: a mismatch is
// Corruption, never wrong bytes.
//
// Thread-safe: one mutex over the index (sequences, block locations, references, the eviction
// order), held for bookkeeping only. An append checks and reserves under it, then builds its WAL
// batch, decodes its keys for the summaries, writes and fills its host slots outside it (other
// appends, truncate and delete of that sequence wait; readers see it as it was), and commits
// under it. Eviction walks an ordered index of the resident blocks (no scan) and writes a round's
// victims in one batch. Blocks handed out (PinnedBlocks) hold their slots against eviction,
// truncate and delete; the GPU tier scores outside the mutex on blocks pinned for it (truncate and
// delete of that sequence wait); Pin and Promote read blocks from disk outside it and promote them
// under it (if the sequence was not truncated or deleted meanwhile; else they start over). Still
// under the mutex: a round of eviction, ReadBlock(s)' disk reads, a truncate's reload of its cut
// block.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "kvmanager/gpu_tier.h"
#include "proto/model_shape.h"
#include "proto/status.h"
#include "selector/selection.h"

namespace rocksdb {
class Env;
}

namespace kvm::store {

enum class Durability : uint8_t { kCache = 1, kDurable = 2 };

struct StoreOptions {
  std::string dir;                   // RocksDB directory (created)
  uint64_t host_capacity_bytes = 0;  // host tier; 0 = DefaultHostCapacity(). Small in tests.
  bool sync = false;  // fsync the WAL on every durable append (power loss), not only kill -9
  // The disk tier's cap on its live size (RocksDB's SST files and memtables; deleted data is
  // compacted away before an append is refused); 0 = unlimited; appends past it answer NoSpace.
  uint64_t disk_capacity_bytes = 0;
  std::function<int64_t()> now_ms;  // clock for leases; default: steady clock (tests inject one)
  // Eviction from the host tier: when an allocation finds it full, blocks are demoted to disk until
  // at most low_watermark of the slots are in use. Order: blocks never selected first, V before K,
  // then least recently selected; the sink and recent-window blocks of every sequence stay.
  double low_watermark = 0.85;
  uint32_t pinned_sink_tokens = 16;    // first tokens of each sequence kept in the host tier
  uint32_t pinned_window_tokens = 64;  // last tokens of each sequence kept in the host tier
  // GPU tier: used when built with CUDA and a device exists (gpu = false turns it off).
  bool gpu = true;
  uint64_t gpu_capacity_bytes = 0;  // 0 = 40% of the device's free memory at open
  // The device of the GPU tier; default: the CUDA device. Tests pass a host-memory double.
  std::function<Result<std::unique_ptr<Device>>()> gpu_device;
  // The RocksDB environment (file system); default: the process's. Tests and the fuzzer pass an
  // in-memory one (rocksdb::NewMemEnv) or one that injects failures. Must outlive the store.
  rocksdb::Env* env = nullptr;
  // Tests only: runs before each durable append's WAL write, outside the store's lock (a latch).
  std::function<void()> test_before_write;
  // Tests only: runs after each durable append's WAL write, outside the store's lock (a latch).
  std::function<void()> test_after_write;
  // Tests only: runs in ScoreOnGpu once its blocks are pinned, outside the store's lock.
  std::function<void()> test_before_gpu_score;
};

struct SeqRef {
  std::string tenant;
  uint64_t id = 0;
};

struct SeqInfo {
  uint64_t id = 0;
  ModelShape shape;
  uint32_t block_size = 0;
  uint64_t length = 0;
  Durability durability = Durability::kDurable;
};

// A tenant's limits in the store (0 = none). Over one, Create or Append answers NoSpace naming the
// quota and the tenant's current use; nothing of the request is stored.
struct TenantQuota {
  uint64_t max_sequences = 0;
  uint64_t max_stored_bytes = 0;  // K and V of every token of its sequences (shared blocks count
                                  // for each sequence that holds them)
};
struct TenantUsage {
  uint64_t sequences = 0;
  uint64_t stored_bytes = 0;
};

struct StoreStats {
  uint64_t host_slots_used = 0, host_slots = 0;
  uint64_t host_bytes = 0, host_capacity_bytes = 0;
  uint64_t sequences = 0;
  uint64_t spills = 0;              // host → disk
  uint64_t promotions = 0;          // disk → host
  uint64_t disk_bytes_written = 0;  // ever written (this process)
  uint64_t disk_bytes =
      0;  // live: RocksDB's SST files and memtables (what disk_capacity_bytes caps)
  uint64_t shared_blocks = 0;  // full blocks (content addresses) held by more than one sequence
  std::string gpu_tier;        // "<device>: used/capacity" or "absent: <why>"
  GpuTierStats gpu;            // zero when absent
  std::string host_pinning;    // "pinned (cudaHostRegister)" or "not pinned: <why>"
};

class HostArena;

// Blocks of one (layer, KV head) held in place for reading outside the store's lock: each full
// block's K and V host-tier slots are shared while this lives (HostArena::Share), so eviction,
// truncate and delete of the sequence drop only their own hold and the bytes stay valid until this
// one goes. The partial last block is copied (appends change it), as is a full block the host tier
// has no room for. Move-only; must not outlive its BlockStore.
class PinnedBlocks {
 public:
  PinnedBlocks() = default;
  PinnedBlocks(PinnedBlocks&& o) noexcept { *this = std::move(o); }
  PinnedBlocks& operator=(PinnedBlocks&& o) noexcept;
  PinnedBlocks(const PinnedBlocks&) = delete;
  PinnedBlocks& operator=(const PinnedBlocks&) = delete;
  ~PinnedBlocks() { Release(); }

  size_t size() const { return k_.size(); }
  // Block i's K (V: empty when pinned keys only) rows, [block_size][head_dim] of the sequence's
  // dtype; rows(i) of them valid.
  const void* const* k() const { return k_.data(); }
  const void* const* v() const { return v_.data(); }
  const uint16_t* rows() const { return rows_.data(); }
  // How many of the blocks' K and V were read in place (not copied).
  size_t in_place() const { return slots_.size(); }
  void Release();

 private:
  friend class BlockStore;
  HostArena* arena_ = nullptr;
  std::vector<uint32_t> slots_;  // the holds to give back
  std::vector<const void*> k_, v_;
  std::vector<uint16_t> rows_;
  std::vector<std::vector<uint8_t>>
      copies_;  // the partial block and any block not in the host tier
};

class BlockStore {
 public:
  // Opens (creating) the store and recovers every durable sequence.
  static Result<std::unique_ptr<BlockStore>> Open(const StoreOptions& o);
  ~BlockStore();

  // AlreadyExists; InvalidArgument for a bad shape, block size or tenant name.
  // lease_ms > 0: the sequence expires after that long without an access (ExpireLeases deletes
  // it; every operation on it and Touch renew the lease).
  Status Create(const SeqRef& s, const ModelShape& shape, uint32_t block_size, Durability d,
                int64_t lease_ms = 0);
  // Create, with the longest stored prefix of `tokens` (whole blocks, exactly what PrefixLookup
  // counts) already in the new sequence: its blocks are attached by content address from the
  // sequence that holds them, durable or cache — no copy where the storage allows it (a durable
  // block's record on disk and a block's host slot are shared); a copy only where the new
  // sequence needs one of its own (a durable sequence attaching blocks only a cache sequence
  // holds writes their records; a cache sequence attaching blocks that are only on disk reads
  // them into the host tier). Returns the attached length (a multiple of block_size; 0: none).
  Result<uint64_t> CreateFromPrefix(const SeqRef& s, const ModelShape& shape, uint32_t block_size,
                                    Durability d, int64_t lease_ms,
                                    std::span<const uint32_t> tokens);
  // Renews the sequence's lease (a heartbeat of its worker). NotFound when it does not exist.
  Status Touch(const SeqRef& s);
  // How many leading tokens of `tokens` are stored (whole blocks, by durable or cache sequences)
  // for this tenant, model and layout.
  Result<uint64_t> PrefixLookup(const std::string& tenant, const ModelShape& shape,
                                uint32_t block_size, std::span<const uint32_t> tokens) const;
  // Deletes every sequence whose lease ran out; returns them (RequestHandler::ExpireLeases also
  // drops their retrieval state).
  Result<std::vector<SeqRef>> ExpireLeases();
  // Appends tokens[start, start + n): payload = [layers][kv_heads][K,V][n][head_dim] elements (the
  // wire Append layout). Positions below the current length must carry the same token ids (a retry)
  // and are skipped; start past the length is FailedPrecondition. Returns the new length once
  // durable.
  Result<uint64_t> Append(const SeqRef& s, uint64_t start, std::span<const uint32_t> tokens,
                          std::span<const uint8_t> payload);
  Result<uint64_t> Length(const SeqRef& s) const;
  Result<SeqInfo> Info(const SeqRef& s) const;
  // The sequences of one tenant, by id.
  std::vector<SeqInfo> List(const std::string& tenant) const;
  // K (values = false) or V of one block into out (block_size x head_dim elements; rows past the
  // end zero). OutOfRange past the end, Corruption on a checksum mismatch.
  Status ReadBlock(const SeqRef& s, const BlockId& b, bool values, std::span<uint8_t> out);
  // The same for many blocks of one (layer, kv_head) under one lock: block i into
  // out[i * block bytes, (i + 1) * block bytes).
  Status ReadBlocks(const SeqRef& s, uint32_t layer, uint32_t kv_head, bool values,
                    std::span<const uint64_t> blocks, std::span<uint8_t> out);
  // Holds these blocks of (layer, kv_head) in place (PinnedBlocks): their K, and V unless
  // keys_only; full blocks promoted to the host tier first where they are only on disk (read
  // outside the store's lock); the partial last block copied. OutOfRange past the end,
  // InvalidArgument for a bad layer or head.
  Result<PinnedBlocks> Pin(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                           std::span<const uint64_t> blocks, bool keys_only = false);
  // The retrieval engine reports each selection (selection recency and frequency drive eviction).
  // The sequence's values are read as often as its keys (exact correction attends the blocks the
  // worker does not hold, K and V, every step): from now on eviction no longer demotes its V blocks
  // before its K blocks. Idempotent.
  Status SetValuesRead(const SeqRef& s);
  Status MarkSelected(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                      std::span<const uint64_t> blocks);
  // Makes sure the K and V of these full blocks are in the host tier (a plan's blocks before they
  // are sent): promotes from disk, evicting others if needed.
  Status Promote(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                 std::span<const uint64_t> blocks);
  // Runs fn with the per-block key summaries of (layer, kv_head) (selector/: max key norm, channel
  // min/max), maintained on append and truncate, rebuilt from K at open; under the store's lock.
  Status WithSummaries(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                       const std::function<void(const sel::HeadSummaries&)>& fn) const;
  // The exact scoring pass of a retrieval on the GPU tier: logits[group][T] (q·k / sqrt(head_dim))
  // of the group's queries q[group][head_dim] over the stored keys [0, stored) of (layer, kv_head),
  // then the `pending` rows ([n][head_dim] of dtype, not appended yet), T = stored + n. The keys
  // stay on the device between calls (each is uploaded once). Unavailable when the GPU tier is
  // absent, full or failing: the caller scores on the CPU. The upload and the scoring run outside
  // the store's lock on the blocks pinned for them; a truncate or delete of the sequence waits.
  Status ScoreOnGpu(const SeqRef& s, uint32_t layer, uint32_t kv_head, uint64_t stored,
                    std::span<const uint8_t> pending, const float* q, float* logits);
  // Whether a block's K (or V) is in the host tier now.
  Result<bool> InHostTier(const SeqRef& s, const BlockId& b, bool values) const;
  // Rolls back to `length` (≤ the current length).
  Status Truncate(const SeqRef& s, uint64_t length);
  Status Delete(const SeqRef& s);
  StoreStats Stats() const;
  // Calls fn with every mapping of the host tier, those there now and each one made later (at
  // the first block of a new size), under the store's lock: the service registers them with its
  // data plane (Transport::Register), from which replies are sent. Replaces an earlier fn.
  void OnHostMemory(std::function<void(void* base, size_t len)> fn);
  // Replaces every tenant's quota (a tenant not named has none).
  void SetQuotas(std::map<std::string, TenantQuota> quotas);
  TenantUsage Usage(const std::string& tenant) const;

  // Tests: the raw RocksDB value of a block record (for corruption tests), replaced by `value`.
  Status ReplaceRawBlockForTest(const SeqRef& s, const BlockId& b, bool values,
                                const std::string& value);
  Result<std::string> RawBlockForTest(const SeqRef& s, const BlockId& b, bool values);

 private:
  struct Impl;
  explicit BlockStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::store
