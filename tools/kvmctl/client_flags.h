// Flags that every kvmctl command talking to a kvmanager shares: the tenant and its token (read
// from a file, never given on the command line), and the shard a single-sequence command uses
// when --server lists several shards (client/shards.h: the sequence's owner).
#pragma once

#include <cstdint>
#include <string>

#include "client/client.h"
#include "flags.h"

namespace kvm::tools {

// The token in `path`, its trailing newline (\n or \r\n) stripped. UsageError naming --token-file
// when the file cannot be read or holds nothing.
std::string ReadAuthToken(const std::string& path);

// --tenant NAME (default "dev") and --token-file FILE (default: the development token "dev"), and
// TLS: --tls-ca FILE (TLS on, the server's certificate verified against it and the address's host)
// with --tls-cert FILE --tls-key FILE (a client certificate, for mutual TLS) into `co`. UsageError
// for --tls-cert/--tls-key without --tls-ca or one without the other. REQUIRES: every flag of
// kAuthFlags is among the command's value flags.
void ApplyAuthFlags(const Flags& f, client::ConnectOptions* co);
// The value flags ApplyAuthFlags reads.
inline const std::set<std::string> kAuthFlags = {"tenant", "token-file", "tls-ca", "tls-cert",
                                                 "tls-key"};

// The address a single-sequence command connects to for `sequence_id`: `server` itself when it
// names one shard, else the sequence's owner among the listed shards (rendezvous placement of
// (tenant, sequence id), as ShardSet::Place). UsageError naming --server for a bad list.
std::string ShardForSequence(const std::string& server, const std::string& tenant,
                             uint64_t sequence_id);

}  // namespace kvm::tools
