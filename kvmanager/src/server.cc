#include "kvmanager/server.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kvmanager/metrics.h"
#include "proto/kvm.pb.h"

namespace kvm::server {
namespace asio = boost::asio;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using TlsStream = ssl::stream<tcp::socket>;

struct Server::Impl {
  ServerOptions opt;
  store::BlockStore* store = nullptr;
  std::unique_ptr<RequestHandler> handler;
  asio::io_context io;
  std::unique_ptr<tcp::acceptor> acceptor;
  std::unique_ptr<asio::thread_pool> workers;
  std::vector<std::thread> io_threads;
  std::atomic<int64_t> in_flight{0};
  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable idle;

  class Session;
  std::mutex sessions_mu;
  std::condition_variable sessions_gone;
  std::set<std::shared_ptr<Session>> sessions;
  std::unordered_map<std::string, uint32_t> per_address;  // GUARDED_BY(sessions_mu): open, by IP
  std::unique_ptr<asio::steady_timer> accept_retry;       // an accept that failed (EMFILE, ...)

  // The requests of one tenant (all its sessions) received and not yet answered, against its
  // TenantConfig::max_in_flight. Shared with the requests that hold a place (they release it).
  struct TenantLoad {
    explicit TenantLoad(std::string n) : name(std::move(n)) {}
    const std::string name;
    std::atomic<uint32_t> max{0};  // 0 = none
    std::atomic<int64_t> in_flight{0};
  };
  std::mutex loads_mu;
  std::unordered_map<std::string, std::shared_ptr<TenantLoad>> loads;  // GUARDED_BY(loads_mu)
  std::shared_ptr<TenantLoad> LoadOf(const std::string& tenant) {
    std::lock_guard<std::mutex> l(loads_mu);
    auto& p = loads[tenant];
    if (!p) p = std::make_shared<TenantLoad>(tenant);
    return p;
  }
  // The tenants' max_in_flight (from now on; the counts stay). A tenant no longer listed has none.
  void SetTenantLimits(const std::vector<TenantConfig>& tenants) {
    std::lock_guard<std::mutex> l(loads_mu);
    for (auto& [name, p] : loads) p->max = 0;
    for (const TenantConfig& t : tenants) {
      auto& p = loads[t.name];
      if (!p) p = std::make_shared<TenantLoad>(t.name);
      p->max = t.max_in_flight;
    }
  }
  // Takes a place of `load`'s tenant; Busy naming the quota and the count when it is at it.
  static Status TakePlace(TenantLoad& load) {
    const uint32_t max = load.max.load();
    const int64_t n = load.in_flight.fetch_add(1);
    if (max == 0 || n < int64_t(max)) return Status::Ok();
    load.in_flight.fetch_sub(1);
    return Status::Busy("tenant '" + load.name +
                        "' is at its max_in_flight quota: " + std::to_string(n) +
                        " requests queued or running (max_in_flight " + std::to_string(max) + ")");
  }

  // Connections refused at accept (kRefused: per address) and sessions closed at a limit
  // (kClosed: send queue, frame deadline): one log line each, up to kTlsLogLines per 10 s and
  // kind, like the TLS refusals (a flood of one kind does not hide the other), then only counted.
  enum LimitLog { kRefused, kClosed };
  struct LimitLogState {
    std::chrono::steady_clock::time_point window;
    int logged = 0;
    uint64_t unlogged = 0;
  };
  std::mutex limit_log_mu;
  std::array<LimitLogState, 2> limit_log;  // GUARDED_BY(limit_log_mu)
  void LogLimit(LimitLog kind, const std::string& line) {
    std::lock_guard<std::mutex> l(limit_log_mu);
    LimitLogState& st = limit_log[kind];
    const auto now = std::chrono::steady_clock::now();
    if (now - st.window > std::chrono::seconds(10)) {
      st.window = now;
      st.logged = 0;
    }
    if (st.logged >= kTlsLogLines) {
      ++st.unlogged;
      return;
    }
    ++st.logged;
    if (st.unlogged)
      std::fprintf(stderr, "kvmanager: %llu more %s were not logged (at most %d lines per 10 s)\n",
                   static_cast<unsigned long long>(st.unlogged),
                   kind == kRefused ? "refused connections" : "sessions closed at a limit",
                   kTlsLogLines);
    st.unlogged = 0;
    std::fprintf(stderr, "%s\n", line.c_str());
  }

