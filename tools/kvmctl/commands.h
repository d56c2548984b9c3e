// The subcommands of kvmctl. Each returns the process exit code (0 ok, 1 runtime error, 2 usage via
// UsageError).
#pragma once

#include <string>
#include <vector>

namespace kvm::tools {

inline constexpr const char* kGenerateUsage =
    "  generate --model FILE --tokenizer FILE (--prompt TEXT | --tokens FILE [--offset N] [--count "
    "N])\n"
    "           [--max-new N] [--greedy] [--temperature T] [--seed S] [--kv-dtype fp16|bf16|fp32]\n"
    "      Runs the reference worker and prints the generated text. --tokens: little-endian uint16 "
    "ids\n"
    "      used verbatim (they carry their own BOS); --prompt is encoded with a BOS in front.\n"
    "      Defaults: the committed models/austen model and tokenizer, --max-new 64, sampling at T "
    "1.0.";
int RunGenerate(const std::vector<std::string>& args);

inline constexpr const char* kAttnStatsUsage =
    "  attn-stats [--model FILE] [--tokens FILE] [--offset N] [--context N] [--queries N] "
    "[--block-size B]\n"
    "             [--budget-frac F] [--json]\n"
    "      How concentrated the model's attention is: dense prefill of --context tokens, then for "
    "the last\n"
    "      --queries positions the oracle's retained mass at --budget-frac of the context (token "
    "and block\n"
    "      granularity), and the cosine between post-RoPE queries of one head at step lags 1..16.";
int RunAttnStats(const std::vector<std::string>& args);

inline constexpr const char* kHShareCalibrateUsage =
    "  hshare-calibrate [--model FILE] --tokens FILE [--offset N] [--count N] [--channels N] --out "
    "FILE\n"
    "      HShare's label channels (the top mean |q_c k_c| channels per layer and query head; N = "
    "D/8, at\n"
    "      least 4, by default) from a dense pass over the model's TRAINING text; writes the "
    "calibration file.";
int RunHShareCalibrate(const std::vector<std::string>& args);

inline constexpr const char* kEvalUsage =
    "  eval --model FILE --tokens FILE [--offset N] --context N --steps S\n"
    "       --selector dense|oracle|quest|hshare|streaming|h2o|prhs\n"
    "       [--budget N | --budget-frac F] [--target-delta D] [--block-size B] [--generate] "
    "[--json]\n"
    "       [--correction off|anchors|always]   (exact correction: the attention over the blocks "
    "not attended,\n"
    "       merged in; in-process over the local cache, with --server by the service)\n"
    "       [--max-resident N | --max-resident-frac F] [--sinks N] [--window N] [--tau T] "
    "[--margin M]\n"
    "       [--layer-sharing] [--psaw] [--no-bound-gate] [--max-cluster N] [--dense-layers N] "
    "[--kv-dtype "
    "fp16|bf16|fp32]\n"
    "       [--hshare-channels FILE] [--server HOST:PORT[,...] [--transport ucx|tcp]\n"
    "       [--tenant NAME --token-file FILE] [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]]\n"
    "      Prefills --context tokens densely, then decodes --steps steps (teacher-forced on the "
    "true next\n"
    "      tokens; --generate: greedy on its own tokens) with the selector, beside a dense run on "
    "the same\n"
    "      inputs. delta is measured on the sparse run's own q and K at every (step, layer, query "
    "head);\n"
    "      the oracle is the block oracle of the same size with the same forced blocks. --json: "
    "one object\n"
    "      on stdout. Defaults: the committed model and held-out tokens, B 16, 4 sink tokens, a "
    "window of B\n"
    "      tokens, KV fp16, target mode cap 1/4 of the context. --server: the sparse run decodes\n"
    "      through that kvmanager (ServiceKvSource); delta is then the worker's claims (exact at\n"
    "      anchors, bound on reuse), `generated` lists the --generate tokens either way.";
int RunEval(const std::vector<std::string>& args);

inline constexpr const char* kNeedleUsage =
    "  needle --selector NAME [--budget N | --budget-frac F | --target-delta D] [--context N] "
    "[--cases N]\n"
    "         [--needle-len N] [--probe-len N] [--json] (+ eval's selector flags)\n"
    "      Needle in a haystack from the held-out text: a span of held-out text inserted early in "
    "a context\n"
    "      of other held-out text, its beginning repeated at the end; counts the cases dense "
    "attention\n"
    "      continues correctly and, of those, the ones the selector continues correctly too.";
int RunNeedle(const std::vector<std::string>& args);

inline constexpr const char* kBenchAttentionUsage =
    "  bench attention [--context N] [--budget-frac F] [--head-dim D] [--q-heads N] [--kv-heads N] "
    "[--block-size B]\n"
    "                  [--granularity block|token] [--threads N] [--iters N] [--json]\n"
    "      Dense vs sparse CPU decode attention of one layer, batch 1, fp16 synthetic KV (Hq 32, "
    "Hkv 8, D 128,\n"
    "      T 32768, 1/8 by default), rotating over a working set >= 4x the last-level cache with a "
    "fresh\n"
    "      random selection each iteration (read from a copy the dense pass did not just warm), "
    "beside\n"
    "      the reference path (attn::Attend with a token mask) on the same selection; memcpy "
    "bandwidth\n"
    "      measured by the same binary. Waits "
    "(up to about\n"
    "      a minute) for an idle machine and says in `idle` whether it got one.";
int RunBenchAttention(const std::vector<std::string>& args);
inline constexpr const char* kBenchTransportUsage =
    "  bench transport [--tls tcp|sm|inproc] [--blocks N] [--block-bytes N] [--messages N]\n"
    "                  [--in-flight N] [--runs N] [--json]\n"
    "      One retrieval reply per message (N blocks of K+V, contiguous at the sender, scattered "
    "into\n"
    "      the receiver's registered hot-set slots) over the data plane, against ucx_perftest run "
    "here\n"
    "      with the same test (ucp_am_bw), datatypes (-D contig,iov), segment sizes and error "
    "mode;\n"
    "      in-process against memcpy of the same scatter. --in-flight replies outstanding at once\n"
    "      (perftest's -O the same); each figure the median of --runs interleaved rounds, with "
    "the\n"
    "      spread. Defaults: sm, 256 blocks of 8192 bytes, 400 messages, 1 in flight, 5 rounds.";
int RunBenchTransport(const std::vector<std::string>& args);
inline constexpr const char* kBenchDecodeUsage =
    "  bench decode [--model FILE --tokens FILE --offset N | --synthetic --layers L --q-heads H\n"
    "                --kv-heads K --head-dim D] --context N --steps S [--selector NAME] [eval's "
    "selector flags]\n"
    "               [--correction off|anchors|always]\n"
    "               [--transport ucx|tcp|inproc] [--server HOST:PORT[,...]] [--kvmanager PATH] "
    "[--json]\n"
    "               [--tenant NAME --token-file FILE] [--tls-ca FILE [--tls-cert FILE --tls-key "
    "FILE]]\n"
    "      The same decode steps once in-process and once through the service, side by side: "
    "tokens/s of\n"
    "      each and their ratio, identical tokens, round trips and bytes from the worker per step, "
    "step\n"
    "      p50/p99, the worker's attention per layer. Defaults: the committed model and held-out "
    "text\n"
    "      (offset 1000), prhs at delta* 0.1 with a cap of 1/8 of the context, ucx; its own "
    "kvmanager on\n"
    "      free loopback ports (--transport inproc embeds the service). --synthetic: structured "
    "synthetic\n"
    "      KV and queries that drift like a real model's (see bench_decode.cc), labelled "
    "synthetic.";
int RunBenchDecode(const std::vector<std::string>& args);
int RunBench(const std::vector<std::string>& args);

inline constexpr const char* kDemoUsage =
    "  demo [--server HOST:PORT[,...]] [--selector NAME] [--budget-frac F] [--target-delta D]\n"
    "       [--max-new N] [--json]\n"
    "       [--context N] [--offset N] [--audit-frac F] [--kv-dtype fp16|bf16|fp32] [--kvmanager "
    "PATH]\n"
    "       [--transport ucx|tcp] [--tenant NAME --token-file FILE]\n"
    "       [--tls-ca FILE [--tls-cert FILE --tls-key FILE]] [--correction off|anchors|always]\n"
    "      The reference model decodes a prompt of the committed held-out text through the "
    "service: the\n"
    "      PrHS gate on the worker, retrievals on the service, only the selected blocks streamed. "
    "Prints the\n"
    "      text, then delta by kind, retrieval overhead, bytes streamed vs dense offload, "
    "tokens/s. Defaults:\n"
    "      prhs, target delta 0.1 with a cap of 1/8 of the context (--target-delta 0: budget mode, "
    "budget\n"
    "      = --budget-frac), 640 prompt tokens, 256 new. Without --server it starts and stops its "
    "own\n"
    "      kvmanager on free loopback ports. Blocks travel as UCX active messages straight into "
    "the\n"
    "      worker's hot set (--transport tcp: in the reply frames). --json: one object on stdout\n"
    "      (progress goes to stderr). --server a,b,c (shards): the sequence's shard, by the\n"
    "      client's placement. --token-file: the tenant's token, trailing newline stripped.\n"
    "      --tls-ca: TLS on the control channel, the server's certificate checked against that CA "
    "and\n"
    "      the --server host (IP SAN or DNS name); --tls-cert/--tls-key: the client certificate "
    "of\n"
    "      mutual TLS (the same flags on eval, bench decode, status and loadgen).";
int RunDemo(const std::vector<std::string>& args);

inline constexpr const char* kStatusUsage =
    "  status --server HOST:PORT[,...] [--admin HOST:PORT[,...]] [--watch] [--json]\n"
    "         [--tenant NAME --token-file FILE] [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]\n"
    "         [--admin-tls] [--timeout-ms N]\n"
    "      Per shard: up, ready, degraded, version, uptime, sequences, tier use vs capacity (bars "
    "on a\n"
    "      terminal), delta p50/p99 by kind (from the kvm_dropped_mass buckets, since the shard "
    "started),\n"
    "      bandwidth saved (1 - streamed to workers / dense-equivalent), retrievals/s and "
    "errors/s (two\n"
    "      reads of /metrics about 1 s apart; null when a rate cannot be computed). The admin "
    "address of a\n"
    "      shard defaults to its control host with port + 1 (7420 -> 7421, as the chart). The "
    "control port is\n"
    "      only checked to answer: a TCP connect, with --tenant/--token-file (the token's trailing "
    "newline\n"
    "      stripped) also Hello and a Heartbeat; with --tls-ca over TLS. --admin-tls: the admin "
    "port "
    "over\n"
    "      HTTPS, its certificate verified against --tls-ca (a kvmanager --admin-tls shard). Every "
    "check of a shard ends within "
    "--timeout-ms "
    "(default\n"
    "      2000): a shard that does not answer is shown down. --watch: redrawn in place every "
    "second until\n"
    "      Ctrl-C (SIGINT/SIGTERM: exit 0). --json: {\"shards\": [{\"server\", \"up\", "
    "\"ready\", ...}]}\n"
    "      (with --watch one object per line and frame). Exit 1 when a shard is down or not "
    "ready.";
int RunStatus(const std::vector<std::string>& args);

inline constexpr const char* kLoadgenUsage =
    "  loadgen --server HOST:PORT[,...] --sequences N --seconds S [--tokens T]\n"
    "          [--layers L --kv-heads H --head-dim D] [--q-heads Q] [--clients C] [--json]\n"
    "          [--deadline-ms MS] [--budget-frac F] [--durable] [--keep] [--first-sequence-id ID]\n"
    "          [--attach] [--previous-server HOST:PORT[,...]] [--tenant NAME --token-file FILE]\n"
    "          [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]\n"
    "          [--backoff-ms MS] [--kv-dtype fp16|bf16|fp32] [--steps N]\n"
    "      Synthetic decoding workers (labelled synthetic): N sequences spread over the shards by\n"
    "      the client's placement (rendezvous hashing of tenant and sequence id), on C client\n"
    "      threads with their own connections (TCP: blocks in the reply frames). Each sequence is\n"
    "      created with PrHS (budget --budget-frac of T, default 1/8) and a prefill of T tokens\n"
    "      (setup, before the clock), then decodes for S seconds: per step and layer an Append\n"
    "      (asynchronous) and an Attend through ServiceKvSource (the worker gate; RetrieveLayer\n"
    "      with the queries and the pending K rows). A request is a timed call: a RetrieveLayer\n"
    "      round trip, or a (re)creation. A failed call is an error of its shard (Busy apart);\n"
    "      its sequence resumes after --backoff-ms (default 100) at the length its shard stored.\n"
    "      --deadline-ms (default 1000) bounds every request. --steps N: each sequence decodes\n"
    "      N steps; the run ends when all have (or S is up). Progress once a second on stderr.\n"
    "      --json: requests, errors, busy, requests_per_second, p50_ms and p99_ms (successful\n"
    "      retrievals), sequences_by_shard and errors_by_shard (keyed by the addresses as given),\n"
    "      max_error_ms (the slowest failed call), synthetic, and more. Sequence ids are\n"
    "      --first-sequence-id + i (default: random); --keep leaves them stored; --attach resumes\n"
    "      them (found on their owner, or on their owner under --previous-server).\n"
    "      Defaults: T 512, L 4, H 2, Q 4H, D 64, C 1, fp16, cache mode (--durable: survives a\n"
    "      restart).";
int RunLoadgen(const std::vector<std::string>& args);
// ---- Report helpers shared by the commands (report.cc) ----
// JSON string escaping (quotes, backslashes, control characters).
std::string JsonEscape(const std::string& s);
// A number for JSON output: %.6g, or null when it is not finite.
std::string Num(double x);
// The p-quantile (0..1) of v, interpolated between ranks; NaN for an empty v.
double Percentile(std::vector<double> v, double p);

}  // namespace kvm::tools
