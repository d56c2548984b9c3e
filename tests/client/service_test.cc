// The reference worker decoding through the service (ServiceKvSource over a real TCP server on
// loopback) against the same worker with the in-process selector (SelectorKvSource): the same
// selector, budget and KV dtype give bit-identical logits and tokens, with PrHS's reuse steps never
// reaching the service.
#include "testutil/service.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <tuple>

#include "client/llama.h"
#include "client/selector_source.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "kvmanager/server.h"

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
  const uint64_t context = 512, steps = 48;
  const ModelShape shape = (*model)->Shape(DType::kF16);
  sel::SelectorOptions o;
  o.geometry = {16, 4, 16};
  o.budget_tokens = c.budget;
  o.target_delta = c.target;
  if (c.target > 0) o.max_resident_tokens = context / 2;

  auto sel = sel::MakeSelector(c.selector, o, shape, (*model)->config().seq_len);
  ASSERT_TRUE(sel.ok()) << sel.status().ToString();
  auto local = SelectorKvSource::Make(shape, 16, std::move(*sel), o, context, "geometry",
                                      (*model)->config().seq_len);
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
  so.audit_fraction = 0.1;
  auto remote = ServiceKvSource::Make(conn->get(), shape, so);
  ASSERT_TRUE(remote.ok()) << remote.status().ToString();

  ReferenceWorker wl(**model, local->get()), wr(**model, remote->get());
  std::vector<float> ll((*model)->config().vocab_size), lr(ll.size());
  for (uint64_t p = 0; p < context; ++p) {
    const bool last = p + 1 == context;
    ASSERT_TRUE(wl.Forward((*ids)[p], p, last ? ll.data() : nullptr).ok());
    ASSERT_TRUE(wr.Forward((*ids)[p], p, last ? lr.data() : nullptr).ok());
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
  const uint64_t L = shape.layers;
  if (c.selector == "prhs") {
    // The worker's gate reuses exactly where the in-process selector did (no re-anchor).
    EXPECT_EQ(t.reuses, steps * L * shape.kv_heads - lt.anchors);
    if (c.target == 0) {        // on this small model the cosine gate mostly fails at δ* 0.1
      EXPECT_GT(t.reuses, 0u);  // pre-hoc: reuse steps send nothing
      EXPECT_LT(t.round_trips, steps * L);  // ... so fewer round trips than layer-steps
      EXPECT_GT(t.audits, 0u);              // audits on sampled reuse steps came back
    }
  } else {
    EXPECT_EQ(t.round_trips, steps * L);  // no gate: every layer-step retrieves
  }
  // Every δ the worker records through the service equals the in-process selector's claim for the
  // same (step, layer, query head), with the same kind: exact at anchors (sent as float), the bound
  // on reuse steps (computed by the worker itself, bit for bit). Audits are the service's own.
  std::map<std::tuple<uint64_t, uint32_t, uint32_t>, const HeadRecord*> claims;
  for (const auto& r : (*local)->records()) claims[{r.step, r.layer, r.q_head}] = &r;
  size_t exact = 0, bound = 0;
  for (const auto& r : (*remote)->records()) {
    if (r.kind == DeltaKind::kAudit) continue;
    auto it = claims.find({r.step, r.layer, r.q_head});
    ASSERT_NE(it, claims.end()) << "step " << r.step << " layer " << r.layer;
    ASSERT_EQ(r.kind, it->second->kind) << "step " << r.step << " layer " << r.layer;
    if (r.kind == DeltaKind::kExact) {
      EXPECT_EQ(float(r.delta), float(it->second->delta_claim)) << "step " << r.step;
      ++exact;
    } else if (r.kind == DeltaKind::kBound) {
      EXPECT_EQ(r.delta, it->second->delta_claim) << "step " << r.step;
      ++bound;
    }
  }
  EXPECT_GT(exact, 0u);
  if (c.selector == "prhs" && c.target == 0) {
    EXPECT_GT(bound, 0u);
  }
  // Every (step, layer, query head) of the decode has its claim (none lost or doubled).
  size_t claims_remote = 0;
  for (const auto& r : (*remote)->records()) claims_remote += r.kind != DeltaKind::kAudit;
  EXPECT_EQ(claims_remote, steps * L * shape.q_heads);
}