  // Refused TLS handshakes are logged one line each, up to kTlsLogLines per 10 s; beyond that they
  // are only counted (a flood of plaintext connections does not flood the log), and the next line
  // says how many went unlogged.
  static constexpr int kTlsLogLines = 20;
  std::mutex tls_log_mu;
  std::chrono::steady_clock::time_point tls_log_window;  // GUARDED_BY(tls_log_mu)
  int tls_logged = 0;                                    // GUARDED_BY(tls_log_mu)
  uint64_t tls_unlogged = 0;                             // GUARDED_BY(tls_log_mu)
  void LogTlsFailure(const std::string& line) {
    std::lock_guard<std::mutex> l(tls_log_mu);
    const auto now = std::chrono::steady_clock::now();
    if (now - tls_log_window > std::chrono::seconds(10)) {
      tls_log_window = now;
      tls_logged = 0;
    }
    if (tls_logged >= kTlsLogLines) {
      ++tls_unlogged;
      return;
    }
    ++tls_logged;
    if (tls_unlogged)
      std::fprintf(stderr,
                   "kvmanager: %llu more refused TLS handshakes were not logged (at most %d lines "
                   "per 10 s; kvm_tls_handshake_failures_total counts them all)\n",
                   static_cast<unsigned long long>(tls_unlogged), kTlsLogLines);
    tls_unlogged = 0;
    std::fprintf(stderr, "%s\n", line.c_str());
  }

  // Failed Hellos per peer address (AuthDelayMs).
  struct AuthFailures {
    uint32_t count = 0;
    std::chrono::steady_clock::time_point last;
  };
  std::mutex auth_mu;
  std::unordered_map<std::string, AuthFailures> auth_failures;  // GUARDED_BY(auth_mu)

  // Records a failed Hello from `addr`; returns how long its reply waits: base, 2x base, ... up to
  // the maximum for the failures in a row (forgotten a minute after the last one).
  uint32_t AuthDelayMs(const std::string& addr) {
    if (opt.auth_delay_base_ms == 0) return 0;
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> l(auth_mu);
    if (auth_failures.size() > 10000)  // bounded: forget the stale addresses, else all
      for (auto it = auth_failures.begin(); it != auth_failures.end();)
        it = now - it->second.last > std::chrono::minutes(1) ? auth_failures.erase(it) : ++it;
    if (auth_failures.size() > 10000) auth_failures.clear();
    AuthFailures& f = auth_failures[addr];
    if (now - f.last > std::chrono::minutes(1)) f.count = 0;
    f.last = now;
    const uint32_t shift = std::min<uint32_t>(f.count++, 20);
    return uint32_t(std::min<uint64_t>(uint64_t(opt.auth_delay_base_ms) << shift,
                                       std::max(opt.auth_delay_max_ms, opt.auth_delay_base_ms)));
  }

  class Session : public std::enable_shared_from_this<Session> {
   public:
    // `refusal`: not served; the client gets an Error frame (Busy) with it, then the connection
    // closes. `counted`: the session holds a place of its address (released by Finish).
    Session(Impl* srv, tcp::socket sock, std::shared_ptr<ssl::context> tls, std::string refusal,
            bool counted)
        : srv_(srv),
          sock_(srv->io),
          strand_(asio::make_strand(srv->io)),
          timer_(strand_),
          frame_timer_(strand_),
          decoder_(srv->opt.handler.limits),
          refusal_(std::move(refusal)),
          address_held_(counted),
          tls_ctx_(std::move(tls)) {
      boost::system::error_code ec;
      const auto ep = sock.remote_endpoint(ec);
      state_.loopback = !ec && ep.address().is_loopback();
      if (!ec) {
        peer_ip_ = ep.address().to_string();
        peer_ = (ep.address().is_v6() ? "[" + peer_ip_ + "]" : peer_ip_) + ":" +
                std::to_string(ep.port());
      }
      if (tls_ctx_)
        tls_ = std::make_unique<TlsStream>(std::move(sock), *tls_ctx_);
      else
        sock_ = std::move(sock);
    }
    ~Session() {
      for (Job& j : pending_) Release(j);
    }
    void Start() {
      if (!tls_) {
        Arm();
        if (!refusal_.empty()) return Refuse();
        Read();
        return;
      }
      Arm();  // a handshake that never completes is closed like a silent session
      tls_->async_handshake(
          ssl::stream_base::server,
          asio::bind_executor(strand_, [self = shared_from_this()](boost::system::error_code ec) {
            if (self->closed_) return self->Finish();  // timed out (Arm), or stopping
            if (ec) {
              self->HandshakeFailed(ec);
              self->Shutdown();
              return self->Finish();
            }
            self->last_heard_ = std::chrono::steady_clock::now();
            if (!self->refusal_.empty()) return self->Refuse();
            self->Read();
          }));
    }
    // Closes after the replies already queued are written (Stop: answered means delivered).
    void Close() {
      asio::post(strand_, [self = shared_from_this()] {
        self->closing_ = true;
        self->AnswerDraining();
        if (self->Idle()) self->Shutdown();
      });
    }

