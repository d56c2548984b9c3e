#include "selector/options.h"

#include <algorithm>
#include <string>

namespace kvm::sel {
namespace {
Status Bad(const std::string& field, const std::string& why) {
  return Status::InvalidArgument(field + ": " + why);
}
}  // namespace

Status SelectorOptions::Validate(uint32_t layers, uint64_t max_context) const {
  KVM_RETURN_IF_ERROR(geometry.Validate());
  const uint32_t B = geometry.block_size;
  if (geometry.window_tokens > max_context)
    return Bad("window_tokens", std::to_string(geometry.window_tokens) +
                                    " is larger than the maximum context " +
                                    std::to_string(max_context));
  if (geometry.sink_tokens > max_context)
    return Bad("sink_tokens", "larger than the maximum context");
  if (!(prhs.tau_cos >= -1.0 && prhs.tau_cos <= 1.0)) return Bad("tau_cos", "must be in [-1, 1]");
  if (!(target_delta >= 0.0 && target_delta < 1.0)) return Bad("target_delta", "must be in [0, 1)");
  if (!(margin >= 0.0 && margin < 1.0)) return Bad("margin", "must be in [0, 1)");
  if (target_delta > 0 && max_resident_tokens == 0)
    return Bad("max_resident_tokens", "is required in target-delta mode (> 0)");
  if (target_delta == 0 && budget_tokens == 0)
    return Bad("budget_tokens", "must be > 0 in budget mode (or set target_delta)");
  const uint64_t forced = geometry.MaxSinkBlocks() + geometry.MaxWindowBlocks();
  if (budget_tokens > 0 && budget_blocks() <= forced)
    return Bad("budget_tokens",
               std::to_string(budget_tokens) + " leaves no room beyond the sinks and window (" +
                   std::to_string(forced * B) + " tokens at block size " + std::to_string(B) + ")");
  if (max_resident_tokens > 0 && max_resident_tokens / B <= forced)
    return Bad("max_resident_tokens",
               std::to_string(max_resident_tokens) + " leaves no room beyond the sinks and window");
  if (prhs.dilation < -1 || prhs.dilation > 64)
    return Bad("dilation", "must be -1 (auto) or 0..64");
  if (prhs.psaw && !(prhs.psaw_phi > 0.0 && prhs.psaw_phi < 1.0))
    return Bad("psaw_phi", "must be in (0, 1)");
  if (prhs.psaw && !(prhs.psaw_alpha >= 0.0)) return Bad("psaw_alpha", "must be >= 0");
  if (prhs.psaw && prhs.psaw_start_layer >= layers)
    return Bad("psaw_start_layer", "must be < the number of layers");
  if (dense_layers < -1 || (dense_layers > 0 && uint32_t(dense_layers) > layers))
    return Bad("dense_layers", "must be -1 (the selector's default) or 0.." +
                                   std::to_string(layers) + " (the model's layers)");
  if (prhs.layer_map.window_queries == 0) return Bad("layer_map.window_queries", "must be >= 1");
  if (!(prhs.layer_map.keep_frac > 0.0 && prhs.layer_map.keep_frac <= 1.0))
    return Bad("layer_map.keep_frac", "must be in (0, 1]");
  return Status::Ok();
}

uint64_t SelectorOptions::cap_blocks() const {
  uint64_t cap = target_delta > 0 ? max_resident_tokens / geometry.block_size : budget_blocks();
  if (target_delta > 0 && budget_tokens > 0) cap = std::min(cap, budget_blocks());
  return cap;
}

uint32_t SelectorOptions::MaxClusterSteps() const {
  if (prhs.max_cluster_steps != 0) return prhs.max_cluster_steps;
  const uint64_t cap_tokens = cap_blocks() * geometry.block_size;
  return static_cast<uint32_t>(std::clamp<uint64_t>(cap_tokens / 3, 1, 32));
}

int32_t SelectorOptions::DilationRadius() const {
  if (prhs.dilation >= 0) return prhs.dilation;
  return geometry.block_size >= 8 ? 0 : 1;
}

}  // namespace kvm::sel
