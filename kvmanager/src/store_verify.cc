#include "kvmanager/store_verify.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>

#include <cstdarg>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include "rocks_status.h"
#include "store_format.h"

namespace kvm::store {
namespace {

std::string Hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string o;
  for (unsigned char c : s) {
    o.push_back(d[c >> 4]);
    o.push_back(d[c & 15]);
  }
  return o;
}

// "tenant/id", the tenant's unprintable bytes escaped.
std::string Name(const SeqRef& s) {
  std::string o;
  for (unsigned char c : s.tenant) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      o.push_back(static_cast<char>(c));
    } else {
      o += "\\x" + Hex(std::string(1, static_cast<char>(c)));
    }
  }
  return o + "/" + std::to_string(s.id);
}

// A content record ("C" + 16 bytes + K|V) as printed: C<hex>K.
std::string ContentName(const std::string& key) {
  if (key.size() != 18) return Hex(key);
  return "C" + Hex(key.substr(1, 16)) + key.back();
}

// A tail or tokens key (SeqPrefix + 8-byte position) back to (sequence, position).
bool DecodePosKey(const std::string& key, SeqRef* s, uint64_t* pos) {
  if (key.size() < 8) return false;
  auto r = DecodeSeqPrefix(key.substr(0, key.size() - 8));
  if (!r.ok()) return false;
  *s = *r;
  *pos = GetBe(key.data() + key.size() - 8, 8);
  return true;
}

struct SeqKey {
  std::string tenant;
  uint64_t id;
  bool operator<(const SeqKey& o) const { return std::tie(tenant, id) < std::tie(o.tenant, o.id); }
};

// Takes the store's RocksDB LOCK (what the service holds while it runs) for the check's duration.
class DirLock {
 public:
  DirLock(rocksdb::Env* env, std::string path) : env_(env), path_(std::move(path)) {}
  ~DirLock() {
    if (lock_) env_->UnlockFile(lock_).PermitUncheckedError();
  }
  Status Acquire() {
    if (!env_->FileExists(path_).ok()) return Status::Ok();  // the open says what is missing
    const rocksdb::Status s = env_->LockFile(path_, &lock_);
    if (!s.ok()) {
      lock_ = nullptr;
      return Status::FailedPrecondition("the store is in use (a running kvmanager holds " + path_ +
                                        "): stop the service before checking it (" + s.ToString() +
                                        ")");
    }
    return Status::Ok();
  }

 private:
  rocksdb::Env* env_;
  std::string path_;
  rocksdb::FileLock* lock_ = nullptr;
};

// The check writes nothing into the directory, RocksDB's LOG included.
class NoLog : public rocksdb::Logger {
 public:
  using rocksdb::Logger::Logv;
  void Logv(const char*, va_list) override {}
};

class Verifier {
 public:
  Verifier(rocksdb::DB* db, const std::vector<rocksdb::ColumnFamilyHandle*>& cf)
      : db_(db), meta_(cf[1]), blocks_(cf[2]), tail_(cf[3]), toks_(cf[4]) {}

