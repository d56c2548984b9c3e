"""A plain-torch port of the reference worker's forward pass (client/src/llama.cc), for the Python
package's tests.

It reads a llama2.c version-0 checkpoint (models/*/model.bin) exactly as the C++ loader does: a
header of 7 little-endian int32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}
(vocab_size < 0: an untied classifier follows), then fp32 tensors, each for all layers in a row:
tok_emb[vocab][dim], rms_att[L][dim], wq[L][Hq*hd][dim], wk[L][Hkv*hd][dim], wv[L][Hkv*hd][dim],
wo[L][dim][Hq*hd], rms_ffn[L][dim], w1[L][hidden][dim], w2[L][dim][hidden], w3[L][hidden][dim],
rms_final[dim], seq_len*hd legacy floats, [wcls[vocab][dim]]; hd = dim / n_heads. Files starting with
the later formats' magic `ak42` are rejected.

Math: RMSNorm (eps 1e-5), RoPE rotating interleaved pairs (i, i+1) of each head by pos / 10000^(i/hd),
GQA (query head h reads KV head h // (Hq / Hkv)), SwiGLU w2(silu(w1 x) * w3 x), tied classifier.

Two ways to run it:
  model.forward(tokens)            dense causal forward over a token list -> logits [T, vocab]
  dec = model.decoder(attend)      incremental decode; dec.step(token) -> logits [vocab]
where each layer's attention is the callable attend(layer, pos, q, k_new, v_new) -> out, receiving
the post-RoPE query q [n_heads, hd] and the new token's post-RoPE key and value k_new, v_new
[n_kv_heads, hd], and returning the attention output [n_heads, hd] over positions 0..pos (the new
token included), so a caller can route attention through an external (sparse) decoder. The default,
DenseAttention, keeps its own KV cache.

Only torch, numpy and the standard library are used.
"""
import math
import os
import struct

import numpy as np
import torch

HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


class Config:
    def __init__(self, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                 shared_classifier=True):
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads, self.vocab_size, self.seq_len = n_heads, n_kv_heads, vocab_size, seq_len
        self.shared_classifier = shared_classifier

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def group(self):
        return self.n_heads // self.n_kv_heads

    def __repr__(self):
        return "Config(%s, shared_classifier=%s)" % (
            ", ".join("%s=%d" % (k, getattr(self, k)) for k in HEADER), self.shared_classifier)


def read_config_and_tensors(path):
    """Parses a version-0 checkpoint: (Config, {name: float32 ndarray}); ValueError names what is wrong."""
    with open(path, "rb") as f:
        raw = f.read()
    where = "model checkpoint '%s': " % path
    if len(raw) < 28:
        raise ValueError(where + "file is %d bytes, shorter than the header" % len(raw))
    if raw[:4] == b"ak42":
        raise ValueError(where + "magic 'ak42': a later llama2.c format version; export version 0 (legacy) instead")
    h = list(struct.unpack("<7i", raw[:28]))
    for i, name in enumerate(HEADER):
        v = abs(h[i]) if name == "vocab_size" else h[i]
        if v <= 0 or v > (1 << 20 if name == "vocab_size" else 1 << 16):
            raise ValueError(where + "%s = %d is out of range" % (name, h[i]))
    cfg = Config(h[0], h[1], h[2], h[3], h[4], abs(h[5]), h[6], shared_classifier=h[5] > 0)
    if cfg.dim % cfg.n_heads:
        raise ValueError(where + "dim is not a multiple of n_heads")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(where + "n_heads is not a multiple of n_kv_heads")
    if cfg.head_dim % 2:
        raise ValueError(where + "head dim is odd (RoPE rotates pairs)")
    hd, L, D, H, V = cfg.head_dim, cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size
    qd, kvd = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = [("tok_emb", (V, D)), ("rms_att", (L, D)), ("wq", (L, qd, D)), ("wk", (L, kvd, D)),
              ("wv", (L, kvd, D)), ("wo", (L, D, qd)), ("rms_ffn", (L, D)), ("w1", (L, H, D)),
              ("w2", (L, D, H)), ("w3", (L, H, D)), ("rms_final", (D,)), ("legacy", (cfg.seq_len * hd,))]
    if not cfg.shared_classifier:
        shapes.append(("wcls", (V, D)))
    floats = sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != 28 + 4 * floats:
        raise ValueError(where + "file is %d bytes, the header implies %d%s" % (
            len(raw), 28 + 4 * floats, " (truncated)" if len(raw) < 28 + 4 * floats else ""))
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    out, p = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = data[p:p + n].reshape(shape)
        p += n
    return cfg, out


def rope_tables(hd, seq_len):
    """cos, sin [seq_len, hd/2]: angle pos / 10000^(i/hd) for even i, computed in double."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):
    """x [..., T, heads, hd] (or [heads, hd] with cos/sin [hd/2]); rotates pairs (i, i+1)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class DenseAttention:
    """The default attend: keeps every layer's keys and values and attends to all of them."""

    def __init__(self, cfg, dtype=torch.float32):
        self.cfg = cfg
        hd = cfg.head_dim
        self.k = torch.zeros(cfg.n_layers, cfg.seq_len, cfg.n_kv_heads, hd, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.scale = 1.0 / math.sqrt(hd)

    def __call__(self, layer, pos, q, k_new, v_new):
        self.k[layer, pos] = k_new
        self.v[layer, pos] = v_new
        k = self.k[layer, :pos + 1].repeat_interleave(self.cfg.group, dim=1)  # [T, Hq, hd]
        v = self.v[layer, :pos + 1].repeat_interleave(self.cfg.group, dim=1)
        s = torch.einsum("hd,thd->ht", q, k) * self.scale
        return torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v)


