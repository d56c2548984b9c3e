"""The service-level crash campaign behind scripts/crash_campaign.sh (run that; it sets the paths).

Each trial starts kvmanager on loopback with a fresh data directory; client threads append in
durable mode over the wire (several sequences, single-token and multi-token appends, K/V bytes
derived from (sequence, position); sequences share prefix blocks) and record every append whose
reply came back; kvmanager is killed with SIGKILL at a random moment once at least --min-acks
appends were acknowledged; it restarts on the same directory and every acknowledged append is
checked byte for byte (K and V of every layer and KV head through read_blocks; token ids through a
retry of the acknowledged range, which the service accepts only if every stored id is the same;
whole blocks through prefix_lookup); then new appends must be accepted, the service is stopped and
`kvmanager --verify-store DIR` must pass.

An acknowledged append is lost when the restarted service stores fewer tokens than its end, corrupt
when any of its K/V bytes or token ids differ. Progress goes to stderr; with --json the last stdout
line is {"trials": N, "acknowledged": A, "lost": L, "corrupt": C}. Exit status 1 when anything was
lost or corrupt or a trial's other checks failed, 77 when the Python package cannot be imported.
--control runs the same campaign on cache sequences, which do not survive a restart: it passes only
if the check counts every acknowledged append lost (the check can fail).
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

try:
    import numpy as np
    import kvmanager
except ImportError as e:  # the package is not built (KVM_PYTHON=OFF, no pybind11)
    print(f"crash_campaign: cannot import the kvmanager Python package: {e}", file=sys.stderr)
    sys.exit(77)

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, B = 2, 4, 2, 32, 16
SHAPE = kvmanager.ModelShape(layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             dtype="fp16", fingerprint=0x5EED)
M64 = (1 << 64) - 1


def gen(seq, pos):
    """Whose content position `pos` of sequence `seq` holds: block 0 is the same in every sequence,
    block 1 is shared by each pair (1, 2), (3, 4), ...; the rest is the sequence's own."""
    if pos < B:
        return 0
    if pos < 2 * B:
        return 1000 + (seq + 1) // 2
    return seq


def mix(x):
    x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9 & M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & M64
    return x ^ (x >> 31)


def token(seq, pos):
    return mix(gen(seq, pos) * 0x9E3779B97F4A7C15 + pos * 0xD1B54A32D192ED03 + 1) & 0x7FFFFFFF


def tokens(seq, start, n):
    return [token(seq, p) for p in range(start, start + n)]


def kv(seq, start, n):
    """[layers][kv_heads][2][n][head_dim] fp16, a function of (gen, position, layer, head, K|V, d)."""
    pos = np.arange(start, start + n, dtype=np.uint64)
    g = np.array([gen(seq, int(p)) for p in pos], dtype=np.uint64)
    u = np.uint64
    with np.errstate(over="ignore"):
        x = (g * u(0x9E3779B97F4A7C15) + pos * u(0xC2B2AE3D27D4EB4F))[None, None, None, :, None]
        x = x + (np.arange(LAYERS, dtype=u) * u(0x165667B19E3779F9))[:, None, None, None, None]
        x = x + (np.arange(KV_HEADS, dtype=u) * u(0x27D4EB2F165667C5))[None, :, None, None, None]
        x = x + (np.arange(2, dtype=u) * u(0x94D049BB133111EB))[None, None, :, None, None]
        x = x + (np.arange(HEAD_DIM, dtype=u) * u(0xFF51AFD7ED558CCD))[None, None, None, None, :]
        x = (x ^ (x >> u(31))) * u(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> u(29))) * u(0x94D049BB133111EB)
        x = x ^ (x >> u(32))
    return np.ascontiguousarray(((x % u(4096)).astype(np.float32) / 1024.0 - 2.0).astype(np.float16))


def log(msg):
    print(f"crash_campaign: {msg}", file=sys.stderr, flush=True)


