// kvmctl bench transport: the data plane's retrieval-reply send (one active message: a header with
// each block's slot, the blocks contiguous at the sender, scattered into the receiver's registered
// hot-set slots) against ucx_perftest run by this command on the same transport with the matching
// test (ucp_am_bw), datatype (contig at the sender, iov at the receiver), segment sizes (the real
// slot size: K + V of one block), error mode (none) and messages in flight (--in-flight, perftest's
// -O). In-process: against memcpy of the same scatter, measured in the same run. Each figure is the
// median of --runs interleaved rounds (every send mode, then the reference), with the spread.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "commands.h"
#include "flags.h"
#include "kvmanager/block_store.h"
#include "kvmanager/handler.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"
#include "transport/transport.h"

namespace kvm::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct Run {
  double gbps = 0, p50_us = 0, p99_us = 0;  // latency per reply: measured with one in flight only
  std::string lanes;
  std::string send;  // "service": how SendReply sent (gather or copy)
  size_t messages_per_reply = 1;
};

// The sender's side of "service": a real block store holding one (layer, KV head) of 4x a
// reply's blocks (B = slot_bytes / 512 tokens of D 128 fp16: K + V of a block fill one slot), in
// its host tier, as the service keeps them.
struct ServiceSide {
  std::string dir;
  std::unique_ptr<store::BlockStore> store;
  ~ServiceSide() {
    store.reset();
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};
Status MakeServiceSide(uint32_t blocks, size_t slot_bytes, ServiceSide* out) {
  if (slot_bytes % 512 || slot_bytes < 512)
    return Status::InvalidArgument("service: --block-bytes must be a multiple of 512");
  const uint32_t B = uint32_t(slot_bytes / 512), D = 128, total = 4 * blocks * B;
  char tmpl[] = "/tmp/kvmctl_bench_transport_XXXXXX";
  if (!mkdtemp(tmpl)) return Status::Internal("cannot create a temporary directory");
  out->dir = tmpl;
  store::StoreOptions so;
  so.dir = out->dir;
  so.host_capacity_bytes = 3ull * total * D * 2 * 2 + (8 << 20);  // everything stays resident
  so.gpu = false;
  KVM_ASSIGN_OR_RETURN(out->store, store::BlockStore::Open(so));
  const store::SeqRef seq{"bench", 1};
  const ModelShape shape{1, 1, 1, D, DType::kF16, 0};
  KVM_RETURN_IF_ERROR(out->store->Create(seq, shape, B, store::Durability::kCache));
  std::mt19937 rng(7);
  for (uint32_t t = 0; t < total; t += 1024) {  // [K, V][n][D]: any bytes
    const uint32_t n = std::min(1024u, total - t);
    std::vector<uint32_t> tokens(n);
    std::iota(tokens.begin(), tokens.end(), t);
    std::vector<uint8_t> payload(size_t{n} * D * 2 * 2);
    for (auto& b : payload) b = uint8_t(rng());
    KVM_RETURN_IF_ERROR(out->store->Append(seq, t, tokens, payload).status());
  }
  return Status::Ok();
}

// `mode`: how the sender takes a reply's blocks out of its (scattered) tier memory: "copy" gathers
// them into one buffer and sends it contiguous, "iov" sends one gathered message (UCX iov
// datatype), "runs" sends each contiguous run of source slots as its own message; "service" is the
// service's own send path: the blocks pinned in a real block store's host tier (BlockStore::Pin,
// K and V of a block in two slots) and sent by server::SendReply, which gathers or copies as the
// transport measured faster (Transport::GatherPays).
Result<Run> Ours(const std::string& tls, const std::string& mode, uint32_t blocks,
                 size_t slot_bytes, uint32_t messages, uint32_t in_flight) {
  ServiceSide service;
  if (mode == "service") KVM_RETURN_IF_ERROR(MakeServiceSide(blocks, slot_bytes, &service));
  std::unique_ptr<transport::Transport> tx, rx;
  if (tls == "inproc") {
    tx = transport::MakeInProcess();
    rx = transport::MakeInProcess();
  } else {
    KVM_ASSIGN_OR_RETURN(tx, transport::MakeUcx({.progress_thread = true}));
    KVM_ASSIGN_OR_RETURN(rx, transport::MakeUcx({}));
  }
  // The receiver's hot set: 4x the slots a message fills, a message's blocks scattered over it.
  const uint32_t slots = 4 * blocks;
  std::vector<uint8_t> hot(size_t(slots) * slot_bytes);
  KVM_RETURN_IF_ERROR(rx->Register(hot.data(), hot.size()));
  std::vector<uint32_t> order(slots);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), std::mt19937(5));
  uint64_t delivered = 0;
  Status rx_error;
  rx->SetReceiver(
      [&](std::span<const uint8_t> h, size_t len) -> Result<std::vector<transport::Segment>> {
        wire::DataPart part;  // the service's retrieval-reply header
        if (!part.ParseFromArray(h.data(), int(h.size())))
          return Status::InvalidArgument("bad header");
        const auto blocks = wire::PartBlocks(part);
        if (len != blocks.size() * slot_bytes) return Status::InvalidArgument("bad message");
        std::vector<transport::Segment> segs;
        for (const wire::PartBlock& b : blocks)
          segs.push_back({hot.data() + size_t(b.slot) * slot_bytes, slot_bytes});
        return segs;
      },
      [&](std::span<const uint8_t>, const Status& s) {
        if (!s.ok() && rx_error.ok()) rx_error = s;
        ++delivered;
      });
  KVM_ASSIGN_OR_RETURN(uint64_t peer, tx->Connect(rx->address()));
  if (service.store)  // the service registers its host tier with its data plane (main.cc)
    service.store->OnHostMemory([&](void* base, size_t len) {
      if (Status st = tx->Register(base, len); !st.ok())
        std::fprintf(stderr, "kvmctl bench transport: %s\n", st.ToString().c_str());
    });
  // The sender's tier memory: 4x the slots of a reply; a reply's blocks are scattered over it
  // (the host arena places blocks as they fill, interleaved over layers and heads).
  std::vector<uint8_t> tier(4ull * blocks * slot_bytes, 0x5a);
  // "copy": one gather buffer per message in flight (a buffer is reused once its reply arrived).
  std::vector<std::vector<uint8_t>> data(in_flight,
                                         std::vector<uint8_t>(size_t(blocks) * slot_bytes));
  std::vector<uint32_t> src(4 * blocks);
  std::iota(src.begin(), src.end(), 0u);
  std::shuffle(src.begin(), src.end(), std::mt19937(6));
  src.resize(blocks);
  std::sort(src.begin(), src.end());  // in slot order: adjacent slots form runs
  // A message per run of adjacent source slots ("runs"), else one message of every block.
  struct Msg {
    uint32_t first, n;  // blocks [first, first + n) of the reply
  };
  std::vector<Msg> msgs;
  for (uint32_t i = 0; i < blocks;) {
    uint32_t j = i + 1;
    while (mode == "runs" && j < blocks && src[j] == src[j - 1] + 1) ++j;
    if (mode != "runs") j = blocks;
    msgs.push_back({i, j - i});
    i = j;
  }
  std::vector<std::vector<uint8_t>> headers;  // per message: a DataPart, as the service sends
  for (size_t k = 0; k < msgs.size(); ++k) {
    wire::DataPart p;
    p.set_request_id(1);
    p.set_part(uint32_t(k));
    p.set_parts(uint32_t(msgs.size()));
    wire::HeadSelection* h = p.mutable_reply()->add_heads();
    for (uint32_t i = 0; i < msgs[k].n; ++i) {
      h->add_block_indices(msgs[k].first + i);
      h->add_slots(order[msgs[k].first + i]);
    }
    const std::string bytes = p.SerializeAsString();
    headers.emplace_back(bytes.begin(), bytes.end());
  }
  std::vector<transport::Segment> segs;
  for (uint32_t i = 0; i < blocks; ++i)
    segs.push_back({tier.data() + size_t(src[i]) * slot_bytes, slot_bytes});
  // "service": the reply as the retrieval engine makes it (one head: the blocks src in order into
  // the hot-set slots `order`), split into its parts by SendReply.
  wire::RetrieveLayerReply reply;
  const std::vector<uint64_t> ids(src.begin(), src.end());
  size_t parts_per_reply = msgs.size();
  if (service.store) {
    wire::HeadSelection* h = reply.add_heads();
    for (uint32_t i = 0; i < blocks; ++i) {
      h->add_block_indices(src[i]);
      h->add_slots(order[i]);
    }
    KVM_ASSIGN_OR_RETURN(auto parts, wire::SplitReply(reply, 1, tx->max_header_bytes()));
    parts_per_reply = parts.size();
  }
  std::mutex send_mu;
  Status send_error;  // the first failed "service" send; guarded by send_mu
  std::vector<double> lat;
  const uint32_t warm = std::max<uint32_t>(4, messages / 10);
  Clock::time_point t0;
  const auto arrived = [&](uint64_t replies) {  // waits until that many replies were delivered
    return rx->WaitFor([&] { return delivered >= replies * parts_per_reply; }, 10000);
  };
  for (uint32_t m = 0; m < warm + messages; ++m) {
    if (m == warm) {  // the warm-up drained: the timed messages start with none in flight
      KVM_RETURN_IF_ERROR(arrived(warm));
      t0 = Clock::now();
    }
    // At most in_flight replies outstanding: reply m waits for reply m - in_flight.
    if (m >= in_flight) KVM_RETURN_IF_ERROR(arrived(m + 1 - in_flight));
    const auto a = Clock::now();
    if (mode == "copy") {  // gather into one buffer, then one contiguous send
      std::vector<uint8_t>& buf = data[m % in_flight];
      for (uint32_t i = 0; i < blocks; ++i)
        std::memcpy(buf.data() + i * slot_bytes, segs[i].ptr, slot_bytes);
      KVM_RETURN_IF_ERROR(tx->Send(peer, headers[0], buf, [](const Status&) {}));
    } else if (mode == "iov") {
      KVM_RETURN_IF_ERROR(tx->SendGather(peer, headers[0], segs, [](const Status&) {}));
    } else if (mode == "service") {  // pinned in the store, sent as the service sends
      server::ReplyBlocks rb;
      KVM_ASSIGN_OR_RETURN(store::PinnedBlocks pin, service.store->Pin({"bench", 1}, 0, 0, ids));
      rb.half_bytes = slot_bytes / 2;
      for (uint32_t i = 0; i < blocks; ++i) {
        rb.halves.push_back(pin.k()[i]);
        rb.halves.push_back(pin.v()[i]);
      }
      rb.pins.push_back(std::move(pin));
      KVM_RETURN_IF_ERROR(server::SendReply(*tx, peer, 1, reply, std::move(rb),
                                            server::ReplySends::kAuto, [&](const Status& st) {
                                              std::lock_guard<std::mutex> l(send_mu);
                                              if (!st.ok() && send_error.ok()) send_error = st;
                                            }));
    } else {  // runs: each contiguous in the tier, sent in place
      for (size_t k = 0; k < msgs.size(); ++k)
        KVM_RETURN_IF_ERROR(tx->Send(
            peer, headers[k],
            {static_cast<const uint8_t*>(segs[msgs[k].first].ptr), size_t(msgs[k].n) * slot_bytes},
            [](const Status&) {}));
    }
    if (in_flight == 1) {
      KVM_RETURN_IF_ERROR(arrived(m + 1));
      if (m >= warm) lat.push_back(std::chrono::duration<double>(Clock::now() - a).count());
    }
    KVM_RETURN_IF_ERROR(rx_error);
  }
  KVM_RETURN_IF_ERROR(arrived(warm + messages));
  KVM_RETURN_IF_ERROR(rx_error);
  {
    std::lock_guard<std::mutex> l(send_mu);
    KVM_RETURN_IF_ERROR(send_error);
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  Run r;
  r.gbps = double(messages) * double(blocks) * double(slot_bytes) / secs / 1e9;
  if (!lat.empty()) {
    std::sort(lat.begin(), lat.end());
    r.p50_us = lat[lat.size() / 2] * 1e6;
    r.p99_us = lat[std::min(lat.size() - 1, size_t(0.99 * double(lat.size())))] * 1e6;
  }
  r.lanes = tx->Describe(peer);
  r.messages_per_reply = parts_per_reply;
  if (service.store) {
    r.send = tx->GatherPays(peer) ? "gather" : "copy";
    service.store->OnHostMemory(nullptr);
  }
  tx.reset();  // the sender closes its endpoint while the receiver still exists
  return r;
}

