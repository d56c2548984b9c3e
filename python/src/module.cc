// kvmanager._kvmanager: the C++ client and the worker-side sparse decoder for Python
// (python/kvmanager/__init__.py re-exports it; DESIGN.md §10).
//
// Client: a ShardSet (client/shards.h) over the address list, one client::Client per shard opened
// on first use; sequence operations go to the sequence's shard (rendezvous placement). Every
// blocking call releases the GIL and then takes the client's mutex (a Client is driven by one
// thread at a time). Buffers are checked (buffers.h) before any pointer is used; Status errors
// become kvmanager.Error subclasses (kvmanager/_errors.py) carrying .code and .message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "buffers.h"
#include "client/client.h"
#include "client/hot_set.h"
#include "client/service_source.h"
#include "client/shards.h"
#include "proto/kvm.pb.h"
#include "proto/wire/frame.h"
#include "selector/options.h"
#include "transport/transport.h"

namespace pyb = pybind11;
using namespace pybind11::literals;

namespace kvm::py {
namespace {

template <typename T>
T Value(Result<T> r) {
  if (!r.ok()) Throw(r.status());
  return std::move(*r);
}

wire::Durability ParseDurability(const std::string& d) {
  if (d == "cache") return wire::CACHE;
  if (d == "durable") return wire::DURABLE;
  if (d == "durable_sync") return wire::DURABLE_SYNC;
  ThrowArg("durability", "'" + d + "' is not one of cache, durable, durable_sync");
}

ModelShape MakeShape(uint32_t layers, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                     const std::string& dtype, uint64_t fingerprint) {
  ModelShape s;
  s.layers = layers;
  s.q_heads = q_heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  auto d = ParseDType(dtype);
  if (!d.ok()) ThrowArg("dtype", d.status().message());
  s.dtype = *d;
  s.fingerprint = fingerprint;
  Check(s.Validate());
  return s;
}

std::string ReadToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) Throw(Status::InvalidArgument("token_file: cannot read '" + path + "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string t = ss.str();
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' ')) t.pop_back();
  if (t.empty()) Throw(Status::InvalidArgument("token_file: '" + path + "' is empty"));
  return t;
}

// TLS arrives with the security issue: pass the files through when ConnectOptions has them.
template <typename O>
void SetTls(O& o, const std::optional<std::string>& ca, const std::optional<std::string>& cert,
            const std::optional<std::string>& key) {
  if constexpr (requires {
                  o.tls_ca;
                  o.tls_cert;
                  o.tls_key;
                }) {
    if (ca) o.tls_ca = *ca;
    if (cert) o.tls_cert = *cert;
    if (key) o.tls_key = *key;
  } else {
    if (ca || cert || key)
      Throw(
          Status::Unimplemented("TLS is not built yet (tls_ca/tls_cert/tls_key need the "
                                "security issue's client)"));
  }
}

std::vector<std::string> ParseAddresses(pyb::handle address) {
  std::vector<std::string> list;
  if (pyb::isinstance<pyb::str>(address)) {
    return Value(client::ShardSet::ParseList(address.cast<std::string>()));
  }
  std::string joined;
  for (auto a : address) {
    if (!pyb::isinstance<pyb::str>(a)) ThrowArg("address", "a list of 'HOST:PORT' strings");
    joined += (joined.empty() ? "" : ",") + a.cast<std::string>();
  }
  if (joined.empty()) ThrowArg("address", "the shard list is empty");
  return Value(client::ShardSet::ParseList(joined));
}

pyb::object NewNumpy(const std::string& dtype, std::vector<size_t> dims) {
  pyb::module_ np = pyb::module_::import("numpy");
  const char* d = dtype == "fp16"   ? "float16"
                  : dtype == "fp32" ? "float32"
                  : dtype == "bf16" ? "uint16"
                                    : "uint8";
  return np.attr("empty")(pyb::cast(dims), "dtype"_a = d);
}

}  // namespace

class PyClient {
 public:
  PyClient(pyb::handle address, std::string tenant, std::optional<std::string> token_file,
           std::optional<std::string> tls_ca, std::optional<std::string> tls_cert,
           std::optional<std::string> tls_key, const std::string& data_plane, uint32_t deadline_ms,
           const std::string& client_name, bool heartbeats) {
    client::ShardOptions so;
    so.shards = ParseAddresses(address);
    so.connect.tenant = tenant;
    so.connect.token = token_file ? ReadToken(*token_file) : "dev";
    so.connect.client_name = client_name;
    if (deadline_ms == 0) ThrowArg("deadline_ms", "must be > 0");
    so.connect.deadline_ms = deadline_ms;
    so.connect.heartbeats = heartbeats;
    SetTls(so.connect, tls_ca, tls_cert, tls_key);
    if (data_plane == "ucx") {
      ucx_ = true;
      so.data_plane = [](const std::string&) { return transport::MakeUcx(); };
    } else if (data_plane != "none") {
      ThrowArg("data_plane", "'" + data_plane + "' is not one of ucx, none");
    }
    tenant_ = tenant;
    set_ = Value(client::ShardSet::Make(std::move(so)));
    if (set_->names().size() == 1) {  // one shard: fail here when it cannot be reached
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      Conn(0);
    }
  }

