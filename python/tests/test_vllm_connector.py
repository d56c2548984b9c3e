"""kvmanager.vllm.connector.KvmanagerConnector driven the way vLLM drives it (fakes for requests,
block lists, scheduler output and attention metadata; torch CPU tensors in each paged layout),
against a real kvmanager. vLLM itself cannot be installed here (../shared/docs/vllm.md)."""
import hashlib
import os
import pickle
import signal
import time
from types import SimpleNamespace as NS

import pytest

torch = pytest.importorskip("torch")

import kvmanager  # noqa: E402
from conftest import Server  # noqa: E402
from kvmanager.vllm import connector as kc  # noqa: E402

B, L, D, NB = 16, 3, 32, 40   # block size, layers, head_dim, paged blocks per layer
LAYOUTS = ["2NBHD", "N2BHD", "NHB2D"]


def vllm_config(address, kv_heads=2, tp=1, rank=0, **extra):
    ex = dict(address=address, tenant="dev", layers=L, q_heads=2 * kv_heads, kv_heads=kv_heads,
              head_dim=D, dtype="fp16", model="fake-llama", deadline_ms=2000)
    ex.update(extra)
    return NS(kv_transfer_config=NS(kv_connector="KvmanagerConnector",
                                    kv_connector_module_path="kvmanager.vllm.connector",
                                    kv_role="kv_both", kv_connector_extra_config=ex),
              model_config=None, parallel_config=NS(tensor_parallel_size=tp, rank=rank),
              cache_config=NS(block_size=B, cache_dtype="auto"))


def paged(layout, kv_heads):
    shape = {"2NBHD": (2, NB, B, kv_heads, D), "N2BHD": (NB, 2, B, kv_heads, D),
             "NHB2D": (NB, kv_heads, B, 2 * D)}[layout]
    return {f"model.layers.{i}.self_attn": torch.zeros(shape, dtype=torch.float16) for i in range(L)}


