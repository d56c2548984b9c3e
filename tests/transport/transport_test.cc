// The data plane, one contract over in-process, UCX tcp (loopback) and UCX shared memory: a
// message's data lands byte-identical in the segments the receiver's placement chose (scattered
// hot-set slots), small (eager) and large (rendezvous); bad headers and gone peers are errors.
#include "transport/transport.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>

namespace kvm::transport {
namespace {

// The service side has a progress thread; a worker has none and progresses in WaitFor, so its
// placement and delivery callbacks run on the thread that reads what they wrote (transport.h).
std::unique_ptr<Transport> Make(const std::string& kind, bool service) {
  if (kind == "inproc") return MakeInProcess();
  if (kind == "ucx_tcp") {
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
  } else {
    setenv("UCX_TLS", "sm,self", 1);
    unsetenv("UCX_NET_DEVICES");
  }
  auto t = MakeUcx({.progress_thread = service});
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(*t) : nullptr;
}

class TransportTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TransportTest, BlocksLandByteIdenticalInTheChosenSlots) {
  auto service = Make(GetParam(), true);
  auto worker = Make(GetParam(), false);
  ASSERT_TRUE(service && worker);
  constexpr size_t kSlot = 8192, kSlots = 96;
  std::vector<uint8_t> hot(kSlots * kSlot, 0);
  ASSERT_TRUE(worker->Register(hot.data(), hot.size()).ok());
  // Header: [message id u32][n u32][slot u32 x n]; the data is n blocks of kSlot bytes.
  std::map<uint32_t, Status> delivered;
  worker->SetReceiver(
      [&](std::span<const uint8_t> h, size_t len) -> Result<std::vector<Segment>> {
        if (h.size() < 8) return Status::InvalidArgument("short header");
        uint32_t n;
        std::memcpy(&n, h.data() + 4, 4);
        if (h.size() != 8 + 4ull * n || len != n * kSlot)
          return Status::InvalidArgument("header and data disagree");
        std::vector<Segment> segs;
        for (uint32_t i = 0; i < n; ++i) {
          uint32_t slot;
          std::memcpy(&slot, h.data() + 8 + 4 * i, 4);
          if (slot >= kSlots) return Status::OutOfRange("slot");
          segs.push_back({hot.data() + slot * kSlot, kSlot});
        }
        return segs;
      },
      [&](std::span<const uint8_t> h, const Status& st) {
        uint32_t id;
        std::memcpy(&id, h.data(), 4);
        delivered[id] = st;
      });
  auto peer = service->Connect(worker->address());
  ASSERT_TRUE(peer.ok()) << peer.status().ToString();
  EXPECT_FALSE(service->Describe(*peer).empty());
  // Gathering pays over shared memory only (bench/RESULTS.md): the lanes decide, per peer.
  EXPECT_EQ(service->GatherPays(*peer), GetParam() == "ucx_sm") << service->Describe(*peer);

