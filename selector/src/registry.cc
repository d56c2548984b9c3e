#include "selector/registry.h"

#include "selector/baselines.h"
#include "selector/prhs.h"

namespace kvm::sel {
namespace {

template <typename T>
Result<std::unique_ptr<Selector>> Factory(const SelectorOptions& o, const ModelShape& shape,
                                          uint64_t max_context) {
  KVM_ASSIGN_OR_RETURN(auto s, T::Make(o, shape, max_context));
  return std::unique_ptr<Selector>(std::move(s));
}

}  // namespace

const std::vector<SelectorEntry>& Selectors() {
  static const std::vector<SelectorEntry> kEntries = {
      {"prhs",
       {.has_gate = true,
        .takes_scores = true,
        .served = true,
        .layer_sharing = true,
        .target_mode = true},
       ForcedPolicy::kGeometry,
       &Factory<PrhsSelector>},
      {"oracle",
       {.takes_scores = true, .served = true, .target_mode = true},
       ForcedPolicy::kGeometry,
       &Factory<OracleSelector>},
      {"quest",
       {.served = true, .channel_bounds = true},
       ForcedPolicy::kNone,
       &Factory<QuestSelector>,
       2},
      {"streaming", {.served = true}, ForcedPolicy::kAll, &Factory<StreamingSelector>},
      {"hshare", {.needs_calibration = true}, ForcedPolicy::kHShare, &Factory<HShareSelector>},
      {"h2o", {.observes_attention = true}, ForcedPolicy::kNone, &Factory<H2oSelector>},
  };
  return kEntries;
}

std::string SelectorNames(bool (*keep)(const SelectorEntry&), const char* sep) {
  std::string out;
  for (const SelectorEntry& e : Selectors()) {
    if (keep && !keep(e)) continue;
    if (!out.empty()) out += sep;
    out += e.name;
  }
  return out;
}

Result<const SelectorEntry*> FindSelector(const std::string& name) {
  for (const SelectorEntry& e : Selectors())
    if (name == e.name) return &e;
  return Status::InvalidArgument("selector: unknown name '" + name + "' (" +
                                 SelectorNames(nullptr, ", ") + ")");
}

uint32_t DenseLayers(const SelectorOptions& o, const SelectorEntry& e) {
  return o.dense_layers >= 0 ? uint32_t(o.dense_layers) : e.default_dense_layers;
}

Result<std::unique_ptr<Selector>> MakeSelector(const std::string& name, const SelectorOptions& o,
                                               const ModelShape& shape, uint64_t max_context) {
  KVM_ASSIGN_OR_RETURN(const SelectorEntry* e, FindSelector(name));
  return e->make(o, shape, max_context);
}

}  // namespace kvm::sel
