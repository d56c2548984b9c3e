// libFuzzer target for the request handler: arbitrary requests of every message type through
// RequestHandler::Handle, on one block store per process (RocksDB on its in-memory Env: opening a
// store per input takes 15-20 ms), with the retrieval engine, metrics and an in-process data plane.
// Every reply must be one well-formed frame of the request's id: the request's reply type parsing
// as its reply message, or an Error frame with a non-OK code; a data-plane retrieval's reply is its
// active messages, which must join into a RetrieveLayerReply. Nothing may crash, hang or leak.
//
// Input: byte 0 is the session's setup, then records until the input ends (a read past the end
// gives zeros; a length past the end is cut there):
//   byte 0   bit 0: no Hello first (the session starts unauthenticated)
//            bit 1: the peer is a loopback address
//            bit 2: the first Hello names the fuzzer's in-process worker (retrievals on the data
//                   plane)
//            bit 3: the first Hello is tenant "quota" (quotas and a connection limit), else "fuzz"
//   record   byte T: bits 0-3 the type: 1..14 the requests of proto/wire/frame.h, 0 Error,
//                    15 a raw u16 type follows; bit 4 sets the reply bit; bit 5 the payload is
//                    generated (below); bit 6 first advances the store's lease clock by an hour and
//                    expires the leases that ran out (as kvmanager's main loop does)
//            u16 n, then n bytes: the protobuf header
//            u16 n: literal: then n bytes of payload; generated: then one seed byte, and the
//                   payload is 2n bytes of finite fp16-like values from that seed
// Each record becomes a wire frame (request id = its index + 1) fed to one FrameDecoder, as the
// server does for a connection: a decoder error ends the input. After each input every sequence of
// every tenant is deleted through the handler, so each input starts from an empty store (state and
// memory stay bounded over millions of runs, and a crasher reproduces alone).
//
// KVM_FUZZ_VERBOSE=1 prints each error reply's message (`handler_fuzz_replay --verdict FILE`).
//
// Verdict (fuzz_target.h): one token per request, its reply's status code ("OK", "NotFound", ...;
// "Parts" for a retrieval answered on the data plane), then "decoder:<code>" when the decoder
// refused the stream.
#include <google/protobuf/stubs/logging.h>
#include <rocksdb/env.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_target.h"
#include "kvmanager/block_store.h"
#include "kvmanager/handler.h"
#include "kvmanager/metrics.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"
#include "selector/wire_options.h"
#include "transport/transport.h"

namespace kvm::fuzz {
namespace {

using wire::MessageType;

constexpr uint64_t kMaxFrameBytes = 8 << 20;
constexpr uint64_t kHostBytes = 1 << 20;  // small: appends spill to the (in-memory) disk tier
const char* const kTenants[][2] = {
    {"fuzz", "fuzz-token"}, {"quota", "quota-token"}, {"local", "local-token"}};

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "handler_fuzzer: %s\n", what.c_str());
  std::abort();
}

// One per process, never destroyed (reachable from a static: not a leak).
struct Harness {
  rocksdb::Env* env = nullptr;
  int64_t now_ms = 1;  // the store's lease clock
  std::unique_ptr<store::BlockStore> store;
  std::unique_ptr<server::Metrics> metrics;
  std::unique_ptr<transport::Transport> service_dp, worker_dp;
  std::unique_ptr<server::RequestHandler> handler;
  std::vector<uint8_t> landing;       // where the data plane's blocks land
  std::vector<wire::DataPart> parts;  // the active messages received for the request in flight
};

Harness& H() {
  static Harness* h = [] {
    // protobuf logs every string field that is not UTF-8 when parsing: most fuzzed inputs.
    google::protobuf::SetLogHandler(nullptr);
    auto* x = new Harness;
    x->env = rocksdb::NewMemEnv(rocksdb::Env::Default());
    store::StoreOptions so;
    so.dir = "/fuzz-store";
    so.env = x->env;
    so.gpu = false;
    so.host_capacity_bytes = kHostBytes;
    so.now_ms = [x] { return x->now_ms; };
    auto st = store::BlockStore::Open(so);
    if (!st.ok()) Fail("store: " + st.status().ToString());
    x->store = std::move(*st);
    server::HandlerOptions ho;
    ho.tenants = {{kTenants[0][0], kTenants[0][1]},
                  {kTenants[1][0], kTenants[1][1]},
                  {kTenants[2][0], kTenants[2][1], /*loopback_only=*/true}};
    ho.tenants[1].max_sequences = 3;
    ho.tenants[1].max_stored_bytes = 64 << 10;
    ho.tenants[1].max_connections = 2;
    x->store->SetQuotas(server::StoreQuotas(ho.tenants));
    ho.limits.max_frame_bytes = kMaxFrameBytes;
    x->metrics = std::make_unique<server::Metrics>();
    ho.metrics = x->metrics.get();
    x->service_dp = transport::MakeInProcess();
    x->worker_dp = transport::MakeInProcess();
    ho.data_plane = x->service_dp.get();
    x->worker_dp->SetReceiver(
        [x](std::span<const uint8_t> header,
            size_t len) -> Result<std::vector<transport::Segment>> {
          wire::DataPart p;
          if (!p.ParseFromArray(header.data(), int(header.size())))
            Fail("a data-plane part's header does not parse");
          if (len > 2 * kMaxFrameBytes) Fail("a data-plane part over the reply limit");
          x->landing.resize(std::max<size_t>(len, 1));
          return std::vector<transport::Segment>{{x->landing.data(), len}};
        },
        [x](std::span<const uint8_t> header, const Status& st) {
          if (!st.ok()) Fail("a data-plane part did not land: " + st.ToString());
          wire::DataPart p;
          if (!p.ParseFromArray(header.data(), int(header.size())))
            Fail("a delivered part's header does not parse");
          x->parts.push_back(std::move(p));
        });
    x->handler = std::make_unique<server::RequestHandler>(x->store.get(), ho);
    return x;
  }();
  return *h;
}

