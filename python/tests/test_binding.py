"""The kvmanager binding against a real kvmanager: every operation round-trips, buffers are read
and written in place (zero copy), bad buffers are ValueErrors naming the argument, errors carry
their codes, blocking calls release the GIL, and a dead server is a ConnectionError in time."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kvmanager
from conftest import Server

SHAPE = dict(layers=2, q_heads=4, kv_heads=2, head_dim=32)
B = 16


def kv_rows(shape, n, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((shape.layers, shape.kv_heads, 2, n, shape.head_dim)).astype(dtype)


def client(server, **kw):
    kw.setdefault("data_plane", "none")
    kw.setdefault("deadline_ms", 5000)
    return kvmanager.Client(server.address, **kw)


def test_import_loads_neither_numpy_nor_torch():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, kvmanager, kvmanager.vllm.connector; "
         "print('numpy' in sys.modules, 'torch' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out


def test_every_operation_round_trips(server):
    shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
    with client(server) as c:
        assert c.create_sequence(7, shape, block_size=B, durability="durable") == 0
        n = 40
        kv = kv_rows(shape, n)
        tokens = list(range(100, 100 + n))
        assert c.append(7, 0, tokens[:24], np.ascontiguousarray(kv[:, :, :, :24])) == 24
        assert c.append(7, 24, tokens[24:], np.ascontiguousarray(kv[:, :, :, 24:]), wait=False) is None
        c.flush()
        seqs = {s["sequence_id"]: s for s in c.list_sequences()}
        assert seqs[7]["length"] == n and seqs[7]["shape"] == shape
        assert seqs[7]["shard"] == server.address
        for layer in range(shape.layers):
            for h in range(shape.kv_heads):
                for values in (False, True):
                    got = c.read_blocks(7, layer=layer, kv_head=h, block_indices=[0, 1, 2],
                                        values=values)
                    assert got.shape == (3, B, shape.head_dim) and got.dtype == np.float16
                    want = kv[layer, h, int(values)]
                    assert np.array_equal(got.reshape(-1, shape.head_dim)[:n], want)
                    assert not got.reshape(-1, shape.head_dim)[n:].any()  # ragged block zeroed
        # whole blocks of a durable sequence, by content address
        assert c.prefix_lookup(tokens, shape, block_size=B) == 32
        assert c.prefix_lookup(tokens[:20] + [1, 2, 3, 4, 5], shape, block_size=B) == 16
        assert c.prefix_lookup([9] * 40, shape, block_size=B) == 0
        assert c.truncate(7, 20) == 20
        assert {s["sequence_id"]: s["length"] for s in c.list_sequences()}[7] == 20
        st = c.stats()
        assert list(st) == [server.address] and isinstance(st[server.address], dict)
        assert c.attach(7, shape, block_size=B) == 20
        assert c.bytes_sent > kv.nbytes
        c.delete_sequence(7)
        assert 7 not in {s["sequence_id"] for s in c.list_sequences()}
        with pytest.raises(kvmanager.NotFound) as e:
            c.read_blocks(7, 0, 0, [0])
        assert isinstance(e.value, KeyError) and e.value.code == 2
        assert "7" in e.value.message
    assert c.closed


@pytest.mark.parametrize("holder,new", [("durable", "durable"), ("cache", "cache"),
                                        ("cache", "durable"), ("durable", "cache")])
def test_create_from_a_stored_prefix(server, holder, new):
    """A new request's sequence starts with the stored prefix of its prompt: whole blocks only,
    byte-identical to the holder's, and its own after the holder is gone."""
    shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
    base = {"durable": 100, "cache": 200}[holder] + {"durable": 0, "cache": 10}[new]
    prompt = list(range(5000 + base, 5000 + base + 40))
    kv = kv_rows(shape, 40, seed=base)
    with client(server) as c:
        c.create_sequence(base, shape, block_size=B, durability=holder)
        assert c.append(base, 0, prompt, kv) == 40
        asked = prompt[:36] + [1]  # shares 2 whole blocks, then differs
        assert c.prefix_lookup(asked, shape, block_size=B) == 32
        assert c.create_sequence(base + 1, shape, block_size=B, durability=new,
                                 prefix_tokens=asked) == 32
        c.delete_sequence(base)
        for layer in range(shape.layers):
            for h in range(shape.kv_heads):
                for values in (False, True):
                    got = c.read_blocks(base + 1, layer=layer, kv_head=h, block_indices=[0, 1],
                                        values=values)
                    assert np.array_equal(got.reshape(-1, shape.head_dim),
                                          kv[layer, h, int(values), :32])
        # It goes on with its own tokens; nothing stored matches a foreign prompt.
        assert c.append(base + 1, 32, asked[32:], kv_rows(shape, 5, seed=9)) == 37
        assert c.create_sequence(base + 2, shape, block_size=B, durability=new,
                                 prefix_tokens=[7] * 40) == 0
        with pytest.raises(kvmanager.InvalidArgument):
            c.create_sequence(base + 1, shape, block_size=B, attach=True, prefix_tokens=asked)


