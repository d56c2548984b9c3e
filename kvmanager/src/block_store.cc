#include "kvmanager/block_store.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kvmanager/host_arena.h"
#include "proto/half.h"
#include "rocks_logger.h"
#include "rocks_status.h"
#include "store_format.h"

namespace kvm::store {
namespace {

struct BlockLoc {
  int64_t slot = -1;           // host arena slot, or -1
  bool on_disk = false;        // a block record exists in RocksDB
  uint64_t selected = 0;       // how often a selection included it
  uint64_t last_selected = 0;  // tick of the last selection
  uint64_t host_since = 0;     // tick it entered the host tier
};
using LocKey = std::tuple<uint32_t, uint32_t, uint64_t, bool>;  // layer, kv head, index, values
// A resident block's place in the eviction order (ascending: demoted first): selected at all, K
// (V is demoted first unless its sequence reads values as often), last selection, entry into the
// host tier (unique: ticks), then the sequence's uid and the block.
using EvictKey = std::tuple<bool, bool, uint64_t, uint64_t, uint64_t, LocKey>;

struct Seq {
  SeqRef ref;
  uint64_t uid = 0;  // unique in this process (ids are reused after a delete): the GPU tier's key
  ModelShape shape;
  uint32_t B = 16;
  Durability dur = Durability::kDurable;
  uint64_t length = 0;
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> tail;  // the partial block: [layers][kv_heads][K,V][B][D] elements
  std::map<LocKey, BlockLoc> blocks;
  Addr seed;                // LayoutSeed
  std::vector<Addr> chain;  // per full block (durable sequences)
  int64_t lease_ms = 0, last_access = 0;
  uint64_t pin_end = 0;  // an append in progress: its end position (the window pin follows it)
  // An append is working outside the store's lock (its WAL batch, its host slots): other appends,
  // truncate and delete of this sequence wait for it (`written`); readers see the state before it.
  bool writing = false;
  // GPU scorings of this sequence running outside the store's lock on blocks they pinned:
  // truncate and delete wait for them (the device must not keep keys a truncate dropped, nor a
  // deleted sequence a buffer).
  uint32_t scoring = 0;
  // Truncates so far: a block read outside the lock is still this sequence's if it is unchanged.
  uint64_t epoch = 0;
  bool values_read = false;              // SetValuesRead: V is not demoted before K
  std::vector<sel::HeadSummaries> sums;  // [layer][kv_head], in memory (the fastest tier)
  void InitSums() {
    sums.clear();
    for (uint32_t i = 0; i < shape.layers * shape.kv_heads; ++i)
      sums.emplace_back(B, shape.head_dim, true);
  }
  // Adds the K row of token `pos` for (l, h) to the summaries.
  void Summarize(uint32_t l, uint32_t h, uint64_t pos, const uint8_t* k_row) {
    std::vector<float> f(shape.head_dim);
    DecodeRow(k_row, shape.head_dim, shape.dtype, f.data());
    sums[size_t{l} * shape.kv_heads + h].Append(pos, f.data());
  }
  Addr addr(uint32_t l, uint32_t h, uint64_t idx) const {
    return BlockAddr(seed, chain[idx], l, h);
  }
  size_t row_bytes() const { return size_t{shape.head_dim} * DTypeSize(shape.dtype); }
  size_t block_bytes() const { return row_bytes() * B; }
  uint64_t token_bytes() const { return uint64_t{shape.layers} * shape.kv_heads * 2 * row_bytes(); }
  uint8_t* tail_row(uint32_t l, uint32_t h, bool v, uint32_t r) {
    return tail.data() + ((((size_t{l} * shape.kv_heads + h) * 2 + v) * B) + r) * row_bytes();
  }
};

// The metadata record of q at `length` (default: its length).
std::string EncodeMeta(const Seq& q, uint64_t length) {
  return EncodeMeta(SeqMeta{q.shape, q.B, q.dur, length, q.lease_ms});
}
std::string EncodeMeta(const Seq& q) { return EncodeMeta(q, q.length); }

}  // namespace

struct BlockStore::Impl {
  StoreOptions opt;
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> cf;  // default, meta, blocks, tail, tokens
  rocksdb::ColumnFamilyHandle* meta() { return cf[1]; }
  rocksdb::ColumnFamilyHandle* blocks() { return cf[2]; }
  rocksdb::ColumnFamilyHandle* tail() { return cf[3]; }
  rocksdb::ColumnFamilyHandle* toks() { return cf[4]; }
  mutable std::mutex mu;
  std::condition_variable written;     // a sequence's `writing` ended
  bool deleted_since_reclaim = false;  // deletions the disk tier has not compacted away yet
  std::map<std::pair<std::string, uint64_t>, Seq> seqs;
  std::unordered_map<uint64_t, Seq*> by_uid;  // the same sequences by uid
  // Per block size in bytes: every resident block (host slot) in eviction order. Kept by Update,
  // through which every change of a block's slot or rank goes, so eviction never scans.
  std::map<size_t, std::set<EvictKey>> evict_order;
  std::map<size_t, std::unique_ptr<HostArena>> arenas;  // one arena per block size in bytes
  std::function<void(void*, size_t)> on_host_memory;    // OnHostMemory's
  uint64_t tick = 0;                                    // orders selections and host-tier entries
  uint64_t next_uid = 1;
  std::unique_ptr<GpuTier> gpu;
  std::string gpu_absent;  // why there is no GPU tier
  StoreStats stats;
  std::map<Addr, uint32_t>
      refs;  // content address → sequences referencing it (durable full blocks)
  std::map<Addr, uint32_t> cache_refs;  // the same for cache sequences' full blocks
  // Durable addresses that appends are writing the records of outside the lock, not committed
  // yet (→ how many such appends). No delete or truncate of another sequence holding the same
  // address removes its records meanwhile: the append's write may already have landed, and the
  // deleter's batch would remove it after. The last of them to fail removes the records when no
  // sequence holds the address.
  std::map<Addr, uint32_t> writing_refs;
  std::map<std::string, TenantQuota> quotas;
  std::map<std::string, TenantUsage> usage;
  // Layouts seen per tenant (for mismatch errors): fingerprint, dtype, block size, layers, kv
  // heads, head dim.
  std::map<std::string,
           std::set<std::tuple<uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t>>>
      layouts;

