"""The plain-torch port (torch_llama.py) against the training script's own logits, for both committed
reference models, and its incremental decode against its dense forward.

    /usr/bin/python3 -m pytest python/tests/test_torch_llama.py
"""
import os
import struct
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_llama  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODELS = ["austen", "manuals"]
TOL = 1e-4


def model_dir(name):
    return os.path.join(ROOT, "models", name)


_cache = {}


def load(name):
    if name not in _cache:
        d = model_dir(name)
        model = torch_llama.Llama.load(os.path.join(d, "model.bin"))
        offset, want = torch_llama.read_ref_logits(os.path.join(d, "ref_logits.bin"))
        ids = torch_llama.read_tokens(os.path.join(d, "heldout.u16"))
        _cache[name] = (model, ids[offset:offset + want.shape[0]], want)
    return _cache[name]


@pytest.mark.parametrize("name", MODELS)
def test_dense_logits_match_the_training_script(name):
    model, ids, want = load(name)
    assert want.shape[1] == model.cfg.vocab_size
    got = model.forward(ids).numpy()
    diff = float(np.abs(got - want).max())
    print("%s %r: max |dlogit| over %d x %d = %.3g" % (name, model.cfg, *want.shape, diff))
    assert diff < TOL


@pytest.mark.parametrize("name", MODELS)
def test_incremental_decode_matches_the_dense_forward(name):
    model, ids, want = load(name)
    dense = model.forward(ids).numpy()
    dec = model.decoder()
    diff = 0.0
    for p, t in enumerate(ids):
        diff = max(diff, float(np.abs(dec.step(t).numpy() - dense[p]).max()))
    assert dec.pos == len(ids)
    print("%s: incremental vs dense max |dlogit| over %d steps = %.3g" % (name, len(ids), diff))
    assert diff < TOL
    assert np.abs(dense - want).max() < TOL


@pytest.mark.parametrize("name", MODELS)
def test_attend_receives_post_rope_q_and_the_new_tokens_kv(name):
    model, ids, _ = load(name)
    cfg = model.cfg
    calls = []
    inner = torch_llama.DenseAttention(cfg)

    def attend(layer, pos, q, k_new, v_new):
        assert tuple(q.shape) == (cfg.n_heads, cfg.head_dim)
        assert tuple(k_new.shape) == tuple(v_new.shape) == (cfg.n_kv_heads, cfg.head_dim)
        calls.append((layer, pos))
        return inner(layer, pos, q, k_new, v_new)

    dec, ref = model.decoder(attend), model.decoder()
    for t in ids[:8]:
        assert torch.equal(dec.step(t), ref.step(t))  # the wrapper changes nothing
    assert calls == [(l, p) for p in range(8) for l in range(cfg.n_layers)]
    # At position 0 attention is the new token's own value, whatever the query.
    m = model.decoder(lambda layer, pos, q, k, v: v.repeat_interleave(cfg.group, dim=0))
    np.testing.assert_allclose(m.step(ids[0]).numpy(), model.forward(ids[:1]).numpy()[0], atol=TOL)


@pytest.mark.parametrize("name", MODELS)
def test_sparse_attend_changes_the_logits(name):
    # An attend that sees only the last 4 positions: the same first 4 steps, different later ones.
    model, ids, _ = load(name)
    cfg = model.cfg
    inner = torch_llama.DenseAttention(cfg)

    def window(layer, pos, q, k_new, v_new):
        inner.k[layer, pos], inner.v[layer, pos] = k_new, v_new
        lo = max(0, pos - 3)
        k = inner.k[layer, lo:pos + 1].repeat_interleave(cfg.group, dim=1)
        v = inner.v[layer, lo:pos + 1].repeat_interleave(cfg.group, dim=1)
        s = torch.einsum("hd,thd->ht", q, k) / cfg.head_dim ** 0.5
        return torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v)

    dense = model.forward(ids[:64]).numpy()
    dec = model.decoder(window)
    diffs = [float(np.abs(dec.step(t).numpy() - dense[p]).max()) for p, t in enumerate(ids[:64])]
    assert max(diffs[:4]) < TOL
    assert max(diffs[32:]) > 1e-2


def test_loader_errors_name_what_is_wrong(tmp_path):
    p = tmp_path / "m.bin"
    p.write_bytes(b"ak42" + bytes(256))
    with pytest.raises(ValueError, match="ak42"):
        torch_llama.Llama.load(str(p))
    p.write_bytes(struct.pack("<7i", 96, 128, 2, 3, 2, 32, 16))
    with pytest.raises(ValueError, match="n_kv_heads"):
        torch_llama.Llama.load(str(p))
    full = open(os.path.join(model_dir("austen"), "model.bin"), "rb").read()
    p.write_bytes(full[:-4])
    with pytest.raises(ValueError, match="truncated"):
        torch_llama.Llama.load(str(p))
