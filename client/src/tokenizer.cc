#include "client/tokenizer.h"

#include <sentencepiece_processor.h>

#include <fstream>
#include <iterator>

namespace kvm::client {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  const auto st = impl->sp.Load(path);
  if (!st.ok()) return Status::NotFound("tokenizer '" + path + "': " + st.ToString());
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<uint32_t> Tokenizer::Encode(const std::string& text) const {
  std::vector<int> ids;
  impl_->sp.Encode(text, &ids).IgnoreError();
  return std::vector<uint32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::Decode(const std::vector<uint32_t>& ids) const {
  std::vector<int> v(ids.begin(), ids.end());
  std::string out;
  impl_->sp.Decode(v, &out).IgnoreError();
  return out;
}

uint32_t Tokenizer::vocab_size() const { return static_cast<uint32_t>(impl_->sp.GetPieceSize()); }

Result<std::vector<uint32_t>> ReadTokenFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound("token file '" + path + "' cannot be opened");
  std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (b.size() % 2)
    return Status::InvalidArgument("token file '" + path + "' has an odd size (not uint16 ids)");
  std::vector<uint32_t> ids(b.size() / 2);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = b[2 * i] | (uint32_t{b[2 * i + 1]} << 8);
  return ids;
}

}  // namespace kvm::client
