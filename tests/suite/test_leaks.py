"""The suite's own guard (tests/conftest.py): a test that leaves a process behind fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.mark.parametrize("body,leak", [
    ("subprocess.Popen(['sleep', '600'])", "running): sleep 600"),
    ("pid = os.fork() or os._exit(0); os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)",
     "exited, never waited for"),
    ("subprocess.run(['sh', '-c', 'sleep 600 &'])", "running): "),  # an orphan
])
def test_a_leaked_child_fails_the_test_that_leaked_it(pytester: pytest.Pytester, body: str,
                                                      leak: str) -> None:
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(f"""
        import os, subprocess

        def test_leaks():
            {body}

        def test_next_one_is_clean():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([f"*child processes left behind: *pid * ({leak}*"])