   private:
    tcp::socket& raw() { return tls_ ? tls_->next_layer() : sock_; }
    // One line per refused handshake (and the counter); the server serves on.
    void HandshakeFailed(const boost::system::error_code& ec) {
      if (Metrics* m = srv_->opt.handler.metrics) m->CountTlsHandshakeFailure();
      std::string why = ec.message();
      const char* hint = "";
      if (ec.category() == asio::error::get_ssl_category()) {
        const int r = ERR_GET_REASON(static_cast<unsigned long>(ec.value()));
        if (r == SSL_R_WRONG_VERSION_NUMBER || r == SSL_R_HTTP_REQUEST ||
            r == SSL_R_UNKNOWN_PROTOCOL || r == SSL_R_PACKET_LENGTH_TOO_LONG)
          hint = " (a plaintext client on the TLS port?)";
        else if (r == SSL_R_UNSUPPORTED_PROTOCOL || r == SSL_R_NO_PROTOCOLS_AVAILABLE)
          hint = " (TLS 1.2 or newer only)";
        else if (r == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE ||
                 r == SSL_R_CERTIFICATE_VERIFY_FAILED)
          hint = " (mutual TLS: a client certificate signed by --tls-client-ca is required)";
      } else if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) {
        hint = " (the client closed the connection during the handshake)";
      }
      srv_->LogTlsFailure("kvmanager: TLS handshake from " + peer_ + " refused: " + why + hint);
    }
    template <typename Buffer, typename Handler>
    void ReadSome(const Buffer& b, Handler&& h) {
      if (tls_)
        tls_->async_read_some(b, std::forward<Handler>(h));
      else
        sock_.async_read_some(b, std::forward<Handler>(h));
    }
    template <typename Buffer, typename Handler>
    void WriteAll(const Buffer& b, Handler&& h) {
      if (tls_)
        asio::async_write(*tls_, b, std::forward<Handler>(h));
      else
        asio::async_write(sock_, b, std::forward<Handler>(h));
    }
    struct Job {
      wire::Frame frame;
      std::chrono::steady_clock::time_point arrived;
      RequestClass cls;
      std::shared_ptr<TenantLoad> load;  // the place it holds in its tenant's max_in_flight
    };
    // Gives back the tenant place `j` holds.
    static void Release(Job& j) {
      if (j.load) j.load->in_flight.fetch_sub(1);
      j.load.reset();
    }
    static size_t Bytes(const Job& j) { return j.frame.proto.size() + j.frame.payload.size(); }
    void Read() {
      ReadSome(asio::buffer(buf_),
               asio::bind_executor(strand_, [self = shared_from_this()](
                                                boost::system::error_code ec, size_t n) {
                 if (ec) {  // EOF (or a reset): the client sends nothing more
                   if (self->ending_) {
                     self->Shutdown();
                   } else if (!self->closed_) {  // answer what it sent, then close (not at the
                     self->closing_ = true;      // liveness timeout: its socket and buffers
                     self->Pump();               // would be held that long)
                     if (self->Idle()) self->Shutdown();
                   }
                   return self->Finish();
                 }
                 if (self->closed_) return;
                 if (self->ending_) return self->Read();  // closing at a limit: dropped
                 self->last_heard_ = std::chrono::steady_clock::now();
                 Status st = self->decoder_.Feed({self->buf_.data(), n});
                 wire::Frame f;
                 while (self->decoder_.Next(&f)) {
                   ++self->frames_;
                   self->Admit(std::move(f));
                 }
                 self->Pump();
                 if (self->closed_) return;  // its replies overflowed the send queue
                 if (!st.ok()) {  // a protocol error: answer it, then close this connection only
                   wire::Error e;
                   e.set_code(static_cast<wire::ErrorCode>(st.code()));
                   e.set_message(st.message());
                   self->Send(
                       wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError), 0, e),
                       /*then_close=*/true);
                   return;
                 }
                 if (self->QueueFull()) {  // TCP pushes back until Pump has started enough
                   self->paused_ = true;
                   self->UnwatchFrame();
                   return;
                 }
                 self->WatchFrame();
                 self->Read();
               }));
    }
    // Queues a received request, or answers it Busy at once: the session's queue is full, or its
    // tenant is at its max_in_flight (the request holds a place of it until it is answered).
    void Admit(wire::Frame f) {
      if (closed_) return;
      const uint64_t id = f.header.request_id;
      const uint32_t max_queued = std::max(1u, srv_->opt.max_session_queued);
      if (pending_.size() >= max_queued)
        return Busy(id, Status::Busy("session has " + std::to_string(pending_.size()) +
                                     " requests queued, not started (max_session_queued " +
                                     std::to_string(max_queued) + ")"));
      std::shared_ptr<TenantLoad> load;
      if (load_) {
        if (Status st = TakePlace(*load_); !st.ok()) return Busy(id, st);
        load = load_;
      }
      const RequestClass c = RequestHandler::Classify(f);
      pending_.push_back({std::move(f), std::chrono::steady_clock::now(), c, std::move(load)});
      pending_bytes_ += Bytes(pending_.back());
    }
    void Busy(uint64_t id, const Status& st) {
      if (Metrics* m = srv_->opt.handler.metrics) m->CountError(st.code());
      wire::Error e;
      e.set_code(static_cast<wire::ErrorCode>(st.code()));
      e.set_message(st.message());
      Send(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError), id, e), false);
    }
    // The queued requests hold more than a frame's worth: reading waits.
    bool QueueFull() const { return pending_bytes_ > srv_->opt.handler.limits.max_frame_bytes; }
    // The session's tenant (for max_in_flight) once a Hello has succeeded. Called after a barrier
    // (Hello is one) completed: no request that writes state_ runs then.
    void RefreshTenant() {
      if (!state_.authenticated) return load_.reset();
      if (!load_ || load_->name != state_.tenant) load_ = srv_->LoadOf(state_.tenant);
    }
    // The frame read deadline: armed when a frame's first bytes arrived, re-armed for each new
    // frame, off while no frame is in progress (or reading is paused).
    void WatchFrame() {
      const uint32_t ms = srv_->opt.frame_read_timeout_ms;
      if (ms == 0) return;
      if (decoder_.buffered() == 0) return UnwatchFrame();
      if (frame_watched_ && watched_frame_ == frames_) return;  // the same frame: its deadline runs
      frame_watched_ = true;
      watched_frame_ = frames_;
      const uint64_t arm = ++frame_arm_;
      frame_timer_.expires_after(std::chrono::milliseconds(ms));
      frame_timer_.async_wait([self = shared_from_this(), arm, ms](boost::system::error_code ec) {
        if (ec || self->closed_ || arm != self->frame_arm_) return;
        const std::string why = "a frame did not complete within frame_read_timeout_ms " +
                                std::to_string(ms) + " (" +
                                std::to_string(self->decoder_.buffered()) + " bytes of it came)";
        self->srv_->LogLimit(kClosed,
                             "kvmanager: closed the connection from " + self->peer_ + ": " + why);
        if (Metrics* m = self->srv_->opt.handler.metrics)
          m->CountSessionClosed(CloseReason::kFrameTimeout);
        self->CloseWith(Status::TimedOut(why));
      });
    }
    void UnwatchFrame() {
      if (!frame_watched_) return;
      frame_watched_ = false;
      ++frame_arm_;
      frame_timer_.cancel();
    }
    // Answers `st` (an Error frame, id 0) and closes: once it is written the write side is shut
    // (the client reads the error, then EOF) and what the client still sends is read and dropped
    // until it closes, for at most three seconds in all.
    void CloseWith(const Status& st) {
      ending_ = true;
      DropPending();
      wire::Error e;
      e.set_code(static_cast<wire::ErrorCode>(st.code()));
      e.set_message(st.message());
      Send(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError), 0, e), false);
      ForceCloseAfter(3000);
    }
    void ForceCloseAfter(uint32_t ms) {
      frame_watched_ = false;
      const uint64_t arm = ++frame_arm_;
      frame_timer_.expires_after(std::chrono::milliseconds(ms));
      frame_timer_.async_wait([self = shared_from_this(), arm](boost::system::error_code ec) {
        if (ec || self->closed_ || arm != self->frame_arm_) return;
        self->Shutdown();
        self->Finish();
      });
    }
    // A refused connection (refusal_): the Error frame, then the write side closed and what the
    // client sent read and dropped until it closes (so that it reads the error rather than a
    // reset), for at most two seconds.
    void Refuse() {
      refusing_ = true;
      wire::Error e;
      e.set_code(wire::ERR_BUSY);
      e.set_message(refusal_);
      Send(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError), 0, e), false);
    }
    void DrainThenClose() {
      boost::system::error_code ig;
      raw().shutdown(tcp::socket::shutdown_send, ig);
      ForceCloseAfter(2000);
      Drain();
    }
    void Drain() {
      ReadSome(asio::buffer(buf_),
               asio::bind_executor(
                   strand_, [self = shared_from_this()](boost::system::error_code ec, size_t) {
                     if (self->closed_) return self->Finish();
                     if (ec) {
                       self->Shutdown();
                       return self->Finish();
                     }
                     self->Drain();
                   }));
    }
    // The requests received and not started are dropped (the session is closing at a limit).
    void DropPending() {
      for (Job& j : pending_) Release(j);
      pending_.clear();
      pending_bytes_ = 0;
    }
    // Liveness: close a session that has been silent (and idle) for session_timeout_ms.
    void Arm() {
      const uint32_t ms = srv_->opt.session_timeout_ms;
      if (ms == 0) return;
      timer_.expires_after(std::chrono::milliseconds(ms / 4 + 1));
      timer_.async_wait([self = shared_from_this(), ms](boost::system::error_code ec) {
        if (ec || self->closed_) return;
        const auto silent = std::chrono::steady_clock::now() - self->last_heard_;
        if (self->Idle() && silent > std::chrono::milliseconds(ms)) {
          self->Shutdown();
          return self->Finish();
        }
        self->Arm();
      });
    }
    void Shutdown() {
      closed_ = true;
      timer_.cancel();
      frame_timer_.cancel();
      boost::system::error_code ec;
      raw().shutdown(tcp::socket::shutdown_both, ec);
      raw().close(ec);
    }
    // Once the server is stopping no new request starts: every queued one is answered Unavailable
    // (draining), so no request goes unanswered.
    void AnswerDraining() {
      std::deque<Job> jobs;
      jobs.swap(pending_);
      pending_bytes_ = 0;
      for (Job& j : jobs) {
        Release(j);
        wire::Error e;
        e.set_code(wire::ERR_UNAVAILABLE);
        e.set_message("draining: the server is shutting down");
        Send(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError),
                               j.frame.header.request_id, e),
             false);
      }
    }
    // Starts every queued request its ordering class allows (handler.h RequestClass): the changes
    // of a sequence in order, its retrievals beside its Appends, barriers alone, heartbeats at
    // once. Replies go out as requests finish; the client matches them by request id.
    void Pump() {
      if (srv_->stopping) return AnswerDraining();
      if (closed_ || ending_) return DropPending();  // nobody to answer
      std::unordered_map<uint64_t, uint8_t> ahead;   // per sequence, of what waits before: 1 any,
                                                     // 2 a change other than an Append
      bool barrier_ahead = false;
      for (auto it = pending_.begin();
           it != pending_.end() && !barrier_running_ &&
           running_ < int(std::max(1u, srv_->opt.max_session_in_flight));) {
        const RequestClass& c = it->cls;
        bool start = false;
        switch (c.kind) {
          case RequestClass::kFree:
            start = true;
            break;
          case RequestClass::kBarrier:
            start = !barrier_ahead && running_ == 0 && it == pending_.begin();
            break;
          case RequestClass::kSequence: {
            const Lane& ln = lanes_[c.sequence];
            start = !barrier_ahead && ahead[c.sequence] == 0 && ln.changes == 0 &&
                    (c.append || ln.overtaking == 0);
            break;
          }
          case RequestClass::kOvertake: {
            const Lane& ln = lanes_[c.sequence];
            start = !barrier_ahead && !(ahead[c.sequence] & 2) && ln.non_appends == 0;
            break;
          }
        }
        if (start) {
          Job j = std::move(*it);
          it = pending_.erase(it);
          pending_bytes_ -= Bytes(j);
          Launch(std::move(j));
          continue;
        }
        if (c.kind == RequestClass::kBarrier) barrier_ahead = true;
        if (c.kind == RequestClass::kSequence || c.kind == RequestClass::kOvertake)
          ahead[c.sequence] |= 1 | (c.kind == RequestClass::kSequence && !c.append ? 2 : 0);
        ++it;
      }
      if (paused_ && !closed_ && !QueueFull()) {  // room again: read on
        paused_ = false;
        WatchFrame();
        Read();
      }
    }
    void Count(const RequestClass& c, int d) {
      running_ += d;
      if (c.kind == RequestClass::kBarrier) barrier_running_ = d > 0;
      if (c.kind != RequestClass::kSequence && c.kind != RequestClass::kOvertake) return;
      Lane& ln = lanes_[c.sequence];
      if (c.kind == RequestClass::kOvertake) ln.overtaking += d;
      if (c.kind == RequestClass::kSequence) ln.changes += d;
      if (c.kind == RequestClass::kSequence && !c.append) ln.non_appends += d;
      if (ln.changes == 0 && ln.overtaking == 0) lanes_.erase(c.sequence);
    }
    // Runs one request on the worker pool; its reply comes back to the strand (Complete).
    void Launch(Job j) {
      if (!j.load && load_) {  // received before its session's Hello had succeeded
        if (Status st = TakePlace(*load_); !st.ok()) return Busy(j.frame.header.request_id, st);
        j.load = load_;
      }
      if (srv_->in_flight.fetch_add(1) >= srv_->opt.max_in_flight) {
        srv_->in_flight.fetch_sub(1);
        Release(j);
        wire::Error e;
        e.set_code(wire::ERR_BUSY);
        e.set_message("server busy: too many requests in flight");
        Send(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError),
                               j.frame.header.request_id, e),
             false);
        return;
      }
      Count(j.cls, +1);
      auto job = std::make_shared<Job>(std::move(j));
      asio::post(*srv_->workers, [self = shared_from_this(), job] {
        const bool hello =
            job->frame.header.type == static_cast<uint16_t>(wire::MessageType::kHello);
        auto done = [self, cls = job->cls, hello, load = job->load](std::vector<uint8_t> reply) {
          // A refused Hello is answered late (Impl::AuthDelayMs), on a timer: no thread waits.
          const uint32_t delay =
              hello && self->state_.auth_failed ? self->srv_->AuthDelayMs(self->peer_ip_) : 0;
          asio::post(self->strand_, [self, cls, delay, load, reply = std::move(reply)]() mutable {
            if (delay == 0) return self->Complete(cls, load, std::move(reply));
            auto t = std::make_shared<asio::steady_timer>(self->strand_,
                                                          std::chrono::milliseconds(delay));
            t->async_wait(
                [self, cls, t, load, reply = std::move(reply)](boost::system::error_code) mutable {
                  self->Complete(cls, load, std::move(reply));
                });
          });
        };
        // A request that waited (behind this session's earlier ones, or for a worker thread)
        // past the deadline is answered TimedOut without running: its client gave up on it.
        const uint32_t deadline = self->srv_->opt.request_deadline_ms;
        const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::steady_clock::now() - job->arrived);
        if (deadline && waited.count() > deadline) {
          wire::Error e;
          e.set_code(wire::ERR_TIMED_OUT);
          e.set_message("request waited " + std::to_string(waited.count()) +
                        " ms in the queue, past the deadline of " + std::to_string(deadline) +
                        " ms");
          return done(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError),
                                        job->frame.header.request_id, e));
        }
        // An exception (bad_alloc, say) fails its request, never the server.
        try {
          self->srv_->handler->Handle(self->state_, job->frame, done);
        } catch (const std::exception& ex) {
          wire::Error e;
          e.set_code(wire::ERR_INTERNAL);
          e.set_message(std::string("request failed: ") + ex.what());
          done(wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError),
                                 job->frame.header.request_id, e));
        }
      });
    }
    void Complete(const RequestClass& c, const std::shared_ptr<TenantLoad>& load,
                  std::vector<uint8_t> reply) {
      Count(c, -1);
      if (load) load->in_flight.fetch_sub(1);
      if (c.kind == RequestClass::kBarrier) RefreshTenant();
      if (finished_ && running_ == 0) srv_->handler->Close(state_);
      if (!reply.empty()) Send(std::move(reply), false);
      if (srv_->in_flight.fetch_sub(1) == 1) srv_->idle.notify_all();
      Pump();
      if (closing_ && Idle()) Shutdown();
    }
    // Nothing running, queued or left to write.
    bool Idle() const { return running_ == 0 && pending_.empty() && out_.empty(); }
    void Send(std::vector<uint8_t> bytes, bool then_close) {
      if (closed_) return;  // the connection is gone: nothing to write to
      out_bytes_ += bytes.size();
      out_.push_back({std::move(bytes), then_close});
      if (out_.size() > 1 && out_bytes_ > srv_->opt.max_session_send_queue_bytes)
        return SendQueueFull();
      if (out_.size() == 1) Write();
    }
    // The client does not take its replies: close the session, free what it queued (the write in
    // flight keeps its buffer until it fails).
    void SendQueueFull() {
      srv_->LogLimit(kClosed,
                     "kvmanager: closed the session of " + peer_ +
                         (state_.authenticated && load_ ? " (tenant '" + load_->name + "')" : "") +
                         ": its unsent replies hold " + std::to_string(out_bytes_) +
                         " bytes, over max_session_send_queue_bytes " +
                         std::to_string(srv_->opt.max_session_send_queue_bytes) +
                         " (a client that does not read its replies?)");
      if (Metrics* m = srv_->opt.handler.metrics) m->CountSessionClosed(CloseReason::kSendQueue);
      DropPending();
      out_.erase(out_.begin() + 1, out_.end());
      out_bytes_ = out_.front().first.size();
      Shutdown();
      Finish();
    }
    void Write() {
      WriteAll(asio::buffer(out_.front().first),
               asio::bind_executor(
                   strand_, [self = shared_from_this()](boost::system::error_code ec, size_t) {
                     const bool close = self->out_.front().second;
                     self->out_bytes_ -= self->out_.front().first.size();
                     self->out_.pop_front();
                     if (!ec && self->refusing_ && self->out_.empty() && !self->closed_)
                       return self->DrainThenClose();
                     if (!ec && self->ending_ && self->out_.empty() && !self->closed_) {
                       boost::system::error_code ig;  // the Read loop drops the rest (CloseWith)
                       self->raw().shutdown(tcp::socket::shutdown_send, ig);
                       return;
                     }
                     if (ec || close || (self->closing_ && self->Idle())) {
                       self->Shutdown();
                       return self->Finish();
                     }
                     if (!self->out_.empty()) self->Write();
                   }));
    }
    void Finish() {
      if (!finished_) {
        finished_ = true;
        // The data-plane endpoint goes with the session (after the requests in flight, which use
        // it).
        if (running_ == 0) srv_->handler->Close(state_);
      }
      std::lock_guard<std::mutex> l(srv_->sessions_mu);
      if (address_held_) {  // its place among its address's connections
        address_held_ = false;
        auto it = srv_->per_address.find(peer_ip_);
        if (it != srv_->per_address.end() && --it->second == 0) srv_->per_address.erase(it);
      }
      srv_->sessions.erase(shared_from_this());
      if (srv_->sessions.empty()) srv_->sessions_gone.notify_all();
    }

    Impl* srv_;
    tcp::socket sock_;  // plaintext; with TLS the socket is tls_'s next layer
    std::string peer_ip_, peer_;
    asio::strand<asio::io_context::executor_type> strand_;
    asio::steady_timer timer_;
    asio::steady_timer frame_timer_;  // the frame read deadline; the last second of a close
    uint64_t frame_arm_ = 0;          // the timer's current wait (older ones are stale)
    bool frame_watched_ = false;
    uint64_t frames_ = 0, watched_frame_ = 0;  // frames received; the one the deadline is for
    bool refusing_ = false;
    bool ending_ = false;  // closing at a limit (CloseWith): what arrives is dropped
    bool paused_ = false;  // reading waits for the queue (QueueFull)
    size_t pending_bytes_ = 0;
    uint64_t out_bytes_ = 0;
    std::shared_ptr<TenantLoad> load_;  // the authenticated tenant's
    std::chrono::steady_clock::time_point last_heard_ = std::chrono::steady_clock::now();
    bool closed_ = false;
    bool finished_ = false;
    wire::FrameDecoder decoder_;
    const std::string refusal_;
    bool address_held_;
    SessionState state_;
    std::array<uint8_t, 64 * 1024> buf_;
    std::deque<Job> pending_;  // received, not started
    // Requests running, of which per sequence: its changes (Appends and others), the changes that
    // are not Appends, and overtaking retrievals.
    struct Lane {
      int changes = 0, non_appends = 0, overtaking = 0;
    };
    std::unordered_map<uint64_t, Lane> lanes_;
    int running_ = 0;
    bool barrier_running_ = false;
    bool closing_ = false;
    std::deque<std::pair<std::vector<uint8_t>, bool>> out_;
    std::shared_ptr<ssl::context> tls_ctx_;  // the context this session's handshake used
    std::unique_ptr<TlsStream> tls_;
  };

  void Accept() {
    acceptor->async_accept([this](boost::system::error_code ec, tcp::socket sock) {
      if (ec) {
        if (stopping || !acceptor->is_open() || ec == asio::error::operation_aborted)
          return;  // closed by Stop
        // Out of descriptors (a connection flood) or the like: the listener stays; try again.
        accept_retry = std::make_unique<asio::steady_timer>(io, std::chrono::milliseconds(50));
        accept_retry->async_wait([this](boost::system::error_code e) {
          if (!e && !stopping) Accept();
        });
        return;
      }
      sock.set_option(tcp::no_delay(true), ec);  // replies are small and latency-bound
      const auto ep = sock.remote_endpoint(ec);
      const std::string ip = ec ? std::string() : ep.address().to_string();
      std::string refusal;
      bool counted = false;
      {
        std::lock_guard<std::mutex> l(sessions_mu);
        const uint32_t max = opt.max_connections_per_address;
        if (max && !ip.empty()) {
          uint32_t& n = per_address[ip];
          if (n >= max)
            refusal = "too many connections from " + ip + ": " + std::to_string(n) +
                      " open (max_connections_per_address " + std::to_string(max) + ")";
          else
            counted = ++n > 0;
        }
      }
      if (!refusal.empty()) {
        if (Metrics* m = opt.handler.metrics) {
          m->CountConnectionRefused(ConnectionLimit::kPerAddress);
          m->CountError(StatusCode::kBusy);
        }
        LogLimit(kRefused, "kvmanager: refused a connection: " + refusal);
      }
      auto s = std::make_shared<Session>(this, std::move(sock),
                                         opt.tls ? opt.tls->Current() : nullptr, refusal, counted);
      {
        std::lock_guard<std::mutex> l(sessions_mu);
        sessions.insert(s);
      }
      s->Start();
      Accept();
    });
  }
};

