"""Shared fixtures: a kvmanager started on free loopback ports for the test, always stopped.

The binaries come from the environment ctest sets (KVM_KVMANAGER, KVM_KVMCTL), else from build/.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

SRC = os.environ.get("KVM_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))


def _bin(env, name):
    p = os.environ.get(env) or os.path.join(SRC, "build", "kvmanager" if name == "kvmanager"
                                            else "tools/kvmctl", name)
    if not os.path.exists(p):
        pytest.skip(f"{name} binary not built ({p})")
    return p


def free_port_pair():
    """A port P with P and P + 1 free on 127.0.0.1 (the service and its admin port)."""
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p + 1 > 65535:
            continue
        ok = True
        for q in (p, p + 1):
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", q))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return p
    raise RuntimeError("no free port pair")


class Server:
    """One kvmanager process: .address, .kill(), .stop(); a data dir of its own."""

    def __init__(self, extra=()):
        self.dir = tempfile.mkdtemp(prefix="kvm-py-")
        self.port = free_port_pair()
        self.address = f"127.0.0.1:{self.port}"
        self.out = open(os.path.join(self.dir, "out"), "w+")
        self.err = open(os.path.join(self.dir, "log"), "w+")
        self.proc = subprocess.Popen(
            [_bin("KVM_KVMANAGER", "kvmanager"), "--listen", self.address, "--admin",
             f"127.0.0.1:{self.port + 1}", "--data-dir", os.path.join(self.dir, "data"),
             "--no-gpu", *extra], stdout=self.out, stderr=self.err)
        deadline = time.time() + 20
        while time.time() < deadline:
            self.out.seek(0)
            if "listening on" in self.out.read():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.err.seek(0)
        log = self.err.read()[-2000:]
        self.stop()
        raise RuntimeError(f"kvmanager did not start: {log}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def server():
    s = Server()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def shared_server():
    s = Server()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def kvmctl():
    return _bin("KVM_KVMCTL", "kvmctl")
