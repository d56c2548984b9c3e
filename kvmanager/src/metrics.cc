#include "kvmanager/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <array>
#include <cmath>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "kvmanager/block_store.h"
#include "proto/wire/frame.h"
#include "selector/delta_histogram.h"
#include "selector/registry.h"

namespace kvm::server {
namespace {
constexpr DeltaKind kKinds[] = {DeltaKind::kExact, DeltaKind::kBound, DeltaKind::kAudit};
constexpr const char* kDirections[] = {"to_worker", "from_worker"};
constexpr const char* kLinks[] = {"ucx", "inproc", "tcp"};
constexpr const char* kTiers[] = {"gpu", "host", "disk"};
// Moves between tiers (from, to): spills host → disk and promotions disk → host (the store), key
// buffers evicted from the GPU tier and uploads to it.
enum Move { kHostDisk, kDiskHost, kGpuHost, kHostGpu, kMoves };
constexpr std::pair<const char*, const char*> kMoveNames[] = {
    {"host", "disk"}, {"disk", "host"}, {"gpu", "host"}, {"host", "gpu"}};
const std::vector<std::string> kOps = {
    "hello",          "create",        "append",    "prefix_lookup", "truncate",
    "retrieve_layer", "set_layer_map", "audit",     "read_blocks",   "delete",
    "list",           "stats",         "heartbeat", "correct"};

int KindIndex(DeltaKind k) {
  for (int i = 0; i < 3; ++i)
    if (kKinds[i] == k) return i;
  return -1;
}

prometheus::Histogram::BucketBoundaries LogBuckets(double lo, double hi, int per_decade) {
  prometheus::Histogram::BucketBoundaries b;
  const int n = static_cast<int>(std::round(std::log10(hi / lo) * per_decade));
  for (int i = 0; i <= n; ++i) b.push_back(lo * std::pow(10.0, double(i) / per_decade));
  return b;
}
}  // namespace

Result<Link> LinkFromName(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kLinks[i]) return static_cast<Link>(i);
  return Status::InvalidArgument("metrics: no transport label '" + name + "' (ucx, inproc, tcp)");
}

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> reg = std::make_shared<prometheus::Registry>();
  std::map<std::string, std::array<prometheus::Histogram*, 3>> delta;  // selector → [kind]
  std::array<prometheus::Counter*, 3> over_target{};                   // [kind]
  std::array<std::array<prometheus::Counter*, 3>, 2> stream{};         // [direction][link]
  std::array<prometheus::Gauge*, 3> tier_bytes{}, tier_capacity{};     // [tier]
  std::array<prometheus::Counter*, kMoves> evictions{}, promotions{};
  std::array<prometheus::Counter*, sel::kGateOutcomes.size()> gate{};
  std::map<std::string, prometheus::Histogram*> request;
  std::map<std::string, prometheus::Counter*> errors;
  prometheus::Counter* dense = nullptr;
  prometheus::Counter* retrievals = nullptr;
  prometheus::Gauge* sequences = nullptr;
  prometheus::Gauge* ready = nullptr;
  prometheus::Gauge* degraded = nullptr;
  prometheus::Counter* tls_handshake_failures = nullptr;
  prometheus::Counter* auth_failures = nullptr;
  std::array<prometheus::Counter*, 2> connections_refused{};  // [ConnectionLimit]
  std::array<prometheus::Counter*, 2> sessions_closed{};      // [CloseReason]
  std::mutex mu;  // the store's cumulative counts at the last refresh
  uint64_t spills = 0, store_promotions = 0, gpu_evictions = 0, gpu_uploads = 0;
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {
  auto& r = *impl_->reg;
  auto& dm = prometheus::BuildHistogram()
                 .Name("kvm_dropped_mass")
                 .Help("Dropped attention mass per (step, layer, query head), by selector and kind")
                 .Register(r);
  const auto bounds = sel::DeltaHistogram::Bounds();
  for (const sel::SelectorEntry& e : sel::Selectors())  // every selector of the registry
    for (int k = 0; k < 3; ++k)
      impl_->delta[e.name][k] =
          &dm.Add({{"selector", e.name}, {"kind", DeltaKindName(kKinds[k])}}, bounds);
  auto& ot = prometheus::BuildCounter()
                 .Name("kvm_dropped_mass_over_target_total")
                 .Help("Dropped-mass values above the sequence's target, by kind")
                 .Register(r);
  for (int k = 0; k < 3; ++k) impl_->over_target[k] = &ot.Add({{"kind", DeltaKindName(kKinds[k])}});
  auto& sb = prometheus::BuildCounter()
                 .Name("kvm_stream_bytes_total")
                 .Help(
                     "K/V payload bytes: blocks to the worker, appended rows and carried K rows "
                     "from it, by transport")
                 .Register(r);
  for (int d = 0; d < 2; ++d)
    for (int l = 0; l < 3; ++l)
      impl_->stream[d][l] = &sb.Add({{"direction", kDirections[d]}, {"transport", kLinks[l]}});
  impl_->dense = &prometheus::BuildCounter()
                      .Name("kvm_dense_equivalent_bytes_total")
                      .Help("K/V bytes a dense offload would have moved for the same decode steps")
                      .Register(r)
                      .Add({});
  impl_->retrievals = &prometheus::BuildCounter()
                           .Name("kvm_retrievals_total")
                           .Help("Query heads scored in full")
                           .Register(r)
                           .Add({});
  auto& gc = prometheus::BuildCounter()
                 .Name("kvm_gate_checks_total")
                 .Help("The workers' gate decisions per (step, layer, KV head), by result")
                 .Register(r);
  for (sel::GateOutcome o : sel::kGateOutcomes)
    impl_->gate[size_t(o)] = &gc.Add({{"result", sel::GateOutcomeName(o)}});
  auto& tb = prometheus::BuildGauge()
                 .Name("kvm_tier_bytes")
                 .Help("Bytes in use per tier (disk: RocksDB's live SST files and memtables)")
                 .Register(r);
  auto& tc = prometheus::BuildGauge()
                 .Name("kvm_tier_capacity_bytes")
                 .Help("Capacity per tier (0: unlimited)")
                 .Register(r);
  for (int t = 0; t < 3; ++t) {
    impl_->tier_bytes[t] = &tb.Add({{"tier", kTiers[t]}});
    impl_->tier_capacity[t] = &tc.Add({{"tier", kTiers[t]}});
  }
  auto& ev = prometheus::BuildCounter()
                 .Name("kvm_evictions_total")
                 .Help("Blocks (GPU: key buffers) demoted between tiers")
                 .Register(r);
  auto& pr = prometheus::BuildCounter()
                 .Name("kvm_promotions_total")
                 .Help("Blocks promoted between tiers (GPU: key bytes uploaded)")
                 .Register(r);
  for (int m = 0; m < kMoves; ++m) {
    impl_->evictions[m] = &ev.Add({{"from", kMoveNames[m].first}, {"to", kMoveNames[m].second}});
    impl_->promotions[m] = &pr.Add({{"from", kMoveNames[m].first}, {"to", kMoveNames[m].second}});
  }
  auto& rq = prometheus::BuildHistogram()
                 .Name("kvm_request_duration_seconds")
                 .Help("Control-plane request handling time, by operation")
                 .Register(r);
  for (const auto& op : kOps) impl_->request[op] = &rq.Add({{"op", op}}, LogBuckets(1e-5, 10, 2));
  impl_->sequences =
      &prometheus::BuildGauge().Name("kvm_sequences").Help("Sequences held").Register(r).Add({});
  impl_->ready = &prometheus::BuildGauge()
                      .Name("kvm_ready")
                      .Help("1 while /readyz answers 200 (store open, not draining), else 0")
                      .Register(r)
                      .Add({});
  impl_->degraded = &prometheus::BuildGauge()
                         .Name("kvm_degraded")
                         .Help("1 while the shard runs on a fallback (UCX data plane failed: TCP)")
                         .Register(r)
                         .Add({});
  impl_->tls_handshake_failures =
      &prometheus::BuildCounter()
           .Name("kvm_tls_handshake_failures_total")
           .Help(
               "Control-plane connections refused in the TLS handshake (plaintext clients, "
               "missing or untrusted client certificates, old protocol versions)")
           .Register(r)
           .Add({});
  impl_->auth_failures = &prometheus::BuildCounter()
                              .Name("kvm_auth_failures_total")
                              .Help(
                                  "Hellos refused: unknown tenant, wrong token, or a "
                                  "loopback-only tenant from another address")
                              .Register(r)
                              .Add({});
  auto& cr = prometheus::BuildCounter()
                 .Name("kvm_connections_refused_total")
                 .Help(
                     "Connections refused with Busy at a limit: per_address "
                     "(max_connections_per_address, at accept), per_tenant (a tenant's "
                     "max_connections, at Hello)")
                 .Register(r);
  impl_->connections_refused[size_t(ConnectionLimit::kPerAddress)] =
      &cr.Add({{"limit", "per_address"}});
  impl_->connections_refused[size_t(ConnectionLimit::kPerTenant)] =
      &cr.Add({{"limit", "per_tenant"}});
  auto& sc = prometheus::BuildCounter()
                 .Name("kvm_sessions_closed_total")
                 .Help(
                     "Sessions closed at a limit: frame_timeout (a frame not complete within "
                     "frame_read_timeout_ms), send_queue (unsent replies over "
                     "max_session_send_queue_bytes)")
                 .Register(r);
  impl_->sessions_closed[size_t(CloseReason::kFrameTimeout)] =
      &sc.Add({{"reason", "frame_timeout"}});
  impl_->sessions_closed[size_t(CloseReason::kSendQueue)] = &sc.Add({{"reason", "send_queue"}});
  auto& er = prometheus::BuildCounter()
                 .Name("kvm_errors_total")
                 .Help("Error replies, by code")
                 .Register(r);
  for (uint32_t c = 1; c <= kMaxStatusCode; ++c) {
    const std::string name(StatusCodeName(static_cast<StatusCode>(c)));
    impl_->errors[name] = &er.Add({{"code", name}});
  }
}

