// kvmanager: one shard of the service. With no arguments it runs the embedded default: the control
// plane on 127.0.0.1:7420, RocksDB under ./kvmanager-data, a host tier of min(25% of the memory
// it may use, 16 GiB) and a loopback-only development tenant "dev" (token "dev"). SIGTERM/SIGINT
// drain the requests in flight and close RocksDB cleanly. With TLS (--tls-cert/--tls-key, mutual
// with --tls-client-ca) the certificates are reloaded on SIGHUP and when their files change.
//
// Start-up order: the control port is bound first, then the admin server starts (/healthz 200,
// /readyz 503 "opening the store"), then the store opens (RocksDB recovery included) and the
// control plane starts accepting; clients that connected during the open wait in the listen
// backlog and are served then. After SIGTERM/SIGINT /readyz answers 503 "draining" for
// --shutdown-delay-ms while the service still serves, then through the drain.
//
// Configuration: flags override a YAML --config file (the same names with '_'); --tenants-file
// replaces the tenants. Tokens come from files (the config, the tenants file or a tenant's
// token_file), never from the command line; they are re-read on SIGHUP and when one of those files
// changes (new Hellos use the new tokens, open sessions stay). --check-config validates all of it
// and exits without opening the store or binding a port; --version prints the version and the
// build's options.
#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <boost/program_options.hpp>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kvmanager/admin.h"
#include "kvmanager/block_store.h"
#include "kvmanager/host_arena.h"
#include "kvmanager/memory_limits.h"
#include "kvmanager/metrics.h"
#include "kvmanager/server.h"
#include "kvmanager/store_verify.h"
#include "transport/transport.h"

namespace po = boost::program_options;
using namespace kvm;

