"""A child `ssi-pager` process (memory node, pager) started by demo, bench and tests.

Its stderr goes to a file, so readiness lines ("listening on HOST:PORT", "pager: serving")
can be waited for without a reader thread. A process restarted on the same log appends to it:
``wait_for`` and ``text`` look only at what this process wrote (from ``log_start``).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pager.errors import ChildError


@contextlib.contextmanager
def killed_after(proc: subprocess.Popen, timeout: float) -> Iterator[threading.Event]:
    """Within the block ``proc`` is killed once ``timeout`` s have passed, which ends any
    blocking read of its output; the event yielded tells whether that happened."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        proc.kill()

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield fired
    finally:
        watchdog.cancel()


class Child:
    """``python -m pager.cli ARGS`` with stderr appended to ``log``; ``stop()`` it."""

    def __init__(self, args: list[str], log: Path, cwd: str | Path | None = None, *,
                 prefix: list[str] | None = None) -> None:
        """``prefix``: a command to run it under (e.g. ``ip netns exec NS``)."""
        self.log = log
        self.f = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.log_start = self.f.seek(0, 2)  # where this process's lines begin
        self.p = subprocess.Popen([*(prefix or []), sys.executable, "-m", "pager.cli", *args],
                                  cwd=cwd, stdout=subprocess.DEVNULL, stderr=self.f)

    def text(self) -> str:
        """What this process has written to the log so far."""
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        """The first group (or the whole match) of ``pattern`` once this process logs it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m.group(1) if m.groups() else m.group(0)
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise ChildError(f"{self.log.name}: no {pattern!r} (exit {self.p.poll()}): "
                         f"{self.text()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.f.close()