  std::mutex& mu() { return mu_; }
  client::ShardSet& set() {
    if (!set_) Throw(Status::FailedPrecondition("the client is closed"));
    return *set_;
  }
  bool ucx() const { return ucx_; }
  // The sequence's shard and its connection. Call without the GIL, with mu_ held.
  std::pair<size_t, client::Client*> For(uint64_t seq) {
    const size_t s = set().ShardFor(seq);
    return {s, Conn(s)};
  }
  client::Client* Conn(size_t s) {
    client::Client* c = Value(set().Connection(s));
    opened_[s] = true;
    return c;
  }

  uint64_t Create(uint64_t seq, const ModelShape& shape, uint32_t block_size,
                  const std::string& durability, bool attach,
                  std::optional<std::vector<uint32_t>> prefix_tokens, uint64_t lease_ms) {
    wire::CreateSequence m;
    m.set_sequence_id(seq);
    wire::ToWire(shape, m.mutable_shape());
    m.set_block_size(block_size);
    m.set_durability(ParseDurability(durability));
    m.set_attach(attach);
    if (prefix_tokens)
      m.mutable_prefix_token_ids()->Add(prefix_tokens->begin(), prefix_tokens->end());
    m.set_lease_ms(lease_ms);
    uint64_t len;
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      auto [s, c] = For(seq);
      wire::Frame f = Value(c->Call(wire::MessageType::kCreateSequence, m));
      wire::CreateSequenceReply rep;
      Check(wire::ParseProto(f, &rep));
      len = rep.length();
    }
    shapes_[seq] = {shape, block_size};
    return len;
  }

  // Renews the leases of these sequences (a Heartbeat to each one's shard); the ids that no longer
  // exist.
  std::vector<uint64_t> Renew(const std::vector<uint64_t>& seqs) {
    std::map<size_t, wire::Heartbeat> per_shard;
    for (uint64_t id : seqs) per_shard[set().ShardFor(id)].add_renew_sequences(id);
    std::vector<uint64_t> gone;
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [shard, h] : per_shard) {
      wire::Frame f = Value(Conn(shard)->Call(wire::MessageType::kHeartbeat, h));
      wire::HeartbeatReply rep;
      Check(wire::ParseProto(f, &rep));
      gone.insert(gone.end(), rep.not_found().begin(), rep.not_found().end());
    }
    return gone;
  }

  std::optional<uint64_t> Append(uint64_t seq, uint64_t start, std::vector<uint32_t> tokens,
                                 pyb::handle kv, bool decode, bool wait) {
    const auto& [shape, B] = Known(seq);
    Buffer b(kv, "kv", false);
    b.RequireDType(shape.dtype);
    b.RequireBytes(wire::AppendPayloadBytes(shape, tokens.size()),
                   "[layers][kv_heads][2][n][head_dim] of " + std::to_string(tokens.size()) +
                       " tokens, " + shape.ToString());
    wire::Append m;
    m.set_sequence_id(seq);
    m.set_start_position(start);
    for (uint32_t t : tokens) m.add_token_ids(t);
    m.set_decode(decode);
    std::span<const uint8_t> payload(static_cast<const uint8_t*>(b.data()), b.bytes());
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    auto [s, c] = For(seq);
    if (!wait) {  // returns once the frame is written: the buffer may be reused after it
      Check(c->CallAsync(wire::MessageType::kAppend, m, payload));
      return std::nullopt;
    }
    wire::Frame f = Value(c->Call(wire::MessageType::kAppend, m, payload));
    wire::AppendReply rep;
    Check(wire::ParseProto(f, &rep));
    return rep.length();
  }

  void Flush() {
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    Status first;
    for (size_t i = 0; i < set().names().size(); ++i) {
      // Only shards with an open connection have anything outstanding.
      if (!opened(i)) continue;
      auto c = set().Connection(i);
      Status st = c.ok() ? (*c)->Flush() : c.status();
      if (!st.ok() && first.ok()) first = set().Named(i, st);
    }
    Check(first);
  }

  uint64_t PrefixLookup(std::vector<uint32_t> tokens, const ModelShape& shape, uint32_t block_size,
                        std::optional<uint64_t> seq) {
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    const size_t s = seq ? set().ShardFor(*seq) : 0;
    client::Client* c = Conn(s);
    return Value(c->PrefixLookup(shape, block_size, tokens));
  }

  pyb::object ReadBlocks(uint64_t seq, uint32_t layer, uint32_t kv_head,
                         std::vector<uint64_t> blocks, bool values, pyb::object out,
                         std::optional<uint32_t> block_size) {
    const auto [shape, B] = Known(seq, block_size);
    const uint64_t block_bytes = uint64_t(B) * shape.head_dim * DTypeSize(shape.dtype);
    const uint64_t want = block_bytes * blocks.size();
    const std::string what = std::to_string(blocks.size()) + " blocks of [" + std::to_string(B) +
                             "][" + std::to_string(shape.head_dim) + "] " + DTypeName(shape.dtype);
    if (out.is_none())
      out = NewNumpy(DTypeName(shape.dtype), {blocks.size(), size_t(B), size_t(shape.head_dim)});
    Buffer b(out, "out", true);
    b.RequireDType(shape.dtype);
    b.RequireBytes(want, what);
    wire::ReadBlocks m;
    m.set_sequence_id(seq);
    m.set_layer(layer);
    m.set_kv_head(kv_head);
    for (uint64_t i : blocks) m.add_block_indices(i);
    m.set_values(values);
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      auto [s, c] = For(seq);
      wire::Frame f = Value(c->Call(wire::MessageType::kReadBlocks, m));
      wire::ReadBlocksReply rep;
      Check(wire::ParseProto(f, &rep));
      if (rep.block_size() != B)
        Throw(Status::InvalidArgument("block_size: the sequence's blocks hold " +
                                      std::to_string(rep.block_size()) + " tokens, not " +
                                      std::to_string(B)));
      if (f.payload.size() != want)
        Throw(Status::Internal("read_blocks: the reply holds " + std::to_string(f.payload.size()) +
                               " bytes, expected " + std::to_string(want)));
      if (want) std::memcpy(b.data(), f.payload.data(), want);
    }
    return out;
  }

  uint64_t Truncate(uint64_t seq, uint64_t length) {
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    auto [s, c] = For(seq);
    Check(c->Truncate(seq, length));
    return length;
  }

  void Delete(uint64_t seq) {
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      auto [s, c] = For(seq);
      Check(c->DeleteSequence(seq));
    }
    shapes_.erase(seq);
  }

  pyb::list List() {
    std::vector<std::pair<size_t, wire::ListSequencesReply>> replies;
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      for (size_t i = 0; i < set().names().size(); ++i) {
        client::Client* c = Conn(i);
        wire::Frame f = Value(c->Call(wire::MessageType::kListSequences, wire::ListSequences()));
        wire::ListSequencesReply rep;
        Check(wire::ParseProto(f, &rep));
        replies.emplace_back(i, std::move(rep));
      }
    }
    pyb::list out;
    for (const auto& [i, rep] : replies)
      for (const auto& si : rep.sequences()) {
        auto shape = wire::FromWire(si.shape());
        pyb::dict d("sequence_id"_a = si.sequence_id(), "length"_a = si.length(),
                    "shard"_a = set().name(i));
        if (shape.ok()) d["shape"] = *shape;
        out.append(d);
      }
    return out;
  }

  pyb::dict Stats() {
    std::vector<std::pair<std::string, std::string>> js;
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      for (size_t i = 0; i < set().names().size(); ++i) {
        client::Client* c = Conn(i);
        wire::Frame f = Value(c->Call(wire::MessageType::kStats, wire::Stats()));
        wire::StatsReply rep;
        Check(wire::ParseProto(f, &rep));
        js.emplace_back(set().name(i), rep.json());
      }
    }
    pyb::module_ json = pyb::module_::import("json");
    pyb::dict d;
    for (const auto& [n, j] : js) d[pyb::str(n)] = json.attr("loads")(j);
    return d;
  }

  uint64_t BytesSent() {
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    uint64_t n = 0;
    for (size_t i = 0; i < set().names().size(); ++i)
      if (opened(i)) n += Conn(i)->bytes_sent();
    return n;
  }

  std::vector<std::string> Shards() { return set().names(); }
  std::string ShardFor(uint64_t seq) { return set().name(set().ShardFor(seq)); }
  const std::string& tenant() const { return tenant_; }

  void Close() {
    if (decoders_ > 0)
      Throw(Status::FailedPrecondition("close: " + std::to_string(decoders_) +
                                       " SparseDecoder(s) still use this client"));
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(mu_);
    set_.reset();
  }
  bool closed() const { return !set_; }

  // The shape and block size of a sequence this client created or attached (else: listed).
  // The shape and block size of a sequence: remembered from create/attach, else its shard's list
  // (block_size: the caller's, checked against the service's reply before anything is copied).
  std::pair<ModelShape, uint32_t> Known(uint64_t seq, std::optional<uint32_t> block_size = {}) {
    auto it = shapes_.find(seq);
    if (it != shapes_.end()) return it->second;
    std::optional<ModelShape> shape;
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(mu_);
      auto [s, c] = For(seq);
      wire::Frame f = Value(c->Call(wire::MessageType::kListSequences, wire::ListSequences()));
      wire::ListSequencesReply rep;
      Check(wire::ParseProto(f, &rep));
      for (const auto& si : rep.sequences())
        if (si.sequence_id() == seq) shape = Value(wire::FromWire(si.shape()));
    }
    if (!shape)
      Throw(Status::NotFound("sequence " + std::to_string(seq) + " not found on shard " +
                             set().name(set().ShardFor(seq))));
    return {*shape, block_size.value_or(16)};
  }
  int decoders_ = 0;
  std::map<size_t, int> ucx_decoders_;  // per shard: a data plane serves one decoder at a time

 private:
  bool opened(size_t i) { return opened_.count(i) > 0; }
  std::mutex mu_;
  std::unique_ptr<client::ShardSet> set_;
  std::string tenant_;
  bool ucx_ = false;
  std::map<uint64_t, std::pair<ModelShape, uint32_t>> shapes_;
  std::map<size_t, bool> opened_;
};

