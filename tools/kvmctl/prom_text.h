// A small reader of the Prometheus text exposition format (version 0.0.4, what kvmanager's /metrics
// serves) and the few aggregations `kvmctl status` needs: sums over label matches, histogram
// quantiles the way PromQL's histogram_quantile computes them, and counter rates between two
// scrapes. No dependencies; pure functions, thread-compatible.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace kvm::tools::prom {

// One sample line: `name{label="value",...} value [timestamp]`.
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Parses an exposition. Comment lines (# HELP, # TYPE, others) and blank lines are skipped; label
// values are unescaped (\\ \" \n); values may be NaN, +Inf, -Inf; a trailing timestamp is read and
// dropped. On success returns true and replaces *out. On a malformed line returns false and sets
// *error to "line N: what is wrong" (and *out is unspecified).
bool Parse(const std::string& text, std::vector<Sample>* out, std::string* error);

// The samples named `name` whose labels include every (key, value) of `match`.
std::vector<const Sample*> Select(const std::vector<Sample>& samples, const std::string& name,
                                  const std::map<std::string, std::string>& match = {});

// The sum of the selected samples' values; NaN when none matches (a family that is absent is not
// the same as a family at zero).
double Sum(const std::vector<Sample>& samples, const std::string& name,
           const std::map<std::string, std::string>& match = {});

// The q-quantile (0 < q < 1) of a histogram given as cumulative bucket counts by upper bound `le`
// (+Inf included), as PromQL's histogram_quantile: linear interpolation inside the bucket that
// holds rank q * count, the lowest bucket starting at 0, the +Inf bucket answered with the highest
// finite bound. NaN when the count is 0 or there is no +Inf bucket.
double HistogramQuantile(double q, const std::map<double, double>& cumulative_by_le);

// The cumulative buckets of histogram `name` (its `name_bucket` samples) over every series whose
// labels include `match`, summed per `le`.
std::map<double, double> Buckets(const std::vector<Sample>& samples, const std::string& name,
                                 const std::map<std::string, std::string>& match = {});

// (after - before) / seconds for a counter; NaN when either is NaN, seconds <= 0, or the counter
// went down (the process restarted between the two reads).
double Rate(double before, double after, double seconds);

}  // namespace kvm::tools::prom
