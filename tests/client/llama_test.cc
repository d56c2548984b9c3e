// The C++ forward pass against the training script's own fp32 logits (models/*/ref_logits.bin),
// for each committed reference model (models/austen: head dim 32, GQA 3; models/manuals: head dim
// 64, GQA 2), and the checkpoint loader's errors. KVM_MODEL_DIR replaces the list of model
// directories with that one directory.
#include "client/llama.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "client/tokenizer.h"

namespace kvm::client {
namespace {

std::vector<std::string> ModelDirs() {
  if (const char* d = std::getenv("KVM_MODEL_DIR")) return {d};
  return {std::string(KVM_SOURCE_DIR) + "/models/austen",
          std::string(KVM_SOURCE_DIR) + "/models/manuals"};
}

// The first model directory, for the tests that need one checkpoint, not every one.
std::string ModelDir() { return ModelDirs().front(); }

std::string ParamName(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = std::filesystem::path(info.param).filename().string();
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return n.empty() ? "model" : n;
}

std::vector<uint8_t> ReadAll(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)),
                              std::istreambuf_iterator<char>());
}

// Every test of this suite runs once per model directory.
class LlamaTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string ModelDir() const { return GetParam(); }
};

TEST_P(LlamaTest, LogitsMatchTheTrainingScriptOverTheWholePrompt) {
  auto model = LlamaModel::Load(ModelDir() + "/model.bin");
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const auto raw = ReadAll(ModelDir() + "/ref_logits.bin");
  ASSERT_GE(raw.size(), 12u);
  int32_t n, vocab, offset;
  std::memcpy(&n, raw.data(), 4);
  std::memcpy(&vocab, raw.data() + 4, 4);
  std::memcpy(&offset, raw.data() + 8, 4);
  ASSERT_EQ(raw.size(), 12 + size_t(n) * vocab * 4);
  ASSERT_EQ(static_cast<uint32_t>(vocab), (*model)->config().vocab_size);
  auto ids = ReadTokenFile(ModelDir() + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  ASSERT_GE(ids->size(), size_t(offset + n));

  auto kv = DenseKvSource::Make((*model)->Shape(DType::kF32), 16);
  ASSERT_TRUE(kv.ok());
  ReferenceWorker worker(**model, kv->get());
  std::vector<float> logits(vocab);
  double max_diff = 0;
  for (int32_t p = 0; p < n; ++p) {
    ASSERT_TRUE(worker.Forward((*ids)[offset + p], p, logits.data()).ok());
    const float* want = reinterpret_cast<const float*>(raw.data() + 12) + size_t(p) * vocab;
    for (int32_t v = 0; v < vocab; ++v)
      max_diff = std::max(max_diff, double(std::fabs(logits[v] - want[v])));
  }
  const LlamaConfig& c = (*model)->config();
  std::printf(
      "%s (dim %u, %u layers, %u heads / %u KV heads, head dim %u): max |dlogit| over %d "
      "positions x %d = %.3g\n",
      ModelDir().c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim(), n, vocab,
      max_diff);
  EXPECT_LT(max_diff, 1e-4);
}

TEST_P(LlamaTest, ReducedPrecisionKvStaysCloseAndIsDeterministic) {
  auto model = LlamaModel::Load(ModelDir() + "/model.bin");
  ASSERT_TRUE(model.ok());
  auto ids = ReadTokenFile(ModelDir() + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  const uint32_t V = (*model)->config().vocab_size;
  std::vector<float> a(V), b(V), c(V);
  auto run = [&](DType dt, std::vector<float>& out) {
    auto kv = DenseKvSource::Make((*model)->Shape(dt), 16);
    ReferenceWorker w(**model, kv->get());
    for (int p = 0; p < 64; ++p) ASSERT_TRUE(w.Forward((*ids)[p], p, out.data()).ok());
  };
  run(DType::kF32, a);
  run(DType::kF16, b);
  run(DType::kF16, c);
  EXPECT_EQ(b, c);  // deterministic
  double md = 0;
  for (uint32_t v = 0; v < V; ++v) md = std::max(md, double(std::fabs(a[v] - b[v])));
  EXPECT_LT(md, 0.1);  // fp16 KV: small drift only
  EXPECT_GT(md, 0.0);  // and it really used fp16
}

TEST_P(LlamaTest, TokenizerRoundTripsHeldOutText) {
  auto tok = Tokenizer::Load(ModelDir() + "/tokenizer.model");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  auto ids = ReadTokenFile(ModelDir() + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ((*ids)[0], Tokenizer::kBos);
  std::vector<uint32_t> some(ids->begin() + 1, ids->begin() + 200);
  const std::string text = (*tok)->Decode(some);
  EXPECT_GT(text.size(), 200u);
  EXPECT_EQ((*tok)->Encode(text), some);
  // A long stretch (many paragraphs of the first held-out document, BOS-free): SentencePiece's
  // encoding of the text is reproduced exactly.
  ASSERT_GT(ids->size(), 20001u);
  std::vector<uint32_t> many(ids->begin() + 1, ids->begin() + 20001);
  ASSERT_EQ(std::count(many.begin(), many.end(), Tokenizer::kBos), 0);
  EXPECT_EQ((*tok)->Encode((*tok)->Decode(many)), many);
  EXPECT_TRUE(Tokenizer::Load(ModelDir() + "/model.bin").status().IsInvalidArgument());
}

INSTANTIATE_TEST_SUITE_P(Models, LlamaTest, ::testing::ValuesIn(ModelDirs()), ParamName);

class LoaderTest : public ::testing::Test {
 protected:
  std::string Write(const std::vector<uint8_t>& bytes) {
    const std::string p = (std::filesystem::temp_directory_path() /
                           ("kvm_llama_" + std::to_string(::getpid()) + "_" + std::to_string(n_++)))
                              .string();
    std::ofstream(p, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    files_.push_back(p);
    return p;
  }
  void TearDown() override {
    for (auto& f : files_) std::filesystem::remove(f);
  }
  std::vector<uint8_t> Header(std::vector<int32_t> h) {
    std::vector<uint8_t> b(28);
    std::memcpy(b.data(), h.data(), 28);
    return b;
  }
  int n_ = 0;
  std::vector<std::string> files_;
};

TEST_F(LoaderTest, ErrorsNameWhatIsWrong) {
  EXPECT_TRUE(LlamaModel::Load("/nonexistent/model.bin").status().IsNotFound());
  auto s = LlamaModel::Load(Write({1, 2, 3})).status();
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  std::vector<uint8_t> ak(256, 0);
  std::memcpy(ak.data(), "ak42", 4);
  s = LlamaModel::Load(Write(ak)).status();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("ak42"), std::string::npos);
  s = LlamaModel::Load(Write(Header({96, 128, 2, 3, 2, 32, 16}))).status();  // 3 heads, 2 kv heads
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("n_kv_heads"), std::string::npos);
  s = LlamaModel::Load(Write(Header({64, 128, 0, 4, 2, 32, 16}))).status();
  EXPECT_NE(s.message().find("n_layers"), std::string::npos);
  // A good header with a truncated body.
  auto full = ReadAll(ModelDir() + "/model.bin");
  ASSERT_GT(full.size(), 1000u);
  full.resize(full.size() - 4);
  s = LlamaModel::Load(Write(full)).status();
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_NE(s.message().find("truncated"), std::string::npos);
}

TEST(TokenFileTest, OddSizeIsRejected) {
  const std::string p = (std::filesystem::temp_directory_path() / "kvm_odd.u16").string();
  std::ofstream(p, std::ios::binary).write("abc", 3);
  EXPECT_TRUE(ReadTokenFile(p).status().IsInvalidArgument());
  std::filesystem::remove(p);
}

}  // namespace
}  // namespace kvm::client

