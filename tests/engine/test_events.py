"""Layout events and failures with the real kernel: REMOVE, fork, dying clients, nodes, pagers."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys

from enginekit import ROOT, memnode_args, uffd_blocked, wait_or_fail, wait_until

from pager.tools.workload import Client, DataSet
from pager.uffd.toucher import Background, check_pattern

MIB = 1 << 20
PAGE = 4096


def test_remove_gives_zeros_and_is_never_fetched_again(memnode, run_pager):
    data = DataSet(8 * MIB, holes=False)
    memnode.seed(data)
    _, sock = run_pager(*memnode_args(memnode), "--chunk", "64K")
    c = Client(8 * MIB)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=2))
    assert c.check(data) == []
    # balloon: drop 1 MiB + 3 pages, unaligned to chunks; blocks until the pager reads REMOVE
    start, length = 2 * MIB + 5 * PAGE, MIB + 3 * PAGE
    c.mem.madvise(mmap.MADV_DONTNEED, start, length)
    wait_or_fail(c.touch(threads=3, order="rand"))
    assert c.mem[start:start + length] == bytes(length)
    # pages around the removed range still hold the data set
    bad = c.check(data)
    assert bad and all(start <= p < start + length for p in bad)
    assert len(bad) == length // PAGE
    # written again after removal: the client's bytes stay (the pager fills nothing over them)
    c.mem[start:start + PAGE] = b"\x7f" * PAGE
    assert c.mem[start:start + PAGE] == b"\x7f" * PAGE
    c.close()


def test_forked_child_gets_its_own_state(memnode, run_pager):
    data = DataSet(8 * MIB, holes=False)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode))
    c = Client(8 * MIB, fork=True)
    c.handoff(sock)
    # first half touched by the parent before the fork, second half never
    wait_or_fail(touch_range(c, 0, 4 * MIB))
    probe = 6 * MIB + 3 * PAGE + 16
    expect = bytearray(PAGE)
    data.fill(expect, probe & ~(PAGE - 1))
    status = Background.fork_read(c.base + probe, expect[probe % PAGE]).start().result(30)
    assert status == 0, f"child saw the wrong byte (wait status {status})"
    # the parent keeps being served after the fork
    wait_or_fail(c.touch(threads=2))
    assert c.check(data) == []
    c.close()
    proc.wait_for(rf"client pid {os.getpid()} hung up")  # the pager saw the end of it all
    assert "fault thread failed" not in proc.text()


def touch_range(c: Client, start: int, end: int):
    from pager.tools.workload import Touch
    return Touch(c.base + start, end - start, threads=2).start()


def _workload(sock: str, mib: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pager.tools.workload", "--socket", sock,
                             "--mib", str(mib), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_client_killed_while_faults_pending(memnode, run_pager):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode), "--readahead", "0")
    memnode.proc.p.send_signal(signal.SIGSTOP)  # every fetch now waits
    try:
        w = _workload(sock, 8, "--threads", "4")
        proc.wait_for(r"serving client\d+")
        # the case under test: the client dies with faults pending in the pager
        wait_until(lambda: uffd_blocked(w.pid) == 4, "4 workload threads blocked in faults")
        w.kill()
        w.wait(10)
    finally:
        memnode.proc.p.send_signal(signal.SIGCONT)
    proc.wait_for(rf"client pid {w.pid} hung up", 10)
    # the pager shrugs it off and serves the next client
    c = Client(2 * MIB)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=2), 30)
    assert c.check(data) == []
    c.close()
    assert proc.p.poll() is None


def test_memory_node_dies_and_comes_back_while_faults_wait(memnode, run_pager):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode))
    c = Client(8 * MIB)
    c.handoff(sock)
    wait_or_fail(touch_range(c, 0, MIB))
    memnode.proc.kill()
    t = c.touch(threads=4, order="rand")
    # the case under test: the pager tried the dead node, and the faults wait
    proc.wait_for(r"retrying|reconnecting", 30)
    wait_until(lambda: uffd_blocked() == 4, "4 faulting threads blocked")
    assert not t.finished, "faults were served while the memory node was down"
    memnode.start(memnode.endpoint)  # same port, same store
    wait_or_fail(t, 60)
    assert c.check(data) == []
    c.close()


def test_pager_killed_and_restarted_takes_over_blocked_client(memnode, run_pager):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    sup, sock = run_pager(*memnode_args(memnode), "--supervise", "--readahead", "0")
    first = int(sup.wait_for(r"pager pid (\d+) started"))
    c = Client(8 * MIB)
    c.handoff(sock)
    wait_or_fail(touch_range(c, 0, MIB))
    c.mem.madvise(mmap.MADV_DONTNEED, 0, 256 * 1024)  # removed: must stay zero after restart
    # a fault after it is served only once the pager handled the REMOVE (events in order),
    # which it passes to the supervisor before serving anything else; a REMOVE the kernel
    # handed to a pager killed before it handled it is not replayed (README: pager restart)
    wait_or_fail(touch_range(c, 0, 4096))
    assert c.mem[:4096] == bytes(4096)
    memnode.proc.p.send_signal(signal.SIGSTOP)  # the next faults block in the pager
    try:
        t = touch_range(c, MIB, 8 * MIB)
        wait_until(lambda: uffd_blocked() == 2, "2 faulting threads blocked")  # in the pager
        assert not t.finished
        os.kill(first, signal.SIGKILL)
        sup.wait_for(r"restarting \(1\), 1 client kept", 10)
    finally:
        memnode.proc.p.send_signal(signal.SIGCONT)
    wait_or_fail(t, 60)
    wait_or_fail(touch_range(c, 0, MIB))  # the removed range faults on the new pager
    assert c.mem[:256 * 1024] == bytes(256 * 1024)
    assert c.check(data, start=256 * 1024) == []
    assert "took over client" in sup.log.read_text()
    # new clients are served by the new pager on the same socket
    c2 = Client(2 * MIB)
    c2.handoff(sock)
    wait_or_fail(c2.touch(threads=2), 30)
    assert c2.check(data) == []
    c.close()
    c2.close()


def test_unservable_fault_gives_the_client_sigbus_not_zeros(memnode, run_pager):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode), "--fetch-timeout", "1", "--readahead", "0")
    memnode.proc.kill()  # gone for good
    w = _workload(sock, 4, "--threads", "2")
    _, err = w.communicate(timeout=60)
    assert w.returncode == -signal.SIGBUS, (w.returncode, err[-500:])
    log = proc.log.read_text()
    assert "not served" in log and "SIGBUS" in log
    assert proc.p.poll() is None


def test_region_outside_the_snapshot_file_is_refused(tmp_path, run_pager):
    data = DataSet(2 * MIB, holes=False)
    path = tmp_path / "small.mem"
    data.write_file(str(path))
    proc, sock = run_pager("--source", f"file:{path}")
    c = Client(2 * MIB, offset=MIB)  # ends 1 MiB past the end of the file
    c.handoff(sock)
    c.sock.settimeout(5)
    assert c.sock.recv(1) == b""
    c.close()
    assert "beyond the snapshot file" in proc.log.read_text()
    ok = Client(MIB, offset=MIB)
    ok.handoff(sock)
    wait_or_fail(ok.touch(threads=2))
    assert ok.check(data) == []
    ok.close()


def test_client_resending_its_uffd_to_a_new_pager_resumes(memnode, run_pager):
    """Without a supervisor: the client (like the QEMU shim) reconnects and sends again."""
    data = DataSet(4 * MIB)
    memnode.seed(data)
    first, sock = run_pager(*memnode_args(memnode), "--readahead", "0")
    c = Client(4 * MIB)
    c.handoff(sock)
    memnode.proc.p.send_signal(signal.SIGSTOP)
    try:
        t = c.touch(threads=2)
        wait_until(lambda: uffd_blocked() == 2, "2 faulting threads blocked")
        first.kill()  # events it had read are lost with it (kill waits for its exit)
    finally:
        memnode.proc.p.send_signal(signal.SIGCONT)
    # the pager is gone and the node answers again: the faults still wait, for a pager
    assert first.p.poll() is not None
    assert uffd_blocked() == 2 and not t.finished, "faults resolved with no pager"
    _, sock2 = run_pager(*memnode_args(memnode), "--readahead", "0", name="pager2")
    c.sock.close()
    c.handoff(sock2)
    wait_or_fail(t, 60)
    assert c.check(data) == []
    c.close()


def _libc_map(size: int) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    return addr


def test_mremap_and_munmap_keep_the_region_table_right(memnode, run_pager):
    import socket as socketmod

    from pager.service.handoff import send_handshake
    from pager.tools.workload import Touch
    from pager.uffd.binding import Userfaultfd
    data = DataSet(8 * MIB, holes=False)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode), "--readahead", "0")
    size = 4 * MIB
    base = _libc_map(size)
    u = Userfaultfd(features=Client.FEATURES)
    u.register(base, size)
    s = socketmod.socket(socketmod.AF_UNIX)
    s.connect(sock)
    send_handshake(s, [{"base_host_virt_addr": base, "size": size, "offset": 2 * MIB}],
                   [u.fileno()])
    wait_or_fail(Touch(base, MIB, threads=2).start())  # first MiB present before the move
    target = _libc_map(size)  # somewhere else to move to (MREMAP_FIXED replaces it)
    new = Background.mremap(base, size, size, target).start().result(30)
    assert new == target != base
    wait_or_fail(Touch(new, size, threads=3, order="rand").start())
    assert check_pattern((new, size), data.seed, 2 * MIB) < 0
    # unmap the middle; the rest is still served at the right offsets
    assert Background.munmap(new + MIB, MIB).start().result(30) == 0
    assert check_pattern((new + 2 * MIB, 2 * MIB), data.seed, 4 * MIB) < 0
    log = proc.log.read_text()
    assert "no region covers" not in log and "fault thread failed" not in log
    u.close()
    s.close()
