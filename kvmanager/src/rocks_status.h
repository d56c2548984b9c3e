// Internal to the block store: a RocksDB status as kvmanager's Status. Each failure keeps a code
// that says what it is: Unavailable only for a store that is shutting down (the caller's peer is
// going away), never for an I/O error, which a worker would otherwise read as a lost connection.
#pragma once

#include <rocksdb/status.h>

#include <string>

#include "proto/status.h"

namespace kvm::store {

inline Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  const std::string msg = what + ": " + s.ToString();
  if (s.IsNoSpace() || s.ToString().find("No space") != std::string::npos)
    return Status::NoSpace(msg);
  if (s.IsCorruption()) return Status::Corruption(msg);
  if (s.IsNotFound()) return Status::NotFound(msg);
  if (s.IsBusy()) return Status::Busy(msg);
  if (s.IsTryAgain()) return Status::TryAgain(msg);
  if (s.IsTimedOut()) return Status::TimedOut(msg);
  if (s.IsInvalidArgument()) return Status::InvalidArgument(msg);
  if (s.IsNotSupported()) return Status::Unimplemented(msg);
  if (s.IsShutdownInProgress()) return Status::Unavailable(msg);
  return Status::Internal(msg);  // IOError, Aborted, Incomplete, ...
}

}  // namespace kvm::store