// The worker side over the service: ServiceKvSource, one sequence.
class PyDecoder {
 public:
  PyDecoder(std::shared_ptr<PyClient> c, uint64_t seq, const ModelShape& shape,
            const std::string& selector, uint32_t block_size, uint32_t sink_tokens,
            std::optional<uint32_t> window_tokens, uint64_t budget_tokens, double target_delta,
            uint64_t max_resident_tokens, uint64_t prefill, double audit_fraction, bool durable,
            bool attach, double margin, double tau_cos, int32_t dense_layers, bool layer_sharing,
            bool psaw, bool use_bound_gate)
      : c_(std::move(c)), shape_(shape) {
    client::ServiceSourceOptions o;
    o.sequence_id = seq;
    o.selector = selector;
    o.options.geometry.block_size = block_size;
    o.options.geometry.sink_tokens = sink_tokens;
    o.options.geometry.window_tokens = window_tokens ? *window_tokens : block_size;
    o.options.budget_tokens = budget_tokens;
    o.options.target_delta = target_delta;
    o.options.max_resident_tokens = max_resident_tokens;
    o.options.margin = margin;
    o.options.prhs.tau_cos = tau_cos;
    o.options.dense_layers = dense_layers;
    o.options.prhs.layer_sharing = layer_sharing;
    o.options.prhs.psaw = psaw;
    o.options.prhs.use_bound_gate = use_bound_gate;
    o.prefill = prefill;
    o.audit_fraction = audit_fraction;
    o.durable = durable;
    o.attach = attach;
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(c_->mu());
    auto [s, conn] = c_->For(seq);
    if (c_->ucx() && c_->ucx_decoders_[s] > 0)
      Throw(Status::FailedPrecondition(
          "a UCX data plane serves one SparseDecoder at a time per shard: close the other one, or "
          "use a Client per decoder (or data_plane='none')"));
    src_ = Value(client::ServiceKvSource::Make(conn, shape, o));
    shard_ = s;
    if (c_->ucx()) c_->ucx_decoders_[s]++;
    c_->decoders_++;
  }
  ~PyDecoder() { Release(); }

