// The eval engine shared by `kvmctl eval` and `kvmctl needle`: a dense worker and a selector worker
// in lockstep on the same tokens (prefill dense, decode with the selector).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "client/llama.h"
#include "client/measure.h"
#include "client/selector_source.h"
#include "selector/options.h"

namespace kvm::tools {

struct EvalOutput {
  // The in-process sparse source (null for "dense" and for an external source).
  std::unique_ptr<client::SelectorKvSource> sparse;
  // Measures the sparse run, in-process or external (null for "dense").
  std::unique_ptr<client::MeasuredKvSource> measured;
  uint64_t agree = 0;                                 // steps whose argmax agreed
  double nll_dense = 0, nll_sparse = 0;               // mean over steps, of ids[p + 1]
  std::vector<uint32_t> dense_argmax, sparse_argmax;  // per decode step
  double max_logit_diff = 0;                          // max |sparse − dense logit| over the steps
  double seconds = 0;
};

// ids: at least context + steps + 1 tokens; positions [0, context) are the prefill. Steps feed
// ids[p] (or, with generate, the sparse run's greedy token). InvalidArgument for bad selector
// options. `external`: the sparse run's KV source when given (the service: ServiceKvSource), else
// an in-process SelectorKvSource (EvalOutput::sparse). Either way a MeasuredKvSource measures δ on
// the sparse run's own queries and keys (EvalOutput::measured).
Result<EvalOutput> EvalCore(const client::LlamaModel& model, const ModelShape& shape,
                            const std::string& name, const sel::SelectorOptions& o,
                            const std::vector<uint32_t>& ids, uint64_t context, uint64_t steps,
                            bool generate, bool progress,
                            client::SparseKvSource* external = nullptr,
                            client::Correction correction = client::Correction::kOff);

class Flags;
// The selector options of eval-like commands from their flags (--budget, --budget-frac,
// --target-delta,
// --block-size, --max-resident[-frac], --sinks, --window, --tau, --margin, --psaw, --layer-sharing,
// --no-bound-gate, --max-cluster, --dense-layers, --hshare-channels). Throws UsageError naming the
// flag.
sel::SelectorOptions ParseSelectorOptions(const Flags& f, const std::string& name, uint64_t context,
                                          const ModelShape& shape);
// The flags ParseSelectorOptions reads.
extern const std::vector<std::string> kSelectorValueFlags;
extern const std::vector<std::string> kSelectorBoolFlags;

}  // namespace kvm::tools
