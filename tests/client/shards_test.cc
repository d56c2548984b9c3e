// ShardSet (client/shards.h): the placement math — the documented hash, pinned to values computed
// outside this code base; independent of the list's order; 300 sequences within ±25% of even; a
// 4th shard moving 15–35% of them, every one to the new shard — and the live behaviour against
// kvmanager services in this process: a sequence on its owner only, found on its previous owner
// after a scale-up, a shard that is down failing only its own calls (within the deadline, named)
// and serving its durable sequences again when it is back.
#include "client/shards.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "testutil/service.h"

namespace kvm::client {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<size_t> Counts(const std::vector<std::string>& names, const std::vector<uint64_t>& ids,
                           const std::string& tenant = "dev") {
  std::vector<size_t> n(names.size(), 0);
  for (uint64_t id : ids) ++n[ShardSet::Place(names, tenant, id)];
  return n;
}

std::vector<uint64_t> Ids(size_t n, uint64_t seed) {
  std::vector<uint64_t> v;
  if (seed == 0) {
    for (uint64_t i = 1; i <= n; ++i) v.push_back(i);
  } else {
    std::mt19937_64 g(seed);
    for (size_t i = 0; i < n; ++i) v.push_back(g());
  }
  return v;
}

// The name sets the tests place over: the README's example, a StatefulSet's stable per-pod names,
// and loopback addresses as the integration test uses them.
std::vector<std::vector<std::string>> NameSets(size_t n) {
  std::vector<std::vector<std::string>> sets(3);
  for (size_t i = 0; i < n; ++i) {
    sets[0].push_back(std::string(1, char('a' + i)) + ":7420");
    sets[1].push_back("kvmanager-" + std::to_string(i) + ".kvmanager-headless.default.svc:7420");
    sets[2].push_back("127.0.0.1:" + std::to_string(17431 + i));
  }
  return sets;
}

// Values computed with a dozen lines of Python (FNV-1a 64 over name, 0, tenant, 0, the id's 8
// little-endian bytes, then splitmix64), not with this code: a change of the function fails here.
TEST(ShardPlacementTest, WeightsAreTheDocumentedHash) {
  struct Case {
    const char* shard;
    const char* tenant;
    uint64_t id, weight;
  };
  const Case cases[] = {
      {"a:7420", "dev", 0x1ull, 0x01bb1709d309aa70ull},
      {"kvmanager-0.kvmanager-headless.default.svc:7420", "dev", 0x2aull, 0x4bc6c75b58f641fdull},
      {"b:7420", "tenant-x", 0xdeadbeefcafef00dull, 0x329adea8bede4906ull},
      {"", "", 0x0ull, 0x976d61d898d20a0cull},
  };
  for (const Case& c : cases)
    EXPECT_EQ(ShardSet::Weight(c.shard, c.tenant, c.id), c.weight) << c.shard << " " << c.id;
  // Sequences 1..10 over a, b, c (the same script).
  const std::vector<std::string> abc = {"a:7420", "b:7420", "c:7420"};
  const size_t want[] = {2, 1, 0, 1, 1, 2, 2, 0, 0, 0};
  for (uint64_t id = 1; id <= 10; ++id) EXPECT_EQ(ShardSet::Place(abc, "dev", id), want[id - 1]);
}

TEST(ShardPlacementTest, ThePlacementIgnoresTheListOrder) {
  std::vector<std::string> names = NameSets(5)[1];
  const std::vector<uint64_t> ids = Ids(500, 7);
  std::vector<std::string> owner;
  for (uint64_t id : ids) owner.push_back(names[ShardSet::Place(names, "dev", id)]);
  std::mt19937 g(3);
  for (int round = 0; round < 4; ++round) {
    std::shuffle(names.begin(), names.end(), g);
    for (size_t i = 0; i < ids.size(); ++i)
      ASSERT_EQ(names[ShardSet::Place(names, "dev", ids[i])], owner[i]) << "round " << round;
  }
}

TEST(ShardPlacementTest, ThreeHundredSequencesLandWithinAQuarterOfEven) {
  for (const auto& names : NameSets(3))
    for (uint64_t seed : {0ull, 1ull, 2ull, 3ull}) {
      const auto n = Counts(names, Ids(300, seed));
      for (size_t i = 0; i < n.size(); ++i) {
        EXPECT_GE(n[i], 75u) << names[i] << " seed " << seed;
        EXPECT_LE(n[i], 125u) << names[i] << " seed " << seed;
      }
    }
}

TEST(ShardPlacementTest, AFourthShardMovesAQuarterOfTheSequencesAllToIt) {
  const auto three = NameSets(3), four = NameSets(4);
  for (size_t set = 0; set < three.size(); ++set)
    for (uint64_t seed : {0ull, 5ull}) {
      const auto ids = Ids(300, seed);
      size_t moved = 0;
      for (uint64_t id : ids) {
        const std::string& before = three[set][ShardSet::Place(three[set], "dev", id)];
        const std::string& after = four[set][ShardSet::Place(four[set], "dev", id)];
        if (before == after) continue;
        ++moved;
        EXPECT_EQ(after, four[set][3]) << "a sequence moved between two old shards";
      }
      EXPECT_GE(moved, 45u) << "set " << set << " seed " << seed;   // 15% of 300
      EXPECT_LE(moved, 105u) << "set " << set << " seed " << seed;  // 35%
      // Removing a shard moves only the sequences it held.
      std::vector<std::string> two = three[set];
      two.erase(two.begin() + 1);
      for (uint64_t id : ids) {
        const std::string& before = three[set][ShardSet::Place(three[set], "dev", id)];
        if (before == three[set][1]) continue;
        EXPECT_EQ(two[ShardSet::Place(two, "dev", id)], before);
      }
    }
}

TEST(ShardPlacementTest, TheTenantIsPartOfTheKey) {
  const auto names = NameSets(3)[0];
  size_t differ = 0;
  for (uint64_t id : Ids(300, 0))
    differ += ShardSet::Place(names, "dev", id) != ShardSet::Place(names, "other", id);
  EXPECT_GT(differ, 150u);  // about 2/3 when the tenant is mixed in; 0 if it were ignored
}

TEST(ShardListTest, ParsesTrimsAndRejects) {
  auto l = ShardSet::ParseList(" a:7420, b:7420 ,c:1");
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_EQ(*l, (std::vector<std::string>{"a:7420", "b:7420", "c:1"}));
  auto one = ShardSet::ParseList("[::1]:7420");
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_EQ(one->size(), 1u);
  for (const char* bad : {"", " ", "a:7420,,b:7420", "a:7420,a:7420", "a", "a:x", "a:7420,"}) {
    auto r = ShardSet::ParseList(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "'";
    EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  }
  EXPECT_FALSE(ShardSet::Make({}).ok());
  EXPECT_FALSE(ShardSet::Make({.shards = {"a:1"}, .previous = {"b:1", "b:1"}}).ok());
}

// ---- against live services ----

const ModelShape kShape{1, 2, 1, 32, DType::kF16, 77};
constexpr uint32_t kB = 16;

// A storage-only sequence with `n` tokens whose K and V rows are a function of (id, position).
uint16_t Value(uint64_t id, uint64_t pos, int v, uint32_t i) {
  return FloatToHalf(float((id % 97) + pos * 0.25 + v * 0.5 + i * 0.001));
}
Status CreateWith(Client* c, uint64_t id, uint64_t n, bool durable) {
  wire::CreateSequence m;
  m.set_sequence_id(id);
  wire::ToWire(kShape, m.mutable_shape());
  m.set_block_size(kB);
  m.set_durability(durable ? wire::DURABLE : wire::CACHE);
  KVM_RETURN_IF_ERROR(c->Call(wire::MessageType::kCreateSequence, m).status());
  wire::Append a;
  a.set_sequence_id(id);
  a.set_start_position(0);
  for (uint64_t p = 0; p < n; ++p) a.add_token_ids(uint32_t(p));
  std::vector<uint16_t> payload;  // [layer][kv_head][K,V][token][D]
  for (int v = 0; v < 2; ++v)
    for (uint64_t p = 0; p < n; ++p)
      for (uint32_t i = 0; i < kShape.head_dim; ++i) payload.push_back(Value(id, p, v, i));
  return c
      ->Call(wire::MessageType::kAppend, a,
             {reinterpret_cast<const uint8_t*>(payload.data()), payload.size() * 2})
      .status();
}
// Block 0's K and V read back equal what was appended.
void ExpectBlock0(Client* c, uint64_t id) {
  for (int v = 0; v < 2; ++v) {
    wire::ReadBlocks m;
    m.set_sequence_id(id);
    m.add_block_indices(0);
    m.set_values(v == 1);
    auto f = c->Call(wire::MessageType::kReadBlocks, m);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ASSERT_EQ(f->payload.size(), size_t{kB} * kShape.head_dim * 2);
    const auto* got = reinterpret_cast<const uint16_t*>(f->payload.data());
    for (uint64_t p = 0; p < kB; ++p)
      for (uint32_t i = 0; i < kShape.head_dim; ++i)
        ASSERT_EQ(got[p * kShape.head_dim + i], Value(id, p, v, i)) << "sequence " << id;
  }
}
std::set<uint64_t> Listed(Client* c) {
  std::set<uint64_t> out;
  auto f = c->Call(wire::MessageType::kListSequences, wire::ListSequences());
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  wire::ListSequencesReply r;
  if (f.ok() && wire::ParseProto(*f, &r).ok())
    for (const auto& s : r.sequences()) out.insert(s.sequence_id());
  return out;
}

struct Services {
  explicit Services(size_t n) {
    for (size_t i = 0; i < n; ++i) {
      svc.push_back(std::make_unique<testutil::TestService>());
      names.push_back(svc.back()->server->address());
    }
  }
  std::vector<std::unique_ptr<testutil::TestService>> svc;
  std::vector<std::string> names;
};

TEST(ShardSetTest, EverySequenceIsOnItsOwnerOnly) {
  Services s(3);
  auto set = std::move(ShardSet::Make({.shards = s.names})).value();
  std::vector<std::set<uint64_t>> want(3);
  for (uint64_t id = 1; id <= 60; ++id) {
    const size_t owner = set->ShardFor(id);
    auto c = set->Connection(owner);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_TRUE(CreateWith(*c, id, 20, false).ok());
    want[owner].insert(id);
  }
  for (size_t i = 0; i < 3; ++i) {
    auto c = set->Connection(i);
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(*c, *set->Connection(i)) << "one Client per shard";
    EXPECT_EQ(Listed(*c), want[i]) << s.names[i];
    EXPECT_GT(want[i].size(), 5u);
  }
}

TEST(ShardSetTest, ASequenceCreatedBeforeAScaleUpIsFoundOnItsPreviousOwner) {
  Services s(4);
  const std::vector<std::string> three(s.names.begin(), s.names.begin() + 3);
  auto before = std::move(ShardSet::Make({.shards = three})).value();
  for (uint64_t id = 1; id <= 120; ++id) {
    auto c = before->Connection(before->ShardFor(id));
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(CreateWith(*c, id, 20, false).ok());
  }
  auto after = std::move(ShardSet::Make({.shards = s.names, .previous = three})).value();
  auto without = std::move(ShardSet::Make({.shards = s.names})).value();
  size_t moved = 0;
  for (uint64_t id = 1; id <= 120; ++id) {
    const std::string& owner = three[before->ShardFor(id)];
    auto where = after->Locate(id);
    ASSERT_TRUE(where.ok()) << where.status().ToString();
    EXPECT_EQ(after->name(*where), owner);
    ASSERT_EQ(after->name(*after->PreviousShardFor(id)), owner);
    auto c = after->Connection(*where);
    ASSERT_TRUE(c.ok());
    ExpectBlock0(*c, id);
    if (after->name(after->ShardFor(id)) != owner) {
      ++moved;
      EXPECT_EQ(after->name(after->ShardFor(id)), s.names[3]);
      // Without the previous list the new owner does not know it.
      auto lost = without->Locate(id);
      EXPECT_TRUE(lost.status().IsNotFound()) << lost.status().ToString();
    }
  }
  EXPECT_GT(moved, 10u) << "too few moved sequences to test anything";
  // New sequences go to their owner under the new list, the new shard included.
  std::vector<size_t> n(4, 0);
  for (uint64_t id = 1000; id < 1100; ++id) {
    const size_t owner = after->ShardFor(id);
    ++n[owner];
    ASSERT_TRUE(CreateWith(*after->Connection(owner), id, 20, false).ok());
    auto where = after->Locate(id);
    ASSERT_TRUE(where.ok());
    EXPECT_EQ(*where, owner);
  }
  for (size_t i = 0; i < 4; ++i) EXPECT_GT(n[i], 10u) << s.names[i];
  // An id nobody created that moved with the scale-up (the shards' names are free ports, so pick
  // one whose owners differ): NotFound naming both shards it asked.
  uint64_t unknown = 999999;
  while (after->name(after->ShardFor(unknown)) == three[before->ShardFor(unknown)]) ++unknown;
  auto none = after->Locate(unknown);
  EXPECT_TRUE(none.status().IsNotFound()) << none.status().ToString();
  EXPECT_NE(none.status().message().find("neither shard"), std::string::npos)
      << none.status().ToString();
}

// A kvmanager in this process that can stop and come back on the same port with the same data.
struct Restartable {
  Restartable() {
    char tmpl[] = "/tmp/kvm_shards_XXXXXX";
    dir = mkdtemp(tmpl);
    Start("127.0.0.1:0");
    address = server->address();
  }
  ~Restartable() {
    Stop();
    std::filesystem::remove_all(dir);
  }
  void Start(const std::string& listen) {
    store::StoreOptions st;
    st.dir = dir;
    st.host_capacity_bytes = 16 << 20;
    store = std::move(store::BlockStore::Open(st)).value();
    server::ServerOptions o;
    o.listen = listen;
    o.handler.tenants = {{"dev", "dev", true}};
    server = std::move(server::Server::Start(o, store.get())).value();
  }
  void Stop() {
    if (server) server->Stop(0);
    server.reset();
    store.reset();
  }
  std::string dir, address;
  std::unique_ptr<store::BlockStore> store;
  std::unique_ptr<server::Server> server;
};

TEST(ShardSetTest, ADownShardFailsOnlyItsOwnCallsAndServesItsDurableSequencesWhenBack) {
  testutil::TestService a, c;
  Restartable b;
  const std::vector<std::string> names = {a.server->address(), b.address, c.server->address()};
  ShardOptions o{.shards = names};
  o.connect.deadline_ms = 500;
  o.reconnect_backoff_ms = 300;
  auto set = std::move(ShardSet::Make(o)).value();
  std::map<size_t, uint64_t> one;  // a durable sequence on each shard
  for (uint64_t id = 1; one.size() < 3; ++id) {
    const size_t owner = set->ShardFor(id);
    if (one.count(owner)) continue;
    ASSERT_TRUE(CreateWith(*set->Connection(owner), id, 20, true).ok());
    one[owner] = id;
  }
  Client* b_client = *set->Connection(1);
  b.Stop();
  // Its calls fail within the deadline, with the shard named; the others' do not notice.
  auto t0 = Clock::now();
  auto down = set->Connection(1);
  double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  ASSERT_FALSE(down.ok());
  EXPECT_TRUE(down.status().IsUnavailable()) << down.status().ToString();
  EXPECT_EQ(down.status().message().rfind("shard " + b.address + ": ", 0), 0u)
      << down.status().ToString();
  EXPECT_LT(ms, 500.0);
  auto located = set->Locate(one[1]);
  EXPECT_TRUE(located.status().IsUnavailable()) << located.status().ToString();
  // During the back-off it is not dialled again: the same error at once.
  t0 = Clock::now();
  auto again = set->Connection(1);
  ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  EXPECT_EQ(again.status(), down.status());
  EXPECT_LT(ms, 20.0);
  for (size_t i : {size_t{0}, size_t{2}}) {
    auto ci = set->Connection(i);
    ASSERT_TRUE(ci.ok()) << ci.status().ToString();
    ExpectBlock0(*ci, one[i]);
  }
  // Back on the same port with the same data: after the back-off the same Client reconnects, and
  // the durable sequence reads back byte for byte.
  b.Start(b.address);
  std::this_thread::sleep_for(std::chrono::milliseconds(350));
  auto back = set->Connection(1);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, b_client);
  ExpectBlock0(*back, one[1]);
  auto where = set->Locate(one[1]);
  ASSERT_TRUE(where.ok()) << where.status().ToString();
  EXPECT_EQ(*where, 1u);
}

// A shard that accepts but never answers (its Hello waits): Connection gives up at the deadline.
TEST(ShardSetTest, AShardThatDoesNotAnswerFailsAtTheDeadline) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 16), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const std::string name = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  ShardOptions o{.shards = {name}};
  o.connect.deadline_ms = 300;
  auto set = std::move(ShardSet::Make(o)).value();
  const auto t0 = Clock::now();
  auto c = set->Connection(0);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  ::close(fd);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.status().IsTimedOut()) << c.status().ToString();
  EXPECT_NE(c.status().message().find("shard " + name), std::string::npos);
  EXPECT_GE(ms, 290.0);
  EXPECT_LT(ms, 800.0);
}

}  // namespace
}  // namespace kvm::client
