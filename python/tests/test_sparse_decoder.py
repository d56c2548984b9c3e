"""The sparse decoder (kvmanager.SparseDecoder over ServiceKvSource) inside the torch port of the
reference model: greedy decoding with its attention going through the service generates the same
tokens as `kvmctl eval --server ADDR --generate --json` with the same selector and budget, up to
the first step where dense's top-2 logit margin is below 1e-3 (torch and the C++ forward round
differently)."""
import json
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvmanager  # noqa: E402
import torch_llama  # noqa: E402
from conftest import SRC  # noqa: E402

MODEL = os.path.join(SRC, "models", "austen")
CONTEXT, STEPS, B = 384, 48, 16
MARGIN = 1e-3


def top2_margin(logits):
    v = torch.topk(logits, 2).values
    return float(v[0] - v[1])


@pytest.mark.parametrize("selector,budget_frac,plane", [("prhs", 0.25, "ucx"), ("quest", 0.25, "none")])
def test_generates_what_kvmctl_eval_generates(server, kvmctl, selector, budget_frac, plane):
    r = subprocess.run(
        [kvmctl, "eval", "--server", server.address, "--transport", "tcp" if plane == "none" else plane,
         "--selector", selector,
         "--model", os.path.join(MODEL, "model.bin"), "--tokens", os.path.join(MODEL, "heldout.u16"),
         "--context", str(CONTEXT), "--steps", str(STEPS), "--budget-frac", str(budget_frac),
         "--generate", "--json"], capture_output=True, text=True, timeout=300, cwd=SRC)
    assert r.returncode == 0, r.stderr[-2000:]
    want = json.loads(r.stdout.strip().splitlines()[-1])["generated"]
    assert len(want) == STEPS

    model = torch_llama.Llama.load(os.path.join(MODEL, "model.bin"))
    cfg = model.cfg
    ids = torch_llama.read_tokens(os.path.join(MODEL, "heldout.u16"))
    shape = kvmanager.ModelShape(layers=cfg.n_layers, q_heads=cfg.n_heads, kv_heads=cfg.n_kv_heads,
                                 head_dim=cfg.head_dim, dtype="fp16")
    budget = round(budget_frac * CONTEXT / B) * B  # as kvmctl eval's --budget-frac
    with kvmanager.Client(server.address, data_plane=plane) as c:
        dec = kvmanager.SparseDecoder(c, 4242, shape, selector=selector, block_size=B,
                                      sink_tokens=4, window_tokens=B, budget_tokens=budget,
                                      prefill=CONTEXT)
        out = torch.empty(cfg.n_heads, cfg.head_dim)

        group = cfg.n_heads // cfg.n_kv_heads
        slot_checks, from_slots = [], [0]

        def attend(layer, pos, q, k, v):
            dec.append(layer, pos, k.contiguous(), v.contiguous())
            if pos < CONTEXT:
                return dec.attend(layer, pos, q.contiguous(), out=out).clone()
            # A decode step through the slot table, as a backend with its own kernel would: the
            # resident blocks read from their hot-set slots (or the local tail) and attended here
            # give the decoder's own output.
            table = dec.select(layer, pos, q.contiguous(), out=out)
            from_slots[0] += sum(slot is not None for head in table for _, slot in head)
            assert [[b for b, _ in head] for head in table] == dec.attended
            T, qn = pos + 1, q.numpy().astype(np.float64)
            mine = np.zeros_like(qn)
            for h, head in enumerate(table):
                ks, vs = [], []
                for b, slot in head:
                    rows = min(B, T - b * B)
                    ks.append(dec.block(layer, h, b, slot)[:rows].astype(np.float64))
                    vs.append(dec.block(layer, h, b, slot, values=True)[:rows].astype(np.float64))
                kk, vv = np.concatenate(ks), np.concatenate(vs)
                for j in range(h * group, (h + 1) * group):
                    z = kk @ qn[j] / np.sqrt(cfg.head_dim)
                    w = np.exp(z - z.max())
                    mine[j] = (w / w.sum()) @ vv
            slot_checks.append(float(np.abs(mine - out.numpy()).max()))
            return out.clone()

        sparse, dense = model.decoder(attend), model.decoder()
        for p in range(CONTEXT):
            dec.begin_token(int(ids[p]), p)
            ls = sparse.step(int(ids[p]))
            ld = dense.step(int(ids[p]))
        got, margins = [], []
        nxt = int(ids[CONTEXT])
        for i in range(STEPS):
            dec.begin_token(nxt, CONTEXT + i)
            ls = sparse.step(nxt)
            ld = dense.step(nxt)
            margins.append(top2_margin(ld))
            nxt = int(torch.argmax(ls))
            got.append(nxt)
        dec.flush()
        totals = dec.totals
        claims = dec.claims()
        dec.delete()
    cut = next((i for i, m in enumerate(margins) if m < MARGIN), STEPS)
    print(f"{selector}: {cut} comparable steps of {STEPS}; retrievals {totals['retrievals']}, "
          f"round trips {totals['round_trips']}, gate {totals['gate']}")
    assert cut >= 8, margins
    assert got[:cut] == want[:cut], (got, want, margins)
    assert totals["steps"] == STEPS and totals["round_trips"] > 0 and totals["failed_calls"] == 0
    assert totals["streamed_bytes"] > 0
    assert sum(totals["gate"][k] for k in totals["gate"] if k != "target_missed") > 0
    assert claims and all(len(c) == 5 for c in claims)
    assert len(slot_checks) == STEPS * cfg.n_layers and max(slot_checks) < 1e-4, max(slot_checks)
    assert from_slots[0] > 0  # blocks the service sent, not only the local tail
    assert {c[4] for c in claims} <= {"exact", "bound", "audit", "unknown"}


