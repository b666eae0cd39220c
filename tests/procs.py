"""Waiting on the tests' child processes with a deadline: a silent child fails its test
instead of stalling the suite."""

from __future__ import annotations

import subprocess

from pager.tools.child import killed_after


def line_within(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The next line of ``proc``'s stdout; a child that prints none within ``timeout`` is
    killed (which ends the read) and the test fails saying so."""
    assert proc.stdout is not None
    with killed_after(proc, timeout) as fired:
        line = proc.stdout.readline()
    assert not fired.is_set(), f"pid {proc.pid} printed no line within {timeout:.0f} s (killed)"
    return line
