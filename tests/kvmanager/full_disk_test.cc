// A full disk under the block store (DESIGN.md §5: "a full disk is NoSpace to the client"):
//   - deterministic and unprivileged: a RocksDB file system (StoreOptions::env) that, after N more
//     bytes, writes what still fits of a write (a torn WAL record) and answers "no space";
//   - a real tiny tmpfs, mounted when running as root where mounting works (Skipped elsewhere).
// Either way durable appends fail with NoSpace, what was acknowledged before reads back byte for
// byte (before and after the space comes back and the store reopens), appends are accepted again,
// and the offline check (VerifyStore) passes. ctest label `store`.
#include <gtest/gtest.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvmanager/block_store.h"
#include "kvmanager/store_verify.h"

namespace kvm::store {
namespace {

const ModelShape kShape{2, 4, 2, 32, DType::kF16, 91};
constexpr uint32_t kB = 16;
constexpr size_t kRow = 32 * 2, kBlock = kB * kRow;
constexpr uint64_t kSeqs = 3;

std::string TempDir() {
  char tmpl[] = "/tmp/kvm_fulldisk_XXXXXX";
  return mkdtemp(tmpl);
}

// Content of sequence `seq`: token ids and rows by (seq, position); sequences 1 and 2 share their
// first 32 tokens (and so their first two blocks' records).
uint64_t Gen(uint64_t seq, uint64_t pos) { return seq == 2 && pos < 32 ? 1 : seq; }
uint32_t Token(uint64_t seq, uint64_t pos) {
  return static_cast<uint32_t>(Gen(seq, pos) * 1000003 + pos * 7);
}
uint8_t Byte(uint64_t seq, uint64_t pos, uint32_t l, uint32_t h, int v, size_t i) {
  return static_cast<uint8_t>(Gen(seq, pos) * 131 + pos * 31 + l * 7 + h * 3 + v * 5 + i * 13);
}

Result<uint64_t> AppendRange(BlockStore& s, uint64_t seq, uint64_t start, uint64_t n) {
  std::vector<uint32_t> t;
  std::vector<uint8_t> p;
  for (uint64_t i = start; i < start + n; ++i) t.push_back(Token(seq, i));
  for (uint32_t l = 0; l < kShape.layers; ++l)
    for (uint32_t h = 0; h < kShape.kv_heads; ++h)
      for (int v = 0; v < 2; ++v)
        for (uint64_t pos = start; pos < start + n; ++pos)
          for (size_t i = 0; i < kRow; ++i) p.push_back(Byte(seq, pos, l, h, v, i));
  return s.Append({"t", seq}, start, t, p);
}

// Every row of [0, length) byte-identical to the generator; the token ids too (a retry of the
// whole range with the same ids is accepted, one with another id at the last position is not).
void ExpectContent(BlockStore& s, uint64_t seq, uint64_t length) {
  std::vector<uint8_t> buf(kBlock);
  for (uint64_t b = 0; b * kB < length; ++b)
    for (uint32_t l = 0; l < kShape.layers; ++l)
      for (uint32_t h = 0; h < kShape.kv_heads; ++h)
        for (int v = 0; v < 2; ++v) {
          const Status st = s.ReadBlock({"t", seq}, {l, h, b}, v != 0, buf);
          ASSERT_TRUE(st.ok()) << "seq " << seq << " block " << b << ": " << st.ToString();
          for (uint32_t r = 0; r < kB && b * kB + r < length; ++r)
            for (size_t i = 0; i < kRow; ++i)
              ASSERT_EQ(buf[r * kRow + i], Byte(seq, b * kB + r, l, h, v, i))
                  << "seq " << seq << " pos " << b * kB + r << " l " << l << " h " << h << " v "
                  << v;
        }
  if (length == 0) return;
  std::vector<uint32_t> ids;
  for (uint64_t p = 0; p < length; ++p) ids.push_back(Token(seq, p));
  const std::vector<uint8_t> payload(size_t{kShape.layers} * kShape.kv_heads * 2 * length * kRow);
  auto same = s.Append({"t", seq}, 0, ids, payload);
  ASSERT_TRUE(same.ok()) << same.status().ToString();
  ids.back() ^= 1;
  EXPECT_TRUE(s.Append({"t", seq}, 0, ids, payload).status().IsFailedPrecondition());
}

// A file system that, once armed with a budget, lets that many more bytes be written, then writes
// what still fits of the next write and answers "no space" (a disk that fills mid-record).
class FillingFs : public rocksdb::FileSystemWrapper {
 public:
  FillingFs() : FileSystemWrapper(rocksdb::FileSystem::Default()) {}
  const char* Name() const override { return "FillingFs"; }
  void Arm(int64_t budget) { left_ = budget; }
  void Disarm() { left_ = -1; }
  uint64_t refused() const { return refused_; }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* d) override {
    return Wrap(target()->NewWritableFile(f, o, r, d), r);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r,
                                       rocksdb::IODebugContext* d) override {
    return Wrap(target()->ReopenWritableFile(f, o, r, d), r);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& f, const std::string& old,
                                      const rocksdb::FileOptions& o,
                                      std::unique_ptr<rocksdb::FSWritableFile>* r,
                                      rocksdb::IODebugContext* d) override {
    return Wrap(target()->ReuseWritableFile(f, old, o, r, d), r);
  }

