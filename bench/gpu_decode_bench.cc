// GPU decode attention: dense vs sparse (1/8 of the blocks, a fresh random selection per
// iteration), batch 1 and 16, T = 2K, 4K, 32K, LLaMA-2-7B attention shape (Hq 32, Hkv 32, D 128,
// fp16, B 16) as in the paper's point (9.9x at batch 16, 2K, 1/8, A100), plus the fraction of HBM
// bandwidth reached.
//   kvm_gpu_decode_bench [--hbm-gbps 4800] [--kv-heads 32]
// Exits 77 without a device.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/cuda.h"
#include "attention/decode.h"
#include "attention/reference.h"

using namespace kvm;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  double hbm_gbps = 4800;  // H200 peak; pass the lent device's
  uint32_t Hkv = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--hbm-gbps")) hbm_gbps = std::atof(argv[i + 1]);
    if (!std::strcmp(argv[i], "--kv-heads")) Hkv = static_cast<uint32_t>(std::atoi(argv[i + 1]));
  }
  if (Status s = attn::CudaAvailable(); !s.ok())
    return std::printf("skipped: %s\n", s.ToString().c_str()), 77;
  const uint32_t Hq = 32, D = 128, B = 16, g = Hq / Hkv;
  std::printf(
      "| batch | T | dense (ms) | sparse 1/8 (ms) | speedup | dense HBM fraction | sparse HBM "
      "fraction |\n"
      "|---|---|---|---|---|---|---|\n");
  std::mt19937 rng(1);
  for (uint32_t batch : {1u, 16u}) {
    for (uint64_t T : {2048ull, 4096ull, 32768ull}) {
      const uint32_t nb = static_cast<uint32_t>(T / B), sel = nb / 8;
      const size_t bb = size_t{B} * D * 2, seq_bytes = size_t{Hkv} * nb * bb;
      std::vector<void*> kv(batch), vv(batch);
      for (uint32_t s = 0; s < batch; ++s) {
        kv[s] = *attn::cuda::Malloc(seq_bytes);
        vv[s] = *attn::cuda::Malloc(seq_bytes);
        std::vector<uint16_t> fill(seq_bytes / 2, 0x3000);
        (void)attn::cuda::CopyToDevice(kv[s], fill.data(), seq_bytes);
        (void)attn::cuda::CopyToDevice(vv[s], fill.data(), seq_bytes);
      }
      std::vector<float> q(size_t{Hq} * D, 0.01f);
      void* dq = *attn::cuda::Malloc(q.size() * 4);
      (void)attn::cuda::CopyToDevice(dq, q.data(), q.size() * 4);
      void* dout = *attn::cuda::Malloc(size_t{batch} * q.size() * 4);
      // Device block tables: dense (every block) and several random sparse ones per sequence.
      auto table = [&](uint32_t s, bool sparse, std::vector<uint32_t>* n_out) {
        std::vector<const void*> k, v;
        const uint32_t per = sparse ? sel : nb;
        for (uint32_t h = 0; h < Hkv; ++h) {
          std::vector<uint32_t> pick(nb);
          std::iota(pick.begin(), pick.end(), 0u);
          if (sparse) {
            for (uint32_t i = 0; i < sel; ++i) std::swap(pick[i], pick[i + rng() % (nb - i)]);
            pick.resize(sel);
            std::sort(pick.begin(), pick.end());
          }
          for (uint32_t b : pick) {
            k.push_back(static_cast<uint8_t*>(kv[s]) + (size_t{h} * nb + b) * bb);
            v.push_back(static_cast<uint8_t*>(vv[s]) + (size_t{h} * nb + b) * bb);
          }
          n_out->push_back(per);
        }
        void* dk = *attn::cuda::Malloc(k.size() * sizeof(void*));
        void* dv = *attn::cuda::Malloc(v.size() * sizeof(void*));
        (void)attn::cuda::CopyToDevice(dk, k.data(), k.size() * sizeof(void*));
        (void)attn::cuda::CopyToDevice(dv, v.data(), v.size() * sizeof(void*));
        return std::make_pair(dk, dv);
      };
      auto run = [&](bool sparse, int iters) {
        struct Seq {
          attn::DecodeParams p;
          void* ws;
          size_t wsb;
          uint32_t splits;
        };
        std::vector<std::vector<Seq>> variants(4);
        for (auto& var : variants)
          for (uint32_t s = 0; s < batch; ++s) {
            std::vector<uint32_t> n;
            auto [dk, dv] = table(s, sparse, &n);
            void* dn = *attn::cuda::Malloc(n.size() * 4);
            (void)attn::cuda::CopyToDevice(dn, n.data(), n.size() * 4);
            attn::DecodeParams p;
            p.q = static_cast<const float*>(dq);
            p.out = static_cast<float*>(dout) + size_t{s} * q.size();
            p.kv_heads = Hkv;
            p.group = g;
            p.head_dim = D;
            p.block_size = B;
            p.dtype = DType::kF16;
            p.k_blocks = static_cast<const void* const*>(dk);
            p.v_blocks = static_cast<const void* const*>(dv);
            p.n_blocks = static_cast<const uint32_t*>(dn);
            p.max_blocks = sparse ? sel : nb;
            const uint32_t splits = attn::cuda::DecodeSplits(Hkv, p.max_blocks);
            const size_t wsb = attn::cuda::DecodeWorkspaceBytes(Hkv, g, D, splits);
            var.push_back({p, *attn::cuda::Malloc(wsb), wsb, splits});
          }
        for (auto& sq : variants[0])
          (void)attn::cuda::Decode(sq.p, sq.splits, sq.ws, sq.wsb);  // warm up
        (void)attn::cuda::Synchronize();
        const auto t0 = Clock::now();
        for (int i = 0; i < iters; ++i)
          for (auto& sq : variants[i % variants.size()])
            (void)attn::cuda::Decode(sq.p, sq.splits, sq.ws, sq.wsb);
        (void)attn::cuda::Synchronize();
        return std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / iters;
      };
      const double dense = run(false, 50), sparse = run(true, 50);
      const double dense_bytes = double(batch) * 2 * seq_bytes,
                   sparse_bytes = dense_bytes * sel / nb;
      std::printf("| %u | %llu | %.4f | %.4f | %.2f | %.3f | %.3f |\n", batch,
                  (unsigned long long)T, dense, sparse, dense / sparse,
                  dense_bytes / (dense * 1e6) / hbm_gbps, sparse_bytes / (sparse * 1e6) / hbm_gbps);
      std::fflush(stdout);
    }
  }
  std::printf(
      "(Hq %u Hkv %u D %u fp16, B %u; HBM peak assumed %.0f GB/s; device memory is not freed "
      "between rows)\n",
      Hq, Hkv, D, B, hbm_gbps);
  return 0;
}