namespace {
struct Config {
  server::ServerOptions server;
  store::StoreOptions store;
  std::string admin = "127.0.0.1:7421";
  std::string data_plane = "ucx";
  std::string ucx_error_mode = "none";
  // After SIGTERM/SIGINT: keep serving this long with /readyz 503 before the drain starts, so that
  // probes and load balancers see the shard leave before its port closes. A second signal ends it
  // early. Default: 0 (drain at once).
  uint32_t shutdown_delay_ms = 0;
  // Every this many seconds the service gives the memory malloc holds free back to the system
  // (glibc malloc_trim): freed request buffers otherwise stay resident in the allocator's heaps
  // and RSS follows its high-water mark, not the live data (bench/RESULTS.md "Soak"). 0 = never.
  // Default: 10.
  uint32_t malloc_trim_seconds = 10;
  // For tests only (flag --test-delay-open-ms, not in the config file): sleep this long before
  // opening the store, so that a test can observe the start-up state. Default: 0.
  uint32_t test_delay_open_ms = 0;
  // TLS on the control plane (--tls-cert/--tls-key; --tls-client-ca: mutual TLS) and on the admin
  // port (--admin-tls, the same certificate). Paths in the config file are relative to it.
  server::TlsFiles tls;
  bool admin_tls = false;
  // The embedded loopback-only development tenant "dev" when no tenants are configured. false
  // (--no-dev-tenant): no tenants configured is an error instead. Default: true.
  bool dev_tenant = true;
  bool tenants_configured = false;
  std::vector<std::string> token_files;  // the tenants' token_file paths (watched for rotation)
};

// A configuration error while the service runs (a reload): thrown by Usage instead of exiting.
struct ReloadError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
bool g_usage_throws = false;  // main thread only: set while the tenants are reloaded

[[noreturn]] void Usage(const std::string& msg) {
  if (g_usage_throws) throw ReloadError(msg);
  std::fprintf(stderr, "kvmanager: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

void PrintVersion() {
  const char* sanitize = KVM_BUILD_SANITIZE[0] ? KVM_BUILD_SANITIZE : "none";
  const char* ucx = KVM_BUILD_UCX[0] ? KVM_BUILD_UCX : "unknown version";
  std::printf("kvmanager %s\nbuild: %s, CUDA %s, UCX %s, sanitizer %s\n", KVM_VERSION,
              KVM_BUILD_TYPE[0] ? KVM_BUILD_TYPE : "default", KVM_BUILD_CUDA ? "on" : "off", ucx,
              sanitize);
}

// `path` as named in a file that lives in `base_dir`: relative paths are relative to that file.
std::string Resolve(const std::string& path, const std::string& base_dir) {
  if (path.empty() || path.front() == '/' || base_dir.empty()) return path;
  return (std::filesystem::path(base_dir) / path).string();
}

std::string DirOf(const std::string& file) {
  const std::string d = std::filesystem::path(file).parent_path().string();
  return d.empty() ? "." : d;
}

// The token in a token file, its trailing newline (\n or \r\n, any number) stripped; an unreadable
// or empty file exits 2 naming `where`.
std::string ReadTokenFile(const std::string& path, const std::string& where) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Usage(where + ": cannot read '" + path + "' (" + std::strerror(errno) + ")");
  std::ostringstream s;
  s << f.rdbuf();
  std::string t = s.str();
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.pop_back();
  if (t.empty()) Usage(where + ": '" + path + "' is empty");
  return t;
}

// A scalar field of a YAML map as T; a missing field leaves *out as it is. A null, non-scalar or
// unconvertible value exits 2 naming `field`.
template <typename T>
void GetScalar(const YAML::Node& map, const char* key, const std::string& field, T* out) {
  const YAML::Node n = map[key];
  if (!n) return;
  if (n.IsNull()) Usage(field + " is empty");
  if (!n.IsScalar()) Usage(field + " must be a single value, not a list or a map");
  try {
    *out = n.as<T>();
  } catch (const std::exception&) {
    Usage(field + " has a bad value '" + n.Scalar() + "'");
  }
}

// A tenants list [{name, token | token_file, loopback_only, max_sequences, max_stored_bytes,
// max_in_flight, max_connections}] (the quotas and limits in plain numbers, 0 = none). Messages
// start with `prefix` ("config F: ") and name the field ("field 'tenants[1].token_file'");
// relative token_file paths are resolved against base_dir. Exits 2 on an empty list, an unknown or
// missing field, a duplicate name, an empty or unreadable token, a quota that is not a number.
std::vector<server::TenantConfig> ParseTenants(const YAML::Node& list, const std::string& prefix,
                                               const std::string& base_dir,
                                               std::vector<std::string>* token_files) {
  auto field = [&](const std::string& sub) { return prefix + "field 'tenants" + sub + "'"; };
  if (!list.IsSequence()) Usage(field("") + " must be a list of {name, token | token_file}");
  if (list.size() == 0) Usage(field("") + " is an empty list (no client could authenticate)");
  std::vector<server::TenantConfig> out;
  std::set<std::string> names;
  for (size_t i = 0; i < list.size(); ++i) {
    const YAML::Node t = list[i];
    const std::string at = "[" + std::to_string(i) + "]";
    if (!t.IsMap()) Usage(field(at) + " must be a map {name, token | token_file, loopback_only}");
    for (const auto& kv : t) {
      const std::string k = kv.first.as<std::string>();
      static const char* kFields[] = {"name",          "token",          "token_file",
                                      "loopback_only", "max_sequences",  "max_stored_bytes",
                                      "max_in_flight", "max_connections"};
      if (std::find(std::begin(kFields), std::end(kFields), k) == std::end(kFields))
        Usage(field(at) + ": unknown field '" + k +
              "' (name, token, token_file, loopback_only, max_sequences, max_stored_bytes, "
              "max_in_flight, max_connections)");
    }
    server::TenantConfig tc;
    std::string token_file;
    GetScalar(t, "name", field(at + ".name"), &tc.name);
    GetScalar(t, "token", field(at + ".token"), &tc.token);
    GetScalar(t, "token_file", field(at + ".token_file"), &token_file);
    GetScalar(t, "loopback_only", field(at + ".loopback_only"), &tc.loopback_only);
    GetScalar(t, "max_sequences", field(at + ".max_sequences"), &tc.max_sequences);
    GetScalar(t, "max_stored_bytes", field(at + ".max_stored_bytes"), &tc.max_stored_bytes);
    GetScalar(t, "max_in_flight", field(at + ".max_in_flight"), &tc.max_in_flight);
    GetScalar(t, "max_connections", field(at + ".max_connections"), &tc.max_connections);
    if (tc.name.empty()) Usage(field(at + ".name") + " is missing");
    if (t["token"] && t["token_file"]) Usage(field(at) + ": give token or token_file, not both");
    if (!t["token"] && !t["token_file"]) Usage(field(at) + ": needs token or token_file");
    if (t["token_file"]) {
      token_files->push_back(Resolve(token_file, base_dir));
      tc.token = ReadTokenFile(token_files->back(), field(at + ".token_file"));
    }
    if (tc.token.empty()) Usage(field(at + ".token") + " is empty");
    if (!names.insert(tc.name).second)
      Usage(field(at + ".name") + ": tenant '" + tc.name + "' is listed twice");
    out.push_back(std::move(tc));
  }
  return out;
}

YAML::Node LoadYaml(const std::string& what, const std::string& path) {
  try {
    return YAML::LoadFile(path);
  } catch (const std::exception& e) {
    Usage(what + " " + path + ": " + e.what());
  }
}

// Reads the YAML config file; a bad value names its field and exits 2.
void LoadConfig(const std::string& path, Config* c) {
  const YAML::Node y = LoadYaml("config", path);
  if (y.IsNull()) return;  // an empty file: every default
  if (!y.IsMap()) Usage("config " + path + ": must be a map of fields (see --help)");
  static const char* kKnown[] = {"listen",
                                 "admin",
                                 "data_dir",
                                 "host_capacity_bytes",
                                 "disk_capacity_bytes",
                                 "sync",
                                 "gpu",
                                 "gpu_capacity_bytes",
                                 "io_threads",
                                 "worker_threads",
                                 "max_in_flight",
                                 "max_frame_bytes",
                                 "session_timeout_ms",
                                 "request_deadline_ms",
                                 "max_connections_per_address",
                                 "frame_read_timeout_ms",
                                 "max_session_send_queue_bytes",
                                 "max_session_queued",
                                 "data_plane",
                                 "ucx_error_mode",
                                 "shutdown_delay_ms",
                                 "malloc_trim_seconds",
                                 "tls_cert",
                                 "tls_key",
                                 "tls_client_ca",
                                 "admin_tls",
                                 "dev_tenant",
                                 "tenants"};
  for (const auto& kv : y) {
    const std::string k = kv.first.as<std::string>();
    if (std::find(std::begin(kKnown), std::end(kKnown), k) == std::end(kKnown))
      Usage("config " + path + ": unknown field '" + k + "'");
  }
  auto get = [&](const char* key, auto* out) {
    GetScalar(y, key, "config " + path + ": field '" + key + "'", out);
  };
  get("listen", &c->server.listen);
  get("admin", &c->admin);
  get("data_dir", &c->store.dir);
  get("host_capacity_bytes", &c->store.host_capacity_bytes);
  get("disk_capacity_bytes", &c->store.disk_capacity_bytes);
  get("sync", &c->store.sync);
  get("gpu", &c->store.gpu);
  get("gpu_capacity_bytes", &c->store.gpu_capacity_bytes);
  get("io_threads", &c->server.io_threads);
  get("worker_threads", &c->server.worker_threads);
  get("max_in_flight", &c->server.max_in_flight);
  get("max_frame_bytes", &c->server.handler.limits.max_frame_bytes);
  get("session_timeout_ms", &c->server.session_timeout_ms);
  get("request_deadline_ms", &c->server.request_deadline_ms);
  get("max_connections_per_address", &c->server.max_connections_per_address);
  get("frame_read_timeout_ms", &c->server.frame_read_timeout_ms);
  get("max_session_send_queue_bytes", &c->server.max_session_send_queue_bytes);
  get("max_session_queued", &c->server.max_session_queued);
  get("data_plane", &c->data_plane);
  get("ucx_error_mode", &c->ucx_error_mode);
  get("shutdown_delay_ms", &c->shutdown_delay_ms);
  get("malloc_trim_seconds", &c->malloc_trim_seconds);
  get("tls_cert", &c->tls.cert);
  get("tls_key", &c->tls.key);
  get("tls_client_ca", &c->tls.client_ca);
  for (std::string* f : {&c->tls.cert, &c->tls.key, &c->tls.client_ca})
    *f = Resolve(*f, DirOf(path));
  get("admin_tls", &c->admin_tls);
  get("dev_tenant", &c->dev_tenant);
  if (y["tenants"]) {
    c->server.handler.tenants =
        ParseTenants(y["tenants"], "config " + path + ": ", DirOf(path), &c->token_files);
    c->tenants_configured = true;
  }
}

// A tenants file: the config's tenants list, either as the whole document or under `tenants:`.
void LoadTenantsFile(const std::string& path, Config* c) {
  const YAML::Node y = LoadYaml("tenants file", path);
  const std::string prefix = "tenants file " + path + ": ";
  if (y.IsMap()) {
    for (const auto& kv : y)
      if (kv.first.as<std::string>() != "tenants")
        Usage(prefix + "unknown field '" + kv.first.as<std::string>() + "' (only 'tenants')");
    if (!y["tenants"]) Usage(prefix + "no 'tenants' list");
    c->server.handler.tenants = ParseTenants(y["tenants"], prefix, DirOf(path), &c->token_files);
  } else {
    c->server.handler.tenants = ParseTenants(y, prefix, DirOf(path), &c->token_files);
  }
  c->tenants_configured = true;
}

// Everything the start checks before it opens the store: the values and their ranges.
void Validate(const Config& c) {
  if (c.data_plane != "ucx" && c.data_plane != "none")
    Usage("--data-plane / data_plane: '" + c.data_plane + "' is not ucx or none");
  if (c.ucx_error_mode != "none" && c.ucx_error_mode != "peer")
    Usage("--ucx-error-mode / ucx_error_mode: '" + c.ucx_error_mode + "' is not none or peer");
  if (!wire::ParseHostPort(c.server.listen).ok())
    Usage("--listen / listen: '" + c.server.listen + "' is not HOST:PORT");
  if (!wire::ParseHostPort(c.admin).ok())
    Usage("--admin / admin: '" + c.admin + "' is not HOST:PORT");
  if (c.store.dir.empty()) Usage("--data-dir / data_dir: is empty");
  if (c.server.io_threads == 0) Usage("--io-threads / io_threads: must be at least 1");
  if (c.server.worker_threads == 0) Usage("--worker-threads / worker_threads: must be at least 1");
  if (c.server.max_in_flight == 0) Usage("--max-in-flight / max_in_flight: must be at least 1");
  if (c.server.handler.tenants.empty())
    Usage(c.dev_tenant ? "tenants: none (no client could authenticate)"
                       : "tenants: none configured and the development tenant is off "
                         "(--no-dev-tenant / dev_tenant: false): give --tenants-file or the "
                         "config's tenants");
  if (c.tls.cert.empty() != c.tls.key.empty())
    Usage("--tls-cert / tls_cert and --tls-key / tls_key go together");
  if (!c.tls.client_ca.empty() && c.tls.cert.empty())
    Usage("--tls-client-ca / tls_client_ca needs --tls-cert and --tls-key");
  if (c.admin_tls && c.tls.cert.empty())
    Usage("--admin-tls / admin_tls needs --tls-cert and --tls-key (the same certificate)");
}

// The host tier's size and where it comes from, for --check-config and the start-up lines.
std::string DescribeHostTier(const Config& c) {
  if (c.store.host_capacity_bytes)
    return std::to_string(c.store.host_capacity_bytes) + " bytes (host_capacity_bytes)";
  const store::MemoryLimits m = store::ReadMemoryLimits();
  const std::string cg = m.cgroup_max ? std::to_string(*m.cgroup_max) : std::string("max");
  return std::to_string(store::DefaultHostCapacity()) + " bytes (default: 25% of MemAvailable " +
         std::to_string(m.mem_available) + " or cgroup memory.max " + cg +
         ", the lower, at most 16 GiB)";
}
// Binds and listens on `listen` (a numeric IPv4 or [IPv6] HOST:PORT) before anything else
// starts, so that the port takes connections while the store opens. Returns the socket and sets
// *bound to the "host:port" actually bound (port 0 resolved).
Result<int> BindControlPort(const std::string& listen, std::string* bound) {
  KVM_ASSIGN_OR_RETURN(auto hp, wire::ParseHostPort(listen));
  sockaddr_storage ss{};
  socklen_t len = 0;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET, hp.first.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(hp.second);
    len = sizeof *v4;
  } else if (inet_pton(AF_INET6, hp.first.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(hp.second);
    len = sizeof *v6;
  } else {
    return Status::InvalidArgument("listen address '" + hp.first +
                                   "' is not a numeric IPv4 or IPv6 address");
  }
  const int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::Unavailable(std::string("socket: ") + std::strerror(errno));
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || ::listen(fd, SOMAXCONN) != 0) {
    const int err = errno;
    close(fd);
    return Status::Unavailable("cannot listen on " + listen + ": " + std::strerror(err));
  }
  len = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  char host[INET6_ADDRSTRLEN] = "";
  const bool is6 = ss.ss_family == AF_INET6;
  inet_ntop(ss.ss_family, is6 ? static_cast<void*>(&v6->sin6_addr) : &v4->sin_addr, host,
            sizeof host);
  *bound = (is6 ? "[" + std::string(host) + "]" : std::string(host)) + ":" +
           std::to_string(ntohs(is6 ? v6->sin6_port : v4->sin_port));
  return fd;
}

// What identifies the contents of `files` without reading them: device, inode, size and
// modification time of each (stat follows symlinks: a Kubernetes Secret's atomic swap of its
// ..data link shows as a new inode). A file that cannot be stat'ed reads "missing".
std::string FileStamps(const std::vector<std::string>& files) {
  std::string out;
  for (const std::string& f : files) {
    struct stat st {};
    if (stat(f.c_str(), &st) != 0) {
      out += "missing;";
      continue;
    }
    out += std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" +
           std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec) + ";";
  }
  return out;
}