  std::mt19937 rng(3);
  std::vector<std::vector<uint8_t>> datas;
  std::vector<std::vector<uint32_t>> slots;
  std::atomic<int> sent{0};
  const std::vector<uint32_t> sizes = {1, 3, 64, 1, 32};  // eager and rendezvous
  uint32_t next_slot = 0;
  for (uint32_t id = 0; id < sizes.size(); ++id) {
    std::vector<uint32_t> sl;
    for (uint32_t i = 0; i < sizes[id]; ++i) sl.push_back((next_slot++ * 37) % kSlots);
    std::vector<uint8_t> d(sizes[id] * kSlot);
    for (auto& b : d) b = uint8_t(rng());
    datas.push_back(std::move(d));
    slots.push_back(sl);
  }
  for (uint32_t id = 0; id < sizes.size(); ++id) {
    std::vector<uint8_t> h(8 + 4 * sizes[id]);
    std::memcpy(h.data(), &id, 4);
    std::memcpy(h.data() + 4, &sizes[id], 4);
    std::memcpy(h.data() + 8, slots[id].data(), 4 * sizes[id]);
    ASSERT_TRUE(service
                    ->Send(*peer, h, datas[id],
                           [&](const Status& s) {
                             EXPECT_TRUE(s.ok()) << s.ToString();
                             ++sent;
                           })
                    .ok());
    std::fill(h.begin(), h.end(), 0xee);  // the transport owns a copy of the header
    // Each message is received before the next reuses slots (a retrieval waits for its blocks).
    ASSERT_TRUE(worker->WaitFor([&] { return delivered.count(id) > 0; }, 10000).ok()) << id;
    ASSERT_TRUE(delivered[id].ok()) << delivered[id].ToString();
    for (uint32_t i = 0; i < sizes[id]; ++i)
      ASSERT_EQ(std::memcmp(hot.data() + slots[id][i] * kSlot, datas[id].data() + i * kSlot, kSlot),
                0)
          << "message " << id << " block " << i;
  }
  ASSERT_TRUE(worker->WaitFor([&] { return sent == int(sizes.size()); }, 10000).ok());
  for (int i = 0; i < 200 && sent < int(sizes.size()); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(sent, int(sizes.size()));

  // A gathered send (blocks scattered at the sender, as in a tier) lands the same way.
  {
    std::vector<uint8_t> tier(8 * kSlot);
    for (auto& b : tier) b = uint8_t(rng());
    const uint32_t id = 50, n = 3, dst[3] = {5, 60, 7}, from[3] = {6, 1, 3};
    std::vector<uint8_t> h(8 + 4 * n);
    std::memcpy(h.data(), &id, 4);
    std::memcpy(h.data() + 4, &n, 4);
    std::memcpy(h.data() + 8, dst, 4 * n);
    std::vector<Segment> segs;
    for (uint32_t i = 0; i < n; ++i) segs.push_back({tier.data() + from[i] * kSlot, kSlot});
    ASSERT_TRUE(service->SendGather(*peer, h, segs, [](const Status&) {}).ok());
    ASSERT_TRUE(worker->WaitFor([&] { return delivered.count(id) > 0; }, 10000).ok());
    ASSERT_TRUE(delivered[id].ok()) << delivered[id].ToString();
    for (uint32_t i = 0; i < n; ++i)
      ASSERT_EQ(std::memcmp(hot.data() + dst[i] * kSlot, tier.data() + from[i] * kSlot, kSlot), 0)
          << "gathered block " << i;
    // ... and one of no segments at all (a reply part that sends no block) is its header alone.
    const uint32_t empty_id = 51, none = 0;
    std::vector<uint8_t> eh(8);
    std::memcpy(eh.data(), &empty_id, 4);
    std::memcpy(eh.data() + 4, &none, 4);
    ASSERT_TRUE(service->SendGather(*peer, eh, {}, [](const Status&) {}).ok());
    ASSERT_TRUE(worker->WaitFor([&] { return delivered.count(empty_id) > 0; }, 10000).ok());
    EXPECT_TRUE(delivered[empty_id].ok()) << delivered[empty_id].ToString();
  }
  // A contiguous send from memory the sender registered (the service's host tier: UCX is given its
  // handle) lands the same way, eager and rendezvous.
  {
    static std::vector<uint8_t> tier(40 * kSlot);  // outlives the transport's registration
    for (auto& b : tier) b = uint8_t(rng());
    ASSERT_TRUE(service->Register(tier.data(), tier.size()).ok());
    for (const uint32_t n : {1u, 32u}) {
      const uint32_t id = 60 + n;
      std::vector<uint8_t> h(8 + 4 * n);
      std::memcpy(h.data(), &id, 4);
      std::memcpy(h.data() + 4, &n, 4);
      for (uint32_t i = 0; i < n; ++i) {
        const uint32_t slot = (i * 5 + 2) % kSlots;
        std::memcpy(h.data() + 8 + 4 * i, &slot, 4);
      }
      const std::span<const uint8_t> from{tier.data() + 3 * kSlot, n * kSlot};
      ASSERT_TRUE(service->Send(*peer, h, from, [](const Status&) {}).ok());
      ASSERT_TRUE(worker->WaitFor([&] { return delivered.count(id) > 0; }, 10000).ok());
      ASSERT_TRUE(delivered[id].ok()) << delivered[id].ToString();
      for (uint32_t i = 0; i < n; ++i)
        ASSERT_EQ(std::memcmp(hot.data() + ((i * 5 + 2) % kSlots) * kSlot, from.data() + i * kSlot,
                              kSlot),
                  0)
            << "registered send of " << n << ", block " << i;
    }
  }
  // A placement that refuses (a slot out of range) reports the error; nothing is written.
  std::vector<uint8_t> bad_h(12);
  const uint32_t one = 1, far = kSlots + 5, bad_id = 99;
  std::memcpy(bad_h.data(), &bad_id, 4);
  std::memcpy(bad_h.data() + 4, &one, 4);
  std::memcpy(bad_h.data() + 8, &far, 4);
  std::vector<uint8_t> bad_d(kSlot, 7);
  ASSERT_TRUE(service->Send(*peer, bad_h, bad_d, [](const Status&) {}).ok());
  ASSERT_TRUE(worker->WaitFor([&] { return delivered.count(bad_id) > 0; }, 10000).ok());
  EXPECT_TRUE(delivered[bad_id].IsOutOfRange());
  // A header over the limit is refused at send; a forgotten peer is Unavailable.
  std::vector<uint8_t> huge(service->max_header_bytes() + 1);
  EXPECT_TRUE(service->Send(*peer, huge, {}, [](const Status&) {}).IsInvalidArgument());
  service->Disconnect(*peer);
  EXPECT_TRUE(service->Send(*peer, bad_h, bad_d, [](const Status&) {}).IsUnavailable());
  EXPECT_TRUE(service->Connect(std::vector<uint8_t>(3)).status().IsInvalidArgument());
}

INSTANTIATE_TEST_SUITE_P(Kinds, TransportTest, ::testing::Values("inproc", "ucx_tcp", "ucx_sm"),
                         [](const auto& i) { return i.param; });

}  // namespace
}  // namespace kvm::transport
