#include "proto/wire/frame.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_set>

#include "proto/kvm.pb.h"

namespace kvm::wire {
namespace {

template <typename T>
void PutLe(uint8_t* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i)
    p[i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
}
template <typename T>
T GetLe(const uint8_t* p) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return static_cast<T>(v);
}

constexpr const char* kRequestNames[] = {"?",
                                         "Hello",
                                         "CreateSequence",
                                         "Append",
                                         "PrefixLookup",
                                         "Truncate",
                                         "RetrieveLayer",
                                         "SetLayerMap",
                                         "Audit",
                                         "ReadBlocks",
                                         "DeleteSequence",
                                         "ListSequences",
                                         "Stats",
                                         "Heartbeat",
                                         "Correct"};
constexpr const char* kReplyNames[] = {"?",
                                       "HelloReply",
                                       "CreateSequenceReply",
                                       "AppendReply",
                                       "PrefixLookupReply",
                                       "TruncateReply",
                                       "RetrieveLayerReply",
                                       "SetLayerMapReply",
                                       "AuditReply",
                                       "ReadBlocksReply",
                                       "DeleteSequenceReply",
                                       "ListSequencesReply",
                                       "StatsReply",
                                       "HeartbeatReply",
                                       "CorrectReply"};
static_assert(std::size(kRequestNames) == kMaxRequestType + 1);
static_assert(std::size(kReplyNames) == kMaxRequestType + 1);
}  // namespace

bool IsKnownType(uint16_t type) {
  if (type == static_cast<uint16_t>(MessageType::kError)) return true;
  const uint16_t base = type & ~kReplyBit;
  return base >= 1 && base <= kMaxRequestType;
}

const char* MessageTypeName(uint16_t type) {
  if (type == static_cast<uint16_t>(MessageType::kError)) return "Error";
  if (!IsKnownType(type)) return "?";
  return (type & kReplyBit) ? kReplyNames[type & ~kReplyBit] : kRequestNames[type];
}

void EncodeFrameHeader(const FrameHeader& h, uint8_t out[kFrameHeaderBytes]) {
  PutLe<uint32_t>(out + 0, kFrameMagic);
  PutLe<uint16_t>(out + 4, h.type);
  PutLe<uint16_t>(out + 6, h.flags);
  PutLe<uint64_t>(out + 8, h.request_id);
  PutLe<uint32_t>(out + 16, h.header_len);
  PutLe<uint32_t>(out + 20, 0);
  PutLe<uint64_t>(out + 24, h.payload_len);
}

Result<FrameHeader> DecodeFrameHeader(std::span<const uint8_t> b, const FrameLimits& limits) {
  if (b.size() < kFrameHeaderBytes)
    return Status::InvalidArgument("frame header truncated: " + std::to_string(b.size()) +
                                   " of 32 bytes");
  if (GetLe<uint32_t>(b.data()) != kFrameMagic)
    return Status::InvalidArgument("bad frame magic (not a kvmanager v1 frame)");
  FrameHeader h;
  h.type = GetLe<uint16_t>(b.data() + 4);
  h.flags = GetLe<uint16_t>(b.data() + 6);
  h.request_id = GetLe<uint64_t>(b.data() + 8);
  h.header_len = GetLe<uint32_t>(b.data() + 16);
  const uint32_t reserved = GetLe<uint32_t>(b.data() + 20);
  h.payload_len = GetLe<uint64_t>(b.data() + 24);
  if (!IsKnownType(h.type))
    return Status::InvalidArgument("unknown message type " + std::to_string(h.type));
  if (h.flags != 0 || reserved != 0)
    return Status::InvalidArgument("reserved frame header fields are not zero");
  if (h.header_len > limits.max_header_bytes)
    return Status::OutOfRange("frame header length " + std::to_string(h.header_len) +
                              " over the limit " + std::to_string(limits.max_header_bytes));
  if (h.payload_len > limits.max_frame_bytes ||
      h.header_len + h.payload_len > limits.max_frame_bytes)
    return Status::OutOfRange("frame length " + std::to_string(h.header_len + h.payload_len) +
                              " over the limit " + std::to_string(limits.max_frame_bytes));
  return h;
}

