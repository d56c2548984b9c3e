// Block-store throughput (synthetic KV of the LLaMA-7B-like shape L32 Hkv8 D128 fp16, B 16):
// append MB/s to the host tier (cache sequences) and through RocksDB (durable: WAL, tail records,
// block compaction), decode-like (1 token per append) and prefill-like (256 tokens per append);
// promotion MB/s (spilled blocks read back from disk into the host tier); memcpy MB/s in the same
// run. Then how long the store keeps a reader of one sequence (Length, then a pin of 64 blocks of
// keys: a retrieval's store calls) waiting while another thread appends 256-token chunks to
// another sequence, cache or durable, next to the same reader alone.
//   kvm_store_bench [--dir DIR] [--json]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "kvmanager/block_store.h"

using namespace kvm;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  std::string dir = "/tmp/kvm_store_bench";
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json"))
      json = true;
    else if (!std::strcmp(argv[i], "--dir") && i + 1 < argc)
      dir = argv[++i];
    else
      return std::fprintf(stderr, "usage: kvm_store_bench [--dir DIR] [--json]\n"), 2;
  }
  const bool idle = bench::WaitForIdle();
  const ModelShape shape{32, 32, 8, 128, DType::kF16, 1};
  const uint32_t B = 16;
  const size_t per_token = size_t{32} * 8 * 2 * 128 * 2;  // 128 KiB of K and V per token
  auto payload = [&](uint64_t n) { return std::vector<uint8_t>(per_token * n, 0x3c); };
  auto tokens = [](uint64_t start, uint64_t n) {
    std::vector<uint32_t> t(n);
    for (uint64_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(start + i);
    return t;
  };
  struct Row {
    std::string what;
    double mbps;
  };
  std::vector<Row> rows;
  auto run = [&](const std::string& what, store::Durability d, uint64_t total, uint64_t per_append,
                 uint64_t host) {
    std::filesystem::remove_all(dir);
    store::StoreOptions so;
    so.dir = dir;
    so.host_capacity_bytes = host;
    auto s = store::BlockStore::Open(so);
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
      std::exit(1);
    }
    const store::SeqRef r{"bench", 1};
    if (!(*s)->Create(r, shape, B, d).ok()) std::exit(1);
    const auto p = payload(per_append);
    const auto t0 = Clock::now();
    for (uint64_t pos = 0; pos < total; pos += per_append)
      if (!(*s)->Append(r, pos, tokens(pos, per_append), p).ok()) {
        std::fprintf(stderr, "append failed\n");
        std::exit(1);
      }
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    rows.push_back({what, total * per_token / secs / 1e6});
    std::fprintf(stderr, "%s: %.1f MB/s\n", what.c_str(), rows.back().mbps);
    return std::move(*s);
  };
  run("append, host tier (cache), 1 token per append", store::Durability::kCache, 512, 1,
      1ull << 30);
  run("append, host tier (cache), 256 tokens per append", store::Durability::kCache, 2048, 256,
      1ull << 30);
  run("append, RocksDB (durable, WAL), 1 token per append", store::Durability::kDurable, 512, 1,
      1ull << 30);
  run("append, RocksDB (durable, WAL), 256 tokens per append", store::Durability::kDurable, 2048,
      256, 1ull << 30);
  {  // promotion: a 32 MiB host tier, 256 MiB of blocks spilled, then every block read back
    auto s = run("append, cache with spill to RocksDB, 256 tokens per append",
                 store::Durability::kCache, 2048, 256, 32ull << 20);
    const store::SeqRef r{"bench", 1};
    std::vector<uint8_t> buf(size_t{B} * 128 * 2);
    const uint64_t before = s->Stats().promotions;
    const auto t0 = Clock::now();
    uint64_t bytes = 0;
    for (uint64_t b = 0; b < 2048 / B; ++b)
      for (uint32_t l = 0; l < 32; ++l)
        for (uint32_t h = 0; h < 8; ++h)
          for (bool v : {false, true}) {
            if (!s->ReadBlock(r, {l, h, b}, v, buf).ok()) std::exit(1);
            bytes += buf.size();
          }
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    rows.push_back({"read back, disk -> host promotion (" +
                        std::to_string(s->Stats().promotions - before) + " promotions)",
                    bytes / secs / 1e6});
  }
  // Eviction at scale: 1 GiB through the same 32 MiB tier (131,072 blocks spilled, ~60 rounds of
  // eviction, each over a sequence of up to 131,072 blocks).
  run("append, cache with spill to RocksDB, 1 GiB through 32 MiB, 256 tokens per append",
      store::Durability::kCache, 8192, 256, 32ull << 20);
  {
    std::vector<uint8_t> a(256u << 20, 1), b(256u << 20, 2);
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), a.size());
    rows.push_back({"memcpy 256 MiB (same binary)",
                    a.size() / std::chrono::duration<double>(Clock::now() - t0).count() / 1e6});
  }
  // The reader: Length and a pin of 64 key blocks of sequence R, over and over, alone (2,000
  // times) or while a writer appends 2,048 tokens (256 MiB) to sequence W in 256-token chunks.
  struct Wait {
    std::string what;
    size_t n;
    double p50, p99, max;  // microseconds
  };
  std::vector<Wait> waits;
  // Length + a pin of `ids`' key blocks of rr, timed, until more() is false; one row of waits.
  auto measure = [&](store::BlockStore& s, const store::SeqRef& rr, std::vector<uint64_t> ids,
                     const std::function<bool(size_t)>& more, const std::string& what) {
    std::vector<double> us;
    while (more(us.size())) {
      const auto t0 = Clock::now();
      if (!s.Length(rr).ok() || !s.Pin(rr, 0, 0, ids, /*keys_only=*/true).ok()) std::exit(1);
      us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    std::sort(us.begin(), us.end());
    auto at = [&](double f) { return us[std::min(us.size() - 1, size_t(f * us.size()))]; };
    waits.push_back({what, us.size(), at(0.5), at(0.99), us.back()});
    std::fprintf(stderr, "%s: %zu reads, p50 %.1f us, p99 %.1f us, max %.1f us\n", what.c_str(),
                 us.size(), at(0.5), at(0.99), us.back());
  };
  auto first_blocks = [](uint64_t n) {
    std::vector<uint64_t> ids(n);
    for (uint64_t b = 0; b < n; ++b) ids[b] = b;
    return ids;
  };
  auto reader = [&](const std::string& what, bool writer, store::Durability d) {
    std::filesystem::remove_all(dir);
    store::StoreOptions so;
    so.dir = dir;
    so.host_capacity_bytes = 1ull << 30;
    auto s = store::BlockStore::Open(so);
    const store::SeqRef rr{"bench", 1}, wr{"bench", 2};
    if (!s.ok() || !(*s)->Create(rr, shape, B, store::Durability::kCache).ok() ||
        !(*s)->Create(wr, shape, B, d).ok())
      std::exit(1);
    const auto p = payload(256);
    for (uint64_t pos = 0; pos < 1024; pos += 256)
      if (!(*s)->Append(rr, pos, tokens(pos, 256), p).ok()) std::exit(1);
    std::atomic<bool> done{!writer};
    std::thread w;
    if (writer)
      w = std::thread([&] {
        for (uint64_t pos = 0; pos < 2048; pos += 256)
          if (!(*s)->Append(wr, pos, tokens(pos, 256), p).ok()) std::exit(1);
        done = true;
      });
    measure(
        **s, rr, first_blocks(64), [&](size_t n) { return writer ? !done.load() : n < 2000; },
        what);
    if (w.joinable()) w.join();
  };
  reader("reader alone", false, store::Durability::kCache);
  reader("reader beside cache appends (256 tokens each)", true, store::Durability::kCache);
  reader("reader beside durable appends (256 tokens each)", true, store::Durability::kDurable);
  {  // beside a thread pinning (K and V) every block of a cache sequence spilled to disk:
     // promotions. A 32 MiB host tier; the reader's sequence has head_dim 64, so its blocks live in
     // an arena of their own (16 blocks of layer 0, head 0, pinned each time) and are never
     // evicted.
    std::filesystem::remove_all(dir);
    store::StoreOptions so;
    so.dir = dir;
    so.host_capacity_bytes = 32ull << 20;
    auto s = store::BlockStore::Open(so);
    const ModelShape small{32, 32, 8, 64, DType::kF16, 2};
    const store::SeqRef rr{"bench", 1}, wr{"bench", 2};
    if (!s.ok() || !(*s)->Create(rr, small, B, store::Durability::kCache).ok() ||
        !(*s)->Create(wr, shape, B, store::Durability::kCache).ok())
      std::exit(1);
    if (!(*s)->Append(rr, 0, tokens(0, 256), std::vector<uint8_t>(per_token / 2 * 256, 0x3c)).ok())
      std::exit(1);
    const auto p = payload(256);
    for (uint64_t pos = 0; pos < 2048; pos += 256)
      if (!(*s)->Append(wr, pos, tokens(pos, 256), p).ok()) std::exit(1);
    const uint64_t promotions = (*s)->Stats().promotions;
    std::atomic<bool> done{false};
    std::thread w([&] {
      const std::vector<uint64_t> all = first_blocks(2048 / B);
      for (uint32_t l = 0; l < 32; ++l)
        for (uint32_t h = 0; h < 8; ++h)
          if (!(*s)->Pin(wr, l, h, all).ok()) std::exit(1);
      done = true;
    });
    measure(
        **s, rr, first_blocks(16), [&](size_t) { return !done.load(); },
        "reader (16 blocks, own arena) beside pins of spilled blocks");
    w.join();
    waits.back().what +=
        " (" + std::to_string((*s)->Stats().promotions - promotions) + " promotions)";
  }
  std::filesystem::remove_all(dir);
  if (json) {
    std::printf("{\"idle\": %s, \"rows\": [", idle ? "true" : "false");
    for (size_t i = 0; i < rows.size(); ++i)
      std::printf("%s{\"what\": \"%s\", \"mb_per_s\": %.1f}", i ? ", " : "", rows[i].what.c_str(),
                  rows[i].mbps);
    std::printf("], \"reader_waits\": [");
    for (size_t i = 0; i < waits.size(); ++i)
      std::printf(
          "%s{\"what\": \"%s\", \"reads\": %zu, \"p50_us\": %.1f, \"p99_us\": %.1f, "
          "\"max_us\": %.1f}",
          i ? ", " : "", waits[i].what.c_str(), waits[i].n, waits[i].p50, waits[i].p99,
          waits[i].max);
    std::printf("]}\n");
  } else {
    std::printf(
        "L32 Hkv8 D128 fp16 (128 KiB of K+V per token), B 16; idle machine: %s\n| what | MB/s "
        "|\n|---|---|\n",
        idle ? "yes" : "NO");
    for (auto& r : rows) std::printf("| %s | %.1f |\n", r.what.c_str(), r.mbps);
    std::printf(
        "\n| reader (Length + pin of 64 key blocks) | reads | p50 us | p99 us | max us |\n"
        "|---|---|---|---|---|\n");
    for (auto& w : waits)
      std::printf("| %s | %zu | %.1f | %.1f | %.1f |\n", w.what.c_str(), w.n, w.p50, w.p99, w.max);
  }
  return 0;
}