def test_leases_expire_unless_renewed(server):
    """A sequence created with a lease is deleted by the service once unused for that long; use or
    renew() keeps it; its blocks stay findable by prefix until then."""
    shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
    prompt = list(range(9000, 9032))
    with client(server) as c:
        c.create_sequence(61, shape, block_size=B, durability="durable", lease_ms=1500)
        c.create_sequence(62, shape, block_size=B, durability="cache", lease_ms=1500)
        c.create_sequence(63, shape, block_size=B, durability="cache")  # no lease
        c.append(61, 0, prompt, kv_rows(shape, 32))
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # renewed well within the lease, several times over
            assert c.renew([61]) == []
            time.sleep(0.2)
        assert c.prefix_lookup(prompt, shape, block_size=B) == 32
        ids = lambda: {s["sequence_id"] for s in c.list_sequences()}
        assert {61, 63} <= ids()
        deadline = time.monotonic() + 30
        while 61 in ids() and time.monotonic() < deadline:  # now left alone: it expires
            time.sleep(0.2)
        assert ids().isdisjoint({61, 62}) and 63 in ids()
        assert c.prefix_lookup(prompt, shape, block_size=B) == 0
        assert c.renew([61, 63]) == [61]
        with pytest.raises(kvmanager.InvalidArgument):
            c.create_sequence(64, shape, block_size=B, lease_ms=400 * 24 * 3600 * 1000)


def test_torch_tensors_in_place(server):
    torch = pytest.importorskip("torch")
    for dtype, tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        shape = kvmanager.ModelShape(**SHAPE, dtype=dtype)
        seq = {"fp16": 1, "bf16": 2, "fp32": 3}[dtype]
        with client(server) as c:
            c.create_sequence(seq, shape, block_size=B)
            kv = torch.randn(shape.layers, shape.kv_heads, 2, B, shape.head_dim).to(tdt)
            assert c.append(seq, 0, list(range(B)), kv) == B
            out = torch.zeros(1, B, shape.head_dim, dtype=tdt)
            assert c.read_blocks(seq, 1, 1, [0], values=True, out=out) is out
            assert torch.equal(out[0], kv[1, 1, 1])


def test_zero_copy(server):
    shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
    kv = kv_rows(shape, B)
    # what the C++ side reads is the array's own memory
    assert kvmanager._kvmanager._buffer_address(kv) == kv.ctypes.data
    big = np.zeros((4, B, shape.head_dim), np.float16)
    view = big[1:3]  # a contiguous view: a copy would leave `big` untouched
    assert kvmanager._kvmanager._buffer_address(view) == view.ctypes.data != big.ctypes.data
    with client(server) as c:
        c.create_sequence(1, shape, block_size=B)
        c.append(1, 0, list(range(B)), kv)
        c.append(1, B, list(range(B)), kv_rows(shape, B, seed=1))
        c.read_blocks(1, 0, 1, [0, 1], out=view)
    assert np.array_equal(big[1], kv[0, 1, 0]) and np.array_equal(big[2], kv_rows(shape, B, 1)[0, 1, 0])
    assert not big[0].any() and not big[3].any()
    torch = pytest.importorskip("torch")
    t = torch.zeros(8, dtype=torch.float16)[2:6]
    assert kvmanager._kvmanager._buffer_address(t) == t.data_ptr()


