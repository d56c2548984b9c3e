#include "client/service_source.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

#include "client/hot_set.h"
#include "layer_attention.h"
#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "selector/delta_histogram.h"
#include "selector/layer_map.h"
#include "selector/plan.h"
#include "selector/registry.h"
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

// A HeadSelection of a reply as the plan step the worker applies and the selection it attends.
sel::PlanStep StepOf(const wire::HeadSelection& h) {
  sel::PlanStep p;
  p.evicted_slots.assign(h.evicted_slots().begin(), h.evicted_slots().end());
  for (int i = 0; i < h.block_indices_size(); ++i)
    p.sends.emplace_back(h.block_indices(i), h.slots(i));
  for (int i = 0; i < h.local_fill_blocks_size(); ++i)
    p.local_fills.emplace_back(h.local_fill_blocks(i), h.local_fill_slots(i));
  return p;
}
sel::Selection SelectionOf(const wire::HeadSelection& h) {
  sel::Selection s;
  s.blocks.assign(h.resident_blocks().begin(), h.resident_blocks().end());
  for (float d : h.delta()) s.delta.push_back(d);
  s.log_delta.assign(h.log_delta().begin(), h.log_delta().end());
  s.kind = static_cast<DeltaKind>(h.delta_kind());
  s.k_max = h.k_max();
  s.anchor = h.anchor();
  s.retrieved_heads = h.retrieved_heads();
  s.key_radius = h.key_radius();
  s.split_dir.assign(h.split_dir().begin(), h.split_dir().end());
  s.dropped_radius.assign(h.dropped_radius().begin(), h.dropped_radius().end());
  s.reuse_steps = h.reuse_steps();
  return s;
}

}  // namespace

struct ServiceKvSource::Impl {
  Client* client = nullptr;
  ModelShape shape;
  ServiceSourceOptions opt;
  BlockLayout layout = std::move(BlockLayout::Make({1, 1, 1, 32, DType::kF32, 0}, 1)).value();
  uint32_t L = 0, Hkv = 0, g = 0, D = 0, B = 0, slots = 0;
  size_t bb = 0, row = 0;
  uint64_t generation = 0;

  std::unique_ptr<sel::WorkerGate> gate;
  std::unique_ptr<HotSet> hot;
  std::vector<uint8_t> contact;  // [layer][kv_head]: a retrieval reached it since the last reset
  LayerAttention att;
  std::vector<std::vector<uint64_t>> selection;  // [kv_head]: the blocks attended this layer-step
  std::vector<uint8_t> retrieved_now;            // [kv_head]: retrieved at this layer-step

  // Appends not sent yet: rows [token][layer][kv_head][K,V][D] of tokens [buf_start, ...).
  uint64_t buf_start = 0;
  std::vector<uint32_t> buf_tokens;
  std::vector<uint8_t> buf_rows;
  uint64_t sent_upto = 0;  // tokens whose Append is on the wire
  uint64_t acked = 0;      // tokens the service acknowledged (stored)
  Status append_error;     // the first failed Append (reported at the next call)
  // [layer][kv_head]: the service holds the K rows of tokens below max(acked, this): a completed
  // RetrieveLayer carried them, and the coming Append leaves them out (K once).
  std::vector<uint64_t> k_held;
  uint32_t token = 0;

  std::vector<ClaimRecord> claims;
  ServiceTotals totals;
  std::string last_error;
  // What only this worker sees, not yet reported to the service (metrics): its gate's decisions
  // since the last report and the claims it made alone (reuse bounds, the exact δ of the
  // selections it took without the service), by kind.
  sel::GateCounts reported_gate;
  sel::DeltaHistogram alone_exact, alone_bound;

  void CountAlone(const std::vector<ClaimRecord>& alone) {
    for (const ClaimRecord& c : alone) {
      if (c.kind == DeltaKind::kExact) alone_exact.Add(c.delta, opt.options.target_delta);
      if (c.kind == DeltaKind::kBound) alone_bound.Add(c.delta, opt.options.target_delta);
    }
  }
  bool StatsPending() const {
    return !alone_exact.empty() || !alone_bound.empty() ||
           gate->counts().total() != reported_gate.total();
  }
  // The report since the last one (and marks it reported).
  void TakeStats(wire::WorkerStats* w) {
    w->set_sequence_id(opt.sequence_id);
    const sel::GateCounts now = gate->counts();
    for (sel::GateOutcome o : sel::kGateOutcomes) w->add_gate_checks(now[o] - reported_gate[o]);
    reported_gate = now;
    for (auto [kind, hist] :
         {std::pair{DeltaKind::kExact, &alone_exact}, std::pair{DeltaKind::kBound, &alone_bound}}) {
      if (hist->empty()) continue;
      wire::DeltaCounts* d = w->add_delta();
      d->set_kind(static_cast<wire::DeltaKind>(kind));
      for (uint64_t c : hist->counts()) d->add_buckets(c);
      d->set_sum(hist->sum());
      d->set_over_target(hist->over_target());
      hist->Clear();
    }
  }