std::vector<uint8_t> EncodeFrame(uint16_t type, uint64_t request_id,
                                 const google::protobuf::MessageLite& msg,
                                 std::span<const uint8_t> payload) {
  const size_t n = msg.ByteSizeLong();
  std::vector<uint8_t> out(kFrameHeaderBytes + n + payload.size());
  FrameHeader h{type, 0, request_id, static_cast<uint32_t>(n), payload.size()};
  EncodeFrameHeader(h, out.data());
  msg.SerializeWithCachedSizesToArray(out.data() + kFrameHeaderBytes);
  if (!payload.empty())
    std::memcpy(out.data() + kFrameHeaderBytes + n, payload.data(), payload.size());
  return out;
}

Status FrameDecoder::Feed(std::span<const uint8_t> bytes) {
  if (!error_.ok()) return error_;
  while (!bytes.empty()) {
    // Fill the fixed header first; only then is the rest of the frame's size known and checked.
    if (buf_.size() < kFrameHeaderBytes) {
      const size_t take = std::min(bytes.size(), kFrameHeaderBytes - buf_.size());
      buf_.insert(buf_.end(), bytes.begin(), bytes.begin() + take);
      bytes = bytes.subspan(take);
      if (buf_.size() < kFrameHeaderBytes) break;
    }
    auto h = DecodeFrameHeader(buf_, limits_);
    if (!h.ok()) {
      error_ = h.status();
      buf_.clear();
      return error_;
    }
    const uint64_t total = kFrameHeaderBytes + h->header_len + h->payload_len;
    const size_t take = static_cast<size_t>(std::min<uint64_t>(bytes.size(), total - buf_.size()));
    buf_.insert(buf_.end(), bytes.begin(), bytes.begin() + take);
    bytes = bytes.subspan(take);
    if (buf_.size() == total) {
      Frame f;
      f.header = *h;
      f.proto.assign(buf_.begin() + kFrameHeaderBytes,
                     buf_.begin() + kFrameHeaderBytes + h->header_len);
      f.payload.assign(buf_.begin() + kFrameHeaderBytes + h->header_len, buf_.end());
      ready_.push_back(std::move(f));
      buf_.clear();
    }
  }
  return Status::Ok();
}

bool FrameDecoder::Next(Frame* out) {
  if (ready_head_ >= ready_.size()) return false;
  *out = std::move(ready_[ready_head_++]);
  if (ready_head_ == ready_.size()) {
    ready_.clear();
    ready_head_ = 0;
  }
  return true;
}

Status ParseProto(const Frame& frame, google::protobuf::MessageLite* msg) {
  if (!msg->ParseFromArray(frame.proto.data(), static_cast<int>(frame.proto.size())))
    return Status::InvalidArgument(std::string("malformed ") + MessageTypeName(frame.header.type) +
                                   " header");
  return Status::Ok();
}

Result<kvm::ModelShape> FromWire(const ModelShape& s) {
  kvm::ModelShape out;
  out.layers = s.layers();
  out.q_heads = s.q_heads();
  out.kv_heads = s.kv_heads();
  out.head_dim = s.head_dim();
  out.dtype = static_cast<kvm::DType>(s.dtype());
  out.fingerprint = s.fingerprint();
  KVM_RETURN_IF_ERROR(out.Validate());
  return out;
}

void ToWire(const kvm::ModelShape& s, ModelShape* out) {
  out->set_layers(s.layers);
  out->set_q_heads(s.q_heads);
  out->set_kv_heads(s.kv_heads);
  out->set_head_dim(s.head_dim);
  out->set_dtype(static_cast<DType>(s.dtype));
  out->set_fingerprint(s.fingerprint);
}

uint64_t AppendPayloadBytes(const kvm::ModelShape& shape, uint64_t n_tokens,
                            uint64_t omitted_k_rows) {
  return (uint64_t{shape.layers} * shape.kv_heads * 2 * n_tokens - omitted_k_rows) *
         shape.head_dim * DTypeSize(shape.dtype);
}

