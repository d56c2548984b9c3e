#include "proto/status.h"

#include <gtest/gtest.h>

#include "proto/kvm.pb.h"

namespace kvm {
namespace {

TEST(StatusTest, OkIsCheapAndPrintsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(s.message().empty());
  EXPECT_EQ(sizeof(Status), sizeof(void*));
}

TEST(StatusTest, FactoriesSetCodeAndPredicates) {
  EXPECT_TRUE(Status::NoSpace("disk").IsNoSpace());
  EXPECT_FALSE(Status::NoSpace("disk").IsBusy());
  Status s = Status::InvalidArgument("budget must be > 0");
  EXPECT_EQ(s.ToString(), "InvalidArgument: budget must be > 0");
  Status c = s;  // deep copy
  EXPECT_EQ(c, s);
  EXPECT_EQ(s.WithContext("create").message(), "create: budget must be > 0");
  EXPECT_TRUE(Status::Ok().WithContext("x").ok());
}

TEST(StatusTest, WireCodesMatchTheProtobufEnumAndNeverRenumber) {
  // The documented numbers: a change here is a protocol break.
  EXPECT_EQ(static_cast<uint32_t>(StatusCode::kInvalidArgument), 1u);
  EXPECT_EQ(static_cast<uint32_t>(StatusCode::kBusy), 6u);
  EXPECT_EQ(static_cast<uint32_t>(StatusCode::kNoSpace), 10u);
  EXPECT_EQ(static_cast<uint32_t>(StatusCode::kInternal), 16u);
  const auto* desc = wire::ErrorCode_descriptor();
  ASSERT_EQ(desc->value_count(), static_cast<int>(kMaxStatusCode + 1));
  for (uint32_t v = 0; v <= kMaxStatusCode; ++v) {
    const auto* ev = desc->FindValueByNumber(static_cast<int>(v));
    ASSERT_NE(ev, nullptr) << v;
    // INVALID_ARGUMENT <-> InvalidArgument
    std::string camel;
    bool up = true;
    const std::string name = ev->name().substr(4);  // "ERR_"
    ASSERT_EQ(ev->name().substr(0, 4), "ERR_");
    for (char ch : name) {
      if (ch == '_') {
        up = true;
        continue;
      }
      camel += up ? ch : static_cast<char>(std::tolower(ch));
      up = false;
    }
    EXPECT_EQ(camel, v == 0 ? "Ok" : std::string(StatusCodeName(static_cast<StatusCode>(v)))) << v;
  }
  EXPECT_EQ(StatusCodeFromWire(999), StatusCode::kInternal);
}

Result<int> Half(int x) {
  if (x % 2) return Status::InvalidArgument("odd");
  return x / 2;
}
Result<int> Quarter(int x) {
  KVM_ASSIGN_OR_RETURN(int h, Half(x));
  KVM_ASSIGN_OR_RETURN(h, Half(h));
  return h;
}

TEST(ResultTest, HoldsValueOrErrorAndPropagates) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_TRUE(Quarter(6).status().IsInvalidArgument());
  Result<int> r = Status::Ok();  // a bug: becomes Internal, never a "valueless OK"
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInternal());
  EXPECT_EQ(r.value_or(7), 7);
  EXPECT_DEATH((void)Half(3).value(), "odd");
}

}  // namespace
}  // namespace kvm
