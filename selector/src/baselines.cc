#include "selector/baselines.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>

#include "common.h"
#include "selector/layer_map.h"
#include "selector/registry.h"

namespace kvm::sel {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

Status ValidateBaseline(const SelectorOptions& o, const ModelShape& shape, uint64_t max_context,
                        const char* name) {
  KVM_RETURN_IF_ERROR(shape.Validate());
  if (o.target_delta > 0)
    return Status::InvalidArgument(std::string("target_delta: ") + name +
                                   " supports budget mode only");
  return o.Validate(shape.layers, max_context);
}

// The `count` blocks of highest score among `cand` (ties to the lower index), ascending.
std::vector<uint64_t> TopBlocks(std::vector<uint64_t> cand, const std::vector<double>& score,
                                uint64_t count) {
  count = std::min<uint64_t>(count, cand.size());
  std::partial_sort(cand.begin(), cand.begin() + static_cast<ptrdiff_t>(count), cand.end(),
                    [&](uint64_t a, uint64_t b) {
                      return score[a] > score[b] || (score[a] == score[b] && a < b);
                    });
  cand.resize(count);
  std::sort(cand.begin(), cand.end());
  return cand;
}

void Unknown(uint32_t group, Selection* out) {
  out->delta.assign(group, kNaN);
  out->kind = DeltaKind::kUnknown;
}

// Adds each head's softmax over `n` scores into agg (the §0.8 group aggregation).
void AddSoftmax(const std::vector<float>& s, std::vector<double>* agg) {
  std::vector<float> p(s.size());
  attn::Softmax(s.data(), s.size(), p.data());
  for (size_t i = 0; i < s.size(); ++i) (*agg)[i] += p[i];
}

}  // namespace

// ---- Quest --------------------------------------------------------------------------------------
Result<std::unique_ptr<QuestSelector>> QuestSelector::Make(const SelectorOptions& o,
                                                           const ModelShape& shape,
                                                           uint64_t max_context) {
  KVM_RETURN_IF_ERROR(ValidateBaseline(o, shape, max_context, "quest"));
  return std::unique_ptr<QuestSelector>(new QuestSelector(o, shape));
}

QuestSelector::QuestSelector(const SelectorOptions& o, const ModelShape& s)
    : opt_(o), shape_(s), dense_layers_(DenseLayers(o, *FindSelector("quest").value())) {}

float QuestSelector::PageBound(const float* q, const HeadSummaries& s, uint64_t b, uint32_t D,
                               float scale) {
  const float* mn = s.block_min(b);
  const float* mx = s.block_max(b);
  float u = 0.f;
  for (uint32_t c = 0; c < D; ++c) u += std::max(q[c] * mx[c], q[c] * mn[c]);
  return u * scale;
}

Status QuestSelector::Select(const StepInput& in, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry));
  const uint64_t T = in.tokens(), nb = opt_.geometry.Blocks(T);
  const uint32_t g = shape_.group_size(), D = shape_.head_dim;
  *out = Selection{};
  if (nb <= opt_.budget_blocks() || in.layer < dense_layers_) {
    ShortContext(nb, g, out);  // dense layers and short contexts: everything resident, δ = 0 exact
    return Status::Ok();
  }
  if (!in.summaries || !in.summaries->has_minmax() || in.summaries->tokens() < T)
    return Status::FailedPrecondition(
        "quest needs per-block min/max key summaries covering every token");
  const float scale = 1.0f / std::sqrt(float(D));
  std::vector<double> agg(nb, 0.0);
  std::vector<float> u(nb);
  for (uint32_t h = 0; h < g; ++h) {
    for (uint64_t b = 0; b < nb; ++b)
      u[b] = PageBound(in.q + size_t{h} * D, *in.summaries, b, D, scale);
    AddSoftmax(u, &agg);
  }
  std::vector<uint64_t> all(nb);
  std::iota(all.begin(), all.end(), 0);
  out->blocks = TopBlocks(all, agg, opt_.budget_blocks());
  out->retrieved_heads = g;
  Unknown(g, out);
  return Status::Ok();
}

