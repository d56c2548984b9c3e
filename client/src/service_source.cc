#include "client/service_source.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "selector/layer_map.h"
#include "selector/plan.h"
#include "selector/wire_options.h"

namespace kvm::client {
namespace {

constexpr uint32_t kPrefillBatch = 64;  // tokens per Append message during prefill

// Deterministic sampling of audits: a hash of (step, layer, KV head) below the fraction.
bool Sampled(uint64_t step, uint32_t layer, uint32_t h, double frac) {
  if (frac <= 0) return false;
  uint64_t x = step * 0x9E3779B97F4A7C15ull ^ (uint64_t{layer} << 32 | h);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return double(x % 1000000) < frac * 1e6;
}

}  // namespace

struct ServiceKvSource::Impl {
  Client* client = nullptr;
  ModelShape shape;
  ServiceSourceOptions opt;
  BlockLayout layout = std::move(BlockLayout::Make({1, 1, 1, 32, DType::kF32, 0}, 1)).value();
  std::unique_ptr<sel::Selector> sizing;  // the selector, for HotSetSlots and the reuse rule
  uint32_t L = 0, Hkv = 0, g = 0, D = 0, B = 0, slots = 0;
  size_t bb = 0, row = 0;
  uint64_t generation = 0;

  struct Head {
    std::vector<std::vector<uint8_t>> lk, lv;  // local blocks by index (empty: not held)
    uint64_t local_first = 0;                  // blocks at or after it are held locally
    std::vector<uint64_t> slot_block;          // the hot set's slot table
    std::unordered_map<uint64_t, uint32_t> where;
    sel::AnchorRecord rec;
    std::vector<sel::HeadGate> gates;  // [group]
    bool contact = false;              // a retrieval happened since the last hot-set reset
    std::vector<uint64_t> last;        // the selection attended at step last_step
    uint64_t last_step = UINT64_MAX;
    std::vector<uint64_t> shared;  // a sharing layer's selection, delivered in its source's batch
    uint64_t shared_step = UINT64_MAX;
  };
  std::vector<Head> heads;   // [layer][kv_head]
  std::vector<uint8_t> hot;  // hot-set buffer: [layer][kv_head][slot][K,V][B][D]
  std::vector<uint8_t> zero;

  // Appends not sent yet: rows [token][layer][kv_head][K,V][D] of tokens [buf_start, ...).
  uint64_t buf_start = 0;
  std::vector<uint32_t> buf_tokens;
  std::vector<uint8_t> buf_rows;
  uint64_t sent_upto = 0;  // tokens whose Append is on the wire
  uint32_t token = 0;

  std::vector<ServiceRecord> records;
  ServiceTotals totals;

  // Cross-layer sharing (PrHS, selectors.md §0.6): the last W prefill queries per layer, and the
  // layer map built from them at the first decode step and sent to the service.
  uint32_t W = 0;
  std::vector<std::vector<float>> lastq;  // [layer][W][q_heads][D]
  std::vector<uint32_t> layer_map;        // empty: no sharing
  bool map_built = false;
  bool needs_reset = false;  // a retrieval failed midway: reset the hot set before going on

  // Data plane: active messages per retrieval request id (parts arrived, first error). The
  // transport calls back on the thread in WaitFor; the lock keeps that obviously safe.
  std::unordered_map<uint64_t, uint32_t> arrived;
  Status data_error;
  std::mutex data_mu;

  Head& head(uint32_t l, uint32_t h) { return heads[size_t{l} * Hkv + h]; }
  uint8_t* slot_ptr(uint32_t l, uint32_t h, uint32_t slot) {
    return hot.data() + ((size_t{l} * Hkv + h) * slots + slot) * 2 * bb;
  }
  size_t token_rows_bytes() const { return size_t{L} * Hkv * 2 * row; }