// The shard's life as /readyz, /status and kvm_ready report it. Written by the main thread, read
// by the admin thread: the flags are atomics, the strings are under `mu`, the store pointer is
// published once the store is open and stays valid until the admin server has stopped.
struct Lifecycle {
  const std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::string control;  // the bound control address (set before the admin server starts)
  std::atomic<store::BlockStore*> store{nullptr};  // the store is open
  std::atomic<bool> serving{false};                // the control plane accepts
  std::atomic<bool> draining{false};               // a stop signal arrived
  std::atomic<bool> degraded{false};
  mutable std::mutex mu;
  std::string admin;            // GUARDED_BY(mu): the bound admin address
  std::string data_plane;       // GUARDED_BY(mu): ucx, tcp (UCX failed) or none; "" = not yet
  std::string degraded_reason;  // GUARDED_BY(mu)

  void Set(std::string Lifecycle::*field, std::string value) {
    std::lock_guard<std::mutex> l(mu);
    this->*field = std::move(value);
  }

  // "" when ready; otherwise why not (the /readyz body).
  std::string NotReady() const {
    if (draining.load()) return "draining (stop signal received)";
    if (!store.load()) return "opening the store (RocksDB recovery included)";
    if (!serving.load()) return "starting the control plane";
    return "";
  }
  nlohmann::json StatusJson(uint64_t disk_capacity_bytes) const {
    nlohmann::json j;
    j["version"] = KVM_VERSION;
    j["uptime_seconds"] =
        std::round(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() *
            1000.0) /
        1000.0;
    j["ready"] = NotReady().empty();
    j["draining"] = draining.load();
    j["degraded"] = degraded.load();
    j["state"] = draining.load() ? "draining" : serving.load() ? "serving" : "opening";
    j["control"] = control;
    {
      std::lock_guard<std::mutex> l(mu);
      j["degraded_reason"] = degraded_reason;
      j["admin"] = admin;
      j["data_plane"] = data_plane.empty() ? nlohmann::json(nullptr) : nlohmann::json(data_plane);
    }
    store::BlockStore* st = store.load();
    if (st) {
      const store::StoreStats s = st->Stats();
      j["sequences"] = s.sequences;
      j["host_bytes"] = s.host_bytes;
      j["host_capacity_bytes"] = s.host_capacity_bytes;
      j["disk_bytes_written"] = s.disk_bytes_written;
      j["disk_bytes"] = s.disk_bytes;
      j["disk_capacity_bytes"] = disk_capacity_bytes;
      j["gpu_tier"] = s.gpu_tier;
      j["gpu_used_bytes"] = s.gpu.used_bytes;
      j["gpu_scored"] = s.gpu.scored;
      j["gpu_refused"] = s.gpu.refused;
      j["host_pinning"] = s.host_pinning;
    } else {  // not open yet: every store key is there, unknown
      for (const char* k : {"sequences", "host_bytes", "host_capacity_bytes", "disk_bytes_written",
                            "disk_bytes", "disk_capacity_bytes", "gpu_tier", "gpu_used_bytes",
                            "gpu_scored", "gpu_refused", "host_pinning"})
        j[k] = nullptr;
    }
    return j;
  }
};
}  // namespace

