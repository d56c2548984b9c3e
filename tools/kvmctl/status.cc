// kvmctl status: the health and the numbers of each kvmanager shard, once or redrawn every second.
//
// Per shard, in parallel, each step within --timeout-ms (a shard that does not answer is reported
// down when its time is up, never waited on longer):
//   control port  a TCP connect; with --tenant/--token-file also Hello and a Heartbeat answered.
//                 That is all the control port is used for (`up`). With --tls-ca over TLS (the
//                 client library), --tls-cert/--tls-key for mutual TLS.
//   admin port    GET /readyz (`ready`), /status (version, uptime, degraded, sequences) and
//                 /metrics (tiers, dropped mass, bandwidth saved), parsed here (prom_text.h).
//                 --admin-tls: over HTTPS, the certificate verified against --tls-ca.
// Rates (retrievals/s, errors/s) need two reads of /metrics: the one-shot form reads it twice about
// 1 s apart; --watch uses consecutive frames. A rate that cannot be computed is null / "-".
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client_flags.h"
#include "commands.h"
#include "flags.h"
#include "prom_text.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"

namespace kvm::tools {
namespace {
using Clock = std::chrono::steady_clock;
using json = nlohmann::ordered_json;  // keys in the order written: "server" first

const char* const kTiers[] = {"gpu", "host", "disk"};
const char* const kKinds[] = {"exact", "bound", "audit"};

struct Shard {
  std::string server;  // HOST:PORT of the control plane, as given
  std::string admin;   // HOST:PORT of the admin HTTP server
  std::string server_host, admin_host;
  uint16_t server_port = 0, admin_port = 0;
};

struct Options {
  std::vector<Shard> shards;
  bool watch = false;
  bool json = false;
  int timeout_ms = 2000;
  std::string tenant, token;  // empty: the control check is a TCP connect only
  // TLS on the control port (--tls-ca, --tls-cert/--tls-key): the check is then a TLS handshake
  // and Hello (a refused token counts as up without a tenant: the server answered).
  std::string tls_ca, tls_cert, tls_key;
  bool admin_tls = false;  // --admin-tls: the admin port over HTTPS, verified against tls_ca
};

// ---- Sockets with a deadline ----

int MsLeft(Clock::time_point deadline) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return ms < 0 ? 0 : static_cast<int>(ms);
}

// Waits for `events` on fd until the deadline; false (and *err) on timeout or error.
bool WaitFd(int fd, short events, Clock::time_point deadline, std::string* err) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int r = poll(&p, 1, MsLeft(deadline));
    if (r > 0) return true;
    if (r == 0) return *err = "timed out", false;
    if (errno != EINTR) return *err = std::strerror(errno), false;
  }
}

// A connected non-blocking TCP socket, or -1 and *err. The name is resolved with getaddrinfo
// (its own timeouts; the caller bounds the whole probe).
int Connect(const std::string& host, uint16_t port, Clock::time_point deadline, std::string* err) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int g = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (g != 0) return *err = std::string("cannot resolve: ") + gai_strerror(g), -1;
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    if (errno == EINPROGRESS && WaitFd(fd, POLLOUT, deadline, err)) {
      int so = 0;
      socklen_t len = sizeof so;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &len);
      if (so == 0) break;
      *err = std::strerror(so);
    } else if (errno != EINPROGRESS) {
      *err = std::strerror(errno);
    }
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd >= 0)
    err->clear();  // an earlier address may have failed first
  else if (err->empty())
    *err = "no address";
  return fd;
}

bool SendAll(int fd, const void* data, size_t n, Clock::time_point deadline, std::string* err) {
  const char* p = static_cast<const char*>(data);
  while (n) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= size_t(w);
    } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!WaitFd(fd, POLLOUT, deadline, err)) return false;
    } else {
      return *err = std::strerror(errno), false;
    }
  }
  return true;
}

// Reads what is there (waiting until the deadline for something): >0 bytes, 0 at EOF, -1 error.
ssize_t RecvSome(int fd, char* buf, size_t n, Clock::time_point deadline, std::string* err) {
  for (;;) {
    const ssize_t r = recv(fd, buf, n, 0);
    if (r >= 0) return r;
    if (errno != EAGAIN && errno != EINTR) return *err = std::strerror(errno), -1;
    if (!WaitFd(fd, POLLIN, deadline, err)) return -1;
  }
}

