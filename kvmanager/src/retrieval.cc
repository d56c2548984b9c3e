#include "kvmanager/retrieval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <map>

#include "attention/decode.h"
#include "kvmanager/metrics.h"
#include "proto/half.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"
#include "selector/delta_histogram.h"
#include "selector/plan.h"
#include "selector/registry.h"
#include "selector/scoring.h"
#include "selector/wire_options.h"
#include "selector/worker_gate.h"

namespace kvm::server {
namespace {

constexpr uint64_t kNoContact = UINT64_MAX;
constexpr size_t kMaxHeldRows = 4096;   // K rows kept per (layer, KV head) for coming appends
constexpr size_t kResidentHistory = 4;  // resident sets remembered per (layer, KV head) for audits
// Slot-table entries (hot_set_slots × layers × KV heads) one sequence's mirrors may hold: 64 MB,
// and up to kResidentHistory copies of each table for audits. 80 layers × 8 KV heads at 16-token
// blocks fit a hot set of 13,107 blocks (210K tokens) per (layer, KV head).
constexpr uint64_t kMaxMirrorEntries = uint64_t{1} << 23;

std::string Key(const store::SeqRef& s) { return s.tenant + '\0' + std::to_string(s.id); }

}  // namespace

struct RetrievalEngine::Seq {
  std::mutex mu;
  ModelShape shape;
  uint32_t B = 0;
  sel::NamedOptions sel;
  uint32_t slots = 0;
  std::unique_ptr<sel::Selector> selector;
  std::vector<sel::HotSetMirror> mirrors;  // [layer][kv_head]
  std::vector<uint64_t> local_first;       // [layer][kv_head]: window start at the last contact
  // [layer][kv_head]: the worker's resident sets as the last kResidentHistory retrievals left
  // them, oldest first. An Audit of step p measures the set the latest retrieval at a step ≤ p
  // installed: a retrieval of a later step may overtake the audit (both are kOvertake requests,
  // handler.h) and change the mirror first.
  struct ResidentAt {
    uint64_t step;
    std::vector<uint64_t> slots;  // the mirror's slot table then
    uint64_t local_first;
  };
  std::vector<std::deque<ResidentAt>> resident;
  uint64_t generation = 0;
  // [layer][kv_head]: token → K row a query carried that the store did not hold (K once).
  std::vector<std::map<uint64_t, std::vector<uint8_t>>> pending_k;

