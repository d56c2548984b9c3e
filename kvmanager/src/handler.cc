#include "kvmanager/handler.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <optional>

#include "kvmanager/metrics.h"
#include "proto/kvm.pb.h"

namespace kvm::server {
namespace {

// The K row bytes a RetrieveLayer / Audit carried (its pending rows; the payload was validated).
template <typename Msg>
double PendingRowBytes(const store::SeqInfo& info, const Msg& m) {
  return double(uint64_t(m.kv_heads_size()) * m.pending_tokens() * info.shape.head_dim *
                DTypeSize(info.shape.dtype));
}

std::vector<uint8_t> ErrorFrame(uint64_t id, const Status& s) {
  wire::Error e;
  e.set_code(static_cast<wire::ErrorCode>(s.code()));
  e.set_message(s.message());
  return wire::EncodeFrame(static_cast<uint16_t>(wire::MessageType::kError), id, e);
}

store::Durability FromWire(wire::Durability d) {
  return d == wire::CACHE ? store::Durability::kCache : store::Durability::kDurable;
}

uint64_t NowNs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

bool TokenEquals(std::string_view expected, std::string_view given) {
  // Time depends on expected.size() only (and on given.size(), which the caller knows anyway).
  volatile uint8_t diff = expected.size() != given.size();
  uint8_t acc = 0;
  for (size_t i = 0; i < expected.size(); ++i)
    acc |= uint8_t(expected[i]) ^ uint8_t(i < given.size() ? given[i] : 0);
  diff = diff | acc;
  return diff == 0;
}

RequestHandler::RequestHandler(store::BlockStore* store, HandlerOptions opt)
    : store_(store), opt_(std::move(opt)) {
  tenants_ = std::make_shared<const std::vector<TenantConfig>>(opt_.tenants);
  RetrievalOptions ro;
  ro.max_reply_bytes = opt_.limits.max_frame_bytes / 2;  // room for the header of a big reply
  engine_ = std::make_unique<RetrievalEngine>(store_, ro, opt_.metrics);
}

Result<uint64_t> RequestHandler::ExpireLeases() {
  KVM_ASSIGN_OR_RETURN(const std::vector<store::SeqRef> expired, store_->ExpireLeases());
  for (const store::SeqRef& s : expired) engine_->Forget(s);
  return expired.size();
}

void RequestHandler::SetTenants(std::vector<TenantConfig> tenants) {
  auto t = std::make_shared<const std::vector<TenantConfig>>(std::move(tenants));
  std::lock_guard<std::mutex> l(tenants_mu_);
  tenants_ = std::move(t);
}

std::map<std::string, store::TenantQuota> StoreQuotas(const std::vector<TenantConfig>& tenants) {
  std::map<std::string, store::TenantQuota> q;
  for (const TenantConfig& t : tenants)
    if (t.max_sequences || t.max_stored_bytes) q[t.name] = {t.max_sequences, t.max_stored_bytes};
  return q;
}

void RequestHandler::ClosePeer(SessionState& s) {
  if (s.data_peer && opt_.data_plane) opt_.data_plane->Disconnect(s.data_peer);
  s.data_peer = 0;
}

void RequestHandler::Close(SessionState& s) {
  ClosePeer(s);
  if (s.connection_of.empty()) return;
  std::lock_guard<std::mutex> l(connections_mu_);
  auto it = connections_.find(s.connection_of);
  if (it != connections_.end() && --it->second == 0) connections_.erase(it);
  s.connection_of.clear();
}

Status RequestHandler::TakeConnection(SessionState& s, const TenantConfig& t) {
  if (s.connection_of == t.name) return Status::Ok();  // a second Hello as the same tenant
  std::lock_guard<std::mutex> l(connections_mu_);
  uint32_t& n = connections_[t.name];
  if (t.max_connections && n >= t.max_connections)  // n >= 1: the entry existed
    return Status::Busy(
        "tenant '" + t.name + "' is at its max_connections limit: " + std::to_string(n) +
        " sessions open (max_connections " + std::to_string(t.max_connections) + ")");
  ++n;
  if (!s.connection_of.empty()) {
    auto it = connections_.find(s.connection_of);
    if (it != connections_.end() && --it->second == 0) connections_.erase(it);
  }
  s.connection_of = t.name;
  return Status::Ok();
}

Status SendReply(transport::Transport& dp, uint64_t peer, uint64_t request_id,
                 const wire::RetrieveLayerReply& r, ReplyBlocks blocks, ReplySends how,
                 std::function<void(const Status&)> done) {
  KVM_ASSIGN_OR_RETURN(std::vector<wire::DataPart> parts,
                       wire::SplitReply(r, request_id, dp.max_header_bytes()));
  // What the sends share until the last completes: the blocks (pinned in the store until then),
  // the copies a copying send made of them, the first error.
  struct Sending {
    ReplyBlocks blocks;
    std::vector<std::unique_ptr<uint8_t[]>> copies;  // not zero-filled: every byte is copied
    std::mutex mu;
    size_t left = 0;
    Status error;
    std::function<void(const Status&)> done;
  };
  auto st = std::make_shared<Sending>();
  st->blocks = std::move(blocks);
  st->left = parts.size();
  st->done = std::move(done);
  auto finished = [st](const Status& result) {
    std::function<void(const Status&)> done;
    Status err;
    ReplyBlocks pinned;  // unpinned here, before `done` (not whenever the last copy of st goes)
    {
      std::lock_guard<std::mutex> l(st->mu);
      if (!result.ok() && st->error.ok()) st->error = result;
      if (--st->left > 0) return;
      done = std::move(st->done);
      err = st->error;
      pinned = std::move(st->blocks);
      st->copies.clear();
    }
    pinned = ReplyBlocks();
    done(err);
  };
  const bool gather =
      how == ReplySends::kGather || (how == ReplySends::kAuto && dp.GatherPays(peer));
  size_t first = 0;  // the part's first block
  for (const wire::DataPart& p : parts) {
    const size_t n = wire::PartBlocks(p).size();
    const std::string header = p.SerializeAsString();
    const std::span<const uint8_t> head{reinterpret_cast<const uint8_t*>(header.data()),
                                        header.size()};
    Status sent;
    if (gather) {
      std::vector<transport::Segment> segs;
      for (size_t i = 2 * first; i < 2 * (first + n); ++i)
        segs.push_back({const_cast<void*>(st->blocks.halves[i]), st->blocks.half_bytes});
      sent = dp.SendGather(peer, head, segs, finished);
    } else {
      const size_t bytes = n * 2 * st->blocks.half_bytes;
      auto buffer = std::make_unique_for_overwrite<uint8_t[]>(bytes);
      uint8_t* copy = buffer.get();
      {
        std::lock_guard<std::mutex> l(st->mu);
        st->copies.push_back(std::move(buffer));
      }
      st->blocks.CopyTo(first, n, copy);
      sent = dp.Send(peer, head, {copy, bytes}, finished);
    }
    if (!sent.ok()) finished(sent);  // this part never goes: the request fails at once
    first += n;
  }
  return Status::Ok();
}

void RequestHandler::SendParts(const SessionState& s, uint64_t request_id,
                               wire::RetrieveLayerReply r, ReplyBlocks blocks, Reply done) {
  // The resident blocks before the window are the slot table's (the worker has it): only the
  // window's travel.
  for (auto& h : *r.mutable_heads()) {
    std::vector<uint64_t> window;
    for (uint64_t b : h.resident_blocks())
      if (b >= h.window_first()) window.push_back(b);
    h.clear_resident_blocks();
    for (uint64_t b : window) h.add_resident_blocks(b);
  }
  Metrics* metrics = opt_.metrics;
  const Status split = SendReply(*opt_.data_plane, s.data_peer, request_id, r, std::move(blocks),
                                 opt_.reply_sends, [request_id, metrics, done](const Status& err) {
                                   if (err.ok()) return done({});
                                   if (metrics) metrics->CountError(err.code());
                                   done(ErrorFrame(request_id, err.WithContext("data plane send")));
                                 });
  if (!split.ok()) {
    if (metrics) metrics->CountError(split.code());
    done(ErrorFrame(request_id, split));
  }
}

Status RequestHandler::RestoreKRows(const SessionState& s, const wire::Append& m,
                                    std::span<const uint8_t> in, std::vector<uint8_t>* out) {
  const store::SeqRef ref{s.tenant, m.sequence_id()};
  KVM_ASSIGN_OR_RETURN(store::SeqInfo info, store_->Info(ref));
  KVM_RETURN_IF_ERROR(wire::ValidateAppend(m, info.shape, in.size()));
  const uint64_t n = uint64_t(m.token_ids_size()), last = m.start_position() + n - 1;
  const size_t rb = size_t{info.shape.head_dim} * DTypeSize(info.shape.dtype);
  const std::vector<uint32_t> which(m.k_from_retrieval().begin(), m.k_from_retrieval().end());
  std::vector<uint8_t> rows(which.size() * rb);
  KVM_RETURN_IF_ERROR(engine_->TakeKRows(ref, last, which, rows.data()));
  // [layer][kv_head][K,V][n][D]: the K section of a listed (layer, KV head) lacks its last row.
  out->resize(wire::AppendPayloadBytes(info.shape, n));
  std::vector<int64_t> slot(size_t{info.shape.layers} * info.shape.kv_heads, -1);
  for (size_t i = 0; i < which.size(); ++i) slot[which[i]] = int64_t(i);
  const uint8_t* src = in.data();
  uint8_t* dst = out->data();
  for (size_t lh = 0; lh < slot.size(); ++lh) {
    const size_t k_rows = slot[lh] >= 0 ? n - 1 : n;
    std::memcpy(dst, src, k_rows * rb);
    src += k_rows * rb;
    dst += k_rows * rb;
    if (slot[lh] >= 0) {
      std::memcpy(dst, rows.data() + size_t(slot[lh]) * rb, rb);
      dst += rb;
    }
    std::memcpy(dst, src, n * rb);  // V
    src += n * rb;
    dst += n * rb;
  }
  return Status::Ok();
}

double RequestHandler::CarriedRowBytes(const store::SeqRef& s, const wire::RetrieveLayer& m) const {
  auto info = store_->Info(s);
  return info.ok() ? PendingRowBytes(*info, m) : 0.0;
}
double RequestHandler::CarriedRowBytes(const store::SeqRef& s, const wire::Audit& m) const {
  auto info = store_->Info(s);
  return info.ok() ? PendingRowBytes(*info, m) : 0.0;
}

void RequestHandler::ReportStats(const store::SeqRef& s, const wire::WorkerStats* w) {
  if (!w || !opt_.metrics) return;
  // A report never fails the message it rides on; a malformed one is counted as an error.
  if (Status st = engine_->ReportWorkerStats(s, *w); !st.ok()) opt_.metrics->CountError(st.code());
}

RequestClass RequestHandler::Classify(const wire::Frame& f) {
  using wire::MessageType;
  auto seq = [&](auto msg, RequestClass::Kind kind, bool append = false) {
    if (!wire::ParseProto(f, &msg).ok()) return RequestClass{};  // answered with the parse error
    return RequestClass{kind, msg.sequence_id(), append};
  };
  switch (static_cast<MessageType>(f.header.type)) {
    case MessageType::kHello:
    case MessageType::kListSequences:
    case MessageType::kStats:
    case MessageType::kPrefixLookup:
      return {RequestClass::kBarrier};
    case MessageType::kHeartbeat:
      return {RequestClass::kFree};
    case MessageType::kCreateSequence:
      return seq(wire::CreateSequence(), RequestClass::kSequence);
    case MessageType::kAppend:
      return seq(wire::Append(), RequestClass::kSequence, /*append=*/true);
    case MessageType::kTruncate:
      return seq(wire::Truncate(), RequestClass::kSequence);
    case MessageType::kDeleteSequence:
      return seq(wire::DeleteSequence(), RequestClass::kSequence);
    case MessageType::kSetLayerMap:
      return seq(wire::SetLayerMap(), RequestClass::kSequence);
    case MessageType::kReadBlocks:
      return seq(wire::ReadBlocks(), RequestClass::kSequence);
    case MessageType::kRetrieveLayer:
      return seq(wire::RetrieveLayer(), RequestClass::kOvertake);
    case MessageType::kAudit:
      return seq(wire::Audit(), RequestClass::kOvertake);
    case MessageType::kCorrect:  // reads stored blocks only: may overtake the step's Append
      return seq(wire::Correct(), RequestClass::kOvertake);
    default:
      return {RequestClass::kFree};
  }
}

void RequestHandler::Handle(SessionState& s, const wire::Frame& f, Reply reply) {
  const auto t0 = std::chrono::steady_clock::now();
  const uint16_t type = f.header.type;
  Metrics* metrics = opt_.metrics;
  // Times the request to its reply (a data-plane retrieval: until its sends completed).
  Reply finish = [metrics, type, t0, reply = std::move(reply)](std::vector<uint8_t> frame) {
    if (metrics) {  // OpName names every type ("other" for unknown ones): an error is a bug
      const Status m = metrics->ObserveRequest(
          Metrics::OpName(type),
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (!m.ok()) std::fprintf(stderr, "kvmanager: request metrics: %s\n", m.ToString().c_str());
    }
    reply(std::move(frame));
  };
  std::vector<uint8_t> out;
  bool deferred = false;
  const Status st = Dispatch(s, f, &out, finish, &deferred);
  if (!st.ok()) {
    if (metrics) metrics->CountError(st.code());
    return finish(ErrorFrame(f.header.request_id, st));
  }
  if (!deferred) finish(std::move(out));
}

std::vector<uint8_t> RequestHandler::Handle(SessionState& s, const wire::Frame& f) {
  std::promise<std::vector<uint8_t>> p;
  auto got = p.get_future();
  Handle(s, f, [&p](std::vector<uint8_t> frame) { p.set_value(std::move(frame)); });
  return got.get();
}

Status RequestHandler::Dispatch(SessionState& s, const wire::Frame& f, std::vector<uint8_t>* reply,
                                const Reply& deferred, bool* is_deferred) {
  using wire::MessageType;
  const uint64_t id = f.header.request_id;
  const auto type = static_cast<MessageType>(f.header.type);
  if (f.header.type & wire::kReplyBit || type == MessageType::kError)
    return Status::InvalidArgument(std::string("a client sent a ") +
                                   wire::MessageTypeName(f.header.type));
  auto send = [&](const google::protobuf::MessageLite& m, std::span<const uint8_t> payload = {}) {
    *reply = wire::EncodeFrame(wire::ReplyType(type), id, m, payload);
    return Status::Ok();
  };
  if (type == MessageType::kHello) {
    wire::Hello h;
    KVM_RETURN_IF_ERROR(wire::ParseProto(f, &h));
    KVM_RETURN_IF_ERROR(wire::CheckHello(h));
    // The tenant's name is not secret; its token is compared in constant time (TokenEquals), and
    // every refusal counts (the server slows down the next ones from the same address).
    s.auth_failed = false;
    const TenantConfig* found = nullptr;
    std::shared_ptr<const std::vector<TenantConfig>> tenants;
    {
      std::lock_guard<std::mutex> l(tenants_mu_);
      tenants = tenants_;
    }
    for (const auto& t : *tenants)
      if (t.name == h.tenant()) found = &t;
    const bool token_ok = found && TokenEquals(found->token, h.auth_token());
    if (!token_ok || (found->loopback_only && !s.loopback)) {
      s.auth_failed = true;
      if (opt_.metrics) opt_.metrics->CountAuthFailure();
      if (!token_ok) return Status::Unauthenticated("wrong tenant or token");
      return Status::PermissionDenied("tenant '" + found->name +
                                      "' is accepted from loopback addresses only");
    }
    {
      const TenantConfig& t = *found;
      if (Status limit = TakeConnection(s, t); !limit.ok()) {
        if (opt_.metrics) opt_.metrics->CountConnectionRefused(ConnectionLimit::kPerTenant);
        return limit;
      }
      s.authenticated = true;
      s.tenant = t.name;
      s.session_id = next_session_++;
      wire::HelloReply r;
      r.set_protocol_version(wire::kProtocolVersion);
      r.set_server_id(opt_.server_id);
      r.set_max_frame_bytes(opt_.limits.max_frame_bytes);
      r.set_session_id(s.session_id);
      r.set_heartbeat_interval_ms(opt_.heartbeat_interval_ms);
      ClosePeer(s);  // a second Hello replaces the session's data-plane endpoint
      if (opt_.data_plane && !h.ucx_worker_address().empty()) {
        const std::string& a = h.ucx_worker_address();
        auto peer =
            opt_.data_plane->Connect({reinterpret_cast<const uint8_t*>(a.data()), a.size()});
        if (peer.ok()) {  // otherwise the blocks travel in reply frames (TCP)
          s.data_peer = *peer;
          const auto mine = opt_.data_plane->address();
          r.set_ucx_worker_address(std::string(mine.begin(), mine.end()));
        }
      }
      return send(r);
    }
  }
  if (!s.authenticated) return Status::Unauthenticated("send Hello with a valid token first");
  auto ref = [&](uint64_t seq) { return store::SeqRef{s.tenant, seq}; };
  switch (type) {
    case MessageType::kCreateSequence: {
      wire::CreateSequence m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      KVM_ASSIGN_OR_RETURN(ModelShape shape, wire::FromWire(m.shape()));
      const store::SeqRef sr = ref(m.sequence_id());
      if (m.attach() && (m.prefix_token_ids_size() > 0 || m.lease_ms() > 0))
        return Status::InvalidArgument(
            "attach takes the sequence as stored: no prefix_token_ids or lease_ms");
      if (m.attach()) {  // an existing sequence of the same shape and layout
        KVM_ASSIGN_OR_RETURN(store::SeqInfo info, store_->Info(sr));
        if (!(info.shape == shape) || info.block_size != m.block_size())
          return Status::FailedPrecondition(
              "attach: sequence " + std::to_string(m.sequence_id()) + " is stored as " +
              info.shape.ToString() + " B " + std::to_string(info.block_size) +
              ", the request says " + shape.ToString() + " B " + std::to_string(m.block_size()));
      } else {
        constexpr uint64_t kMaxLeaseMs = uint64_t{365} * 24 * 3600 * 1000;
        if (m.lease_ms() > kMaxLeaseMs)
          return Status::InvalidArgument("lease_ms " + std::to_string(m.lease_ms()) +
                                         " is over a year");
        const std::vector<uint32_t> prefix(m.prefix_token_ids().begin(),
                                           m.prefix_token_ids().end());
        KVM_RETURN_IF_ERROR(store_
                                ->CreateFromPrefix(sr, shape, m.block_size(),
                                                   FromWire(m.durability()),
                                                   static_cast<int64_t>(m.lease_ms()), prefix)
                                .status());
        // A new sequence has no selector state but what this request configures: not that of an
        // earlier one of this id whose lease ran out (the store deleted it without the engine).
        engine_->Forget(sr);
      }
      if (m.has_selector()) {
        Status st = engine_->Configure(sr, m.selector(), m.hot_set_slots());
        if (!st.ok()) {
          if (!m.attach()) (void)store_->Delete(sr);  // never acknowledged: roll back
          return st;
        }
      }
      KVM_ASSIGN_OR_RETURN(uint64_t length, store_->Length(sr));
      wire::CreateSequenceReply r;
      r.set_sequence_id(m.sequence_id());
      r.set_length(length);
      return send(r);
    }
    case MessageType::kAppend: {
      wire::Append m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      std::vector<uint32_t> tokens(m.token_ids().begin(), m.token_ids().end());
      std::vector<uint8_t> full;  // K once: the rows that step's RetrieveLayers carried put back
      if (m.k_from_retrieval_size() > 0) KVM_RETURN_IF_ERROR(RestoreKRows(s, m, f.payload, &full));
      const store::SeqRef sr = ref(m.sequence_id());
      // Dense-equivalent bytes (DESIGN.md §8) need the length before the append: only for the
      // decode appends of a handler that exports metrics (no extra store lookup otherwise).
      std::optional<store::SeqInfo> before;
      if (opt_.metrics && m.decode()) {
        KVM_ASSIGN_OR_RETURN(before, store_->Info(sr));
      }
      KVM_ASSIGN_OR_RETURN(uint64_t len, store_->Append(sr, m.start_position(), tokens,
                                                        m.k_from_retrieval_size() > 0
                                                            ? std::span<const uint8_t>(full)
                                                            : std::span<const uint8_t>(f.payload)));
      if (opt_.metrics) {
        opt_.metrics->AddStreamBytes(Direction::kFromWorker, Link::kTcp, double(f.payload.size()));
        // A dense offload moves all T = p + 1 tokens of every layer and KV head at each new decode
        // position p in [a, len): Σ (p + 1) = (len (len + 1) − a (a + 1)) / 2 tokens.
        if (before) {
          const ModelShape& sh = before->shape;
          const double per_token =
              2.0 * sh.layers * sh.kv_heads * sh.head_dim * DTypeSize(sh.dtype);
          const double a = double(std::max(m.start_position(), before->length)), b = double(len);
          if (b > a)
            opt_.metrics->AddDenseEquivalentBytes(per_token * (b * (b + 1) - a * (a + 1)) / 2);
        }
      }
      ReportStats(sr, m.has_stats() ? &m.stats() : nullptr);
      wire::AppendReply r;
      r.set_length(len);
      return send(r);
    }
    case MessageType::kPrefixLookup: {
      wire::PrefixLookup m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      KVM_ASSIGN_OR_RETURN(ModelShape shape, wire::FromWire(m.shape()));
      std::vector<uint32_t> tokens(m.token_ids().begin(), m.token_ids().end());
      KVM_ASSIGN_OR_RETURN(uint64_t n,
                           store_->PrefixLookup(s.tenant, shape, m.block_size(), tokens));
      wire::PrefixLookupReply r;
      r.set_matched_tokens(n);
      return send(r);
    }
    case MessageType::kTruncate: {
      wire::Truncate m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      KVM_RETURN_IF_ERROR(store_->Truncate(ref(m.sequence_id()), m.length()));
      engine_->Reset(ref(m.sequence_id()));
      wire::TruncateReply r;
      r.set_length(m.length());
      return send(r);
    }
    case MessageType::kReadBlocks: {
      wire::ReadBlocks m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      KVM_ASSIGN_OR_RETURN(store::SeqInfo info, store_->Info(ref(m.sequence_id())));
      const size_t block_bytes =
          size_t{info.block_size} * info.shape.head_dim * DTypeSize(info.shape.dtype);
      std::vector<uint8_t> payload;
      if (uint64_t(m.block_indices_size()) * block_bytes > opt_.limits.max_frame_bytes)
        return Status::OutOfRange("read blocks: the reply would exceed the frame limit");
      payload.resize(size_t(m.block_indices_size()) * block_bytes);
      for (int i = 0; i < m.block_indices_size(); ++i)
        KVM_RETURN_IF_ERROR(
            store_->ReadBlock(ref(m.sequence_id()), {m.layer(), m.kv_head(), m.block_indices(i)},
                              m.values(), {payload.data() + size_t(i) * block_bytes, block_bytes}));
      wire::ReadBlocksReply r;
      r.set_block_size(info.block_size);
      return send(r, payload);
    }
    case MessageType::kDeleteSequence: {
      wire::DeleteSequence m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      ReportStats(ref(m.sequence_id()), m.has_stats() ? &m.stats() : nullptr);  // its last report
      KVM_RETURN_IF_ERROR(store_->Delete(ref(m.sequence_id())));
      engine_->Forget(ref(m.sequence_id()));
      return send(wire::DeleteSequenceReply());
    }
    case MessageType::kListSequences: {
      wire::ListSequencesReply r;
      for (const auto& info : store_->List(s.tenant)) {
        auto* si = r.add_sequences();
        si->set_sequence_id(info.id);
        si->set_length(info.length);
        wire::ToWire(info.shape, si->mutable_shape());
      }
      return send(r);
    }
    case MessageType::kStats: {
      const store::StoreStats st = store_->Stats();
      wire::StatsReply r;
      r.set_json("{\"host_slots_used\": " + std::to_string(st.host_slots_used) +
                 ", \"host_slots\": " + std::to_string(st.host_slots) + ", \"spills\": " +
                 std::to_string(st.spills) + ", \"promotions\": " + std::to_string(st.promotions) +
                 ", \"shared_blocks\": " + std::to_string(st.shared_blocks) + ", \"gpu_tier\": \"" +
                 st.gpu_tier + "\", \"data_plane\": \"" +
                 (s.data_peer ? std::string(opt_.data_plane->name()) : "tcp") +
                 "\", \"data_plane_lanes\": \"" +
                 (s.data_peer ? opt_.data_plane->Describe(s.data_peer) : "") + "\"}");
      return send(r);
    }
    case MessageType::kHeartbeat: {
      wire::Heartbeat m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      for (const wire::WorkerStats& w : m.stats()) ReportStats(ref(w.sequence_id()), &w);
      wire::HeartbeatReply r;
      for (uint64_t id : m.renew_sequences())
        if (store_->Touch(ref(id)).IsNotFound()) r.add_not_found(id);
      r.set_server_time_ns(NowNs());
      return send(r);
    }
    case MessageType::kRetrieveLayer: {
      wire::RetrieveLayer m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      wire::RetrieveLayerReply r;
      ReplyBlocks blocks;
      KVM_RETURN_IF_ERROR(engine_->Retrieve(ref(m.sequence_id()), m, f.payload, &r, &blocks));
      if (opt_.metrics) {
        KVM_ASSIGN_OR_RETURN(const Link link,
                             LinkFromName(s.data_peer ? opt_.data_plane->name() : "tcp"));
        opt_.metrics->AddStreamBytes(Direction::kToWorker, link, double(blocks.bytes()));
        opt_.metrics->AddStreamBytes(Direction::kFromWorker, Link::kTcp,
                                     CarriedRowBytes(ref(m.sequence_id()), m));  // pending K rows
      }
      if (s.data_peer) {  // the active messages are the reply
        *is_deferred = true;
        SendParts(s, id, std::move(r), std::move(blocks), deferred);
        return Status::Ok();
      }
      std::vector<uint8_t> payload(blocks.bytes());  // in the reply frame: a copy
      blocks.CopyTo(0, blocks.blocks(), payload.data());
      return send(r, payload);
    }
    case MessageType::kSetLayerMap: {
      wire::SetLayerMap m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      KVM_RETURN_IF_ERROR(engine_->SetLayerMap(ref(m.sequence_id()),
                                               {m.source_layer().begin(), m.source_layer().end()}));
      return send(wire::SetLayerMapReply());
    }
    case MessageType::kAudit: {
      wire::Audit m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      wire::AuditReply r;
      KVM_RETURN_IF_ERROR(engine_->Audit(ref(m.sequence_id()), m, f.payload, &r));
      if (opt_.metrics)
        opt_.metrics->AddStreamBytes(Direction::kFromWorker, Link::kTcp,
                                     CarriedRowBytes(ref(m.sequence_id()), m));
      return send(r);
    }
    case MessageType::kCorrect: {
      wire::Correct m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      wire::CorrectReply r;
      std::vector<uint8_t> states;
      KVM_RETURN_IF_ERROR(engine_->Correct(ref(m.sequence_id()), m, f.payload, &r, &states));
      return send(r, states);
    }
    default:
      return Status::InvalidArgument("unexpected message type");
  }
}

}  // namespace kvm::server
