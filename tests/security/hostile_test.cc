// Hostile clients against a real kvmanager process (ctest -L security). The test starts the
// executable itself (stopped on every exit path, and with the test process if that dies) with
// small limits, and for each case runs a well-behaved client of another tenant on its own thread:
// it must be served throughout (every round trip of it succeeds, and it completes round trips
// while the attack is under way), and the server's RSS (/proc/PID/status VmRSS) must stay within
// +64 MiB of its value after start, sampled throughout. Each case prints its RSS before, after and
// at peak.
//   (a) a header (and a payload) trickled byte by byte: TimedOut at frame_read_timeout_ms, closed;
//   (b) more connections than max_connections_per_address (a flood of them) and than a tenant's
//       max_connections: each refused with Busy naming the limit, closed cleanly, counted;
//   (c) claims of huge sizes (frame and header lengths, claimed payloads never sent, shapes, block
//       lists, pending rows): a clear error, nothing allocated for them;
//   (d) Append payloads that do not match the shape: InvalidArgument, nothing stored;
//   (e) appends out of order (a gap, other tokens at a stored position): FailedPrecondition,
//       nothing changed;
//   (f) a client that pipelines large ReadBlocks and never reads: its session is closed at
//       max_session_send_queue_bytes;
//   (g) request floods: Busy at the tenant's max_in_flight (two sessions of it together) and at
//       max_session_queued; every request answered once; the other tenant never starved;
//   (h) clients that stop sending (half-close, or close): every request they sent answered, then
//       their sessions closed and their descriptors freed at once, not at session_timeout_ms.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"
#include "proto/kvm.pb.h"
#include "selector/prhs.h"
#include "selector/wire_options.h"

namespace kvm {
namespace {

using Clock = std::chrono::steady_clock;
using wire::MessageType;

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kRssSlack = 64 * kMiB;
constexpr uint64_t kMaxFrame = 16 * kMiB;
constexpr uint32_t kFrameTimeoutMs = 1000;
constexpr uint32_t kPerAddress = 16;
constexpr uint64_t kSendQueue = 8 * kMiB;
constexpr uint32_t kSessionQueued = 64;
constexpr uint32_t kTenantInFlight = 8;  // tenant h
constexpr uint32_t kTenantSessions = 4;  // tenant h
const ModelShape kShape{2, 4, 2, 32, DType::kF16, 3};
constexpr uint32_t kB = 4;

// ---- the kvmanager process ----
class Kvmanager {
 public:
  Kvmanager() {
    char tmpl[] = "/tmp/kvm_hostile_test_XXXXXX";
    dir_ = mkdtemp(tmpl);
    std::ofstream(dir_ + "/tenants.yaml")
        << "tenants:\n"
           "  - {name: a, token: tokA}\n"
           "  - {name: h, token: tokH, max_in_flight: "
        << kTenantInFlight << ", max_connections: " << kTenantSessions
        << "}\n"
           "  - {name: b, token: tokB}\n";
    const std::vector<std::string> args = {
        KVMANAGER,
        "--listen=127.0.0.1:0",
        "--admin=127.0.0.1:0",
        "--data-dir=" + dir_ + "/data",
        "--no-gpu",
        "--data-plane=none",
        "--no-dev-tenant",
        "--tenants-file=" + dir_ + "/tenants.yaml",
        "--host-capacity-bytes=" + std::to_string(32 * kMiB),
        "--max-frame-bytes=" + std::to_string(kMaxFrame),
        "--frame-read-timeout-ms=" + std::to_string(kFrameTimeoutMs),
        "--max-connections-per-address=" + std::to_string(kPerAddress),
        "--max-session-send-queue-bytes=" + std::to_string(kSendQueue),
        "--max-session-queued=" + std::to_string(kSessionQueued),
        "--session-timeout-ms=60000"};
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
      std::freopen((dir_ + "/out.txt").c_str(), "w", stdout);
      std::freopen((dir_ + "/log.txt").c_str(), "w", stderr);
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 600 && (port_ == 0 || admin_ == 0) && Alive(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::ifstream out(dir_ + "/out.txt");
      std::string line;
      while (std::getline(out, line)) {
        unsigned p = 0;
        if (std::sscanf(line.c_str(), "kvmanager listening on 127.0.0.1:%u", &p) == 1) port_ = p;
        if (std::sscanf(line.c_str(), "kvmanager admin on 127.0.0.1:%u", &p) == 1) admin_ = p;
      }
    }
  }
  ~Kvmanager() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int st = 0;
      for (int i = 0; i < 200 && waitpid(pid_, &st, WNOHANG) == 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (waitpid(pid_, &st, WNOHANG) == 0) {
        ::kill(pid_, SIGKILL);
        waitpid(pid_, &st, 0);
      }
    }
    std::filesystem::remove_all(dir_);
  }
  bool Alive() const { return pid_ > 0 && ::kill(pid_, 0) == 0; }
  uint16_t port() const { return port_; }
  uint16_t admin() const { return admin_; }
  // VmRSS in bytes (0 when unreadable).
  uint64_t Rss() const {
    std::ifstream f("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
    return 0;
  }
  // Its open sockets (connections and listeners; files RocksDB opens meanwhile do not count).
  size_t Sockets() const {
    size_t n = 0;
    for (const auto& e :
         std::filesystem::directory_iterator("/proc/" + std::to_string(pid_) + "/fd")) {
      std::error_code ec;
      const auto target = std::filesystem::read_symlink(e.path(), ec);
      n += !ec && target.string().rfind("socket:", 0) == 0 ? 1 : 0;
    }
    return n;
  }
  std::string Log() const {
    std::ifstream f(dir_ + "/log.txt");
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }

 private:
  std::string dir_;
  pid_t pid_ = -1;
  uint16_t port_ = 0, admin_ = 0;
};

// ---- raw connections (the hostile clients), from a chosen loopback address ----
class Raw {
 public:
  Raw(const std::string& from, uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in src{};
    src.sin_family = AF_INET;
    inet_pton(AF_INET, from.c_str(), &src.sin_addr);
    sockaddr_in dst{};
    dst.sin_family = AF_INET;
    dst.sin_port = htons(port);
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0 ||
        ::connect(fd_, reinterpret_cast<sockaddr*>(&dst), sizeof dst) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~Raw() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ok() const { return fd_ >= 0; }
  // Sends nothing more (the server reads EOF); the replies can still be read.
  void ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }
  // False once the server has closed the connection.
  bool Send(std::span<const uint8_t> b) {
    while (!b.empty()) {
      const ssize_t n = ::send(fd_, b.data(), b.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      b = b.subspan(size_t(n));
    }
    return true;
  }
  bool Send(MessageType t, uint64_t id, const google::protobuf::MessageLite& m,
            std::span<const uint8_t> payload = {}) {
    return Send(wire::EncodeFrame(static_cast<uint16_t>(t), id, m, payload));
  }
  // Whether a byte (or the close) can be read within `ms`.
  bool Readable(int ms) {
    pollfd p{fd_, POLLIN, 0};
    return ::poll(&p, 1, ms) > 0;
  }
  // The next frame within `ms`: Unavailable when the server closed the connection, TimedOut.
  Result<wire::Frame> Next(int ms = 20000) {
    const auto until = Clock::now() + std::chrono::milliseconds(ms);
    wire::Frame f;
    while (!dec_.Next(&f)) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
      if (left <= 0 || !Readable(int(left))) return Status::TimedOut("no frame");
      uint8_t buf[64 * 1024];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return Status::Unavailable("closed by the server");
      KVM_RETURN_IF_ERROR(dec_.Feed({buf, size_t(n)}));
    }
    return f;
  }
  // Reads until the server closes the connection (true) or `ms` pass (false); *bytes: how much
  // arrived meanwhile, *keep (when given): what.
  bool UntilClosed(int ms, uint64_t* bytes = nullptr, std::string* keep = nullptr) {
    const auto until = Clock::now() + std::chrono::milliseconds(ms);
    std::vector<uint8_t> buf(1 << 20);
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
      if (left <= 0 || !Readable(int(left))) return false;
      const ssize_t n = ::recv(fd_, buf.data(), buf.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return true;  // EOF or reset
      if (bytes) *bytes += uint64_t(n);
      if (keep) keep->append(reinterpret_cast<const char*>(buf.data()), size_t(n));
    }
  }

