// Replays a fuzz target's corpus through its entry point as an ordinary test (builds without
// libFuzzer), and asserts each input's verdict (fuzz_target.h):
//   <replay> DIR        every built-in seed must have its verdict; every file of DIR must be named
//   in
//                       DIR/VERDICTS ("<file>: <verdict>" lines) and have that verdict
//   <replay> --write-seeds DIR   writes the built-in seeds and DIR/VERDICTS (the committed corpus)
//   <replay> --verdict FILE...   prints each file's verdict (for a crasher added to the corpus)
// A crasher found by a campaign goes into the corpus with the verdict it has once fixed.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
// The target may have an initializer (libFuzzer calls it once before the first input).
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);

namespace {
std::vector<uint8_t> ReadFile(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
  const std::string mode = argc >= 2 ? argv[1] : "";
  if (argc == 3 && mode == "--write-seeds") {
    std::ofstream verdicts(std::string(argv[2]) + "/VERDICTS");
    for (const auto& s : kvm::fuzz::Seeds()) {
      std::ofstream(std::string(argv[2]) + "/" + s.name, std::ios::binary)
          .write(reinterpret_cast<const char*>(s.data.data()),
                 static_cast<std::streamsize>(s.data.size()));
      verdicts << s.name << ": " << s.verdict << "\n";
    }
    return 0;
  }
  if (mode == "--verdict") {
    for (int i = 2; i < argc; ++i) {
      const auto d = ReadFile(argv[i]);
      std::printf("%s: %s\n", std::filesystem::path(argv[i]).filename().c_str(),
                  kvm::fuzz::Verdict(d.data(), d.size()).c_str());
    }
    return 0;
  }
  size_t n = 0, wrong = 0;
  auto check = [&](const std::string& what, const std::vector<uint8_t>& d,
                   const std::string& want) {
    LLVMFuzzerTestOneInput(d.data(), d.size());
    const std::string got = kvm::fuzz::Verdict(d.data(), d.size());
    ++n;
    if (got != want) {
      ++wrong;
      std::fprintf(stderr, "%s: verdict \"%s\", expected \"%s\"\n", what.c_str(), got.c_str(),
                   want.c_str());
    }
  };
  for (const auto& s : kvm::fuzz::Seeds()) check("seed " + s.name, s.data, s.verdict);
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path dir = argv[i];
    if (!std::filesystem::is_directory(dir)) {
      std::fprintf(stderr, "corpus directory %s not found\n", argv[i]);
      return 1;
    }
    std::map<std::string, std::string> expected;
    std::ifstream vf(dir / "VERDICTS");
    for (std::string line; std::getline(vf, line);) {
      const size_t colon = line.find(": ");
      if (line.empty() || line[0] == '#') continue;
      if (colon == std::string::npos) {
        std::fprintf(stderr, "%s/VERDICTS: malformed line \"%s\"\n", argv[i], line.c_str());
        return 1;
      }
      expected[line.substr(0, colon)] = line.substr(colon + 2);
    }
    size_t files = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if (name == "VERDICTS") continue;
      ++files;
      auto it = expected.find(name);
      if (it == expected.end()) {
        ++wrong;
        std::fprintf(stderr, "%s: no verdict in VERDICTS\n", e.path().c_str());
        continue;
      }
      check(e.path().string(), ReadFile(e.path()), it->second);
    }
    if (files != expected.size()) {
      ++wrong;
      std::fprintf(stderr, "%s: VERDICTS names %zu files, the directory has %zu\n", argv[i],
                   expected.size(), files);
    }
  }
  std::printf("replayed %zu inputs, %zu with a wrong verdict\n", n, wrong);
  return n > 0 && wrong == 0 ? 0 : 1;
}
