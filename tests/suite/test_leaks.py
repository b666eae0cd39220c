"""The suite's own guard (tests/conftest.py): a test that leaves a process running fails, and
the next test is clean again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.mark.parametrize("body,leak", [
    ("subprocess.Popen(['sleep', '600'])", "sleep 600"),
    ("subprocess.run(['sh', '-c', 'sleep 600 &'])", ""),  # an orphan, reparented to pytest
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

        def test_an_exited_orphan_is_no_leak():
            subprocess.run(['sh', '-c', 'true &'])
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines([f"*child processes left running: pid *: {leak}*"])