Status ValidateAppend(const Append& msg, const kvm::ModelShape& shape, uint64_t payload_len) {
  const uint64_t n = static_cast<uint64_t>(msg.token_ids_size());
  if (n == 0) return Status::InvalidArgument("append: no tokens");
  std::unordered_set<uint32_t> seen;
  for (uint32_t i : msg.k_from_retrieval()) {
    if (i >= uint64_t{shape.layers} * shape.kv_heads)
      return Status::InvalidArgument("append: k_from_retrieval " + std::to_string(i) +
                                     " is not a (layer, KV head) of " + shape.ToString());
    if (!seen.insert(i).second)
      return Status::InvalidArgument("append: k_from_retrieval " + std::to_string(i) + " twice");
  }
  const uint64_t want = AppendPayloadBytes(shape, n, seen.size());
  if (payload_len != want)
    return Status::InvalidArgument("append: payload is " + std::to_string(payload_len) +
                                   " bytes, the shape (" + shape.ToString() + ") and " +
                                   std::to_string(n) + " tokens need " + std::to_string(want));
  return Status::Ok();
}

Status ValidateQueries(uint32_t layer, std::span<const uint32_t> kv_heads,
                       const kvm::ModelShape& shape, uint32_t pending_tokens,
                       uint64_t payload_len) {
  if (layer >= shape.layers)
    return Status::InvalidArgument("layer " + std::to_string(layer) + " out of range (layers " +
                                   std::to_string(shape.layers) + ")");
  if (kv_heads.empty()) return Status::InvalidArgument("no KV heads given");
  std::unordered_set<uint32_t> seen;
  for (uint32_t h : kv_heads) {
    if (h >= shape.kv_heads)
      return Status::InvalidArgument("kv_head " + std::to_string(h) + " out of range (kv_heads " +
                                     std::to_string(shape.kv_heads) + ")");
    if (!seen.insert(h).second)
      return Status::InvalidArgument("kv_head " + std::to_string(h) + " repeated");
  }
  const uint64_t want = uint64_t{kv_heads.size()} * shape.head_dim *
                        (uint64_t{shape.group_size()} * sizeof(float) +
                         uint64_t{pending_tokens} * DTypeSize(shape.dtype));
  if (payload_len != want)
    return Status::InvalidArgument(
        "queries: payload is " + std::to_string(payload_len) + " bytes, expected " +
        std::to_string(want) + " (fp32 [heads][group][head_dim], then " +
        std::to_string(pending_tokens) + " pending K rows [heads][tokens][head_dim])");
  return Status::Ok();
}

namespace {

// Upper bounds of encoded sizes (a varint of a 64-bit value is at most 10 bytes, of 32 bits 5).
constexpr size_t kPartOverhead = 64;      // DataPart's ids, counts, reply's layer/generation
constexpr size_t kFragmentOverhead = 96;  // a HeadSelection's tag, length and small scalars

// One head selection's lists, sliced from `from` (item indices into the concatenation evictions,
// sends, fills, resident, split_dir) up to `to`.
void Slice(const HeadSelection& h, size_t from, size_t to, HeadSelection* out) {
  const size_t e = size_t(h.evicted_slots_size()), s = size_t(h.block_indices_size()),
               f = size_t(h.local_fill_blocks_size()), r = size_t(h.resident_blocks_size());
  for (size_t i = from; i < to; ++i) {
    if (i < e) {
      out->add_evicted_slots(h.evicted_slots(int(i)));
    } else if (i < e + s) {
      out->add_block_indices(h.block_indices(int(i - e)));
      out->add_slots(h.slots(int(i - e)));
    } else if (i < e + s + f) {
      out->add_local_fill_blocks(h.local_fill_blocks(int(i - e - s)));
      out->add_local_fill_slots(h.local_fill_slots(int(i - e - s)));
    } else if (i < e + s + f + r) {
      out->add_resident_blocks(h.resident_blocks(int(i - e - s - f)));
    } else {
      out->add_split_dir(h.split_dir(int(i - e - s - f - r)));
    }
  }
}

size_t ItemBytes(const HeadSelection& h, size_t i) {
  const size_t e = size_t(h.evicted_slots_size()), s = size_t(h.block_indices_size()),
               f = size_t(h.local_fill_blocks_size()), r = size_t(h.resident_blocks_size());
  if (i < e) return 5;
  if (i < e + s + f) return 15;
  if (i < e + s + f + r) return 10;
  return 4;  // a float of split_dir
}

// A selection without its lists: what every fragment but the lists' slices costs at most.
void ClearLists(HeadSelection* h) {
  h->clear_evicted_slots();
  h->clear_block_indices();
  h->clear_slots();
  h->clear_local_fill_blocks();
  h->clear_local_fill_slots();
  h->clear_resident_blocks();
  h->clear_split_dir();
}

}  // namespace

