"""Bad input at the edges gets one clear line naming what was wrong and what to do (issue 14,
item 8): handshake fds that are not what they claim, command-line mistakes, and the warnings
of running without authentication. Real pager and memory-node processes."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys

from enginekit import ROOT, Proc, memnode_args, wait_or_fail

from pager.service.handoff import send_handshake
from pager.tools.workload import Client, DataSet

MIB = 1 << 20
SYS_USERFAULTFD = 323  # x86_64


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pager.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _refused(sock: str, region: dict, fds: list[int]) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    send_handshake(s, [region], fds)
    s.settimeout(10)
    assert s.recv(1) == b"", "the pager kept a bad handshake"
    s.close()


def test_wrong_fds_are_refused_in_one_line(memnode, run_pager):
    data = DataSet(2 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode))
    good = Client(2 * MIB)
    region = good.region()
    libc = ctypes.CDLL(None, use_errno=True)
    raw = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)  # no UFFDIO_API on it
    assert raw >= 0, os.strerror(ctypes.get_errno())
    efd = os.eventfd(0)
    memfd = os.memfd_create("x")
    try:
        _refused(sock, region, [raw])
        _refused(sock, region, [efd])
        _refused(sock, dict(region, memfd=True), [good.uffd.fileno(), efd])
        _refused(sock, region, [memfd])
    finally:
        for fd in (raw, efd, memfd):
            os.close(fd)
    good.handoff(sock)  # the pager is fine and serves the next client
    wait_or_fail(good.touch(threads=2))
    assert good.check(data) == []
    good.close()
    log = proc.log.read_text()
    assert "never initialised; call UFFDIO_API" in log
    assert "first fd is 'anon_inode:[eventfd]', not a userfaultfd" in log
    assert "second fd is 'anon_inode:[eventfd]', not a memfd" in log
    assert "first fd is '/memfd:x (deleted)'" in log
    assert "Traceback" not in log


def test_socket_in_a_missing_directory_is_named(tmp_path):
    snap = tmp_path / "snap"
    snap.write_bytes(bytes(4096))
    r = _cli("serve", "--socket", str(tmp_path / "nope" / "p.sock"), "--source", f"file:{snap}")
    assert r.returncode == 1
    assert f"directory {tmp_path / 'nope'} does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("serve", "--socket", str(snap), "--source", f"file:{snap}")
    assert r.returncode == 1 and "exists and is not a socket" in r.stderr
    # a socket someone listens on is not taken over; one nobody listens on (stale) is
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "p.sock"))
    live.listen(1)
    r = _cli("serve", "--socket", str(tmp_path / "p.sock"), "--source", f"file:{snap}")
    assert r.returncode == 1 and "another process is listening on it" in r.stderr
    assert (tmp_path / "p.sock").exists()
    live.close()  # the file stays, stale
    p = Proc(["serve", "--socket", str(tmp_path / "p.sock"), "--source", f"file:{snap}"],
             tmp_path / "serve.log")
    try:
        p.wait_for("pager: serving")
    finally:
        p.stop()


def test_bad_sizes_are_usage_errors():
    for opt, bad in (("--max-resident", "1x"), ("--chunk", "-5M"), ("--readahead", "zz")):
        r = _cli("serve", "--socket", "/tmp/none.sock", "--memnode", "127.0.0.1:1",
                 f"{opt}={bad}")
        assert r.returncode == 2 and f"argument {opt}: " in r.stderr and bad in r.stderr
        assert "Traceback" not in r.stderr
    from pager.service.serve import parse_size
    assert parse_size("1.5M") == 3 << 19 and parse_size("1T") == 1 << 40
    assert parse_size("64KiB") == parse_size("64k") == 65536


def test_bad_memory_node_endpoints_are_refused_at_start(tmp_path):
    for bad, why in (("127.0.0.1:99999", "bad port"), ("127.0.0.1", "has no port"),
                     ("127.0.0.1:0", "port 0"), ("node-a:port", "expected HOST:PORT")):
        for more in ([], ["--memnode", "127.0.0.1:1"]):  # one node, or a static cluster
            r = _cli("serve", "--socket", str(tmp_path / "s.sock"), "--insecure-no-auth",
                     "--memnode", bad, *more, timeout=30)
            assert r.returncode != 0 and "--memnode: " in r.stderr and why in r.stderr, \
                r.stderr
            assert bad in r.stderr and "Traceback" not in r.stderr
            assert not (tmp_path / "s.sock").exists()


def test_demo_with_no_memory_says_so():
    r = _cli("demo", "--mib", "0")
    assert r.returncode == 1
    assert "--mib 0" in r.stderr and "at least 1 MiB" in r.stderr
    assert "Traceback" not in r.stderr


def test_running_without_authentication_warns_on_both_sides(tmp_path):
    node = Proc(["memnode", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "store"),
                 "--insecure-no-auth"], tmp_path / "memnode.log")
    try:
        endpoint = node.wait_for(r"listening on (\S+)")
        text = node.log.read_text()
        assert "WARNING: authentication is off (--insecure-no-auth): any local process" in text
        pager = Proc(["serve", "--socket", str(tmp_path / "p.sock"), "--memnode", endpoint,
                      "--insecure-no-auth"], tmp_path / "pager.log")
        try:
            pager.wait_for(r"pager: serving")
            assert "WARNING: --insecure-no-auth: the memory node is not authenticated" in \
                pager.log.read_text()
        finally:
            pager.stop()
    finally:
        node.stop()
