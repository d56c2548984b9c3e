// kvmctl hshare-calibrate: HShare's label channels for a model, from its training text.
#include <cstdio>
#include <fstream>

#include "client/llama.h"
#include "client/tokenizer.h"
#include "commands.h"
#include "flags.h"
#include "selector/baselines.h"

namespace kvm::tools {

int RunHShareCalibrate(const std::vector<std::string>& args) {
  Flags f(args, {"model", "tokens", "offset", "count", "channels", "out"}, {});
  const std::string model_path = PathOrDefault(f, "model", "models/austen/model.bin");
  const std::string tokens = f.Required("tokens");
  const std::string out_path = f.Required("out");
  auto model = client::LlamaModel::Load(model_path);
  if (!model.ok())
    return std::fprintf(stderr, "kvmctl hshare-calibrate: %s\n", model.status().ToString().c_str()),
           1;
  const auto& cfg = (*model)->config();
  auto ids = client::ReadTokenFile(tokens);
  if (!ids.ok())
    return std::fprintf(stderr, "kvmctl hshare-calibrate: %s\n", ids.status().ToString().c_str()),
           1;
  const uint64_t offset = static_cast<uint64_t>(f.Int("offset", 0, 0, INT64_MAX));
  const uint64_t count = static_cast<uint64_t>(f.Int("count", cfg.seq_len, 1, cfg.seq_len));
  if (offset + count > ids->size())
    throw UsageError("--offset + --count is past the end of the token file");
  const auto shape = (*model)->Shape(DType::kF32);
  auto kv = client::DenseKvSource::Make(shape, 16);
  if (!kv.ok())
    return std::fprintf(stderr, "kvmctl hshare-calibrate: %s\n", kv.status().ToString().c_str()), 1;
  client::ReferenceWorker worker(**model, kv->get());
  sel::HShareCalibrator cal(shape);
  worker.on_layer = [&](const client::LayerTrace& t) { cal.Add(t.layer, t.q, t.k); };
  for (uint64_t p = 0; p < count; ++p) {
    Status s = worker.Forward((*ids)[offset + p], p, nullptr);
    if (!s.ok())
      return std::fprintf(stderr, "kvmctl hshare-calibrate: %s\n", s.ToString().c_str()), 1;
  }
  const auto channels =
      cal.Channels(static_cast<uint32_t>(f.Int("channels", 0, 0, shape.head_dim)));
  std::ofstream(out_path) << sel::FormatHShareChannels(channels, shape.q_heads);
  std::fprintf(stderr, "wrote %zu channel lists of %zu channels to %s (from %llu tokens)\n",
               channels.size(), channels.empty() ? size_t{0} : channels[0].size(), out_path.c_str(),
               (unsigned long long)count);
  return 0;
}

}  // namespace kvm::tools