std::unique_ptr<google::protobuf::Message> ReplyMessage(uint16_t request_type) {
  switch (static_cast<MessageType>(request_type)) {
    case MessageType::kHello:
      return std::make_unique<wire::HelloReply>();
    case MessageType::kCreateSequence:
      return std::make_unique<wire::CreateSequenceReply>();
    case MessageType::kAppend:
      return std::make_unique<wire::AppendReply>();
    case MessageType::kPrefixLookup:
      return std::make_unique<wire::PrefixLookupReply>();
    case MessageType::kTruncate:
      return std::make_unique<wire::TruncateReply>();
    case MessageType::kRetrieveLayer:
      return std::make_unique<wire::RetrieveLayerReply>();
    case MessageType::kSetLayerMap:
      return std::make_unique<wire::SetLayerMapReply>();
    case MessageType::kAudit:
      return std::make_unique<wire::AuditReply>();
    case MessageType::kReadBlocks:
      return std::make_unique<wire::ReadBlocksReply>();
    case MessageType::kDeleteSequence:
      return std::make_unique<wire::DeleteSequenceReply>();
    case MessageType::kListSequences:
      return std::make_unique<wire::ListSequencesReply>();
    case MessageType::kStats:
      return std::make_unique<wire::StatsReply>();
    case MessageType::kHeartbeat:
      return std::make_unique<wire::HeartbeatReply>();
    case MessageType::kCorrect:
      return std::make_unique<wire::CorrectReply>();
    default:
      return nullptr;
  }
}

// Handles `f` on session `s`, checks the reply and returns its verdict token; *reply_frame gets
// the decoded reply (unset for a data-plane one).
std::string Call(Harness& h, server::SessionState& s, const wire::Frame& f,
                 wire::Frame* reply_frame = nullptr) {
  const uint64_t id = f.header.request_id;
  std::atomic<bool> done{false};
  std::vector<uint8_t> reply;
  h.parts.clear();
  h.handler->Handle(s, f, [&](std::vector<uint8_t> frame) {
    reply = std::move(frame);
    done.store(true);
  });
  if (!done.load()) {
    if (!s.data_peer) Fail("no reply, and the session has no data plane");
    (void)h.worker_dp->WaitFor([&] { return done.load(); }, 10000);
    if (!done.load()) Fail("no reply within 10 s");
  }
  if (reply.empty()) {  // the active messages were the reply
    if (f.header.type != static_cast<uint16_t>(MessageType::kRetrieveLayer) || !s.data_peer)
      Fail("an empty reply to a " + std::string(wire::MessageTypeName(f.header.type)));
    for (const auto& p : h.parts)
      if (p.request_id() != id) Fail("a data-plane part of another request");
    auto joined = wire::JoinParts(h.parts);
    if (!joined.ok()) Fail("the data-plane parts do not join: " + joined.status().ToString());
    return "Parts";
  }
  wire::FrameLimits limits;
  limits.max_header_bytes = 1u << 30;
  limits.max_frame_bytes = uint64_t{1} << 32;
  wire::FrameDecoder dec(limits);
  wire::Frame r;
  if (Status st = dec.Feed(reply); !st.ok()) Fail("the reply does not decode: " + st.ToString());
  if (!dec.Next(&r) || dec.buffered() != 0) Fail("the reply is not one whole frame");
  wire::Frame extra;
  if (dec.Next(&extra)) Fail("the reply is more than one frame");
  if (r.header.request_id != id) Fail("the reply has another request id");
  std::string token;
  if (r.header.type == static_cast<uint16_t>(MessageType::kError)) {
    wire::Error e;
    if (!wire::ParseProto(r, &e).ok()) Fail("an Error reply does not parse");
    if (e.code() == wire::ERR_OK || e.code() > wire::ErrorCode_MAX)
      Fail("an Error reply with code " + std::to_string(e.code()));
    if (!r.payload.empty()) Fail("an Error reply with a payload");
    token = StatusCodeName(StatusCodeFromWire(e.code()));
    static const bool verbose = std::getenv("KVM_FUZZ_VERBOSE") != nullptr;
    if (verbose)
      std::fprintf(stderr, "  %s %llu: %s: %s\n", wire::MessageTypeName(f.header.type),
                   static_cast<unsigned long long>(id), token.c_str(), e.message().c_str());
  } else {
    const uint16_t type = f.header.type;
    if ((type & wire::kReplyBit) || r.header.type != (type | wire::kReplyBit))
      Fail(std::string("a ") + wire::MessageTypeName(r.header.type) + " answers a " +
           wire::MessageTypeName(type));
    auto m = ReplyMessage(type);
    if (!m || !wire::ParseProto(r, m.get()).ok())
      Fail(std::string("a ") + wire::MessageTypeName(r.header.type) + " does not parse");
    token = "OK";
  }
  if (reply_frame) *reply_frame = std::move(r);
  return token;
}