// ucx_perftest server + client on loopback; the overall bandwidth (MiB/s in its CSV) in GB/s.
Result<double> Perftest(const std::string& cmd_args, const std::string& env, std::string* cmd) {
  const int port = 13000 + int(getpid() % 2000);
  const std::string server = env + " ucx_perftest -p " + std::to_string(port) + " >/dev/null 2>&1";
  *cmd = env + " ucx_perftest 127.0.0.1 -p " + std::to_string(port) + " " + cmd_args + " -v";
  const pid_t pid = fork();
  if (pid < 0) return Status::Internal("fork failed");
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + server).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // The server listens once it has initialised (a probe connection would be taken as the client):
  // retry the client while the connection is refused, up to about 10 s.
  std::string out;
  int rc = -1;
  for (int attempt = 0; attempt < 40; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    FILE* p = popen((*cmd + " 2>&1").c_str(), "r");
    out.clear();
    char buf[4096];
    while (p && std::fgets(buf, sizeof(buf), p)) out += buf;
    rc = p ? pclose(p) : -1;
    if (out.find("Connection refused") == std::string::npos) break;
  }
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  // The last CSV line: iterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,...
  const size_t nl = out.find_last_of('\n', out.size() >= 2 ? out.size() - 2 : 0);
  const std::string last = out.substr(nl == std::string::npos ? 0 : nl + 1);
  std::vector<double> cols;
  std::stringstream ss(last);
  for (std::string c; std::getline(ss, c, ',');) cols.push_back(std::strtod(c.c_str(), nullptr));
  if (rc != 0 || cols.size() < 6 || cols[5] <= 0)
    return Status::Unavailable("ucx_perftest failed (rc " + std::to_string(rc) + "): " + out);
  return cols[5] * 1048576.0 / 1e9;
}

