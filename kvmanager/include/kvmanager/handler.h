// The control plane's request handler: a pure function of a session's state and one decoded frame,
// returning the reply frame. No sockets, no threads: the Asio server decodes
// frames, calls Handle and writes the reply; tests drive it directly.
//
// Auth: a session's first request must be Hello with the protocol version and a tenant's token
// (TenantConfig); anything else before it is Unauthenticated. A loopback-only tenant (the embedded
// default's development tenant) is refused from other addresses. Every sequence is addressed within
// the session's tenant: another tenant's sequence answers NotFound, so existence does not leak.
// Every operation of the wire schema: Hello, CreateSequence (with attach), Append, PrefixLookup,
// Truncate, RetrieveLayer, SetLayerMap and Audit (the RetrievalEngine), ReadBlocks, DeleteSequence,
// ListSequences, Stats, Heartbeat. A RetrieveLayer reply carries its blocks as the frame payload
// (the TCP data path).
//
// Thread-safe if the BlockStore is (it is); a SessionState belongs to one connection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvmanager/block_store.h"
#include "kvmanager/retrieval.h"
#include "proto/wire/frame.h"

namespace kvm::server {

class Metrics;

struct TenantConfig {
  std::string name;
  std::string token;
  bool loopback_only = false;  // accepted only from 127.0.0.0/8 and ::1
};

struct HandlerOptions {
  std::vector<TenantConfig> tenants;
  wire::FrameLimits limits;
  std::string server_id = "kvmanager";
  uint32_t heartbeat_interval_ms = 1000;
  Metrics* metrics = nullptr;     // request durations and error codes, when set
  std::string transport = "tcp";  // how retrieval replies carry their blocks (metrics label)
};

struct SessionState {
  bool authenticated = false;
  std::string tenant;
  bool loopback = false;  // the peer's address is a loopback address
  uint64_t session_id = 0;
};

class RequestHandler {
 public:
  RequestHandler(store::BlockStore* store, HandlerOptions opt);
  // The reply frame to `f` (an Error frame for any failure), fully encoded.
  std::vector<uint8_t> Handle(SessionState& s, const wire::Frame& f);

 private:
  Status Dispatch(SessionState& s, const wire::Frame& f, std::vector<uint8_t>* reply);
  store::BlockStore* store_;
  HandlerOptions opt_;
  std::unique_ptr<RetrievalEngine> engine_;
  uint64_t next_session_ = 1;
};

}  // namespace kvm::server
