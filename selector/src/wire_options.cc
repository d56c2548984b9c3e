#include "selector/wire_options.h"

#include <algorithm>

#include "proto/kvm.pb.h"
#include "selector/registry.h"

namespace kvm::sel {

void ToWire(const NamedOptions& n, wire::SelectorParams* out) {
  const SelectorOptions& o = n.options;
  out->set_name(n.name);
  // The shared part.
  out->set_sink_tokens(o.geometry.sink_tokens);
  out->set_window_tokens(o.geometry.window_tokens);
  out->set_budget_tokens(o.budget_tokens);
  out->set_target_delta(o.target_delta);
  out->set_max_resident_tokens(o.max_resident_tokens);
  out->set_margin(o.margin);
  // PrhsOptions.
  const PrhsOptions& p = o.prhs;
  out->set_tau_cos(p.tau_cos);
  out->set_use_bound_gate(p.use_bound_gate);
  out->set_dilation(p.dilation);
  out->set_max_cluster_steps(p.max_cluster_steps);
  out->set_psaw(p.psaw);
  out->set_psaw_start_layer(p.psaw_start_layer);
  out->set_psaw_phi(p.psaw_phi);
  out->set_psaw_alpha(p.psaw_alpha);
  out->set_layer_sharing(p.layer_sharing);
  // The dense layers resolved (registry.h DenseLayers), so the wire never carries the −1 default;
  // H2oOptions (h2o is not served; the field keeps the schema's numbering).
  auto e = FindSelector(n.name);
  out->set_dense_layers(e.ok() ? DenseLayers(o, **e) : std::max(o.dense_layers, 0));
  out->set_h2o_recent_frac(o.h2o.recent_frac);
}

Result<NamedOptions> FromWire(const wire::SelectorParams& p, uint32_t block_size) {
  NamedOptions n;
  n.name = p.name();
  KVM_ASSIGN_OR_RETURN(const SelectorEntry* e, FindSelector(n.name));
  if (!e->caps.served)
    return Status::InvalidArgument(
        "selector " + n.name + " runs in-process only (" +
        (e->caps.needs_calibration ? std::string("its calibration file does not travel")
                                   : std::string("it needs the attention of every step")) +
        "); the service runs " +
        SelectorNames([](const SelectorEntry& x) { return x.caps.served; }, ", "));
  SelectorOptions& o = n.options;
  o.geometry.block_size = block_size;
  o.geometry.sink_tokens = p.sink_tokens();
  o.geometry.window_tokens = p.window_tokens();
  o.budget_tokens = p.budget_tokens();
  o.target_delta = p.target_delta();
  o.max_resident_tokens = p.max_resident_tokens();
  o.margin = p.margin();
  PrhsOptions& r = o.prhs;
  r.tau_cos = p.tau_cos();
  r.use_bound_gate = p.use_bound_gate();
  r.dilation = p.dilation();
  r.max_cluster_steps = p.max_cluster_steps();
  r.psaw = p.psaw();
  r.psaw_start_layer = p.psaw_start_layer();
  r.psaw_phi = p.psaw_phi();
  r.psaw_alpha = p.psaw_alpha();
  r.layer_sharing = p.layer_sharing();
  o.dense_layers = static_cast<int32_t>(p.dense_layers());
  o.h2o.recent_frac = p.h2o_recent_frac();
  return n;
}

}  // namespace kvm::sel
