// The offline consistency check (`kvmanager --verify-store`): a store built through BlockStore
// (durable sequences with shared prefixes, partial tails, truncates, deletes; a cache sequence
// that spills) verifies clean with exact counts; then each kind of damage, done with raw RocksDB,
// is reported naming its sequence, block and record. ctest label `store`.
#include "kvmanager/store_verify.h"

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "kvmanager/block_store.h"
#include "store_format.h"

namespace kvm::store {
namespace {

const ModelShape kShape{2, 4, 2, 32, DType::kF16, 77};
constexpr uint32_t kB = 16;
constexpr size_t kRow = 32 * 2, kBlock = kB * kRow;
constexpr uint32_t kL = 2, kH = 2;
const std::string kTenant = "t";

std::string TempDir() {
  char tmpl[] = "/tmp/kvm_verify_XXXXXX";
  return mkdtemp(tmpl);
}

// A sequence's content: token ids and rows come from `gen` below position `shared`, from the
// sequence's own id past it (sequences that share a prefix share its token ids and its K/V).
struct Gen {
  uint64_t own = 0, gen = 0, shared = 0;
  uint64_t Of(uint64_t pos) const { return pos < shared ? gen : own; }
  uint32_t Token(uint64_t pos) const { return static_cast<uint32_t>(Of(pos) * 100000 + pos * 7); }
  uint8_t Byte(uint64_t pos, uint32_t l, uint32_t h, int v, size_t i) const {
    return static_cast<uint8_t>(Of(pos) * 131 + pos * 31 + l * 7 + h * 3 + v * 5 + i * 11);
  }
};

Result<uint64_t> AppendRange(BlockStore& s, const SeqRef& r, const Gen& g, uint64_t start,
                             uint64_t n) {
  std::vector<uint32_t> t;
  std::vector<uint8_t> p;
  for (uint64_t i = start; i < start + n; ++i) t.push_back(g.Token(i));
  for (uint32_t l = 0; l < kL; ++l)
    for (uint32_t h = 0; h < kH; ++h)
      for (int v = 0; v < 2; ++v)
        for (uint64_t pos = start; pos < start + n; ++pos)
          for (size_t i = 0; i < kRow; ++i) p.push_back(g.Byte(pos, l, h, v, i));
  return s.Append(r, start, t, p);
}

void Fill(BlockStore& s, const SeqRef& r, const Gen& g, uint64_t from, uint64_t to) {
  uint64_t p = from;
  while (p < to) {  // multi-token appends mixed with single-token (decode) appends
    const uint64_t n = std::min<uint64_t>(to - p, (p / 7) % 2 ? 1 : 13);
    auto a = AppendRange(s, r, g, p, n);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    p += n;
  }
}

const SeqRef kS1{kTenant, 1}, kS2{kTenant, 2}, kS3{kTenant, 3}, kS4{kTenant, 4}, kS5{kTenant, 5},
    kS6{kTenant, 6}, kOther{"other", 1};

// The store every test starts from (closed): what is left is
//   t/1: 50 tokens (3 full blocks, 2 tail rows)
//   t/2: 40 tokens, its first 2 blocks shared with t/1 (32 tokens of the same ids and K/V)
//   t/3: 70 tokens truncated to 37 (a cut inside block 2), then appended to 45
//   other/1: the ids and K/V of t/1 under another tenant (not shared: another seed)
// and gone: t/4 (48 tokens, deleted), t/5 (a 32-token copy of t/1's prefix, deleted: the shared
// records stay). t/6 is a cache sequence larger than the host tier: its spill records remain.
void Build(const std::string& dir) {
  StoreOptions o;
  o.dir = dir;
  o.gpu = false;
  o.host_capacity_bytes = 48 * kBlock;
  auto st = BlockStore::Open(o);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  BlockStore& s = **st;
  for (const SeqRef& r : {kS1, kS2, kS3, kS4, kS5, kOther})
    ASSERT_TRUE(s.Create(r, kShape, kB, Durability::kDurable).ok());
  ASSERT_TRUE(s.Create(kS6, kShape, kB, Durability::kCache).ok());
  Fill(s, kS1, {1, 1, 0}, 0, 50);
  Fill(s, kS2, {2, 1, 32}, 0, 40);
  Fill(s, kS3, {3, 3, 0}, 0, 70);
  ASSERT_TRUE(s.Truncate(kS3, 37).ok());
  Fill(s, kS3, {3, 3, 0}, 37, 45);
  Fill(s, kS4, {4, 4, 0}, 0, 48);
  ASSERT_TRUE(s.Delete(kS4).ok());
  Fill(s, kS5, {5, 1, 32}, 0, 32);
  ASSERT_TRUE(s.Delete(kS5).ok());
  Fill(s, kOther, {1, 1, 0}, 0, 50);
  Fill(s, kS6, {6, 6, 0}, 0, 200);
  EXPECT_GT(s.Stats().spills, 0u);
}

// The content key of (block, layer, head, K|V) of a sequence whose token ids come from g.
std::string ContentKeyOf(const SeqRef& r, const Gen& g, uint64_t block, uint32_t l, uint32_t h,
                         bool v) {
  Addr chain{};
  for (uint64_t b = 0; b <= block; ++b) {
    std::vector<uint32_t> ids;
    for (uint64_t p = b * kB; p < (b + 1) * kB; ++p) ids.push_back(g.Token(p));
    chain = ChainNext(chain, ids.data(), kB);
  }
  return ContentKey(BlockAddr(LayoutSeed(r.tenant, kShape, kB), chain, l, h), v);
}

// Runs fn on the store's RocksDB (column families: default, meta, blocks, tail, tokens).
void Raw(const std::string& dir,
         const std::function<void(rocksdb::DB*, std::vector<rocksdb::ColumnFamilyHandle*>&)>& fn) {
  rocksdb::DBOptions dbo;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* n : kColumnFamilies) cfs.emplace_back(n, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> h;
  rocksdb::DB* db = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(dbo, dir, cfs, &h, &db).ok());
  fn(db, h);
  for (auto* c : h) ASSERT_TRUE(db->DestroyColumnFamilyHandle(c).ok());
  delete db;
}

std::string Joined(const VerifyReport& r) {
  std::string s;
  for (const auto& p : r.problems) s += p + "\n";
  return s;
}

class StoreVerifyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    Build(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  VerifyReport Verify() {
    auto r = VerifyStore(dir_);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : VerifyReport{};
  }
  // Exactly one problem, containing each of `parts`.
  void ExpectOneProblem(const std::vector<std::string>& parts) {
    const VerifyReport r = Verify();
    ASSERT_EQ(r.problems.size(), 1u) << Joined(r);
    for (const auto& p : parts) EXPECT_NE(r.problems[0].find(p), std::string::npos) << Joined(r);
  }
  std::string dir_;
};

TEST_F(StoreVerifyTest, CleanStoreVerifiesWithExactCounts) {
  const VerifyReport r = Verify();
  EXPECT_TRUE(r.ok()) << Joined(r);
  EXPECT_EQ(r.sequences, 4u);               // t/1, t/2, t/3, other/1
  EXPECT_EQ(r.tokens, 50u + 40 + 45 + 50);  // their lengths
  EXPECT_EQ(r.full_blocks, (3u + 2 + 2 + 3) * kL * kH);
  EXPECT_EQ(r.shared_records, 2u * kL * kH * 2);  // t/1 and t/2's two prefix blocks, K and V
  EXPECT_EQ(r.block_records, (3u + 0 + 2 + 3) * kL * kH * 2);
  EXPECT_EQ(r.tokens_records, 3u + 2 + 2 + 3);
  EXPECT_EQ(r.tail_records, 2u + 8 + 13 + 2);
  EXPECT_GT(r.spill_records, 0u);  // t/6's, allowed
  EXPECT_GT(r.bytes, r.block_records * kBlock);
  EXPECT_NE(r.Summary().find("4 sequences (185 tokens)"), std::string::npos) << r.Summary();
  // The store still opens and serves what the check saw.
  StoreOptions o;
  o.dir = dir_;
  o.gpu = false;
  auto st = BlockStore::Open(o);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(*(*st)->Length(kS3), 45u);
}

TEST_F(StoreVerifyTest, MissingTokensRecordIsReported) {
  Raw(dir_, [](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), cf[4], PosKey(kS1, 1)).ok());
  });
  const VerifyReport r = Verify();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.problems[0], "sequence t/1 block 1: tokens record missing") << Joined(r);
  EXPECT_EQ(r.problems[1],
            "sequence t/1 block 2: not checked (the content chain needs block "
            "1's token ids)")
      << Joined(r);
  // Block 2's records, which only t/1 references, cannot be addressed: reported as orphans that
  // say why. Block 1's are still referenced by t/2.
  EXPECT_EQ(r.problems.size(), 2u + kL * kH * 2) << Joined(r);
  for (size_t i = 2; i < r.problems.size(); ++i)
    EXPECT_NE(r.problems[i].find("orphaned"), std::string::npos) << Joined(r);
}

