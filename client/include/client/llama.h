// The reference worker: a C++ forward pass of a LLaMA-architecture model in llama2.c's version-0
// checkpoint format, whose attention reads keys and values through a pluggable KvSource.
//
// Checkpoint (little-endian): 7 int32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
// seq_len} (vocab_size < 0: an untied classifier follows), then fp32 tensors, each for all layers
// in a row: tok_emb[vocab][dim], rms_att[L][dim], wq[L][Hq*hd][dim], wk[L][Hkv*hd][dim],
// wv[L][Hkv*hd][dim], wo[L][dim][Hq*hd], rms_ffn[L][dim], w1[L][hidden][dim], w2[L][dim][hidden],
// w3[L][hidden][dim], rms_final[dim], seq_len*hd legacy floats, [wcls[vocab][dim]]. hd = dim /
// n_heads. Math: RMSNorm (eps 1e-5), RoPE on interleaved pairs (i, i+1) by pos / 10000^(i/hd), GQA
// (query head h uses KV head h / (Hq/Hkv)), SwiGLU w2(silu(w1 x) * w3 x). Matrix products
// accumulate in double.
//
// LlamaModel is immutable after Load (thread-safe to share). A ReferenceWorker is not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "client/kv_source.h"
#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::client {

struct LlamaConfig {
  uint32_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0,
           seq_len = 0;
  bool shared_classifier = true;
  uint32_t head_dim() const { return n_heads ? dim / n_heads : 0; }
};

class LlamaModel {
 public:
  // Loads and validates a checkpoint. Errors name what is wrong: InvalidArgument for a bad header
  // or an `ak42` (later llama2.c version) file, Corruption for a size that does not match the
  // header, NotFound for a missing file.
  static Result<std::unique_ptr<LlamaModel>> Load(const std::string& path);

  const LlamaConfig& config() const { return cfg_; }
  // The KV shape of this model with KV stored as `dtype`; fingerprint = FNV-1a 64 of the file.
  ModelShape Shape(DType dtype) const;
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  friend class ReferenceWorker;
  struct Layer {
    const float *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3;
  };
  LlamaModel() = default;
  LlamaConfig cfg_;
  uint64_t fingerprint_ = 0;
  std::vector<float> data_;
  const float* tok_emb_ = nullptr;
  const float* rms_final_ = nullptr;
  const float* wcls_ = nullptr;
  std::vector<Layer> layers_;
};

// Per-layer values of one token, for observers (analysis, eval).
struct LayerTrace {
  uint32_t layer;
  uint64_t pos;
  const float* q;  // [n_heads][hd] post-RoPE
  const float* k;  // [n_kv_heads][hd] post-RoPE
  const float* v;  // [n_kv_heads][hd]
};

class ReferenceWorker {
 public:
  // `kv` must outlive the worker and match model.Shape() in layers, heads and head_dim.
  ReferenceWorker(const LlamaModel& model, KvSource* kv);

  // Runs token `token` at position `pos` (0-based, < seq_len, pos == number of tokens run so far)
  // and writes logits[vocab_size] when logits is non-null.
  Status Forward(uint32_t token, uint64_t pos, float* logits);
  // Called for every layer of every Forward, after q/k/v are computed and before attention.
  std::function<void(const LayerTrace&)> on_layer;

 private:
  const LlamaModel& m_;
  KvSource* kv_;
  std::vector<float> x_, xb_, q_, k_, v_, att_, hb_, hb2_;
  std::vector<float> rope_cos_, rope_sin_;  // [seq_len][hd/2]
};

}  // namespace kvm::client
