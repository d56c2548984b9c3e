// The control plane's request handler: a function of a session's state and one decoded frame that
// yields the reply frame. No sockets, no threads of its own: the Asio server decodes frames, calls
// Handle and writes the reply; tests drive it directly. The reply may come later, from the data
// plane's thread: a retrieval for a session with a data plane is answered by its active messages
// (DataPart), and the handler reports it done (no frame) once they are sent, or with an Error frame
// when a send failed.
//
// Auth: a session's first request must be Hello with the protocol version and a tenant's token
// (TenantConfig; the token compared in constant time); anything else before it is Unauthenticated,
// a refused Hello counts in kvm_auth_failures_total. A loopback-only tenant (the embedded default's
// development tenant) is refused from other addresses. Every sequence is addressed within the
// session's tenant: another tenant's sequence answers NotFound, so existence does not leak. Every
// operation of the wire schema: Hello, CreateSequence (with attach), Append, PrefixLookup,
// Truncate, RetrieveLayer, SetLayerMap and Audit (the RetrievalEngine), ReadBlocks, DeleteSequence,
// ListSequences, Stats, Heartbeat. A RetrieveLayer reply carries its blocks as the frame payload
// (the TCP data path) or travels as active messages (the data plane). Classify says how a request
// is ordered against the session's others (the server runs them accordingly): Appends, Truncate,
// Delete and the rest of a sequence's changes in order; RetrieveLayer and Audit may overtake that
// sequence's Appends (the engine uses the K rows they carry).
//
// Thread-safe if the BlockStore is (it is); a SessionState belongs to one connection.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "kvmanager/block_store.h"
#include "kvmanager/retrieval.h"
#include "proto/wire/frame.h"
#include "transport/transport.h"

namespace kvm::wire {
class RetrieveLayer;
class Audit;
class WorkerStats;
}  // namespace kvm::wire

namespace kvm::server {

class Metrics;

struct TenantConfig {
  std::string name;
  std::string token;
  bool loopback_only = false;  // accepted only from 127.0.0.0/8 and ::1
  // Quotas, 0 = none. The store's (BlockStore::SetQuotas, StoreQuotas below): sequences held and
  // K/V bytes stored; over one, Create / Append answer NoSpace naming it and the current use.
  uint64_t max_sequences = 0;
  uint64_t max_stored_bytes = 0;
  // The server's: requests of this tenant (all its sessions together) received and not yet
  // answered; one beyond it is answered Busy at once, naming the quota and the current count, so a
  // flooding tenant holds at most this many of the worker pool's places. Default: 0 = none.
  uint32_t max_in_flight = 0;
  // Sessions authenticated as this tenant at once; a Hello beyond it is answered Busy naming the
  // limit (the connection stays open, unauthenticated). Default: 0 = none.
  uint32_t max_connections = 0;
};

// The store's quotas of `tenants` (those with a max_sequences or max_stored_bytes).
std::map<std::string, store::TenantQuota> StoreQuotas(const std::vector<TenantConfig>& tenants);

// How a retrieval's blocks leave over the data plane: gathered straight from the store's memory
// (one gathered send per part: Transport::SendGather) or copied into one buffer per part first
// (Transport::Send). kAuto: whichever the connection's transport does faster
// (Transport::GatherPays); the others force one (tests, benchmarks).
enum class ReplySends { kAuto, kCopy, kGather };

// Sends a retrieval reply `r` as its data-plane active messages to `peer` (wire::SplitReply: each
// part's header within the transport's limit) with the blocks' K and V, gathered from where they
// lie or copied out first as `how` says; the blocks stay pinned until the last part's send
// completed, then `done` gets OK or the first failed send's error. An error returned (a reply that
// cannot be split) sends nothing and never calls `done`. The service's send path (RequestHandler)
// and `kvmctl bench transport` use it.
Status SendReply(transport::Transport& dp, uint64_t peer, uint64_t request_id,
                 const wire::RetrieveLayerReply& r, ReplyBlocks blocks, ReplySends how,
                 std::function<void(const Status&)> done);

struct HandlerOptions {
  std::vector<TenantConfig> tenants;
  wire::FrameLimits limits;
  std::string server_id = "kvmanager";
  uint32_t heartbeat_interval_ms = 1000;
  Metrics* metrics = nullptr;  // request durations and error codes, when set
  // The data plane for retrieval blocks (UCX): a session whose Hello carries a worker address
  // gets its blocks as active messages; others get them in the reply frame (TCP).
  transport::Transport* data_plane = nullptr;
  ReplySends reply_sends = ReplySends::kAuto;
};

struct SessionState {
  bool authenticated = false;
  bool auth_failed = false;  // the last Hello was refused (the server delays the next reply)
  std::string tenant;
  bool loopback = false;  // the peer's address is a loopback address
  uint64_t session_id = 0;
  uint64_t data_peer = 0;  // the worker's data-plane endpoint (0: none, blocks go over TCP)
  // The tenant whose max_connections place this session holds ("" none; released by Close).
  std::string connection_of;
};

// a == b in time that depends on the length of `expected` only (tokens).
bool TokenEquals(std::string_view expected, std::string_view given);

// How a request is ordered against the other requests of its session.
struct RequestClass {
  enum Kind {
    kBarrier,   // waits for everything before it; nothing after it starts before it ends (Hello,
                // ListSequences, Stats, PrefixLookup)
    kSequence,  // in order with the other requests of its sequence (Create, Append, Truncate,
                // Delete, SetLayerMap, ReadBlocks); Appends may run beside retrievals
    kOvertake,  // after the requests of its sequence before it, except Appends (RetrieveLayer,
                // Audit)
    kFree,      // no ordering (Heartbeat)
  } kind = kFree;
  uint64_t sequence = 0;
  bool append = false;
};

class RequestHandler {
 public:
  RequestHandler(store::BlockStore* store, HandlerOptions opt);
  // Receives the encoded reply frame to write; empty when there is none (a retrieval answered on
  // the data plane). Called exactly once, maybe later and on another thread.
  using Reply = std::function<void(std::vector<uint8_t> frame)>;
  // Handles `f` (an Error frame for any failure). `s` must stay valid until `reply` ran.
  void Handle(SessionState& s, const wire::Frame& f, Reply reply);
  // The same, waiting for the reply (tests, tools).
  std::vector<uint8_t> Handle(SessionState& s, const wire::Frame& f);
  // The ordering class of a request (decodes its protobuf header; a frame that does not parse is
  // kFree: Handle answers it with the parse error).
  static RequestClass Classify(const wire::Frame& f);
  // The session ended: releases its data-plane endpoint and its place in its tenant's
  // max_connections. Idempotent.
  void Close(SessionState& s);
  // Replaces the tenants (rotated tokens) for the Hellos from now on; sessions already
  // authenticated keep their tenant.
  void SetTenants(std::vector<TenantConfig> tenants);
  // Deletes the sequences whose lease ran out (BlockStore::ExpireLeases) and forgets their
  // retrieval state; returns how many.
  Result<uint64_t> ExpireLeases();

