"""kvmanager as a vLLM KV connector (the v1 API; ../shared/docs/vllm.md has the facts and sources).

Load it with

    --kv-transfer-config '{"kv_connector":"KvmanagerConnector",
                           "kv_connector_module_path":"kvmanager.vllm.connector",
                           "kv_role":"kv_both",
                           "kv_connector_extra_config":{"address":"127.0.0.1:7420","tenant":"dev"}}'

What it does (mode "offload"):

* Saves. Every request's prompt KV goes to the service, in a durable sequence of its own per
  tensor-parallel rank (id: a hash of the request id and the rank; the rank's KV heads only). vLLM
  hands the connector one layer at a time (``save_kv_layer``) while kvmanager's Append takes every
  layer of a token at once, so the worker gathers each layer's new rows out of the paged cache into
  a host staging buffer and sends one Append per request at ``wait_for_save`` (then waits for the
  acknowledgements, so the paged blocks may be reused when it returns and ``request_finished``
  never holds blocks: it returns ``(False, None)``). Buffering costs one staging copy of a step's
  new rows; it needs no new wire message and keeps a step's tokens atomic on the service.
* Prefix hits. A durable sequence's full blocks are content-addressed on the service
  (``Client.prefix_lookup``). The scheduler keeps an index of the prompts it saw finish (chain
  hashes of their full blocks -> the request whose sequence holds them, which also names the shard
  to ask) and answers ``get_num_new_matched_tokens`` with the full blocks that both the index and
  the service's prefix lookup vouch for (every rank's fingerprint), so only blocks actually stored
  count. With ``async_lookup`` the lookup runs on a thread: ``(None, True)`` until it answered.
  The worker then reads those blocks of the earlier request's sequence (ReadBlocks) straight into a
  staging block and scatters them into the paged blocks vLLM allocated, asynchronously (a thread;
  the request waits in WAITING_FOR_REMOTE_KVS), with a deadline: on expiry or any failure the
  request is still reported finished and its blocks are reported as load errors in the same pass.
* No re-upload of a stored prefix. A request's sequence is created from its prompt
  (``CreateSequence.prefix_token_ids``): the service attaches the blocks it already stores by
  content address (shared, not copied) and the worker sends only the tokens after them.
* Retention by lease. Each sequence is created with ``lease_ms`` (default 10 minutes): the service
  deletes it once unused for that long, so a finished request's blocks stay findable for a while
  and then go, with no client left to delete them. ``max_sequences`` still bounds how many finished
  requests the scheduler keeps in its index (the oldest are deleted at once). The index lives in
  the scheduler's memory (lost on restart: no hits, never wrong ones).

Sparse decoding is not done here: vLLM's base API never hands the connector a layer's query. An
attention backend that wants it calls ``kvmanager.SparseDecoder`` itself (README).
"""
import enum
import hashlib
import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import kvmanager

log = logging.getLogger("kvmanager.vllm")

