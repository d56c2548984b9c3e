// kvmanager: one shard of the service. With no arguments it runs the embedded default: the control
// plane on 127.0.0.1:7420, RocksDB under ./kvmanager-data, a host tier of min(25% of memory, 16
// GiB) and a loopback-only development tenant "dev" (token "dev"). SIGTERM/SIGINT drain the
// requests in flight and close RocksDB cleanly.
#include <signal.h>
#include <yaml-cpp/yaml.h>

#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include "kvmanager/admin.h"
#include "kvmanager/block_store.h"
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

// Reads the YAML config file; a bad value names its field and exits 2.
void LoadConfig(const std::string& path, Config* c) {
  YAML::Node y;
  try {
    y = YAML::LoadFile(path);
  } catch (const std::exception& e) {
    Usage("config " + path + ": " + e.what());
  }
  auto get = [&](const char* key, auto* out) {
    if (!y[key]) return;
    try {
      *out = y[key].as<std::decay_t<decltype(*out)>>();
    } catch (const std::exception&) {
      Usage("config " + path + ": field '" + key + "' has a bad value");
    }
  };
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
  if (y["tenants"]) {
    if (!y["tenants"].IsSequence()) Usage("config " + path + ": field 'tenants' must be a list");
    c->server.handler.tenants.clear();
    for (const auto& t : y["tenants"]) {
      server::TenantConfig tc;
      if (!t["name"] || !t["token"])
        Usage("config " + path + ": every entry of 'tenants' needs 'name' and 'token'");
      tc.name = t["name"].as<std::string>();
      tc.token = t["token"].as<std::string>();
      tc.loopback_only = t["loopback_only"] ? t["loopback_only"].as<bool>() : false;
      c->server.handler.tenants.push_back(tc);
    }
  }
}
}  // namespace

int main(int argc, char** argv) {
  Config c;
  c.store.dir = "./kvmanager-data";
  c.server.handler.tenants = {{"dev", "dev", true}};
  po::options_description desc(
      "kvmanager options (a --config YAML file uses the same names with '_')");
  desc.add_options()("help", "print this help")(
      "listen", po::value<std::string>(),
      "control plane HOST:PORT; port 0 picks a free one. Default: 127.0.0.1:7420")(
      "admin", po::value<std::string>(),
      "admin HTTP HOST:PORT (/metrics /healthz /readyz /status); port 0 picks one. Default: "
      "127.0.0.1:7421")("data-dir", po::value<std::string>(),
                        "RocksDB directory. Default: ./kvmanager-data")(
      "config", po::value<std::string>(), "YAML config file (flags override it)")(
      "host-capacity-bytes", po::value<uint64_t>(),
      "host tier size. Default: min(25% of available memory, 16 GiB)")(
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
  if (vm.count("config")) LoadConfig(vm["config"].as<std::string>(), &c);
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
  if (c.data_plane != "ucx" && c.data_plane != "none")
    Usage("--data-plane: '" + c.data_plane + "' is not ucx or none");
  if (vm.count("ucx-error-mode")) c.ucx_error_mode = vm["ucx-error-mode"].as<std::string>();
  if (c.ucx_error_mode != "none" && c.ucx_error_mode != "peer")
    Usage("--ucx-error-mode: '" + c.ucx_error_mode + "' is not none or peer");
  if (vm.count("request-deadline-ms"))
    c.server.request_deadline_ms = vm["request-deadline-ms"].as<uint32_t>();
  if (vm.count("session-timeout-ms"))
    c.server.session_timeout_ms = vm["session-timeout-ms"].as<uint32_t>();
  if (vm.count("max-frame-bytes"))
    c.server.handler.limits.max_frame_bytes = vm["max-frame-bytes"].as<uint64_t>();
  if (!wire::ParseHostPort(c.server.listen).ok())
    Usage("--listen: '" + c.server.listen + "' is not HOST:PORT");
  if (!wire::ParseHostPort(c.admin).ok()) Usage("--admin: '" + c.admin + "' is not HOST:PORT");

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
  std::printf("kvmanager admin on 127.0.0.1:%u (/metrics /healthz /readyz /status)\n",
              unsigned((*admin)->port()));
  std::printf("kvmanager data plane: %s\n",
              data_plane ? "ucx (active messages, event-driven progress)" : "none (TCP only)");
  std::printf("kvmanager GPU tier: %s\n", (*store)->Stats().gpu_tier.c_str());
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