Result<std::vector<DataPart>> SplitReply(const RetrieveLayerReply& r, uint64_t request_id,
                                         size_t max_header_bytes) {
  const size_t shared = size_t(r.shared_layers_size()) * 6 + 6;
  if (max_header_bytes < kPartOverhead + shared + kFragmentOverhead + 64)
    return Status::InvalidArgument("data plane: a header limit of " +
                                   std::to_string(max_header_bytes) + " bytes is too small");
  const size_t budget = max_header_bytes - kPartOverhead - shared;
  std::vector<DataPart> parts;
  size_t used = budget;  // forces a first part
  auto part = [&]() -> RetrieveLayerReply* {
    parts.emplace_back();
    RetrieveLayerReply* p = parts.back().mutable_reply();
    p->set_layer(r.layer());
    p->set_hot_set_generation(r.hot_set_generation());
    used = 0;
    return p;
  };
  RetrieveLayerReply* cur = nullptr;
  for (const HeadSelection& h : r.heads()) {
    const size_t whole = h.ByteSizeLong() + 6;
    if (whole <= budget) {  // whole, in the current part or a new one
      if (!cur || used + whole > budget) cur = part();
      *cur->add_heads() = h;
      used += whole;
      continue;
    }
    // Fragments: the lists sliced so each fragment fits a part of its own.
    HeadSelection scalars = h;
    ClearLists(&scalars);
    const size_t fixed = kFragmentOverhead + scalars.ByteSizeLong();
    if (fixed >= budget)
      return Status::InvalidArgument("data plane: a selection's fields take " +
                                     std::to_string(fixed) + " bytes of a " +
                                     std::to_string(max_header_bytes) + "-byte header");
    const size_t items =
        size_t(h.evicted_slots_size() + h.block_indices_size() + h.local_fill_blocks_size() +
               h.resident_blocks_size() + h.split_dir_size());
    std::vector<std::pair<size_t, size_t>> ranges;
    for (size_t from = 0; from < items;) {
      size_t to = from, bytes = fixed;
      while (to < items && bytes + ItemBytes(h, to) <= budget) bytes += ItemBytes(h, to++);
      if (to == from) return Status::Internal("data plane: one item does not fit a header");
      ranges.emplace_back(from, to);
      from = to;
    }
    for (size_t k = 0; k < ranges.size(); ++k) {
      cur = part();
      HeadSelection* f = cur->add_heads();
      if (k + 1 == ranges.size()) {
        *f = scalars;  // the scalars; the lists are the last slice
      } else {
        f->set_layer(h.layer());
        f->set_kv_head(h.kv_head());
      }
      f->set_fragment(uint32_t(k));
      f->set_fragments(uint32_t(ranges.size()));
      Slice(h, ranges[k].first, ranges[k].second, f);
      used = budget;  // a fragment has its part to itself
    }
  }
  if (parts.empty()) part();  // a reply that sends nothing still completes
  for (int l : r.shared_layers()) parts.back().mutable_reply()->add_shared_layers(uint32_t(l));
  for (size_t i = 0; i < parts.size(); ++i) {
    parts[i].set_request_id(request_id);
    parts[i].set_part(uint32_t(i));
    parts[i].set_parts(uint32_t(parts.size()));
    if (parts[i].ByteSizeLong() > max_header_bytes)
      return Status::Internal("data plane: part " + std::to_string(i) + " is " +
                              std::to_string(parts[i].ByteSizeLong()) + " bytes, over the limit " +
                              std::to_string(max_header_bytes));
  }
  return parts;
}

