// libFuzzer target for the frame decoder and the message validators: arbitrary bytes are fed in
// chunks (the first byte picks the chunk size), every complete frame is parsed as its message type
// and validated against a fixed shape, and re-encoded: the same bytes must decode to the same
// frame. Nothing may crash, leak or allocate a claimed size.
//
// Verdict (fuzz_target.h) of an input: one token per complete frame, "<type>:<code>" (the parse
// result, then the validator's, e.g. "Append:OK", "RetrieveLayer:InvalidArgument"), then how the
// stream ended: "ok" (nothing buffered), "ok+N" (N bytes of an incomplete frame buffered) or
// "error:<code>" (the decoder's sticky error, e.g. "error:OutOfRange").
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "fuzz_target.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"

namespace kvm::fuzz {
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

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "frame_fuzzer: %s\n", what);
  std::abort();
}

// Decodes `f` re-encoded: one frame, equal to f.
void CheckRoundTrip(const kvm::wire::Frame& f, const kvm::wire::FrameLimits& limits) {
  std::vector<uint8_t> bytes(kvm::wire::kFrameHeaderBytes);
  kvm::wire::EncodeFrameHeader(f.header, bytes.data());
  bytes.insert(bytes.end(), f.proto.begin(), f.proto.end());
  bytes.insert(bytes.end(), f.payload.begin(), f.payload.end());
  kvm::wire::FrameDecoder dec(limits);
  kvm::wire::Frame g;
  if (!dec.Feed(bytes).ok() || !dec.Next(&g) || dec.Next(&g) || dec.buffered() != 0)
    Fail("a decoded frame does not decode again");
  if (g.header.type != f.header.type || g.header.request_id != f.header.request_id ||
      g.proto != f.proto || g.payload != f.payload)
    Fail("a decoded frame decodes again differently");
}

// The fuzz target's body; *verdict (when given) gets the input's verdict.
void Run(const uint8_t* data, size_t size, std::string* verdict) {
  if (size == 0) {
    if (verdict) *verdict = "ok";
    return;
  }
  const size_t chunk = 1 + data[0] % 64;
  ++data;
  --size;
  kvm::wire::FrameLimits limits;
  limits.max_frame_bytes = 1 << 20;
  limits.max_header_bytes = 1 << 16;
  kvm::wire::FrameDecoder dec(limits);
  const kvm::ModelShape shape{2, 8, 2, 32, kvm::DType::kF16, 1};
  auto token = [&](const std::string& t) {
    if (verdict) *verdict += (verdict->empty() ? "" : " ") + t;
  };
  for (size_t pos = 0; pos < size; pos += chunk) {
    if (Status st = dec.Feed({data + pos, std::min(chunk, size - pos)}); !st.ok()) {
      token("error:" + std::string(StatusCodeName(st.code())));
      return;
    }
    kvm::wire::Frame f;
    while (dec.Next(&f)) {
      CheckRoundTrip(f, limits);
      auto msg = MessageFor(f.header.type);
      Status st = kvm::wire::ParseProto(f, msg.get());
      if (st.ok()) {
        if (auto* a = dynamic_cast<kvm::wire::Append*>(msg.get())) {
          st = kvm::wire::ValidateAppend(*a, shape, f.payload.size());
        } else if (auto* r = dynamic_cast<kvm::wire::RetrieveLayer*>(msg.get())) {
          std::vector<uint32_t> heads(r->kv_heads().begin(), r->kv_heads().end());
          st = kvm::wire::ValidateQueries(r->layer(), heads, shape, r->pending_tokens(),
                                          f.payload.size());
        } else if (auto* c = dynamic_cast<kvm::wire::CreateSequence*>(msg.get())) {
          st = kvm::wire::FromWire(c->shape()).status();
        } else if (auto* h = dynamic_cast<kvm::wire::Hello*>(msg.get())) {
          st = kvm::wire::CheckHello(*h);
        }
      }
      token(std::string(kvm::wire::MessageTypeName(f.header.type)) + ":" +
            std::string(StatusCodeName(st.code())));
    }
  }
  token(dec.buffered() ? "ok+" + std::to_string(dec.buffered()) : "ok");
}

std::vector<uint8_t> Framed(uint16_t type, uint64_t id, const google::protobuf::MessageLite& m,
                            std::span<const uint8_t> payload = {}) {
  return kvm::wire::EncodeFrame(type, id, m, payload);
}

}  // namespace

std::string Verdict(const uint8_t* data, size_t size) {
  std::string v;
  Run(data, size, &v);
  return v;
}