 private:
  class File : public rocksdb::FSWritableFileOwnerWrapper {
   public:
    File(std::unique_ptr<rocksdb::FSWritableFile> t, FillingFs* fs)
        : FSWritableFileOwnerWrapper(std::move(t)), fs_(fs) {}
    rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                             rocksdb::IODebugContext* d) override {
      const size_t fits = fs_->Take(data.size());
      if (fits > 0) {
        auto s = target()->Append(rocksdb::Slice(data.data(), fits), o, d);
        if (!s.ok()) return s;
      }
      return fits == data.size() ? rocksdb::IOStatus::OK() : fs_->Full();
    }
    rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                             const rocksdb::DataVerificationInfo&,
                             rocksdb::IODebugContext* d) override {
      return Append(data, o, d);
    }
    rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t off,
                                       const rocksdb::IOOptions& o,
                                       rocksdb::IODebugContext* d) override {
      const size_t fits = fs_->Take(data.size());
      if (fits > 0) {
        auto s = target()->PositionedAppend(rocksdb::Slice(data.data(), fits), off, o, d);
        if (!s.ok()) return s;
      }
      return fits == data.size() ? rocksdb::IOStatus::OK() : fs_->Full();
    }
    rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t off,
                                       const rocksdb::IOOptions& o,
                                       const rocksdb::DataVerificationInfo&,
                                       rocksdb::IODebugContext* d) override {
      return PositionedAppend(data, off, o, d);
    }

   private:
    FillingFs* fs_;
  };

  rocksdb::IOStatus Wrap(rocksdb::IOStatus s, std::unique_ptr<rocksdb::FSWritableFile>* r) {
    if (s.ok()) *r = std::make_unique<File>(std::move(*r), this);
    return s;
  }
  // How many of n bytes fit (all when disarmed).
  size_t Take(size_t n) {
    int64_t left = left_.load();
    while (left >= 0) {
      const int64_t take = std::min<int64_t>(left, static_cast<int64_t>(n));
      if (left_.compare_exchange_weak(left, left - take)) return static_cast<size_t>(take);
    }
    return n;
  }
  rocksdb::IOStatus Full() {
    ++refused_;
    return rocksdb::IOStatus::NoSpace("injected", "No space left on device");
  }
  std::atomic<int64_t> left_{-1};
  std::atomic<uint64_t> refused_{0};
};

StoreOptions Options(const std::string& dir, rocksdb::Env* env) {
  StoreOptions o;
  o.dir = dir;
  o.gpu = false;
  o.host_capacity_bytes = 256 * kBlock;
  o.env = env;
  return o;
}

// Appends to the sequences round robin (13-token appends mixed with single-token decode appends)
// until one fails or `max_appends` went through; acked[seq] = the acknowledged length. Returns the
// first failure (OK when none).
Status AppendUntilFull(BlockStore& s, std::map<uint64_t, uint64_t>* acked, int max_appends) {
  for (int i = 0; i < max_appends; ++i) {
    const uint64_t seq = 1 + i % kSeqs;
    const uint64_t n = (i / kSeqs) % 3 == 0 ? 13 : 1;
    auto r = AppendRange(s, seq, (*acked)[seq], n);
    if (!r.ok()) return r.status();
    EXPECT_EQ(*r, (*acked)[seq] + n);
    (*acked)[seq] = *r;
  }
  return Status::Ok();
}

// After NoSpace: what was acknowledged reads back, on the open store and after a reopen once the
// space is back; appends are accepted again; the offline check passes.
void ExpectRecovers(const std::string& dir, rocksdb::Env* env, std::unique_ptr<BlockStore> full,
                    std::map<uint64_t, uint64_t> acked, const std::function<void()>& free_space) {
  for (uint64_t seq = 1; seq <= kSeqs; ++seq) {  // the open store serves what it acknowledged
    auto len = full->Length({"t", seq});
    ASSERT_TRUE(len.ok());
    EXPECT_EQ(*len, acked[seq]) << "seq " << seq << ": a refused append changed the length";
    std::vector<uint8_t> buf(kBlock);
    for (uint64_t b = 0; b * kB < acked[seq]; ++b)
      ASSERT_TRUE(full->ReadBlock({"t", seq}, {1, 1, b}, true, buf).ok());
  }
  full.reset();  // closes with RocksDB's background error set
  free_space();
  auto st = BlockStore::Open(Options(dir, env));
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  for (uint64_t seq = 1; seq <= kSeqs; ++seq) {
    auto len = (*st)->Length({"t", seq});
    ASSERT_TRUE(len.ok()) << len.status().ToString();
    // The refused append was a torn WAL record: never replayed, nothing of it stays.
    EXPECT_EQ(*len, acked[seq]) << "seq " << seq;
    ExpectContent(**st, seq, acked[seq]);
  }
  ASSERT_TRUE(AppendUntilFull(**st, &acked, 40).ok());  // the space is back: appends go through
  st->reset();
  auto again = BlockStore::Open(Options(dir, env));
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  for (uint64_t seq = 1; seq <= kSeqs; ++seq) {
    EXPECT_EQ(*(*again)->Length({"t", seq}), acked[seq]);
    ExpectContent(**again, seq, acked[seq]);
  }
  again->reset();
  auto v = VerifyStore(dir, env);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  std::string problems;
  for (const auto& p : v->problems) problems += p + "\n";
  EXPECT_TRUE(v->ok()) << problems;
  EXPECT_EQ(v->sequences, kSeqs);
}