  size_t index(uint32_t l, uint32_t h) const { return size_t{l} * shape.kv_heads + h; }
  void ResetMirrors() {
    mirrors.assign(size_t{shape.layers} * shape.kv_heads, sel::HotSetMirror(slots));
    local_first.assign(mirrors.size(), kNoContact);
    resident.assign(mirrors.size(), {});
  }
  void Remember(size_t idx, uint64_t step) {
    auto& h = resident[idx];
    while (!h.empty() && h.back().step >= step) h.pop_back();  // a step planned again
    h.push_back({step, mirrors[idx].slot_table(), local_first[idx]});
    while (h.size() > kResidentHistory) h.pop_front();
  }
  // The resident set the worker attended at `step`, or null when the retrieval that installed it
  // is no longer remembered.
  const ResidentAt* ResidentFor(size_t idx, uint64_t step) const {
    const auto& h = resident[idx];
    for (auto it = h.rbegin(); it != h.rend(); ++it)
      if (it->step <= step) return &*it;
    return nullptr;
  }
  size_t row_bytes() const { return size_t{shape.head_dim} * DTypeSize(shape.dtype); }
  // The K rows of (layer, h) for [from, T): those the store does not hold yet, from the rows
  // queries carried (`query`: the rows of [T - pending, T)), which are kept for the coming Append;
  // entries the store now holds (below `length`) are dropped. FailedPrecondition naming a missing
  // row.
  Status TailRows(uint32_t layer, uint32_t h, uint64_t length, uint64_t T, uint32_t pending,
                  const uint8_t* query, std::vector<uint8_t>* out, uint64_t* from) {
    auto& held = pending_k[index(layer, h)];
    held.erase(held.begin(), held.lower_bound(length));
    const size_t rb = row_bytes();
    const uint64_t first_query = T - pending;
    for (uint64_t t = std::max(length, first_query); t < T; ++t) {
      const uint8_t* r = query + (t - first_query) * rb;
      held[t].assign(r, r + rb);
    }
    while (held.size() > kMaxHeldRows) held.erase(held.begin());
    *from = std::min(length, first_query);
    // Every row of [from, first_query) must be held: find a missing one before sizing anything
    // by T (a step far past the stored tokens claims rows nobody sent). At most held.size() + 1
    // lookups.
    for (uint64_t t = *from; t < first_query; ++t)
      if (!held.count(t))
        return Status::FailedPrecondition(
            "step " + std::to_string(T - 1) + " needs the K row of token " + std::to_string(t) +
            " of layer " + std::to_string(layer) + " KV head " + std::to_string(h) +
            ": the store holds " + std::to_string(length) +
            " tokens and no query carried it (append first, or send it as a pending row)");
    out->resize((T - *from) * rb);
    for (uint64_t t = *from; t < T; ++t) {
      const uint8_t* r = nullptr;
      if (t >= first_query) {
        r = query + (t - first_query) * rb;
      } else if (auto it = held.find(t); it != held.end()) {
        r = it->second.data();
      } else {
        return Status::FailedPrecondition(
            "step " + std::to_string(T - 1) + " needs the K row of token " + std::to_string(t) +
            " of layer " + std::to_string(layer) + " KV head " + std::to_string(h) +
            ": the store holds " + std::to_string(length) +
            " tokens and no query carried it (append first, or send it as a pending row)");
      }
      std::memcpy(out->data() + (t - *from) * rb, r, rb);
    }
    return Status::Ok();
  }
};

namespace {

// One (layer, KV head) of a retrieval or audit at T tokens: [0, T - pending) stored, the rest the
// query's pending rows ([pending][D] of dtype).
struct Head {
  store::BlockStore* store;
  const store::SeqRef& s;
  const ModelShape& shape;
  uint32_t B, layer, h;
  uint64_t T;
  uint32_t pending;
  const uint8_t* pending_rows;

  sel::HeadSummaries sums{1, 1};  // LoadSummaries
  bool channel_bounds = false;    // the selector reads the summaries' channel min/max
  bool has_keys = false;          // LoadKeys: kv over the pinned blocks and k
  store::PinnedBlocks pinned;     // the full stored blocks, in place
  std::vector<uint8_t> k;         // the rest: [blocks][B][D] of dtype
  std::vector<const void*> ptr;
  attn::HeadKV kv;

  size_t row() const { return size_t{shape.head_dim} * DTypeSize(shape.dtype); }
  uint64_t stored() const { return T - pending; }

  // The store's key summaries plus the pending rows.
  Status LoadSummaries() {
    KVM_RETURN_IF_ERROR(store->WithSummaries(s, layer, h, [&](const sel::HeadSummaries& hs) {
      sums = channel_bounds ? hs : hs.NormsOnly();
    }));
    sums.Truncate(std::min(sums.tokens(), stored()));
    std::vector<float> f(shape.head_dim);
    for (uint64_t t = stored(); t < T; ++t) {
      DecodeRow(pending_rows + (t - stored()) * row(), shape.head_dim, shape.dtype, f.data());
      sums.Append(t, f.data());
    }
    return Status::Ok();
  }

  // The keys: the full stored blocks where they lie (pinned in the host tier), the rest — the
  // stored rows of a partial block, then the query's pending rows — assembled here.
  Status LoadKeys() {
    const size_t bb = row() * B;
    const uint64_t nb = (T + B - 1) / B, full = stored() / B;
    std::vector<uint64_t> ids(full);
    for (uint64_t b = 0; b < full; ++b) ids[b] = b;
    KVM_ASSIGN_OR_RETURN(pinned, store->Pin(s, layer, h, ids, /*keys_only=*/true));
    k.assign((nb - full) * bb, 0);
    if (stored() % B) {  // rows past `stored` come from the query (the store may hold more)
      const uint64_t b = full;
      KVM_RETURN_IF_ERROR(
          store->ReadBlocks(s, layer, h, /*values=*/false, {&b, 1}, {k.data(), bb}));
      std::memset(k.data() + (stored() % B) * row(), 0, bb - (stored() % B) * row());
    }
    if (pending)
      std::memcpy(k.data() + (stored() - full * B) * row(), pending_rows, size_t{pending} * row());
    ptr.resize(nb);
    for (uint64_t b = 0; b < nb; ++b)
      ptr[b] = b < full ? pinned.k()[b] : static_cast<const void*>(k.data() + (b - full) * bb);
    kv = attn::HeadKV{ptr.data(),     ptr.data(), static_cast<uint32_t>(nb), T, B,
                      shape.head_dim, shape.dtype};
    has_keys = true;
    return Status::Ok();
  }

