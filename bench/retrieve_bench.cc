// Retrieve-layer throughput and latency of the service on loopback (issue 9): an in-process
// kvmanager (Server + BlockStore, host tier large enough for everything), `--sequences` sequences
// of synthetic fp16 KV (L 2, Hq 32, Hkv 8, D 128, B 16; labelled synthetic) of `--tokens` tokens,
// PrHS with a budget of 1/8; `--clients` connections issue RetrieveLayer requests (every KV head of
// a random layer, fresh random queries, so every request re-anchors and the plan sends the blocks
// that changed) for `--seconds`. Prints requests/s, p50/p99 latency, the blocks streamed, and the
// time of a memcpy of the same K bytes (what a retrieval must at least read) measured in the run:
// warm (memcpy_layer_k_ms) and, like for like, cold from `--clients` threads at once
// (memcpy_ms_per_request: the median of 9 rounds before the retrievals and 9 after them, so that
// the machine's drift during the run is in it; memcpy_ms_before and memcpy_ms_after are the two
// halves' medians), against the engine's own time per request (engine_ms_p50, from the replies:
// queueing excluded) — time_over_memcpy is their ratio.
//   kvm_retrieve_bench [--sequences 64] [--tokens 32768] [--clients 4] [--seconds 20] [--json]
//                      [--no-gpu]   (score on the CPU even when the store has a GPU tier)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "client/client.h"
#include "kvmanager/server.h"
#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "selector/wire_options.h"

using namespace kvm;
using Clock = std::chrono::steady_clock;

