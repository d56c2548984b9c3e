// The selector registry: the one list of selector names, each with its factory, its capabilities
// and the forced policy of its same-size oracle comparison (selectors.md §0.7). The wire converter
// (wire_options.h), kvmctl, the service and the metrics take names and capabilities from here, so a
// new selector is one entry plus its class. Immutable; thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "selector/options.h"

namespace kvm::sel {

struct SelectorCaps {
  // A pre-hoc gate: the worker reuses the last anchor without a message while the gate passes
  // (worker_gate.h). Without one, a worker retrieves at every (step, layer).
  bool has_gate = false;
  // StepInput::score may replace the keys (the service scores where the keys lie).
  bool takes_scores = false;
  // May be run by the service (CreateSequence). HShare and H2O need data the service does not
  // have (a calibration file, the attention of every step): in-process only (§0.8).
  bool served = false;
  // Supports cross-layer index-set sharing (the layer map, §0.6).
  bool layer_sharing = false;
  // Has a target-δ mode (else budget mode only).
  bool target_mode = false;
  // Wants the attention its selection received after every step (Selector::Observe; H2O).
  bool observes_attention = false;
  // Needs a per-model calibration file (HShare's label channels).
  bool needs_calibration = false;
  // Reads the per-channel key min/max of the block summaries (Quest's page bound); the others
  // read only the block max norms, so the service copies only those per retrieval.
  bool channel_bounds = false;
};

// Which blocks the same-size oracle comparison forces (selectors.md §0.7): the ones the selector
// itself forces.
enum class ForcedPolicy {
  kGeometry,  // sinks and the recent window
  kNone,      // nothing (Quest, H2O)
  kHShare,    // HShare's own sink and local split
  kAll,       // the whole selection (StreamingLLM: nothing is chosen)
};

using SelectorFactory = Result<std::unique_ptr<Selector>> (*)(const SelectorOptions& o,
                                                              const ModelShape& shape,
                                                              uint64_t max_context);

struct SelectorEntry {
  const char* name;
  SelectorCaps caps;
  ForcedPolicy forced = ForcedPolicy::kGeometry;
  SelectorFactory make = nullptr;
  uint32_t default_dense_layers = 0;  // SelectorOptions::dense_layers when it is −1
};

// Every selector, in a fixed order (prhs first).
const std::vector<SelectorEntry>& Selectors();
// The entry of `name`; InvalidArgument listing the known names when there is none.
Result<const SelectorEntry*> FindSelector(const std::string& name);
// "a|b|c" of the names whose entries pass `keep` (all when null), for usage lines and errors.
std::string SelectorNames(bool (*keep)(const SelectorEntry&) = nullptr, const char* sep = "|");
// The dense layers of a selector with options o: o.dense_layers, or the entry's default at −1.
uint32_t DenseLayers(const SelectorOptions& o, const SelectorEntry& e);
// Builds a selector by name (FindSelector + its factory).
Result<std::unique_ptr<Selector>> MakeSelector(const std::string& name, const SelectorOptions& o,
                                               const ModelShape& shape, uint64_t max_context);

}  // namespace kvm::sel
