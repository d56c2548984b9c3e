// The block store under concurrent load: threads append, read, pin, score (GPU tier: the host
// double), promote, mark, truncate, delete and re-create a few shared sequences at random against
// a small host tier (so eviction and promotion run all the time) over an in-memory disk tier
// (RocksDB's MemEnv). Every byte read, every pinned block and every logit is checked against an
// oracle outside the store: the KV of a position is a function of the sequence's family and the
// position only, so any interleaving gives the same bytes, and a wrong one is a race or a lost
// write. At the end: the content is exact, durable sequences survive a reopen, and deleting
// everything gives every host slot back. Runs under TSan in CI (ctest -L sanitize). ctest label
// `store`.
#include <gtest/gtest.h>
#include <rocksdb/env.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvmanager/block_store.h"
#include "proto/half.h"
#include "testutil/host_device.h"

namespace kvm::store {
namespace {

const ModelShape kShape{2, 4, 2, 32, DType::kF16, 91};  // L2, Hq4, Hkv2, D32: group 2
constexpr uint32_t kB = 16, kD = 32;
constexpr size_t kRow = kD * 2, kBlock = kB * kRow;
constexpr uint64_t kMaxLen = 320;  // 20 blocks
constexpr int kSeqs = 8, kThreads = 4, kOpsPerThread = 1500;

// Sequence id → family (the token ids and KV content) and durability.
uint32_t Family(uint64_t id) { return static_cast<uint32_t>(id % 2); }
Durability Dur(uint64_t id) { return (id / 2) % 2 ? Durability::kDurable : Durability::kCache; }
uint32_t Token(uint32_t fam, uint64_t pos) {
  return static_cast<uint32_t>(fam * 1000003 + pos * 7 + 1);
}
// Element i of the K (v = 0) or V row of `pos`: a nonzero multiple of 1/16 (exact in fp16, so
// products and sums of them are exact in float).
float Val(uint32_t fam, uint64_t pos, uint32_t l, uint32_t h, int v, uint32_t i) {
  const uint64_t x = fam * 131 + pos * 31 + l * 7 + h * 3 + v * 5 + i * 11 + (pos >> 3);
  const float mag = static_cast<float>(x % 32 + 1) / 16.f;
  return (x / 32) % 2 ? -mag : mag;
}
uint16_t Bits(uint32_t fam, uint64_t pos, uint32_t l, uint32_t h, int v, uint32_t i) {
  return FloatToHalf(Val(fam, pos, l, h, v, i));
}
std::vector<uint32_t> Tokens(uint32_t fam, uint64_t start, uint64_t n) {
  std::vector<uint32_t> t;
  for (uint64_t p = start; p < start + n; ++p) t.push_back(Token(fam, p));
  return t;
}
std::vector<uint8_t> Payload(uint32_t fam, uint64_t start, uint64_t n) {  // [L][Hkv][K,V][n][D]
  std::vector<uint8_t> out;
  for (uint32_t l = 0; l < kShape.layers; ++l)
    for (uint32_t h = 0; h < kShape.kv_heads; ++h)
      for (int v = 0; v < 2; ++v)
        for (uint64_t p = start; p < start + n; ++p)
          for (uint32_t i = 0; i < kD; ++i) {
            const uint16_t b = Bits(fam, p, l, h, v, i);
            out.push_back(static_cast<uint8_t>(b & 0xff));
            out.push_back(static_cast<uint8_t>(b >> 8));
          }
  return out;
}
// Whether `row` (kRow bytes) is the oracle's row of `pos`.
bool RowIs(const uint8_t* row, uint32_t fam, uint64_t pos, uint32_t l, uint32_t h, int v) {
  for (uint32_t i = 0; i < kD; ++i) {
    const uint16_t b = Bits(fam, pos, l, h, v, i);
    if (row[2 * i] != (b & 0xff) || row[2 * i + 1] != (b >> 8)) return false;
  }
  return true;
}
bool RowIsZero(const uint8_t* row) {
  for (size_t i = 0; i < kRow; ++i)
    if (row[i]) return false;
  return true;
}

std::string TempDir() {
  char tmpl[] = "/tmp/kvm_stress_XXXXXX";
  return mkdtemp(tmpl);
}

// What the threads did (successful operations), so the test cannot pass having done nothing.
struct Counts {
  std::atomic<uint64_t> appends{0}, reads{0}, pins{0}, scores{0}, promotes{0}, truncates{0},
      deletes{0}, creates{0}, attached{0};
};

class StressTest : public ::testing::Test {
 protected:
  void SetUp() override {
    env_.reset(rocksdb::NewMemEnv(rocksdb::Env::Default()));
    opt_.dir = TempDir();  // a name only: the files live in the in-memory env
    opt_.env = env_.get();
    opt_.host_capacity_bytes = 48 * kBlock;  // far below the ~8 x 20 x 8 blocks stored
    opt_.pinned_sink_tokens = 16;
    opt_.pinned_window_tokens = 16;
    opt_.gpu_device = []() -> Result<std::unique_ptr<Device>> {
      return std::unique_ptr<Device>(new testutil::HostDevice());
    };
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(opt_.dir, ec);
  }
  std::unique_ptr<rocksdb::Env> env_;
  StoreOptions opt_;
};

// An operation's status is one that some interleaving explains: the sequence was deleted
// (NotFound), truncated (OutOfRange), created meanwhile (AlreadyExists), appended past its end
// after a truncate (FailedPrecondition), or every host slot was pinned (NoSpace). Anything else
// fails.
bool Explained(const Status& st) {
  return st.ok() || st.IsNotFound() || st.IsOutOfRange() || st.IsAlreadyExists() ||
         st.IsFailedPrecondition() || st.IsNoSpace();
}

// One worker: kOpsPerThread random operations; the first failure is recorded in *err.
void Worker(BlockStore& s, int seed, Counts& n, std::mutex& err_mu, std::string* err) {
  std::mt19937 rng(seed);
  auto pick = [&](uint64_t k) { return std::uniform_int_distribution<uint64_t>(0, k - 1)(rng); };
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> l(err_mu);
    if (err->empty()) *err = what;
  };
  for (int op = 0; op < kOpsPerThread; ++op) {
    const uint64_t id = 1 + pick(kSeqs);
    const uint32_t fam = Family(id);
    const SeqRef r{"t", id};
    const uint32_t l = static_cast<uint32_t>(pick(kShape.layers)),
                   h = static_cast<uint32_t>(pick(kShape.kv_heads));
    const uint64_t kind = pick(100);
    Result<uint64_t> len = s.Length(r);
    if (!len.ok()) {  // absent: create it, half the time from a stored prefix of its family
      Status st;
      if (pick(2)) {
        const auto tokens = Tokens(fam, 0, 16 * (1 + pick(kMaxLen / 16)));
        Result<uint64_t> got = s.CreateFromPrefix(r, kShape, kB, Dur(id), 0, tokens);
        st = got.status();
        if (got.ok() && *got > 0) ++n.attached;
      } else {
        st = s.Create(r, kShape, kB, Dur(id));
      }
      if (!Explained(st)) fail("create: " + st.ToString());
      if (st.ok()) ++n.creates;
      continue;
    }
    const std::string at = "seq " + std::to_string(id) + " ";
    if (kind < 30) {  // append at the end it saw
      const uint64_t k = 1 + pick(40);
      if (*len + k > kMaxLen) continue;
      Result<uint64_t> got = s.Append(r, *len, Tokens(fam, *len, k), Payload(fam, *len, k));
      if (!Explained(got.status())) fail(at + "append: " + got.status().ToString());
      if (got.ok()) ++n.appends;
    } else if (kind < 50) {  // read blocks: each row the oracle's, or zero past the end
      const uint64_t nb = (*len + kB - 1) / kB;
      if (nb == 0) continue;
      std::vector<uint64_t> ids;
      for (uint64_t i = 0, c = 1 + pick(6); i < c; ++i) ids.push_back(pick(nb));
      const bool values = pick(2);
      std::vector<uint8_t> out(ids.size() * kBlock);
      const Status st = s.ReadBlocks(r, l, h, values, ids, out);
      if (!Explained(st)) fail(at + "read: " + st.ToString());
      if (!st.ok()) continue;
      ++n.reads;
      for (size_t i = 0; i < ids.size(); ++i) {
        bool past_end = false;
        for (uint32_t row = 0; row < kB; ++row) {
          const uint8_t* p = out.data() + i * kBlock + row * kRow;
          const uint64_t pos = ids[i] * kB + row;
          if (!past_end && RowIs(p, fam, pos, l, h, values)) continue;
          past_end = true;  // the rest of the block must be zero
          if (!RowIsZero(p))
            fail(at + "read: wrong bytes at position " + std::to_string(pos) + " l " +
                 std::to_string(l) + " h " + std::to_string(h) + " v " + std::to_string(values));
        }
      }
    } else if (kind < 65) {  // pin, let others evict / truncate / delete, then check in place
      const uint64_t nb = (*len + kB - 1) / kB;
      if (nb == 0) continue;
      std::vector<uint64_t> ids;
      for (uint64_t i = 0, c = 1 + pick(6); i < c; ++i) ids.push_back(pick(nb));
      const bool keys_only = pick(2);
      Result<PinnedBlocks> pin = s.Pin(r, l, h, ids, keys_only);
      if (!Explained(pin.status())) fail(at + "pin: " + pin.status().ToString());
      if (!pin.ok()) continue;
      ++n.pins;
      std::this_thread::yield();
      for (size_t i = 0; i < ids.size(); ++i)
        for (uint32_t row = 0; row < pin->rows()[i]; ++row)
          for (int v = 0; v < (keys_only ? 1 : 2); ++v) {
            const auto* p = static_cast<const uint8_t*>(v ? pin->v()[i] : pin->k()[i]) + row * kRow;
            if (!RowIs(p, fam, ids[i] * kB + row, l, h, v))
              fail(at + "pin: wrong bytes at position " + std::to_string(ids[i] * kB + row));
          }
    } else if (kind < 75) {  // score on the GPU tier against a double-precision oracle
      if (*len == 0) continue;
      const uint64_t stored = 1 + pick(*len);
      const uint32_t G = kShape.group_size();
      std::vector<float> q(G * kD), logits(G * stored);
      for (float& x : q) x = static_cast<float>(static_cast<int>(pick(9)) - 4) / 4.f;
      const Status st = s.ScoreOnGpu(r, l, h, stored, {}, q.data(), logits.data());
      if (!Explained(st) && !st.IsUnavailable()) fail(at + "score: " + st.ToString());
      if (!st.ok()) continue;
      ++n.scores;
      for (uint32_t g = 0; g < G; ++g)
        for (uint64_t t = 0; t < stored; ++t) {
          double dot = 0;
          for (uint32_t i = 0; i < kD; ++i) dot += double{q[g * kD + i]} * Val(fam, t, l, h, 0, i);
          const double want = dot / std::sqrt(double{kD});
          if (std::abs(logits[g * stored + t] - want) > 1e-5 * (1 + std::abs(want)))
            fail(at + "score: logit of position " + std::to_string(t) + " is " +
                 std::to_string(logits[g * stored + t]) + ", want " + std::to_string(want));
        }
    } else if (kind < 85) {  // a plan's blocks: selected, promoted
      const uint64_t full = *len / kB;
      if (full == 0) continue;
      std::vector<uint64_t> ids;
      for (uint64_t i = 0, c = 1 + pick(4); i < c; ++i) ids.push_back(pick(full));
      Status st = s.MarkSelected(r, l, h, ids);
      if (st.ok()) st = s.Promote(r, l, h, ids);
      if (!Explained(st)) fail(at + "promote: " + st.ToString());
      if (st.ok()) ++n.promotes;
      if (pick(20) == 0) (void)s.SetValuesRead(r);
    } else if (kind < 93) {  // truncate
      const Status st = s.Truncate(r, pick(*len + 1));
      if (!Explained(st)) fail(at + "truncate: " + st.ToString());
      if (st.ok()) ++n.truncates;
    } else if (kind < 97) {
      const Status st = s.Delete(r);
      if (!Explained(st)) fail(at + "delete: " + st.ToString());
      if (st.ok()) ++n.deletes;
    } else {
      (void)s.Stats();
      (void)s.InHostTier(r, {l, h, pick(kMaxLen / kB)}, pick(2));
      (void)s.List("t");
    }
  }
}

// kThreads workers (seeds seed, seed + 1, ...) on one store; the first failure, or "".
std::string RunWorkers(BlockStore& s, int seed, Counts& n) {
  std::mutex err_mu;
  std::string err;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] { Worker(s, seed + t, n, err_mu, &err); });
  for (auto& t : threads) t.join();
  return err;
}

