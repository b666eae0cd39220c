"""Guest RAM and device state to and from the memory nodes (one, or a cluster: every store
reaches its ``R`` replicas), through a lane of the source `serve` would build for them.

Suspend writes every page the guest ever touched (found with SEEK_DATA/SEEK_HOLE on the RAM
memfd) into the guest's address space, and the device state with a small header into the space
``NAME.vmstate``; resume reads them back. Every store returns after the node's ack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

from pager.core.region import PAGE_SIZE
from pager.errors import VmError
from pager.source.base import Lane
from pager.uffd.mman import data_ranges
from pager.vm.nodes import Nodes
from pager.vm.state import VmState

log = logging.getLogger(__name__)

STORE_CHUNK = 1 << 20
VMSTATE_MAGIC = "ssi-pager-vm-state-1"
SPACE_MAX = 64


@contextlib.contextmanager
def memnode_lane(nodes: Nodes, space: str) -> Iterator[Lane]:
    """A lane to ``space`` on ``nodes`` (lane and source closed on exit)."""
    source = nodes.source(space)
    try:
        lane = source.open_lane(bulk=True)
        try:
            yield lane
        finally:
            lane.close()
    finally:
        source.close()


def fetch_pages(lane: Lane, gpa: int, view: memoryview, space: str | None = None) -> bool:
    """Read ``len(view)`` bytes at ``gpa`` into ``view``, pages the node never stored as
    zeros; True if every page was such a zero page."""
    zero = lane.fetch_into(space, gpa, view)
    pages = len(view) // PAGE_SIZE
    if zero == (1 << pages) - 1:
        view[:] = bytes(len(view))
        return True
    for i in range(pages):
        if zero >> i & 1:
            view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    return False


def store_ram(memfd_path: str, size: int, nodes: Nodes, space: str,
              only_changed: bool = False) -> int:
    """Copy every allocated page of guest RAM into the memory nodes; bytes stored.

    A guest under a resident limit (``only_changed``): its memfd holds only the resident
    pages, the rest is on the node already; a resident page the node holds unchanged (clean)
    is not written again, only the dirty ones. Pages the pager's evictor punches meanwhile
    (it stores them first) are left to the node: only what is still data after the read is
    stored."""
    fd = os.open(memfd_path, os.O_RDONLY | os.O_CLOEXEC)
    stored = 0
    view = memoryview(bytearray(STORE_CHUNK))
    node = memoryview(bytearray(STORE_CHUNK)) if only_changed else None
    try:
        with memnode_lane(nodes, space) as lane:
            for start, length in data_ranges(fd, size):
                for off in range(start, start + length, STORE_CHUNK):
                    n = min(STORE_CHUNK, start + length - off)
                    got = os.preadv(fd, [view[:n]], off)
                    if got != n:
                        raise VmError(f"short read of guest RAM at {off:#x}: {got} of {n} "
                                      f"bytes; did QEMU exit during the suspend?")
                    for s, k in data_ranges(fd, off + n, off):  # not punched since the read
                        part = view[s - off:s - off + k]
                        for ps, pk in _changed(lane, part, s, node):
                            lane.store_from(None, ps, part[ps - s:ps - s + pk])
                            stored += pk
    finally:
        os.close(fd)
    return stored


def _changed(lane: Lane, part: memoryview, gpa: int,
             node: memoryview | None) -> list[tuple[int, int]]:
    """(gpa, length) runs of ``part`` (at ``gpa``) that differ from the node's copy (all of it
    when ``node`` is None: no comparison)."""
    if node is None:
        return [(gpa, len(part))]
    theirs = node[:len(part)]
    fetch_pages(lane, gpa, theirs)
    runs: list[tuple[int, int]] = []
    for p in range(0, len(part), PAGE_SIZE):
        if part[p:p + PAGE_SIZE] != theirs[p:p + PAGE_SIZE]:
            if runs and runs[-1][0] + runs[-1][1] == gpa + p:
                runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
            else:
                runs.append((gpa + p, PAGE_SIZE))
    return runs


def load_ram(memfd_path: str, size: int, nodes: Nodes, space: str) -> int:
    """Write every stored page of ``space`` into a fresh RAM memfd (an eager resume, the
    benchmark's comparator); bytes written."""
    fd = os.open(memfd_path, os.O_WRONLY | os.O_CLOEXEC)
    view = memoryview(bytearray(STORE_CHUNK))
    written = 0
    try:
        with memnode_lane(nodes, space) as lane:
            for off in range(0, size, STORE_CHUNK):
                part = view[:min(STORE_CHUNK, size - off)]
                if fetch_pages(lane, off, part):
                    continue  # never written: the fresh memfd reads zero already
                os.pwrite(fd, part, off)
                written += len(part)
    finally:
        os.close(fd)
    return written


def state_space(space: str) -> str:
    """The memory-node address space holding a suspended guest's device state."""
    name = f"{space}.vmstate"
    if len(name) > SPACE_MAX:
        raise VmError(f"space name {space!r} is too long to suspend (max "
                      f"{SPACE_MAX - len('.vmstate')} characters); pick a shorter --space")
    return name


def store_device_state(nodes: Nodes, st: VmState, data: bytes) -> None:
    """Device state + what resume needs to know, into the memory node: page 0 a JSON header,
    the state from page 1. The header is cleared first and written last, so a suspend cut
    short never leaves a header describing half-written state."""
    meta = {"magic": VMSTATE_MAGIC, "name": st.name, "space": st.space,
            "ram_size": st.ram_size, "ram_id": st.ram_id, "device_bytes": len(data)}
    header = json.dumps(meta).encode()
    if len(header) > PAGE_SIZE:
        raise VmError(f"the suspended-guest header of {st.name!r} is {len(header)} bytes, "
                      f"more than one page; use a shorter name or space")
    padded = data + bytes(-len(data) % PAGE_SIZE)
    with memnode_lane(nodes, state_space(st.space)) as lane:
        lane.store_from(None, 0, bytes(PAGE_SIZE))
        for off in range(0, len(padded), STORE_CHUNK):
            lane.store_from(None, PAGE_SIZE + off, padded[off:off + STORE_CHUNK])
        lane.store_from(None, 0, header.ljust(PAGE_SIZE, b"\0"))


def clear_device_state(nodes: Nodes, space: str) -> None:
    """Invalidate a suspended guest's stored state (it must be resumed once: its RAM changes
    as soon as it runs)."""
    with memnode_lane(nodes, state_space(space)) as lane:
        lane.store_from(None, 0, bytes(PAGE_SIZE))


def load_device_state(nodes: Nodes, space: str) -> tuple[dict, bytes]:
    """(header, device state) of a guest suspended into ``space``."""
    where = f"{state_space(space)!r} on {nodes}"
    with memnode_lane(nodes, state_space(space)) as lane:
        page = memoryview(bytearray(PAGE_SIZE))
        if fetch_pages(lane, 0, page) or not bytes(page).rstrip(b"\0"):
            raise VmError(f"no suspended guest in space {space!r} on {nodes}: suspend it "
                          f"first (or it was already resumed)")
        try:
            meta = json.loads(bytes(page).rstrip(b"\0"))
        except ValueError as exc:
            raise VmError(f"the suspended-guest header in {where} is unreadable ({exc})") \
                from exc
        if not isinstance(meta, dict) or meta.get("magic") != VMSTATE_MAGIC:
            raise VmError(f"{where} holds no ssi-pager guest")
        n = int(meta["device_bytes"])
        view = memoryview(bytearray(n + (-n % PAGE_SIZE)))
        for off in range(0, len(view), STORE_CHUNK):
            fetch_pages(lane, PAGE_SIZE + off, view[off:off + STORE_CHUNK])
    return meta, bytes(view[:n])