  // NoSpace when the tenant of `q` cannot store `bytes` more (its max_stored_bytes).
  Status CheckBytesQuota(const std::string& tenant, uint64_t bytes) const {
    auto it = quotas.find(tenant);
    if (it == quotas.end() || it->second.max_stored_bytes == 0) return Status::Ok();
    auto u = usage.find(tenant);
    const uint64_t used = u == usage.end() ? 0 : u->second.stored_bytes;
    if (used + bytes <= it->second.max_stored_bytes) return Status::Ok();
    return Status::NoSpace(
        "tenant '" + tenant +
        "' is over its quota max_stored_bytes=" + std::to_string(it->second.max_stored_bytes) +
        ": " + std::to_string(used) + " bytes stored, the request adds " + std::to_string(bytes));
  }
  int64_t Now() const {
    if (opt.now_ms) return opt.now_ms();
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  static std::tuple<uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t> Layout(
      const ModelShape& s, uint32_t B) {
    return {s.fingerprint, static_cast<uint32_t>(s.dtype), B, s.layers, s.kv_heads, s.head_dim};
  }
  std::string DiskKey(const Seq& q, const LocKey& lk) const {
    const auto [l, h, idx, v] = lk;
    return q.dur == Durability::kDurable ? ContentKey(q.addr(l, h, idx), v)
                                         : BlockKey(q.ref, {l, h, idx}, v);
  }
  // The content index of q's durability: durable full blocks (their records on disk are shared)
  // or cache full blocks (shared in the host tier). Address → sequences holding it.
  std::map<Addr, uint32_t>& Refs(const Seq& q) {
    return q.dur == Durability::kDurable ? refs : cache_refs;
  }
  // Drops the references of full blocks [from, to) of a sequence (to Release once the batch is
  // written); a durable record whose last reference goes is deleted through `b`.
  void Unref(const Seq& q, uint64_t from, uint64_t to, rocksdb::WriteBatch* b,
             std::vector<Addr>* released) {
    const bool durable = q.dur == Durability::kDurable;
    for (uint64_t idx = from; idx < to; ++idx)
      for (uint32_t l = 0; l < q.shape.layers; ++l)
        for (uint32_t h = 0; h < q.shape.kv_heads; ++h) {
          const Addr a = q.addr(l, h, idx);
          auto it = refs.find(a);
          if (durable && it != refs.end() && it->second == 1 && !writing_refs.count(a)) {
            b->Delete(blocks(), ContentKey(a, false));
            b->Delete(blocks(), ContentKey(a, true));
          }
          released->push_back(a);
        }
  }
  EvictKey Rank(const Seq& q, const LocKey& lk, const BlockLoc& loc) const {
    return {loc.selected > 0,
            !(std::get<3>(lk) && !q.values_read),
            loc.last_selected,
            loc.host_since,
            q.uid,
            lk};
  }
  // Changes one block's location or rank through fn; the eviction order follows.
  template <typename Fn>
  void Update(const Seq& q, const LocKey& lk, BlockLoc& loc, Fn&& fn) {
    auto& order = evict_order[q.block_bytes()];
    if (loc.slot >= 0) order.erase(Rank(q, lk, loc));
    fn(loc);
    if (loc.slot >= 0) order.insert(Rank(q, lk, loc));
  }
  Status DeleteLocked(const SeqRef& s);
  // A block PinLocked found only on disk, to read outside the lock: where its pointer goes.
  struct DiskRead {
    size_t at;  // index into the pin's K (values: V) pointers
    LocKey lk;
    std::string key, data;
  };
  // Holds the blocks in place (PinnedBlocks). A block only on disk is read and promoted here —
  // or, with `defer`, listed there with a null pointer for the caller to read outside the lock.
  Result<PinnedBlocks> PinLocked(Seq& q, uint32_t layer, uint32_t kv_head,
                                 std::span<const uint64_t> blocks, bool keys_only,
                                 std::vector<DiskRead>* defer = nullptr);
  Status ReadLocked(Seq& q, uint32_t layer, uint32_t kv_head, bool values,
                    std::span<const uint64_t> blocks, std::span<uint8_t> out);
  // Records a selection of these blocks of (layer, kv_head) (the partial tail block is always in
  // memory).
  void Mark(Seq& q, uint32_t layer, uint32_t kv_head, std::span<const uint64_t> blocks) {
    const uint64_t t = ++tick;
    for (uint64_t b : blocks)
      for (bool v : {false, true}) {
        auto it = q.blocks.find({layer, kv_head, b, v});
        if (it == q.blocks.end()) continue;
        Update(q, it->first, it->second, [t](BlockLoc& loc) {
          ++loc.selected;
          loc.last_selected = t;
        });
      }
  }
  void Release(const Seq& q, const std::vector<Addr>& released) {
    auto& index = Refs(q);
    for (const Addr& a : released) {
      auto it = index.find(a);
      if (it != index.end() && --it->second == 0) index.erase(it);
    }
  }
  // The content chain of the longest prefix of `tokens` (whole blocks) that some sequence of this
  // tenant and layout stores, durable or cache (what PrefixLookup counts and Create attaches).
  std::vector<Addr> StoredChain(const Addr& seed, std::span<const uint32_t> tokens,
                                uint32_t B) const {
    std::vector<Addr> chain;
    for (uint64_t b = 0; (b + 1) * B <= tokens.size(); ++b) {
      const Addr next = ChainNext(b ? chain.back() : Addr{}, tokens.data() + b * B, B);
      const Addr a = BlockAddr(seed, next, 0, 0);
      if (!refs.count(a) && !cache_refs.count(a)) break;
      chain.push_back(next);
    }
    return chain;
  }
  Result<Seq> NewSeq(const SeqRef& s, const ModelShape& shape, uint32_t block_size, Durability d,
                     int64_t lease_ms);
  Status CreateLocked(const SeqRef& s, const ModelShape& shape, uint32_t block_size, Durability d,
                      int64_t lease_ms, std::span<const uint32_t> prefix, uint64_t* attached);

  ~Impl() {
    for (size_t i = 1; i < cf.size(); ++i) db->DestroyColumnFamilyHandle(cf[i]);
    if (!cf.empty() && db) db->DestroyColumnFamilyHandle(cf[0]);
  }

  Seq* Find(const SeqRef& s) {
    auto it = seqs.find({s.tenant, s.id});
    return it == seqs.end() ? nullptr : &it->second;
  }
  const Seq* Find(const SeqRef& s) const {
    auto it = seqs.find({s.tenant, s.id});
    return it == seqs.end() ? nullptr : &it->second;
  }
  // The sequence or NotFound; with (layer, kv_head): InvalidArgument when they are out of range.
  Result<Seq*> Get(const SeqRef& s) {
    Seq* q = Find(s);
    if (!q) return Status::NotFound("sequence " + std::to_string(s.id));
    return q;
  }
  // The sequence once no append of it is writing — and with `exclusive` (truncate, delete) no
  // GPU scoring of it runs (REQUIRES: lk holds mu).
  Result<Seq*> GetIdle(std::unique_lock<std::mutex>& lk, const SeqRef& s, bool exclusive = false) {
    for (;;) {
      KVM_ASSIGN_OR_RETURN(Seq * q, Get(s));
      if (!q->writing && !(exclusive && q->scoring)) return q;
      written.wait(lk);
    }
  }
  Result<Seq*> Get(const SeqRef& s, uint32_t layer, uint32_t kv_head) {
    KVM_ASSIGN_OR_RETURN(Seq * q, Get(s));
    if (layer >= q->shape.layers || kv_head >= q->shape.kv_heads)
      return Status::InvalidArgument("layer/kv_head out of range");
    return q;
  }
  rocksdb::WriteOptions Wopt(const Seq& q) const {
    rocksdb::WriteOptions w;
    w.sync = opt.sync && q.dur == Durability::kDurable;
    w.disableWAL = q.dur == Durability::kCache;
    return w;
  }
  // The disk tier's live size, RocksDB's own account: the SST files of the current version and
  // the data in the memtables (written, not flushed yet). The memtables' arena memory would count
  // megabytes for an empty store, and GetApproximateMemTableStats' entry count over a range is a
  // skip-list estimate, capped at the true count and often far below it (with it, one test's cap
  // let in 220 to 384 tokens from run to run), so the data size is the exact mean entry size
  // times the exact entry count of the column family's memtables.
  uint64_t LiveDiskBytes() const {
    uint64_t sst = 0, mem = 0;
    db->GetAggregatedIntProperty("rocksdb.live-sst-files-size", &sst);
    const std::string last(16, '\xff');
    const rocksdb::Range all("", last);
    for (auto* h : cf) {
      uint64_t count = 0, bytes = 0, active = 0, imm = 0;
      db->GetApproximateMemTableStats(h, all, &count, &bytes);
      if (count == 0) continue;
      db->GetIntProperty(h, "rocksdb.num-entries-active-mem-table", &active);
      db->GetIntProperty(h, "rocksdb.num-entries-imm-mem-tables", &imm);
      mem += static_cast<uint64_t>(static_cast<double>(bytes) / static_cast<double>(count) *
                                   static_cast<double>(std::max(count, active + imm)));
    }
    return sst + mem;
  }
  // NoSpace when `b` would take the live size past disk_capacity_bytes. Deleted records take space
  // until compaction drops them, so over the cap after deletions the store first reclaims (flush
  // and compact every column family), then decides. REQUIRES: mu held.
  Status CheckDiskRoom(const rocksdb::WriteBatch& b) {
    const uint64_t cap = opt.disk_capacity_bytes;
    if (cap == 0 || LiveDiskBytes() + b.GetDataSize() <= cap) return Status::Ok();
    if (deleted_since_reclaim) {
      deleted_since_reclaim = false;
      for (auto* h : cf) {
        (void)db->Flush(rocksdb::FlushOptions(), h);
        (void)db->CompactRange(rocksdb::CompactRangeOptions(), h, nullptr, nullptr);
      }
      if (LiveDiskBytes() + b.GetDataSize() <= cap) return Status::Ok();
    }
    return Status::NoSpace("disk tier full: " + std::to_string(LiveDiskBytes()) + " of " +
                           std::to_string(cap) + " bytes live, the write needs " +
                           std::to_string(b.GetDataSize()));
  }
  // `frees`: a batch that only deletes (truncate) is never refused for room.
  Status Write(const rocksdb::WriteOptions& w, rocksdb::WriteBatch* b, bool frees = false) {
    if (!frees) KVM_RETURN_IF_ERROR(CheckDiskRoom(*b));
    KVM_RETURN_IF_ERROR(FromRocks(db->Write(w, b), "rocksdb write"));
    stats.disk_bytes_written += b->GetDataSize();
    return Status::Ok();
  }
  Status Write(const Seq& q, rocksdb::WriteBatch* b, bool frees = false) {
    return Write(Wopt(q), b, frees);
  }
  HostArena* Arena(size_t block_bytes) {
    auto& a = arenas[block_bytes];
    if (!a) {
      const uint64_t cap =
          opt.host_capacity_bytes ? opt.host_capacity_bytes : DefaultHostCapacity();
      auto made = HostArena::Make(cap, block_bytes);
      if (!made.ok()) return nullptr;
      a = std::move(*made);
      stats.host_slots += a->capacity();
      if (on_host_memory) on_host_memory(a->base(), a->bytes());
    }
    return a.get();
  }
  // A host slot for a block of `bytes`; a full tier first demotes blocks to disk down to the low
  // watermark — with `limit`, only blocks that rank below it. NoSpace only when every resident
  // block is pinned or above the limit (then the caller serves from disk).
  Result<uint32_t> HostSlot(size_t bytes, const EvictKey* limit = nullptr) {
    HostArena* a = Arena(bytes);
    if (!a) return Status::NoSpace("host tier cannot be mapped");
    auto s = a->Allocate();
    if (s.ok()) return s;
    KVM_RETURN_IF_ERROR(
        Evict(bytes, static_cast<uint32_t>(opt.low_watermark * a->capacity()), limit));
    return a->Allocate();
  }
  // Whether block `idx` of q stays in the host tier whatever the pressure: a sink block or one of
  // the recent window (which follows an append in progress).
  bool Pinned(const Seq& q, uint64_t idx) const {
    const uint64_t full = std::max(q.length, q.pin_end) / q.B;
    const uint64_t sinks = (uint64_t{opt.pinned_sink_tokens} + q.B - 1) / q.B;
    const uint64_t window = (uint64_t{opt.pinned_window_tokens} + q.B - 1) / q.B;
    return idx < sinks || idx + window >= full;
  }
  // Demotes host blocks of `bytes` until at most `target` slots are used, in eviction order
  // (EvictKey: never-selected first, V before K unless the sequence's values are read as often,
  // then least recently selected, then oldest); the sink and window blocks of every sequence stay.
  // The victims' records (cache blocks: no WAL) go to disk in one batch per round, before any slot
  // is freed: a failed write frees nothing.
  Status Evict(size_t bytes, uint32_t target, const EvictKey* limit = nullptr) {
    HostArena* a = Arena(bytes);
    const std::set<EvictKey>& order = evict_order[bytes];
    while (a->used() > target) {
      struct Victim {
        Seq* q;
        LocKey lk;
      };
      std::vector<Victim> victims;  // enough for the target unless some slots are shared
      const size_t need = a->used() - target;
      for (auto it = order.begin(); it != order.end() && victims.size() < need; ++it) {
        if (limit && !(*it < *limit)) break;
        Seq* q = by_uid.at(std::get<4>(*it));
        const LocKey& lk = std::get<5>(*it);
        if (!Pinned(*q, std::get<2>(lk))) victims.push_back({q, lk});
      }
      if (victims.empty()) break;
      rocksdb::WriteBatch b;
      bool wal = false;
      for (const Victim& v : victims) {
        const BlockLoc& loc = v.q->blocks.at(v.lk);
        if (loc.on_disk) continue;
        b.Put(blocks(), DiskKey(*v.q, v.lk),
              Seal(std::string(
                  reinterpret_cast<const char*>(a->slot(static_cast<uint32_t>(loc.slot))), bytes)));
        wal |= v.q->dur == Durability::kDurable;
      }
      if (b.Count() > 0) {
        rocksdb::WriteOptions w;
        w.disableWAL = !wal;
        KVM_RETURN_IF_ERROR(Write(w, &b));
      }
      for (const Victim& v : victims)
        Update(*v.q, v.lk, v.q->blocks.at(v.lk), [a](BlockLoc& loc) {
          a->Free(static_cast<uint32_t>(loc.slot));
          loc.slot = -1;
          loc.on_disk = true;
        });
      stats.spills += victims.size();
    }
    return Status::Ok();
  }
  Status PutHost(Seq& q, const LocKey& lk, const uint8_t* data) {
    KVM_ASSIGN_OR_RETURN(uint32_t slot, HostSlot(q.block_bytes()));
    std::memcpy(Arena(q.block_bytes())->slot(slot), data, q.block_bytes());
    BlockLoc& loc = q.blocks[lk];
    Update(q, lk, loc, [&](BlockLoc& l) {
      l.slot = slot;
      l.host_since = ++tick;
    });
    return Status::Ok();
  }
  // Forgets one block of the in-memory index (host slot freed); a cache sequence's spilled record
  // is deleted through `b` (a durable one's records go through Unref).
  void DropBlock(Seq& q, const LocKey& lk, rocksdb::WriteBatch* b) {
    auto it = q.blocks.find(lk);
    if (it == q.blocks.end()) return;
    FreeSlot(q, it->first, it->second);
    if (it->second.on_disk && q.dur == Durability::kCache) b->Delete(blocks(), DiskKey(q, lk));
    q.blocks.erase(it);
  }
  // Gives a block's host slot back (if it has one): the block is on disk only, or forgotten next.
  void FreeSlot(const Seq& q, const LocKey& lk, BlockLoc& loc) {
    Update(q, lk, loc, [&](BlockLoc& l) {
      if (l.slot >= 0) Arena(q.block_bytes())->Free(static_cast<uint32_t>(l.slot));
      l.slot = -1;
    });
  }
  // The bytes of a full block (host, else disk: verified, promoted).
  Status LoadBlock(Seq& q, const LocKey& lk, uint8_t* out) {
    auto it = q.blocks.find(lk);
    if (it == q.blocks.end()) return Status::Internal("block index missing");
    if (it->second.slot >= 0) {
      std::memcpy(out, Arena(q.block_bytes())->slot(static_cast<uint32_t>(it->second.slot)),
                  q.block_bytes());
      return Status::Ok();
    }
    const uint64_t idx = std::get<2>(lk);
    std::string raw;
    KVM_RETURN_IF_ERROR(
        FromRocks(db->Get(rocksdb::ReadOptions(), blocks(), DiskKey(q, lk), &raw), "rocksdb get"));
    KVM_ASSIGN_OR_RETURN(std::string data, Unseal(raw, "block " + std::to_string(idx)));
    if (data.size() != q.block_bytes())
      return Status::Corruption("block " + std::to_string(idx) + ": wrong size");
    std::memcpy(out, data.data(), data.size());
    if (PutHost(q, lk, out).ok())
      ++stats.promotions;  // best effort: a full host tier just serves from disk
    return Status::Ok();
  }
};

BlockStore::BlockStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BlockStore::~BlockStore() = default;

Result<std::unique_ptr<BlockStore>> BlockStore::Open(const StoreOptions& o) {
  if (o.dir.empty()) return Status::InvalidArgument("store: dir is empty");
  auto impl = std::make_unique<Impl>();
  impl->opt = o;
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = true;
  dbo.create_missing_column_families = true;
  if (o.env) dbo.env = o.env;
  if (!o.env) {  // RocksDB's LOG through a logger that a full disk cannot abort (rocks_logger.h)
    std::error_code ec;
    std::filesystem::create_directories(o.dir, ec);
    dbo.info_log = StdioRocksLogger::Open(o.dir + "/LOG");
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* n : kColumnFamilies) cfs.emplace_back(n, rocksdb::ColumnFamilyOptions());
  rocksdb::DB* db = nullptr;
  KVM_RETURN_IF_ERROR(
      FromRocks(rocksdb::DB::Open(dbo, o.dir, cfs, &impl->cf, &db), "open " + o.dir));
  impl->db.reset(db);
  // Recover durable sequences: metadata, then the tail rows; full blocks stay on disk until read.
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), impl->meta()));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    KVM_ASSIGN_OR_RETURN(const SeqRef ref, DecodeSeqPrefix(it->key().ToString()));
    KVM_ASSIGN_OR_RETURN(const SeqMeta meta, DecodeMeta(it->value().ToString()));
    Seq q;
    q.ref = ref;
    q.shape = meta.shape;
    q.B = meta.block_size;
    q.dur = meta.durability;
    q.length = meta.length;
    q.lease_ms = meta.lease_ms;
    q.last_access = impl->Now();
    q.seed = LayoutSeed(q.ref.tenant, q.shape, q.B);
    q.tail.assign(size_t{q.shape.layers} * q.shape.kv_heads * 2 * q.block_bytes(), 0);
    const uint64_t full = q.length / q.B;
    for (uint32_t l = 0; l < q.shape.layers; ++l)
      for (uint32_t h = 0; h < q.shape.kv_heads; ++h)
        for (uint64_t b = 0; b < full; ++b)
          for (bool v : {false, true}) q.blocks[{l, h, b, v}] = BlockLoc{-1, true};
    for (uint64_t b = 0; b < full; ++b) {  // token ids of full blocks
      std::string raw;
      KVM_RETURN_IF_ERROR(FromRocks(
          db->Get(rocksdb::ReadOptions(), impl->toks(), PosKey(q.ref, b), &raw), "tokens"));
      KVM_ASSIGN_OR_RETURN(std::string t, Unseal(raw, "token ids"));
      if (t.size() != 4 * size_t{q.B}) return Status::Corruption("token ids: wrong size");
      for (uint32_t i = 0; i < q.B; ++i)
        q.tokens.push_back(static_cast<uint32_t>(GetBe(t.data() + 4 * i, 4)));
      q.chain.push_back(ChainNext(b ? q.chain.back() : Addr{}, &q.tokens[b * q.B], q.B));
      for (uint32_t l = 0; l < q.shape.layers; ++l)  // refcounts rebuilt from the sequences
        for (uint32_t h = 0; h < q.shape.kv_heads; ++h) ++impl->refs[q.addr(l, h, b)];
    }
    impl->layouts[q.ref.tenant].insert(Impl::Layout(q.shape, q.B));
    for (uint64_t p = full * q.B; p < q.length; ++p) {  // tail rows
      std::string raw;
      KVM_RETURN_IF_ERROR(
          FromRocks(db->Get(rocksdb::ReadOptions(), impl->tail(), PosKey(q.ref, p), &raw), "tail"));
      KVM_ASSIGN_OR_RETURN(std::string t, Unseal(raw, "tail row " + std::to_string(p)));
      const size_t rb = q.row_bytes(),
                   need = 4 + size_t{q.shape.layers} * q.shape.kv_heads * 2 * rb;
      if (t.size() != need)
        return Status::Corruption("tail row " + std::to_string(p) + ": wrong size");
      q.tokens.push_back(static_cast<uint32_t>(GetBe(t.data(), 4)));
      const char* src = t.data() + 4;
      for (uint32_t l = 0; l < q.shape.layers; ++l)
        for (uint32_t h = 0; h < q.shape.kv_heads; ++h)
          for (int v = 0; v < 2; ++v) {
            std::memcpy(q.tail_row(l, h, v != 0, static_cast<uint32_t>(p % q.B)), src, rb);
            src += rb;
          }
    }
    q.uid = impl->next_uid++;
    TenantUsage& use = impl->usage[q.ref.tenant];
    ++use.sequences;
    use.stored_bytes += q.length * q.token_bytes();
    Seq& placed = impl->seqs[{q.ref.tenant, q.ref.id}] = std::move(q);
    impl->by_uid[placed.uid] = &placed;
    placed.InitSums();  // summaries rebuilt from K (full blocks from disk, then the tail)
    std::vector<uint8_t> blk(placed.block_bytes());
    for (uint64_t b = 0; b < full; ++b)
      for (uint32_t l = 0; l < placed.shape.layers; ++l)
        for (uint32_t h = 0; h < placed.shape.kv_heads; ++h) {
          KVM_RETURN_IF_ERROR(impl->LoadBlock(placed, {l, h, b, false}, blk.data()));
          for (uint32_t r = 0; r < placed.B; ++r)
            placed.Summarize(l, h, b * placed.B + r, blk.data() + r * placed.row_bytes());
        }
    for (uint64_t p = full * placed.B; p < placed.length; ++p)
      for (uint32_t l = 0; l < placed.shape.layers; ++l)
        for (uint32_t h = 0; h < placed.shape.kv_heads; ++h)
          placed.Summarize(l, h, p,
                           placed.tail_row(l, h, false, static_cast<uint32_t>(p % placed.B)));
  }
  // Spilled blocks of cache sequences ('S' keys) do not survive a restart.
  std::unique_ptr<rocksdb::Iterator> bi(db->NewIterator(rocksdb::ReadOptions(), impl->blocks()));
  rocksdb::WriteBatch orphans;
  for (bi->Seek("S"); bi->Valid() && bi->key().starts_with("S"); bi->Next())
    orphans.Delete(impl->blocks(), bi->key());
  if (orphans.Count())
    KVM_RETURN_IF_ERROR(FromRocks(db->Write(rocksdb::WriteOptions(), &orphans), "cleanup"));
  if (!o.gpu) {
    impl->gpu_absent = "turned off (gpu: false)";
  } else {
    std::unique_ptr<Device> dev;
    if (o.gpu_device) {
      auto d = o.gpu_device();
      if (d.ok())
        dev = std::move(*d);
      else
        impl->gpu_absent = d.status().message();
    }
    if (impl->gpu_absent.empty()) {
      auto t = GpuTier::Open(GpuTierOptions{o.gpu_capacity_bytes}, std::move(dev));
      if (t.ok())
        impl->gpu = std::move(*t);
      else
        impl->gpu_absent = t.status().message();
    }
  }
  return std::unique_ptr<BlockStore>(new BlockStore(std::move(impl)));
}

