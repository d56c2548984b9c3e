// The control-plane server (Boost.Asio), in the shape of the Asio HTTP server example: the server
// owns the io_context and the acceptor; one Session per socket decodes frames (FrameDecoder, limits
// checked before allocation) and hands each request, in order, to the RequestHandler on a bounded
// worker pool; replies are written in request order. A protocol error (bad magic, oversized length,
// ...) gets an Error frame and closes that connection only. A full pool answers Busy. Stop() stops
// accepting, drains the requests in flight and joins the threads. A session silent for longer than
// session_timeout_ms (heartbeats keep it alive) is closed. Deadlines: the client stops waiting and
// reports TimedOut (client/); a request that waited past request_deadline_ms before it could start
// is answered TimedOut here without running. Limits against hostile clients (per address, per
// tenant: TenantConfig max_in_flight and max_connections; frame read deadline; bounded queues) are
// in ServerOptions; a tenant over its max_in_flight is answered Busy at once, so it cannot starve
// another tenant's requests.
//
// Thread-safe: Start/Stop/port from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "kvmanager/block_store.h"
#include "kvmanager/handler.h"
#include "kvmanager/tls.h"

namespace kvm::server {

struct ServerOptions {
  std::string listen = "127.0.0.1:7420";  // HOST:PORT; port 0 picks a free port (see port())
  uint32_t io_threads = 1;                // decode/encode only
  uint32_t worker_threads = 2;            // request handling (disk work)
  uint32_t max_in_flight = 1024;          // requests queued or running; beyond: Busy
  // Requests of one session running or queued for a worker at once; the session's later ones wait
  // in it (their deadline runs), so one client cannot take the whole pool. Default: 64.
  uint32_t max_session_in_flight = 64;
  // Liveness: a session that sends nothing (no request, no heartbeat) for this long while none of
  // its requests is in flight is closed and its state reclaimed. 0 = never. Default: 10 heartbeat
  // intervals of the default 1 s.
  uint32_t session_timeout_ms = 10000;
  // A request still queued this long after it arrived is answered TimedOut without running (the
  // client's deadline has passed). 0 = none. Default: 30000 (the client library's deadline).
  uint32_t request_deadline_ms = 30000;
  // An already bound and listening TCP socket to accept on instead of binding `listen` (which is
  // then not used): the executable binds the control port before it opens the store, so that
  // clients connecting during the open wait in the listen backlog (within their deadline) instead
  // of being refused. Start takes ownership of it (it is closed by Stop, or on a failed Start).
  // Default: -1 = bind `listen`.
  int listen_fd = -1;
  // TLS on the control plane (kvmanager/tls.h; mutual when it has a client CA): every connection
  // starts with a TLS handshake (TLS 1.2+). A connection whose handshake fails (a plaintext
  // client, no or an untrusted client certificate, TLS 1.1) gets one log line on stderr (at most 20
  // per 10 s, then a count of the unlogged ones), counts in kvm_tls_handshake_failures_total
  // (handler.metrics) and is closed; the others are served.
  // A Reload of the credentials applies to new connections. Default: null = plaintext.
  std::shared_ptr<TlsCredentials> tls;
  // A failed Hello from a peer address that failed before is answered after a delay that doubles
  // with each failure in a row from that address (auth_delay_base_ms, 2x, 4x, ... up to
  // auth_delay_max_ms; the count forgets an address after a minute without failures). Only that
  // session waits (a timer, no thread). 0 = no delay. Defaults: 100 and 5000.
  uint32_t auth_delay_base_ms = 100;
  uint32_t auth_delay_max_ms = 5000;
  // ---- hostile clients (every limit names itself and the current count in its message) ----
  // Open connections from one peer IP address; the next one gets an Error frame (Busy, after the
  // TLS handshake on a TLS listener) and is closed, counted in
  // kvm_connections_refused_total{limit="per_address"}. 0 = none. Default: 64.
  uint32_t max_connections_per_address = 64;
  // A frame whose first byte arrived must be complete this long after: a client that trickles a
  // header (or a claimed payload) byte by byte gets an Error frame (TimedOut) and is closed. 0 =
  // none. Trade-off: the slowest link a max_frame_bytes frame may take. Default: 10000.
  uint32_t frame_read_timeout_ms = 10000;
  // Reply bytes queued for one session and not yet taken by its socket. A session over it (a
  // client that pipelines requests and never reads the replies) is closed and its queued requests
  // dropped; one reply is always allowed, whatever its size. Default: 256 MiB.
  uint64_t max_session_send_queue_bytes = 256ull << 20;
  // Requests of one session received and not yet started (behind max_session_in_flight); one
  // beyond it is answered Busy at once. Reading from the session pauses (TCP pushes back) while
  // its queued requests hold more than max_frame_bytes. Default: 1024.
  uint32_t max_session_queued = 1024;
  HandlerOptions handler;
};

class Server {
 public:
  // Binds `o.listen` (or adopts `o.listen_fd`) and starts serving. InvalidArgument for a bad
  // address or a listen_fd that is not a TCP socket, Unavailable when the port is taken.
  static Result<std::unique_ptr<Server>> Start(const ServerOptions& o, store::BlockStore* store);
  ~Server();
  uint16_t port() const;
  std::string address() const;  // "host:port" actually bound
  size_t sessions() const;      // open control connections
  // The tenants for new Hellos (RequestHandler::SetTenants); open sessions stay, and the tenants'
  // max_in_flight apply to their next requests. (The store's quotas are BlockStore::SetQuotas.)
  void SetTenants(std::vector<TenantConfig> tenants);
  // RequestHandler::ExpireLeases (the executable calls it once a second).
  Result<uint64_t> ExpireLeases();
  // Stops accepting, waits (up to drain_ms) for the requests in flight, closes every session.
  void Stop(int drain_ms = 5000);

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvm::server
