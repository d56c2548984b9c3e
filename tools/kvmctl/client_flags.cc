#include "client_flags.h"

#include <fstream>
#include <sstream>

#include "client/shards.h"

namespace kvm::tools {

std::string ReadAuthToken(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UsageError("--token-file: cannot read '" + path + "'");
  std::ostringstream s;
  s << f.rdbuf();
  std::string t = s.str();
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.pop_back();
  if (t.empty()) throw UsageError("--token-file: '" + path + "' is empty");
  return t;
}

void ApplyAuthFlags(const Flags& f, client::ConnectOptions* co) {
  co->tenant = f.Str("tenant", "dev");
  if (auto path = f.Str("token-file")) co->token = ReadAuthToken(*path);
  if (f.Has("tls-cert") != f.Has("tls-key"))
    throw UsageError("--tls-cert and --tls-key go together");
  if (f.Has("tls-cert") && !f.Has("tls-ca"))
    throw UsageError("--tls-cert/--tls-key: only with --tls-ca (TLS)");
  co->tls_ca = f.Str("tls-ca", "");
  co->tls_cert = f.Str("tls-cert", "");
  co->tls_key = f.Str("tls-key", "");
}

std::string ShardForSequence(const std::string& server, const std::string& tenant,
                             uint64_t sequence_id) {
  auto list = client::ShardSet::ParseList(server);
  if (!list.ok()) throw UsageError("--server: " + list.status().message());
  return (*list)[client::ShardSet::Place(*list, tenant, sequence_id)];
}

}  // namespace kvm::tools