  // Cross-layer sharing: the last prefill queries, and the map built from them at the first
  // decode step and sent to the service.
  std::unique_ptr<sel::PrefillQueries> prefill_q;
  bool map_built = false;
  bool needs_reset = false;  // a retrieval failed midway: reset the hot set before going on
  bool diverged = false;     // the last retrieval's selections did not fit the hot set

  // Data plane: the parts of each retrieval reply by request id, and the first failed delivery.
  // The transport calls back on the thread in Await; the lock keeps that obviously safe.
  std::unordered_map<uint64_t, std::vector<wire::DataPart>> arrived;
  Status data_error;
  std::mutex data_mu;

  size_t index(uint32_t l, uint32_t h) const { return size_t{l} * Hkv + h; }
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
    acked = r.length();
    k_held.assign(size_t{L} * Hkv, 0);  // a (re)configured sequence holds no carried rows
    return Status::Ok();
  }

  Status SendAppends() {
    const uint64_t n = buf_tokens.size();
    if (n == 0) return Status::Ok();
    wire::Append a;
    a.set_sequence_id(opt.sequence_id);
    a.set_start_position(buf_start);
    for (uint32_t t : buf_tokens) a.add_token_ids(t);
    a.set_decode(buf_start >= opt.prefill);
    if (StatsPending()) TakeStats(a.mutable_stats());
    // K once: the last token's K row of a (layer, KV head) that a RetrieveLayer of this step
    // carried is left out; the service kept it.
    const uint64_t last = buf_start + n - 1;
    std::vector<uint8_t> omit(size_t{L} * Hkv, 0);
    for (size_t i = 0; i < omit.size(); ++i)
      if (k_held[i] > last) {
        omit[i] = 1;
        a.add_k_from_retrieval(uint32_t(i));
      }
    // Wire layout: [layer][kv_head][K,V][token][D].
    std::vector<uint8_t> payload(wire::AppendPayloadBytes(shape, n, a.k_from_retrieval_size()));
    uint8_t* p = payload.data();
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t h = 0; h < Hkv; ++h)
        for (int v = 0; v < 2; ++v)
          for (uint64_t t = 0; t < n; ++t) {
            if (v == 0 && t + 1 == n && omit[index(l, h)]) continue;
            std::memcpy(p, buf_rows.data() + t * token_rows_bytes() + (index(l, h) * 2 + v) * row,
                        row);
            p += row;
          }
    KVM_RETURN_IF_ERROR(client->CallAsync(wire::MessageType::kAppend, a, payload,
                                          [this](const Result<wire::Frame>& f) {
                                            wire::AppendReply r;
                                            Status st = f.status();
                                            if (st.ok()) st = wire::ParseProto(*f, &r);
                                            if (st.ok()) {
                                              acked = std::max<uint64_t>(acked, r.length());
                                            } else if (append_error.ok()) {
                                              append_error = st.WithContext("append");
                                            }
                                          }));
    sent_upto = buf_start + n;
    buf_start = sent_upto;
    buf_tokens.clear();
    buf_rows.clear();
    return Status::Ok();
  }

  Status SendLayerMap() {
    wire::SetLayerMap m;
    m.set_sequence_id(opt.sequence_id);
    for (uint32_t s : gate->layer_map()) m.add_source_layer(s);
    return client->Call(wire::MessageType::kSetLayerMap, m).status();
  }

  // PrHS layer sharing: the map from the last prefill queries over the prefill KV (still held in
  // the tail), built by the gate, and sent to the service.
  Status BuildLayerMap() {
    map_built = true;
    const uint64_t context = opt.prefill, nb = layout.BlocksFor(context);
    std::vector<std::vector<const void*>> kp(Hkv), vp(Hkv);
    Status held;
    auto views = [&](uint32_t l) {
      std::vector<attn::HeadKV> out;
      for (uint32_t h = 0; h < Hkv; ++h) {
        kp[h].assign(nb, nullptr);
        vp[h].assign(nb, nullptr);
        for (uint64_t b = 0; b < nb; ++b) {
          kp[h][b] = hot->LocalBlock(l, h, b, false);
          vp[h][b] = hot->LocalBlock(l, h, b, true);
          if (!kp[h][b])
            held = Status::FailedPrecondition("layer map: the prefill KV is no longer held");
        }
        out.push_back({kp[h].data(), vp[h].data(), uint32_t(nb), context, B, D, shape.dtype});
      }
      return out;
    };
    for (uint32_t l = 0; l < L && held.ok(); ++l) (void)views(l);  // every block still held?
    KVM_RETURN_IF_ERROR(held);
    KVM_RETURN_IF_ERROR(gate->BuildLayerMap(*prefill_q, context, views));
    return SendLayerMap();
  }

  // Fills the fields RetrieveLayer and Audit share and returns their payload: the groups' queries
  // (fp32), then the K rows of the tokens the service has not stored yet.
  template <typename Msg>
  Result<std::vector<uint8_t>> Query(Msg* m, uint32_t l, uint64_t pos,
                                     const std::vector<uint32_t>& hs, const float* q) {
    const uint64_t T = pos + 1;
    // The K rows the service may not hold: from the least it is known to hold among these heads
    // (acknowledged appends, rows earlier retrievals carried) to T.
    uint64_t held = T;
    for (uint32_t h : hs) held = std::min(held, std::max(acked, k_held[index(l, h)]));
    const uint32_t pending = static_cast<uint32_t>(T - std::min(T, held));
    m->set_sequence_id(opt.sequence_id);
    m->set_step(pos);
    m->set_layer(l);
    for (uint32_t h : hs) m->add_kv_heads(h);
    m->set_pending_tokens(pending);
    std::vector<uint8_t> out;
    const size_t qb = size_t{g} * D * sizeof(float);
    out.reserve(hs.size() * (qb + size_t{pending} * row));
    for (uint32_t h : hs) {
      const auto* p = reinterpret_cast<const uint8_t*>(q + size_t{h} * g * D);
      out.insert(out.end(), p, p + qb);
    }
    for (uint32_t h : hs)
      for (uint64_t t = T - pending; t < T; ++t) {
        const uint8_t* r = hot->LocalRow(l, h, t, /*values=*/false);
        if (!r) return Status::Internal("the K row of token " + std::to_string(t) + " is not held");
        out.insert(out.end(), r, r + row);
      }
    return out;
  }

  // A RetrieveLayer over the data plane: its active messages are the reply (their blocks land in
  // the slots as they come); a TCP reply only comes for an error (or from a service that sent the
  // blocks in the frame after all). Waits for all parts or that reply, within the deadline.
  Status AwaitParts(const wire::RetrieveLayer& m, const std::vector<uint8_t>& payload,
                    wire::RetrieveLayerReply* r, wire::Frame* tcp, bool* on_data_plane) {
    std::optional<Result<wire::Frame>> replied;
    KVM_ASSIGN_OR_RETURN(
        const uint64_t id,
        client->SendOptionalReply(wire::MessageType::kRetrieveLayer, m, payload,
                                  [&replied](const Result<wire::Frame>& f) { replied = f; }));
    auto complete = [&] {
      std::lock_guard<std::mutex> lk(data_mu);
      auto it = arrived.find(id);
      return !data_error.ok() ||
             (it != arrived.end() && it->second.size() == it->second.front().parts());
    };
    Status w = client->Await([&] { return replied.has_value() || complete(); });
    std::vector<wire::DataPart> parts;
    {
      std::lock_guard<std::mutex> lk(data_mu);
      if (auto it = arrived.find(id); it != arrived.end()) {
        parts = std::move(it->second);
        arrived.erase(it);
      }
      if (!data_error.ok()) w = std::exchange(data_error, Status::Ok());
    }
    if (replied) {  // an error (or a TCP reply after all)
      if (!replied->ok()) return replied->status();
      *tcp = std::move(**replied);
      return wire::ParseProto(*tcp, r);
    }
    client->Forget(id);  // no TCP reply will come on success; a late one is dropped
    KVM_RETURN_IF_ERROR(w.WithContext("waiting for the parts of retrieval " + std::to_string(id)));
    KVM_ASSIGN_OR_RETURN(*r, wire::JoinParts(std::move(parts)));
    *on_data_plane = true;
    return Status::Ok();
  }

  // One RetrieveLayer for the KV heads `hs` of layer l; applies every selection of the reply to the
  // hot set and the gate. A selection that does not fit the hot set, or whose digest differs from
  // the service's, sets `diverged`.
  // A reply may send blocks below the window from the store, and a correction attends them there:
  // the appends holding them must have landed, or a request that overtook them (protocol 2) would
  // find them missing. In steady decode only the newest token or two are unacknowledged, inside the
  // window, so this waits only after a large batch (the prefill's last) or behind a lagging append.
  Status AwaitStoredBelowWindow(uint64_t T) {
    const uint64_t need = opt.options.geometry.WindowFirstBlock(T) * B;
    if (acked >= need) return Status::Ok();
    KVM_RETURN_IF_ERROR(client->Flush());
    if (!append_error.ok()) return std::exchange(append_error, Status::Ok());
    if (acked < need)
      return Status::Internal("the service acknowledged " + std::to_string(acked) +
                              " tokens after a flush, " + std::to_string(need) + " needed");
    return Status::Ok();
  }

  Status Retrieve(uint32_t l, uint64_t pos, const std::vector<uint32_t>& hs, const float* q,
                  std::vector<ClaimRecord>* new_claims) {
    const uint64_t T = pos + 1;
    KVM_RETURN_IF_ERROR(AwaitStoredBelowWindow(T));
    wire::RetrieveLayer m;
    m.set_hot_set_generation(generation);
    KVM_ASSIGN_OR_RETURN(const std::vector<uint8_t> payload_out, Query(&m, l, pos, hs, q));
    const auto t0 = std::chrono::steady_clock::now();
    wire::RetrieveLayerReply r;
    wire::Frame tcp;  // the reply frame of the TCP path
    bool on_data_plane = false;
    Status st;
    if (client->data_plane()) {
      st = AwaitParts(m, payload_out, &r, &tcp, &on_data_plane);
    } else {
      auto f = client->Call(wire::MessageType::kRetrieveLayer, m, payload_out);
      st = f.status();
      if (st.ok()) {
        tcp = std::move(*f);
        st = wire::ParseProto(tcp, &r);
      }
    }
    totals.retrieve_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) return st.WithContext("retrieve layer " + std::to_string(l));
    ++totals.round_trips;
    // The service now holds these heads' K rows up to T (kept for the coming Append).
    for (uint32_t h : hs) k_held[index(l, h)] = std::max(k_held[index(l, h)], T);
    int own = 0;
    for (const auto& hsel : r.heads()) own += hsel.layer() == l;
    if (own != int(hs.size()))
      return Status::Internal("retrieve: " + std::to_string(own) + " heads for " +
                              std::to_string(hs.size()));
    size_t at = 0;
    const auto& payload = tcp.payload;
    const uint64_t window_first = opt.options.geometry.WindowFirstBlock(T),
                   nb = layout.BlocksFor(T);
    for (const wire::HeadSelection& hsel : r.heads()) {
      const uint32_t h = hsel.kv_head(), sl = hsel.layer();
      if (sl >= L || h >= Hkv || hsel.delta_size() != int(g) || hsel.log_delta_size() != int(g) ||
          hsel.slots_size() != hsel.block_indices_size() ||
          hsel.local_fill_slots_size() != hsel.local_fill_blocks_size())
        return Status::Internal("retrieve: malformed head selection");
      const sel::PlanStep step = StepOf(hsel);
      std::span<const uint8_t> blocks;
      if (!on_data_plane) {
        const size_t n = step.sends.size() * 2 * bb;
        if (at + n > payload.size())
          return Status::Internal("retrieve: the reply's payload is short");
        blocks = {payload.data() + at, n};
        at += n;
      }
      if (Status a = hot->Apply(sl, h, step, blocks); !a.ok()) {
        diverged = true;
        return a.WithContext("layer " + std::to_string(sl) + " KV head " + std::to_string(h));
      }
      if (hsel.slot_digest() != 0 && hot->Digest(sl, h) != hsel.slot_digest()) {
        diverged = true;
        return Status::Internal("hot set diverged: layer " + std::to_string(sl) + " KV head " +
                                std::to_string(h) + " slot table digest " +
                                std::to_string(hot->Digest(sl, h)) + ", the service's is " +
                                std::to_string(hsel.slot_digest()));
      }
      totals.streamed_bytes += step.sends.size() * 2 * bb;
      totals.local_fill_bytes += step.local_fills.size() * 2 * bb;
      contact[index(sl, h)] = 1;
      TrimTail(sl, h, window_first);
      // The resident set: the slot table (now checked against the service's) + the resident blocks
      // of the window.
      sel::Selection s = SelectionOf(hsel);
      const std::vector<uint64_t> window(hsel.resident_blocks().begin(),
                                         hsel.resident_blocks().end());
      s.blocks = hot->Resident(sl, h, hsel.window_first(), nb, window);
      if (sl != l) {  // a layer sharing this one's index set: its blocks came ahead of its query
        gate->Record(pos, sl, h, nullptr, s);
        ++totals.shared_prefetches;
        continue;
      }
      gate->Record(pos, l, h, q + size_t{h} * g * D, s);
      for (uint32_t j = 0; j < g; ++j)
        new_claims->push_back({pos, l, h * g + j, double(hsel.delta(j)), s.kind});
      totals.retrievals += s.retrieved_heads;
      selection[h] = s.blocks;
    }
    if (at != payload.size()) return Status::Internal("retrieve: unread payload bytes");
    return Status::Ok();
  }

  void Audit(uint32_t l, uint64_t pos, uint32_t h, const float* q) {
    wire::Audit m;
    auto payload = Query(&m, l, pos, {h}, q);
    if (!payload.ok()) return;  // an audit is best-effort
    const uint32_t group = g;
    Status s = client->CallAsync(
        wire::MessageType::kAudit, m, *payload,
        [this, pos, l, h, group](const Result<wire::Frame>& f) {
          wire::AuditReply r;
          if (!f.ok() || !wire::ParseProto(*f, &r).ok() || r.delta_size() != int(group)) return;
          for (uint32_t j = 0; j < group; ++j)
            claims.push_back({pos, l, h * group + j, double(r.delta(j)), DeltaKind::kAudit});
          totals.audits += group;
        });
    (void)s;  // best-effort: a broken channel shows at the next retrieval
  }

  // Drops the tail's blocks below `first`, but never a row the service is not known to hold (it
  // may have to travel again, as a pending row of a retrieval that overtakes its Append).
  void TrimTail(uint32_t l, uint32_t h, uint64_t first) {
    hot->Trim(l, h, std::min(first, std::max(acked, k_held[index(l, h)]) / B));
  }

  // Exact correction, in two halves so that the worker's own sparse attention runs while the
  // service computes: SendCorrect asks for the partial attention of `heads` over the blocks they
  // do not attend at (layer, pos); FinishCorrect waits for it, `rest` gets [heads][group][2 + D]
  // (m, d, out) per query head. The reply lands in shared state (a late one after a failure
  // harms nothing).
  struct PendingCorrect {
    bool done = false;
    Result<wire::Frame> reply = Status::Internal("no reply yet");
    size_t request_bytes = 0, heads = 0;
  };
  Result<std::shared_ptr<PendingCorrect>> SendCorrect(uint32_t l, uint64_t pos,
                                                      const std::vector<uint32_t>& heads,
                                                      const float* q) {
    KVM_RETURN_IF_ERROR(AwaitStoredBelowWindow(pos + 1));
    wire::Correct m;
    m.set_sequence_id(opt.sequence_id);
    m.set_step(pos);
    m.set_layer(l);
    std::vector<uint8_t> payload(heads.size() * g * D * sizeof(float));
    for (size_t i = 0; i < heads.size(); ++i) {
      wire::CorrectHead* ch = m.add_heads();
      ch->set_kv_head(heads[i]);
      for (uint64_t b : selection[heads[i]]) ch->add_attended(uint32_t(b));
      std::memcpy(payload.data() + i * g * D * sizeof(float), q + size_t{heads[i]} * g * D,
                  size_t{g} * D * sizeof(float));
    }
    auto p = std::make_shared<PendingCorrect>();
    p->request_bytes = wire::kFrameHeaderBytes + m.ByteSizeLong() + payload.size();
    p->heads = heads.size();
    KVM_RETURN_IF_ERROR(client->CallAsync(wire::MessageType::kCorrect, m, payload,
                                          [p](const Result<wire::Frame>& r) {
                                            p->reply = r;
                                            p->done = true;
                                          }));
    return p;
  }
  Status FinishCorrect(PendingCorrect& p, std::vector<float>* rest) {
    KVM_RETURN_IF_ERROR(client->Await([&p] { return p.done; }));
    KVM_ASSIGN_OR_RETURN(const wire::Frame& f, p.reply);
    wire::CorrectReply r;
    KVM_RETURN_IF_ERROR(wire::ParseProto(f, &r));
    const size_t want = p.heads * g * (2 + D) * sizeof(float);
    if (f.payload.size() != want)
      return Status::Internal("correct: the reply has " + std::to_string(f.payload.size()) +
                              " payload bytes, expected " + std::to_string(want));
    rest->resize(want / sizeof(float));
    std::memcpy(rest->data(), f.payload.data(), want);
    ++totals.corrections;
    ++totals.round_trips;
    totals.corrected += p.heads;
    totals.correction_blocks += r.blocks();
    totals.correction_service_seconds += r.service_seconds();
    totals.correction_bytes +=
        p.request_bytes + wire::kFrameHeaderBytes + r.ByteSizeLong() + f.payload.size();
    return Status::Ok();
  }

  // One attempt at the selections of every KV head of (layer, pos): the gate's local decisions,
  // then one retrieval for the rest. Claims and audits are committed by the caller on success.
  // `alone`: the claims of the heads decided here without the service (reported to it later, as
  // counts; the service observes the δ of its own retrievals and audits itself).
  Status SelectLayer(uint32_t l, uint64_t pos, const float* q, std::vector<ClaimRecord>* new_claims,
                     std::vector<ClaimRecord>* alone, std::vector<uint32_t>* audits) {
    const uint64_t T = pos + 1;
    const sel::Geometry& geo = opt.options.geometry;
    KVM_RETURN_IF_ERROR(client->Poll());  // the acknowledgements that arrived: fewer pending rows
    std::vector<uint32_t> need;
    retrieved_now.assign(Hkv, 0);
    for (uint32_t h = 0; h < Hkv; ++h) {
      // Keep the window only (a dense layer keeps everything, locally).
      if (!contact[index(l, h)] && !gate->DenseLayer(l)) TrimTail(l, h, geo.WindowFirstBlock(T));
      sel::Selection s;
      KVM_ASSIGN_OR_RETURN(const sel::GateOutcome o, gate->Decide(pos, l, h, q + size_t{h} * g * D,
                                                                  /*allow_reuse=*/true, &s));
      bool local = o != sel::GateOutcome::kRetrieve;
      if (o == sel::GateOutcome::kShortContext)  // local only when the hot set holds everything
        for (uint64_t b = 0; b < hot->local_first(l, h) && local; ++b) local = hot->Holds(l, h, b);
      if (!local) {
        need.push_back(h);
        retrieved_now[h] = 1;
        continue;
      }
      for (uint32_t j = 0; j < g; ++j) alone->push_back({pos, l, h * g + j, s.delta[j], s.kind});
      if (o == sel::GateOutcome::kReuse && Sampled(pos, l, h, opt.audit_fraction))
        audits->push_back(h);
      selection[h] = std::move(s.blocks);
    }
    if (need.empty()) return Status::Ok();
    return Retrieve(l, pos, need, q, new_claims);
  }
};