Result<Seq> BlockStore::Impl::NewSeq(const SeqRef& s, const ModelShape& shape, uint32_t block_size,
                                     Durability d, int64_t lease_ms) {
  KVM_RETURN_IF_ERROR(shape.Validate());
  if (block_size == 0 || block_size > kMaxBlockSize)
    return Status::InvalidArgument("block_size out of range");
  if (s.tenant.empty() || s.tenant.find('\0') != std::string::npos)
    return Status::InvalidArgument("tenant must be non-empty and contain no NUL");
  if (d != Durability::kDurable && d != Durability::kCache)
    return Status::InvalidArgument("durability must be cache or durable");
  if (Find(s)) return Status::AlreadyExists("sequence " + std::to_string(s.id) + " exists");
  if (auto it = quotas.find(s.tenant); it != quotas.end() && it->second.max_sequences > 0 &&
                                       usage[s.tenant].sequences >= it->second.max_sequences)
    return Status::NoSpace("tenant '" + s.tenant + "' is at its quota max_sequences=" +
                           std::to_string(it->second.max_sequences) + ": " +
                           std::to_string(usage[s.tenant].sequences) + " sequences stored");
  Seq q;
  q.ref = s;
  q.shape = shape;
  q.B = block_size;
  q.dur = d;
  q.lease_ms = std::max<int64_t>(0, lease_ms);
  q.last_access = Now();
  q.seed = LayoutSeed(s.tenant, shape, block_size);
  q.tail.assign(size_t{shape.layers} * shape.kv_heads * 2 * q.block_bytes(), 0);
  q.InitSums();
  return q;
}