  Status Create() {
    wire::CreateSequence c;
    c.set_sequence_id(opt.sequence_id);
    wire::ToWire(shape, c.mutable_shape());
    c.set_block_size(B);
    c.set_durability(opt.durable ? wire::DURABLE : wire::CACHE);
    sel::ToWire({opt.selector, opt.options}, c.mutable_selector());
    c.set_hot_set_slots(slots);
    c.set_attach(opt.attach);
    KVM_ASSIGN_OR_RETURN(wire::Frame f, client->Call(wire::MessageType::kCreateSequence, c));
    wire::CreateSequenceReply r;
    KVM_RETURN_IF_ERROR(wire::ParseProto(f, &r));
    if (opt.attach) sent_upto = buf_start = r.length();
    return Status::Ok();
  }

  Status SendAppends() {
    const uint64_t n = buf_tokens.size();
    if (n == 0) return Status::Ok();
    wire::Append a;
    a.set_sequence_id(opt.sequence_id);
    a.set_start_position(buf_start);
    for (uint32_t t : buf_tokens) a.add_token_ids(t);
    // Wire layout: [layer][kv_head][K,V][token][D].
    std::vector<uint8_t> payload(n * token_rows_bytes());
    uint8_t* p = payload.data();
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < Hkv; ++h)
        for (int v = 0; v < 2; ++v)
          for (uint64_t t = 0; t < n; ++t, p += row)
            std::memcpy(
                p, buf_rows.data() + t * token_rows_bytes() + ((size_t{l} * Hkv + h) * 2 + v) * row,
                row);
    KVM_RETURN_IF_ERROR(client->CallAsync(wire::MessageType::kAppend, a, payload));
    sent_upto = buf_start + n;
    buf_start = sent_upto;
    buf_tokens.clear();
    buf_rows.clear();
    return Status::Ok();
  }

  // Drops local blocks below `first` (they are in the hot set or not needed).
  void Trim(Head& hd, uint64_t first) {
    for (uint64_t b = hd.local_first; b < first && b < hd.lk.size(); ++b) {
      std::vector<uint8_t>().swap(hd.lk[b]);
      std::vector<uint8_t>().swap(hd.lv[b]);
    }
    hd.local_first = std::max(hd.local_first, first);
  }

  void Evict(Head& hd, uint32_t slot) {
    if (slot < slots && hd.slot_block[slot] != sel::kEmptySlot) {
      hd.where.erase(hd.slot_block[slot]);
      hd.slot_block[slot] = sel::kEmptySlot;
    }
  }
  // Records block b in `slot`, copying its K and V there unless they already landed (k null).
  Status Place(Head& hd, uint32_t l, uint32_t h, uint32_t slot, uint64_t b, const uint8_t* k,
               const uint8_t* v) {
    if (slot >= slots)
      return Status::Internal("the service sent slot " + std::to_string(slot) + " of " +
                              std::to_string(slots));
    Evict(hd, slot);
    if (k) {
      std::memcpy(slot_ptr(l, h, slot), k, bb);
      std::memcpy(slot_ptr(l, h, slot) + bb, v, bb);
    }
    hd.slot_block[slot] = b;
    hd.where[b] = slot;
    return Status::Ok();
  }

  // PrHS layer sharing: the map from the last W prefill queries over the prefill KV (still held
  // here), built as the in-process eval builds it, and sent to the service (SetLayerMap).
  Status BuildLayerMap() {
    map_built = true;
    const uint64_t context = opt.prefill;
    const double frac =
        opt.options.budget_tokens ? double(opt.options.budget_tokens) / double(context) : 0.125;
    std::vector<std::vector<uint8_t>> keep;
    for (uint32_t l = 0; l < L; ++l) {
      std::vector<std::vector<const void*>> kp(Hkv), vp(Hkv);
      std::vector<attn::HeadKV> views;
      for (uint32_t h = 0; h < Hkv; ++h) {
        Head& hd = head(l, h);
        const uint64_t nb = layout.BlocksFor(context);
        if (hd.local_first > 0 || hd.lk.size() < nb)
          return Status::FailedPrecondition("layer map: the prefill KV is no longer held");
        for (uint64_t b = 0; b < nb; ++b) {
          kp[h].push_back(hd.lk[b].data());
          vp[h].push_back(hd.lv[b].data());
        }
        views.push_back({kp[h].data(), vp[h].data(), uint32_t(nb), context, B, D, shape.dtype});
      }
      keep.push_back(sel::KeepMask(lastq[l].data(), W, shape.q_heads, views, frac));
    }
    KVM_ASSIGN_OR_RETURN(layer_map, sel::BuildLayerMap(keep, L / 2));
    wire::SetLayerMap m;
    m.set_sequence_id(opt.sequence_id);
    for (uint32_t s : layer_map) m.add_source_layer(s);
    return client->Call(wire::MessageType::kSetLayerMap, m).status();
  }