struct HttpReply {
  int code = 0;
  std::string body;
};

// One OpenSSL call on a non-blocking fd, repeated until it is done or the deadline: its result
// (> 0), 0 at a clean end of the stream, -1 and *err on failure.
template <typename Op>
int SslIo(SSL* ssl, int fd, Op op, Clock::time_point deadline, std::string* err) {
  for (;;) {
    ERR_clear_error();
    const int r = op();
    if (r > 0) return r;
    const int e = SSL_get_error(ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
      if (!WaitFd(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline, err)) return -1;
      continue;
    }
    if (e == SSL_ERROR_ZERO_RETURN) return 0;
    const long v = SSL_get_verify_result(ssl);
    char buf[256] = "";
    ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
    *err = v != X509_V_OK
               ? std::string("TLS: server certificate: ") + X509_verify_cert_error_string(v)
               : std::string("TLS: ") + (buf[0] ? buf : "the connection closed");
    return -1;
  }
}

// The request over TLS on the connected fd (--admin-tls): the admin certificate verified against
// --tls-ca and the admin host (IP SAN or DNS name). Appends the reply to *raw.
bool HttpsExchange(int fd, const Shard& s, const Options& o, const std::string& req,
                   std::string* raw, Clock::time_point deadline, std::string* err) {
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()),
                                                        SSL_CTX_free);
  if (!ctx) return *err = "TLS: SSL_CTX_new failed", false;
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_options(ctx.get(), SSL_OP_IGNORE_UNEXPECTED_EOF);
  if (SSL_CTX_load_verify_locations(ctx.get(), o.tls_ca.c_str(), nullptr) != 1)
    return *err = "TLS: cannot read --tls-ca '" + o.tls_ca + "'", false;
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  std::unique_ptr<SSL, decltype(&SSL_free)> ssl(SSL_new(ctx.get()), SSL_free);
  if (!ssl || SSL_set_fd(ssl.get(), fd) != 1) return *err = "TLS: SSL_new failed", false;
  in6_addr a6;
  in_addr a4;
  if (inet_pton(AF_INET, s.admin_host.c_str(), &a4) == 1 ||
      inet_pton(AF_INET6, s.admin_host.c_str(), &a6) == 1) {
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl.get()), s.admin_host.c_str());
  } else {
    SSL_set_tlsext_host_name(ssl.get(), s.admin_host.c_str());
    SSL_set1_host(ssl.get(), s.admin_host.c_str());
  }
  SSL* c = ssl.get();
  if (SslIo(
          c, fd, [&] { return SSL_connect(c); }, deadline, err) <= 0)
    return false;
  for (size_t off = 0; off < req.size();) {
    const int w = SslIo(
        c, fd, [&] { return SSL_write(c, req.data() + off, int(req.size() - off)); }, deadline,
        err);
    if (w <= 0) return false;
    off += size_t(w);
  }
  char buf[16384];
  for (;;) {
    const int r = SslIo(
        c, fd, [&] { return SSL_read(c, buf, int(sizeof buf)); }, deadline, err);
    if (r < 0) return false;
    if (r == 0) return true;
    raw->append(buf, size_t(r));
  }
}

// GET path over HTTP/1.0 (the admin server closes after each reply); HTTPS with --admin-tls.
std::optional<HttpReply> HttpGet(const Shard& s, const Options& o, const std::string& path,
                                 Clock::time_point deadline, std::string* err) {
  const int fd = Connect(s.admin_host, s.admin_port, deadline, err);
  if (fd < 0) return std::nullopt;
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + s.admin_host +
                          "\r\nUser-Agent: kvmctl-status\r\nConnection: close\r\n\r\n";
  std::string raw;
  bool ok = true;
  if (o.admin_tls) {
    ok = HttpsExchange(fd, s, o, req, &raw, deadline, err);
  } else {
    ok = SendAll(fd, req.data(), req.size(), deadline, err);
    char buf[16384];
    while (ok) {
      const ssize_t r = RecvSome(fd, buf, sizeof buf, deadline, err);
      if (r < 0) ok = false;
      if (r <= 0) break;
      raw.append(buf, size_t(r));
    }
  }
  close(fd);
  if (!ok) return std::nullopt;
  const size_t eoh = raw.find("\r\n\r\n");
  int code = 0;
  if (eoh == std::string::npos || std::sscanf(raw.c_str(), "HTTP/%*s %d", &code) != 1) {
    *err = "not an HTTP reply";
    return std::nullopt;
  }
  return HttpReply{code, raw.substr(eoh + 4)};
}

