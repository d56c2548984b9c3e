// kvmctl eval: fidelity of a selector on the real model (selectors.md §0.2, §0.3, §0.7).
#include "eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "client/client.h"
#include "client/llama.h"
#include "client/selector_source.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "client_flags.h"
#include "commands.h"
#include "flags.h"
#include "selector/baselines.h"
#include "selector/layer_map.h"
#include "selector/registry.h"
#include "selector/worker_gate.h"
#include "transport/transport.h"

namespace kvm::tools {
namespace {

double LogSoftmaxAt(const std::vector<float>& logits, uint32_t t) {
  double m = -INFINITY;
  for (float l : logits) m = std::max(m, double(l));
  double s = 0;
  for (float l : logits) s += std::exp(double(l) - m);
  return double(logits[t]) - m - std::log(s);
}

uint32_t Argmax(const std::vector<float>& v) {
  return static_cast<uint32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace

Result<EvalOutput> EvalCore(const client::LlamaModel& model, const ModelShape& shape,
                            const std::string& name, const sel::SelectorOptions& o,
                            const std::vector<uint32_t>& ids, uint64_t context, uint64_t steps,
                            bool generate, bool progress, client::SparseKvSource* external,
                            client::Correction correction) {
  const uint32_t B = o.geometry.block_size;
  const auto& cfg = model.config();
  if (ids.size() < context + steps + 1)
    return Status::InvalidArgument("eval: too few tokens for the window");
  EvalOutput out;
  // Two workers in lockstep on the same tokens: dense, and the selector's (prefill dense, decode
  // sparse), measured against a shadow copy of its own KV.
  auto dense_kv = client::DenseKvSource::Make(shape, B);
  if (!dense_kv.ok()) return dense_kv.status();
  std::unique_ptr<client::DenseKvSource> dense_as_sparse;
  client::KvSource* sparse_kv = nullptr;
  const sel::SelectorEntry* entry = nullptr;
  if (name != "dense") {
    auto e = sel::FindSelector(name);
    if (!e.ok()) return e.status();
    entry = *e;
  }
  if (external) {
    if (!entry || !entry->caps.served)
      return Status::InvalidArgument(name + " is not served through the service");
    KVM_ASSIGN_OR_RETURN(
        out.measured, client::MeasuredKvSource::Make(external, shape, o, context, entry->forced));
    sparse_kv = out.measured.get();
  } else if (!entry) {
    dense_as_sparse = std::move(client::DenseKvSource::Make(shape, B)).value();
    sparse_kv = dense_as_sparse.get();
  } else {
    KVM_ASSIGN_OR_RETURN(auto selector, entry->make(o, shape, cfg.seq_len));
    KVM_ASSIGN_OR_RETURN(out.sparse, client::SelectorKvSource::Make(shape, B, std::move(selector),
                                                                    o, context, cfg.seq_len));
    out.sparse->set_correction(correction);
    KVM_ASSIGN_OR_RETURN(out.measured, client::MeasuredKvSource::Make(out.sparse.get(), shape, o,
                                                                      context, entry->forced));
    sparse_kv = out.measured.get();
  }
  client::ReferenceWorker wd(model, dense_kv->get()), ws(model, sparse_kv);
  // The last prefill queries per layer: PrHS's layer map (the gate builds it) and HShare's maps.
  const uint32_t L = cfg.n_layers;
  sel::PrefillQueries lastq(L, cfg.n_heads, cfg.head_dim(), o.prhs.layer_map.window_queries,
                            context);
  ws.on_layer = [&](const client::LayerTrace& t) { lastq.Observe(t.layer, t.pos, t.q); };
  std::vector<float> ld(cfg.vocab_size), ls(cfg.vocab_size);
  const auto t0 = std::chrono::steady_clock::now();
  for (uint64_t p = 0; p < context; ++p) {
    const uint32_t tok = ids[p];
    const bool last = p + 1 == context;
    Status s = wd.Forward(tok, p, last ? ld.data() : nullptr);
    if (s.ok()) s = ws.Forward(tok, p, last ? ls.data() : nullptr);
    if (!s.ok()) return s;
    if (progress && p % 64 == 0)
      std::fprintf(stderr, "\rprefill %llu/%llu", (unsigned long long)p,
                   (unsigned long long)context);
  }
  if (out.sparse) {
    client::DenseKvSource& kv = out.sparse->dense();
    auto views = [&](uint32_t l) {
      std::vector<attn::HeadKV> v;
      for (uint32_t h = 0; h < cfg.n_kv_heads; ++h) v.push_back(kv.View(l, h, context));
      return v;
    };
    sel::WorkerGate* gate = out.sparse->selector().gate();
    if (gate && gate->layer_sharing()) {
      KVM_RETURN_IF_ERROR(gate->BuildLayerMap(lastq, context, views));
    } else if (entry->caps.needs_calibration) {  // HShare: its head and layer maps
      const auto keep = sel::PrefillKeepMasks(lastq, L, sel::KeepFraction(o, context), views);
      std::vector<std::vector<uint32_t>> head_map;
      std::vector<uint32_t> layer_map;
      KVM_RETURN_IF_ERROR(sel::BuildHShareMaps(keep, shape, o.hshare.shared_kv_heads,
                                               o.hshare.shared_layers, &head_map, &layer_map));
      KVM_RETURN_IF_ERROR(static_cast<sel::HShareSelector&>(out.sparse->selector())
                              .SetShareMaps(head_map, layer_map));
    }
  }
  // Decode steps: the input at position context + i is the true token (teacher forcing) or, with
  // --generate, the sparse run's greedy choice; both runs see the same input.
  uint32_t next = ids[context];
  for (uint64_t i = 0; i < steps; ++i) {
    const uint64_t p = context + i;
    Status s = wd.Forward(next, p, ld.data());
    if (s.ok()) s = ws.Forward(next, p, ls.data());
    if (!s.ok()) return s;
    const uint32_t truth = ids[p + 1];
    out.agree += Argmax(ld) == Argmax(ls);
    out.nll_dense -= LogSoftmaxAt(ld, truth);
    out.nll_sparse -= LogSoftmaxAt(ls, truth);
    for (size_t v = 0; v < ld.size(); ++v)
      out.max_logit_diff = std::max(out.max_logit_diff, double(std::fabs(ld[v] - ls[v])));
    out.dense_argmax.push_back(Argmax(ld));
    out.sparse_argmax.push_back(Argmax(ls));
    next = generate ? Argmax(ls) : truth;
    if (progress && (i % 16 == 0 || i + 1 == steps))
      std::fprintf(stderr, "\rdecode %llu/%llu            ", (unsigned long long)i + 1,
                   (unsigned long long)steps);
  }
  if (progress) std::fprintf(stderr, "\n");
  out.nll_dense /= steps;
  out.nll_sparse /= steps;
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

const std::vector<std::string> kSelectorValueFlags = {"budget",
                                                      "budget-frac",
                                                      "target-delta",
                                                      "block-size",
                                                      "max-resident",
                                                      "max-resident-frac",
                                                      "sinks",
                                                      "window",
                                                      "tau",
                                                      "margin",
                                                      "hshare-channels",
                                                      "max-cluster",
                                                      "dense-layers",
                                                      "reuse-regret",
                                                      "bound",
                                                      "hshare-query-share",
                                                      "hshare-shared-kv-heads",
                                                      "hshare-shared-layers"};
const std::vector<std::string> kSelectorBoolFlags = {"layer-sharing", "psaw", "no-bound-gate",
                                                     "no-cap-reuse", "reuse-while-fits"};

sel::SelectorOptions ParseSelectorOptions(const Flags& f, const std::string& name, uint64_t context,
                                          const ModelShape& shape) {
  sel::SelectorOptions o;
  o.geometry.block_size = static_cast<uint32_t>(f.Int("block-size", 16, 1, 1024));
  const uint32_t B = o.geometry.block_size;
  o.geometry.sink_tokens = static_cast<uint32_t>(f.Int("sinks", 4, 0, 1 << 20));
  o.geometry.window_tokens = static_cast<uint32_t>(f.Int("window", B, 1, 1 << 20));
  if (f.Has("budget")) o.budget_tokens = static_cast<uint64_t>(f.Int("budget", 0, 1, 1 << 30));
  if (f.Has("budget-frac"))
    o.budget_tokens =
        static_cast<uint64_t>(std::llround(f.Double("budget-frac", 0, 1e-6, 1.0) * context / B)) *
        B;
  o.target_delta = f.Double("target-delta", 0.0, 0.0, 0.999);
  const auto entry = sel::FindSelector(name);
  if (o.target_delta > 0) {
    if (!entry.ok() || !(*entry)->caps.target_mode)
      throw UsageError(
          "--target-delta: only " +
          sel::SelectorNames([](const sel::SelectorEntry& e) { return e.caps.target_mode; },
                             " and ") +
          " have a target mode");
    o.max_resident_tokens =
        f.Has("max-resident") ? static_cast<uint64_t>(f.Int("max-resident", 0, 1, 1 << 30))
                              : static_cast<uint64_t>(std::llround(
                                    f.Double("max-resident-frac", 0.25, 1e-6, 1.0) * context / B)) *
                                    B;
  } else if (name != "dense" && o.budget_tokens == 0) {
    throw UsageError(
        "--budget or --budget-frac is required (or --target-delta for prhs and oracle)");
  }
  o.dense_layers = static_cast<int32_t>(f.Int("dense-layers", -1, -1, shape.layers));
  o.prhs.tau_cos = f.Double("tau", o.prhs.tau_cos, -1.0, 1.0);
  o.margin = f.Double("margin", o.margin, 0.0, 0.99);
  o.prhs.psaw = f.Bool("psaw");
  o.prhs.layer_sharing = f.Bool("layer-sharing");
  o.prhs.use_bound_gate = !f.Bool("no-bound-gate");
  o.prhs.max_cluster_steps =
      static_cast<uint32_t>(f.Int("max-cluster", o.prhs.max_cluster_steps, 0, 1 << 20));
  o.prhs.reuse_regret = f.Double("reuse-regret", o.prhs.reuse_regret, 0.0, 1.0);
  o.prhs.cap_reuse = !f.Bool("no-cap-reuse");
  o.prhs.reuse_while_fits = f.Bool("reuse-while-fits");
  const std::string bound = f.Str("bound", "split");
  if (bound == "norm")
    o.prhs.bound = sel::BoundForm::kNorm;
  else if (bound == "centred")
    o.prhs.bound = sel::BoundForm::kCentred;
  else if (bound == "split")
    o.prhs.bound = sel::BoundForm::kSplit;
  else
    throw UsageError("--bound: norm, centred or split");
  o.hshare.query_share =
      static_cast<uint32_t>(f.Int("hshare-query-share", o.hshare.query_share, 1, 1 << 20));
  o.hshare.shared_kv_heads = static_cast<int32_t>(
      f.Int("hshare-shared-kv-heads", o.hshare.shared_kv_heads, -1, shape.kv_heads - 1));
  o.hshare.shared_layers = static_cast<int32_t>(
      f.Int("hshare-shared-layers", o.hshare.shared_layers, -1, shape.layers - 1));
  if (entry.ok() && (*entry)->caps.needs_calibration) {
    const std::string path =
        PathOrDefault(f, "hshare-channels", "models/austen/hshare_channels.txt");
    std::ifstream in(path);
    if (!in) throw UsageError("--hshare-channels: cannot read '" + path + "'");
    std::stringstream ss;
    ss << in.rdbuf();
    auto ch = sel::ParseHShareChannels(ss.str(), shape);
    if (!ch.ok()) throw UsageError("--hshare-channels: " + ch.status().message());
    o.hshare.channels = *ch;
  }

  return o;
}

int RunEval(const std::vector<std::string>& args) {
  std::set<std::string> vf(kSelectorValueFlags.begin(), kSelectorValueFlags.end()),
      bf(kSelectorBoolFlags.begin(), kSelectorBoolFlags.end());
  vf.insert({"model", "tokens", "offset", "context", "steps", "selector", "kv-dtype", "server",
             "transport", "correction"});
  vf.insert(kAuthFlags.begin(), kAuthFlags.end());
  bf.insert({"generate", "json"});
  Flags f(args, vf, bf);
  const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
  const std::string tokens_path = PathOrDefault(f, "tokens", "models/austen/heldout.u16");
  const std::string name = f.Required("selector");
  auto correction = client::ParseCorrection(f.Str("correction", "off"));
  if (!correction.ok()) throw UsageError("--" + correction.status().message());
  if (*correction != client::Correction::kOff && name == "dense")
    throw UsageError("--correction: needs a sparse selector");
  if (name != "dense" && !sel::FindSelector(name).ok())
    throw UsageError("--selector: '" + name + "' is not one of dense|" + sel::SelectorNames());
  auto model = client::LlamaModel::Load(model_path);
  if (!model.ok())
    return std::fprintf(stderr, "kvmctl eval: %s\n", model.status().ToString().c_str()), 1;
  const auto& cfg = (*model)->config();
  const uint64_t context = static_cast<uint64_t>(f.Int("context", 0, 1, 1 << 24));
  const uint64_t steps = static_cast<uint64_t>(f.Int("steps", 0, 1, 1 << 24));
  if (!f.Has("context")) throw UsageError("--context is required");
  if (!f.Has("steps")) throw UsageError("--steps is required");
  if (context + steps > cfg.seq_len)
    throw UsageError("--context + --steps = " + std::to_string(context + steps) +
                     " exceeds the checkpoint's trained length " + std::to_string(cfg.seq_len));
  auto ids = client::ReadTokenFile(tokens_path);
  if (!ids.ok())
    return std::fprintf(stderr, "kvmctl eval: %s\n", ids.status().ToString().c_str()), 1;
  const uint64_t offset = static_cast<uint64_t>(f.Int("offset", 0, 0, INT64_MAX));
  if (offset + context + steps + 1 > ids->size())
    throw UsageError("--offset: the token file is too short for this window");
  if (f.Has("budget") && f.Has("budget-frac"))
    throw UsageError("give --budget or --budget-frac, not both");
  auto dtype = ParseDType(f.Str("kv-dtype", "fp16"));
  if (!dtype.ok()) throw UsageError("--kv-dtype: " + dtype.status().message());

  const ModelShape shape = (*model)->Shape(*dtype);
  const sel::SelectorOptions o = ParseSelectorOptions(f, name, context, shape);
  if (Status st = client::CheckCorrection(o, *correction); !st.ok())
    throw UsageError("--reuse-while-fits: " + st.message());
  const uint32_t B = o.geometry.block_size;
  std::vector<uint32_t> window(ids->begin() + static_cast<ptrdiff_t>(offset),
                               ids->begin() + static_cast<ptrdiff_t>(offset + context + steps + 1));
  // --server: the sparse run decodes through the service (its KV source is ServiceKvSource).
  std::unique_ptr<transport::Transport> data_plane;
  std::unique_ptr<client::Client> conn;
  std::unique_ptr<client::ServiceKvSource> service;
  if (f.Has("server")) {
    if (name == "dense") throw UsageError("--server: needs a selector other than dense");
    const std::string tr = f.Str("transport", "ucx");
    if (tr != "ucx" && tr != "tcp") throw UsageError("--transport: ucx or tcp");
    if (tr == "ucx") {
      auto t = transport::MakeUcx();
      if (!t.ok())
        return std::fprintf(stderr, "kvmctl eval: %s\n", t.status().ToString().c_str()), 1;
      data_plane = std::move(*t);
    }
    client::ConnectOptions co;
    ApplyAuthFlags(f, &co);
    const uint64_t sequence_id =
        uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
    co.address = ShardForSequence(*f.Str("server"), co.tenant, sequence_id);  // a list: its shard
    co.client_name = "kvmctl-eval";
    co.data_plane = data_plane.get();
    auto c = client::Client::Connect(co);
    if (!c.ok()) return std::fprintf(stderr, "kvmctl eval: %s\n", c.status().ToString().c_str()), 1;
    conn = std::move(*c);
    client::ServiceSourceOptions so;
    so.sequence_id = sequence_id;
    so.selector = name;
    so.options = o;
    so.prefill = context;
    so.correction = *correction;
    auto src = client::ServiceKvSource::Make(conn.get(), shape, so);
    if (!src.ok()) {
      if (src.status().IsInvalidArgument()) throw UsageError(src.status().message());
      return std::fprintf(stderr, "kvmctl eval: %s\n", src.status().ToString().c_str()), 1;
    }
    service = std::move(*src);
  } else if (f.Has("transport") || f.Has("tenant") || f.Has("token-file") || f.Has("tls-ca") ||
             f.Has("tls-cert") || f.Has("tls-key")) {
    throw UsageError("--transport, --tenant, --token-file and --tls-*: only with --server");
  }
  auto run = EvalCore(**model, shape, name, o, window, context, steps, f.Bool("generate"),
                      !f.Bool("json"), service.get(), *correction);
  if (run.ok() && service) {
    if (Status st = service->Flush(); !st.ok()) run = st;
    (void)service->Delete();
  }
  if (!run.ok()) {
    if (run.status().IsInvalidArgument()) throw UsageError(run.status().message());
    return std::fprintf(stderr, "kvmctl eval: %s\n", run.status().ToString().c_str()), 1;
  }
  if (run->measured) run->measured->TakeLateClaims();  // audits answered at the final flush
  const EvalOutput& r = *run;
  const double secs = r.seconds;
  const uint64_t agree = r.agree;
  double nll_d = r.nll_dense, nll_s = r.nll_sparse;
  const uint32_t L = cfg.n_layers, Hq = cfg.n_heads, Hkv = cfg.n_kv_heads, g = Hq / Hkv;
  // Statistics over (step, layer, query head) (selectors.md §0.2), measured on the sparse run's own
  // q and K whether it ran in-process or through the service; sharing layers included.
  std::vector<double> dt, dor;
  uint64_t within = 0, violations = 0, claims = 0, audited = 0, bound_claims = 0;
  double audit_err = 0, bound_sum = 0;
  std::map<std::string, uint64_t> kinds;
  const bool target = o.target_delta > 0;
  const client::MeasuredKvSource* measured = r.measured.get();
  // Per (layer, KV head): Σ over steps of the group's max δ and of its mean δ (§0.2).
  std::vector<double> head_max(size_t{L} * Hkv, 0.0), head_mean(size_t{L} * Hkv, 0.0);
  if (measured) {
    const auto& recs = measured->records();
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto& h = recs[i];
      dt.push_back(h.delta_true);
      dor.push_back(h.delta_oracle);
      within += h.delta_true <= o.target_delta;
      kinds[DeltaKindName(h.kind)]++;
      if ((h.kind == DeltaKind::kExact || h.kind == DeltaKind::kBound) &&
          !std::isnan(h.delta_claim)) {
        ++claims;  // (an exact claim through the service is a float: far inside the tolerance)
        violations += h.delta_true > h.delta_claim + 1e-6 + 1e-5 * h.delta_claim;
      }
      if (h.kind == DeltaKind::kBound && !std::isnan(h.delta_claim)) {
        ++bound_claims;
        bound_sum += h.delta_claim;
      }
      if (!std::isnan(h.delta_audit)) {
        ++audited;
        audit_err = std::max(audit_err, std::fabs(h.delta_audit - h.delta_true));
      }
      // Records come per (step, layer) in query-head order, a group's heads together.
      if (h.q_head % g == 0 && i + g <= recs.size()) {
        double mx = 0, sum = 0;
        for (uint32_t j = 0; j < g; ++j) {
          mx = std::max(mx, recs[i + j].delta_true);
          sum += recs[i + j].delta_true;
        }
        const size_t at = size_t{h.layer} * Hkv + h.q_head / g;
        head_max[at] += mx;
        head_mean[at] += sum / g;
      }
    }
  } else {  // dense: nothing dropped
    dt.assign(steps * L * Hq, 0.0);
    dor = dt;
    within = dt.size();
  }
  double mean = 0, omean = 0;
  for (double x : dt) mean += x / dt.size();
  for (double x : dor) omean += x / dor.size();
  const auto* tot = r.sparse ? &r.sparse->totals() : nullptr;
  const auto* stot = service ? &service->totals() : nullptr;
  const double layer_heads = double(steps * L * Hq);
  const double retrieval = tot    ? double(tot->retrievals) / layer_heads
                           : stot ? double(stot->retrievals) / layer_heads
                                  : 0.0;
  const double attended =
      measured && measured->totals().context_tokens
          ? double(measured->totals().attended_tokens) / double(measured->totals().context_tokens)
          : 1.0;
  const double dense_eq = tot    ? double(tot->bytes.dense_equivalent)
                          : stot ? double(stot->dense_equivalent)
                                 : 0.0;
  const double streamed = tot    ? double(tot->bytes.streamed)
                          : stot ? double(stot->streamed_bytes)
                                 : 0;
  const double refetch = tot    ? double(tot->bytes.topk_refetch)
                         : stot ? double(stot->topk_refetch)
                                : 0;
  const std::string streamed_frac = dense_eq > 0 ? Num(streamed / dense_eq) : "null";
  const std::string refetch_frac = dense_eq > 0 ? Num(refetch / dense_eq) : "null";
  // Gate outcomes per (step, layer, KV head): the in-process selector's gate or the worker's.
  const sel::GateCounts gc = tot ? r.sparse->gate_counts() : stot ? stot->gate : sel::GateCounts{};
  std::string gate_json;
  for (sel::GateOutcome go : sel::kGateOutcomes)
    gate_json += std::string(gate_json.empty() ? "" : ", ") + "\"" + sel::GateOutcomeName(go) +
                 "\": " + std::to_string(gc[go]);
  // The worker's memory: the hot set of every (layer, KV head), the dense layers holding every
  // block of the longest context (selectors.md: they count in full), against a dense worker's.
  const sel::SelectorEntry* entry = name == "dense" ? nullptr : sel::FindSelector(name).value();
  const uint32_t dense_layers = entry ? sel::DenseLayers(o, *entry) : L;
  const uint64_t all_blocks = o.geometry.Blocks(context + steps);
  uint64_t slots = all_blocks;
  if (entry) {
    auto probe = entry->make(o, shape, cfg.seq_len);
    if (probe.ok()) slots = std::min<uint64_t>((*probe)->HotSetSlots(), all_blocks);
  }
  const double block_bytes = 2.0 * B * cfg.head_dim() * DTypeSize(*dtype);
  const double mem =
      block_bytes * Hkv * (double(L - dense_layers) * slots + double(dense_layers) * all_blocks);
  const double mem_dense = block_bytes * Hkv * L * all_blocks;
  const uint64_t target_missed = tot ? tot->target_missed : gc.target_missed;
  const uint64_t selections = steps * L * Hkv;
  const sel::BoundStats& bs = gc.bound;
  auto rate = [](uint64_t n, uint64_t d) { return d ? Num(double(n) / double(d)) : "null"; };
  std::string per_head;
  for (uint32_t l = 0; l < L && measured; ++l)
    for (uint32_t h = 0; h < Hkv; ++h) {
      const size_t at = size_t{l} * Hkv + h;
      const uint64_t n = tot                        ? tot->head_retrievals[at]
                         : at < gc.retrieved.size() ? gc.retrieved[at]
                                                    : 0;
      per_head += std::string(per_head.empty() ? "" : ", ") + "{\"layer\": " + std::to_string(l) +
                  ", \"kv_head\": " + std::to_string(h) +
                  ", \"delta_group_max_mean\": " + Num(head_max[at] / double(steps)) +
                  ", \"delta_mean\": " + Num(head_mean[at] / double(steps)) +
                  ", \"retrievals\": " + std::to_string(n) + "}";
    }
  std::string kinds_json;
  for (auto& [k, n] : kinds)
    kinds_json +=
        std::string(kinds_json.empty() ? "" : ", ") + "\"" + k + "\": " + std::to_string(n);
  std::string generated;  // the sparse run's greedy tokens (--generate)
  for (uint32_t t : r.sparse_argmax)
    generated += (generated.empty() ? "" : ", ") + std::to_string(t);
  const bool gen = f.Bool("generate");
  const char* bound_name = o.prhs.bound == sel::BoundForm::kNorm      ? "norm"
                           : o.prhs.bound == sel::BoundForm::kCentred ? "centred"
                                                                      : "split";
  if (f.Bool("json")) {
    std::string j = "{";
    auto kv = [&](const std::string& k, const std::string& v) {
      j += (j.size() > 1 ? ", \"" : "\"") + k + "\": " + v;
    };
    auto str = [](const std::string& v) { return "\"" + JsonEscape(v) + "\""; };
    const std::string null = "null";
    std::string argv;  // the command line, for reports that label runs by their flags
    for (const std::string& a : args) argv += (argv.empty() ? "" : " ") + a;
    kv("selector", str(name));
    kv("args", str(argv));
    kv("model", str(model_path));
    kv("offset", std::to_string(offset));
    kv("context", std::to_string(context));
    kv("steps", std::to_string(steps));
    kv("budget_tokens", std::to_string(o.budget_tokens));
    kv("block_size", std::to_string(B));
    kv("delta_mean", Num(mean));
    kv("delta_p50", Num(Percentile(dt, 0.5)));
    kv("delta_p99", Num(Percentile(dt, 0.99)));
    kv("delta_max", Num(dt.empty() ? NAN : *std::max_element(dt.begin(), dt.end())));
    kv("oracle_delta_mean", Num(omean));
    kv("target_delta", target ? Num(o.target_delta) : null);
    kv("within_target_fraction", target ? Num(double(within) / dt.size()) : null);
    kv("target_missed_fraction", target ? rate(target_missed, selections) : null);
    kv("bound_violations", measured ? std::to_string(violations) : null);
    kv("bound_claims", measured ? std::to_string(claims) : null);
    kv("claim_kinds", "{" + kinds_json + "}");
    kv("bound_claim_fraction", measured ? rate(bound_claims, dt.size()) : null);
    kv("bound_claim_mean", bound_claims ? Num(bound_sum / double(bound_claims)) : null);
    kv("bound_checks", std::to_string(bs.checks));
    kv("bound_cosine_pass_rate", rate(bs.cosine_ok, bs.checks));
    kv("bound_pass_rate", target ? rate(bs.pass, bs.checks) : null);
    kv("bound_pass_rate_norm", target ? rate(bs.pass_norm, bs.checks) : null);
    kv("bound_check_mean", bs.checks ? Num(bs.sum_bound / double(bs.checks)) : null);
    kv("bound_check_mean_norm", bs.checks ? Num(bs.sum_bound_norm / double(bs.checks)) : null);
    kv("cap_bound_checks", std::to_string(bs.cap_checks));
    kv("retrieval_overhead", Num(retrieval));
    kv("attended_fraction", Num(attended));
    kv("streamed_bytes_fraction", streamed_frac);
    kv("streamed_bytes", Num(streamed));
    kv("dense_offload_bytes", Num(dense_eq));
    // Exact correction: its bytes (whole run: queries, attended lists and states, both ways
    // through the service; what the same requests would carry in-process) and time per step.
    const uint64_t corr_bytes = tot ? tot->correction_bytes : stot ? stot->correction_bytes : 0;
    const double corr_s = tot ? tot->correction_seconds : stot ? stot->correction_seconds : 0;
    const uint64_t corrected = tot ? tot->corrected : stot ? stot->corrected : 0;
    kv("correction", str(client::CorrectionName(*correction)));
    kv("correction_bytes", std::to_string(corr_bytes));
    kv("correction_ms_per_step", Num(1e3 * corr_s / double(steps)));
    kv("corrected_fraction", rate(corrected, selections));
    kv("wire_bytes_fraction",
       dense_eq > 0 ? Num((streamed + double(corr_bytes)) / dense_eq) : null);
    kv("max_logit_diff", Num(r.max_logit_diff));
    kv("topk_refetch_bytes_fraction", refetch_frac);
    kv("dense_layers", std::to_string(dense_layers));
    kv("worker_memory_bytes", Num(mem));
    kv("worker_memory_fraction", Num(mem / mem_dense));
    kv("top1_agreement", Num(double(agree) / steps));
    kv("nll_dense", gen ? null : Num(nll_d));
    kv("nll_sparse", gen ? null : Num(nll_s));
    kv("perplexity_ratio", gen ? null : Num(std::exp(nll_s - nll_d)));
    kv("max_resident_tokens", std::to_string(o.max_resident_tokens));
    kv("tau_cos", Num(o.prhs.tau_cos));
    kv("max_cluster_steps", std::to_string(o.MaxClusterSteps()));
    kv("layer_sharing", o.prhs.layer_sharing ? "true" : "false");
    kv("psaw", o.prhs.psaw ? "true" : "false");
    kv("bound_gate", o.prhs.use_bound_gate ? "true" : "false");
    kv("reuse_regret", Num(o.prhs.reuse_regret));
    kv("cap_reuse", o.prhs.cap_reuse ? "true" : "false");
    kv("reuse_while_fits", o.prhs.reuse_while_fits ? "true" : "false");
    kv("bound_form", str(bound_name));
    kv("hshare_query_share", std::to_string(o.hshare.query_share));
    kv("hshare_shared_kv_heads", std::to_string(o.hshare.shared_kv_heads));
    kv("hshare_shared_layers", std::to_string(o.hshare.shared_layers));
    kv("generate", gen ? "true" : "false");
    kv("kv_dtype", str(DTypeName(*dtype)));
    char sec[32];
    std::snprintf(sec, sizeof sec, "%.2f", secs);
    kv("seconds", sec);
    kv("delta_source",
       str(measured ? "measured on the sparse run's own q and K" : "dense: nothing dropped"));
    kv("transport", str(!service             ? "inproc"
                        : conn->data_plane() ? conn->data_plane()->name()
                                             : "tcp"));
    kv("generated", "[" + (gen ? generated : std::string()) + "]");
    kv("service_round_trips", stot ? std::to_string(stot->round_trips) : null);
    kv("shared_prefetches", stot ? std::to_string(stot->shared_prefetches) : null);
    kv("gate_checks", "{" + gate_json + "}");
    kv("audited", std::to_string(audited));
    kv("audit_max_abs_error", audited ? Num(audit_err) : null);
    kv("per_kv_head", "[" + per_head + "]");
    std::printf("%s}\n", j.c_str());
  } else {
    std::printf("selector %s: context %llu, %llu steps, budget %llu tokens%s, block %u, KV %s\n",
                name.c_str(), (unsigned long long)context, (unsigned long long)steps,
                (unsigned long long)o.budget_tokens,
                target ? (", target delta " + Num(o.target_delta) + ", cap " +
                          std::to_string(o.max_resident_tokens))
                             .c_str()
                       : "",
                B, DTypeName(*dtype));
    std::printf(
        "  delta mean %.5f  p50 %.5f  p99 %.5f  max %.5f   (same-size block oracle: mean %.5f)\n",
        mean, Percentile(dt, 0.5), Percentile(dt, 0.99),
        dt.empty() ? 0.0 : *std::max_element(dt.begin(), dt.end()), omean);
    if (target)
      std::printf("  within target: %.4f; selections that missed the target: %.4f\n",
                  double(within) / dt.size(), double(target_missed) / double(selections));
    std::printf("  bound violations %llu of %llu claims; kinds:", (unsigned long long)violations,
                (unsigned long long)claims);
    for (auto& [k, n] : kinds) std::printf(" %s %llu", k.c_str(), (unsigned long long)n);
    if (bound_claims) std::printf("; mean bound claimed %.4f", bound_sum / double(bound_claims));
    std::printf("\n  retrieval overhead %.4f, attended fraction %.4f, streamed bytes / dense %s\n",
                retrieval, attended, streamed_frac.c_str());
    std::printf("  dense layers %u, worker memory %.0f bytes (%.4f of dense)\n", dense_layers, mem,
                mem / mem_dense);
    if (*correction != client::Correction::kOff)
      std::printf("  correction %s: %llu bytes, max |logit - dense| %.3g\n",
                  client::CorrectionName(*correction),
                  (unsigned long long)(tot    ? tot->correction_bytes
                                       : stot ? stot->correction_bytes
                                              : 0),
                  r.max_logit_diff);
    std::printf("  top-1 agreement %.4f", double(agree) / steps);
    if (!gen)
      std::printf(", nll dense %.4f sparse %.4f, perplexity ratio %.4f", nll_d, nll_s,
                  std::exp(nll_s - nll_d));
    std::printf("  (%.1f s)\n", secs);
  }
  return 0;
}

}  // namespace kvm::tools
