// The reference worker decoding through the service (ServiceKvSource over a real TCP server on
// loopback) against the same worker with the in-process selector (SelectorKvSource): the same
// selector, budget and KV dtype give bit-identical logits and tokens, the same gate decisions and
// the same claims, with PrHS's reuse steps never reaching the service. Then the failure paths: a
// selector the service does not run, a hot set that diverged from the service's mirror, a lost
// connection (retried once), a worker killed mid-stream.
#include "testutil/service.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <tuple>

#include "client/hot_set.h"
#include "client/llama.h"
#include "client/selector_source.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "kvmanager/server.h"
#include "proto/kvm.pb.h"
#include "selector/registry.h"
#include "selector/wire_options.h"

namespace kvm::client {
namespace {

std::string ModelDir() { return std::string(KVM_SOURCE_DIR) + "/models/austen"; }

uint32_t Argmax(const std::vector<float>& v) {
  return uint32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

struct Case {
  std::string name, selector;
  uint64_t budget;        // tokens
  double target;          // δ*; cap = 1/2 of the context
  std::string transport;  // tcp (blocks in reply frames), inproc, ucx
  std::function<void(sel::SelectorOptions&)> tweak = nullptr;
  uint64_t context = 512, steps = 48;
};

std::unique_ptr<transport::Transport> MakeTransport(const std::string& kind, bool service) {
  if (kind == "inproc") return transport::MakeInProcess();
  if (kind != "ucx") return nullptr;
  setenv("UCX_TLS", "sm,tcp", 1);  // shared memory on this host; tcp only for wireup
  setenv("UCX_NET_DEVICES", "lo", 1);
  auto t = transport::MakeUcx({.progress_thread = service});
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(*t) : nullptr;
}

// A kvmanager in this process with an optional data plane.
std::unique_ptr<testutil::TestService> StartService(transport::Transport* data_plane = nullptr,
                                                    uint32_t session_timeout_ms = 10000) {
  server::ServerOptions o;
  o.handler.data_plane = data_plane;
  o.session_timeout_ms = session_timeout_ms;
  return std::make_unique<testutil::TestService>(o);
}

sel::SelectorOptions OptionsOf(const Case& c) {
  sel::SelectorOptions o;
  o.geometry = {16, 4, 16};
  o.budget_tokens = c.budget;
  o.target_delta = c.target;
  if (c.target > 0) o.max_resident_tokens = c.context / 2;
  if (c.tweak) c.tweak(o);
  return o;
}

class ServiceSourceTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    service_dp_ = MakeTransport(GetParam().transport, true);
    worker_dp_ = MakeTransport(GetParam().transport, false);
    service_ = StartService(service_dp_.get());
  }
  void TearDown() override { service_.reset(); }
  std::unique_ptr<transport::Transport> service_dp_, worker_dp_;
  std::unique_ptr<testutil::TestService> service_;
};

TEST_P(ServiceSourceTest, GenerateThroughTheServiceIsIdenticalToInProcess) {
  const Case& c = GetParam();
  auto model = LlamaModel::Load(ModelDir() + "/model.bin");
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto ids = ReadTokenFile(ModelDir() + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  const uint64_t context = c.context, steps = c.steps;
  const ModelShape shape = (*model)->Shape(DType::kF16);
  const sel::SelectorOptions o = OptionsOf(c);

  auto sel = sel::MakeSelector(c.selector, o, shape, (*model)->config().seq_len);
  ASSERT_TRUE(sel.ok()) << sel.status().ToString();
  auto local =
      SelectorKvSource::Make(shape, 16, std::move(*sel), o, context, (*model)->config().seq_len);
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  auto conn =
      Client::Connect({.address = service_->server->address(), .data_plane = worker_dp_.get()});
  ASSERT_TRUE(conn.ok()) << conn.status().ToString();
  EXPECT_EQ((*conn)->data_plane() != nullptr, c.transport != "tcp");
  ServiceSourceOptions so;
  so.sequence_id = 42;
  so.selector = c.selector;
  so.options = o;
  so.prefill = context;
  so.audit_fraction = 0.3;
  auto remote = ServiceKvSource::Make(conn->get(), shape, so);
  ASSERT_TRUE(remote.ok()) << remote.status().ToString();

  ReferenceWorker wl(**model, local->get()), wr(**model, remote->get());
  // The in-process selector builds its layer map as the worker does: the gate's BuildLayerMap over
  // the last prefill queries.
  sel::PrefillQueries lastq(shape.layers, shape.q_heads, shape.head_dim,
                            o.prhs.layer_map.window_queries, context);
  wl.on_layer = [&](const LayerTrace& t) { lastq.Observe(t.layer, t.pos, t.q); };
  std::vector<float> ll((*model)->config().vocab_size), lr(ll.size());
  for (uint64_t p = 0; p < context; ++p) {
    const bool last = p + 1 == context;
    ASSERT_TRUE(wl.Forward((*ids)[p], p, last ? ll.data() : nullptr).ok());
    ASSERT_TRUE(wr.Forward((*ids)[p], p, last ? lr.data() : nullptr).ok());
  }
  if (sel::WorkerGate* g = (*local)->selector().gate(); g && g->layer_sharing()) {
    ASSERT_TRUE(g->BuildLayerMap(lastq, context, [&](uint32_t l) {
                   std::vector<attn::HeadKV> v;
                   for (uint32_t h = 0; h < shape.kv_heads; ++h)
                     v.push_back((*local)->dense().View(l, h, context));
                   return v;
                 }).ok());
    uint32_t shared = 0;
    for (uint32_t l = 0; l < shape.layers; ++l) shared += g->SharesLayer(l);
    EXPECT_GT(shared, 0u) << "the layer map shares nothing: the case tests nothing";
  }
  uint32_t next = (*ids)[context];
  for (uint64_t i = 0; i < steps; ++i) {
    const uint64_t p = context + i;
    ASSERT_TRUE(wl.Forward(next, p, ll.data()).ok());
    Status s = wr.Forward(next, p, lr.data());
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(std::memcmp(ll.data(), lr.data(), ll.size() * sizeof(float)), 0)
        << "logits differ at decode step " << i;
    next = Argmax(ll);
  }
  ASSERT_TRUE((*remote)->Flush().ok());
  const ServiceTotals& t = (*remote)->totals();
  const SourceTotals& lt = (*local)->totals();
  EXPECT_EQ(t.steps, steps);
  EXPECT_GT(t.streamed_bytes, 0u);
  EXPECT_EQ(t.retrievals, lt.retrievals);  // the same anchors, counted the same way
  EXPECT_EQ(t.divergences + t.reconnects + t.failed_calls, 0u);
  const uint64_t L = shape.layers;
  const sel::GateCounts lg = (*local)->gate_counts();
  if (c.selector == "prhs") {
    // The worker's gate decides exactly as the in-process selector's, outcome by outcome.
    for (sel::GateOutcome go : sel::kGateOutcomes)
      EXPECT_EQ(t.gate[go], lg[go]) << sel::GateOutcomeName(go);
    EXPECT_EQ(t.gate.total(), steps * L * shape.kv_heads);
    if (c.name.find("reuse") != std::string::npos || c.target == 0) {
      EXPECT_GT(t.gate[sel::GateOutcome::kReuse], 0u);  // pre-hoc: reuse steps send nothing
      EXPECT_LT(t.round_trips, steps * L);              // ... so fewer round trips than layer-steps
      EXPECT_GT(t.audits, 0u);                          // audits on sampled reuse steps came back
    }
    if (o.prhs.layer_sharing) {
      EXPECT_GT(t.gate[sel::GateOutcome::kSharedLayer], 0u);
      EXPECT_GT(t.shared_prefetches, 0u);
    }
  } else {  // no gate: every layer-step retrieves, but for the dense layers (held by the worker)
    const uint32_t dense = sel::DenseLayers(o, *sel::FindSelector(c.selector).value());
    EXPECT_EQ(t.round_trips, steps * (L - dense));
    EXPECT_EQ(t.gate[sel::GateOutcome::kDenseLayer], steps * dense * shape.kv_heads);
  }
  // Every δ the worker records through the service equals the in-process selector's claim for the
  // same (step, layer, query head), with the same kind: exact at anchors (sent as float), the bound
  // on reuse steps (computed by the worker itself, bit for bit). Audits are the service's own.
  std::map<std::tuple<uint64_t, uint32_t, uint32_t>, const ClaimRecord*> claims;
  for (const auto& r : (*local)->claims()) claims[{r.step, r.layer, r.q_head}] = &r;
  size_t exact = 0, bound = 0;
  for (const auto& r : (*remote)->claims()) {
    if (r.kind == DeltaKind::kAudit) continue;
    auto it = claims.find({r.step, r.layer, r.q_head});
    ASSERT_NE(it, claims.end()) << "step " << r.step << " layer " << r.layer;
    ASSERT_EQ(r.kind, it->second->kind) << "step " << r.step << " layer " << r.layer;
    if (r.kind == DeltaKind::kExact) {
      EXPECT_EQ(float(r.delta), float(it->second->delta)) << "step " << r.step;
      ++exact;
    } else if (r.kind == DeltaKind::kBound) {
      EXPECT_EQ(r.delta, it->second->delta) << "step " << r.step;
      ++bound;
    }
  }
  if (c.selector == "prhs" || c.selector == "oracle") {
    EXPECT_GT(exact, 0u);
  }
  if (c.selector == "prhs" && c.target == 0) {
    EXPECT_GT(bound, 0u);
  }
  // Every (step, layer, query head) of the decode has its claim (none lost or doubled).
  size_t claims_remote = 0;
  for (const auto& r : (*remote)->claims()) claims_remote += r.kind != DeltaKind::kAudit;
  EXPECT_EQ(claims_remote, steps * L * shape.q_heads);
}

void Sharing(sel::SelectorOptions& o) { o.prhs.layer_sharing = true; }
void Psaw(sel::SelectorOptions& o) {
  o.prhs.psaw = true;
  o.prhs.psaw_phi = 0.3;
}
// Target mode that reuses: the cosine gate alone (the δ bound is vacuous on this model).
void TargetReuse(sel::SelectorOptions& o) {
  o.prhs.use_bound_gate = false;
  o.prhs.tau_cos = 0.3;
}

std::vector<Case> Cases() {
  std::vector<Case> v = {{"prhs_budget_tcp", "prhs", 64, 0, "tcp"},
                         {"prhs_target_tcp", "prhs", 0, 0.1, "tcp"},
                         {"oracle_budget_tcp", "oracle", 64, 0, "tcp"},
                         {"prhs_budget_inproc", "prhs", 64, 0, "inproc"},
                         {"prhs_budget_ucx", "prhs", 64, 0, "ucx"},
                         {"oracle_budget_ucx", "oracle", 64, 0, "ucx"}};
  // The widened cases: layer sharing, PSAW, quest, streaming and a target mode that reuses, over
  // each transport (one transport each under a sanitizer: KVM_TEST_ONE_TRANSPORT).
  const bool one = std::getenv("KVM_TEST_ONE_TRANSPORT") != nullptr;
  const std::vector<std::string> transports = {"tcp", "inproc", "ucx"};
  for (size_t i = 0; i < transports.size(); ++i) {
    const std::string& tr = transports[i];
    auto want = [&](size_t k) { return !one || k % transports.size() == i; };
    if (want(0)) v.push_back({"prhs_sharing_" + tr, "prhs", 64, 0, tr, Sharing, 384, 32});
    if (want(1)) v.push_back({"prhs_psaw_" + tr, "prhs", 64, 0, tr, Psaw, 384, 32});
    if (want(2)) v.push_back({"quest_budget_" + tr, "quest", 64, 0, tr, nullptr, 384, 32});
    if (want(3)) v.push_back({"streaming_budget_" + tr, "streaming", 64, 0, tr, nullptr, 384, 32});
    if (want(4)) v.push_back({"prhs_target_reuse_" + tr, "prhs", 0, 0.1, tr, TargetReuse, 384, 32});
  }
  return v;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

INSTANTIATE_TEST_SUITE_P(Selectors, ServiceSourceTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

// A selector the registry keeps in-process is refused with a clear error: by the worker before it
// sends anything, and by the service when a client sends it anyway.
TEST(ServiceRefusalTest, InProcessOnlySelectorsAreRefusedWithAClearError) {
  auto svc = StartService();
  auto conn = std::move(Client::Connect({.address = svc->server->address()})).value();
  const ModelShape shape{2, 4, 2, 32, DType::kF16, 9};
  for (const sel::SelectorEntry& e : sel::Selectors()) {
    if (e.caps.served) continue;
    ServiceSourceOptions so;
    so.selector = e.name;
    so.options.geometry = {16, 4, 16};
    so.options.budget_tokens = 128;
    auto src = ServiceKvSource::Make(conn.get(), shape, so);
    ASSERT_FALSE(src.ok()) << e.name;
    EXPECT_TRUE(src.status().IsInvalidArgument()) << src.status().ToString();
    EXPECT_NE(src.status().message().find("in-process only"), std::string::npos)
        << src.status().ToString();
    // The service refuses it too (the worker's check is not the only one), and rolls back.
    wire::CreateSequence c;
    c.set_sequence_id(77);
    wire::ToWire(shape, c.mutable_shape());
    c.set_block_size(16);
    sel::ToWire({e.name, so.options}, c.mutable_selector());
    c.set_hot_set_slots(64);
    auto r = conn->Call(wire::MessageType::kCreateSequence, c);
    ASSERT_FALSE(r.ok()) << e.name;
    EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
    EXPECT_NE(r.status().message().find("in-process only"), std::string::npos)
        << r.status().ToString();
    EXPECT_TRUE(conn->DeleteSequence(77).IsNotFound()) << "a refused create left a sequence";
  }
}

// Decodes `steps` tokens of the committed model through `src` after a `prefill`-token prompt;
// calls `at(i)` before decode step i.
Status Decode(const LlamaModel& model, const std::vector<uint32_t>& ids, KvSource* src,
              uint64_t prefill, uint64_t steps, const std::function<void(uint64_t)>& at = nullptr,
              std::vector<uint32_t>* tokens = nullptr) {
  ReferenceWorker w(model, src);
  std::vector<float> logits(model.config().vocab_size);
  for (uint64_t p = 0; p < prefill; ++p)
    KVM_RETURN_IF_ERROR(w.Forward(ids[p], p, p + 1 == prefill ? logits.data() : nullptr));
  for (uint64_t i = 0; i < steps; ++i) {
    if (at) at(i);
    const uint32_t next = Argmax(logits);
    if (tokens) tokens->push_back(next);
    KVM_RETURN_IF_ERROR(w.Forward(next, prefill + i, logits.data()));
  }
  return Status::Ok();
}

// The worker's hot set loses a block behind the service's back: the next retrieval's slot-table
// digest differs from the worker's, which is detected at once, counted, and resolved by a
// generation reset; decoding goes on.
TEST(ServiceDivergenceTest, ADigestMismatchIsDetectedCountedAndResolvedByAReset) {
  auto svc = StartService();
  auto model = std::move(LlamaModel::Load(ModelDir() + "/model.bin")).value();
  auto ids = std::move(ReadTokenFile(ModelDir() + "/heldout.u16")).value();
  auto conn = std::move(Client::Connect({.address = svc->server->address()})).value();
  ServiceSourceOptions so;
  so.selector = "oracle";  // retrieves every step: the divergence shows at the next one
  so.options.geometry = {16, 4, 16};
  so.options.budget_tokens = 64;
  so.prefill = 256;
  auto src = std::move(ServiceKvSource::Make(conn.get(), model->Shape(DType::kF16), so)).value();
  bool tampered = false;
  const Status s = Decode(*model, ids, src.get(), 256, 12, [&](uint64_t i) {
    if (i != 6) return;
    // Evict one held block of layer 0, KV head 0 locally: the service's mirror still has it.
    HotSet& hot = src->hot_set_for_testing();
    for (uint32_t slot = 0; slot < hot.slots() && !tampered; ++slot) {
      sel::PlanStep evict;
      evict.evicted_slots = {slot};
      tampered = hot.Apply(0, 0, evict, {}).ok();
    }
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(tampered);
  EXPECT_EQ(src->totals().divergences, 1u);
  EXPECT_EQ(src->totals().failed_calls, 0u);
  EXPECT_EQ(src->hot_set_generation(), 1u);
  EXPECT_NE(src->last_error().find("diverged"), std::string::npos) << src->last_error();
  EXPECT_TRUE(src->Flush().ok());
}

// A retrieval whose connection is lost is retried once (reconnect, re-attach, new generation): a
// service back on the same port with the same (durable) data serves it; a service that stays down
// fails the call — one reconnect attempt, then the error reaches the caller, within the deadline.
TEST(ServiceRetryTest, ALostConnectionIsRetriedOnceThenTheErrorReachesTheCaller) {
  char tmpl[] = "/tmp/kvm_retry_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  auto start = [&](const std::string& listen) {
    store::StoreOptions st;
    st.dir = dir;
    st.host_capacity_bytes = 64 << 20;
    auto store = std::move(store::BlockStore::Open(st)).value();
    server::ServerOptions o;
    o.listen = listen;
    o.handler.tenants = {{"dev", "dev", true}};
    auto server = std::move(server::Server::Start(o, store.get())).value();
    return std::make_pair(std::move(store), std::move(server));
  };
  auto svc = start("127.0.0.1:0");
  const std::string address = svc.second->address();
  auto model = std::move(LlamaModel::Load(ModelDir() + "/model.bin")).value();
  auto ids = std::move(ReadTokenFile(ModelDir() + "/heldout.u16")).value();
  auto conn = std::move(Client::Connect({.address = address, .deadline_ms = 2000})).value();
  ServiceSourceOptions so;
  so.selector = "oracle";
  so.options.geometry = {16, 4, 16};
  so.options.budget_tokens = 64;
  so.prefill = 256;
  so.durable = true;
  auto src = std::move(ServiceKvSource::Make(conn.get(), model->Shape(DType::kF16), so)).value();
  const Status decoded = Decode(*model, ids, src.get(), 256, 4);
  ASSERT_TRUE(decoded.ok()) << decoded.ToString();
  ASSERT_TRUE(src->Flush().ok());
  // Restart the service on the same port: the next call reconnects once and goes on.
  svc.second->Stop();
  svc = {};
  svc = start(address);
  ReferenceWorker w(*model, src.get());
  std::vector<float> logits(model->config().vocab_size);
  Status s = w.Forward(ids[300], 260, logits.data());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(src->totals().reconnects, 1u);
  EXPECT_EQ(src->totals().failed_calls, 0u);
  // Down for good: one reconnect attempt, then the error.
  svc.second->Stop();
  svc = {};
  const auto t0 = std::chrono::steady_clock::now();
  s = w.Forward(ids[301], 261, logits.data());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.IsUnavailable()) << s.ToString();
  EXPECT_LT(secs, 5.0);
  EXPECT_EQ(src->totals().reconnects, 2u);
  EXPECT_EQ(src->totals().failed_calls, 1u);
  std::filesystem::remove_all(dir);
}

// A worker killed -9 in the middle of its retrievals (UCX data plane): the service closes its
// session (its endpoint goes with it) and keeps serving another worker, whose tokens still match
// the in-process run.
TEST(ServiceFailureTest, AWorkerKilledMidStreamLeavesTheServiceServingOthers) {
  auto sdp = MakeTransport("ucx", true);
  ASSERT_TRUE(sdp);
  auto svc = StartService(sdp.get(), /*session_timeout_ms=*/3000);  // 3 heartbeat intervals
  auto& server = svc->server;
  auto model = std::move(LlamaModel::Load(ModelDir() + "/model.bin")).value();
  auto ids = std::move(ReadTokenFile(ModelDir() + "/heldout.u16")).value();
  const ModelShape shape = model->Shape(DType::kF16);
  sel::SelectorOptions opt;
  opt.geometry = {16, 4, 16};
  opt.budget_tokens = 64;
  // The doomed worker: another process (kvmctl demo) decoding through this service over UCX. Its
  // progress lines ("[demo] decode N/M") on stderr say when it is decoding.
  const std::string addr = server->address();
  int err[2];
  ASSERT_EQ(pipe(err), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const int null = open("/dev/null", O_WRONLY);
    dup2(null, STDOUT_FILENO);
    dup2(err[1], STDERR_FILENO);
    close(err[0]);
    execl(KVMCTL, KVMCTL, "demo", "--server", addr.c_str(), "--context", "256", "--max-new", "760",
          "--target-delta", "0", "--budget-frac", "0.25", static_cast<char*>(nullptr));
    _exit(127);
  }
  close(err[1]);
  std::string seen;
  char ch;
  while (seen.find("] decode ") == std::string::npos && read(err[0], &ch, 1) == 1) seen += ch;
  ASSERT_NE(seen.find("] decode "), std::string::npos) << "the worker never decoded: " << seen;
  ASSERT_EQ(waitpid(child, nullptr, WNOHANG), 0) << "the worker finished before it was killed";
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int status = 0;
  waitpid(child, &status, 0);
  close(err[0]);
  // Another worker is served normally, and its tokens match the in-process selector's.
  auto dp = MakeTransport("ucx", false);
  auto conn = std::move(Client::Connect({.address = addr, .data_plane = dp.get()})).value();
  ASSERT_NE(conn->data_plane(), nullptr);
  ServiceSourceOptions sso;
  sso.sequence_id = 8;
  sso.options = opt;
  sso.prefill = 256;
  auto src = std::move(ServiceKvSource::Make(conn.get(), shape, sso)).value();
  std::vector<uint32_t> got, want;
  Status s = Decode(*model, ids, src.get(), 256, 24, nullptr, &got);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(src->Flush().ok());
  auto sel = std::move(sel::MakeSelector("prhs", opt, shape, 1024)).value();
  auto local = std::move(SelectorKvSource::Make(shape, 16, std::move(sel), opt, 256, 1024)).value();
  ASSERT_TRUE(Decode(*model, ids, local.get(), 256, 24, nullptr, &want).ok());
  EXPECT_EQ(got, want);
  // The dead worker's session is gone (its UCX endpoint with it).
  src.reset();
  conn.reset();
  for (int i = 0; i < 50 && server->sessions() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(server->sessions(), 0u);
}

// A worker that lost its hot set (or its connection) resets: a new generation, the service forgets
// its mirror and re-sends what the next selections need; decoding goes on.
TEST(ServiceResetTest, AHotSetResetBumpsTheGenerationAndDecodingGoesOn) {
  auto svc = StartService();
  auto& server = svc->server;
  auto model = std::move(LlamaModel::Load(ModelDir() + "/model.bin")).value();
  auto ids = std::move(ReadTokenFile(ModelDir() + "/heldout.u16")).value();
  auto conn = std::move(Client::Connect({.address = server->address()})).value();
  ServiceSourceOptions sso;
  sso.options.geometry = {16, 4, 16};
  sso.options.budget_tokens = 64;
  sso.prefill = 256;
  sso.durable = true;  // content-addressed blocks: PrefixLookup finds them
  auto src = std::move(ServiceKvSource::Make(conn.get(), model->Shape(DType::kF16), sso)).value();
  ReferenceWorker w(*model, src.get());
  std::vector<float> logits(model->config().vocab_size);
  for (uint64_t p = 0; p < 256 + 32; ++p) {
    if (p == 256 + 16) {
      const uint64_t before = src->totals().streamed_bytes;
      ASSERT_TRUE(src->ResetHotSet().ok());
      // The sequence API beside the source: the prompt's whole blocks are found by content.
      auto found = conn->PrefixLookup(model->Shape(DType::kF16), 16, {ids.data(), 256});
      ASSERT_TRUE(found.ok()) << found.status().ToString();
      EXPECT_EQ(*found, 256u);
      EXPECT_EQ(src->hot_set_generation(), 1u);
      ASSERT_TRUE(w.Forward(ids[p], p, logits.data()).ok());
      EXPECT_GT(src->totals().streamed_bytes, before);  // the hot set was filled again
      continue;
    }
    Status s = w.Forward(ids[p], p, logits.data());
    ASSERT_TRUE(s.ok()) << p << ": " << s.ToString();
  }
  EXPECT_TRUE(src->Flush().ok());
  EXPECT_TRUE(conn->Truncate(sso.sequence_id, 100).ok());
  EXPECT_TRUE(conn->DeleteSequence(sso.sequence_id).ok());
  EXPECT_TRUE(conn->DeleteSequence(sso.sequence_id).IsNotFound());
}

}  // namespace
}  // namespace kvm::client

namespace kvm::client {
namespace {
// A connection the server refuses before Hello (an Error frame with request id 0: here, past the
// per-address limit) is an error for the client's Connect, within its deadline — never a hang (the
// client once locked its pending-request mutex twice on that path).
TEST(ClientRefusalTest, AStreamRefusedBeforeHelloIsAnErrorNotAHang) {
  server::ServerOptions so;
  so.max_connections_per_address = 1;
  testutil::TestService service(so);
  auto first = Client::Connect({.address = service.server->address(), .deadline_ms = 5000});
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto second = Client::Connect({.address = service.server->address(), .deadline_ms = 5000});
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(second.status().IsBusy() || second.status().IsUnavailable())
      << second.status().ToString();
  EXPECT_TRUE((*first)->Call(wire::MessageType::kHeartbeat, wire::Heartbeat()).ok());
}
}  // namespace
}  // namespace kvm::client
