"""End to end with the real kernel: a memory node process, a pager process, clients here."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from enginekit import ROOT, Proc, memnode_args, wait_or_fail, wait_until

from pager.service.handoff import send_handshake
from pager.tools.workload import Client, DataSet

MIB = 1 << 20


@pytest.mark.parametrize("order,chunk", [("seq", "64K"), ("rand", "16K"), ("seq", "4K")])
def test_memnode_content_several_threads(memnode, run_pager, order, chunk):
    data = DataSet(16 * MIB)
    memnode.seed(data)
    _, sock = run_pager(*memnode_args(memnode), "--chunk", chunk)
    c = Client(16 * MIB)
    c.handoff(sock)
    t = c.touch(op="read", order=order, threads=4)
    wait_or_fail(t)
    assert c.check(data) == []
    c.close()


def test_file_source_content(tmp_path, run_pager):
    data = DataSet(20 * MIB, seed=77)
    path = tmp_path / "snap.mem"
    data.write_file(str(path))
    _, sock = run_pager("--source", f"file:{path}")
    # region at file offset 4 MiB: offsets are file positions, as Firecracker uses them
    c = Client(8 * MIB, offset=4 * MIB)
    c.handoff(sock)
    t = c.touch(op="verify", order="rand", threads=4, seed=data.seed)
    wait_or_fail(t)
    assert c.check(data) == []
    c.close()


def test_two_clients_at_once_own_spaces(memnode, run_pager):
    a, b = DataSet(8 * MIB, seed=1), DataSet(8 * MIB, seed=2, holes=False)
    memnode.seed(a, "vm-a")
    memnode.seed(b, "vm-b")
    _, sock = run_pager(*memnode_args(memnode))
    ca, cb = Client(8 * MIB, space="vm-a"), Client(8 * MIB, space="vm-b")
    ca.handoff(sock)
    cb.handoff(sock)
    ta = ca.touch(op="read", threads=2)
    tb = cb.touch(op="verify", threads=2, seed=b.seed, order="rand")
    wait_or_fail(ta)
    wait_or_fail(tb)
    assert ca.check(a) == [] and cb.check(b) == [] and tb.mismatches == 0
    ca.close()
    # the other client keeps being served after one hangs up
    c2 = Client(4 * MIB, space="vm-b")
    c2.handoff(sock)
    wait_or_fail(c2.touch(threads=2))
    assert c2.check(b) == []
    cb.close()
    c2.close()


def _raw_connect(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    return s


def _good_client_served(sock: str, data: DataSet) -> None:
    c = Client(2 * MIB)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=2), 30)
    assert c.check(data) == []
    c.close()


def test_malformed_handshakes_each_followed_by_a_good_client(memnode, run_pager, tmp_path):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode), "--handshake-timeout", "1")
    good = Client(MIB)  # its uffd is a real one to send with bad JSON
    region = good.region()
    cases = {
        "garbage": (b"{not json", [good.uffd.fileno()]),
        "no fd": (None, []),
        "two fds": (None, [good.uffd.fileno(), good.uffd.fileno()]),
        "overlap": ([region, dict(region, offset=0)], [good.uffd.fileno()]),
        "empty": ([dict(region, size=0)], [good.uffd.fileno()]),
        "misaligned": ([dict(region, base_host_virt_addr=region["base_host_virt_addr"] + 1)],
                       [good.uffd.fileno()]),
        "oversized": (b"[" + b" " * (70 * 1024), [good.uffd.fileno()]),
        "not a uffd": (None, [memnode.proc.f.fileno()]),
    }
    for what, (body, fds) in cases.items():
        s = _raw_connect(sock)
        if isinstance(body, bytes):
            import array
            s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", fds).tobytes())])
        else:
            send_handshake(s, body if body is not None else [region], fds)
        s.settimeout(5)
        assert s.recv(1) == b"", f"{what}: connection not closed"
        s.close()
        _good_client_served(sock, data)
    # truncated and silent sends: closed after the handshake timeout
    timeouts = proc.text().count("no complete handshake within 1 s")
    for partial in (b'[{"base_host_virt_addr": 4096, "si', b""):
        s = _raw_connect(sock)
        if partial:
            s.send(partial)
        s.settimeout(60)  # a hang guard: the pager's 1 s handshake timeout closes it
        assert s.recv(1) == b""
        s.close()
        # closed because the handshake timed out, not for anything else
        timeouts += 1
        wait_until(lambda n=timeouts: proc.text().count("no complete handshake within 1 s") == n,
                   f"handshake timeout {timeouts} logged")
        _good_client_served(sock, data)
    log = proc.log.read_text()
    for needle in ("not valid JSON", "carried 0 fds", "carried 2 fds", "overlaps", "empty",
                   "not aligned", "longer than", "no complete handshake"):
        assert needle in log, needle
    good.close()


@pytest.fixture
def huge_pages():
    """A few 2 MiB huge pages for the test (given back after, others' reservations kept)."""
    from tuning.errors import HugePagesError
    from tuning.hugepages import reserved
    try:
        with reserved(8):
            yield
    except HugePagesError as exc:
        pytest.skip(f"cannot reserve huge pages: {exc}")


def test_huge_page_region_with_holes(memnode, run_pager, huge_pages):
    import mmap
    data = DataSet(8 * MIB)  # holes: never-written 4 KiB pages inside 2 MiB pages
    memnode.seed(data)
    _, sock = run_pager(*memnode_args(memnode), "--chunk", "64K")
    size = 8 * MIB
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)
    c = Client(size, memory=mem, page_size=2 * MIB)
    assert _kernel_page_kib(c.base) == 2048
    c.handoff(sock)
    wait_or_fail(c.touch(threads=2, order="rand"))
    assert c.check(data) == []
    c.close(unmap=True)