// One request frame and its reply (matched by request id) on the control connection.
bool Exchange(int fd, wire::MessageType type, uint64_t id, const google::protobuf::MessageLite& m,
              wire::Frame* reply, Clock::time_point deadline, std::string* err) {
  const std::vector<uint8_t> f = wire::EncodeFrame(static_cast<uint16_t>(type), id, m);
  if (!SendAll(fd, f.data(), f.size(), deadline, err)) return false;
  wire::FrameDecoder dec;
  char buf[4096];
  for (;;) {
    while (dec.Next(reply))
      if (reply->header.request_id == id) return true;
    const ssize_t r = RecvSome(fd, buf, sizeof buf, deadline, err);
    if (r == 0) *err = "the server closed the connection";
    if (r <= 0) return false;
    const Status st = dec.Feed({reinterpret_cast<const uint8_t*>(buf), size_t(r)});
    if (!st.ok()) return *err = "bad reply: " + st.ToString(), false;
  }
}

// An Error reply's status, or "" when `f` is the reply wanted.
std::string ReplyError(const wire::Frame& f, wire::MessageType want) {
  if (f.header.type == static_cast<uint16_t>(wire::MessageType::kError)) {
    wire::Error e;
    if (!wire::ParseProto(f, &e).ok()) return "an unparsable Error reply";
    return wire::StatusFromWire(e.code(), e.message()).ToString();
  }
  if (f.header.type != wire::ReplyType(want))
    return std::string("unexpected reply ") + wire::MessageTypeName(f.header.type);
  return "";
}

// `up`: the control port accepts a connection; with a tenant, Hello and a Heartbeat are answered.
bool ProbeControl(const Shard& s, const Options& o, Clock::time_point deadline, std::string* err) {
  if (!o.tls_ca.empty()) {  // the client library's TLS: handshake, Hello, Heartbeat
    client::ConnectOptions co;
    co.address = s.server;
    co.tenant = o.tenant.empty() ? "dev" : o.tenant;
    co.token = o.tenant.empty() ? "dev" : o.token;
    co.client_name = "kvmctl status";
    co.deadline_ms = uint32_t(std::max(1, MsLeft(deadline)));
    co.heartbeats = false;
    co.tls_ca = o.tls_ca;
    co.tls_cert = o.tls_cert;
    co.tls_key = o.tls_key;
    auto c = client::Client::Connect(co);
    if (!c.ok()) {
      const StatusCode code = c.status().code();
      if (o.tenant.empty() &&
          (code == StatusCode::kUnauthenticated || code == StatusCode::kPermissionDenied))
        return true;  // no tenant given: the TLS handshake and an answer are the check
      *err =
          (code == StatusCode::kUnauthenticated || code == StatusCode::kPermissionDenied ? "Hello: "
                                                                                         : "") +
          c.status().ToString();
      return false;
    }
    wire::Heartbeat hb;
    const Status st = (*c)->Call(wire::MessageType::kHeartbeat, hb).status();
    if (!st.ok()) *err = "Heartbeat: " + st.ToString();
    return st.ok();
  }
  const int fd = Connect(s.server_host, s.server_port, deadline, err);
  if (fd < 0) return false;
  bool ok = true;
  if (!o.tenant.empty()) {
    wire::Hello h;
    h.set_protocol_version(wire::kProtocolVersion);
    h.set_tenant(o.tenant);
    h.set_auth_token(o.token);
    h.set_client_name("kvmctl status");
    wire::Frame f;
    ok = Exchange(fd, wire::MessageType::kHello, 1, h, &f, deadline, err);
    if (ok && !(*err = ReplyError(f, wire::MessageType::kHello)).empty()) {
      *err = "Hello: " + *err;
      ok = false;
    }
    if (ok) {
      wire::Heartbeat hb;
      hb.set_client_time_ns(uint64_t(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
              .count()));
      ok = Exchange(fd, wire::MessageType::kHeartbeat, 2, hb, &f, deadline, err);
      if (ok && !(*err = ReplyError(f, wire::MessageType::kHeartbeat)).empty()) {
        *err = "Heartbeat: " + *err;
        ok = false;
      }
    }
    if (!ok && err->rfind("Hello", 0) != 0 && err->rfind("Heartbeat", 0) != 0)
      *err = "no answer to Hello/Heartbeat: " + *err;
  }
  close(fd);
  return ok;
}