  // Queries of the groups `hs` (fp32) + the K rows the service has not stored yet.
  std::vector<uint8_t> QueryPayload(uint32_t l, const std::vector<uint32_t>& hs, const float* q,
                                    uint64_t T, uint32_t pending) {
    std::vector<uint8_t> out;
    const size_t qb = size_t{g} * D * sizeof(float);
    out.reserve(hs.size() * (qb + size_t{pending} * row));
    for (uint32_t h : hs) {
      const auto* p = reinterpret_cast<const uint8_t*>(q + size_t{h} * g * D);
      out.insert(out.end(), p, p + qb);
    }
    for (uint32_t h : hs) {
      Head& hd = head(l, h);
      for (uint64_t t = T - pending; t < T; ++t) {
        const uint8_t* r = hd.lk[t / B].data() + (t % B) * row;
        out.insert(out.end(), r, r + row);
      }
    }
    return out;
  }

  // Fills the fields RetrieveLayer and Audit share and returns their payload: the groups' queries,
  // then the K rows of the tokens the service has not stored yet.
  template <typename Msg>
  std::vector<uint8_t> Query(Msg* m, uint32_t l, uint64_t pos, const std::vector<uint32_t>& hs,
                             const float* q) {
    const uint64_t T = pos + 1;
    const uint32_t pending = static_cast<uint32_t>(T - std::min(T, sent_upto));
    m->set_sequence_id(opt.sequence_id);
    m->set_step(pos);
    m->set_layer(l);
    for (uint32_t h : hs) m->add_kv_heads(h);
    m->set_pending_tokens(pending);
    return QueryPayload(l, hs, q, T, pending);
  }

