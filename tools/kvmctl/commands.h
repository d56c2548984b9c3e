// The subcommands of kvmctl. Each returns the process exit code (0 ok, 1 runtime error, 2 usage via
// UsageError).
#pragma once

#include <string>
#include <vector>

namespace kvm::tools {

inline constexpr const char* kGenerateUsage =
    "  generate --model FILE --tokenizer FILE (--prompt TEXT | --tokens FILE [--offset N] [--count N])\n"
    "           [--max-new N] [--greedy] [--temperature T] [--seed S] [--kv-dtype fp16|bf16|fp32]\n"
    "      Runs the reference worker and prints the generated text. --tokens: little-endian uint16 ids\n"
    "      used verbatim (they carry their own BOS); --prompt is encoded with a BOS in front.\n"
    "      Defaults: the committed models/austen model and tokenizer, --max-new 64, sampling at T 1.0.";
int RunGenerate(const std::vector<std::string>& args);

inline constexpr const char* kAttnStatsUsage =
    "  attn-stats [--model FILE] [--tokens FILE] [--offset N] [--context N] [--queries N] [--block-size B]\n"
    "             [--budget-frac F] [--json]\n"
    "      How concentrated the model's attention is: dense prefill of --context tokens, then for the last\n"
    "      --queries positions the oracle's retained mass at --budget-frac of the context (token and block\n"
    "      granularity), and the cosine between post-RoPE queries of one head at step lags 1..16.";
int RunAttnStats(const std::vector<std::string>& args);

inline constexpr const char* kHShareCalibrateUsage =
    "  hshare-calibrate [--model FILE] --tokens FILE [--offset N] [--count N] [--channels N] --out FILE\n"
    "      HShare's label channels (the top mean |q_c k_c| channels per layer and query head; N = D/8, at\n"
    "      least 4, by default) from a dense pass over the model's TRAINING text; writes the calibration file.";
int RunHShareCalibrate(const std::vector<std::string>& args);

}  // namespace kvm::tools