def _kernel_page_kib(addr: int) -> int:
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(ch in "0123456789abcdef-" for ch in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("KernelPageSize:"):
                return int(line.split()[1])
    return 0


def test_memfd_backed_client_sends_its_memfd(memnode, run_pager):
    import mmap
    import os
    data = DataSet(8 * MIB)
    memnode.seed(data)
    _, sock = run_pager(*memnode_args(memnode))
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 4 * MIB)
    mem = mmap.mmap(fd, 4 * MIB, flags=mmap.MAP_SHARED)
    # RAM at offset 2 MiB of the space, like a second RAM block
    c = Client(4 * MIB, memory=mem, memfd=fd, offset=2 * MIB)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=3, order="rand"))
    assert c.check(data) == []
    # the pages live in the memfd itself (what write-back and far memory will read)
    assert os.pread(fd, 64, 0) == bytes(mem[:64]) != bytes(64)
    c.close(unmap=True)
    os.close(fd)


def test_socket_is_private_and_peer_uid_checked(tmp_path, run_pager):
    import os
    import stat
    data = DataSet(2 * MIB)
    path = tmp_path / "snap.mem"
    data.write_file(str(path))
    proc, sock = run_pager("--source", f"file:{path}")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    os.chmod(tmp_path, 0o755)

    def as_nobody() -> int:
        """Connect as uid 65534 in a forked child: 1 refused, 2 closed by the pager."""
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(sock)
                except PermissionError:
                    code = 1
                else:
                    s.settimeout(5)
                    code = 2 if s.recv(1) == b"" else 4
            finally:
                os._exit(code)
        return os.waitpid(pid, 0)[1] >> 8

    # let uid 65534 reach the directory (pytest's temp dirs are 0700), restored below
    dirs = [d for d in tmp_path.parents if str(d).startswith("/tmp/")]
    modes = {d: stat.S_IMODE(os.stat(d).st_mode) for d in dirs}
    try:
        for d in dirs:
            os.chmod(d, modes[d] | 0o011)
        assert as_nobody() == 1  # mode 0600: the kernel refuses the connect
        os.chmod(sock, 0o666)  # even with the file opened up, SO_PEERCRED refuses the peer
        assert as_nobody() == 2
    finally:
        for d, m in modes.items():
            os.chmod(d, m)
    assert "uid 65534 is not allowed" in proc.log.read_text()
    _good_client_served(sock, data)


