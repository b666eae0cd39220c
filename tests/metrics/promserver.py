"""Run Debian's real `prometheus` on loopback for a test module and query its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pager.vm.procs import stop_process


def free_port() -> int:
    """A port for prometheus (it takes a number; start() retries if another process wins it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port held bound but not listening: connecting is refused, and nothing else
    can take it while the block runs (no check-then-use race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class PromServer:
    """`prometheus` with a temp config and storage on 127.0.0.1:<free port>."""

    def __init__(self, workdir: Path, config: str, files: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {}).items():
            (workdir / name).write_text(text)
        (workdir / "prometheus.yml").write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> PromServer:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not installed (deploy/setup-host.sh installs it)"
        for _attempt in range(3):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}",
                 "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise AssertionError("prometheus did not start:\n" + self.log())

    def log(self) -> str:
        p = self.workdir / "prometheus.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:   # 400/422 carry a JSON error body
            return json.load(exc)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float | None:
        """The single sample of an instant query, None when the result is empty."""
        res = self.query(expr)
        assert res["status"] == "success", (expr, res)
        rows = res["data"]["result"]
        if not rows:
            return None
        assert len(rows) == 1, (expr, rows)
        return float(rows[0]["value"][1])

    def wait_for(self, expr: str, pred: Any = lambda v: v is not None,
                 timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        v = self.value(expr)
        while not pred(v) and time.monotonic() < deadline:
            time.sleep(0.25)
            v = self.value(expr)
        return v

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None
