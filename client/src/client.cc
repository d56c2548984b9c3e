#include "client/client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "proto/kvm.pb.h"

namespace kvm::client {
namespace {

using Clock = std::chrono::steady_clock;

Result<int> Dial(const std::string& address) {
  KVM_ASSIGN_OR_RETURN(auto hp, wire::ParseHostPort(address));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(hp.first.c_str(), std::to_string(hp.second).c_str(), &hints, &res);
      rc != 0)
    return Status::InvalidArgument("address '" + address + "': " + gai_strerror(rc));
  std::string err = "no address";
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    err = std::strerror(errno);
    ::close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) return Status::Unavailable("cannot connect to " + address + ": " + err);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

// The OpenSSL error queue of this thread in one line ("" when empty).
std::string SslErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += (out.empty() ? "" : "; ") + std::string(buf);
  }
  return out;
}

}  // namespace

struct Client::Impl {
  ConnectOptions opt;
  int fd = -1;
  // TLS (opt.tls_ca set): the socket is non-blocking and every SSL_* call is under ssl_mu (the
  // heartbeat thread writes while the driving thread reads).
  SSL_CTX* ssl_ctx = nullptr;
  SSL* ssl = nullptr;
  std::mutex ssl_mu;
  std::mutex write_mu;  // the driving thread and the heartbeat thread both write
  wire::FrameDecoder decoder;
  uint64_t next_id = 1;
  uint64_t session_id = 0;
  uint32_t heartbeat_ms = 1000;
  uint64_t max_frame = 0;
  bool data_plane_active = false;
  std::atomic<int64_t> last_write_ns{0};
  std::atomic<uint64_t> bytes_sent{0};
  // Requests whose replies have not been read yet, by request id (replies come in any order).
  struct Pending {
    std::function<void(const Result<wire::Frame>&)> on_reply;
    bool heartbeat = false;
    bool optional = false;  // no reply on success (a data-plane retrieval)
  };
  std::unordered_map<uint64_t, Pending> pending;
  size_t required = 0;    // pending entries that are not optional (Flush waits for these)
  std::mutex pending_mu;  // the heartbeat thread adds its requests too
  Status async_error;
  // Heartbeats.
  std::thread beat;
  std::mutex beat_mu;
  std::condition_variable beat_cv;
  bool stop = false;

  ~Impl() { Close(); }

  void Close() {
    {
      std::lock_guard<std::mutex> l(beat_mu);
      stop = true;
    }
    beat_cv.notify_all();
    if (beat.joinable()) beat.join();
    if (ssl) {
      (void)SSL_shutdown(ssl);  // close_notify, best effort (non-blocking)
      SSL_free(ssl);
      ssl = nullptr;
    }
    if (ssl_ctx) SSL_CTX_free(ssl_ctx);
    ssl_ctx = nullptr;
    ERR_clear_error();
    if (fd >= 0) ::close(fd);
    fd = -1;
    std::lock_guard<std::mutex> l(pending_mu);
    pending.clear();
    required = 0;
    decoder = wire::FrameDecoder();
  }

