// kvmctl needle: needle-in-a-haystack recall from the held-out text. A distinctive span of held-out
// text (the needle) is inserted early in a context of other held-out text; at the end of the
// context the needle's beginning is repeated (the probe) and the model must continue it. Only cases
// where dense attention continues the needle correctly count; among them, how often the selector
// does too.
#include <cstdio>
#include <set>

#include "client/llama.h"
#include "client/tokenizer.h"
#include "commands.h"
#include "eval.h"
#include "flags.h"

namespace kvm::tools {

int RunNeedle(const std::vector<std::string>& args) {
  std::set<std::string> vf(kSelectorValueFlags.begin(), kSelectorValueFlags.end()),
      bf(kSelectorBoolFlags.begin(), kSelectorBoolFlags.end());
  vf.insert(
      {"model", "tokens", "selector", "context", "cases", "needle-len", "probe-len", "kv-dtype"});
  bf.insert({"json"});
  Flags f(args, vf, bf);
  const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
  const std::string tokens_path = PathOrDefault(f, "tokens", "models/austen/heldout.u16");
  const std::string name = f.Required("selector");
  auto model = client::LlamaModel::Load(model_path);
  if (!model.ok())
    return std::fprintf(stderr, "kvmctl needle: %s\n", model.status().ToString().c_str()), 1;
  const auto& cfg = (*model)->config();
  const uint64_t needle_len = static_cast<uint64_t>(f.Int("needle-len", 16, 4, 256));
  const uint64_t probe_len = static_cast<uint64_t>(
      f.Int("probe-len", needle_len / 2, 1, static_cast<int64_t>(needle_len) - 1));
  const uint64_t context = static_cast<uint64_t>(f.Int("context", 768, 64, cfg.seq_len));
  if (context + needle_len > cfg.seq_len)
    throw UsageError("--context + --needle-len exceeds the trained length");
  const uint64_t cases = static_cast<uint64_t>(f.Int("cases", 20, 1, 1000));
  auto ids = client::ReadTokenFile(tokens_path);
  if (!ids.ok())
    return std::fprintf(stderr, "kvmctl needle: %s\n", ids.status().ToString().c_str()), 1;
  auto dtype = ParseDType(f.Str("kv-dtype", "fp16"));
  if (!dtype.ok()) throw UsageError("--kv-dtype: " + dtype.status().message());
  const ModelShape shape = (*model)->Shape(*dtype);
  const sel::SelectorOptions o = ParseSelectorOptions(f, name, context, shape);
  const uint64_t half = ids->size() / 2;
  if (half < cases * 997 + needle_len || half < cases * 1500 + context)
    throw UsageError("--cases: the token file is too short");
  uint64_t dense_right = 0, both_right = 0, dense_tok = 0, sparse_tok = 0, checked_tok = 0;
  for (uint64_t c = 0; c < cases; ++c) {
    // Haystack from the first half of the held-out text, needle from the second half.
    const uint64_t hay = 1 + c * 1500, nd = half + c * 997;
    std::vector<uint32_t> seq;
    const uint64_t lead = 32;
    for (uint64_t i = 0; i < lead; ++i) seq.push_back((*ids)[hay + i]);
    for (uint64_t i = 0; i < needle_len; ++i) seq.push_back((*ids)[nd + i]);
    for (uint64_t i = lead; seq.size() < context; ++i) seq.push_back((*ids)[hay + i]);
    for (uint64_t i = 0; i < needle_len; ++i)
      seq.push_back((*ids)[nd + i]);  // probe + continuation
    seq.push_back(0);                 // unused next token
    auto run = EvalCore(**model, shape, name, o, seq, context, needle_len, false, false);
    if (!run.ok()) {
      if (run.status().IsInvalidArgument()) throw UsageError(run.status().message());
      return std::fprintf(stderr, "kvmctl needle: %s\n", run.status().ToString().c_str()), 1;
    }
    // Step i feeds needle[i]; its argmax predicts needle[i + 1]. The continuation is i + 1 >=
    // probe_len.
    bool d_ok = true, s_ok = true;
    for (uint64_t i = probe_len - 1; i + 1 < needle_len; ++i) {
      const uint32_t want = (*ids)[nd + i + 1];
      d_ok = d_ok && run->dense_argmax[i] == want;
      s_ok = s_ok && run->sparse_argmax[i] == want;
      dense_tok += run->dense_argmax[i] == want;
      sparse_tok += run->sparse_argmax[i] == want;
      ++checked_tok;
    }
    dense_right += d_ok;
    both_right += d_ok && s_ok;
    std::fprintf(stderr, "\rneedle case %llu/%llu: dense right %llu, %s right %llu",
                 (unsigned long long)c + 1, (unsigned long long)cases,
                 (unsigned long long)dense_right, name.c_str(), (unsigned long long)both_right);
  }
  std::fprintf(stderr, "\n");
  const double recall = dense_right ? double(both_right) / dense_right : 0.0;
  if (f.Bool("json")) {
    std::printf(
        "{\"selector\": \"%s\", \"context\": %llu, \"cases\": %llu, \"needle_len\": %llu, "
        "\"probe_len\": %llu, "
        "\"budget_tokens\": %llu, \"target_delta\": %g, \"dense_right\": %llu, "
        "\"selector_right_of_dense_right\": %llu, "
        "\"recall\": %.4f, \"dense_token_accuracy\": %.4f, \"selector_token_accuracy\": %.4f}\n",
        name.c_str(), (unsigned long long)context, (unsigned long long)cases,
        (unsigned long long)needle_len, (unsigned long long)probe_len,
        (unsigned long long)o.budget_tokens, o.target_delta, (unsigned long long)dense_right,
        (unsigned long long)both_right, recall, double(dense_tok) / checked_tok,
        double(sparse_tok) / checked_tok);
  } else {
    std::printf(
        "needle: %llu cases; dense continued %llu correctly; %s continued %llu of those (recall "
        "%.3f); "
        "token accuracy dense %.3f, %s %.3f\n",
        (unsigned long long)cases, (unsigned long long)dense_right, name.c_str(),
        (unsigned long long)both_right, recall, double(dense_tok) / checked_tok, name.c_str(),
        double(sparse_tok) / checked_tok);
  }
  return 0;
}

}  // namespace kvm::tools
