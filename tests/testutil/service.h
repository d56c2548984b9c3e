// Test helpers: a block store in a temporary directory, and a kvmanager (that store + the Asio
// server on a free loopback port) in the test process. Both clean up after themselves.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "kvmanager/block_store.h"
#include "kvmanager/server.h"

namespace kvm::testutil {

// No GPU tier unless `gpu_device` gives one (tests compare with the CPU's exact results).
struct TempStore {
  explicit TempStore(uint64_t host_capacity_bytes = 64 << 20,
                     std::function<Result<std::unique_ptr<store::Device>>()> gpu_device = nullptr,
                     const std::function<void(store::StoreOptions&)>& tweak = nullptr) {
    char tmpl[] = "/tmp/kvm_test_store_XXXXXX";
    dir = mkdtemp(tmpl);
    store::StoreOptions so;
    so.dir = dir;
    so.host_capacity_bytes = host_capacity_bytes;
    so.gpu = gpu_device != nullptr;
    so.gpu_device = std::move(gpu_device);
    if (tweak) tweak(so);
    store = std::move(store::BlockStore::Open(so)).value();
  }
  ~TempStore() {
    store.reset();
    std::filesystem::remove_all(dir);
  }
  std::string dir;
  std::unique_ptr<store::BlockStore> store;
};

// `o.listen` is replaced by a free loopback port; no tenants given: the development tenant
// ("dev", token "dev", loopback only).
struct TestService : TempStore {
  explicit TestService(server::ServerOptions o = {}, uint64_t host_capacity_bytes = 64 << 20,
                       const std::function<void(store::StoreOptions&)>& tweak = nullptr)
      : TempStore(host_capacity_bytes, nullptr, tweak) {
    o.listen = "127.0.0.1:0";
    if (o.handler.tenants.empty()) o.handler.tenants = {{"dev", "dev", true}};
    server = std::move(server::Server::Start(o, store.get())).value();
  }
  ~TestService() { server.reset(); }  // before the store goes
  std::unique_ptr<server::Server> server;
};

}  // namespace kvm::testutil
