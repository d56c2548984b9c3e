#include "client/shards.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <set>

#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"

namespace kvm::client {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::string_view Trim(std::string_view s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  const size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

Status CheckList(const std::vector<std::string>& list, const char* what) {
  if (list.empty()) return Status::InvalidArgument(std::string(what) + ": no shard");
  std::set<std::string> seen;
  for (const auto& s : list) {
    if (s.empty()) return Status::InvalidArgument(std::string(what) + ": an empty entry");
    if (auto hp = wire::ParseHostPort(s); !hp.ok())
      return Status::InvalidArgument(std::string(what) + ": '" + s + "': " + hp.status().message());
    if (!seen.insert(s).second)
      return Status::InvalidArgument(std::string(what) + ": '" + s + "' is listed twice");
  }
  return Status::Ok();
}

// A TCP connect to `address` bounded by `timeout_ms` (Client::Connect's own connect has no
// timeout: a black-holed address would hold the caller for the kernel's SYN retries).
Status Reachable(const std::string& address, int timeout_ms) {
  KVM_ASSIGN_OR_RETURN(auto hp, wire::ParseHostPort(address));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(hp.first.c_str(), std::to_string(hp.second).c_str(), &hints, &res);
      rc != 0)
    return Status::Unavailable(std::string("cannot resolve: ") + gai_strerror(rc));
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  std::string err = "no address";
  bool ok = false;
  for (addrinfo* a = res; a && !ok; a = a->ai_next) {
    const int fd =
        ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int left = 0;
      do {
        left = int(std::max<int64_t>(
            0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now())
                   .count()));
        rc = ::poll(&p, 1, left);
      } while (rc < 0 && errno == EINTR);
      if (rc == 0) {
        err = "connect timed out after " + std::to_string(timeout_ms) + " ms";
      } else {
        int so = 0;
        socklen_t len = sizeof(so);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &len);
        if (so == 0)
          ok = true;
        else
          err = std::strerror(so);
      }
    } else if (rc == 0) {
      ok = true;
    } else {
      err = std::strerror(errno);
    }
    ::close(fd);
  }
  freeaddrinfo(res);
  if (!ok) return Status::Unavailable("cannot connect: " + err);
  return Status::Ok();
}

}  // namespace

struct ShardSet::Shard {
  std::string name;
  std::unique_ptr<transport::Transport> data_plane;  // before the client: it must outlive it
  std::unique_ptr<Client> client;
  Clock::time_point down_until{};
  Status last_error;
};

Result<std::vector<std::string>> ShardSet::ParseList(std::string_view list) {
  std::vector<std::string> out;
  size_t at = 0;
  for (;;) {
    const size_t comma = list.find(',', at);
    out.emplace_back(Trim(list.substr(at, comma == std::string_view::npos ? comma : comma - at)));
    if (comma == std::string_view::npos) break;
    at = comma + 1;
  }
  if (out.size() == 1 && out[0].empty()) out.clear();
  KVM_RETURN_IF_ERROR(CheckList(out, "shard list"));
  return out;
}

uint64_t ShardSet::Weight(std::string_view shard, std::string_view tenant, uint64_t sequence_id) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto feed = [&h](uint8_t b) {
    h ^= b;
    h *= 0x100000001b3ull;
  };
  for (char c : shard) feed(uint8_t(c));
  feed(0);
  for (char c : tenant) feed(uint8_t(c));
  feed(0);
  for (int i = 0; i < 8; ++i) feed(uint8_t(sequence_id >> (8 * i)));
  return SplitMix64(h);
}

size_t ShardSet::Place(std::span<const std::string> shards, std::string_view tenant,
                       uint64_t sequence_id) {
  size_t best = 0;
  uint64_t best_w = Weight(shards[0], tenant, sequence_id);
  for (size_t i = 1; i < shards.size(); ++i) {
    const uint64_t w = Weight(shards[i], tenant, sequence_id);
    if (w > best_w || (w == best_w && shards[i] < shards[best])) {
      best = i;
      best_w = w;
    }
  }
  return best;
}

