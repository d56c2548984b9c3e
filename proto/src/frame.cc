#include "proto/wire/frame.h"

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
                                         "Heartbeat"};
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
                                       "HeartbeatReply"};
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

uint64_t AppendPayloadBytes(const kvm::ModelShape& shape, uint64_t n_tokens) {
  return uint64_t{shape.layers} * shape.kv_heads * 2 * n_tokens * shape.head_dim *
         DTypeSize(shape.dtype);
}

Status ValidateAppend(const Append& msg, const kvm::ModelShape& shape, uint64_t payload_len) {
  const uint64_t n = static_cast<uint64_t>(msg.token_ids_size());
  if (n == 0) return Status::InvalidArgument("append: no tokens");
  const uint64_t want = AppendPayloadBytes(shape, n);
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

std::vector<uint8_t> EncodeBlocksHeader(const BlocksHeader& h) {
  std::vector<uint8_t> out(kBlocksHeaderFixedBytes + kBlocksHeaderBytesPerBlock * h.blocks.size());
  const uint32_t n = static_cast<uint32_t>(h.blocks.size());
  std::memcpy(out.data(), &h.request_id, 8);
  std::memcpy(out.data() + 8, &h.layer, 4);
  std::memcpy(out.data() + 12, &n, 4);
  for (uint32_t i = 0; i < n; ++i) {
    std::memcpy(out.data() + 16 + 8 * i, &h.blocks[i].kv_head, 4);
    std::memcpy(out.data() + 20 + 8 * i, &h.blocks[i].slot, 4);
  }
  return out;
}

Result<BlocksHeader> DecodeBlocksHeader(std::span<const uint8_t> bytes) {
  if (bytes.size() < kBlocksHeaderFixedBytes)
    return Status::InvalidArgument("blocks header of " + std::to_string(bytes.size()) + " bytes");
  BlocksHeader h;
  uint32_t n;
  std::memcpy(&h.request_id, bytes.data(), 8);
  std::memcpy(&h.layer, bytes.data() + 8, 4);
  std::memcpy(&n, bytes.data() + 12, 4);
  if (bytes.size() != kBlocksHeaderFixedBytes + kBlocksHeaderBytesPerBlock * uint64_t{n})
    return Status::InvalidArgument("blocks header: " + std::to_string(n) + " blocks in " +
                                   std::to_string(bytes.size()) + " bytes");
  h.blocks.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    std::memcpy(&h.blocks[i].kv_head, bytes.data() + 16 + 8 * i, 4);
    std::memcpy(&h.blocks[i].slot, bytes.data() + 20 + 8 * i, 4);
  }
  return h;
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
        " not supported (this side speaks " + std::to_string(kProtocolVersion) + ")");
  return Status::Ok();
}

Status StatusFromWire(uint32_t code, const std::string& message) {
  if (code == 0) return Status::Internal("error reply with code OK: " + message);
  return Status(StatusCodeFromWire(code), message);
}

}  // namespace kvm::wire
