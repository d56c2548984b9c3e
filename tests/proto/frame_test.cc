#include "proto/wire/frame.h"

#include <gtest/gtest.h>

#include <random>
#include <tuple>

#include "proto/kvm.pb.h"

namespace kvm::wire {
namespace {

kvm::ModelShape Shape() { return kvm::ModelShape{2, 8, 2, 32, kvm::DType::kF16, 7}; }

Append MakeAppend(uint64_t seq, uint64_t start, int n) {
  Append a;
  a.set_sequence_id(seq);
  a.set_start_position(start);
  for (int i = 0; i < n; ++i) a.add_token_ids(100 + i);
  return a;
}

TEST(FrameTest, RoundTripThroughTheStreamDecoderInAnyChunking) {
  const auto shape = Shape();
  std::vector<uint8_t> payload(AppendPayloadBytes(shape, 3));
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 7);
  std::vector<uint8_t> stream;
  for (uint64_t id = 1; id <= 3; ++id) {  // pipelined: three frames back to back
    auto f = EncodeFrame(static_cast<uint16_t>(MessageType::kAppend), id, MakeAppend(9, id * 3, 3),
                         payload);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  Heartbeat hb;
  hb.set_client_time_ns(123);
  auto f = EncodeFrame(static_cast<uint16_t>(MessageType::kHeartbeat), 4, hb);
  stream.insert(stream.end(), f.begin(), f.end());

  std::mt19937 rng(1);
  for (int trial = 0; trial < 20; ++trial) {
    FrameDecoder dec;
    std::vector<Frame> got;
    for (size_t pos = 0; pos < stream.size();) {
      size_t n = std::min<size_t>(stream.size() - pos, 1 + rng() % (trial == 0 ? 1 : 200));
      ASSERT_TRUE(dec.Feed({stream.data() + pos, n}).ok());
      pos += n;
      Frame fr;
      while (dec.Next(&fr)) got.push_back(std::move(fr));
    }
    ASSERT_EQ(got.size(), 4u);
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(got[i].header.type, static_cast<uint16_t>(MessageType::kAppend));
      EXPECT_EQ(got[i].header.request_id, static_cast<uint64_t>(i + 1));
      Append a;
      ASSERT_TRUE(ParseProto(got[i], &a).ok());
      EXPECT_EQ(a.start_position(), static_cast<uint64_t>((i + 1) * 3));
      EXPECT_TRUE(ValidateAppend(a, shape, got[i].payload.size()).ok());
      EXPECT_EQ(got[i].payload, payload);
    }
    Heartbeat back;
    ASSERT_TRUE(ParseProto(got[3], &back).ok());
    EXPECT_EQ(back.client_time_ns(), 123u);
    EXPECT_EQ(dec.buffered(), 0u);
  }
}

TEST(FrameTest, TruncatedFrameYieldsNothingAndTruncatedHeaderIsAnError) {
  Hello h;
  h.set_protocol_version(kProtocolVersion);
  auto f = EncodeFrame(static_cast<uint16_t>(MessageType::kHello), 1, h);
  FrameDecoder dec;
  ASSERT_TRUE(dec.Feed({f.data(), f.size() - 1}).ok());
  Frame out;
  EXPECT_FALSE(dec.Next(&out));
  EXPECT_TRUE(DecodeFrameHeader({f.data(), 20}, {}).status().IsInvalidArgument());
}

TEST(FrameTest, LengthOverTheLimitIsRejectedBeforeAllocation) {
  FrameLimits lim;
  lim.max_frame_bytes = 1 << 20;
  FrameHeader h{static_cast<uint16_t>(MessageType::kAppend), 0, 5, 10, 1ull << 60};
  uint8_t hdr[kFrameHeaderBytes];
  EncodeFrameHeader(h, hdr);
  FrameDecoder dec(lim);
  Status s = dec.Feed(hdr);
  EXPECT_TRUE(s.IsOutOfRange()) << s.ToString();
  EXPECT_EQ(dec.buffered(), 0u);              // nothing of the claimed size was allocated
  EXPECT_TRUE(dec.Feed(hdr).IsOutOfRange());  // sticky
  h.payload_len = 0;
  h.header_len = lim.max_header_bytes + 1;
  EncodeFrameHeader(h, hdr);
  EXPECT_TRUE(DecodeFrameHeader(hdr, lim).status().IsOutOfRange());
}

TEST(FrameTest, AllowedButLargeFrameGrowsOnlyWithArrivingBytes) {
  FrameHeader h{static_cast<uint16_t>(MessageType::kAppend), 0, 5, 0, 200ull << 20};
  uint8_t hdr[kFrameHeaderBytes];
  EncodeFrameHeader(h, hdr);
  FrameDecoder dec;
  ASSERT_TRUE(dec.Feed(hdr).ok());
  std::vector<uint8_t> some(1000, 1);
  ASSERT_TRUE(dec.Feed(some).ok());
  EXPECT_EQ(dec.buffered(), kFrameHeaderBytes + 1000);
}

TEST(FrameTest, UnknownTypeBadMagicAndReservedBitsAreErrors) {
  FrameHeader h{999, 0, 1, 0, 0};
  uint8_t hdr[kFrameHeaderBytes];
  EncodeFrameHeader(h, hdr);
  Status s = DecodeFrameHeader(hdr, {}).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("unknown message type 999"), std::string::npos);
  h.type = static_cast<uint16_t>(MessageType::kStats);
  EncodeFrameHeader(h, hdr);
  hdr[0] ^= 1;
  EXPECT_TRUE(DecodeFrameHeader(hdr, {}).status().IsInvalidArgument());
  hdr[0] ^= 1;
  hdr[6] = 1;  // flags
  EXPECT_TRUE(DecodeFrameHeader(hdr, {}).status().IsInvalidArgument());
  EXPECT_STREQ(MessageTypeName(ReplyType(MessageType::kRetrieveLayer)), "RetrieveLayerReply");
}

