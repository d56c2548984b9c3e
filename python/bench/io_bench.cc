// The C++ side of the Python save/load comparison (python/bench/io_bench.py runs the same workload
// through the binding): append `tokens` tokens in chunks of `chunk` to a new sequence, then read
// every block back, one ReadBlocks per (layer, KV head, K or V), as the vLLM connector's loads do.
//   kvm_io_bench HOST:PORT [layers kv_heads head_dim tokens chunk]   -> one JSON line
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "client/client.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"

using namespace kvm;

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: kvm_io_bench HOST:PORT [L H D T chunk]\n"), 2;
  auto arg = [&](int i, uint32_t d) { return argc > i ? uint32_t(std::atoi(argv[i])) : d; };
  ModelShape shape{.layers = arg(2, 16),
                   .q_heads = arg(3, 8) * 4,
                   .kv_heads = arg(3, 8),
                   .head_dim = arg(4, 128),
                   .dtype = DType::kF16};
  const uint32_t T = arg(5, 1024), chunk = arg(6, 64), B = 16;
  auto c = client::Client::Connect({.address = argv[1], .client_name = "kvm-io-bench"});
  if (!c.ok()) return std::fprintf(stderr, "%s\n", c.status().ToString().c_str()), 1;
  const uint64_t seq =
      0xC0FFEE00ull +
      uint64_t(std::chrono::steady_clock::now().time_since_epoch().count() & 0xffff);
  wire::CreateSequence m;
  m.set_sequence_id(seq);
  wire::ToWire(shape, m.mutable_shape());
  m.set_block_size(B);
  m.set_durability(wire::DURABLE);  // as the connector's sequences
  if (auto f = (*c)->Call(wire::MessageType::kCreateSequence, m); !f.ok())
    return std::fprintf(stderr, "%s\n", f.status().ToString().c_str()), 1;
  std::vector<uint8_t> payload(wire::AppendPayloadBytes(shape, chunk));
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = uint8_t(i * 131 + 7);
  std::vector<uint32_t> tokens(chunk, 1);
  using clk = std::chrono::steady_clock;
  auto t0 = clk::now();
  for (uint32_t p = 0; p < T; p += chunk) {
    wire::Append a;
    a.set_sequence_id(seq);
    a.set_start_position(p);
    for (uint32_t t : tokens) a.add_token_ids(t);
    if (Status s = (*c)->CallAsync(wire::MessageType::kAppend, a, payload); !s.ok())
      return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  }
  if (Status s = (*c)->Flush(); !s.ok())
    return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  const double save_s = std::chrono::duration<double>(clk::now() - t0).count();
  const uint64_t save_bytes = uint64_t(payload.size()) * (T / chunk);
  const uint32_t nb = T / B;
  std::vector<uint8_t> out(size_t(nb) * B * shape.head_dim * 2);
  uint64_t load_bytes = 0;
  t0 = clk::now();
  for (uint32_t l = 0; l < shape.layers; ++l)
    for (uint32_t h = 0; h < shape.kv_heads; ++h)
      for (int v = 0; v < 2; ++v) {
        wire::ReadBlocks r;
        r.set_sequence_id(seq);
        r.set_layer(l);
        r.set_kv_head(h);
        for (uint32_t b = 0; b < nb; ++b) r.add_block_indices(b);
        r.set_values(v);
        auto f = (*c)->Call(wire::MessageType::kReadBlocks, r);
        if (!f.ok()) return std::fprintf(stderr, "%s\n", f.status().ToString().c_str()), 1;
        std::memcpy(out.data(), f->payload.data(), out.size());  // into the caller's buffer
        load_bytes += f->payload.size();
      }
  const double load_s = std::chrono::duration<double>(clk::now() - t0).count();
  (void)(*c)->DeleteSequence(seq);
  std::printf(
      "{\"client\": \"c++\", \"save_bytes\": %llu, \"save_s\": %.4f, \"save_MBps\": %.1f, "
      "\"load_bytes\": %llu, \"load_s\": %.4f, \"load_MBps\": %.1f}\n",
      (unsigned long long)save_bytes, save_s, save_bytes / save_s / 1e6,
      (unsigned long long)load_bytes, load_s, load_bytes / load_s / 1e6);
  return 0;
}