// Seeds: each message type valid and malformed, pipelined frames, torn streams and every header
// check of the decoder.
std::vector<Seed> Seeds() {
  using namespace kvm::wire;
  std::vector<Seed> out;
  auto add = [&](std::string name, uint8_t chunk, std::vector<uint8_t> f, std::string verdict) {
    f.insert(f.begin(), chunk);
    out.push_back({std::move(name), std::move(f), std::move(verdict)});
  };
  auto t = [](MessageType m) { return static_cast<uint16_t>(m); };
  const kvm::ModelShape shape{2, 8, 2, 32, kvm::DType::kF16, 1};
  Hello h;
  h.set_protocol_version(kProtocolVersion);
  h.set_auth_token("dev");
  h.set_tenant("t");
  const auto hello = Framed(t(MessageType::kHello), 1, h);
  add("hello", 7, hello, "Hello:OK ok");
  Hello old = h;
  old.set_protocol_version(1);
  add("hello-version-1", 64, Framed(t(MessageType::kHello), 1, old), "Hello:FailedPrecondition ok");
  Append a;
  a.set_sequence_id(1);
  a.add_token_ids(5);
  std::vector<uint8_t> payload(AppendPayloadBytes(shape, 1), 3);
  add("append", 13, Framed(t(MessageType::kAppend), 2, a, payload), "Append:OK ok");
  add("append-short-payload", 13,
      Framed(t(MessageType::kAppend), 2, a, std::span(payload).first(payload.size() - 2)),
      "Append:InvalidArgument ok");
  Append ak = a;
  ak.add_k_from_retrieval(3);
  ak.add_k_from_retrieval(3);
  add("append-k-twice", 5, Framed(t(MessageType::kAppend), 2, ak, payload),
      "Append:InvalidArgument ok");
  RetrieveLayer r;
  r.set_layer(1);
  r.add_kv_heads(0);
  std::vector<uint8_t> q(4 * 32 * 4, 0);
  add("retrieve", 63, Framed(t(MessageType::kRetrieveLayer), 3, r, q), "RetrieveLayer:OK ok");
  RetrieveLayer r2 = r;
  r2.add_kv_heads(0);
  add("retrieve-head-twice", 9, Framed(t(MessageType::kRetrieveLayer), 3, r2, q),
      "RetrieveLayer:InvalidArgument ok");
  CreateSequence c;
  c.mutable_shape()->set_layers(2);
  c.mutable_selector()->set_tau_cos(0.8);
  c.mutable_selector()->set_name("prhs");
  add("create-bad-shape", 1, Framed(t(MessageType::kCreateSequence), 4, c),
      "CreateSequence:InvalidArgument ok");
  CreateSequence cg;
  ToWire(shape, cg.mutable_shape());
  cg.set_block_size(16);
  add("create", 3, Framed(t(MessageType::kCreateSequence), 4, cg), "CreateSequence:OK ok");
  // Two frames in one stream, then a third torn after 40 bytes.
  std::vector<uint8_t> two = hello;
  const auto list = Framed(t(MessageType::kListSequences), 5, ListSequences());
  two.insert(two.end(), list.begin(), list.end());
  two.insert(two.end(), hello.begin(), hello.begin() + 40);
  add("pipelined-then-torn", 17, two, "Hello:OK ListSequences:OK ok+40");
  // A reply type and an Error frame decode (the handler refuses them); its proto is the fallback.
  add("reply-type", 11, Framed(ReplyType(MessageType::kStats), 6, StatsReply()),
      "StatsReply:OK ok");
  Error e;
  e.set_code(ERR_NOT_FOUND);
  e.set_message("x");
  add("error-frame", 11, Framed(t(MessageType::kError), 7, e), "Error:OK ok");
  // A header that does not parse as its type.
  std::vector<uint8_t> bad_proto(kFrameHeaderBytes);
  EncodeFrameHeader({t(MessageType::kAppend), 0, 8, 3, 0}, bad_proto.data());
  bad_proto.insert(bad_proto.end(), {0xff, 0xff, 0xff});
  add("append-proto-junk", 64, bad_proto, "Append:InvalidArgument ok");
  // The decoder's header checks: magic, type, reserved fields, header and frame limits.
  std::vector<uint8_t> magic = hello;
  magic[0] ^= 1;
  add("bad-magic", 64, magic, "error:InvalidArgument");
  std::vector<uint8_t> type(kFrameHeaderBytes);
  EncodeFrameHeader({99, 0, 1, 0, 0}, type.data());
  add("unknown-type", 32, type, "error:InvalidArgument");
  std::vector<uint8_t> flags = hello;
  flags[6] = 1;
  add("nonzero-flags", 64, flags, "error:InvalidArgument");
  std::vector<uint8_t> reserved = hello;
  reserved[20] = 1;
  add("nonzero-reserved", 64, reserved, "error:InvalidArgument");
  std::vector<uint8_t> big_header(kFrameHeaderBytes);
  EncodeFrameHeader({t(MessageType::kHello), 0, 1, (1 << 16) + 1, 0}, big_header.data());
  add("header-over-limit", 32, big_header, "error:OutOfRange");
  std::vector<uint8_t> big_frame(kFrameHeaderBytes);
  EncodeFrameHeader({t(MessageType::kAppend), 0, 1, 16, 1 << 20}, big_frame.data());
  add("frame-over-limit", 32, big_frame, "error:OutOfRange");
  std::vector<uint8_t> huge(kFrameHeaderBytes);
  EncodeFrameHeader({t(MessageType::kAppend), 0, 1, 0, ~uint64_t{0}}, huge.data());
  add("payload-2-64", 1, huge, "error:OutOfRange");
  // A frame after the error is not decoded (the error is sticky).
  std::vector<uint8_t> after = magic;
  after.insert(after.end(), hello.begin(), hello.end());
  add("frame-after-error", 64, after, "error:InvalidArgument");
  add("torn-header", 5, std::vector<uint8_t>(hello.begin(), hello.begin() + 20), "ok+20");
  out.push_back({"empty", {}, "ok"});
  return out;
}

}  // namespace kvm::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvm::fuzz::Run(data, size, nullptr);
  return 0;
}
