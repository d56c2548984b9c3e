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
#include "transport/transport.h"

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
  Metrics* metrics = nullptr;  // request durations and error codes, when set
  // The data plane for retrieval blocks (UCX): a session whose Hello carries a worker address
  // gets its blocks as active messages; others get them in the reply frame (TCP).
  transport::Transport* data_plane = nullptr;
};

struct SessionState {
  bool authenticated = false;
  std::string tenant;
  bool loopback = false;  // the peer's address is a loopback address
  uint64_t session_id = 0;
  uint64_t data_peer = 0;  // the worker's data-plane endpoint (0: none, blocks go over TCP)
};

class RequestHandler {
 public:
  RequestHandler(store::BlockStore* store, HandlerOptions opt);
  // The reply frame to `f` (an Error frame for any failure), fully encoded.
  std::vector<uint8_t> Handle(SessionState& s, const wire::Frame& f);
  // The session ended: releases its data-plane endpoint.
  void Close(SessionState& s);

 private:
  Status Dispatch(SessionState& s, const wire::Frame& f, std::vector<uint8_t>* reply);
  // Sends a retrieval's blocks to the session's data-plane peer as active messages (split so each
  // header fits); returns how many.
  Result<uint32_t> SendBlocks(const SessionState& s, uint64_t request_id,
                              const wire::RetrieveLayerReply& r, std::vector<uint8_t> blocks);
  store::BlockStore* store_;
  HandlerOptions opt_;
  std::unique_ptr<RetrievalEngine> engine_;
  uint64_t next_session_ = 1;
};

}  // namespace kvm::server
