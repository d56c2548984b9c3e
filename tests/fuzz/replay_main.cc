// Replays the fuzz corpus (and built-in seeds) through LLVMFuzzerTestOneInput as an ordinary test,
// for builds without libFuzzer. `frame_fuzz_replay --write-seeds DIR` writes the built-in seeds.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {
std::vector<std::vector<uint8_t>> Seeds() {
  using namespace kvm::wire;
  std::vector<std::vector<uint8_t>> out;
  auto add = [&](uint8_t chunk, std::vector<uint8_t> f) {
    f.insert(f.begin(), chunk);
    out.push_back(std::move(f));
  };
  Hello h;
  h.set_protocol_version(kProtocolVersion);
  h.set_auth_token("dev");
  h.set_tenant("t");
  add(7, EncodeFrame(static_cast<uint16_t>(MessageType::kHello), 1, h));
  Append a;
  a.set_sequence_id(1);
  a.add_token_ids(5);
  std::vector<uint8_t> payload(AppendPayloadBytes({2, 8, 2, 32, kvm::DType::kF16, 1}, 1), 3);
  add(13, EncodeFrame(static_cast<uint16_t>(MessageType::kAppend), 2, a, payload));
  RetrieveLayer r;
  r.set_layer(1);
  r.add_kv_heads(0);
  std::vector<uint8_t> q(4 * 32 * 4, 0);
  add(63, EncodeFrame(static_cast<uint16_t>(MessageType::kRetrieveLayer), 3, r, q));
  CreateSequence c;
  c.mutable_shape()->set_layers(2);
  c.mutable_selector()->set_tau_cos(0.8);
  c.mutable_selector()->set_name("prhs");
  add(1, EncodeFrame(static_cast<uint16_t>(MessageType::kCreateSequence), 4, c));
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--write-seeds") {
    int i = 0;
    for (const auto& s : Seeds()) {
      std::ofstream(std::string(argv[2]) + "/seed-" + std::to_string(i++), std::ios::binary)
          .write(reinterpret_cast<const char*>(s.data()), static_cast<std::streamsize>(s.size()));
    }
    return 0;
  }
  size_t n = 0;
  for (const auto& s : Seeds()) {
    LLVMFuzzerTestOneInput(s.data(), s.size());
    ++n;
  }
  for (int i = 1; i < argc; ++i) {
    if (!std::filesystem::is_directory(argv[i])) {
      std::fprintf(stderr, "corpus directory %s not found\n", argv[i]);
      return 1;
    }
    for (const auto& e : std::filesystem::directory_iterator(argv[i])) {
      std::ifstream in(e.path(), std::ios::binary);
      std::vector<uint8_t> d((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      LLVMFuzzerTestOneInput(d.data(), d.size());
      ++n;
    }
  }
  std::printf("replayed %zu inputs without a crash\n", n);
  return n > 0 ? 0 : 1;
}
