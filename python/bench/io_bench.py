"""The Python half of the save/load comparison: the same workload as kvm_io_bench (C++), through
kvmanager.Client (numpy buffers) and through the vLLM connector's worker path (paged torch tensors:
save_kv_layer per layer + wait_for_save; start_load_kv of every block into other paged blocks).

    PYTHONPATH=build/python /usr/bin/python3 python/bench/io_bench.py HOST:PORT [L H D T chunk]
prints one JSON line per path.
"""
import json
import sys
import time
from types import SimpleNamespace as NS

import numpy as np

import kvmanager


def binding(addr, L, H, D, T, chunk, B=16):
    shape = kvmanager.ModelShape(layers=L, q_heads=4 * H, kv_heads=H, head_dim=D, dtype="fp16")
    seq = 0xBEEF0000 + (time.monotonic_ns() & 0xFFFF)
    with kvmanager.Client(addr, data_plane="none") as c:
        c.create_sequence(seq, shape, block_size=B, durability="durable")  # as the connector
        kv = (np.arange(L * H * 2 * chunk * D, dtype=np.uint32) * 131 + 7).astype(np.uint8)
        kv = np.frombuffer(np.resize(kv, L * H * 2 * chunk * D * 2).tobytes(), np.float16)
        t0 = time.perf_counter()
        for p in range(0, T, chunk):
            c.append(seq, p, [1] * chunk, kv, wait=False)
        c.flush()
        save_s = time.perf_counter() - t0
        nb = T // B
        out = np.empty((nb, B, D), np.float16)
        t0 = time.perf_counter()
        for l in range(L):
            for h in range(H):
                for v in (False, True):
                    c.read_blocks(seq, l, h, list(range(nb)), values=v, out=out)
        load_s = time.perf_counter() - t0
        c.delete_sequence(seq)
    sb, lb = kv.nbytes * (T // chunk), out.nbytes * L * H * 2
    return dict(client="python", save_bytes=sb, save_s=round(save_s, 4),
                save_MBps=round(sb / save_s / 1e6, 1), load_bytes=lb, load_s=round(load_s, 4),
                load_MBps=round(lb / load_s / 1e6, 1))


def connector(addr, L, H, D, T, chunk, B=16):
    import torch
    from kvmanager.vllm import connector as kc
    nb = T // B
    ex = dict(address=addr, layers=L, q_heads=4 * H, kv_heads=H, head_dim=D, dtype="fp16",
              model=f"bench-{time.monotonic_ns()}", deadline_ms=30000)
    cfg = NS(kv_transfer_config=NS(kv_connector_extra_config=ex), model_config=None,
             parallel_config=NS(tensor_parallel_size=1, rank=0),
             cache_config=NS(block_size=B, cache_dtype="auto"))
    sched, work = kc.KvmanagerConnector(cfg, 0), kc.KvmanagerConnector(cfg, 1)
    caches = {f"l{i}": torch.randn(2 * nb + 1, 2, B, H, D).to(torch.float16) for i in range(L)}
    work.register_kv_caches(caches)
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, 30000, T + 1)]
    ids = list(range(nb + 1))
    req = NS(request_id="r1", prompt_token_ids=prompt, num_tokens=T + 1, num_computed_tokens=0)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, NS(get_block_ids=lambda: (ids,)), 0)
    save_s, steps = 0.0, 0
    for p in range(0, T + 1, chunk):
        n = min(chunk, T + 1 - p)
        if p == 0:
            so = NS(scheduled_new_reqs=[NS(req_id="r1", prompt_token_ids=prompt, block_ids=(ids,),
                                           num_computed_tokens=0)],
                    scheduled_cached_reqs=NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                             num_computed_tokens=[]), num_scheduled_tokens={"r1": n})
        else:
            so = NS(scheduled_new_reqs=[], scheduled_cached_reqs=NS(
                req_ids=["r1"], resumed_req_ids=set(), new_block_ids=[None], num_computed_tokens=[p]),
                num_scheduled_tokens={"r1": n})
        meta = sched.build_connector_meta(so)
        t0 = time.perf_counter()
        work.bind_connector_metadata(meta)
        work.start_load_kv(None)
        for name in work._order:
            work.save_kv_layer(name, caches[name], NS(slot_mapping=None))
        work.wait_for_save()
        work.clear_connector_metadata()
        save_s += time.perf_counter() - t0
        steps += 1
    sched.request_finished(req, ids)
    req2 = NS(request_id="r2", prompt_token_ids=prompt, num_tokens=T + 1, num_computed_tokens=0)
    hit, _ = sched.get_num_new_matched_tokens(req2, 0)
    assert hit == T, hit
    ids2 = list(range(nb + 1, 2 * nb + 1))
    sched.update_state_after_alloc(req2, NS(get_block_ids=lambda: (ids2,)), hit)
    meta = sched.build_connector_meta(NS(scheduled_new_reqs=[], scheduled_cached_reqs=None,
                                         num_scheduled_tokens={}))
    t0 = time.perf_counter()
    work.bind_connector_metadata(meta)
    work.start_load_kv(None)
    done = set()
    while "r2" not in done:
        _, recv = work.get_finished(set())
        done |= recv or set()
        time.sleep(0.0005)
    load_s = time.perf_counter() - t0
    assert not work.get_block_ids_with_load_errors()
    for name, t in caches.items():
        assert torch.equal(t[ids2[:nb]], t[ids[:nb]])
    row = L * H * 2 * D * 2
    sb, lb = row * (T + 1), row * T
    for r in range(1):
        sched._client.delete_sequence(kc.sequence_id("r1", r))
    sched.shutdown()
    work.shutdown()
    return dict(client="python-connector", save_bytes=sb, save_s=round(save_s, 4),
                save_MBps=round(sb / save_s / 1e6, 1), save_ms_per_step=round(1e3 * save_s / steps, 2),
                load_bytes=lb, load_s=round(load_s, 4), load_MBps=round(lb / load_s / 1e6, 1))


if __name__ == "__main__":
    addr = sys.argv[1]
    L, H, D, T, chunk = (int(x) for x in (sys.argv[2:7] + ["16", "8", "128", "1024", "64"][len(sys.argv[2:7]):]))
    print(json.dumps(binding(addr, L, H, D, T, chunk)))
    print(json.dumps(connector(addr, L, H, D, T, chunk)))
