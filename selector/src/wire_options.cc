#include "selector/wire_options.h"

#include "proto/kvm.pb.h"

namespace kvm::sel {

void ToWire(const NamedOptions& n, wire::SelectorParams* out) {
  const SelectorOptions& o = n.options;
  out->set_name(n.name);
  out->set_sink_tokens(o.geometry.sink_tokens);
  out->set_window_tokens(o.geometry.window_tokens);
  out->set_budget_tokens(o.budget_tokens);
  out->set_target_delta(o.target_delta);
  out->set_max_resident_tokens(o.max_resident_tokens);
  out->set_margin(o.margin);
  out->set_tau_cos(o.tau_cos);
  out->set_use_bound_gate(o.use_bound_gate);
  out->set_dilation(o.dilation);
  out->set_max_cluster_steps(o.max_cluster_steps);
  out->set_psaw(o.psaw);
  out->set_psaw_start_layer(o.psaw_start_layer);
  out->set_psaw_phi(o.psaw_phi);
  out->set_psaw_alpha(o.psaw_alpha);
  out->set_layer_sharing(o.layer_sharing);
  out->set_quest_dense_layers(o.quest_dense_layers);
  out->set_h2o_recent_frac(o.h2o_recent_frac);
}

Result<NamedOptions> FromWire(const wire::SelectorParams& p, uint32_t block_size) {
  NamedOptions n;
  n.name = p.name();
  if (n.name == "hshare")
    return Status::InvalidArgument(
        "selector hshare is not served by the service (its calibration does not travel)");
  if (n.name != "prhs" && n.name != "oracle" && n.name != "quest" && n.name != "streaming" &&
      n.name != "h2o")
    return Status::InvalidArgument("selector: unknown name '" + n.name +
                                   "' (prhs, oracle, quest, streaming, h2o)");
  SelectorOptions& o = n.options;
  o.geometry.block_size = block_size;
  o.geometry.sink_tokens = p.sink_tokens();
  o.geometry.window_tokens = p.window_tokens();
  o.budget_tokens = p.budget_tokens();
  o.target_delta = p.target_delta();
  o.max_resident_tokens = p.max_resident_tokens();
  o.margin = p.margin();
  o.tau_cos = p.tau_cos();
  o.use_bound_gate = p.use_bound_gate();
  o.dilation = p.dilation();
  o.max_cluster_steps = p.max_cluster_steps();
  o.psaw = p.psaw();
  o.psaw_start_layer = p.psaw_start_layer();
  o.psaw_phi = p.psaw_phi();
  o.psaw_alpha = p.psaw_alpha();
  o.layer_sharing = p.layer_sharing();
  o.quest_dense_layers = p.quest_dense_layers();
  o.h2o_recent_frac = p.h2o_recent_frac();
  return n;
}

}  // namespace kvm::sel
