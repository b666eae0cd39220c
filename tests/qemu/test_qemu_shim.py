"""The preload shim (pager/shim/ssi_shim.c) without QEMU: a small Python child, preloaded with
the built library, maps "guest RAM" the way QEMU does; the test is the pager end of the socket.

Real userfaultfd, real SCM_RIGHTS: the received uffd is used to fill the child's memory.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vmkit import LineReader

from pager.shim import library
from pager.uffd import Userfaultfd

SIZE = 8 << 20
PAGE = 4096

# the child: reserve, then map RW with MAP_FIXED (anonymous private or a shared memfd named as
# QEMU names it), print the address, wait for "read" and print the first bytes of every MiB
CHILD = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    kind, size = sys.argv[1], int(sys.argv[2])
    PROT_RW, MAP_PRIVATE, MAP_SHARED, MAP_ANON, MAP_FIXED = 3, 2, 1, 0x20, 0x10
    res = libc.mmap(None, size + (1 << 21), 0, MAP_PRIVATE | MAP_ANON, -1, 0)
    base = res + 4096  # 4 KiB aligned only, like a memfd RAM base can be
    if kind == "anon":
        p = libc.mmap(base, size, PROT_RW, MAP_PRIVATE | MAP_ANON | MAP_FIXED, -1, 0)
    elif kind == "memfd":
        fd = libc.memfd_create(b"memory-backend-memfd", 1)
        os.ftruncate(fd, size)
        p = libc.mmap(base, size, PROT_RW, MAP_SHARED | MAP_FIXED, fd, 0)
    else:  # not guest RAM: right size without MAP_FIXED, and MAP_FIXED of another size
        p = libc.mmap(None, size, PROT_RW, MAP_PRIVATE | MAP_ANON, -1, 0)
        libc.mmap(base, size - 4096, PROT_RW, MAP_PRIVATE | MAP_ANON | MAP_FIXED, -1, 0)
    print(p, flush=True)
    if sys.stdin.readline().strip() == "read":
        buf = (ctypes.c_char * 8)
        print(" ".join(bytes(buf.from_address(p + off)).hex()
                       for off in range(0, size, 1 << 20)), flush=True)
    sys.stdin.readline()
""")


class Child:
    def __init__(self, tmp: Path, kind: str, space: str | None = "vmtest",
                 size_env: str | None = None, wrapper: tuple[str, ...] = ()) -> None:
        self.sock_path = tmp / "pager.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.sock_path))
        self.server.listen(1)
        self.server.settimeout(10)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSI_PAGER_")}
        env.update(LD_PRELOAD=str(library()), SSI_PAGER_SOCKET=str(self.sock_path),
                   SSI_PAGER_RAM_SIZE=size_env or str(SIZE))
        if space is not None:
            env["SSI_PAGER_SPACE"] = space
        self.proc = subprocess.Popen([*wrapper, sys.executable, "-c", CHILD, kind, str(SIZE)],
                                     env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.out = LineReader(self.proc.stdout, "the preloaded child")

    def accept(self) -> tuple[socket.socket, list, list[int]]:
        conn, _ = self.server.accept()
        conn.settimeout(10)
        data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for _, _, cdata in anc:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
        return conn, json.loads(data), list(fds)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.out.drain(10)
        self.server.close()


@pytest.fixture
def child_factory(tmp_path):
    made: list[Child] = []

    def make(*a, **kw) -> Child:
        c = Child(tmp_path, *a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("kind,wrapper", [("anon", ()), ("memfd", ()),
                                          ("anon", ("env",)), ("memfd", ("setsid", "env"))])
def test_handshake_and_uffd_serves_the_mapping(child_factory, kind, wrapper):
    """Also with the process started through wrappers (which load the shim too, and must
    pass its settings on)."""
    c = child_factory(kind, wrapper=wrapper)
    conn, regions, fds = c.accept()
    addr = int(c.out.next_line())
    try:
        assert len(regions) == 1
        r = regions[0]
        assert r["base_host_virt_addr"] == addr and addr % PAGE == 0
        assert r["size"] == SIZE and r["offset"] == 0
        assert r["page_size"] == PAGE and r["page_size_kib"] == PAGE  # bytes, as Firecracker
        assert r["space"] == "vmtest"
        assert fd_target(fds[0]) == "anon_inode:[userfaultfd]"
        if kind == "memfd":
            assert r["memfd"] is True and len(fds) == 2
            assert fd_target(fds[1]).startswith("/memfd:memory-backend-memfd")
        else:
            assert "memfd" not in r and len(fds) == 1
        # the uffd covers exactly the child's RAM: fill each MiB's first page from here
        u = Userfaultfd.adopt(fds[0])
        for i, off in enumerate(range(0, SIZE, 1 << 20)):
            assert u.copy(addr + off, bytes([i + 1]) * PAGE) == PAGE
        u.zeropage(addr + PAGE, PAGE)
        c.proc.stdin.write("read\n")
        c.proc.stdin.flush()
        seen = c.out.next_line().split()
        assert seen == [bytes([i + 1] * 8).hex() for i in range(SIZE >> 20)]
        u.close()
    finally:
        for fd in fds[1:]:
            os.close(fd)
        conn.close()


def test_other_mappings_are_left_alone(child_factory):
    c = child_factory("other")
    int(c.out.next_line())
    c.server.settimeout(0.5)
    with pytest.raises(TimeoutError):
        c.server.accept()
    c.proc.stdin.write("skip\n\n")
    c.proc.stdin.flush()
    assert c.proc.wait(10) == 0


def test_pager_hangup_stops_the_process(child_factory):
    """Fail closed: when the pager closes the socket, the process exits with a message."""
    c = child_factory("anon")
    conn, _, fds = c.accept()
    for fd in fds:
        os.close(fd)
    conn.close()
    assert c.proc.wait(10) == 1
    assert "the pager closed the handoff socket" in c.proc.stderr.read()


def test_space_is_json_escaped(child_factory):
    c = child_factory("anon", space='odd"name\\x')
    conn, regions, fds = c.accept()
    try:
        assert regions[0]["space"] == 'odd"name\\x'
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


@pytest.mark.parametrize("bad", ["abc", "0", "4097", "-4096"])
def test_bad_ram_size_fails_at_start(child_factory, bad):
    c = child_factory("anon", size_env=bad)
    assert c.proc.wait(10) == 1
    assert "SSI_PAGER_RAM_SIZE" in c.proc.stderr.read()