  VerifyReport Run() {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), meta_));
    for (it->SeekToFirst(); it->Valid(); it->Next()) Sequence(it->key().ToString(), it->value());
    Problem(it->status(), "metadata column family");
    ExtraPositionRecords(tail_, "tail");
    ExtraPositionRecords(toks_, "tokens");
    BlockRecords();
    for (const auto& [key, n] : refs_)
      if (n > 1) ++r_.shared_records;
    return std::move(r_);
  }

 private:
  struct Known {
    uint64_t length = 0, full = 0, block_size = 1;
  };

  void Add(std::string p) { r_.problems.push_back(std::move(p)); }
  void Problem(const rocksdb::Status& s, const std::string& what) {
    if (!s.ok()) Add(what + ": read failed: " + s.ToString());
  }
  // The value under `key`, or nullopt with the problem reported (missing or unreadable).
  std::optional<std::string> Get(rocksdb::ColumnFamilyHandle* cf, const std::string& key,
                                 const std::string& what) {
    std::string v;
    const rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf, key, &v);
    if (s.IsNotFound()) {
      Add(what + " missing");
      return std::nullopt;
    }
    if (!s.ok()) {
      Add(what + ": read failed: " + s.ToString());
      return std::nullopt;
    }
    r_.bytes += v.size();
    return v;
  }
  // The payload of a sealed value of `size` bytes, or nullopt with the problem reported.
  std::optional<std::string> Payload(const std::string& sealed, size_t size,
                                     const std::string& what) {
    auto p = Unseal(sealed, what);
    if (!p.ok()) {
      Add(p.status().message());
      return std::nullopt;
    }
    if (p->size() != size) {
      Add(what + " holds " + std::to_string(p->size()) + " bytes, expected " +
          std::to_string(size));
      return std::nullopt;
    }
    return std::move(*p);
  }

  void Sequence(const std::string& key, const rocksdb::Slice& value) {
    ++r_.sequences;
    r_.bytes += value.size();
    auto ref = DecodeSeqPrefix(key);
    if (!ref.ok()) {
      Add("metadata record " + Hex(key) + ": not a sequence key");
      return;
    }
    const std::string name = "sequence " + Name(*ref);
    auto meta = DecodeMeta(value.ToString());
    if (!meta.ok()) {
      Add(name + ": metadata record: " + meta.status().message());
      unreadable_.insert({ref->tenant, ref->id});
      return;
    }
    const SeqMeta& m = *meta;
    if (m.durability != Durability::kDurable)
      Add(name + ": metadata record: durability " + std::to_string(int(m.durability)) +
          " (only durable sequences have one)");
    if (m.block_size == 0 || m.block_size > kMaxBlockSize) {
      Add(name + ": metadata record: block size " + std::to_string(m.block_size) + " out of range");
      return;
    }
    const uint32_t B = m.block_size, L = m.shape.layers, H = m.shape.kv_heads;
    const size_t row = size_t{m.shape.head_dim} * DTypeSize(m.shape.dtype);
    const uint64_t full = m.length / B;
    known_[{ref->tenant, ref->id}] = Known{m.length, full, B};
    r_.tokens += m.length;
    // Full blocks: token ids, the content chain, the K and V records they address.
    const Addr seed = LayoutSeed(ref->tenant, m.shape, B);
    Addr chain{};
    for (uint64_t b = 0; b < full; ++b) {
      const std::string bname = name + " block " + std::to_string(b);
      auto raw = Get(toks_, PosKey(*ref, b), bname + ": tokens record");
      ++r_.tokens_records;
      std::optional<std::string> ids;
      if (raw) ids = Payload(*raw, 4 * size_t{B}, bname + ": tokens record");
      if (!ids) {
        if (b + 1 < full)
          Add(name +
              (b + 2 == full
                   ? " block " + std::to_string(b + 1)
                   : " blocks " + std::to_string(b + 1) + ".." + std::to_string(full - 1)) +
              ": not checked (the content chain needs block " + std::to_string(b) +
              "'s token ids)");
        broken_chain_ = true;
        return Tail(*ref, name, m, full * B, row);
      }
      std::vector<uint32_t> t(B);
      for (uint32_t i = 0; i < B; ++i) t[i] = static_cast<uint32_t>(GetBe(ids->data() + 4 * i, 4));
      chain = ChainNext(chain, t.data(), B);
      for (uint32_t l = 0; l < L; ++l)
        for (uint32_t h = 0; h < H; ++h) {
          ++r_.full_blocks;
          const Addr a = BlockAddr(seed, chain, l, h);
          for (bool v : {false, true}) {
            const std::string ck = ContentKey(a, v);
            if (refs_[ck]++) continue;  // shared: checked at its first reference
            ++r_.block_records;
            const std::string what = bname + " layer " + std::to_string(l) + " head " +
                                     std::to_string(h) + (v ? " V" : " K") + ": content record " +
                                     ContentName(ck);
            if (auto blk = Get(blocks_, ck, what)) Payload(*blk, row * B, what);
          }
        }
    }
    Tail(*ref, name, m, full * B, row);
  }

  void Tail(const SeqRef& ref, const std::string& name, const SeqMeta& m, uint64_t from,
            size_t row) {
    const size_t need = 4 + size_t{m.shape.layers} * m.shape.kv_heads * 2 * row;
    for (uint64_t p = from; p < m.length; ++p) {
      const std::string what = name + " position " + std::to_string(p) + ": tail record";
      ++r_.tail_records;
      if (auto raw = Get(tail_, PosKey(ref, p), what)) Payload(*raw, need, what);
    }
  }

  // Tail / tokens records outside what the sequences' lengths cover.
  void ExtraPositionRecords(rocksdb::ColumnFamilyHandle* cf, const std::string& kind) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      const std::string key = it->key().ToString();
      SeqRef s;
      uint64_t pos = 0;
      if (!DecodePosKey(key, &s, &pos)) {
        Add(kind + " record " + Hex(key) + ": not a (sequence, position) key");
        continue;
      }
      const std::string at = kind + " record of sequence " + Name(s) +
                             (cf == tail_ ? " position " : " block ") + std::to_string(pos);
      auto k = known_.find({s.tenant, s.id});
      if (k == known_.end()) {
        Add(at + (unreadable_.count({s.tenant, s.id})
                      ? ": not checked (the sequence's metadata record is unreadable, above)"
                      : ": no such sequence (no metadata record)"));
        continue;
      }
      const Known& q = k->second;
      if (cf == tail_) {
        if (pos >= q.length)
          Add(at + ": beyond the length " + std::to_string(q.length));
        else if (pos < q.full * q.block_size)
          Add(at + ": inside a full block (stale: the block record replaced it)");
      } else if (pos >= q.full) {
        Add(at + ": beyond the length " + std::to_string(q.length) + " (" + std::to_string(q.full) +
            " full blocks)");
      }
    }
    Problem(it->status(), kind + " column family");
  }

  void BlockRecords() {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), blocks_));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      const std::string key = it->key().ToString();
      if (!key.empty() && key[0] == 'S') {
        ++r_.spill_records;  // a cache sequence's spilled block: removed at open
        continue;
      }
      if (key.size() != 18 || key[0] != 'C' || (key[17] != 'K' && key[17] != 'V')) {
        Add("blocks record " + Hex(key) + ": not a content or spill key");
        continue;
      }
      if (!refs_.count(key))
        Add("content record " + ContentName(key) + ": orphaned (no sequence references it)" +
            (broken_chain_ || !unreadable_.empty()
                 ? "; or referenced by a block the check could not address (above)"
                 : ""));
    }
    Problem(it->status(), "blocks column family");
  }

  rocksdb::DB* db_;
  rocksdb::ColumnFamilyHandle *meta_, *blocks_, *tail_, *toks_;
  VerifyReport r_;
  std::map<SeqKey, Known> known_;
  std::set<SeqKey> unreadable_;           // metadata records that do not decode
  std::map<std::string, uint32_t> refs_;  // content key → references from the sequences
  bool broken_chain_ = false;
};

}  // namespace