  // The exact scores of the group's queries q: on the store's GPU tier when it has one (the keys
  // stay there), else on the CPU from the keys.
  Status Score(const float* q, sel::GroupScores* out) {
    out->group = shape.group_size();
    out->tokens = T;
    out->block_size = B;
    out->logits.resize(size_t{out->group} * T);
    if (store
            ->ScoreOnGpu(s, layer, h, stored(), {pending_rows, size_t{pending} * row()}, q,
                         out->logits.data())
            .ok()) {
      sel::CompleteScores(out);
      return Status::Ok();
    }
    if (!has_keys) KVM_RETURN_IF_ERROR(LoadKeys());
    *out = sel::ScoreGroup(q, shape.group_size(), kv);
    return Status::Ok();
  }
};

// Parsed KV heads, queries and pending rows of a RetrieveLayer / Audit.
struct Queries {
  std::vector<uint32_t> heads;
  std::vector<float> q;  // [heads][group][D]
  const uint8_t* pending = nullptr;
  size_t pending_stride = 0;  // bytes per head
  uint64_t length = 0;        // tokens the store held when the query was parsed
};

// Validates a RetrieveLayer / Audit (m) of sequence s against its shape and stored length.
template <typename Msg>
Status ParseQueries(store::BlockStore* store, const store::SeqRef& s, const ModelShape& shape,
                    const Msg& m, uint32_t max_pending, std::span<const uint8_t> payload,
                    Queries* out) {
  out->heads.assign(m.kv_heads().begin(), m.kv_heads().end());
  const std::vector<uint32_t>& heads = out->heads;
  const uint32_t layer = m.layer(), pending = m.pending_tokens();
  const uint64_t step = m.step();
  KVM_ASSIGN_OR_RETURN(const uint64_t length, store->Length(s));
  KVM_RETURN_IF_ERROR(wire::ValidateQueries(layer, heads, shape, pending, payload.size()));
  const uint64_t T = step + 1;
  if (pending > max_pending)
    return Status::InvalidArgument("pending_tokens " + std::to_string(pending) + " > the limit " +
                                   std::to_string(max_pending));
  if (pending > T) return Status::InvalidArgument("pending_tokens exceeds step + 1");
  out->length = length;  // rows past it come from the query or from earlier queries (TailRows)
  const size_t qbytes = heads.size() * shape.group_size() * size_t{shape.head_dim} * sizeof(float);
  out->q.resize(qbytes / sizeof(float));
  std::memcpy(out->q.data(), payload.data(), qbytes);
  out->pending = payload.data() + qbytes;
  out->pending_stride = size_t{pending} * shape.head_dim * DTypeSize(shape.dtype);
  return Status::Ok();
}

}  // namespace

RetrievalEngine::RetrievalEngine(store::BlockStore* store, RetrievalOptions opt, Metrics* metrics)
    : store_(store), opt_(std::move(opt)), metrics_(metrics) {}
RetrievalEngine::~RetrievalEngine() = default;

Status RetrievalEngine::Configure(const store::SeqRef& s, const wire::SelectorParams& p,
                                  uint32_t hot_set_slots) {
  KVM_ASSIGN_OR_RETURN(store::SeqInfo info, store_->Info(s));
  auto q = std::make_shared<Seq>();
  q->shape = info.shape;
  q->B = info.block_size;
  KVM_ASSIGN_OR_RETURN(q->sel, sel::FromWire(p, info.block_size));
  if (q->sel.options.geometry.window_tokens == 0)
    return Status::InvalidArgument("window_tokens: the service needs a recent window (>= 1)");
  KVM_ASSIGN_OR_RETURN(q->selector, sel::MakeSelector(q->sel.name, q->sel.options, info.shape,
                                                      /*max_context=*/UINT32_MAX));
  const uint64_t need = q->selector->HotSetSlots();
  if (hot_set_slots < need)
    return Status::InvalidArgument("hot_set_slots: " + std::to_string(hot_set_slots) +
                                   " blocks per (layer, KV head) is too small; selector " +
                                   q->sel.name + " with this budget needs " + std::to_string(need));
  const uint64_t entries = uint64_t{hot_set_slots} * info.shape.layers * info.shape.kv_heads;
  if (entries > kMaxMirrorEntries)
    return Status::InvalidArgument(
        "hot_set_slots: " + std::to_string(hot_set_slots) + " blocks per (layer, KV head) × " +
        std::to_string(info.shape.layers) + " layers × " + std::to_string(info.shape.kv_heads) +
        " KV heads = " + std::to_string(entries) + " slot-table entries, over the service's " +
        std::to_string(kMaxMirrorEntries) + " per sequence");
  q->slots = hot_set_slots;
  q->ResetMirrors();
  q->pending_k.resize(size_t{info.shape.layers} * info.shape.kv_heads);
  std::lock_guard<std::mutex> l(mu_);
  seqs_[Key(s)] = std::move(q);
  return Status::Ok();
}

Result<std::shared_ptr<RetrievalEngine::Seq>> RetrievalEngine::Find(const store::SeqRef& s) {
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = seqs_.find(Key(s));
    if (it != seqs_.end()) return it->second;
  }
  KVM_RETURN_IF_ERROR(store_->Info(s).status());  // NotFound for another tenant's sequence
  return Status::FailedPrecondition(
      "sequence " + std::to_string(s.id) +
      " has no selector state (created without selector params, or the service restarted): "
      "send CreateSequence with attach and the selector params");
}

