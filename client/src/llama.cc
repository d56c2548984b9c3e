#include "client/llama.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

namespace kvm::client {
namespace {

// The TSan leg does not instrument the model's arithmetic: MatVec and RmsNorm read and write only
// buffers their one caller owns (no shared state), and instrumenting their two loads per
// multiply-add made the model-heavy client tests ~50x slower than the Release build.
#define KVM_NO_TSAN __attribute__((no_sanitize("thread")))

uint64_t Fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// out[r] = Σ_c W[r][c] x[c], W: [rows][cols] row-major; double accumulation.
KVM_NO_TSAN void MatVec(const float* W, const float* x, float* out, uint32_t rows, uint32_t cols) {
  for (uint32_t r = 0; r < rows; ++r) {
    const float* w = W + size_t{r} * cols;
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    uint32_t c = 0;
    for (; c + 4 <= cols; c += 4) {
      a0 += double(w[c]) * x[c];
      a1 += double(w[c + 1]) * x[c + 1];
      a2 += double(w[c + 2]) * x[c + 2];
      a3 += double(w[c + 3]) * x[c + 3];
    }
    for (; c < cols; ++c) a0 += double(w[c]) * x[c];
    out[r] = static_cast<float>((a0 + a1) + (a2 + a3));
  }
}

KVM_NO_TSAN void RmsNorm(const float* x, const float* w, float* out, uint32_t n) {
  double ss = 0;
  for (uint32_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / n + 1e-5));
  for (uint32_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

}  // namespace

Result<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return Status::NotFound("model checkpoint '" + path + "' cannot be opened");
  const uint64_t size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  const std::string where = "model checkpoint '" + path + "': ";
  if (size < 28)
    return Status::Corruption(where + "file is " + std::to_string(size) +
                              " bytes, shorter than the header");
  int32_t h[7];
  f.read(reinterpret_cast<char*>(h), sizeof h);
  if (std::memcmp(h, "ak42", 4) == 0)
    return Status::InvalidArgument(
        where +
        "magic 'ak42': a later llama2.c format version; export version 0 "
        "(legacy) instead");
  auto m = std::unique_ptr<LlamaModel>(new LlamaModel());
  LlamaConfig& c = m->cfg_;
  const char* names[] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                         "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) {
    const int64_t v = i == 5 ? std::abs(int64_t{h[i]}) : h[i];
    if (v <= 0 || v > (i == 5 ? 1 << 20 : 1 << 16))
      return Status::InvalidArgument(where + std::string(names[i]) + " = " + std::to_string(h[i]) +
                                     " is out of range");
  }
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.shared_classifier = h[5] > 0;
  c.vocab_size = static_cast<uint32_t>(std::abs(h[5]));
  c.seq_len = h[6];
  if (c.dim % c.n_heads) return Status::InvalidArgument(where + "dim is not a multiple of n_heads");
  if (c.n_heads % c.n_kv_heads)
    return Status::InvalidArgument(where + "n_heads is not a multiple of n_kv_heads");
  if (c.head_dim() % 2)
    return Status::InvalidArgument(where + "head dim is odd (RoPE rotates pairs)");
  const uint64_t hd = c.head_dim(), L = c.n_layers, D = c.dim, H = c.hidden_dim, V = c.vocab_size;
  const uint64_t qd = c.n_heads * hd, kvd = c.n_kv_heads * hd;
  const uint64_t per_layer = D + qd * D + 2 * kvd * D + D * qd + D + 3 * H * D;
  const uint64_t floats =
      V * D + L * per_layer + D + uint64_t{c.seq_len} * hd + (c.shared_classifier ? 0 : V * D);
  if (size != 28 + 4 * floats)
    return Status::Corruption(where + "file is " + std::to_string(size) +
                              " bytes, the header implies " + std::to_string(28 + 4 * floats) +
                              (size < 28 + 4 * floats ? " (truncated)" : ""));
  m->data_.resize(floats);
  f.read(reinterpret_cast<char*>(m->data_.data()), static_cast<std::streamsize>(floats * 4));
  if (!f) return Status::Corruption(where + "read failed");
  m->fingerprint_ = Fnv1a(reinterpret_cast<const uint8_t*>(h), sizeof h) ^
                    Fnv1a(reinterpret_cast<const uint8_t*>(m->data_.data()), floats * 4);
  const float* p = m->data_.data();
  auto take = [&p](uint64_t n) {
    const float* r = p;
    p += n;
    return r;
  };
  m->tok_emb_ = take(V * D);
  const float* rms_att = take(L * D);
  const float* wq = take(L * qd * D);
  const float* wk = take(L * kvd * D);
  const float* wv = take(L * kvd * D);
  const float* wo = take(L * D * qd);
  const float* rms_ffn = take(L * D);
  const float* w1 = take(L * H * D);
  const float* w2 = take(L * D * H);
  const float* w3 = take(L * H * D);
  m->rms_final_ = take(D);
  take(uint64_t{c.seq_len} * hd);  // legacy RoPE tables (unused)
  m->wcls_ = c.shared_classifier ? m->tok_emb_ : take(V * D);
  for (uint64_t l = 0; l < L; ++l)
    m->layers_.push_back({rms_att + l * D, wq + l * qd * D, wk + l * kvd * D, wv + l * kvd * D,
                          wo + l * D * qd, rms_ffn + l * D, w1 + l * H * D, w2 + l * D * H,
                          w3 + l * H * D});
  return m;
}

