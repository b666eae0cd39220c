"""Running `ssi-pager vm` from the QEMU tests with a deadline on every wait.

The console (stdout) and the status lines (stderr) are read by one thread each into a list of
lines, so a wait for a line ends at its deadline even when the guest prints nothing at all; a
run that outlives its deadline is killed with everything it started (its own session) and the
test fails with what it printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

import pytest

RUN_TIMEOUT = 120  # one whole guest run under TCG on a loaded 2-core host
LINE_TIMEOUT = 90  # one awaited console or status line
DRAIN_TIMEOUT = 30  # output still arriving after the process exited


def vm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pager.cli", "vm", *args]


class LineReader:
    """Lines of one pipe (``what`` prints it), collected by a thread; waits with a deadline."""

    def __init__(self, stream: IO[str], what: str) -> None:
        self.what = what
        self.lines: list[str] = []
        self.eof = False
        self.cursor = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def until(self, pattern: str, timeout: float = LINE_TIMEOUT) -> str:
        """Lines from the cursor through the first one containing ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self.cursor, len(self.lines)):
                    if pattern in self.lines[i]:
                        got = "".join(self.lines[self.cursor:i + 1])
                        self.cursor = i + 1
                        return got
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = "ended" if self.eof else f"printed no such line within {timeout} s"
                    tail = "".join(self.lines[-40:])
                    pytest.fail(f"{self.what} {why} before {pattern!r}; its last lines:\n{tail}")
                self._cond.wait(left)

    def next_line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The line after the cursor (fails at EOF or after ``timeout``)."""
        return self.until("", timeout)

    def drain(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class VmRun:
    """``ssi-pager vm ARGS`` in the background: console on ``console``, status on ``status``,
    and the guest's serial input on ``send``. Use as a context manager (kills on exit)."""

    def __init__(self, *args: str, argv: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(argv or vm_cmd(*args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.console = LineReader(self.proc.stdout, "the guest console")
        self.status = LineReader(self.proc.stderr, "`ssi-pager vm`")

    def read_until(self, pattern: str, timeout: float = LINE_TIMEOUT) -> str:
        """Console lines since the last call, through the first containing ``pattern``."""
        return self.console.until(pattern, timeout)

    def status_until(self, pattern: str, timeout: float = LINE_TIMEOUT) -> str:
        return self.status.until(pattern, timeout)

    def send(self, line: str) -> None:
        """One line to the guest's serial console (what a waiting workload reads)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = RUN_TIMEOUT) -> Result:
        """Wait for the exit; the whole console and status text."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"`ssi-pager vm` still ran after {timeout} s; console:\n"
                        f"{self.console.text()[-2000:]}\nstatus:\n{self.status.text()[-2000:]}")
        self.console.drain(DRAIN_TIMEOUT)
        self.status.drain(DRAIN_TIMEOUT)
        return Result(rc, self.console.text(), self.status.text())

    def kill(self) -> None:
        """SIGKILL to everything this run started (its own session), then reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(DRAIN_TIMEOUT)

    def __enter__(self) -> VmRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run_vm(*args: str, timeout: float = RUN_TIMEOUT) -> Result:
    """``ssi-pager vm ARGS`` to its end (killed and failed after ``timeout``)."""
    with VmRun(*args) as run:
        return run.finish(timeout)
