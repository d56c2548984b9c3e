// Tokenizer of the reference model: a SentencePiece model (BOS id 1, EOS id 2, as llama2.c).
// Thread-safe for concurrent Encode/Decode after Load.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "proto/status.h"

namespace kvm::client {

class Tokenizer {
 public:
  static constexpr uint32_t kBos = 1, kEos = 2;
  static Result<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  ~Tokenizer();
  std::vector<uint32_t> Encode(const std::string& text) const;
  std::string Decode(const std::vector<uint32_t>& ids) const;
  uint32_t vocab_size() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Reads a little-endian uint16 token file; InvalidArgument for an odd size, NotFound when missing.
Result<std::vector<uint32_t>> ReadTokenFile(const std::string& path);

}  // namespace kvm::client