// ---- StreamingLLM -------------------------------------------------------------------------------
Result<std::unique_ptr<StreamingSelector>> StreamingSelector::Make(const SelectorOptions& o,
                                                                   const ModelShape& shape,
                                                                   uint64_t max_context) {
  KVM_RETURN_IF_ERROR(ValidateBaseline(o, shape, max_context, "streaming"));
  return std::unique_ptr<StreamingSelector>(new StreamingSelector(o, shape));
}

Status StreamingSelector::Select(const StepInput& in, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry));
  const uint64_t T = in.tokens(), nb = opt_.geometry.Blocks(T), cap = opt_.budget_blocks();
  *out = Selection{};
  if (nb <= cap) {
    ShortContext(nb, shape_.group_size(), out);
    return Status::Ok();
  }
  const uint64_t sinks = std::min(opt_.geometry.MaxSinkBlocks(), cap);
  AddRange(0, sinks, &out->blocks);
  AddRange(nb - (cap - sinks), nb, &out->blocks);
  Unknown(shape_.group_size(), out);
  return Status::Ok();
}

// ---- H2O ----------------------------------------------------------------------------------------
Result<std::unique_ptr<H2oSelector>> H2oSelector::Make(const SelectorOptions& o,
                                                       const ModelShape& shape,
                                                       uint64_t max_context) {
  KVM_RETURN_IF_ERROR(ValidateBaseline(o, shape, max_context, "h2o"));
  if (!(o.h2o.recent_frac > 0 && o.h2o.recent_frac < 1))
    return Status::InvalidArgument("h2o_recent_frac: must be in (0, 1)");
  return std::unique_ptr<H2oSelector>(new H2oSelector(o, shape));
}

Status H2oSelector::Select(const StepInput& in, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry));
  const uint64_t T = in.tokens(), nb = opt_.geometry.Blocks(T), cap = opt_.budget_blocks();
  State& st = state_[size_t{in.layer} * shape_.kv_heads + in.kv_head];
  *out = Selection{};
  st.score.resize(nb, 0.0);
  st.evicted.resize(nb, 0);
  std::vector<uint64_t> cand = st.kept;
  AddRange(st.seen_blocks ? st.seen_blocks - 1 : 0, nb,
           &cand);  // the (maybe partial) last block and new ones
  cand.erase(
      std::remove_if(cand.begin(), cand.end(), [&](uint64_t b) { return st.evicted[b] != 0; }),
      cand.end());
  st.seen_blocks = nb;
  if (cand.size() <= cap) {
    st.kept = cand;
  } else {
    const uint64_t recent =
        std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(cap * opt_.h2o.recent_frac)));
    std::vector<uint64_t> keep, old;
    for (uint64_t b : cand) (b + recent >= nb ? keep : old).push_back(b);
    const uint64_t heavy = cap > keep.size() ? cap - keep.size() : 0;
    keep = MergeBlocks(keep, TopBlocks(old, st.score, heavy));
    for (uint64_t b : cand)
      if (!std::binary_search(keep.begin(), keep.end(), b)) st.evicted[b] = 1;  // gone for good
    st.kept = keep;
  }
  out->blocks = st.kept;
  out->retrieved_heads = nb <= cap ? 0 : shape_.group_size();
  if (nb <= cap) {
    out->delta.assign(shape_.group_size(), 0.0);
    out->kind = DeltaKind::kExact;
  } else {
    Unknown(shape_.group_size(), out);
  }
  return Status::Ok();
}

Status H2oSelector::Observe(uint32_t layer, uint32_t kv_head, const std::vector<uint64_t>& blocks,
                            const std::vector<double>& mass) {
  if (layer >= shape_.layers || kv_head >= shape_.kv_heads)
    return Status::InvalidArgument("h2o: layer/kv_head out of range");
  if (blocks.size() != mass.size())
    return Status::InvalidArgument("h2o: blocks and mass differ in length");
  State& st = state_[size_t{layer} * shape_.kv_heads + kv_head];
  for (size_t i = 0; i < blocks.size(); ++i) {
    // Prefill observations come before any Select: the scores grow to cover them.
    if (blocks[i] >= st.score.size()) {
      if (blocks[i] >= (uint64_t{1} << 32))
        return Status::InvalidArgument("h2o: block out of range");
      st.score.resize(blocks[i] + 1, 0.0);
      st.evicted.resize(blocks[i] + 1, 0);
    }
    if (st.evicted[blocks[i]]) return Status::InvalidArgument("h2o: attention on an evicted block");
    st.score[blocks[i]] += mass[i];
  }
  return Status::Ok();
}