Result<RetrieveLayerReply> JoinParts(std::vector<DataPart> parts) {
  if (parts.empty()) return Status::InvalidArgument("data plane: no parts");
  const uint32_t n = parts[0].parts();
  if (n != parts.size())
    return Status::InvalidArgument("data plane: " + std::to_string(parts.size()) + " parts of " +
                                   std::to_string(n));
  std::sort(parts.begin(), parts.end(),
            [](const DataPart& a, const DataPart& b) { return a.part() < b.part(); });
  RetrieveLayerReply out;
  for (uint32_t i = 0; i < n; ++i) {
    const DataPart& p = parts[i];
    if (p.part() != i || p.parts() != n || p.request_id() != parts[0].request_id())
      return Status::InvalidArgument("data plane: part " + std::to_string(i) +
                                     " is missing, repeated or of another request");
    if (i == 0) {
      out.set_layer(p.reply().layer());
      out.set_hot_set_generation(p.reply().hot_set_generation());
    }
    for (uint32_t l : p.reply().shared_layers()) out.add_shared_layers(l);
    for (const HeadSelection& h : p.reply().heads()) {
      const uint32_t frags = std::max<uint32_t>(1, h.fragments());
      HeadSelection* last = out.heads_size() ? out.mutable_heads(out.heads_size() - 1) : nullptr;
      const bool continues = h.fragment() > 0;
      if (continues && (!last || last->layer() != h.layer() || last->kv_head() != h.kv_head() ||
                        last->fragment() + 1 != h.fragment() || last->fragments() != frags))
        return Status::InvalidArgument("data plane: fragment " + std::to_string(h.fragment()) +
                                       " of layer " + std::to_string(h.layer()) + " KV head " +
                                       std::to_string(h.kv_head()) + " out of order");
      if (!continues) {
        *out.add_heads() = h;
        continue;
      }
      HeadSelection merged = h;  // the later fragment's scalars win (the last one has them)
      ClearLists(&merged);
      for (const HeadSelection* src : {static_cast<const HeadSelection*>(last), &h}) {
        for (uint32_t x : src->evicted_slots()) merged.add_evicted_slots(x);
        for (uint64_t x : src->block_indices()) merged.add_block_indices(x);
        for (uint32_t x : src->slots()) merged.add_slots(x);
        for (uint64_t x : src->local_fill_blocks()) merged.add_local_fill_blocks(x);
        for (uint32_t x : src->local_fill_slots()) merged.add_local_fill_slots(x);
        for (uint64_t x : src->resident_blocks()) merged.add_resident_blocks(x);
        for (float x : src->split_dir()) merged.add_split_dir(x);
      }
      *last = std::move(merged);
    }
  }
  for (const HeadSelection& h : out.heads())
    if (h.fragments() > 1 && h.fragment() + 1 != h.fragments())
      return Status::InvalidArgument("data plane: layer " + std::to_string(h.layer()) +
                                     " KV head " + std::to_string(h.kv_head()) +
                                     " lacks fragments");
  for (HeadSelection& h : *out.mutable_heads()) {
    h.clear_fragment();
    h.clear_fragments();
  }
  return out;
}

std::vector<PartBlock> PartBlocks(const DataPart& p) {
  std::vector<PartBlock> out;
  for (const HeadSelection& h : p.reply().heads())
    for (uint32_t s : h.slots()) out.push_back({h.layer(), h.kv_head(), s});
  return out;
}

Result<std::pair<std::string, uint16_t>> ParseHostPort(const std::string& s) {
  std::string host;
  std::string port;
  if (!s.empty() && s[0] == '[') {
    const size_t close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':')
      return Status::InvalidArgument("address '" + s + "' is not [IPv6]:PORT");
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    const size_t colon = s.rfind(':');
    if (colon == std::string::npos)
      return Status::InvalidArgument("address '" + s + "' is not HOST:PORT");
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
  }
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (host.empty() || port.empty() || *end || p < 0 || p > 65535)
    return Status::InvalidArgument("address '" + s + "': bad host or port");
  return std::make_pair(host, static_cast<uint16_t>(p));
}

Status CheckHello(const Hello& hello) {
  if (hello.protocol_version() != kProtocolVersion)
    return Status::FailedPrecondition(
        "protocol version " + std::to_string(hello.protocol_version()) +
        " not supported (this side speaks " + std::to_string(kProtocolVersion) +
        ": replies matched by request id, K sent once, the data plane is the reply); "
        "upgrade the client");
  return Status::Ok();
}

Status StatusFromWire(uint32_t code, const std::string& message) {
  if (code == 0) return Status::Internal("error reply with code OK: " + message);
  return Status(StatusCodeFromWire(code), message);
}

}  // namespace kvm::wire
