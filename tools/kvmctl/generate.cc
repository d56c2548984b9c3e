// kvmctl generate: the reference worker on the local dense cache.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "client/llama.h"
#include "client/tokenizer.h"
#include "commands.h"
#include "flags.h"

namespace kvm::tools {

int RunGenerate(const std::vector<std::string>& args) {
  Flags f(args,
          {"model", "tokenizer", "prompt", "tokens", "offset", "count", "max-new", "temperature",
           "seed", "kv-dtype"},
          {"greedy"});
  const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
  const std::string tok_path = PathOrDefault(f, "tokenizer", "models/austen/tokenizer.model");
  if (f.Has("prompt") == f.Has("tokens"))
    throw UsageError("give exactly one of --prompt and --tokens");
  if (!f.Has("tokens") && (f.Has("offset") || f.Has("count")))
    throw UsageError("--offset/--count need --tokens");
  const int64_t max_new = f.Int("max-new", 64, 0, 1 << 20);
  const double temperature = f.Double("temperature", 1.0, 1e-3, 100.0);
  const auto seed = static_cast<uint32_t>(f.Int("seed", 1, 0, UINT32_MAX));
  auto dtype = ParseDType(f.Str("kv-dtype", "fp32"));
  if (!dtype.ok()) throw UsageError("--kv-dtype: " + dtype.status().message());

  auto model = client::LlamaModel::Load(model_path);
  if (!model.ok())
    return std::fprintf(stderr, "kvmctl generate: %s\n", model.status().ToString().c_str()), 1;
  auto tok = client::Tokenizer::Load(tok_path);
  if (!tok.ok())
    return std::fprintf(stderr, "kvmctl generate: %s\n", tok.status().ToString().c_str()), 1;
  const auto& cfg = (*model)->config();

  std::vector<uint32_t> ids;
  if (auto p = f.Str("prompt")) {
    ids.push_back(client::Tokenizer::kBos);
    for (uint32_t t : (*tok)->Encode(*p)) ids.push_back(t);
  } else {
    auto all = client::ReadTokenFile(*f.Str("tokens"));
    if (!all.ok())
      return std::fprintf(stderr, "kvmctl generate: %s\n", all.status().ToString().c_str()), 1;
    const auto offset = static_cast<uint64_t>(f.Int("offset", 0, 0, INT64_MAX));
    if (offset >= all->size())
      throw UsageError("--offset " + std::to_string(offset) + " is past the end of the token file");
    const uint64_t count = static_cast<uint64_t>(
        f.Int("count", static_cast<int64_t>(all->size() - offset), 1, INT64_MAX));
    if (offset + count > all->size())
      throw UsageError("--offset + --count is past the end of the token file");
    ids.assign(all->begin() + static_cast<ptrdiff_t>(offset),
               all->begin() + static_cast<ptrdiff_t>(offset + count));
  }
  if (ids.empty()) throw UsageError("the prompt is empty");
  if (ids.size() + static_cast<uint64_t>(max_new) > cfg.seq_len)
    throw UsageError("prompt (" + std::to_string(ids.size()) + " tokens) + --max-new " +
                     std::to_string(max_new) + " exceeds the model's trained length " +
                     std::to_string(cfg.seq_len));
  for (uint32_t t : ids)
    if (t >= cfg.vocab_size)
      throw UsageError("token id " + std::to_string(t) + " is outside the vocabulary");

  auto kv = client::DenseKvSource::Make((*model)->Shape(*dtype), 16);
  if (!kv.ok())
    return std::fprintf(stderr, "kvmctl generate: %s\n", kv.status().ToString().c_str()), 1;
  client::ReferenceWorker worker(**model, kv->get());
  std::vector<float> logits(cfg.vocab_size);
  std::mt19937 rng(seed);
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t pos = 0;
  for (; pos < ids.size(); ++pos) {
    Status s = worker.Forward(ids[pos], pos, pos + 1 == ids.size() ? logits.data() : nullptr);
    if (!s.ok()) return std::fprintf(stderr, "kvmctl generate: %s\n", s.ToString().c_str()), 1;
  }
  const auto t1 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "[prompt: %zu tokens] %s\n", ids.size(), (*tok)->Decode(ids).c_str());
  std::vector<uint32_t> out;
  for (int64_t i = 0; i < max_new; ++i) {
    uint32_t next = 0;
    if (f.Bool("greedy")) {
      for (uint32_t v = 1; v < cfg.vocab_size; ++v)
        if (logits[v] > logits[next]) next = v;
    } else {
      double mx = -INFINITY;
      for (float l : logits) mx = std::max(mx, double(l));
      std::vector<double> w(cfg.vocab_size);
      for (uint32_t v = 0; v < cfg.vocab_size; ++v) w[v] = std::exp((logits[v] - mx) / temperature);
      next = static_cast<uint32_t>(std::discrete_distribution<uint32_t>(w.begin(), w.end())(rng));
    }
    out.push_back(next);
    if (next == client::Tokenizer::kEos) break;
    Status s = worker.Forward(next, pos++, logits.data());
    if (!s.ok()) return std::fprintf(stderr, "kvmctl generate: %s\n", s.ToString().c_str()), 1;
  }
  const auto t2 = std::chrono::steady_clock::now();
  std::printf("%s\n", (*tok)->Decode(out).c_str());
  const double pre = std::chrono::duration<double>(t1 - t0).count(),
               dec = std::chrono::duration<double>(t2 - t1).count();
  std::fprintf(
      stderr,
      "[%zu prompt tokens in %.2f s, %zu new tokens in %.2f s = %.1f tokens/s; KV %s, dense]\n",
      ids.size(), pre, out.size(), dec, out.empty() ? 0.0 : out.size() / dec, DTypeName(*dtype));
  return 0;
}

}  // namespace kvm::tools