Result<std::unique_ptr<ShardSet>> ShardSet::Make(ShardOptions o) {
  KVM_RETURN_IF_ERROR(CheckList(o.shards, "shard list"));
  if (!o.previous.empty()) KVM_RETURN_IF_ERROR(CheckList(o.previous, "previous shard list"));
  return std::unique_ptr<ShardSet>(new ShardSet(std::move(o)));
}

ShardSet::ShardSet(ShardOptions o) : opt_(std::move(o)) {
  names_ = opt_.shards;
  current_ = names_.size();
  for (const auto& p : opt_.previous) {
    auto it = std::find(names_.begin(), names_.end(), p);
    previous_index_.push_back(size_t(it - names_.begin()));
    if (it == names_.end()) names_.push_back(p);
  }
  for (const auto& n : names_) {
    shards_.push_back(std::make_unique<Shard>());
    shards_.back()->name = n;
  }
}

ShardSet::~ShardSet() = default;

size_t ShardSet::ShardFor(uint64_t sequence_id) const {
  return Place(opt_.shards, opt_.connect.tenant, sequence_id);
}

std::optional<size_t> ShardSet::PreviousShardFor(uint64_t sequence_id) const {
  if (opt_.previous.empty()) return std::nullopt;
  return previous_index_[Place(opt_.previous, opt_.connect.tenant, sequence_id)];
}

Status ShardSet::Named(size_t shard, const Status& s) const {
  return s.WithContext("shard " + names_[shard]);
}

Result<Client*> ShardSet::Connection(size_t shard) {
  Shard& s = *shards_[shard];
  if (s.client && s.client->Poll().ok()) return s.client.get();  // connected
  const auto now = Clock::now();
  if (now < s.down_until) return s.last_error;
  Status st = Reachable(s.name, int(opt_.connect.deadline_ms));
  if (st.ok() && s.client) {
    st = s.client->Reconnect();
  } else if (st.ok()) {
    if (opt_.data_plane && !s.data_plane) {
      auto dp = opt_.data_plane(s.name);
      if (!dp.ok()) return Named(shard, dp.status().WithContext("data plane"));
      s.data_plane = std::move(*dp);
    }
    ConnectOptions co = opt_.connect;
    co.address = s.name;
    co.data_plane = s.data_plane.get();
    auto c = Client::Connect(co);
    if (c.ok()) s.client = std::move(*c);
    st = c.status();
  }
  if (!st.ok()) {
    s.down_until = Clock::now() + std::chrono::milliseconds(opt_.reconnect_backoff_ms);
    s.last_error = Named(shard, st);
    return s.last_error;
  }
  s.last_error = Status::Ok();
  return s.client.get();
}

Result<bool> ShardSet::Knows(size_t shard, uint64_t sequence_id) {
  KVM_ASSIGN_OR_RETURN(Client * c, Connection(shard));
  // ReadBlocks of no blocks: the store looks the sequence up (NotFound for an unknown one, or
  // another tenant's) and reads nothing.
  wire::ReadBlocks m;
  m.set_sequence_id(sequence_id);
  auto r = c->Call(wire::MessageType::kReadBlocks, m);
  if (r.ok()) return true;
  if (r.status().IsNotFound()) return false;
  return Named(shard, r.status());
}

Result<size_t> ShardSet::Locate(uint64_t sequence_id) {
  const size_t cur = ShardFor(sequence_id);
  const Result<bool> here = Knows(cur, sequence_id);
  if (here.ok() && *here) return cur;
  const std::optional<size_t> prev = PreviousShardFor(sequence_id);
  Result<bool> there = false;
  if (prev && *prev != cur) {
    there = Knows(*prev, sequence_id);
    if (there.ok() && *there) return *prev;
  }
  if (!here.ok()) return here.status();
  if (!there.ok()) return there.status();
  const std::string where = prev && *prev != cur ? "neither shard " + names_[cur] + " nor shard " +
                                                       names_[*prev] + " holds it"
                                                 : "shard " + names_[cur] + " does not hold it";
  return Status::NotFound("sequence " + std::to_string(sequence_id) + ": " + where);
}

}  // namespace kvm::client
