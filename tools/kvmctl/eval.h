// The eval engine shared by `kvmctl eval` and `kvmctl needle`: a dense worker and a selector worker
// in lockstep on the same tokens (prefill dense, decode with the selector).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "client/llama.h"
#include "client/selector_source.h"
#include "selector/prhs.h"

namespace kvm::tools {

struct EvalOutput {
  std::unique_ptr<client::SelectorKvSource> sparse;   // null for "dense"
  uint64_t agree = 0;                                 // steps whose argmax agreed
  double nll_dense = 0, nll_sparse = 0;               // mean over steps, of ids[p + 1]
  std::vector<uint32_t> dense_argmax, sparse_argmax;  // per decode step
  double seconds = 0;
};

// ids: at least context + steps + 1 tokens; positions [0, context) are the prefill. Steps feed
// ids[p] (or, with generate, the sparse run's greedy token). InvalidArgument for bad selector
// options. `external`: the sparse run's KV source when given (the service: ServiceKvSource), else
// an in-process SelectorKvSource (EvalOutput::sparse).
Result<EvalOutput> EvalCore(const client::LlamaModel& model, const ModelShape& shape,
                            const std::string& name, const sel::SelectorOptions& o,
                            const std::vector<uint32_t>& ids, uint64_t context, uint64_t steps,
                            bool generate, bool progress, client::KvSource* external = nullptr);

class Flags;
// The selector options of eval-like commands from their flags (--budget, --budget-frac,
// --target-delta,
// --block-size, --max-resident[-frac], --sinks, --window, --tau, --margin, --psaw, --layer-sharing,
// --no-bound-gate, --max-cluster, --hshare-channels). Throws UsageError naming the flag.
sel::SelectorOptions ParseSelectorOptions(const Flags& f, const std::string& name, uint64_t context,
                                          const ModelShape& shape);
// The flags ParseSelectorOptions reads.
extern const std::vector<std::string> kSelectorValueFlags;
extern const std::vector<std::string> kSelectorBoolFlags;

}  // namespace kvm::tools
