#include "kvmanager/handler.h"

#include <chrono>
#include <cstring>

#include "kvmanager/metrics.h"
#include "proto/kvm.pb.h"

namespace kvm::server {
namespace {

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

RequestHandler::RequestHandler(store::BlockStore* store, HandlerOptions opt)
    : store_(store), opt_(std::move(opt)) {
  RetrievalOptions ro;
  ro.max_reply_bytes = opt_.limits.max_frame_bytes / 2;  // room for the header of a big reply
  engine_ = std::make_unique<RetrievalEngine>(store_, ro, opt_.metrics);
}

void RequestHandler::Close(SessionState& s) {
  if (s.data_peer && opt_.data_plane) opt_.data_plane->Disconnect(s.data_peer);
  s.data_peer = 0;
}

Result<uint32_t> RequestHandler::SendBlocks(const SessionState& s, uint64_t request_id,
                                            const wire::RetrieveLayerReply& r,
                                            std::vector<uint8_t> blocks) {
  // (layer, placement) of every sent block, in payload order.
  std::vector<std::pair<uint32_t, wire::BlockPlacement>> where;
  for (const auto& h : r.heads())
    for (int i = 0; i < h.slots_size(); ++i)
      where.push_back({h.layer(), {h.kv_head(), h.slots(i)}});
  if (where.empty()) return 0u;
  const size_t per_block = blocks.size() / where.size();
  const size_t max_h = opt_.data_plane->max_header_bytes();
  if (max_h < wire::kBlocksHeaderFixedBytes + wire::kBlocksHeaderBytesPerBlock)
    return Status::Internal("data plane header limit too small");
  const size_t per_part =
      (max_h - wire::kBlocksHeaderFixedBytes) / wire::kBlocksHeaderBytesPerBlock;
  auto data = std::make_shared<std::vector<uint8_t>>(std::move(blocks));  // alive until sent
  uint32_t parts = 0;
  for (size_t first = 0; first < where.size(); ++parts) {
    // One message per layer, each header within the limit.
    wire::BlocksHeader h{request_id, where[first].first, {}};
    size_t n = 0;
    while (first + n < where.size() && n < per_part && where[first + n].first == h.layer)
      h.blocks.push_back(where[first + n++].second);
    KVM_RETURN_IF_ERROR(opt_.data_plane->Send(
        s.data_peer, wire::EncodeBlocksHeader(h), {data->data() + first * per_block, n * per_block},
        [data](const Status&) {}));  // a failed send shows as a missing part at the worker
    first += n;
  }
  return parts;
}

std::vector<uint8_t> RequestHandler::Handle(SessionState& s, const wire::Frame& f) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<uint8_t> reply;
  Status st = Dispatch(s, f, &reply);
  if (opt_.metrics) {
    opt_.metrics->ObserveRequest(
        Metrics::OpName(f.header.type),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (!st.ok()) opt_.metrics->CountError(st.code());
  }
  if (!st.ok()) return ErrorFrame(f.header.request_id, st);
  return reply;
}

Status RequestHandler::Dispatch(SessionState& s, const wire::Frame& f,
                                std::vector<uint8_t>* reply) {
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
    for (const auto& t : opt_.tenants) {
      if (t.name != h.tenant() || t.token != h.auth_token()) continue;
      if (t.loopback_only && !s.loopback)
        return Status::PermissionDenied("tenant '" + t.name +
                                        "' is accepted from loopback addresses only");
      s.authenticated = true;
      s.tenant = t.name;
      s.session_id = next_session_++;
      wire::HelloReply r;
      r.set_protocol_version(wire::kProtocolVersion);
      r.set_server_id(opt_.server_id);
      r.set_max_frame_bytes(opt_.limits.max_frame_bytes);
      r.set_session_id(s.session_id);
      r.set_heartbeat_interval_ms(opt_.heartbeat_interval_ms);
      Close(s);  // a second Hello replaces the session's data-plane endpoint
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
    return Status::Unauthenticated("wrong tenant or token");
  }
  if (!s.authenticated) return Status::Unauthenticated("send Hello with a valid token first");
  auto ref = [&](uint64_t seq) { return store::SeqRef{s.tenant, seq}; };
  switch (type) {
    case MessageType::kCreateSequence: {
      wire::CreateSequence m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      KVM_ASSIGN_OR_RETURN(ModelShape shape, wire::FromWire(m.shape()));
      const store::SeqRef sr = ref(m.sequence_id());
      if (m.attach()) {  // an existing sequence of the same shape and layout
        KVM_ASSIGN_OR_RETURN(store::SeqInfo info, store_->Info(sr));
        if (!(info.shape == shape) || info.block_size != m.block_size())
          return Status::FailedPrecondition(
              "attach: sequence " + std::to_string(m.sequence_id()) + " is stored as " +
              info.shape.ToString() + " B " + std::to_string(info.block_size) +
              ", the request says " + shape.ToString() + " B " + std::to_string(m.block_size()));
      } else {
        KVM_RETURN_IF_ERROR(store_->Create(sr, shape, m.block_size(), FromWire(m.durability())));
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
      KVM_ASSIGN_OR_RETURN(uint64_t len, store_->Append(ref(m.sequence_id()), m.start_position(),
                                                        tokens, f.payload));
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
      wire::HeartbeatReply r;
      r.set_server_time_ns(NowNs());
      return send(r);
    }
    case MessageType::kRetrieveLayer: {
      wire::RetrieveLayer m;
      KVM_RETURN_IF_ERROR(wire::ParseProto(f, &m));
      wire::RetrieveLayerReply r;
      std::vector<uint8_t> blocks;
      KVM_RETURN_IF_ERROR(engine_->Retrieve(ref(m.sequence_id()), m, f.payload, &r, &blocks));
      const double streamed = double(blocks.size());
      if (s.data_peer) {  // blocks as active messages, sent before this reply
        KVM_ASSIGN_OR_RETURN(uint32_t parts, SendBlocks(s, id, r, std::move(blocks)));
        r.set_data_plane_parts(parts);
        blocks.clear();
      }
      if (opt_.metrics)
        opt_.metrics->AddStreamBytes("out", s.data_peer ? opt_.data_plane->name() : "tcp",
                                     streamed);
      return send(r, blocks);
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
      return send(r);
    }
    default:
      return Status::InvalidArgument("unexpected message type");
  }
}

}  // namespace kvm::server