TEST_F(StoreVerifyTest, FlippedByteOfABlockRecordIsReported) {
  const std::string key = ContentKeyOf(kS1, {1, 1, 0}, 2, 1, 0, true);
  Raw(dir_, [&](rocksdb::DB* db, auto& cf) {
    std::string v;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), cf[2], key, &v).ok());
    v[100] ^= 0x10;
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), cf[2], key, v).ok());
  });
  ExpectOneProblem(
      {"sequence t/1 block 2 layer 1 head 0 V: content record C", "checksum mismatch"});
}

TEST_F(StoreVerifyTest, MissingBlockRecordIsReported) {
  Raw(dir_, [](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(
        db->Delete(rocksdb::WriteOptions(), cf[2], ContentKeyOf(kS3, {3, 3, 0}, 1, 0, 1, false))
            .ok());
  });
  ExpectOneProblem({"sequence t/3 block 1 layer 0 head 1 K: content record C", "missing"});
}

TEST_F(StoreVerifyTest, TruncatedBlockRecordIsReported) {
  const std::string key = ContentKeyOf(kOther, {1, 1, 0}, 0, 0, 0, false);
  Raw(dir_, [&](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(
        db->Put(rocksdb::WriteOptions(), cf[2], key, Seal(std::string(kBlock - kRow, 'x'))).ok());
  });
  ExpectOneProblem({"sequence other/1 block 0 layer 0 head 0 K", "holds 960 bytes, expected 1024"});
}

