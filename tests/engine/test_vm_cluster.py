"""`vm` on a cluster (etcd, three real memory nodes, R=2), without a QEMU guest: what suspend
stores (guest RAM from a memfd, device state) reaches two nodes per extent; the pager `vm
resume` starts takes the space over, so a store from the pager the guest ran on before is
refused (fencing), and the resumed pager serves every byte of the suspended RAM."""

from __future__ import annotations

import argparse
import os

import pytest
from enginekit import wait_or_fail

from pager.source import MemnodeSource
from pager.source.cluster import ClusterSource
from pager.tools.workload import Client, DataSet
from pager.vm.nodes import Nodes
from pager.vm.procs import start_pager, stop_process
from pager.vm.ramstore import load_device_state, store_device_state, store_ram
from pager.vm.state import VmState
from transport.errors import RemoteError
from transport.leases import Ownership
from transport.membership import EtcdMembership
from transport.token import load_token
from transport.wire import ErrorCode

MIB = 1 << 20
SIZE = 16 * MIB


def guest_ram(data: DataSet) -> int:
    """A memfd holding ``data`` (its holes never written), as a guest's RAM would."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, data.size)
    for off, buf in data.chunks():
        os.pwrite(fd, buf, off)
    return fd


def written_pages(endpoint: str, token: bytes, space: str, size: int) -> int:
    with MemnodeSource(endpoint, token, space).open_lane() as lane:
        buf = bytearray(size)
        mask = lane.fetch_into(None, 0, memoryview(buf))
    return size // 4096 - bin(mask).count("1")


def test_suspend_stores_reach_two_nodes_and_resume_fences_the_old_pager(etcd, three_etcd,
                                                                       tmp_path):
    three = three_etcd
    tf = str(three[0].token_file)
    token = load_token(tf)
    where = Nodes(etcd=etcd.url, replicas=2, token_file=tf)
    # the pager the guest ran on: owns vm1
    old = ClusterSource(EtcdMembership(etcd.url), token, "vm1", replicas=2, prefer="tcp",
                        owner=Ownership.acquire(etcd.url, "vm1", "old-pager"))
    pager = None
    data = DataSet(SIZE)
    fd = guest_ram(data)
    try:
        with old.open_lane() as lane:
            lane.store_from(None, 0, bytes(4096))  # a write-back before the suspend
            # suspend: RAM and device state through the cluster, R=2
            stored = store_ram(f"/proc/self/fd/{fd}", SIZE, where, "vm1")
            assert stored == sum(e - s for s, e in data.data_ranges())
            st = VmState(name="g", space="vm1", ram_size=SIZE, ram_id="ssi-ram")
            device = os.urandom(100_000)
            store_device_state(where, st, device)
            meta, back = load_device_state(where, "vm1")
            assert back == device and meta["ram_size"] == SIZE
            pages = sum(written_pages(n.endpoint, token, "vm1", SIZE) for n in three)
            assert pages == 2 * stored // 4096, "every stored page on exactly two nodes"

            # resume on a second pager, started as `vm` starts it, on the cluster
            args = argparse.Namespace(token_file=tf, max_resident=None, verbose=0,
                                      pager_arg=["--readahead", "0"])
            sock = tmp_path / "pager2.sock"
            pager = start_pager(sock, args, "vm1", where)
            with pytest.raises(RemoteError) as refused:
                lane.store_from(None, 0, os.urandom(64 << 10))
            assert refused.value.code == ErrorCode.STALE_EPOCH

        c = Client(SIZE)
        c.handoff(str(sock))
        t = c.touch(op="read", order="seq", threads=1)
        wait_or_fail(t, 120)
        assert c.check(data) == []  # the resumed pager serves the suspended RAM, not newer
        c.close()
    finally:
        os.close(fd)
        if pager is not None:
            stop_process(pager)
        old.close()