  void Release() {
    if (!src_) return;
    src_.reset();
    if (c_->ucx()) c_->ucx_decoders_[shard_]--;
    c_->decoders_--;
  }
  client::ServiceKvSource& src() {
    if (!src_) Throw(Status::FailedPrecondition("the decoder is closed"));
    return *src_;
  }

  void BeginToken(uint32_t token, uint64_t pos) { src().BeginToken(token, pos); }

  void Append(uint32_t layer, uint64_t pos, pyb::handle k, pyb::handle v) {
    CheckLayer(layer);
    const uint64_t n = uint64_t(shape_.kv_heads) * shape_.head_dim * 4;
    const std::string what = "fp32 [kv_heads=" + std::to_string(shape_.kv_heads) +
                             "][head_dim=" + std::to_string(shape_.head_dim) + "]";
    Buffer kb(k, "k", false), vb(v, "v", false);
    kb.RequireDType(DType::kF32);
    vb.RequireDType(DType::kF32);
    kb.RequireBytes(n, what);
    vb.RequireBytes(n, what);
    auto& s = src();
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(c_->mu());
    Check(s.Append(layer, pos, static_cast<const float*>(kb.data()),
                   static_cast<const float*>(vb.data())));
  }

  pyb::object Attend(uint32_t layer, uint64_t pos, pyb::handle q, pyb::object out) {
    CheckLayer(layer);
    const uint64_t n = uint64_t(shape_.q_heads) * shape_.head_dim * 4;
    const std::string what = "fp32 [q_heads=" + std::to_string(shape_.q_heads) +
                             "][head_dim=" + std::to_string(shape_.head_dim) + "]";
    if (out.is_none()) out = NewNumpy("fp32", {size_t(shape_.q_heads), size_t(shape_.head_dim)});
    Buffer qb(q, "q", false), ob(out, "out", true);
    qb.RequireDType(DType::kF32);
    ob.RequireDType(DType::kF32);
    qb.RequireBytes(n, what);
    ob.RequireBytes(n, what);
    auto& s = src();
    {
      pyb::gil_scoped_release r;
      std::lock_guard<std::mutex> l(c_->mu());
      Check(s.Attend(layer, pos, static_cast<const float*>(qb.data()),
                     static_cast<float*>(ob.data())));
    }
    return out;
  }

