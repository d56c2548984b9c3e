// kvmctl attn-stats: how concentrated the reference model's attention is, and how fast queries
// drift.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "attention/reference.h"
#include "client/llama.h"
#include "client/tokenizer.h"
#include "commands.h"
#include "flags.h"

namespace kvm::tools {

int RunAttnStats(const std::vector<std::string>& args) {
  Flags f(args, {"model", "tokens", "offset", "context", "queries", "block-size", "budget-frac"},
          {"json"});
  const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
  const std::string tokens_path = PathOrDefault(f, "tokens", "models/austen/heldout.u16");
  auto model = client::LlamaModel::Load(model_path);
  if (!model.ok())
    return std::fprintf(stderr, "kvmctl attn-stats: %s\n", model.status().ToString().c_str()), 1;
  const auto& cfg = (*model)->config();
  const uint64_t context = static_cast<uint64_t>(f.Int("context", cfg.seq_len, 2, cfg.seq_len));
  const uint64_t queries =
      static_cast<uint64_t>(f.Int("queries", 64, 1, static_cast<int64_t>(context)));
  const uint32_t B = static_cast<uint32_t>(f.Int("block-size", 16, 1, 1024));
  const double frac = f.Double("budget-frac", 0.125, 1e-6, 1.0);
  auto ids = client::ReadTokenFile(tokens_path);
  if (!ids.ok())
    return std::fprintf(stderr, "kvmctl attn-stats: %s\n", ids.status().ToString().c_str()), 1;
  const uint64_t offset = static_cast<uint64_t>(f.Int("offset", 0, 0, INT64_MAX));
  if (offset + context > ids->size())
    throw UsageError("--offset + --context is past the end of the token file");

  const uint32_t L = cfg.n_layers, Hq = cfg.n_heads, Hkv = cfg.n_kv_heads, hd = cfg.head_dim(),
                 g = Hq / Hkv;
  auto kv = client::DenseKvSource::Make((*model)->Shape(DType::kF32), B);
  if (!kv.ok())
    return std::fprintf(stderr, "kvmctl attn-stats: %s\n", kv.status().ToString().c_str()), 1;
  client::ReferenceWorker worker(**model, kv->get());
  std::vector<float> qs(size_t{L} * context * Hq * hd);  // [L][pos][Hq][hd]
  worker.on_layer = [&](const client::LayerTrace& t) {
    std::copy(t.q, t.q + size_t{Hq} * hd, &qs[(size_t{t.layer} * context + t.pos) * Hq * hd]);
  };
  for (uint64_t p = 0; p < context; ++p) {
    Status s = worker.Forward((*ids)[offset + p], p, nullptr);
    if (!s.ok()) return std::fprintf(stderr, "kvmctl attn-stats: %s\n", s.ToString().c_str()), 1;
    if (p % 128 == 0)
      std::fprintf(stderr, "\rprefill %llu/%llu", (unsigned long long)p,
                   (unsigned long long)context);
  }
  std::fprintf(stderr, "\rprefill done            \n");

  // Oracle retained mass at `frac` of the context, token and block granularity (selectors.md §0.1,
  // §0.7).
  double tok_sum = 0, blk_sum = 0;
  uint64_t n = 0;
  const float scale = 1.0f / std::sqrt(float(hd));
  for (uint64_t pos = context - queries; pos < context; ++pos) {
    const uint64_t T = pos + 1;
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t kh = 0; kh < Hkv; ++kh) {
        const attn::HeadKV view = (*kv)->View(l, kh, T);
        std::vector<std::vector<float>> p(g, std::vector<float>(T));
        const uint64_t nb = (T + B - 1) / B;
        std::vector<float> agg(nb, 0.f);
        for (uint32_t j = 0; j < g; ++j) {
          const float* q = &qs[((size_t{l} * context + pos) * Hq + kh * g + j) * hd];
          attn::ScoreKeys(q, view, scale, p[j].data());
          attn::Softmax(p[j].data(), T, p[j].data());
          for (uint64_t t = 0; t < T; ++t) agg[t / B] += p[j][t];
        }
        const uint64_t kt = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(frac * T)));
        const uint64_t kb = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(frac * nb)));
        const auto top_blocks = attn::TopK(agg.data(), nb, kb);
        for (uint32_t j = 0; j < g; ++j) {
          std::vector<float> s = p[j];
          std::nth_element(s.begin(), s.begin() + static_cast<ptrdiff_t>(kt - 1), s.end(),
                           std::greater<float>());
          tok_sum += std::accumulate(s.begin(), s.begin() + static_cast<ptrdiff_t>(kt), 0.0);
          double kept = 0;
          for (uint32_t b : top_blocks)
            for (uint64_t t = uint64_t{b} * B; t < std::min<uint64_t>(T, uint64_t{b + 1} * B); ++t)
              kept += p[j][t];
          blk_sum += kept;
          ++n;
        }
      }
  }
  // Query drift: cosine between post-RoPE queries of one head at lag k, over the second half.
  const int lags[] = {1, 2, 4, 8, 16};
  double cos_mean[5] = {}, cos_ge[5] = {};
  uint64_t cn[5] = {};
  for (int li = 0; li < 5; ++li)
    for (uint64_t pos = context / 2; pos < context; ++pos)
      for (uint32_t l = 0; l < L; ++l)
        for (uint32_t h = 0; h < Hq; ++h) {
          const float* a = &qs[((size_t{l} * context + pos) * Hq + h) * hd];
          const float* b = &qs[((size_t{l} * context + pos - lags[li]) * Hq + h) * hd];
          double ab = 0, aa = 0, bb = 0;
          for (uint32_t i = 0; i < hd; ++i)
            ab += double(a[i]) * b[i], aa += double(a[i]) * a[i], bb += double(b[i]) * b[i];
          const double c = ab / std::sqrt(aa * bb);
          cos_mean[li] += c;
          cos_ge[li] += c >= 0.8;
          ++cn[li];
        }
  const double tok_ret = tok_sum / n, blk_ret = blk_sum / n;
  if (f.Bool("json")) {
    std::printf(
        "{\"context\": %llu, \"queries\": %llu, \"budget_frac\": %g, \"block_size\": %u, "
        "\"oracle_token_retained_mass\": %.6f, \"oracle_block_retained_mass\": %.6f, "
        "\"cosine_by_lag\": {",
        (unsigned long long)context, (unsigned long long)queries, frac, B, tok_ret, blk_ret);
    for (int li = 0; li < 5; ++li)
      std::printf("%s\"%d\": {\"mean\": %.4f, \"fraction_ge_0.8\": %.4f}", li ? ", " : "", lags[li],
                  cos_mean[li] / cn[li], cos_ge[li] / cn[li]);
    std::printf("}}\n");
  } else {
    std::printf("context %llu, last %llu queries, budget %.4g of the context\n",
                (unsigned long long)context, (unsigned long long)queries, frac);
    std::printf(
        "oracle retained mass: token-level %.4f, block-level (B=%u, group-aggregated) %.4f\n",
        tok_ret, B, blk_ret);
    std::printf("lag  mean cos  fraction >= 0.8\n");
    for (int li = 0; li < 5; ++li)
      std::printf("%3d  %8.4f  %15.4f\n", lags[li], cos_mean[li] / cn[li], cos_ge[li] / cn[li]);
  }
  return 0;
}

}  // namespace kvm::tools
