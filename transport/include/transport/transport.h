// The data plane (DESIGN.md §4 step 4, §6): active messages from the service into a worker's
// registered memory. A message is a small header (for a retrieval reply: the request id and where
// each block goes) and a data part that the *receiver* places: its placement callback turns the
// header into destination segments (hot-set slots), and the data lands there (UCX: rendezvous,
// received straight into the segments). Two implementations with the same semantics: UCX (UCP
// active messages; peers addressed by UCX worker address, exchanged over the authenticated control
// channel) and in-process (embedded mode and tests).
//
// Threads: Send may be called from any thread. Receiving happens in Progress/WaitFor on the
// receiver's thread (the placement and completion callbacks run there), or on the transport's own
// progress thread when it has one (the service). Progress is event-driven (UCX: the worker's event
// fd; in-process: a condition variable), never a spin.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "proto/status.h"

namespace kvm::transport {

struct Segment {
  void* ptr = nullptr;
  size_t len = 0;
};

// Receiver: header + data length → where the data goes (lengths summing to the data length), or
// an error (the message is dropped and reported to Done).
using Placement =
    std::function<Result<std::vector<Segment>>(std::span<const uint8_t> header, size_t data_len)>;
// Receiver: a message's data has landed (or failed); `header` as sent.
using Delivered = std::function<void(std::span<const uint8_t> header, const Status& status)>;
// Sender: the send finished (the data buffer may be released).
using SendDone = std::function<void(const Status& status)>;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;  // "ucx", "inproc"
  // What a peer needs to Connect to this side (sent in Hello / HelloReply).
  virtual std::vector<uint8_t> address() const = 0;
  // The largest header a message may carry.
  virtual size_t max_header_bytes() const = 0;
  // Registers memory once, up front: memory that messages will land in (a worker's hot set) or
  // are sent from (the service's host tier; UCX: a contiguous send from it skips registration).
  virtual Status Register(void* base, size_t len) = 0;

  // ---- sending side ----
  // A peer id for `address` (InvalidArgument for a malformed one, Unavailable when unreachable).
  virtual Result<uint64_t> Connect(std::span<const uint8_t> address) = 0;
  // Forgets a peer (its pending sends fail or are dropped).
  virtual void Disconnect(uint64_t peer) = 0;
  // Sends header + data to `peer`. The header is copied; `data` must stay valid until `done` runs
  // (on any thread).
  virtual Status Send(uint64_t peer, std::span<const uint8_t> header, std::span<const uint8_t> data,
                      SendDone done) = 0;
  // The same with the data gathered from `segments` (UCX: an iov datatype, pipelined through UCX's
  // bounce buffers in 1.13, not zero-copy). The segments (not the list) must stay valid until done.
  virtual Status SendGather(uint64_t peer, std::span<const uint8_t> header,
                            std::span<const Segment> segments, SendDone done) = 0;
  // Whether a gathered send (SendGather) straight from scattered memory is faster on the
  // connection to `peer` than copying the pieces into one buffer and sending that (Send), as
  // measured by `kvmctl bench transport` (bench/RESULTS.md): UCX over shared memory only (1.3-1.5x
  // the copy); UCX over TCP pipelines an iov through bounce buffers (2.2-2.5x slower than the
  // copy); in-process, the copy measured faster too.
  virtual bool GatherPays(uint64_t peer) const = 0;
  // Which lanes the connection to `peer` uses (UCX: ucp_ep_print_info), for reports.
  virtual std::string Describe(uint64_t peer) const = 0;

  // ---- receiving side ----
  virtual void SetReceiver(Placement place, Delivered delivered) = 0;
  // Processes arrived messages until `done()` holds (TimedOut after timeout_ms). With `wake_fd` ≥ 0
  // it also returns (OK, done() maybe still false) as soon as that file descriptor is readable: a
  // caller waiting on this data plane and on its control socket at once (the worker waits for a
  // retrieval's parts or its error reply).
  virtual Status WaitFor(const std::function<bool()>& done, int timeout_ms, int wake_fd = -1) = 0;
};

struct UcxOptions {
  // A thread that progresses the UCX worker (event-driven: sleeps on its event fd). The service
  // needs one (its sends complete while handler threads do other work); a worker progresses in
  // WaitFor instead.
  bool progress_thread = false;
  // UCP_ERR_HANDLING_MODE_PEER (drops shared memory in UCX 1.13); default NONE, with liveness
  // from control-channel heartbeats.
  bool peer_error_mode = false;
};

// UCX (UCP active messages). Unavailable when UCX cannot initialise.
Result<std::unique_ptr<Transport>> MakeUcx(const UcxOptions& o = {});
// In-process: peers are other in-process transports of this process.
std::unique_ptr<Transport> MakeInProcess();

}  // namespace kvm::transport