 private:
  // Replies through `reply` itself only when it returns kDeferred with an OK status.
  Status Dispatch(SessionState& s, const wire::Frame& f, std::vector<uint8_t>* reply,
                  const Reply& deferred, bool* is_deferred);
  // Sends a retrieval reply to the session's data-plane peer as its active messages (SplitReply);
  // `done` gets nothing once every part was sent, or the Error frame of the first failed send.
  void SendParts(const SessionState& s, uint64_t request_id, wire::RetrieveLayerReply r,
                 ReplyBlocks blocks, Reply done);
  // The K row bytes a retrieval or audit carried (stream bytes from the worker).
  double CarriedRowBytes(const store::SeqRef& s, const wire::RetrieveLayer& m) const;
  double CarriedRowBytes(const store::SeqRef& s, const wire::Audit& m) const;
  // A worker's report (WorkerStats on Append, Heartbeat, DeleteSequence) into the metrics.
  void ReportStats(const store::SeqRef& s, const wire::WorkerStats* w);
  // The full Append payload from one that left out the K rows named in k_from_retrieval.
  Status RestoreKRows(const SessionState& s, const wire::Append& m, std::span<const uint8_t> in,
                      std::vector<uint8_t>* out);
  // Releases the session's data-plane endpoint (a second Hello replaces it).
  void ClosePeer(SessionState& s);
  // Moves the session's max_connections place to tenant `t`; Busy naming the limit when `t` is at
  // it (the session keeps what it held).
  Status TakeConnection(SessionState& s, const TenantConfig& t);
  store::BlockStore* store_;
  HandlerOptions opt_;
  std::unique_ptr<RetrievalEngine> engine_;
  std::mutex tenants_mu_;
  std::shared_ptr<const std::vector<TenantConfig>> tenants_;  // GUARDED_BY(tenants_mu_)
  std::atomic<uint64_t> next_session_{1};  // Hellos of several sessions run at once
  std::mutex connections_mu_;
  std::map<std::string, uint32_t> connections_;  // GUARDED_BY(connections_mu_): sessions per tenant
};

}  // namespace kvm::server