class Service:
    """One kvmanager process on loopback (ports picked by the kernel) over `data_dir`."""

    def __init__(self, binary, data_dir, workdir, tag):
        self.out_path = os.path.join(workdir, f"out.{tag}")
        self.err_path = os.path.join(workdir, f"log.{tag}")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [binary, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--data-dir",
                 data_dir, "--no-gpu", "--data-plane", "none"], stdout=out, stderr=err)
        deadline = time.time() + 30
        while time.time() < deadline:
            with open(self.out_path) as f:
                m = re.search(r"listening on (\S+)", f.read())
            if m:
                self.address = m.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"kvmanager did not start: {self.tail()}")

    def tail(self):
        with open(self.err_path) as f:
            return f.read()[-2000:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        """SIGTERM: drain and close RocksDB; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


class Worker(threading.Thread):
    """Appends to its own sequences until the service dies or `stop` is set; `acked[seq]` lists
    the (start, n) of every append whose reply was OK."""

    def __init__(self, address, seqs, rng, counter, durability):
        super().__init__(daemon=True)
        self.address, self.seqs, self.rng, self.counter = address, seqs, rng, counter
        self.durability = durability
        self.acked = {s: [] for s in seqs}
        self.length = {s: 0 for s in seqs}
        self.stop = threading.Event()
        self.error = None
        self.unexpected = None

    def run(self):
        try:
            c = kvmanager.Client(self.address, data_plane="none", deadline_ms=10000,
                                 heartbeats=False)
            for s in self.seqs:
                c.create_sequence(s, SHAPE, block_size=B, durability=self.durability)
        except Exception as e:  # killed before the sequences existed
            self.error = e
            return
        try:
            while not self.stop.is_set():
                s = self.rng.choice(self.seqs)
                start = self.length[s]
                r = self.rng.random()
                n = 1 if r < 0.7 else self.rng.randint(2, 3 * B)  # decode steps, some prefills
                new_len = c.append(s, start, tokens(s, start, n), kv(s, start, n))
                if new_len != start + n:
                    self.unexpected = f"sequence {s}: append at {start} of {n} returned {new_len}"
                    return
                self.acked[s].append((start, n))
                self.length[s] = new_len
                with self.counter["lock"]:
                    self.counter["n"] += 1
        except Exception as e:  # the kill: the append in flight was not acknowledged
            self.error = e
        finally:
            try:
                c.close()
            except Exception:
                pass


def check(address, acked, problems):
    """Counts (lost, corrupt) acknowledged appends on the restarted service; appends new tokens."""
    lost = corrupt = 0
    c = kvmanager.Client(address, data_plane="none", deadline_ms=30000, heartbeats=False)
    stored = {s["sequence_id"]: s["length"] for s in c.list_sequences()}
    for seq, appends in sorted(acked.items()):
        if not appends:
            continue
        end = max(a + n for a, n in appends)
        have = stored.get(seq, 0)
        for a, n in appends:
            if a + n > have:
                lost += 1
        upto = min(end, have)
        if upto == 0:
            continue
        if seq not in stored:
            continue
        c.attach(seq, SHAPE, block_size=B)
        # K and V of every layer and head, byte for byte, positions [0, upto).
        want = kv(seq, 0, upto).view(np.uint16)
        bad = np.zeros(upto, dtype=bool)
        blocks = list(range((upto + B - 1) // B))
        for layer in range(LAYERS):
            for h in range(KV_HEADS):
                for v in (False, True):
                    got = c.read_blocks(seq, layer=layer, kv_head=h, block_indices=blocks, values=v,
                                        block_size=B)
                    got = got.view(np.uint16).reshape(-1, HEAD_DIM)[:upto]
                    bad |= (got != want[layer, h, int(v)]).any(axis=1)
        # Token ids: a retry of the acknowledged range is accepted only if every stored id matches.
        try:
            r = c.append(seq, 0, tokens(seq, 0, upto), kv(seq, 0, upto))
            if r != have:
                problems.append(f"sequence {seq}: a retry of [0, {upto}) answered {r}, length {have}")
        except kvmanager.FailedPrecondition:
            for a, n in appends:  # which appends hold other ids
                if a + n <= upto:
                    try:
                        c.append(seq, a, tokens(seq, a, n), kv(seq, a, n))
                    except kvmanager.FailedPrecondition:
                        bad[a:a + n] = True
        for a, n in appends:
            if a + n <= have and bad[a:a + n].any():
                corrupt += 1
        if bad.any():
            problems.append(f"sequence {seq}: {int(bad.sum())} of {upto} positions differ")
        # Whole blocks by content address.
        m = c.prefix_lookup(tokens(seq, 0, upto), SHAPE, block_size=B)
        if m != upto // B * B:
            problems.append(f"sequence {seq}: prefix_lookup matched {m} of {upto} tokens")
        # The restarted service takes new appends: one token, then a block and a half.
        at = have
        for n in (1, B + B // 2):
            r = c.append(seq, at, tokens(seq, at, n), kv(seq, at, n))
            if r != at + n:
                problems.append(f"sequence {seq}: new append at {at} answered {r}")
            at += n
        got = c.read_blocks(seq, 0, 1, [at // B - 1], values=True, block_size=B)
        if not np.array_equal(got.view(np.uint16)[0],
                              kv(seq, at // B * B - B, B).view(np.uint16)[0, 1, 1]):
            problems.append(f"sequence {seq}: a new block reads back wrong")
    # And a new sequence.
    c.create_sequence(10_000, SHAPE, block_size=B, durability="durable")
    if c.append(10_000, 0, tokens(10_000, 0, 20), kv(10_000, 0, 20)) != 20:
        problems.append("a new sequence did not take its first append")
    c.close()
    return lost, corrupt


def trial(i, args, rng):
    work = tempfile.mkdtemp(prefix=f"kvm-crash-{i}-")
    data = os.path.join(work, "data")
    problems = []
    try:
        svc = Service(args.kvmanager, data, work, "1")
        counter = {"n": 0, "lock": threading.Lock()}
        workers = [Worker(svc.address, [2 * w + 1, 2 * w + 2], random.Random(rng.random()),
                          counter, args.durability) for w in range(args.clients)]
        for w in workers:
            w.start()
        # Kill at a random moment once enough appends were acknowledged: a random count past the
        # minimum, then a random sub-millisecond to few-millisecond delay (mid-append, mostly).
        target = args.min_acks + rng.randint(0, args.min_acks)
        deadline = time.time() + 120
        while counter["n"] < target and time.time() < deadline:
            if any(w.unexpected or (w.error and not w.is_alive()) for w in workers):
                break
            time.sleep(0.001)
        time.sleep(rng.random() * 0.005)
        svc.kill()
        for w in workers:
            w.stop.set()
        for w in workers:
            w.join(60)
        acked = {}
        for w in workers:
            acked.update(w.acked)
            if w.unexpected:
                problems.append(w.unexpected)
            if w.is_alive():
                problems.append("a client did not return after the kill")
        n_acked = sum(len(a) for a in acked.values())
        if n_acked < args.min_acks:
            errs = "; ".join(str(w.error) for w in workers if w.error)
            problems.append(f"only {n_acked} appends acknowledged before the kill ({errs}); "
                            f"log: {svc.tail()}")
        svc2 = Service(args.kvmanager, data, work, "2")
        try:
            lost, corrupt = check(svc2.address, acked, problems)
        finally:
            rc = svc2.stop()
        if rc != 0:
            problems.append(f"the restarted kvmanager exited {rc} on SIGTERM: {svc2.tail()}")
        v = subprocess.run([args.kvmanager, "--verify-store", data], capture_output=True,
                           text=True, timeout=120)
        if v.returncode != 0:
            problems.append(f"--verify-store exited {v.returncode}: {(v.stdout + v.stderr)[-3000:]}")
        summary = v.stdout.strip().splitlines()[-1] if v.stdout.strip() else ""
        return n_acked, lost, corrupt, problems, summary
    finally:
        if args.keep and problems:
            log(f"trial {i}: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, required=True)
    p.add_argument("--json", action="store_true", help="last stdout line: the totals as JSON")
    p.add_argument("--min-acks", type=int, default=500,
                   help="acknowledged appends before the kill, at least (default 500)")
    p.add_argument("--clients", type=int, default=4, help="client threads, 2 sequences each")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the time)")
    p.add_argument("--keep", action="store_true", help="keep the directory of a failed trial")
    p.add_argument("--durability", default="durable", choices=["durable", "durable_sync", "cache"],
                   help="of the sequences (default durable)")
    p.add_argument("--control", action="store_true",
                   help="the campaign's own check: cache sequences, which do not survive a restart; "
                        "exit 0 only if every acknowledged append is counted lost")
    p.add_argument("--kvmanager", default=os.environ.get("KVM_KVMANAGER"))
    args = p.parse_args()
    if not args.kvmanager or not os.access(args.kvmanager, os.X_OK):
        print(f"crash_campaign: no kvmanager binary ({args.kvmanager})", file=sys.stderr)
        return 2
    if args.control:
        args.durability = "cache"
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % (1 << 31)
    rng = random.Random(seed)
    log(f"{args.trials} trials, seed {seed}, {args.clients} clients, kill after >= "
        f"{args.min_acks} acknowledged appends")
    totals = {"trials": 0, "acknowledged": 0, "lost": 0, "corrupt": 0}
    failed = 0
    t0 = time.time()
    for i in range(1, args.trials + 1):
        try:
            n_acked, lost, corrupt, problems, summary = trial(i, args, rng)
        except Exception as e:
            n_acked, lost, corrupt, problems, summary = 0, 0, 0, [f"{type(e).__name__}: {e}"], ""
        totals["trials"] += 1
        totals["acknowledged"] += n_acked
        totals["lost"] += lost
        totals["corrupt"] += corrupt
        failed += bool(problems)
        log(f"trial {i}/{args.trials}: {n_acked} acknowledged, {lost} lost, {corrupt} corrupt"
            f"{'' if problems or lost or corrupt else ', ok'} ({time.time() - t0:.0f} s)")
        if summary:
            log(f"  {summary}")
        for pr in problems:
            log(f"  problem: {pr}")
    log(f"done: {totals['trials']} trials, {totals['acknowledged']} acknowledged appends, "
        f"{totals['lost']} lost, {totals['corrupt']} corrupt, {failed} trials with problems, "
        f"{time.time() - t0:.0f} s")
    if args.json:
        print(json.dumps(totals))
    if args.control:
        ok = (totals["acknowledged"] >= args.min_acks * args.trials and not totals["corrupt"]
              and totals["lost"] == totals["acknowledged"] and not failed)
        log(f"control: {'every acknowledged append counted lost, as it must' if ok else 'FAILED'}")
        return 0 if ok else 1
    return 1 if totals["lost"] or totals["corrupt"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