bool H2oSelector::Evicted(uint32_t layer, uint32_t kv_head, uint64_t b) const {
  const State& st = state_[size_t{layer} * shape_.kv_heads + kv_head];
  return b < st.evicted.size() && st.evicted[b];
}

// ---- HShare -------------------------------------------------------------------------------------
HShareSelector::HShareSelector(const SelectorOptions& o, const ModelShape& s)
    : opt_(o),
      shape_(s),
      cache_(size_t{s.layers} * s.kv_heads),
      head_map_(s.layers),
      layer_map_(s.layers) {
  for (uint32_t l = 0; l < s.layers; ++l) {
    layer_map_[l] = l;
    head_map_[l].resize(s.kv_heads);
    std::iota(head_map_[l].begin(), head_map_[l].end(), 0u);
  }
}

Result<std::unique_ptr<HShareSelector>> HShareSelector::Make(const SelectorOptions& o,
                                                             const ModelShape& shape,
                                                             uint64_t max_context) {
  KVM_RETURN_IF_ERROR(ValidateBaseline(o, shape, max_context, "hshare"));
  if (o.hshare.query_share == 0) return Status::InvalidArgument("hshare_query_share: must be >= 1");
  if (o.hshare.channels.size() != size_t{shape.layers} * shape.q_heads)
    return Status::InvalidArgument(
        "hshare_channels: need " + std::to_string(shape.layers * shape.q_heads) +
        " channel lists (layers x q_heads), got " + std::to_string(o.hshare.channels.size()) +
        " (run `kvmctl hshare-calibrate`)");
  for (const auto& ch : o.hshare.channels) {
    if (ch.empty()) return Status::InvalidArgument("hshare_channels: an empty channel list");
    for (uint32_t c : ch)
      if (c >= shape.head_dim)
        return Status::InvalidArgument("hshare_channels: channel out of range");
  }
  return std::unique_ptr<HShareSelector>(new HShareSelector(o, shape));
}

void HShareSelector::Split(uint64_t blocks, uint64_t* sink, uint64_t* heavy, uint64_t* local) {
  *sink = std::max<uint64_t>(1, (blocks * 8 + 64) / 128);
  *local = std::max<uint64_t>(1, (blocks * 32 + 64) / 128);
  *heavy = blocks > *sink + *local ? blocks - *sink - *local : 0;
}

Status HShareSelector::SetShareMaps(const std::vector<std::vector<uint32_t>>& head_map,
                                    const std::vector<uint32_t>& layer_map) {
  if (head_map.size() != shape_.layers || layer_map.size() != shape_.layers)
    return Status::InvalidArgument("hshare maps: need one entry per layer");
  for (uint32_t l = 0; l < shape_.layers; ++l) {
    if (layer_map[l] > l)
      return Status::InvalidArgument("hshare layer map: layer " + std::to_string(l) +
                                     " points deeper");
    if (head_map[l].size() != shape_.kv_heads)
      return Status::InvalidArgument("hshare head map: need one entry per KV head");
    for (uint32_t h = 0; h < shape_.kv_heads; ++h)
      if (head_map[l][h] > h)
        return Status::InvalidArgument("hshare head map: a head must follow a lower-numbered head");
  }
  head_map_ = head_map;
  layer_map_ = layer_map;
  return Status::Ok();
}

