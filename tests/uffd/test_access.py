"""Opening a userfaultfd: the syscall, and /dev/userfaultfd when the syscall is refused.

Runs a forked child as user ``nobody`` with vm.unprivileged_userfaultfd=0, so the syscall gives
EPERM: with /dev/userfaultfd closed to the user the error says how to fix it; with it open the
binding falls back to USERFAULTFD_IOC_NEW and serves a real fault. The sysctl and the device's
mode are restored afterwards.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from contextlib import contextmanager

import pytest

from pager.uffd import Userfaultfd

SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
DEV = "/dev/userfaultfd"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(DEV),
                                reason="needs root and /dev/userfaultfd")


@contextmanager
def host_state(sysctl: str, dev_mode: int):
    with open(SYSCTL) as f:
        old_sysctl = f.read().strip()
    old_mode = stat.S_IMODE(os.stat(DEV).st_mode)
    try:
        with open(SYSCTL, "w") as f:
            f.write(sysctl)
        os.chmod(DEV, dev_mode)
        yield
    finally:
        os.chmod(DEV, old_mode)
        with open(SYSCTL, "w") as f:
            f.write(old_sysctl)


CHILD_CODE = """
from pager.uffd.mman import Mapping
from pager.uffd.toucher import Toucher, pattern_bytes
m = Mapping.anonymous(8 * 4096)
with Userfaultfd() as u:
    u.register(m.address, m.length)
    t = Toucher(m.address, m.length, op="verify", seed=2).start()
    while not t.finished:
        if u.wait(0.05):
            for ev in u.read_events():
                u.copy(ev.address, pattern_bytes(4096, 2, ev.address - m.address))
    r = t.join(5)
    result = {"opened_by": u.opened_by, "mismatches": r.mismatches, "accesses": r.accesses}
"""


def run_as_nobody() -> dict:
    """Fork, drop to nobody, open a uffd and serve faults; the child's result as a dict."""
    nobody = pwd.getpwnam("nobody")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        out: dict = {}
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            scope = {"Userfaultfd": Userfaultfd}
            exec(CHILD_CODE, scope)
            out = scope["result"]
        except Exception as exc:
            out = {"error": type(exc).__name__, "message": str(exc),
                   "errno": getattr(exc, "errno", None)}
        finally:
            os.write(wfd, json.dumps(out).encode())
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_root_uses_syscall():
    with Userfaultfd() as u:
        assert u.opened_by == "syscall"


def test_dev_userfaultfd_explicit():
    with Userfaultfd(access="dev") as u:
        assert u.opened_by == "/dev/userfaultfd" and u.fileno() >= 0


def test_unprivileged_without_device_access_gets_fix_hint():
    with host_state("0", 0o600):
        out = run_as_nobody()
    assert out.get("error") == "UffdPermission", out
    assert out["errno"] == 1
    assert "vm.unprivileged_userfaultfd" in out["message"] and DEV in out["message"]


def test_unprivileged_falls_back_to_dev_userfaultfd():
    with host_state("0", 0o666):
        out = run_as_nobody()
    assert out == {"opened_by": DEV, "mismatches": 0, "accesses": 8}