Status RetrievalEngine::TakeKRows(const store::SeqRef& s, uint64_t pos,
                                  std::span<const uint32_t> which, uint8_t* rows) {
  KVM_ASSIGN_OR_RETURN(auto q, Find(s));
  std::lock_guard<std::mutex> l(q->mu);
  const size_t rb = q->row_bytes();
  for (size_t i = 0; i < which.size(); ++i) {
    if (which[i] >= q->pending_k.size())
      return Status::InvalidArgument("k_from_retrieval " + std::to_string(which[i]) +
                                     " out of range");
    const auto& held = q->pending_k[which[i]];
    auto it = held.find(pos);
    if (it == held.end())
      return Status::FailedPrecondition(
          "append: the K row of token " + std::to_string(pos) + " of layer " +
          std::to_string(which[i] / q->shape.kv_heads) + " KV head " +
          std::to_string(which[i] % q->shape.kv_heads) +
          " was left out, but no RetrieveLayer of that step carried it: send it in the payload");
    std::memcpy(rows + i * rb, it->second.data(), rb);
  }
  return Status::Ok();
}

Status RetrievalEngine::ReportWorkerStats(const store::SeqRef& s, const wire::WorkerStats& w) {
  if (!metrics_) return Status::Ok();
  KVM_ASSIGN_OR_RETURN(auto q, Find(s));
  if (w.gate_checks_size() > int(sel::kGateOutcomes.size()))
    return Status::InvalidArgument("worker stats: " + std::to_string(w.gate_checks_size()) +
                                   " gate outcomes, there are " +
                                   std::to_string(sel::kGateOutcomes.size()));
  for (int i = 0; i < w.gate_checks_size(); ++i)
    if (w.gate_checks(i))
      metrics_->AddGateChecks(sel::kGateOutcomes[size_t(i)], double(w.gate_checks(i)));
  for (const wire::DeltaCounts& d : w.delta()) {
    const std::vector<uint64_t> b(d.buckets().begin(), d.buckets().end());
    KVM_RETURN_IF_ERROR(metrics_->AddDeltaCounts(q->sel.name, static_cast<DeltaKind>(d.kind()), b,
                                                 d.sum(), d.over_target()));
  }
  return Status::Ok();
}

