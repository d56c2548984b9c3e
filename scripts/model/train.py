#!/usr/bin/python3
"""Trains the project's reference models: small LLaMA-architecture decoders on Jane Austen's novels
(--corpus austen, models/austen) or on Debian's English manual pages and info manuals (--corpus
manuals, models/manuals; see manual_text.py). Each corpus has its default shape (CORPORA below);
--dim, --n-layers, --n-heads, --n-kv-heads, --hidden-dim, --vocab and --seq-len override it.

Run with Debian's interpreter (python3-torch, python3-sentencepiece, libopenblas0-pthread):

    nice -n 19 /usr/bin/python3 scripts/model/train.py --out models/austen
    nice -n 19 /usr/bin/python3 scripts/model/train.py --corpus manuals --out models/manuals

It is resumable: the full training state (model, optimiser, RNG, step) is written to
OUT/train_state.pt every --checkpoint-minutes and the run continues from it when started again.
When the last step is done it exports, into OUT:
  model.bin        llama2.c version-0 checkpoint (7 int32 header, then fp32 tensors, shared classifier)
  tokenizer.model  SentencePiece BPE, trained on the training text only
  heldout.u16      little-endian uint16 ids of the held-out text (never trained on), BOS before each
                   document: "Persuasion" (austen); the packages of MANUALS_HELDOUT (manuals)
  corpus.tsv       (manuals) one line per document: split, kind, package, version, path, tokens
  ref_logits.bin   int32 n, int32 vocab, int32 offset into heldout.u16, then fp32 logits [n][vocab]
                   of this script's own forward pass over heldout[offset : offset + n]
  train.log        the validation-loss log
Nothing here runs in CI; tests and tools load the committed files.
"""
import argparse
import json
import math
import os
import struct
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import austen_text  # noqa: E402

HELDOUT_BOOK = "persuasion"
# manuals: whole packages are held out (their info manual and man pages say the same things)
MANUALS_HELDOUT = ["diffutils", "findutils", "grep", "gzip", "sed", "tmux", "wget"]
BOS, EOS = 1, 2
# Default shape of each corpus's model (Config's names).
CORPORA = {
    "austen": dict(dim=192, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=512, vocab_size=4096,
                   seq_len=1024),
    "manuals": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=704, vocab_size=4096,
                    seq_len=1024),
}


# ---------------------------------------------------------------------------------------------
# Model: RoPE (interleaved pairs), RMSNorm, SwiGLU, GQA, tied embeddings, exactly llama2.c's math.
class Config:
    def __init__(self, **kw):
        self.dim = 192
        self.n_layers = 6
        self.n_heads = 6
        self.n_kv_heads = 2
        self.hidden_dim = 512
        self.vocab_size = 4096
        self.seq_len = 1024
        self.__dict__.update(kw)

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(hd, seq_len):
    # pair (i, i+1), i even, rotates by pos / 10000^(i/hd)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x, cos, sin):
    # x: [B, T, H, hd]; cos/sin: [T, hd/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2)


