// ShardSet: a worker's view of a sharded kvmanager (DESIGN.md §7) — the shard list, which shard
// holds each sequence, and one Client per shard, opened on first use.
//
//   auto set = ShardSet::Make({.shards = *ShardSet::ParseList("a:7420,b:7420,c:7420"),
//                              .connect = {.tenant = "t", .token = token}});
//   const size_t s = (*set)->ShardFor(seq);             // a new sequence's shard
//   auto c = (*set)->Connection(s);                     // its Client (Unavailable "shard b:7420:
//   ...") auto src = ServiceKvSource::Make(*c, shape, {.sequence_id = seq, ...});
//
// Placement: rendezvous (highest-random-weight) hashing of (tenant, sequence id) over the shards'
// names. The weight of shard s for sequence q of tenant t is
//   w(s, t, q) = splitmix64(fnv1a64(s ‖ 0x00 ‖ t ‖ 0x00 ‖ q as 8 little-endian bytes))
// (FNV-1a 64: offset basis 0xcbf29ce484222325, prime 0x100000001b3; splitmix64: the finaliser of
// Steele et al., constants 0x9e3779b97f4a7c15, 0xbf58476d1ce4e5b9, 0x94d049bb133111eb) and q lives
// on the shard of highest weight; a tie (a 64-bit collision) goes to the smaller name. The function
// is fixed (tests pin its values): every worker and every version places a sequence on the same
// shard. A shard's name is its address exactly as written in the list — `a:7420`, or a StatefulSet
// pod's stable name `kvmanager-0.kvmanager-headless.ns.svc:7420` (never the headless Service's A
// records: pod IPs change on restart) — so every worker must write the list the same way; its order
// does not matter. Adding a shard moves about 1/(N+1) of the sequences, all of them to the new
// shard; removing one moves only its own.
//
// Scaling: after a change of the list, a ShardSet built with the list from before it (`previous`)
// still finds the sequences created before the change: Locate asks a sequence's owner under the
// current list and, when that shard does not know it (NotFound), its owner under the previous list.
// New sequences go to their owner under the current list. Keep the previous list until the
// sequences created before the change are gone (one change at a time).
//
// Prefix sharing (the store's content-addressed blocks, Client::PrefixLookup) works within a shard
// only: placement is by sequence id, so two sequences share their prompt's blocks when they land on
// the same shard, and a lookup answers for the shard it is sent to.
//
// Failures: a shard that is down fails only the calls for its own sequences. Connection(i) answers
// within the connect options' deadline: Unavailable "shard a:7420: ..." when the shard cannot be
// reached; after a failed connect the shard is not dialled again for `reconnect_backoff_ms` (calls
// in that time fail at once with the same error), so a worker's other sequences are not held up.
// A Client whose connection was lost is reconnected by the next Connection (after the back-off);
// when the shard is back its durable sequences are served again (a ServiceKvSource re-attaches on
// its own; cache-mode sequences died with the process).
//
// Data plane: a transport::Transport serves one ServiceKvSource at a time (the source installs its
// receiver), and a Client's data plane must outlive it. `data_plane` makes one per shard (the
// ShardSet owns them). A worker that decodes several sequences on one shard at once over a data
// plane uses one ShardSet per sequence — connections are lazy, so each opens only its sequence's
// shard — or no data plane (TCP: any number of sources per Client, blocks in the reply frames).
//
// Thread-compatible, like Client: one thread drives a ShardSet and its Clients. The static
// placement functions are pure and thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "client/client.h"
#include "proto/status.h"
#include "transport/transport.h"

namespace kvm::client {

struct ShardOptions {
  // The shard list (names = addresses, HOST:PORT). Non-empty, no duplicates.
  std::vector<std::string> shards;
  // The list before the last change of `shards` (empty: none). Locate finds a sequence created
  // before the change on its owner under this list.
  std::vector<std::string> previous;
  // Tenant, token, client name, deadline (every connect and request) and heartbeats of every
  // shard's Client; `address` and `data_plane` are set per shard.
  ConnectOptions connect;
  // Makes shard `name`'s data plane when its Client is first opened. Null: TCP (blocks in reply
  // frames). A factory error fails that shard's Connection.
  std::function<Result<std::unique_ptr<transport::Transport>>(const std::string& name)> data_plane;
  // After a failed connect, calls for that shard fail at once for this long before it is dialled
  // again. Longer: less time spent on a dead shard; shorter: a shard that came back is used
  // sooner. Default: 250 ms.
  uint32_t reconnect_backoff_ms = 250;
};

class ShardSet {
 public:
  // "a:7420, b:7420,c:7420" → {"a:7420", "b:7420", "c:7420"} (spaces around entries dropped).
  // InvalidArgument for an empty list or entry, a duplicate, or an entry that is not HOST:PORT.
  static Result<std::vector<std::string>> ParseList(std::string_view list);
  // The rendezvous weight w(shard, tenant, sequence_id) above.
  static uint64_t Weight(std::string_view shard, std::string_view tenant, uint64_t sequence_id);
  // The index in `shards` of the sequence's owner (highest weight). REQUIRES: !shards.empty().
  static size_t Place(std::span<const std::string> shards, std::string_view tenant,
                      uint64_t sequence_id);

  // Validates both lists (as ParseList would); connects to nothing yet.
  static Result<std::unique_ptr<ShardSet>> Make(ShardOptions o);
  ~ShardSet();
  ShardSet(const ShardSet&) = delete;
  ShardSet& operator=(const ShardSet&) = delete;

  // Every shard this set knows, by index: the current list in its order, then the shards of the
  // previous list that are not in it (they still hold sequences created before the change).
  const std::vector<std::string>& names() const { return names_; }
  const std::string& name(size_t shard) const { return names_[shard]; }
  // How many shards the current list has (indices below it).
  size_t current_size() const { return current_; }
  const ShardOptions& options() const { return opt_; }

  // The owner of a sequence under the current list: where a new sequence is created.
  size_t ShardFor(uint64_t sequence_id) const;
  // Its owner under the previous list; nullopt without one.
  std::optional<size_t> PreviousShardFor(uint64_t sequence_id) const;

  // The shard's Client, connected (opened on first use, reconnected when its connection was
  // lost). Unavailable "shard NAME: ..." when it cannot be reached (within the deadline; at once
  // during the back-off after a failed connect); Unauthenticated / PermissionDenied /
  // FailedPrecondition as Client::Connect, with the shard named. The pointer stays valid for the
  // ShardSet's life (a reconnect reuses the Client). REQUIRES: shard < names().size().
  Result<Client*> Connection(size_t shard);
  // Where an existing sequence is: its current owner when that shard knows it, else its previous
  // owner when that one does. NotFound when neither does; Unavailable naming the shard when the
  // one that may hold it cannot be asked.
  Result<size_t> Locate(uint64_t sequence_id);
  // Whether `shard` stores the sequence (for this tenant): true, false (NotFound), or the error of
  // asking it, with the shard named.
  Result<bool> Knows(size_t shard, uint64_t sequence_id);
  // `s` with the shard named ("shard a:7420: ..."); OK stays OK.
  Status Named(size_t shard, const Status& s) const;

 private:
  struct Shard;
  explicit ShardSet(ShardOptions o);
  ShardOptions opt_;
  std::vector<std::string> names_;
  size_t current_ = 0;
  std::vector<size_t> previous_index_;  // previous list position → index in names_
  std::vector<std::unique_ptr<Shard>> shards_;
};

}  // namespace kvm::client
