// Command-line flags of kvmctl: `--name value` and boolean `--name`. Unknown flags, missing values
// and unparsable numbers throw UsageError naming the flag; main() prints it with the usage, exit 2.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvm::tools {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Flags {
 public:
  // `value_flags` take a value, `bool_flags` do not; anything else is a usage error.
  Flags(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
        const std::set<std::string>& bool_flags);
  bool Has(const std::string& name) const { return values_.count(name) || bools_.count(name); }
  std::optional<std::string> Str(const std::string& name) const;
  std::string Str(const std::string& name, const std::string& def) const;
  std::string Required(const std::string& name) const;
  int64_t Int(const std::string& name, int64_t def, int64_t min, int64_t max) const;
  double Double(const std::string& name, double def, double min, double max) const;
  bool Bool(const std::string& name) const { return bools_.count(name) > 0; }

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> bools_;
};

// The repository root found from the running binary (walks up until models/ exists), or "".
std::string RepoRoot();
// `flag`'s value, else `rel` under RepoRoot() when that file exists; else a UsageError.
std::string PathOrDefault(const Flags& f, const std::string& flag, const std::string& rel);

}  // namespace kvm::tools
