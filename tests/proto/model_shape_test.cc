#include "proto/model_shape.h"

#include <gtest/gtest.h>

namespace kvm {
namespace {

ModelShape Good() { return ModelShape{32, 32, 8, 128, DType::kF16, 42}; }

TEST(ModelShapeTest, ValidShapePasses) {
  EXPECT_TRUE(Good().Validate().ok());
  EXPECT_EQ(Good().group_size(), 4u);
}

TEST(ModelShapeTest, EachBadFieldIsNamed) {
  struct Case {
    void (*mut)(ModelShape&);
    const char* field;
  } cases[] = {
      {[](ModelShape& s) { s.layers = 0; }, "layers"},
      {[](ModelShape& s) { s.layers = kMaxLayers + 1; }, "layers"},
      {[](ModelShape& s) { s.kv_heads = 0; }, "kv_heads"},
      {[](ModelShape& s) { s.q_heads = 0; }, "q_heads"},
      {[](ModelShape& s) { s.q_heads = 30; }, "q_heads"},
      {[](ModelShape& s) { s.head_dim = 96; }, "head_dim"},
      {[](ModelShape& s) { s.dtype = static_cast<DType>(9); }, "dtype"},
  };
  for (const auto& c : cases) {
    ModelShape s = Good();
    c.mut(s);
    Status st = s.Validate();
    EXPECT_TRUE(st.IsInvalidArgument()) << c.field;
    EXPECT_NE(st.message().find(c.field), std::string::npos) << st.ToString();
  }
}

TEST(BlockLayoutTest, SizesFollowTheLayout) {
  auto l = BlockLayout::Make(Good(), 16);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->kv_block_bytes(), 16u * 128 * 2);
  EXPECT_EQ(l->row_bytes(), 256u);
  EXPECT_EQ(l->BlocksFor(0), 0u);
  EXPECT_EQ(l->BlocksFor(33), 3u);
  EXPECT_EQ(l->RowsInBlock(2, 33), 1u);  // ragged last block
  EXPECT_EQ(l->RowsInBlock(1, 33), 16u);
  EXPECT_EQ(l->RowsInBlock(3, 33), 0u);
  EXPECT_EQ(l->DenseBytes(1), 2ull * 32 * 8 * 256);
  EXPECT_TRUE(BlockLayout::Make(Good(), 0).status().IsInvalidArgument());
  ModelShape bad = Good();
  bad.head_dim = 100;
  EXPECT_TRUE(BlockLayout::Make(bad, 16).status().IsInvalidArgument());
}

TEST(DTypeTest, NamesParseBack) {
  for (DType t : {DType::kF16, DType::kBF16, DType::kF32}) EXPECT_EQ(*ParseDType(DTypeName(t)), t);
  EXPECT_TRUE(ParseDType("int8").status().IsInvalidArgument());
  EXPECT_STREQ(DeltaKindName(DeltaKind::kBound), "bound");
}

}  // namespace
}  // namespace kvm
