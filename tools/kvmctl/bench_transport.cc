// kvmctl bench transport: the data plane's retrieval-reply send (one active message: a header with
// each block's slot, the blocks contiguous at the sender, scattered into the receiver's registered
// hot-set slots) against ucx_perftest run by this command on the same transport with the matching
// test (ucp_am_bw), datatype (contig at the sender, iov at the receiver), segment sizes (the real
// slot size: K + V of one block) and error mode (none). In-process: against memcpy of the same
// scatter, measured in the same run.
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
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "commands.h"
#include "flags.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"
#include "transport/transport.h"

namespace kvm::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct Run {
  double gbps = 0, p50_us = 0, p99_us = 0;
  std::string lanes;
  size_t messages_per_reply = 1;
};

// `mode`: how the sender takes a reply's blocks out of its (scattered) tier memory: "copy" gathers
// them into one buffer and sends it contiguous (what the service does), "iov" sends one gathered
// message (UCX iov datatype), "runs" sends each contiguous run of source slots as its own message.
Result<Run> Ours(const std::string& tls, const std::string& mode, uint32_t blocks,
                 size_t slot_bytes, uint32_t messages) {
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
  // The sender's tier memory: 4x the slots of a reply; a reply's blocks are scattered over it
  // (the host arena places blocks as they fill, interleaved over layers and heads).
  std::vector<uint8_t> tier(4ull * blocks * slot_bytes, 0x5a), data(size_t(blocks) * slot_bytes);
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
  std::vector<double> lat;
  const uint32_t warm = std::max<uint32_t>(4, messages / 10);
  Clock::time_point t0;
  for (uint32_t m = 0; m < warm + messages; ++m) {
    if (m == warm) t0 = Clock::now();
    const auto a = Clock::now();
    if (mode == "copy") {  // gather into one buffer, then one contiguous send
      for (uint32_t i = 0; i < blocks; ++i)
        std::memcpy(data.data() + i * slot_bytes, segs[i].ptr, slot_bytes);
      KVM_RETURN_IF_ERROR(tx->Send(peer, headers[0], data, [](const Status&) {}));
    } else if (mode == "iov") {
      KVM_RETURN_IF_ERROR(tx->SendGather(peer, headers[0], segs, [](const Status&) {}));
    } else {  // runs: each contiguous in the tier, sent in place
      for (size_t k = 0; k < msgs.size(); ++k)
        KVM_RETURN_IF_ERROR(tx->Send(
            peer, headers[k],
            {static_cast<const uint8_t*>(segs[msgs[k].first].ptr), size_t(msgs[k].n) * slot_bytes},
            [](const Status&) {}));
    }
    const uint64_t want = uint64_t(m + 1) * msgs.size();
    KVM_RETURN_IF_ERROR(rx->WaitFor([&] { return delivered >= want; }, 10000));
    KVM_RETURN_IF_ERROR(rx_error);
    if (m >= warm) lat.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  Run r;
  r.gbps = double(messages) * double(data.size()) / secs / 1e9;
  std::sort(lat.begin(), lat.end());
  r.p50_us = lat[lat.size() / 2] * 1e6;
  r.p99_us = lat[std::min(lat.size() - 1, size_t(0.99 * double(lat.size())))] * 1e6;
  r.lanes = tx->Describe(peer);
  r.messages_per_reply = msgs.size();
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

}  // namespace

int RunBenchTransport(const std::vector<std::string>& args) {
  const Flags f(args, {"tls", "blocks", "block-bytes", "messages"}, {"json"});
  const std::string tls = f.Str("tls", "sm");
  if (tls != "tcp" && tls != "sm" && tls != "inproc") throw UsageError("--tls: tcp, sm or inproc");
  const uint32_t blocks = uint32_t(f.Int("blocks", 256, 1, 1000));
  // One slot = K + V of a block: B 16 x D 128 x fp16 x 2.
  const size_t slot = size_t(f.Int("block-bytes", 8192, 64, 1 << 22));
  const uint32_t messages = uint32_t(f.Int("messages", 400, 10, 1000000));
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
  // The three ways to take a reply's blocks out of tier memory; "copy" is the service's.
  std::map<std::string, Run> modes;
  for (const char* mode : {"copy", "iov", "runs"}) {
    auto r = Ours(tls, mode, blocks, slot, messages);
    if (!r.ok())
      return std::fprintf(stderr, "kvmctl bench transport: %s: %s\n", mode,
                          r.status().ToString().c_str()),
             1;
    modes[mode] = *r;
  }
  const Run* ours = &modes["copy"];
  std::string faster = "copy";
  for (const auto& [name, r] : modes)
    if (r.gbps > modes[faster].gbps) faster = name;
  std::string reference;
  double ref_gbps = 0;
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
    ref_gbps = double(messages) * double(src.size()) /
               std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;
    reference = "memcpy of the same " + std::to_string(blocks) + " x " + std::to_string(slot) +
                "-byte scatter (same process)";
  } else {
    std::string sizes;
    for (uint32_t i = 0; i < blocks; ++i) sizes += (i ? "," : "") + std::to_string(slot);
    auto r = Perftest("-t ucp_am_bw -D contig,iov -s " + sizes + " -n " + std::to_string(messages) +
                          " -w " + std::to_string(messages / 10),
                      env, &reference);
    if (!r.ok())
      return std::fprintf(stderr, "kvmctl bench transport: %s\n", r.status().ToString().c_str()), 1;
    ref_gbps = *r;
    // Shorten the iov list in the reported command (it is `blocks` copies of the slot size).
    const size_t a = reference.find(sizes);
    if (a != std::string::npos)
      reference.replace(a, sizes.size(),
                        "$(printf '" + std::to_string(slot) + ",%.0s' $(seq " +
                            std::to_string(blocks) + ") | sed 's/,$//')");
  }
  const double ratio = ref_gbps > 0 ? ours->gbps / ref_gbps : 0;
  if (f.Bool("json")) {
    std::printf(
        "{\"tls\": \"%s\", \"blocks_per_message\": %u, \"block_bytes\": %zu, \"messages\": %u, "
        "\"ours_gbps\": %.3f, \"reference_gbps\": %.3f, \"ratio\": %.3f, \"reference\": \"%s\", "
        "\"latency_p50_us\": %.1f, \"latency_p99_us\": %.1f, \"lanes\": \"%s\", \"idle\": %s, "
        "\"ours_send\": \"copy\", \"faster_send\": \"%s\", \"modes\": {",
        tls.c_str(), blocks, slot, messages, ours->gbps, ref_gbps, ratio,
        JsonEscape(reference).c_str(), ours->p50_us, ours->p99_us, JsonEscape(ours->lanes).c_str(),
        idle ? "true" : "false", faster.c_str());
    bool first = true;
    for (const auto& [name, r] : modes) {
      std::printf(
          "%s\"%s\": {\"gbps\": %.3f, \"latency_p50_us\": %.1f, \"latency_p99_us\": %.1f, "
          "\"messages_per_reply\": %zu}",
          first ? "" : ", ", name.c_str(), r.gbps, r.p50_us, r.p99_us, r.messages_per_reply);
      first = false;
    }
    std::printf("}}\n");
  } else {
    std::printf("transport %s: %u blocks x %zu bytes per retrieval reply, %u messages\n",
                tls.c_str(), blocks, slot, messages);
    for (const auto& [name, r] : modes)
      std::printf(
          "  ours, %-4s %.3f GB/s, latency per reply p50 %.1f us, p99 %.1f us, %zu message(s) "
          "per reply%s\n",
          name.c_str(), r.gbps, r.p50_us, r.p99_us, r.messages_per_reply,
          name == "copy" ? " (the service's send)" : "");
    std::printf("  lanes      %s; faster send: %s\n", ours->lanes.c_str(), faster.c_str());
    std::printf("  reference  %.3f GB/s: %s\n  ratio      %.3f%s\n", ref_gbps, reference.c_str(),
                ratio, idle ? "" : " (machine not idle)");
  }
  return 0;
}

}  // namespace kvm::tools
