// kvmctl loadgen: synthetic decoding workers against one kvmanager or a sharded set of them — what
// the soak, the sharding tests and the performance work drive.
//
// Each sequence is decoded the way a worker decodes it: created on its shard (client::ShardSet
// placement) with PrHS selector params, a prefill of --tokens tokens, then decode steps — per layer
// one Append of the new token (asynchronous, one message per step) and Attend through a
// client::ServiceKvSource: the worker gate decides locally or sends a RetrieveLayer with the
// queries and the K rows the service has not stored yet, and the worker attends over its hot set.
// KV and queries come from the synthetic workload (synthetic.h, seeded by the sequence id), so a
// reader can recompute every stored byte.
//
// Every timed call is a request: a RetrieveLayer round trip (an Attend that went to the service:
// the wall time of that Attend, reply applied and attention done) or the (re)creation of a
// sequence. A call that fails counts as an error (Busy apart), with its shard; the sequence then
// waits a back-off and resumes the way a worker that lost its connection would: it re-attaches at
// the length its shard stored, rolled back to a block boundary before its window (the worker keeps
// the window locally), re-sends the tokens since then and decodes on.
//
// --steps N bounds the work instead of the time: each sequence decodes N steps and stops, and the
// run ends when all have (or --seconds is up); they are deleted once all are done, so runs store
// the same bytes at their peak whatever the machine's speed (bench/soak.sh compares the service's
// RSS from one such run to the next).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"
#include "client/service_source.h"
#include "client/shards.h"
#include "client_flags.h"
#include "commands.h"
#include "flags.h"
#include "proto/kvm.pb.h"
#include "selector/registry.h"
#include "synthetic.h"

namespace kvm::tools {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::ordered_json;

std::atomic<bool> g_stop{false};
extern "C" void LoadgenOnSignal(int) { g_stop = true; }

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

struct Config {
  std::vector<std::string> shards, previous;
  client::ConnectOptions connect;
  uint64_t sequences = 0, first_id = 0, tokens = 0, steps = 0;  // steps: per sequence, 0 = any
  double seconds = 0;
  uint32_t clients = 1, backoff_ms = 100;
  ModelShape shape;
  std::string selector = "prhs";
  sel::SelectorOptions sel;
  bool durable = false, keep = false, attach = false, json = false;
};

// Counters of one shard, written by one client thread, read by the progress line.
struct ShardCounts {
  std::atomic<uint64_t> requests{0}, errors{0}, busy{0}, sequences{0};
};

// What one client thread measured.
struct ThreadStats {
  explicit ThreadStats(size_t shards) : by_shard(shards) {}
  std::vector<ShardCounts> by_shard;
  std::vector<double> latency_ms;  // successful retrievals in the run window
  std::vector<double> create_ms;   // successful (re)creations in the run window
  double max_error_ms = -1;
  Clock::time_point window_end{};
  std::string slowest_error, first_error;
  uint64_t steps = 0, local_attends = 0, resumes = 0, lost = 0, cleanup_errors = 0;
  std::atomic<uint64_t> requests{0}, errors{0}, busy{0}, ready{0};
};

struct Seq {
  uint64_t id = 0;
  size_t shard = 0;
  std::unique_ptr<Synthetic> gen;
  client::Client* client = nullptr;
  std::unique_ptr<client::ServiceKvSource> src;
  uint64_t pos = 0;      // the position being decoded (or the length to bring the service to)
  uint64_t decoded = 0;  // decode steps completed in the run window
  uint32_t layer = 0;    // the next layer of that step
  bool ready = false;    // src decodes at pos
  bool exists = false;   // the sequence is on `shard` (created there, at least in part)
  bool located = false;  // `shard` is known (--attach: Locate found it)
  Clock::time_point next_try{};
  uint64_t q_pos = UINT64_MAX;  // the queries in `q` are those of (q_layer, q_pos)
  uint32_t q_layer = 0;
  std::vector<float> q;
};

class Worker {
 public:
  Worker(const Config& c, std::vector<uint64_t> ids, ThreadStats* stats)
      : c_(c), stats_(stats), ids_(std::move(ids)) {}

