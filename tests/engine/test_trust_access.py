"""Who may connect and which spaces a client is served from: decided by the pager (issue 14,
items 2 and 3), tested with another real user (uid 65534) against real pager processes."""

from __future__ import annotations

import os
import stat

import pytest
from enginekit import Proc, memnode_args, start_pager
from trustkit import CLOSED, CONNECT_REFUSED, SERVED, run_as, shared_dir

from pager.tools.workload import DataSet

MIB = 1 << 20
NOBODY, USERS = 65534, 100

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def run_pager(tmp_path):
    """run_pager(*args) -> (Proc, socket path in a directory other users can reach)."""
    procs: list[Proc] = []
    with shared_dir() as d:
        def start(*args: str) -> tuple[Proc, str]:
            return start_pager(procs, d, tmp_path, *args, name=f"pager{len(procs)}")

        yield start
        for p in procs:
            p.stop()


@pytest.fixture
def spaces(memnode):
    a, b = DataSet(4 * MIB, seed=11), DataSet(4 * MIB, seed=22)
    memnode.seed(a, "vm-a")
    memnode.seed(b, "vm-b")
    return a, b


def test_socket_group_admits_its_members_only(memnode, spaces, run_pager):
    a, _ = spaces
    proc, sock = run_pager(*memnode_args(memnode), "--space", "vm-a", "--socket-group", "users")
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == USERS
    # a member of the group (supplementary, as a VMM user added with usermod -aG) is served
    rc, err = run_as("served", sock, NOBODY, NOBODY, [USERS], None, a.seed, 4)
    assert rc == SERVED, err
    # not a member: the kernel refuses the connect
    rc, err = run_as("refused", sock, NOBODY, NOBODY, [], None, a.seed, 4)
    assert rc == CONNECT_REFUSED, err
    # even with the file opened up, the pager's own credential check refuses a non-member
    os.chmod(sock, 0o666)
    rc, err = run_as("refused", sock, NOBODY, NOBODY, [], None, a.seed, 4)
    assert rc == CLOSED, err
    assert "uid 65534 is not allowed" in proc.log.read_text()


def test_allow_uid_by_name(memnode, spaces, run_pager):
    a, _ = spaces
    _, sock = run_pager(*memnode_args(memnode), "--space", "vm-a", "--allow-uid", "nobody")
    os.chmod(sock, 0o666)
    rc, err = run_as("served", sock, NOBODY, NOBODY, [], None, a.seed, 4)
    assert rc == SERVED, err


def test_client_cannot_pick_another_guests_space(memnode, spaces, run_pager):
    a, b = spaces
    proc, sock = run_pager(*memnode_args(memnode), "--space", "vm-a", "--socket-group", "users")
    rc, err = run_as("refused", sock, NOBODY, NOBODY, [USERS], "vm-b", b.seed, 4)
    assert rc == CLOSED, err
    log = proc.log.read_text()
    assert "may not use space 'vm-b'" in log and "--allow-space" in log
    # the pager's own space, named or not, is served; the refusal disturbed nobody
    for space in ("vm-a", None):
        rc, err = run_as("served", sock, NOBODY, NOBODY, [USERS], space, a.seed, 4)
        assert rc == SERVED, err


def test_allow_space_rules_grant_exactly_their_spaces(memnode, spaces, run_pager):
    a, b = spaces
    proc, sock = run_pager(*memnode_args(memnode), "--space", "vm-a", "--socket-group", "users",
                           "--allow-space", "uid=65534:vm-b,vm-c*")
    rc, err = run_as("served", sock, NOBODY, NOBODY, [USERS], "vm-b", b.seed, 4)
    assert rc == SERVED, err
    # a rule matches this peer, so the default space is not granted to it implicitly
    rc, err = run_as("refused", sock, NOBODY, NOBODY, [USERS], "vm-a", a.seed, 4)
    assert rc == CLOSED, err
    assert "uid=65534:vm-b,vm-c*" in proc.log.read_text()


def test_bad_access_options_are_named(tmp_path):
    import subprocess
    import sys

    from enginekit import ROOT
    for opt, needle in ((["--socket-group", "no-such-group-x"], "unknown group 'no-such-gr"),
                        (["--allow-uid", "no-such-user-x"], "unknown user 'no-such-user-x'"),
                        (["--allow-space", "vm-a"], "--allow-space 'vm-a'"),
                        (["--allow-space", "host=1:vm"], "WHO must be")):
        p = subprocess.run([sys.executable, "-m", "pager.cli", "serve", "--socket",
                            str(tmp_path / "s.sock"), "--source", f"file:{tmp_path}/x", *opt],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and needle in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
