// Internal to the block store: its on-disk format (DESIGN.md §5), shared by BlockStore and the
// offline consistency check (store_verify). RocksDB column families: meta (one sealed record per
// durable sequence, keyed by SeqPrefix), blocks (a durable full block's K or V under its content
// address "C…", a cache sequence's spilled block under "S…"), tail (one sealed record per token of
// a durable sequence's partial block: token id, then [layers][kv_heads][K,V] rows), tokens (the
// token ids of each full block, by block index). Every value ends with an 8-byte FNV-1a checksum.
#pragma once

#include <cstdint>
#include <string>

#include "kvmanager/block_store.h"
#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::store {

// The column families, in the order BlockStore opens them.
inline constexpr const char* kColumnFamilies[] = {"default", "meta", "blocks", "tail", "tokens"};

inline void PutBe(std::string* s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
inline uint64_t GetBe(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
inline uint64_t Checksum(const char* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 1099511628211ull;
  return h;
}
inline std::string Seal(std::string v) {
  PutBe(&v, Checksum(v.data(), v.size()), 8);
  return v;
}
// The payload of a sealed value, or Corruption.
inline Result<std::string> Unseal(const std::string& v, const std::string& what) {
  if (v.size() < 8 || GetBe(v.data() + v.size() - 8, 8) != Checksum(v.data(), v.size() - 8))
    return Status::Corruption(what + ": checksum mismatch");
  return v.substr(0, v.size() - 8);
}
inline std::string SeqPrefix(const SeqRef& s) {
  std::string k = s.tenant;
  k.push_back('\0');
  PutBe(&k, s.id, 8);
  return k;
}
// A cache sequence's spilled block (per sequence; removed at open: cache sequences do not survive).
inline std::string BlockKey(const SeqRef& s, const BlockId& b, bool values) {
  std::string k = "S" + SeqPrefix(s);
  PutBe(&k, b.layer, 4);
  PutBe(&k, b.kv_head, 4);
  PutBe(&k, b.index, 8);
  k.push_back(values ? 'V' : 'K');
  return k;
}
// Content address of a full block (DESIGN.md §5): a hash chain over the token ids, seeded with
// (tenant, fingerprint, dtype, block size) and mixed with (layer, KV head). 128 bits.
struct Addr {
  uint64_t a = 0, b = 0;
  bool operator<(const Addr& o) const { return a < o.a || (a == o.a && b < o.b); }
  bool operator==(const Addr& o) const = default;
};
inline uint64_t Mix(uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline Addr LayoutSeed(const std::string& tenant, const ModelShape& shape, uint32_t B) {
  Addr s{0x6a09e667f3bcc908ull, 0xbb67ae8584caa73bull};
  for (char c : tenant)
    s = {Mix(s.a ^ static_cast<uint8_t>(c)),
         Mix(s.b + static_cast<uint8_t>(c) * 0x9e3779b97f4a7c15ull)};
  for (uint64_t v : {shape.fingerprint, uint64_t(shape.dtype), uint64_t{B}, uint64_t{shape.layers},
                     uint64_t{shape.kv_heads}, uint64_t{shape.head_dim}})
    s = {Mix(s.a ^ v), Mix(s.b + v * 0x9e3779b97f4a7c15ull)};
  return s;
}
// The chain value after block b, from the one after block b − 1 (Addr{} before block 0).
inline Addr ChainNext(Addr prev, const uint32_t* tokens, uint32_t B) {
  for (uint32_t i = 0; i < B; ++i)
    prev = {Mix(prev.a ^ (tokens[i] + 0x1000193ull)),
            Mix(prev.b + (tokens[i] + 1ull) * 0xc2b2ae3d27d4eb4full)};
  return prev;
}
inline Addr BlockAddr(const Addr& seed, const Addr& chain, uint32_t layer, uint32_t kv_head) {
  const uint64_t lh = (uint64_t{layer} << 32) | kv_head;
  return {Mix(seed.a ^ chain.a ^ Mix(lh)), Mix(seed.b + chain.b + Mix(lh ^ 0x5555555555555555ull))};
}
inline std::string ContentKey(const Addr& a, bool values) {
  std::string k = "C";
  PutBe(&k, a.a, 8);
  PutBe(&k, a.b, 8);
  k.push_back(values ? 'V' : 'K');
  return k;
}

inline std::string PosKey(const SeqRef& s, uint64_t pos) {
  std::string k = SeqPrefix(s);
  PutBe(&k, pos, 8);
  return k;
}

// A durable sequence's metadata record (meta column family).
struct SeqMeta {
  ModelShape shape;
  uint32_t block_size = 0;
  Durability durability = Durability::kDurable;
  uint64_t length = 0;
  int64_t lease_ms = 0;
};
inline std::string EncodeMeta(const SeqMeta& q) {
  std::string m;
  PutBe(&m, q.shape.layers, 4);
  PutBe(&m, q.shape.q_heads, 4);
  PutBe(&m, q.shape.kv_heads, 4);
  PutBe(&m, q.shape.head_dim, 4);
  PutBe(&m, static_cast<uint32_t>(q.shape.dtype), 4);
  PutBe(&m, q.shape.fingerprint, 8);
  PutBe(&m, q.block_size, 4);
  PutBe(&m, static_cast<uint8_t>(q.durability), 1);
  PutBe(&m, q.length, 8);
  PutBe(&m, static_cast<uint64_t>(q.lease_ms), 8);
  return Seal(m);
}
// The metadata record's key back to its sequence, or Corruption.
inline Result<SeqRef> DecodeSeqPrefix(const std::string& key) {
  const size_t z = key.find('\0');
  if (z == std::string::npos || key.size() != z + 9)
    return Status::Corruption("store: bad metadata key");
  return SeqRef{key.substr(0, z), GetBe(key.data() + z + 1, 8)};
}
// A sealed metadata record, checked (checksum, size, shape), or Corruption / InvalidArgument.
inline Result<SeqMeta> DecodeMeta(const std::string& sealed) {
  KVM_ASSIGN_OR_RETURN(std::string m, Unseal(sealed, "sequence metadata"));
  if (m.size() != 49) return Status::Corruption("store: bad metadata size");
  SeqMeta q;
  q.shape = ModelShape{
      static_cast<uint32_t>(GetBe(m.data(), 4)),     static_cast<uint32_t>(GetBe(m.data() + 4, 4)),
      static_cast<uint32_t>(GetBe(m.data() + 8, 4)), static_cast<uint32_t>(GetBe(m.data() + 12, 4)),
      static_cast<DType>(GetBe(m.data() + 16, 4)),   GetBe(m.data() + 20, 8)};
  q.block_size = static_cast<uint32_t>(GetBe(m.data() + 28, 4));
  q.durability = static_cast<Durability>(GetBe(m.data() + 32, 1));
  q.length = GetBe(m.data() + 33, 8);
  q.lease_ms = static_cast<int64_t>(GetBe(m.data() + 41, 8));
  KVM_RETURN_IF_ERROR(q.shape.Validate());
  return q;
}

}  // namespace kvm::store