TEST(FrameTest, MalformedProtobufHeaderIsInvalidArgument) {
  Frame f;
  f.header.type = static_cast<uint16_t>(MessageType::kAppend);
  f.proto = {0xff, 0xff, 0xff, 0xff, 0xff};
  Append a;
  Status s = ParseProto(f, &a);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("Append"), std::string::npos);
}

TEST(FrameTest, WrongProtocolVersionIsFailedPrecondition) {
  Hello h;
  h.set_protocol_version(7);
  EXPECT_TRUE(CheckHello(h).IsFailedPrecondition());
  h.set_protocol_version(kProtocolVersion);
  EXPECT_TRUE(CheckHello(h).ok());
}

TEST(FrameTest, PayloadNotMatchingTheShapeIsRejected) {
  const auto shape = Shape();
  Append a = MakeAppend(1, 0, 4);
  const uint64_t want = AppendPayloadBytes(shape, 4);
  EXPECT_EQ(want, 2ull * 2 * 2 * 4 * 32 * 2);
  EXPECT_TRUE(ValidateAppend(a, shape, want).ok());
  Status s = ValidateAppend(a, shape, want - 2);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("need"), std::string::npos);
  EXPECT_TRUE(ValidateAppend(MakeAppend(1, 0, 0), shape, 0).IsInvalidArgument());

  const uint32_t heads[] = {0, 1};
  const uint64_t q = 2ull * 4 * 32 * 4;
  EXPECT_TRUE(ValidateQueries(1, heads, shape, 0, q).ok());
  EXPECT_TRUE(ValidateQueries(2, heads, shape, 0, q).IsInvalidArgument());      // layer
  EXPECT_TRUE(ValidateQueries(1, heads, shape, 0, q + 4).IsInvalidArgument());  // size
  const uint32_t dup[] = {1, 1};
  EXPECT_TRUE(ValidateQueries(1, dup, shape, 0, q).IsInvalidArgument());
  const uint32_t out[] = {2};
  EXPECT_TRUE(ValidateQueries(1, out, shape, 0, q / 2).IsInvalidArgument());
  // Pending K rows (fp16 here) follow the queries.
  const uint64_t pending = 2ull * 3 * 32 * 2;
  EXPECT_TRUE(ValidateQueries(1, heads, shape, 3, q + pending).ok());
  EXPECT_TRUE(ValidateQueries(1, heads, shape, 3, q).IsInvalidArgument());
}

TEST(FrameTest, ShapeConvertsBothWaysAndIsValidated) {
  wire::ModelShape w;
  ToWire(Shape(), &w);
  EXPECT_EQ(*FromWire(w), Shape());
  w.set_head_dim(48);
  EXPECT_TRUE(FromWire(w).status().IsInvalidArgument());
  w.set_head_dim(32);
  w.set_dtype(wire::DTYPE_UNSPECIFIED);
  EXPECT_TRUE(FromWire(w).status().IsInvalidArgument());
}

TEST(FrameTest, ErrorCodesComeBackAsStatus) {
  EXPECT_TRUE(StatusFromWire(10, "full").IsNoSpace());
  EXPECT_TRUE(StatusFromWire(0, "?").IsInternal());
  EXPECT_TRUE(StatusFromWire(77, "?").IsInternal());
}

// A retrieval reply of `heads` KV heads, each with `sends` sent blocks and as many evictions.
RetrieveLayerReply Reply(uint32_t heads, uint32_t sends) {
  RetrieveLayerReply r;
  r.set_layer(3);
  r.set_hot_set_generation(9);
  r.add_shared_layers(4);
  for (uint32_t h = 0; h < heads; ++h) {
    HeadSelection* s = r.add_heads();
    s->set_layer(3);
    s->set_kv_head(h);
    for (uint32_t i = 0; i < sends; ++i) {
      s->add_block_indices(1000000ull * h + 7 * i);
      s->add_slots(i);
      s->add_evicted_slots(sends + i);
    }
    s->add_local_fill_blocks(99);
    s->add_local_fill_slots(2 * sends);
    for (int j = 0; j < 4; ++j) {
      s->add_delta(0.01f * j);
      s->add_log_delta(-1.0 - j);
    }
    s->set_k_max(3.5f);
    s->set_anchor(true);
    s->set_key_radius(2.25f);
    for (int j = 0; j < 4 * 64; ++j) s->add_split_dir(0.001f * j - 0.1f);  // [group][head_dim]
    for (int j = 0; j < 4; ++j) s->add_dropped_radius(1.0f + j);
    s->set_reuse_steps(12);
    s->set_slot_digest(0xabcdef0123456789ull + h);
  }
  return r;
}