wire::Frame MakeFrame(MessageType t, uint64_t id, const google::protobuf::MessageLite& m) {
  wire::Frame f;
  f.header.type = static_cast<uint16_t>(t);
  f.header.request_id = id;
  const std::string b = m.SerializeAsString();
  f.proto.assign(b.begin(), b.end());
  f.header.header_len = uint32_t(f.proto.size());
  return f;
}

std::string HelloAs(Harness& h, server::SessionState& s, int tenant, bool data_plane) {
  wire::Hello m;
  m.set_protocol_version(wire::kProtocolVersion);
  m.set_tenant(kTenants[tenant][0]);
  m.set_auth_token(kTenants[tenant][1]);
  if (data_plane) {
    const auto a = h.worker_dp->address();
    m.set_ucx_worker_address(std::string(a.begin(), a.end()));
  }
  return Call(h, s, MakeFrame(MessageType::kHello, 0, m));
}

// Deletes every sequence of every tenant through the handler (the engine forgets them too).
void DeleteAll(Harness& h) {
  for (int t = 0; t < 3; ++t) {
    if (h.store->List(kTenants[t][0]).empty()) continue;
    server::SessionState s;
    s.loopback = true;
    if (HelloAs(h, s, t, false) != "OK") Fail("the clean-up Hello failed");
    for (const auto& info : h.store->List(kTenants[t][0])) {
      wire::DeleteSequence d;
      d.set_sequence_id(info.id);
      if (Call(h, s, MakeFrame(MessageType::kDeleteSequence, 1, d)) != "OK")
        Fail("deleting sequence " + std::to_string(info.id) + " failed");
    }
    h.handler->Close(s);
    if (!h.store->List(kTenants[t][0]).empty()) Fail("sequences left after deleting them all");
  }
  if (h.store->Usage(kTenants[1][0]).stored_bytes != 0)
    Fail("the quota tenant's usage is not zero without sequences");
}

// Reads the input (zeros past its end).
struct Reader {
  const uint8_t* p;
  size_t n;
  bool empty() const { return n == 0; }
  uint8_t u8() {
    if (!n) return 0;
    --n;
    return *p++;
  }
  uint16_t u16() {
    const uint16_t lo = u8();
    return uint16_t(lo | (uint16_t(u8()) << 8));
  }
  std::vector<uint8_t> bytes(size_t want) {
    const size_t k = std::min(want, n);
    std::vector<uint8_t> out(p, p + k);
    p += k;
    n -= k;
    return out;
  }
};

// Not instrumented for coverage: its loop's comparisons are no feature of the code under test.
#if defined(__clang__)
#define KVM_NO_COVERAGE __attribute__((no_sanitize("coverage")))
#else
#define KVM_NO_COVERAGE
#endif
KVM_NO_COVERAGE std::vector<uint8_t> Generated(size_t elems, uint8_t seed) {
  std::vector<uint8_t> out(elems * 2);
  uint32_t x = 0x9e3779b9u ^ seed;
  for (size_t i = 0; i < elems; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    // sign, exponent 13..16 (|v| in [2^-2, 2^2)), mantissa: finite as fp16, bf16 and fp32 halves
    const uint16_t v = uint16_t((x & 0x8000) | ((13 + ((x >> 20) & 3)) << 10) | (x & 0x3ff));
    std::memcpy(&out[2 * i], &v, 2);
  }
  return out;
}

void Run(const uint8_t* data, size_t size, std::string* verdict) {
  Harness& h = H();
  Reader in{data, size};
  const uint8_t setup = in.u8();
  server::SessionState s;
  s.loopback = setup & 2;
  if (!(setup & 1)) {
    const std::string v = HelloAs(h, s, (setup & 8) ? 1 : 0, setup & 4);
    if (v != "OK") Fail("the session's Hello failed: " + v);
  }
  auto token = [&](const std::string& t) {
    if (verdict) *verdict += (verdict->empty() ? "" : " ") + t;
  };
  wire::FrameLimits limits;
  limits.max_frame_bytes = kMaxFrameBytes;
  wire::FrameDecoder dec(limits);
  const auto service_address = h.service_dp->address();
  for (uint64_t id = 1; !in.empty(); ++id) {
    const uint8_t t = in.u8();
    uint16_t type = t & 15;
    if (type == 0) type = static_cast<uint16_t>(MessageType::kError);
    if (type == 15) type = in.u16();
    if (t & 0x10) type |= wire::kReplyBit;
    const std::vector<uint8_t> proto = in.bytes(in.u16());
    const uint16_t n = in.u16();
    const std::vector<uint8_t> payload = (t & 0x20) ? Generated(n, in.u8()) : in.bytes(n);
    if (t & 0x40) {
      h.now_ms += 3600 * 1000;
      if (auto e = h.handler->ExpireLeases(); !e.ok())
        Fail("expiring leases: " + e.status().ToString());
    }
    std::vector<uint8_t> bytes(wire::kFrameHeaderBytes);
    wire::EncodeFrameHeader({type, 0, id, uint32_t(proto.size()), payload.size()}, bytes.data());
    bytes.insert(bytes.end(), proto.begin(), proto.end());
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    if (Status st = dec.Feed(bytes); !st.ok()) {
      token("decoder:" + std::string(StatusCodeName(st.code())));
      break;
    }
    wire::Frame f;
    if (!dec.Next(&f) || dec.Next(&f)) Fail("a record is not one frame");
    if (f.header.type == static_cast<uint16_t>(MessageType::kHello)) {
      // In-process transports share one registry: a Hello naming the service's own data plane
      // would make the service send to itself, which only the UCX one progresses. Name the
      // worker's instead.
      wire::Hello m;
      if (m.ParseFromArray(f.proto.data(), int(f.proto.size())) &&
          m.ucx_worker_address() == std::string(service_address.begin(), service_address.end())) {
        const auto a = h.worker_dp->address();
        m.set_ucx_worker_address(std::string(a.begin(), a.end()));
        const std::string b = m.SerializeAsString();
        f.proto.assign(b.begin(), b.end());
        f.header.header_len = uint32_t(f.proto.size());
      }
    }
    token(Call(h, s, f));
  }
  h.handler->Close(s);
  DeleteAll(h);
}