volatile sig_atomic_t g_stop = 0;  // --watch: SIGINT/SIGTERM arrived
void OnStop(int) { g_stop = 1; }

// ---- One reading of a shard ----

struct Reading {
  bool done = false;  // the probe finished (false: still running past its deadline)
  bool up = false;
  std::string control_error;
  bool admin_ok = false;  // /status and /metrics read
  std::string admin_error;
  bool ready = false;
  std::string not_ready;  // the /readyz body when 503
  json status;            // /status, or null
  std::vector<prom::Sample> metrics;
  bool metrics_ok = false;
  Clock::time_point metrics_at{};
};

// Reads /readyz, /status and /metrics (or only /metrics) into *r.
void ProbeAdmin(const Shard& s, const Options& o, bool metrics_only, Clock::time_point deadline,
                Reading* r) {
  std::string err;
  if (!metrics_only) {
    auto ready = HttpGet(s, o, "/readyz", deadline, &err);
    if (!ready) return void(r->admin_error = "/readyz: " + err);
    r->ready = ready->code == 200;
    if (!r->ready) {
      r->not_ready = ready->body;
      while (!r->not_ready.empty() && r->not_ready.back() == '\n') r->not_ready.pop_back();
      if (r->not_ready.empty()) r->not_ready = "HTTP " + std::to_string(ready->code);
    }
    auto st = HttpGet(s, o, "/status", deadline, &err);
    if (!st) return void(r->admin_error = "/status: " + err);
    r->status = json::parse(st->body, nullptr, /*allow_exceptions=*/false);
    if (st->code != 200 || !r->status.is_object()) {
      r->status = nullptr;
      return void(r->admin_error =
                      "/status: not a JSON object (HTTP " + std::to_string(st->code) + ")");
    }
  }
  auto m = HttpGet(s, o, "/metrics", deadline, &err);
  if (!m) return void(r->admin_error = "/metrics: " + err);
  r->metrics_at = Clock::now();
  if (m->code != 200) return void(r->admin_error = "/metrics: HTTP " + std::to_string(m->code));
  if (!prom::Parse(m->body, &r->metrics, &err)) return void(r->admin_error = "/metrics: " + err);
  r->metrics_ok = true;
  r->admin_ok = true;
}

// Probes every shard in parallel, each on a detached thread, and waits until all are done or the
// deadline has passed: a probe stuck past it (in name resolution, say) is reported as not done
// and left to finish on its own; `busy` keeps a shard from being probed again while it runs.
class Prober {
 public:
  explicit Prober(const Options& o) : o_(o), busy_(o.shards.size()) {
    for (auto& b : busy_) b = std::make_shared<std::atomic<bool>>(false);
  }
  // metrics_only[i]: only /metrics for shard i; skip[i]: do not probe it (reading left not done).
  std::vector<Reading> Read(const std::vector<bool>& metrics_only, const std::vector<bool>& skip) {
    struct Shared {
      std::mutex mu;
      std::condition_variable cv;
      std::vector<Reading> out;
      size_t pending = 0;
    };
    auto sh = std::make_shared<Shared>();
    sh->out.resize(o_.shards.size());
    const auto deadline = Clock::now() + std::chrono::milliseconds(o_.timeout_ms);
    for (size_t i = 0; i < o_.shards.size(); ++i) {
      if (skip[i]) continue;
      if (busy_[i]->exchange(true)) {  // the last probe of this shard is still stuck
        sh->out[i].control_error = sh->out[i].admin_error =
            "timed out (previous probe still running)";
        continue;
      }
      ++sh->pending;
      std::thread([sh, i, deadline, busy = busy_[i], shard = o_.shards[i], o = o_,
                   only = bool(metrics_only[i])] {
        Reading r;
        std::thread control;
        if (!only)
          control = std::thread([&] { r.up = ProbeControl(shard, o, deadline, &r.control_error); });
        ProbeAdmin(shard, o, only, deadline, &r);
        if (control.joinable()) control.join();
        r.done = true;
        busy->store(false);
        std::lock_guard<std::mutex> l(sh->mu);
        sh->out[i] = std::move(r);
        if (--sh->pending == 0) sh->cv.notify_all();
      }).detach();
    }
    std::unique_lock<std::mutex> l(sh->mu);
    // A small grace past the probes' own deadline for them to hand their results over.
    const auto until = deadline + std::chrono::milliseconds(200);
    while (sh->pending && !g_stop && Clock::now() < until)  // a stop signal ends the wait
      sh->cv.wait_for(l, std::chrono::milliseconds(50));
    std::vector<Reading> out = sh->out;  // a late probe writes only into `sh`, kept alive by it
    for (size_t i = 0; i < out.size(); ++i)
      if (!skip[i] && !out[i].done && out[i].control_error.empty()) {
        out[i].control_error = "timed out";
        out[i].admin_error = "timed out";
      }
    return out;
  }

