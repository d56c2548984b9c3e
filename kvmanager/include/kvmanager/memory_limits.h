// Memory limits: how much memory this process may use — the node's MemAvailable and, in a
// container, the cgroup v2 `memory.max` of its cgroup (cgroup v1: `memory.limit_in_bytes`) — and
// the default host-tier size computed
// from them. A pod's memory limit is usually far below the node's MemAvailable; sizing the host
// tier from the node would get the pod OOM-killed. The parsers and DefaultHostCapacity are pure
// functions; ReadMemoryLimits reads the files. Thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace kvm::store {

struct MemoryLimits {
  uint64_t mem_available = 0;          // /proc/meminfo MemAvailable in bytes; 0 = unknown
  std::optional<uint64_t> cgroup_max;  // tightest cgroup memory limit; nullopt = none ("max")
};

// The default host-tier size: `fraction` of min(mem_available, cgroup_max), at most `cap`.
// mem_available 0 means unknown (then the cgroup limit alone counts); when neither is known: 1 GiB.
uint64_t DefaultHostCapacity(uint64_t mem_available, std::optional<uint64_t> cgroup_max,
                             double fraction = 0.25, uint64_t cap = uint64_t{16} << 30);

// MemAvailable of a /proc/meminfo text, in bytes; nullopt when the line is missing or malformed.
std::optional<uint64_t> ParseMemAvailable(std::string_view meminfo);
// A cgroup memory limit (v2 memory.max, v1 memory.limit_in_bytes): "max" and v1's "unlimited"
// (any value from 2^62 up) → nullopt, as is anything malformed; else the bytes.
std::optional<uint64_t> ParseCgroupMemoryMax(std::string_view text);
// The cgroup v2 path ("0::/a/b" line) of a /proc/self/cgroup text, e.g. "/a/b"; nullopt without
// one.
std::optional<std::string> ParseCgroupV2Path(std::string_view proc_self_cgroup);
// The cgroup v1 memory controller's path ("4:memory:/a/b" line); nullopt without one.
std::optional<std::string> ParseCgroupV1MemoryPath(std::string_view proc_self_cgroup);

// Reads MemAvailable from `proc`/meminfo and the smallest memory limit of this process's cgroup and
// its ancestors: cgroup v2 `cgroup_root`<path>/memory.max, cgroup v1
// `cgroup_root`/memory<path>/memory.limit_in_bytes. Inside a container's cgroup namespace the path
// is "/", so it is `cgroup_root`/memory.max. Missing or unreadable files count as unknown / no
// limit.
MemoryLimits ReadMemoryLimits(const std::string& proc = "/proc",
                              const std::string& cgroup_root = "/sys/fs/cgroup");

}  // namespace kvm::store