// ---- Seeds ----

// Builds an input: the setup byte, then records.
struct Input {
  std::vector<uint8_t> b;
  explicit Input(uint8_t setup) { b.push_back(setup); }
  void U16(size_t v) {
    if (v > 0xffff) Fail("a seed's length over 16 bits");
    b.push_back(uint8_t(v));
    b.push_back(uint8_t(v >> 8));
  }
  Input& Raw(uint8_t t, const std::string& proto, const std::vector<uint8_t>& payload = {}) {
    b.push_back(t);
    U16(proto.size());
    b.insert(b.end(), proto.begin(), proto.end());
    U16(payload.size());
    b.insert(b.end(), payload.begin(), payload.end());
    return *this;
  }
  Input& Add(MessageType t, const google::protobuf::MessageLite& m,
             const std::vector<uint8_t>& payload = {}) {
    return Raw(uint8_t(t), m.SerializeAsString(), payload);
  }
  // A generated payload of `bytes` (even) bytes.
  Input& Gen(MessageType t, const google::protobuf::MessageLite& m, size_t bytes, uint8_t seed = 1,
             uint8_t flags = 0) {
    const std::string p = m.SerializeAsString();
    b.push_back(uint8_t(uint8_t(t) | 0x20 | flags));
    U16(p.size());
    b.insert(b.end(), p.begin(), p.end());
    U16(bytes / 2);
    b.push_back(seed);
    return *this;
  }
};

constexpr uint32_t L = 2, Hq = 4, Hkv = 2, D = 32, B = 4;
const ModelShape kShape{L, Hq, Hkv, D, DType::kF16, 7};

wire::Hello HelloMsg(int tenant, uint32_t version = wire::kProtocolVersion) {
  wire::Hello m;
  m.set_protocol_version(version);
  m.set_tenant(kTenants[tenant][0]);
  m.set_auth_token(kTenants[tenant][1]);
  return m;
}

wire::CreateSequence CreateMsg(uint64_t id, const std::string& selector = "",
                               wire::Durability d = wire::DURABLE) {
  wire::CreateSequence c;
  c.set_sequence_id(id);
  wire::ToWire(kShape, c.mutable_shape());
  c.set_block_size(B);
  c.set_durability(d);
  if (!selector.empty()) {
    sel::SelectorOptions o;
    o.geometry = {B, 4, 4};
    o.budget_tokens = 16;
    o.prhs.max_cluster_steps = 4;
    sel::ToWire({selector, o}, c.mutable_selector());
    c.set_hot_set_slots(64);
  }
  return c;
}

wire::Append AppendMsg(uint64_t id, uint64_t from, uint64_t n) {
  wire::Append a;
  a.set_sequence_id(id);
  a.set_start_position(from);
  for (uint64_t t = from; t < from + n; ++t) a.add_token_ids(uint32_t(100 + t));
  return a;
}
size_t AppendBytes(uint64_t n) { return wire::AppendPayloadBytes(kShape, n); }
// fp32 queries of `heads` groups + `pending` K rows per head.
size_t QueryBytes(size_t heads, uint32_t pending = 0) {
  return heads * (Hq / Hkv) * D * 4 + heads * pending * D * 2;
}

wire::RetrieveLayer RetrieveMsg(uint64_t id, uint64_t step, uint32_t layer,
                                std::vector<uint32_t> heads, uint32_t pending = 0) {
  wire::RetrieveLayer r;
  r.set_sequence_id(id);
  r.set_step(step);
  r.set_layer(layer);
  for (uint32_t x : heads) r.add_kv_heads(x);
  r.set_pending_tokens(pending);
  return r;
}

}  // namespace

std::string Verdict(const uint8_t* data, size_t size) {
  std::string v;
  Run(data, size, &v);
  return v;
}

