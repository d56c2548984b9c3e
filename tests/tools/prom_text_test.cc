// The Prometheus text reader of `kvmctl status` (tools/kvmctl/prom_text.h): parsing (escapes,
// special values, timestamps, malformed lines with their line numbers), sums over label matches,
// PromQL's histogram_quantile on hand-computed buckets, counter rates; and the service's own
// exposition (Metrics::Serialize) read without an error.
#include "prom_text.h"

#include <gtest/gtest.h>

#include <cmath>

#include "kvmanager/metrics.h"

namespace kvm::tools::prom {
namespace {

TEST(PromTextTest, ParsesSamplesLabelsEscapesAndSpecialValues) {
  const std::string text =
      "# HELP kvm_x_total Things.\n"
      "# TYPE kvm_x_total counter\n"
      "kvm_x_total{code=\"Busy\",tenant=\"a\\\"b\\\\c\\nd\"} 3\n"
      "\n"
      "kvm_y 1.5e3 1712345678901\n"
      "kvm_z{le=\"+Inf\"} +Inf\n"
      "kvm_z{le=\"1\",} -Inf\r\n"
      "kvm_nan NaN\n"
      "  kvm_spaced { a = \"1\" , b=\"2\" }   -0.25\n";
  std::vector<Sample> s;
  std::string err;
  ASSERT_TRUE(Parse(text, &s, &err)) << err;
  ASSERT_EQ(s.size(), 6u);
  EXPECT_EQ(s[0].name, "kvm_x_total");
  EXPECT_EQ(s[0].labels.at("code"), "Busy");
  EXPECT_EQ(s[0].labels.at("tenant"), "a\"b\\c\nd");
  EXPECT_EQ(s[0].value, 3);
  EXPECT_EQ(s[1].name, "kvm_y");
  EXPECT_TRUE(s[1].labels.empty());
  EXPECT_EQ(s[1].value, 1500);
  EXPECT_TRUE(std::isinf(s[2].value) && s[2].value > 0);
  EXPECT_TRUE(std::isinf(s[3].value) && s[3].value < 0);
  EXPECT_EQ(s[3].labels.at("le"), "1");
  EXPECT_TRUE(std::isnan(s[4].value));
  EXPECT_EQ(s[5].labels.at("a"), "1");
  EXPECT_EQ(s[5].labels.at("b"), "2");
  EXPECT_EQ(s[5].value, -0.25);
}

TEST(PromTextTest, MalformedLinesAreRejectedWithTheirLineNumber) {
  const struct {
    const char* text;
    const char* want;
  } cases[] = {
      {"ok 1\nkvm_a\n", "line 2: expected a value"},
      {"kvm_a{x=\"1} 2\n", "line 1: unterminated value of label x"},
      {"kvm_a{x=\"\\t\"} 2\n", "line 1: bad escape"},
      {"kvm_a abc\n", "line 1: bad value 'abc'"},
      {"kvm_a inf\n", "line 1: bad value 'inf'"},
      {"kvm_a 1 2 3\n", "line 1: unexpected text"},
      {"kvm_a 1 12x\n", "line 1: bad timestamp"},
      {"kvm_a{x=\"1\",x=\"2\"} 1\n", "line 1: label x given twice"},
      {"kvm_a{x=\"1\" y=\"2\"} 1\n", "line 1: expected ',' or '}'"},
      {"# c\n\n9kvm 1\n", "line 3: expected a metric name"},
      {"kvm_a{=\"1\"} 1\n", "line 1: expected a label name"},
  };
  for (const auto& c : cases) {
    std::vector<Sample> s;
    std::string err;
    EXPECT_FALSE(Parse(c.text, &s, &err)) << c.text;
    EXPECT_NE(err.find(c.want), std::string::npos) << c.text << " -> " << err;
  }
}

TEST(PromTextTest, SumSelectsByLabelsAndAbsentIsNotZero) {
  std::vector<Sample> s;
  std::string err;
  ASSERT_TRUE(
      Parse("b_total{direction=\"to_worker\",transport=\"ucx\"} 10\n"
            "b_total{direction=\"to_worker\",transport=\"tcp\"} 5\n"
            "b_total{direction=\"from_worker\",transport=\"tcp\"} 100\n"
            "zero 0\n",
            &s, &err))
      << err;
  EXPECT_EQ(Sum(s, "b_total"), 115);
  EXPECT_EQ(Sum(s, "b_total", {{"direction", "to_worker"}}), 15);
  EXPECT_EQ(Sum(s, "b_total", {{"direction", "to_worker"}, {"transport", "tcp"}}), 5);
  EXPECT_EQ(Sum(s, "zero"), 0);
  EXPECT_TRUE(std::isnan(Sum(s, "b_total", {{"direction", "sideways"}})));
  EXPECT_TRUE(std::isnan(Sum(s, "missing")));
}

TEST(PromTextTest, HistogramQuantileInterpolatesLikePromql) {
  // Two series of one histogram, summed per le: cumulative 10, 30, 90, 100.
  std::vector<Sample> s;
  std::string err;
  ASSERT_TRUE(
      Parse("h_bucket{k=\"a\",s=\"1\",le=\"0.1\"} 4\n"
            "h_bucket{k=\"a\",s=\"1\",le=\"0.2\"} 10\n"
            "h_bucket{k=\"a\",s=\"1\",le=\"0.5\"} 40\n"
            "h_bucket{k=\"a\",s=\"1\",le=\"+Inf\"} 45\n"
            "h_bucket{k=\"a\",s=\"2\",le=\"0.1\"} 6\n"
            "h_bucket{k=\"a\",s=\"2\",le=\"0.2\"} 20\n"
            "h_bucket{k=\"a\",s=\"2\",le=\"0.5\"} 50\n"
            "h_bucket{k=\"a\",s=\"2\",le=\"+Inf\"} 55\n"
            "h_bucket{k=\"b\",s=\"1\",le=\"0.1\"} 0\n"
            "h_bucket{k=\"b\",s=\"1\",le=\"0.2\"} 0\n"
            "h_bucket{k=\"b\",s=\"1\",le=\"0.5\"} 0\n"
            "h_bucket{k=\"b\",s=\"1\",le=\"+Inf\"} 0\n",
            &s, &err))
      << err;
  const auto a = Buckets(s, "h", {{"k", "a"}});
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a.at(0.1), 10);
  EXPECT_EQ(a.rbegin()->second, 100);
  // rank 50 lies in (0.2, 0.5] holding 30..90: 0.2 + 0.3 * 20/60.
  EXPECT_NEAR(HistogramQuantile(0.5, a), 0.3, 1e-12);
  // rank 5 in the first bucket, which starts at 0: 0.1 * 5/10.
  EXPECT_NEAR(HistogramQuantile(0.05, a), 0.05, 1e-12);
  // rank 99 lies in +Inf: the highest finite bound.
  EXPECT_EQ(HistogramQuantile(0.99, a), 0.5);
  // rank 90 exactly at the top of (0.2, 0.5].
  EXPECT_NEAR(HistogramQuantile(0.9, a), 0.5, 1e-12);
  EXPECT_TRUE(std::isnan(HistogramQuantile(0.5, Buckets(s, "h", {{"k", "b"}}))));  // empty
  EXPECT_TRUE(std::isnan(HistogramQuantile(0.5, {})));
  EXPECT_TRUE(std::isnan(HistogramQuantile(0.5, {{0.1, 3}, {0.2, 5}})));  // no +Inf bucket
}

TEST(PromTextTest, RatesOfCounters) {
  EXPECT_DOUBLE_EQ(Rate(10, 30, 2), 10);
  EXPECT_DOUBLE_EQ(Rate(7, 7, 1), 0);
  EXPECT_TRUE(std::isnan(Rate(30, 10, 1)));  // restarted between the reads
  EXPECT_TRUE(std::isnan(Rate(1, 2, 0)));
  EXPECT_TRUE(std::isnan(Rate(NAN, 2, 1)));
}

TEST(PromTextTest, ReadsTheServicesOwnExposition) {
  server::Metrics m;
  m.SetReady(true);
  std::vector<Sample> s;
  std::string err;
  const std::string text = m.Serialize();
  ASSERT_TRUE(Parse(text, &s, &err)) << err;
  EXPECT_GT(s.size(), 100u);
  EXPECT_EQ(Sum(s, "kvm_ready"), 1);
  EXPECT_EQ(Sum(s, "kvm_degraded"), 0);
  // Every dropped-mass kind has its buckets up to +Inf, all zero before any observation.
  for (const char* kind : {"exact", "bound", "audit"}) {
    const auto b = Buckets(s, "kvm_dropped_mass", {{"kind", kind}});
    ASSERT_GE(b.size(), 2u) << kind;
    EXPECT_TRUE(std::isinf(b.rbegin()->first)) << kind;
    EXPECT_EQ(b.rbegin()->second, 0) << kind;
    EXPECT_TRUE(std::isnan(HistogramQuantile(0.5, b))) << kind;
  }
}

}  // namespace
}  // namespace kvm::tools::prom
