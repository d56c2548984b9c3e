#include "selector/plan.h"

#include <gtest/gtest.h>

namespace kvm::sel {
namespace {

const Geometry kGeo{16, 16, 64};
constexpr size_t kBlk = 16 * 128 * 2, kRow = 128 * 2;

TEST(PlanTest, UnchangedSelectionSendsNothingNewBlocksAreSentExactly) {
  HotSetMirror m(10);
  PlanStep st;
  PlanBytes bytes;
  const uint64_t T = 1000;  // window blocks 58..62
  std::vector<uint64_t> sel = {0, 5, 9, 20, 58, 59, 60, 61, 62};
  ASSERT_TRUE(m.Plan(sel, T, kGeo, 58, kBlk, kRow, &st, &bytes).ok());
  EXPECT_EQ(st.sends.size(), 4u);  // 0, 5, 9, 20; window blocks never travel
  EXPECT_TRUE(st.evicted_slots.empty());
  EXPECT_EQ(bytes.streamed, 4u * 2 * kBlk);
  EXPECT_EQ(bytes.dense_equivalent, 2u * kRow * T);
  // Same selection next step: nothing to send.
  ASSERT_TRUE(m.Plan(sel, T + 1, kGeo, 58, kBlk, kRow, &st, &bytes).ok());
  EXPECT_TRUE(st.sends.empty());
  EXPECT_TRUE(st.local_fills.empty());
  EXPECT_TRUE(st.evicted_slots.empty());
  EXPECT_EQ(bytes.streamed, 4u * 2 * kBlk);
  EXPECT_EQ(bytes.topk_refetch, 2u * 4 * 2 * kBlk);  // the refetch baseline re-sends every step
  // Swap 9 for 33: one eviction, one send, into the freed slot.
  const uint32_t slot9 = [&] {
    for (uint32_t s = 0; s < 10; ++s)
      if (m.slot_table()[s] == 9) return s;
    return 99u;
  }();
  std::vector<uint64_t> sel2 = {0, 5, 20, 33, 58, 59, 60, 61, 62};
  ASSERT_TRUE(m.Plan(sel2, T + 2, kGeo, 58, kBlk, kRow, &st, &bytes).ok());
  ASSERT_EQ(st.evicted_slots, std::vector<uint32_t>{slot9});
  ASSERT_EQ(st.sends.size(), 1u);
  EXPECT_EQ(st.sends[0], std::make_pair(uint64_t{33}, slot9));
  EXPECT_TRUE(m.Contains(33) && !m.Contains(9));
}

TEST(PlanTest, BlockLeavingTheWindowIsFilledLocally) {
  HotSetMirror m(8);
  PlanStep st;
  PlanBytes bytes;
  // At T = 1024 the window starts at block 60; at T = 1040 at block 61: block 60 left the window.
  std::vector<uint64_t> sel = {0, 60, 61, 62, 63, 64};
  ASSERT_TRUE(m.Plan(sel, 1040, kGeo, /*prev_window_first=*/60, kBlk, kRow, &st, &bytes).ok());
  ASSERT_EQ(st.local_fills.size(), 1u);
  EXPECT_EQ(st.local_fills[0].first, 60u);
  EXPECT_EQ(st.sends.size(), 1u);  // block 0
  EXPECT_EQ(bytes.local_fill, 2u * kBlk);
}

TEST(PlanTest, CapacityExceededNamesBudgetAndCapacity) {
  HotSetMirror m(2);
  PlanStep st;
  PlanBytes bytes;
  Status s = m.Plan({1, 2, 3, 60}, 1000, kGeo, 58, kBlk, kRow, &st, &bytes);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("budget"), std::string::npos);
  EXPECT_NE(s.message().find("capacity of 2"), std::string::npos);
  m.Reset();
  EXPECT_FALSE(m.Contains(1));
}

}  // namespace
}  // namespace kvm::sel