Status HShareSelector::Select(const StepInput& in, Selection* out) {
  KVM_RETURN_IF_ERROR(CheckInput(in, shape_, opt_.geometry));
  const uint64_t T = in.tokens(), nb = opt_.geometry.Blocks(T), B = opt_.geometry.block_size;
  const uint32_t g = shape_.group_size(), D = shape_.head_dim;
  Cache& c = cache_[size_t{in.layer} * shape_.kv_heads + in.kv_head];
  *out = Selection{};
  if (nb <= opt_.budget_blocks()) {
    ShortContext(nb, g, out);
    c.last = out->blocks;
    c.last_step = in.step;
    return Status::Ok();
  }
  uint64_t sink, heavy, local;
  Split(opt_.budget_blocks(), &sink, &heavy, &local);
  const uint64_t local_first = nb - local;
  auto finish = [&](const std::vector<uint64_t>& hv) {
    std::vector<uint64_t> blocks;
    AddRange(0, sink, &blocks);
    for (uint64_t b : hv)
      if (b >= sink && b < local_first) blocks.push_back(b);
    std::sort(blocks.begin(), blocks.end());
    AddRange(local_first, nb, &blocks);
    out->blocks = blocks;
    Unknown(g, out);
    c.last = blocks;
    c.last_step = in.step;
  };
  const uint32_t src_layer = layer_map_[in.layer], src_head = head_map_[in.layer][in.kv_head];
  if (src_layer != in.layer || src_head != in.kv_head) {
    const Cache& s = cache_[size_t{src_layer} * shape_.kv_heads +
                            (src_layer != in.layer ? in.kv_head : src_head)];
    if (s.last_step != in.step)
      return Status::FailedPrecondition("hshare: the shared source has not selected this step");
    c.heavy = s.heavy;
    finish(s.heavy);
    return Status::Ok();
  }
  if (c.step != UINT64_MAX && in.step % opt_.hshare.query_share != 0) {
    finish(c.heavy);  // query sharing: reuse the index set, the local window slides
    return Status::Ok();
  }
  // Retrieval: label-channel scores of every middle token, per head softmax, block aggregation.
  std::vector<double> agg(nb, 0.0);
  const uint64_t t0 = sink * B, t1 = std::min<uint64_t>(T, local_first * B);
  std::vector<float> k(D), s(t1 > t0 ? t1 - t0 : 0);
  for (uint32_t h = 0; h < g && !s.empty(); ++h) {
    const auto& ch = opt_.hshare.channels[size_t{in.layer} * shape_.q_heads + in.kv_head * g + h];
    const float inv = 1.0f / std::sqrt(float(ch.size()));
    const float* q = in.q + size_t{h} * D;
    for (uint64_t t = t0; t < t1; ++t) {
      attn::LoadRow(*in.kv, t, false, k.data());
      float dot = 0;
      for (uint32_t cc : ch) dot += q[cc] * k[cc];
      s[t - t0] = dot * inv;
    }
    std::vector<float> p(s.size());
    attn::Softmax(s.data(), s.size(), p.data());
    for (uint64_t t = t0; t < t1; ++t) agg[t / B] += p[t - t0];
  }
  std::vector<uint64_t> middle;
  for (uint64_t b = sink; b < local_first; ++b) middle.push_back(b);
  c.heavy = TopBlocks(middle, agg, heavy);
  c.step = in.step;
  finish(c.heavy);
  out->retrieved_heads = g;
  return Status::Ok();
}

Status BuildHShareMaps(const std::vector<std::vector<uint8_t>>& keep, const ModelShape& shape,
                       int32_t shared_kv_heads, int32_t shared_layers,
                       std::vector<std::vector<uint32_t>>* head_map,
                       std::vector<uint32_t>* layer_map) {
  if (keep.size() != shape.layers)
    return Status::InvalidArgument("hshare maps: need one keep mask per layer");
  const uint32_t nh =
      shared_kv_heads < 0 ? shape.kv_heads / 2 : static_cast<uint32_t>(shared_kv_heads);
  const uint32_t nl = shared_layers < 0 ? shape.layers / 2 : static_cast<uint32_t>(shared_layers);
  head_map->assign(shape.layers, {});
  for (uint32_t l = 0; l < shape.layers; ++l) {
    if (keep[l].size() % shape.kv_heads)
      return Status::InvalidArgument("hshare maps: keep mask size");
    const size_t per = keep[l].size() / shape.kv_heads;  // the group's q heads are contiguous
    std::vector<std::vector<uint8_t>> heads(shape.kv_heads);
    for (uint32_t h = 0; h < shape.kv_heads; ++h)
      heads[h].assign(keep[l].begin() + h * per, keep[l].begin() + (h + 1) * per);
    KVM_ASSIGN_OR_RETURN((*head_map)[l], BuildLayerMap(heads, nh));
  }
  KVM_ASSIGN_OR_RETURN(*layer_map, BuildLayerMap(keep, nl));
  return Status::Ok();
}

