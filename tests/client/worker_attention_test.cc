// The worker's fast attention (attn::DecodeCpu over the blocks a KV source attends, in ascending
// order) against the reference arithmetic (attn::Attend with a token mask over the same blocks), on
// the committed model's real queries and keys: in-process (SelectorKvSource) and through the
// service (ServiceKvSource), prefill and decode, every layer and head, within the tolerance of the
// attention/ tests.
#include <gtest/gtest.h>

#include <cmath>

#include "attention/reference.h"
#include "client/llama.h"
#include "client/selector_source.h"
#include "client/service_source.h"
#include "client/tokenizer.h"
#include "selector/registry.h"
#include "testutil/service.h"

namespace kvm::client {
namespace {

std::string ModelDir() { return std::string(KVM_SOURCE_DIR) + "/models/austen"; }

// Wraps a sparse source: after each Attend, the reference attention over what it attended.
class ReferenceCheck : public KvSource {
 public:
  ReferenceCheck(SparseKvSource* inner, const ModelShape& shape, uint32_t B, uint64_t prefill)
      : inner_(inner),
        shape_(shape),
        B_(B),
        prefill_(prefill),
        shadow_(std::move(DenseKvSource::Make(shape, B)).value()) {}
  void BeginToken(uint32_t token, uint64_t pos) override { inner_->BeginToken(token, pos); }
  Status Append(uint32_t layer, uint64_t pos, const float* k, const float* v) override {
    KVM_RETURN_IF_ERROR(inner_->Append(layer, pos, k, v));
    return shadow_->Append(layer, pos, k, v);
  }
  Status Attend(uint32_t layer, uint64_t pos, const float* q, float* out) override {
    KVM_RETURN_IF_ERROR(inner_->Attend(layer, pos, q, out));
    const uint32_t g = shape_.group_size(), D = shape_.head_dim;
    const uint64_t T = pos + 1;
    std::vector<float> want(size_t{g} * D);
    for (uint32_t h = 0; h < shape_.kv_heads; ++h) {
      std::vector<uint8_t> mask(T, pos < prefill_ ? 1 : 0);
      if (pos >= prefill_)
        for (uint64_t b : inner_->attended()[h])
          for (uint64_t t = b * B_; t < std::min<uint64_t>(T, (b + 1) * B_); ++t) mask[t] = 1;
      KVM_RETURN_IF_ERROR(
          attn::Attend(q + size_t{h} * g * D, g, shadow_->View(layer, h, T), mask, want.data()));
      for (size_t i = 0; i < want.size(); ++i) {
        const float got = out[size_t{h} * g * D + i];
        worst_ = std::max(worst_, double(std::fabs(got - want[i])));
        if (!(std::fabs(got - want[i]) <= 2e-5f + 2e-5f * std::fabs(want[i])))
          return Status::Internal("fast attention differs from the reference at layer " +
                                  std::to_string(layer) + " pos " + std::to_string(pos) +
                                  " KV head " + std::to_string(h) + ": " + std::to_string(got) +
                                  " vs " + std::to_string(want[i]));
      }
      ++checked_;
    }
    return Status::Ok();
  }
  uint64_t checked() const { return checked_; }
  double worst() const { return worst_; }

 private:
  SparseKvSource* inner_;
  ModelShape shape_;
  uint32_t B_;
  uint64_t prefill_;
  std::unique_ptr<DenseKvSource> shadow_;
  uint64_t checked_ = 0;
  double worst_ = 0;
};

Status RunTokens(const LlamaModel& model, const std::vector<uint32_t>& ids, KvSource* src,
                 uint64_t prefill, uint64_t steps) {
  ReferenceWorker w(model, src);
  std::vector<float> logits(model.config().vocab_size);
  for (uint64_t p = 0; p < prefill + steps; ++p)
    KVM_RETURN_IF_ERROR(w.Forward(ids[p], p, logits.data()));
  return Status::Ok();
}

TEST(WorkerAttentionTest, FastPathMatchesTheReferenceInProcessAndThroughTheService) {
  auto model = std::move(LlamaModel::Load(ModelDir() + "/model.bin")).value();
  auto ids = std::move(ReadTokenFile(ModelDir() + "/heldout.u16")).value();
  const ModelShape shape = model->Shape(DType::kF16);
  sel::SelectorOptions o;
  o.geometry = {16, 4, 16};
  o.budget_tokens = 64;
  const uint64_t prefill = 200, steps = 24;
  {
    auto sel = std::move(sel::MakeSelector("prhs", o, shape, 1024)).value();
    auto src =
        std::move(SelectorKvSource::Make(shape, 16, std::move(sel), o, prefill, 1024)).value();
    ReferenceCheck check(src.get(), shape, 16, prefill);
    const Status s = RunTokens(*model, ids, &check, prefill, steps);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(check.checked(), (prefill + steps) * shape.layers * shape.kv_heads);
    std::printf("in-process: worst |fast - reference| %.3g\n", check.worst());
  }
  testutil::TestService svc;
  auto conn = std::move(Client::Connect({.address = svc.server->address()})).value();
  ServiceSourceOptions so;
  so.options = o;
  so.prefill = prefill;
  auto src = std::move(ServiceKvSource::Make(conn.get(), shape, so)).value();
  ReferenceCheck check(src.get(), shape, 16, prefill);
  const Status s = RunTokens(*model, ids, &check, prefill, steps);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(check.checked(), (prefill + steps) * shape.layers * shape.kv_heads);
  EXPECT_GT(src->totals().gate[sel::GateOutcome::kReuse], 0u);  // the hot set served reuse steps
  std::printf("through the service: worst |fast - reference| %.3g\n", check.worst());
}

}  // namespace
}  // namespace kvm::client
