#include "flags.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>

namespace kvm::tools {

Flags::Flags(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
             const std::set<std::string>& bool_flags) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + a + "'");
    std::string name = a.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (bool_flags.count(name)) {
      if (inline_value) throw UsageError("--" + name + " takes no value");
      bools_.insert(name);
    } else if (value_flags.count(name)) {
      if (!inline_value) {
        if (i + 1 >= args.size()) throw UsageError("--" + name + " needs a value");
        value = args[++i];
      }
      values_[name] = value;
    } else {
      throw UsageError("unknown flag --" + name);
    }
  }
}

std::optional<std::string> Flags::Str(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::string Flags::Str(const std::string& name, const std::string& def) const {
  return Str(name).value_or(def);
}

std::string Flags::Required(const std::string& name) const {
  auto v = Str(name);
  if (!v) throw UsageError("--" + name + " is required");
  return *v;
}

int64_t Flags::Int(const std::string& name, int64_t def, int64_t min, int64_t max) const {
  auto v = Str(name);
  if (!v) return def;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v->c_str(), &end, 10);
  if (v->empty() || *end || errno)
    throw UsageError("--" + name + ": '" + *v + "' is not an integer");
  if (x < min || x > max)
    throw UsageError("--" + name + ": " + *v + " is outside [" + std::to_string(min) + ", " +
                     std::to_string(max) + "]");
  return x;
}

double Flags::Double(const std::string& name, double def, double min, double max) const {
  auto v = Str(name);
  if (!v) return def;
  char* end = nullptr;
  const double x = std::strtod(v->c_str(), &end);
  if (v->empty() || *end || !std::isfinite(x))
    throw UsageError("--" + name + ": '" + *v + "' is not a number");
  if (x < min || x > max)
    throw UsageError("--" + name + ": " + *v + " is outside [" + std::to_string(min) + ", " +
                     std::to_string(max) + "]");
  return x;
}

std::string RepoRoot() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  for (auto d = p.parent_path(); !d.empty() && d != d.root_path(); d = d.parent_path())
    if (std::filesystem::exists(d / "models") && std::filesystem::exists(d / "CMakeLists.txt"))
      return d.string();
  return "";
}

std::string PathOrDefault(const Flags& f, const std::string& flag, const std::string& rel) {
  if (auto v = f.Str(flag)) return *v;
  const std::string root = RepoRoot();
  if (!root.empty() && std::filesystem::exists(root + "/" + rel)) return root + "/" + rel;
  throw UsageError("--" + flag + " is required (no default " + rel + " found next to this binary)");
}

}  // namespace kvm::tools
