"""Fixtures for the transport tests: real memory node processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nodekit import LISTENING

from pager.tools.child import killed_after


@dataclass
class NodeProc:
    """A `ssi-pager memnode` subprocess."""

    store: Path
    token_file: Path
    args: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # a command the node runs under (strace)
    proc: subprocess.Popen[str] | None = None
    endpoint: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> NodeProc:
        # port 0: the kernel picks a free port, so test nodes never take the 50051-50100 range
        # the auto-selection test holds (a later --listen in args wins)
        cmd = [*self.prefix, sys.executable, "-m", "pager.cli", "memnode",
               "--listen", "127.0.0.1:0", "--store", str(self.store),
               "--token-file", str(self.token_file), *self.args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stderr is not None
        # a node that prints nothing is killed at the deadline, which ends the readline below
        with killed_after(self.proc, timeout):
            while line := self.proc.stderr.readline():
                self.stderr_lines.append(line)
                m = LISTENING.search(line)
                if m:
                    self.endpoint = m.group(1)
                    return self
        self.stop()
        raise AssertionError(f"memnode did not start: {''.join(self.stderr_lines)}")

    def traced_pids(self) -> list[int]:
        """With a prefix command: the node process(es) it runs (its children)."""
        if not self.prefix or self.proc is None:
            return []
        kids: list[int] = []
        for path in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids += map(int, path.read_text().split())
        return kids

    @property
    def token(self) -> bytes:
        return self.token_file.read_bytes().strip()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        """Terminate; returns the rest of stderr."""
        rest = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                for pid in self.traced_pids():  # the node itself, under a tracer
                    os.kill(pid, signal.SIGTERM)
                self.proc.terminate()
            try:
                rest = self.proc.communicate(timeout=10)[1] or ""
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rest = self.proc.communicate()[1] or ""
            self.proc = None
        return rest


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[NodeProc] = []

    def make(*args: str, store: Path | None = None, token_file: Path | None = None,
             prefix: list[str] | None = None) -> NodeProc:
        n = NodeProc(store or tmp_path / "store", token_file or tmp_path / "keys" / "token",
                     list(args), prefix or [])
        nodes.append(n)
        return n.start()

    yield make
    for n in nodes:
        n.stop()


@pytest.fixture
def memnode(node_factory) -> NodeProc:
    return node_factory()


@pytest.fixture(autouse=True)
def _isolated_xdg(tmp_path, monkeypatch):
    """Never touch the real ~/.local/share/ssi-pager."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
