// The default host-tier size from MemAvailable and the cgroup memory limit (kvmanager/src/
// memory_limits.cc): the pure function, the parsers, and ReadMemoryLimits over fake /proc and
// /sys/fs/cgroup trees.
#include "kvmanager/memory_limits.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace kvm::store {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

TEST(DefaultHostCapacityTest, UsesMemAvailableWithoutACgroupLimit) {
  EXPECT_EQ(DefaultHostCapacity(8 * kGiB, std::nullopt), 2 * kGiB);
}

TEST(DefaultHostCapacityTest, CgroupLimitBelowMemAvailableWins) {
  // A pod limited to 4 GiB on a node with 64 GiB available: 25% of 4 GiB, not of 64.
  EXPECT_EQ(DefaultHostCapacity(64 * kGiB, std::optional<uint64_t>(4 * kGiB)), kGiB);
}

TEST(DefaultHostCapacityTest, CgroupLimitAboveMemAvailableIsIgnored) {
  EXPECT_EQ(DefaultHostCapacity(8 * kGiB, std::optional<uint64_t>(100 * kGiB)), 2 * kGiB);
}

TEST(DefaultHostCapacityTest, CappedAtSixteenGiB) {
  EXPECT_EQ(DefaultHostCapacity(512 * kGiB, std::nullopt), 16 * kGiB);
  EXPECT_EQ(DefaultHostCapacity(512 * kGiB, std::optional<uint64_t>(256 * kGiB)), 16 * kGiB);
}

TEST(DefaultHostCapacityTest, UnknownMemAvailableFallsBackToTheCgroupThenOneGiB) {
  EXPECT_EQ(DefaultHostCapacity(0, std::optional<uint64_t>(2 * kGiB)), kGiB / 2);
  EXPECT_EQ(DefaultHostCapacity(0, std::nullopt), kGiB);
}

TEST(DefaultHostCapacityTest, FractionAndCapAreParameters) {
  EXPECT_EQ(DefaultHostCapacity(10 * kGiB, std::optional<uint64_t>(4 * kGiB), 0.5, 64 * kGiB),
            2 * kGiB);
  EXPECT_EQ(DefaultHostCapacity(10 * kGiB, std::nullopt, 0.5, kGiB), kGiB);
}

TEST(MemoryLimitsParseTest, MemAvailableInKilobytes) {
  const char* meminfo =
      "MemTotal:       24573152 kB\nMemFree:        22000000 kB\n"
      "MemAvailable:   23000000 kB\nBuffers:          100 kB\n";
  EXPECT_EQ(ParseMemAvailable(meminfo), std::optional<uint64_t>(uint64_t{23000000} * 1024));
  EXPECT_EQ(ParseMemAvailable("MemTotal: 5 kB\n"), std::nullopt);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: lots kB\n"), std::nullopt);
}

TEST(MemoryLimitsParseTest, CgroupMemoryMax) {
  EXPECT_EQ(ParseCgroupMemoryMax("max\n"), std::nullopt);
  EXPECT_EQ(ParseCgroupMemoryMax("4294967296\n"), std::optional<uint64_t>(4 * kGiB));
  EXPECT_EQ(ParseCgroupMemoryMax("9223372036854771712\n"), std::nullopt);  // v1 "unlimited"
  EXPECT_EQ(ParseCgroupMemoryMax("12G\n"), std::nullopt);
  EXPECT_EQ(ParseCgroupMemoryMax(""), std::nullopt);
}

TEST(MemoryLimitsParseTest, CgroupPaths) {
  const char* v2 = "0::/kubepods.slice/pod1/ctr\n";
  EXPECT_EQ(ParseCgroupV2Path(v2), std::optional<std::string>("/kubepods.slice/pod1/ctr"));
  EXPECT_EQ(ParseCgroupV1MemoryPath(v2), std::nullopt);
  const char* v1 = "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n";
  EXPECT_EQ(ParseCgroupV1MemoryPath(v1), std::optional<std::string>("/docker/abc"));
  EXPECT_EQ(ParseCgroupV2Path(v1), std::optional<std::string>("/"));
  EXPECT_EQ(ParseCgroupV1MemoryPath("3:blkio,memory:/m\n"), std::optional<std::string>("/m"));
  EXPECT_EQ(ParseCgroupV1MemoryPath("3:memoryx:/m\n"), std::nullopt);
}

class ReadMemoryLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() /
            ("kvm_memlimits_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
    Write("proc/meminfo", "MemTotal: 67108864 kB\nMemAvailable: 67108864 kB\n");  // 64 GiB
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void Write(const std::string& rel, const std::string& text) {
    const auto p = root_ / rel;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  MemoryLimits Read() {
    return ReadMemoryLimits((root_ / "proc").string(), (root_ / "cg").string());
  }
  std::filesystem::path root_;
};

TEST_F(ReadMemoryLimitsTest, ContainerCgroupNamespaceReadsTheRootMemoryMax) {
  Write("proc/self/cgroup", "0::/\n");
  Write("cg/memory.max", "4294967296\n");
  const MemoryLimits m = Read();
  EXPECT_EQ(m.mem_available, 64 * kGiB);
  EXPECT_EQ(m.cgroup_max, std::optional<uint64_t>(4 * kGiB));
  EXPECT_EQ(DefaultHostCapacity(m.mem_available, m.cgroup_max), kGiB);
}

TEST_F(ReadMemoryLimitsTest, TheTightestAncestorLimitApplies) {
  Write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
  Write("cg/kubepods/memory.max", "max\n");
  Write("cg/kubepods/pod1/memory.max", "2147483648\n");  // the pod: 2 GiB
  Write("cg/kubepods/pod1/ctr/memory.max", "8589934592\n");
  EXPECT_EQ(Read().cgroup_max, std::optional<uint64_t>(2 * kGiB));
}

TEST_F(ReadMemoryLimitsTest, NoLimitAnywhereLeavesMemAvailable) {
  Write("proc/self/cgroup", "0::/user.slice\n");
  Write("cg/user.slice/memory.max", "max\n");
  const MemoryLimits m = Read();
  EXPECT_EQ(m.cgroup_max, std::nullopt);
  EXPECT_EQ(DefaultHostCapacity(m.mem_available, m.cgroup_max), 16 * kGiB);
}

TEST_F(ReadMemoryLimitsTest, CgroupV1MemoryControllerIsRead) {
  Write("proc/self/cgroup", "4:memory:/docker/abc\n0::/\n");
  Write("cg/memory/memory.limit_in_bytes", "9223372036854771712\n");
  Write("cg/memory/docker/abc/memory.limit_in_bytes", "3221225472\n");  // 3 GiB
  EXPECT_EQ(Read().cgroup_max, std::optional<uint64_t>(3 * kGiB));
}

TEST_F(ReadMemoryLimitsTest, MissingFilesMeanUnknown) {
  std::filesystem::remove(root_ / "proc/meminfo");
  const MemoryLimits m = Read();
  EXPECT_EQ(m.mem_available, 0u);
  EXPECT_EQ(m.cgroup_max, std::nullopt);
}

}  // namespace
}  // namespace kvm::store
