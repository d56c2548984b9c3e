#include "kvmanager/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <cmath>
#include <map>
#include <sstream>
#include <vector>

#include "proto/wire/frame.h"
#include "selector/registry.h"

namespace kvm::server {
namespace {
const std::vector<std::string> kKinds = {"exact", "bound", "audit"};
const std::vector<std::string> kDirections = {"to_worker", "from_worker"};
const std::vector<std::string> kTransports = {"ucx", "inproc", "tcp"};
const std::vector<std::string> kTiers = {"gpu", "host", "disk"};
const std::vector<std::pair<std::string, std::string>> kMoves = {
    {"gpu", "host"}, {"host", "disk"}, {"disk", "host"}, {"host", "gpu"}};
const std::vector<std::string> kOps = {
    "hello",          "create",        "append",   "prefix_lookup", "truncate",
    "retrieve_layer", "set_layer_map", "audit",    "read_blocks",   "delete",
    "list",           "stats",         "heartbeat"};

prometheus::Histogram::BucketBoundaries LogBuckets(double lo, double hi, int per_decade) {
  prometheus::Histogram::BucketBoundaries b;
  const int n = static_cast<int>(std::round(std::log10(hi / lo) * per_decade));
  for (int i = 0; i <= n; ++i) b.push_back(lo * std::pow(10.0, double(i) / per_decade));
  return b;
}
}  // namespace

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> reg = std::make_shared<prometheus::Registry>();
  std::map<std::pair<std::string, std::string>, prometheus::Histogram*> delta;
  std::map<std::string, prometheus::Counter*> over_target, errors;
  std::map<std::pair<std::string, std::string>, prometheus::Counter*> stream, evictions, promotions;
  std::map<std::string, prometheus::Gauge*> tier_bytes, tier_capacity;
  std::map<std::string, prometheus::Histogram*> request;
  prometheus::Counter* dense = nullptr;
  prometheus::Counter* retrievals = nullptr;
  prometheus::Counter* gate_checks = nullptr;
  prometheus::Gauge* sequences = nullptr;
  prometheus::Gauge* ready = nullptr;
  prometheus::Gauge* degraded = nullptr;
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {
  auto& r = *impl_->reg;
  auto& dm = prometheus::BuildHistogram()
                 .Name("kvm_dropped_mass")
                 .Help("Dropped attention mass per (step, layer, query head), by selector and kind")
                 .Register(r);
  for (const sel::SelectorEntry& e : sel::Selectors())  // every selector of the registry
    for (const auto& k : kKinds)
      impl_->delta[{e.name, k}] =
          &dm.Add({{"selector", e.name}, {"kind", k}}, LogBuckets(1e-4, 1, 3));
  auto& ot = prometheus::BuildCounter()
                 .Name("kvm_dropped_mass_over_target_total")
                 .Help("Dropped-mass values above the sequence's target, by kind")
                 .Register(r);
  for (const auto& k : kKinds) impl_->over_target[k] = &ot.Add({{"kind", k}});
  auto& sb = prometheus::BuildCounter()
                 .Name("kvm_stream_bytes_total")
                 .Help("K/V block bytes streamed, by direction and transport")
                 .Register(r);
  for (const auto& d : kDirections)
    for (const auto& t : kTransports)
      impl_->stream[{d, t}] = &sb.Add({{"direction", d}, {"transport", t}});
  impl_->dense = &prometheus::BuildCounter()
                      .Name("kvm_dense_equivalent_bytes_total")
                      .Help("K/V bytes a dense offload would have moved for the same steps")
                      .Register(r)
                      .Add({});
  impl_->retrievals = &prometheus::BuildCounter()
                           .Name("kvm_retrievals_total")
                           .Help("Query heads scored in full")
                           .Register(r)
                           .Add({});
  impl_->gate_checks = &prometheus::BuildCounter()
                            .Name("kvm_gate_checks_total")
                            .Help("PrHS gate evaluations")
                            .Register(r)
                            .Add({});
  auto& tb =
      prometheus::BuildGauge().Name("kvm_tier_bytes").Help("Bytes in use per tier").Register(r);
  auto& tc = prometheus::BuildGauge()
                 .Name("kvm_tier_capacity_bytes")
                 .Help("Capacity per tier")
                 .Register(r);
  for (const auto& t : kTiers) {
    impl_->tier_bytes[t] = &tb.Add({{"tier", t}});
    impl_->tier_capacity[t] = &tc.Add({{"tier", t}});
  }
  auto& ev = prometheus::BuildCounter()
                 .Name("kvm_evictions_total")
                 .Help("Blocks demoted between tiers")
                 .Register(r);
  auto& pr = prometheus::BuildCounter()
                 .Name("kvm_promotions_total")
                 .Help("Blocks promoted between tiers")
                 .Register(r);
  for (const auto& [f, t] : kMoves) {
    impl_->evictions[{f, t}] = &ev.Add({{"from", f}, {"to", t}});
    impl_->promotions[{f, t}] = &pr.Add({{"from", f}, {"to", t}});
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

void Metrics::ObserveRequest(const std::string& op, double seconds) {
  auto it = impl_->request.find(op);
  if (it != impl_->request.end()) it->second->Observe(seconds);
}
void Metrics::CountError(StatusCode code) {
  auto it = impl_->errors.find(std::string(StatusCodeName(code)));
  if (it != impl_->errors.end()) it->second->Increment();
}
void Metrics::SetSequences(double n) { impl_->sequences->Set(n); }
void Metrics::SetTier(const std::string& tier, double bytes, double capacity) {
  if (!impl_->tier_bytes.count(tier)) return;
  impl_->tier_bytes[tier]->Set(bytes);
  impl_->tier_capacity[tier]->Set(capacity);
}
void Metrics::AddEvictions(const std::string& from, const std::string& to, double n) {
  auto it = impl_->evictions.find({from, to});
  if (it != impl_->evictions.end()) it->second->Increment(n);
}
void Metrics::AddPromotions(const std::string& from, const std::string& to, double n) {
  auto it = impl_->promotions.find({from, to});
  if (it != impl_->promotions.end()) it->second->Increment(n);
}
void Metrics::ObserveDelta(const std::string& selector, const std::string& kind, double delta,
                           double target) {
  auto it = impl_->delta.find({selector, kind});
  if (it == impl_->delta.end()) return;
  it->second->Observe(delta);
  if (target > 0 && delta > target) impl_->over_target[kind]->Increment();
}
void Metrics::AddStreamBytes(const std::string& direction, const std::string& transport,
                             double bytes) {
  auto it = impl_->stream.find({direction, transport});
  if (it != impl_->stream.end()) it->second->Increment(bytes);
}
void Metrics::AddDenseEquivalentBytes(double bytes) { impl_->dense->Increment(bytes); }
void Metrics::AddRetrievals(double n) { impl_->retrievals->Increment(n); }
void Metrics::AddGateChecks(double n) { impl_->gate_checks->Increment(n); }
void Metrics::SetReady(bool ready) { impl_->ready->Set(ready ? 1 : 0); }
void Metrics::SetDegraded(bool degraded) { impl_->degraded->Set(degraded ? 1 : 0); }

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
    default:
      return "?";
  }
}

}  // namespace kvm::server