  // REQUIRES: write_mu held.
  Status WriteAll(const std::vector<uint8_t>& bytes) {
    if (fd < 0) return Status::Unavailable("not connected");
    size_t off = 0;
    while (ssl && off < bytes.size()) {
      int r, e = SSL_ERROR_NONE;
      std::string errs;
      {
        std::lock_guard<std::mutex> l(ssl_mu);
        ERR_clear_error();
        r = SSL_write(ssl, bytes.data() + off, int(std::min<size_t>(bytes.size() - off, INT_MAX)));
        if (r <= 0) e = SSL_get_error(ssl, r);
        if (r <= 0 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) errs = SslErrors();
      }
      if (r > 0) {
        off += size_t(r);
      } else if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
        pollfd p{fd, short(e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
        (void)::poll(&p, 1, 100);
      } else {
        return Status::Unavailable("connection lost while sending (TLS" +
                                   (errs.empty() ? std::string() : ": " + errs) + ")");
      }
    }
    while (off < bytes.size()) {
      const ssize_t n = ::send(fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        return Status::Unavailable(std::string("connection lost while sending: ") +
                                   std::strerror(errno));
      off += size_t(n);
    }
    last_write_ns = Clock::now().time_since_epoch().count();
    bytes_sent += bytes.size();
    return Status::Ok();
  }

  Result<uint64_t> Send(wire::MessageType type, const google::protobuf::MessageLite& m,
                        std::span<const uint8_t> payload,
                        std::function<void(const Result<wire::Frame>&)> on_reply, bool hb,
                        bool optional = false) {
    std::lock_guard<std::mutex> w(write_mu);
    uint64_t id;
    {
      std::lock_guard<std::mutex> l(pending_mu);
      id = next_id++;
      pending[id] = {std::move(on_reply), hb, optional};
      required += !optional;
    }
    Status st = WriteAll(wire::EncodeFrame(static_cast<uint16_t>(type), id, m, payload));
    if (!st.ok()) return st;
    return id;
  }

  // Reads one frame (deadline); Unavailable when the connection closed. With `peek`, returns
  // TryAgain instead of waiting when no whole frame is buffered or readable now.
  Result<wire::Frame> ReadFrame(Clock::time_point deadline, bool peek = false) {
    wire::Frame f;
    while (!decoder.Next(&f)) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0 && !peek) return Status::TimedOut("no reply within the deadline");
      if (ssl) {  // what OpenSSL has buffered first; poll only when it wants more
        uint8_t buf[64 * 1024];
        int r, e = SSL_ERROR_NONE;
        std::string errs;
        {
          std::lock_guard<std::mutex> l(ssl_mu);
          ERR_clear_error();
          r = SSL_read(ssl, buf, sizeof buf);
          if (r <= 0) e = SSL_get_error(ssl, r);
          if (r <= 0 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) errs = SslErrors();
        }
        if (r > 0) {
          KVM_RETURN_IF_ERROR(decoder.Feed({buf, size_t(r)}));
          continue;
        }
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
          if (peek) return Status::TryAgain("nothing to read");
          pollfd p{fd, short(e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
          (void)::poll(&p, 1, int(std::min<int64_t>(left, 1000)));
          continue;
        }
        return Status::Unavailable("the server closed the connection" +
                                   (errs.empty() ? std::string() : " (TLS: " + errs + ")"));
      }
      pollfd p{fd, POLLIN, 0};
      const int r = ::poll(&p, 1, peek ? 0 : int(std::min<int64_t>(left, 1000)));
      if (r < 0 && errno == EINTR) continue;
      if (r == 0 && peek) return Status::TryAgain("nothing to read");
      if (r <= 0) continue;
      uint8_t buf[256 * 1024];
      const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Status::Unavailable("the server closed the connection");
      KVM_RETURN_IF_ERROR(decoder.Feed({buf, size_t(n)}));
    }
    return f;
  }

  static Result<wire::Frame> AsResult(wire::Frame f) {
    if (f.header.type == static_cast<uint16_t>(wire::MessageType::kError)) {
      wire::Error e;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &e));
      return wire::StatusFromWire(e.code(), e.message());
    }
    return f;
  }

  // Hands a reply to its request: returns it when it is `id`'s, else runs its handler (or keeps
  // its failure for Flush). A reply to no pending request (forgotten, or a protocol error with id
  // 0) is dropped; a connection-level error (id 0) closes the channel.
  std::optional<Result<wire::Frame>> Dispatch(wire::Frame f, uint64_t id) {
    const uint64_t rid = f.header.request_id;
    Pending p;
    bool refused = false;  // the server refused the stream (id 0): every pending request fails
    {
      std::lock_guard<std::mutex> l(pending_mu);
      auto it = pending.find(rid);
      if (it == pending.end()) {
        if (rid != 0) return std::nullopt;
        refused = true;
      } else {
        p = std::move(it->second);
        required -= !p.optional;
        pending.erase(it);
      }
    }
    if (refused) {  // Close takes pending_mu itself: not under it
      Result<wire::Frame> r = AsResult(std::move(f));
      Close();
      return r.ok() ? Result<wire::Frame>(Status::Unavailable("connection closed")) : r;
    }
    Result<wire::Frame> r = AsResult(std::move(f));
    if (rid == id) return r;
    if (p.on_reply) {
      p.on_reply(r);
    } else if (!r.ok() && !p.heartbeat && async_error.ok()) {
      async_error = r.status();
    }
    return std::nullopt;
  }

  // Reads replies until the one for `id` (0: until no required reply is pending), dispatching the
  // others on the way.
  Result<wire::Frame> ReadUntil(uint64_t id) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(opt.deadline_ms);
    for (;;) {
      {
        std::lock_guard<std::mutex> l(pending_mu);
        if (id == 0 && required == 0) return wire::Frame{};
        if (id != 0 && !pending.count(id))
          return Status::Internal("reply for request " + std::to_string(id) + " lost");
      }
      auto f = ReadFrame(deadline);
      if (!f.ok()) {
        if (f.status().code() == StatusCode::kUnavailable) Close();
        return f.status();
      }
      if (auto r = Dispatch(std::move(*f), id)) return std::move(*r);
    }
  }

  // Reads whatever replies are here now (dispatching them); Unavailable when the connection closed.
  Status ReadAvailable() {
    for (;;) {
      auto f = ReadFrame(Clock::now(), /*peek=*/true);
      if (f.status().IsTryAgain()) return Status::Ok();
      if (!f.ok()) {
        if (f.status().code() == StatusCode::kUnavailable) Close();
        return f.status();
      }
      if (auto r = Dispatch(std::move(*f), 0); r && !r->ok()) return r->status();
    }
  }

  Status Hello() {
    wire::Hello h;
    h.set_protocol_version(wire::kProtocolVersion);
    h.set_tenant(opt.tenant);
    h.set_auth_token(opt.token);
    h.set_client_name(opt.client_name);
    if (opt.data_plane) {
      const auto a = opt.data_plane->address();
      h.set_ucx_worker_address(std::string(a.begin(), a.end()));
    }
    KVM_ASSIGN_OR_RETURN(uint64_t id, Send(wire::MessageType::kHello, h, {}, {}, false));
    KVM_ASSIGN_OR_RETURN(wire::Frame f, ReadUntil(id));
    wire::HelloReply r;
    KVM_RETURN_IF_ERROR(wire::ParseProto(f, &r));
    session_id = r.session_id();
    heartbeat_ms = r.heartbeat_interval_ms() ? r.heartbeat_interval_ms() : 1000;
    max_frame = r.max_frame_bytes();
    data_plane_active = opt.data_plane && !r.ucx_worker_address().empty();
    return Status::Ok();
  }

  // The TLS handshake on the connected fd (opt.tls_*), within the deadline. REQUIRES: ssl null.
  Status StartTls() {
    const auto deadline = Clock::now() + std::chrono::milliseconds(opt.deadline_ms);
    KVM_ASSIGN_OR_RETURN(auto hp, wire::ParseHostPort(opt.address));
    ERR_clear_error();
    ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (!ssl_ctx) return Status::Internal("TLS: SSL_CTX_new: " + SslErrors());
    SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ssl_ctx, opt.tls_ca.c_str(), nullptr) != 1)
      return Status::InvalidArgument("tls_ca '" + opt.tls_ca + "': " + SslErrors());
    SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, nullptr);
    if (opt.tls_cert.empty() != opt.tls_key.empty())
      return Status::InvalidArgument("tls_cert and tls_key go together");
    if (!opt.tls_cert.empty()) {
      if (SSL_CTX_use_certificate_chain_file(ssl_ctx, opt.tls_cert.c_str()) != 1)
        return Status::InvalidArgument("tls_cert '" + opt.tls_cert + "': " + SslErrors());
      if (SSL_CTX_use_PrivateKey_file(ssl_ctx, opt.tls_key.c_str(), SSL_FILETYPE_PEM) != 1)
        return Status::InvalidArgument("tls_key '" + opt.tls_key + "': " + SslErrors());
      if (SSL_CTX_check_private_key(ssl_ctx) != 1)
        return Status::InvalidArgument("tls_key '" + opt.tls_key + "' does not match tls_cert '" +
                                       opt.tls_cert + "'");
    }
    ssl = SSL_new(ssl_ctx);
    if (!ssl || SSL_set_fd(ssl, fd) != 1) return Status::Internal("TLS: SSL_new: " + SslErrors());
    // The server's name: the host of the address (an IP address against the IP SANs).
    in6_addr a6;
    in_addr a4;
    const std::string& host = hp.first;
    if (inet_pton(AF_INET, host.c_str(), &a4) == 1 || inet_pton(AF_INET6, host.c_str(), &a6) == 1) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host.c_str());
    } else {
      SSL_set_tlsext_host_name(ssl, host.c_str());
      SSL_set1_host(ssl, host.c_str());
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    for (;;) {
      ERR_clear_error();
      const int r = SSL_connect(ssl);
      if (r == 1) return Status::Ok();
      const int e = SSL_get_error(ssl, r);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0) return Status::TimedOut("TLS handshake with " + opt.address + " timed out");
        pollfd p{fd, short(e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
        (void)::poll(&p, 1, int(std::min<int64_t>(left, 1000)));
        continue;
      }
      const long v = SSL_get_verify_result(ssl);
      std::string why = v != X509_V_OK
                            ? std::string("server certificate: ") + X509_verify_cert_error_string(v)
                            : SslErrors();
      if (why.empty()) why = "the server closed the connection";
      if (why.find("wrong version number") != std::string::npos ||
          why.find("packet length too long") != std::string::npos)
        why += " (is the server's control port plaintext?)";
      return Status::Unavailable("TLS handshake with " + opt.address + " failed: " + why);
    }
  }

  Status Open() {
    KVM_ASSIGN_OR_RETURN(fd, Dial(opt.address));
    stop = false;
    Status st = opt.tls_ca.empty() ? Status::Ok() : StartTls();
    if (st.ok()) st = Hello();
    if (!st.ok()) {
      Close();
      return st;
    }
    if (opt.heartbeats) beat = std::thread([this] { Beat(); });
    return Status::Ok();
  }

  // Sends a Heartbeat whenever nothing was written for an interval (replies are read by the
  // driving thread with the others).
  void Beat() {
    std::unique_lock<std::mutex> l(beat_mu);
    while (!stop) {
      beat_cv.wait_for(l, std::chrono::milliseconds(heartbeat_ms / 2 + 1));
      if (stop) break;
      const int64_t now = Clock::now().time_since_epoch().count();
      if (now - last_write_ns.load() < int64_t(heartbeat_ms) * 1000000) continue;
      wire::Heartbeat h;
      h.set_client_time_ns(uint64_t(now));
      (void)Send(wire::MessageType::kHeartbeat, h, {}, {}, true);
    }
  }
};