def test_bad_buffers_are_value_errors_naming_the_argument(server):
    shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
    with client(server) as c:
        c.create_sequence(1, shape, block_size=B)
        kv = kv_rows(shape, 4)
        cases = [
            (lambda: c.append(1, 0, [1, 2, 3], kv), "kv", "bytes"),               # wrong size
            (lambda: c.append(1, 0, [1, 2, 3, 4], kv.astype(np.float32)), "kv", "dtype"),
            (lambda: c.append(1, 0, [1, 2, 3, 4], np.asfortranarray(kv)), "kv", "contiguous"),
            (lambda: c.append(1, 0, [1, 2, 3, 4], kv[..., ::2]), "kv", "contiguous"),
            (lambda: c.append(1, 0, [1, 2, 3, 4], "text"), "kv", "expected"),
            (lambda: c.append(1, 0, [1, 2, 3, 4], None), "kv", "None"),
        ]
        ro = np.zeros((1, B, shape.head_dim), np.float16)
        ro.flags.writeable = False
        cases += [
            (lambda: c.read_blocks(1, 0, 0, [0], out=ro), "out", "read-only"),
            (lambda: c.read_blocks(1, 0, 0, [0], out=np.zeros((2, B, 32), np.float16)), "out", "bytes"),
            (lambda: c.read_blocks(1, 0, 0, [0], out=np.zeros((1, B, 32), np.float32)), "out", "dtype"),
            (lambda: c.read_blocks(1, 0, 0, [0], out=b"x" * 1024), "out", "read-only"),
        ]
        for fn, arg, what in cases:
            with pytest.raises(ValueError) as e:
                fn()
            assert isinstance(e.value, kvmanager.InvalidArgument) and e.value.code == 1
            assert e.value.message.startswith(arg + ":") and what in e.value.message, e.value.message
        torch = pytest.importorskip("torch")
        with pytest.raises(ValueError, match="kv: not contiguous"):
            c.append(1, 0, [1, 2, 3, 4], torch.from_numpy(kv).transpose(3, 4))
        # nothing was appended by the refused calls
        assert c.append(1, 0, [1, 2, 3, 4], kv) == 4


def test_errors_carry_codes(server):
    shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
    with client(server) as c:
        c.create_sequence(1, shape)
        with pytest.raises(kvmanager.AlreadyExists) as e:
            c.create_sequence(1, shape)
        assert e.value.code == 3 and isinstance(e.value, kvmanager.Error)
        with pytest.raises(KeyError):
            c.attach(99, shape)
        with pytest.raises(kvmanager.NotFound, match="sequence 42"):
            c.read_blocks(42, 0, 0, [0])
    with pytest.raises(ValueError, match="data_plane"):
        kvmanager.Client(server.address, data_plane="carrier-pigeon")
    with pytest.raises(ValueError, match="dtype"):
        kvmanager.ModelShape(**SHAPE, dtype="fp8")
    tok = os.path.join(server.dir, "wrong")
    with open(tok, "w") as f:
        f.write("wrong\n")
    with pytest.raises(kvmanager.Error) as e:
        kvmanager.Client(server.address, token_file=tok, data_plane="none")
    assert e.value.code_name in ("Unauthenticated", "PermissionDenied")
    # TLS options reach the C++ client (or say TLS is not built): never silently ignored
    with pytest.raises(kvmanager.Error):
        kvmanager.Client(server.address, data_plane="none", tls_ca="/nonexistent/ca.pem")