Status BlockStore::Create(const SeqRef& s, const ModelShape& shape, uint32_t block_size,
                          Durability d, int64_t lease_ms) {
  std::lock_guard<std::mutex> l(impl_->mu);
  uint64_t attached = 0;
  return impl_->CreateLocked(s, shape, block_size, d, lease_ms, {}, &attached);
}

Result<uint64_t> BlockStore::CreateFromPrefix(const SeqRef& s, const ModelShape& shape,
                                              uint32_t block_size, Durability d, int64_t lease_ms,
                                              std::span<const uint32_t> tokens) {
  std::lock_guard<std::mutex> l(impl_->mu);
  uint64_t attached = 0;
  KVM_RETURN_IF_ERROR(impl_->CreateLocked(s, shape, block_size, d, lease_ms, tokens, &attached));
  return attached;
}

Status BlockStore::Impl::CreateLocked(const SeqRef& s, const ModelShape& shape, uint32_t block_size,
                                      Durability d, int64_t lease_ms,
                                      std::span<const uint32_t> prefix, uint64_t* attached) {
  KVM_ASSIGN_OR_RETURN(Seq q, NewSeq(s, shape, block_size, d, lease_ms));
  const uint32_t B = block_size, L = shape.layers, H = shape.kv_heads;
  const bool durable = d == Durability::kDurable;
  // The holder: the sequence sharing the longest run of this prefix's content chain (it holds
  // every block of that run: the chain of block b hashes the tokens of blocks 0..b).
  const std::vector<Addr> chain = StoredChain(q.seed, prefix, B);
  const Seq* src = nullptr;
  uint64_t m = 0;
  for (const auto& [key, o] : seqs) {
    if (!(o.seed == q.seed) || o.writing) continue;
    uint64_t k = 0;
    while (k < chain.size() && k < o.chain.size() && o.chain[k] == chain[k]) ++k;
    if (k > m) m = k, src = &o;
  }
  KVM_RETURN_IF_ERROR(CheckBytesQuota(s.tenant, m * B * q.token_bytes()));
  rocksdb::WriteBatch batch;
  // The attached blocks: a host slot the holder has is shared (one more holder: no copy); a block
  // only on disk is read from there only where this sequence needs its own copy (a durable
  // sequence whose block exists only in a cache sequence, or a cache sequence: into a host slot
  // of its own, else its own spill record).
  struct Attached {
    LocKey lk;
    int64_t slot = -1;
    bool on_disk = false;
  };
  std::vector<Attached> plan;
  auto undo = [&] {
    for (const Attached& a : plan)
      if (a.slot >= 0) Arena(q.block_bytes())->Free(static_cast<uint32_t>(a.slot));
  };
  std::vector<uint8_t> buf(q.block_bytes());
  for (uint64_t b = 0; b < m; ++b)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        for (bool v : {false, true}) {
          const LocKey lk{l, h, b, v};
          auto it = src->blocks.find(lk);
          if (it == src->blocks.end()) {
            undo();
            return Status::Internal("attach: the holder's block index is missing");
          }
          Attached a{lk};
          const bool record = durable && refs.count(BlockAddr(q.seed, chain[b], l, h));
          if (it->second.slot >= 0) {
            a.slot = it->second.slot;
            Arena(q.block_bytes())->Share(static_cast<uint32_t>(a.slot));
            plan.push_back(a);
            if (!durable || record) {
              plan.back().on_disk = record;
              continue;
            }
            std::memcpy(buf.data(), Arena(q.block_bytes())->slot(static_cast<uint32_t>(a.slot)),
                        buf.size());
          } else {
            std::string raw;
            Status st = FromRocks(
                db->Get(rocksdb::ReadOptions(), blocks(), DiskKey(*src, lk), &raw), "rocksdb get");
            Result<std::string> data =
                st.ok() ? Unseal(raw, "block " + std::to_string(b)) : Result<std::string>(st);
            if (!data.ok() || data->size() != buf.size()) {
              undo();
              return data.ok() ? Status::Corruption("block " + std::to_string(b) + ": wrong size")
                               : data.status();
            }
            std::memcpy(buf.data(), data->data(), buf.size());
            plan.push_back(a);
            if (record) {
              plan.back().on_disk = true;
              continue;
            }
            if (!durable) {  // a host slot of its own, else its own spill record
              Result<uint32_t> slot = HostSlot(q.block_bytes());
              if (slot.ok()) {
                std::memcpy(Arena(q.block_bytes())->slot(*slot), buf.data(), buf.size());
                plan.back().slot = *slot;
                continue;
              }
            }
          }
          const std::string key = durable ? ContentKey(BlockAddr(q.seed, chain[b], l, h), v)
                                          : BlockKey(s, {l, h, b}, v);
          batch.Put(blocks(), key,
                    Seal(std::string(reinterpret_cast<const char*>(buf.data()), buf.size())));
          plan.back().on_disk = true;
        }
  q.length = m * B;
  q.chain.assign(chain.begin(), chain.begin() + static_cast<ptrdiff_t>(m));
  if (src)
    q.tokens.assign(src->tokens.begin(), src->tokens.begin() + static_cast<ptrdiff_t>(m * B));
  if (durable) {
    batch.Put(meta(), SeqPrefix(s), EncodeMeta(q));
    for (uint64_t b = 0; b < m; ++b) {
      std::string ids;
      for (uint64_t t = b * B; t < (b + 1) * B; ++t) PutBe(&ids, q.tokens[t], 4);
      batch.Put(toks(), PosKey(s, b), Seal(ids));
    }
  }
  if (batch.Count() > 0) {
    if (Status st = Write(q, &batch); !st.ok()) {
      undo();
      return st;
    }
  }
  // Commit.
  for (uint64_t b = 0; b < m; ++b)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h) ++Refs(q)[q.addr(l, h, b)];
  if (src)
    for (size_t i = 0; i < q.sums.size(); ++i) {  // the holder's summaries, cut at the prefix
      q.sums[i] = src->sums[i];
      q.sums[i].Truncate(m * B);
    }
  q.uid = next_uid++;
  layouts[s.tenant].insert(Layout(shape, block_size));
  TenantUsage& use = usage[s.tenant];
  ++use.sequences;
  use.stored_bytes += q.length * q.token_bytes();
  Seq& placed = seqs[{s.tenant, s.id}] = std::move(q);
  by_uid[placed.uid] = &placed;
  for (const Attached& a : plan) {
    BlockLoc& loc = placed.blocks[a.lk];
    loc.on_disk = a.on_disk;
    Update(placed, a.lk, loc, [&](BlockLoc& l) {
      l.slot = a.slot;
      if (a.slot >= 0) l.host_since = ++tick;
    });
  }
  *attached = m * B;
  return Status::Ok();
}