Result<std::unique_ptr<Client>> Client::Connect(const ConnectOptions& o) {
  auto impl = std::make_unique<Impl>();
  impl->opt = o;
  KVM_RETURN_IF_ERROR(impl->Open());
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

Result<wire::Frame> Client::Call(wire::MessageType type, const google::protobuf::MessageLite& m,
                                 std::span<const uint8_t> payload) {
  if (impl_->fd < 0) return Status::Unavailable("not connected (Reconnect)");
  KVM_ASSIGN_OR_RETURN(uint64_t id, impl_->Send(type, m, payload, {}, false));
  return impl_->ReadUntil(id);
}

Status Client::CallAsync(wire::MessageType type, const google::protobuf::MessageLite& m,
                         std::span<const uint8_t> payload,
                         std::function<void(const Result<wire::Frame>&)> on_reply) {
  if (impl_->fd < 0) return Status::Unavailable("not connected (Reconnect)");
  return impl_->Send(type, m, payload, std::move(on_reply), false).status();
}

Result<uint64_t> Client::SendOptionalReply(
    wire::MessageType type, const google::protobuf::MessageLite& m,
    std::span<const uint8_t> payload, std::function<void(const Result<wire::Frame>&)> on_reply) {
  if (impl_->fd < 0) return Status::Unavailable("not connected (Reconnect)");
  return impl_->Send(type, m, payload, std::move(on_reply), false, /*optional=*/true);
}

Status Client::Await(const std::function<bool()>& done) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(impl_->opt.deadline_ms);
  transport::Transport* dp = data_plane();
  for (;;) {
    if (impl_->fd < 0) return Status::Unavailable("not connected (Reconnect)");
    KVM_RETURN_IF_ERROR(impl_->ReadAvailable());
    if (done()) return Status::Ok();
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return Status::TimedOut("no reply within the deadline");
    if (dp) {  // the data plane's events, or the control socket readable
      Status w = dp->WaitFor(done, int(left), impl_->fd);
      if (!w.ok() && !w.IsTimedOut()) return w;
    } else {
      pollfd p{impl_->fd, POLLIN, 0};
      (void)::poll(&p, 1, int(std::min<int64_t>(left, 1000)));
    }
  }
}