// Data plane: a part's header (DataPart) → the hot-set slots its blocks (K then V each, adjacent in
// a slot) land in.
Result<std::vector<transport::Segment>> PlaceBlocks(ServiceKvSource::Impl& m,
                                                    std::span<const uint8_t> bytes, size_t len) {
  wire::DataPart part;
  if (!part.ParseFromArray(bytes.data(), int(bytes.size())))
    return Status::InvalidArgument("data plane: a header that is not a DataPart");
  const auto blocks = wire::PartBlocks(part);
  if (len != 2 * m.bb * blocks.size())
    return Status::InvalidArgument("data plane: " + std::to_string(blocks.size()) + " blocks, " +
                                   std::to_string(len) + " data bytes do not fit this hot set");
  std::vector<transport::Segment> segs;
  for (const wire::PartBlock& b : blocks) {
    if (b.layer >= m.L || b.kv_head >= m.Hkv || b.slot >= m.slots)
      return Status::OutOfRange("data plane: slot out of range");
    segs.push_back({m.hot->Slot(b.layer, b.kv_head, b.slot), 2 * m.bb});
  }
  return segs;
}

Result<std::unique_ptr<ServiceKvSource>> ServiceKvSource::Make(Client* client,
                                                               const ModelShape& shape,
                                                               const ServiceSourceOptions& o) {
  if (!client) return Status::InvalidArgument("service source: no client");
  KVM_RETURN_IF_ERROR(CheckCorrection(o.options, o.correction));
  KVM_ASSIGN_OR_RETURN(const sel::SelectorEntry* entry, sel::FindSelector(o.selector));
  if (!entry->caps.served)
    return Status::InvalidArgument(
        "selector " + o.selector + " runs in-process only; the service runs " +
        sel::SelectorNames([](const sel::SelectorEntry& e) { return e.caps.served; }, ", "));
  auto impl = std::make_unique<Impl>();
  impl->client = client;
  impl->shape = shape;
  impl->opt = o;
  impl->B = o.options.geometry.block_size;
  KVM_ASSIGN_OR_RETURN(impl->layout, BlockLayout::Make(shape, impl->B));
  KVM_ASSIGN_OR_RETURN(auto sizing, entry->make(o.options, shape, UINT32_MAX));
  impl->L = shape.layers;
  impl->Hkv = shape.kv_heads;
  impl->g = shape.group_size();
  impl->D = shape.head_dim;
  impl->bb = impl->layout.kv_block_bytes();
  impl->row = impl->layout.row_bytes();
  impl->slots = static_cast<uint32_t>(sizing->HotSetSlots());
  impl->gate = std::make_unique<sel::WorkerGate>(o.options, shape, *entry, impl->slots);
  impl->hot = std::make_unique<HotSet>(impl->layout, impl->slots);
  impl->contact.assign(size_t{impl->L} * impl->Hkv, 0);
  impl->selection.resize(impl->Hkv);
  if (impl->gate->layer_sharing() && o.prefill > 0)
    impl->prefill_q = std::make_unique<sel::PrefillQueries>(
        impl->L, shape.q_heads, impl->D, o.options.prhs.layer_map.window_queries, o.prefill);
  if (transport::Transport* dp = client->data_plane()) {
    KVM_RETURN_IF_ERROR(dp->Register(impl->hot->data(), impl->hot->size()));
    Impl* m = impl.get();
    dp->SetReceiver([m](std::span<const uint8_t> h, size_t len) { return PlaceBlocks(*m, h, len); },
                    [m](std::span<const uint8_t> h, const Status& st) {
                      wire::DataPart part;
                      const bool parsed = part.ParseFromArray(h.data(), int(h.size()));
                      std::lock_guard<std::mutex> l(m->data_mu);
                      if (!st.ok() && m->data_error.ok()) m->data_error = st;
                      if (!parsed || !st.ok()) return;
                      m->arrived[part.request_id()].push_back(std::move(part));
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
  for (uint32_t h = 0; h < m.Hkv; ++h)
    m.hot->AppendRow(layer, h, pos, k + size_t{h} * m.D, v + size_t{h} * m.D);
  // Stage the token's rows for the batched Append.
  const uint64_t t = pos - m.buf_start;
  if (t >= m.buf_tokens.size()) {
    m.buf_tokens.resize(t + 1);
    m.buf_rows.resize((t + 1) * m.token_rows_bytes());
  }
  m.buf_tokens[t] = m.token;
  for (uint32_t h = 0; h < m.Hkv; ++h) {
    uint8_t* dst = m.buf_rows.data() + t * m.token_rows_bytes() + m.index(layer, h) * 2 * m.row;
    std::memcpy(dst, m.hot->LocalRow(layer, h, pos, false), m.row);
    std::memcpy(dst + m.row, m.hot->LocalRow(layer, h, pos, true), m.row);
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
  const uint64_t nb = m.layout.BlocksFor(T);
  const bool decode = pos >= m.opt.prefill;
  size_t layer_claims = m.claims.size(), alone_first = m.claims.size();  // this call's claims
  if (!decode) {  // prefill: every block, from the tail
    if (m.prefill_q) m.prefill_q->Observe(layer, pos, q);
    for (uint32_t h = 0; h < m.Hkv; ++h) sel::AddRange(0, nb, &(m.selection[h] = {}));
  } else {
    if (!m.append_error.ok()) return std::exchange(m.append_error, Status::Ok());
    if (m.prefill_q && !m.map_built) KVM_RETURN_IF_ERROR(m.BuildLayerMap());
    if (m.needs_reset) KVM_RETURN_IF_ERROR(ResetHotSet());
    if (layer == 0) ++m.totals.steps;
    m.totals.dense_equivalent += T * 2 * m.row * m.Hkv;
    // At most one retry per call: after a lost connection (reconnect and reset) or a hot set that
    // diverged from the service's mirror (reset). The gate decides again after a reset; its counts
    // are restored so each (step, layer, KV head) counts once.
    for (int attempt = 0;; ++attempt) {
      const sel::GateCounts before = m.gate->counts();
      std::vector<ClaimRecord> new_claims, alone;
      std::vector<uint32_t> audits;
      m.diverged = false;
      Status st = m.SelectLayer(layer, pos, q, &new_claims, &alone, &audits);
      if (st.ok()) {
        layer_claims = m.claims.size();
        m.claims.insert(m.claims.end(), new_claims.begin(), new_claims.end());
        alone_first = m.claims.size();
        m.claims.insert(m.claims.end(), alone.begin(), alone.end());
        for (uint32_t h : audits) m.Audit(layer, pos, h, q);
        break;
      }
      m.last_error = st.ToString();
      const bool lost = st.IsUnavailable(), diverged = m.diverged;
      if (attempt == 0 && (lost || diverged)) {
        ++(diverged ? m.totals.divergences : m.totals.reconnects);
        m.gate->RestoreCounts(before);
        if (Status r = ResetHotSet(); !r.ok()) {
          ++m.totals.failed_calls;
          m.last_error = r.ToString();
          return r.WithContext("after: " + st.ToString());
        }
        continue;
      }
      // Any other failure may leave the service's mirror ahead of this hot set (a reply applied in
      // part): the next call starts from a fresh hot set (a new generation).
      m.needs_reset = true;
      ++m.totals.failed_calls;
      return st;
    }
  }
  // Attention over the selection (decode) or everything (prefill): ascending blocks, the fast
  // kernel.
  uint64_t most = 0;
  for (const auto& s : m.selection) most = std::max<uint64_t>(most, s.size());
  m.att.Prepare(m.shape, m.B, most);
  const uint64_t wf = m.opt.options.geometry.WindowFirstBlock(T);
  for (uint32_t h = 0; h < m.Hkv; ++h) {
    const std::vector<uint64_t>& blocks = m.selection[h];
    KVM_RETURN_IF_ERROR(
        m.hot->BlockList(layer, h, blocks, T, m.att.k(h), m.att.v(h), m.att.rows(h)));
    m.att.set_count(h, static_cast<uint32_t>(blocks.size()));
    if (decode)
      for (uint64_t b : blocks) m.totals.topk_refetch += b < wf ? 2 * m.bb : 0;
  }
  // Exact correction: the service's partial attention over what this worker does not hold.
  std::vector<uint32_t> corr;
  std::vector<float> rest, state;
  if (decode && m.opt.correction != Correction::kOff) {
    for (uint32_t h = 0; h < m.Hkv; ++h)
      if ((m.opt.correction == Correction::kAlways || m.retrieved_now[h]) &&
          m.selection[h].size() < nb)
        corr.push_back(h);
  }
  // The correction's request goes out first; the local sparse attention runs while the service
  // attends the complement; then its state is awaited (correction_seconds: the step's time spent
  // on the correction beyond its own attention — sending, and waiting for what is left).
  std::shared_ptr<Impl::PendingCorrect> pending;
  auto failed = [&m](const Status& st) {
    ++m.totals.failed_calls;
    m.last_error = st.ToString();
    return st.WithContext("correct");
  };
  if (!corr.empty()) {
    const auto c0 = std::chrono::steady_clock::now();
    auto sent = m.SendCorrect(layer, pos, corr, q);
    if (!sent.ok()) return failed(sent.status());
    pending = std::move(*sent);
    m.totals.correction_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
    state.resize(size_t{m.Hkv} * m.g * 2);
  }
  const auto t0 = std::chrono::steady_clock::now();
  KVM_RETURN_IF_ERROR(m.att.Run(q, out, state.empty() ? nullptr : state.data()));
  double waited = 0;  // in FinishCorrect: not attention time
  if (pending) {
    const auto c1 = std::chrono::steady_clock::now();
    if (Status st = m.FinishCorrect(*pending, &rest); !st.ok()) return failed(st);
    waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - c1).count();
    m.totals.correction_seconds += waited;
  }
  for (size_t i = 0; i < corr.size(); ++i)
    for (uint32_t j = 0; j < m.g; ++j) {
      const uint32_t qh = corr[i] * m.g + j;
      const float* r = rest.data() + (i * m.g + j) * (2 + m.D);
      const double delta = MergeCorrection(state[2 * qh], state[2 * qh + 1], out + size_t{qh} * m.D,
                                           r[0], r[1], r + 2, m.D);
      // The claim of (pos, layer, qh) becomes the exact δ. Audit replies of earlier steps may have
      // landed in this range meanwhile (callbacks run inside the calls above): they stay as they
      // are.
      for (size_t c = layer_claims; c < m.claims.size(); ++c) {
        ClaimRecord& cr = m.claims[c];
        if (cr.q_head == qh && cr.step == pos && cr.layer == layer && cr.kind != DeltaKind::kAudit)
          cr.delta = delta, cr.kind = DeltaKind::kExact;
      }
    }
  if (decode)
    m.CountAlone(std::vector<ClaimRecord>(m.claims.begin() + alone_first, m.claims.end()));
  if (decode) {
    m.totals.attention_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() - waited;
    ++m.totals.attention_layers;
  }
  return Status::Ok();
}

const std::vector<std::vector<uint64_t>>& ServiceKvSource::attended() const {
  return impl_->selection;
}
const std::vector<ClaimRecord>& ServiceKvSource::claims() const { return impl_->claims; }

Status ServiceKvSource::Flush() {
  KVM_RETURN_IF_ERROR(impl_->SendAppends());
  KVM_RETURN_IF_ERROR(impl_->client->Flush());
  return std::exchange(impl_->append_error, Status::Ok());
}

Status ServiceKvSource::Delete() {
  Impl& m = *impl_;
  KVM_RETURN_IF_ERROR(Flush());
  wire::DeleteSequence d;  // the sequence's last message carries what was not reported yet
  d.set_sequence_id(m.opt.sequence_id);
  if (m.StatsPending()) m.TakeStats(d.mutable_stats());
  return m.client->Call(wire::MessageType::kDeleteSequence, d).status();
}

Status ServiceKvSource::ReportStats() {
  Impl& m = *impl_;
  KVM_RETURN_IF_ERROR(m.SendAppends());
  if (!m.StatsPending()) return Status::Ok();
  wire::Heartbeat hb;
  m.TakeStats(hb.add_stats());
  return m.client->Call(wire::MessageType::kHeartbeat, hb).status();
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
  if (m.map_built && m.gate->layer_sharing())  // the re-attached selector starts without the map
    KVM_RETURN_IF_ERROR(m.SendLayerMap());
  ++m.generation;
  m.needs_reset = false;
  m.hot->Reset();
  m.gate->Reset();
  std::fill(m.contact.begin(), m.contact.end(), 0);
  return Status::Ok();
}

const ServiceTotals& ServiceKvSource::totals() const {
  impl_->totals.gate = impl_->gate->counts();
  return impl_->totals;
}
uint32_t ServiceKvSource::hot_set_slots() const { return impl_->slots; }
uint64_t ServiceKvSource::hot_set_generation() const { return impl_->generation; }
const std::string& ServiceKvSource::last_error() const { return impl_->last_error; }
const HotSet& ServiceKvSource::hot_set() const { return *impl_->hot; }
HotSet& ServiceKvSource::hot_set_for_testing() { return *impl_->hot; }

}  // namespace kvm::client
