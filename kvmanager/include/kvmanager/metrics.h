// The service's Prometheus metrics (DESIGN.md §8 names and labels, kept stable). Every known label
// combination is created at construction, so each family shows samples (zeros) before the first
// observation. No per-sequence labels. Thread-safe (prometheus-cpp metrics are).
#pragma once

#include <memory>
#include <string>

#include "proto/status.h"

namespace prometheus {
class Registry;
}

namespace kvm::server {

class Metrics {
 public:
  Metrics();
  ~Metrics();
  // The Prometheus text exposition of every family.
  std::string Serialize() const;

  void ObserveRequest(const std::string& op, double seconds);  // kvm_request_duration_seconds{op}
  void CountError(StatusCode code);                            // kvm_errors_total{code}
  void SetSequences(double n);                                 // kvm_sequences
  void SetTier(const std::string& tier, double bytes,
               double capacity);  // kvm_tier_bytes / _capacity_bytes
  void AddEvictions(const std::string& from, const std::string& to, double n);
  void AddPromotions(const std::string& from, const std::string& to, double n);
  // δ of one (step, layer, query head): kvm_dropped_mass{selector, kind}; over target:
  // _over_target_total{kind}.
  void ObserveDelta(const std::string& selector, const std::string& kind, double delta,
                    double target);
  void AddStreamBytes(const std::string& direction, const std::string& transport, double bytes);
  void AddDenseEquivalentBytes(double bytes);
  void AddRetrievals(double n);
  void AddGateChecks(double n);
  // kvm_ready: 1 while /readyz answers 200 (the store is open and the service is not draining),
  // else 0. Starts at 0.
  void SetReady(bool ready);
  // kvm_degraded: 1 while the shard serves on a fallback that costs performance, not correctness
  // (the UCX data plane failed, retrieval blocks go over TCP), else 0. Starts at 0.
  void SetDegraded(bool degraded);

  static const char* OpName(uint16_t message_type);  // "append", "retrieve_layer", ...

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::server
