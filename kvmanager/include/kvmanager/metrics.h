// The service's Prometheus metrics (DESIGN.md §8 names and labels, kept stable). Every known label
// combination is created at construction, so each family shows samples (zeros) before the first
// observation. No per-sequence labels. Labels are typed (enums) where they are a closed set; the
// two that are names (selector, op) are checked, and an unknown one is an InvalidArgument — a
// programming error a test catches — never a silent drop. Thread-safe (prometheus-cpp metrics are).
//
// Families (README "Metrics" lists them with every label value):
//   kvm_dropped_mass{selector,kind}            histogram, selector/delta_histogram.h buckets
//   kvm_dropped_mass_over_target_total{kind}
//   kvm_stream_bytes_total{direction,transport} K/V payload bytes (blocks to the worker; appended
//                                               rows and the K rows queries carry from it)
//   kvm_dense_equivalent_bytes_total            what a dense offload of the decode steps moves
//   kvm_retrievals_total                        query heads scored in full
//   kvm_gate_checks_total{result}               the workers' gate decisions (reported by them)
//   kvm_tier_bytes{tier} / kvm_tier_capacity_bytes{tier}   live sizes
//   kvm_evictions_total{from,to} / kvm_promotions_total{from,to}
//   kvm_request_duration_seconds{op}, kvm_errors_total{code}, kvm_sequences, kvm_ready,
//   kvm_degraded, kvm_tls_handshake_failures_total, kvm_auth_failures_total,
//   kvm_connections_refused_total{limit}, kvm_sessions_closed_total{reason}
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "proto/model_shape.h"
#include "proto/status.h"
#include "selector/worker_gate.h"

namespace kvm::store {
struct StoreStats;
}

namespace kvm::server {

enum class Direction { kToWorker, kFromWorker };
enum class Link { kUcx, kInproc, kTcp };  // the `transport` label
enum class Tier { kGpu, kHost, kDisk };
// The `limit` label: max_connections_per_address (at accept), a tenant's max_connections (Hello).
enum class ConnectionLimit { kPerAddress, kPerTenant };
// The `reason` label: a frame not complete within frame_read_timeout_ms; unsent replies over
// max_session_send_queue_bytes.
enum class CloseReason { kFrameTimeout, kSendQueue };
// "ucx", "inproc" (a data plane's name) or "tcp"; InvalidArgument otherwise.
Result<Link> LinkFromName(const std::string& name);

class Metrics {
 public:
  Metrics();
  ~Metrics();
  // The Prometheus text exposition of every family.
  std::string Serialize() const;

  // kvm_request_duration_seconds{op}; InvalidArgument for an unknown op.
  Status ObserveRequest(const std::string& op, double seconds);
  void CountError(StatusCode code);  // kvm_errors_total{code}
  // The store's live sizes and counters: kvm_sequences, kvm_tier_bytes / _capacity_bytes, and the
  // evictions and promotions since the last call. `disk_capacity`: 0 = unlimited.
  void RefreshStore(const store::StoreStats& st, uint64_t disk_capacity);
  // One δ of one (step, layer, query head): kvm_dropped_mass{selector, kind}; over `target` (> 0):
  // _over_target_total{kind}. NaN is not observed. InvalidArgument for a selector the registry does
  // not know or a kind other than exact, bound and audit.
  Status ObserveDelta(const std::string& selector, DeltaKind kind, double delta, double target);
  // Bucket deltas a worker reported (selector/delta_histogram.h bounds, then +Inf).
  Status AddDeltaCounts(const std::string& selector, DeltaKind kind,
                        std::span<const uint64_t> buckets, double sum, uint64_t over_target);
  void AddStreamBytes(Direction d, Link l, double bytes);
  void AddDenseEquivalentBytes(double bytes);
  void AddRetrievals(double n);
  void AddGateChecks(sel::GateOutcome result, double n);
  // kvm_ready: 1 while /readyz answers 200 (the store is open and the service is not draining),
  // else 0. Starts at 0.
  void SetReady(bool ready);
  // kvm_degraded: 1 while the shard serves on a fallback that costs performance, not correctness
  // (the UCX data plane failed, retrieval blocks go over TCP), else 0. Starts at 0.
  void SetDegraded(bool degraded);
  // kvm_tls_handshake_failures_total: a connection to a TLS listener refused in the handshake.
  void CountTlsHandshakeFailure();
  // kvm_auth_failures_total: a Hello refused (unknown tenant, wrong token, loopback only).
  void CountAuthFailure();
  // kvm_connections_refused_total{limit=per_address|per_tenant}: a connection refused (Busy) at a
  // connection limit.
  void CountConnectionRefused(ConnectionLimit limit);
  // kvm_sessions_closed_total{reason=frame_timeout|send_queue}: a session closed at a limit.
  void CountSessionClosed(CloseReason reason);

  static const char* OpName(uint16_t message_type);  // "append", "retrieve_layer", ...

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::server
