"""A client's fds are used only while they are its own.

The fault thread closes its eventfd when it ends, on its own (client address space gone, a
failure) or told to. A close() after that (the handoff seeing the hang-up a moment after the
thread ended, the engine closing every client at shutdown) must not write to that fd number:
by then it can be another client's memfd (8 bytes written into guest RAM), uffd or socket.
"""

from __future__ import annotations

import os

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.source import FileSource
from pager.tools.workload import Client

MIB = 1 << 20


def test_close_after_the_thread_ended_writes_to_no_reused_fd(tmp_path):
    snap = tmp_path / "snap"
    snap.write_bytes(bytes(MIB))
    engine = FaultEngine(FileSource(str(snap)), chunk_size=64 * 1024, readahead=0)
    c = Client(MIB)
    try:
        client = engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, MIB, 0)])
        efd = client._efd
        client.close()
        assert client.finished.wait(10), "the fault thread did not end"
        r, w = os.pipe()
        try:
            os.dup2(w, efd)  # someone else's file now has the eventfd's old number
            client.close()
            os.set_blocking(r, False)
            try:
                got = os.read(r, 64)
            except BlockingIOError:
                got = b""
            assert got == b"", f"close() wrote {got!r} to fd {efd}, which it no longer owns"
        finally:
            for fd in {r, w, efd}:
                os.close(fd)
    finally:
        engine.close()
        c.close(unmap=True)
