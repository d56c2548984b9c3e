// The UCX transport (UCX 1.13 from Debian): one UCP context and worker (thread mode MULTI: sends
// come from the service's handler threads), endpoints created from peers' worker addresses (no
// listener port), active message id 1. Rendezvous data is received straight into the placement's
// segments (an iov datatype); eager data is copied there in the callback. Progress is event-driven:
// ucp_worker_arm + poll on the worker's event fd (ucp_worker_signal wakes the progress thread).
#include <poll.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "transport/transport.h"

namespace kvm::transport {
namespace {

constexpr unsigned kAmId = 1;

Status FromUcs(ucs_status_t s, const std::string& what) {
  if (s == UCS_OK) return Status::Ok();
  const std::string m = what + ": " + ucs_status_string(s);
  switch (s) {
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_NOT_CONNECTED:
      return Status::Unavailable(m);
    case UCS_ERR_CANCELED:
      return Status::Cancelled(m);
    case UCS_ERR_TIMED_OUT:
      return Status::TimedOut(m);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
      return Status::Busy(m);
    case UCS_ERR_INVALID_PARAM:
      return Status::InvalidArgument(m);
    default:
      return Status::Internal(m);
  }
}

class Ucx;

// A rendezvous receive in flight: its iov and header live until completion.
struct RecvOp {
  Ucx* t;
  std::vector<uint8_t> header;
  std::vector<ucp_dt_iov_t> iov;
};

struct SendOp {
  SendDone done;
  std::vector<uint8_t> header;    // UCX reads the header until the send completes
  std::vector<ucp_dt_iov_t> iov;  // ... and the iov list of a gathered send
};

class Ucx : public Transport {
 public:
  ~Ucx() override {
    if (progress_.joinable()) {
      stop_ = true;
      Wake();
      progress_.join();
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto& [id, ep] : eps_) Close(ep);
      eps_.clear();
    }
    // Let the closes flush (bounded), then release what is left so the worker can go.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (worker_ && std::chrono::steady_clock::now() < until) {
      Progress();
      std::lock_guard<std::mutex> l(mu_);
      if (closing_.empty()) break;
    }
    for (auto r : closing_) ucp_request_free(r);
    closing_.clear();
    for (auto& m : maps_) ucp_mem_unmap(ctx_, m.memh);
    if (worker_) ucp_worker_destroy(worker_);
    if (ctx_) ucp_cleanup(ctx_);
  }