  // Runs setup, waits for `go`, decodes until `stop_at` (or a signal, or every sequence decoded
  // --steps), counts itself in `finished`, then cleans up.
  void Run(const std::atomic<bool>& go, const std::atomic<int64_t>& stop_at_ns,
           std::atomic<uint32_t>& setup_done, std::atomic<uint32_t>& finished) {
    client::ShardOptions so;
    so.shards = c_.shards;
    so.previous = c_.previous;
    so.connect = c_.connect;
    so.reconnect_backoff_ms = c_.backoff_ms;
    auto set = client::ShardSet::Make(so);
    if (!set.ok()) {  // validated by the caller already
      setup_done++;
      finished++;
      return;
    }
    shards_ = std::move(*set);
    const size_t D = c_.shape.head_dim;
    k_.resize(size_t{c_.shape.kv_heads} * D);
    v_.resize(k_.size());
    out_.resize(size_t{c_.shape.q_heads} * D);
    for (uint64_t id : ids_) {
      Seq s;
      s.id = id;
      s.gen = std::make_unique<Synthetic>(c_.shape, id);
      s.q.resize(out_.size());
      s.pos = c_.tokens;
      s.shard = shards_->ShardFor(id);
      seqs_.push_back(std::move(s));
    }
    // Setup: every sequence once (created and prefilled, or found and resumed with --attach).
    for (Seq& s : seqs_) {
      if (g_stop) break;
      if (!c_.attach) {
        s.located = true;
        stats_->by_shard[s.shard].sequences++;
      }
      Prepare(s, /*in_window=*/false);
    }
    setup_done++;
    while (!go && !g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    in_window_ = true;
    while (!g_stop && Clock::now().time_since_epoch().count() < stop_at_ns.load()) {
      bool any = false, all_done = true;
      Clock::time_point soonest = Clock::time_point::max();
      for (Seq& s : seqs_) {
        if (g_stop || Clock::now().time_since_epoch().count() >= stop_at_ns.load()) break;
        if (c_.steps && s.decoded >= c_.steps) continue;
        all_done = false;
        const auto now = Clock::now();
        if (now < s.next_try) {
          soonest = std::min(soonest, s.next_try);
          continue;
        }
        any = true;
        if (!s.ready) {
          Prepare(s, true);
        } else {
          for (uint32_t l = 0; l < c_.shape.layers && s.ready; ++l) Step(s);  // one decode step
        }
      }
      if (all_done) break;
      if (!any && soonest != Clock::time_point::max()) {
        const auto until = std::min(soonest, Clock::time_point(Clock::duration(stop_at_ns.load())));
        std::this_thread::sleep_until(until);
      }
    }
    in_window_ = false;
    stats_->window_end = Clock::now();
    finished++;
    // With --steps the sequences are deleted once every client is done, so the run's peak holds
    // all of them at their full length: the same bytes from one run to the next.
    while (c_.steps && finished.load() < c_.clients && !g_stop)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    Cleanup();
  }

 private:
  void Count(Seq& s, const Status& st, double ms, bool window_request) {
    ShardCounts& sc = stats_->by_shard[s.shard];
    if (window_request) {
      sc.requests++;
      stats_->requests++;
    }
    if (st.ok()) return;
    if (st.IsBusy()) {
      sc.busy++;
      stats_->busy++;
    } else {
      sc.errors++;
      stats_->errors++;
      if (stats_->first_error.empty()) stats_->first_error = shards_->Named(s.shard, st).ToString();
      if (ms > stats_->max_error_ms) {
        stats_->max_error_ms = ms;
        stats_->slowest_error = shards_->Named(s.shard, st).ToString();
      }
    }
  }

  // A failed call of `s`: counted; the sequence tries again after the back-off — the same layer
  // after Busy (its source recovers by itself), else a resume.
  void Failed(Seq& s, const Status& st, double ms) {
    Count(s, st, ms, in_window_);
    s.next_try = Clock::now() + std::chrono::milliseconds(c_.backoff_ms);
    if (st.IsBusy() && s.ready) return;
    if (s.ready) stats_->ready--;
    s.ready = false;
  }

  // Drops a source whose replies may still be pending on a shared Client: their handlers point
  // into it. Flush dispatches them; if that fails the connection is reset (pending dropped).
  void DropSource(Seq& s) {
    if (!s.src) return;
    if (!s.src->Flush().ok()) (void)s.client->Reconnect();
    s.src.reset();
  }

  // Brings the service's copy of `s` to [0, pos) with a fresh source ready to decode at pos:
  // creates and prefills a new sequence, or re-attaches to the stored one (rolled back to a block
  // boundary at or before its window) and re-sends the tokens since then. One timed call.
  void Prepare(Seq& s, bool in_window) {
    const auto t0 = Clock::now();
    Status st = PrepareOnce(s);
    const double ms = Ms(Clock::now() - t0);
    if (!st.ok()) {
      Failed(s, st, ms);
      return;
    }
    Count(s, st, ms, in_window);
    if (in_window) stats_->create_ms.push_back(ms);
    s.ready = true;
    s.layer = 0;
    stats_->ready++;
  }

  Status PrepareOnce(Seq& s) {
    if (!s.located) {  // --attach: where it is (its owner, or its owner before the last change)
      KVM_ASSIGN_OR_RETURN(s.shard, shards_->Locate(s.id));
      s.located = s.exists = true;
      s.pos = UINT64_MAX;  // resume at the stored length
      stats_->by_shard[s.shard].sequences++;
    }
    KVM_ASSIGN_OR_RETURN(s.client, shards_->Connection(s.shard));
    DropSource(s);
    const uint32_t B = c_.sel.geometry.block_size;
    uint64_t from = 0;  // the first position to (re-)send
    bool attach = false;
    if (s.exists) {  // the stored length (an attach without selector params changes nothing)
      wire::CreateSequence m;
      m.set_sequence_id(s.id);
      wire::ToWire(c_.shape, m.mutable_shape());
      m.set_block_size(B);
      m.set_attach(true);
      auto f = s.client->Call(wire::MessageType::kCreateSequence, m);
      if (f.ok()) {
        wire::CreateSequenceReply r;
        KVM_RETURN_IF_ERROR(wire::ParseProto(*f, &r));
        const uint64_t stored = r.length();
        if (s.pos == UINT64_MAX) s.pos = stored;  // --attach: decode on from its length
        // The window of the first decode step must be in the new source's tail: roll back to a
        // block boundary at or before it and send the tokens from there again.
        const uint64_t keep_blocks =
            std::min(std::min(stored, s.pos) / B, c_.sel.geometry.WindowFirstBlock(s.pos + 1));
        from = keep_blocks * B;
        if (from < stored)
          KVM_RETURN_IF_ERROR(s.client->Truncate(s.id, from).WithContext("truncate"));
        attach = true;
        ++stats_->resumes;
      } else if (f.status().IsNotFound()) {  // gone (cache mode, lost with its shard): anew
        if (s.pos == UINT64_MAX) return f.status();
        ++stats_->lost;
        s.pos = c_.tokens;
      } else {
        return f.status();
      }
    }
    client::ServiceSourceOptions o;
    o.sequence_id = s.id;
    o.selector = c_.selector;
    o.options = c_.sel;
    o.prefill = s.pos;
    o.durable = c_.durable;
    o.attach = attach;
    auto src = client::ServiceKvSource::Make(s.client, c_.shape, o);
    if (src.status().IsAlreadyExists()) s.exists = true;  // an earlier create went through
    if (!src.ok()) return src.status();
    s.src = std::move(*src);
    s.exists = true;
    for (uint64_t p = from; p < s.pos; ++p) {
      s.src->BeginToken(s.gen->Token(p), p);
      for (uint32_t l = 0; l < c_.shape.layers; ++l) {
        s.gen->KeysValues(l, p, k_.data(), v_.data());
        KVM_RETURN_IF_ERROR(s.src->Append(l, p, k_.data(), v_.data()));
      }
    }
    return s.src->Flush();
  }

  // One layer of the current decode step of `s`: Append + Attend (timed when it went out).
  void Step(Seq& s) {
    const uint32_t l = s.layer;
    const uint64_t p = s.pos;
    if (l == 0) s.src->BeginToken(s.gen->Token(p), p);
    s.gen->KeysValues(l, p, k_.data(), v_.data());
    if (s.q_pos != p || s.q_layer != l) {  // a retried layer reuses its queries
      s.gen->Queries(l, p, s.q.data());
      s.q_pos = p;
      s.q_layer = l;
    }
    const uint64_t trips = s.src->totals().round_trips;
    const auto t0 = Clock::now();
    Status st = s.src->Append(l, p, k_.data(), v_.data());
    if (st.ok()) st = s.src->Attend(l, p, s.q.data(), out_.data());
    const double ms = Ms(Clock::now() - t0);
    if (!st.ok()) {
      Failed(s, st, ms);
      return;
    }
    if (s.src->totals().round_trips > trips) {
      Count(s, st, ms, true);
      stats_->latency_ms.push_back(ms);
    } else {
      ++stats_->local_attends;
    }
    if (++s.layer == c_.shape.layers) {
      s.layer = 0;
      ++s.pos;
      ++s.decoded;
      ++stats_->steps;
    }
  }

  void Cleanup() {
    for (Seq& s : seqs_) {
      if (!s.src) continue;
      Status st = s.src->Flush();
      if (st.ok() && !c_.keep) st = s.client->DeleteSequence(s.id);
      if (!st.ok()) ++stats_->cleanup_errors;
    }
    for (Seq& s : seqs_) DropSource(s);
    seqs_.clear();
    shards_.reset();
  }

  const Config& c_;
  ThreadStats* stats_;
  std::vector<uint64_t> ids_;
  std::unique_ptr<client::ShardSet> shards_;
  std::vector<Seq> seqs_;
  std::vector<float> k_, v_, out_;
  bool in_window_ = false;
};

Config ParseConfig(const std::vector<std::string>& args) {
  std::set<std::string> vf = {
      "server",      "previous-server", "sequences",         "seconds",    "tokens",
      "layers",      "q-heads",         "kv-heads",          "head-dim",   "clients",
      "deadline-ms", "budget-frac",     "first-sequence-id", "backoff-ms", "kv-dtype",
      "steps"};
  vf.insert(kAuthFlags.begin(), kAuthFlags.end());
  const Flags f(args, vf, {"json", "durable", "keep", "attach"});
  Config c;
  auto list = client::ShardSet::ParseList(f.Required("server"));
  if (!list.ok()) throw UsageError("--server: " + list.status().message());
  c.shards = *list;
  if (auto p = f.Str("previous-server")) {
    auto prev = client::ShardSet::ParseList(*p);
    if (!prev.ok()) throw UsageError("--previous-server: " + prev.status().message());
    c.previous = *prev;
  }
  if (!f.Has("sequences")) throw UsageError("--sequences is required");
  if (!f.Has("seconds")) throw UsageError("--seconds is required");
  c.sequences = uint64_t(f.Int("sequences", 0, 1, 1 << 20));
  c.seconds = f.Double("seconds", 0, 0, 1e7);
  c.tokens = uint64_t(f.Int("tokens", 512, 1, 1 << 22));
  c.steps = uint64_t(f.Int("steps", 0, 0, 1 << 30));
  const std::string dt = f.Str("kv-dtype", "fp16");
  const DType dtype = dt == "fp32"   ? DType::kF32
                      : dt == "bf16" ? DType::kBF16
                      : dt == "fp16" ? DType::kF16
                                     : throw UsageError("--kv-dtype: fp16, bf16 or fp32");
  const uint32_t kv = uint32_t(f.Int("kv-heads", 2, 1, 256));
  c.shape = ModelShape{uint32_t(f.Int("layers", 4, 1, 1024)),
                       uint32_t(f.Int("q-heads", 4 * kv, 1, 1024)),
                       kv,
                       uint32_t(f.Int("head-dim", 64, 32, 256)),
                       dtype,
                       0x10adull};
  if (Status s = c.shape.Validate(); !s.ok()) throw UsageError(s.message());
  if (c.shape.group_size() > 8) throw UsageError("--q-heads / --kv-heads must be at most 8");
  c.clients = uint32_t(std::min<int64_t>(f.Int("clients", 1, 1, 4096), int64_t(c.sequences)));
  c.connect.deadline_ms = uint32_t(f.Int("deadline-ms", 1000, 1, 3600000));
  c.connect.client_name = "kvmctl-loadgen";
  ApplyAuthFlags(f, &c.connect);
  c.backoff_ms = uint32_t(f.Int("backoff-ms", 100, 1, 600000));
  c.durable = f.Bool("durable");
  c.keep = f.Bool("keep");
  c.attach = f.Bool("attach");
  c.json = f.Bool("json");
  if (c.attach && !f.Has("first-sequence-id"))
    throw UsageError("--attach needs --first-sequence-id (the sequences to resume)");
  c.first_id = f.Has("first-sequence-id")
                   ? uint64_t(f.Int("first-sequence-id", 1, 1, INT64_MAX))
                   : (uint64_t(std::chrono::system_clock::now().time_since_epoch().count()) ^
                      (uint64_t(getpid()) << 40)) &
                         0x3fffffffffffffffull;
  // PrHS in budget mode, 1/8 of the prefill by default (at least a block beyond the sinks and the
  // window), blocks of 16, 4 sink tokens, a window of one block: what demo runs.
  const uint32_t B = 16;
  c.sel.geometry = {B, 4, B};
  const double frac = f.Double("budget-frac", 0.125, 1e-6, 1.0);
  const uint64_t min_tokens =
      (c.sel.geometry.MaxSinkBlocks() + c.sel.geometry.MaxWindowBlocks() + 1) * B;
  c.sel.budget_tokens =
      std::max<uint64_t>(min_tokens, uint64_t(std::llround(frac * double(c.tokens) / B)) * B);
  return c;
}

}  // namespace

int RunLoadgen(const std::vector<std::string>& args) {
  const Config c = ParseConfig(args);
  std::vector<std::string> names = c.shards;  // the ShardSet's indices: current, then previous-only
  for (const auto& p : c.previous)
    if (std::find(names.begin(), names.end(), p) == names.end()) names.push_back(p);
  std::vector<std::unique_ptr<ThreadStats>> stats;
  std::vector<std::vector<uint64_t>> ids(c.clients);
  for (uint64_t i = 0; i < c.sequences; ++i) ids[i % c.clients].push_back(c.first_id + i);
  for (uint32_t t = 0; t < c.clients; ++t)
    stats.push_back(std::make_unique<ThreadStats>(names.size()));

  g_stop = false;
  struct sigaction sa {};
  sa.sa_handler = LoadgenOnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::atomic<bool> go{false};
  std::atomic<int64_t> stop_at{INT64_MAX};
  std::atomic<uint32_t> setup_done{0}, finished{0};
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::thread> threads;
  const auto t_setup = Clock::now();
  for (uint32_t t = 0; t < c.clients; ++t) {
    workers.push_back(std::make_unique<Worker>(c, ids[t], stats[t].get()));
    threads.emplace_back([&, t] { workers[t]->Run(go, stop_at, setup_done, finished); });
  }
  auto sum = [&](auto member) {
    uint64_t n = 0;
    for (const auto& s : stats) n += (s.get()->*member).load();
    return n;
  };
  std::fprintf(stderr,
               "[loadgen] %llu sequences (synthetic: L %u Hq %u Hkv %u D %u %s, %llu tokens), "
               "%u clients, %zu shards%s\n",
               (unsigned long long)c.sequences, c.shape.layers, c.shape.q_heads, c.shape.kv_heads,
               c.shape.head_dim, DTypeName(c.shape.dtype), (unsigned long long)c.tokens, c.clients,
               c.shards.size(), c.attach ? ", resuming stored sequences" : "");
  auto last = Clock::now();
  while (setup_done.load() < c.clients) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (Clock::now() - last >= std::chrono::seconds(1)) {
      last = Clock::now();
      std::fprintf(stderr, "[loadgen] setup: %llu/%llu sequences ready, %llu errors\n",
                   (unsigned long long)sum(&ThreadStats::ready), (unsigned long long)c.sequences,
                   (unsigned long long)sum(&ThreadStats::errors));
    }
  }
  const double setup_seconds = std::chrono::duration<double>(Clock::now() - t_setup).count();
  const auto t0 = Clock::now();
  stop_at =
      (t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(c.seconds)))
          .time_since_epoch()
          .count();
  go = true;
  std::fprintf(stderr, "[loadgen] decoding: %llu/%llu sequences ready after %.1f s of setup\n",
               (unsigned long long)sum(&ThreadStats::ready), (unsigned long long)c.sequences,
               setup_seconds);
  uint64_t last_requests = 0;
  last = t0;
  while (!g_stop && Clock::now().time_since_epoch().count() < stop_at.load() &&
         finished.load() < c.clients) {
    const auto until = std::min(last + std::chrono::seconds(1),
                                Clock::time_point(Clock::duration(stop_at.load())));
    while (Clock::now() < until && finished.load() < c.clients && !g_stop)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const auto now = Clock::now();
    const uint64_t r = sum(&ThreadStats::requests);
    std::string shards;
    for (size_t i = 0; i < names.size(); ++i) {
      uint64_t req = 0, err = 0;
      for (const auto& s : stats) {
        req += s->by_shard[i].requests;
        err += s->by_shard[i].errors;
      }
      shards += " " + names[i] + " " + std::to_string(req) + "/" + std::to_string(err);
    }
    std::fprintf(stderr,
                 "[loadgen] %.1f s: %llu requests (%.0f/s), %llu errors, %llu busy, %llu/%llu "
                 "sequences ready; requests/errors by shard:%s\n",
                 std::chrono::duration<double>(now - t0).count(), (unsigned long long)r,
                 double(r - last_requests) / std::chrono::duration<double>(now - last).count(),
                 (unsigned long long)sum(&ThreadStats::errors),
                 (unsigned long long)sum(&ThreadStats::busy),
                 (unsigned long long)sum(&ThreadStats::ready), (unsigned long long)c.sequences,
                 shards.c_str());
    last = now;
    last_requests = r;
  }
  if (g_stop) stop_at = Clock::now().time_since_epoch().count();
  for (auto& th : threads) th.join();
  Clock::time_point end = t0;  // the last client's last call of the run window
  for (const auto& s : stats) end = std::max(end, s->window_end);
  const double seconds = std::chrono::duration<double>(end - t0).count();
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);

  // Totals.
  std::vector<double> lat, create;
  double max_error = -1;
  std::string slowest, first_error;
  uint64_t steps = 0, local = 0, resumes = 0, lost = 0, cleanup_errors = 0;
  json seq_by = json::object(), req_by = json::object(), err_by = json::object(),
       busy_by = json::object();
  for (size_t i = 0; i < names.size(); ++i) {
    uint64_t n = 0, r = 0, e = 0, b = 0;
    for (const auto& s : stats) {
      n += s->by_shard[i].sequences;
      r += s->by_shard[i].requests;
      e += s->by_shard[i].errors;
      b += s->by_shard[i].busy;
    }
    seq_by[names[i]] = n;
    req_by[names[i]] = r;
    err_by[names[i]] = e;
    busy_by[names[i]] = b;
  }
  for (const auto& s : stats) {
    lat.insert(lat.end(), s->latency_ms.begin(), s->latency_ms.end());
    create.insert(create.end(), s->create_ms.begin(), s->create_ms.end());
    if (s->max_error_ms > max_error) {
      max_error = s->max_error_ms;
      slowest = s->slowest_error;
    }
    if (first_error.empty()) first_error = s->first_error;
    steps += s->steps;
    local += s->local_attends;
    resumes += s->resumes;
    lost += s->lost;
    cleanup_errors += s->cleanup_errors;
  }
  const uint64_t requests = sum(&ThreadStats::requests), errors = sum(&ThreadStats::errors),
                 busy = sum(&ThreadStats::busy);
  auto num = [](double x) { return std::isfinite(x) ? json(x) : json(nullptr); };
  auto ms3 = [](double x) { return std::round(x * 1000.0) / 1000.0; };
  json j;
  j["requests"] = requests;
  j["errors"] = errors;
  j["busy"] = busy;
  j["requests_per_second"] = num(seconds > 0 ? double(requests) / seconds : NAN);
  j["p50_ms"] = num(ms3(Percentile(lat, 0.5)));
  j["p99_ms"] = num(ms3(Percentile(lat, 0.99)));
  j["sequences_by_shard"] = seq_by;
  j["errors_by_shard"] = err_by;
  j["max_error_ms"] = max_error >= 0 ? json(ms3(max_error)) : json(nullptr);
  j["synthetic"] = true;
  j["requests_by_shard"] = req_by;
  j["busy_by_shard"] = busy_by;
  j["retrievals"] = lat.size();
  j["p999_ms"] = num(ms3(Percentile(lat, 0.999)));
  j["max_ms"] = lat.empty() ? json(nullptr) : json(ms3(*std::max_element(lat.begin(), lat.end())));
  j["creates"] = create.size();
  j["create_p50_ms"] = num(ms3(Percentile(create, 0.5)));
  j["decode_steps"] = steps;
  j["tokens_per_second"] = num(seconds > 0 ? double(steps) / seconds : NAN);
  j["local_attends"] = local;
  j["resumes"] = resumes;
  j["lost_sequences"] = lost;
  j["cleanup_errors"] = cleanup_errors;
  j["slowest_error"] = slowest.empty() ? json(nullptr) : json(slowest);
  j["first_error"] = first_error.empty() ? json(nullptr) : json(first_error);
  j["seconds"] = seconds;
  j["setup_seconds"] = setup_seconds;
  j["deadline_ms"] = c.connect.deadline_ms;
  j["sequences"] = c.sequences;
  j["first_sequence_id"] = c.first_id;
  j["clients"] = c.clients;
  j["tokens"] = c.tokens;
  j["steps_per_sequence"] = c.steps;
  j["layers"] = c.shape.layers;
  j["q_heads"] = c.shape.q_heads;
  j["kv_heads"] = c.shape.kv_heads;
  j["head_dim"] = c.shape.head_dim;
  j["kv_dtype"] = DTypeName(c.shape.dtype);
  j["selector"] = c.selector;
  j["budget_tokens"] = c.sel.budget_tokens;
  j["block_size"] = c.sel.geometry.block_size;
  j["durable"] = c.durable;
  j["transport"] = "tcp";
  j["shards"] = c.shards;
  j["previous_shards"] = c.previous;
  if (c.json) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("loadgen (synthetic): %llu sequences on %zu shards, %u clients, %.1f s\n",
                (unsigned long long)c.sequences, c.shards.size(), c.clients, seconds);
    std::printf("  %llu requests (%.0f/s), %llu errors, %llu busy; retrieval p50 %s ms p99 %s ms\n",
                (unsigned long long)requests, seconds > 0 ? double(requests) / seconds : 0.0,
                (unsigned long long)errors, (unsigned long long)busy,
                Num(Percentile(lat, 0.5)).c_str(), Num(Percentile(lat, 0.99)).c_str());
    std::printf("  %llu decode steps (%.0f tokens/s), %llu attends decided locally\n",
                (unsigned long long)steps, seconds > 0 ? double(steps) / seconds : 0.0,
                (unsigned long long)local);
    for (size_t i = 0; i < names.size(); ++i)
      std::printf("  shard %-28s %5llu sequences %9llu requests %7llu errors %6llu busy\n",
                  names[i].c_str(), (unsigned long long)seq_by[names[i]].get<uint64_t>(),
                  (unsigned long long)req_by[names[i]].get<uint64_t>(),
                  (unsigned long long)err_by[names[i]].get<uint64_t>(),
                  (unsigned long long)busy_by[names[i]].get<uint64_t>());
    if (max_error >= 0)
      std::printf("  slowest failed call %.1f ms: %s\n", max_error, slowest.c_str());
  }
  return 0;
}

}  // namespace kvm::tools
