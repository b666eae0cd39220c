"""Stops and restarts never strand a guest; the supervisor survives a long history, gives up
on a permanent start-up error and leaves no orphan pager (issue 14, items 4 and 5). Real
pager and supervisor processes, a real memory node, clients with real userfaultfds."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import time

from enginekit import Proc, memnode_args, wait_or_fail
from trustkit import SERVED, start_halves

from pager.tools.workload import Client, DataSet, Touch
from tests.procs import line_within

MIB = 1 << 20
PAGE = 4096


def _exits(proc: Proc, timeout: float = 60.0) -> int:
    try:
        return proc.p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.log.name} did not exit: {proc.log.read_text()[-1500:]}"
                             ) from None


def _blocked_touch(c: Client, memnode, start: int, end: int) -> Touch:
    """Touches of [start, end) that are blocked in faults: the memory node is stopped (the
    caller sends SIGCONT); the log line of the fault thread is not needed, the toucher not
    finishing while the node is stopped is the event."""
    memnode.proc.p.send_signal(signal.SIGSTOP)
    t = Touch(c.base + start, end - start, threads=2).start()
    assert not t.wait(0.3), "touches finished with the memory node stopped"
    return t


def test_sigterm_serves_attached_clients_until_they_exit(memnode, run_pager):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode), "--readahead", "0")
    c = Client(8 * MIB)
    c.handoff(sock)
    t = _blocked_touch(c, memnode, 0, 8 * MIB)
    try:
        proc.p.send_signal(signal.SIGTERM)
        proc.wait_for(r"stopping: 1 clients attached")
    finally:
        memnode.proc.p.send_signal(signal.SIGCONT)
    wait_or_fail(t, 60)  # the fault blocked during SIGTERM completes
    assert c.check(data) == []
    assert not os.path.exists(sock), "a stopping pager must not accept new clients"
    assert proc.p.poll() is None, "the pager left while a client was attached"
    c.close()
    assert _exits(proc) == 0


def test_stop_timeout_poisons_instead_of_hanging(memnode, run_pager):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode), "--stop-timeout", "1")
    w = start_halves(sock, data.seed, 4)
    try:
        assert line_within(w) == "half\n", w.stderr.read()
        proc.p.send_signal(signal.SIGTERM)
        assert _exits(proc) == 0
        log = proc.log.read_text()
        assert "poisoning their pages not served yet" in log and f"pid {w.pid}" in log
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.wait(60) == -signal.SIGBUS  # the documented outcome, never a hang
    finally:
        w.kill()
        w.wait()


def test_sighup_restarts_the_supervised_pager_with_clients_handed_over(memnode, run_pager):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    sup, sock = run_pager(*memnode_args(memnode), "--supervise", "--readahead", "0")
    c = Client(8 * MIB)
    c.handoff(sock)
    wait_or_fail(Touch(c.base, MIB, threads=2).start())
    t = _blocked_touch(c, memnode, MIB, 8 * MIB)
    try:
        sup.p.send_signal(signal.SIGHUP)
        sup.wait_for(r"restarting the pager on request, 1 client kept")
        sup.wait_for(r"took over client")
    finally:
        memnode.proc.p.send_signal(signal.SIGCONT)
    wait_or_fail(t, 60)
    assert c.check(data) == []
    # SIGTERM to the supervisor: its pager serves the attached client until it exits
    sup.p.send_signal(signal.SIGTERM)
    sup.wait_for(r"stopping: 1 clients attached")
    assert sup.p.poll() is None
    c.close()
    assert _exits(sup) == 0


def test_supervisor_replays_thousands_of_removals(memnode, run_pager):
    size = 48 * MIB
    data = DataSet(size, holes=False)
    memnode.seed(data)
    sup, sock = run_pager(*memnode_args(memnode), "--supervise", "--readahead", "0")
    first = int(sup.wait_for(r"pager pid (\d+) started"))
    c = Client(size)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=2), 120)
    removed = range(0, size, 2 * PAGE)  # alternating pages: nothing merges, 6144 REMOVEs
    for off in removed:
        c.mem.madvise(mmap.MADV_DONTNEED, off, PAGE)
    assert len(removed) > 5000
    # a fault served after the last REMOVE: the pager handles a uffd's events in order, so
    # every REMOVE was recorded with the supervisor by then (the kernel completes a REMOVE
    # when it is read; one read in the instant before a kill -9 is the documented limit)
    wait_or_fail(Touch(c.base, PAGE, threads=1).start())
    os.kill(first, signal.SIGKILL)
    sup.wait_for(r"restarting \(1\), 1 client kept")
    sup.wait_for(r"took over client")
    wait_or_fail(c.touch(threads=2), 120)  # removed pages fault on the new pager
    zero = bytes(PAGE)
    not_zero = [off for off in removed if c.mem[off:off + PAGE] != zero]
    assert not_zero == [], (len(not_zero), not_zero[:5], not_zero[-5:])
    assert set(c.check(data)) == set(removed)  # every other page holds its data
    c2 = Client(2 * MIB)  # and the new pager takes new clients
    c2.handoff(sock)
    wait_or_fail(c2.touch(threads=2), 30)
    assert c2.check(data) == []
    log = sup.log.read_text()
    assert "restarting (2)" not in log and "JSONDecodeError" not in log
    c.close()
    c2.close()


def test_supervisor_gives_up_on_a_permanent_start_error(tmp_path, memnode):
    proc = Proc(["serve", "--supervise", "--socket", str(tmp_path / "p.sock"), "--memnode",
                 memnode.endpoint, "--token-file", str(tmp_path / "no-such-token")],
                tmp_path / "sup.log")
    try:
        rc = _exits(proc, 120)
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert rc == 1, log[-2000:]
    assert "failed to start 5 times in a row" in log and "giving up" in log
    assert log.count("started") <= 5
    assert not (tmp_path / "p.sock").exists()


def test_supervisor_death_stops_its_pager(memnode, run_pager):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    sup, sock = run_pager(*memnode_args(memnode), "--supervise", "--stop-timeout", "1")
    child = int(sup.wait_for(r"pager pid (\d+) started"))
    w = start_halves(sock, data.seed, 4)
    try:
        assert line_within(w) == "half\n", w.stderr.read()
        sup.kill(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _alive(child):
            assert time.monotonic() < deadline, "the orphaned pager kept running"
            time.sleep(0.05)
        log = sup.log.read_text()
        assert "the supervisor died" in log and "poisoning" in log, log[-3000:]
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.wait(60) == -signal.SIGBUS  # loud, documented; never a silent hang
    finally:
        w.kill()
        w.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return False


def test_halves_client_is_served_without_a_stop(memnode, run_pager):
    """The client used above, on its own: served fully when nothing stops (control)."""
    data = DataSet(4 * MIB)
    memnode.seed(data)
    _, sock = run_pager(*memnode_args(memnode))
    w = start_halves(sock, data.seed, 4)
    try:
        assert line_within(w) == "half\n"
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.wait(60) == SERVED, w.stderr.read()
    finally:
        w.kill()
        w.wait()




def test_supervisor_giving_up_poisons_the_clients_it_holds(memnode, run_pager, tmp_path):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    token = tmp_path / "pager-token"
    token.write_bytes(memnode.token_file.read_bytes())
    token.chmod(0o600)
    sup, sock = run_pager("--memnode", memnode.endpoint, "--token-file", str(token),
                          "--supervise")
    first = int(sup.wait_for(r"pager pid (\d+) started"))
    w = start_halves(sock, data.seed, 4)
    try:
        assert line_within(w) == "half\n", w.stderr.read()
        token.unlink()  # every later start fails: a permanent start-up error
        os.kill(first, signal.SIGKILL)
        assert _exits(sup, 120) == 1
        log = sup.log.read_text()
        assert "giving up" in log
        assert f"poisoning the pages not served yet of client pid {w.pid}" in log
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.wait(60) == -signal.SIGBUS
    finally:
        w.kill()
        w.wait()


def test_sighup_without_a_supervisor_is_ignored_loudly(memnode, run_pager):
    data = DataSet(2 * MIB)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode))
    proc.p.send_signal(signal.SIGHUP)
    proc.wait_for(r"SIGHUP ignored: .* needs --supervise")
    c = Client(2 * MIB)
    c.handoff(sock)
    wait_or_fail(c.touch(threads=2))
    assert c.check(data) == [] and proc.p.poll() is None
    c.close()


_LATE_TOUCHER = """
import sys
from pager.tools.workload import Client, Touch
c = Client(int(sys.argv[2]), space=sys.argv[3])
c.handoff(sys.argv[1])
assert Touch(c.base, 4096, threads=1).start().wait(60)  # its space is in use from here
print("ready", flush=True)
sys.stdin.readline()
t = Touch(c.base, c.size, threads=1).start()
print("done" if t.wait(60) else "hung", flush=True)
"""


def test_a_kept_client_the_new_pager_refuses_is_refused_alone(tmp_path, etcd, run_pager):
    """The pager taking over a supervisor's clients refuses one it cannot serve (here: its
    space was placed meanwhile by a scheme this version does not know) without exiting:
    that client gets SIGBUS at its first touch, the others stay served. A pager that exited
    on it dropped every client it had already taken over."""
    import ctypes
    import json
    import sys

    from clusterkit import nodes, wait_until

    from tests.procs import line_within
    from transport.membership import PLACEMENT, STORES, etcd_client

    node = nodes(tmp_path, 1, etcd.url)[0]
    try:
        sup, sock = run_pager("--etcd", etcd.url, "--space", "kept", "--token-file",
                              str(node.token_file), "--supervise", "--readahead", "0")
        a = Client(4 * MIB)
        a.handoff(sock)
        wait_or_fail(Touch(a.base, MIB, threads=2).start())
        b = subprocess.Popen([sys.executable, "-c", _LATE_TOUCHER, sock, str(4 * MIB),
                              "other"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            assert line_within(b, 60).strip() == "ready"
            sup.wait_for(r"serving client2")
            ec = etcd_client(etcd.url)
            # the running pager records the space's placement, then where it is stored: once
            # the latter is there, it writes the placement no more
            wait_until(lambda: ec.get(STORES + "other/n0"), 30, "the store record")
            ec.put(PLACEMENT + "other", json.dumps({"striped": {"nodes": ["n0"],
                                                                "replicas": 1}}))
            sup.p.send_signal(signal.SIGHUP)
            sup.wait_for(r"restarting the pager on request, 2 clients kept")
            sup.wait_for(r"client pid \d+ refused \(space 'other' was placed by scheme "
                         r"'striped'.*KiB poisoned")
            sup.wait_for(r"took over client pid")
            b.stdin.write("go\n")
            b.stdin.flush()
            assert b.wait(60) == -signal.SIGBUS, b.stderr.read()[-2000:]
            wait_or_fail(Touch(a.base + MIB, 3 * MIB, threads=2).start())  # still served
            assert ctypes.string_at(a.base, 4 * MIB) == bytes(4 * MIB)  # never written: zeros
            assert "pager exited" not in sup.log.read_text(), sup.log.read_text()[-2000:]
            assert sup.p.poll() is None
        finally:
            b.kill()
            b.wait()
            a.close()
    finally:
        node.proc.stop()
