// libFuzzer target for the frame decoder and the message validators: arbitrary bytes are fed in
// chunks (the first byte picks the chunk size), every complete frame is parsed as its message type
// and validated against a fixed shape. Nothing may crash, leak or allocate a claimed size.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"

namespace {
std::unique_ptr<google::protobuf::MessageLite> MessageFor(uint16_t type) {
  using kvm::wire::MessageType;
  switch (static_cast<MessageType>(type)) {
    case MessageType::kHello:
      return std::make_unique<kvm::wire::Hello>();
    case MessageType::kCreateSequence:
      return std::make_unique<kvm::wire::CreateSequence>();
    case MessageType::kAppend:
      return std::make_unique<kvm::wire::Append>();
    case MessageType::kPrefixLookup:
      return std::make_unique<kvm::wire::PrefixLookup>();
    case MessageType::kTruncate:
      return std::make_unique<kvm::wire::Truncate>();
    case MessageType::kRetrieveLayer:
      return std::make_unique<kvm::wire::RetrieveLayer>();
    case MessageType::kSetLayerMap:
      return std::make_unique<kvm::wire::SetLayerMap>();
    case MessageType::kAudit:
      return std::make_unique<kvm::wire::Audit>();
    case MessageType::kReadBlocks:
      return std::make_unique<kvm::wire::ReadBlocks>();
    case MessageType::kError:
      return std::make_unique<kvm::wire::Error>();
    default:
      return std::make_unique<kvm::wire::RetrieveLayerReply>();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t chunk = 1 + data[0] % 64;
  ++data;
  --size;
  kvm::wire::FrameLimits limits;
  limits.max_frame_bytes = 1 << 20;
  limits.max_header_bytes = 1 << 16;
  kvm::wire::FrameDecoder dec(limits);
  const kvm::ModelShape shape{2, 8, 2, 32, kvm::DType::kF16, 1};
  for (size_t pos = 0; pos < size; pos += chunk) {
    if (!dec.Feed({data + pos, std::min(chunk, size - pos)}).ok()) return 0;
    kvm::wire::Frame f;
    while (dec.Next(&f)) {
      auto msg = MessageFor(f.header.type);
      if (!kvm::wire::ParseProto(f, msg.get()).ok()) continue;
      if (auto* a = dynamic_cast<kvm::wire::Append*>(msg.get())) {
        (void)kvm::wire::ValidateAppend(*a, shape, f.payload.size());
      } else if (auto* r = dynamic_cast<kvm::wire::RetrieveLayer*>(msg.get())) {
        std::vector<uint32_t> heads(r->kv_heads().begin(), r->kv_heads().end());
        (void)kvm::wire::ValidateQueries(r->layer(), heads, shape, r->pending_tokens(),
                                         f.payload.size());
      } else if (auto* c = dynamic_cast<kvm::wire::CreateSequence*>(msg.get())) {
        (void)kvm::wire::FromWire(c->shape());
      } else if (auto* h = dynamic_cast<kvm::wire::Hello*>(msg.get())) {
        (void)kvm::wire::CheckHello(*h);
      }
    }
  }
  return 0;
}