  std::vector<std::vector<uint64_t>> Attended() { return src().attended(); }

  // The slot table of a step: per KV head, the attended blocks (ascending) as (block, slot) —
  // slot: where the hot set holds it, or None: the worker's local tail (its recent blocks).
  pyb::list Select(uint32_t layer, uint64_t pos, pyb::handle q, pyb::object out) {
    Attend(layer, pos, q, out);
    const client::HotSet& hs = src().hot_set();
    pyb::list heads;
    const auto& att = src().attended();
    for (uint32_t h = 0; h < att.size(); ++h) {
      pyb::list blocks;
      for (uint64_t b : att[h]) {
        uint32_t slot = 0;
        if (hs.LocalBlock(layer, h, b, false) == nullptr && hs.FindSlot(layer, h, b, &slot))
          blocks.append(pyb::make_tuple(b, slot));
        else
          blocks.append(pyb::make_tuple(b, pyb::none()));
      }
      heads.append(blocks);
    }
    return heads;
  }

  // One resident block's K (or V) rows, [block_size][head_dim] of the dtype, copied into `out` (or
  // a new array): from hot-set slot `slot`, or from the local tail when slot is None.
  pyb::object Block(uint32_t layer, uint32_t kv_head, uint64_t block, std::optional<uint32_t> slot,
                    bool values, pyb::object out) {
    CheckLayer(layer);
    if (kv_head >= shape_.kv_heads) ThrowArg("kv_head", "out of range");
    const client::HotSet& hs = src().hot_set();
    const uint32_t B = hs.layout().block_size();
    const size_t bb = size_t{B} * shape_.head_dim * DTypeSize(shape_.dtype);
    const uint8_t* from = nullptr;
    if (slot) {
      if (*slot >= hs.slots())
        ThrowArg("slot", "out of range (" + std::to_string(hs.slots()) + " slots)");
      uint32_t held = 0;
      if (!hs.FindSlot(layer, kv_head, block, &held) || held != *slot)
        Throw(Status::NotFound("block " + std::to_string(block) + " is not in slot " +
                               std::to_string(*slot)));
      from = hs.SlotData(layer, kv_head, *slot) + (values ? bb : 0);
    } else {
      from = hs.LocalBlock(layer, kv_head, block, values);
      if (!from)
        Throw(Status::NotFound("block " + std::to_string(block) + " is not in the local tail"));
    }
    if (out.is_none())
      out = NewNumpy(DTypeName(shape_.dtype), {size_t(B), size_t(shape_.head_dim)});
    Buffer ob(out, "out", true);
    ob.RequireDType(shape_.dtype);
    ob.RequireBytes(bb, "[block_size][head_dim]");
    std::memcpy(ob.data(), from, bb);
    return out;
  }

  pyb::list Claims(size_t from) {
    pyb::list out;
    const auto& cl = src().claims();
    for (size_t i = from; i < cl.size(); ++i) {
      const auto& c = cl[i];
      out.append(pyb::make_tuple(c.step, c.layer, c.q_head, c.delta, DeltaKindName(c.kind)));
    }
    return out;
  }
  size_t NumClaims() { return src().claims().size(); }

