// kvmctl demo: the README's main job. The reference worker decodes a prompt from the committed
// held-out text through the service (ServiceKvSource: PrHS gate on the worker, retrievals on the
// service, only the selected blocks streamed), prints the text and a summary. Without --server it
// starts its own kvmanager on free ports in a temporary data directory and stops it at the end.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <thread>

#include "client/llama.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "client_flags.h"
#include "commands.h"
#include "flags.h"
#include "local_service.h"
#include "proto/kvm.pb.h"
#include "selector/registry.h"

namespace kvm::tools {
namespace {

struct Stat {
  size_t n = 0;
  double mean = 0, p99 = 0, max = 0;
};
Stat Summarize(const std::vector<double>& v) {
  Stat s;
  s.n = v.size();
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / double(v.size());
  s.p99 = Percentile(v, 0.99);
  s.max = *std::max_element(v.begin(), v.end());
  return s;
}
}  // namespace

int RunDemo(const std::vector<std::string>& args) {
  std::set<std::string> vf = {"server",    "selector", "budget-frac", "target-delta",
                              "max-new",   "context",  "offset",      "model",
                              "tokenizer", "tokens",   "kvmanager",   "audit-frac",
                              "token",     "kv-dtype", "transport",   "correction"};
  vf.insert(kAuthFlags.begin(), kAuthFlags.end());
  const Flags f(args, vf, {"json"});
  const bool json = f.Bool("json");
  const std::string name = f.Str("selector", "prhs");
  auto correction = client::ParseCorrection(f.Str("correction", "off"));
  if (!correction.ok()) throw UsageError("--" + correction.status().message());
  const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
  const std::string tok_path = PathOrDefault(f, "tokenizer", "models/austen/tokenizer.model");
  const std::string text_path = PathOrDefault(f, "tokens", "models/austen/heldout.u16");
  auto model = client::LlamaModel::Load(model_path);
  if (!model.ok())
    return std::fprintf(stderr, "kvmctl demo: %s\n", model.status().ToString().c_str()), 1;
  const auto& cfg = (*model)->config();
  auto tok = client::Tokenizer::Load(tok_path);
  if (!tok.ok())
    return std::fprintf(stderr, "kvmctl demo: %s\n", tok.status().ToString().c_str()), 1;
  auto ids = client::ReadTokenFile(text_path);
  if (!ids.ok())
    return std::fprintf(stderr, "kvmctl demo: %s\n", ids.status().ToString().c_str()), 1;
  const uint64_t max_new = uint64_t(f.Int("max-new", 256, 1, cfg.seq_len - 2));
  const uint64_t context =
      uint64_t(f.Int("context", std::min<int64_t>(640, cfg.seq_len - max_new), 2, cfg.seq_len));
  if (context + max_new > cfg.seq_len)
    throw UsageError("--context + --max-new exceed the model's length " +
                     std::to_string(cfg.seq_len));
  const uint64_t offset = uint64_t(f.Int("offset", 1000, 0, INT64_MAX));
  if (offset + context > ids->size()) throw UsageError("--offset + --context past the text's end");
  const std::string dtype_name = f.Str("kv-dtype", "fp16");
  const DType dtype = dtype_name == "fp32"   ? DType::kF32
                      : dtype_name == "bf16" ? DType::kBF16
                      : dtype_name == "fp16" ? DType::kF16
                                             : throw UsageError("--kv-dtype: fp16, bf16 or fp32");
  const ModelShape shape = (*model)->Shape(dtype);

  // Selector: PrHS at δ* 0.1 with a 1/8 cap by default; --target-delta 0 = budget mode.
  sel::SelectorOptions o;
  const uint32_t B = 16;
  o.geometry = {B, 4, B};
  const double frac = f.Double("budget-frac", 0.125, 1e-6, 1.0);
  // At least one block beyond the sinks and the window (short prompts).
  const uint64_t min_tokens = (o.geometry.MaxSinkBlocks() + o.geometry.MaxWindowBlocks() + 1) * B;
  const uint64_t tokens_frac =
      std::max<uint64_t>(min_tokens, uint64_t(std::llround(frac * context / B)) * B);
  const auto entry = sel::FindSelector(name);
  if (!entry.ok() || !(*entry)->caps.served)
    throw UsageError("--selector: the service runs " +
                     sel::SelectorNames([](const sel::SelectorEntry& e) { return e.caps.served; }));
  const bool has_target = (*entry)->caps.target_mode;
  o.target_delta = has_target ? f.Double("target-delta", 0.1, 0.0, 0.999) : 0.0;
  if (!has_target && f.Has("target-delta"))
    throw UsageError("--target-delta: only " +
                     sel::SelectorNames(
                         [](const sel::SelectorEntry& e) { return e.caps.target_mode; }, " and ") +
                     " have a target mode");
  if (o.target_delta > 0)
    o.max_resident_tokens = tokens_frac;
  else
    o.budget_tokens = tokens_frac;

  if (f.Has("token") && f.Has("token-file")) throw UsageError("give --token or --token-file");
  client::ConnectOptions co;
  co.token = f.Str("token", "dev");
  ApplyAuthFlags(f, &co);
  const uint64_t sequence_id =
      uint64_t(std::chrono::system_clock::now().time_since_epoch().count()) ^
      (uint64_t(getpid()) << 40);
  LocalService local;
  std::string address = f.Str("server", "");
  if (!f.Has("server") && (f.Has("tls-ca") || f.Has("tls-cert") || f.Has("tls-key")))
    throw UsageError("--tls-ca/--tls-cert/--tls-key: only with --server");
  if (!address.empty()) {  // a shard list: the sequence's shard
    address = ShardForSequence(address, co.tenant, sequence_id);
    if (address != *f.Str("server"))
      std::fprintf(stderr, "[demo] sequence %llu is placed on shard %s\n",
                   (unsigned long long)sequence_id, address.c_str());
  } else {
    const std::string bin = FindKvmanager(f);
    if (Status s = local.Start(bin); !s.ok())
      return std::fprintf(stderr, "kvmctl demo: %s\n", s.ToString().c_str()), 1;
    std::fprintf(stderr, "[demo] started kvmanager on %s\n", local.address().c_str());
    address = local.address();
  }
  const std::string want_transport = f.Str("transport", "ucx");
  std::unique_ptr<transport::Transport> data_plane;
  if (want_transport == "ucx") {
    auto t = transport::MakeUcx();
    if (!t.ok())
      return std::fprintf(stderr, "kvmctl demo: %s (use --transport tcp)\n",
                          t.status().ToString().c_str()),
             1;
    data_plane = std::move(*t);
  } else if (want_transport != "tcp") {
    throw UsageError("--transport: ucx or tcp");
  }
  co.address = address;
  co.data_plane = data_plane.get();
  co.client_name = "kvmctl-demo";
  auto conn = client::Client::Connect(co);
  if (!conn.ok())
    return std::fprintf(stderr, "kvmctl demo: %s\n", conn.status().ToString().c_str()), 1;
  client::ServiceSourceOptions so;
  so.sequence_id = sequence_id;
  so.selector = name;
  so.options = o;
  so.prefill = context;
  so.correction = *correction;
  so.audit_fraction = f.Double("audit-frac", 0.05, 0.0, 1.0);
  auto src = client::ServiceKvSource::Make(conn->get(), shape, so);
  if (!src.ok())
    return std::fprintf(stderr, "kvmctl demo: %s\n", src.status().ToString().c_str()), 1;
  client::ReferenceWorker w(**model, src->get());
  std::vector<float> logits(cfg.vocab_size);
  std::fprintf(
      stderr, "[demo] %s, %s KV, selector %s (%s), prompt %llu tokens of the held-out text\n",
      address.c_str(), DTypeName(dtype), name.c_str(),
      o.target_delta > 0 ? ("target delta " + Num(o.target_delta) + ", cap " +
                            std::to_string(o.max_resident_tokens) + " tokens")
                               .c_str()
                         : ("budget " + std::to_string(o.budget_tokens) + " tokens").c_str(),
      (unsigned long long)context);
  auto fail = [&](const Status& s) {
    std::fprintf(stderr, "\nkvmctl demo: %s\n", s.ToString().c_str());
    return 1;
  };
  const auto t0 = std::chrono::steady_clock::now();
  for (uint64_t p = 0; p < context; ++p) {
    if (Status s = w.Forward((*ids)[offset + p], p, p + 1 == context ? logits.data() : nullptr);
        !s.ok())
      return fail(s);
    if (p % 64 == 0 || p + 1 == context)
      std::fprintf(stderr, "\r[demo] prefill %llu/%llu", (unsigned long long)p + 1,
                   (unsigned long long)context);
  }
  std::fprintf(stderr, "\n");
  // The prompt's appends are out and answered: what the worker sends from here on is the decode's.
  if (Status s = (*src)->Flush(); !s.ok()) return fail(s);
  const uint64_t sent_before_decode = (*conn)->bytes_sent();
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<uint32_t> out;
  for (uint64_t i = 0; i < max_new; ++i) {
    const uint32_t next = uint32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    if (i + 1 == max_new) break;
    if (Status s = w.Forward(next, context + i, logits.data()); !s.ok()) return fail(s);
    if (i % 16 == 0 || i + 2 == max_new)
      std::fprintf(stderr, "\r[demo] decode %llu/%llu", (unsigned long long)i + 2,
                   (unsigned long long)max_new);
  }
  std::fprintf(stderr, "\n");
  if (Status s = (*src)->Flush(); !s.ok()) return fail(s);
  const uint64_t sent_decode = (*conn)->bytes_sent() - sent_before_decode;
  const double decode_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();

  // δ by kind: the worker's claims for every (step, layer, query head) — exact at anchors and
  // short contexts, the bound on reuse — and the audits measured by the service on samples.
  std::map<DeltaKind, std::vector<double>> by_kind;
  std::vector<double> claims;
  for (const auto& r : (*src)->claims()) {
    by_kind[r.kind].push_back(r.delta);
    // Claims: exact and bound (a sharing layer's selection has no δ of its own: kind unknown).
    if (r.kind == DeltaKind::kExact || r.kind == DeltaKind::kBound) claims.push_back(r.delta);
  }
  const Stat all = Summarize(claims);
  size_t within = 0;
  for (double d : claims) within += d <= o.target_delta;
  const double within_frac = o.target_delta > 0 && !claims.empty()
                                 ? double(within) / double(claims.size())
                                 : std::numeric_limits<double>::quiet_NaN();
  const client::ServiceTotals& t = (*src)->totals();
  const double steps = double(t.steps);
  const double overhead =
      steps > 0 ? double(t.retrievals) / (steps * cfg.n_layers * cfg.n_heads) : 0;
  const double tps = decode_s > 0 ? double(t.steps) / decode_s : 0;
  // Which data plane carried the blocks, and (UCX) the lanes the service's endpoint uses.
  const std::string transport_used = (*conn)->data_plane() ? (*conn)->data_plane()->name() : "tcp";
  std::string lanes;
  if (auto st = (*conn)->Call(wire::MessageType::kStats, wire::Stats()); st.ok()) {
    wire::StatsReply r;
    if (wire::ParseProto(*st, &r).ok()) {
      const std::string key = "\"data_plane_lanes\": \"";
      const size_t a = r.json().find(key);
      if (a != std::string::npos)
        lanes =
            r.json().substr(a + key.size(), r.json().find('"', a + key.size()) - a - key.size());
    }
  }
  (void)(*src)->Delete();  // the sequence is the demo's own
  local.Stop();
  // The kinds of the claims delta_mean summarises, as this run produced them.
  std::string kinds;
  for (DeltaKind k : {DeltaKind::kExact, DeltaKind::kBound})
    if (by_kind.count(k)) kinds += std::string(kinds.empty() ? "" : "+") + DeltaKindName(k);
  std::string gate_json;
  for (sel::GateOutcome go : sel::kGateOutcomes)
    gate_json += std::string(gate_json.empty() ? "" : ", ") + "\"" + sel::GateOutcomeName(go) +
                 "\": " + std::to_string(t.gate[go]);
  const double attention_ms =
      t.attention_layers ? 1e3 * t.attention_seconds / double(t.attention_layers) : NAN;
  if (json) {
    std::string byk;
    for (const auto& [k, v] : by_kind) {
      const Stat s = Summarize(v);
      byk += std::string(byk.empty() ? "" : ", ") + "\"" + DeltaKindName(k) +
             "\": {\"n\": " + std::to_string(s.n) + ", \"mean\": " + Num(s.mean) +
             ", \"p99\": " + Num(s.p99) + ", \"max\": " + Num(s.max) + "}";
    }
    std::printf(
        "{\"tokens\": %zu, \"prompt_tokens\": %llu, \"selector\": \"%s\", \"target_delta\": %s, "
        "\"delta_mean\": %s, \"delta_p99\": %s, \"delta_kind\": \"%s\", \"delta_by_kind\": {%s}, "
        "\"within_target_fraction\": %s, \"retrieval_overhead\": %s, \"round_trips\": %llu, "
        "\"gate_reuses\": %llu, \"gate_checks\": {%s}, \"retrievals\": %llu, "
        "\"attention_ms_per_layer\": %s, \"bytes_from_worker_per_step\": %s, "
        "\"streamed_bytes\": %llu, \"dense_offload_bytes\": %llu, "
        "\"topk_refetch_bytes\": %llu, \"streamed_over_dense\": %s, \"tokens_per_second\": %s, "
        "\"prefill_seconds\": %s, \"retrieve_wait_seconds\": %s, \"local_fill_bytes\": %llu, "
        "\"transport\": \"%s\", \"data_plane_lanes\": \"%s\", \"correction\": \"%s\", "
        "\"correction_bytes\": %llu, \"correction_ms_per_step\": %s, "
        "\"text\": \"%s\"}\n",
        out.size(), (unsigned long long)context, name.c_str(), Num(o.target_delta).c_str(),
        Num(all.mean).c_str(), Num(all.p99).c_str(), kinds.c_str(), byk.c_str(),
        Num(within_frac).c_str(), Num(overhead).c_str(), (unsigned long long)t.round_trips,
        (unsigned long long)t.gate[sel::GateOutcome::kReuse], gate_json.c_str(),
        (unsigned long long)t.retrievals, Num(attention_ms).c_str(),
        Num(t.steps ? double(sent_decode) / double(t.steps) : NAN).c_str(),
        (unsigned long long)t.streamed_bytes, (unsigned long long)t.dense_equivalent,
        (unsigned long long)t.topk_refetch,
        Num(t.dense_equivalent ? double(t.streamed_bytes) / double(t.dense_equivalent) : 0).c_str(),
        Num(tps).c_str(), Num(prefill_s).c_str(), Num(t.retrieve_seconds).c_str(),
        (unsigned long long)t.local_fill_bytes, transport_used.c_str(), JsonEscape(lanes).c_str(),
        client::CorrectionName(*correction), (unsigned long long)t.correction_bytes,
        Num(t.steps ? 1e3 * t.correction_seconds / double(t.steps) : NAN).c_str(),
        JsonEscape((*tok)->Decode(out)).c_str());
    return 0;
  }
  std::vector<uint32_t> tail(ids->begin() + offset + context - std::min<uint64_t>(context, 48),
                             ids->begin() + offset + context);
  std::printf("...%s", (*tok)->Decode(tail).c_str());
  std::printf(" >>> %s\n\n", (*tok)->Decode(out).c_str());
  std::printf("summary (%s through the service at %s, blocks over %s%s%s)\n", name.c_str(),
              address.c_str(), transport_used.c_str(), lanes.empty() ? "" : ": ", lanes.c_str());
  std::printf("  tokens generated        %zu (prompt %llu), %.1f tokens/s decode, prefill %.2f s\n",
              out.size(), (unsigned long long)context, tps, prefill_s);
  std::printf("  dropped mass delta      mean %s, p99 %s over %zu (step, layer, head) claims",
              Num(all.mean).c_str(), Num(all.p99).c_str(), all.n);
  if (o.target_delta > 0)
    std::printf("; within target %s: %s", Num(o.target_delta).c_str(), Num(within_frac).c_str());
  std::printf("\n");
  for (const auto& [k, v] : by_kind) {
    const Stat s = Summarize(v);
    std::printf("    %-6s n %-6zu mean %-10s p99 %-10s max %s\n", DeltaKindName(k), s.n,
                Num(s.mean).c_str(), Num(s.p99).c_str(), Num(s.max).c_str());
  }
  std::printf(
      "  retrieval overhead      %s (query heads scored / steps x layers x heads); %llu "
      "round trips, %llu gate reuses\n",
      Num(overhead).c_str(), (unsigned long long)t.round_trips,
      (unsigned long long)t.gate[sel::GateOutcome::kReuse]);
  std::printf(
      "  bytes streamed          %llu vs dense offload %llu (%s) vs per-step top-k "
      "refetch %llu\n",
      (unsigned long long)t.streamed_bytes, (unsigned long long)t.dense_equivalent,
      Num(t.dense_equivalent ? double(t.streamed_bytes) / double(t.dense_equivalent) : 0).c_str(),
      (unsigned long long)t.topk_refetch);
  std::printf(
      "  waiting for retrievals  %.2f s of %.2f s decode; %llu bytes filled from the worker's "
      "own window copy\n",
      t.retrieve_seconds, decode_s, (unsigned long long)t.local_fill_bytes);
  std::printf(
      "  worker attention        %s ms per layer (fast CPU kernel over the hot set + tail)\n",
      Num(attention_ms).c_str());
  std::printf("  bytes from the worker   %s per decode step (appends, queries, frame headers)\n",
              Num(t.steps ? double(sent_decode) / double(t.steps) : NAN).c_str());
  return 0;
}

}  // namespace kvm::tools
