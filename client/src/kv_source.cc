#include "client/kv_source.h"

#include <cstring>
#include <string>

#include "layer_attention.h"
#include "proto/half.h"

namespace kvm::client {

const char* CorrectionName(Correction c) {
  switch (c) {
    case Correction::kOff:
      return "off";
    case Correction::kAnchors:
      return "anchors";
    case Correction::kAlways:
      return "always";
  }
  return "?";
}

Result<Correction> ParseCorrection(const std::string& name) {
  for (Correction c : {Correction::kOff, Correction::kAnchors, Correction::kAlways})
    if (name == CorrectionName(c)) return c;
  return Status::InvalidArgument("correction: '" + name + "' is not off, anchors or always");
}

Status CheckCorrection(const sel::SelectorOptions& o, Correction c) {
  if (o.prhs.reuse_while_fits && c != Correction::kAlways)
    return Status::InvalidArgument(
        "reuse_while_fits needs correction 'always': without it a reuse has no δ bound");
  return Status::Ok();
}

Result<std::unique_ptr<DenseKvSource>> DenseKvSource::Make(const ModelShape& shape,
                                                           uint32_t block_size) {
  KVM_ASSIGN_OR_RETURN(auto layout, BlockLayout::Make(shape, block_size));
  return std::unique_ptr<DenseKvSource>(new DenseKvSource(layout));
}

DenseKvSource::DenseKvSource(const BlockLayout& l)
    : layout_(l),
      heads_(size_t{l.shape().layers} * l.shape().kv_heads),
      len_(l.shape().layers, 0),
      att_(std::make_unique<LayerAttention>()) {}

DenseKvSource::~DenseKvSource() = default;

Status DenseKvSource::Append(uint32_t layer, uint64_t pos, const float* k, const float* v) {
  const auto& s = layout_.shape();
  if (layer >= s.layers)
    return Status::InvalidArgument("layer " + std::to_string(layer) + " out of range");
  if (pos > len_[layer])
    return Status::FailedPrecondition("append at " + std::to_string(pos) +
                                      " leaves a gap (length " + std::to_string(len_[layer]) + ")");
  const size_t row = layout_.row_bytes();
  for (uint32_t h = 0; h < s.kv_heads; ++h) {
    Head& hd = head(layer, h);
    if (pos == len_[layer] && pos % layout_.block_size() == 0) {
      hd.k.resize(hd.k.size() + layout_.kv_block_bytes());
      hd.v.resize(hd.v.size() + layout_.kv_block_bytes());
    }
    EncodeRow(k + size_t{h} * s.head_dim, s.head_dim, s.dtype, hd.k.data() + pos * row);
    EncodeRow(v + size_t{h} * s.head_dim, s.head_dim, s.dtype, hd.v.data() + pos * row);
  }
  if (pos == len_[layer]) ++len_[layer];
  return Status::Ok();
}

attn::HeadKV DenseKvSource::View(uint32_t layer, uint32_t kvh, uint64_t tokens) const {
  const Head& hd = head(layer, kvh);
  const uint64_t nb = layout_.BlocksFor(tokens);
  hd.kp.resize(nb);
  hd.vp.resize(nb);
  for (uint64_t b = 0; b < nb; ++b) {
    hd.kp[b] = hd.k.data() + b * layout_.kv_block_bytes();
    hd.vp[b] = hd.v.data() + b * layout_.kv_block_bytes();
  }
  const auto& s = layout_.shape();
  return attn::HeadKV{hd.kp.data(), hd.vp.data(),         static_cast<uint32_t>(nb),
                      tokens,       layout_.block_size(), s.head_dim,
                      s.dtype};
}

void DenseKvSource::Row(uint32_t layer, uint32_t kvh, uint64_t token, bool values,
                        float* out) const {
  // Blocks are contiguous, so the row is at token * row bytes (no block view to build).
  const Head& hd = head(layer, kvh);
  DecodeRow((values ? hd.v : hd.k).data() + token * layout_.row_bytes(), layout_.shape().head_dim,
            layout_.shape().dtype, out);
}

Status DenseKvSource::Attend(uint32_t layer, uint64_t pos, const float* q, float* out) {
  const auto& s = layout_.shape();
  if (layer >= s.layers || pos >= len_[layer])
    return Status::OutOfRange("attend at layer " + std::to_string(layer) + " position " +
                              std::to_string(pos) + " before its keys were appended");
  const uint32_t B = layout_.block_size();
  const uint64_t T = pos + 1, nb = layout_.BlocksFor(T);
  att_->Prepare(s, B, nb);
  for (uint32_t h = 0; h < s.kv_heads; ++h) {
    const Head& hd = head(layer, h);
    for (uint64_t b = 0; b < nb; ++b) {
      att_->k(h)[b] = hd.k.data() + b * layout_.kv_block_bytes();
      att_->v(h)[b] = hd.v.data() + b * layout_.kv_block_bytes();
      att_->rows(h)[b] = static_cast<uint16_t>(b + 1 == nb && T % B ? T % B : B);
    }
    att_->set_count(h, static_cast<uint32_t>(nb));
  }
  return att_->Run(q, out);
}

}  // namespace kvm::client