def token_kv(tokens, pos, layer, heads, rank):
    """The fake model's K and V of position `pos`: a function of tokens[:pos + 1] (causal)."""
    h = hashlib.blake2b(repr((tokens[:pos + 1], layer, rank)).encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") & (2 ** 63 - 1))
    return torch.randn(2, heads, D, generator=g).to(torch.float16)


class FakeVllm:
    """One scheduler connector and the workers (one per TP rank), each with its paged cache."""

    def __init__(self, address, layout="N2BHD", tp=1, kv_heads_total=2, **extra):
        self.layout, self.tp, self.heads = layout, tp, kv_heads_total // tp
        self.sched = kc.KvmanagerConnector(vllm_config(address, self.heads, tp, 0, **extra),
                                           kc.KVConnectorRole.SCHEDULER)
        self.workers, self.caches = [], []
        for r in range(tp):
            w = kc.KvmanagerConnector(vllm_config(address, self.heads, tp, r, **extra), 1)
            cache = paged(layout, self.heads)
            w.register_kv_caches(cache)
            self.workers.append(w)
            self.caches.append(cache)
        self.free = list(range(NB))
        self.finished_recving = []
        self.load_errors = []

    def views(self, r, name):
        lay = self.workers[r]._layers[name]
        return lay.k, lay.v

    def alloc(self, n_tokens):
        n = -(-n_tokens // B)
        ids, self.free = self.free[:n], self.free[n:]
        return NS(get_block_ids=lambda: (list(ids),)), ids

    def step(self, sched_out, compute):
        """One engine step: meta -> (pickle) -> workers: load, layers (attention writes the new
        tokens' KV, then save_kv_layer), wait_for_save, get_finished, load errors."""
        meta = self.sched.build_connector_meta(sched_out)
        meta = pickle.loads(pickle.dumps(meta))
        for r, w in enumerate(self.workers):
            w.bind_connector_metadata(meta)
            w.start_load_kv(NS())
            for li, name in enumerate(w._order):
                w.wait_for_layer_load(name)
                slots = []
                k, v = self.views(r, name)
                for tokens, positions, block_ids in compute:
                    for p in positions:
                        kv = token_kv(tokens, p, li, self.heads, r)
                        k[block_ids[p // B], p % B] = kv[0]
                        v[block_ids[p // B], p % B] = kv[1]
                        slots.append(block_ids[p // B] * B + p % B)
                w.save_kv_layer(name, self.caches[r][name], NS(slot_mapping=torch.tensor(slots)))
            w.wait_for_save()
        self.poll()
        for w in self.workers:
            w.clear_connector_metadata()

    def poll(self):
        for w in self.workers:
            _, recv = w.get_finished(set())
            self.finished_recving += sorted(recv or ())
            self.load_errors.append(w.get_block_ids_with_load_errors())

    def prefill(self, rid, prompt, chunks=(None,)):
        """A request without a hit, its prompt computed in chunks (chunked prefill)."""
        req = NS(request_id=rid, prompt_token_ids=prompt, num_tokens=len(prompt),
                 num_computed_tokens=0)
        assert lookup(self, req) == (0, False)
        blocks, ids = self.alloc(len(prompt))
        self.sched.update_state_after_alloc(req, blocks, 0)
        done = 0
        for i, c in enumerate(chunks):
            n = (len(prompt) - done) if c is None else c
            if i == 0:
                so = NS(scheduled_new_reqs=[NS(req_id=rid, prompt_token_ids=prompt, block_ids=(ids,),
                                               num_computed_tokens=0)],
                        scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                                 num_computed_tokens=[]),
                        num_scheduled_tokens={rid: n}, finished_req_ids=set())
            else:
                so = NS(scheduled_new_reqs=[],
                        scheduled_cached_reqs=NS(req_ids=[rid], resumed_req_ids=set(),
                                                 new_block_ids=[None], num_computed_tokens=[done]),
                        num_scheduled_tokens={rid: n}, finished_req_ids=set())
            frozen = pickle.dumps(so)
            self.step(so, [(prompt, range(done, done + n), ids)])
            assert pickle.dumps(so) == frozen  # build_connector_meta left it alone
            done += n
        assert self.sched.request_finished(req, ids) == (False, None)
        return ids

    def block_bytes(self, r, ids):
        out = []
        for name in self.workers[r]._order:
            k, v = self.views(r, name)
            out.append((k[ids].clone(), v[ids].clone()))
        return out

    def shutdown(self):
        self.sched.shutdown()
        for w in self.workers:
            w.shutdown()


def lookup(fv, req, computed=0, timeout=10):
    """get_num_new_matched_tokens, asked again while it answers (None, True) (async_lookup)."""
    t0 = time.time()
    hit = fv.sched.get_num_new_matched_tokens(req, computed)
    while hit[0] is None and time.time() - t0 < timeout:
        assert hit == (None, True)
        time.sleep(0.01)
        hit = fv.sched.get_num_new_matched_tokens(req, computed)
    return hit


def load_request(fv, rid, prompt):
    req = NS(request_id=rid, prompt_token_ids=prompt, num_tokens=len(prompt), num_computed_tokens=0)
    hit = lookup(fv, req)
    assert fv.sched.get_num_new_matched_tokens(req, 0) == hit  # idempotent
    blocks, ids = fv.alloc(len(prompt))
    fv.sched.update_state_after_alloc(req, blocks, hit[0])
    fv.sched.update_state_after_alloc(req, blocks, 0)  # the second call of an async load
    return req, hit, ids


def empty_out():
    return NS(scheduled_new_reqs=[], scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(),
              new_block_ids=[], num_computed_tokens=[]), num_scheduled_tokens={},
              finished_req_ids=set())


def wait_finished(fv, rid, timeout=10, times=1):
    t0 = time.time()
    while fv.finished_recving.count(rid) < times and time.time() - t0 < timeout:
        time.sleep(0.02)
        fv.poll()
    return time.time() - t0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefix_saved_then_loaded_byte_identical(server, layout):
    fv = FakeVllm(server.address, layout)
    try:
        p1 = [(7 * i + 3) % 500 for i in range(70)]            # 4 full blocks + 6
        ids1 = fv.prefill("req-1", p1, chunks=(40, None))
        p2 = p1[:52] + [499 - i for i in range(30)]            # shares 3 full blocks (+4 tokens)
        req2, hit, ids2 = load_request(fv, "req-2", p2)
        assert hit == (48, True)
        fv.step(empty_out(), [])                               # the load goes out in this step
        assert wait_finished(fv, "req-2") < 5
        for _ in range(3):
            fv.poll()
        assert fv.finished_recving.count("req-2") == 1         # exactly once
        assert not any(fv.load_errors)
        got, want = fv.block_bytes(0, ids2[:3]), fv.block_bytes(0, ids1[:3])
        for (gk, gv), (wk, wv) in zip(got, want):
            assert torch.equal(gk, wk) and torch.equal(gv, wv)
        # the rest of req-2's blocks were not touched by the load
        assert not any(k.any() or v.any() for k, v in fv.block_bytes(0, ids2[3:]))
        # a prompt that is all one stored prefix still leaves a token to compute
        req3 = NS(request_id="req-3", prompt_token_ids=p1[:64], num_tokens=64, num_computed_tokens=0)
        assert fv.sched.get_num_new_matched_tokens(req3, 0) == (48, True)
        # tokens vLLM's own prefix cache already has are not counted again
        assert fv.sched.get_num_new_matched_tokens(req3, 32) == (16, True)
        assert fv.sched.get_num_new_matched_tokens(req3, 48) == (0, False)
        # an unrelated prompt: no hit, not async
        req4 = NS(request_id="req-4", prompt_token_ids=list(range(64)), num_tokens=64,
                  num_computed_tokens=0)
        assert fv.sched.get_num_new_matched_tokens(req4, 0) == (0, False)
        stats = [w.get_kv_connector_stats() for w in fv.workers]
        assert stats[0].data["saved_tokens"] == 70 and stats[0].data["loaded_blocks"] == 3
    finally:
        fv.shutdown()


def stop(pid):
    """SIGSTOP, then wait until every thread of pid is stopped: kill() only queues the signal, and
    a thread running meanwhile (on a loaded machine, for a while) may still answer a request."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that exited
                pass
        if states and all(st in "tT" for st in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within 10 s: thread states {states}")


def test_async_lookup_answers_none_until_done_then_the_same(server):
    fv = FakeVllm(server.address, async_lookup=True)
    try:
        p1 = [(11 * i + 5) % 500 for i in range(70)]
        fv.prefill("a-1", p1)  # its lookup went through (None, True) first
        req = NS(request_id="a-2", prompt_token_ids=p1[:52] + [1, 2], num_tokens=54,
                 num_computed_tokens=0)
        stop(server.proc.pid)  # the service holds the lookup: it is pending
        try:
            for _ in range(3):
                assert fv.sched.get_num_new_matched_tokens(req, 0) == (None, True)
                time.sleep(0.05)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert lookup(fv, req) == (48, True)
        assert fv.sched.get_num_new_matched_tokens(req, 0) == (48, True)  # idempotent once done
        miss = NS(request_id="a-3", prompt_token_ids=list(range(40)), num_tokens=40,
                  num_computed_tokens=0)
        assert lookup(fv, miss) == (0, False)  # the async flag is False with a count of 0
    finally:
        fv.shutdown()


def test_saves_attach_the_stored_prefix_instead_of_sending_it(server):
    """A second vLLM (its scheduler's index empty: no load) saving a prompt that shares 3 blocks
    with one stored by the first: the service attaches them and only the rest travels."""
    first = FakeVllm(server.address)
    try:
        p1 = [(13 * i + 7) % 500 for i in range(70)]
        first.prefill("s-1", p1)
    finally:
        first.shutdown()
    second = FakeVllm(server.address)
    try:
        p2 = p1[:50] + [499 - i for i in range(32)]  # 3 full blocks shared, 82 tokens
        second.prefill("s-2", p2)
        st = second.workers[0].get_kv_connector_stats().data
        assert st["attached_tokens"] == 48 and st["saved_tokens"] == len(p2) - 48
        with kvmanager.Client(server.address, data_plane="none") as c:
            seq = kc.sequence_id("s-2", 0)
            shape = second.workers[0]._geo.shape()
            assert c.prefix_lookup(p2, shape, block_size=B, sequence_id=seq) == 80
            for li in range(L):  # the attached blocks hold what s-2's own KV would be
                for h in range(second.heads):
                    got = c.read_blocks(seq, li, h, [0, 1, 2, 3, 4], values=False)
                    want = torch.stack([token_kv(p2, p, li, second.heads, 0)[0][h]
                                        for p in range(80)])
                    assert torch.equal(torch.from_numpy(got).reshape(80, D), want)
    finally:
        second.shutdown()


def test_a_finished_requests_blocks_expire_with_its_lease(server):
    fv = FakeVllm(server.address, lease_ms=800)
    try:
        p1 = [(17 * i + 1) % 500 for i in range(40)]
        fv.prefill("l-1", p1)
        shape = fv.workers[0]._geo.shape()
        with kvmanager.Client(server.address, data_plane="none") as c:
            assert c.prefix_lookup(p1, shape, block_size=B) == 32  # findable after it finished
            t0 = time.time()
            while c.prefix_lookup(p1, shape, block_size=B) and time.time() - t0 < 20:
                time.sleep(0.1)
            assert c.prefix_lookup(p1, shape, block_size=B) == 0  # the service expired it
        req = NS(request_id="l-2", prompt_token_ids=p1, num_tokens=40, num_computed_tokens=0)
        assert lookup(fv, req) == (0, False)  # the scheduler's index is not believed
    finally:
        fv.shutdown()


def test_two_tensor_parallel_ranks_save_and_load_their_own_heads(server):
    fv = FakeVllm(server.address, "2NBHD", tp=2, kv_heads_total=4)
    try:
        p1 = list(range(100, 164))
        ids1 = fv.prefill("a", p1)
        _, hit, ids2 = load_request(fv, "b", p1[:40] + [1] * 10)
        assert hit == (32, True)
        fv.step(empty_out(), [])
        wait_finished(fv, "b", times=2)
        fv.poll()
        assert fv.finished_recving.count("b") == 2  # one per rank (vLLM aggregates the ranks)
        for r in range(2):
            got, want = fv.block_bytes(r, ids2[:2]), fv.block_bytes(r, ids1[:2])
            for (gk, gv), (wk, wv) in zip(got, want):
                assert torch.equal(gk, wk) and torch.equal(gv, wv)
        a0, a1 = fv.block_bytes(0, ids1[:2]), fv.block_bytes(1, ids1[:2])
        assert not torch.equal(a0[0][0], a1[0][0])  # the ranks' heads differ: each loaded its own
    finally:
        fv.shutdown()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_service_mid_load_reports_errors_and_finishes(how):
    s = Server()
    fv = None
    try:
        fv = FakeVllm(s.address, "N2BHD", deadline_ms=1000, load_deadline_ms=1500)
        p1 = list(range(200, 264))
        fv.prefill("x", p1)
        _, hit, ids2 = load_request(fv, "y", p1[:48] + [5])
        assert hit == (48, True)
        os.kill(s.proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.time()
        fv.step(empty_out(), [])
        waited = wait_finished(fv, "y")
        assert time.time() - t0 < 4, "a dead service must not strand the request"
        assert fv.finished_recving.count("y") == 1
        errs = set().union(*fv.load_errors)
        assert errs == set(ids2[:3])  # reported by the pass that reported it finished
        for _ in range(3):
            fv.poll()
        assert fv.finished_recving.count("y") == 1 and not any(fv.load_errors[-3:])
        assert waited < 4
    finally:
        if how == "stop":
            try:
                os.kill(s.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if fv:
            fv.shutdown()
        s.stop()


def test_lookup_against_a_dead_service_is_no_hit(server):
    fv = FakeVllm(server.address)
    try:
        p1 = list(range(64))
        fv.prefill("p", p1)
        server.kill()
        req = NS(request_id="q", prompt_token_ids=p1, num_tokens=64, num_computed_tokens=0)
        assert fv.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    finally:
        fv.shutdown()


def test_roles_layouts_config_metadata_and_metrics(server):
    cfg = vllm_config(server.address)
    for role in (0, kc.KVConnectorRole.SCHEDULER):
        kc.KvmanagerConnector(cfg, role).shutdown()
    assert int(kc.KVConnectorRole.SCHEDULER) == 0 and int(kc.KVConnectorRole.WORKER) == 1
    with pytest.raises(ValueError, match="kv_transfer_config"):
        kc.KvmanagerConnector(NS(kv_transfer_config=None), 0)
    with pytest.raises(ValueError, match="role"):
        kc.KvmanagerConnector(cfg, 7)
    with pytest.raises(ValueError, match="mode"):
        kc.KvmanagerConnector(vllm_config(server.address, mode="sparse"), 0)
    w = kc.KvmanagerConnector(cfg, 1)
    with pytest.raises(ValueError, match=r"shape \(3, 16, 2, 32\)"):
        w.register_kv_caches({"l0": torch.zeros(3, 16, 2, 32)})
    with pytest.raises(ValueError, match="ambiguous"):  # 2 blocks: (2, N, ...) or (N, 2, ...)
        kc.PagedLayout(torch.zeros(2, 2, B, 2, D), B, 2, D)
    assert kc.PagedLayout(torch.zeros(2, 2, B, 2, D), B, 2, D, hint="N2BHD").kind == "N2BHD"
    w.shutdown()
    meta = kc.KvmanagerConnectorMetadata(loads=[kc.LoadSpec("r", "s", [0, 1], [5, 6])],
                                         saves=[kc.SaveSpec("r", 0, [1, 2], [5])])
    assert pickle.loads(pickle.dumps(meta)) == meta

    class Counter:
        made = []

        def __init__(self, name, documentation, labelnames):
            self.name, self.values = name, {}
            Counter.made.append(self)

        def labels(self, *vals):
            c = self

            class Child:
                def inc(self, v):
                    c.values[vals] = c.values.get(vals, 0) + v
            return Child()

    class Gauge(Counter):
        pass

    prom = kc.KvmanagerConnector.build_prom_metrics(cfg, {Gauge: Gauge, Counter: Counter},
                                                    ["model_name", "engine"], {0: ["m", "0"]})
    stats = kc.KvmanagerConnector.build_kv_connector_stats({"saved_bytes": 10, "load_errors": 1})
    prom.observe(stats.data, 0)
    names = {c.name: c.values for c in Counter.made}
    assert names["vllm:kvmanager_saved_bytes_total"] == {("m", "0"): 10}
    assert names["vllm:kvmanager_load_errors_total"] == {("m", "0"): 1}
    assert all(n.startswith("vllm:kvmanager_") for n in names)