ModelShape LlamaModel::Shape(DType dtype) const {
  return ModelShape{cfg_.n_layers,   cfg_.n_heads, cfg_.n_kv_heads,
                    cfg_.head_dim(), dtype,        fingerprint_};
}

ReferenceWorker::ReferenceWorker(const LlamaModel& model, KvSource* kv) : m_(model), kv_(kv) {
  const LlamaConfig& c = m_.cfg_;
  const uint32_t hd = c.head_dim();
  x_.resize(c.dim);
  xb_.resize(c.dim);
  q_.resize(size_t{c.n_heads} * hd);
  att_.resize(size_t{c.n_heads} * hd);
  k_.resize(size_t{c.n_kv_heads} * hd);
  v_.resize(size_t{c.n_kv_heads} * hd);
  hb_.resize(c.hidden_dim);
  hb2_.resize(c.hidden_dim);
  rope_cos_.resize(size_t{c.seq_len} * hd / 2);
  rope_sin_.resize(rope_cos_.size());
  for (uint32_t p = 0; p < c.seq_len; ++p)
    for (uint32_t i = 0; i < hd; i += 2) {
      const double ang = double(p) / std::pow(10000.0, double(i) / hd);
      rope_cos_[size_t{p} * hd / 2 + i / 2] = static_cast<float>(std::cos(ang));
      rope_sin_[size_t{p} * hd / 2 + i / 2] = static_cast<float>(std::sin(ang));
    }
}

Status ReferenceWorker::Forward(uint32_t token, uint64_t pos, float* logits) {
  const LlamaConfig& c = m_.cfg_;
  if (token >= c.vocab_size)
    return Status::InvalidArgument("token id " + std::to_string(token) + " >= vocab size " +
                                   std::to_string(c.vocab_size));
  if (pos >= c.seq_len)
    return Status::OutOfRange("position " + std::to_string(pos) +
                              " beyond the model's trained length " + std::to_string(c.seq_len));
  const uint32_t D = c.dim, hd = c.head_dim(), H = c.hidden_dim;
  kv_->BeginToken(token, pos);
  std::memcpy(x_.data(), m_.tok_emb_ + size_t{token} * D, D * sizeof(float));
  const float* cs = &rope_cos_[pos * hd / 2];
  const float* sn = &rope_sin_[pos * hd / 2];
  auto rope = [&](float* v, uint32_t heads) {
    for (uint32_t h = 0; h < heads; ++h)
      for (uint32_t i = 0; i < hd; i += 2) {
        float* p = v + size_t{h} * hd + i;
        const float x0 = p[0], x1 = p[1], co = cs[i / 2], si = sn[i / 2];
        p[0] = x0 * co - x1 * si;
        p[1] = x0 * si + x1 * co;
      }
  };
  for (uint32_t l = 0; l < c.n_layers; ++l) {
    const LlamaModel::Layer& w = m_.layers_[l];
    RmsNorm(x_.data(), w.rms_att, xb_.data(), D);
    MatVec(w.wq, xb_.data(), q_.data(), c.n_heads * hd, D);
    MatVec(w.wk, xb_.data(), k_.data(), c.n_kv_heads * hd, D);
    MatVec(w.wv, xb_.data(), v_.data(), c.n_kv_heads * hd, D);
    rope(q_.data(), c.n_heads);
    rope(k_.data(), c.n_kv_heads);
    if (on_layer) on_layer(LayerTrace{l, pos, q_.data(), k_.data(), v_.data()});
    KVM_RETURN_IF_ERROR(kv_->Append(l, pos, k_.data(), v_.data()));
    KVM_RETURN_IF_ERROR(kv_->Attend(l, pos, q_.data(), att_.data()));
    MatVec(w.wo, att_.data(), xb_.data(), D, c.n_heads * hd);
    for (uint32_t i = 0; i < D; ++i) x_[i] += xb_[i];
    RmsNorm(x_.data(), w.rms_ffn, xb_.data(), D);
    MatVec(w.w1, xb_.data(), hb_.data(), H, D);
    MatVec(w.w3, xb_.data(), hb2_.data(), H, D);
    for (uint32_t i = 0; i < H; ++i) hb_[i] = hb_[i] / (1.0f + std::exp(-hb_[i])) * hb2_[i];
    MatVec(w.w2, hb_.data(), xb_.data(), D, H);
    for (uint32_t i = 0; i < D; ++i) x_[i] += xb_[i];
  }
  if (logits) {
    RmsNorm(x_.data(), m_.rms_final_, xb_.data(), D);
    MatVec(m_.wcls_, xb_.data(), logits, c.vocab_size, D);
  }
  return Status::Ok();
}

}  // namespace kvm::client
