// Selection cost per (step, layer) on synthetic keys (labelled synthetic): Hq 32, Hkv 8, D 128,
// fp16, budget 2048 tokens, B 16, at T = 4K, 32K, 128K, 1M. Rows: PrHS anchor step (exact scoring
// of all keys of the 8 groups + top blocks), PrHS reuse step (gate + plan, no rescan), oracle step.
//   kvm_selector_bench [--max-tokens N] [--json]
// Waits for an idle machine (≥ 90% idle over 1 s, up to ~60 s) before measuring and says whether it
// got one.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "proto/half.h"
#include "selector/baselines.h"
#include "selector/plan.h"
#include "selector/prhs.h"
#include "selector/registry.h"

using namespace kvm;
using Clock = std::chrono::steady_clock;

namespace {
constexpr uint32_t kHq = 32, kHkv = 8, kG = 4, kD = 128, kB = 16;

// Synthetic fp16 keys of one KV head: noise, sinks and clusters of salient tokens aligned to `dir`.
struct SyntheticHead {
  std::vector<uint16_t> k;  // [T][D] (the block layout of contiguous blocks)
  std::vector<const void*> kp;
  sel::HeadSummaries sum{kB, kD, /*minmax=*/true};
  void Make(uint64_t T, const float* dir, uint64_t seed) {
    k.resize(((T + kB - 1) / kB) * kB * kD);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    std::vector<float> row(kD);
    for (uint64_t t = 0; t < T; ++t) {
      const bool salient = t < 4 || (t / 7) % 23 == 5;
      for (uint32_t d = 0; d < kD; ++d) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        row[d] =
            (float((x >> 40) & 0xffff) / 65536.0f - 0.5f) * 1.2f + (salient ? 2.0f * dir[d] : 0.f);
        k[t * kD + d] = FloatToHalf(row[d]);
      }
      sum.Append(t, row.data());
    }
    kp.resize((T + kB - 1) / kB);
    for (size_t b = 0; b < kp.size(); ++b) kp[b] = &k[b * kB * kD];
  }
  attn::HeadKV View(uint64_t T) const {
    return attn::HeadKV{kp.data(), kp.data(),  static_cast<uint32_t>(kp.size()), T, kB,
                        kD,        DType::kF16};
  }
};
// --step-bytes: bytes per decode step at T = 32K (synthetic keys, slowly drifting synthetic
// queries): PrHS with the hot-set diff (what the service streams; reuse steps send nothing) vs a
// dense offload vs a per-step top-k refetch, and the latency of one layer's selection + plan per
// step (8 KV heads), for budgets of 1/16 and 1/8 of the context.
int StepBytes(sel::SelectorOptions o, const ModelShape& shape, const std::vector<float>& dir,
              std::vector<float> q, bool idle, bool json) {
  const uint64_t T0 = 32768, steps = 512;
  std::vector<SyntheticHead> heads(kHkv);
  for (uint32_t h = 0; h < kHkv; ++h) heads[h].Make(T0 + steps, dir.data(), h + 1);
  std::mt19937 rng(9);
  std::normal_distribution<float> n(0.f, 1.f);
  o.prhs.tau_cos = 0.9;
  o.prhs.max_cluster_steps = 32;
  std::string rows;
  for (uint64_t budget : {T0 / 16, T0 / 8}) {
    o.budget_tokens = budget;
    auto prhs = sel::PrhsSelector::Make(o, shape, T0 + steps);
    if (!prhs.ok()) return std::fprintf(stderr, "%s\n", prhs.status().ToString().c_str()), 1;
    std::vector<sel::HotSetMirror> mirrors(
        kHkv, sel::HotSetMirror(static_cast<uint32_t>((*prhs)->HotSetSlots())));
    sel::PlanBytes bytes;
    std::vector<double> lat;
    uint64_t retrieved = 0;
    std::vector<float> qt = q;
    for (uint64_t t = T0; t < T0 + steps; ++t) {
      for (auto& x : qt) x += 0.05f * n(rng);  // slow drift (synthetic)
      const auto a = Clock::now();
      for (uint32_t h = 0; h < kHkv; ++h) {
        const attn::HeadKV kv = heads[h].View(t + 1);
        sel::StepInput in{t, 0, h, &qt[size_t{h} * kG * kD], &kv, &heads[h].sum};
        sel::Selection out;
        sel::PlanStep ps;
        if (!(*prhs)->Select(in, &out).ok() ||
            !mirrors[h]
                 .Plan(out.blocks, t + 1, o.geometry, o.geometry.WindowFirstBlock(t), kB * kD * 2,
                       kD * 2, &ps, &bytes)
                 .ok())
          std::abort();
        retrieved += out.retrieved_heads;
      }
      if (t > T0)
        lat.push_back(std::chrono::duration<double, std::micro>(Clock::now() - a).count());
    }
    std::sort(lat.begin(), lat.end());
    const double p50 = lat[lat.size() / 2], p99 = lat[size_t(0.99 * double(lat.size()))];
    const double dense = double(bytes.dense_equivalent), refetch = double(bytes.topk_refetch);
    char row[512];
    std::snprintf(
        row, sizeof(row),
        "{\"budget_tokens\": %llu, \"streamed_per_step_kb\": %.1f, \"dense_per_step_kb\": "
        "%.1f, \"refetch_per_step_kb\": %.1f, \"streamed_over_dense\": %.4f, "
        "\"streamed_over_refetch\": %.4f, \"retrieval_overhead\": %.3f, \"step_p50_us\": "
        "%.1f, \"step_p99_us\": %.1f}",
        (unsigned long long)budget, bytes.streamed / 1024.0 / steps, dense / 1024.0 / steps,
        refetch / 1024.0 / steps, dense > 0 ? bytes.streamed / dense : 0,
        refetch > 0 ? bytes.streamed / refetch : 0, double(retrieved) / double(steps * kHq), p50,
        p99);
    rows += (rows.empty() ? "" : ", ") + std::string(row);
    if (!json)
      std::printf(
          "budget %llu: streamed %.1f KB/step, dense %.1f KB/step (%.4f), top-k refetch %.1f "
          "KB/step (%.4f), retrieval overhead %.3f, selection+plan p50 %.1f us p99 %.1f us\n",
          (unsigned long long)budget, bytes.streamed / 1024.0 / steps, dense / 1024.0 / steps,
          dense > 0 ? bytes.streamed / dense : 0, refetch / 1024.0 / steps,
          refetch > 0 ? bytes.streamed / refetch : 0, double(retrieved) / double(steps * kHq), p50,
          p99);
  }
  if (json)
    std::printf(
        "{\"synthetic\": true, \"tokens\": %llu, \"steps\": %llu, \"idle\": %s, "
        "\"rows\": [%s]}\n",
        (unsigned long long)T0, (unsigned long long)steps, idle ? "true" : "false", rows.c_str());
  else
    std::printf(
        "(one layer, Hq %u Hkv %u D %u fp16, B %u, T %llu + %llu steps, synthetic keys and "
        "drifting synthetic queries; idle machine: %s)\n",
        kHq, kHkv, kD, kB, (unsigned long long)T0, (unsigned long long)steps, idle ? "yes" : "no");
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  uint64_t max_tokens = 1ull << 20;
  bool json = false, step_bytes = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json"))
      json = true;
    else if (!std::strcmp(argv[i], "--max-tokens") && i + 1 < argc)
      max_tokens = std::strtoull(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "--step-bytes"))
      step_bytes = true;
    else {
      std::fprintf(stderr, "usage: kvm_selector_bench [--max-tokens N] [--step-bytes] [--json]\n");
      return 2;
    }
  }
  const bool idle = bench::WaitForIdle();
  const ModelShape shape{1, kHq, kHkv, kD, DType::kF16, 0};
  sel::SelectorOptions o;
  o.geometry = sel::Geometry{kB, 16, 64};
  o.budget_tokens = 2048;
  o.prhs.tau_cos = 0.0;  // make the reuse row a reuse step
  o.prhs.max_cluster_steps = 0;
  std::mt19937 rng(1);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> dir(kD);
  for (auto& d : dir) d = n(rng) / std::sqrt(float(kD));
  std::vector<float> q(size_t{kHq} * kD);
  for (size_t i = 0; i < q.size(); ++i) q[i] = dir[i % kD] * 8.0f + 0.3f * n(rng);

  if (step_bytes) return StepBytes(o, shape, dir, q, idle, json);
  o.hshare.channels.assign(kHq, {});
  for (auto& ch : o.hshare.channels)
    for (uint32_t c = 0; c < kD / 8; ++c) ch.push_back(c);
  o.dense_layers = 0;  // the one benchmarked layer is a sparse one
  const char* kBaselines[] = {"quest", "hshare", "streaming", "h2o"};
  struct Row {
    uint64_t T;
    double anchor_ms, reuse_us, oracle_ms;
    double base_ms[4];
  };
  std::vector<Row> rows;
  for (uint64_t T : {4096ull, 32768ull, 131072ull, 1048576ull}) {
    if (T > max_tokens) break;
    std::fprintf(stderr, "T = %llu: generating %llu MB of synthetic fp16 keys...\n",
                 (unsigned long long)T, (unsigned long long)(T * kHkv * kD * 2 >> 20));
    std::vector<SyntheticHead> heads(kHkv);
    for (uint32_t h = 0; h < kHkv; ++h) heads[h].Make(T + 64, dir.data(), h + 1);
    auto prhs = sel::PrhsSelector::Make(o, shape, T + 64);
    auto oracle = sel::OracleSelector::Make(o, shape, T + 64);
    if (!prhs.ok() || !oracle.ok())
      return std::fprintf(stderr, "%s\n", prhs.status().ToString().c_str()), 1;
    std::vector<sel::HotSetMirror> mirrors(
        kHkv, sel::HotSetMirror(static_cast<uint32_t>((*prhs)->HotSetSlots())));
    sel::PlanBytes bytes;
    auto step = [&](sel::Selector& s, uint64_t t, bool plan) {
      for (uint32_t h = 0; h < kHkv; ++h) {
        const attn::HeadKV kv = heads[h].View(t + 1);
        sel::StepInput in{t, 0, h, &q[size_t{h} * kG * kD], &kv, &heads[h].sum};
        sel::Selection out;
        if (!s.Select(in, &out).ok()) std::abort();
        if (plan) {
          sel::PlanStep ps;
          if (!mirrors[h]
                   .Plan(out.blocks, t + 1, o.geometry, o.geometry.WindowFirstBlock(t), kB * kD * 2,
                         kD * 2, &ps, &bytes)
                   .ok())
            std::abort();
        }
      }
    };
    const int anchor_iters = T >= (1u << 20) ? 2 : 5;
    auto t0 = Clock::now();
    for (int i = 0; i < anchor_iters; ++i) {
      // Fresh selector state each time: every Select is an anchor.
      auto fresh = sel::PrhsSelector::Make(o, shape, T + 64);
      step(**fresh, T - 1, false);
    }
    const double anchor_ms =
        std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / anchor_iters;
    step(**prhs, T - 1, true);  // anchor, then reuse steps
    const int reuse_iters = 2000;
    t0 = Clock::now();
    for (int i = 0; i < reuse_iters; ++i) step(**prhs, T + (i % 32), true);
    const double reuse_us =
        std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / reuse_iters;
    t0 = Clock::now();
    for (int i = 0; i < anchor_iters; ++i) step(**oracle, T - 1, false);
    const double oracle_ms =
        std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / anchor_iters;
    Row row{T, anchor_ms, reuse_us, oracle_ms, {}};
    for (int bi = 0; bi < 4; ++bi) {
      auto b = sel::MakeSelector(kBaselines[bi], o, shape, T + 64);
      if (!b.ok()) return std::fprintf(stderr, "%s\n", b.status().ToString().c_str()), 1;
      step(**b, T - 2, false);  // warm (H2O's first step sees every block)
      t0 = Clock::now();
      for (int i = 0; i < anchor_iters; ++i)
        step(**b, T - 1 + (i % 2), false);  // even and odd steps (HShare)
      row.base_ms[bi] =
          std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / anchor_iters;
    }
    rows.push_back(row);
    std::fprintf(stderr, "  anchor %.2f ms, reuse %.2f us, oracle %.2f ms per (step, layer)\n",
                 anchor_ms, reuse_us, oracle_ms);
  }
  double r32 = 0, r1m = 0;
  for (auto& r : rows) {
    if (r.T == 32768) r32 = r.reuse_us;
    if (r.T == 1048576) r1m = r.reuse_us;
  }
  if (json) {
    std::printf("{\"synthetic\": true, \"idle\": %s, \"rows\": [", idle ? "true" : "false");
    for (size_t i = 0; i < rows.size(); ++i)
      std::printf(
          "%s{\"tokens\": %llu, \"prhs_anchor_ms\": %.3f, \"prhs_reuse_us\": %.3f, \"oracle_ms\": "
          "%.3f, "
          "\"quest_ms\": %.3f, \"hshare_ms\": %.3f, \"streaming_ms\": %.4f, \"h2o_ms\": %.4f}",
          i ? ", " : "", (unsigned long long)rows[i].T, rows[i].anchor_ms, rows[i].reuse_us,
          rows[i].oracle_ms, rows[i].base_ms[0], rows[i].base_ms[1], rows[i].base_ms[2],
          rows[i].base_ms[3]);
    std::printf("], \"reuse_cost_1m_over_32k\": %s}\n",
                r1m > 0 && r32 > 0 ? std::to_string(r1m / r32).c_str() : "null");
  } else {
    std::printf(
        "synthetic keys; Hq %u Hkv %u D %u fp16, B %u, budget 2048 tokens; idle machine: %s\n", kHq,
        kHkv, kD, kB, idle ? "yes" : "NO (numbers are noisy)");
    std::printf(
        "| T | PrHS anchor (ms) | PrHS reuse: gate + plan (us) | oracle (ms) | Quest (ms) | "
        "HShare, mean of a "
        "retrieval and a shared step (ms) | StreamingLLM (ms) | H2O select (ms) "
        "|\n|---|---|---|---|---|---|---|---|\n");
    for (auto& r : rows)
      std::printf("| %llu | %.2f | %.2f | %.2f | %.2f | %.2f | %.4f | %.4f |\n",
                  (unsigned long long)r.T, r.anchor_ms, r.reuse_us, r.oracle_ms, r.base_ms[0],
                  r.base_ms[1], r.base_ms[2], r.base_ms[3]);
    if (r1m > 0 && r32 > 0) std::printf("reuse cost(1M) / cost(32K) = %.2f\n", r1m / r32);
  }
  return 0;
}
