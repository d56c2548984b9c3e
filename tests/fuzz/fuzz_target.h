// What a fuzz target gives its corpus replay (replay_main.cc) besides LLVMFuzzerTestOneInput: the
// verdict of one input (a deterministic one-line summary of what the code under test answered) and
// the built-in seeds, each with the verdict it must have. The seeds are written as the committed
// corpus (`<replay> --write-seeds DIR`: the files and DIR/VERDICTS); the replay asserts, for every
// file of the corpus, that its verdict is the one VERDICTS gives it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvm::fuzz {

struct Seed {
  std::string name;           // the corpus file name ([a-z0-9-]+)
  std::vector<uint8_t> data;  // the input
  std::string verdict;        // what Verdict(data) must return
};

// Runs one input as LLVMFuzzerTestOneInput does and returns its verdict (aborts on a broken
// invariant, as the fuzz target does).
std::string Verdict(const uint8_t* data, size_t size);
std::vector<Seed> Seeds();

}  // namespace kvm::fuzz
