#include "selector/layer_map.h"

#include <gtest/gtest.h>

#include "testutil/kv.h"

namespace kvm::sel {
namespace {

// Hand-computed example: 4 layers, masks over 8 positions.
//   L0 = 11110000, L1 = 11100001 (overlap with L0: 3/4), L2 = 00001111 (0 with L0, 1/4 with L1),
//   L3 = 11110000 (1 with L0).
// Greedy with 2 pairs: (3→0, overlap 1), then (1→0, 0.75). L2 keeps itself.
TEST(LayerMapTest, ReproducesHandComputedExample) {
  auto m = [](const char* s) {
    std::vector<uint8_t> v;
    for (; *s; ++s) v.push_back(*s == '1');
    return v;
  };
  std::vector<std::vector<uint8_t>> keep = {m("11110000"), m("11100001"), m("00001111"),
                                            m("11110000")};
  auto map = BuildLayerMap(keep, 2);
  ASSERT_TRUE(map.ok());
  EXPECT_EQ(*map, (std::vector<uint32_t>{0, 0, 2, 0}));
  auto one = BuildLayerMap(keep, 1);
  EXPECT_EQ(*one, (std::vector<uint32_t>{0, 1, 2, 0}));
  auto none = BuildLayerMap(keep, 0);
  EXPECT_EQ(*none, (std::vector<uint32_t>{0, 1, 2, 3}));
  auto all = BuildLayerMap(keep, 10);  // at most L − 1 pairs, layer 0 never shares
  EXPECT_EQ((*all)[0], 0u);
  for (uint32_t l = 0; l < 4; ++l) EXPECT_LE((*all)[l], l);
}

TEST(LayerMapTest, ChainsArePointedToTheRoot) {
  // L2 follows L1 best, L1 follows L0: L2 must end at L0's root, never at a sharing layer.
  std::vector<std::vector<uint8_t>> keep = {{1, 1, 0, 0}, {1, 1, 1, 0}, {1, 1, 1, 0}};
  auto map = BuildLayerMap(keep, 2);
  ASSERT_TRUE(map.ok());
  for (uint32_t l = 0; l < 3; ++l)
    EXPECT_EQ((*map)[(*map)[l]], (*map)[l]) << l;  // sources are roots
}

TEST(LayerMapTest, KeepMaskMarksEachQueryTopK) {
  testutil::RandomKv kv(40, 32, 16, DType::kF32, 3);
  std::vector<float> q(2 * 1 * 32);                                          // W = 2, one head
  for (size_t i = 0; i < q.size(); ++i) q[i] = kv.key(39 - i / 32)[i % 32];  // query ≈ a key
  auto keep = KeepMask(q.data(), 2, 1, {kv.view()}, 0.1);
  ASSERT_EQ(keep.size(), 2u * 40);
  // query w = 0 sits at position 38 and sees tokens 0..38: 4 tokens kept, none after 38.
  int n0 = 0;
  for (int t = 0; t < 40; ++t) n0 += keep[t];
  EXPECT_EQ(n0, 4);
  EXPECT_EQ(keep[39], 0);
  EXPECT_TRUE(BuildLayerMap({}, 1).status().IsInvalidArgument());
  EXPECT_TRUE(BuildLayerMap({{1, 0}, {1}}, 1).status().IsInvalidArgument());
}

}  // namespace
}  // namespace kvm::sel