void RetrievalEngine::Forget(const store::SeqRef& s) {
  std::lock_guard<std::mutex> l(mu_);
  seqs_.erase(Key(s));
}

void RetrievalEngine::Reset(const store::SeqRef& s) {
  auto q = Find(s);
  if (!q.ok()) return;
  std::lock_guard<std::mutex> l((*q)->mu);
  auto fresh = sel::MakeSelector((*q)->sel.name, (*q)->sel.options, (*q)->shape, UINT32_MAX);
  if (fresh.ok()) (*q)->selector = std::move(*fresh);
  (*q)->ResetMirrors();
}

Status RetrievalEngine::SetLayerMap(const store::SeqRef& s, const std::vector<uint32_t>& source) {
  KVM_ASSIGN_OR_RETURN(auto q, Find(s));
  std::lock_guard<std::mutex> l(q->mu);
  sel::WorkerGate* gate = q->selector->gate();
  if (!gate)  // the map is kept (validated) by any selector with a gate, used with layer_sharing
    return Status::FailedPrecondition("set layer map: selector " + q->sel.name +
                                      " has no cross-layer sharing");
  return gate->SetLayerMap(source);
}

void ReplyBlocks::CopyTo(size_t first, size_t n, uint8_t* out) const {
  for (size_t i = 2 * first; i < 2 * (first + n); ++i, out += half_bytes)
    std::memcpy(out, halves[i], half_bytes);
}