 private:
  int fd_ = -1;
  wire::FrameDecoder dec_;
};

// The Status an Error frame carries (OK for any other frame).
Status ErrorOf(const wire::Frame& f) {
  if (f.header.type != static_cast<uint16_t>(MessageType::kError)) return Status::Ok();
  wire::Error e;
  if (!wire::ParseProto(f, &e).ok()) return Status::Internal("unparseable Error frame");
  return wire::StatusFromWire(e.code(), e.message());
}

wire::Hello HelloOf(const std::string& tenant, const std::string& token) {
  wire::Hello h;
  h.set_protocol_version(wire::kProtocolVersion);
  h.set_tenant(tenant);
  h.set_auth_token(token);
  return h;
}

// A raw session that said Hello (its reply read).
std::unique_ptr<Raw> RawSession(const std::string& from, uint16_t port, const std::string& tenant,
                                const std::string& token) {
  auto r = std::make_unique<Raw>(from, port);
  if (!r->ok() || !r->Send(MessageType::kHello, 1, HelloOf(tenant, token))) return nullptr;
  auto f = r->Next();
  if (!f.ok() || f->header.type != wire::ReplyType(MessageType::kHello)) return nullptr;
  return r;
}

wire::CreateSequence CreateOf(uint64_t id, const ModelShape& shape, uint32_t block) {
  wire::CreateSequence cs;
  cs.set_sequence_id(id);
  wire::ToWire(shape, cs.mutable_shape());
  cs.set_block_size(block);
  cs.set_durability(wire::CACHE);
  return cs;
}

wire::Append AppendOf(uint64_t id, uint64_t start, uint32_t n, uint32_t token0 = 0) {
  wire::Append a;
  a.set_sequence_id(id);
  a.set_start_position(start);
  for (uint32_t t = 0; t < n; ++t) a.add_token_ids(token0 + t);
  return a;
}

std::vector<uint8_t> Pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = uint8_t(i * 7 + seed * 13 + 1);
  return p;
}

client::ConnectOptions Opts(uint16_t port, const std::string& tenant, const std::string& token) {
  client::ConnectOptions co;
  co.address = "127.0.0.1:" + std::to_string(port);
  co.tenant = tenant;
  co.token = token;
  co.deadline_ms = 20000;
  co.heartbeats = false;
  return co;
}

// The admin port's /metrics: the value of one sample ("name" or "name{labels}"), -1 if absent.
double Metric(uint16_t admin, const std::string& sample) {
  Raw r("127.0.0.1", admin);
  const std::string req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (!r.ok() || !r.Send({reinterpret_cast<const uint8_t*>(req.data()), req.size()})) return -1;
  std::string body;
  r.UntilClosed(10000, nullptr, &body);
  std::istringstream in(body);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(sample + " ", 0) == 0) return std::stod(line.substr(sample.size() + 1));
  return -1;
}