def test_decoder_checks_its_buffers(server):
    shape = kvmanager.ModelShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype="fp16")
    with kvmanager.Client(server.address, data_plane="none") as c:
        with kvmanager.SparseDecoder(c, 1, shape, selector="prhs", budget_tokens=64, prefill=4) as dec:
            k = np.zeros((2, 32), np.float32)
            with pytest.raises(ValueError, match="InvalidArgument: k: .*bytes"):
                dec.append(0, 0, np.zeros((3, 32), np.float32), k)
            with pytest.raises(ValueError, match="InvalidArgument: v: dtype fp16"):
                dec.append(0, 0, k, k.astype(np.float16))
            with pytest.raises(ValueError, match="InvalidArgument: layer:"):
                dec.append(2, 0, k, k)
            dec.begin_token(1, 0)
            for layer in range(2):
                dec.append(layer, 0, k + 1, k + 2)
                out = dec.attend(layer, 0, np.ones((4, 32), np.float32))
                assert out.shape == (4, 32) and np.allclose(out, 2)  # one token: its V
            with pytest.raises(ValueError, match="InvalidArgument: out: read-only"):
                ro = np.zeros((4, 32), np.float32)
                ro.flags.writeable = False
                dec.attend(0, 0, np.ones((4, 32), np.float32), out=ro)
        with pytest.raises(kvmanager.FailedPrecondition):
            dec.attend(0, 0, np.ones((4, 32), np.float32))


def test_a_ucx_data_plane_serves_one_decoder_at_a_time(server):
    shape = kvmanager.ModelShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype="fp16")
    c = kvmanager.Client(server.address, data_plane="ucx")
    d1 = kvmanager.SparseDecoder(c, 1, shape, budget_tokens=64, prefill=4)
    with pytest.raises(kvmanager.FailedPrecondition, match="one SparseDecoder at a time"):
        kvmanager.SparseDecoder(c, 2, shape, budget_tokens=64, prefill=4)
    with pytest.raises(kvmanager.FailedPrecondition, match="still use this client"):
        c.close()
    d1.close()
    d2 = kvmanager.SparseDecoder(c, 2, shape, budget_tokens=64, prefill=4)
    d2.delete()
    c.close()
    with kvmanager.Client(server.address, data_plane="none") as t:  # TCP: any number
        ds = [kvmanager.SparseDecoder(t, 10 + i, shape, budget_tokens=64, prefill=4) for i in range(3)]
        for d in ds:
            d.delete()
