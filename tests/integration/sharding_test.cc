// Sharding on loopback with real processes: 3 (then 4) `kvmanager` executables, each with its own
// data directory, started and stopped by the test (SIGKILL on every exit path, and with the test
// process if it dies), driven by `kvmctl loadgen`. Checked against the services' own view
// (ListSequences, ReadBlocks) and the synthetic workload recomputed here:
//   - 300 sequences land within ±25% of even, each on the shard the placement names;
//   - kill -9 of one shard during loadgen: errors only on that shard's sequences, every failed call
//     within 1 s, the other shards' sequences keep growing; restarted, its durable sequences read
//     back byte for byte (nothing acknowledged before the kill lost), and loadgen resumes them;
//   - 3 → 4 shards with sequences in flight: a 4th shard moves 15–35% of the placements (all to
//   it),
//     every existing sequence is still readable (found on its previous owner), new ones spread over
//     all four.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "client/shards.h"
#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "synthetic.h"

namespace kvm {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// loadgen's workload in these tests (and the shape its sequences are stored with).
const std::vector<std::string> kShapeFlags = {"--layers",  "2", "--kv-heads", "1",
                                              "--q-heads", "2", "--head-dim", "32"};
const ModelShape kShape{2, 2, 1, 32, DType::kF16, 0x10adull};  // loadgen's fingerprint
constexpr uint32_t kB = 16;

bool PortFree(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  ::close(fd);
  return ok;
}
uint16_t AnyFreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}
// Ports 17431.. when free (then the placements these tests see are those shards_test pins, the
// same on every run), else any free ports.
std::vector<uint16_t> Ports(size_t n) {
  std::vector<uint16_t> p;
  bool fixed = true;
  for (size_t i = 0; i < n; ++i) fixed = fixed && PortFree(uint16_t(17431 + i));
  for (size_t i = 0; i < n; ++i) p.push_back(fixed ? uint16_t(17431 + i) : AnyFreePort());
  if (!fixed) std::fprintf(stderr, "[sharding] ports 17431.. taken: placements over free ports\n");
  return p;
}

