// Frames of the kvmanager protocol (version 1; see proto/README.md).
//
// A frame is a fixed 32-byte little-endian header, a protobuf header of `header_len` bytes, and a
// raw payload of `payload_len` bytes that a receiver reads straight into its destination:
//
//   offset size field
//        0    4 magic        'K','V','M','1' (0x314d564b little-endian)
//        4    2 type         MessageType
//        6    2 flags        0 (reserved)
//        8    8 request_id   echoed in the reply; pipelined requests have distinct ids
//       16    4 header_len   protobuf header bytes, <= limits.max_header_bytes
//       20    4 reserved     0
//       24    8 payload_len  raw payload bytes; header_len + payload_len <= limits.max_frame_bytes
//
// Every length is checked against the limits before anything of that size is allocated.
// FrameDecoder is not thread-safe (one per connection); the free functions are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "proto/model_shape.h"
#include "proto/status.h"

namespace google::protobuf {
class MessageLite;
}

namespace kvm::wire {

inline constexpr uint32_t kProtocolVersion = 2;
inline constexpr uint32_t kFrameMagic = 0x314d564bu;  // "KVM1"
inline constexpr size_t kFrameHeaderBytes = 32;

// Frame types. Wire values: NEVER renumber; append only. A reply is request type | 0x8000.
enum class MessageType : uint16_t {
  kHello = 1,
  kCreateSequence = 2,
  kAppend = 3,
  kPrefixLookup = 4,
  kTruncate = 5,
  kRetrieveLayer = 6,
  kSetLayerMap = 7,
  kAudit = 8,
  kReadBlocks = 9,
  kDeleteSequence = 10,
  kListSequences = 11,
  kStats = 12,
  kHeartbeat = 13,
  kCorrect = 14,    // exact correction: attention over the blocks the worker does not hold
  kError = 0x7fff,  // an error reply (wire::Error header) to any request
};
inline constexpr uint16_t kReplyBit = 0x8000;
inline constexpr uint16_t kMaxRequestType = 14;

bool IsKnownType(uint16_t type);             // a request, its reply, or kError
const char* MessageTypeName(uint16_t type);  // e.g. "Append", "AppendReply", "?"
inline uint16_t ReplyType(MessageType t) { return static_cast<uint16_t>(t) | kReplyBit; }

struct FrameLimits {
  // Largest protobuf header. Default: 64 KiB (a retrieval reply of 32 KV heads is ~10 KiB).
  uint32_t max_header_bytes = 64 * 1024;
  // Largest header + payload. Default: 256 MiB (an append of 1K tokens at L32 Hkv8 D128 fp16 is 128
  // MiB).
  uint64_t max_frame_bytes = 256ull * 1024 * 1024;
};

struct FrameHeader {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint64_t request_id = 0;
  uint32_t header_len = 0;
  uint64_t payload_len = 0;
};

// Writes the 32 header bytes.
void EncodeFrameHeader(const FrameHeader& h, uint8_t out[kFrameHeaderBytes]);
// Parses and validates 32 header bytes: magic, reserved fields, known type, lengths within limits.
// InvalidArgument (bad magic/type/reserved) or OutOfRange (a length over a limit).
Result<FrameHeader> DecodeFrameHeader(std::span<const uint8_t> bytes, const FrameLimits& limits);

// A whole frame in one buffer: header + serialised message + payload (copied). For tests, tools and
// small messages; the server path writes the payload from its source with scatter-gather I/O.
std::vector<uint8_t> EncodeFrame(uint16_t type, uint64_t request_id,
                                 const google::protobuf::MessageLite& msg,
                                 std::span<const uint8_t> payload = {});

// A decoded frame: the fixed header, the protobuf header bytes, and the payload.
struct Frame {
  FrameHeader header;
  std::vector<uint8_t> proto;    // header_len bytes
  std::vector<uint8_t> payload;  // payload_len bytes
};

// Incremental decoder for a byte stream: Feed() bytes as they arrive; Next() yields complete
// frames. A protocol error is sticky: the connection must be closed after reporting it.
class FrameDecoder {
 public:
  explicit FrameDecoder(FrameLimits limits = {}) : limits_(limits) {}
  // Consumes bytes. Returns the first protocol error (and all later calls return it too).
  Status Feed(std::span<const uint8_t> bytes);
  // Moves the next complete frame into *out; false when none is complete yet.
  bool Next(Frame* out);
  // Bytes buffered for the frame in progress.
  size_t buffered() const { return buf_.size(); }

 private:
  FrameLimits limits_;
  Status error_;
  std::vector<uint8_t> buf_;
  std::vector<Frame> ready_;
  size_t ready_head_ = 0;
};

// Parses a protobuf header; InvalidArgument naming the message type when it does not parse.
Status ParseProto(const Frame& frame, google::protobuf::MessageLite* msg);

// ---- Message-level validation against a shape (before any allocation of claimed sizes) ----
class Append;
class RetrieveLayer;
class Audit;
class ModelShape;

// Converts and validates a wire shape.
Result<kvm::ModelShape> FromWire(const ModelShape& s);
void ToWire(const kvm::ModelShape& s, ModelShape* out);
// Expected payload bytes of an Append of n tokens: layers * kv_heads * 2 * n * head_dim * elem,
// less `omitted_k_rows` rows (Append.k_from_retrieval).
uint64_t AppendPayloadBytes(const kvm::ModelShape& shape, uint64_t n_tokens,
                            uint64_t omitted_k_rows = 0);
// InvalidArgument when the payload size does not match the shape and the token count, or
// k_from_retrieval names a (layer, KV head) out of range or twice.
Status ValidateAppend(const Append& msg, const kvm::ModelShape& shape, uint64_t payload_len);
// Queries of a RetrieveLayer / Audit: kv_heads in range, unique, payload = heads * g * D * 4 bytes
// of fp32 queries + heads * pending_tokens * D pending K rows of the shape's dtype.
Status ValidateQueries(uint32_t layer, std::span<const uint32_t> kv_heads,
                       const kvm::ModelShape& shape, uint32_t pending_tokens, uint64_t payload_len);

// ---- Data plane: a retrieval reply as active messages (DataPart, proto/README.md) ----
class DataPart;
class RetrieveLayerReply;
// The reply `r` of request `request_id` as parts whose serialized headers each fit
// `max_header_bytes`: head selections packed in order, one too big for a header split into
// fragments (every list sliced in order, the other fields in the last fragment). Each part's data
// is the K then V block of every block its fragments send, in order. InvalidArgument when the limit
// is too small for even one block of one fragment.
Result<std::vector<DataPart>> SplitReply(const RetrieveLayerReply& r, uint64_t request_id,
                                         size_t max_header_bytes);
// The reply the parts make (all of one request, any order): heads in order, each head's fragments
// joined. InvalidArgument naming what is missing, duplicated or inconsistent.
Result<RetrieveLayerReply> JoinParts(std::vector<DataPart> parts);
// The blocks one part sends, in data order: (layer, kv_head, slot) of each.
struct PartBlock {
  uint32_t layer = 0, kv_head = 0, slot = 0;
};
std::vector<PartBlock> PartBlocks(const DataPart& p);

// Splits "host:port" (IPv6 as "[::1]:port") of a control-plane address; InvalidArgument naming the
// text otherwise.
Result<std::pair<std::string, uint16_t>> ParseHostPort(const std::string& s);

class Hello;
// FailedPrecondition when the client speaks another protocol version.
Status CheckHello(const Hello& hello);

// Status <-> wire error.
Status StatusFromWire(uint32_t code, const std::string& message);

}  // namespace kvm::wire
