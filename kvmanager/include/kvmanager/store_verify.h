// An offline consistency check of a block store's directory (`kvmanager --verify-store DIR`): opens
// RocksDB read-only, after no service has it open (a store in use is refused), and checks the
// on-disk format (kvmanager/src/store_format.h, DESIGN.md §5) record by record:
//   - every durable sequence's metadata record decodes (checksum, size, shape);
//   - every full block b < length / B has its tokens record (checksum, B token ids), and the
//     content chain recomputed from those ids gives, for every (layer, KV head), content addresses
//     whose K and V block records exist, unseal and hold one block;
//   - every position of the partial tail has its tail record (checksum, token id + rows);
//   - no tail or tokens record outside what the sequences' lengths cover, none of a sequence
//     without metadata;
//   - no content record ("C…") that no sequence references: the references (refcounts, rebuilt
//     from the sequences at open) agree with the records that exist. Cache sequences' spilled
//     blocks ("S…") are allowed: the store removes them at open.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "proto/status.h"

namespace rocksdb {
class Env;
}

namespace kvm::store {

struct VerifyReport {
  uint64_t sequences = 0;       // metadata records
  uint64_t tokens = 0;          // the sequences' lengths, summed
  uint64_t full_blocks = 0;     // (sequence, block index, layer, KV head) referenced
  uint64_t block_records = 0;   // distinct content records ("C…", K and V) checked
  uint64_t shared_records = 0;  // of those, referenced by more than one sequence
  uint64_t tail_records = 0;
  uint64_t tokens_records = 0;
  uint64_t spill_records = 0;  // cache sequences' "S…" records (removed at open)
  uint64_t bytes = 0;          // value bytes read and checked
  // One line per problem, naming the sequence ("tenant/id"), block, position and record.
  std::vector<std::string> problems;
  bool ok() const { return problems.empty(); }
  // "N sequences (T tokens), F full blocks (R block records, S shared), ... X bytes checked".
  std::string Summary() const;
};

// Checks the store in `dir` (env: its file system, default the process's). An error status only
// when the directory cannot be checked at all (no store there, or a service has it open); what is
// wrong inside a store is in the report's problems.
Result<VerifyReport> VerifyStore(const std::string& dir, rocksdb::Env* env = nullptr);

}  // namespace kvm::store