  Status Retrieve(uint32_t l, uint64_t pos, const std::vector<uint32_t>& hs, const float* q,
                  std::vector<std::vector<uint64_t>>* selection) {
    const uint64_t T = pos + 1;
    wire::RetrieveLayer m;
    m.set_hot_set_generation(generation);
    const std::vector<uint8_t> payload_out = Query(&m, l, pos, hs, q);
    const auto t0 = std::chrono::steady_clock::now();
    auto f = client->Call(wire::MessageType::kRetrieveLayer, m, payload_out);
    totals.retrieve_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!f.ok()) return f.status().WithContext("retrieve layer " + std::to_string(l));
    ++totals.round_trips;
    wire::RetrieveLayerReply r;
    KVM_RETURN_IF_ERROR(wire::ParseProto(*f, &r));
    const bool on_data_plane = r.data_plane_parts() > 0;
    if (on_data_plane) {  // the blocks came (or are coming) as active messages into the slots
      transport::Transport* dp = client->data_plane();
      if (!dp) return Status::Internal("blocks on a data plane this session does not have");
      const uint64_t id = f->header.request_id;
      const uint32_t parts = r.data_plane_parts();
      const auto tw = std::chrono::steady_clock::now();
      Status w = dp->WaitFor(
          [&] {
            std::lock_guard<std::mutex> lk(data_mu);
            return arrived[id] >= parts || !data_error.ok();
          },
          int(client->options().deadline_ms));
      totals.retrieve_seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - tw).count();
      std::lock_guard<std::mutex> lk(data_mu);
      arrived.erase(id);
      if (!data_error.ok()) return std::exchange(data_error, Status::Ok());
      KVM_RETURN_IF_ERROR(
          w.WithContext("waiting for the blocks of retrieval " + std::to_string(id)));
    }
    int own = 0;
    for (const auto& sel : r.heads()) own += sel.layer() == l;
    if (own != int(hs.size()))
      return Status::Internal("retrieve: " + std::to_string(own) + " heads for " +
                              std::to_string(hs.size()));
    size_t at = 0;
    const auto& payload = f->payload;
    for (const wire::HeadSelection& sel : r.heads()) {
      const uint32_t h = sel.kv_head();
      const uint32_t sl = sel.layer();
      if (sl >= L || h >= Hkv || sel.delta_size() != int(g) || sel.log_delta_size() != int(g) ||
          sel.slots_size() != sel.block_indices_size() ||
          sel.local_fill_slots_size() != sel.local_fill_blocks_size())
        return Status::Internal("retrieve: malformed head selection");
      Head& hd = head(sl, h);
      for (uint32_t e : sel.evicted_slots()) Evict(hd, e);
      for (int i = 0; i < sel.local_fill_blocks_size(); ++i) {
        const uint64_t b = sel.local_fill_blocks(i);
        if (b >= hd.lk.size() || hd.lk[b].empty())
          return Status::Internal("local fill of block " + std::to_string(b) +
                                  " that the worker does not hold");
        KVM_RETURN_IF_ERROR(
            Place(hd, sl, h, sel.local_fill_slots(i), b, hd.lk[b].data(), hd.lv[b].data()));
        totals.local_fill_bytes += 2 * bb;
      }
      for (int i = 0; i < sel.block_indices_size(); ++i) {
        if (on_data_plane) {
          KVM_RETURN_IF_ERROR(
              Place(hd, sl, h, sel.slots(i), sel.block_indices(i), nullptr, nullptr));
          totals.streamed_bytes += 2 * bb;
          continue;
        }
        if (at + 2 * bb > payload.size())
          return Status::Internal("retrieve: the reply's payload is short");
        KVM_RETURN_IF_ERROR(
            Place(hd, sl, h, sel.slots(i), sel.block_indices(i), &payload[at], &payload[at + bb]));
        at += 2 * bb;
      }
      if (sl != l) {  // a layer sharing this one's index set: its blocks came ahead of its query
        hd.shared.assign(sel.resident_blocks().begin(), sel.resident_blocks().end());
        hd.shared_step = pos;
        hd.contact = true;
        Trim(hd, opt.options.geometry.WindowFirstBlock(T));
        ++totals.shared_prefetches;
        continue;
      }
      hd.rec.valid = sel.anchor();
      hd.rec.step = pos;
      hd.rec.resident.assign(sel.resident_blocks().begin(), sel.resident_blocks().end());
      for (uint32_t j = 0; j < g; ++j) {
        sel::HeadGate& gt = hd.gates[j];
        const float* qj = q + (size_t{h} * g + j) * D;
        gt.q_a.assign(qj, qj + D);
        gt.log_delta_a = sel.log_delta(j);
        gt.delta_a = std::exp(gt.log_delta_a);
        gt.k_max = sel.k_max();
        records.push_back(
            {pos, l, h * g + j, double(sel.delta(j)), static_cast<DeltaKind>(sel.delta_kind())});
      }
      totals.retrievals += sel.retrieved_heads();
      hd.contact = true;
      Trim(hd, opt.options.geometry.WindowFirstBlock(T));
      (*selection)[h] = hd.rec.resident;
    }
    if (at != payload.size()) return Status::Internal("retrieve: unread payload bytes");
    totals.streamed_bytes += payload.size();
    return Status::Ok();
  }

  void Audit(uint32_t l, uint64_t pos, uint32_t h, const float* q) {
    wire::Audit m;
    const std::vector<uint8_t> payload = Query(&m, l, pos, {h}, q);
    const uint32_t group = g;
    Status s = client->CallAsync(
        wire::MessageType::kAudit, m, payload,
        [this, pos, l, h, group](const Result<wire::Frame>& f) {
          wire::AuditReply r;
          if (!f.ok() || !wire::ParseProto(*f, &r).ok() || r.delta_size() != int(group)) return;
          for (uint32_t j = 0; j < group; ++j)
            records.push_back({pos, l, h * group + j, double(r.delta(j)), DeltaKind::kAudit});
          totals.audits += group;
        });
    (void)s;  // an audit is best-effort; a broken channel shows at the next retrieval
  }
};