Result<uint64_t> BlockStore::Append(const SeqRef& s, uint64_t start,
                                    std::span<const uint32_t> tokens,
                                    std::span<const uint8_t> payload) {
  // Four steps; the lock is held only to check, to take host slots and to commit. While the
  // sequence is `writing`, other appends, truncate and delete of it wait, and readers see it as it
  // was: its tail, tokens and chain do not change, so the unlocked steps read them freely.
  // 1. Under the lock: the checks, the quota, the content chain, the shared records held.
  std::unique_lock<std::mutex> lk(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->GetIdle(lk, s));
  const uint64_t n = tokens.size();
  const size_t rb = q->row_bytes(), bb = q->block_bytes();
  const uint32_t L = q->shape.layers, H = q->shape.kv_heads, B = q->B, D = q->shape.head_dim;
  if (n == 0) return Status::InvalidArgument("append: no tokens");
  if (payload.size() != size_t{L} * H * 2 * n * rb)
    return Status::InvalidArgument("append: payload is " + std::to_string(payload.size()) +
                                   " bytes, the shape needs " +
                                   std::to_string(size_t{L} * H * 2 * n * rb));
  if (start > q->length)
    return Status::FailedPrecondition("append at " + std::to_string(start) +
                                      " leaves a gap (length " + std::to_string(q->length) + ")");
  for (uint64_t p = start; p < std::min(q->length, start + n); ++p)
    if (q->tokens[p] != tokens[p - start])
      return Status::FailedPrecondition("position " + std::to_string(p) +
                                        " already holds another token");
  q->last_access = impl_->Now();
  const bool durable = q->dur == Durability::kDurable;
  const uint64_t old_len = q->length, end = start + n;
  if (end <= old_len) return old_len;                           // a pure retry
  auto row = [&](uint64_t i, uint32_t l, uint32_t h, bool v) {  // payload row of token i
    return payload.data() + ((((size_t{l} * H + h) * 2 + v) * n) + i) * rb;
  };
  // Row r of block `idx` for (l, h, v): from the tail if it was there before, else from the
  // payload.
  auto block_row = [&](uint64_t idx, uint32_t r, uint32_t l, uint32_t h, int v) -> const uint8_t* {
    const uint64_t pos = idx * B + r;
    return pos < old_len ? q->tail_row(l, h, v != 0, r) : row(pos - start, l, h, v);
  };
  auto token_at = [&](uint64_t pos) {
    return pos < old_len ? q->tokens[pos] : tokens[pos - start];
  };
  std::vector<uint64_t> completed;  // block indices that fill in this append
  for (uint64_t p = old_len; p < end; ++p)
    if ((p + 1) % B == 0) completed.push_back(p / B);
  // The new bytes count against the tenant's quota from here (a concurrent append of the same
  // tenant sees them while this one writes); given back if the append fails.
  const uint64_t added = (end - old_len) * q->token_bytes();
  KVM_RETURN_IF_ERROR(impl_->CheckBytesQuota(s.tenant, added));
  impl_->usage[s.tenant].stored_bytes += added;
  // Content addresses of the completed blocks: the hash chain over their token ids.
  std::vector<Addr> new_chain;
  for (uint64_t idx : completed) {
    std::vector<uint32_t> ids(B);
    for (uint32_t i = 0; i < B; ++i) ids[i] = token_at(idx * B + i);
    const Addr prev =
        idx == 0 ? Addr{} : (idx - 1 < q->chain.size() ? q->chain[idx - 1] : new_chain.back());
    new_chain.push_back(ChainNext(prev, ids.data(), B));
  }
  // Shared addresses this append relies on without writing them (another sequence stored that
  // prefix block): held by a reference of their own while the write runs outside the lock, so a
  // delete or truncate of that sequence meanwhile cannot remove the records. Given back when the
  // append fails (the records go if nothing else holds them) or when it commits.
  // The addresses it writes itself are in writing_refs until it ends (see there).
  std::vector<Addr> reserved, writes;
  std::vector<uint8_t> shared(completed.size() * L * H, 0);  // [completed][l][h]
  if (durable)
    for (size_t ci = 0; ci < completed.size(); ++ci)
      for (uint32_t l = 0; l < L; ++l)
        for (uint32_t h = 0; h < H; ++h) {
          const Addr a = BlockAddr(q->seed, new_chain[ci], l, h);
          if (auto it = impl_->refs.find(a); it != impl_->refs.end()) {
            ++it->second;
            reserved.push_back(it->first);
            shared[(ci * L + l) * H + h] = 1;
          } else {
            ++impl_->writing_refs[a];
            writes.push_back(a);
          }
        }
  HostArena* arena = impl_->Arena(bb);
  q->writing = true;
  q->pin_end = end;  // the window pin follows the append while it takes slots
  // Every way out from here runs with the lock held: gives back the reservations and the quota
  // and the slots taken (failed), or just ends the write (committed).
  std::vector<int64_t> slots;  // per completed block: its host slot, or -1
  auto finish = [&](bool failed) {
    rocksdb::WriteBatch gone;
    auto drop = [&](const Addr& a) {  // records no sequence holds and no append is writing
      gone.Delete(impl_->blocks(), ContentKey(a, false));
      gone.Delete(impl_->blocks(), ContentKey(a, true));
    };
    for (const Addr& a : writes) {
      auto it = impl_->writing_refs.find(a);
      if (--it->second == 0) impl_->writing_refs.erase(it);
      if (failed && !impl_->refs.count(a) && !impl_->writing_refs.count(a)) drop(a);
    }
    for (const Addr& a : reserved) {
      auto it = impl_->refs.find(a);
      if (it == impl_->refs.end() || --it->second > 0) continue;
      impl_->refs.erase(it);
      if (failed && !impl_->writing_refs.count(a)) drop(a);
    }
    if (gone.Count() > 0) (void)impl_->db->Write(rocksdb::WriteOptions(), &gone);
    if (failed) {
      impl_->usage[s.tenant].stored_bytes -= added;
      for (int64_t slot : slots)
        if (slot >= 0 && arena) arena->Free(static_cast<uint32_t>(slot));
    }
    q->writing = false;
    q->pin_end = 0;
    impl_->written.notify_all();
  };
  lk.unlock();

  // 2. Unlocked: the new K rows decoded for the summaries, and a durable sequence's WAL batch (its
  // tail records; the block records replace the block's tail records in the same batch, no
  // rewrite of a whole block per token).
  const size_t block_count = completed.size() * L * H * 2;  // [completed][l][h][K,V]
  auto assemble = [&](size_t ci, uint32_t l, uint32_t h, int v, uint8_t* dst) {
    for (uint32_t r = 0; r < B; ++r)
      std::memcpy(dst + size_t{r} * rb, block_row(completed[ci], r, l, h, v), rb);
  };
  auto record = [&](size_t ci, uint32_t l, uint32_t h, int v) {  // a block's sealed value
    std::string blk(bb, '\0');
    assemble(ci, l, h, v, reinterpret_cast<uint8_t*>(blk.data()));
    return Seal(std::move(blk));
  };
  std::vector<float> krows((end - old_len) * L * H * D);  // [new position][l][h][D]
  for (uint64_t p = old_len; p < end; ++p)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        DecodeRow(row(p - start, l, h, false), D, q->shape.dtype,
                  &krows[(((p - old_len) * L + l) * H + h) * D]);
  rocksdb::WriteBatch batch;
  if (durable) {
    for (uint64_t p = old_len; p < end; ++p) {
      std::string rec;
      rec.reserve(4 + size_t{L} * H * 2 * rb + 8);
      PutBe(&rec, tokens[p - start], 4);
      for (uint32_t l = 0; l < L; ++l)
        for (uint32_t h = 0; h < H; ++h)
          for (int v = 0; v < 2; ++v)
            rec.append(reinterpret_cast<const char*>(row(p - start, l, h, v)), rb);
      batch.Put(impl_->tail(), PosKey(s, p), Seal(std::move(rec)));
    }
    for (size_t ci = 0; ci < completed.size(); ++ci) {
      const uint64_t idx = completed[ci];
      for (uint32_t l = 0; l < L; ++l)
        for (uint32_t h = 0; h < H; ++h) {
          if (shared[(ci * L + l) * H + h]) continue;  // stored by another sequence: not rewritten
          const Addr a = BlockAddr(q->seed, new_chain[ci], l, h);
          for (int v = 0; v < 2; ++v)
            batch.Put(impl_->blocks(), ContentKey(a, v != 0), record(ci, l, h, v));
        }
      std::string ids;
      for (uint64_t t = idx * B; t < (idx + 1) * B; ++t) PutBe(&ids, token_at(t), 4);
      batch.Put(impl_->toks(), PosKey(s, idx), Seal(ids));
      for (uint64_t t = idx * B; t < (idx + 1) * B; ++t) batch.Delete(impl_->tail(), PosKey(s, t));
    }
    batch.Put(impl_->meta(), SeqPrefix(s), EncodeMeta(*q, end));
  }

  // 3. The WAL write, outside the lock (RocksDB's group commit orders concurrent writers):
  // retrievals of this and every other sequence go on meanwhile.
  if (durable) {
    lk.lock();
    if (Status room = impl_->CheckDiskRoom(batch); !room.ok()) {
      finish(true);
      return room;
    }
    const rocksdb::WriteOptions wo = impl_->Wopt(*q);
    lk.unlock();
    if (impl_->opt.test_before_write) impl_->opt.test_before_write();
    const rocksdb::Status ws = impl_->db->Write(wo, &batch);
    if (impl_->opt.test_after_write) impl_->opt.test_after_write();
    lk.lock();
    if (!ws.ok()) {
      finish(true);
      return FromRocks(ws, "rocksdb write");
    }
    impl_->stats.disk_bytes_written += batch.GetDataSize();
  } else {
    lk.lock();
  }

  // 4. Host slots for the completed blocks, filled outside the lock; a cache block with no room
  // goes to a spill record. The sink and window blocks first (a full tier evicts whatever it must
  // for them), then the others in descending eviction rank (K before V, unless values are read;
  // newest first), each evicting only blocks that rank below it: what placing them one at a time
  // in order, each an eviction candidate at once, would keep. Then the commit: the blocks enter the
  // eviction order, then references, chain, tail, summaries and length.
  slots.assign(block_count, -1);
  auto k_first = [&](size_t i) { return !(i % 2 && !q->values_read); };  // i: [ci][l][h][K,V]
  std::vector<size_t> order;
  for (size_t i = block_count; i-- > 0;)
    if (!impl_->Pinned(*q, completed[i / (2 * L * H)])) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return k_first(x) > k_first(y); });
  for (size_t i = block_count; i-- > 0 && arena;)
    if (impl_->Pinned(*q, completed[i / (2 * L * H)]))
      if (Result<uint32_t> slot = impl_->HostSlot(bb); slot.ok()) slots[i] = *slot;
  for (size_t i : order) {
    if (!arena) break;
    const EvictKey limit{false, k_first(i), 0, UINT64_MAX, 0, LocKey{}};
    if (Result<uint32_t> slot = impl_->HostSlot(bb, &limit); slot.ok()) slots[i] = *slot;
  }
  lk.unlock();
  rocksdb::WriteBatch spill;
  size_t spilled = 0;
  for (size_t ci = 0; ci < completed.size(); ++ci)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        for (int v = 0; v < 2; ++v) {
          const size_t i = ((ci * L + l) * H + h) * 2 + v;
          if (slots[i] >= 0) {
            assemble(ci, l, h, v, arena->slot(static_cast<uint32_t>(slots[i])));
          } else if (!durable) {
            spill.Put(impl_->blocks(), BlockKey(s, {l, h, completed[ci]}, v != 0),
                      record(ci, l, h, v));
            ++spilled;
          }
        }
  lk.lock();
  if (spill.Count() > 0) {
    if (Status st = impl_->Write(*q, &spill); !st.ok()) {
      finish(true);
      return st;
    }
    impl_->stats.spills += spilled;
  }
  for (size_t ci = 0; ci < completed.size(); ++ci)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        for (int v = 0; v < 2; ++v) {
          const LocKey lkey{l, h, completed[ci], v != 0};
          const int64_t slot = slots[((ci * L + l) * H + h) * 2 + v];
          BlockLoc& loc = q->blocks[lkey];
          loc.on_disk = durable || slot < 0;
          impl_->Update(*q, lkey, loc, [&](BlockLoc& x) {
            x.slot = slot;
            if (slot >= 0) x.host_since = ++impl_->tick;
          });
        }
  slots.clear();  // the index holds them now
  q->chain.insert(q->chain.end(), new_chain.begin(), new_chain.end());
  for (uint64_t idx : completed)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h) ++impl_->Refs(*q)[q->addr(l, h, idx)];
  // Only the rows of the block that stays partial enter the tail (the completed ones are blocks).
  for (uint64_t p = std::max(old_len, end / B * B); p < end; ++p)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        for (int v = 0; v < 2; ++v)
          std::memcpy(q->tail_row(l, h, v != 0, static_cast<uint32_t>(p % B)),
                      row(p - start, l, h, v), rb);
  for (uint64_t p = old_len; p < end; ++p)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        q->sums[size_t{l} * H + h].Append(p, &krows[(((p - old_len) * L + l) * H + h) * D]);
  for (uint64_t p = old_len; p < end; ++p) q->tokens.push_back(tokens[p - start]);
  q->length = end;
  finish(false);
  return end;
}