  Status Init(const UcxOptions& o) {
    opt_ = o;
    ucp_config_t* cfg = nullptr;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_config_read(nullptr, nullptr, &cfg), "ucp_config_read"));
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    p.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    p.mt_workers_shared = 1;
    const ucs_status_t s = ucp_init(&p, cfg, &ctx_);
    ucp_config_release(cfg);
    KVM_RETURN_IF_ERROR(FromUcs(s, "ucp_init"));
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_MULTI;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_worker_create(ctx_, &wp, &worker_), "ucp_worker_create"));
    KVM_RETURN_IF_ERROR(FromUcs(ucp_worker_get_efd(worker_, &efd_), "ucp_worker_get_efd"));
    ucp_address_t* a = nullptr;
    size_t alen = 0;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_worker_get_address(worker_, &a, &alen), "get_address"));
    address_.assign(reinterpret_cast<uint8_t*>(a), reinterpret_cast<uint8_t*>(a) + alen);
    ucp_worker_release_address(worker_, a);
    ucp_worker_attr_t wa{};
    wa.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_worker_query(worker_, &wa), "ucp_worker_query"));
    max_header_ = wa.max_am_header;
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    hp.id = kAmId;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    hp.cb = &Ucx::OnAm;
    hp.arg = this;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_worker_set_am_recv_handler(worker_, &hp), "am handler"));
    if (o.progress_thread) progress_ = std::thread([this] { ProgressLoop(); });
    return Status::Ok();
  }

  const char* name() const override { return "ucx"; }
  std::vector<uint8_t> address() const override { return address_; }
  size_t max_header_bytes() const override { return max_header_; }

  Status Register(void* base, size_t len) override {
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = base;
    mp.length = len;
    ucp_mem_h memh = nullptr;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_mem_map(ctx_, &mp, &memh), "ucp_mem_map"));
    std::lock_guard<std::mutex> l(mu_);
    maps_.push_back({static_cast<uint8_t*>(base), len, memh});
    return Status::Ok();
  }

  Result<uint64_t> Connect(std::span<const uint8_t> address) override {
    if (address.size() < 8 || address.size() > 65536)
      return Status::InvalidArgument("UCX worker address of " + std::to_string(address.size()) +
                                     " bytes");
    std::vector<uint8_t> copy(address.begin(), address.end());  // UCX reads it during create
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(copy.data());
    ep.err_mode = opt_.peer_error_mode ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    if (opt_.peer_error_mode) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = [](void*, ucp_ep_h, ucs_status_t) {};  // sends fail; heartbeats decide
      ep.err_handler.arg = nullptr;
    }
    ucp_ep_h h = nullptr;
    KVM_RETURN_IF_ERROR(FromUcs(ucp_ep_create(worker_, &ep, &h), "ucp_ep_create"));
    std::lock_guard<std::mutex> l(mu_);
    const uint64_t id = next_peer_++;
    eps_[id] = h;
    Wake();
    return id;
  }

  void Disconnect(uint64_t peer) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = eps_.find(peer);
    if (it == eps_.end()) return;
    Close(it->second);
    eps_.erase(it);
    gather_pays_.erase(peer);
  }

  Status Send(uint64_t peer, std::span<const uint8_t> header, std::span<const uint8_t> data,
              SendDone done) override {
    return Post(peer, header, nullptr, {const_cast<uint8_t*>(data.data()), data.size()},
                std::move(done));
  }
  Status SendGather(uint64_t peer, std::span<const uint8_t> header,
                    std::span<const Segment> segments, SendDone done) override {
    if (segments.empty()) return Post(peer, header, nullptr, {}, std::move(done));  // UCX: no iov
    return Post(peer, header, &segments, {}, std::move(done));
  }
  // One active message: contiguous `data`, or gathered from `segments` when given.
  Status Post(uint64_t peer, std::span<const uint8_t> header, std::span<const Segment>* segments,
              Segment data, SendDone done) {
    if (header.size() > max_header_) {
      return Status::InvalidArgument("active-message header of " + std::to_string(header.size()) +
                                     " bytes > ucp_am_max_header_size " +
                                     std::to_string(max_header_));
    }
    ucp_ep_h ep;
    ucp_mem_h memh = nullptr;  // contiguous data inside registered memory: its handle
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = eps_.find(peer);
      if (it == eps_.end())
        return Status::Unavailable("UCX peer " + std::to_string(peer) + " gone");
      ep = it->second;
      const auto* d = static_cast<const uint8_t*>(data.ptr);
      for (const Map& m : maps_)
        if (!segments && data.len && d >= m.base && d + data.len <= m.base + m.len) memh = m.memh;
    }
    auto* op = new SendOp{std::move(done), {header.begin(), header.end()}, {}};
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    if (memh) {
      rp.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      rp.memh = memh;
    }
    const void* buffer = data.ptr;
    size_t count = data.len;
    if (segments) {
      for (const Segment& s : *segments) op->iov.push_back({s.ptr, s.len});
      rp.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
      rp.datatype = ucp_dt_make_iov();
      buffer = op->iov.data();
      count = op->iov.size();
    }
    rp.cb.send = [](void* req, ucs_status_t s, void* user) {
      auto* o = static_cast<SendOp*>(user);
      o->done(FromUcs(s, "UCX send"));
      delete o;
      ucp_request_free(req);
    };
    rp.user_data = op;
    ucs_status_ptr_t r =
        ucp_am_send_nbx(ep, kAmId, op->header.data(), op->header.size(), buffer, count, &rp);
    if (r == nullptr) {  // completed in place
      op->done(Status::Ok());
      delete op;
    } else if (UCS_PTR_IS_ERR(r)) {
      const Status st = FromUcs(UCS_PTR_STATUS(r), "ucp_am_send_nbx");
      delete op;
      return st;
    }
    Wake();  // the progress thread moves the rendezvous on
    return Status::Ok();
  }

  // Shared memory gathers, TCP copies (Transport::GatherPays): a gathered send pays when no lane of
  // the endpoint is TCP. Decided once per peer from its lanes.
  bool GatherPays(uint64_t peer) const override {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = gather_pays_.find(peer); it != gather_pays_.end()) return it->second;
      if (!eps_.count(peer)) return false;
    }
    const std::string lanes = Describe(peer);
    const bool pays = lanes.find("tcp") == std::string::npos;
    std::lock_guard<std::mutex> l(mu_);
    if (eps_.count(peer)) gather_pays_[peer] = pays;
    return pays;
  }

  std::string Describe(uint64_t peer) const override {
    ucp_ep_h ep;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = eps_.find(peer);
      if (it == eps_.end()) return "no such peer";
      ep = it->second;
    }
    char* buf = nullptr;
    size_t len = 0;
    FILE* f = open_memstream(&buf, &len);
    if (!f) return "";
    ucp_ep_print_info(ep, f);
    std::fclose(f);
    std::string info(buf, len);
    std::free(buf);
    // "lane[0]:  3:sysv/memory.0 md[2] -> md[2]/sysv/sysdev[255] am am_bw#0" → "sysv/memory.0
    // (am am_bw#0)", lanes joined by "; ".
    std::string out;
    size_t pos = 0;
    while ((pos = info.find("lane[", pos)) != std::string::npos) {
      const size_t eol = info.find('\n', pos);
      const std::string line = info.substr(pos, eol == std::string::npos ? eol : eol - pos);
      pos = eol == std::string::npos ? info.size() : eol;
      const size_t colon = line.find(':', line.find(']'));
      size_t t0 = line.find_first_not_of(' ', colon + 1);
      if (colon == std::string::npos || t0 == std::string::npos) continue;
      const size_t t1 = line.find(' ', t0);
      std::string tl = line.substr(t0, t1 - t0);
      if (const size_t c = tl.find(':'); c != std::string::npos) tl = tl.substr(c + 1);
      const size_t dev = line.find("sysdev[");
      const size_t roles = dev == std::string::npos ? std::string::npos : line.find(' ', dev);
      out += (out.empty() ? "" : "; ") + tl +
             (roles == std::string::npos ? "" : " (" + line.substr(roles + 1) + ")");
    }
    return out.empty() ? info : out;
  }

  void SetReceiver(Placement place, Delivered delivered) override {
    std::lock_guard<std::mutex> l(rx_mu_);
    place_ = std::move(place);
    delivered_ = std::move(delivered);
  }

  Status WaitFor(const std::function<bool()>& done, int timeout_ms, int wake_fd) override {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      Progress();
      if (done()) return Status::Ok();
      const ucs_status_t a = ucp_worker_arm(worker_);
      if (a == UCS_ERR_BUSY) continue;  // more events to progress first
      if (a != UCS_OK) return FromUcs(a, "ucp_worker_arm");
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            deadline - std::chrono::steady_clock::now())
                            .count();
      if (left <= 0) return Status::TimedOut("data plane: nothing arrived within the deadline");
      pollfd p[2] = {{efd_, POLLIN, 0}, {wake_fd, POLLIN, 0}};
      const int n = poll(p, wake_fd >= 0 ? 2 : 1, int(std::min<int64_t>(left, 1000)));
      if (n > 0 && wake_fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
        Progress();
        return Status::Ok();
      }
    }
  }

 private:
  void Wake() {
    if (opt_.progress_thread) ucp_worker_signal(worker_);
  }
  void Close(ucp_ep_h ep) {
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = opt_.peer_error_mode ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &rp);
    // A flush-close to a live peer completes in progress; one to a dead peer never does (error mode
    // NONE cannot force): the request is left to UCX.
    if (r && !UCS_PTR_IS_ERR(r)) closing_.push_back(r);
  }

  // Progresses the worker, then posts the rendezvous receives its callbacks queued.
  void Progress() {
    while (ucp_worker_progress(worker_) != 0) {
    }
    std::deque<std::pair<void*, std::unique_ptr<RecvOp>>> rndv;
    {
      std::lock_guard<std::mutex> l(rx_mu_);
      rndv.swap(rndv_);
    }
    for (auto& [desc, op] : rndv) PostReceive(desc, std::move(op));
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = closing_.begin(); it != closing_.end();) {
      if (ucp_request_check_status(*it) != UCS_INPROGRESS) {
        ucp_request_free(*it);
        it = closing_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void ProgressLoop() {
    while (!stop_) {
      Progress();
      const ucs_status_t a = ucp_worker_arm(worker_);
      if (a == UCS_ERR_BUSY) continue;
      pollfd p{efd_, POLLIN, 0};
      (void)poll(&p, 1, 100);
    }
  }

  void Finish(std::span<const uint8_t> header, const Status& st) {
    Delivered d;
    {
      std::lock_guard<std::mutex> l(rx_mu_);
      d = delivered_;
    }
    if (d) d(header, st);
  }

  void PostReceive(void* desc, std::unique_ptr<RecvOp> op) {
    ucp_request_param_t rp{};
    rp.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    rp.datatype = ucp_dt_make_iov();
    rp.cb.recv_am = [](void* req, ucs_status_t s, size_t, void* user) {
      std::unique_ptr<RecvOp> o(static_cast<RecvOp*>(user));
      o->t->Finish(o->header, FromUcs(s, "UCX receive"));
      ucp_request_free(req);
    };
    RecvOp* raw = op.get();
    rp.user_data = raw;
    ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker_, desc, raw->iov.data(), raw->iov.size(), &rp);
    if (r == nullptr) {
      Finish(raw->header, Status::Ok());
    } else if (UCS_PTR_IS_ERR(r)) {
      Finish(raw->header, FromUcs(UCS_PTR_STATUS(r), "ucp_am_recv_data_nbx"));
    } else {
      (void)op.release();  // the callback owns it now
    }
  }

  static ucs_status_t OnAm(void* arg, const void* header, size_t header_len, void* data, size_t len,
                           const ucp_am_recv_param_t* param) {
    auto* t = static_cast<Ucx*>(arg);
    const std::span<const uint8_t> h(static_cast<const uint8_t*>(header), header_len);
    Placement place;
    {
      std::lock_guard<std::mutex> l(t->rx_mu_);
      place = t->place_;
    }
    Result<std::vector<Segment>> segs =
        place ? place(h, len)
              : Result<std::vector<Segment>>(Status::FailedPrecondition("no receiver"));
    size_t total = 0;
    if (segs.ok())
      for (const Segment& s : *segs) total += s.len;
    if (segs.ok() && total != len)
      segs = Status::InvalidArgument("placement does not match the data");
    const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
    if (!segs.ok()) {
      t->Finish(h, segs.status());
      if (rndv) ucp_am_data_release(t->worker_, data);
      return UCS_OK;
    }
    if (!rndv) {  // eager: the data is here
      size_t off = 0;
      for (const Segment& s : *segs) {
        std::memcpy(s.ptr, static_cast<const uint8_t*>(data) + off, s.len);
        off += s.len;
      }
      t->Finish(h, Status::Ok());
      return UCS_OK;
    }
    auto op = std::make_unique<RecvOp>();
    op->t = t;
    op->header.assign(h.begin(), h.end());
    for (const Segment& s : *segs) op->iov.push_back({s.ptr, s.len});
    std::lock_guard<std::mutex> l(t->rx_mu_);
    t->rndv_.emplace_back(data, std::move(op));
    return UCS_INPROGRESS;  // the descriptor stays valid until ucp_am_recv_data_nbx
  }

  UcxOptions opt_;
  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
  std::vector<uint8_t> address_;
  size_t max_header_ = 0;
  struct Map {
    const uint8_t* base;
    size_t len;
    ucp_mem_h memh;
  };
  mutable std::mutex mu_;
  std::vector<Map> maps_;  // guarded by mu_
  std::unordered_map<uint64_t, ucp_ep_h> eps_;
  mutable std::unordered_map<uint64_t, bool> gather_pays_;  // per peer, from its lanes; mu_
  std::vector<ucs_status_ptr_t> closing_;
  uint64_t next_peer_ = 1;
  std::mutex rx_mu_;
  Placement place_;
  Delivered delivered_;
  std::deque<std::pair<void*, std::unique_ptr<RecvOp>>> rndv_;
  std::atomic<bool> stop_{false};
  std::thread progress_;
};

}  // namespace

Result<std::unique_ptr<Transport>> MakeUcx(const UcxOptions& o) {
  auto t = std::make_unique<Ucx>();
  KVM_RETURN_IF_ERROR(t->Init(o));
  return std::unique_ptr<Transport>(std::move(t));
}

}  // namespace kvm::transport
