// kvmctl bench decode: the same decode steps once in-process (SelectorKvSource) and once through
// the service (ServiceKvSource over the chosen transport), side by side in one run: tokens/s of
// each, their ratio, round trips and bytes per step, step latency, the worker's attention time. The
// committed model and held-out text by default, or a synthetic workload (labelled synthetic) of any
// shape.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "client/client.h"
#include "client/llama.h"
#include "client/selector_source.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "client_flags.h"
#include "commands.h"
#include "eval.h"
#include "flags.h"
#include "kvmanager/block_store.h"
#include "kvmanager/server.h"
#include "local_service.h"
#include "selector/registry.h"
#include "synthetic.h"
#include "transport/transport.h"

namespace kvm::tools {
namespace {
using Clock = std::chrono::steady_clock;

struct RunResult {
  double seconds = 0;             // the decode steps
  std::vector<double> step_ms;    // per decode step
  std::vector<uint32_t> tokens;   // model mode: the greedy tokens
  std::vector<uint64_t> outputs;  // synthetic mode: a hash of each step's attention outputs
};

// The workload: model mode decodes greedily after a prompt; synthetic mode feeds the generator.
struct Workload {
  const client::LlamaModel* model = nullptr;
  std::vector<uint32_t> prompt;
  ModelShape shape;
  uint64_t context = 0, steps = 0;
  bool synthetic() const { return model == nullptr; }

