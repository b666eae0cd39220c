"""Helpers of the cluster tests: memory nodes sharing one token, an etcd server of the test's
own (temporary data dir, free ports), waits on conditions with deadlines."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from enginekit import Memnode


def nodes(tmp: Path, n: int, etcd: str | None = None) -> list[Memnode]:
    """``n`` memory nodes in tmp/n0.. sharing the first one's token."""
    out: list[Memnode] = []
    for i in range(n):
        d = tmp / f"n{i}"
        d.mkdir()
        if out:
            shutil.copy(out[0].token_file, d / "token")
            os.chmod(d / "token", 0o600)
        out.append(ClusterNode(d, f"n{i}", etcd))
    return out


class ClusterNode(Memnode):
    """A memory node with a name (and an etcd registration when ``etcd`` is given)."""

    def __init__(self, tmp: Path, name: str, etcd: str | None) -> None:
        self.name, self.etcd = name, etcd
        super().__init__(tmp)

    def start(self, listen: str) -> None:
        from enginekit import Proc

        extra = ["--etcd", self.etcd] if self.etcd else []
        self.proc = Proc(["-v", "memnode", "--listen", listen, "--store", str(self.store),
                          "--token-file", str(self.token_file), "--name", self.name, *extra],
                         self.tmp / "memnode.log")
        self.endpoint = self.proc.wait_for(r"listening on (\S+)")

    def wipe_and_restart(self) -> None:
        """Restart on an empty store, on the same endpoint."""
        self.proc.kill()
        self.proc.stop()
        shutil.rmtree(self.store, ignore_errors=True)
        self.start(self.endpoint)


def flip_byte(path: Path, offset: int = 100) -> None:
    """Damage one byte of a (stopped) node's page file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


class Etcd:
    """etcd (Debian's etcd-server) on a temporary data dir and free ports."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # etcd takes no port 0: ports found free may be taken before it binds them; then it
        # exits saying so, and it is started again on others
        for attempt in range(3):
            self.client_port = _free_port()
            self.peer_port = _free_port()
            self.url = f"http://127.0.0.1:{self.client_port}"
            try:
                self.start()
                return
            except AssertionError:
                log = (tmp / "etcd.log").read_text(errors="replace")
                if attempt == 2 or "address already in use" not in log:
                    raise
                (tmp / "etcd.log").rename(tmp / f"etcd-attempt{attempt}.log")
                shutil.rmtree(tmp / "etcd", ignore_errors=True)

    def start(self) -> None:
        exe = shutil.which("etcd")
        assert exe, "etcd is not installed: apt-get install -y etcd-server"
        cmd = [exe, "--name", "t", "--data-dir", str(self.tmp / "etcd"),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
               "--initial-cluster", f"t=http://127.0.0.1:{self.peer_port}"]
        with open(self.tmp / "etcd.log", "ab") as log:
            self.p = subprocess.Popen(cmd, stdout=log, stderr=log)
        from transport.membership import etcd_client

        client = etcd_client(self.url, timeout=1.0)

        def up() -> bool:
            try:
                client.status()
                return True
            except Exception:
                assert self.p.poll() is None, f"etcd exited: see {self.tmp / 'etcd.log'}"
                return False
        wait_until(up, 20, "etcd to answer")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