TEST_F(StoreVerifyTest, OrphanContentRecordIsReported) {
  const std::string key = ContentKey(Addr{1, 2}, false);
  Raw(dir_, [&](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), cf[2], key, Seal(std::string(kBlock, 'x'))).ok());
  });
  ExpectOneProblem({"content record C00000000000000010000000000000002K: orphaned"});
}

TEST_F(StoreVerifyTest, MissingTailRecordIsReported) {
  Raw(dir_, [](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), cf[3], PosKey(kS3, 40)).ok());
  });
  ExpectOneProblem({"sequence t/3 position 40: tail record missing"});
}

TEST_F(StoreVerifyTest, TailRecordOfTheWrongSizeIsReported) {
  Raw(dir_, [](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(
        db->Put(rocksdb::WriteOptions(), cf[3], PosKey(kS2, 35), Seal(std::string(10, 'x'))).ok());
  });
  ExpectOneProblem({"sequence t/2 position 35: tail record holds 10 bytes, expected 516"});
}

TEST_F(StoreVerifyTest, RecordsPastTheLengthAreReported) {
  Raw(dir_, [](rocksdb::DB* db, auto& cf) {
    ASSERT_TRUE(
        db->Put(rocksdb::WriteOptions(), cf[3], PosKey(kS1, 50), Seal(std::string(516, 'x'))).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), cf[3], PosKey(kS1, 20), Seal("x")).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), cf[4], PosKey(kS3, 2), Seal("x")).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), cf[4], PosKey({kTenant, 9}, 0), Seal("x")).ok());
  });
  const VerifyReport r = Verify();
  ASSERT_EQ(r.problems.size(), 4u) << Joined(r);
  EXPECT_EQ(r.problems[0],
            "tail record of sequence t/1 position 20: inside a full block (stale: "
            "the block record replaced it)");
  EXPECT_EQ(r.problems[1], "tail record of sequence t/1 position 50: beyond the length 50");
  EXPECT_EQ(r.problems[2],
            "tokens record of sequence t/3 block 2: beyond the length 45 (2 full blocks)");
  EXPECT_EQ(r.problems[3],
            "tokens record of sequence t/9 block 0: no such sequence (no metadata "
            "record)");
}

TEST_F(StoreVerifyTest, CorruptMetadataIsReported) {
  Raw(dir_, [](rocksdb::DB* db, auto& cf) {
    std::string v;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), cf[1], SeqPrefix(kS2), &v).ok());
    v[3] ^= 1;
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), cf[1], SeqPrefix(kS2), v).ok());
  });
  const VerifyReport r = Verify();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.problems[0], "sequence t/2: metadata record: sequence metadata: checksum mismatch");
  // Its 8 tail and 2 tokens records cannot be checked; its blocks are all shared with t/1.
  EXPECT_EQ(r.problems.size(), 1u + 8 + 2) << Joined(r);
  for (size_t i = 1; i < r.problems.size(); ++i)
    EXPECT_NE(r.problems[i].find("metadata record is unreadable"), std::string::npos) << Joined(r);
}

TEST_F(StoreVerifyTest, StoreInUseOrAbsentIsAnError) {
  StoreOptions o;
  o.dir = dir_;
  o.gpu = false;
  {
    auto st = BlockStore::Open(o);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    auto r = VerifyStore(dir_);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(r.status().IsFailedPrecondition()) << r.status().ToString();
    EXPECT_NE(r.status().message().find("in use"), std::string::npos);
  }
  EXPECT_TRUE(VerifyStore(dir_).ok());  // closed again
  EXPECT_FALSE(VerifyStore(dir_ + "/nothing-here").ok());
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/nothing-here"));  // read-only: nothing created
}

}  // namespace
}  // namespace kvm::store