try:  # the real vLLM when it is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1 as _Base, KVConnectorMetadata as _MetaBase, KVConnectorRole)
    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - no vLLM: the duck-typed base below
    HAVE_VLLM = False

    class KVConnectorRole(enum.IntEnum):
        SCHEDULER = 0
        WORKER = 1

    class _MetaBase:
        """vLLM's KVConnectorMetadata (an empty base)."""

    class _Base:
        """The method names and signatures of vLLM's KVConnectorBase_V1, for use without vLLM."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            if getattr(vllm_config, "kv_transfer_config", None) is None:
                raise ValueError("kv_transfer_config is None: the connector needs one")
            self._vllm_config = vllm_config
            self._role = role
            self._connector_metadata = None

        @property
        def role(self):
            return self._role

        def bind_connector_metadata(self, connector_metadata):
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self):
            self._connector_metadata = None

        def _get_connector_metadata(self):
            return self._connector_metadata

        def has_connector_metadata(self):
            return self._connector_metadata is not None

        def handle_preemptions(self, kv_connector_metadata):
            pass

        def set_host_xfer_buffer_ops(self, copy_operation):
            pass

        def take_events(self):
            return ()

        def update_connector_output(self, connector_output):
            pass

        def get_finished_count(self):
            return None


# ---- metadata (scheduler -> worker, pickled across processes) ----

@dataclass
class LoadSpec:
    req_id: str
    src_req_id: str          # the earlier request whose sequences hold the blocks
    src_blocks: list         # block indices in the source sequence
    dst_block_ids: list      # vLLM's paged block ids, in the same order


@dataclass
class SaveSpec:
    req_id: str
    start: int               # first position to append
    token_ids: list          # the tokens of positions [start, start + len)
    block_ids: list          # all of the request's paged block ids (positions -> slots)


@dataclass
class KvmanagerConnectorMetadata(_MetaBase):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)


# ---- helpers ----

def _role(role):
    v = int(role.value if hasattr(role, "value") else role)
    if v not in (0, 1):
        raise ValueError(f"role: {role!r} is neither SCHEDULER (0) nor WORKER (1)")
    return v


def _h64(*parts):
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode() + b"\0")
    return struct.unpack("<Q", h.digest())[0] & ((1 << 63) - 1) or 1


def sequence_id(req_id, rank):
    """The service sequence that holds request `req_id`'s KV of tensor-parallel rank `rank`."""
    return _h64("vllm-request", req_id, rank)


