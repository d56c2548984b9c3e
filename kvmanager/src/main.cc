// kvmanager: one shard of the service. With no arguments it runs the embedded default: the control
// plane on 127.0.0.1:7420, RocksDB under ./kvmanager-data, a host tier of min(25% of the memory
// it may use, 16 GiB) and a loopback-only development tenant "dev" (token "dev"). SIGTERM/SIGINT
// drain the requests in flight and close RocksDB cleanly.
//
// Configuration: flags override a YAML --config file (the same names with '_'); --tenants-file
// replaces the tenants. Tokens come from files (the config, the tenants file or a tenant's
// token_file), never from the command line. --check-config validates all of it and exits without
// opening the store or binding a port; --version prints the version and the build's options.
#include <signal.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include "kvmanager/admin.h"
#include "kvmanager/block_store.h"
#include "kvmanager/host_arena.h"
#include "kvmanager/memory_limits.h"
#include "kvmanager/metrics.h"
#include "kvmanager/server.h"
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
};

[[noreturn]] void Usage(const std::string& msg) {
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

// A tenants list [{name, token | token_file, loopback_only}]. Messages start with `prefix` ("config
// F: ") and name the field ("field 'tenants[1].token_file'"); relative token_file paths are
// resolved against base_dir. Exits 2 on an empty list, an unknown or missing field, a duplicate
// name, an empty or unreadable token.
std::vector<server::TenantConfig> ParseTenants(const YAML::Node& list, const std::string& prefix,
                                               const std::string& base_dir) {
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
      if (k != "name" && k != "token" && k != "token_file" && k != "loopback_only")
        Usage(field(at) + ": unknown field '" + k + "' (name, token, token_file, loopback_only)");
    }
    server::TenantConfig tc;
    std::string token_file;
    GetScalar(t, "name", field(at + ".name"), &tc.name);
    GetScalar(t, "token", field(at + ".token"), &tc.token);
    GetScalar(t, "token_file", field(at + ".token_file"), &token_file);
    GetScalar(t, "loopback_only", field(at + ".loopback_only"), &tc.loopback_only);
    if (tc.name.empty()) Usage(field(at + ".name") + " is missing");
    if (t["token"] && t["token_file"]) Usage(field(at) + ": give token or token_file, not both");
    if (!t["token"] && !t["token_file"]) Usage(field(at) + ": needs token or token_file");
    if (t["token_file"])
      tc.token = ReadTokenFile(Resolve(token_file, base_dir), field(at + ".token_file"));
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
                                 "data_plane",
                                 "ucx_error_mode",
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
  get("data_plane", &c->data_plane);
  get("ucx_error_mode", &c->ucx_error_mode);
  if (y["tenants"])
    c->server.handler.tenants = ParseTenants(y["tenants"], "config " + path + ": ", DirOf(path));
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
    c->server.handler.tenants = ParseTenants(y["tenants"], prefix, DirOf(path));
  } else {
    c->server.handler.tenants = ParseTenants(y, prefix, DirOf(path));
  }
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
  if (c.server.handler.tenants.empty()) Usage("tenants: none (no client could authenticate)");
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
      "binds no port")("listen", po::value<std::string>(),
                       "control plane HOST:PORT; port 0 picks a free one. Default: 127.0.0.1:7420")(
      "admin", po::value<std::string>(),
      "admin HTTP HOST:PORT (/metrics /healthz /readyz /status); port 0 picks one. Default: "
      "127.0.0.1:7421")("data-dir", po::value<std::string>(),
                        "RocksDB directory. Default: ./kvmanager-data")(
      "config", po::value<std::string>(), "YAML config file (flags override it)")(
      "tenants-file", po::value<std::string>(),
      "YAML file with the tenants list [{name, token | token_file, loopback_only}] (bare or under "
      "'tenants:'); replaces the config's tenants and the development tenant. A token_file is read "
      "with its trailing newline stripped; relative paths are relative to the file naming them")(
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
      "data-plane", po::value<std::string>(),
      "ucx: retrieval blocks as UCX active messages to workers that offer a UCX address; none: "
      "in reply frames over TCP only. Default: ucx")(
      "ucx-error-mode", po::value<std::string>(),
      "none: keeps shared memory, liveness from heartbeats; peer: UCP_ERR_HANDLING_MODE_PEER (UCX "
      "1.13 then uses TCP only). Default: none");
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
  if (vm.count("config")) LoadConfig(vm["config"].as<std::string>(), &c);
  if (vm.count("tenants-file")) LoadTenantsFile(vm["tenants-file"].as<std::string>(), &c);
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
  if (vm.count("request-deadline-ms"))
    c.server.request_deadline_ms = vm["request-deadline-ms"].as<uint32_t>();
  if (vm.count("session-timeout-ms"))
    c.server.session_timeout_ms = vm["session-timeout-ms"].as<uint32_t>();
  if (vm.count("max-frame-bytes"))
    c.server.handler.limits.max_frame_bytes = vm["max-frame-bytes"].as<uint64_t>();
  Validate(c);
  if (vm["check-config"].as<bool>()) {
    std::string names;
    for (const auto& t : c.server.handler.tenants)
      names += (names.empty() ? "" : ", ") + t.name + " (token of " +
               std::to_string(t.token.size()) + " bytes" +
               (t.loopback_only ? ", loopback only)" : ")");
    std::printf(
        "config ok\ncontrol plane %s, admin %s, data dir %s, data plane %s\nhost tier %s\n"
        "tenants: %s\n",
        c.server.listen.c_str(), c.admin.c_str(), c.store.dir.c_str(), c.data_plane.c_str(),
        DescribeHostTier(c).c_str(), names.c_str());
    return 0;
  }

  // Block the stop signals before any thread starts; the main thread waits for them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  auto store = store::BlockStore::Open(c.store);
  if (!store.ok())
    return std::fprintf(stderr, "kvmanager: %s\n", store.status().ToString().c_str()), 1;
  server::Metrics metrics;
  c.server.handler.metrics = &metrics;
  std::unique_ptr<transport::Transport> data_plane;
  if (c.data_plane == "ucx") {
    auto t = transport::MakeUcx(
        {.progress_thread = true, .peer_error_mode = c.ucx_error_mode == "peer"});
    if (t.ok()) {
      data_plane = std::move(*t);
      c.server.handler.data_plane = data_plane.get();
    } else {
      std::fprintf(stderr, "kvmanager: UCX unavailable (%s): blocks go over TCP\n",
                   t.status().ToString().c_str());
    }
  }
  auto srv = server::Server::Start(c.server, store->get());
  if (!srv.ok()) return std::fprintf(stderr, "kvmanager: %s\n", srv.status().ToString().c_str()), 1;
  store::StoreStats last;  // counters are exported as the increase since the last scrape
  server::AdminOptions ao;
  ao.listen = c.admin;
  ao.ready = [] { return true; };  // the store is open and the control plane listens
  ao.refresh = [&] {
    const store::StoreStats st = (*store)->Stats();
    metrics.SetSequences(double(st.sequences));
    metrics.SetTier("host", double(st.host_bytes), double(st.host_capacity_bytes));
    metrics.SetTier("gpu", double(st.gpu.used_bytes), double(st.gpu.capacity_bytes));
    metrics.SetTier("disk", double(st.disk_bytes_written), double(c.store.disk_capacity_bytes));
    metrics.AddEvictions("host", "disk", double(st.spills - last.spills));
    metrics.AddPromotions("disk", "host", double(st.promotions - last.promotions));
    last = st;
  };
  ao.status = [&] {
    const store::StoreStats st = (*store)->Stats();
    return "{\"sequences\": " + std::to_string(st.sequences) +
           ", \"host_bytes\": " + std::to_string(st.host_bytes) +
           ", \"host_capacity_bytes\": " + std::to_string(st.host_capacity_bytes) +
           ", \"disk_bytes_written\": " + std::to_string(st.disk_bytes_written) +
           ", \"gpu_tier\": \"" + st.gpu_tier +
           "\", \"gpu_used_bytes\": " + std::to_string(st.gpu.used_bytes) +
           ", \"gpu_scored\": " + std::to_string(st.gpu.scored) +
           ", \"gpu_refused\": " + std::to_string(st.gpu.refused) + ", \"host_pinning\": \"" +
           st.host_pinning + "\", \"control\": \"" + (*srv)->address() + "\"}";
  };
  auto admin = server::AdminServer::Start(ao, &metrics);
  if (!admin.ok())
    return std::fprintf(stderr, "kvmanager: %s\n", admin.status().ToString().c_str()), 1;
  std::printf("kvmanager listening on %s (control plane), data dir %s\n", (*srv)->address().c_str(),
              c.store.dir.c_str());
  std::printf("kvmanager admin on %s:%u (/metrics /healthz /readyz /status)\n",
              wire::ParseHostPort(c.admin)->first.c_str(), unsigned((*admin)->port()));
  std::printf("kvmanager data plane: %s\n",
              data_plane ? "ucx (active messages, event-driven progress)" : "none (TCP only)");
  std::printf("kvmanager GPU tier: %s\n", (*store)->Stats().gpu_tier.c_str());
  std::printf("kvmanager host tier: %s\n", DescribeHostTier(c).c_str());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  std::fprintf(stderr, "kvmanager: signal %d: draining and stopping\n", sig);
  (*srv)->Stop(10000);
  (*admin)->Stop();
  admin->reset();
  srv->reset();
  data_plane.reset();  // after the server: no session uses it any more
  store->reset();      // closes RocksDB (WAL already durable for acknowledged appends)
  std::fprintf(stderr, "kvmanager: stopped\n");
  return 0;
}