int main(int argc, char** argv) {
  Config c;
  c.store.dir = "./kvmanager-data";
  c.server.handler.tenants = {{"dev", "dev", true}};
  po::options_description desc(
      "kvmanager options (a --config YAML file uses the same names with '_')");
  desc.add_options()("help", "print this help")(
      "version", "print the version and the build's options (CUDA, UCX, sanitizer) and exit")(
      "check-config", po::bool_switch(),
      "validate the flags, the config file and the tenants (files read, token files included), "
      "print 'config ok' and exit 0; a bad value names its field and exits 2. Opens no store and "
      "binds no port")(
      "verify-store", po::value<std::string>(),
      "check the store in DIR offline (the service must not be running on it): every durable "
      "sequence's metadata, tokens, tail and block records, the content chain and the references; "
      "prints a one-line summary and exits 0, or one line per problem and exits 1")(
      "listen", po::value<std::string>(),
      "control plane HOST:PORT; port 0 picks a free one. Default: 127.0.0.1:7420")(
      "admin", po::value<std::string>(),
      "admin HTTP HOST:PORT (/metrics /healthz /readyz /status); port 0 picks one. Default: "
      "127.0.0.1:7421")("data-dir", po::value<std::string>(),
                        "RocksDB directory. Default: ./kvmanager-data")(
      "config", po::value<std::string>(), "YAML config file (flags override it)")(
      "tenants-file", po::value<std::string>(),
      "YAML file with the tenants list [{name, token | token_file, loopback_only, max_sequences, "
      "max_stored_bytes, max_in_flight, max_connections}] (bare or under 'tenants:'; quotas in "
      "bytes or counts, 0 = none); replaces the config's tenants and the development tenant. A "
      "token_file is read with its trailing newline stripped; relative paths are relative to the "
      "file naming them")(
      "host-capacity-bytes", po::value<uint64_t>(),
      "host tier size. Default: min(25% of the memory it may use, 16 GiB): MemAvailable, or the "
      "cgroup v2 memory.max (a container's memory limit) when that is lower")(
      "disk-capacity-bytes", po::value<uint64_t>(),
      "disk tier cap; past it appends answer NoSpace. Default: 0 = none")(
      "sync", po::bool_switch(),
      "fsync the WAL on every durable append (power loss). Default: off (survives kill -9)")(
      "no-gpu", po::bool_switch(),
      "no GPU tier even when built with CUDA and a device exists (retrieval scoring on the CPU)")(
      "gpu-capacity-bytes", po::value<uint64_t>(),
      "GPU tier size (keys on the device for scoring). Default: 40% of the device's free memory")(
      "io-threads", po::value<uint32_t>(), "threads that decode and encode frames. Default: 1")(
      "worker-threads", po::value<uint32_t>(), "threads that handle requests. Default: 2")(
      "max-in-flight", po::value<uint32_t>(),
      "requests queued or running before Busy. Default: 1024")(
      "max-frame-bytes", po::value<uint64_t>(),
      "largest accepted frame. Default: 268435456 (256 MiB)")(
      "session-timeout-ms", po::value<uint32_t>(),
      "close a session silent (no request, no heartbeat) this long; 0 = never. Default: 10000")(
      "request-deadline-ms", po::value<uint32_t>(),
      "answer TimedOut, without running it, a request queued this long; 0 = none. Default: 30000")(
      "max-connections-per-address", po::value<uint32_t>(),
      "open control connections from one IP address; the next gets an Error frame (Busy) and is "
      "closed (kvm_connections_refused_total{limit=\"per_address\"}); 0 = none. Default: 64")(
      "frame-read-timeout-ms", po::value<uint32_t>(),
      "a frame must arrive whole this long after its first byte, else TimedOut and the connection "
      "closes (a client trickling bytes); 0 = none. Default: 10000")(
      "max-session-send-queue-bytes", po::value<uint64_t>(),
      "unsent reply bytes one session may queue (one reply always fits); over it the session is "
      "closed (a client that does not read its replies). Default: 268435456 (256 MiB)")(
      "max-session-queued", po::value<uint32_t>(),
      "requests of one session received and not yet started; beyond: Busy. Default: 1024")(
      "data-plane", po::value<std::string>(),
      "ucx: retrieval blocks as UCX active messages to workers that offer a UCX address; none: "
      "in reply frames over TCP only. Default: ucx")(
      "ucx-error-mode", po::value<std::string>(),
      "none: keeps shared memory, liveness from heartbeats; peer: UCP_ERR_HANDLING_MODE_PEER (UCX "
      "1.13 then uses TCP only). Default: none")(
      "tls-cert", po::value<std::string>(),
      "PEM certificate chain of the control plane: TLS 1.2+ on the control port (needs "
      "--tls-key). Plaintext clients are refused and counted (kvm_tls_handshake_failures_total). "
      "The files are reloaded on SIGHUP and when they change (open sessions keep theirs)")(
      "tls-key", po::value<std::string>(), "PEM private key of --tls-cert")(
      "tls-client-ca", po::value<std::string>(),
      "PEM CA bundle: clients must present a certificate it signed (mutual TLS)")(
      "admin-tls", po::bool_switch(),
      "serve the admin port over HTTPS with --tls-cert (no client certificate asked for)")(
      "no-dev-tenant", po::bool_switch(),
      "no embedded development tenant: without --tenants-file or the config's tenants, exit 2 "
      "instead of serving tenant 'dev' (token 'dev', loopback only)")(
      "shutdown-delay-ms", po::value<uint32_t>(),
      "after SIGTERM/SIGINT keep serving this long with /readyz 503 before draining (probes and "
      "load balancers see the shard leave first); a second signal ends it. Default: 0")(
      "malloc-trim-seconds", po::value<uint32_t>(),
      "every this many seconds give the memory malloc holds free back to the system (RSS follows "
      "the live data, not the allocator's high-water mark); 0 = never. Default: 10")(
      "test-delay-open-ms", po::value<uint32_t>(),
      "FOR TESTS ONLY: sleep this long before opening the store (the admin port answers, /readyz "
      "503, the control port listens). Default: 0");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const std::exception& e) {
    Usage(e.what());
  }
  if (vm.count("help")) {
    std::cout << desc
              << "\nWith no arguments: the embedded default (loopback-only development tenant "
                 "'dev', token "
                 "'dev').\n";
    return 0;
  }
  if (vm.count("version")) {
    PrintVersion();
    return 0;
  }
  if (vm.count("verify-store")) {
    const std::string dir = vm["verify-store"].as<std::string>();
    auto r = store::VerifyStore(dir);
    if (!r.ok())
      return std::fprintf(stderr, "kvmanager: verify-store %s: %s\n", dir.c_str(),
                          r.status().ToString().c_str()),
             1;
    for (const std::string& p : r->problems) std::printf("%s\n", p.c_str());
    std::printf("verify-store %s: %s: %s\n", dir.c_str(),
                r->ok() ? "ok" : (std::to_string(r->problems.size()) + " problems").c_str(),
                r->Summary().c_str());
    return r->ok() ? 0 : 1;
  }
  if (vm.count("config")) LoadConfig(vm["config"].as<std::string>(), &c);
  if (vm.count("tls-cert")) c.tls.cert = vm["tls-cert"].as<std::string>();
  if (vm.count("tls-key")) c.tls.key = vm["tls-key"].as<std::string>();
  if (vm.count("tls-client-ca")) c.tls.client_ca = vm["tls-client-ca"].as<std::string>();
  if (vm["admin-tls"].as<bool>()) c.admin_tls = true;
  if (vm["no-dev-tenant"].as<bool>()) c.dev_tenant = false;
  if (vm.count("tenants-file")) {
    c.token_files.clear();  // the tenants file replaces the config's tenants
    LoadTenantsFile(vm["tenants-file"].as<std::string>(), &c);
  }
  if (vm.count("listen")) c.server.listen = vm["listen"].as<std::string>();
  if (vm.count("admin")) c.admin = vm["admin"].as<std::string>();
  if (vm.count("data-dir")) c.store.dir = vm["data-dir"].as<std::string>();
  if (vm.count("host-capacity-bytes"))
    c.store.host_capacity_bytes = vm["host-capacity-bytes"].as<uint64_t>();
  if (vm.count("disk-capacity-bytes"))
    c.store.disk_capacity_bytes = vm["disk-capacity-bytes"].as<uint64_t>();
  if (vm["sync"].as<bool>()) c.store.sync = true;
  if (vm["no-gpu"].as<bool>()) c.store.gpu = false;
  if (vm.count("gpu-capacity-bytes"))
    c.store.gpu_capacity_bytes = vm["gpu-capacity-bytes"].as<uint64_t>();
  if (vm.count("io-threads")) c.server.io_threads = vm["io-threads"].as<uint32_t>();
  if (vm.count("worker-threads")) c.server.worker_threads = vm["worker-threads"].as<uint32_t>();
  if (vm.count("max-in-flight")) c.server.max_in_flight = vm["max-in-flight"].as<uint32_t>();
  if (vm.count("data-plane")) c.data_plane = vm["data-plane"].as<std::string>();
  if (vm.count("ucx-error-mode")) c.ucx_error_mode = vm["ucx-error-mode"].as<std::string>();
  if (vm.count("shutdown-delay-ms")) c.shutdown_delay_ms = vm["shutdown-delay-ms"].as<uint32_t>();
  if (vm.count("malloc-trim-seconds"))
    c.malloc_trim_seconds = vm["malloc-trim-seconds"].as<uint32_t>();
  if (vm.count("test-delay-open-ms"))
    c.test_delay_open_ms = vm["test-delay-open-ms"].as<uint32_t>();
  if (vm.count("request-deadline-ms"))
    c.server.request_deadline_ms = vm["request-deadline-ms"].as<uint32_t>();
  if (vm.count("session-timeout-ms"))
    c.server.session_timeout_ms = vm["session-timeout-ms"].as<uint32_t>();
  if (vm.count("max-connections-per-address"))
    c.server.max_connections_per_address = vm["max-connections-per-address"].as<uint32_t>();
  if (vm.count("frame-read-timeout-ms"))
    c.server.frame_read_timeout_ms = vm["frame-read-timeout-ms"].as<uint32_t>();
  if (vm.count("max-session-send-queue-bytes"))
    c.server.max_session_send_queue_bytes = vm["max-session-send-queue-bytes"].as<uint64_t>();
  if (vm.count("max-session-queued"))
    c.server.max_session_queued = vm["max-session-queued"].as<uint32_t>();
  if (vm.count("max-frame-bytes"))
    c.server.handler.limits.max_frame_bytes = vm["max-frame-bytes"].as<uint64_t>();
  if (!c.dev_tenant && !c.tenants_configured) c.server.handler.tenants.clear();
  Validate(c);
  // The TLS files are read (and checked: the key matches the certificate) before anything starts.
  std::shared_ptr<server::TlsCredentials> control_tls, admin_tls;
  if (!c.tls.cert.empty()) {
    auto t = server::TlsCredentials::Load(c.tls);
    if (!t.ok()) Usage("--tls-cert/--tls-key/--tls-client-ca: " + t.status().message());
    control_tls = *t;
    if (c.admin_tls) {
      auto a = server::TlsCredentials::Load({c.tls.cert, c.tls.key, ""});
      if (!a.ok()) Usage("--admin-tls: " + a.status().message());
      admin_tls = *a;
    }
  }
  const std::string tls_line =
      c.tls.cert.empty()
          ? "off (plaintext control plane)"
          : "TLS 1.2+ with " + c.tls.cert +
                (c.tls.client_ca.empty() ? std::string(", no client certificates")
                                         : ", client certificates signed by " + c.tls.client_ca) +
                (c.admin_tls ? "; admin port HTTPS" : "; admin port plain HTTP");
  c.server.tls = control_tls;
  if (vm["check-config"].as<bool>()) {
    std::string names;
    for (const auto& t : c.server.handler.tenants) {
      std::string limits;
      for (const auto& [key, v] :
           {std::pair<const char*, uint64_t>{"max_sequences", t.max_sequences},
            {"max_stored_bytes", t.max_stored_bytes},
            {"max_in_flight", t.max_in_flight},
            {"max_connections", t.max_connections}})
        if (v) limits += std::string(", ") + key + " " + std::to_string(v);
      names += (names.empty() ? "" : ", ") + t.name + " (token of " +
               std::to_string(t.token.size()) + " bytes" +
               (t.loopback_only ? ", loopback only" : "") + limits + ")";
    }
    std::printf(
        "config ok\ncontrol plane %s, admin %s, data dir %s, data plane %s\nhost tier %s\n"
        "tenants: %s\ntls: %s\nlimits: max_connections_per_address %u, frame_read_timeout_ms %u, "
        "max_session_send_queue_bytes %llu, max_session_queued %u (0 = none)\n",
        c.server.listen.c_str(), c.admin.c_str(), c.store.dir.c_str(), c.data_plane.c_str(),
        DescribeHostTier(c).c_str(), names.c_str(), tls_line.c_str(),
        c.server.max_connections_per_address, c.server.frame_read_timeout_ms,
        static_cast<unsigned long long>(c.server.max_session_send_queue_bytes),
        c.server.max_session_queued);
    return 0;
  }

  // Block the stop signals before any thread starts; the main thread waits for them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigset_t stop_sigs = sigs;
  sigaddset(&sigs, SIGHUP);  // reloads the TLS certificates
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  // 1. The control port, bound and listening before anything is opened.
  Lifecycle life;
  auto listen_fd = BindControlPort(c.server.listen, &life.control);
  if (!listen_fd.ok())
    return std::fprintf(stderr, "kvmanager: %s\n", listen_fd.status().ToString().c_str()), 1;
  c.server.listen_fd = *listen_fd;

  // 2. The admin server: /healthz 200 from here on, /readyz 503 until the control plane serves.
  server::Metrics metrics;
  c.server.handler.metrics = &metrics;
  server::AdminOptions ao;
  ao.listen = c.admin;
  ao.tls = admin_tls;
  ao.readiness = [&] { return life.NotReady(); };
  ao.refresh = [&] {
    metrics.SetReady(life.NotReady().empty());
    metrics.SetDegraded(life.degraded.load());
    store::BlockStore* st_ptr = life.store.load();
    if (!st_ptr) return;
    metrics.RefreshStore(st_ptr->Stats(), c.store.disk_capacity_bytes);
  };
  ao.status = [&] { return life.StatusJson(c.store.disk_capacity_bytes).dump(2) + "\n"; };
  auto admin = server::AdminServer::Start(ao, &metrics);
  if (!admin.ok()) {
    close(*listen_fd);
    return std::fprintf(stderr, "kvmanager: %s\n", admin.status().ToString().c_str()), 1;
  }
  const std::string admin_address =
      wire::ParseHostPort(c.admin)->first + ":" + std::to_string((*admin)->port());
  life.Set(&Lifecycle::admin, admin_address);
  std::printf("kvmanager admin on %s (/metrics /healthz /readyz /status)\n", admin_address.c_str());
  std::printf("kvmanager control port %s bound; opening the store in %s\n", life.control.c_str(),
              c.store.dir.c_str());
  std::fflush(stdout);

  // 3. The store (RocksDB recovery included), the data plane, then the control plane.
  if (c.test_delay_open_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(c.test_delay_open_ms));
  auto store = store::BlockStore::Open(c.store);
  if (!store.ok()) {
    (*admin)->Stop();
    close(*listen_fd);
    return std::fprintf(stderr, "kvmanager: %s\n", store.status().ToString().c_str()), 1;
  }
  life.store.store(store->get());
  (*store)->SetQuotas(server::StoreQuotas(c.server.handler.tenants));  // the tenants' quotas
  std::unique_ptr<transport::Transport> data_plane;
  std::string data_plane_name = "none";
  if (c.data_plane == "ucx") {
    auto t = transport::MakeUcx(
        {.progress_thread = true, .peer_error_mode = c.ucx_error_mode == "peer"});
    if (t.ok()) {
      data_plane = std::move(*t);
      c.server.handler.data_plane = data_plane.get();
      data_plane_name = "ucx";
      // Replies are sent from the host tier: registered with UCX once, each mapping as it is made.
      (*store)->OnHostMemory([dp = data_plane.get()](void* base, size_t len) {
        if (Status st = dp->Register(base, len); !st.ok())
          std::fprintf(stderr, "kvmanager: host tier not registered with UCX (%s)\n",
                       st.ToString().c_str());
      });
    } else {  // still correct, only slower: ready, but degraded
      data_plane_name = "tcp";
      life.Set(&Lifecycle::degraded_reason, "UCX data plane unavailable (" + t.status().ToString() +
                                                "): retrieval blocks go over TCP");
      life.degraded.store(true);
      std::fprintf(stderr, "kvmanager: UCX unavailable (%s): blocks go over TCP (degraded)\n",
                   t.status().ToString().c_str());
    }
  }
  life.Set(&Lifecycle::data_plane, data_plane_name);
  auto srv = server::Server::Start(c.server, store->get());
  if (!srv.ok()) {
    (*admin)->Stop();
    return std::fprintf(stderr, "kvmanager: %s\n", srv.status().ToString().c_str()), 1;
  }
  life.serving.store(true);
  metrics.SetReady(life.NotReady().empty());
  metrics.SetDegraded(life.degraded.load());
  std::printf("kvmanager listening on %s (control plane), data dir %s\n", life.control.c_str(),
              c.store.dir.c_str());
  std::printf("kvmanager data plane: %s\n", data_plane
                                                ? "ucx (active messages, event-driven progress)"
                                            : life.degraded ? "tcp (UCX failed: degraded)"
                                                            : "none (TCP only)");
  std::printf("kvmanager GPU tier: %s\n", (*store)->Stats().gpu_tier.c_str());
  std::printf("kvmanager host tier: %s\n", DescribeHostTier(c).c_str());
  std::printf("kvmanager tls: %s\n", tls_line.c_str());
  std::fflush(stdout);

  // 4. Serve until SIGTERM/SIGINT. The TLS certificates, and the tenants with their tokens, are
  // reloaded on SIGHUP and when their files change (checked every second; Kubernetes rewrites a
  // mounted Secret without a signal):
  // new connections get the new ones, open sessions keep theirs; a failed reload (a half-written
  // pair, say) keeps the current ones and says why, and the next change tries again.
  std::vector<std::string> tls_files;
  for (const std::string* f : {&c.tls.cert, &c.tls.key, &c.tls.client_ca})
    if (!f->empty()) tls_files.push_back(*f);
  std::string stamps = FileStamps(tls_files);
  // The tenants and their tokens, from the config / tenants file and the token files they name,
  // re-read the same way (a bad file keeps the current tenants and says why).
  auto tenant_sources = [&](const std::vector<std::string>& token_files) {
    std::vector<std::string> f = token_files;
    if (vm.count("config")) f.push_back(vm["config"].as<std::string>());
    if (vm.count("tenants-file")) f.push_back(vm["tenants-file"].as<std::string>());
    return f;
  };
  std::vector<std::string> tenant_files =
      c.tenants_configured ? tenant_sources(c.token_files) : std::vector<std::string>();
  std::string tenant_stamps = FileStamps(tenant_files);
  auto reload_tenants = [&](const char* why) {
    if (!c.tenants_configured) return;  // the embedded development tenant: nothing to re-read
    Config fresh;
    g_usage_throws = true;
    try {
      if (vm.count("config")) LoadConfig(vm["config"].as<std::string>(), &fresh);
      if (vm.count("tenants-file")) {
        fresh.token_files.clear();
        LoadTenantsFile(vm["tenants-file"].as<std::string>(), &fresh);
      }
      if (!fresh.tenants_configured) Usage("the config no longer lists tenants");
    } catch (const ReloadError& e) {
      g_usage_throws = false;
      std::fprintf(stderr, "kvmanager: %s: tenants reload failed, the current tenants stay: %s\n",
                   why, e.what());
      return;
    }
    g_usage_throws = false;
    const size_t n = fresh.server.handler.tenants.size();
    (*store)->SetQuotas(server::StoreQuotas(fresh.server.handler.tenants));
    (*srv)->SetTenants(std::move(fresh.server.handler.tenants));
    tenant_files = tenant_sources(fresh.token_files);
    tenant_stamps = FileStamps(tenant_files);
    std::fprintf(stderr,
                 "kvmanager: %s: tenants reloaded (%zu; new Hellos use their tokens, open sessions "
                 "stay; quotas and limits apply from now on)\n",
                 why, n);
  };
  auto reload = [&](const char* why) {
    if (!control_tls) {
      std::fprintf(stderr, "kvmanager: %s: TLS is off, nothing to reload\n", why);
      return;
    }
    Status st = control_tls->Reload();
    if (st.ok() && admin_tls) st = admin_tls->Reload();
    if (st.ok())
      std::fprintf(stderr,
                   "kvmanager: %s: TLS certificates reloaded (new connections use them, open "
                   "sessions keep theirs)\n",
                   why);
    else
      std::fprintf(stderr, "kvmanager: %s: TLS reload failed, the current certificates stay: %s\n",
                   why, st.ToString().c_str());
  };
  int sig = 0;
  auto last_trim = std::chrono::steady_clock::now();
  for (;;) {
    const timespec second{1, 0};
    sig = sigtimedwait(&sigs, nullptr, &second);
    if (sig == SIGTERM || sig == SIGINT) break;
    if (sig == SIGHUP) {
      stamps = FileStamps(tls_files);
      if (control_tls) reload("SIGHUP");
      reload_tenants("SIGHUP");
      continue;
    }
    // Leases (CreateSequence.lease_ms): sequences unused for longer are deleted, once a second.
    if (auto expired = (*srv)->ExpireLeases(); !expired.ok())
      std::fprintf(stderr, "kvmanager: lease expiry failed: %s\n",
                   expired.status().ToString().c_str());
    else if (*expired > 0)
      std::fprintf(stderr, "kvmanager: %llu sequence(s) deleted: their leases ran out\n",
                   static_cast<unsigned long long>(*expired));
    if (c.malloc_trim_seconds && std::chrono::steady_clock::now() - last_trim >=
                                     std::chrono::seconds(c.malloc_trim_seconds)) {
      malloc_trim(0);
      last_trim = std::chrono::steady_clock::now();
    }
    if (std::string now = FileStamps(tenant_files); now != tenant_stamps) {
      tenant_stamps = std::move(now);
      reload_tenants("tenant files changed");
    }
    if (control_tls) {
      std::string now = FileStamps(tls_files);
      if (now != stamps) {
        stamps = std::move(now);
        reload("TLS files changed");
      }
    }
  }
  // 5. Stop: not ready at once; serve on for the shutdown delay; drain; close.
  life.draining.store(true);
  metrics.SetReady(false);
  std::fprintf(stderr, "kvmanager: signal %d: not ready; draining%s\n", sig,
               c.shutdown_delay_ms ? " after the shutdown delay" : "");
  if (c.shutdown_delay_ms) {
    const timespec ts{time_t(c.shutdown_delay_ms / 1000),
                      long(c.shutdown_delay_ms % 1000) * 1000000};
    if (sigtimedwait(&stop_sigs, nullptr, &ts) > 0)
      std::fprintf(stderr, "kvmanager: second signal: shutdown delay cut short\n");
  }
  (*srv)->Stop(10000);
  (*admin)->Stop();  // before the store goes: /status reads it
  admin->reset();
  srv->reset();
  (*store)->OnHostMemory(nullptr);  // the data plane goes first
  data_plane.reset();               // after the server: no session uses it any more
  store->reset();                   // closes RocksDB (WAL already durable for acknowledged appends)
  std::fprintf(stderr, "kvmanager: stopped\n");
  return 0;
}