Status RetrievalEngine::Retrieve(const store::SeqRef& s, const wire::RetrieveLayer& m,
                                 std::span<const uint8_t> payload, wire::RetrieveLayerReply* reply,
                                 ReplyBlocks* blocks) {
  const auto t0 = std::chrono::steady_clock::now();
  KVM_ASSIGN_OR_RETURN(auto q, Find(s));
  std::lock_guard<std::mutex> l(q->mu);
  const ModelShape& shape = q->shape;
  Queries in;
  KVM_RETURN_IF_ERROR(ParseQueries(store_, s, shape, m, opt_.max_pending_tokens, payload, &in));
  const std::vector<uint32_t>& heads = in.heads;
  if (m.hot_set_generation() < q->generation)
    return Status::FailedPrecondition("hot-set generation " +
                                      std::to_string(m.hot_set_generation()) + " is older than " +
                                      std::to_string(q->generation));
  if (m.hot_set_generation() > q->generation) {  // the worker lost its hot set
    q->generation = m.hot_set_generation();
    q->ResetMirrors();
  }
  const sel::Geometry& geo = q->sel.options.geometry;
  KVM_ASSIGN_OR_RETURN(BlockLayout layout, BlockLayout::Make(shape, q->B));
  const size_t bb = layout.kv_block_bytes();
  const uint64_t T = m.step() + 1;
  const uint32_t g = shape.group_size(), D = shape.head_dim;
  sel::WorkerGate* gate = q->selector->gate();
  const auto entry = sel::FindSelector(q->sel.name);
  const bool channel_bounds = !entry.ok() || (*entry)->caps.channel_bounds;
  reply->set_layer(m.layer());
  reply->set_hot_set_generation(q->generation);
  reply->set_part(0);
  reply->set_parts(1);
  *blocks = ReplyBlocks();
  blocks->half_bytes = bb;
  sel::PlanBytes bytes;
  double retrievals = 0;
  // Plans one (layer, KV head)'s selection against the mirror, reads the blocks to send into the
  // payload and describes it in the reply.
  auto emit = [&](uint32_t layer, uint32_t h, const sel::Selection& sel) -> Status {
    const size_t idx = q->index(layer, h);
    const uint64_t prev_first =
        q->local_first[idx] == kNoContact ? geo.WindowFirstBlock(T) : q->local_first[idx];
    sel::PlanStep plan;
    KVM_RETURN_IF_ERROR(q->mirrors[idx].Plan(sel.blocks, T, geo, prev_first, bb, layout.row_bytes(),
                                             &plan, &bytes));
    q->local_first[idx] = geo.WindowFirstBlock(T);
    q->Remember(idx, m.step());
    // The selection marked first (eviction order), so that bringing a block to send in from disk
    // never evicts another of it; then the blocks to send (all selected) pinned in the host tier
    // (promoted there if only on disk), K then V of each, for the send.
    KVM_RETURN_IF_ERROR(store_->MarkSelected(s, layer, h, sel.blocks));
    std::vector<uint64_t> sent;
    for (const auto& [b, slot] : plan.sends) sent.push_back(b);
    if (blocks->bytes() + sent.size() * 2 * bb > opt_.max_reply_bytes)
      return Status::OutOfRange("retrieve: the reply's blocks exceed " +
                                std::to_string(opt_.max_reply_bytes) + " bytes");
    if (!sent.empty()) {
      KVM_ASSIGN_OR_RETURN(store::PinnedBlocks pin, store_->Pin(s, layer, h, sent));
      for (size_t i = 0; i < sent.size(); ++i) {
        blocks->halves.push_back(pin.k()[i]);
        blocks->halves.push_back(pin.v()[i]);
      }
      blocks->pins.push_back(std::move(pin));
    }
    wire::HeadSelection* hs = reply->add_heads();
    hs->set_layer(layer);
    hs->set_kv_head(h);
    for (const auto& [b, slot] : plan.sends) {
      hs->add_block_indices(b);
      hs->add_slots(slot);
    }
    for (const auto& [b, slot] : plan.local_fills) {
      hs->add_local_fill_blocks(b);
      hs->add_local_fill_slots(slot);
    }
    for (uint32_t e : plan.evicted_slots) hs->add_evicted_slots(e);
    for (uint64_t b : sel.blocks) hs->add_resident_blocks(b);
    for (uint32_t j = 0; j < g; ++j) {
      const double d = j < sel.delta.size() ? sel.delta[j] : NAN;
      hs->add_delta(static_cast<float>(d));
      hs->add_log_delta(sel.LogDelta(j));
      if (metrics_ && sel.kind != DeltaKind::kUnknown)  // a selection with no δ of its own
        KVM_RETURN_IF_ERROR(
            metrics_->ObserveDelta(q->sel.name, sel.kind, d, q->sel.options.target_delta));
    }
    hs->set_delta_kind(static_cast<wire::DeltaKind>(sel.kind));
    hs->set_k_max(sel.k_max);
    hs->set_anchor_step(static_cast<uint32_t>(m.step()));
    hs->set_anchor(sel.anchor);
    hs->set_retrieved_heads(sel.retrieved_heads);
    hs->set_slot_digest(q->mirrors[idx].Digest());
    hs->set_key_radius(sel.key_radius);
    for (float x : sel.split_dir) hs->add_split_dir(x);
    for (float x : sel.dropped_radius) hs->add_dropped_radius(x);
    hs->set_reuse_steps(sel.reuse_steps);
    hs->set_window_first(plan.window_first);
    return Status::Ok();
  };
  // Layers that share this layer's index set (selectors.md §0.6) get their blocks in this batch,
  // before their queries exist: their selection is this layer's plus their own sinks and window.
  const std::vector<uint32_t> sharing =
      gate ? gate->SharingLayers(m.layer()) : std::vector<uint32_t>{};
  for (size_t i = 0; i < heads.size(); ++i) {
    const uint32_t h = heads[i];
    const float* qg = in.q.data() + i * g * D;
    std::vector<uint8_t> rows;  // the K rows past what the store held: [from, T)
    uint64_t from = 0;
    KVM_RETURN_IF_ERROR(q->TailRows(m.layer(), h, in.length, T, m.pending_tokens(),
                                    in.pending + i * in.pending_stride, &rows, &from));
    Head hd{store_, s, shape, q->B, m.layer(), h, T, static_cast<uint32_t>(T - from), rows.data()};
    hd.channel_bounds = channel_bounds;
    KVM_RETURN_IF_ERROR(hd.LoadSummaries());
    // A selector that takes scores asks for them only when it needs them (not for a short
    // context); the others read the keys.
    const bool takes_scores = q->selector->TakesScores();
    if (!takes_scores) KVM_RETURN_IF_ERROR(hd.LoadKeys());
    const std::function<Status(sel::GroupScores*)> score = [&](sel::GroupScores* out) {
      return hd.Score(qg, out);
    };
    // ... and the keys, when the selector wants them after scoring (PrHS's anchor statistics).
    const std::function<Result<const attn::HeadKV*>()> keys = [&]() -> Result<const attn::HeadKV*> {
      if (!hd.has_keys) KVM_RETURN_IF_ERROR(hd.LoadKeys());
      return &hd.kv;
    };
    sel::StepInput step_in{m.step(), m.layer(), h, qg, hd.has_keys ? &hd.kv : nullptr, &hd.sums};
    if (takes_scores) {
      step_in.score = &score;
      step_in.keys = &keys;
    }
    sel::Selection sel;
    KVM_RETURN_IF_ERROR(q->selector->Anchor(step_in, &sel));
    retrievals += sel.retrieved_heads;
    KVM_RETURN_IF_ERROR(emit(m.layer(), h, sel));
    for (uint32_t l : sharing)
      KVM_RETURN_IF_ERROR(emit(l, h, gate->SharedSelection(sel.blocks, T)));
  }
  for (uint32_t l : sharing) reply->add_shared_layers(l);
  if (metrics_) metrics_->AddRetrievals(retrievals);
  reply->set_service_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return Status::Ok();
}