class Llama:
    def __init__(self, cfg, tensors, dtype=torch.float32):
        self.cfg, self.dtype = cfg, dtype
        t = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in tensors.items() if k != "legacy"}
        self.tok_emb = t["tok_emb"]
        self.wcls = self.tok_emb if cfg.shared_classifier else t["wcls"]
        self.rms_final = t["rms_final"]
        self.layers = [{k: t[k][l] for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")}
                       for l in range(cfg.n_layers)]
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)

    @classmethod
    def load(cls, path, dtype=torch.float32):
        cfg, tensors = read_config_and_tensors(path)
        return cls(cfg, tensors, dtype)

    def _ffn(self, w, x):
        h = rms_norm(x, w["rms_ffn"])
        return x + (torch.nn.functional.silu(h @ w["w1"].t()) * (h @ w["w3"].t())) @ w["w2"].t()

    def _logits(self, x):
        return rms_norm(x, self.rms_final) @ self.wcls.t()

    @torch.no_grad()
    def forward(self, tokens):
        """Dense causal forward over tokens (positions 0..T-1): logits [T, vocab]."""
        cfg, hd = self.cfg, self.cfg.head_dim
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        T = ids.shape[0]
        if T > cfg.seq_len:
            raise ValueError("%d tokens beyond the model's trained length %d" % (T, cfg.seq_len))
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]
        mask = torch.full((T, T), float("-inf"), dtype=self.dtype).triu(1)
        x = self.tok_emb[ids]
        for w in self.layers:
            h = rms_norm(x, w["rms_att"])
            q = apply_rope((h @ w["wq"].t()).view(T, cfg.n_heads, hd), cos, sin)
            k = apply_rope((h @ w["wk"].t()).view(T, cfg.n_kv_heads, hd), cos, sin)
            v = (h @ w["wv"].t()).view(T, cfg.n_kv_heads, hd)
            k = k.repeat_interleave(cfg.group, dim=1)
            v = v.repeat_interleave(cfg.group, dim=1)
            q, k, v = (z.transpose(0, 1) for z in (q, k, v))  # [H, T, hd]
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
            a = (torch.softmax(s, dim=-1) @ v).transpose(0, 1).reshape(T, -1)
            x = self._ffn(w, x + a @ w["wo"].t())
        return self._logits(x)

    def decoder(self, attend=None):
        """An incremental decoder; attend(layer, pos, q, k_new, v_new) -> out (default: DenseAttention)."""
        return Decoder(self, attend if attend is not None else DenseAttention(self.cfg, self.dtype))


class Decoder:
    def __init__(self, model, attend):
        self.model, self.attend, self.pos = model, attend, 0

    @torch.no_grad()
    def step(self, token):
        """Runs one token at position self.pos (then advances it): logits [vocab]."""
        m, cfg, hd = self.model, self.model.cfg, self.model.cfg.head_dim
        pos = self.pos
        if not 0 <= int(token) < cfg.vocab_size:
            raise ValueError("token id %d out of range (vocab %d)" % (int(token), cfg.vocab_size))
        if pos >= cfg.seq_len:
            raise ValueError("position %d beyond the model's trained length %d" % (pos, cfg.seq_len))
        cos, sin = m.cos[pos], m.sin[pos]
        x = m.tok_emb[int(token)]
        for l, w in enumerate(m.layers):
            h = rms_norm(x, w["rms_att"])
            q = apply_rope((w["wq"] @ h).view(cfg.n_heads, hd), cos, sin)
            k = apply_rope((w["wk"] @ h).view(cfg.n_kv_heads, hd), cos, sin)
            v = (w["wv"] @ h).view(cfg.n_kv_heads, hd)
            out = torch.as_tensor(self.attend(l, pos, q, k, v), dtype=m.dtype)
            if tuple(out.shape) != (cfg.n_heads, hd):
                raise ValueError("attend returned shape %s, want (%d, %d)" % (tuple(out.shape), cfg.n_heads, hd))
            x = m._ffn(w, x + w["wo"] @ out.reshape(-1))
        self.pos += 1
        return m._logits(x)


def read_ref_logits(path):
    """ref_logits.bin: (offset, logits float32 [n, vocab])."""
    with open(path, "rb") as f:
        raw = f.read()
    n, vocab, offset = struct.unpack("<3i", raw[:12])
    if len(raw) != 12 + 4 * n * vocab:
        raise ValueError("'%s': %d bytes, header says %d" % (path, len(raw), 12 + 4 * n * vocab))
    return offset, np.frombuffer(raw, dtype="<f4", offset=12).reshape(n, vocab)


def read_tokens(path):
    """A little-endian uint16 token file."""
    if os.path.getsize(path) % 2:
        raise ValueError("token file '%s' has an odd size (not uint16 ids)" % path)
    return np.fromfile(path, dtype="<u2").astype(np.int64)