Result<uint64_t> BlockStore::Length(const SeqRef& s) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(const Seq* q, impl_->Get(s));
  return q->length;
}

Result<SeqInfo> BlockStore::Info(const SeqRef& s) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(const Seq* q, impl_->Get(s));
  return SeqInfo{s.id, q->shape, q->B, q->length, q->dur};
}

std::vector<SeqInfo> BlockStore::List(const std::string& tenant) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  std::vector<SeqInfo> out;
  for (auto it = impl_->seqs.lower_bound({tenant, 0});
       it != impl_->seqs.end() && it->first.first == tenant; ++it)
    out.push_back(
        {it->second.ref.id, it->second.shape, it->second.B, it->second.length, it->second.dur});
  return out;
}

Status BlockStore::ReadBlock(const SeqRef& s, const BlockId& b, bool values,
                             std::span<uint8_t> out) {
  const uint64_t idx = b.index;
  return ReadBlocks(s, b.layer, b.kv_head, values, {&idx, 1}, out);
}

Status BlockStore::ReadBlocks(const SeqRef& s, uint32_t layer, uint32_t kv_head, bool values,
                              std::span<const uint64_t> blocks, std::span<uint8_t> out) {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s, layer, kv_head));
  q->last_access = impl_->Now();
  return impl_->ReadLocked(*q, layer, kv_head, values, blocks, out);
}

Status BlockStore::Impl::ReadLocked(Seq& q, uint32_t layer, uint32_t kv_head, bool values,
                                    std::span<const uint64_t> blocks, std::span<uint8_t> out) {
  const size_t bb = q.block_bytes();
  if (out.size() != blocks.size() * bb)
    return Status::InvalidArgument("read blocks: buffer of " + std::to_string(out.size()) +
                                   " bytes for " + std::to_string(blocks.size()) + " blocks of " +
                                   std::to_string(bb));
  const uint64_t full = q.length / q.B;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const uint64_t b = blocks[i];
    uint8_t* dst = out.data() + i * bb;
    if (b < full) {
      KVM_RETURN_IF_ERROR(LoadBlock(q, {layer, kv_head, b, values}, dst));
    } else if (b == full && q.length % q.B) {
      const size_t valid = (q.length % q.B) * q.row_bytes();
      std::memcpy(dst, q.tail_row(layer, kv_head, values, 0), valid);
      std::memset(dst + valid, 0, bb - valid);
    } else {
      return Status::OutOfRange("block " + std::to_string(b) + " is past the end (length " +
                                std::to_string(q.length) + ")");
    }
  }
  return Status::Ok();
}

PinnedBlocks& PinnedBlocks::operator=(PinnedBlocks&& o) noexcept {
  if (this != &o) {
    Release();
    arena_ = o.arena_;
    slots_ = std::move(o.slots_);
    k_ = std::move(o.k_);
    v_ = std::move(o.v_);
    rows_ = std::move(o.rows_);
    copies_ = std::move(o.copies_);
    o.arena_ = nullptr;
    o.slots_.clear();
  }
  return *this;
}

void PinnedBlocks::Release() {
  if (arena_)
    for (uint32_t slot : slots_) arena_->Free(slot);
  slots_.clear();
  k_.clear();
  v_.clear();
  rows_.clear();
  copies_.clear();
  arena_ = nullptr;
}