TEST(FrameTest, ARetrievalReplySplitsIntoPartsThatFitAndJoinsBack) {
  for (const auto& [heads, sends, limit] : std::vector<std::tuple<uint32_t, uint32_t, size_t>>{
           {4, 3, 8192}, {8, 200, 8192}, {2, 6000, 8192}, {1, 900, 1024}, {1, 10, 400}}) {
    const RetrieveLayerReply r = Reply(heads, sends);
    auto parts = SplitReply(r, 77, limit);
    ASSERT_TRUE(parts.ok()) << parts.status().ToString();
    std::vector<PartBlock> order;
    for (const DataPart& p : *parts) {
      EXPECT_LE(p.ByteSizeLong(), limit);
      EXPECT_EQ(p.request_id(), 77u);
      EXPECT_EQ(p.parts(), parts->size());
      for (const PartBlock& b : PartBlocks(p)) order.push_back(b);
    }
    if (heads == 4) EXPECT_EQ(parts->size(), 1u);             // small: one message
    if (sends == 6000) EXPECT_GT(parts->size(), 2u * heads);  // one head > the limit
    // The blocks in data order are every send, head by head, in order.
    ASSERT_EQ(order.size(), size_t(heads) * sends);
    for (uint32_t h = 0; h < heads; ++h)
      for (uint32_t i = 0; i < sends; ++i) {
        EXPECT_EQ(order[h * sends + i].kv_head, h);
        EXPECT_EQ(order[h * sends + i].slot, i);
        EXPECT_EQ(order[h * sends + i].layer, 3u);
      }
    // Joined in any order, the parts are the reply.
    std::vector<DataPart> shuffled(parts->rbegin(), parts->rend());
    auto back = JoinParts(shuffled);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->SerializeAsString(), r.SerializeAsString())
        << "heads " << heads << " sends " << sends;
    if (parts->size() > 1) {  // a lost or repeated part is refused
      std::vector<DataPart> lost(parts->begin() + 1, parts->end());
      EXPECT_TRUE(JoinParts(lost).status().IsInvalidArgument());
      std::vector<DataPart> twice = *parts;
      twice.back() = twice.front();
      EXPECT_TRUE(JoinParts(twice).status().IsInvalidArgument());
    }
  }
  EXPECT_TRUE(SplitReply(Reply(1, 10), 1, 100).status().IsInvalidArgument());
  EXPECT_TRUE(JoinParts({}).status().IsInvalidArgument());
}

TEST(FrameTest, AnAppendMayLeaveOutTheKRowsARetrievalCarried) {
  const kvm::ModelShape shape{2, 4, 2, 32, kvm::DType::kF16, 1};
  Append a;
  a.add_token_ids(5);
  const uint64_t full = AppendPayloadBytes(shape, 1);
  EXPECT_TRUE(ValidateAppend(a, shape, full).ok());
  a.add_k_from_retrieval(0);
  a.add_k_from_retrieval(3);
  EXPECT_EQ(AppendPayloadBytes(shape, 1, 2), full - 2 * 32 * 2);
  EXPECT_TRUE(ValidateAppend(a, shape, full - 2 * 32 * 2).ok());
  EXPECT_TRUE(ValidateAppend(a, shape, full).IsInvalidArgument());  // the rows are not there
  a.add_k_from_retrieval(3);
  EXPECT_TRUE(ValidateAppend(a, shape, full - 3 * 32 * 2).IsInvalidArgument());  // twice
  a.clear_k_from_retrieval();
  a.add_k_from_retrieval(4);  // 2 layers x 2 KV heads: 0..3
  EXPECT_TRUE(ValidateAppend(a, shape, full - 32 * 2).IsInvalidArgument());
}

TEST(FrameTest, HostPortParsing) {
  auto a = ParseHostPort("127.0.0.1:7420");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->first, "127.0.0.1");
  EXPECT_EQ(a->second, 7420);
  auto b = ParseHostPort("[::1]:0");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->first, "::1");
  EXPECT_EQ(b->second, 0);
  for (const char* bad : {"nohost", ":80", "h:", "h:99999", "h:12x", "[::1]80", "[::1"})
    EXPECT_TRUE(ParseHostPort(bad).status().IsInvalidArgument()) << bad;
}

}  // namespace
}  // namespace kvm::wire