 private:
  Options o_;
  std::vector<std::shared_ptr<std::atomic<bool>>> busy_;
};

// ---- What a shard reports ----

double Fraction(double used, double cap) {
  return cap > 0 && std::isfinite(used) ? used / cap : NAN;
}

// A JSON number (an integer when it is one, as counts and bytes are), or null when not finite.
json Number(double x) {
  if (!std::isfinite(x)) return nullptr;
  if (x == std::floor(x) && std::fabs(x) < 9007199254740992.0) return json(int64_t(x));
  return json(x);
}

// The shard's JSON object from its latest reading and, for rates, an earlier one.
json Report(const Shard& s, const Reading& now, const Reading* before) {
  json j;
  j["server"] = s.server;
  j["admin"] = s.admin;
  j["up"] = now.up;
  j["ready"] = now.ready;
  const json& st = now.status;
  auto from_status = [&](const char* key) {
    return st.is_object() && st.contains(key) ? st[key] : json(nullptr);
  };
  j["degraded"] = from_status("degraded");
  j["version"] = from_status("version");
  j["uptime_seconds"] = from_status("uptime_seconds");
  j["sequences"] = from_status("sequences");
  const auto& m = now.metrics;
  const bool have = now.metrics_ok;
  json tiers = json::object();
  for (const char* t : kTiers) {
    if (!have) {
      tiers[t] = nullptr;
      continue;
    }
    const double used = prom::Sum(m, "kvm_tier_bytes", {{"tier", t}});
    const double cap = prom::Sum(m, "kvm_tier_capacity_bytes", {{"tier", t}});
    tiers[t] = {{"bytes", Number(used)},
                {"capacity_bytes", Number(cap)},
                {"used_fraction", Number(Fraction(used, cap))}};
  }
  j["tiers"] = tiers;
  json delta = json::object();
  for (const char* k : kKinds) {
    if (!have) {
      delta[k] = nullptr;
      continue;
    }
    const auto buckets = prom::Buckets(m, "kvm_dropped_mass", {{"kind", k}});
    const double n = prom::Sum(m, "kvm_dropped_mass_count", {{"kind", k}});
    delta[k] = {{"n", Number(n)},
                {"p50", Number(prom::HistogramQuantile(0.50, buckets))},
                {"p99", Number(prom::HistogramQuantile(0.99, buckets))}};
  }
  j["delta"] = delta;
  double saved = NAN;
  if (have) {
    const double streamed = prom::Sum(m, "kvm_stream_bytes_total", {{"direction", "to_worker"}});
    const double dense = prom::Sum(m, "kvm_dense_equivalent_bytes_total");
    if (dense > 0 && std::isfinite(streamed)) saved = 1.0 - streamed / dense;
  }
  j["bandwidth_saved"] = Number(saved);
  double retr = NAN, errs = NAN, interval = NAN;
  if (have && before && before->metrics_ok) {
    interval = std::chrono::duration<double>(now.metrics_at - before->metrics_at).count();
    retr = prom::Rate(prom::Sum(before->metrics, "kvm_retrievals_total"),
                      prom::Sum(m, "kvm_retrievals_total"), interval);
    errs = prom::Rate(prom::Sum(before->metrics, "kvm_errors_total"),
                      prom::Sum(m, "kvm_errors_total"), interval);
  }
  j["retrievals_per_second"] = Number(retr);
  j["errors_per_second"] = Number(errs);
  j["rate_interval_seconds"] = Number(interval);
  std::string err;
  if (!now.control_error.empty()) err = "control: " + now.control_error;
  if (!now.admin_error.empty()) err += (err.empty() ? "" : "; ") + ("admin: " + now.admin_error);
  if (now.admin_ok && !now.ready)
    err += (err.empty() ? "" : "; ") + ("not ready: " + now.not_ready);
  j["error"] = err.empty() ? json(nullptr) : json(err);
  return j;
}