std::string JsonList(const std::vector<double>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    char b[32];
    std::snprintf(b, sizeof(b), "%s%.3f", i ? ", " : "", v[i]);
    out += b;
  }
  return out + "]";
}

// One round's reference: memcpy of the same scatter (in-process) or ucx_perftest.
Result<double> Reference(const std::string& tls, const std::string& env, uint32_t blocks,
                         size_t slot, uint32_t messages, uint32_t in_flight, std::string* what) {
  if (tls == "inproc") {  // memcpy of the same scatter, same buffers
    std::vector<uint8_t> src(size_t(blocks) * slot, 1), dst(4ull * blocks * slot);
    std::vector<uint32_t> order(4 * blocks);
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), std::mt19937(5));
    const auto t0 = Clock::now();
    for (uint32_t m = 0; m < messages; ++m)
      for (uint32_t i = 0; i < blocks; ++i)
        std::memcpy(dst.data() + size_t(order[(m % 4) * blocks + i]) * slot, src.data() + i * slot,
                    slot);
    *what = "memcpy of the same " + std::to_string(blocks) + " x " + std::to_string(slot) +
            "-byte scatter (same process)";
    return double(messages) * double(src.size()) /
           std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;
  }
  std::string sizes;
  for (uint32_t i = 0; i < blocks; ++i) sizes += (i ? "," : "") + std::to_string(slot);
  KVM_ASSIGN_OR_RETURN(
      double gbps,
      Perftest("-t ucp_am_bw -D contig,iov -s " + sizes + " -n " + std::to_string(messages) +
                   " -w " + std::to_string(messages / 10) + " -O " + std::to_string(in_flight),
               env, what));
  // Shorten the iov list in the reported command (it is `blocks` copies of the slot size).
  const size_t a = what->find(sizes);
  if (a != std::string::npos)
    what->replace(a, sizes.size(),
                  "$(printf '" + std::to_string(slot) + ",%.0s' $(seq " + std::to_string(blocks) +
                      ") | sed 's/,$//')");
  return gbps;
}

}  // namespace