namespace {
uint64_t MemAvailable() {
  std::ifstream f("/proc/meminfo");
  std::string k;
  uint64_t v = 0;
  std::string unit;
  while (f >> k >> v >> unit)
    if (k == "MemAvailable:") return v * 1024;
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  uint64_t sequences = 64, tokens = 32768;
  uint32_t clients = 4;
  double seconds = 20;
  bool json = false, gpu = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::strtod(argv[++i], nullptr) : -1.0; };
    if (a == "--json")
      json = true;
    else if (a == "--no-gpu")
      gpu = false;
    else if (a == "--sequences")
      sequences = uint64_t(next());
    else if (a == "--tokens")
      tokens = uint64_t(next());
    else if (a == "--clients")
      clients = uint32_t(next());
    else if (a == "--seconds")
      seconds = next();
    else
      return std::fprintf(stderr,
                          "usage: kvm_retrieve_bench [--sequences N] [--tokens T] [--clients C] "
                          "[--seconds S] [--json] [--no-gpu]\n"),
             2;
  }
  const ModelShape shape{2, 32, 8, 128, DType::kF16, 9};
  const uint32_t B = 16, L = shape.layers, Hkv = shape.kv_heads, D = shape.head_dim;
  const uint32_t g = shape.group_size();
  if (sequences == 0 || tokens < 1024 || clients == 0 || seconds <= 0)
    return std::fprintf(stderr, "kvm_retrieve_bench: bad arguments\n"), 2;
  const uint64_t per_token = uint64_t{L} * Hkv * 2 * D * 2;
  const uint64_t total = sequences * tokens * per_token;
  const uint64_t avail = MemAvailable();
  if (avail && total > avail * 6 / 10)
    return std::fprintf(
               stderr,
               "kvm_retrieve_bench: %llu sequences x %llu tokens need %.1f GiB of host tier, "
               "more than 60%% of the %.1f GiB available; use fewer --sequences or "
               "--tokens\n",
               (unsigned long long)sequences, (unsigned long long)tokens, double(total) / (1 << 30),
               double(avail) / (1 << 30)),
           2;
  const std::string dir = "/tmp/kvm_retrieve_bench";
  std::filesystem::remove_all(dir);
  store::StoreOptions so;
  so.dir = dir;
  so.host_capacity_bytes = total + total / 8 + (64 << 20);
  so.gpu = gpu;
  auto st = store::BlockStore::Open(so);
  if (!st.ok()) return std::fprintf(stderr, "%s\n", st.status().ToString().c_str()), 1;
  server::ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.handler.tenants = {{"bench", "bench", true}};
  o.worker_threads = 2;
  auto srv = server::Server::Start(o, st->get());
  if (!srv.ok()) return std::fprintf(stderr, "%s\n", srv.status().ToString().c_str()), 1;
  client::ConnectOptions co{.address = (*srv)->address(), .tenant = "bench", .token = "bench"};

  // Load: every sequence gets `tokens` tokens of random fp16 KV, 256 tokens per Append.
  sel::SelectorOptions sopt;
  sopt.geometry = {B, 16, 64};
  sopt.budget_tokens = tokens / 8;
  auto seeder = client::Client::Connect(co);
  if (!seeder.ok()) return std::fprintf(stderr, "%s\n", seeder.status().ToString().c_str()), 1;
  const uint64_t slots = 4 * tokens / B;  // plenty (the mirror keeps the plan honest anyway)
  std::mt19937 rng(7);
  std::normal_distribution<float> n01(0.f, 1.f);
  const uint64_t chunk = 256;
  std::vector<uint8_t> payload(chunk * per_token);
  auto* half = reinterpret_cast<uint16_t*>(payload.data());
  for (size_t i = 0; i < payload.size() / 2; ++i) half[i] = FloatToHalf(n01(rng));
  std::fprintf(stderr, "loading %llu sequences x %llu tokens (%.2f GiB, synthetic fp16)...\n",
               (unsigned long long)sequences, (unsigned long long)tokens,
               double(total) / (1 << 30));
  for (uint64_t s = 1; s <= sequences; ++s) {
    wire::CreateSequence c;
    c.set_sequence_id(s);
    wire::ToWire(shape, c.mutable_shape());
    c.set_block_size(B);
    c.set_durability(wire::CACHE);
    sel::ToWire({"prhs", sopt}, c.mutable_selector());
    c.set_hot_set_slots(uint32_t(slots));
    if (auto r = (*seeder)->Call(wire::MessageType::kCreateSequence, c); !r.ok())
      return std::fprintf(stderr, "create: %s\n", r.status().ToString().c_str()), 1;
    for (uint64_t t = 0; t < tokens; t += chunk) {
      wire::Append a;
      a.set_sequence_id(s);
      a.set_start_position(t);
      for (uint64_t i = 0; i < chunk; ++i) a.add_token_ids(uint32_t((s * 7919 + t + i) % 4096));
      if (Status e = (*seeder)->CallAsync(wire::MessageType::kAppend, a, payload); !e.ok())
        return std::fprintf(stderr, "append: %s\n", e.ToString().c_str()), 1;
    }
    if (Status e = (*seeder)->Flush(); !e.ok())
      return std::fprintf(stderr, "append: %s\n", e.ToString().c_str()), 1;
    std::fprintf(stderr, "\r  %llu/%llu", (unsigned long long)s, (unsigned long long)sequences);
  }
  std::fprintf(stderr, "\n");
  const bool idle = bench::WaitForIdle();

  // Reference in the same run: memcpy of one layer's K of one sequence (what a retrieval reads).
  const size_t kbytes = size_t(tokens) * Hkv * D * 2;
  std::vector<uint8_t> src(kbytes, 1), dst(kbytes);
  double memcpy_s = 1e9;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), kbytes);
    memcpy_s = std::min(memcpy_s, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  // The like-for-like reference: `clients` threads at once, each copying that many bytes from
  // buffers far larger than the last-level cache (every copy reads cold memory, as a retrieval
  // over 64 sequences does); 9 rounds here and 9 after the retrievals.
  auto cold_rounds = [&]() {
    const size_t slices = std::max<size_t>(8, (size_t{512} << 20) / clients / kbytes);
    std::vector<std::vector<uint8_t>> big(clients), out(clients);
    for (uint32_t c = 0; c < clients; ++c) {
      big[c].assign(slices * kbytes, 1);
      out[c].assign(kbytes, 0);
    }
    std::vector<double> rounds;
    for (size_t r = 0; r < 9; ++r) {
      std::vector<std::thread> ts;
      const auto t0 = Clock::now();
      for (uint32_t c = 0; c < clients; ++c)
        ts.emplace_back([&, c] {
          std::memcpy(out[c].data(), big[c].data() + ((r * 3 + c) % slices) * kbytes, kbytes);
        });
      for (auto& t : ts) t.join();
      rounds.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    return rounds;
  };
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const std::vector<double> cold_before = cold_rounds();

  std::atomic<bool> stop{false};
  std::vector<std::vector<double>> lat(clients), engine(clients);
  std::vector<uint64_t> bytes(clients, 0), errors(clients, 0);
  std::vector<std::thread> th;
  const auto t0 = Clock::now();
  for (uint32_t c = 0; c < clients; ++c)
    th.emplace_back([&, c] {
      auto conn = client::Client::Connect(co);
      if (!conn.ok()) {
        ++errors[c];
        return;
      }
      std::mt19937 r(100 + c);
      std::normal_distribution<float> n(0.f, 1.f);
      std::vector<float> q(size_t{Hkv} * g * D);
      while (!stop) {
        const uint64_t seq = 1 + (r() % sequences);
        wire::RetrieveLayer m;
        m.set_sequence_id(seq);
        m.set_step(tokens - 1);
        m.set_layer(uint32_t(r() % L));
        for (uint32_t h = 0; h < Hkv; ++h) m.add_kv_heads(h);
        for (auto& x : q) x = 3.f * n(r);
        const auto* qb = reinterpret_cast<const uint8_t*>(q.data());
        const auto a = Clock::now();
        auto f =
            (*conn)->Call(wire::MessageType::kRetrieveLayer, m, {qb, q.size() * sizeof(float)});
        if (!f.ok()) {
          ++errors[c];
          continue;
        }
        lat[c].push_back(std::chrono::duration<double>(Clock::now() - a).count());
        bytes[c] += f->payload.size();
        wire::RetrieveLayerReply rep;
        if (wire::ParseProto(*f, &rep).ok()) engine[c].push_back(rep.service_seconds());
      }
    });
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : th) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> cold = cold_rounds();
  const double memcpy_after_s = median(cold), memcpy_before_s = median(cold_before);
  cold.insert(cold.end(), cold_before.begin(), cold_before.end());
  const double memcpy_cold_s = median(cold);
  std::vector<double> all, eng;
  uint64_t sent = 0, errs = 0;
  for (uint32_t c = 0; c < clients; ++c) {
    all.insert(all.end(), lat[c].begin(), lat[c].end());
    eng.insert(eng.end(), engine[c].begin(), engine[c].end());
    sent += bytes[c];
    errs += errors[c];
  }
  std::sort(all.begin(), all.end());
  const double engine_p50 = eng.empty() ? NAN : median(eng);
  auto pct = [&](double p) {
    return all.empty() ? 0.0 : all[std::min(all.size() - 1, size_t(p * double(all.size())))];
  };
  const double rps = double(all.size()) / wall;
  const store::StoreStats tier = (*st)->Stats();
  (*srv)->Stop();
  srv->reset();
  st->reset();
  std::filesystem::remove_all(dir);
  if (json) {
    std::printf(
        "{\"sequences\": %llu, \"tokens\": %llu, \"layers\": %u, \"q_heads\": %u, \"kv_heads\": "
        "%u, "
        "\"head_dim\": %u, \"synthetic\": true, \"clients\": %u, \"requests\": %zu, \"errors\": "
        "%llu, "
        "\"requests_per_second\": %.3f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
        "\"streamed_mb_per_request\": %.3f, \"memcpy_layer_k_ms\": %.3f, \"idle\": %s, "
        "\"gpu_tier\": \"%s\", \"gpu_scored\": %llu, \"gpu_refused\": %llu, "
        "\"read_bytes_per_request\": %zu, \"memcpy_ms_per_request\": %.3f, \"engine_ms_p50\": "
        "%.3f, "
        "\"time_over_memcpy\": %.3f, \"memcpy_ms_before\": %.3f, \"memcpy_ms_after\": %.3f}\n",
        (unsigned long long)sequences, (unsigned long long)tokens, L, shape.q_heads, Hkv, D,
        clients, all.size(), (unsigned long long)errs, rps, pct(0.5) * 1e3, pct(0.99) * 1e3,
        all.empty() ? 0.0 : double(sent) / double(all.size()) / 1e6, memcpy_s * 1e3,
        idle ? "true" : "false", tier.gpu_tier.c_str(), (unsigned long long)tier.gpu.scored,
        (unsigned long long)tier.gpu.refused, kbytes, memcpy_cold_s * 1e3, engine_p50 * 1e3,
        engine_p50 / memcpy_cold_s, memcpy_before_s * 1e3, memcpy_after_s * 1e3);
  } else {
    std::printf(
        "retrieve layer, %llu sequences x %llu tokens (synthetic), L %u Hq %u Hkv %u D %u, "
        "%u clients\n",
        (unsigned long long)sequences, (unsigned long long)tokens, L, shape.q_heads, Hkv, D,
        clients);
    std::printf(
        "  %zu requests in %.1f s: %.2f req/s, p50 %.2f ms, p99 %.2f ms, %.2f MB streamed "
        "per request, %llu errors\n",
        all.size(), wall, rps, pct(0.5) * 1e3, pct(0.99) * 1e3,
        all.empty() ? 0.0 : double(sent) / double(all.size()) / 1e6, (unsigned long long)errs);
    std::printf("  reference: memcpy of one layer's K of one sequence (%.1f MB) %.2f ms; idle %s\n",
                double(kbytes) / 1e6, memcpy_s * 1e3, idle ? "yes" : "no");
    std::printf(
        "  engine p50 %.2f ms per request against %.2f ms for %u threads copying that many cold "
        "bytes at once (%.2f ms before the retrievals, %.2f after): %.2fx\n",
        engine_p50 * 1e3, memcpy_cold_s * 1e3, clients, memcpy_before_s * 1e3, memcpy_after_s * 1e3,
        engine_p50 / memcpy_cold_s);
    std::printf("  GPU tier: %s (%llu scoring passes there, %llu refused)\n", tier.gpu_tier.c_str(),
                (unsigned long long)tier.gpu.scored, (unsigned long long)tier.gpu.refused);
  }
  return errs ? 1 : 0;
}