Result<PinnedBlocks> BlockStore::Pin(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                                     std::span<const uint64_t> blocks, bool keys_only) {
  // Blocks only on disk are read outside the lock, then promoted under it — if the sequence is
  // still the one they were read for (same uid, no truncate since: its blocks are then the same
  // bytes); else the pin starts over (after a few tries, reading under the lock).
  for (int attempt = 0;; ++attempt) {
    std::unique_lock<std::mutex> lk(impl_->mu);
    KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s, layer, kv_head));
    q->last_access = impl_->Now();
    std::vector<Impl::DiskRead> reads;
    KVM_ASSIGN_OR_RETURN(PinnedBlocks pin, impl_->PinLocked(*q, layer, kv_head, blocks, keys_only,
                                                            attempt < 3 ? &reads : nullptr));
    if (reads.empty()) return pin;
    const uint64_t uid = q->uid, epoch = q->epoch, bb = q->block_bytes();
    lk.unlock();
    Status read = Status::Ok();
    for (Impl::DiskRead& r : reads) {
      std::string raw;
      read = FromRocks(impl_->db->Get(rocksdb::ReadOptions(), impl_->blocks(), r.key, &raw),
                       "rocksdb get");
      const std::string what = "block " + std::to_string(std::get<2>(r.lk));
      if (read.ok()) {
        Result<std::string> data = Unseal(raw, what);
        read = data.ok() && data->size() != bb ? Status::Corruption(what + ": wrong size")
                                               : data.status();
        if (read.ok()) r.data = std::move(*data);
      }
      if (!read.ok()) break;
    }
    lk.lock();
    Seq* now = impl_->Find(s);
    if (!now) return Status::NotFound("sequence " + std::to_string(s.id));
    if (now->uid != uid || now->epoch != epoch) continue;  // changed meanwhile: again
    KVM_RETURN_IF_ERROR(read);
    for (Impl::DiskRead& r : reads) {
      auto& ptrs = std::get<3>(r.lk) ? pin.v_ : pin.k_;
      BlockLoc& loc = now->blocks.at(r.lk);
      if (loc.slot < 0 &&
          impl_->PutHost(*now, r.lk, reinterpret_cast<const uint8_t*>(r.data.data())).ok())
        ++impl_->stats.promotions;  // best effort: a full host tier just serves from disk
      if (loc.slot < 0) {
        pin.copies_.emplace_back(r.data.begin(), r.data.end());
        ptrs[r.at] = pin.copies_.back().data();
        continue;
      }
      const uint32_t slot = static_cast<uint32_t>(loc.slot);
      pin.arena_->Share(slot);
      pin.slots_.push_back(slot);
      ptrs[r.at] = pin.arena_->slot(slot);
    }
    return pin;
  }
}

Result<PinnedBlocks> BlockStore::Impl::PinLocked(Seq& sq, uint32_t layer, uint32_t kv_head,
                                                 std::span<const uint64_t> blocks, bool keys_only,
                                                 std::vector<DiskRead>* defer) {
  Seq* q = &sq;
  Impl* impl_ = this;
  const size_t bb = q->block_bytes();
  const uint64_t full = q->length / q->B;
  PinnedBlocks pin;
  pin.arena_ = impl_->Arena(bb);
  for (uint64_t b : blocks) {
    if (b > full || (b == full && q->length % q->B == 0))
      return Status::OutOfRange("block " + std::to_string(b) + " is past the end (length " +
                                std::to_string(q->length) + ")");
    pin.rows_.push_back(static_cast<uint16_t>(std::min<uint64_t>(q->B, q->length - b * q->B)));
    for (bool v : {false, true}) {
      if (v && keys_only) break;
      auto& ptrs = v ? pin.v_ : pin.k_;
      if (b == full) {  // the partial block: a copy (appends change it)
        pin.copies_.emplace_back(bb, 0);
        std::memcpy(pin.copies_.back().data(), q->tail_row(layer, kv_head, v, 0),
                    size_t{pin.rows_.back()} * q->row_bytes());
        ptrs.push_back(pin.copies_.back().data());
        continue;
      }
      auto it = q->blocks.find({layer, kv_head, b, v});
      if (it == q->blocks.end()) return Status::Internal("block index missing");
      if (it->second.slot < 0 && defer) {  // on disk: the caller reads it
        defer->push_back({ptrs.size(), it->first, impl_->DiskKey(*q, it->first), {}});
        ptrs.push_back(nullptr);
        continue;
      }
      if (it->second.slot < 0) {  // on disk: promoted (or, with no host room, a copy)
        pin.copies_.emplace_back(bb);
        KVM_RETURN_IF_ERROR(impl_->LoadBlock(*q, it->first, pin.copies_.back().data()));
        if (it->second.slot < 0) {
          ptrs.push_back(pin.copies_.back().data());
          continue;
        }
        pin.copies_.pop_back();
      }
      const uint32_t slot = static_cast<uint32_t>(it->second.slot);
      pin.arena_->Share(slot);
      pin.slots_.push_back(slot);
      ptrs.push_back(pin.arena_->slot(slot));
    }
  }
  return pin;
}

Status BlockStore::MarkSelected(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                                std::span<const uint64_t> blocks) {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s));
  impl_->Mark(*q, layer, kv_head, blocks);
  q->last_access = impl_->Now();
  return Status::Ok();
}

Status BlockStore::SetValuesRead(const SeqRef& s) {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s));
  if (q->values_read) return Status::Ok();
  // Its V blocks move in the eviction order: out under the old rank, in under the new.
  std::vector<std::pair<const LocKey*, BlockLoc*>> resident;
  for (auto& [k, loc] : q->blocks)
    if (loc.slot >= 0 && std::get<3>(k)) resident.emplace_back(&k, &loc);
  auto& order = impl_->evict_order[q->block_bytes()];
  for (auto [k, loc] : resident) order.erase(impl_->Rank(*q, *k, *loc));
  q->values_read = true;
  for (auto [k, loc] : resident) order.insert(impl_->Rank(*q, *k, *loc));
  return Status::Ok();
}

Status BlockStore::Promote(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                           std::span<const uint64_t> blocks) {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s, layer, kv_head));
    // A plan's blocks were just selected: mark them first, so promoting one never evicts another.
    impl_->Mark(*q, layer, kv_head, blocks);
  }
  return Pin(s, layer, kv_head, blocks).status();  // promotes what is only on disk
}

Status BlockStore::WithSummaries(const SeqRef& s, uint32_t layer, uint32_t kv_head,
                                 const std::function<void(const sel::HeadSummaries&)>& fn) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(const Seq* q, impl_->Get(s, layer, kv_head));
  fn(q->sums[size_t{layer} * q->shape.kv_heads + kv_head]);
  return Status::Ok();
}

Status BlockStore::ScoreOnGpu(const SeqRef& s, uint32_t layer, uint32_t kv_head, uint64_t stored,
                              std::span<const uint8_t> pending, const float* q, float* logits) {
  // Under the lock: the key blocks the upload needs (from the device's synced row on) pinned.
  // The scoring and the upload run outside it; truncate and delete of the sequence wait for it.
  std::unique_lock<std::mutex> lk(impl_->mu);
  if (!impl_->gpu) return Status::Unavailable("no GPU tier: " + impl_->gpu_absent);
  KVM_ASSIGN_OR_RETURN(Seq * sq, impl_->Get(s, layer, kv_head));
  if (stored > sq->length)
    return Status::OutOfRange("score: " + std::to_string(stored) + " stored tokens asked, " +
                              std::to_string(sq->length) + " stored");
  sq->last_access = impl_->Now();
  const KeyLayout layout{sq->B, sq->shape.head_dim, sq->shape.dtype};
  const uint64_t uid = sq->uid, B = sq->B, end = (stored + B - 1) / B;
  const uint64_t first = std::min(impl_->gpu->Synced(uid, layer, kv_head), stored) / B;
  std::vector<uint64_t> ids;
  for (uint64_t b = first; b < end; ++b) ids.push_back(b);
  KVM_ASSIGN_OR_RETURN(PinnedBlocks pin,
                       impl_->PinLocked(*sq, layer, kv_head, ids, /*keys_only=*/true));
  ++sq->scoring;
  lk.unlock();
  if (impl_->opt.test_before_gpu_score) impl_->opt.test_before_gpu_score();
  const size_t bb = layout.block_bytes();
  auto fetch = [&](uint64_t from, uint64_t n, std::span<uint8_t> out) -> Status {
    if (from < first || from + n > end)  // the buffer was evicted meanwhile: the CPU scores
      return Status::Unavailable("GPU tier: its keys of this head changed during the call");
    for (uint64_t i = 0; i < n; ++i)
      std::memcpy(out.data() + i * bb, pin.k()[from - first + i], bb);
    return Status::Ok();
  };
  const Status st = impl_->gpu->Score(uid, layer, kv_head, layout, stored, pending, q,
                                      sq->shape.group_size(), logits, fetch);
  pin.Release();
  lk.lock();
  --sq->scoring;
  impl_->written.notify_all();
  return st;
}

Result<bool> BlockStore::InHostTier(const SeqRef& s, const BlockId& b, bool values) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(const Seq* q, impl_->Get(s));
  auto it = q->blocks.find({b.layer, b.kv_head, b.index, values});
  if (it == q->blocks.end())
    return b.index * q->B < q->length;  // the partial block lives in memory
  return it->second.slot >= 0;
}