// Data plane: an active message's blocks header → the hot-set slots its blocks (K then V each,
// adjacent in a slot) land in.
Result<std::vector<transport::Segment>> PlaceBlocks(ServiceKvSource::Impl& m,
                                                    std::span<const uint8_t> bytes, size_t len) {
  KVM_ASSIGN_OR_RETURN(wire::BlocksHeader h, wire::DecodeBlocksHeader(bytes));
  if (h.layer >= m.L || len != 2 * m.bb * h.blocks.size())
    return Status::InvalidArgument("data plane: layer " + std::to_string(h.layer) + ", " +
                                   std::to_string(h.blocks.size()) + " blocks, " +
                                   std::to_string(len) + " data bytes do not fit this hot set");
  std::vector<transport::Segment> segs;
  for (const wire::BlockPlacement& p : h.blocks) {
    if (p.kv_head >= m.Hkv || p.slot >= m.slots)
      return Status::OutOfRange("data plane: slot out of range");
    segs.push_back({m.slot_ptr(h.layer, p.kv_head, p.slot), 2 * m.bb});
  }
  return segs;
}

Result<std::unique_ptr<ServiceKvSource>> ServiceKvSource::Make(Client* client,
                                                               const ModelShape& shape,
                                                               const ServiceSourceOptions& o) {
  if (!client) return Status::InvalidArgument("service source: no client");
  auto impl = std::make_unique<Impl>();
  impl->client = client;
  impl->shape = shape;
  impl->opt = o;
  impl->B = o.options.geometry.block_size;
  KVM_ASSIGN_OR_RETURN(impl->layout, BlockLayout::Make(shape, impl->B));
  KVM_ASSIGN_OR_RETURN(impl->sizing, sel::MakeSelector(o.selector, o.options, shape, UINT32_MAX));
  impl->L = shape.layers;
  impl->Hkv = shape.kv_heads;
  impl->g = shape.group_size();
  impl->D = shape.head_dim;
  impl->bb = impl->layout.kv_block_bytes();
  impl->row = impl->layout.row_bytes();
  impl->slots = static_cast<uint32_t>(impl->sizing->HotSetSlots());
  impl->heads.resize(size_t{impl->L} * impl->Hkv);
  for (auto& hd : impl->heads) {
    hd.slot_block.assign(impl->slots, sel::kEmptySlot);
    hd.gates.resize(impl->g);
  }
  impl->hot.resize(impl->heads.size() * impl->slots * 2 * impl->bb);
  impl->zero.assign(impl->bb, 0);
  if (o.selector == "prhs" && o.options.layer_sharing && o.prefill > 0) {
    impl->W = static_cast<uint32_t>(std::min<uint64_t>(64, o.prefill));
    impl->lastq.assign(impl->L, std::vector<float>(size_t{impl->W} * shape.q_heads * impl->D));
  }
  if (transport::Transport* dp = client->data_plane()) {
    KVM_RETURN_IF_ERROR(dp->Register(impl->hot.data(), impl->hot.size()));
    Impl* m = impl.get();
    dp->SetReceiver([m](std::span<const uint8_t> h, size_t len) { return PlaceBlocks(*m, h, len); },
                    [m](std::span<const uint8_t> h, const Status& st) {
                      auto header = wire::DecodeBlocksHeader(h);
                      const uint64_t id = header.ok() ? header->request_id : 0;
                      std::lock_guard<std::mutex> l(m->data_mu);
                      if (!st.ok() && m->data_error.ok()) m->data_error = st;
                      ++m->arrived[id];
                    });
  }
  KVM_RETURN_IF_ERROR(impl->Create());
  return std::unique_ptr<ServiceKvSource>(new ServiceKvSource(std::move(impl)));
}