// Every stored row of every sequence exact, rows past the end zero.
void ExpectExact(BlockStore& s, const SeqRef& r) {
  const uint64_t len = *s.Length(r);
  const uint32_t fam = Family(r.id);
  std::vector<uint8_t> blk(kBlock);
  for (uint64_t b = 0; b * kB < len; ++b)
    for (uint32_t l = 0; l < kShape.layers; ++l)
      for (uint32_t h = 0; h < kShape.kv_heads; ++h)
        for (int v = 0; v < 2; ++v) {
          const Status st = s.ReadBlock(r, {l, h, b}, v != 0, blk);
          ASSERT_TRUE(st.ok()) << st.ToString();
          for (uint32_t row = 0; row < kB; ++row) {
            const uint64_t pos = b * kB + row;
            const uint8_t* p = blk.data() + row * kRow;
            ASSERT_TRUE(pos < len ? RowIs(p, fam, pos, l, h, v) : RowIsZero(p))
                << "seq " << r.id << " position " << pos << " l " << l << " h " << h << " v " << v;
          }
        }
}

TEST_F(StressTest, ConcurrentAppendReadPinScoreEvictTruncateDelete) {
  auto s = BlockStore::Open(opt_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_EQ((*s)->Stats().gpu_tier.rfind("host double", 0), 0u) << (*s)->Stats().gpu_tier;
  Counts n;
  ASSERT_EQ(RunWorkers(**s, 1000, n), "");
  const StoreStats st = (*s)->Stats();
  // The run exercised what it claims to (a few of each; thousands of operations in all).
  EXPECT_GT(n.appends, 100u);
  EXPECT_GT(n.reads, 50u);
  EXPECT_GT(n.pins, 50u);
  EXPECT_GT(n.scores, 20u);
  EXPECT_GT(n.promotes, 20u);
  EXPECT_GT(n.truncates, 10u);
  EXPECT_GT(n.deletes, 5u);
  EXPECT_GT(n.attached, 0u);
  EXPECT_GT(st.spills, 100u);
  EXPECT_GT(st.promotions, 10u);
  EXPECT_GT(st.gpu.scored, 20u);
  std::printf(
      "appends %lu reads %lu pins %lu scores %lu promotes %lu truncates %lu deletes %lu "
      "creates %lu (%lu from a prefix); spills %lu promotions %lu\n",
      n.appends.load(), n.reads.load(), n.pins.load(), n.scores.load(), n.promotes.load(),
      n.truncates.load(), n.deletes.load(), n.creates.load(), n.attached.load(), st.spills,
      st.promotions);
  std::map<uint64_t, uint64_t> durable;  // id → length
  for (uint64_t id = 1; id <= kSeqs; ++id) {
    const SeqRef r{"t", id};
    if (!(*s)->Length(r).ok()) continue;
    ExpectExact(**s, r);
    if (Dur(id) == Durability::kDurable) durable[id] = *(*s)->Length(r);
  }
  // Reopen: the durable sequences come back whole, the cache ones are gone.
  s->reset();
  auto again = BlockStore::Open(opt_);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  for (uint64_t id = 1; id <= kSeqs; ++id) {
    const SeqRef r{"t", id};
    Result<uint64_t> len = (*again)->Length(r);
    if (!durable.count(id)) {
      EXPECT_TRUE(len.status().IsNotFound()) << "seq " << id;
      continue;
    }
    ASSERT_TRUE(len.ok()) << "seq " << id << ": " << len.status().ToString();
    EXPECT_EQ(*len, durable[id]) << "seq " << id;
    ExpectExact(**again, r);
  }
  // Deleting everything gives every host slot and every shared block back.
  for (const auto& [id, len] : durable) ASSERT_TRUE((*again)->Delete({"t", id}).ok());
  const StoreStats end = (*again)->Stats();
  EXPECT_EQ(end.sequences, 0u);
  EXPECT_EQ(end.host_slots_used, 0u);
  EXPECT_EQ(end.shared_blocks, 0u);
}

// The same sequences appended to, with every host slot wanted: nothing leaks from the host tier
// when sequences are deleted while others evict them (the slot accounting is exact).
TEST_F(StressTest, DeletingEverythingAfterTheRunGivesEverySlotBack) {
  auto s = BlockStore::Open(opt_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  Counts n;
  ASSERT_EQ(RunWorkers(**s, 2000, n), "");
  for (uint64_t id = 1; id <= kSeqs; ++id) {
    const Status st = (*s)->Delete({"t", id});
    ASSERT_TRUE(st.ok() || st.IsNotFound()) << st.ToString();
  }
  const StoreStats end = (*s)->Stats();
  EXPECT_EQ(end.sequences, 0u);
  EXPECT_EQ(end.host_slots_used, 0u);
  EXPECT_EQ(end.shared_blocks, 0u);
  EXPECT_EQ(end.gpu.buffers, 0u);
}

}  // namespace
}  // namespace kvm::store