def test_no_c_loop_serves_every_fault_in_python(memnode, run_pager):
    """`serve --no-c-loop`, a real run: content right through the Python fault loop."""
    data = DataSet(8 * MIB)
    memnode.seed(data)
    _, sock = run_pager(*memnode_args(memnode), "--no-c-loop", "--readahead", "0")
    c = Client(8 * MIB)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=3, order="rand"))
    assert c.check(data) == []
    c.close()


def test_insecure_no_auth_on_both_sides(tmp_path, run_pager):
    """A memory node and a pager both run with --insecure-no-auth: no token anywhere, served;
    a pager that wants a token it does not have says so instead."""
    from pager.source import MemnodeSource
    node = Proc(["memnode", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "store"),
                 "--insecure-no-auth"], tmp_path / "memnode.log")
    try:
        endpoint = node.wait_for(r"listening on (\S+)")
        assert "WARNING: authentication is off (--insecure-no-auth)" in node.text()
        assert not (tmp_path / "token").exists()
        data = DataSet(4 * MIB)
        lane = MemnodeSource(endpoint, None, "default").open_lane()
        for off, buf in data.chunks():
            lane.store_from(None, off, buf)
        lane.close()
        _, sock = run_pager("--memnode", endpoint, "--insecure-no-auth")
        c = Client(4 * MIB)
        c.handoff(sock)
        wait_or_fail(c.touch(threads=2))
        assert c.check(data) == []
        c.close()
        refused = subprocess.run(
            [sys.executable, "-m", "pager.cli", "serve", "--socket", str(tmp_path / "x.sock"),
             "--memnode", endpoint, "--token-file", str(tmp_path / "absent")], cwd=ROOT,
            capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and str(tmp_path / "absent") in refused.stderr, \
            refused.stderr
    finally:
        node.stop()


def _connect_as(uid: int, path: str, payload: bytes) -> None:
    """Connect to ``path`` from a child process running as ``uid``, send, wait for the close."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect(path)
            s.sendall(payload)
            s.recv(1)
            code = 0
        finally:
            os._exit(code)
    wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, f"uid {uid} client {pid}")


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another uid needs root")
@pytest.mark.parametrize("allow", [False, True])
def test_allow_uid_decides_who_may_connect(tmp_path, allow):
    """Without --allow-uid a peer of another uid is refused by SO_PEERCRED; with it, the same
    peer gets through to the handshake (its bad JSON is what is refused then). The socket is
    0600: an admin opening it to a group or others is what lets such a peer connect at all."""
    nobody = 65534
    public = Path(tempfile.mkdtemp(prefix="ssipg-uid-"))
    try:
        public.chmod(0o755)
        sock = str(public / "pager.sock")
        snap = tmp_path / "snap.mem"
        DataSet(MIB).write_file(str(snap))
        extra = ["--allow-uid", str(nobody)] if allow else []
        pager = Proc(["-v", "serve", "--socket", sock, "--source", f"file:{snap}", *extra],
                     tmp_path / "pager.log")
        try:
            pager.wait_for("pager: serving")
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            os.chmod(sock, 0o666)  # what the admin does for a VMM of another uid
            _connect_as(nobody, sock, b"{not json")
            if allow:
                pager.wait_for("not valid JSON")
                assert f"uid {nobody} is not allowed" not in pager.text()
            else:
                pager.wait_for(rf"handoff refused: peer uid {nobody} is not allowed")
                assert "not valid JSON" not in pager.text()
        finally:
            pager.stop()
    finally:
        shutil.rmtree(public)