#include "client/measure.h"
#include "client/selector_source.h"
#include "selector/registry.h"

namespace kvm::client {
namespace {
// A selector source whose budget holds every block attends everything: logits bit-identical to
// dense.
class SelectorSourceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(SelectorSourceTest, FullBudgetIsBitIdenticalToDenseAndSmallBudgetIsNot) {
  const std::string dir = GetParam();
  auto model = LlamaModel::Load(dir + "/model.bin");
  ASSERT_TRUE(model.ok());
  auto ids = ReadTokenFile(dir + "/heldout.u16");
  ASSERT_TRUE(ids.ok());
  const auto shape = (*model)->Shape(DType::kF16);
  const uint32_t V = (*model)->config().vocab_size;
  for (uint64_t budget : {uint64_t{1024}, uint64_t{64}}) {
    sel::SelectorOptions o;
    o.geometry = sel::Geometry{16, 4, 16};
    o.budget_tokens = budget;
    auto selr = sel::MakeSelector("prhs", o, shape, 1024);
    ASSERT_TRUE(selr.ok()) << selr.status().ToString();
    auto src = SelectorKvSource::Make(shape, 16, std::move(*selr), o, /*prefill=*/100, 1024);
    ASSERT_TRUE(src.ok());
    auto measured =
        MeasuredKvSource::Make(src->get(), shape, o, /*prefill=*/100, sel::ForcedPolicy::kGeometry);
    ASSERT_TRUE(measured.ok());
    auto dense = DenseKvSource::Make(shape, 16);
    ReferenceWorker ws(**model, measured->get()), wd(**model, dense->get());
    std::vector<float> a(V), b(V);
    bool all_equal = true;
    for (uint64_t p = 0; p < 140; ++p) {
      ASSERT_TRUE(ws.Forward((*ids)[p], p, a.data()).ok());
      ASSERT_TRUE(wd.Forward((*ids)[p], p, b.data()).ok());
      all_equal = all_equal && a == b;
    }
    EXPECT_EQ(all_equal, budget == 1024) << budget;
    const auto& recs = (*measured)->records();
    ASSERT_EQ(recs.size(), 40u * shape.layers * shape.q_heads);  // decode steps 100..139
    const uint32_t g = shape.group_size();
    for (size_t i = 0; i < recs.size(); i += g) {  // records come a GQA group at a time
      double mo = 0, mt = 0;
      for (uint32_t j = 0; j < g; ++j)
        mo += recs[i + j].delta_oracle / g, mt += recs[i + j].delta_true / g;
      ASSERT_LE(mo, mt + 1e-9);  // §0.7: the same-size block oracle's group mean is never worse
      if (budget == 1024) {
        ASSERT_EQ(mt, 0.0);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, SelectorSourceTest, ::testing::ValuesIn(ModelDirs()), ParamName);
}  // namespace
}  // namespace kvm::client