// ---- The terminal view ----

std::string Bytes(double b) {
  if (!std::isfinite(b)) return "-";
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", b, units[u]);
  return buf;
}

std::string Fmt(const json& v, const char* fmt) {
  if (!v.is_number()) return "-";
  char buf[48];
  std::snprintf(buf, sizeof buf, fmt, v.get<double>());
  return buf;
}

std::string Uptime(const json& v) {
  if (!v.is_number()) return "-";
  const long s = long(v.get<double>());
  char buf[32];
  if (s >= 86400)
    std::snprintf(buf, sizeof buf, "%ldd%02ldh", s / 86400, s % 86400 / 3600);
  else if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, s % 3600 / 60);
  else
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  return buf;
}

std::string Str(const json& v) { return v.is_string() ? v.get<std::string>() : "-"; }

// One frame: a header and a block per shard. `bars`: draw tier bars (a terminal).
std::string Render(const json& shards, bool bars, bool watch) {
  std::ostringstream o;
  size_t up = 0, ready = 0, degraded = 0;
  for (const auto& s : shards) {
    up += s["up"].get<bool>();
    ready += s["ready"].get<bool>();
    degraded += s["degraded"].is_boolean() && s["degraded"].get<bool>();
  }
  char when[32];
  const std::time_t t = std::time(nullptr);
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&t));
  o << "kvmctl status  " << when << "  " << shards.size() << " shard"
    << (shards.size() == 1 ? "" : "s") << ": " << up << " up, " << ready << " ready, " << degraded
    << " degraded" << (watch ? "   (every 1 s; Ctrl-C quits)" : "") << "\n\n";
  char line[256];
  std::snprintf(line, sizeof line, "%-24s %-5s %-9s %-8s %-8s %6s %8s %7s %9s\n", "SHARD", "UP",
                "READY", "VERSION", "UPTIME", "SEQS", "RETR/S", "ERR/S", "BW SAVED");
  o << line;
  for (const auto& s : shards) {
    const bool is_up = s["up"].get<bool>(), is_ready = s["ready"].get<bool>();
    const bool is_degraded = s["degraded"].is_boolean() && s["degraded"].get<bool>();
    std::string ready_s = is_ready ? (is_degraded ? "degraded" : "ready") : "no";
    std::snprintf(line, sizeof line, "%-24s %-5s %-9s %-8s %-8s %6s %8s %7s %9s\n",
                  Str(s["server"]).c_str(), is_up ? "up" : "DOWN", ready_s.c_str(),
                  Str(s["version"]).c_str(), Uptime(s["uptime_seconds"]).c_str(),
                  Fmt(s["sequences"], "%.0f").c_str(),
                  Fmt(s["retrievals_per_second"], "%.1f").c_str(),
                  Fmt(s["errors_per_second"], "%.2f").c_str(),
                  s["bandwidth_saved"].is_number()
                      ? Fmt(json(100 * s["bandwidth_saved"].get<double>()), "%.1f%%").c_str()
                      : "-");
    o << line;
    if (!s["tiers"]["host"].is_null()) {
      for (const char* t : kTiers) {
        const json& tj = s["tiers"][t];
        const double used = tj["bytes"].is_number() ? tj["bytes"].get<double>() : NAN;
        const double cap =
            tj["capacity_bytes"].is_number() ? tj["capacity_bytes"].get<double>() : NAN;
        o << "    " << t << (std::strlen(t) < 4 ? std::string(5 - std::strlen(t), ' ') : " ");
        if (cap > 0) {
          const double f = std::min(1.0, std::max(0.0, used / cap));
          if (bars) {
            const int w = 30, full = int(std::lround(f * w));
            o << "[" << std::string(size_t(full), '#') << std::string(size_t(w - full), '.')
              << "] ";
          }
          std::snprintf(line, sizeof line, "%5.1f%%  %s / %s\n", 100 * used / cap,
                        Bytes(used).c_str(), Bytes(cap).c_str());
          o << line;
        } else {
          const std::string tier(t);
          o << Bytes(used)
            << (tier == "disk"  ? " (no cap)"
                : tier == "gpu" ? " (no GPU tier)"
                                : " (no capacity reported: the arena is made at the first append)")
            << "\n";
        }
      }
      o << "    δ   ";
      for (const char* k : kKinds) {
        const json& d = s["delta"][k];
        if (d["n"].is_number() && d["n"].get<double>() > 0)
          o << " " << k << " p50 " << Fmt(d["p50"], "%.3g") << " p99 " << Fmt(d["p99"], "%.3g")
            << " (n " << Fmt(d["n"], "%.0f") << ")  ";
        else
          o << " " << k << " -  ";
      }
      o << "\n";
    }
    if (s["error"].is_string()) o << "    " << s["error"].get<std::string>() << "\n";
  }
  if (!watch || shards.empty()) return o.str();
  bool rates = false;
  for (const auto& s : shards) rates |= s["rate_interval_seconds"].is_number();
  o << "\n"
    << (rates ? "rates over the last interval; δ percentiles since each shard started"
              : "rates: from the next frame (two reads of /metrics); δ since each shard started")
    << "\n";
  return o.str();
}