Result<std::unique_ptr<Server>> Server::Start(const ServerOptions& o, store::BlockStore* store) {
  auto impl = std::make_unique<Impl>();
  impl->opt = o;
  impl->store = store;
  impl->acceptor = std::make_unique<tcp::acceptor>(impl->io);
  boost::system::error_code ec;
  if (o.listen_fd >= 0) {  // bound and listening already (by the caller): adopt it
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(o.listen_fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0 ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
      ::close(o.listen_fd);
      return Status::InvalidArgument("listen_fd " + std::to_string(o.listen_fd) +
                                     " is not a bound TCP socket");
    }
    impl->acceptor->assign(ss.ss_family == AF_INET6 ? tcp::v6() : tcp::v4(), o.listen_fd, ec);
    if (ec) {
      ::close(o.listen_fd);
      return Status::InvalidArgument("listen_fd: " + ec.message());
    }
  } else {
    KVM_ASSIGN_OR_RETURN(auto hp, wire::ParseHostPort(o.listen));
    const auto addr = asio::ip::make_address(hp.first, ec);
    if (ec) return Status::InvalidArgument("listen address '" + hp.first + "': " + ec.message());
    const tcp::endpoint ep(addr, hp.second);
    impl->acceptor->open(ep.protocol(), ec);
    if (!ec) impl->acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) impl->acceptor->bind(ep, ec);
    if (!ec) impl->acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return Status::Unavailable("cannot listen on " + o.listen + ": " + ec.message());
  }
  impl->handler = std::make_unique<RequestHandler>(store, o.handler);
  impl->SetTenantLimits(o.handler.tenants);
  impl->workers = std::make_unique<asio::thread_pool>(std::max(1u, o.worker_threads));
  impl->Accept();
  for (uint32_t i = 0; i < std::max(1u, o.io_threads); ++i)
    impl->io_threads.emplace_back([p = impl.get()] {
      auto guard = asio::make_work_guard(p->io);
      p->io.run();
    });
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() { Stop(0); }

