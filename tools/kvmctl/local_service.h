// A kvmanager child process on free loopback ports, in a temporary data directory, stopped (and
// the directory removed) when it goes: what `kvmctl demo` and `kvmctl bench decode` run against
// when no --server is given. Not thread-safe.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "flags.h"
#include "proto/status.h"

namespace kvm::tools {

class LocalService {
 public:
  ~LocalService() { Stop(); }
  // Starts `binary` with --listen/--admin on port 0 and `extra` flags; waits for its "listening on"
  // line. Unavailable when it did not start.
  Status Start(const std::string& binary, const std::vector<std::string>& extra = {});
  void Stop();
  const std::string& address() const { return address_; }

 private:
  pid_t pid_ = -1;
  std::string dir_, address_;
};

// The kvmanager binary: --kvmanager, else the one built beside this kvmctl; UsageError otherwise.
std::string FindKvmanager(const Flags& f);

}  // namespace kvm::tools