  pyb::dict Totals() {
    const auto& t = src().totals();
    pyb::dict gate;
    for (sel::GateOutcome o : sel::kGateOutcomes)
      gate[pyb::str(sel::GateOutcomeName(o))] = t.gate[o];
    gate["target_missed"] = t.gate.target_missed;
    return pyb::dict(
        "steps"_a = t.steps, "retrievals"_a = t.retrievals, "round_trips"_a = t.round_trips,
        "audits"_a = t.audits, "streamed_bytes"_a = t.streamed_bytes,
        "local_fill_bytes"_a = t.local_fill_bytes, "dense_equivalent"_a = t.dense_equivalent,
        "topk_refetch"_a = t.topk_refetch, "shared_prefetches"_a = t.shared_prefetches,
        "reconnects"_a = t.reconnects, "divergences"_a = t.divergences,
        "failed_calls"_a = t.failed_calls, "retrieve_seconds"_a = t.retrieve_seconds,
        "attention_seconds"_a = t.attention_seconds, "attention_layers"_a = t.attention_layers,
        "gate"_a = gate, "hot_set_slots"_a = src().hot_set_slots(),
        "hot_set_generation"_a = src().hot_set_generation(), "last_error"_a = src().last_error());
  }

  void Call(Status (client::ServiceKvSource::*f)()) {
    auto& s = src();
    pyb::gil_scoped_release r;
    std::lock_guard<std::mutex> l(c_->mu());
    Check((s.*f)());
  }

 private:
  void CheckLayer(uint32_t layer) const {
    if (layer >= shape_.layers)
      ThrowArg("layer", std::to_string(layer) + " >= layers " + std::to_string(shape_.layers));
  }
  std::shared_ptr<PyClient> c_;
  ModelShape shape_;
  std::unique_ptr<client::ServiceKvSource> src_;
  size_t shard_ = 0;
};

}  // namespace kvm::py