def test_gil_released_and_timeouts_and_dead_server():
    s = Server()
    try:
        shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
        c = kvmanager.Client(s.address, data_plane="none", deadline_ms=1500, heartbeats=False)
        c.create_sequence(1, shape)
        c.append(1, 0, list(range(B)), kv_rows(shape, B))
        os.kill(s.proc.pid, signal.SIGSTOP)  # a service that does not answer
        for _ in range(100):
            with open(f"/proc/{s.proc.pid}/stat") as f:
                if f.read().split(") ")[1].startswith("T"):
                    break
            time.sleep(0.01)
        result = {}

        def call():
            t0 = time.time()
            try:
                c.read_blocks(1, 0, 0, [0])
            except BaseException as e:  # noqa: B902
                result["e"] = e
            result["t"] = time.time() - t0

        th = threading.Thread(target=call)
        th.start()
        spins = 0
        t0 = time.time()
        while th.is_alive() and time.time() - t0 < 5:
            spins += 1  # runs only while the blocked call has released the GIL
            time.sleep(0.001)
        th.join()
        assert isinstance(result["e"], TimeoutError), result
        assert isinstance(result["e"], kvmanager.TimedOut) and result["e"].code == 8
        assert 1.0 < result["t"] < 3.5 and spins > 100
        # killed mid-call: the blocked call fails as a ConnectionError, well within its deadline
        result.clear()
        th = threading.Thread(target=call)
        th.start()
        time.sleep(0.3)
        s.kill()
        th.join(5)
        assert not th.is_alive()
        assert isinstance(result["e"], ConnectionError), result
        assert result["t"] < 1.5 + 0.5
        with pytest.raises(ConnectionError):  # and later calls too
            c.read_blocks(1, 0, 0, [0])
    finally:
        try:
            os.kill(s.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        s.stop()


def test_shard_list_places_sequences_like_the_cpp_client():
    a, b = Server(), Server()
    try:
        shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
        with kvmanager.Client([a.address, b.address], data_plane="none", deadline_ms=5000) as c:
            assert c.shards == [a.address, b.address]
            with kvmanager.Client(f"{b.address}, {a.address}", data_plane="none") as c2:
                for seq in range(1, 21):  # placement does not depend on the list's order
                    assert c.shard_for(seq) == c2.shard_for(seq)
            placed = {}
            for seq in range(1, 21):
                c.create_sequence(seq, shape)
                c.append(seq, 0, [seq] * B, kv_rows(shape, B, seed=seq))
                placed[seq] = c.shard_for(seq)
            assert set(placed.values()) == {a.address, b.address}
            listed = {s["sequence_id"]: s["shard"] for s in c.list_sequences()}
            assert listed == placed
            for seq in (1, 2, 3):
                got = c.read_blocks(seq, 1, 0, [0], values=True)
                assert np.array_equal(got[0], kv_rows(shape, B, seed=seq)[1, 0, 1])
            assert set(c.stats()) == {a.address, b.address}
    finally:
        a.stop()
        b.stop()


def test_mutual_tls_through_the_python_client(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "security", "make_certs.sh")
    if not os.path.exists(script) or subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("no tests/security/make_certs.sh or no openssl")
    subprocess.run(["bash", script, str(tmp_path)], check=True, capture_output=True)
    c = {n: str(tmp_path / n) for n in os.listdir(tmp_path)}
    s = Server(["--tls-cert", c["server.crt"], "--tls-key", c["server.key"],
                "--tls-client-ca", c["ca.crt"]])
    try:
        shape = kvmanager.ModelShape(**SHAPE, dtype="fp16")
        try:
            cl = kvmanager.Client(s.address, data_plane="none", deadline_ms=5000, tls_ca=c["ca.crt"],
                                  tls_cert=c["client.crt"], tls_key=c["client.key"])
        except kvmanager.Unimplemented:
            pytest.skip("TLS is not built into the C++ client yet")
        with cl:
            cl.create_sequence(1, shape)
            kv = kv_rows(shape, B)
            assert cl.append(1, 0, list(range(B)), kv) == B
            assert np.array_equal(cl.read_blocks(1, 1, 1, [0], values=True)[0], kv[1, 1, 1])
        for bad in (dict(),  # plaintext to a TLS port
                    dict(tls_ca=c["ca.crt"], tls_cert=c["other-client.crt"],
                         tls_key=c["other-client.key"]),  # a client certificate it does not trust
                    dict(tls_ca=c["other-ca.crt"], tls_cert=c["client.crt"],
                         tls_key=c["client.key"])):  # a server certificate we do not trust
            with pytest.raises(kvmanager.Error):
                kvmanager.Client(s.address, data_plane="none", deadline_ms=2000, **bad).close()
    finally:
        s.stop()