Status BlockStore::Truncate(const SeqRef& s, uint64_t length) {
  std::unique_lock<std::mutex> lk(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->GetIdle(lk, s, /*exclusive=*/true));
  if (length > q->length) return Status::OutOfRange("truncate past the end");
  if (length == q->length) return Status::Ok();
  const uint32_t B = q->B, L = q->shape.layers, H = q->shape.kv_heads;
  const uint64_t keep_full = length / B, old_full = q->length / B;
  const bool durable = q->dur == Durability::kDurable;
  rocksdb::WriteBatch batch;
  // The block that becomes the partial tail (if the cut is inside a full block): its rows go back
  // to the tail.
  std::vector<uint8_t> tail = q->tail;
  const size_t rb = q->row_bytes();
  if (length % B && keep_full < old_full) {
    std::vector<uint8_t> blk(q->block_bytes());
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        for (int v = 0; v < 2; ++v) {
          KVM_RETURN_IF_ERROR(impl_->LoadBlock(*q, {l, h, keep_full, v != 0}, blk.data()));
          std::memcpy(tail.data() + (((size_t{l} * H + h) * 2 + v) * B) * rb, blk.data(),
                      blk.size());
        }
  }
  if (durable) {
    for (uint64_t p = length; p < q->length; ++p) batch.Delete(impl_->tail(), PosKey(s, p));
    for (uint64_t p = keep_full * B; p < length && keep_full < old_full;
         ++p) {  // re-create the tail records
      std::string rec;
      PutBe(&rec, q->tokens[p], 4);
      for (uint32_t l = 0; l < L; ++l)
        for (uint32_t h = 0; h < H; ++h)
          for (int v = 0; v < 2; ++v)
            rec.append(reinterpret_cast<const char*>(
                           tail.data() + ((((size_t{l} * H + h) * 2 + v) * B) + p % B) * rb),
                       rb);
      batch.Put(impl_->tail(), PosKey(s, p), Seal(rec));
    }
    for (uint64_t b = keep_full; b < old_full; ++b) batch.Delete(impl_->toks(), PosKey(s, b));
    batch.Put(impl_->meta(), SeqPrefix(s), EncodeMeta(*q, length));
  }
  std::vector<LocKey> drop;
  for (auto& [k, loc] : q->blocks)
    if (std::get<2>(k) >= keep_full) drop.push_back(k);
  std::vector<Addr> released;
  impl_->Unref(*q, keep_full, old_full, &batch, &released);
  for (const auto& k : drop)
    if (q->blocks[k].on_disk && !durable) batch.Delete(impl_->blocks(), impl_->DiskKey(*q, k));
  if (batch.Count() > 0) KVM_RETURN_IF_ERROR(impl_->Write(*q, &batch, /*frees=*/true));
  impl_->deleted_since_reclaim = true;
  impl_->Release(*q, released);
  for (const auto& k : drop) {
    auto it = q->blocks.find(k);
    impl_->FreeSlot(*q, it->first, it->second);
    q->blocks.erase(it);
  }
  if (impl_->gpu) impl_->gpu->Truncate(q->uid, length);
  q->chain.resize(std::min<size_t>(q->chain.size(), keep_full));
  impl_->usage[s.tenant].stored_bytes -= (q->length - length) * q->token_bytes();
  q->tail = std::move(tail);
  q->length = length;
  ++q->epoch;
  q->tokens.resize(length);
  for (auto& sm : q->sums) sm.Truncate(keep_full * B);  // then re-add the partial block's rows
  for (uint64_t p = keep_full * B; p < length; ++p)
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < H; ++h)
        q->Summarize(l, h, p, q->tail_row(l, h, false, static_cast<uint32_t>(p % B)));
  q->last_access = impl_->Now();
  return Status::Ok();
}

Status BlockStore::Delete(const SeqRef& s) {
  std::unique_lock<std::mutex> lk(impl_->mu);
  KVM_RETURN_IF_ERROR(impl_->GetIdle(lk, s, /*exclusive=*/true).status());
  return impl_->DeleteLocked(s);
}

Status BlockStore::Impl::DeleteLocked(const SeqRef& s) {
  Impl* impl_ = this;
  KVM_ASSIGN_OR_RETURN(Seq * q, Get(s));
  rocksdb::WriteBatch batch;
  std::vector<Addr> released;
  Unref(*q, 0, q->length / q->B, &batch, &released);
  std::vector<LocKey> keys;
  for (auto& [k, loc] : q->blocks) keys.push_back(k);
  for (const auto& k : keys) impl_->DropBlock(*q, k, &batch);
  if (q->dur == Durability::kDurable) {  // a cache sequence has no tail, token or meta records
    for (uint64_t p = (q->length / q->B) * q->B; p < q->length; ++p)
      batch.Delete(impl_->tail(), PosKey(s, p));
    for (uint64_t b = 0; b < q->length / q->B; ++b) batch.Delete(impl_->toks(), PosKey(s, b));
    batch.Delete(impl_->meta(), SeqPrefix(s));
  }
  if (batch.Count() > 0) {  // tombstones of records never written would pile up in the memtables
    KVM_RETURN_IF_ERROR(
        FromRocks(impl_->db->Write(rocksdb::WriteOptions(), &batch), "rocksdb delete"));
    impl_->stats.disk_bytes_written += batch.GetDataSize();
  }
  deleted_since_reclaim = true;
  Release(*q, released);
  if (gpu) gpu->Drop(q->uid);
  TenantUsage& use = usage[s.tenant];
  --use.sequences;
  use.stored_bytes -= q->length * q->token_bytes();
  by_uid.erase(q->uid);
  impl_->seqs.erase({s.tenant, s.id});
  return Status::Ok();
}

Result<uint64_t> BlockStore::PrefixLookup(const std::string& tenant, const ModelShape& shape,
                                          uint32_t block_size,
                                          std::span<const uint32_t> tokens) const {
  KVM_RETURN_IF_ERROR(shape.Validate());
  if (block_size == 0 || block_size > kMaxBlockSize)
    return Status::InvalidArgument("block_size out of range");
  std::lock_guard<std::mutex> l(impl_->mu);
  auto matched = [&](const ModelShape& sh, uint32_t B) {
    return impl_->StoredChain(LayoutSeed(tenant, sh, B), tokens, B).size() * B;
  };
  const uint64_t n = matched(shape, block_size);
  if (n == 0 && tokens.size() >= block_size) {  // stored under another model or layout? an error
    auto it = impl_->layouts.find(tenant);
    if (it != impl_->layouts.end())
      for (const auto& [fp, dt, B, layers, kvh, hd] : it->second) {
        const ModelShape other{layers, kvh, kvh, hd, static_cast<DType>(dt), fp};
        if (std::make_tuple(fp, dt, B, layers, kvh, hd) == Impl::Layout(shape, block_size))
          continue;
        if (tokens.size() >= B && matched(other, B) > 0)
          return Status::FailedPrecondition(
              "this prefix is stored for model fingerprint " + std::to_string(fp) + ", " +
              DTypeName(static_cast<DType>(dt)) + ", block size " + std::to_string(B) +
              "; the lookup used fingerprint " + std::to_string(shape.fingerprint) + ", " +
              DTypeName(shape.dtype) + ", block size " + std::to_string(block_size));
      }
  }
  return n;
}

Status BlockStore::Touch(const SeqRef& s) {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s));
  q->last_access = impl_->Now();
  return Status::Ok();
}

Result<std::vector<SeqRef>> BlockStore::ExpireLeases() {
  std::lock_guard<std::mutex> l(impl_->mu);
  const int64_t now = impl_->Now();
  std::vector<SeqRef> expired;
  for (auto& [k, q] : impl_->seqs)
    if (q.lease_ms > 0 && now - q.last_access > q.lease_ms && !q.writing && !q.scoring)
      expired.push_back(q.ref);
  for (const auto& r : expired) KVM_RETURN_IF_ERROR(impl_->DeleteLocked(r));
  return expired;
}

void BlockStore::OnHostMemory(std::function<void(void*, size_t)> fn) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->on_host_memory = std::move(fn);
  if (impl_->on_host_memory)
    for (const auto& [bytes, a] : impl_->arenas)
      if (a) impl_->on_host_memory(a->base(), a->bytes());
}

StoreStats BlockStore::Stats() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  StoreStats st = impl_->stats;
  st.host_slots_used = 0;
  for (auto& [bytes, a] : impl_->arenas) {
    st.host_slots_used += a->used();
    st.host_bytes += uint64_t{a->used()} * bytes;
    st.host_capacity_bytes += a->bytes();
    if (st.host_pinning.empty() || !a->pinned()) st.host_pinning = a->pinning();
  }
  if (st.host_pinning.empty()) st.host_pinning = "no arena yet (made at the first append)";
  st.sequences = impl_->seqs.size();
  st.disk_bytes = impl_->LiveDiskBytes();
  for (auto& [a, n] : impl_->refs) st.shared_blocks += n > 1;
  for (auto& [a, n] : impl_->cache_refs) st.shared_blocks += n > 1;
  if (impl_->gpu) {
    st.gpu = impl_->gpu->Stats();
    st.gpu_tier = st.gpu.device + ": " + std::to_string(st.gpu.used_bytes >> 20) + " of " +
                  std::to_string(st.gpu.capacity_bytes >> 20) + " MiB used";
  } else {
    st.gpu_tier = "absent: " + impl_->gpu_absent;
  }
  return st;
}

void BlockStore::SetQuotas(std::map<std::string, TenantQuota> quotas) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->quotas = std::move(quotas);
}

TenantUsage BlockStore::Usage(const std::string& tenant) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  auto it = impl_->usage.find(tenant);
  return it == impl_->usage.end() ? TenantUsage{} : it->second;
}

Status BlockStore::ReplaceRawBlockForTest(const SeqRef& s, const BlockId& b, bool values,
                                          const std::string& value) {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s));
  auto it = q->blocks.find({b.layer, b.kv_head, b.index, values});
  if (it == q->blocks.end()) return Status::NotFound("block");
  impl_->FreeSlot(*q, it->first, it->second);  // drop the host copy so the read goes to disk
  const std::string key = impl_->DiskKey(*q, {b.layer, b.kv_head, b.index, values});
  return FromRocks(impl_->db->Put(rocksdb::WriteOptions(), impl_->blocks(), key, value), "put");
}

Result<std::string> BlockStore::RawBlockForTest(const SeqRef& s, const BlockId& b, bool values) {
  std::lock_guard<std::mutex> l(impl_->mu);
  KVM_ASSIGN_OR_RETURN(Seq * q, impl_->Get(s));
  std::string v;
  const std::string key = impl_->DiskKey(*q, {b.layer, b.kv_head, b.index, values});
  KVM_RETURN_IF_ERROR(
      FromRocks(impl_->db->Get(rocksdb::ReadOptions(), impl_->blocks(), key, &v), "get"));
  return v;
}

}  // namespace kvm::store