// A child process whose stdout/stderr lines are collected; SIGKILLed when the test goes.
class Process {
 public:
  ~Process() { Kill(); }
  bool Start(const std::vector<std::string>& argv) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return false;
    std::vector<std::string> a = argv;
    std::vector<char*> args;
    for (auto& s : a) args.push_back(s.data());
    args.push_back(nullptr);
    pid_ = fork();
    if (pid_ < 0) return false;
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
      dup2(out[1], STDOUT_FILENO);
      dup2(err[1], STDERR_FILENO);
      execv(args[0], args.data());
      _exit(127);
    }
    close(out[1]);
    close(err[1]);
    readers_.emplace_back([this, fd = out[0]] { Read(fd, &out_); });
    readers_.emplace_back([this, fd = err[0]] { Read(fd, &err_); });
    return true;
  }
  // Waits until a line of either stream starts with `prefix`; returns it ("" on timeout or exit).
  std::string WaitLine(const std::string& prefix, double seconds) {
    std::unique_lock<std::mutex> l(mu_);
    std::string found;
    cv_.wait_for(l, std::chrono::duration<double>(seconds), [&] {
      for (const auto* v : {&out_, &err_})
        for (const auto& line : *v)
          if (line.rfind(prefix, 0) == 0) return !(found = line).empty();
      return closed_ == 2;
    });
    return found;
  }
  // Waits for the exit; the exit status (-1 when killed or on timeout).
  int Wait(double seconds) {
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    while (pid_ > 0 && Clock::now() < end) {
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        Join();
        return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }
  void Kill(int sig = SIGKILL) {
    if (pid_ > 0) {
      ::kill(pid_, sig);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    Join();
  }
  // SIGTERM, then SIGKILL after `seconds`.
  void Stop(double seconds = 10) {
    if (pid_ <= 0) return Join();
    ::kill(pid_, SIGTERM);
    if (Wait(seconds) == -1) Kill();
  }
  std::string Stdout() {
    std::lock_guard<std::mutex> l(mu_);
    std::string s;
    for (const auto& line : out_) s += line + "\n";
    return s;
  }
  std::string StderrTail(size_t n = 12) {
    std::lock_guard<std::mutex> l(mu_);
    std::string s;
    for (size_t i = err_.size() > n ? err_.size() - n : 0; i < err_.size(); ++i)
      s += err_[i] + "\n";
    return s;
  }

 private:
  void Read(int fd, std::vector<std::string>* lines) {
    FILE* f = fdopen(fd, "r");
    char buf[8192];
    while (f && std::fgets(buf, sizeof(buf), f)) {
      std::string line(buf);
      while (!line.empty() && line.back() == '\n') line.pop_back();
      std::lock_guard<std::mutex> l(mu_);
      lines->push_back(line);
      cv_.notify_all();
    }
    if (f) std::fclose(f);
    std::lock_guard<std::mutex> l(mu_);
    ++closed_;
    cv_.notify_all();
  }
  void Join() {
    for (auto& t : readers_)
      if (t.joinable()) t.join();
    readers_.clear();
  }
  pid_t pid_ = -1;
  std::vector<std::thread> readers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> out_, err_;
  int closed_ = 0;
};

// One kvmanager shard: its port and data directory stay across restarts.
class Shard {
 public:
  explicit Shard(uint16_t port) : port_(port) {
    char tmpl[] = "/tmp/kvm_sharding_XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  ~Shard() {
    proc_.reset();
    std::filesystem::remove_all(dir_);
  }
  std::string name() const { return "127.0.0.1:" + std::to_string(port_); }
  ::testing::AssertionResult Start() {
    proc_ = std::make_unique<Process>();
    if (!proc_->Start({KVMANAGER, "--listen", name(), "--admin", "127.0.0.1:0", "--data-dir",
                       dir_ + "/data", "--data-plane", "none", "--host-capacity-bytes",
                       std::to_string(64 << 20), "--worker-threads", "1", "--no-gpu"}))
      return ::testing::AssertionFailure() << "cannot start kvmanager";
    if (proc_->WaitLine("kvmanager listening on", 30).empty())
      return ::testing::AssertionFailure() << "kvmanager on " << name() << " did not start:\n"
                                           << proc_->StderrTail() << proc_->Stdout();
    return ::testing::AssertionSuccess();
  }
  void Kill9() { proc_->Kill(SIGKILL); }
  void Stop() { proc_->Stop(); }

 private:
  uint16_t port_;
  std::string dir_;
  std::unique_ptr<Process> proc_;
};

// `kvmctl loadgen ... --json` in the background.
class Loadgen {
 public:
  void Start(std::vector<std::string> args) {
    args.insert(args.begin(), {KVMCTL, "loadgen"});
    args.insert(args.end(), kShapeFlags.begin(), kShapeFlags.end());
    args.push_back("--json");
    ASSERT_TRUE(p_.Start(args));
  }
  // True once it decodes (setup done).
  bool WaitDecoding() { return !p_.WaitLine("[loadgen] decoding", 120).empty(); }
  json Result() {
    const int rc = p_.Wait(180);
    EXPECT_EQ(rc, 0) << p_.StderrTail();
    try {
      return json::parse(p_.Stdout());
    } catch (const std::exception& e) {
      ADD_FAILURE() << "loadgen printed no JSON: " << e.what() << "\n"
                    << p_.Stdout() << p_.StderrTail();
      return json::object();
    }
  }
  std::string StderrTail() { return p_.StderrTail(); }

 private:
  Process p_;
};

std::string Join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

// The service's own list of sequences: id → length.
std::map<uint64_t, uint64_t> Listed(client::Client* c) {
  std::map<uint64_t, uint64_t> out;
  auto f = c->Call(wire::MessageType::kListSequences, wire::ListSequences());
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  wire::ListSequencesReply r;
  if (f.ok() && wire::ParseProto(*f, &r).ok())
    for (const auto& s : r.sequences()) out[s.sequence_id()] = s.length();
  return out;
}

// Every stored block of sequence `id` (below `length`, every layer and KV head, K and V) equals
// the synthetic workload's rows for that sequence in fp16: what loadgen sent. Blocks from
// `first_block` on.
::testing::AssertionResult SameBytes(client::Client* c, uint64_t id, uint64_t length,
                                     uint64_t first_block = 0) {
  const tools::Synthetic gen(kShape, id);
  const uint32_t D = kShape.head_dim;
  std::vector<float> k(size_t{kShape.kv_heads} * D), v(k.size());
  const uint64_t blocks = (length + kB - 1) / kB;
  for (uint32_t l = 0; l < kShape.layers; ++l)
    for (uint32_t h = 0; h < kShape.kv_heads; ++h)
      for (int values = 0; values < 2; ++values) {
        wire::ReadBlocks m;
        m.set_sequence_id(id);
        m.set_layer(l);
        m.set_kv_head(h);
        m.set_values(values == 1);
        for (uint64_t b = first_block; b < blocks; ++b) m.add_block_indices(b);
        auto f = c->Call(wire::MessageType::kReadBlocks, m);
        if (!f.ok())
          return ::testing::AssertionFailure()
                 << "sequence " << id << ": " << f.status().ToString();
        const auto* got = reinterpret_cast<const uint16_t*>(f->payload.data());
        if (f->payload.size() != (blocks - first_block) * kB * D * 2)
          return ::testing::AssertionFailure() << "sequence " << id << ": short read";
        for (uint64_t b = first_block; b < blocks; ++b)
          for (uint32_t t = 0; t < kB; ++t) {
            const uint64_t pos = b * kB + t;
            if (pos < length) gen.KeysValues(l, pos, k.data(), v.data());
            for (uint32_t i = 0; i < D; ++i) {
              const uint16_t want =
                  pos < length ? FloatToHalf((values ? v : k)[size_t{h} * D + i]) : 0;
              const uint16_t have = got[((b - first_block) * kB + t) * D + i];
              if (have != want)
                return ::testing::AssertionFailure()
                       << "sequence " << id << " layer " << l << " head " << h
                       << (values ? " V" : " K") << " position " << pos << " component " << i
                       << ": stored " << have << ", sent " << want;
            }
          }
      }
  return ::testing::AssertionSuccess();
}

class ShardingTest : public ::testing::Test {
 protected:
  void StartShards(size_t n, size_t running) {
    for (uint16_t p : Ports(n)) shards_.push_back(std::make_unique<Shard>(p));
    for (size_t i = 0; i < running; ++i) ASSERT_TRUE(shards_[i]->Start());
  }
  std::vector<std::string> Names(size_t n) const {
    std::vector<std::string> v;
    for (size_t i = 0; i < n; ++i) v.push_back(shards_[i]->name());
    return v;
  }
  // A ShardSet of this test (connected before anything happens to a shard).
  std::unique_ptr<client::ShardSet> Watch(const std::vector<std::string>& names,
                                          const std::vector<std::string>& previous = {}) {
    client::ShardOptions o{.shards = names, .previous = previous};
    o.connect.deadline_ms = 5000;
    o.reconnect_backoff_ms = 50;
    return std::move(client::ShardSet::Make(o)).value();
  }
  void TearDown() override { shards_.clear(); }  // SIGKILL + data directories removed
  std::vector<std::unique_ptr<Shard>> shards_;
};

TEST_F(ShardingTest, ThreeHundredSequencesSpreadEvenlyEachOnItsPlacedShard) {
  StartShards(3, 3);
  const auto names = Names(3);
  Loadgen lg;
  lg.Start({"--server", Join(names), "--sequences", "300", "--seconds", "2", "--tokens", "64",
            "--clients", "2", "--first-sequence-id", "1", "--keep"});
  const json r = lg.Result();
  ASSERT_TRUE(r.contains("sequences_by_shard")) << r.dump();
  EXPECT_EQ(r["errors"], 0) << r.dump();
  EXPECT_EQ(r["synthetic"], true);
  EXPECT_GT(r["requests"].get<uint64_t>(), 0u);
  ASSERT_EQ(r["sequences_by_shard"].size(), 3u) << r.dump();
  ASSERT_EQ(r["errors_by_shard"].size(), 3u) << r.dump();
  auto watch = Watch(names);
  uint64_t total = 0;
  for (size_t i = 0; i < 3; ++i) {
    const uint64_t n = r["sequences_by_shard"][names[i]].get<uint64_t>();
    total += n;
    EXPECT_GE(n, 75u) << names[i];
    EXPECT_LE(n, 125u) << names[i];
    EXPECT_GT(r["requests_by_shard"][names[i]].get<uint64_t>(), 0u) << names[i];
    // The service's own list: exactly the sequences the placement names for it.
    std::set<uint64_t> want, have;
    for (uint64_t id = 1; id <= 300; ++id)
      if (client::ShardSet::Place(names, "dev", id) == i) want.insert(id);
    for (const auto& [id, len] : Listed(*watch->Connection(i))) {
      have.insert(id);
      EXPECT_GE(len, 64u) << "sequence " << id;
    }
    EXPECT_EQ(have, want) << names[i];
    EXPECT_EQ(want.size(), n) << names[i];
  }
  EXPECT_EQ(total, 300u);
}

TEST_F(ShardingTest, AKilledShardFailsOnlyItsOwnSequencesAndItsDurableSequencesComeBack) {
  StartShards(3, 3);
  const auto names = Names(3);
  constexpr size_t kDead = 1;
  auto watch = Watch(names);
  for (size_t i = 0; i < 3; ++i) ASSERT_TRUE(watch->Connection(i).ok());
  Loadgen a;
  a.Start({"--server", Join(names), "--sequences", "60", "--seconds", "6", "--tokens", "96",
           "--clients", "2", "--first-sequence-id", "1", "--durable", "--keep"});
  ASSERT_TRUE(a.WaitDecoding()) << a.StderrTail();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  std::vector<std::map<uint64_t, uint64_t>> before(3);
  for (size_t i = 0; i < 3; ++i) before[i] = Listed(*watch->Connection(i));
  ASSERT_FALSE(before[kDead].empty());
  shards_[kDead]->Kill9();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  // The others keep running: their sequences grow while the shard is down.
  for (size_t i : {size_t{0}, size_t{2}}) {
    uint64_t grew = 0;
    for (const auto& [id, len] : Listed(*watch->Connection(i))) grew += len - before[i][id];
    EXPECT_GT(grew, 0u) << names[i] << " stopped while " << names[kDead] << " was down";
  }
  const json r = a.Result();
  ASSERT_TRUE(r.contains("errors_by_shard")) << r.dump();
  EXPECT_GT(r["errors_by_shard"][names[kDead]].get<uint64_t>(), 0u) << r.dump();
  for (size_t i : {size_t{0}, size_t{2}}) {
    EXPECT_EQ(r["errors_by_shard"][names[i]], 0) << r.dump();
    EXPECT_GT(r["requests_by_shard"][names[i]].get<uint64_t>(), 0u);
  }
  ASSERT_FALSE(r["max_error_ms"].is_null());
  EXPECT_LE(r["max_error_ms"].get<double>(), 1000.0) << r["slowest_error"];
  EXPECT_NE(r["first_error"].get<std::string>().find("shard " + names[kDead]), std::string::npos)
      << r["first_error"];

  // Back on its port with its data: the test's own Client reconnects, and every durable sequence
  // holds at least what it held before the kill, byte for byte what loadgen sent.
  ASSERT_TRUE(shards_[kDead]->Start());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto c = watch->Connection(kDead);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const auto after = Listed(*c);
  EXPECT_EQ(after.size(), before[kDead].size());
  for (const auto& [id, len] : before[kDead]) {
    ASSERT_TRUE(after.count(id)) << "sequence " << id << " lost";
    EXPECT_GE(after.at(id), len) << "sequence " << id << " lost acknowledged tokens";
    EXPECT_TRUE(SameBytes(*c, id, after.at(id)));
  }
  // A new loadgen resumes every sequence where it is stored, on every shard, without an error.
  Loadgen b;
  b.Start({"--server", Join(names), "--sequences", "60", "--seconds", "2", "--tokens", "96",
           "--clients", "2", "--first-sequence-id", "1", "--durable", "--keep", "--attach"});
  const json rb = b.Result();
  EXPECT_EQ(rb["errors"], 0) << rb.dump();
  EXPECT_EQ(rb["resumes"], 60) << rb.dump();
  EXPECT_EQ(rb["sequences_by_shard"], r["sequences_by_shard"]);
  EXPECT_GT(rb["requests_by_shard"][names[kDead]].get<uint64_t>(), 0u) << rb.dump();
  // What it appended on the restarted shard is the workload's too.
  for (const auto& [id, len] : Listed(*c)) {
    EXPECT_GT(len, after.at(id)) << "sequence " << id << " was not decoded after the restart";
    EXPECT_TRUE(SameBytes(*c, id, len));
  }
}

TEST_F(ShardingTest, ScalingFromThreeToFourShardsKeepsEverySequenceReadable) {
  StartShards(4, 3);
  const auto three = Names(3), four = Names(4);
  // A 4th shard moves 15-35% of the placements, all of them to itself.
  size_t moved = 0;
  for (uint64_t id = 1; id <= 300; ++id) {
    const size_t before = client::ShardSet::Place(three, "dev", id);
    const size_t after = client::ShardSet::Place(four, "dev", id);
    if (before == after) continue;
    ++moved;
    EXPECT_EQ(after, 3u) << "sequence " << id << " moved between old shards";
  }
  EXPECT_GE(moved, 45u);
  EXPECT_LE(moved, 105u);

  Loadgen a;  // workers that know only the 3 shards, decoding through the scale-up
  a.Start({"--server", Join(three), "--sequences", "300", "--seconds", "12", "--tokens", "64",
           "--clients", "2", "--first-sequence-id", "1", "--keep"});
  ASSERT_TRUE(a.WaitDecoding()) << a.StderrTail();
  ASSERT_TRUE(shards_[3]->Start());
  // New workers with the 4 shards and the list from before: new sequences over all four.
  Loadgen b;
  b.Start({"--server", Join(four), "--previous-server", Join(three), "--sequences", "200",
           "--seconds", "2", "--tokens", "64", "--clients", "2", "--first-sequence-id", "100001",
           "--keep"});
  // Meanwhile every sequence of the first workers is found — on its previous owner when the 4th
  // shard now owns it — and reads back as sent (its complete blocks).
  auto watch = Watch(four, three);
  size_t on_previous = 0;
  for (uint64_t id = 1; id <= 300; ++id) {
    auto where = watch->Locate(id);
    ASSERT_TRUE(where.ok()) << where.status().ToString();
    EXPECT_EQ(*where, client::ShardSet::Place(three, "dev", id));
    on_previous += watch->ShardFor(id) != *where;
    EXPECT_TRUE(SameBytes(*watch->Connection(*where), id, 64));
  }
  EXPECT_EQ(on_previous, moved);
  const json rb = b.Result();
  EXPECT_EQ(rb["errors"], 0) << rb.dump();
  ASSERT_EQ(rb["sequences_by_shard"].size(), 4u) << rb.dump();
  for (const auto& n : four) {
    EXPECT_GE(rb["sequences_by_shard"][n].get<uint64_t>(), 25u) << n << " " << rb.dump();
    EXPECT_LE(rb["sequences_by_shard"][n].get<uint64_t>(), 75u) << n << " " << rb.dump();
  }
  const json ra = a.Result();
  EXPECT_EQ(ra["errors"], 0) << ra.dump();
  // Workers that resume the first sequences with the new list find each where it was created.
  Loadgen c;
  c.Start({"--server", Join(four), "--previous-server", Join(three), "--sequences", "300",
           "--seconds", "1", "--tokens", "64", "--clients", "2", "--first-sequence-id", "1",
           "--attach", "--keep"});
  const json rc = c.Result();
  EXPECT_EQ(rc["errors"], 0) << rc.dump();
  EXPECT_EQ(rc["resumes"], 300) << rc.dump();
  for (const auto& n : three)
    EXPECT_EQ(rc["sequences_by_shard"][n], ra["sequences_by_shard"][n]) << n;
  EXPECT_EQ(rc["sequences_by_shard"][four[3]], 0);
}

}  // namespace
}  // namespace kvm