int RunBenchTransport(const std::vector<std::string>& args) {
  const Flags f(args, {"tls", "blocks", "block-bytes", "messages", "in-flight", "runs"}, {"json"});
  const std::string tls = f.Str("tls", "sm");
  if (tls != "tcp" && tls != "sm" && tls != "inproc") throw UsageError("--tls: tcp, sm or inproc");
  const uint32_t blocks = uint32_t(f.Int("blocks", 256, 1, 1000));
  // One slot = K + V of a block: B 16 x D 128 x fp16 x 2.
  const size_t slot = size_t(f.Int("block-bytes", 8192, 64, 1 << 22));
  const uint32_t messages = uint32_t(f.Int("messages", 400, 10, 1000000));
  // Replies in flight at once, ours and perftest's (-O); 1: each waits for the one before.
  const uint32_t in_flight = uint32_t(f.Int("in-flight", 1, 1, 64));
  const uint32_t runs = uint32_t(f.Int("runs", 5, 1, 100));
  std::string env;
  if (tls == "tcp") env = "env UCX_TLS=tcp UCX_NET_DEVICES=lo";
  if (tls == "sm") env = "env UCX_TLS=sm,self";
  if (tls == "tcp") {
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
  } else if (tls == "sm") {
    setenv("UCX_TLS", "sm,self", 1);
  }
  const bool idle = bench::WaitForIdle();
  // The three ways to take a reply's blocks out of tier memory, the service's own send path, then
  // the reference, round after round: each figure below is the median of its rounds.
  const char* const kModes[] = {"copy", "iov", "runs", "service"};
  std::map<std::string, std::vector<Run>> rounds;
  std::vector<double> ref_runs;
  std::string reference;
  for (uint32_t round = 0; round < runs; ++round) {
    for (const char* mode : kModes) {
      auto r = Ours(tls, mode, blocks, slot, messages, in_flight);
      if (!r.ok())
        return std::fprintf(stderr, "kvmctl bench transport: %s: %s\n", mode,
                            r.status().ToString().c_str()),
               1;
      rounds[mode].push_back(*r);
    }
    auto ref = Reference(tls, env, blocks, slot, messages, in_flight, &reference);
    if (!ref.ok())
      return std::fprintf(stderr, "kvmctl bench transport: %s\n", ref.status().ToString().c_str()),
             1;
    ref_runs.push_back(*ref);
    if (!f.Bool("json"))
      std::fprintf(stderr,
                   "[bench transport] round %u of %u: copy %.3f, iov %.3f, service (%s) %.3f, "
                   "reference %.3f GB/s\n",
                   round + 1, runs, rounds["copy"].back().gbps, rounds["iov"].back().gbps,
                   rounds["service"].back().send.c_str(), rounds["service"].back().gbps, *ref);
  }
  // "ours": the transport's send as the service uses it (what SendReply chose: iov or copy);
  // each round's ratio (the spread) is against that round's reference.
  const std::string service_send = rounds["service"].front().send;
  const std::string ours_mode = service_send == "gather" ? "iov" : "copy";
  std::vector<double> ratio_runs, service_ratio_runs;
  for (uint32_t i = 0; i < runs; ++i) {
    ratio_runs.push_back(ref_runs[i] > 0 ? rounds[ours_mode][i].gbps / ref_runs[i] : 0);
    service_ratio_runs.push_back(ref_runs[i] > 0 ? rounds["service"][i].gbps / ref_runs[i] : 0);
  }
  struct Summary {
    double gbps, p50_us, p99_us;
    std::vector<double> gbps_runs;
    std::string lanes;
    size_t messages_per_reply;
  };
  std::map<std::string, Summary> modes;
  for (const auto& [name, rs] : rounds) {
    Summary m{0, 0, 0, {}, rs.front().lanes, rs.front().messages_per_reply};
    std::vector<double> p50, p99;
    for (const Run& r : rs) {
      m.gbps_runs.push_back(r.gbps);
      p50.push_back(r.p50_us);
      p99.push_back(r.p99_us);
    }
    m.gbps = Percentile(m.gbps_runs, 0.5);
    m.p50_us = Percentile(p50, 0.5);
    m.p99_us = Percentile(p99, 0.5);
    modes[name] = m;
  }
  const Summary* ours = &modes[ours_mode];
  const Summary* service = &modes["service"];
  std::string faster = "copy";
  for (const char* name : {"copy", "iov", "runs"})
    if (modes[name].gbps > modes[faster].gbps) faster = name;
  const double ref_gbps = Percentile(ref_runs, 0.5);
  const double ratio = ref_gbps > 0 ? ours->gbps / ref_gbps : 0;  // of the medians
  const double service_ratio = ref_gbps > 0 ? service->gbps / ref_gbps : 0;
  const auto [rmin, rmax] = std::minmax_element(ratio_runs.begin(), ratio_runs.end());
  const auto [smin, smax] =
      std::minmax_element(service_ratio_runs.begin(), service_ratio_runs.end());
  const auto latency = [&](double us) {  // null where it was not measured (more than one in flight)
    char b[32];
    std::snprintf(b, sizeof(b), "%.1f", us);
    return in_flight == 1 ? std::string(b) : std::string("null");
  };
  if (f.Bool("json")) {
    std::printf(
        "{\"tls\": \"%s\", \"blocks_per_message\": %u, \"block_bytes\": %zu, \"messages\": %u, "
        "\"in_flight\": %u, \"runs\": %u, \"ours_gbps\": %.3f, \"reference_gbps\": %.3f, "
        "\"ratio\": %.3f, \"ratio_min\": %.3f, \"ratio_max\": %.3f, \"ours_gbps_runs\": %s, "
        "\"reference_gbps_runs\": %s, \"reference\": \"%s\", \"latency_p50_us\": %s, "
        "\"latency_p99_us\": %s, \"lanes\": \"%s\", \"idle\": %s, \"ours_send\": \"%s\", "
        "\"faster_send\": \"%s\", \"service_gbps\": %.3f, \"service_ratio\": %.3f, "
        "\"service_ratio_min\": %.3f, \"service_ratio_max\": %.3f, \"service_gbps_runs\": %s, "
        "\"service_send\": \"%s\", \"service_latency_p50_us\": %s, \"modes\": {",
        tls.c_str(), blocks, slot, messages, in_flight, runs, ours->gbps, ref_gbps, ratio, *rmin,
        *rmax, JsonList(ours->gbps_runs).c_str(), JsonList(ref_runs).c_str(),
        JsonEscape(reference).c_str(), latency(ours->p50_us).c_str(), latency(ours->p99_us).c_str(),
        JsonEscape(ours->lanes).c_str(), idle ? "true" : "false", ours_mode.c_str(), faster.c_str(),
        service->gbps, service_ratio, *smin, *smax, JsonList(service->gbps_runs).c_str(),
        service_send.c_str(), latency(service->p50_us).c_str());
    bool first = true;
    for (const auto& [name, m] : modes) {
      std::printf(
          "%s\"%s\": {\"gbps\": %.3f, \"gbps_runs\": %s, \"latency_p50_us\": %s, "
          "\"latency_p99_us\": %s, \"messages_per_reply\": %zu}",
          first ? "" : ", ", name.c_str(), m.gbps, JsonList(m.gbps_runs).c_str(),
          latency(m.p50_us).c_str(), latency(m.p99_us).c_str(), m.messages_per_reply);
      first = false;
    }
    std::printf("}}\n");
  } else {
    std::printf(
        "transport %s: %u blocks x %zu bytes per retrieval reply, %u messages, %u in flight; "
        "medians of %u interleaved rounds\n",
        tls.c_str(), blocks, slot, messages, in_flight, runs);
    for (const auto& [name, m] : modes)
      std::printf(
          "  ours, %-4s %.3f GB/s, latency per reply p50 %s us, p99 %s us, %zu message(s) "
          "per reply%s\n",
          name.c_str(), m.gbps, latency(m.p50_us).c_str(), latency(m.p99_us).c_str(),
          m.messages_per_reply,
          name == "service" ? (" (from the store, " + service_send + ")").c_str() : "");
    std::printf("  lanes      %s; faster send: %s; the service sends: %s\n", ours->lanes.c_str(),
                faster.c_str(), service_send.c_str());
    std::printf("  reference  %.3f GB/s: %s\n  ratio      %.3f %s (rounds %.3f to %.3f)%s\n",
                ref_gbps, reference.c_str(), ratio, ours_mode.c_str(), *rmin, *rmax,
                idle ? "" : " (machine not idle)");
    std::printf("  service    %.3f of the reference (rounds %.3f to %.3f)\n", service_ratio, *smin,
                *smax);
  }
  return 0;
}

}  // namespace kvm::tools