def chain_hashes(tokens, block_size):
    """One hash per full block, each over every token up to the block's end."""
    out, h = [], hashlib.blake2b(digest_size=16)
    for b in range(len(tokens) // block_size):
        h.update(struct.pack(f"<{block_size}I", *tokens[b * block_size:(b + 1) * block_size]))
        out.append(h.copy().hexdigest())
    return out


def _extra(vllm_config):
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    if ktc is None:
        raise ValueError("kv_transfer_config is None: the connector needs one")
    ex = getattr(ktc, "kv_connector_extra_config", None) or {}
    return dict(ex)


def _dtype_name(dtype):
    s = str(dtype).replace("torch.", "")
    return {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
            "float": "fp32", "auto": "fp16", "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}.get(s, s)


@dataclass
class _Geometry:
    layers: int
    q_heads: int          # this rank's
    kv_heads: int         # this rank's
    head_dim: int
    dtype: str
    block_size: int
    rank: int
    world: int
    model: str

    def shape(self, rank=None):
        r = self.rank if rank is None else rank
        return kvmanager.ModelShape(layers=self.layers, q_heads=self.q_heads,
                                    kv_heads=self.kv_heads, head_dim=self.head_dim,
                                    dtype=self.dtype,
                                    fingerprint=_h64("vllm-model", self.model, r, self.world))


def _geometry(vllm_config, ex):
    mc = getattr(vllm_config, "model_config", None)
    pc = getattr(vllm_config, "parallel_config", None)
    cc = getattr(vllm_config, "cache_config", None)
    world = int(ex.get("tp_size", getattr(pc, "tensor_parallel_size", 1) or 1))
    rank = int(ex.get("tp_rank", getattr(pc, "rank", 0) or 0)) % world

    def ask(key, method, *args):
        if key in ex:
            return int(ex[key])
        if mc is not None and hasattr(mc, method):
            return int(getattr(mc, method)(*args))
        raise ValueError(f"kv_connector_extra_config: '{key}' is needed (no model_config.{method})")

    return _Geometry(
        layers=ask("layers", "get_num_layers", pc),
        q_heads=ask("q_heads", "get_num_attention_heads", pc),
        kv_heads=ask("kv_heads", "get_num_kv_heads", pc),
        head_dim=ask("head_dim", "get_head_size"),
        dtype=_dtype_name(ex.get("dtype", getattr(cc, "cache_dtype", None) in (None, "auto")
                                 and getattr(mc, "dtype", "float16") or getattr(cc, "cache_dtype"))),
        block_size=int(ex.get("block_size", getattr(cc, "block_size", 16) or 16)),
        rank=rank, world=world, model=str(ex.get("model", getattr(mc, "model", "model"))))


class PagedLayout:
    """K and V of one paged layer as [num_blocks, block_size, kv_heads, head_dim] views, probed
    from the tensor's shape (offsets follow its strides, so interleaved layouts work):

      (2, N, B, H, D)   FlashAttention before 2026 (K then V)
      (N, 2, B, H, D)   FlashInfer, and FlashAttention after PR #42095
      (N, H, B, 2*D)    K and V packed (PR #44455)
    """

    def __init__(self, t, block_size, kv_heads, head_dim, hint=None):
        s = tuple(t.shape)
        B, H, D = block_size, kv_heads, head_dim
        cands = []
        if len(s) == 5 and s[0] == 2 and s[2:] == (B, H, D):
            cands.append("2NBHD")
        if len(s) == 5 and s[1] == 2 and s[2:] == (B, H, D):
            cands.append("N2BHD")
        if len(s) == 4 and s[1:] == (H, B, 2 * D):
            cands.append("NHB2D")
        if hint:
            cands = [c for c in cands if c == hint]
        if len(cands) != 1:
            what = "ambiguous (set kv_connector_extra_config.kv_layout to " + " or ".join(cands) + ")" \
                if cands else "not one of (2, N, B, H, D), (N, 2, B, H, D), (N, H, B, 2*D)"
            raise ValueError(f"paged KV tensor of shape {s} with block_size {B}, {H} KV heads, "
                             f"head_dim {D}: {what}")
        self.kind = cands[0]
        if self.kind == "2NBHD":
            self.k, self.v = t[0], t[1]
        elif self.kind == "N2BHD":
            self.k, self.v = t[:, 0], t[:, 1]
        else:
            self.k = t[..., :D].permute(0, 2, 1, 3)
            self.v = t[..., D:].permute(0, 2, 1, 3)
        self.num_blocks = self.k.shape[0]


# ---- the connector ----

class KvmanagerConnector(_Base):
    """kvmanager's vLLM KV connector: prompt KV offload and prefix loads (see the module doc)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        role_v = _role(role)
        try:
            role = KVConnectorRole(role_v)
        except Exception:  # noqa: BLE001
            pass
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._vllm_config = vllm_config
        self._role_v = role_v
        ex = _extra(vllm_config)
        self._ex = ex
        mode = ex.get("mode", "offload")
        if mode != "offload":
            raise ValueError(f"kv_connector_extra_config.mode: '{mode}' (only 'offload'; sparse "
                             f"decoding goes through kvmanager.SparseDecoder in the backend)")
        if "address" not in ex:
            raise ValueError("kv_connector_extra_config.address is required (HOST:PORT or a list)")
        self._deadline_ms = int(ex.get("deadline_ms", 5000))
        self._load_deadline_s = float(ex.get("load_deadline_ms", 4 * self._deadline_ms)) / 1000
        self._lease_ms = int(ex.get("lease_ms", 600000))
        if self._lease_ms < 0:
            raise ValueError(f"kv_connector_extra_config.lease_ms: {self._lease_ms} (>= 0; 0: no lease)")
        self._async_lookup = bool(ex.get("async_lookup", False))
        self._geo = _geometry(vllm_config, ex)
        self._client = kvmanager.Client(
            ex["address"], tenant=ex.get("tenant", "dev"), token_file=ex.get("token_file"),
            tls_ca=ex.get("tls_ca"), tls_cert=ex.get("tls_cert"), tls_key=ex.get("tls_key"),
            data_plane=ex.get("data_plane", "none"), deadline_ms=self._deadline_ms,
            client_name="vllm-" + ("scheduler" if role_v == 0 else f"worker-{self._geo.rank}"))
        self._stats = {"saved_tokens": 0, "saved_bytes": 0, "loaded_blocks": 0, "loaded_bytes": 0,
                       "load_errors": 0, "save_seconds": 0.0, "load_seconds": 0.0,
                       "attached_tokens": 0}
        if role_v == 0:
            self._index = {}        # chain hash of a full block -> (request id, block index)
            self._seen = {}         # req id -> (prompt tokens, computed when looked up, hit)
            self._pending_loads = {}
            self._saved = {}        # req id -> positions saved (scheduled) so far
            self._blocks = {}       # req id -> paged block ids
            self._stored = []       # request ids with sequences, oldest first
            self._prompt_cache = {}  # req id -> prompt tokens (while it runs)
            self._max_sequences = int(ex.get("max_sequences", 1024))
            self._lookups = {}      # req id -> Future of (src, blocks) (async_lookup)
            self._lookup_pool = (ThreadPoolExecutor(1, thread_name_prefix="kvm-lookup")
                                 if self._async_lookup else None)
        else:
            self._layers = {}       # layer name -> PagedLayout
            self._order = []        # layer names, in registration order (= layer index)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvm-load")
            self._loads = {}        # req id -> (future, LoadSpec, deadline)
            self._finished_recv = set()
            self._load_errors = set()
            self._staging = {}      # req id -> (SaveSpec, torch tensor [L][H][2][n][D])
            self._created = set()
            self._lock = threading.Lock()
            self._cancelled = set()  # loads reported failed: they must not write any more

    # ---------------- scheduler side ----------------

    def _prompt(self, request):
        t = getattr(request, "prompt_token_ids", None)
        return list(t if t is not None else request.all_token_ids)

    def _lookup(self, tokens):
        """Full blocks held by the index and confirmed stored on the service: (src req, blocks)."""
        B = self._geo.block_size
        hashes = chain_hashes(tokens, B)
        src, n = None, 0
        for i, h in enumerate(hashes):
            e = self._index.get(h)
            if e is None or (src is not None and e[0] != src) or e[1] != i:
                break
            src, n = e[0], i + 1
        if n == 0:
            return None, 0
        for r in range(self._geo.world):  # what the service really stores, per rank
            stored = self._client.prefix_lookup(tokens[:n * B], self._geo.shape(r), block_size=B,
                                                sequence_id=sequence_id(src, r))
            n = min(n, stored // B)
        return src, n

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        tokens = self._prompt(request)
        B = self._geo.block_size
        try:
            if self._async_lookup:  # answered once its thread is done; the same answer after
                fut = self._lookups.get(request.request_id)
                if fut is None:
                    self._lookups[request.request_id] = fut = self._lookup_pool.submit(
                        self._lookup, tokens)
                if not fut.done():
                    return None, True
                src, n = fut.result()
            else:
                src, n = self._lookup(tokens)
        except kvmanager.Error as e:  # a service that cannot answer: no hit
            log.warning("kvmanager prefix lookup failed: %s", e)
            return 0, False
        # vLLM must compute at least one token: never the whole prompt
        n = min(n, (len(tokens) - 1) // B)
        hit = n * B - num_computed_tokens
        if hit <= 0:
            self._seen[request.request_id] = (None, num_computed_tokens, 0)
            return 0, False
        self._seen[request.request_id] = (src, num_computed_tokens, n)
        return hit, True

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        rid = request.request_id
        ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        if ids:
            self._blocks[rid] = ids
        if num_external_tokens <= 0:  # the second call of an async load, or no hit
            return
        seen = self._seen.get(rid)
        if seen is None or seen[0] is None:  # no hit of ours was offered for this request
            return
        src, computed, n = seen
        B = self._geo.block_size
        first = computed // B
        self._pending_loads[rid] = LoadSpec(rid, src, list(range(first, n)), ids[first:n])

    def build_connector_meta(self, scheduler_output):
        meta = KvmanagerConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads = {}
        sched = scheduler_output.num_scheduled_tokens
        for nr in getattr(scheduler_output, "scheduled_new_reqs", ()):
            ids = list(nr.block_ids[0])
            self._blocks[nr.req_id] = ids
            self._save_spec(meta, nr.req_id, list(nr.prompt_token_ids), nr.num_computed_tokens,
                            sched.get(nr.req_id, 0))
        cr = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cr is not None:
            resumed = getattr(cr, "resumed_req_ids", set()) or set()
            for i, rid in enumerate(cr.req_ids):
                nb = cr.new_block_ids[i]
                if nb is not None:
                    self._blocks[rid] = (list(nb[0]) if rid in resumed
                                         else self._blocks.get(rid, []) + list(nb[0]))
                tokens = self._prompt_cache.get(rid)
                if tokens is None:
                    continue
                self._save_spec(meta, rid, tokens, cr.num_computed_tokens[i], sched.get(rid, 0))
        return meta

    def _save_spec(self, meta, rid, prompt, computed, scheduled):
        self._prompt_cache[rid] = prompt
        start = self._saved.get(rid, 0)
        end = min(computed + scheduled, len(prompt))
        if end <= start:
            return
        self._saved[rid] = end
        meta.saves.append(SaveSpec(rid, start, prompt[start:end], list(self._blocks.get(rid, []))))

    def request_finished(self, request, block_ids):
        rid = request.request_id
        prompt = self._prompt_cache.pop(rid, None)
        saved = self._saved.pop(rid, 0)
        if self._async_lookup:
            self._lookups.pop(rid, None)
        self._seen.pop(rid, None)
        self._blocks.pop(rid, None)
        if prompt:
            B = self._geo.block_size
            for i, h in enumerate(chain_hashes(prompt[:saved], B)):
                self._index.setdefault(h, (rid, i))
            if saved >= B:
                self._stored.append(rid)
                self._evict()
        # saves are acknowledged at the step's wait_for_save: nothing holds the blocks
        return False, None

    def _evict(self):
        while len(self._stored) > self._max_sequences:
            old = self._stored.pop(0)
            self._index = {h: e for h, e in self._index.items() if e[0] != old}
            for r in range(self._geo.world):
                try:
                    self._client.delete_sequence(sequence_id(old, r))
                except kvmanager.Error as e:
                    log.warning("kvmanager: deleting %s: %s", old, e)

    def update_connector_output(self, connector_output):
        pass

    def take_events(self):
        return ()

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config):
        return None

    # ---------------- worker side ----------------

    def register_kv_caches(self, kv_caches):
        g = self._geo
        hint = self._ex.get("kv_layout")
        for name, t in kv_caches.items():
            self._layers[name] = PagedLayout(t, g.block_size, g.kv_heads, g.head_dim, hint)
            self._order.append(name)
        if len(self._order) != g.layers:
            raise ValueError(f"register_kv_caches: {len(self._order)} layers, the model has {g.layers}")

    def register_cross_layers_kv_cache(self, kv_cache, attn_backend=None):
        raise NotImplementedError("kvmanager: cross-layer KV blocks are not supported")

    def start_load_kv(self, forward_context=None, **kwargs):
        meta = self._get_connector_metadata()
        if meta is None:
            return
        for spec in meta.loads:
            deadline = time.monotonic() + self._load_deadline_s
            with self._lock:
                self._cancelled.discard(spec.req_id)
                fut = self._pool.submit(self._load, spec, deadline)
                self._loads[spec.req_id] = (fut, spec, deadline)

    def _load(self, spec, deadline):
        import torch
        g = self._geo
        t0 = time.monotonic()
        src = sequence_id(spec.src_req_id, g.rank)
        n = len(spec.src_blocks)
        dst = torch.as_tensor(spec.dst_block_ids, dtype=torch.long)
        stage = None
        for li, name in enumerate(self._order):
            lay = self._layers[name]
            if stage is None or stage.dtype != lay.k.dtype:
                stage = torch.empty(n, g.block_size, g.head_dim, dtype=lay.k.dtype)
            for h in range(g.kv_heads):
                for values, view in ((False, lay.k), (True, lay.v)):
                    if time.monotonic() > deadline:
                        raise kvmanager.TimedOut(f"load of {spec.req_id}: past its deadline", 8)
                    self._client.read_blocks(src, li, h, spec.src_blocks, values=values, out=stage,
                                             block_size=g.block_size)
                    with self._lock:  # once reported failed, vLLM may reuse the blocks
                        if spec.req_id in self._cancelled:
                            raise kvmanager.Cancelled(f"load of {spec.req_id}: cancelled", 9)
                        view[dst.to(view.device), :, h, :] = stage.to(view.device)
        self._stats["loaded_blocks"] += n
        self._stats["loaded_bytes"] += n * g.layers * g.kv_heads * 2 * g.block_size * g.head_dim \
            * stage.element_size()
        self._stats["load_seconds"] += time.monotonic() - t0

    def wait_for_layer_load(self, layer_name):
        # Loads are asynchronous: their requests are not in the batch until they finished.
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        meta = self._get_connector_metadata()
        if meta is None or not meta.saves:
            return
        import torch
        g = self._geo
        lay = self._layers.get(layer_name)
        if lay is None:
            raise KeyError(f"save_kv_layer: layer '{layer_name}' was not registered")
        li = self._order.index(layer_name)
        B = g.block_size
        step_slots = []
        for spec in meta.saves:
            n = len(spec.token_ids)
            entry = self._staging.get(spec.req_id)
            if entry is None:
                buf = torch.empty(g.layers, g.kv_heads, 2, n, g.head_dim, dtype=lay.k.dtype)
                self._staging[spec.req_id] = entry = (spec, buf)
            pos = torch.arange(spec.start, spec.start + n)
            blocks = torch.as_tensor(spec.block_ids, dtype=torch.long)[pos // B]
            offs = pos % B
            step_slots.append(blocks * B + offs)
            dev = lay.k.device
            buf = entry[1]
            buf[li, :, 0] = lay.k[blocks.to(dev), offs.to(dev)].permute(1, 0, 2).cpu()
            buf[li, :, 1] = lay.v[blocks.to(dev), offs.to(dev)].permute(1, 0, 2).cpu()
        # The new tokens' slots per the attention metadata are among the rows saved (the saves
        # also cover rows computed earlier: loaded or locally cached prefix blocks).
        sm = getattr(attn_metadata, "slot_mapping", None)
        if sm is not None and step_slots:
            have = set(torch.cat(step_slots).tolist())
            missing = [s for s in torch.as_tensor(sm).flatten().tolist() if s >= 0 and s not in have]
            if missing:
                log.warning("kvmanager: %d slots of the step are not in any save", len(missing))

    def wait_for_save(self):
        if not self._staging:
            return
        t0 = time.monotonic()
        g = self._geo
        try:
            for rid, (spec, buf) in self._staging.items():
                seq = sequence_id(rid, g.rank)
                skip = 0  # leading tokens the service already has (attached or stored)
                if rid not in self._created:
                    try:  # a stored prefix of the prompt is attached, not sent again
                        have = self._client.create_sequence(
                            seq, g.shape(), block_size=g.block_size, durability="durable",
                            prefix_tokens=spec.token_ids if spec.start == 0 else None,
                            lease_ms=self._lease_ms)
                        self._stats["attached_tokens"] += have
                    except kvmanager.AlreadyExists:  # a restarted worker
                        have = self._client.attach(seq, g.shape(), block_size=g.block_size)
                    skip = max(0, min(len(spec.token_ids), have - spec.start))
                    self._created.add(rid)
                if skip < len(spec.token_ids):
                    part = buf if skip == 0 else buf[:, :, :, skip:].contiguous()
                    self._client.append(seq, spec.start + skip, spec.token_ids[skip:], part,
                                        wait=False)
                    self._stats["saved_tokens"] += len(spec.token_ids) - skip
                    self._stats["saved_bytes"] += part.numel() * part.element_size()
            self._client.flush()
        except kvmanager.Error as e:  # a save that failed only loses future prefix hits
            log.warning("kvmanager: save failed: %s", e)
            self._stats["save_errors"] = self._stats.get("save_errors", 0) + 1
        finally:
            self._staging = {}
            self._stats["save_seconds"] += time.monotonic() - t0

    def _collect(self):
        """Loads that ended (done, failed, or past their deadline): (finished ids, failed ids).
        A failed load's blocks go to the load-error set, reported in this same pass."""
        now = time.monotonic()
        failed = set()
        with self._lock:
            for rid, (fut, spec, deadline) in list(self._loads.items()):
                if not fut.done() and now < deadline + self._deadline_ms / 1000:
                    continue
                err = None
                if not fut.done():
                    err = "deadline"
                    self._cancelled.add(rid)
                else:
                    try:
                        fut.result()
                    except Exception as e:  # noqa: BLE001 - every failure fails the load
                        err = e
                if err is not None:
                    log.warning("kvmanager: load of %s failed: %s", rid, err)
                    self._load_errors.update(spec.dst_block_ids)
                    self._stats["load_errors"] += 1
                    failed.add(rid)
                del self._loads[rid]
                self._finished_recv.add(rid)
            done, self._finished_recv = self._finished_recv, set()
        return done, failed

    def get_finished(self, finished_req_ids):
        """(finished_sending, finished_recving): saves never hold blocks, so sending is None."""
        recv, _ = self._collect()
        for rid in finished_req_ids or ():
            self._created.discard(rid)
        return None, (recv or None)

    def get_transfer_results(self, finished_req_ids):
        """Newer vLLM: (finished_sending, finished_recving, failed_recving); a failed receive
        is also in finished_recving."""
        recv, failed = self._collect()
        for rid in finished_req_ids or ():
            self._created.discard(rid)
        return set(), recv, failed

    def get_block_ids_with_load_errors(self):
        errs, self._load_errors = self._load_errors, set()
        return errs

    def get_kv_connector_stats(self):
        s = dict(self._stats)
        for k in self._stats:
            self._stats[k] = 0 if isinstance(self._stats[k], int) else 0.0
        return KvmanagerStats(data=s) if any(s.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KvmanagerStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KvmanagerPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        if self._role_v == 1:
            self._pool.shutdown(wait=True)
        elif self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=True)
        self._client.close()


# ---- stats and metrics ----

class KvmanagerStats:
    """vLLM's KVConnectorStats shape: .data, aggregate(), reduce(), is_empty(), reset()."""

    def __init__(self, data=None):
        self.data = dict(data or {})

    def aggregate(self, other):
        for k, v in (other.data if other is not None else {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self):
        return dict(self.data)

    def is_empty(self):
        return not any(self.data.values())

    def reset(self):
        self.data = {}

    def clone_and_reset(self):
        c = KvmanagerStats(self.data)
        self.reset()
        return c


_COUNTERS = {
    "saved_tokens": "Prompt tokens whose KV the connector saved to kvmanager",
    "saved_bytes": "KV bytes the connector appended to kvmanager",
    "loaded_blocks": "Prefix blocks the connector loaded from kvmanager",
    "loaded_bytes": "KV bytes the connector loaded from kvmanager",
    "load_errors": "Loads that failed or missed their deadline (their blocks are recomputed)",
    "save_seconds": "Seconds the workers spent in wait_for_save",
    "load_seconds": "Seconds the loader spent reading blocks",
}


class KvmanagerPromMetrics:
    """Registers vllm:kvmanager_* counters with vLLM's metric classes; observe() adds stats."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        Counter = metric_types[_key(metric_types, "Counter")]
        self._per_engine = {}
        self.counters = {}
        for k, doc in _COUNTERS.items():
            c = Counter(name=f"vllm:kvmanager_{k}_total", documentation=doc,
                        labelnames=list(labelnames))
            self.counters[k] = c
            for idx, values in dict(per_engine_labelvalues).items():
                self._per_engine.setdefault(idx, {})[k] = c.labels(*values)

    def observe(self, transfer_stats_data, engine_idx=0):
        for k, v in (transfer_stats_data or {}).items():
            if k in self.counters and v:
                self._per_engine[engine_idx][k].inc(v)


def _key(metric_types, name):
    for k in metric_types:
        if getattr(k, "__name__", str(k)) == name or str(k).endswith(name):
            return k
    raise KeyError(f"metric_types has no {name}")
