"""A far-memory guest whose space another pager took over (a real etcd, three real nodes, a
real pager process, the guest a child process): its pager's stores are refused from then on,
so the guest gets SIGBUS at the next page the pager cannot keep or fetch for it, instead of
hanging on a write-back retried forever or reading the new owner's pages; the new owner's
pages are never overwritten, and the pager goes on serving others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from enginekit import ROOT

from pager.source.cluster import ClusterSource
from transport.leases import Ownership
from transport.membership import EtcdMembership
from transport.token import load_token

MIB = 1 << 20

# a guest on a shared memfd (as the QEMU shim hands it over) writing its pages at random
# until killed; "warm" once every page was written once (so write-back has run)
GUEST = """
import mmap, os, sys
from pager.tools.workload import Client
from pager.uffd.rmw import Rmw
size = int(sys.argv[2])
fd = os.memfd_create("guest")
os.ftruncate(fd, size)
c = Client(size, memory=mmap.mmap(fd, size, flags=mmap.MAP_SHARED), memfd=fd)
c.handoff(sys.argv[1])
w = Rmw(c.base, size // 4096, threads=2, write_pct=100, hot_ops=0)
w.run(ops=size // 4096)
print("warm", w.errors, flush=True)
w.set_mix(write_pct=50, hot_ops=0)
while True:
    w.run(ops=20000)
"""


def test_a_fenced_far_memory_guest_gets_sigbus_not_a_hang(etcd, three_etcd, run_pager):
    token_file = str(three_etcd[0].token_file)
    pager, sock = run_pager("--etcd", etcd.url, "--space", "vm1", "--replicas", "2",
                            "--token-file", token_file, "--readahead", "0", "--chunk", "16K",
                            "--max-resident", "2M")
    guest = subprocess.Popen([sys.executable, "-c", GUEST, sock, str(8 * MIB)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        assert guest.stdout.readline().split() == ["warm", "0"], guest.stderr.read()[-2000:]
        # the guest is resumed on another pager: a newer owner fences every node
        owner = Ownership.acquire(etcd.url, "vm1", "second")
        second = ClusterSource(EtcdMembership(etcd.url), load_token(three_etcd[0].token_file),
                               "vm1", replicas=2, prefer="tcp", owner=owner)
        mine = os.urandom(8 * MIB)
        with second.open_lane() as lane:
            lane.store_from(None, 0, mine)
        try:
            rc = guest.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the fenced guest hangs (or runs on) instead of getting "
                                 "SIGBUS; pager log:\n"
                                 + pager.log.read_text()[-3000:]) from None
        assert rc == -signal.SIGBUS, (rc, guest.stderr.read()[-2000:])
        pager.wait_for(r"client\d+ \(pid \d+\): its space is owned by a newer pager", 30)
        # nothing of the old guest landed over the new owner's pages
        with second.open_lane() as lane:
            got = bytearray(8 * MIB)
            assert lane.fetch_into(None, 0, memoryview(got)) == 0
            assert got == mine
        assert pager.p.poll() is None  # the pager keeps serving (its other clients)
    finally:
        guest.kill()
        guest.wait()
        if second is not None:
            second.close()