ServiceKvSource::ServiceKvSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ServiceKvSource::~ServiceKvSource() {
  // Late active messages must not reach this source's hot set once it is gone.
  if (transport::Transport* dp = impl_->client->data_plane()) dp->SetReceiver({}, {});
}

void ServiceKvSource::BeginToken(uint32_t token, uint64_t pos) {
  (void)pos;
  impl_->token = token;
}

Status ServiceKvSource::Append(uint32_t layer, uint64_t pos, const float* k, const float* v) {
  Impl& m = *impl_;
  if (layer >= m.L)
    return Status::InvalidArgument("layer " + std::to_string(layer) + " out of range");
  if (pos < m.sent_upto) return Status::Ok();  // a re-append of a known position
  const uint64_t b = pos / m.B;
  for (uint32_t h = 0; h < m.Hkv; ++h) {
    Impl::Head& hd = m.head(layer, h);
    if (hd.lk.size() <= b) {
      hd.lk.resize(b + 1);
      hd.lv.resize(b + 1);
    }
    if (hd.lk[b].empty()) {
      hd.lk[b].assign(m.bb, 0);
      hd.lv[b].assign(m.bb, 0);
    }
    EncodeRow(k + size_t{h} * m.D, m.D, m.shape.dtype, hd.lk[b].data() + (pos % m.B) * m.row);
    EncodeRow(v + size_t{h} * m.D, m.D, m.shape.dtype, hd.lv[b].data() + (pos % m.B) * m.row);
  }
  // Stage the token's rows for the batched Append.
  const uint64_t t = pos - m.buf_start;
  if (t >= m.buf_tokens.size()) {
    m.buf_tokens.resize(t + 1);
    m.buf_rows.resize((t + 1) * m.token_rows_bytes());
  }
  m.buf_tokens[t] = m.token;
  for (uint32_t h = 0; h < m.Hkv; ++h) {
    uint8_t* dst =
        m.buf_rows.data() + t * m.token_rows_bytes() + (size_t{layer} * m.Hkv + h) * 2 * m.row;
    Impl::Head& hd = m.head(layer, h);
    std::memcpy(dst, hd.lk[b].data() + (pos % m.B) * m.row, m.row);
    std::memcpy(dst + m.row, hd.lv[b].data() + (pos % m.B) * m.row, m.row);
  }
  // One Append per decode step (after its last layer); prefill in batches.
  if (layer + 1 == m.L && (pos + 1 >= m.opt.prefill || m.buf_tokens.size() >= kPrefillBatch))
    return m.SendAppends();
  return Status::Ok();
}