INSTANTIATE_TEST_SUITE_P(Selectors, ServiceSourceTest,
                         ::testing::Values(Case{"prhs_budget_tcp", "prhs", 64, 0, "tcp"},
                                           Case{"prhs_target_tcp", "prhs", 0, 0.1, "tcp"},
                                           Case{"oracle_budget_tcp", "oracle", 64, 0, "tcp"},
                                           Case{"prhs_budget_inproc", "prhs", 64, 0, "inproc"},
                                           Case{"prhs_budget_ucx", "prhs", 64, 0, "ucx"},
                                           Case{"oracle_budget_ucx", "oracle", 64, 0, "ucx"}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace kvm::client

namespace kvm::client {
namespace {

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
  // Decodes `steps` greedy tokens after a 256-token prompt through the service; the tokens.
  auto decode = [&](uint64_t seq, uint64_t steps, std::vector<uint32_t>* out) -> Status {
    auto dp = MakeTransport("ucx", false);
    KVM_ASSIGN_OR_RETURN(auto conn,
                         Client::Connect({.address = server->address(), .data_plane = dp.get()}));
    if (!conn->data_plane()) return Status::Internal("no data plane");
    ServiceSourceOptions sso;
    sso.sequence_id = seq;
    sso.options = opt;
    sso.prefill = 256;
    KVM_ASSIGN_OR_RETURN(auto src, ServiceKvSource::Make(conn.get(), shape, sso));
    ReferenceWorker w(*model, src.get());
    std::vector<float> logits(model->config().vocab_size);
    for (uint64_t p = 0; p < 256; ++p)
      KVM_RETURN_IF_ERROR(w.Forward(ids[p], p, p == 255 ? logits.data() : nullptr));
    for (uint64_t i = 0; i < steps; ++i) {
      out->push_back(Argmax(logits));
      KVM_RETURN_IF_ERROR(w.Forward(out->back(), 256 + i, logits.data()));
    }
    return src->Flush();
  };
  // The doomed worker: another process (kvmctl demo) decoding through this service over UCX.
  const std::string addr = server->address();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const int null = open("/dev/null", O_WRONLY);
    dup2(null, STDOUT_FILENO);
    dup2(null, STDERR_FILENO);
    execl(KVMCTL, KVMCTL, "demo", "--server", addr.c_str(), "--context", "256", "--max-new", "760",
          "--target-delta", "0", "--budget-frac", "0.25", static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 100 && server->sessions() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(server->sessions(), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // prefill done, decoding
  ASSERT_EQ(waitpid(child, nullptr, WNOHANG), 0) << "the worker finished before it was killed";
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int status = 0;
  waitpid(child, &status, 0);
  // Another worker is served normally, and its tokens match the in-process selector's.
  std::vector<uint32_t> got;
  Status s = decode(8, 24, &got);
  ASSERT_TRUE(s.ok()) << s.ToString();
  auto sel = std::move(sel::MakeSelector("prhs", opt, shape, 1024)).value();
  auto local =
      std::move(SelectorKvSource::Make(shape, 16, std::move(sel), opt, 256, "geometry", 1024))
          .value();
  ReferenceWorker w(*model, local.get());
  std::vector<float> logits(model->config().vocab_size);
  for (uint64_t p = 0; p < 256; ++p)
    ASSERT_TRUE(w.Forward(ids[p], p, p == 255 ? logits.data() : nullptr).ok());
  for (uint64_t i = 0; i < 24; ++i) {
    ASSERT_EQ(got[i], Argmax(logits)) << "token " << i;
    ASSERT_TRUE(w.Forward(got[i], 256 + i, logits.data()).ok());
  }
  // The dead worker's session is gone (its UCX endpoint with it).
  for (int i = 0; i < 50 && server->sessions() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(server->sessions(), 0u);
}

}  // namespace
}  // namespace kvm::client

namespace kvm::client {
namespace {

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