// Waits until `t` (or a stop signal) in small steps; false when stopped.
bool SleepUntil(Clock::time_point t) {
  while (!g_stop && Clock::now() < t)
    std::this_thread::sleep_for(
        std::min<Clock::duration>(std::chrono::milliseconds(50), t - Clock::now()));
  return !g_stop;
}

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, ',')) {
    const size_t b = cur.find_first_not_of(" \t"), e = cur.find_last_not_of(" \t");
    if (b != std::string::npos) out.push_back(cur.substr(b, e - b + 1));
  }
  return out;
}

Options ParseOptions(const std::vector<std::string>& args) {
  Flags f(
      args,
      {"server", "admin", "tenant", "token-file", "timeout-ms", "tls-ca", "tls-cert", "tls-key"},
      {"watch", "json", "admin-tls"});
  Options o;
  o.watch = f.Bool("watch");
  o.json = f.Bool("json");
  o.timeout_ms = int(f.Int("timeout-ms", 2000, 1, 600000));
  const auto servers = SplitList(f.Required("server"));
  if (servers.empty()) throw UsageError("--server: no HOST:PORT given");
  std::vector<std::string> admins;
  if (auto a = f.Str("admin")) {
    admins = SplitList(*a);
    if (admins.size() != servers.size())
      throw UsageError("--admin: " + std::to_string(admins.size()) + " addresses for " +
                       std::to_string(servers.size()) + " --server addresses");
  }
  for (size_t i = 0; i < servers.size(); ++i) {
    Shard s;
    s.server = servers[i];
    auto hp = wire::ParseHostPort(s.server);
    if (!hp.ok()) throw UsageError("--server: " + hp.status().message());
    s.server_host = hp->first;
    s.server_port = hp->second;
    if (!admins.empty()) {
      s.admin = admins[i];
      auto ap = wire::ParseHostPort(s.admin);
      if (!ap.ok()) throw UsageError("--admin: " + ap.status().message());
      s.admin_host = ap->first;
      s.admin_port = ap->second;
    } else {  // the defaults are 7420/7421, and the chart uses the same pair
      if (s.server_port == 65535) throw UsageError("--server " + s.server + ": give --admin");
      s.admin_host = s.server_host;
      s.admin_port = uint16_t(s.server_port + 1);
      const bool v6 = s.server_host.find(':') != std::string::npos;
      s.admin = (v6 ? "[" + s.admin_host + "]" : s.admin_host) + ":" + std::to_string(s.admin_port);
    }
    o.shards.push_back(std::move(s));
  }
  if (f.Has("tenant") != f.Has("token-file"))
    throw UsageError("--tenant and --token-file go together");
  if (f.Has("tenant")) {
    o.tenant = f.Required("tenant");
    o.token = ReadAuthToken(f.Required("token-file"));
  }
  client::ConnectOptions co;
  ApplyAuthFlags(f, &co);  // the TLS flags' checks
  o.tls_ca = co.tls_ca;
  o.tls_cert = co.tls_cert;
  o.tls_key = co.tls_key;
  o.admin_tls = f.Bool("admin-tls");
  if (o.admin_tls && o.tls_ca.empty())
    throw UsageError("--admin-tls: needs --tls-ca (the admin certificate is verified against it)");
  return o;
}

}  // namespace