// ---- the well-behaved client: tenant a, round trips on its own thread until Stop ----
class Served {
 public:
  Served(const Kvmanager& k, uint64_t first_seq) : k_(k), seq_(first_seq) {
    auto c = client::Client::Connect(Opts(k.port(), "a", "tokA"));
    if (!c.ok()) {
      failures_.push_back("connect: " + c.status().ToString());
      return;
    }
    client_ = std::move(*c);
    thread_ = std::thread([this] { Run(); });
  }
  ~Served() { Stop(); }
  // Waits until `n` more round trips succeeded (or one failed, or 60 s passed): the service kept
  // serving while the caller's attack was under way.
  bool ServesMore(uint64_t n) {
    const uint64_t want = done_.load() + n;
    for (int i = 0; i < 6000 && done_.load() < want && !failed_.load(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return done_.load() >= want;
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t done() const { return done_.load(); }
  uint64_t peak_rss() const { return peak_.load(); }
  std::vector<std::string> failures() {
    std::lock_guard<std::mutex> l(mu_);
    return failures_;
  }

 private:
  void Fail(const std::string& why) {
    std::lock_guard<std::mutex> l(mu_);
    failures_.push_back(why);
    failed_ = true;
  }
  // Create, append 16 tokens, read every K block back byte-identical, delete.
  void Run() {
    while (!stop_) {
      peak_ = std::max(peak_.load(), k_.Rss());
      const uint64_t id = seq_++;
      auto cr = client_->Call(MessageType::kCreateSequence, CreateOf(id, kShape, kB));
      if (!cr.ok()) return Fail("create: " + cr.status().ToString());
      const auto payload = Pattern(wire::AppendPayloadBytes(kShape, 16), uint32_t(id));
      auto ar = client_->Call(MessageType::kAppend, AppendOf(id, 0, 16), payload);
      if (!ar.ok()) return Fail("append: " + ar.status().ToString());
      wire::ReadBlocks rb;
      rb.set_sequence_id(id);
      for (uint32_t b = 0; b < 4; ++b) rb.add_block_indices(b);
      auto f = client_->Call(MessageType::kReadBlocks, rb);
      if (!f.ok()) return Fail("read: " + f.status().ToString());
      // [layer][kv_head][K,V][16][D]: layer 0, head 0, K is the first 16 rows.
      const size_t rows = size_t{16} * kShape.head_dim * 2;
      if (f->payload.size() != rows ||
          !std::equal(f->payload.begin(), f->payload.end(), payload.begin()))
        return Fail("read: the blocks differ from what was appended");
      if (Status st = client_->DeleteSequence(id); !st.ok())
        return Fail("delete: " + st.ToString());
      ++done_;
    }
  }
  const Kvmanager& k_;
  std::atomic<uint64_t> seq_;
  std::unique_ptr<client::Client> client_;
  std::thread thread_;
  std::atomic<bool> stop_{false}, failed_{false};
  std::atomic<uint64_t> done_{0}, peak_{0};
  std::mutex mu_;
  std::vector<std::string> failures_;  // GUARDED_BY(mu_)
};

class HostileTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    k_ = new Kvmanager();
    ASSERT_TRUE(k_->port() && k_->admin()) << k_->Log();
    // Warm up (the store's first sequence, the client paths), then take the baseline.
    {
      Served warm(*k_, 1);
      ASSERT_TRUE(warm.ServesMore(20)) << (warm.failures().empty() ? "" : warm.failures()[0]);
    }
    baseline_ = k_->Rss();
    ASSERT_GT(baseline_, 0u);
    std::printf("hostile: kvmanager RSS after start: %.1f MiB (limit: +64 MiB)\n",
                double(baseline_) / kMiB);
  }
  static void TearDownTestSuite() {
    std::printf("hostile: RSS per case (before -> after, peak; baseline %.1f MiB):\n%s",
                double(baseline_) / kMiB, summary_.c_str());
    delete k_;
    k_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(k_ && k_->Alive());
    before_ = k_->Rss();
    good_ = std::make_unique<Served>(*k_, next_seq_);
    next_seq_ += 1000000;
  }
  // The well-behaved client was served throughout; the RSS stayed within the baseline + 64 MiB.
  void Finish(const std::string& name) {
    ASSERT_TRUE(good_->ServesMore(3)) << (good_->failures().empty() ? "" : good_->failures()[0]);
    good_->Stop();
    const auto failures = good_->failures();
    EXPECT_TRUE(failures.empty()) << failures.size() << " failures, the first: " << failures[0];
    EXPECT_GT(good_->done(), 0u);
    const uint64_t after = k_->Rss(), peak = std::max({good_->peak_rss(), after, before_});
    char line[256];
    std::snprintf(line, sizeof line,
                  "  %-44s %7.1f -> %7.1f MiB, peak %7.1f MiB; well-behaved round trips %llu\n",
                  name.c_str(), double(before_) / kMiB, double(after) / kMiB, double(peak) / kMiB,
                  static_cast<unsigned long long>(good_->done()));
    std::printf("hostile case %s", line);
    summary_ += line;
    EXPECT_LE(after, baseline_ + kRssSlack) << name;
    EXPECT_LE(peak, baseline_ + kRssSlack) << name;
    EXPECT_TRUE(k_->Alive()) << k_->Log();
  }
  static Kvmanager* k_;
  static uint64_t baseline_;
  static std::string summary_;
  static uint64_t next_seq_;
  uint64_t before_ = 0;
  std::unique_ptr<Served> good_;
};
Kvmanager* HostileTest::k_ = nullptr;
uint64_t HostileTest::baseline_ = 0;
std::string HostileTest::summary_;
uint64_t HostileTest::next_seq_ = 1000000;

// (a) Bytes trickled one at a time: a header that never completes and a payload that never does.
TEST_F(HostileTest, ATrickledFrameIsClosedAtTheFrameReadDeadline) {
  const double timeouts0 =
      Metric(k_->admin(), "kvm_sessions_closed_total{reason=\"frame_timeout\"}");
  ASSERT_GE(timeouts0, 0);
  wire::Hello h = HelloOf("a", "tokA");
  const auto hello = wire::EncodeFrame(static_cast<uint16_t>(MessageType::kHello), 1, h);
  // Three header tricklers and one that sends a whole header claiming a 4 KiB payload, then
  // trickles the payload.
  wire::FrameHeader fh;
  fh.type = static_cast<uint16_t>(MessageType::kAppend);
  fh.request_id = 2;
  fh.payload_len = 4096;
  uint8_t hdr[wire::kFrameHeaderBytes];
  wire::EncodeFrameHeader(fh, hdr);
  std::vector<std::unique_ptr<Raw>> t;
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<size_t> sent(4, 0);
  for (int i = 0; i < 4; ++i) {
    t.push_back(std::make_unique<Raw>("127.0.0.3", k_->port()));
    ASSERT_TRUE(t.back()->ok());
  }
  for (int i = 0; i < 3; ++i) bytes.emplace_back(hello.begin(), hello.begin() + 31);
  bytes.emplace_back(std::vector<uint8_t>(4000, 0));
  ASSERT_TRUE(t[3]->Send(hdr));
  std::vector<Status> closed(4, Status::Unavailable("still open"));
  std::vector<bool> done(4, false);
  const auto start = Clock::now();
  // One byte each per 100 ms: each stream would take >= 3 s; the deadline is 1 s.
  for (size_t step = 0; step < 4000 && std::count(done.begin(), done.end(), true) < 4; ++step) {
    for (int i = 0; i < 4; ++i) {
      if (done[i]) continue;
      if (t[i]->Readable(0)) {
        auto f = t[i]->Next(1000);
        closed[i] = f.ok() ? ErrorOf(*f) : f.status();
        done[i] = true;
        continue;
      }
      if (sent[i] < bytes[i].size() && t[i]->Send({&bytes[i][sent[i]], 1})) ++sent[i];
    }
    if (step == 5) {
      EXPECT_TRUE(good_->ServesMore(3)) << "served while the tricklers trickle";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(done[i]) << "trickler " << i << " still open after " << secs << " s";
    EXPECT_TRUE(closed[i].IsTimedOut()) << i << ": " << closed[i].ToString();
    EXPECT_NE(closed[i].message().find("frame_read_timeout_ms 1000"), std::string::npos)
        << closed[i].ToString();
    EXPECT_TRUE(t[i]->UntilClosed(5000)) << "then closed";
  }
  EXPECT_EQ(Metric(k_->admin(), "kvm_sessions_closed_total{reason=\"frame_timeout\"}"),
            timeouts0 + 4);
  Finish("(a) trickled header / payload");
}

// (b) Connections past the per-address limit (and a flood of them), and past a tenant's limit.
TEST_F(HostileTest, ConnectionsPastTheLimitsAreRefusedCleanly) {
  const double refused_addr0 =
      Metric(k_->admin(), "kvm_connections_refused_total{limit=\"per_address\"}");
  const double refused_tenant0 =
      Metric(k_->admin(), "kvm_connections_refused_total{limit=\"per_tenant\"}");
  ASSERT_GE(refused_addr0, 0);
  std::vector<std::unique_ptr<Raw>> held;
  for (uint32_t i = 0; i < kPerAddress; ++i) {
    held.push_back(RawSession("127.0.0.2", k_->port(), "a", "tokA"));
    ASSERT_TRUE(held.back()) << "connection " << i << " within the limit is served";
  }
  // The next ones from that address: an Error frame (Busy) naming the limit, then the close.
  uint64_t refused = 0;
  std::vector<std::unique_ptr<Raw>> flood;
  for (int i = 0; i < 200; ++i) {
    flood.push_back(std::make_unique<Raw>("127.0.0.2", k_->port()));
    ASSERT_TRUE(flood.back()->ok());
    flood.back()->Send(MessageType::kHello, 1, HelloOf("a", "tokA"));  // may fail: closed
  }
  EXPECT_TRUE(good_->ServesMore(3)) << "served during the connection flood";
  for (size_t i = 0; i < flood.size(); ++i) {
    auto f = flood[i]->Next();
    ASSERT_TRUE(f.ok()) << i << ": " << f.status().ToString();
    const Status st = ErrorOf(*f);
    EXPECT_TRUE(st.IsBusy()) << i << ": " << st.ToString();
    if (i == 0) {
      EXPECT_NE(st.message().find("too many connections from 127.0.0.2: 16 open "
                                  "(max_connections_per_address 16)"),
                std::string::npos)
          << st.ToString();
    }
    refused += st.IsBusy();
    EXPECT_TRUE(flood[i]->UntilClosed(5000)) << i << ": closed after the refusal";
  }
  flood.clear();
  // The held ones still work; once they close, the address is served again.
  ASSERT_TRUE(held[0]->Send(MessageType::kListSequences, 2, wire::ListSequences()));
  auto lr = held[0]->Next();
  ASSERT_TRUE(lr.ok() && ErrorOf(*lr).ok());
  held.clear();
  std::unique_ptr<Raw> again;
  for (int i = 0; i < 200 && !again; ++i) {  // the server sees the closes asynchronously
    auto r = std::make_unique<Raw>("127.0.0.2", k_->port());
    r->Send(MessageType::kHello, 1, HelloOf("a", "tokA"));
    auto f = r->Next();
    if (f.ok() && ErrorOf(*f).ok())
      again = std::move(r);
    else if (f.ok() && ErrorOf(*f).IsBusy())
      ++refused;
    if (!again) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(again) << "the address is served again after its connections closed";
  again.reset();

  // Tenant h: at most 4 sessions; the 5th Hello is Busy naming the limit, the connection open.
  std::vector<std::unique_ptr<client::Client>> hs;
  for (uint32_t i = 0; i < kTenantSessions; ++i) {
    auto c = client::Client::Connect(Opts(k_->port(), "h", "tokH"));
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    hs.push_back(std::move(*c));
  }
  uint64_t refused_tenant = 0;
  auto fifth = client::Client::Connect(Opts(k_->port(), "h", "tokH"));
  ASSERT_FALSE(fifth.ok());
  EXPECT_TRUE(fifth.status().IsBusy()) << fifth.status().ToString();
  EXPECT_NE(fifth.status().message().find(
                "tenant 'h' is at its max_connections limit: 4 sessions open (max_connections 4)"),
            std::string::npos)
      << fifth.status().ToString();
  refused_tenant += fifth.status().IsBusy();
  hs.pop_back();
  std::unique_ptr<client::Client> back;
  for (int i = 0; i < 200 && !back; ++i) {
    auto c = client::Client::Connect(Opts(k_->port(), "h", "tokH"));
    if (c.ok())
      back = std::move(*c);
    else if (c.status().IsBusy())
      ++refused_tenant;
    if (!back) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(back) << "a tenant's place comes back when its session closes";
  EXPECT_EQ(Metric(k_->admin(), "kvm_connections_refused_total{limit=\"per_address\"}"),
            refused_addr0 + double(refused));
  EXPECT_EQ(Metric(k_->admin(), "kvm_connections_refused_total{limit=\"per_tenant\"}"),
            refused_tenant0 + double(refused_tenant));
  std::printf("(b) refused: %llu per address, %llu per tenant\n",
              static_cast<unsigned long long>(refused),
              static_cast<unsigned long long>(refused_tenant));
  Finish("(b) connections past the limits");
}

// (c) Sizes claimed far beyond the limits: clear errors, nothing allocated for them.
TEST_F(HostileTest, ClaimsOfHugeSizesAreClearErrorsAndAllocateNothing) {
  auto claim = [&](uint32_t header_len, uint64_t payload_len) {
    Raw r("127.0.0.4", k_->port());
    wire::FrameHeader fh;
    fh.type = static_cast<uint16_t>(MessageType::kHello);
    fh.request_id = 1;
    fh.header_len = header_len;
    fh.payload_len = payload_len;
    uint8_t hdr[wire::kFrameHeaderBytes];
    wire::EncodeFrameHeader(fh, hdr);
    EXPECT_TRUE(r.Send(hdr));
    auto f = r.Next();
    const Status st = f.ok() ? ErrorOf(*f) : f.status();
    EXPECT_TRUE(r.UntilClosed(5000)) << "closed after the error";
    return st;
  };
  const Status huge_payload = claim(16, 1ull << 40);
  EXPECT_TRUE(huge_payload.IsOutOfRange()) << huge_payload.ToString();
  const Status huge_header = claim(1u << 30, 0);
  EXPECT_TRUE(huge_header.IsOutOfRange()) << huge_header.ToString();
  std::printf("(c) a 1 TiB payload claimed: %s\n(c) a 1 GiB header claimed: %s\n",
              huge_payload.ToString().c_str(), huge_header.ToString().c_str());
  // Frames within the limit whose bodies never come: 15 MiB claimed each, from 16 connections;
  // the server holds only what arrived, and the deadline closes them.
  std::vector<std::unique_ptr<Raw>> claims;
  for (uint32_t i = 0; i < kPerAddress; ++i) {
    claims.push_back(std::make_unique<Raw>("127.0.0.4", k_->port()));
    wire::FrameHeader fh;
    fh.type = static_cast<uint16_t>(MessageType::kAppend);
    fh.request_id = 1;
    fh.payload_len = 15 * kMiB;
    uint8_t hdr[wire::kFrameHeaderBytes];
    wire::EncodeFrameHeader(fh, hdr);
    ASSERT_TRUE(claims.back()->Send(hdr));
    ASSERT_TRUE(claims.back()->Send(std::vector<uint8_t>(1024, 0)));
  }
  EXPECT_TRUE(good_->ServesMore(3));
  for (auto& c : claims) {
    auto f = c->Next();
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_TRUE(ErrorOf(*f).IsTimedOut()) << ErrorOf(*f).ToString();
    EXPECT_TRUE(c->UntilClosed(5000));
  }
  claims.clear();
  // Authenticated claims (tenant h): shapes, block lists, pending rows, positions.
  auto c = client::Client::Connect(Opts(k_->port(), "h", "tokH"));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto call = [&](MessageType t, const google::protobuf::MessageLite& m,
                  std::span<const uint8_t> payload = {}) {
    auto r = (*c)->Call(t, m, payload);
    return r.ok() ? Status::Ok() : r.status();
  };
  std::vector<std::pair<std::string, Status>> got;
  {
    wire::CreateSequence cs = CreateOf(1, kShape, kB);
    cs.mutable_shape()->set_layers(1u << 30);
    got.emplace_back("CreateSequence with 2^30 layers", call(MessageType::kCreateSequence, cs));
    cs = CreateOf(1, kShape, kB);
    cs.mutable_shape()->set_head_dim(1u << 20);
    got.emplace_back("CreateSequence with head_dim 2^20", call(MessageType::kCreateSequence, cs));
    cs = CreateOf(1, kShape, 1u << 30);
    got.emplace_back("CreateSequence with block_size 2^30", call(MessageType::kCreateSequence, cs));
  }
  ASSERT_TRUE(call(MessageType::kCreateSequence, CreateOf(1, kShape, kB)).ok());
  const auto payload = Pattern(wire::AppendPayloadBytes(kShape, 8), 1);
  ASSERT_TRUE(call(MessageType::kAppend, AppendOf(1, 0, 8), payload).ok());
  {
    wire::ReadBlocks rb;  // 8,000 blocks of a sequence that has 2
    rb.set_sequence_id(1);
    for (uint64_t b = 0; b < 8000; ++b) rb.add_block_indices(b);
    got.emplace_back("ReadBlocks of 8000 blocks (2 stored)", call(MessageType::kReadBlocks, rb));
    rb.clear_block_indices();
    rb.add_block_indices(1ull << 60);
    got.emplace_back("ReadBlocks of block 2^60", call(MessageType::kReadBlocks, rb));
  }
  {
    // A sequence with a selector (PrHS), for the retrieval's and the audit's claims.
    sel::SelectorOptions so;
    so.geometry = {kB, 4, 8};
    so.budget_tokens = 48;
    so.prhs.max_cluster_steps = 8;
    auto prhs = sel::PrhsSelector::Make(so, kShape, 240);
    ASSERT_TRUE(prhs.ok()) << prhs.status().ToString();
    wire::CreateSequence cs = CreateOf(3, kShape, kB);
    sel::ToWire({"prhs", so}, cs.mutable_selector());
    cs.set_hot_set_slots(uint32_t((*prhs)->HotSetSlots()));
    ASSERT_TRUE(call(MessageType::kCreateSequence, cs).ok());
    ASSERT_TRUE(call(MessageType::kAppend, AppendOf(3, 0, 8), payload).ok());
    const size_t queries = size_t{kShape.q_heads / kShape.kv_heads} * kShape.head_dim * 4;
    wire::RetrieveLayer m;  // 2^31 pending rows claimed, none sent
    m.set_sequence_id(3);
    m.set_step(7);
    m.add_kv_heads(0);
    m.set_pending_tokens(1u << 31);
    got.emplace_back("RetrieveLayer with 2^31 pending rows",
                     call(MessageType::kRetrieveLayer, m, std::vector<uint8_t>(queries, 0)));
    m.set_pending_tokens(0);
    m.set_step(1ull << 62);
    got.emplace_back("RetrieveLayer at step 2^62",
                     call(MessageType::kRetrieveLayer, m, std::vector<uint8_t>(queries, 0)));
    m.set_step(7);
    m.add_kv_heads(1u << 30);
    got.emplace_back("RetrieveLayer of KV head 2^30",
                     call(MessageType::kRetrieveLayer, m, std::vector<uint8_t>(2 * queries, 0)));
    wire::Audit au;
    au.set_sequence_id(3);
    au.set_step(1ull << 62);
    au.add_kv_heads(0);
    got.emplace_back("Audit at step 2^62",
                     call(MessageType::kAudit, au, std::vector<uint8_t>(queries, 0)));
    wire::SetLayerMap lm;
    lm.set_sequence_id(3);
    for (int i = 0; i < 5000; ++i) lm.add_source_layer(0);
    got.emplace_back("SetLayerMap of 5000 layers (2 stored)", call(MessageType::kSetLayerMap, lm));
    EXPECT_TRUE((*c)->DeleteSequence(3).ok());
    wire::Correct co;
    co.set_sequence_id(1);
    co.set_step(1ull << 40);
    co.add_heads()->set_kv_head(0);
    got.emplace_back("Correct at step 2^40",
                     call(MessageType::kCorrect, co, std::vector<uint8_t>(2 * 32 * 4, 0)));
  }
  {
    wire::Truncate t;
    t.set_sequence_id(1);
    t.set_length(1ull << 60);
    got.emplace_back("Truncate to 2^60 tokens", call(MessageType::kTruncate, t));
    got.emplace_back("Append at position 2^62",
                     call(MessageType::kAppend, AppendOf(1, 1ull << 62, 8), payload));
  }
  for (const auto& [what, st] : got) {
    std::printf("(c) %-40s -> %s\n", what.c_str(), st.ToString().c_str());
    EXPECT_FALSE(st.ok()) << what;
    EXPECT_FALSE(st.IsInternal() || st.IsUnavailable()) << what << ": " << st.ToString();
  }
  // The sequence is as it was.
  wire::ReadBlocks rb;
  rb.set_sequence_id(1);
  rb.add_block_indices(0);
  rb.add_block_indices(1);
  auto rf = (*c)->Call(MessageType::kReadBlocks, rb);
  ASSERT_TRUE(rf.ok()) << rf.status().ToString();
  EXPECT_TRUE(std::equal(rf->payload.begin(), rf->payload.end(), payload.begin()));
  EXPECT_TRUE((*c)->DeleteSequence(1).ok());
  Finish("(c) claims of huge sizes");
}

// (d) Append payloads that do not match the shape and the token count; (e) appends out of order.
// Each is refused with the reason, and the sequence is byte-identical afterwards.
TEST_F(HostileTest, MismatchedPayloadsAndOutOfOrderAppendsChangeNothing) {
  auto c = client::Client::Connect(Opts(k_->port(), "h", "tokH"));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE((*c)->Call(MessageType::kCreateSequence, CreateOf(2, kShape, kB)).ok());
  const auto first = Pattern(wire::AppendPayloadBytes(kShape, 16), 2);
  ASSERT_TRUE((*c)->Call(MessageType::kAppend, AppendOf(2, 0, 16), first).ok());
  auto contents = [&]() {
    wire::ReadBlocks rb;
    rb.set_sequence_id(2);
    for (uint32_t b = 0; b < 8; ++b) rb.add_block_indices(b);  // 4 stored, 4 past the end
    std::vector<uint8_t> all;
    for (uint32_t l = 0; l < kShape.layers; ++l)
      for (uint32_t h = 0; h < kShape.kv_heads; ++h)
        for (bool v : {false, true}) {
          rb.set_layer(l);
          rb.set_kv_head(h);
          rb.set_values(v);
          rb.clear_block_indices();
          for (uint32_t b = 0; b < 4; ++b) rb.add_block_indices(b);
          auto f = (*c)->Call(MessageType::kReadBlocks, rb);
          EXPECT_TRUE(f.ok()) << f.status().ToString();
          if (f.ok()) all.insert(all.end(), f->payload.begin(), f->payload.end());
        }
    wire::CreateSequence at = CreateOf(2, kShape, kB);
    at.set_attach(true);
    auto a = (*c)->Call(MessageType::kCreateSequence, at);
    wire::CreateSequenceReply r;
    EXPECT_TRUE(a.ok() && wire::ParseProto(*a, &r).ok());
    all.push_back(uint8_t(r.length()));
    return all;
  };
  const auto before = contents();
  ASSERT_EQ(before.back(), 16);
  const size_t one = wire::AppendPayloadBytes(kShape, 1);
  std::vector<std::pair<std::string, Status>> shape, order;
  auto append = [&](uint64_t start, uint32_t n, std::vector<uint8_t> payload, uint32_t token0,
                    std::vector<uint32_t> k_from_retrieval = {}) {
    wire::Append a = AppendOf(2, start, n, token0);
    for (uint32_t k : k_from_retrieval) a.add_k_from_retrieval(k);
    auto r = (*c)->Call(MessageType::kAppend, a, payload);
    return r.ok() ? Status::Ok() : r.status();
  };
  shape.emplace_back("4 tokens, a payload 1 byte short",
                     append(16, 4, std::vector<uint8_t>(4 * one - 1, 9), 16));
  shape.emplace_back("4 tokens, the payload of 5",
                     append(16, 4, std::vector<uint8_t>(5 * one, 9), 16));
  shape.emplace_back("4 tokens, no payload", append(16, 4, {}, 16));
  shape.emplace_back("no tokens, a payload", append(16, 0, std::vector<uint8_t>(one, 9), 16));
  shape.emplace_back("k_from_retrieval (layer, head) 99",
                     append(16, 1, std::vector<uint8_t>(one, 9), 16, {99}));
  for (const auto& [what, st] : shape) {
    std::printf("(d) %-40s -> %s\n", what.c_str(), st.ToString().c_str());
    EXPECT_TRUE(st.IsInvalidArgument() || st.IsFailedPrecondition())
        << what << ": " << st.ToString();
  }
  order.emplace_back("at 32 with 16 stored (a gap)",
                     append(32, 4, std::vector<uint8_t>(4 * one, 9), 32));
  order.emplace_back("at 17 with 16 stored (a gap of 1)",
                     append(17, 1, std::vector<uint8_t>(one, 9), 17));
  order.emplace_back("at 8, other tokens than stored",
                     append(8, 4, std::vector<uint8_t>(4 * one, 9), 1000));
  for (const auto& [what, st] : order) {
    std::printf("(e) %-40s -> %s\n", what.c_str(), st.ToString().c_str());
    EXPECT_TRUE(st.IsFailedPrecondition()) << what << ": " << st.ToString();
  }
  EXPECT_NE(order[0].second.message().find("gap"), std::string::npos) << order[0].second.ToString();
  EXPECT_EQ(contents(), before) << "nothing changed";
  // The next step in order is taken.
  EXPECT_TRUE(append(16, 4, Pattern(4 * one, 3), 16).ok());
  EXPECT_EQ(contents().back(), 20);
  EXPECT_TRUE((*c)->DeleteSequence(2).ok());
  Finish("(d)+(e) mismatched payloads, out of order");
}

// (f) A client that pipelines ReadBlocks of 1 MiB replies and never reads them.
TEST_F(HostileTest, AClientThatNeverReadsIsClosedAtTheSendQueueLimit) {
  const ModelShape big{1, 1, 1, 256, DType::kF32, 9};
  const uint32_t block = 256, tokens = 1024;  // 4 blocks of 256 KiB per K and V
  const double send_queue_closed0 =
      Metric(k_->admin(), "kvm_sessions_closed_total{reason=\"send_queue\"}");
  ASSERT_GE(send_queue_closed0, 0);
  auto r = RawSession("127.0.0.5", k_->port(), "b", "tokB");
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->Send(MessageType::kCreateSequence, 2, CreateOf(5, big, block)));
  auto cf = r->Next();
  ASSERT_TRUE(cf.ok() && ErrorOf(*cf).ok()) << (cf.ok() ? ErrorOf(*cf) : cf.status()).ToString();
  ASSERT_TRUE(r->Send(MessageType::kAppend, 3, AppendOf(5, 0, tokens),
                      Pattern(wire::AppendPayloadBytes(big, tokens), 5)));
  auto af = r->Next();
  ASSERT_TRUE(af.ok() && ErrorOf(*af).ok()) << (af.ok() ? ErrorOf(*af) : af.status()).ToString();
  wire::ReadBlocks rb;
  rb.set_sequence_id(5);
  for (uint32_t b = 0; b < 4; ++b) rb.add_block_indices(b);
  const uint64_t requests = 3000, reply = 4ull * block * 256 * 4;  // 1 MiB each
  uint64_t sent = 0;
  while (sent < requests && r->Send(MessageType::kReadBlocks, 10 + sent, rb)) {
    ++sent;
    if (sent == 200) {
      EXPECT_TRUE(good_->ServesMore(3)) << "served while the replies pile up";
    }
  }
  // Still not reading: the replies fill the socket buffers, then the session's send queue, and
  // the server closes the session. (Reading at once would race the server: a client that reads
  // as fast as the replies come is a good client, and on a loaded machine it keeps up.)
  for (const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
       Metric(k_->admin(), "kvm_sessions_closed_total{reason=\"send_queue\"}") <
           send_queue_closed0 + 1 &&
       std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  // Now read: what was buffered, then the close (long before 3000 MiB of replies).
  uint64_t got = 0;
  EXPECT_TRUE(r->UntilClosed(60000, &got)) << "the server closed the session";
  std::printf(
      "(f) %llu ReadBlocks sent (of %llu, 1 MiB replies), %.1f MiB of replies taken, then "
      "closed\n",
      static_cast<unsigned long long>(sent), static_cast<unsigned long long>(requests),
      double(got) / kMiB);
  EXPECT_LT(got, requests * reply / 4);
  // Counted (and logged, within the log's rate limit).
  EXPECT_EQ(Metric(k_->admin(), "kvm_sessions_closed_total{reason=\"send_queue\"}"),
            send_queue_closed0 + 1);
  // Its data is still there for a well-behaved session of the tenant.
  auto b = RawSession("127.0.0.5", k_->port(), "b", "tokB");
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->Send(MessageType::kReadBlocks, 2, rb));
  auto f = b->Next();
  ASSERT_TRUE(f.ok() && ErrorOf(*f).ok());
  EXPECT_EQ(f->payload.size(), reply);
  wire::DeleteSequence del;
  del.set_sequence_id(5);
  ASSERT_TRUE(b->Send(MessageType::kDeleteSequence, 3, del));
  ASSERT_TRUE(b->Next().ok());
  Finish("(f) never reads its replies");
}

// (h) A client that stops sending is answered what it asked, and its session is closed then: not
// at session_timeout_ms (60 s here). Sessions of clients that came and went held their socket and
// their buffers (~300 KB each) until the liveness timer noticed the silence — a soak's RSS rose by
// them, and a client reconnecting in a loop could run the server out of descriptors.
TEST_F(HostileTest, AClientThatStopsSendingIsAnsweredThenClosedAtOnce) {
  const size_t fds0 = k_->Sockets();
  auto r = RawSession("127.0.0.8", k_->port(), "b", "tokB");
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->Send(MessageType::kCreateSequence, 2, CreateOf(8, kShape, kB)));
  ASSERT_TRUE(r->Send(MessageType::kAppend, 3, AppendOf(8, 0, 16),
                      Pattern(wire::AppendPayloadBytes(kShape, 16), 8)));
  wire::ReadBlocks rb;
  rb.set_sequence_id(8);
  for (uint32_t b = 0; b < 4; ++b) rb.add_block_indices(b);
  constexpr int kReads = 20;
  for (int i = 0; i < kReads; ++i) ASSERT_TRUE(r->Send(MessageType::kReadBlocks, 10 + i, rb));
  r->ShutdownWrite();  // pipelined requests, then EOF: the replies must still come, then the close
  const auto t0 = Clock::now();
  std::string got;
  EXPECT_TRUE(r->UntilClosed(10000, nullptr, &got)) << "closed once every request was answered";
  const double closed_s = std::chrono::duration<double>(Clock::now() - t0).count();
  wire::FrameDecoder dec;
  ASSERT_TRUE(dec.Feed({reinterpret_cast<const uint8_t*>(got.data()), got.size()}).ok());
  wire::Frame f;
  std::set<uint64_t> want = {2, 3}, answered;
  for (int i = 0; i < kReads; ++i) want.insert(10 + i);
  int frames = 0;
  while (dec.Next(&f)) {
    ++frames;
    EXPECT_TRUE(ErrorOf(f).ok()) << ErrorOf(f).ToString();
    answered.insert(f.header.request_id);
  }
  EXPECT_EQ(frames, kReads + 2);
  EXPECT_EQ(answered, want) << "each request answered once";
  // Sessions that close whole, one after another from one address: more of them than the address
  // may hold at once, each gone (descriptor closed) before the next.
  for (uint32_t i = 0; i < 2 * kPerAddress; ++i) {
    auto c = RawSession("127.0.0.8", k_->port(), "b", "tokB");
    ASSERT_TRUE(c) << "connection " << i << " refused: an earlier one still counted";
  }
  size_t fds = k_->Sockets();
  for (const auto until = Clock::now() + std::chrono::seconds(10);
       fds > fds0 && Clock::now() < until; fds = k_->Sockets())
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_LE(fds, fds0) << "the closed sessions' sockets are still open in the server";
  std::printf(
      "(h) %d pipelined requests answered after the half-close, closed %.3f s later; %u "
      "sessions closed whole, sockets %zu -> %zu\n",
      kReads + 2, closed_s, 2 * kPerAddress, fds0, fds);
  auto b = RawSession("127.0.0.8", k_->port(), "b", "tokB");
  ASSERT_TRUE(b);
  wire::DeleteSequence del;
  del.set_sequence_id(8);
  ASSERT_TRUE(b->Send(MessageType::kDeleteSequence, 2, del));
  ASSERT_TRUE(b->Next().ok());
  Finish("(h) stops sending");
}

// (g) Floods of pipelined requests: tenant h (max_in_flight 8) from two sessions at once, and
// tenant b (no quota) past max_session_queued. Every request is answered exactly once (OK or
// Busy naming the limit), and tenant a's requests are all served meanwhile.
TEST_F(HostileTest, RequestFloodsAreBusyAndDoNotStarveAnotherTenant) {
  struct Flooder {
    std::unique_ptr<Raw> raw;
    uint64_t ok = 0, busy = 0, other = 0;
    std::set<uint64_t> answered;
    std::string busy_message;
  };
  std::vector<Flooder> fl(3);
  fl[0].raw = RawSession("127.0.0.6", k_->port(), "h", "tokH");
  fl[1].raw = RawSession("127.0.0.6", k_->port(), "h", "tokH");
  fl[2].raw = RawSession("127.0.0.6", k_->port(), "b", "tokB");
  for (auto& f : fl) ASSERT_TRUE(f.raw);
  for (size_t i = 0; i < fl.size(); ++i) {  // one sequence each, 16 tokens
    auto& r = *fl[i].raw;
    ASSERT_TRUE(r.Send(MessageType::kCreateSequence, 2, CreateOf(70 + i, kShape, kB)));
    ASSERT_TRUE(r.Next().ok());
    ASSERT_TRUE(r.Send(MessageType::kAppend, 3, AppendOf(70 + i, 0, 16),
                       Pattern(wire::AppendPayloadBytes(kShape, 16), 7)));
    ASSERT_TRUE(r.Next().ok());
  }
  const uint64_t burst = 500;
  uint64_t id = 100;
  const uint64_t good_at_start = good_->done();
  int rounds = 0;
  // Bursts until tenant a has completed 10 round trips during them (at least two bursts).
  for (; rounds < 100 && (rounds < 2 || good_->done() < good_at_start + 10); ++rounds) {
    const uint64_t first = id;
    for (size_t i = 0; i < fl.size(); ++i) {
      wire::ReadBlocks rb;
      rb.set_sequence_id(70 + i);
      rb.add_block_indices(0);
      std::vector<uint8_t> frames;
      for (uint64_t k = 0; k < burst; ++k) {
        auto one =
            wire::EncodeFrame(static_cast<uint16_t>(MessageType::kReadBlocks), first + k, rb);
        frames.insert(frames.end(), one.begin(), one.end());
      }
      ASSERT_TRUE(fl[i].raw->Send(frames));
    }
    id += burst;
    for (auto& f : fl)
      for (uint64_t k = 0; k < burst; ++k) {
        auto fr = f.raw->Next();
        ASSERT_TRUE(fr.ok()) << fr.status().ToString();
        EXPECT_TRUE(f.answered.insert(fr->header.request_id).second) << "answered twice";
        const Status st = ErrorOf(*fr);
        if (st.ok())
          ++f.ok;
        else if (st.IsBusy()) {
          ++f.busy;
          f.busy_message = st.message();
        } else {
          ++f.other;
          ADD_FAILURE() << st.ToString();
        }
      }
  }
  for (size_t i = 0; i < fl.size(); ++i) {
    std::printf(
        "(g) flooder %zu (tenant %s): %llu requests in %d bursts: %llu ok, %llu Busy "
        "(\"%s\")\n",
        i, i < 2 ? "h" : "b", static_cast<unsigned long long>(fl[i].answered.size()), rounds,
        static_cast<unsigned long long>(fl[i].ok), static_cast<unsigned long long>(fl[i].busy),
        fl[i].busy_message.c_str());
    EXPECT_EQ(fl[i].answered.size(), uint64_t(rounds) * burst) << "every request answered once";
    EXPECT_GT(fl[i].busy, 0u);
  }
  // Each tenant is served within its limits (which of h's two sessions takes its places is not
  // promised).
  EXPECT_GT(fl[0].ok + fl[1].ok, 0u);
  EXPECT_GT(fl[2].ok, 0u);
  for (int i = 0; i < 2; ++i)
    EXPECT_NE(fl[i].busy_message.find("tenant 'h' is at its max_in_flight quota"),
              std::string::npos)
        << fl[i].busy_message;
  EXPECT_NE(fl[2].busy_message.find("(max_session_queued 64)"), std::string::npos)
      << fl[2].busy_message;
  EXPECT_GE(good_->done(), good_at_start + 10) << "tenant a served during the floods";
  for (size_t i = 0; i < fl.size(); ++i) {
    wire::DeleteSequence del;
    del.set_sequence_id(70 + i);
    ASSERT_TRUE(fl[i].raw->Send(MessageType::kDeleteSequence, id + i, del));
  }
  Finish("(g) request floods");
}

}  // namespace
}  // namespace kvm