uint16_t Server::port() const {
  boost::system::error_code ec;
  return impl_->acceptor->local_endpoint(ec).port();
}

std::string Server::address() const {
  boost::system::error_code ec;
  const auto ep = impl_->acceptor->local_endpoint(ec);
  return (ep.address().is_v6() ? "[" + ep.address().to_string() + "]" : ep.address().to_string()) +
         ":" + std::to_string(ep.port());
}

Result<uint64_t> Server::ExpireLeases() { return impl_->handler->ExpireLeases(); }

void Server::SetTenants(std::vector<TenantConfig> tenants) {
  impl_->SetTenantLimits(tenants);
  impl_->handler->SetTenants(std::move(tenants));
}

size_t Server::sessions() const {
  std::lock_guard<std::mutex> l(impl_->sessions_mu);
  return impl_->sessions.size();
}

void Server::Stop(int drain_ms) {
  if (impl_->stopping.exchange(true)) return;
  asio::post(impl_->io, [this] {
    boost::system::error_code ec;
    impl_->acceptor->close(ec);
  });
  {  // drain: the requests in flight finish and are answered
    std::unique_lock<std::mutex> l(impl_->mu);
    impl_->idle.wait_for(l, std::chrono::milliseconds(drain_ms),
                         [this] { return impl_->in_flight.load() == 0; });
  }
  std::vector<std::shared_ptr<Impl::Session>> all;
  {
    std::lock_guard<std::mutex> l(impl_->sessions_mu);
    all.assign(impl_->sessions.begin(), impl_->sessions.end());
  }
  for (auto& s : all) s->Close();
  impl_->workers->join();
  {  // every session writes what it still owes (replies, draining refusals), then closes
    std::unique_lock<std::mutex> l(impl_->sessions_mu);
    impl_->sessions_gone.wait_for(l, std::chrono::milliseconds(std::max(drain_ms, 100)),
                                  [this] { return impl_->sessions.empty(); });
  }
  impl_->io.stop();
  for (auto& t : impl_->io_threads) t.join();
}

}  // namespace kvm::server
