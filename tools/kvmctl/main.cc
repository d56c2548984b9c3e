// kvmctl: the kvmanager command-line tool.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "commands.h"
#include "flags.h"

namespace {
struct Command {
  const char* name;
  int (*run)(const std::vector<std::string>&);
  const char* usage;
};
const Command kCommands[] = {
    {"generate", kvm::tools::RunGenerate, kvm::tools::kGenerateUsage},
    {"attn-stats", kvm::tools::RunAttnStats, kvm::tools::kAttnStatsUsage},
    {"hshare-calibrate", kvm::tools::RunHShareCalibrate, kvm::tools::kHShareCalibrateUsage},
    {"eval", kvm::tools::RunEval, kvm::tools::kEvalUsage},
    {"needle", kvm::tools::RunNeedle, kvm::tools::kNeedleUsage},
    {"bench", kvm::tools::RunBench, kvm::tools::kBenchAttentionUsage},
    {"bench", kvm::tools::RunBench, kvm::tools::kBenchTransportUsage},
    {"bench", kvm::tools::RunBench, kvm::tools::kBenchDecodeUsage},
    {"demo", kvm::tools::RunDemo, kvm::tools::kDemoUsage},
    {"status", kvm::tools::RunStatus, kvm::tools::kStatusUsage},
    {"loadgen", kvm::tools::RunLoadgen, kvm::tools::kLoadgenUsage},
};

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: kvmctl <command> [flags]\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "%s\n", c.usage);
  std::fprintf(out, "\nNot built yet: eval --all --report (see README.md).\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    PrintUsage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : kCommands) {
    if (std::strcmp(argv[1], c.name)) continue;
    std::vector<std::string> args(argv + 2, argv + argc);
    for (const auto& a : args)
      if (a == "--help" || a == "-h") {
        std::printf("%s\n", c.usage);
        return 0;
      }
    try {
      return c.run(args);
    } catch (const kvm::tools::UsageError& e) {
      std::fprintf(stderr, "kvmctl %s: %s\nusage:\n%s\n", c.name, e.what(), c.usage);
      return 2;
    }
  }
  std::fprintf(stderr, "kvmctl: unknown command '%s'\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}