Status ServiceKvSource::Attend(uint32_t layer, uint64_t pos, const float* q, float* out) {
  Impl& m = *impl_;
  if (layer >= m.L)
    return Status::InvalidArgument("layer " + std::to_string(layer) + " out of range");
  const uint64_t T = pos + 1;
  const sel::Geometry& geo = m.opt.options.geometry;
  const uint64_t nb = geo.Blocks(T);
  const bool decode = pos >= m.opt.prefill;
  const bool prhs = m.opt.selector == "prhs";
  std::vector<std::vector<uint64_t>> selection(m.Hkv);
  std::vector<uint32_t> need;
  if (!decode && m.W && pos + m.W >= m.opt.prefill)  // the last W prefill queries (layer map)
    std::copy(q, q + size_t{m.shape.q_heads} * m.D,
              &m.lastq[layer][(pos + m.W - m.opt.prefill) * m.shape.q_heads * m.D]);
  if (decode && m.W && !m.map_built) KVM_RETURN_IF_ERROR(m.BuildLayerMap());
  const bool sharing = !m.layer_map.empty() && m.layer_map[layer] != layer;
  if (decode && m.needs_reset) KVM_RETURN_IF_ERROR(ResetHotSet());
  if (decode) {
    if (layer == 0) ++m.totals.steps;
    m.totals.dense_equivalent += T * 2 * m.row * m.Hkv;
    for (uint32_t h = 0; h < m.Hkv; ++h) {
      Impl::Head& hd = m.head(layer, h);
      if (!hd.contact) m.Trim(hd, geo.WindowFirstBlock(T));  // the worker keeps its window only
      const float* qg = q + size_t{h} * m.g * m.D;
      sel::Selection s;
      bool local = false;
      if (sharing && !(hd.contact && nb <= m.opt.options.cap_blocks())) {
        // The source layer's set of this step + this layer's sinks and window; its blocks came
        // in the source's batch (an anchor) or are already here (a reuse).
        const Impl::Head& src = m.head(m.layer_map[layer], h);
        if (src.last_step != pos)
          return Status::FailedPrecondition("layer " + std::to_string(layer) + " shares layer " +
                                            std::to_string(m.layer_map[layer]) +
                                            ", which has not selected yet");
        sel::AddRange(0, geo.SinkBlocks(T), &s.blocks);
        sel::AddRange(geo.WindowFirstBlock(T), nb, &s.blocks);
        s.blocks = sel::MergeBlocks(src.last, s.blocks);
        if (hd.shared_step == pos && hd.shared != s.blocks)
          return Status::Internal("layer " + std::to_string(layer) +
                                  ": the prefetched selection differs from the source's");
        local = true;
        for (uint32_t j = 0; j < m.g; ++j)
          m.records.push_back({pos, layer, h * m.g + j, std::numeric_limits<double>::quiet_NaN(),
                               DeltaKind::kUnknown});
      } else if (prhs && hd.contact && nb <= m.opt.options.cap_blocks()) {  // short context
        local = true;
        for (uint64_t b = 0; b < hd.local_first && local; ++b) local = hd.where.count(b) > 0;
        if (local) {
          sel::AddRange(0, nb, &s.blocks);
          for (uint32_t j = 0; j < m.g; ++j)
            m.records.push_back({pos, layer, h * m.g + j, 0.0, DeltaKind::kExact});
        }
      } else if (prhs && hd.contact) {
        ++m.totals.gate_checks;
        local =
            sel::PrhsReuse(m.opt.options, m.slots, hd.rec, hd.gates.data(), m.g, m.D, qg, pos, &s);
        if (local) {
          ++m.totals.reuses;
          for (uint32_t j = 0; j < m.g; ++j)
            m.records.push_back({pos, layer, h * m.g + j, s.delta[j], DeltaKind::kBound});
          if (Sampled(pos, layer, h, m.opt.audit_fraction)) m.Audit(layer, pos, h, q);
        }
      }
      if (local) {
        selection[h] = std::move(s.blocks);
      } else {
        need.push_back(h);
      }
    }
    if (!need.empty()) {
      Status st = m.Retrieve(layer, pos, need, q, &selection);
      if (st.code() == StatusCode::kUnavailable) {  // the connection dropped: a fresh hot set
        KVM_RETURN_IF_ERROR(ResetHotSet());
        return Attend(layer, pos, q, out);
      }
      // Any other failure may leave the service's mirror ahead of this hot set (a reply only partly
      // applied): the next call starts from a fresh hot set (a new generation).
      if (!st.ok()) m.needs_reset = true;
      KVM_RETURN_IF_ERROR(st);
    }
    for (uint32_t h = 0; h < m.Hkv; ++h) {
      m.head(layer, h).last = selection[h];
      m.head(layer, h).last_step = pos;
    }
  }
  // Attention over the selection (decode) or everything (prefill), token order.
  std::vector<const void*> kp(nb), vp(nb);
  std::vector<uint8_t> mask;
  for (uint32_t h = 0; h < m.Hkv; ++h) {
    Impl::Head& hd = m.head(layer, h);
    std::fill(kp.begin(), kp.end(), m.zero.data());
    std::fill(vp.begin(), vp.end(), m.zero.data());
    std::vector<uint64_t> all;
    if (!decode) sel::AddRange(0, nb, &all);
    const std::vector<uint64_t>& blocks = decode ? selection[h] : all;
    if (decode) mask.assign(T, 0);
    uint64_t resident_far = 0;
    for (uint64_t b : blocks) {
      if (b >= nb) return Status::Internal("selected block past the end");
      if (b >= hd.local_first && b < hd.lk.size() && !hd.lk[b].empty()) {
        kp[b] = hd.lk[b].data();
        vp[b] = hd.lv[b].data();
      } else if (auto it = hd.where.find(b); it != hd.where.end()) {
        kp[b] = m.slot_ptr(layer, h, it->second);
        vp[b] = m.slot_ptr(layer, h, it->second) + m.bb;
      } else {
        return Status::Internal("block " + std::to_string(b) + " of layer " +
                                std::to_string(layer) + " head " + std::to_string(h) +
                                " is neither local nor in the hot set");
      }
      if (decode) {
        for (uint64_t t = b * m.B; t < std::min<uint64_t>(T, (b + 1) * m.B); ++t) mask[t] = 1;
        if (b < geo.WindowFirstBlock(T)) ++resident_far;
      }
    }
    m.totals.topk_refetch += resident_far * 2 * m.bb;
    const attn::HeadKV kv{kp.data(), vp.data(),    static_cast<uint32_t>(nb), T, m.B,
                          m.D,       m.shape.dtype};
    const size_t off = size_t{h} * m.g * m.D;
    KVM_RETURN_IF_ERROR(attn::Attend(q + off, m.g, kv, mask, out + off));
  }
  return Status::Ok();
}