// ---- HShare calibration
// ---------------------------------------------------------------------------
HShareCalibrator::HShareCalibrator(const ModelShape& shape)
    : shape_(shape), acc_(size_t{shape.layers} * shape.q_heads * shape.head_dim, 0.0) {}

void HShareCalibrator::Add(uint32_t layer, const float* q, const float* k) {
  const uint32_t D = shape_.head_dim, g = shape_.group_size();
  for (uint32_t h = 0; h < shape_.q_heads; ++h)
    for (uint32_t c = 0; c < D; ++c)
      acc_[(size_t{layer} * shape_.q_heads + h) * D + c] +=
          std::fabs(double(q[h * D + c]) * k[(h / g) * D + c]);
}

std::vector<std::vector<uint32_t>> HShareCalibrator::Channels(uint32_t count) const {
  const uint32_t D = shape_.head_dim;
  if (count == 0) count = std::max<uint32_t>(4, D / 8);
  std::vector<std::vector<uint32_t>> out(size_t{shape_.layers} * shape_.q_heads);
  for (size_t i = 0; i < out.size(); ++i) {
    std::vector<uint32_t> idx(D);
    std::iota(idx.begin(), idx.end(), 0u);
    const double* a = &acc_[i * D];
    std::stable_sort(idx.begin(), idx.end(), [&](uint32_t x, uint32_t y) { return a[x] > a[y]; });
    out[i].assign(idx.begin(), idx.begin() + std::min(count, D));
  }
  return out;
}

}  // namespace kvm::sel

namespace kvm::sel {

std::string FormatHShareChannels(const std::vector<std::vector<uint32_t>>& channels,
                                 uint32_t q_heads) {
  std::ostringstream out;
  out << "# HShare label channels: layer q_head channels... (kvmctl hshare-calibrate)\n";
  for (size_t i = 0; i < channels.size(); ++i) {
    out << i / q_heads << " " << i % q_heads;
    for (uint32_t c : channels[i]) out << " " << c;
    out << "\n";
  }
  return out.str();
}

Result<std::vector<std::vector<uint32_t>>> ParseHShareChannels(const std::string& text,
                                                               const ModelShape& shape) {
  std::vector<std::vector<uint32_t>> out(size_t{shape.layers} * shape.q_heads);
  std::istringstream in(text);
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    long long layer, head, c;
    const std::string where = "hshare channels line " + std::to_string(n) + ": ";
    if (!(ls >> layer >> head))
      return Status::InvalidArgument(where + "expected 'layer head channels...'");
    if (layer < 0 || head < 0 || layer >= shape.layers || head >= shape.q_heads)
      return Status::InvalidArgument(where + "layer/head out of range for " + shape.ToString());
    auto& ch = out[size_t(layer) * shape.q_heads + size_t(head)];
    while (ls >> c) {
      if (c < 0 || c >= shape.head_dim)
        return Status::InvalidArgument(where + "channel out of range");
      ch.push_back(static_cast<uint32_t>(c));
    }
    if (!ls.eof()) return Status::InvalidArgument(where + "not a number");
  }
  for (size_t i = 0; i < out.size(); ++i)
    if (out[i].empty())
      return Status::InvalidArgument("hshare channels: no line for layer " +
                                     std::to_string(i / shape.q_heads) + " head " +
                                     std::to_string(i % shape.q_heads));
  return out;
}

}  // namespace kvm::sel