Status RetrievalEngine::Audit(const store::SeqRef& s, const wire::Audit& m,
                              std::span<const uint8_t> payload, wire::AuditReply* reply) {
  KVM_ASSIGN_OR_RETURN(auto q, Find(s));
  std::lock_guard<std::mutex> l(q->mu);
  const ModelShape& shape = q->shape;
  Queries in;
  KVM_RETURN_IF_ERROR(ParseQueries(store_, s, shape, m, opt_.max_pending_tokens, payload, &in));
  const std::vector<uint32_t>& heads = in.heads;
  const sel::Geometry& geo = q->sel.options.geometry;
  const uint64_t T = m.step() + 1, nb = geo.Blocks(T);
  const uint32_t g = shape.group_size(), D = shape.head_dim;
  for (size_t i = 0; i < heads.size(); ++i) {
    const size_t idx = q->index(m.layer(), heads[i]);
    if (q->local_first[idx] == kNoContact)
      return Status::FailedPrecondition("audit: no retrieval yet for layer " +
                                        std::to_string(m.layer()) + " KV head " +
                                        std::to_string(heads[i]));
    const Seq::ResidentAt* at = q->ResidentFor(idx, m.step());
    if (!at)
      return Status::FailedPrecondition(
          "audit of step " + std::to_string(m.step()) + ": layer " + std::to_string(m.layer()) +
          " KV head " + std::to_string(heads[i]) + " was retrieved again " +
          std::to_string(kResidentHistory) + " times since; its resident set then is gone");
    // The worker's resident set at that step: its hot set + the sinks + what it holds locally.
    std::vector<uint64_t> resident;
    for (uint64_t b : at->slots)
      if (b != sel::kEmptySlot && b < nb) resident.push_back(b);
    std::sort(resident.begin(), resident.end());
    sel::AddRange(0, geo.SinkBlocks(T), &resident);
    sel::AddRange(std::min(at->local_first, nb), nb, &resident);
    std::vector<uint8_t> rows;
    uint64_t from = 0;
    KVM_RETURN_IF_ERROR(q->TailRows(m.layer(), heads[i], in.length, T, m.pending_tokens(),
                                    in.pending + i * in.pending_stride, &rows, &from));
    Head hd{store_,     s, shape, q->B, m.layer(), heads[i], T, static_cast<uint32_t>(T - from),
            rows.data()};
    sel::GroupScores gs;
    KVM_RETURN_IF_ERROR(hd.Score(in.q.data() + i * g * D, &gs));
    for (double d : sel::DeltaOf(gs, resident)) {
      reply->add_delta(static_cast<float>(d));
      if (metrics_)
        KVM_RETURN_IF_ERROR(
            metrics_->ObserveDelta(q->sel.name, DeltaKind::kAudit, d, q->sel.options.target_delta));
    }
  }
  return Status::Ok();
}

