// The worker's connection to one kvmanager shard: the authenticated control channel (TCP, the
// proto/ wire) and the sequence API on top of it (DESIGN.md §4).
//
//   auto c = Client::Connect({.address = "127.0.0.1:7420", .tenant = "dev", .token = "dev"});
//   c->CreateSequence(...); c->AppendAsync(...); ... c->Flush();
//
// Requests are pipelined and replies are matched by request id, in whatever order the service
// finishes them (protocol 2: a RetrieveLayer may overtake an Append). CallAsync returns once the
// frame is written; its reply is dispatched when a later call reads it, or at Flush (the first
// failure without a handler is returned then). Call waits for its own reply up to the deadline
// (TimedOut; a reply that arrives later is discarded). Await waits for a condition that the data
// plane or a reply makes true (a retrieval whose reply is its active messages). A background thread
// sends a Heartbeat whenever the channel was quiet for the server's heartbeat interval, so an idle
// worker keeps its session. Reconnect opens a fresh session (the caller re-attaches its sequences
// and bumps its hot-set generation).
//
// Thread-compatible: one thread drives a Client (the heartbeat thread only writes, under a lock).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "proto/model_shape.h"
#include "proto/status.h"
#include "proto/wire/frame.h"
#include "transport/transport.h"

namespace kvm::client {

struct ConnectOptions {
  std::string address = "127.0.0.1:7420";  // HOST:PORT ([v6]:PORT)
  std::string tenant = "dev";
  std::string token = "dev";
  std::string client_name = "kvm-client";
  uint32_t deadline_ms = 30000;  // per request
  bool heartbeats = true;        // background heartbeats at the server's interval
  // The worker's data plane (UCX or in-process; must outlive the Client): its address goes in
  // Hello, and when the service answers with its own, retrieval blocks arrive on it. Null: TCP.
  transport::Transport* data_plane = nullptr;
  // TLS on the control channel (TLS 1.2+), on when tls_ca is set: the server's certificate must
  // chain to the PEM CA bundle tls_ca and name the host of `address` (an IP address against the
  // certificate's IP SANs, a name against its DNS names; the name is also sent as SNI). tls_cert
  // and tls_key (PEM): the client certificate a server with mutual TLS asks for. The data plane
  // (UCX) is not encrypted.
  std::string tls_ca, tls_cert, tls_key;
};

class Client {
 public:
  // Connects and says Hello. Unavailable when nothing listens or the TLS handshake fails (the
  // message says why), Unauthenticated / PermissionDenied for a refused token, FailedPrecondition
  // for another protocol version, InvalidArgument for unreadable TLS files.
  static Result<std::unique_ptr<Client>> Connect(const ConnectOptions& o);
  ~Client();

  // One request and its reply frame (an Error reply becomes its Status).
  Result<wire::Frame> Call(wire::MessageType type, const google::protobuf::MessageLite& m,
                           std::span<const uint8_t> payload = {});
  // Sends now; `on_reply` (may be empty) runs with the reply when it is read (during a later Call,
  // Await or Flush), on the driving thread. A failed reply without a handler is kept for Flush.
  Status CallAsync(wire::MessageType type, const google::protobuf::MessageLite& m,
                   std::span<const uint8_t> payload,
                   std::function<void(const Result<wire::Frame>&)> on_reply = {});
  // The same for a request that gets no reply when it succeeds (a retrieval over the data plane):
  // `on_reply` runs only if an (error) reply comes; Flush does not wait for one. Returns the
  // request id (the data plane's parts carry it).
  Result<uint64_t> SendOptionalReply(wire::MessageType type, const google::protobuf::MessageLite& m,
                                     std::span<const uint8_t> payload,
                                     std::function<void(const Result<wire::Frame>&)> on_reply);
  // Reads replies (dispatching them) and progresses the data plane until `done()` holds, up to the
  // deadline (TimedOut); Unavailable when the connection is lost.
  Status Await(const std::function<bool()>& done);
  // Stops expecting a reply to `id` (a late one is dropped).
  void Forget(uint64_t id);
  // Dispatches the replies that have arrived, without waiting; Unavailable when the connection is
  // lost.
  Status Poll();
  // Waits for every asynchronous reply; the first failure among them.
  Status Flush();
  // Closes the channel and opens a new session with the same options.
  Status Reconnect();

  // ---- the sequence API (ServiceKvSource creates, appends and retrieves) ----
  // How many leading tokens of `tokens` the service stores for this model and layout (whole blocks
  // of durable sequences, by content address).
  Result<uint64_t> PrefixLookup(const ModelShape& shape, uint32_t block_size,
                                std::span<const uint32_t> tokens);
  // Rolls a sequence back to `length` tokens (its worker resets its hot set afterwards).
  Status Truncate(uint64_t sequence_id, uint64_t length);
  Status DeleteSequence(uint64_t sequence_id);

  uint64_t session_id() const;
  // Bytes this client wrote on the control channel since it connected (frames, headers included).
  uint64_t bytes_sent() const;
  // The data plane when the service accepted it for this session, else null (blocks over TCP).
  transport::Transport* data_plane() const;
  uint32_t heartbeat_interval_ms() const;
  uint64_t max_frame_bytes() const;
  const ConnectOptions& options() const;

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::client