class Block(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hd = cfg.head_dim
        self.cfg = cfg
        self.attention_norm = RMSNorm(cfg.dim)
        self.wq = torch.nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = torch.nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = torch.nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = torch.nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.w1 = torch.nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = torch.nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = torch.nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x, cos, sin, mask):
        cfg, hd = self.cfg, self.cfg.head_dim
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = apply_rope(self.wq(h).view(b, t, cfg.n_heads, hd), cos, sin)
        k = apply_rope(self.wk(h).view(b, t, cfg.n_kv_heads, hd), cos, sin)
        v = self.wv(h).view(b, t, cfg.n_kv_heads, hd)
        g = cfg.n_heads // cfg.n_kv_heads
        k = k.repeat_interleave(g, dim=2)  # query head h uses KV head h // g
        v = v.repeat_interleave(g, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask[:t, :t]
        a = torch.softmax(s, dim=-1) @ v
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = torch.nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        mask = torch.full((cfg.seq_len, cfg.seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                torch.nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, self.cos[:t], self.sin[:t], self.mask)
        return self.norm(x) @ self.tok_embeddings.weight.t()  # tied classifier


def export_llama2c(model, path):
    cfg = model.cfg
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    L = cfg.n_layers
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                            cfg.vocab_size, cfg.seq_len))
        def w(a):
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
        w(sd["tok_embeddings.weight"])
        for name in ["attention_norm.weight", "wq.weight", "wk.weight", "wv.weight", "wo.weight",
                     "ffn_norm.weight", "w1.weight", "w2.weight", "w3.weight"]:
            for l in range(L):  # each tensor for all layers in a row
                w(sd["layers.%d.%s" % (l, name)])
            if name == "ffn_norm.weight":
                pass
        w(sd["norm.weight"])
        w(np.zeros(cfg.seq_len * cfg.head_dim, dtype=np.float32))  # legacy freq_cis_real/imag
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
def prepare(out, work, vocab, corpus="austen"):
    """Extracts the text, trains the tokenizer, encodes train and held-out ids (idempotent)."""
    import sentencepiece as spm
    tok_path = os.path.join(out, "tokenizer.model")
    train_ids = os.path.join(work, "train.u16")
    held_ids = os.path.join(out, "heldout.u16")
    if all(os.path.exists(p) for p in (tok_path, train_ids, held_ids)):
        return tok_path, train_ids, held_ids
    if corpus == "manuals":
        prepare_manuals(out, work, vocab, tok_path, train_ids, held_ids)
        return tok_path, train_ids, held_ids
    books = austen_text.read_rdb(austen_text.fetch_package(os.path.join(work, "janeaustenr")))
    paras = {name: austen_text.paragraphs(lines) for name, lines in books.items()}
    corpus = os.path.join(work, "train_paragraphs.txt")
    with open(corpus, "w") as f:
        for name, ps in paras.items():
            if name != HELDOUT_BOOK:
                f.write("\n".join(ps) + "\n")
    if not os.path.exists(tok_path):
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(work, "tok"), model_type="bpe", vocab_size=vocab,
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=16384, num_threads=2, split_digits=True, input_sentence_size=0,
            shuffle_input_sentence=False)
        os.replace(os.path.join(work, "tok.model"), tok_path)
    sp = spm.SentencePieceProcessor(model_file=tok_path)

    def encode(names):
        ids = []
        for n in names:
            ids.append(BOS)  # one document per novel
            for p in paras[n]:
                ids.extend(sp.encode(p))
        return np.array(ids, dtype="<u2")

    encode([n for n in austen_text.BOOKS if n != HELDOUT_BOOK]).tofile(train_ids)
    encode([HELDOUT_BOOK]).tofile(held_ids)
    return tok_path, train_ids, held_ids