Status RetrievalEngine::Correct(const store::SeqRef& s, const wire::Correct& m,
                                std::span<const uint8_t> payload, wire::CorrectReply* reply,
                                std::vector<uint8_t>* out) {
  const auto t0 = std::chrono::steady_clock::now();
  KVM_ASSIGN_OR_RETURN(const store::SeqInfo info, store_->Info(s));
  const ModelShape& shape = info.shape;
  const uint32_t B = info.block_size, g = shape.group_size(), D = shape.head_dim;
  std::vector<uint32_t> heads;
  for (const wire::CorrectHead& h : m.heads()) heads.push_back(h.kv_head());
  KVM_RETURN_IF_ERROR(wire::ValidateQueries(m.layer(), heads, shape, 0, payload.size()));
  if (m.step() >= info.length + opt_.max_pending_tokens + 1)
    return Status::InvalidArgument("correct: step " + std::to_string(m.step()) + " is past the " +
                                   std::to_string(info.length) + " stored tokens");
  const uint64_t T = m.step() + 1, nb = (T + B - 1) / B;
  const float* q = reinterpret_cast<const float*>(payload.data());
  KVM_RETURN_IF_ERROR(store_->SetValuesRead(s));  // V is read here as much as K: keep it as long
  out->assign(heads.size() * g * (2 + D) * sizeof(float), 0);
  float* o = reinterpret_cast<float*>(out->data());
  std::vector<uint64_t> left;  // the complement of one head's attended blocks
  uint64_t total = 0;
  for (size_t i = 0; i < heads.size(); ++i) {
    const auto& att = m.heads(int(i)).attended();
    left.clear();
    uint64_t next = 0;
    for (int j = 0; j < att.size(); ++j) {
      if (att[j] >= nb || (j > 0 && att[j] <= att[j - 1]))
        return Status::InvalidArgument("correct: KV head " + std::to_string(heads[i]) +
                                       ": attended blocks must be ascending and below " +
                                       std::to_string(nb));
      for (; next < att[j]; ++next) left.push_back(next);
      next = uint64_t{att[j]} + 1;
    }
    for (; next < nb; ++next) left.push_back(next);
    float* st = o + i * g * (2 + D);
    if (left.empty()) {  // nothing left out: an empty state per query head
      for (uint32_t j = 0; j < g; ++j) st[j * (2 + D)] = -std::numeric_limits<float>::infinity();
      continue;
    }
    if (std::min(T, (left.back() + 1) * B) > info.length)
      return Status::FailedPrecondition("correct: block " + std::to_string(left.back()) +
                                        " is not stored yet (" + std::to_string(info.length) +
                                        " tokens stored); the worker must attend its tail");
    // Attended in place: the complement's K and V held in their host-tier slots, not copied.
    KVM_ASSIGN_OR_RETURN(const store::PinnedBlocks pin, store_->Pin(s, m.layer(), heads[i], left));
    std::vector<uint16_t> rows(left.size());
    for (size_t b = 0; b < left.size(); ++b)
      rows[b] = static_cast<uint16_t>(std::min<uint64_t>(pin.rows()[b], T - left[b] * B));
    std::vector<float> res(size_t{g} * D), state(size_t{g} * 2);
    attn::DecodeParams p;
    p.q = q + i * g * D;
    p.out = res.data();
    p.kv_heads = 1;
    p.group = g;
    p.head_dim = D;
    p.block_size = B;
    p.dtype = shape.dtype;
    p.k_blocks = pin.k();
    p.v_blocks = pin.v();
    const uint32_t n = static_cast<uint32_t>(left.size());
    p.n_blocks = &n;
    p.max_blocks = n;
    p.rows = rows.data();
    p.state = state.data();
    KVM_RETURN_IF_ERROR(attn::DecodeCpu(p));
    for (uint32_t j = 0; j < g; ++j) {
      st[j * (2 + D)] = state[2 * j];
      st[j * (2 + D) + 1] = state[2 * j + 1];
      std::memcpy(st + j * (2 + D) + 2, res.data() + size_t{j} * D, D * sizeof(float));
    }
    total += left.size();
  }
  reply->set_blocks(total);
  reply->set_service_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return Status::Ok();
}

}  // namespace kvm::server