// The disk fills after `budget` more bytes, at a different point of a WAL record each time.
class InjectedFullDiskTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(InjectedFullDiskTest, AppendsFailWithNoSpaceAndNothingAcknowledgedIsLost) {
  const std::string dir = TempDir();
  auto fs = std::make_shared<FillingFs>();
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(fs);
  auto st = BlockStore::Open(Options(dir, env.get()));
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  for (uint64_t seq = 1; seq <= kSeqs; ++seq)
    ASSERT_TRUE((*st)->Create({"t", seq}, kShape, kB, Durability::kDurable).ok());
  std::map<uint64_t, uint64_t> acked;
  ASSERT_TRUE(AppendUntilFull(**st, &acked, 30).ok());
  fs->Arm(GetParam());
  const Status full = AppendUntilFull(**st, &acked, 100000);
  ASSERT_FALSE(full.ok()) << "the disk never filled";
  EXPECT_TRUE(full.IsNoSpace()) << full.ToString();
  EXPECT_GT(fs->refused(), 0u);
  // While full: more appends and creates are refused (NoSpace), never half-applied.
  for (uint64_t seq = 1; seq <= kSeqs; ++seq) {
    auto r = AppendRange(**st, seq, acked[seq], 1);
    if (r.ok())
      acked[seq] = *r;  // RocksDB resumed on its own: then it is acknowledged like any other
    else
      EXPECT_TRUE(r.status().IsNoSpace()) << r.status().ToString();
  }
  const Status c = (*st)->Create({"t", 99}, kShape, kB, Durability::kDurable);
  if (!c.ok()) EXPECT_TRUE(c.IsNoSpace()) << c.ToString();
  if (c.ok()) ASSERT_TRUE((*st)->Delete({"t", 99}).ok());
  ExpectRecovers(dir, env.get(), std::move(*st), acked, [&] { fs->Disarm(); });
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Budgets, InjectedFullDiskTest,
                         ::testing::Values(0, 1, 517, 4000, 9001, 30000, 100000));

// A real tmpfs of 2 MiB (root only): filled with durable appends until the kernel says ENOSPC.
TEST(TmpfsFullDiskTest, RealTinyFileSystemFillsThenRecovers) {
  if (geteuid() != 0) GTEST_SKIP() << "not root: cannot mount a tmpfs";
  struct Mount {  // unmounted and removed however the test ends
    std::string dir = TempDir();
    bool mounted = mount("tmpfs", dir.c_str(), "tmpfs", 0, "size=2m") == 0;
    ~Mount() {
      if (mounted) umount2(dir.c_str(), MNT_DETACH);
      std::filesystem::remove_all(dir);
    }
  } mnt;
  if (!mnt.mounted) GTEST_SKIP() << "mount -t tmpfs failed: " << std::strerror(errno);
  const std::string dir = mnt.dir + "/store";
  auto st = BlockStore::Open(Options(dir, nullptr));
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  for (uint64_t seq = 1; seq <= kSeqs; ++seq)
    ASSERT_TRUE((*st)->Create({"t", seq}, kShape, kB, Durability::kDurable).ok());
  std::map<uint64_t, uint64_t> acked;
  const Status full = AppendUntilFull(**st, &acked, 100000);
  ASSERT_FALSE(full.ok()) << "2 MiB never filled";
  EXPECT_TRUE(full.IsNoSpace()) << full.ToString();
  uint64_t total = 0;
  for (auto& [seq, n] : acked) total += n;
  EXPECT_GT(total, 1000u);  // a few hundred appends fit before the disk filled
  ExpectRecovers(dir, nullptr, std::move(*st), acked, [&] {
    ASSERT_EQ(mount("tmpfs", mnt.dir.c_str(), "tmpfs", MS_REMOUNT, "size=64m"), 0)
        << std::strerror(errno);
  });
}

}  // namespace
}  // namespace kvm::store