Status Client::Poll() {
  if (impl_->fd < 0) return Status::Unavailable("not connected (Reconnect)");
  return impl_->ReadAvailable();
}

void Client::Forget(uint64_t id) {
  std::lock_guard<std::mutex> l(impl_->pending_mu);
  auto it = impl_->pending.find(id);
  if (it == impl_->pending.end()) return;
  impl_->required -= !it->second.optional;
  impl_->pending.erase(it);
}

Status Client::Flush() {
  if (impl_->fd >= 0) KVM_RETURN_IF_ERROR(impl_->ReadUntil(0).status());
  Status s = impl_->async_error;
  impl_->async_error = Status::Ok();
  return s;
}

Status Client::Reconnect() {
  impl_->Close();
  impl_->async_error = Status::Ok();
  return impl_->Open();
}

Result<uint64_t> Client::PrefixLookup(const ModelShape& shape, uint32_t block_size,
                                      std::span<const uint32_t> tokens) {
  wire::PrefixLookup m;
  wire::ToWire(shape, m.mutable_shape());
  m.set_block_size(block_size);
  for (uint32_t t : tokens) m.add_token_ids(t);
  KVM_ASSIGN_OR_RETURN(wire::Frame f, Call(wire::MessageType::kPrefixLookup, m));
  wire::PrefixLookupReply r;
  KVM_RETURN_IF_ERROR(wire::ParseProto(f, &r));
  return r.matched_tokens();
}

Status Client::Truncate(uint64_t sequence_id, uint64_t length) {
  wire::Truncate m;
  m.set_sequence_id(sequence_id);
  m.set_length(length);
  return Call(wire::MessageType::kTruncate, m).status();
}

Status Client::DeleteSequence(uint64_t sequence_id) {
  wire::DeleteSequence m;
  m.set_sequence_id(sequence_id);
  return Call(wire::MessageType::kDeleteSequence, m).status();
}

uint64_t Client::session_id() const { return impl_->session_id; }
uint64_t Client::bytes_sent() const { return impl_->bytes_sent; }
transport::Transport* Client::data_plane() const {
  return impl_->data_plane_active ? impl_->opt.data_plane : nullptr;
}
uint32_t Client::heartbeat_interval_ms() const { return impl_->heartbeat_ms; }
uint64_t Client::max_frame_bytes() const { return impl_->max_frame; }
const ConnectOptions& Client::options() const { return impl_->opt; }

}  // namespace kvm::client