Status ServiceKvSource::Flush() {
  KVM_RETURN_IF_ERROR(impl_->SendAppends());
  return impl_->client->Flush();
}

Status ServiceKvSource::Delete() {
  KVM_RETURN_IF_ERROR(Flush());
  return impl_->client->DeleteSequence(impl_->opt.sequence_id);
}

Status ServiceKvSource::ResetHotSet() {
  Impl& m = *impl_;
  // Reconnect when the channel is gone; re-attach either way (the selector state is soft).
  const Status flushed = m.client->Flush();
  if (!flushed.ok() || !m.client->Call(wire::MessageType::kHeartbeat, wire::Heartbeat()).ok())
    KVM_RETURN_IF_ERROR(m.client->Reconnect());
  const uint64_t had = m.sent_upto;
  m.opt.attach = true;
  KVM_RETURN_IF_ERROR(m.Create());
  if (m.sent_upto < had)
    return Status::Unavailable("the service holds " + std::to_string(m.sent_upto) +
                               " tokens of sequence " + std::to_string(m.opt.sequence_id) +
                               ", the worker had sent " + std::to_string(had) +
                               " (cache-mode data lost with the service)");
  if (!m.layer_map.empty()) {  // the re-attached selector starts without the map
    wire::SetLayerMap lm;
    lm.set_sequence_id(m.opt.sequence_id);
    for (uint32_t s : m.layer_map) lm.add_source_layer(s);
    KVM_RETURN_IF_ERROR(m.client->Call(wire::MessageType::kSetLayerMap, lm).status());
  }
  ++m.generation;
  m.needs_reset = false;
  for (auto& hd : m.heads) {
    hd.slot_block.assign(m.slots, sel::kEmptySlot);
    hd.where.clear();
    hd.rec = {};
    hd.contact = false;
  }
  return Status::Ok();
}

const std::vector<ServiceRecord>& ServiceKvSource::records() const { return impl_->records; }
const ServiceTotals& ServiceKvSource::totals() const { return impl_->totals; }
uint32_t ServiceKvSource::hot_set_slots() const { return impl_->slots; }
uint64_t ServiceKvSource::hot_set_generation() const { return impl_->generation; }

}  // namespace kvm::client