Metrics::~Metrics() = default;

std::string Metrics::Serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, impl_->reg->Collect());
  return out.str();
}

Status Metrics::ObserveRequest(const std::string& op, double seconds) {
  auto it = impl_->request.find(op);
  if (it == impl_->request.end())
    return Status::InvalidArgument("metrics: no op label '" + op + "'");
  it->second->Observe(seconds);
  return Status::Ok();
}
void Metrics::CountError(StatusCode code) {
  // Every code has its label (created from the StatusCode enum): the lookup cannot miss.
  impl_->errors.at(std::string(StatusCodeName(code)))->Increment();
}
void Metrics::RefreshStore(const store::StoreStats& st, uint64_t disk_capacity) {
  impl_->sequences->Set(double(st.sequences));
  auto tier = [&](Tier t, double bytes, double capacity) {
    impl_->tier_bytes[size_t(t)]->Set(bytes);
    impl_->tier_capacity[size_t(t)]->Set(capacity);
  };
  tier(Tier::kHost, double(st.host_bytes), double(st.host_capacity_bytes));
  tier(Tier::kGpu, double(st.gpu.used_bytes), double(st.gpu.capacity_bytes));
  tier(Tier::kDisk, double(st.disk_bytes), double(disk_capacity));
  std::lock_guard<std::mutex> l(impl_->mu);
  auto add = [](prometheus::Counter* c, uint64_t now, uint64_t* last) {
    if (now > *last) c->Increment(double(now - *last));
    *last = now;
  };
  add(impl_->evictions[kHostDisk], st.spills, &impl_->spills);
  add(impl_->promotions[kDiskHost], st.promotions, &impl_->store_promotions);
  add(impl_->evictions[kGpuHost], st.gpu.evictions, &impl_->gpu_evictions);
  add(impl_->promotions[kHostGpu], st.gpu.uploaded_blocks, &impl_->gpu_uploads);
}
Status Metrics::ObserveDelta(const std::string& selector, DeltaKind kind, double delta,
                             double target) {
  auto it = impl_->delta.find(selector);
  const int k = KindIndex(kind);
  if (it == impl_->delta.end() || k < 0)
    return Status::InvalidArgument("metrics: no kvm_dropped_mass{selector=\"" + selector +
                                   "\", kind=\"" + DeltaKindName(kind) + "\"}");
  if (std::isnan(delta)) return Status::Ok();
  it->second[k]->Observe(delta);
  if (target > 0 && delta > target) impl_->over_target[k]->Increment();
  return Status::Ok();
}
Status Metrics::AddDeltaCounts(const std::string& selector, DeltaKind kind,
                               std::span<const uint64_t> buckets, double sum,
                               uint64_t over_target) {
  auto it = impl_->delta.find(selector);
  const int k = KindIndex(kind);
  if (it == impl_->delta.end() || k < 0)
    return Status::InvalidArgument("metrics: no kvm_dropped_mass{selector=\"" + selector +
                                   "\", kind=\"" + DeltaKindName(kind) + "\"}");
  const size_t n = sel::DeltaHistogram::Bounds().size() + 1;
  if (buckets.size() != n)
    return Status::InvalidArgument("worker stats: " + std::to_string(buckets.size()) +
                                   " dropped-mass buckets, the histogram has " + std::to_string(n));
  uint64_t total = 0;
  for (uint64_t b : buckets) total += b;
  if (total == 0) return Status::Ok();
  if (over_target > total || !(sum >= 0) || sum > double(total))
    return Status::InvalidArgument("worker stats: inconsistent dropped-mass counts");
  std::vector<double> inc(n);  // one increment per bucket, +Inf last (prometheus-cpp's layout)
  for (size_t i = 0; i < n; ++i) inc[i] = double(buckets[i]);
  it->second[k]->ObserveMultiple(inc, sum);
  if (over_target) impl_->over_target[k]->Increment(double(over_target));
  return Status::Ok();
}
void Metrics::AddStreamBytes(Direction d, Link l, double bytes) {
  impl_->stream[size_t(d)][size_t(l)]->Increment(bytes);
}
void Metrics::AddDenseEquivalentBytes(double bytes) { impl_->dense->Increment(bytes); }
void Metrics::AddRetrievals(double n) { impl_->retrievals->Increment(n); }
void Metrics::AddGateChecks(sel::GateOutcome result, double n) {
  impl_->gate[size_t(result)]->Increment(n);
}
void Metrics::SetReady(bool ready) { impl_->ready->Set(ready ? 1 : 0); }
void Metrics::SetDegraded(bool degraded) { impl_->degraded->Set(degraded ? 1 : 0); }
void Metrics::CountTlsHandshakeFailure() { impl_->tls_handshake_failures->Increment(); }
void Metrics::CountAuthFailure() { impl_->auth_failures->Increment(); }
void Metrics::CountConnectionRefused(ConnectionLimit limit) {
  impl_->connections_refused[size_t(limit)]->Increment();
}
void Metrics::CountSessionClosed(CloseReason reason) {
  impl_->sessions_closed[size_t(reason)]->Increment();
}

const char* Metrics::OpName(uint16_t t) {
  switch (static_cast<wire::MessageType>(t)) {
    case wire::MessageType::kHello:
      return "hello";
    case wire::MessageType::kCreateSequence:
      return "create";
    case wire::MessageType::kAppend:
      return "append";
    case wire::MessageType::kPrefixLookup:
      return "prefix_lookup";
    case wire::MessageType::kTruncate:
      return "truncate";
    case wire::MessageType::kRetrieveLayer:
      return "retrieve_layer";
    case wire::MessageType::kSetLayerMap:
      return "set_layer_map";
    case wire::MessageType::kAudit:
      return "audit";
    case wire::MessageType::kReadBlocks:
      return "read_blocks";
    case wire::MessageType::kDeleteSequence:
      return "delete";
    case wire::MessageType::kListSequences:
      return "list";
    case wire::MessageType::kStats:
      return "stats";
    case wire::MessageType::kHeartbeat:
      return "heartbeat";
    case wire::MessageType::kCorrect:
      return "correct";
    default:
      return "?";
  }
}

}  // namespace kvm::server
