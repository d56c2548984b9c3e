// The reference model's SentencePiece BPE tokenizer, read and run here (not through
// libsentencepiece: Debian's build exports its own bundled protobuf runtime, which clashes with
// libprotobuf in a process that also speaks the wire protocol).
//
// The model file is a protobuf ModelProto; only its pieces are needed: field 1 (repeated
// SentencePiece {1: piece, 2: score, 3: type}). Encoding is SentencePiece's BPE: whitespace
// normalised (runs collapsed, ends trimmed, "▁" for spaces and a leading "▁"), digits split, then
// the adjacent pair whose merge is a known piece with the highest score is merged (ties: leftmost)
// until none is; symbols that are no piece become byte pieces <0xNN>. NFKC normalisation is not
// applied (the committed texts are plain ASCII/Latin-1 prose).
#include "client/tokenizer.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <unordered_map>

namespace kvm::client {
namespace {

const std::string kSpace = "\xe2\x96\x81";  // U+2581 "▁"

enum PieceType : uint32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kByte = 6 };

struct Reader {
  const uint8_t* p;
  const uint8_t* end;
  bool ok = true;
  uint64_t Varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) return ok = false, 0;
      const uint8_t b = *p++;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    return ok = false, 0;
  }
  // Skips a field of wire type `wt`; false on a malformed one.
  bool Skip(uint32_t wt) {
    switch (wt) {
      case 0:
        Varint();
        return ok;
      case 1:
        return (p += 8) <= end;
      case 2: {
        const uint64_t n = Varint();
        return ok && n <= uint64_t(end - p) && (p += n, true);
      }
      case 5:
        return (p += 4) <= end;
      default:
        return false;
    }
  }
};

size_t Utf8Len(uint8_t c) {
  return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
}

}  // namespace

struct Tokenizer::Impl {
  struct Piece {
    std::string text;
    float score = 0;
    uint32_t type = kNormal;
  };
  std::vector<Piece> pieces;
  std::unordered_map<std::string, uint32_t> ids;  // normal and user-defined pieces
  uint32_t byte_id[256] = {};
  uint32_t unk = 0;
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound("tokenizer '" + path + "' cannot be opened");
  const std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)),
                               std::istreambuf_iterator<char>());
  auto impl = std::make_unique<Impl>();
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument("tokenizer '" + path + "' is not a SentencePiece model: " + why);
  };
  Reader r{b.data(), b.data() + b.size()};
  while (r.p < r.end) {
    const uint64_t key = r.Varint();
    if (!r.ok) return bad("truncated field key");
    if (key != ((1 << 3) | 2)) {
      if (!r.Skip(uint32_t(key & 7))) return bad("malformed field");
      continue;
    }
    const uint64_t n = r.Varint();
    if (!r.ok || n > uint64_t(r.end - r.p)) return bad("truncated piece");
    Reader pr{r.p, r.p + n};
    r.p += n;
    Impl::Piece piece;
    while (pr.p < pr.end) {
      const uint64_t k = pr.Varint();
      if (!pr.ok) return bad("truncated piece field");
      if (k == ((1 << 3) | 2)) {
        const uint64_t len = pr.Varint();
        if (!pr.ok || len > uint64_t(pr.end - pr.p)) return bad("truncated piece text");
        piece.text.assign(reinterpret_cast<const char*>(pr.p), len);
        pr.p += len;
      } else if (k == ((2 << 3) | 5)) {
        if (pr.end - pr.p < 4) return bad("truncated score");
        std::memcpy(&piece.score, pr.p, 4);
        pr.p += 4;
      } else if (k == ((3 << 3) | 0)) {
        piece.type = uint32_t(pr.Varint());
      } else if (!pr.Skip(uint32_t(k & 7))) {
        return bad("malformed piece field");
      }
    }
    const uint32_t id = uint32_t(impl->pieces.size());
    if (piece.type == kByte && piece.text.size() == 6 && piece.text.rfind("<0x", 0) == 0)
      impl->byte_id[std::stoul(piece.text.substr(3, 2), nullptr, 16) & 0xff] = id;
    else if (piece.type == kNormal || piece.type == kUserDefined)
      impl->ids.emplace(piece.text, id);
    else if (piece.type == kUnknown)
      impl->unk = id;
    impl->pieces.push_back(std::move(piece));
  }
  if (impl->pieces.size() < 3) return bad("no pieces");
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<uint32_t> Tokenizer::Encode(const std::string& text) const {
  // Normalise whitespace; "▁" marks a space, and the text starts with one.
  std::string norm = kSpace;
  bool space = false;
  for (char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      space = norm.size() > kSpace.size();
      continue;
    }
    if (space) norm += kSpace;
    space = false;
    norm += c;
  }
  // Pieces never cross a "▁" (whitespace splitting at training): encode word by word.
  std::vector<uint32_t> out;
  auto is_digit = [](const std::string& s) { return s.size() == 1 && s[0] >= '0' && s[0] <= '9'; };
  for (size_t w = 0; w < norm.size();) {
    size_t e = norm.find(kSpace, w + kSpace.size());
    if (e == std::string::npos) e = norm.size();
    // Symbols: code points; digits stay single (split_digits).
    std::vector<std::string> sym;
    for (size_t i = w; i < e;) {
      const size_t n = std::min(Utf8Len(uint8_t(norm[i])), e - i);
      sym.push_back(norm.substr(i, n));
      i += n;
    }
    w = e;
    for (;;) {  // merge the best adjacent pair (highest score, leftmost on ties)
      int best = -1;
      float best_score = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        if (is_digit(sym[i]) || is_digit(sym[i + 1])) continue;
        auto it = impl_->ids.find(sym[i] + sym[i + 1]);
        if (it == impl_->ids.end()) continue;
        const float s = impl_->pieces[it->second].score;
        if (best < 0 || s > best_score) best = int(i), best_score = s;
      }
      if (best < 0) break;
      sym[size_t(best)] += sym[size_t(best) + 1];
      sym.erase(sym.begin() + best + 1);
    }
    for (const std::string& s : sym) {
      auto it = impl_->ids.find(s);
      if (it != impl_->ids.end()) {
        out.push_back(it->second);
      } else {
        for (unsigned char c : s) out.push_back(impl_->byte_id[c] ? impl_->byte_id[c] : impl_->unk);
      }
    }
  }
  return out;
}

std::string Tokenizer::Decode(const std::vector<uint32_t>& ids) const {
  std::string out;
  for (uint32_t id : ids) {
    if (id >= impl_->pieces.size()) continue;
    const Impl::Piece& p = impl_->pieces[id];
    if (p.type == kControl) continue;
    if (p.type == kByte && p.text.size() == 6) {
      out += char(std::stoul(p.text.substr(3, 2), nullptr, 16));
      continue;
    }
    if (p.type == kUnknown) {
      out += " \xe2\x81\x87 ";
      continue;
    }
    out += p.text;
  }
  std::string text;  // "▁" → space; no leading space
  for (size_t i = 0; i < out.size();) {
    if (out.compare(i, kSpace.size(), kSpace) == 0) {
      if (!text.empty()) text += ' ';
      i += kSpace.size();
    } else {
      text += out[i++];
    }
  }
  return text;
}

uint32_t Tokenizer::vocab_size() const { return static_cast<uint32_t>(impl_->pieces.size()); }

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