def prepare_manuals(out, work, vocab, tok_path, train_ids, held_ids):
    import manual_text
    import sentencepiece as spm
    docs = manual_text.read_documents()
    train_docs = [d for d in docs if d[2] not in MANUALS_HELDOUT]
    held_docs = [d for d in docs if d[2] in MANUALS_HELDOUT]
    corpus = os.path.join(work, "train_paragraphs.txt")
    with open(corpus, "w") as f:
        for d in train_docs:
            f.write("\n".join(d[4]) + "\n")
    if not os.path.exists(tok_path):
        # The text is NFKC-normalised already (manual_text.clean), so SentencePiece normalises
        # nothing but whitespace, exactly as the C++ tokenizer does.
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(work, "tok"), model_type="bpe", vocab_size=vocab,
            character_coverage=0.9999, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=16384, num_threads=2, split_digits=True, input_sentence_size=0,
            shuffle_input_sentence=False, normalization_rule_name="identity")
        os.replace(os.path.join(work, "tok.model"), tok_path)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    rows = []

    def encode(ds, split):
        ids = []
        for kind, path, pkg, ver, ps in ds:
            n0 = len(ids)
            ids.append(BOS)  # one document per man page or info manual
            for p in ps:
                ids.extend(sp.encode(p))
            rows.append("%s\t%s\t%s\t%s\t%s\t%d" % (split, kind, pkg, ver, path, len(ids) - n0))
        return np.array(ids, dtype="<u2")

    encode(train_docs, "train").tofile(train_ids)
    encode(held_docs, "heldout").tofile(held_ids)
    with open(os.path.join(out, "corpus.tsv"), "w") as f:
        f.write("# split\tkind\tpackage\tversion\tpath\ttokens (BOS included)\n")
        f.write("\n".join(rows) + "\n")


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def val_loss(model, held, cfg, n_seq):
    model.eval()
    span = cfg.seq_len + 1
    starts = np.linspace(0, len(held) - span - 1, n_seq).astype(np.int64)
    tot = 0.0
    for s in starts:
        x = torch.from_numpy(held[s:s + span].astype(np.int64))[None]
        logits = model(x[:, :-1])
        tot += F.cross_entropy(logits[0], x[0, 1:]).item()
    model.train()
    return tot / n_seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="austen")
    ap.add_argument("--out", default=None, help="model folder; default models/CORPUS")
    for flag, key in [("--dim", "dim"), ("--n-layers", "n_layers"), ("--n-heads", "n_heads"),
                      ("--n-kv-heads", "n_kv_heads"), ("--hidden-dim", "hidden_dim"),
                      ("--vocab", "vocab_size"), ("--seq-len", "seq_len")]:
        ap.add_argument(flag, dest=key, type=int, default=None, help="shape (default: the corpus's)")
    ap.add_argument("--work", default=None, help="scratch dir (text, train ids); default OUT/.work")
    ap.add_argument("--steps", type=int, default=1200, help="total optimiser steps (fixed: the LR schedule uses it)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-seqs", type=int, default=12)
    ap.add_argument("--ref-tokens", type=int, default=256, help="prompt length of ref_logits.bin")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (resumable) after this long; 0 = no limit")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit (no state written)")
    ap.add_argument("--export-only", metavar="DIR", default=None,
                    help="export the current training state to DIR (model.bin, ref_logits.bin) without training")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = args.out or os.path.join("models", args.corpus)
    work = args.work or os.path.join(out, ".work")
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    shape = dict(CORPORA[args.corpus])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    cfg = Config(**shape)
    tok_path, train_path, held_path = prepare(out, work, cfg.vocab_size, args.corpus)
    train = np.fromfile(train_path, dtype="<u2")
    held = np.fromfile(held_path, dtype="<u2")
    print("train tokens %d, held-out tokens %d" % (len(train), len(held)), flush=True)

    torch.manual_seed(args.seed)
    model = Llama(cfg)
    nparams = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    state_path = os.path.join(out, "train_state.pt")
    log_path = os.path.join(out, "train.log")
    step, trained_s = 0, 0.0
    if os.path.exists(state_path) and not args.bench:
        st = torch.load(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        step, trained_s = st["step"], st["trained_s"]
        print("resumed at step %d (%.1f min trained)" % (step, trained_s / 60), flush=True)
        if not args.export_only and not args.bench:
            with open(log_path, "a") as f:
                f.write("# resumed at step %d (%.1f min trained) with %s\n" % (step, trained_s / 60, json.dumps(vars(args))))
        if args.export_only:
            export(model, held, cfg, args, args.export_only)
            print("exported step %d to %s" % (step, args.export_only), flush=True)
            return
    else:
        with open(log_path, "w") as f:
            f.write("# %s\n" % json.dumps({"config": cfg.__dict__, "params": nparams, "args": vars(args)}))

    def save_state():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "step": step, "trained_s": trained_s},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    print("params %d (%.2f M); %d steps of %d x %d tokens" % (nparams, nparams / 1e6, args.steps, args.batch,
                                                               cfg.seq_len), flush=True)
    span = cfg.seq_len + 1
    t_start = time.time()
    last_ckpt = time.time()
    seg_start, seg_tokens = time.time(), 0
    limit = args.bench if args.bench else args.steps
    while step < limit:
        starts = rng.integers(0, len(train) - span, size=args.batch)
        xb = torch.from_numpy(np.stack([train[s:s + span] for s in starts]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        t0 = time.time()
        logits = model(xb[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), xb[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.time() - t0
        trained_s += dt
        step += 1
        seg_tokens += args.batch * cfg.seq_len
        if args.bench:
            print("step %d loss %.3f %.2fs %.0f tok/s" % (step, loss.item(), dt, args.batch * cfg.seq_len / dt),
                  flush=True)
            continue
        if step % 10 == 0:
            rate = seg_tokens / (time.time() - seg_start)
            print("step %d/%d loss %.4f lr %.2e %.0f tok/s, %.1f min trained" % (
                step, args.steps, loss.item(), opt.param_groups[0]["lr"], rate, trained_s / 60), flush=True)
            seg_start, seg_tokens = time.time(), 0
        if step % args.eval_every == 0 or step == args.steps:
            vl = val_loss(model, held, cfg, args.val_seqs)
            log("step %d train_loss %.4f val_loss %.4f trained_min %.1f" % (step, loss.item(), vl, trained_s / 60))
        if time.time() - last_ckpt > args.checkpoint_minutes * 60 or step == args.steps:
            save_state()
            last_ckpt = time.time()
        if args.max_minutes and time.time() - t_start > args.max_minutes * 60:
            save_state()
            print("stopping after --max-minutes; run again to resume", flush=True)
            return
    if args.bench:
        return
    export(model, held, cfg, args, out)
    vl = val_loss(model, held, cfg, args.val_seqs)
    log("final step %d val_loss %.4f trained_min %.1f params %d" % (step, vl, trained_s / 60, nparams))
    print("exported to", out, flush=True)


def export(model, held, cfg, args, out):
    """Writes model.bin and ref_logits.bin (this script's own fp32 forward pass) into out."""
    model.eval()
    os.makedirs(out, exist_ok=True)
    export_llama2c(model, os.path.join(out, "model.bin"))
    n, offset = args.ref_tokens, 0
    with torch.no_grad():
        ids = torch.from_numpy(held[offset:offset + n].astype(np.int64))[None]
        logits = model(ids)[0].float().numpy()
    with open(os.path.join(out, "ref_logits.bin"), "wb") as f:
        f.write(struct.pack("<3i", n, cfg.vocab_size, offset))
        f.write(np.ascontiguousarray(logits, dtype="<f4").tobytes())


if __name__ == "__main__":
    main()