int RunStatus(const std::vector<std::string>& args) {
  const Options o = ParseOptions(args);
  const size_t n = o.shards.size();
  Prober prober(o);
  const bool tty = isatty(STDOUT_FILENO);
  auto all_ok = [](const json& shards) {
    for (const auto& s : shards)
      if (!s["up"].get<bool>() || !s["ready"].get<bool>()) return false;
    return true;
  };
  if (!o.watch) {
    const auto t0 = Clock::now();
    const auto first = prober.Read(std::vector<bool>(n, false), std::vector<bool>(n, false));
    std::vector<bool> skip(n);
    for (size_t i = 0; i < n; ++i) skip[i] = !first[i].metrics_ok;  // down: no second read
    std::vector<Reading> second(n);
    bool any = false;
    for (bool s : skip) any |= !s;
    if (any) {  // rates: a second read of /metrics about 1 s after the first
      SleepUntil(t0 + std::chrono::seconds(1));
      second = prober.Read(std::vector<bool>(n, true), skip);
    }
    json shards = json::array();
    for (size_t i = 0; i < n; ++i) {
      if (second[i].metrics_ok) {
        Reading now = first[i];  // health from the first read, numbers from the second
        now.metrics = second[i].metrics;
        now.metrics_at = second[i].metrics_at;
        shards.push_back(Report(o.shards[i], now, &first[i]));
      } else {
        shards.push_back(Report(o.shards[i], first[i], nullptr));
      }
    }
    if (o.json)
      std::printf("%s\n", json{{"shards", shards}}.dump(2).c_str());
    else
      std::fputs(Render(shards, tty, false).c_str(), stdout);
    return all_ok(shards) ? 0 : 1;
  }

  // --watch: a frame a second, redrawn in place on a terminal, until SIGINT/SIGTERM.
  struct sigaction sa {};
  sa.sa_handler = OnStop;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  if (tty && !o.json) std::fputs("\x1b[?25l\x1b[2J", stdout);  // hide the cursor, clear once
  std::vector<Reading> prev(n);
  while (!g_stop) {
    const auto t0 = Clock::now();
    auto now = prober.Read(std::vector<bool>(n, false), std::vector<bool>(n, false));
    if (g_stop) break;
    json shards = json::array();
    for (size_t i = 0; i < n; ++i) {
      shards.push_back(Report(o.shards[i], now[i], prev[i].metrics_ok ? &prev[i] : nullptr));
      if (now[i].metrics_ok) prev[i] = std::move(now[i]);
    }
    if (o.json) {  // one object per line and frame
      std::printf("%s\n", json{{"shards", shards}}.dump().c_str());
    } else if (tty) {  // home, each line cleared to its end, the rest of the screen cleared
      std::string frame = Render(shards, true, true), out = "\x1b[H";
      for (size_t b = 0, e; b < frame.size(); b = e + 1) {
        e = frame.find('\n', b);
        if (e == std::string::npos) e = frame.size();
        out += frame.substr(b, e - b) + "\x1b[K\n";
      }
      std::fputs((out + "\x1b[J").c_str(), stdout);
    } else {  // not a terminal: frames one after another
      std::fputs((Render(shards, false, true) + "\n").c_str(), stdout);
    }
    std::fflush(stdout);
    SleepUntil(t0 + std::chrono::seconds(1));
  }
  if (tty && !o.json) std::fputs("\x1b[?25h", stdout);  // the cursor back
  std::fflush(stdout);
  return 0;
}

}  // namespace kvm::tools