std::vector<Seed> Seeds() {
  std::vector<Seed> out;
  auto add = [&](std::string name, const Input& in, std::string verdict) {
    out.push_back({std::move(name), in.b, std::move(verdict)});
  };
  const wire::ListSequences list;
  // ---- Auth ----
  add("unauth-list", Input(1).Add(MessageType::kListSequences, list), "Unauthenticated");
  {
    wire::Hello wrong = HelloMsg(0);
    wrong.set_auth_token("nope");
    add("unauth-wrong-token",
        Input(1).Add(MessageType::kHello, wrong).Add(MessageType::kStats, wire::Stats()),
        "Unauthenticated Unauthenticated");
  }
  add("unauth-hello-then-list",
      Input(1).Add(MessageType::kHello, HelloMsg(0)).Add(MessageType::kListSequences, list),
      "OK OK");
  add("hello-version-1", Input(1).Add(MessageType::kHello, HelloMsg(0, 1)), "FailedPrecondition");
  add("hello-loopback-only", Input(1).Add(MessageType::kHello, HelloMsg(2)), "PermissionDenied");
  add("hello-loopback",
      Input(3).Add(MessageType::kHello, HelloMsg(2)).Add(MessageType::kStats, wire::Stats()),
      "OK OK");
  {
    wire::Hello dp = HelloMsg(0);
    dp.set_ucx_worker_address("not an address");
    add("hello-bad-worker-address", Input(1).Add(MessageType::kHello, dp), "OK");
  }
  // ---- Sequences: create, append, list, read, truncate, delete ----
  {
    wire::ReadBlocks rb;
    rb.set_sequence_id(7);
    rb.set_layer(1);
    rb.set_kv_head(1);
    rb.add_block_indices(0);
    rb.add_block_indices(1);
    rb.set_values(true);
    wire::Truncate tr;
    tr.set_sequence_id(7);
    tr.set_length(3);
    wire::DeleteSequence del;
    del.set_sequence_id(7);
    add("sequence-lifecycle",
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(7))
            .Gen(MessageType::kAppend, AppendMsg(7, 0, 6), AppendBytes(6))
            .Add(MessageType::kListSequences, list)
            .Add(MessageType::kReadBlocks, rb)
            .Add(MessageType::kTruncate, tr)
            .Add(MessageType::kDeleteSequence, del)
            .Add(MessageType::kDeleteSequence, del),
        "OK OK OK OK OK OK NotFound");
    wire::ReadBlocks far = rb;
    far.set_block_indices(1, 9);
    wire::Truncate longer = tr;
    longer.set_length(99);
    add("read-truncate-out-of-range",
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(7, "", wire::CACHE))
            .Gen(MessageType::kAppend, AppendMsg(7, 0, 6), AppendBytes(6))
            .Add(MessageType::kReadBlocks, far)
            .Add(MessageType::kTruncate, longer),
        "OK OK OutOfRange OutOfRange");
  }
  {
    wire::CreateSequence bad = CreateMsg(1);
    bad.mutable_shape()->set_head_dim(48);
    wire::CreateSequence b0 = CreateMsg(2);
    b0.set_block_size(0);
    add("create-twice-bad-shape-block-size",
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(1))
            .Add(MessageType::kCreateSequence, CreateMsg(1))
            .Add(MessageType::kCreateSequence, bad)
            .Add(MessageType::kCreateSequence, b0),
        "OK AlreadyExists InvalidArgument InvalidArgument");
  }
  {
    wire::CreateSequence at = CreateMsg(3, "prhs");
    at.set_attach(true);
    wire::CreateSequence at_b = at;
    at_b.set_block_size(8);
    wire::CreateSequence at_p = at;
    at_p.add_prefix_token_ids(1);
    add("create-attach",
        Input(0)
            .Add(MessageType::kCreateSequence, at)
            .Add(MessageType::kCreateSequence, CreateMsg(3))
            .Gen(MessageType::kAppend, AppendMsg(3, 0, 5), AppendBytes(5))
            .Add(MessageType::kCreateSequence, at)
            .Add(MessageType::kCreateSequence, at_b)
            .Add(MessageType::kCreateSequence, at_p),
        "NotFound OK OK OK FailedPrecondition InvalidArgument");
  }
  {
    wire::PrefixLookup pl;
    wire::ToWire(kShape, pl.mutable_shape());
    pl.set_block_size(B);
    for (uint32_t t = 0; t < 10; ++t) pl.add_token_ids(100 + t);
    wire::CreateSequence fromp = CreateMsg(21, "", wire::CACHE);
    for (uint32_t t = 0; t < 10; ++t) fromp.add_prefix_token_ids(100 + t);
    wire::ReadBlocks rb;
    rb.set_sequence_id(21);
    rb.add_block_indices(1);
    wire::PrefixLookup bad = pl;
    bad.mutable_shape()->set_kv_heads(3);
    add("prefix-lookup-and-create-from-prefix",
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(20))
            .Gen(MessageType::kAppend, AppendMsg(20, 0, 9), AppendBytes(9))
            .Add(MessageType::kPrefixLookup, pl)
            .Add(MessageType::kCreateSequence, fromp)
            .Add(MessageType::kReadBlocks, rb)
            .Add(MessageType::kPrefixLookup, bad),
        "OK OK OK OK OK InvalidArgument");
  }
  {
    wire::CreateSequence leased = CreateMsg(30, "", wire::CACHE);
    leased.set_lease_ms(60 * 1000);
    wire::CreateSequence year = CreateMsg(31);
    year.set_lease_ms(uint64_t{400} * 24 * 3600 * 1000);
    wire::CreateSequence both = CreateMsg(32);
    both.set_attach(true);
    both.set_lease_ms(5);
    wire::Heartbeat hb;
    hb.add_renew_sequences(30);
    hb.add_renew_sequences(33);
    Input in(0);
    in.Add(MessageType::kCreateSequence, leased)
        .Add(MessageType::kHeartbeat, hb)
        .Add(MessageType::kCreateSequence, year)
        .Add(MessageType::kCreateSequence, both);
    // An hour later the lease ran out: the sequence is gone.
    in.Gen(MessageType::kAppend, AppendMsg(30, 0, 1), AppendBytes(1), 1, 0x40);
    in.Add(MessageType::kHeartbeat, hb);
    add("lease-expiry", in, "OK OK InvalidArgument InvalidArgument NotFound OK");
    // A sequence that expired with selector state, then a new one of the same id and another
    // shape, without a selector: it has no selector state (the expired one's is gone). Found by
    // this target: the new sequence used to retrieve with the expired one's selector and shape
    // (verdict "... InvalidArgument InvalidArgument OK").
    wire::CreateSequence sel = CreateMsg(40, "prhs", wire::CACHE);
    sel.set_lease_ms(1000);
    wire::CreateSequence other;
    other.set_sequence_id(40);
    wire::ToWire(ModelShape{1, 1, 1, 32, DType::kF16, 9}, other.mutable_shape());
    other.set_block_size(B);
    other.set_durability(wire::CACHE);
    Input again(0);
    again.Add(MessageType::kCreateSequence, sel)
        .Gen(MessageType::kAppend, AppendMsg(40, 0, 24), AppendBytes(24))
        .Gen(MessageType::kRetrieveLayer, RetrieveMsg(40, 23, 1, {1}), QueryBytes(1));
    again.b.push_back(uint8_t(MessageType::kCreateSequence) | 0x40);  // an hour later
    const std::string o = other.SerializeAsString();
    again.U16(o.size());
    again.b.insert(again.b.end(), o.begin(), o.end());
    again.U16(0);
    wire::Append one = AppendMsg(40, 0, 24);
    again
        .Gen(MessageType::kAppend, one, wire::AppendPayloadBytes({1, 1, 1, 32, DType::kF16, 9}, 24))
        .Gen(MessageType::kRetrieveLayer, RetrieveMsg(40, 23, 1, {1}), QueryBytes(1))
        .Gen(MessageType::kRetrieveLayer, RetrieveMsg(40, 23, 0, {0}), 32 * 4)
        .Gen(MessageType::kRetrieveLayer, RetrieveMsg(40, 23, 0, {0}), QueryBytes(1));
    add("lease-expiry-forgets-selector", again,
        "OK OK OK OK OK FailedPrecondition FailedPrecondition FailedPrecondition");
  }
  {
    wire::Append none = AppendMsg(5, 0, 0);
    wire::Append gap = AppendMsg(5, 9, 1);
    wire::Append k = AppendMsg(5, 0, 1);
    k.add_k_from_retrieval(0);
    add("append-malformed",
        Input(0)
            .Gen(MessageType::kAppend, AppendMsg(5, 0, 1), AppendBytes(1))
            .Add(MessageType::kCreateSequence, CreateMsg(5))
            .Gen(MessageType::kAppend, AppendMsg(5, 0, 2), AppendBytes(2) - 2)
            .Add(MessageType::kAppend, none)
            .Gen(MessageType::kAppend, gap, AppendBytes(1))
            .Gen(MessageType::kAppend, k, AppendBytes(1) - D * 2)
            .Gen(MessageType::kAppend, AppendMsg(5, 0, 2), AppendBytes(2))
            .Gen(MessageType::kAppend, AppendMsg(5, 0, 2), AppendBytes(2)),
        "NotFound OK InvalidArgument InvalidArgument FailedPrecondition FailedPrecondition OK OK");
  }
  // ---- The retrieval engine: every served selector, audit, correct, layer map, K once ----
  for (const std::string sel : {"prhs", "oracle", "quest", "streaming"}) {
    wire::Audit au;  // of the step layer 1 was retrieved at (an audit measures that step's set)
    au.set_sequence_id(9);
    au.set_step(24);
    au.set_layer(1);
    au.add_kv_heads(1);
    wire::Correct co;
    co.set_sequence_id(9);
    co.set_step(23);
    co.set_layer(0);
    auto* ch = co.add_heads();
    ch->set_kv_head(0);
    for (uint32_t b : {0u, 1u, 4u, 5u}) ch->add_attended(b);
    add("retrieve-" + sel,
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(9, sel, wire::CACHE))
            .Gen(MessageType::kAppend, AppendMsg(9, 0, 24), AppendBytes(24))
            .Gen(MessageType::kRetrieveLayer, RetrieveMsg(9, 23, 0, {0, 1}), QueryBytes(2))
            .Gen(MessageType::kRetrieveLayer, RetrieveMsg(9, 24, 1, {1}, 1), QueryBytes(1, 1), 2)
            .Gen(MessageType::kAudit, au, QueryBytes(1))
            .Gen(MessageType::kCorrect, co, QueryBytes(1)),
        "OK OK OK OK OK OK");
  }
  {
    wire::SetLayerMap lm;
    lm.set_sequence_id(9);
    lm.add_source_layer(0);
    lm.add_source_layer(0);
    wire::SetLayerMap deeper = lm;
    deeper.set_source_layer(0, 1);
    // The step's K row of (layer 1, head 1) came with the retrieval: the append leaves it out.
    wire::Append k = AppendMsg(9, 24, 1);
    k.add_k_from_retrieval(1 * Hkv + 1);
    add("retrieve-layer-map-k-once",
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(9, "prhs"))
            .Gen(MessageType::kAppend, AppendMsg(9, 0, 24), AppendBytes(24))
            .Add(MessageType::kSetLayerMap, lm)
            .Add(MessageType::kSetLayerMap, deeper)
            .Gen(MessageType::kRetrieveLayer, RetrieveMsg(9, 24, 1, {1}, 1), QueryBytes(1, 1))
            .Gen(MessageType::kAppend, k, AppendBytes(1) - D * 2),
        "OK OK OK InvalidArgument OK OK");
  }
  add("retrieve-data-plane",
      Input(4)
          .Add(MessageType::kCreateSequence, CreateMsg(9, "prhs", wire::CACHE))
          .Gen(MessageType::kAppend, AppendMsg(9, 0, 24), AppendBytes(24))
          .Gen(MessageType::kRetrieveLayer, RetrieveMsg(9, 23, 0, {0, 1}), QueryBytes(2))
          .Gen(MessageType::kRetrieveLayer, RetrieveMsg(9, 23, 2, {0}), QueryBytes(1))
          .Add(MessageType::kStats, wire::Stats()),
      "OK OK Parts InvalidArgument OK");
  {
    wire::CreateSequence h2o = CreateMsg(9, "prhs");
    h2o.mutable_selector()->set_name("h2o");
    wire::CreateSequence small = CreateMsg(10, "prhs");
    small.set_hot_set_slots(1);
    wire::Correct co;
    co.set_sequence_id(11);
    co.set_step(7);
    co.add_heads()->set_kv_head(0);
    add("retrieve-refused",
        Input(0)
            .Add(MessageType::kCreateSequence, h2o)
            .Add(MessageType::kCreateSequence, small)
            .Add(MessageType::kCreateSequence, CreateMsg(11))
            .Gen(MessageType::kAppend, AppendMsg(11, 0, 8), AppendBytes(8))
            .Gen(MessageType::kRetrieveLayer, RetrieveMsg(11, 7, 0, {0}), QueryBytes(1))
            .Gen(MessageType::kRetrieveLayer, RetrieveMsg(12, 7, 0, {0}), QueryBytes(1))
            .Gen(MessageType::kCorrect, co, QueryBytes(1))
            .Gen(MessageType::kCorrect, co, QueryBytes(1) - 4),
        "InvalidArgument InvalidArgument OK OK FailedPrecondition NotFound OK InvalidArgument");
  }
  // ---- Heartbeat and stats with worker reports ----
  {
    wire::Heartbeat hb;
    hb.set_client_time_ns(5);
    auto* w = hb.add_stats();
    w->set_sequence_id(9);
    w->add_gate_checks(3);
    auto* d = w->add_delta();
    d->set_kind(wire::BOUND);
    d->add_buckets(1);
    d->set_sum(0.5);
    wire::DeleteSequence del;
    del.set_sequence_id(9);
    *del.mutable_stats() = *w;
    add("heartbeat-stats",
        Input(0)
            .Add(MessageType::kCreateSequence, CreateMsg(9, "prhs", wire::CACHE))
            .Add(MessageType::kHeartbeat, hb)
            .Add(MessageType::kStats, wire::Stats())
            .Add(MessageType::kDeleteSequence, del),
        "OK OK OK OK");
  }
  // ---- Quotas ----
  add("quota-sequences",
      Input(8)
          .Add(MessageType::kCreateSequence, CreateMsg(1))
          .Add(MessageType::kCreateSequence, CreateMsg(2))
          .Add(MessageType::kCreateSequence, CreateMsg(3))
          .Add(MessageType::kCreateSequence, CreateMsg(4)),
      "OK OK OK NoSpace");
  add("quota-bytes",
      Input(8)
          .Add(MessageType::kCreateSequence, CreateMsg(1))
          .Gen(MessageType::kAppend, AppendMsg(1, 0, 100), AppendBytes(100))
          .Gen(MessageType::kAppend, AppendMsg(1, 0, 200), AppendBytes(200))
          .Add(MessageType::kListSequences, list),
      "OK OK NoSpace OK");
  // ---- Frames the handler refuses: replies, Error, junk headers, unknown types ----
  {
    Input in(0);
    in.Raw(uint8_t(MessageType::kStats) | 0x10, "");
    in.Raw(0, "");
    const std::string junk = "\xff\xff\xff\xff";
    for (MessageType t :
         {MessageType::kHello, MessageType::kCreateSequence, MessageType::kAppend,
          MessageType::kPrefixLookup, MessageType::kTruncate, MessageType::kRetrieveLayer,
          MessageType::kSetLayerMap, MessageType::kAudit, MessageType::kReadBlocks,
          MessageType::kDeleteSequence, MessageType::kListSequences, MessageType::kStats,
          MessageType::kHeartbeat, MessageType::kCorrect})
      in.Raw(uint8_t(t), junk);
    add("junk-headers", in,
        "InvalidArgument InvalidArgument InvalidArgument InvalidArgument InvalidArgument "
        "InvalidArgument InvalidArgument InvalidArgument InvalidArgument InvalidArgument "
        "InvalidArgument InvalidArgument OK OK InvalidArgument InvalidArgument");
    Input unknown(0);
    unknown.Add(MessageType::kStats, wire::Stats());
    unknown.b.push_back(15);
    unknown.U16(99);
    unknown.U16(0);
    unknown.U16(0);
    unknown.Add(MessageType::kStats, wire::Stats());
    add("unknown-type", unknown, "OK decoder:InvalidArgument");
  }
  // ---- Crashers the campaigns found, as found (fixed since) ----
  // A data-plane retrieval whose reply part sends no blocks: the in-process transport passed a
  // null data pointer to memcpy (length 0; UBSan: undefined behaviour in inproc.cc Deliver).
  {
    const uint8_t found[] = {
        0x04, 0x02, 0x61, 0x00, 0x08, 0x09, 0x12, 0x0c, 0x08, 0x02, 0x10, 0x04, 0x18, 0x02, 0x20,
        0x20, 0x28, 0x01, 0x30, 0x07, 0x18, 0x04, 0x38, 0x01, 0x40, 0x40, 0x4a, 0x49, 0x0a, 0x04,
        0x70, 0x72, 0x68, 0x73, 0x10, 0x04, 0x18, 0x04, 0x20, 0x10, 0x39, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0xe0, 0x3f, 0x41, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf0, 0xbf, 0x48, 0x01,
        0x50, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x58, 0x04, 0x71, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x3f, 0x79, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf0,
        0x3f, 0x91, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x3f, 0x00, 0x00, 0x23, 0x1c,
        0x00, 0x08, 0x09, 0x1a, 0x18, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
        0x6e, 0x6f, 0x70, 0x71, 0x72, 0x73, 0x03, 0x00, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x00,
        0x18, 0x24, 0x26, 0x08, 0x00, 0x08, 0x09, 0x10, 0x17, 0x22, 0x02, 0x00, 0x01, 0x00, 0x01,
        0x01, 0x26, 0x0b, 0x00, 0x08, 0x09, 0x18, 0x10, 0x18, 0x01, 0x22, 0x01, 0x01, 0x30, 0x01,
        0xa0, 0x00, 0x02, 0x28, 0x09, 0x00, 0x08, 0x09, 0x10, 0x17, 0x18, 0x01, 0x61, 0x70, 0x70,
        0x65, 0x6e, 0x64, 0x2e, 0x0c, 0x00, 0x08, 0x09, 0x10, 0x17, 0x22, 0x06, 0x12, 0x04, 0x00,
        0x01, 0x04, 0x05, 0x80, 0x00, 0x01};
    out.push_back({"crash-inproc-empty-part",
                   {found, found + sizeof(found)},
                   "OK OK Parts Parts InvalidArgument OK"});
  }
  // A CreateSequence whose hot_set_slots (136,314,879 per (layer, KV head)) made the retrieval
  // engine allocate its slot tables, 1 GB each: out of memory (now InvalidArgument, nothing
  // allocated).
  {
    const uint8_t found[] = {
        0xa4, 0x02, 0x64, 0x00, 0x08, 0x28, 0x12, 0x0c, 0x08, 0x02, 0x10, 0x04, 0x18, 0x02, 0x20,
        0x20, 0x28, 0x01, 0x30, 0x07, 0x18, 0x04, 0x38, 0x01, 0x40, 0xff, 0xff, 0xff, 0x40, 0x4a,
        0x49, 0x0a, 0x04, 0x70, 0x72, 0x68, 0x73, 0x10, 0x04, 0x18, 0x04, 0x20, 0x10, 0x39, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x3f, 0x41, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf0,
        0xbf, 0x48, 0x01, 0x50, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x58,
        0x04, 0x71, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x3f, 0x79, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0xf0, 0x3f, 0x91, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe8, 0x3f, 0xe0,
        0x60, 0x07, 0x00, 0x00, 0x23, 0x1c, 0x00, 0x08, 0x28, 0x1a, 0x18, 0x64, 0x65, 0x66, 0x67,
        0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x28, 0x70, 0x71, 0x72, 0x27, 0x74, 0x75, 0x76,
        0x77, 0x78, 0x79, 0x7a, 0x7b, 0x00, 0x18, 0x01, 0x26, 0x09, 0x00, 0x08, 0x28, 0x10, 0x17,
        0x18, 0x01, 0x22, 0x01, 0x01, 0x80, 0x00, 0x01, 0x42, 0x14, 0x00, 0x08, 0x0a, 0x12, 0x0c,
        0x08, 0x01, 0x10, 0x01, 0x18, 0x01, 0x20, 0x20, 0x28, 0x01, 0x38, 0x09, 0x18, 0x04, 0x38,
        0x09, 0x00, 0x00, 0x2b, 0x1c, 0x00, 0x08, 0x28, 0x1a, 0x18, 0x64, 0x66, 0x75, 0x7a, 0x7a,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x02, 0x7a, 0x7b, 0x00, 0x06, 0x01, 0x26, 0x09, 0x00, 0x0c, 0x28, 0x10, 0x01, 0x01,
        0x22, 0x18, 0x17, 0x01, 0x80, 0x00, 0x01, 0x29, 0x07, 0x00, 0xf8, 0xd6, 0x10, 0x17, 0x22,
        0x01, 0x00, 0x40, 0x00, 0x01, 0x26, 0x07, 0x70, 0x08, 0x28, 0x10, 0x17, 0x22, 0x01, 0x00,
        0x80, 0x00, 0x01};
    out.push_back({"oom-hot-set-slots", {found, found + sizeof(found)}, "InvalidArgument"});
  }
  // Every message type on a session that never said Hello.
  {
    Input in(1);
    for (uint8_t t = 2; t <= 14; ++t) in.Raw(t, "");
    std::string v;
    for (int i = 2; i <= 14; ++i) v += std::string(v.empty() ? "" : " ") + "Unauthenticated";
    add("unauth-every-type", in, v);
  }
  return out;
}

}  // namespace kvm::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)kvm::fuzz::H();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvm::fuzz::Run(data, size, nullptr);
  return 0;
}
