// kvmctl bench attention: dense vs sparse CPU decode attention, one layer, batch 1 (synthetic KV).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>

#include "attention/decode.h"
#include "attention/reference.h"
#include "bench_util.h"
#include "commands.h"
#include "flags.h"

namespace kvm::tools {
namespace {
using Clock = std::chrono::steady_clock;

size_t LastLevelCache() {
  for (int idx = 3; idx >= 2; --idx) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/size");
    std::string s;
    if (f >> s && !s.empty()) {
      size_t v = std::stoull(s);
      if (s.back() == 'K') v <<= 10;
      if (s.back() == 'M') v <<= 20;
      return v;
    }
  }
  return 32u << 20;
}

double MemcpyGbps(size_t bytes) {
  std::vector<uint8_t> a(bytes, 1), b(bytes, 2);
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, bytes / s / 1e9);  // bytes copied per second
    a[i] = b[bytes - 1 - i];
  }
  return best;
}
}  // namespace

int RunBenchAttention(const std::vector<std::string>& args) {
  Flags f(args,
          {"context", "budget-frac", "head-dim", "q-heads", "kv-heads", "block-size", "granularity",
           "threads", "iters"},
          {"json"});
  const uint64_t T = static_cast<uint64_t>(f.Int("context", 32768, 64, 1 << 22));
  const double frac = f.Double("budget-frac", 0.125, 1e-4, 1.0);
  const uint32_t D = static_cast<uint32_t>(f.Int("head-dim", 128, 32, 256));
  if (D != 32 && D != 64 && D != 128 && D != 256)
    throw UsageError("--head-dim must be 32, 64, 128 or 256");
  const uint32_t Hq = static_cast<uint32_t>(f.Int("q-heads", 32, 1, 256));
  const uint32_t Hkv = static_cast<uint32_t>(f.Int("kv-heads", 8, 1, 256));
  if (Hq % Hkv || Hq / Hkv > 8)
    throw UsageError("--q-heads must be a multiple of --kv-heads, group at most 8");
  const uint32_t B = static_cast<uint32_t>(f.Int("block-size", 16, 1, 1024));
  const std::string gran = f.Str("granularity", "block");
  if (gran != "block" && gran != "token") throw UsageError("--granularity must be block or token");
  const uint32_t threads = static_cast<uint32_t>(f.Int("threads", 1, 1, 64));
  const uint32_t g = Hq / Hkv;
  const bool idle = bench::WaitForIdle();

  // Working set: enough copies of the layer's KV (fp16) to cover 4x the last-level cache.
  const size_t llc = LastLevelCache();
  const uint64_t nb = (T + B - 1) / B;
  const size_t block_bytes = size_t{B} * D * 2;
  const size_t layer_bytes = 2 * size_t{Hkv} * nb * block_bytes;
  const size_t copies = std::max<size_t>(1, (4 * llc + layer_bytes - 1) / layer_bytes);
  std::fprintf(
      stderr,
      "T %llu, Hq %u Hkv %u D %u fp16, B %u: %zu copies of %.1f MiB (LLC %.0f MiB), %s-granular "
      "selection of %.4g, CPU path %s\n",
      (unsigned long long)T, Hq, Hkv, D, B, copies, layer_bytes / 1048576.0, llc / 1048576.0,
      gran.c_str(), frac, attn::CpuDecodePath());
  std::vector<std::vector<uint16_t>> kv(copies, std::vector<uint16_t>(layer_bytes / 2));
  std::mt19937 rng(7);
  for (auto& c : kv)
    for (size_t i = 0; i < c.size(); ++i)
      c[i] = static_cast<uint16_t>(0x3000 + (rng() & 0x0fff));  // small fp16 values
  std::vector<float> q(size_t{Hq} * D), out(q.size());
  for (auto& x : q) x = float(rng() % 1000) / 1000.0f - 0.5f;

  auto kblock = [&](size_t c, uint32_t h, uint64_t b) {
    return kv[c].data() + (size_t{h} * nb + b) * block_bytes / 2;
  };
  auto vblock = [&](size_t c, uint32_t h, uint64_t b) {
    return kv[c].data() + layer_bytes / 4 + (size_t{h} * nb + b) * block_bytes / 2;
  };
  // Dense tables per copy.
  struct Table {
    std::vector<const void*> k, v;
    std::vector<uint32_t> n;
    std::vector<uint16_t> rows;
    uint32_t max = 0;
    uint64_t bytes = 0;
  };
  auto dense_table = [&](size_t c) {
    Table t;
    t.max = static_cast<uint32_t>(nb);
    for (uint32_t h = 0; h < Hkv; ++h) {
      for (uint64_t b = 0; b < nb; ++b) {
        t.k.push_back(kblock(c, h, b));
        t.v.push_back(vblock(c, h, b));
        t.rows.push_back(static_cast<uint16_t>(std::min<uint64_t>(B, T - b * B)));
      }
      t.n.push_back(static_cast<uint32_t>(nb));
    }
    t.bytes = 2ull * Hkv * T * D * 2;
    return t;
  };
  // The worker's reference path before the fast one (attn::Attend per KV head over every block with
  // a T-byte token mask): the same selection, timed for comparison (block granularity only).
  std::vector<uint8_t> mask(T);
  auto run_reference = [&](size_t c, const std::vector<std::vector<uint64_t>>& picks) {
    std::vector<const void*> kp(nb), vp(nb);
    const auto t0 = Clock::now();
    for (uint32_t h = 0; h < Hkv; ++h) {
      std::fill(mask.begin(), mask.end(), 0);
      for (uint64_t b = 0; b < nb; ++b) {
        kp[b] = kblock(c, h, b);
        vp[b] = vblock(c, h, b);
      }
      for (uint64_t u : picks[h])
        for (uint64_t t = u * B; t < std::min<uint64_t>(T, (u + 1) * B); ++t) mask[t] = 1;
      const attn::HeadKV kvh{kp.data(), vp.data(), static_cast<uint32_t>(nb), T, B, D, DType::kF16};
      if (!attn::Attend(q.data() + size_t{h} * g * D, g, kvh, mask, out.data() + size_t{h} * g * D)
               .ok())
        std::exit(1);
    }
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  };
  // Sparse tables: a fresh random selection each time (blocks of B, or single tokens as 1-row
  // entries).
  const uint64_t sel_units =
      std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(frac * (gran == "block" ? nb : T))));
  std::vector<std::vector<uint64_t>> last_picks(Hkv);
  auto sparse_table = [&](size_t c) {
    Table t;
    t.max = static_cast<uint32_t>(sel_units);
    for (uint32_t h = 0; h < Hkv; ++h) {
      std::vector<uint64_t> pick(gran == "block" ? nb : T);
      std::iota(pick.begin(), pick.end(), 0);
      for (uint64_t i = 0; i < sel_units; ++i)
        std::swap(pick[i], pick[i + rng() % (pick.size() - i)]);
      pick.resize(sel_units);
      std::sort(pick.begin(), pick.end());
      last_picks[h] = pick;
      for (uint64_t u : pick) {
        if (gran == "block") {
          t.k.push_back(kblock(c, h, u));
          t.v.push_back(vblock(c, h, u));
          t.rows.push_back(static_cast<uint16_t>(std::min<uint64_t>(B, T - u * B)));
          t.bytes += 2ull * t.rows.back() * D * 2;
        } else {  // one token: a 1-row entry pointing into its block
          t.k.push_back(kblock(c, h, u / B) + (u % B) * D);
          t.v.push_back(vblock(c, h, u / B) + (u % B) * D);
          t.rows.push_back(1);
          t.bytes += 2ull * D * 2;
        }
      }
      t.n.push_back(static_cast<uint32_t>(sel_units));
    }
    return t;
  };
  auto run = [&](const Table& t, uint32_t block_size) {
    attn::DecodeParams p;
    p.q = q.data();
    p.out = out.data();
    p.kv_heads = Hkv;
    p.group = g;
    p.head_dim = D;
    p.block_size = block_size;
    p.dtype = DType::kF16;
    p.k_blocks = t.k.data();
    p.v_blocks = t.v.data();
    p.n_blocks = t.n.data();
    p.max_blocks = t.max;
    p.rows = t.rows.data();
    p.threads = threads;
    const auto t0 = Clock::now();
    const Status s = attn::DecodeCpu(p);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (!s.ok()) {
      std::fprintf(stderr, "decode: %s\n", s.ToString().c_str());
      std::exit(1);
    }
    return ms;
  };
  std::vector<Table> dense;
  for (size_t c = 0; c < copies; ++c) dense.push_back(dense_table(c));
  const int iters = static_cast<int>(
      f.Int("iters", static_cast<int64_t>(std::max<size_t>(8, 2 * copies)), 1, 100000));
  const uint32_t sparse_bs = gran == "block" ? B : 1;
  double dense_ms = 0, sparse_ms = 0, reference_ms = 0;
  uint64_t sparse_bytes = 0;
  run(dense[0], B);  // warm up code paths
  // The sparse pass reads a copy the dense pass did not just warm (half the working set away).
  const size_t away = copies / 2;
  const int ref_iters = gran == "block" ? std::max(1, iters / 4) : 0;  // the slow path: fewer
  for (int i = 0; i < iters; ++i) {
    dense_ms += run(dense[i % copies], B);
    const Table st = sparse_table((i + away) % copies);  // generated outside the timed region
    sparse_ms += run(st, sparse_bs);
    sparse_bytes += st.bytes;
    if (i < ref_iters) reference_ms += run_reference((i + away + 1) % copies, last_picks);
  }
  dense_ms /= iters;
  sparse_ms /= iters;
  const double ref_ms = ref_iters ? reference_ms / ref_iters : NAN;
  const double dense_gbps = dense[0].bytes / (dense_ms * 1e6);
  const double sparse_gbps = sparse_bytes / double(iters) / (sparse_ms * 1e6);
  const double memcpy_gbps = MemcpyGbps(std::max<size_t>(4 * llc, 64u << 20));
  if (f.Bool("json")) {
    std::printf(
        "{\"context\": %llu, \"budget_frac\": %g, \"head_dim\": %u, \"q_heads\": %u, \"kv_heads\": "
        "%u, "
        "\"block_size\": %u, \"granularity\": \"%s\", \"threads\": %u, \"cpu_path\": \"%s\", "
        "\"dense_ms\": %.4f, "
        "\"sparse_ms\": %.4f, \"speedup\": %.3f, \"dense_gbps\": %.3f, \"sparse_gbps\": %.3f, "
        "\"memcpy_gbps\": %.3f, \"idle\": %s, \"working_set_mib\": %.1f, "
        "\"reference_sparse_ms\": %s, \"fast_over_reference\": %s}\n",
        (unsigned long long)T, frac, D, Hq, Hkv, B, gran.c_str(), threads, attn::CpuDecodePath(),
        dense_ms, sparse_ms, dense_ms / sparse_ms, dense_gbps, sparse_gbps, memcpy_gbps,
        idle ? "true" : "false", copies * layer_bytes / 1048576.0, Num(ref_ms).c_str(),
        Num(ref_ms / sparse_ms).c_str());
  } else {
    std::printf(
        "dense %.3f ms (%.2f GB/s), sparse %.3f ms (%.2f GB/s): speedup %.2fx; memcpy %.2f GB/s; "
        "the worker's former reference path on the same selection %s ms (fast %sx); idle %s\n",
        dense_ms, dense_gbps, sparse_ms, sparse_gbps, dense_ms / sparse_ms, memcpy_gbps,
        Num(ref_ms).c_str(), Num(ref_ms / sparse_ms).c_str(), idle ? "yes" : "no");
  }
  return 0;
}

}  // namespace kvm::tools

namespace kvm::tools {
int RunBench(const std::vector<std::string>& args) {
  if (args.empty()) throw UsageError("bench needs a target: attention, transport or decode");
  if (args[0] == "attention") return RunBenchAttention({args.begin() + 1, args.end()});
  if (args[0] == "transport") return RunBenchTransport({args.begin() + 1, args.end()});
  if (args[0] == "decode") return RunBenchDecode({args.begin() + 1, args.end()});
  throw UsageError("unknown bench target '" + args[0] + "' (attention, transport, decode)");
}
}  // namespace kvm::tools
