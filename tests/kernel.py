"""What the kernel says about the tests' own processes: synchronisation on real events."""

from __future__ import annotations

import glob
import time
from collections.abc import Callable


def uffd_blocked(pid: int | str = "self") -> int:
    """How many threads of ``pid`` wait in the kernel for a userfault to be resolved."""
    n = 0
    for path in glob.glob(f"/proc/{pid}/task/*/wchan"):
        try:
            with open(path) as f:
                n += f.read() == "handle_userfault"
        except OSError:
            pass  # the thread exited
    return n


def wait_until(cond: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``cond`` until true; fail naming ``what`` after ``timeout`` (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened within {timeout} s: {what}"
        time.sleep(0.01)
