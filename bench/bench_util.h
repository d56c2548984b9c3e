// Shared helpers of the benchmarks.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

namespace kvm::bench {

// Fraction of CPU time idle over `ms` milliseconds, from /proc/stat (−1 when unreadable).
inline double IdleFraction(int ms = 1000) {
  auto read = [](unsigned long long* idle, unsigned long long* total) {
    std::ifstream f("/proc/stat");
    std::string cpu;
    unsigned long long v[10] = {};
    if (!(f >> cpu)) return false;
    for (auto& x : v) f >> x;
    *idle = v[3] + v[4];
    *total = 0;
    for (auto x : v) *total += x;
    return true;
  };
  unsigned long long i0 = 0, t0 = 0, i1 = 0, t1 = 0;
  if (!read(&i0, &t0)) return -1;
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  if (!read(&i1, &t1) || t1 == t0) return -1;
  return double(i1 - i0) / double(t1 - t0);
}

// Waits up to `max_seconds` for ≥ 90% idle over 1 s; true when it got there (says so on stderr).
// KVM_BENCH_NO_WAIT=1 skips the wait (smoke runs) and reports not idle.
inline bool WaitForIdle(int max_seconds = 60) {
  if (const char* e = std::getenv("KVM_BENCH_NO_WAIT"); e && *e == '1') {
    std::fprintf(stderr, "not waiting for an idle machine (KVM_BENCH_NO_WAIT=1)\n");
    return false;
  }
  for (int s = 0; s < max_seconds; ++s) {
    const double idle = IdleFraction();
    if (idle >= 0.9) {
      std::fprintf(stderr, "machine idle (%.0f%%)\n", idle * 100);
      return true;
    }
    if (s % 10 == 0)
      std::fprintf(stderr, "waiting for an idle machine (%.0f%% idle)...\n", idle * 100);
  }
  std::fprintf(stderr, "gave up waiting for an idle machine after %d s: numbers may be noisy\n",
               max_seconds);
  return false;
}

}  // namespace kvm::bench