std::string VerifyReport::Summary() const {
  return std::to_string(sequences) + " sequences (" + std::to_string(tokens) + " tokens), " +
         std::to_string(full_blocks) + " full blocks (" + std::to_string(block_records) +
         " block records, " + std::to_string(shared_records) + " shared), " +
         std::to_string(tokens_records) + " tokens records, " + std::to_string(tail_records) +
         " tail records, " + std::to_string(spill_records) + " spill records, " +
         std::to_string(bytes) + " bytes checked";
}

Result<VerifyReport> VerifyStore(const std::string& dir, rocksdb::Env* env) {
  if (dir.empty()) return Status::InvalidArgument("verify-store: the directory is empty");
  rocksdb::Env* e = env ? env : rocksdb::Env::Default();
  DirLock lock(e, dir + "/LOCK");
  KVM_RETURN_IF_ERROR(lock.Acquire());
  rocksdb::DBOptions dbo;
  dbo.env = e;
  dbo.info_log = std::make_shared<NoLog>();
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* n : kColumnFamilies) cfs.emplace_back(n, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  KVM_RETURN_IF_ERROR(FromRocks(rocksdb::DB::OpenForReadOnly(dbo, dir, cfs, &handles, &raw),
                                "open " + dir + " read-only"));
  std::unique_ptr<rocksdb::DB> db(raw);
  VerifyReport r = Verifier(db.get(), handles).Run();
  for (auto* h : handles) db->DestroyColumnFamilyHandle(h).PermitUncheckedError();
  return r;
}

}  // namespace kvm::store