  Result<RunResult> Run(client::KvSource* src, bool progress, const char* what) const {
    RunResult r;
    if (!synthetic()) {
      client::ReferenceWorker w(*model, src);
      std::vector<float> logits(model->config().vocab_size);
      for (uint64_t p = 0; p < context; ++p) {
        KVM_RETURN_IF_ERROR(w.Forward(prompt[p], p, p + 1 == context ? logits.data() : nullptr));
        if (progress && p % 128 == 0)
          std::fprintf(stderr, "\r[bench decode] %s prefill %llu/%llu", what, (unsigned long long)p,
                       (unsigned long long)context);
      }
      const auto t0 = Clock::now();
      for (uint64_t i = 0; i < steps; ++i) {
        const auto a = Clock::now();
        const uint32_t next =
            uint32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
        r.tokens.push_back(next);
        KVM_RETURN_IF_ERROR(w.Forward(next, context + i, logits.data()));
        r.step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
        if (progress && (i % 16 == 0 || i + 1 == steps))
          std::fprintf(stderr, "\r[bench decode] %s decode %llu/%llu        ", what,
                       (unsigned long long)i + 1, (unsigned long long)steps);
      }
      r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (progress) std::fprintf(stderr, "\n");
      return r;
    }
    Synthetic gen(shape);
    const size_t kv = size_t{shape.kv_heads} * shape.head_dim;
    std::vector<float> k(kv), v(kv), q(size_t{shape.q_heads} * shape.head_dim), out(q.size());
    for (uint64_t p = 0; p < context; ++p) {  // prefill: the KV only (no prefill attention)
      src->BeginToken(uint32_t(p % 4096), p);
      for (uint32_t l = 0; l < shape.layers; ++l) {
        gen.KeysValues(l, p, k.data(), v.data());
        KVM_RETURN_IF_ERROR(src->Append(l, p, k.data(), v.data()));
      }
      if (progress && p % 1024 == 0)
        std::fprintf(stderr, "\r[bench decode] %s prefill %llu/%llu (synthetic)", what,
                     (unsigned long long)p, (unsigned long long)context);
    }
    for (uint32_t l = 0; l < shape.layers; ++l)  // the drifting queries start from the prompt's
      for (uint64_t p = context > 64 ? context - 64 : 0; p < context; ++p)
        gen.Queries(l, p, q.data());
    const auto t0 = Clock::now();
    for (uint64_t i = 0; i < steps; ++i) {
      const uint64_t p = context + i;
      const auto a = Clock::now();
      src->BeginToken(uint32_t(p % 4096), p);
      uint64_t hash = 0xcbf29ce484222325ull;
      for (uint32_t l = 0; l < shape.layers; ++l) {
        gen.KeysValues(l, p, k.data(), v.data());
        gen.Queries(l, p, q.data());
        KVM_RETURN_IF_ERROR(src->Append(l, p, k.data(), v.data()));
        KVM_RETURN_IF_ERROR(src->Attend(l, p, q.data(), out.data()));
        for (float x : out) {
          uint32_t b;
          std::memcpy(&b, &x, 4);
          hash = (hash ^ b) * 0x100000001b3ull;
        }
      }
      r.outputs.push_back(hash);
      r.step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
      if (progress && (i % 8 == 0 || i + 1 == steps))
        std::fprintf(stderr, "\r[bench decode] %s decode %llu/%llu (synthetic)        ", what,
                     (unsigned long long)i + 1, (unsigned long long)steps);
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (progress) std::fprintf(stderr, "\n");
    return r;
  }
};

int Fail(const Status& s) {
  std::fprintf(stderr, "kvmctl bench decode: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int RunBenchDecode(const std::vector<std::string>& raw) {
  std::set<std::string> vf(kSelectorValueFlags.begin(), kSelectorValueFlags.end()),
      bf(kSelectorBoolFlags.begin(), kSelectorBoolFlags.end());
  vf.insert({"model", "tokens", "offset", "layers", "q-heads", "kv-heads", "head-dim", "context",
             "steps", "selector", "transport", "server", "kvmanager", "kv-dtype", "correction"});
  vf.insert(kAuthFlags.begin(), kAuthFlags.end());
  bf.insert({"synthetic", "json"});
  std::vector<std::string> args = raw;
  {  // without a budget flag: demo's default, δ* 0.1 with a cap of 1/8 of the context
    const Flags probe(args, vf, bf);
    if (!probe.Has("budget") && !probe.Has("budget-frac") && !probe.Has("target-delta"))
      args.insert(args.end(), {"--target-delta", "0.1", "--max-resident-frac", "0.125"});
  }
  const Flags f(args, vf, bf);
  const bool synthetic = f.Bool("synthetic");
  if (synthetic && (f.Has("model") || f.Has("tokens") || f.Has("offset")))
    throw UsageError("--synthetic takes no --model, --tokens or --offset");
  if (!synthetic && (f.Has("layers") || f.Has("q-heads") || f.Has("kv-heads") || f.Has("head-dim")))
    throw UsageError("--layers, --q-heads, --kv-heads and --head-dim need --synthetic");
  if (!f.Has("context")) throw UsageError("--context is required");
  if (!f.Has("steps")) throw UsageError("--steps is required");
  const uint64_t context = uint64_t(f.Int("context", 0, 1, 1 << 24));
  const uint64_t steps = uint64_t(f.Int("steps", 0, 1, 1 << 20));
  const std::string name = f.Str("selector", "prhs");
  const auto entry = sel::FindSelector(name);
  if (!entry.ok() || !(*entry)->caps.served)
    throw UsageError("--selector: the service runs " +
                     sel::SelectorNames([](const sel::SelectorEntry& e) { return e.caps.served; }));
  const std::string transport = f.Str("transport", "ucx");
  if (transport != "ucx" && transport != "tcp" && transport != "inproc")
    throw UsageError("--transport: ucx, tcp or inproc");
  if (transport == "inproc" && f.Has("server"))
    throw UsageError("--transport inproc embeds the service; it takes no --server");
  auto dtype = ParseDType(f.Str("kv-dtype", "fp16"));
  if (!dtype.ok()) throw UsageError("--kv-dtype: " + dtype.status().message());

  Workload w;
  std::unique_ptr<client::LlamaModel> model;
  uint64_t max_context = 0;
  if (synthetic) {
    w.shape = ModelShape{uint32_t(f.Int("layers", 8, 1, 1024)),
                         uint32_t(f.Int("q-heads", 32, 1, 1024)),
                         uint32_t(f.Int("kv-heads", 8, 1, 1024)),
                         uint32_t(f.Int("head-dim", 128, 32, 256)),
                         *dtype,
                         0x5e17ull};
    if (Status s = w.shape.Validate(); !s.ok()) throw UsageError(s.message());
    if (w.shape.group_size() > 8) throw UsageError("--q-heads / --kv-heads must be at most 8");
    max_context = context + steps;
  } else {
    const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
    const std::string tokens_path = PathOrDefault(f, "tokens", "models/austen/heldout.u16");
    auto m = client::LlamaModel::Load(model_path);
    if (!m.ok()) return Fail(m.status());
    model = std::move(*m);
    if (context + steps > model->config().seq_len)
      throw UsageError("--context + --steps exceed the model's trained length " +
                       std::to_string(model->config().seq_len));
    auto ids = client::ReadTokenFile(tokens_path);
    if (!ids.ok()) return Fail(ids.status());
    const uint64_t offset = uint64_t(f.Int("offset", 1000, 0, INT64_MAX));
    if (offset + context > ids->size())
      throw UsageError("--offset + --context past the text's end");
    w.prompt.assign(ids->begin() + int64_t(offset), ids->begin() + int64_t(offset + context));
    w.model = model.get();
    w.shape = model->Shape(*dtype);
    max_context = model->config().seq_len;
  }
  w.context = context;
  w.steps = steps;
  const sel::SelectorOptions o = ParseSelectorOptions(f, name, context, w.shape);
  const bool progress = !f.Bool("json");
  auto correction = client::ParseCorrection(f.Str("correction", "off"));
  if (!correction.ok()) throw UsageError("--" + correction.status().message());
  if (Status st = client::CheckCorrection(o, *correction); !st.ok())
    throw UsageError("--reuse-while-fits: " + st.message());

  // In-process.
  auto selector = (*entry)->make(o, w.shape, max_context);
  if (!selector.ok()) throw UsageError(selector.status().message());
  auto local = client::SelectorKvSource::Make(w.shape, o.geometry.block_size, std::move(*selector),
                                              o, context, max_context);
  if (!local.ok()) return Fail(local.status());
  (*local)->set_correction(*correction);
  auto in_process = w.Run(local->get(), progress, "in-process");
  if (!in_process.ok()) return Fail(in_process.status());
  const double local_correction_s = (*local)->totals().correction_seconds;
  local->reset();

  // Through the service: its own kvmanager on free loopback ports, embedded (inproc), or --server.
  LocalService child;
  std::unique_ptr<store::BlockStore> store;
  std::unique_ptr<server::Server> embedded;
  std::unique_ptr<transport::Transport> service_dp, worker_dp;
  std::string address = f.Str("server", "");
  for (const auto& a : kAuthFlags)
    if (f.Has(a) && !f.Has("server")) throw UsageError("--" + a + ": only with --server");
  client::ConnectOptions co;
  ApplyAuthFlags(f, &co);
  const uint64_t sequence_id =
      uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  if (!address.empty()) address = ShardForSequence(address, co.tenant, sequence_id);  // its shard
  char store_dir[] = "/tmp/kvmctl_bench_decode_XXXXXX";
  bool made_dir = false;
  if (transport == "inproc") {
    if (!mkdtemp(store_dir)) return Fail(Status::Internal("cannot create a temporary directory"));
    made_dir = true;
    store::StoreOptions so;
    so.dir = store_dir;
    auto st = store::BlockStore::Open(so);
    if (!st.ok()) return Fail(st.status());
    store = std::move(*st);
    service_dp = transport::MakeInProcess();
    worker_dp = transport::MakeInProcess();
    server::ServerOptions sopt;
    sopt.listen = "127.0.0.1:0";
    sopt.handler.tenants = {{"dev", "dev", true}};
    sopt.handler.data_plane = service_dp.get();
    auto sv = server::Server::Start(sopt, store.get());
    if (!sv.ok()) return Fail(sv.status());
    embedded = std::move(*sv);
    address = embedded->address();
  } else {
    if (address.empty()) {
      if (Status s = child.Start(FindKvmanager(f)); !s.ok()) return Fail(s);
      address = child.address();
    }
    if (transport == "ucx") {
      auto t = transport::MakeUcx();
      if (!t.ok()) return Fail(t.status().WithContext("use --transport tcp"));
      worker_dp = std::move(*t);
    }
  }
  co.address = address;
  co.client_name = "kvmctl-bench-decode";
  co.data_plane = worker_dp.get();
  auto conn = client::Client::Connect(co);
  if (!conn.ok()) return Fail(conn.status());
  if (worker_dp && !(*conn)->data_plane())
    return Fail(Status::Unavailable("the service did not accept the " + transport + " data plane"));
  client::ServiceSourceOptions sso;
  sso.sequence_id = sequence_id;
  sso.selector = name;
  sso.options = o;
  sso.prefill = context;
  sso.correction = *correction;
  auto remote = client::ServiceKvSource::Make(conn->get(), w.shape, sso);
  if (!remote.ok()) return Fail(remote.status());
  // Bytes from the worker during the decode: everything it writes after the prefill is flushed.
  struct Counting : client::KvSource {
    client::ServiceKvSource* s;
    client::Client* c;
    uint64_t prefill, base = 0;
    bool started = false;
    void BeginToken(uint32_t t, uint64_t p) override {
      if (p == prefill && !started) {
        (void)s->Flush();  // the prefill's appends are out and answered
        base = c->bytes_sent();
        started = true;
      }
      s->BeginToken(t, p);
    }
    Status Append(uint32_t l, uint64_t p, const float* k, const float* v) override {
      return s->Append(l, p, k, v);
    }
    Status Attend(uint32_t l, uint64_t p, const float* q, float* o) override {
      return s->Attend(l, p, q, o);
    }
  } counting;
  counting.s = remote->get();
  counting.c = conn->get();
  counting.prefill = context;
  auto service = w.Run(&counting, progress, "service");
  if (service.ok()) {
    if (Status s = (*remote)->Flush(); !s.ok()) service = s;
  }
  const uint64_t bytes_from_worker = (*conn)->bytes_sent() - counting.base;
  const client::ServiceTotals t = (*remote)->totals();
  (void)(*remote)->Delete();
  remote->reset();
  conn->reset();
  if (embedded) embedded->Stop();
  embedded.reset();
  store.reset();
  if (made_dir) std::filesystem::remove_all(store_dir);
  if (!service.ok()) return Fail(service.status());

  const double in_tps = double(steps) / in_process->seconds;
  const double svc_tps = double(steps) / service->seconds;
  const std::string identical =
      synthetic ? "null" : (in_process->tokens == service->tokens ? "true" : "false");
  const bool same_outputs =
      synthetic ? in_process->outputs == service->outputs : in_process->tokens == service->tokens;
  const double attention_ms =
      t.attention_layers ? 1e3 * t.attention_seconds / double(t.attention_layers) : NAN;
  const std::string used = worker_dp ? std::string(worker_dp->name()) : "tcp";
  if (f.Bool("json")) {
    std::printf(
        "{\"in_process_tokens_per_second\": %s, \"service_tokens_per_second\": %s, \"ratio\": %s, "
        "\"identical_tokens\": %s, \"identical_outputs\": %s, \"round_trips_per_step\": %s, "
        "\"step_p50_ms\": %s, \"step_p99_ms\": %s, \"in_process_step_p50_ms\": %s, "
        "\"attention_ms_per_layer\": %s, \"bytes_from_worker_per_step\": %s, "
        "\"streamed_bytes_per_step\": %s, \"transport\": \"%s\", \"synthetic\": %s, "
        "\"selector\": \"%s\", \"context\": %llu, \"steps\": %llu, \"layers\": %u, \"q_heads\": "
        "%u, \"kv_heads\": %u, \"head_dim\": %u, \"kv_dtype\": \"%s\", \"target_delta\": %s, "
        "\"budget_tokens\": %llu, \"max_resident_tokens\": %llu, \"correction\": \"%s\", "
        "\"correction_bytes_per_step\": %s, \"correction_ms_per_step\": %s, "
        "\"in_process_correction_ms_per_step\": %s, \"correction_service_ms_per_step\": %s, "
        "\"reuse_while_fits\": %s}\n",
        Num(in_tps).c_str(), Num(svc_tps).c_str(), Num(svc_tps / in_tps).c_str(), identical.c_str(),
        same_outputs ? "true" : "false", Num(double(t.round_trips) / double(steps)).c_str(),
        Num(Percentile(service->step_ms, 0.5)).c_str(),
        Num(Percentile(service->step_ms, 0.99)).c_str(),
        Num(Percentile(in_process->step_ms, 0.5)).c_str(), Num(attention_ms).c_str(),
        Num(double(bytes_from_worker) / double(steps)).c_str(),
        Num(double(t.streamed_bytes) / double(steps)).c_str(), used.c_str(),
        synthetic ? "true" : "false", name.c_str(), (unsigned long long)context,
        (unsigned long long)steps, w.shape.layers, w.shape.q_heads, w.shape.kv_heads,
        w.shape.head_dim, DTypeName(*dtype), Num(o.target_delta).c_str(),
        (unsigned long long)o.budget_tokens, (unsigned long long)o.max_resident_tokens,
        client::CorrectionName(*correction),
        Num(double(t.correction_bytes) / double(steps)).c_str(),
        Num(1e3 * t.correction_seconds / double(steps)).c_str(),
        Num(1e3 * local_correction_s / double(steps)).c_str(),
        Num(1e3 * t.correction_service_seconds / double(steps)).c_str(),
        o.prhs.reuse_while_fits ? "true" : "false");
  } else {
    std::printf("bench decode%s: %s, context %llu, %llu steps, L %u Hq %u Hkv %u D %u %s\n",
                synthetic ? " (synthetic)" : "", name.c_str(), (unsigned long long)context,
                (unsigned long long)steps, w.shape.layers, w.shape.q_heads, w.shape.kv_heads,
                w.shape.head_dim, DTypeName(*dtype));
    std::printf("  in-process %.1f tokens/s, through the service (%s) %.1f tokens/s: ratio %.3f\n",
                in_tps, used.c_str(), svc_tps, svc_tps / in_tps);
    std::printf("  %s; %.2f round trips per step; step p50 %.2f ms p99 %.2f ms\n",
                synthetic ? (same_outputs ? "identical outputs" : "OUTPUTS DIFFER")
                          : (same_outputs ? "identical tokens" : "TOKENS DIFFER"),
                double(t.round_trips) / double(steps), Percentile(service->step_ms, 0.5),
                Percentile(service->step_ms, 0.99));
    std::printf("  worker attention %s ms per layer; %.0f bytes from the worker per step\n",
                Num(attention_ms).c_str(), double(bytes_from_worker) / double(steps));
  }
  return 0;
}

}  // namespace kvm::tools