PYBIND11_MODULE(_kvmanager, m) {
  using namespace kvm;
  using namespace kvm::py;
  m.doc() = "kvmanager's C++ client and sparse decoder (use the `kvmanager` package)";

  pyb::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      pyb::object make = pyb::module_::import("kvmanager._errors").attr("_from_status");
      pyb::object err = make(uint32_t(e.status.code()),
                             std::string(StatusCodeName(e.status.code())), e.status.message());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    }
  });

  pyb::class_<ModelShape>(m, "ModelShape", R"doc(
A model's KV geometry: layers, query heads, KV heads, head dimension, the stored dtype
("fp16", "bf16", "fp32") and a fingerprint of the weights (0 = unknown).)doc")
      .def(pyb::init(&MakeShape), "layers"_a, "q_heads"_a, "kv_heads"_a, "head_dim"_a,
           "dtype"_a = "fp16", "fingerprint"_a = 0)
      .def_readonly("layers", &ModelShape::layers)
      .def_readonly("q_heads", &ModelShape::q_heads)
      .def_readonly("kv_heads", &ModelShape::kv_heads)
      .def_readonly("head_dim", &ModelShape::head_dim)
      .def_readonly("fingerprint", &ModelShape::fingerprint)
      .def_property_readonly("dtype", [](const ModelShape& s) { return DTypeName(s.dtype); })
      .def_property_readonly("elem_bytes", [](const ModelShape& s) { return DTypeSize(s.dtype); })
      .def("__eq__", [](const ModelShape& a, const ModelShape& b) { return a == b; })
      .def("__repr__", [](const ModelShape& s) { return "ModelShape(" + s.ToString() + ")"; })
      .def(pyb::pickle(
          [](const ModelShape& s) {
            return pyb::make_tuple(s.layers, s.q_heads, s.kv_heads, s.head_dim,
                                   std::string(DTypeName(s.dtype)), s.fingerprint);
          },
          [](pyb::tuple t) {
            return MakeShape(t[0].cast<uint32_t>(), t[1].cast<uint32_t>(), t[2].cast<uint32_t>(),
                             t[3].cast<uint32_t>(), t[4].cast<std::string>(),
                             t[5].cast<uint64_t>());
          }));

  pyb::class_<PyClient, std::shared_ptr<PyClient>>(m, "Client", R"doc(
A connection to kvmanager: one shard ("HOST:PORT") or a shard list ("a:7420,b:7420" or a list of
addresses; each sequence lives on its rendezvous owner, client/shards.h). A context manager.

  tenant, token_file  the tenant and a file holding its token (default token: "dev")
  tls_ca, tls_cert, tls_key  PEM files (TLS: when the client is built with it)
  data_plane  "ucx" (retrieval blocks arrive over UCX) or "none" (in the TCP replies)
  deadline_ms  per request: a call that takes longer raises TimedOut (a TimeoutError)

Errors are kvmanager.Error subclasses with .code and .message; a wrong buffer is
kvmanager.InvalidArgument (a ValueError) naming the argument.)doc")
      .def(pyb::init<pyb::handle, std::string, std::optional<std::string>,
                     std::optional<std::string>, std::optional<std::string>,
                     std::optional<std::string>, const std::string&, uint32_t, const std::string&,
                     bool>(),
           "address"_a, "tenant"_a = "dev", "token_file"_a = pyb::none(), "tls_ca"_a = pyb::none(),
           "tls_cert"_a = pyb::none(), "tls_key"_a = pyb::none(), "data_plane"_a = "ucx",
           "deadline_ms"_a = 30000, "client_name"_a = "kvmanager-python", "heartbeats"_a = true)
      .def("create_sequence", &PyClient::Create, "sequence_id"_a, "shape"_a, "block_size"_a = 16,
           "durability"_a = "cache", "attach"_a = false, "prefix_tokens"_a = pyb::none(),
           "lease_ms"_a = 0, R"doc(
Creates a storage-only sequence (durability "cache", "durable" or "durable_sync"); with attach=True
attaches to an existing one of the same shape. prefix_tokens: a new request's prompt — the
sequence starts with the longest prefix of it that the service already stores (whole blocks, what
prefix_lookup counts), shared by content address, not copied. lease_ms > 0: the service deletes the
sequence after that long without use (any call on it, or renew()). Returns its length in tokens
(with prefix_tokens: how many were attached).)doc")
      .def("renew", &PyClient::Renew, "sequence_ids"_a, R"doc(
Renews the leases of these sequences (one heartbeat per shard); returns the ids that no longer
exist (expired or deleted).)doc")
      .def(
          "attach",
          [](PyClient& c, uint64_t seq, const ModelShape& shape, uint32_t b) {
            return c.Create(seq, shape, b, "cache", true, std::nullopt, 0);
          },
          "sequence_id"_a, "shape"_a, "block_size"_a = 16,
          "Attaches to an existing sequence (NotFound when there is none); returns its length.")
      .def("append", &PyClient::Append, "sequence_id"_a, "start_position"_a, "token_ids"_a, "kv"_a,
           "decode"_a = false, "wait"_a = true, R"doc(
Appends len(token_ids) tokens from start_position (idempotent by position). kv: the K then V rows,
[layers][kv_heads][2][n][head_dim] in the sequence's dtype (numpy float16/float32, torch
float16/bfloat16/float32; read in place, never copied). wait=False returns once the request is
written (errors come at flush()); else the new length.)doc")
      .def("flush", &PyClient::Flush,
           "Waits for every asynchronous append; raises the first error.")
      .def("prefix_lookup", &PyClient::PrefixLookup, "token_ids"_a, "shape"_a, "block_size"_a = 16,
           "sequence_id"_a = pyb::none(), R"doc(
How many leading tokens of token_ids the service stores for this shape and block size (whole
blocks of durable sequences, by content address). Asked of sequence_id's shard (default: the
first shard): prefixes are shared within a shard.)doc")
      .def("read_blocks", &PyClient::ReadBlocks, "sequence_id"_a, "layer"_a, "kv_head"_a,
           "block_indices"_a, "values"_a = false, "out"_a = pyb::none(),
           "block_size"_a = pyb::none(),
           R"doc(
Reads K (values=False) or V blocks of one (layer, KV head): [n][block_size][head_dim] of the
sequence's dtype, into `out` (a writable contiguous array or tensor of exactly that size) or a
new numpy array. Returns the array. A sequence this client did not create or attach is looked up
on its shard (block_size: give it when it is not 16).)doc")
      .def("truncate", &PyClient::Truncate, "sequence_id"_a, "length"_a,
           "Rolls the sequence back to `length` tokens.")
      .def("delete_sequence", &PyClient::Delete, "sequence_id"_a, "Deletes the sequence.")
      .def("delete", &PyClient::Delete, "sequence_id"_a, "Deletes the sequence.")
      .def("list_sequences", &PyClient::List,
           "The tenant's sequences on every shard: dicts of sequence_id, length, shape, shard.")
      .def("stats", &PyClient::Stats, "Each shard's statistics (parsed JSON), by shard address.")
      .def("shard_for", &PyClient::ShardFor, "sequence_id"_a, "The shard that holds a sequence.")
      .def_property_readonly("shards", &PyClient::Shards)
      .def_property_readonly("tenant", &PyClient::tenant)
      .def_property_readonly("bytes_sent", &PyClient::BytesSent,
                             "Bytes written on the control channels since connecting.")
      .def_property_readonly("closed", &PyClient::closed)
      .def("close", &PyClient::Close, "Closes every connection (idempotent).")
      .def("__enter__", [](std::shared_ptr<PyClient> c) { return c; })
      .def("__exit__", [](PyClient& c, pyb::args) { c.Close(); });

  pyb::class_<PyDecoder>(m, "SparseDecoder", R"doc(
The worker side of one sequence through the service (client/service_source.h): per token,
begin_token(token, pos), then for every layer append(layer, pos, k, v) and attend(layer, pos, q).
Positions below `prefill` attend densely on the worker; from there on the worker gate decides per
KV head whether to reuse its hot set or retrieve a selection, and attention runs over the hot set
and the local tail with the fast CPU kernel. k, v: fp32 [kv_heads][head_dim] (post-RoPE k);
q and the result: fp32 [q_heads][head_dim].)doc")
      .def(pyb::init<std::shared_ptr<PyClient>, uint64_t, const ModelShape&, const std::string&,
                     uint32_t, uint32_t, std::optional<uint32_t>, uint64_t, double, uint64_t,
                     uint64_t, double, bool, bool, double, double, int32_t, bool, bool, bool>(),
           "client"_a, "sequence_id"_a, "shape"_a, "selector"_a = "prhs", "block_size"_a = 16,
           "sink_tokens"_a = 4, "window_tokens"_a = pyb::none(), "budget_tokens"_a = 0,
           "target_delta"_a = 0.0, "max_resident_tokens"_a = 0, "prefill"_a = 0,
           "audit_fraction"_a = 0.0, "durable"_a = false, "attach"_a = false, "margin"_a = 0.5,
           "tau_cos"_a = -1.0, "dense_layers"_a = -1, "layer_sharing"_a = false, "psaw"_a = false,
           "use_bound_gate"_a = true)
      .def("begin_token", &PyDecoder::BeginToken, "token"_a, "pos"_a,
           "The token id at `pos`, before its layers' appends.")
      .def("append", &PyDecoder::Append, "layer"_a, "pos"_a, "k"_a, "v"_a,
           "The new token's post-RoPE K and V of one layer, fp32 [kv_heads][head_dim].")
      .def("attend", &PyDecoder::Attend, "layer"_a, "pos"_a, "q"_a, "out"_a = pyb::none(),
           "Attention of the token at `pos` over [0, pos]; into `out` or a new numpy array.")
      .def("select", &PyDecoder::Select, "layer"_a, "pos"_a, "q"_a, "out"_a = pyb::none(), R"doc(
The slot table of this query's step: per KV head, the resident blocks (ascending: the selection the
service chose or the gate reused) as (block, slot) — slot in the hot set, or None for a block of
the worker's local tail. Runs the step (as attend: the CPU kernel's output goes to `out` when
given); a caller whose own kernel attends reads each block with block().)doc")
      .def("block", &PyDecoder::Block, "layer"_a, "kv_head"_a, "block"_a, "slot"_a,
           "values"_a = false, "out"_a = pyb::none(), R"doc(
One resident block's K (values=False) or V rows, [block_size][head_dim] of the sequence's dtype,
copied into `out` or a new array: from hot-set slot `slot` as select() named it, or from the local
tail (slot None). NotFound when that slot or the tail does not hold the block.)doc")
      .def_property_readonly("attended", &PyDecoder::Attended,
                             "The blocks each KV head attended at the last decode attend.")
      .def("claims", &PyDecoder::Claims, "start"_a = 0,
           "The δ claims from index `start`: (step, layer, q_head, delta, kind) tuples.")
      .def_property_readonly("num_claims", &PyDecoder::NumClaims)
      .def_property_readonly("totals", &PyDecoder::Totals,
                             "Retrievals, round trips, bytes, gate outcomes, retries.")
      .def(
          "flush", [](PyDecoder& d) { d.Call(&client::ServiceKvSource::Flush); },
          "Waits for outstanding appends and audits.")
      .def("report_stats", [](PyDecoder& d) { d.Call(&client::ServiceKvSource::ReportStats); })
      .def("reset_hot_set", [](PyDecoder& d) { d.Call(&client::ServiceKvSource::ResetHotSet); })
      .def(
          "delete",
          [](PyDecoder& d) {
            d.Call(&client::ServiceKvSource::Delete);
            d.Release();
          },
          "Deletes the sequence on the service and closes the decoder.")
      .def("close", &PyDecoder::Release, "Closes the decoder (the sequence stays).")
      .def("__enter__", [](pyb::object d) { return d; })
      .def("__exit__", [](PyDecoder& d, pyb::args) { d.Release(); });

  m.def("_buffer_address", &BufferAddress, "obj"_a,
        "The address the C++ side reads for a buffer (tests of zero-copy).");
  m.attr("PROTOCOL_VERSION") = wire::kProtocolVersion;
}
