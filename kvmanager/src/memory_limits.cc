#include "kvmanager/memory_limits.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <sstream>

namespace kvm::store {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\n' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

std::optional<uint64_t> ParseU64(std::string_view s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return std::nullopt;
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

uint64_t DefaultHostCapacity(uint64_t mem_available, std::optional<uint64_t> cgroup_max,
                             double fraction, uint64_t cap) {
  uint64_t basis = mem_available;
  if (cgroup_max && (basis == 0 || *cgroup_max < basis)) basis = *cgroup_max;
  if (basis == 0) return std::min(uint64_t{1} << 30, cap);
  const auto want = static_cast<uint64_t>(static_cast<double>(basis) * fraction);
  return std::min(want, cap);
}

std::optional<uint64_t> ParseMemAvailable(std::string_view meminfo) {
  // A line "MemAvailable:   12345 kB".
  size_t pos = 0;
  while (pos < meminfo.size()) {
    size_t end = meminfo.find('\n', pos);
    if (end == std::string_view::npos) end = meminfo.size();
    std::string_view line = meminfo.substr(pos, end - pos);
    pos = end + 1;
    constexpr std::string_view kKey = "MemAvailable:";
    if (line.substr(0, kKey.size()) != kKey) continue;
    line = Trim(line.substr(kKey.size()));
    if (line.size() < 3 || line.substr(line.size() - 2) != "kB") return std::nullopt;
    auto kb = ParseU64(Trim(line.substr(0, line.size() - 2)));
    if (!kb || *kb > (UINT64_MAX >> 10)) return std::nullopt;
    return *kb << 10;
  }
  return std::nullopt;
}

std::optional<uint64_t> ParseCgroupMemoryMax(std::string_view text) {
  text = Trim(text);
  if (text == "max") return std::nullopt;
  auto v = ParseU64(text);
  if (v && *v >= (uint64_t{1} << 62)) return std::nullopt;  // v1: 9223372036854771712 = unlimited
  return v;
}

namespace {
// The path of the first /proc/self/cgroup line "ID:CONTROLLERS:PATH" whose controllers field
// satisfies `want`.
template <typename Pred>
std::optional<std::string> CgroupPath(std::string_view text, Pred want) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    const size_t a = line.find(':');
    const size_t b = a == std::string_view::npos ? a : line.find(':', a + 1);
    if (b == std::string_view::npos) continue;
    if (!want(line.substr(0, a), line.substr(a + 1, b - a - 1))) continue;
    const std::string_view p = Trim(line.substr(b + 1));
    if (p.empty() || p.front() != '/') return std::nullopt;
    return std::string(p);
  }
  return std::nullopt;
}

// The smallest limit in `file` of the cgroup `path` (under `root`) and of each of its ancestors.
std::optional<uint64_t> TightestLimit(const std::string& root, std::string path,
                                      const std::string& file) {
  std::optional<uint64_t> best;
  while (true) {
    const std::string dir = path == "/" ? root : root + path;
    if (auto t = ReadFile(dir + "/" + file))
      if (auto v = ParseCgroupMemoryMax(*t)) best = best ? std::min(*best, *v) : *v;
    if (path == "/") break;
    const size_t slash = path.find_last_of('/');
    path = slash == 0 ? "/" : path.substr(0, slash);
  }
  return best;
}
}  // namespace

std::optional<std::string> ParseCgroupV2Path(std::string_view proc_self_cgroup) {
  return CgroupPath(proc_self_cgroup, [](std::string_view id, std::string_view controllers) {
    return id == "0" && controllers.empty();
  });
}

std::optional<std::string> ParseCgroupV1MemoryPath(std::string_view proc_self_cgroup) {
  return CgroupPath(proc_self_cgroup, [](std::string_view, std::string_view controllers) {
    // "memory" alone or in a comma-separated list of co-mounted controllers
    size_t pos = 0;
    while (pos <= controllers.size()) {
      size_t end = controllers.find(',', pos);
      if (end == std::string_view::npos) end = controllers.size();
      if (controllers.substr(pos, end - pos) == "memory") return true;
      pos = end + 1;
    }
    return false;
  });
}

MemoryLimits ReadMemoryLimits(const std::string& proc, const std::string& cgroup_root) {
  MemoryLimits m;
  if (auto t = ReadFile(proc + "/meminfo")) m.mem_available = ParseMemAvailable(*t).value_or(0);
  const std::string self = ReadFile(proc + "/self/cgroup").value_or("");
  std::optional<uint64_t> v2 =
      TightestLimit(cgroup_root, ParseCgroupV2Path(self).value_or("/"), "memory.max");
  std::optional<uint64_t> v1 =
      TightestLimit(cgroup_root + "/memory", ParseCgroupV1MemoryPath(self).value_or("/"),
                    "memory.limit_in_bytes");
  if (v2 && v1)
    m.cgroup_max = std::min(*v2, *v1);
  else
    m.cgroup_max = v2 ? v2 : v1;
  return m;
}

}  // namespace kvm::store
